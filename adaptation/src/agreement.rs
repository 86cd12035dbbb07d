//! Agreement: configuration changes are committed by Raft (tikv's `raft-rs`, a sans-IO
//! `RawNode`) among a small set of supervisors before any node acts on them.
//!
//! API CONTRACT (the protocol is written against these signatures; keep them).
use crate::error::Result;
use crate::view::{Change, NodeId};

/// Raft timing in ticks.
#[derive(Clone, Debug)]
pub struct AgreementConfig {
    pub heartbeat_ticks: usize,
    pub election_ticks: usize,
}

impl Default for AgreementConfig {
    fn default() -> Self {
        AgreementConfig {
            heartbeat_ticks: 2,
            election_ticks: 10,
        }
    }
}

/// Messages to send to other supervisors and changes committed, in log order.
#[derive(Debug, Default)]
pub struct AgreementOutput {
    pub messages: Vec<(NodeId, Vec<u8>)>,
    /// (Raft log index, change); each index is reported once, in increasing order.
    pub committed: Vec<(u64, Change)>,
}

/// One supervisor's Raft member.
pub struct Agreement {}

impl Agreement {
    /// A Raft member `me` of the group `supervisors` (which must contain `me`); randomness
    /// comes from `seed` only.
    pub fn new(
        me: NodeId,
        supervisors: &[NodeId],
        seed: u64,
        config: AgreementConfig,
    ) -> Result<Self> {
        let _ = (me, supervisors, seed, config);
        todo!()
    }
    /// Proposes a change; it may be lost (leader change), so callers retry until they see it
    /// committed. On a follower the proposal is forwarded to the leader when one is known.
    pub fn propose(&mut self, change: &Change) -> AgreementOutput {
        let _ = change;
        todo!()
    }
    /// One logical clock tick.
    pub fn tick(&mut self) -> AgreementOutput {
        todo!()
    }
    /// A Raft message from supervisor `from`; bytes that do not decode give an error.
    pub fn handle(&mut self, from: NodeId, bytes: &[u8]) -> Result<AgreementOutput> {
        let _ = (from, bytes);
        todo!()
    }
    /// The leader this member knows of.
    pub fn leader(&self) -> Option<NodeId> {
        todo!()
    }
}
