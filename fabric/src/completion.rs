//! Completion of posted operations: a shared state resolved by whoever drives progress,
//! and a handle the poster waits on. Waiting drives progress itself for low latency, then
//! backs off to parking so a busy-waiting caller does not starve the peer on a small node.
use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{FabricError, Result};
use crate::PeerId;

const PENDING: u8 = 0;
const DONE: u8 = 1;
const FAILED: u8 = 2;

/// Something that can make operations complete: a backend's completion-queue poller.
pub(crate) trait Progress: Send + Sync {
    /// Processes available completions; returns how many were handled.
    fn progress(&self) -> usize;
    /// Counts threads that are waiting and driving progress themselves.
    fn waiters(&self) -> &AtomicUsize;
    /// The waiter gave up on `op` (timeout): free what can be freed now. The backend keeps
    /// buffers the provider may still write until the provider reports the operation.
    fn abandon(&self, _op: &OpState) {}
}

/// The state of one operation, shared between the poster and the progress engine.
pub(crate) struct OpState {
    state: AtomicU8,
    value: AtomicU64,
    error: Mutex<Option<FabricError>>,
    pub(crate) op: &'static str,
    pub(crate) peer: PeerId,
    /// When the operation was posted: its timeout runs from here.
    posted: Instant,
    /// The backend's context id, for abandoning.
    pub(crate) id: AtomicU64,
    parked: Mutex<bool>,
    wake: Condvar,
    /// Buffers and registrations the provider uses until the operation completes.
    keep_alive: Mutex<Vec<Box<dyn Any + Send>>>,
}

impl OpState {
    pub(crate) fn new(op: &'static str, peer: PeerId) -> Arc<OpState> {
        Arc::new(OpState {
            state: AtomicU8::new(PENDING),
            value: AtomicU64::new(0),
            error: Mutex::new(None),
            op,
            peer,
            posted: Instant::now(),
            id: AtomicU64::new(0),
            parked: Mutex::new(false),
            wake: Condvar::new(),
            keep_alive: Mutex::new(Vec::new()),
        })
    }

    /// Keeps `thing` alive until the operation is resolved.
    pub(crate) fn keep(&self, thing: impl Any + Send) {
        self.keep_alive
            .lock()
            .expect("keep_alive lock")
            .push(Box::new(thing));
    }

    /// Leaks what the operation keeps alive: the provider may still touch it after the
    /// endpoint gave up on the operation.
    pub(crate) fn leak_buffers(&self) {
        let kept = std::mem::take(&mut *self.keep_alive.lock().expect("keep_alive lock"));
        std::mem::forget(kept);
    }

    pub(crate) fn is_pending(&self) -> bool {
        self.state.load(Ordering::Acquire) == PENDING
    }

    /// Resolves the operation (first resolution wins), wakes a parked waiter and drops what
    /// it kept alive: the provider reported it, so it no longer uses its buffers.
    pub(crate) fn finish(&self, result: Result<u64>) {
        self.resolve(result);
        self.keep_alive.lock().expect("keep_alive lock").clear();
    }

    /// Fails the operation for its waiter before the provider reported it (its peer is
    /// known to have failed): its buffers stay alive until the provider reports it
    /// ([`OpState::finish`]).
    pub(crate) fn fail_early(&self, error: FabricError) {
        self.resolve(Err(error));
    }

    fn resolve(&self, result: Result<u64>) {
        if !self.is_pending() {
            return;
        }
        match result {
            Ok(v) => {
                self.value.store(v, Ordering::Relaxed);
                self.state.store(DONE, Ordering::Release);
            }
            Err(e) => {
                *self.error.lock().expect("error lock") = Some(e);
                self.state.store(FAILED, Ordering::Release);
            }
        }
        let parked = self.parked.lock().expect("park lock");
        if *parked {
            self.wake.notify_all();
        }
    }

    fn outcome(&self) -> Option<Result<u64>> {
        match self.state.load(Ordering::Acquire) {
            DONE => Some(Ok(self.value.load(Ordering::Relaxed))),
            FAILED => Some(Err(self
                .error
                .lock()
                .expect("error lock")
                .take()
                .unwrap_or(FabricError::Closed))),
            _ => None,
        }
    }
}

/// A handle on a posted operation. Dropping it does not cancel the operation: the buffers
/// it uses stay alive until the provider is done with them.
#[must_use = "an operation's result is only known by waiting on its completion"]
pub struct Completion {
    state: Arc<OpState>,
    driver: Arc<dyn Progress>,
    timeout: Duration,
}

impl Completion {
    pub(crate) fn new(state: Arc<OpState>, driver: Arc<dyn Progress>, timeout: Duration) -> Self {
        Completion {
            state,
            driver,
            timeout,
        }
    }

    /// True once the operation has completed or failed.
    pub fn is_done(&self) -> bool {
        !self.state.is_pending()
    }

    /// Waits for the operation until the endpoint's operation timeout has passed since it
    /// was posted. Returns the fetched value for atomics and 0 for other operations.
    pub fn wait(self) -> Result<u64> {
        let (start, timeout) = (self.state.posted, self.timeout);
        self.wait_from(start, timeout)
    }

    /// Waits at most `timeout`; a timed-out operation reports [`FabricError::Timeout`]
    /// naming the operation and the peer.
    pub fn wait_timeout(self, timeout: Duration) -> Result<u64> {
        self.wait_from(Instant::now(), timeout)
    }

    fn wait_from(self, start: Instant, timeout: Duration) -> Result<u64> {
        let waiters = self.driver.waiters();
        waiters.fetch_add(1, Ordering::SeqCst);
        let result = self.wait_inner(start, timeout);
        waiters.fetch_sub(1, Ordering::SeqCst);
        if matches!(result, Err(FabricError::Timeout { .. })) {
            self.driver.abandon(&self.state);
        }
        result
    }

    fn wait_inner(&self, start: Instant, timeout: Duration) -> Result<u64> {
        const SPIN: Duration = Duration::from_micros(50);
        const YIELD: Duration = Duration::from_millis(2);
        loop {
            if let Some(out) = self.state.outcome() {
                return out;
            }
            self.driver.progress();
            if let Some(out) = self.state.outcome() {
                return out;
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(FabricError::Timeout {
                    op: self.state.op,
                    peer: self.state.peer,
                    timeout,
                });
            }
            if waited < SPIN {
                std::hint::spin_loop();
            } else if waited < YIELD {
                std::thread::yield_now();
            } else {
                // The endpoint's progress thread keeps working; sleep until it wakes us.
                let mut parked = self.state.parked.lock().expect("park lock");
                *parked = true;
                if self.state.is_pending() {
                    let nap = (timeout - waited).min(Duration::from_millis(1));
                    let (guard, _) = self.state.wake.wait_timeout(parked, nap).expect("park");
                    parked = guard;
                }
                *parked = false;
            }
        }
    }
}

/// Waits for every completion; returns the first error after all have ended.
pub fn wait_all(completions: impl IntoIterator<Item = Completion>) -> Result<()> {
    let mut first_error = None;
    for c in completions {
        if let Err(e) = c.wait() {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// How a thread that retries something another thread must make possible (a full queue, a
/// busy peer) waits between tries: it spins and yields for [`Backoff::SPIN`], then sleeps,
/// each sleep twice the last, up to [`Backoff::MAX_NAP`]. A thread that only yields stays
/// runnable: on an oversubscribed node (a 2-core node running 4 ranks, each with its
/// progress threads) it keeps taking the cores from the threads that would free the queue;
/// a sleep leaves the run queue.
pub(crate) struct Backoff {
    start: Instant,
    tries: u32,
    nap: Duration,
}

impl Backoff {
    /// Spin and yield this long before sleeping.
    pub(crate) const SPIN: Duration = Duration::from_micros(100);
    /// The longest sleep between two tries.
    pub(crate) const MAX_NAP: Duration = Duration::from_micros(200);

    pub(crate) fn new() -> Backoff {
        Backoff {
            start: Instant::now(),
            tries: 0,
            nap: Duration::from_micros(5),
        }
    }

    /// Waits before the next try.
    pub(crate) fn pause(&mut self) {
        self.tries = self.tries.wrapping_add(1);
        if self.start.elapsed() < Self::SPIN {
            if self.tries.is_multiple_of(16) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        } else {
            std::thread::sleep(self.nap);
            self.nap = (self.nap * 2).min(Self::MAX_NAP);
        }
    }
}

/// Bounds the operations in flight on one endpoint (back-pressure on the poster).
pub(crate) struct InFlight {
    count: AtomicUsize,
    max: usize,
}

impl InFlight {
    pub(crate) fn new(max: usize) -> Self {
        InFlight {
            count: AtomicUsize::new(0),
            max: max.max(1),
        }
    }

    /// Takes a slot, driving progress while the queue is full, for at most `timeout`.
    pub(crate) fn acquire(
        &self,
        driver: &dyn Progress,
        op: &'static str,
        peer: PeerId,
        timeout: Duration,
    ) -> Result<()> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            let n = self.count.load(Ordering::Acquire);
            if n < self.max {
                if self
                    .count
                    .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if driver.progress() == 0 {
                if start.elapsed() >= timeout {
                    return Err(FabricError::Timeout { op, peer, timeout });
                }
                backoff.pause();
            }
        }
    }

    pub(crate) fn release(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}
