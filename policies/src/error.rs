//! The crate's error: why a policy could not start, or why a job could not be restored.
use crate::primitives::{ranks_phrase, DecisionId, NodeId, Rank, Version};
use serde::{Deserialize, Serialize};

fn list<T: ToString>(xs: &[T]) -> String {
    xs.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum PolicyError {
    #[error("invalid policy configuration: {0}")]
    Config(String),
    /// Every kept checkpoint misses some rank's image.
    #[error(
        "nothing can restore rank {rank}: no valid copy of checkpoint(s) {} survives the loss of node(s) {} (levels kept: {levels})",
        list(versions),
        list(failed)
    )]
    ImagesLost {
        rank: Rank,
        versions: Vec<Version>,
        failed: Vec<NodeId>,
        levels: String,
    },
    #[error(
        "no node can host {} after the loss of node(s) {}: {reason}",
        ranks_phrase(ranks),
        list(failed)
    )]
    NoNode {
        ranks: Vec<Rank>,
        failed: Vec<NodeId>,
        reason: String,
    },
    #[error("rank {rank} exited with code {code}")]
    RankFailed { rank: Rank, code: i32 },
    #[error("rank {rank} could not be restarted after {attempts} attempts: {reason}")]
    RestartFailed {
        rank: Rank,
        attempts: u32,
        reason: String,
    },
    #[error("every node of the job is lost (last failed: {})", list(failed))]
    AllNodesLost { failed: Vec<NodeId> },
    /// A decision could not be written (this node no longer leads, for example).
    #[error("decision {decision} was not recorded: {reason}")]
    NotRecorded {
        decision: DecisionId,
        reason: String,
    },
    #[error("the policy and the runtime fed {events} events to each other in one call")]
    Runaway { events: usize },
    /// A policy description ([`crate::description`]) is wrong: where (file:line), which key.
    #[error("policy description {place}: {key}: {reason}")]
    Description {
        place: String,
        key: String,
        reason: String,
    },
    /// A policy change ([`crate::description::check_change`]) would put the job at risk.
    #[error("unsafe policy change refused: {reason}")]
    UnsafeChange { reason: String },
    /// A policy module ([`crate::module`]) could not be loaded, or failed.
    #[error("policy module {path}: {reason}")]
    Module { path: String, reason: String },
}
