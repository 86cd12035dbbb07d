//! Bookkeeping shared by the hardware-facing backends (libfabric, verbs): the table of
//! operations in flight keyed by the context id handed to the provider, the scratch and send
//! slots they hold, back-pressure, and peers marked unreachable.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::completion::{InFlight, OpState, Progress};
use crate::endpoint::PeerId;
use crate::error::{FabricError, Result};

/// A posted operation and the slots it holds until the provider reports it.
struct Pending {
    state: Arc<OpState>,
    atomic_slot: Option<usize>,
    send_slot: Option<usize>,
    /// The remote key, named in access errors.
    key: u64,
    /// The waiter timed out and already returned the in-flight slot.
    abandoned: bool,
}

/// What an error completion needs to name.
pub(crate) struct FailedOp {
    pub op: &'static str,
    pub peer: PeerId,
    pub key: u64,
}

pub(crate) struct OpTable {
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    pub(crate) in_flight: InFlight,
    atomic_free: Mutex<Vec<usize>>,
    send_free: Mutex<Vec<usize>>,
    /// Peers an operation failed or timed out on: later operations to them fail at once.
    unreachable: Mutex<HashSet<PeerId>>,
}

impl OpTable {
    /// `max_in_flight` operations (each may hold one atomic scratch slot) and `send_slots`.
    pub(crate) fn new(max_in_flight: usize, send_slots: usize) -> OpTable {
        OpTable {
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            in_flight: InFlight::new(max_in_flight),
            atomic_free: Mutex::new((0..max_in_flight).rev().collect()),
            send_free: Mutex::new((0..send_slots).rev().collect()),
            unreachable: Mutex::new(HashSet::new()),
        }
    }

    /// Fails fast for a peer an earlier operation failed or timed out on.
    pub(crate) fn check_reachable(&self, peer: PeerId, op: &'static str) -> Result<()> {
        if self
            .unreachable
            .lock()
            .expect("unreachable lock")
            .contains(&peer)
        {
            return Err(FabricError::Remote {
                op,
                peer,
                message: "peer is unreachable: an earlier operation to it failed or timed out"
                    .into(),
            });
        }
        Ok(())
    }

    pub(crate) fn mark_unreachable(&self, peer: PeerId) {
        self.unreachable
            .lock()
            .expect("unreachable lock")
            .insert(peer);
    }

    /// Takes an in-flight slot (blocking while the queue is full).
    pub(crate) fn acquire(
        &self,
        driver: &dyn Progress,
        op: &'static str,
        peer: PeerId,
        timeout: Duration,
    ) -> Result<()> {
        self.in_flight.acquire(driver, op, peer, timeout)
    }

    /// An atomic scratch slot; one exists per in-flight slot, so call after `acquire`.
    pub(crate) fn atomic_slot(&self) -> usize {
        self.atomic_free
            .lock()
            .expect("atomic slots")
            .pop()
            .expect("one atomic slot per in-flight operation")
    }

    /// A send buffer slot, driving progress while none is free, for at most `timeout`.
    /// On timeout the caller's in-flight slot is returned.
    pub(crate) fn send_slot(
        &self,
        driver: &dyn Progress,
        peer: PeerId,
        timeout: Duration,
    ) -> Result<usize> {
        let since = Instant::now();
        let mut backoff = crate::completion::Backoff::new();
        loop {
            if let Some(s) = self.send_free.lock().expect("send slots").pop() {
                return Ok(s);
            }
            if since.elapsed() >= timeout {
                self.in_flight.release();
                return Err(FabricError::Timeout {
                    op: "send",
                    peer,
                    timeout,
                });
            }
            driver.progress();
            backoff.pause();
        }
    }

    /// Records a posted operation; returns the context id to hand to the provider.
    pub(crate) fn track(
        &self,
        state: &Arc<OpState>,
        atomic_slot: Option<usize>,
        send_slot: Option<usize>,
        key: u64,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        state.id.store(id, Ordering::Relaxed);
        self.pending.lock().expect("pending").insert(
            id,
            Pending {
                state: state.clone(),
                atomic_slot,
                send_slot,
                key,
                abandoned: false,
            },
        );
        id
    }

    fn release(&self, p: &Pending) {
        if let Some(s) = p.atomic_slot {
            self.atomic_free.lock().expect("atomic slots").push(s);
        }
        if let Some(s) = p.send_slot {
            self.send_free.lock().expect("send slots").push(s);
        }
        if !p.abandoned {
            self.in_flight.release();
        }
    }

    /// The operation could not be posted: forget it and free its slots.
    pub(crate) fn cancel(&self, id: u64) {
        if let Some(p) = self.pending.lock().expect("pending").remove(&id) {
            self.release(&p);
        }
    }

    /// The provider reported the operation: resolve it. A successful atomic's fetched value
    /// is read from its scratch slot with `fetched`.
    pub(crate) fn complete(
        &self,
        id: u64,
        result: Result<u64>,
        fetched: impl FnOnce(usize) -> Result<u64>,
    ) {
        let Some(p) = self.pending.lock().expect("pending").remove(&id) else {
            return;
        };
        let result = match (result, p.atomic_slot) {
            (Ok(_), Some(slot)) => fetched(slot),
            (r, _) => r,
        };
        self.release(&p);
        p.state.finish(result);
    }

    /// What an error completion for `id` should name, if the operation is known.
    pub(crate) fn failed_op(&self, id: u64) -> Option<FailedOp> {
        self.pending
            .lock()
            .expect("pending")
            .get(&id)
            .map(|p| FailedOp {
                op: p.state.op,
                peer: p.state.peer,
                key: p.key,
            })
    }

    /// The waiter timed out: return the in-flight slot now so a dead peer cannot starve the
    /// others, and mark the peer unreachable. Scratch and send buffers stay reserved until
    /// the provider reports the operation.
    pub(crate) fn abandon(&self, op: &OpState) {
        let id = op.id.load(Ordering::Relaxed);
        if let Some(p) = self.pending.lock().expect("pending").get_mut(&id) {
            if !p.abandoned {
                p.abandoned = true;
                self.in_flight.release();
                self.mark_unreachable(op.peer);
            }
        }
    }

    /// `peer` is known to have failed: every operation to it still pending fails now for
    /// its waiter (as [`FabricError::Remote`] naming the reason), returns its in-flight
    /// slot, and later operations to it fail fast. Scratch, send and data buffers stay
    /// reserved until the provider reports each operation. Returns how many were failed.
    pub(crate) fn fail_peer(&self, peer: PeerId, reason: &str) -> usize {
        self.mark_unreachable(peer);
        let mut failed = 0;
        for p in self.pending.lock().expect("pending").values_mut() {
            if p.state.peer != peer || p.abandoned || !p.state.is_pending() {
                continue;
            }
            p.abandoned = true;
            self.in_flight.release();
            p.state.fail_early(FabricError::Remote {
                op: p.state.op,
                peer,
                message: format!("peer failed: {reason}"),
            });
            failed += 1;
        }
        failed
    }

    /// Fails every pending operation (the endpoint is closing) so no waiter hangs. Returns
    /// whether any was still pending: the provider never reported it, so it may still use
    /// the operation's buffers (their memory is leaked rather than freed under it).
    pub(crate) fn fail_all(&self) -> bool {
        let pending: Vec<Pending> = self
            .pending
            .lock()
            .expect("pending")
            .drain()
            .map(|(_, p)| p)
            .collect();
        let any = !pending.is_empty();
        for p in pending {
            p.state.leak_buffers();
            p.state.finish(Err(FabricError::Closed));
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::completion::Completion;
    use std::sync::atomic::AtomicUsize;

    /// A progress engine that never completes anything (a peer that does not answer).
    struct Silent(AtomicUsize);
    impl Progress for Silent {
        fn progress(&self) -> usize {
            0
        }
        fn waiters(&self) -> &AtomicUsize {
            &self.0
        }
    }

    /// Dropped when the operation lets go of its buffers.
    struct Buffer(Arc<AtomicUsize>);
    impl Drop for Buffer {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_failed_peer_fails_its_operations_at_once_and_keeps_their_buffers_until_reported() {
        let table = OpTable::new(4, 1);
        let driver: Arc<dyn Progress> = Arc::new(Silent(AtomicUsize::new(0)));
        let (dead, alive) = (PeerId(3), PeerId(4));
        let dropped = Arc::new(AtomicUsize::new(0));
        let mut posted = Vec::new();
        for peer in [dead, dead, alive] {
            table
                .acquire(&*driver, "write", peer, Duration::from_secs(1))
                .unwrap();
            let state = OpState::new("write", peer);
            state.keep(Buffer(dropped.clone()));
            let id = table.track(&state, None, None, 7);
            posted.push((id, state));
        }
        assert_eq!(table.in_flight.current(), 3);

        assert_eq!(table.fail_peer(dead, "rank 2 was restarted"), 2);
        // The dead peer's operations fail for their waiters, with a one-hour timeout still
        // far away: the error is the failure, not a timeout.
        for (_, state) in &posted[..2] {
            let c = Completion::new(state.clone(), driver.clone(), Duration::from_secs(3600));
            let e = c.wait().unwrap_err();
            assert!(
                matches!(&e, FabricError::Remote { peer, message, .. }
                    if *peer == dead && message.contains("peer failed: rank 2 was restarted")),
                "{e}"
            );
        }
        assert!(
            posted[2].1.is_pending(),
            "another peer's operation is untouched"
        );
        assert_eq!(
            table.in_flight.current(),
            1,
            "the failed operations' slots are back"
        );
        assert!(table.check_reachable(dead, "write").is_err());
        assert!(table.check_reachable(alive, "write").is_ok());
        // Their buffers stay until the provider reports the operations.
        assert_eq!(dropped.load(Ordering::SeqCst), 0);
        table.complete(posted[0].0, Err(FabricError::Closed), |_| Ok(0));
        table.complete(posted[1].0, Ok(0), |_| Ok(0));
        assert_eq!(dropped.load(Ordering::SeqCst), 2);
        assert_eq!(
            table.in_flight.current(),
            1,
            "a late report frees no slot twice"
        );
        // Failing the peer again finds nothing left.
        assert_eq!(table.fail_peer(dead, "again"), 0);
    }
}
