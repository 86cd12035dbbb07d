//! A window of RMA writes kept full across the ranges a streamed put hands it: each range
//! is cut into [`PIPE_CHUNK`] pieces, up to [`PIPE_WINDOW`] of them are in flight at once
//! (a new range does not wait for the previous one to land), and each piece's crc32c is
//! taken right after it is posted, while the writes ahead of it are still on the wire.
//!
//! Every write posted has completed or failed before the pipe is gone (its `Drop` waits
//! for the rest after an error), so the caller may hand the buddy's reservation back as
//! soon as the pipe returns: no late write can land in a range given to someone else.
use super::{Inner, Result, StoreError};
use fabric::{Completion, MemoryRegion, RemoteRegion};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;

/// Bytes per RMA write of a streamed put (`bench ckpt` measures the fabric at this shape
/// and at others as its reference).
pub const PIPE_CHUNK: usize = 2 << 20;
/// RMA writes of a streamed put in flight at once.
pub const PIPE_WINDOW: usize = 16;

/// A write of the window: posted, or refused at once (an injected fault: see
/// [`super::Store::fail_rma_write_for_test`]), reported when its turn comes.
enum Posted {
    Write(Completion),
    Refused(String),
}

/// Pipelined RMA writes of one registered file into one remote reservation (see the module
/// docs).
pub(super) struct WritePipe<'a> {
    inner: &'a Inner,
    node: usize,
    mr: &'a MemoryRegion,
    /// The buddy's reservation, its key for that range alone: byte `a` of the file goes to
    /// byte `a` of it.
    remote: &'a RemoteRegion,
    window: VecDeque<(Posted, u64, u64)>,
    /// start -> (end, crc32c) of every piece posted (the pieces never overlap).
    pieces: BTreeMap<u64, (u64, u32)>,
}

impl<'a> WritePipe<'a> {
    pub(super) fn new(
        inner: &'a Inner,
        node: usize,
        mr: &'a MemoryRegion,
        remote: &'a RemoteRegion,
    ) -> WritePipe<'a> {
        WritePipe {
            inner,
            node,
            mr,
            remote,
            window: VecDeque::with_capacity(PIPE_WINDOW),
            pieces: BTreeMap::new(),
        }
    }

    /// Writes in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.window.len()
    }

    /// Posts the parts of `start..end` not posted yet (bytes final by the caller's
    /// contract), waiting for the oldest writes whenever the window is full.
    pub(super) fn send(&mut self, start: u64, end: u64) -> Result<()> {
        let ends: BTreeMap<u64, u64> = self.pieces.iter().map(|(&s, &(e, _))| (s, e)).collect();
        for (a, b) in super::streamed::unsent(&ends, start, end) {
            let mut at = a;
            while at < b {
                let n = (b - at).min(PIPE_CHUNK as u64);
                while self.window.len() >= PIPE_WINDOW {
                    self.retire_oldest()?;
                }
                self.post(at, at + n)?;
                at += n;
            }
        }
        Ok(())
    }

    fn post(&mut self, a: u64, b: u64) -> Result<()> {
        let inner = self.inner;
        let peer = inner.peers[self.node].expect("remote node");
        let nth = inner.pipe_writes.fetch_add(1, Ordering::Relaxed) + 1;
        let posted = if inner.pipe_fault.load(Ordering::Relaxed) == nth {
            Posted::Refused(format!("injected fault on write {nth}"))
        } else {
            // SAFETY: a..b is final (the streamed put's contract: never written again) and
            // inside the mapping; the remote range was reserved for this copy alone and
            // stays reserved until every write posted here completed (see `Drop`).
            Posted::Write(unsafe {
                inner
                    .ep
                    .post_write(peer, self.mr, a as usize, (b - a) as usize, self.remote, a)
            }?)
        };
        self.window.push_back((posted, a, b));
        // The piece's checksum, taken while the writes ahead of it travel.
        // SAFETY: a..b is final and inside the mapping (as above).
        let crc = crc32c::crc32c(unsafe { &self.mr.region().as_slice()[a as usize..b as usize] });
        self.pieces.insert(a, (b, crc));
        Ok(())
    }

    /// Waits for the oldest write in flight; its failure names the bytes and the node.
    pub(super) fn retire_oldest(&mut self) -> Result<()> {
        let Some((posted, a, b)) = self.window.pop_front() else {
            return Ok(());
        };
        let failed = match posted {
            Posted::Write(c) => c.wait().err().map(|e| e.to_string()),
            Posted::Refused(why) => Some(why),
        };
        match failed {
            None => Ok(()),
            Some(why) => Err(StoreError::Peer {
                node: self.node,
                what: format!("RMA write of bytes {a}..{b} of the image: {why}"),
            }),
        }
    }

    /// Waits for every write in flight; then the crc32c of bytes `0..len`, which the
    /// pieces posted must tile.
    pub(super) fn finish(mut self, len: u64) -> Result<u32> {
        while !self.window.is_empty() {
            self.retire_oldest()?;
        }
        let mut at = 0;
        let mut crc = 0u32;
        for (&s, &(e, c)) in &self.pieces {
            if s != at {
                return Err(StoreError::Invalid(format!(
                    "bytes {at}..{s} of the image were never sent"
                )));
            }
            crc = crc32c::crc32c_combine(crc, c, (e - s) as usize);
            at = e;
        }
        if at != len {
            return Err(StoreError::Invalid(format!(
                "bytes {at}..{len} of the image were never sent"
            )));
        }
        Ok(crc)
    }
}

impl Drop for WritePipe<'_> {
    /// After an error: the writes still in flight end (complete or fail) before the
    /// reservation they write into can be handed back.
    fn drop(&mut self) {
        while let Some((posted, _, _)) = self.window.pop_front() {
            if let Posted::Write(c) = posted {
                let _ = c.wait();
            }
        }
    }
}
