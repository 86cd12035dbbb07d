//! Carrying out the state machine's actions: messages (sequenced, checksummed, with the
//! page bytes of grants), one-sided operations handed back to the caller, page installs,
//! protections, publications and drops, and wake-ups of the faulting threads.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::words::{page_offset, stamp, stamp_offset};
use super::{
    no_region, now_ns, poisoned, region_of, Data, Engine, RegisteredWords, Remote, TAG_DSM,
    WIRE_VERSION,
};
use crate::coherence::{Action, Msg, Node, PageId, Source, SHARE_WORD_NODES};
use crate::error::{DsmError, Result};
use crate::uffd::PAGE;

impl Engine {
    /// Runs the actions in order (messages to this node are handled after the batch).
    pub(super) fn execute(
        &self,
        node: &mut Node<RegisteredWords>,
        actions: Vec<Action>,
        data: Data<'_>,
        remote: &mut Vec<Remote>,
    ) -> Result<()> {
        let mut local: VecDeque<(Msg, Vec<u8>)> = VecDeque::new();
        self.execute_one_batch(&mut node.words, actions, &data, remote, &mut local)?;
        while let Some((msg, bytes)) = local.pop_front() {
            let actions = node.on_message(self.me, msg);
            self.execute_one_batch(
                &mut node.words,
                actions,
                &Data::Message(&bytes),
                remote,
                &mut local,
            )?;
        }
        match node.words.take_error() {
            Some(e) => Err(DsmError::Config {
                what: "share word".into(),
                reason: e,
            }),
            None => Ok(()),
        }
    }

    fn execute_one_batch(
        &self,
        words: &mut RegisteredWords,
        actions: Vec<Action>,
        data: &Data<'_>,
        remote: &mut Vec<Remote>,
        local: &mut VecDeque<(Msg, Vec<u8>)>,
    ) -> Result<()> {
        // Bytes of pages dropped in this batch, for a grant sent after the drop.
        let mut dropped: HashMap<PageId, Vec<u8>> = HashMap::new();
        for a in actions {
            if self.trace {
                eprintln!("{} dsm {}: {a:?}", now_ns(), self.me);
            }
            self.track_action(&a);
            match a {
                Action::Send { to, msg } => {
                    let page = msg.page();
                    let region = region_of(&self.regions, page);
                    if region.is_none() && !msg.is_migration() {
                        continue;
                    }
                    let bytes = if matches!(msg, Msg::Grant { zero: false, .. }) {
                        match (dropped.remove(&page), &region) {
                            (Some(b), _) => b,
                            // SAFETY: this node holds the page (mapped, and write-protected
                            // when another node is to get it), so reading it does not fault.
                            (None, Some(region)) => unsafe {
                                std::slice::from_raw_parts(region.addr(page) as *const u8, PAGE)
                            }
                            .to_vec(),
                            (None, None) => continue,
                        }
                    } else {
                        Vec::new()
                    };
                    if to == self.me {
                        local.push_back((msg, bytes));
                        continue;
                    }
                    if self.dead.lock().map_err(|_| poisoned())?.contains(&to) {
                        // The state machine sends nothing to a node it knows dead; a batch
                        // computed before the death was known may still name it.
                        if self.trace {
                            eprintln!(
                                "{} dsm {}: not sent to dead node {to}: {msg:?}",
                                now_ns(),
                                self.me
                            );
                        }
                        continue;
                    }
                    let seq = {
                        let mut seqs = self.send_seq.lock().map_err(|_| poisoned())?;
                        let slot = seqs.get_mut(to as usize).ok_or_else(|| no_region(page))?;
                        *slot += 1;
                        *slot - 1
                    };
                    if self.trace && bytes.len() >= 32 {
                        let w: Vec<u64> = bytes[..32]
                            .chunks(8)
                            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                            .collect();
                        eprintln!(
                            "{} dsm {}: sends page {page} seq {seq} words {w:?}",
                            now_ns(),
                            self.me
                        );
                    }
                    let mut wire = vec![WIRE_VERSION];
                    wire.extend(postcard::to_allocvec(&(self.me, seq, &msg)).map_err(|e| {
                        DsmError::Config {
                            what: "message".into(),
                            reason: e.to_string(),
                        }
                    })?);
                    wire.extend_from_slice(&bytes);
                    let crc = crc32c::crc32c(&wire);
                    wire.extend_from_slice(&crc.to_le_bytes());
                    if let Err(e) = self.ep.send(self.peer(to)?, TAG_DSM, &wire) {
                        // The rest of the batch still runs (the state machine has moved
                        // on); the watchdog probes the node: dead, it is dropped from
                        // copysets; alive, the lost message is the driver's error.
                        self.suspect(to, format!("sending {msg:?}: {e}"));
                    }
                }
                Action::Join { owner, page } => {
                    if self.me >= SHARE_WORD_NODES {
                        return Err(DsmError::Config {
                            what: "join".into(),
                            reason: format!("node {} has no share-word bit", self.me),
                        });
                    }
                    remote.push(Remote::Join { owner, page })
                }
                Action::RmaRead { owner, page } => remote.push(Remote::Read { owner, page }),
                Action::Install {
                    page,
                    source,
                    writable,
                } => {
                    let Some(region) = region_of(&self.regions, page) else {
                        continue;
                    };
                    let src: *const u8 = match (source, data) {
                        (Source::Zero, _) => self.zero.as_ptr(),
                        (Source::Message, Data::Message(b)) if b.len() == PAGE => b.as_ptr(),
                        (Source::Rma, Data::Rma(slots)) => {
                            *slots.get(&page).ok_or_else(|| no_region(page))?
                        }
                        _ => {
                            return Err(DsmError::Config {
                                what: "install".into(),
                                reason: format!("no data for page {page} from {source:?}"),
                            })
                        }
                    };
                    if self.trace {
                        // SAFETY: src points at PAGE readable bytes.
                        let b = unsafe { std::slice::from_raw_parts(src, 32) };
                        let w: Vec<u64> = b
                            .chunks(8)
                            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                            .collect();
                        eprintln!(
                            "{} dsm {}: installs page {page} words {w:?}",
                            now_ns(),
                            self.me
                        );
                    }
                    let t = Instant::now();
                    // SAFETY: src points at PAGE readable bytes (a message, a landing slot
                    // or the zero page), alive for this call.
                    unsafe { self.uffd.copy(region.addr(page), src, writable)? };
                    self.step(5, t);
                }
                Action::Protect { page } => {
                    let Some(region) = region_of(&self.regions, page) else {
                        continue;
                    };
                    self.uffd.protect(region.addr(page), true)?;
                }
                Action::Publish { page } => {
                    let Some(region) = region_of(&self.regions, page) else {
                        continue;
                    };
                    if !self.publish_delay.is_zero() {
                        std::thread::sleep(self.publish_delay);
                    }
                    let index = region.index(page);
                    // SAFETY: the page is mapped read-only (write-protected) at this node.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(region.addr(page) as *const u8, PAGE) };
                    // The word is closed: the slot is written, stamped with the next
                    // generation, then opened under it (`words` has the protocol).
                    let generation = words.next_generation(page);
                    region.export.write_bytes(page_offset(index), bytes)?;
                    region.export.write_bytes(
                        stamp_offset(region.pages as usize, index),
                        &stamp(bytes, generation),
                    )?;
                    words.publish(page, generation)?;
                    self.stats.publications.fetch_add(1, Ordering::Relaxed);
                }
                Action::Unprotect { page } => {
                    let Some(region) = region_of(&self.regions, page) else {
                        continue;
                    };
                    self.uffd.protect(region.addr(page), false)?;
                }
                Action::Drop { page } => {
                    let Some(region) = region_of(&self.regions, page) else {
                        continue;
                    };
                    // Keep the bytes for a grant later in this batch (the page is mapped here,
                    // read-only or write-protected: reading it does not fault).
                    // SAFETY: as stated.
                    let keep =
                        unsafe { std::slice::from_raw_parts(region.addr(page) as *const u8, PAGE) }
                            .to_vec();
                    dropped.insert(page, keep);
                    // SAFETY: the page lies inside our own shared mapping; its contents are
                    // discarded on purpose (the next access faults).
                    if unsafe {
                        libc::madvise(region.addr(page) as *mut _, PAGE, libc::MADV_DONTNEED)
                    } != 0
                    {
                        return Err(DsmError::Os {
                            what: format!("dropping page {page}"),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                }
                Action::Lost { page } => {
                    // Reported by the watchdog thread, outside the state machine's lock.
                    if let Ok(mut l) = self.lost_reports.lock() {
                        l.push(page);
                    }
                }
                Action::Done { page, .. } => {
                    let Some(region) = region_of(&self.regions, page) else {
                        continue;
                    };
                    self.uffd.wake(region.addr(page))?;
                }
            }
        }
        Ok(())
    }
}
