//! The policy interface: a sans-IO, deterministic state machine. krund (or the simulation)
//! feeds it [`Event`]s and carries out the [`Action`]s it returns; see the contract in
//! [`crate::primitives`].
use crate::primitives::{Action, Costs, Event, Millis, Reads, Version};
use crate::report::Summary;
use serde::{Deserialize, Serialize};

/// Where a policy is, for `krun status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The ranks compute.
    Running,
    /// A checkpoint is being taken (ranks held, or their images flushing).
    Checkpointing,
    /// Ranks are being rolled back and restarted.
    Recovering,
    /// Every rank exited with code 0.
    Completed,
    /// The job was ended (an error, or nothing could restore it).
    Ended,
}

pub trait Policy {
    /// A short name (`coordinated`).
    fn name(&self) -> &'static str;

    /// Consumes one event at time `now` and returns the actions to carry out, in order.
    /// Deterministic: the same events at the same times with the same reads give the same
    /// actions. Never blocks, never panics on an event it does not expect (stale or unknown
    /// operations are ignored).
    fn on_event(&mut self, now: Millis, event: Event, reads: &dyn Reads) -> Vec<Action>;

    /// When the policy wants an [`Event::Tick`] at the latest (`None`: only on events).
    fn next_deadline(&self) -> Option<Millis>;

    fn phase(&self) -> Phase;

    /// The committed checkpoint a failure now would roll back to (`None`: the start).
    fn recovery_line(&self) -> Option<Version>;

    /// The costs measured so far.
    fn costs(&self) -> &Costs;

    /// Totals so far (the end-of-job summary).
    fn summary(&self) -> Summary;

    /// Why the policy can no longer run (a policy module that failed or panicked), if so:
    /// krun then swaps the job back to its previous policy.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// A boxed policy is a policy: krund holds `Box<dyn Policy>` so that a policy can be swapped
/// for another while the job runs.
impl<P: Policy + ?Sized> Policy for Box<P> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn on_event(&mut self, now: Millis, event: Event, reads: &dyn Reads) -> Vec<Action> {
        (**self).on_event(now, event, reads)
    }
    fn next_deadline(&self) -> Option<Millis> {
        (**self).next_deadline()
    }
    fn phase(&self) -> Phase {
        (**self).phase()
    }
    fn recovery_line(&self) -> Option<Version> {
        (**self).recovery_line()
    }
    fn costs(&self) -> &Costs {
        (**self).costs()
    }
    fn summary(&self) -> Summary {
        (**self).summary()
    }
    fn failure(&self) -> Option<String> {
        (**self).failure()
    }
}
