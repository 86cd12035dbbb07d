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
            std::thread::yield_now();
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
