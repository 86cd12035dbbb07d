//! Failure detection: SWIM with suspicion and incarnation numbers (the `foca` crate), as a
//! sans-IO state machine driven by virtual time.
//!
//! API CONTRACT (the protocol is written against these signatures; keep them).
use crate::error::Result;
use crate::view::NodeId;

/// Timing of the failure detector, in ticks (the driver decides what a tick is; the daemon
/// uses 10 ms).
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Ticks between two probes of a random member.
    pub probe_period: u64,
    /// Ticks a probe may take before indirect probes are sent.
    pub probe_rtt: u64,
    /// Ticks a suspected member has to refute the suspicion before it is declared down.
    pub suspect_to_down: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            probe_period: 20,
            probe_rtt: 8,
            suspect_to_down: 60,
        }
    }
}

/// What the detector concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// The member answers (again).
    Up(NodeId),
    /// The member did not refute its suspicion in time.
    Down(NodeId),
}

/// Messages to send and conclusions reached by one call.
#[derive(Debug, Default)]
pub struct MembershipOutput {
    pub messages: Vec<(NodeId, Vec<u8>)>,
    pub events: Vec<MembershipEvent>,
}

/// One node's failure detector.
pub struct Membership {}

impl Membership {
    /// A detector for `me`; randomness comes from `seed` only (reproducible simulations).
    pub fn new(me: NodeId, seed: u64, config: MembershipConfig) -> Self {
        let _ = (me, seed, config);
        todo!()
    }
    /// Starts watching `node` (a member of the agreed view).
    pub fn add_member(&mut self, node: NodeId, now: u64) -> MembershipOutput {
        let _ = (node, now);
        todo!()
    }
    /// Stops watching `node` (evicted or failed by the agreed view).
    pub fn remove_member(&mut self, node: NodeId, now: u64) -> MembershipOutput {
        let _ = (node, now);
        todo!()
    }
    /// Advances virtual time to `now` (ticks, non-decreasing).
    pub fn tick(&mut self, now: u64) -> MembershipOutput {
        let _ = now;
        todo!()
    }
    /// A detector message from `from`; bytes that do not decode give an error and change
    /// nothing.
    pub fn handle(&mut self, from: NodeId, bytes: &[u8], now: u64) -> Result<MembershipOutput> {
        let _ = (from, bytes, now);
        todo!()
    }
}
