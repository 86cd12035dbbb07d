//! The node's side of safepoints driven by a policy (the contract is in the rank library's
//! `rank::node_link` module doc).
//!
//! A rank at an agreed safepoint sends `AtSafepoint { rank }` on its node socket; the
//! [`SafepointGate`] holds the answer. The policy's `barrier` is complete on this node when
//! every local rank is held ([`SafepointGate::held`]); its decision reaches every held rank
//! at once through [`SafepointGate::release`]: `Checkpoint { version }`, `Continue` or
//! `Rollback { version }`, or `Refused(why)` when the barrier is aborted.
//!
//! A node no policy has driven yet answers `Ack` at once: the ranks act on their own
//! request. Once a policy drove it ([`SafepointGate::open_barrier`]), a rank that asks while
//! no barrier is open (a late signal from the last round) waits [`BARRIER_GRACE`] for one
//! (its node may hear of the barrier after the ranks of another node did) and is then told
//! `Continue`.
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::control::NodeToRank;

/// The order given to every rank held in one round.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SafepointOrder {
    Checkpoint {
        version: u64,
    },
    Continue,
    Rollback {
        version: u64,
    },
    /// The barrier was aborted: the ranks' safepoint fails with this reason.
    Abort(String),
    /// Checkpoint `version` collectively, then run the uncoordinated policy's mode with
    /// message logging (the swap's cut: `checkpoints/swap.rs`). Appended: the variants'
    /// order is the wire encoding.
    Switch {
        version: u64,
    },
}

impl SafepointOrder {
    fn answer(&self) -> NodeToRank {
        match self {
            SafepointOrder::Checkpoint { version } => NodeToRank::Checkpoint { version: *version },
            SafepointOrder::Continue => NodeToRank::Continue,
            SafepointOrder::Rollback { version } => NodeToRank::Rollback { version: *version },
            SafepointOrder::Abort(why) => NodeToRank::Refused(why.clone()),
            SafepointOrder::Switch { version } => {
                NodeToRank::CheckpointSwitch { version: *version }
            }
        }
    }
}

/// How long a rank that asks while no barrier is open waits for one.
pub const BARRIER_GRACE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Round {
    /// A barrier is open: ranks that ask are held.
    open: bool,
    /// Ranks held in the current round.
    held: BTreeSet<u32>,
    /// The current round's number; a release answers it and opens the next.
    round: u64,
    /// The order of the last released round.
    released: Option<(u64, SafepointOrder)>,
}

/// Holds ranks at their safepoint until the node's policy decides.
#[derive(Default)]
pub struct SafepointGate {
    driven: AtomicBool,
    state: Mutex<Round>,
    changed: Condvar,
}

impl SafepointGate {
    /// krun's policy drives this node from the start (a job with a checkpoint policy): a
    /// rank that asks before the first barrier is not let act on its own (a checkpoint of
    /// its own would take a version the policy then orders again, and the policy's capture
    /// would never be answered); it waits [`BARRIER_GRACE`] for a barrier, then continues.
    /// Under Slurm, `--signal=USR1` reaches the ranks as well as every krund.
    pub fn mark_driven(&self) {
        self.driven.store(true, Ordering::SeqCst);
    }

    /// The policy's barrier starts: ranks that ask are held until [`SafepointGate::release`].
    pub fn open_barrier(&self) {
        self.driven.store(true, Ordering::SeqCst);
        self.state.lock().expect("gate lock").open = true;
        self.changed.notify_all();
    }

    /// The ranks held now.
    pub fn held(&self) -> Vec<u32> {
        self.state
            .lock()
            .expect("gate lock")
            .held
            .iter()
            .copied()
            .collect()
    }

    /// Answers every held rank with `order` and opens the next round; returns the ranks
    /// answered.
    pub fn release(&self, order: SafepointOrder) -> Vec<u32> {
        let mut s = self.state.lock().expect("gate lock");
        let ranks: Vec<u32> = std::mem::take(&mut s.held).into_iter().collect();
        s.open = false;
        s.released = Some((s.round, order));
        s.round += 1;
        self.changed.notify_all();
        ranks
    }

    /// `rank` is at a safepoint: waits (at most `timeout`) for the order of its round.
    pub fn hold(&self, rank: u32, timeout: Duration) -> NodeToRank {
        if !self.driven.load(Ordering::SeqCst) {
            return NodeToRank::Ack;
        }
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().expect("gate lock");
        let grace = Instant::now() + BARRIER_GRACE.min(timeout);
        while !s.open {
            let left = grace.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return NodeToRank::Continue;
            }
            s = self.changed.wait_timeout(s, left).expect("gate lock").0;
        }
        let round = s.round;
        s.held.insert(rank);
        self.changed.notify_all();
        loop {
            if let Some((r, order)) = &s.released {
                if *r >= round {
                    return order.answer();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.held.remove(&rank);
                return NodeToRank::Refused(format!(
                    "no decision for rank {rank} at its safepoint in {timeout:?}"
                ));
            }
            s = self.changed.wait_timeout(s, left).expect("gate lock").0;
        }
    }

    /// Waits (at most `timeout`) until every rank `ranks()` names (asked again on every
    /// change: ranks end or arrive meanwhile) is held; returns them, or None on timeout.
    pub fn wait_all_held(
        &self,
        ranks: &dyn Fn() -> Vec<u32>,
        timeout: Duration,
    ) -> Option<Vec<u32>> {
        let deadline = Instant::now() + timeout;
        loop {
            // Asked without the gate's lock (it may look at the gate itself).
            let want = ranks();
            let s = self.state.lock().expect("gate lock");
            if want.iter().all(|r| s.held.contains(r)) {
                return Some(want);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            // Re-checked at least every 100 ms: rank exits do not signal this gate.
            drop(
                self.changed
                    .wait_timeout(s, left.min(Duration::from_millis(100)))
                    .expect("gate lock"),
            );
        }
    }

    /// Waits (at most `timeout`) until every rank of `ranks` is held; true when they are.
    pub fn wait_held(&self, ranks: &[u32], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().expect("gate lock");
        loop {
            if ranks.iter().all(|r| s.held.contains(r)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.changed.wait_timeout(s, left).expect("gate lock").0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn an_undriven_node_lets_the_rank_act_on_its_own_request() {
        let gate = SafepointGate::default();
        assert_eq!(gate.hold(3, Duration::from_secs(5)), NodeToRank::Ack);
        assert!(gate.held().is_empty());
    }

    #[test]
    fn a_node_driven_from_the_start_holds_a_stray_request_for_the_barrier_then_continues() {
        let gate = Arc::new(SafepointGate::default());
        gate.mark_driven();
        // No barrier comes: the rank is told to continue, not to act on its own.
        assert_eq!(gate.hold(3, Duration::from_secs(5)), NodeToRank::Continue);
        // A barrier that opens within the grace holds it for the policy's order.
        let g = gate.clone();
        let waiting = std::thread::spawn(move || g.hold(3, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(200));
        gate.open_barrier();
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.held().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(gate.held(), vec![3]);
        gate.release(SafepointOrder::Checkpoint { version: 1 });
        assert_eq!(
            waiting.join().unwrap(),
            NodeToRank::Checkpoint { version: 1 }
        );
    }

    #[test]
    fn held_ranks_all_get_the_order_of_their_round_and_the_next_round_waits_again() {
        let gate = Arc::new(SafepointGate::default());
        gate.open_barrier();
        let hold = |rank| {
            let gate = gate.clone();
            std::thread::spawn(move || gate.hold(rank, Duration::from_secs(60)))
        };
        let (a, b) = (hold(0), hold(1));
        assert!(gate.wait_held(&[0, 1], Duration::from_secs(30)));
        assert_eq!(
            gate.release(SafepointOrder::Checkpoint { version: 7 }),
            vec![0, 1]
        );
        for t in [a, b] {
            assert_eq!(t.join().unwrap(), NodeToRank::Checkpoint { version: 7 });
        }
        // Between barriers, a rank that asks is told to go on after the grace.
        assert_eq!(gate.hold(2, Duration::from_secs(60)), NodeToRank::Continue);
        // The next barrier holds again until its own release; a rank that asked just before
        // it opened is held by it.
        let c = hold(0);
        std::thread::sleep(Duration::from_millis(50));
        gate.open_barrier();
        assert!(gate.wait_held(&[0], Duration::from_secs(30)));
        assert!(!c.is_finished());
        gate.release(SafepointOrder::Abort("node 2 failed".into()));
        assert_eq!(
            c.join().unwrap(),
            NodeToRank::Refused("node 2 failed".into())
        );
        // A rank that waits too long is told so, and is no longer held.
        gate.open_barrier();
        assert!(matches!(
            gate.hold(4, Duration::from_millis(50)),
            NodeToRank::Refused(why) if why.contains("rank 4")
        ));
        assert!(gate.held().is_empty());
    }
}
