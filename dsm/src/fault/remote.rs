//! The one-sided operations of read faults: joins (fetch-and-add on the owner's share
//! word) posted together with a speculative read of the owner's published slot, and the
//! reads that follow a join when the speculative copy cannot be used (`words` has the
//! protocol and its invariants).
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fabric::{MemoryRegion, Region};

use super::words::{page_offset, slot_is_current, stamp_offset, EXPORT_STRIDE, STAMP};
use super::{poisoned, region_of, Data, Engine};
use crate::coherence::{NodeId, PageId, SHARE_OPEN};
use crate::error::{DsmError, Result};
use crate::uffd::PAGE;

/// What the fault thread posts after releasing the state machine.
pub(super) enum Remote {
    Join { owner: NodeId, page: PageId },
    Read { owner: NodeId, page: PageId },
}

/// Bytes of a fault thread's landing buffer with `prefetch`: a slot per page for the reads
/// after a join, then a slot per page for the speculative reads posted with the joins.
pub(super) fn landing_len(prefetch: usize) -> usize {
    2 * (prefetch + 1) * EXPORT_STRIDE
}

/// Test injection (`KRUN_DSM_JOIN_HOLD=<file>`): a join posted with a speculative read
/// waits until the read completed, creates `<file>.held`, and waits (at most 60 s) for
/// `<file>` to exist before the fetch-and-add is posted, so that the owner can change and
/// republish the page between the read and the join (the race the generation check
/// catches).
pub(super) fn join_hold() -> Option<PathBuf> {
    std::env::var_os("KRUN_DSM_JOIN_HOLD").map(PathBuf::from)
}

impl Engine {
    pub(super) fn run_remote(&self, remote: Vec<Remote>) -> Result<()> {
        let slots = self.ep.register(Region::new(landing_len(self.prefetch))?)?;
        self.run_remote_with(remote, &slots)
    }

    /// Posts one-sided joins (each with a speculative read of the slot) and reads together,
    /// waits for them, and feeds the results to the state machine (which may ask for more).
    /// An operation that fails (its owner died or cannot be reached) makes the owner a
    /// suspect and the read asks the manager.
    pub(super) fn run_remote_with(
        &self,
        mut remote: Vec<Remote>,
        slots: &MemoryRegion,
    ) -> Result<()> {
        let per = self.prefetch + 1;
        while !remote.is_empty() {
            let mut joins = Vec::new();
            let mut reads = Vec::new();
            let mut failed: Vec<PageId> = Vec::new();
            let mut fail = |page: PageId, owner: NodeId, e: &dyn std::fmt::Display| {
                self.suspect(owner, format!("one-sided access to page {page}: {e}"));
                failed.push(page);
            };
            let mut speculative = 0;
            for r in remote.drain(..) {
                match r {
                    Remote::Join { owner, page } => {
                        let Some(region) = region_of(&self.regions, page) else {
                            continue; // freed since
                        };
                        let peer = self.peer(owner)?;
                        // The speculative reads of the page and of its stamp (into one
                        // landing slot, the stamp after the page), posted first.
                        let spec = if self.speculate && speculative < per {
                            let slot = per + speculative;
                            speculative += 1;
                            let index = region.index(page);
                            let remote_export = &region.remote_export[owner as usize];
                            // SAFETY: the landing slot belongs to this thread until the reads
                            // complete; what they return is used only if the stamp proves the
                            // bytes are the copy of the generation the join saw open.
                            let posted = unsafe {
                                self.ep
                                    .post_read(
                                        peer,
                                        slots,
                                        slot * EXPORT_STRIDE,
                                        PAGE,
                                        remote_export,
                                        page_offset(index) as u64,
                                    )
                                    .and_then(|bytes| {
                                        self.ep
                                            .post_read(
                                                peer,
                                                slots,
                                                slot * EXPORT_STRIDE + PAGE,
                                                STAMP,
                                                remote_export,
                                                stamp_offset(region.pages as usize, index) as u64,
                                            )
                                            .map(|stamp| vec![bytes, stamp])
                                    })
                            };
                            match posted {
                                Ok(c) => Some((slot, c)),
                                Err(e) => {
                                    fail(page, owner, &e);
                                    continue;
                                }
                            }
                        } else {
                            None
                        };
                        let spec = match (spec, &self.join_hold) {
                            (Some((slot, reads)), Some(hold)) => {
                                // Test injection: the reads land before the join is posted.
                                if let Err(e) = fabric::completion::wait_all(reads) {
                                    fail(page, owner, &e);
                                    continue;
                                }
                                hold_until_released(hold);
                                Some((slot, Vec::new()))
                            }
                            (spec, _) => spec,
                        };
                        match self.ep.post_fetch_add(
                            peer,
                            &region.remote_words[owner as usize],
                            region.index(page) as u64 * 8,
                            1u64 << self.me,
                        ) {
                            Ok(c) => joins.push((page, owner, c, spec)),
                            Err(e) => {
                                // The slot is reused: its read must be over first.
                                if let Some((_, reads)) = spec {
                                    let _ = fabric::completion::wait_all(reads);
                                }
                                fail(page, owner, &e);
                            }
                        }
                    }
                    Remote::Read { owner, page } => {
                        let Some(region) = region_of(&self.regions, page) else {
                            continue; // freed since
                        };
                        let peer = self.peer(owner)?;
                        let slot = reads.len();
                        if slot >= per {
                            return Err(DsmError::Config {
                                what: "one-sided reads".into(),
                                reason: "more reads than landing slots".into(),
                            });
                        }
                        // SAFETY: the landing slot belongs to this thread until the read
                        // completes; the owner does not write its published copy while the
                        // share word is open (and a reader invalidated meanwhile discards it).
                        let posted = unsafe {
                            self.ep.post_read(
                                peer,
                                slots,
                                slot * EXPORT_STRIDE,
                                PAGE,
                                &region.remote_export[owner as usize],
                                page_offset(region.index(page)) as u64,
                            )
                        };
                        match posted {
                            Ok(c) => reads.push((page, owner, slot, c)),
                            Err(e) => fail(page, owner, &e),
                        }
                    }
                }
            }
            let t_join = Instant::now();
            // (page, word open, a speculative read was posted, the slot if its copy is
            // current)
            let mut joined = Vec::new();
            let any_join = !joins.is_empty();
            for (page, owner, c, spec) in joins {
                let word = c.wait();
                // The speculative read is waited for even when the join failed: the slot
                // is reused by the next batch.
                let attempted = spec.is_some();
                let (slot, landed) = match spec {
                    Some((slot, reads)) => {
                        (Some(slot), fabric::completion::wait_all(reads).is_ok())
                    }
                    None => (None, false),
                };
                let old = match word {
                    Ok(old) => old,
                    Err(e) => {
                        fail(page, owner, &e);
                        continue;
                    }
                };
                let mut current = None;
                if let Some(slot) = slot {
                    if landed {
                        // SAFETY: the slot lies inside the landing region and its read
                        // completed; nothing writes it until the next batch.
                        let bytes = unsafe {
                            std::slice::from_raw_parts(
                                slots.as_ptr().add(slot * EXPORT_STRIDE) as *const u8,
                                EXPORT_STRIDE,
                            )
                        };
                        if slot_is_current(bytes, old) {
                            current = Some(slot);
                        }
                    }
                    // A failed speculative read costs nothing: the join's answer decides
                    // (a read after the join follows if the word was open).
                }
                joined.push((page, old & SHARE_OPEN != 0, attempted, current));
            }
            if any_join {
                self.step(1, t_join);
            }
            let t_read = Instant::now();
            let any_read = !reads.is_empty();
            let mut landed = HashMap::new();
            for (page, owner, slot, c) in reads {
                if let Err(e) = c.wait() {
                    fail(page, owner, &e);
                    continue;
                }
                self.stats.remote_fetches.fetch_add(1, Ordering::Relaxed);
                // SAFETY: slot < prefetch + 1, inside the landing region.
                landed.insert(page, unsafe { slots.as_ptr().add(slot * EXPORT_STRIDE) }
                    as *const u8);
            }
            if any_read {
                self.step(2, t_read);
            }
            let t_lock = Instant::now();
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            self.step(3, t_lock);
            let t_answer = Instant::now();
            for page in failed {
                let actions = node.on_remote_failed(page);
                self.execute(&mut node, actions, Data::None, &mut remote)?;
            }
            let mut speculated = HashMap::new();
            for (page, open, speculated_read, current) in joined {
                let actions = node.on_join(page, open);
                let mut more = Vec::new();
                self.execute(&mut node, actions, Data::None, &mut more)?;
                for r in more {
                    match (r, current) {
                        // The state machine asks for the read after the join: the
                        // speculative copy is that read (see `words`).
                        (Remote::Read { page: p, .. }, Some(slot)) if p == page => {
                            self.stats.speculative_reads.fetch_add(1, Ordering::Relaxed);
                            self.stats.remote_fetches.fetch_add(1, Ordering::Relaxed);
                            // SAFETY: the slot lies inside the landing region.
                            speculated
                                .insert(page, unsafe { slots.as_ptr().add(slot * EXPORT_STRIDE) }
                                    as *const u8);
                        }
                        (r @ Remote::Read { page: p, .. }, None) if p == page => {
                            if speculated_read {
                                self.stats
                                    .speculation_fallbacks
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            remote.push(r);
                        }
                        (r, _) => remote.push(r),
                    }
                }
            }
            for &page in speculated.keys() {
                let actions = node.on_rma_read(page);
                self.execute(&mut node, actions, Data::Rma(&speculated), &mut remote)?;
            }
            for &page in landed.keys() {
                let actions = node.on_rma_read(page);
                self.execute(&mut node, actions, Data::Rma(&landed), &mut remote)?;
            }
            drop(node);
            self.step(4, t_answer);
        }
        Ok(())
    }
}

/// See [`join_hold`].
fn hold_until_released(hold: &std::path::Path) {
    let mut held = hold.as_os_str().to_owned();
    held.push(".held");
    let _ = std::fs::write(&held, b"held");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !hold.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}
