//! One-sided windows: memory every rank registers with its fabric endpoint, allocated
//! collectively (like `MPI_Win_allocate`), that other ranks put to, get from and update
//! with 64-bit atomics. An operation has completed at the target when the call returns;
//! order accesses between ranks with [`Rank::barrier`].
use std::sync::{Arc, Mutex};

use fabric::{MemoryRegion, Region, RemoteRegion};

use crate::error::{RankError, Result};
use crate::world::Rank;

/// A rank's registered window memory and its copy buffer.
#[derive(Default)]
pub(crate) struct WindowTable {
    inner: Mutex<Tables>,
    /// Bounce buffer for puts and gets from memory the fabric does not know.
    staging: Mutex<Option<MemoryRegion>>,
}

#[derive(Default)]
struct Tables {
    next_id: u64,
    locals: Vec<(u64, MemoryRegion)>,
}

impl WindowTable {
    /// The registered region holding `ptr..ptr+len`, and the offset of `ptr` in it.
    fn containing(&self, ptr: *const u8, len: usize) -> Option<(MemoryRegion, usize)> {
        let tables = self.inner.lock().expect("window table");
        tables.locals.iter().find_map(|(_, mr)| {
            let base = mr.as_ptr() as usize;
            let p = ptr as usize;
            (p >= base && p.checked_add(len)? <= base + mr.len()).then(|| (mr.clone(), p - base))
        })
    }
}

/// One operation of a batch ([`Window::put_batch_from`], [`Window::get_batch_into`]):
/// `len` bytes between `offset` of the target's part and `local_offset` of the local region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub local_offset: usize,
    pub len: usize,
}

#[derive(Clone, Copy)]
enum Direction {
    Put,
    Get,
}

/// A window: this rank's part (local memory) and every rank's descriptor.
pub struct Window {
    id: u64,
    rank: Arc<Rank>,
    local: MemoryRegion,
    len: usize,
    remotes: Vec<(RemoteRegion, u64)>,
}

impl Rank {
    /// Collective: every rank allocates and registers `len` bytes (lengths may differ per
    /// rank) and learns every other rank's window.
    pub fn window(self: &Arc<Self>, len: usize) -> Result<Window> {
        let local = self.register(len)?;
        let mut card = local.remote().to_bytes().to_vec();
        card.extend_from_slice(&(len as u64).to_le_bytes());
        let cards = self.allgather(&card)?;
        let mut remotes = Vec::with_capacity(cards.len());
        for (r, c) in cards.iter().enumerate() {
            if c.len() != RemoteRegion::ENCODED_LEN + 8 {
                return Err(RankError::Protocol {
                    rank: r,
                    reason: format!("window descriptor of {} bytes", c.len()),
                });
            }
            let remote = RemoteRegion::from_bytes(&c[..RemoteRegion::ENCODED_LEN])?;
            let n = u64::from_le_bytes(c[RemoteRegion::ENCODED_LEN..].try_into().expect("8"));
            remotes.push((remote, n));
        }
        let id = {
            let mut t = self.windows.inner.lock().expect("window table");
            let id = t.next_id;
            t.next_id += 1;
            t.locals.push((id, local.clone()));
            id
        };
        Ok(Window {
            id,
            rank: self.clone(),
            local,
            len,
            remotes,
        })
    }
}

impl Window {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This rank's part, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// This rank's part of the window (remote ranks may write it at any time).
    pub fn local(&self) -> &MemoryRegion {
        &self.local
    }

    fn check(
        &self,
        target: usize,
        offset: u64,
        len: usize,
    ) -> Result<(fabric::PeerId, RemoteRegion)> {
        self.rank.msgs.check_rank(target as i64)?;
        let (remote, window_len) = self.remotes[target];
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > window_len)
        {
            return Err(RankError::WindowOutOfBounds {
                window: self.id,
                target,
                offset,
                len: len as u64,
                window_len,
            });
        }
        Ok((self.rank.msgs.peer(target), remote))
    }

    fn staging(&self, len: usize) -> Result<std::sync::MutexGuard<'_, Option<MemoryRegion>>> {
        let mut s = self.rank.windows.staging.lock().expect("staging");
        if s.as_ref().is_none_or(|m| m.len() < len) {
            let size = len.next_power_of_two().max(64 << 10);
            *s = Some(self.rank.ep.register(Region::new(size)?)?);
        }
        Ok(s)
    }

    /// Writes `src[src_offset..+len]` (memory registered with this rank) to `target`'s part
    /// at `offset`, without a copy.
    pub fn put_from(
        &self,
        target: usize,
        offset: u64,
        src: &MemoryRegion,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        let (peer, remote) = self.check(target, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller does not write `src` during this blocking call; the window's
        // remote range is ordered by the caller's synchronisation (barriers).
        unsafe {
            self.rank
                .ep
                .write(peer, src, src_offset, len, &remote, offset)?
        };
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `target`'s part into `dst[dst_offset..]` (memory
    /// registered with this rank), without a copy.
    pub fn get_into(
        &self,
        target: usize,
        offset: u64,
        dst: &MemoryRegion,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        let (peer, remote) = self.check(target, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `dst` is written only by this blocking read; the caller orders remote
        // writers of the source range with barriers.
        unsafe {
            self.rank
                .ep
                .read(peer, dst, dst_offset, len, &remote, offset)?
        };
        Ok(())
    }

    /// Writes each span of `src` (memory registered with this rank) to `target`'s part with
    /// all of them in flight at once, without a copy (several `MPI_Put`s and one
    /// `MPI_Win_flush`); returns when every one has completed at the target. A failed post
    /// or operation does not abandon the others: all posted ones are waited for, then the
    /// first error is returned.
    pub fn put_batch_from(&self, target: usize, src: &MemoryRegion, spans: &[Span]) -> Result<()> {
        self.batch(target, src, spans, Direction::Put)
    }

    /// Reads each span of `target`'s part into `dst` (memory registered with this rank)
    /// with all of them in flight at once, without a copy; returns when every one has
    /// landed. The spans' local ranges must not overlap (two reads landing in the same bytes
    /// at once would race): such a batch is refused before anything is posted.
    pub fn get_batch_into(&self, target: usize, dst: &MemoryRegion, spans: &[Span]) -> Result<()> {
        let mut local: Vec<(usize, usize)> = spans
            .iter()
            .filter(|s| s.len > 0)
            .map(|s| (s.local_offset, s.local_offset.saturating_add(s.len)))
            .collect();
        local.sort_unstable();
        if let Some(w) = local.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(RankError::InvalidArgument(format!(
                "get batch on window {}: local ranges {}..{} and {}..{} overlap",
                self.id, w[0].0, w[0].1, w[1].0, w[1].1
            )));
        }
        self.batch(target, dst, spans, Direction::Get)
    }

    fn batch(
        &self,
        target: usize,
        local: &MemoryRegion,
        spans: &[Span],
        dir: Direction,
    ) -> Result<()> {
        // Every span is checked before the first is posted: a bad one posts nothing.
        let mut checked = Vec::with_capacity(spans.len());
        for s in spans {
            let (peer, remote) = self.check(target, s.offset, s.len)?;
            if s.local_offset
                .checked_add(s.len)
                .is_none_or(|end| end > local.len())
            {
                return Err(RankError::InvalidArgument(format!(
                    "batch on window {}: local range {}+{} outside the {}-byte region",
                    self.id,
                    s.local_offset,
                    s.len,
                    local.len()
                )));
            }
            if s.len > 0 {
                checked.push((peer, remote, s));
            }
        }
        let mut posted = Vec::with_capacity(checked.len());
        let mut first_error = None;
        for (peer, remote, s) in checked {
            // SAFETY: this call returns only after every posted operation completed
            // (`wait_all` below); the caller lends `local` for the call (puts only read it,
            // gets write disjoint ranges, checked above), and orders the window's remote
            // ranges by its own synchronisation (barriers), as for the blocking calls.
            let r = unsafe {
                match dir {
                    Direction::Put => self.rank.ep.post_write(
                        peer,
                        local,
                        s.local_offset,
                        s.len,
                        &remote,
                        s.offset,
                    ),
                    Direction::Get => self.rank.ep.post_read(
                        peer,
                        local,
                        s.local_offset,
                        s.len,
                        &remote,
                        s.offset,
                    ),
                }
            };
            match r {
                Ok(c) => posted.push(c),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        let waited = fabric::wait_all(posted);
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(waited?),
        }
    }

    /// Writes `data` to `target`'s part at `offset`. Data inside a window of this rank goes
    /// without a copy; other memory through a registered bounce buffer.
    pub fn put(&self, target: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.check(target, offset, data.len())?;
        if let Some((mr, at)) = self.rank.windows.containing(data.as_ptr(), data.len()) {
            return self.put_from(target, offset, &mr, at, data.len());
        }
        let guard = self.staging(data.len())?;
        let stage = guard.as_ref().expect("staging allocated");
        stage.write_bytes(0, data)?;
        self.put_from(target, offset, stage, 0, data.len())
    }

    /// Reads `out.len()` bytes at `offset` of `target`'s part into `out`.
    pub fn get(&self, target: usize, offset: u64, out: &mut [u8]) -> Result<()> {
        self.check(target, offset, out.len())?;
        if let Some((mr, at)) = self.rank.windows.containing(out.as_ptr(), out.len()) {
            return self.get_into(target, offset, &mr, at, out.len());
        }
        let guard = self.staging(out.len())?;
        let stage = guard.as_ref().expect("staging allocated");
        self.get_into(target, offset, stage, 0, out.len())?;
        stage.read_bytes(0, out)?;
        Ok(())
    }

    fn check_atomic(&self, target: usize, offset: u64) -> Result<(fabric::PeerId, RemoteRegion)> {
        let r = self.check(target, offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(RankError::Misaligned {
                window: self.id,
                offset,
            });
        }
        Ok(r)
    }

    /// Atomically adds `add` to the 64-bit word at `offset` of `target`'s part; returns the
    /// previous value.
    pub fn fetch_add(&self, target: usize, offset: u64, add: u64) -> Result<u64> {
        let (peer, remote) = self.check_atomic(target, offset)?;
        Ok(self.rank.ep.fetch_add(peer, &remote, offset, add)?)
    }

    /// Atomically replaces the word at `offset` of `target`'s part with `swap` if it equals
    /// `compare`; returns the previous value (the swap happened iff it equals `compare`).
    pub fn compare_swap(&self, target: usize, offset: u64, compare: u64, swap: u64) -> Result<u64> {
        let (peer, remote) = self.check_atomic(target, offset)?;
        Ok(self
            .rank
            .ep
            .compare_swap(peer, &remote, offset, compare, swap)?)
    }

    /// Collective: waits until every rank is done with the window, then releases it.
    pub fn free(self) -> Result<()> {
        self.rank.barrier()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let mut t = self.rank.windows.inner.lock().expect("window table");
        t.locals.retain(|(id, _)| *id != self.id);
    }
}
