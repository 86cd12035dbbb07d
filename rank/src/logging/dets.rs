//! The determinants' way to the buddy: one-sided writes into its ring, several
//! determinants per write when deliveries come in a burst, and piggybacks on messages to
//! other nodes meanwhile.
//!
//! A delivery's determinant is queued; it is posted at once unless another message is
//! already waiting to be received (`defer`), in which case it waits for the next delivery,
//! and the determinants queued go together in one write of consecutive ring slots (up to
//! [`MAX_BATCH`]). Whatever is queued is posted when a receive finds nothing to take (it is
//! about to wait anyway), and before anything that needs it durable ([`Logger::flush`]:
//! a send to a rank on this node, a checkpoint, the end of logging). A send to a rank on
//! another node does not wait ([`Logger::piggyback`]): it posts what is queued, counts the
//! writes completed so far as durable, and carries the rest (those `dest` does not hold
//! yet) with `durable_upto`. So the pessimistic rule stands: nothing leaves this rank that
//! may depend on a delivery whose determinant is neither durable at the buddy nor carried
//! by that very message to another node. Deferring only moves a write later, never past a
//! send that needs it.
//!
//! Lazy writes ([`crate::Rank::log_lazy_writes`], `KRUN_LOG_LAZY=1`, off by default): a
//! determinant is posted only with a full batch, or once the oldest queued waited the
//! bound (checked at sends and at receives that find nothing), since the sends to other
//! nodes carry it meanwhile; sends to this node, checkpoints and the end still post and
//! wait at once. Measured in `bench logging` (shm, 6006 deliveries): 1185 writes instead
//! of 6006.
//!
//! Measured on `heat_ha` (two halos received back to back per step): one write per step
//! instead of two.
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fabric::{Completion, PeerId, RemoteRegion};

use super::{
    Determinant, Logger, BUDDY_WAIT, DET_BYTES, MAX_BATCH, STAGE_SLOTS, S_FLUSHES, S_FLUSH_BLOCKED,
    S_PIGGYBACKS, S_PIGGY_DETS, S_WRITES, T_DURABLE_WAIT, T_POST,
};
use crate::error::{RankError, Result};
use crate::messages::Messages;

/// Determinants between their delivery and their durability at the buddy.
pub(super) struct DetQueue {
    /// Writes posted and not known durable yet, oldest first, with what each carries
    /// (consecutive orders).
    posted: VecDeque<(Vec<Determinant>, Completion)>,
    /// Queued, not posted yet (consecutive orders), and since when.
    deferred: Vec<Determinant>,
    deferred_since: Option<Instant>,
    /// The order after the newest determinant queued.
    next: u64,
    /// Per destination: the order after the newest determinant piggybacked to it, and the
    /// `durable_upto` it was last told (it holds nothing of this rank's once told past the
    /// newest piggybacked).
    /// (In [`Logger::piggy_marks`], under their own lock, not the queue's: a restart's
    /// `replace_peer` resets them while a send may hold the queue's lock waiting for that
    /// very replacement.)
    /// Test hook ([`crate::Rank::log_test_hold_back`]): determinants are posted only by a
    /// flush (a buddy write that has not landed when the rank is lost).
    pub(super) hold_back: bool,
}

impl DetQueue {
    pub(super) fn new() -> DetQueue {
        DetQueue {
            posted: VecDeque::new(),
            deferred: Vec::new(),
            deferred_since: None,
            next: 0,
            hold_back: false,
        }
    }

    /// Whether the queued determinants should go to the buddy now: a full batch, or (lazy
    /// writes waiting at most `lazy`, not zero) the oldest queued that long.
    fn due(&self, lazy: Duration) -> bool {
        !self.hold_back
            && (self.deferred.len() >= MAX_BATCH
                || (!lazy.is_zero() && self.deferred_since.is_some_and(|t| t.elapsed() >= lazy)))
    }

    /// Every order below this is durable at the buddy (as far as completions say now).
    fn durable_upto(&self) -> u64 {
        self.posted
            .front()
            .map(|(ds, _)| ds[0].order)
            .or(self.deferred.first().map(|d| d.order))
            .unwrap_or(self.next)
    }
}

/// Bytes of a piggyback's header: `durable_upto` (u64) and the determinants' count (u32).
pub(crate) const PIGGY_HEADER: usize = 12;

/// Splits a piggybacked message's payload into (durable_upto, determinants, the message's
/// own bytes' offset); `None` if it is malformed.
pub(crate) fn parse_piggyback(data: &[u8]) -> Option<(u64, Vec<Determinant>, usize)> {
    let upto = u64::from_le_bytes(data.get(0..8)?.try_into().ok()?);
    let n = u32::from_le_bytes(data.get(8..12)?.try_into().ok()?) as usize;
    let end = PIGGY_HEADER.checked_add(n.checked_mul(DET_BYTES)?)?;
    let body = data.get(PIGGY_HEADER..end)?;
    let dets = body
        .chunks_exact(DET_BYTES)
        .map(Determinant::decode)
        .collect::<Option<Vec<_>>>()?;
    Some((upto, dets, end))
}

impl Logger {
    /// Queues a delivery's determinant; posts what is queued unless `defer` (and the batch
    /// is not full).
    pub(super) fn queue_det(&self, msgs: &Messages, det: Determinant, defer: bool) -> Result<()> {
        let mut q = self.dets.lock().expect("dets lock");
        if q.deferred.is_empty() {
            q.deferred_since = Some(Instant::now());
        }
        q.deferred.push(det);
        q.next = q.next.max(det.order + 1);
        // Lazily: the next send to another node carries what is not durable, so the write
        // may wait for a full batch (a same-node send or a checkpoint posts it at once).
        let lazy = self.lazy();
        let out = if q.hold_back || ((defer || !lazy.is_zero()) && !q.due(lazy)) {
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
        let lazy = self.lazy();
        if q.hold_back || (!lazy.is_zero() && !q.due(lazy)) {
            return Ok(());
        }
        let out = self.post_deferred(msgs, &mut q);
        self.deferred.store(q.deferred.len(), Ordering::Relaxed);
        out
    }

    /// Before a message of `len` bytes leaves for `dest` on another node: the determinants
    /// not yet durable at the buddy, to go in front of it (with the mark below which all
    /// are durable), instead of waiting for them. `None`: nothing to carry (every
    /// determinant is durable and `dest` was told so). `room`: the most bytes a piggyback
    /// may take (the message must stay one fabric message); when they do not fit, this
    /// waits for durability as [`Logger::flush`] does.
    pub(crate) fn piggyback(
        &self,
        msgs: &Messages,
        dest: usize,
        room: usize,
    ) -> Result<Option<Vec<u8>>> {
        if room < PIGGY_HEADER {
            return self.flush(msgs).map(|()| None);
        }
        let mut q = self.dets.lock().expect("dets lock");
        let lazy = self.lazy();
        if !q.hold_back && (lazy.is_zero() || q.due(lazy)) {
            let posted = self.post_deferred(msgs, &mut q);
            self.deferred.store(q.deferred.len(), Ordering::Relaxed);
            posted?;
        }
        // Writes that landed are durable; one that failed is written again (blocking: the
        // buddy's node died, a failure path).
        while q.posted.front().is_some_and(|(_, c)| c.is_done()) {
            let (ds, c) = q.posted.pop_front().expect("front checked");
            self.settle(msgs, &ds, c)?;
        }
        let pending = q.posted.iter().map(|(ds, _)| ds.len()).sum::<usize>() + q.deferred.len();
        if pending > 0 && PIGGY_HEADER + pending * DET_BYTES > room {
            self.flush_locked(msgs, &mut q)?;
        }
        let upto = q.durable_upto();
        // Only what `dest` does not hold yet: it keeps what it got at or above `upto`.
        let mut m = self.piggy_marks.lock().expect("piggyback marks lock");
        let (piggy_end, told) = &mut *m;
        let from = piggy_end[dest].max(upto);
        let carried: Vec<Determinant> = q
            .posted
            .iter()
            .flat_map(|(ds, _)| ds.iter().copied())
            .chain(q.deferred.iter().copied())
            .filter(|d| d.order >= from)
            .collect();
        if carried.is_empty() && (piggy_end[dest] <= told[dest] || upto <= told[dest]) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(PIGGY_HEADER + carried.len() * DET_BYTES);
        out.extend_from_slice(&upto.to_le_bytes());
        out.extend_from_slice(&(carried.len() as u32).to_le_bytes());
        for d in &carried {
            out.extend_from_slice(&d.encode());
        }
        if let Some(last) = carried.last() {
            piggy_end[dest] = piggy_end[dest].max(last.order + 1);
        }
        told[dest] = upto;
        self.bump(S_PIGGYBACKS, 1);
        self.bump(S_PIGGY_DETS, carried.len() as u64);
        Ok(Some(out))
    }

    /// How long a queued determinant may wait for a batch (zero: not lazy).
    fn lazy(&self) -> Duration {
        Duration::from_nanos(self.lazy_ns.load(Ordering::Relaxed))
    }

    /// `dest` restarted: its new process holds nothing of this rank's.
    pub(super) fn forget_piggybacks_to(&self, dest: usize) {
        let mut m = self.piggy_marks.lock().expect("piggyback marks lock");
        m.0[dest] = 0;
        m.1[dest] = 0;
    }

    /// Posts `q.deferred` in as few writes as the stage and the ring allow (a write never
    /// wraps either). When a post fails (the buddy unreachable) the writes in flight are
    /// settled and the rest written one by one, waiting for the buddy's replacement.
    fn post_deferred(&self, msgs: &Messages, q: &mut DetQueue) -> Result<()> {
        let batch = std::mem::take(&mut q.deferred);
        q.deferred_since = None;
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
        self.flush_locked(msgs, &mut q)
    }

    fn flush_locked(&self, msgs: &Messages, q: &mut DetQueue) -> Result<()> {
        let posted = self.post_deferred(msgs, q);
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
        self.settle_all(msgs, q)?;
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
