//! The determinants' way to the buddy: one-sided writes into its ring, several
//! determinants per write when deliveries come in a burst.
//!
//! A delivery's determinant is queued; it is posted at once unless another message is
//! already waiting to be received (`defer`), in which case it waits for the next delivery,
//! and the determinants queued go together in one write of consecutive ring slots (up to
//! [`MAX_BATCH`]). Whatever is queued is posted when a receive finds nothing to take (it is
//! about to wait anyway), and before anything that needs it durable ([`Logger::flush`]:
//! a send to another rank, a checkpoint, the end of logging). So the pessimistic rule
//! stands: nothing leaves this rank that may depend on a delivery whose determinant is not
//! durable at the buddy. Deferring only moves a write later, never past a send.
//!
//! Measured on `heat_ha` (two halos received back to back per step): one write per step
//! instead of two.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use fabric::{Completion, PeerId, RemoteRegion};

use super::{
    Determinant, Logger, BUDDY_WAIT, DET_BYTES, MAX_BATCH, STAGE_SLOTS, S_FLUSHES, S_FLUSH_BLOCKED,
    S_WRITES, T_DURABLE_WAIT, T_POST,
};
use crate::error::{RankError, Result};
use crate::messages::Messages;

/// Determinants between their delivery and their durability at the buddy.
#[derive(Default)]
pub(super) struct DetQueue {
    /// Writes posted and not known durable yet, oldest first, with what each carries
    /// (consecutive orders).
    posted: VecDeque<(Vec<Determinant>, Completion)>,
    /// Queued, not posted yet (consecutive orders).
    deferred: Vec<Determinant>,
}

impl Logger {
    /// Queues a delivery's determinant; posts what is queued unless `defer` (and the batch
    /// is not full).
    pub(super) fn queue_det(&self, msgs: &Messages, det: Determinant, defer: bool) -> Result<()> {
        let mut q = self.dets.lock().expect("dets lock");
        q.deferred.push(det);
        let out = if defer && q.deferred.len() < MAX_BATCH {
            Ok(())
        } else {
            self.post_deferred(msgs, &mut q)
        };
        self.deferred.store(q.deferred.len(), Ordering::Relaxed);
        out
    }

    /// Posts the determinants queued, if any (a receive about to wait calls this).
    pub(crate) fn post_queued(&self, msgs: &Messages) -> Result<()> {
        if self.deferred.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let mut q = self.dets.lock().expect("dets lock");
        let out = self.post_deferred(msgs, &mut q);
        self.deferred.store(q.deferred.len(), Ordering::Relaxed);
        out
    }

    /// Posts `q.deferred` in as few writes as the stage and the ring allow (a write never
    /// wraps either). When a post fails (the buddy unreachable) the writes in flight are
    /// settled and the rest written one by one, waiting for the buddy's replacement.
    fn post_deferred(&self, msgs: &Messages, q: &mut DetQueue) -> Result<()> {
        let batch = std::mem::take(&mut q.deferred);
        if batch.is_empty() {
            return Ok(());
        }
        let (buddy, remote, peer) = {
            let b = self.buddy.read().expect("buddy lock");
            (b.0, b.1, msgs.peer(b.0))
        };
        if buddy == self.rank {
            return Ok(()); // a job of one: nowhere else to keep it
        }
        let ring = self.ring_len as u64;
        let slots = STAGE_SLOTS as u64;
        let mut i = 0;
        while i < batch.len() {
            let first = batch[i].order;
            let mut k = 1;
            while i + k < batch.len() {
                let o = first + k as u64;
                if batch[i + k].order != o || o.is_multiple_of(slots) || o.is_multiple_of(ring) {
                    break;
                }
                k += 1;
            }
            if self
                .post_run(msgs, q, &batch[i..i + k], peer, &remote)
                .is_err()
            {
                self.settle_all(msgs, q)?;
                for d in &batch[i..] {
                    self.write_det_retrying(msgs, d)?;
                }
                return Ok(());
            }
            i += k;
        }
        Ok(())
    }

    /// Posts one write of `run` (consecutive orders, neither the stage nor the ring wraps
    /// inside it) from its stage slots, first settling the writes in flight that used them.
    fn post_run(
        &self,
        msgs: &Messages,
        q: &mut DetQueue,
        run: &[Determinant],
        peer: PeerId,
        remote: &RemoteRegion,
    ) -> Result<()> {
        let first = run[0].order;
        let end = first + run.len() as u64;
        // A posted write is clear of this run's slots once all its orders are past
        // `end - STAGE_SLOTS` (slots repeat every STAGE_SLOTS orders).
        while q
            .posted
            .front()
            .is_some_and(|(ds, _)| (ds[0].order + STAGE_SLOTS as u64) < end)
        {
            let (ds, c) = q.posted.pop_front().expect("front checked");
            self.settle(msgs, &ds, c)?;
        }
        let slot = (first % STAGE_SLOTS as u64) as usize * DET_BYTES;
        let off = (first % self.ring_len as u64) * DET_BYTES as u64;
        let mut bytes = Vec::with_capacity(run.len() * DET_BYTES);
        for d in run {
            bytes.extend_from_slice(&d.encode());
        }
        let stage = self.stage.lock().expect("stage lock");
        stage.write_bytes(slot, &bytes)?;
        let t0 = Instant::now();
        // SAFETY: these slots are rewritten only once the writes posted from them are
        // settled (the loop above); the buddy's ring slots are written by this rank only.
        let c = unsafe {
            msgs.endpoint()
                .post_write(peer, &stage, slot, bytes.len(), remote, off)?
        };
        self.time_since(T_POST, t0);
        self.bump(S_WRITES, 1);
        q.posted.push_back((run.to_vec(), c));
        Ok(())
    }

    /// Waits for one posted write; a failed one is written again (to the buddy as it is
    /// now), waiting up to [`BUDDY_WAIT`] for an unreachable buddy to be replaced.
    fn settle(&self, msgs: &Messages, dets: &[Determinant], c: Completion) -> Result<()> {
        match c.wait() {
            Ok(_) => Ok(()),
            Err(_) => {
                for d in dets {
                    self.write_det_retrying(msgs, d)?;
                }
                Ok(())
            }
        }
    }

    fn settle_all(&self, msgs: &Messages, q: &mut DetQueue) -> Result<()> {
        while let Some((ds, c)) = q.posted.pop_front() {
            self.settle(msgs, &ds, c)?;
        }
        Ok(())
    }

    /// Makes every determinant of a delivery so far durable at the buddy (the queued ones
    /// are posted first): called before a message leaves for another rank, at a checkpoint
    /// and when logging stops.
    pub(crate) fn flush(&self, msgs: &Messages) -> Result<()> {
        let mut q = self.dets.lock().expect("dets lock");
        let posted = self.post_deferred(msgs, &mut q);
        self.deferred.store(q.deferred.len(), Ordering::Relaxed);
        posted?;
        if q.posted.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        self.bump(S_FLUSHES, 1);
        if q.posted.iter().any(|(_, c)| !c.is_done()) {
            self.bump(S_FLUSH_BLOCKED, 1);
        }
        self.settle_all(msgs, &mut q)?;
        self.time_since(T_DURABLE_WAIT, t0);
        Ok(())
    }

    /// A blocking determinant write, retried while the buddy is unreachable, up to
    /// [`BUDDY_WAIT`].
    pub(super) fn write_det_retrying(&self, msgs: &Messages, det: &Determinant) -> Result<()> {
        let deadline = Instant::now() + BUDDY_WAIT;
        loop {
            match self.write_det(msgs, det) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(RankError::Protocol {
                        rank: self.buddy.read().expect("buddy lock").0,
                        reason: format!(
                            "message log: the determinant of delivery {} could not be made \
                             durable at the buddy within {BUDDY_WAIT:?}: {e}",
                            det.order
                        ),
                    })
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    }

    /// One blocking determinant write from the stage's last slot.
    pub(super) fn write_det(&self, msgs: &Messages, det: &Determinant) -> Result<()> {
        let (buddy, remote, peer) = {
            let b = self.buddy.read().expect("buddy lock");
            (b.0, b.1, msgs.peer(b.0))
        };
        if buddy == self.rank {
            return Ok(()); // a job of one: nowhere else to keep it
        }
        let stage = self.stage.lock().expect("stage lock");
        let slot = STAGE_SLOTS * DET_BYTES; // the blocking writes' own slot
        stage.write_bytes(slot, &det.encode())?;
        let off = (det.order % self.ring_len as u64) * DET_BYTES as u64;
        // SAFETY: this slot is written only under the stage lock, held for this blocking
        // write; the buddy's ring slot is written by this rank only.
        unsafe {
            msgs.endpoint()
                .write(peer, &stage, slot, DET_BYTES, &remote, off)?
        };
        Ok(())
    }
}
