//! Streamed puts: an image file still being written (a native capture copying into its
//! mapped L1 file) goes to the buddy as its parts become final, so that L2 overlaps L1
//! instead of following it.
//!
//! The writer reports which byte ranges are final ([`Ready`]); each goes out at once with
//! RMA writes from the file's own pages into the buddy's reservation, and its crc32c is
//! taken while the next ones are written. Once the writer says the whole file is final,
//! the rest (headers, checksums written last) follows, the crcs are combined in file order
//! and the buddy verifies the whole copy before it acknowledges, as for every put. Only then
//! is the version safe at L1 and L2 at once: nothing is marked safe from a partial file.
use super::{Body, Inner, L1Copy, Level, Store};
use crate::disk::check_owner;
use crate::error::{Result, StoreError};
use fabric::{MemoryRegion, Region, RemoteRegion};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mapped::PutReport;
use super::pipeline::WritePipe;
use super::unexpected;

/// What the writer of a streamed file reports (see [`Store::put_file_streamed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// Bytes `start..end` of the file are final (they may overlap earlier reports).
    Range(u64, u64),
    /// Nothing new yet.
    Pending,
    /// The whole file is final.
    Complete,
}

/// The parts of `start..end` not yet in `sent` (disjoint, sorted by start).
pub(super) fn unsent(sent: &BTreeMap<u64, u64>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    // The range that starts before `start` may cover part of it.
    if let Some((_, &e)) = sent.range(..=start).next_back() {
        at = at.max(e);
    }
    for (&s, &e) in sent.range(start..end) {
        if s > at {
            out.push((at, s.min(end)));
        }
        at = at.max(e);
    }
    if at < end {
        out.push((at, end));
    }
    out
}

impl Store {
    /// Stores the file at `path` (its final length already set) as `owner`'s `version` at L1
    /// and L2 while it is still being written: `next` is polled for the ranges that became
    /// final (see the module docs) until it says [`Ready::Complete`]. Returns once the buddy
    /// verified its copy (the version is then safe at L1 and L2; L3 and L4 follow on the
    /// flush thread). On a store of one node the file is put as by [`Store::put_file`] once
    /// complete. Fails if `next` fails, if the file is not complete within `timeout`, or if
    /// the transfer fails (nothing is then marked safe; the caller may put the file again).
    ///
    /// # Safety
    /// As for [`Store::put_file`]; moreover a range reported final is never written again,
    /// and the file keeps its length from the call on.
    pub unsafe fn put_file_streamed(
        &self,
        owner: &str,
        version: u64,
        path: &Path,
        next: &mut dyn FnMut() -> Result<Ready>,
        timeout: Duration,
    ) -> Result<PutReport> {
        check_owner(owner)?;
        let inner: &Inner = &self.inner;
        let io = |what: &str, e: std::io::Error| StoreError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(|e| io("opening the image", e))?;
        let len = file
            .metadata()
            .map_err(|e| io("reading the image size", e))?
            .len();
        if len == 0 {
            return Err(StoreError::Truncated {
                path: path.to_path_buf(),
                expected: 1,
                actual: 0,
            });
        }
        let ulen = usize::try_from(len)
            .map_err(|_| StoreError::Invalid(format!("{}: {len} bytes", path.display())))?;
        // SAFETY: the caller keeps the file whole while the store holds the mapping.
        let region = unsafe { Region::map_file(&file, ulen) }?;
        let mr = inner.ep.register(region)?;
        let key = (owner.to_string(), version);
        let start = Instant::now();
        let overdue = || {
            (start.elapsed() > timeout).then(|| {
                StoreError::Invalid(format!(
                    "{owner} v{version}: {} not complete within {timeout:?}",
                    path.display()
                ))
            })
        };
        if inner.cfg.nodes.len() < 2 {
            loop {
                match next()? {
                    Ready::Complete => return self.insert_l1(owner, version, mr, ulen),
                    Ready::Range(..) => {}
                    Ready::Pending => {
                        if let Some(e) = overdue() {
                            return Err(e);
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            }
        }
        let buddy = inner.buddy_of(inner.cfg.node);
        if inner.is_down(buddy) {
            return Err(inner.down_error(buddy));
        }
        if buddy == inner.cfg.node {
            return Err(StoreError::Invalid(
                "no other node is up to hold the copy".into(),
            ));
        }
        let reply = inner.request(
            buddy,
            Body::Reserve {
                owner: owner.to_string(),
                version,
                len,
                kind: 0,
                set: 0,
                member: 0,
            },
        )?;
        let Body::Reserved { offset, remote } = reply else {
            return Err(unexpected(buddy, "Reserve", &reply));
        };
        let sent = match RemoteRegion::from_bytes(&remote) {
            Ok(remote) => self.stream_to(
                buddy, &mr, len, &remote, offset, owner, version, next, &overdue,
            ),
            Err(e) => Err(e.into()),
        };
        match sent {
            Ok(crc) => {
                self.insert_streamed(&key, mr, ulen, crc, buddy);
                Ok(PutReport {
                    bytes: len,
                    copied: 0,
                    crc,
                })
            }
            Err(e) => {
                // The buddy's reservation goes back (best effort: a gone buddy took it along).
                let _ = inner.request(
                    buddy,
                    Body::Drop {
                        owner: owner.to_string(),
                        version,
                    },
                );
                Err(e)
            }
        }
    }

    /// Sends the file into the buddy's reservation as it becomes final, then commits it;
    /// returns the file's crc32c. The writes go through one [`WritePipe`]: the window stays
    /// full across ranges, and while the writer has nothing new the oldest writes are
    /// retired instead of sleeping. Every write has ended when this returns, error or not.
    #[allow(clippy::too_many_arguments)]
    fn stream_to(
        &self,
        buddy: usize,
        mr: &MemoryRegion,
        len: u64,
        remote: &RemoteRegion,
        offset: u64,
        owner: &str,
        version: u64,
        next: &mut dyn FnMut() -> Result<Ready>,
        overdue: &dyn Fn() -> Option<StoreError>,
    ) -> Result<u32> {
        let inner: &Inner = &self.inner;
        let mut pipe = WritePipe::new(inner, buddy, mr, remote);
        loop {
            match next()? {
                Ready::Complete => break,
                Ready::Range(s, e) => pipe.send(s.min(len), e.min(len))?,
                Ready::Pending => {
                    if let Some(e) = overdue() {
                        return Err(e);
                    }
                    if pipe.in_flight() > 0 {
                        pipe.retire_oldest()?;
                    } else {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            }
        }
        // The rest: the header and checksums written last, and any part not reported.
        pipe.send(0, len)?;
        let crc = pipe.finish(len)?;
        let ack = inner.request(
            buddy,
            Body::Commit {
                owner: owner.to_string(),
                version,
                kind: 0,
                set: 0,
                member: 0,
                offset,
                len,
                crc,
            },
        )?;
        if !matches!(ack, Body::Ack { .. }) {
            return Err(unexpected(buddy, "Commit", &ack));
        }
        Ok(crc)
    }

    /// Records a streamed version: safe at L1 (the mapped file) and at L2 on `buddy`; its
    /// flush to L3 and L4 is queued (the flush skips L2, already safe).
    fn insert_streamed(
        &self,
        key: &(String, u64),
        mr: MemoryRegion,
        len: usize,
        crc: u32,
        buddy: usize,
    ) {
        let inner: &Inner = &self.inner;
        let old = inner.l1.lock().expect("lock").insert(
            key.clone(),
            L1Copy {
                mr: Arc::new(mr),
                len,
                crc,
                mapped: true,
            },
        );
        if let Some(old) = old {
            inner.recycle(old);
        }
        inner.errors.lock().expect("lock").remove(key);
        inner.reset_key(key);
        inner.mark_safe_at(key, Level::L1, inner.cfg.node);
        inner.mark_safe_at(key, Level::L2, buddy);
        inner.retain(&key.0, Level::L1);
        inner.retain(&key.0, Level::L2);
        if let Some(tx) = &self.jobs {
            let _ = tx.send(key.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsent_leaves_out_what_was_sent() {
        let sent: BTreeMap<u64, u64> = [(10, 20), (30, 40)].into_iter().collect();
        assert_eq!(unsent(&sent, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(unsent(&sent, 12, 18), vec![]);
        assert_eq!(unsent(&sent, 15, 35), vec![(20, 30)]);
        assert_eq!(unsent(&BTreeMap::new(), 5, 9), vec![(5, 9)]);
    }
}
