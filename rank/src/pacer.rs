//! Pacing of the collective safepoint: how many calls of [`crate::Rank::safepoint`] pass
//! between two of its job-wide rounds.
//!
//! Under the coordinated policy a safepoint is collective: the ranks or together the
//! requests each has seen (SIGUSR1, SIGUSR2, krund's wake signal) in one all-reduce, so
//! that all of them act at the same call. Done at every call, that all-reduce is a
//! job-wide synchronization per step: on the heat stencil (6 ranks, 2 cores, 16 ms steps)
//! it cost about 30% of the loop, the whole difference between a job under no policy and
//! one under the uncoordinated policy, whose safepoints are local.
//!
//! So the round runs every `2^e`-th call only, with `e` agreed in the round itself:
//! - every rank proposes the largest gap that keeps both the round's cost at or under
//!   [`COST_SHARE`] of the time between calls and a request's wait for the next round at
//!   or under [`MAX_DELAY`] (from its own running means of the two);
//! - the proposal travels in the same all-reduce as the requests, one-hot in bits
//!   [`GAP_SHIFT`].. (or of one-hot bits: the lowest set bit is the smallest proposal),
//!   so every rank reads the same gap and counts down the same calls.
//!
//! Every rank calls the safepoint the same number of times between two rounds (the
//! collective contract the per-call round already had), so the rounds stay aligned. A
//! process that starts (fresh, restarted or re-executed for a rollback in place) starts
//! with a round at its first call; a rollback carried out at a round resets the count on
//! every rank at the same call (each sets the agreed count there); the uncoordinated mode's own safepoints reset it, so the
//! first collective call after a switch back holds a round.
//!
//! `KRUN_SAFEPOINT_EVERY=1` makes every call a round (the behaviour before pacing).
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The share of the time between calls a round may cost.
pub(crate) const COST_SHARE: f64 = 0.01;
/// The longest a request waits for the next round (at the measured pace).
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(200);
/// The largest gap exponent proposed (2^6 = 64 calls). The gap is chosen from the pace
/// measured so far: a program that turns from fast calls to slow ones waits at most this
/// many slow calls for its next round.
pub(crate) const MAX_EXPONENT: u32 = 6;
/// Where the one-hot gap proposal sits in the round's all-reduced word (the requests use
/// the low bits).
pub(crate) const GAP_SHIFT: u32 = 8;

#[derive(Default)]
struct State {
    /// Calls to skip before the next round.
    countdown: u64,
    /// When the last call returned (the program computes from there to the next call).
    returned: Option<Instant>,
    /// Running means, in seconds: time between calls, and the round's all-reduce.
    between: Option<f64>,
    round: Option<f64>,
    /// `KRUN_SAFEPOINT_EVERY=1`.
    every_call: bool,
}

/// The pace of one rank's collective safepoint (see the module doc).
pub(crate) struct Pacer {
    state: Mutex<State>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new(std::env::var("KRUN_SAFEPOINT_EVERY").is_ok_and(|v| v.trim() == "1"))
    }
}

fn mean(old: Option<f64>, new: f64) -> f64 {
    match old {
        None => new,
        Some(o) => 0.8 * o + 0.2 * new,
    }
}

impl Pacer {
    pub(crate) fn new(every_call: bool) -> Pacer {
        Pacer {
            state: Mutex::new(State {
                every_call,
                ..State::default()
            }),
        }
    }

    /// A call of the safepoint: true when it holds no round (counted down; the caller
    /// returns at once), false when this call is a round.
    pub(crate) fn skip(&self) -> bool {
        let mut st = self.state.lock().expect("pacer lock");
        let now = Instant::now();
        if let Some(r) = st.returned {
            st.between = Some(mean(st.between, now.duration_since(r).as_secs_f64()));
        }
        if st.countdown > 0 {
            st.countdown -= 1;
            st.returned = Some(now);
            return true;
        }
        false
    }

    /// This rank's proposal for the next gap, one-hot at [`GAP_SHIFT`].
    pub(crate) fn proposal(&self) -> u64 {
        let st = self.state.lock().expect("pacer lock");
        1 << (GAP_SHIFT + exponent(&st))
    }

    /// After the round's all-reduce (`all`, which took `took`): the agreed gap starts.
    pub(crate) fn agreed(&self, all: u64, took: Duration) {
        let mut st = self.state.lock().expect("pacer lock");
        st.round = Some(mean(st.round, took.as_secs_f64()));
        let bits = (all >> GAP_SHIFT) & ((1 << (MAX_EXPONENT + 1)) - 1);
        let e = if bits == 0 { 0 } else { bits.trailing_zeros() };
        st.countdown = (1u64 << e) - 1;
        st.returned = Some(Instant::now());
    }

    /// The call returns now (after a round and whatever it carried out).
    pub(crate) fn returned(&self) {
        self.state.lock().expect("pacer lock").returned = Some(Instant::now());
    }

    /// The next call holds a round (a rollback in place of the memory, the uncoordinated
    /// mode's own safepoints).
    pub(crate) fn reset(&self) {
        let mut st = self.state.lock().expect("pacer lock");
        st.countdown = 0;
        st.returned = None;
    }

    /// Calls skipped before the next round (for tests).
    #[cfg(test)]
    fn countdown(&self) -> u64 {
        self.state.lock().expect("pacer lock").countdown
    }
}

/// The largest `e` with `2^e` calls per round within both bounds; 0 without measures.
fn exponent(st: &State) -> u32 {
    let (Some(between), Some(round)) = (st.between, st.round) else {
        return 0;
    };
    if st.every_call || between <= 0.0 {
        return 0;
    }
    // The round costs `round` every `g` calls of `between` each: round <= share * g * between.
    let by_cost = (round / (COST_SHARE * between)).ceil();
    let by_delay = (MAX_DELAY.as_secs_f64() / between).floor();
    let g = by_cost.min(by_delay).max(1.0);
    (g.log2().floor() as u32).min(MAX_EXPONENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(between: f64, round: f64, every_call: bool) -> State {
        State {
            between: Some(between),
            round: Some(round),
            every_call,
            ..State::default()
        }
    }

    #[test]
    fn the_gap_keeps_the_rounds_cost_and_the_requests_delay_within_bounds() {
        // 16 ms steps, a 5 ms round: the cost wants 32 calls, the delay allows 12 -> 8.
        assert_eq!(exponent(&measured(0.016, 0.005, false)), 3);
        // Fast calls, cheap rounds: the cost wants 50 -> 32.
        assert_eq!(exponent(&measured(0.000_2, 0.000_1, false)), 5);
        // Very fast calls: capped at 2^MAX_EXPONENT.
        assert_eq!(exponent(&measured(1e-7, 1e-3, false)), MAX_EXPONENT);
        // Steps longer than the delay bound: every call.
        assert_eq!(exponent(&measured(0.5, 0.01, false)), 0);
        // No measure yet, or KRUN_SAFEPOINT_EVERY=1: every call.
        assert_eq!(exponent(&State::default()), 0);
        assert_eq!(exponent(&measured(0.016, 0.005, true)), 0);
    }

    #[test]
    fn every_rank_reads_the_smallest_proposal_and_counts_down_the_same_calls() {
        let (a, b) = (Pacer::new(false), Pacer::new(false));
        // Proposals 2^3 and 2^1, or-ed by the all-reduce with a request bit.
        let all = (1 << (GAP_SHIFT + 3)) | (1 << (GAP_SHIFT + 1)) | 1;
        for p in [&a, &b] {
            p.agreed(all, Duration::from_millis(1));
            assert_eq!(p.countdown(), 1);
            assert!(p.skip(), "the call after a round with gap 2 holds none");
            assert!(!p.skip(), "the second call holds the next round");
        }
        // A word with no proposal (a rank of an older library): every call.
        a.agreed(1, Duration::from_millis(1));
        assert!(!a.skip());
        // A reset: the next call holds a round.
        b.agreed(1 << (GAP_SHIFT + 5), Duration::from_millis(1));
        assert_eq!(b.countdown(), 31);
        b.reset();
        assert!(!b.skip());
    }
}
