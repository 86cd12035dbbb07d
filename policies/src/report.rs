//! What users see: one [`Notice`] per event worth a line, and a [`Summary`] at the end. Both
//! are data (serde) with a `Display` that krun prints.
use crate::primitives::{
    ranks_phrase, Epoch, ImageCopy, Level, Millis, NodeId, Rank, RequestSource, Version,
};
use crate::PolicyError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A line for the user, stamped with the policy's clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    pub at: Millis,
    pub kind: NoticeKind,
}

/// Lost ranks that restart together on one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RestartGroup {
    pub ranks: Vec<Rank>,
    pub node: NodeId,
    /// The node was a spare (otherwise a survivor takes the ranks on).
    pub spare: bool,
    /// Where the images come from (`None`: the ranks start from the beginning).
    pub source: Option<ImageCopy>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NoticeKind {
    CheckpointCommitted {
        version: Version,
        /// What asked for it.
        source: RequestSource,
        level: Level,
        ranks: u32,
        bytes: u64,
        /// Ranks held (synchronize to release).
        freeze_seconds: f64,
        /// Start to commit.
        seconds: f64,
    },
    CheckpointAborted {
        version: Version,
        reason: String,
        recovery_line: Option<Version>,
    },
    /// Nodes failed and no rank was on them.
    NodesLost {
        epoch: Epoch,
        failed: Vec<NodeId>,
    },
    RecoveryPlanned {
        epoch: Epoch,
        failed: Vec<NodeId>,
        /// `None`: from the program's start.
        version: Option<Version>,
        restarts: Vec<RestartGroup>,
        rollbacks: Vec<Rank>,
    },
    Recovered {
        epoch: Epoch,
        restarted: Vec<Rank>,
        rolled_back: Vec<Rank>,
        /// From the failure's agreement to release.
        seconds: f64,
    },
    RestartFailed {
        rank: Rank,
        node: NodeId,
        reason: String,
    },
    NodeJoined {
        epoch: Epoch,
        node: NodeId,
    },
    /// A new leader runs the policy.
    Takeover {
        leader: NodeId,
        epoch: Epoch,
    },
    JobCompleted,
    JobEnded {
        error: PolicyError,
    },
    /// A drain is over: the ranks of `node` run on other nodes from checkpoint `version`
    /// (`None`: it ran no rank), and the other ranks continue from it too.
    Drained {
        node: NodeId,
        version: Option<Version>,
        moved: Vec<RestartGroup>,
        continuing: Vec<Rank>,
        /// From the request to the ranks computing again.
        seconds: f64,
    },
    /// A drain was refused or could not be done; nothing moved.
    DrainRefused {
        node: NodeId,
        reason: String,
    },
    /// Uncoordinated policies: one rank's own checkpoint (taken alone, no barrier) is safe.
    RankCheckpointSafe {
        rank: Rank,
        version: Version,
        level: Level,
        bytes: u64,
        /// Order to safe.
        seconds: f64,
    },
    /// Uncoordinated policies: the recovery planned after a failure, rank by rank.
    RecoveryLine {
        epoch: Epoch,
        failed: Vec<NodeId>,
        /// Message logging was on: only the lost ranks restart, and replay.
        logging: bool,
        /// Every rank that restarts or rolls back (the others keep running).
        line: Vec<LineEntry>,
        /// The most own checkpoints one rank rolled back past (0: each rank restored is at
        /// its newest checkpoint); a growing depth is the domino effect.
        depth: u32,
        kept: Vec<Rank>,
        /// Before the job's wiring finished (ranks not past their `krun_init`): every rank
        /// re-executes from its start in a new wiring epoch.
        #[serde(default)]
        rewire: bool,
    },
    /// Uncoordinated policies: every one of the job's `ranks` is past its `krun_init` (the
    /// job's wiring, or a re-wiring's, finished): a failure from now on is recovered from
    /// what the ranks logged and checkpointed, not by re-executing every rank.
    Wired {
        ranks: u32,
    },
    /// Message logging: a restarted rank takes the logged messages again.
    Replaying {
        rank: Rank,
        from: Option<Version>,
        messages: u64,
        bytes: u64,
    },
}

/// One rank's place on an uncoordinated recovery line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LineEntry {
    pub rank: Rank,
    /// Its own checkpoint restored (`None`: the program's start).
    pub version: Option<Version>,
    /// Own checkpoints it rolled back past (newer than `version`).
    pub rolled_past: u32,
    /// Where it restarts as a new process (its node was lost); `None`: it rolls back in
    /// place.
    pub restart_on: Option<NodeId>,
}

fn nodes_phrase(nodes: &[NodeId]) -> String {
    let list = nodes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if nodes.len() == 1 {
        format!("node {list}")
    } else {
        format!("nodes {list}")
    }
}

fn from_phrase(version: Option<Version>) -> String {
    match version {
        Some(v) => format!("checkpoint {v}"),
        None => "the start".to_string(),
    }
}

/// `1.0 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut x = bytes as f64 / 1024.0;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", UNITS[u])
}

impl fmt::Display for RestartGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.ranks.len() == 1 {
            "restarts"
        } else {
            "restart"
        };
        let role = if self.spare { "spare node" } else { "node" };
        write!(
            f,
            "{} {verb} on {role} {}",
            ranks_phrase(&self.ranks),
            self.node
        )
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl fmt::Display for NoticeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoticeKind::CheckpointCommitted {
                version,
                source,
                level,
                ranks,
                bytes,
                freeze_seconds,
                seconds,
            } => {
                write!(f, "checkpoint {version} committed")?;
                if *source != RequestSource::Interval {
                    write!(f, " (asked by {source})")?;
                }
                write!(
                    f,
                    ": {ranks} ranks, {}, safe at {level} in {seconds:.2} s (ranks held {freeze_seconds:.2} s)",
                    human_bytes(*bytes)
                )
            }
            NoticeKind::CheckpointAborted {
                version,
                reason,
                recovery_line,
            } => {
                write!(f, "checkpoint {version} aborted: {reason}; ")?;
                match recovery_line {
                    Some(v) => write!(f, "checkpoint {v} stays the recovery line"),
                    None => f.write_str("no checkpoint is committed yet"),
                }
            }
            NoticeKind::NodesLost { epoch, failed } => write!(
                f,
                "{} failed at epoch {epoch}; no rank ran there",
                nodes_phrase(failed)
            ),
            NoticeKind::RecoveryPlanned {
                epoch,
                failed,
                version,
                restarts,
                rollbacks,
            } => {
                if failed.is_empty() {
                    write!(
                        f,
                        "recovery at epoch {epoch} (the previous leader left it open)"
                    )?;
                } else {
                    write!(f, "{} failed at epoch {epoch}", nodes_phrase(failed))?;
                }
                for g in restarts {
                    write!(f, "; {g} from {}", from_phrase(*version))?;
                    if let Some(src) = g.source {
                        write!(f, " ({src}, {})", human_bytes(src.bytes))?;
                    }
                }
                if !rollbacks.is_empty() {
                    let verb = if rollbacks.len() == 1 {
                        "rolls"
                    } else {
                        "roll"
                    };
                    write!(
                        f,
                        "; {} {verb} back to {}",
                        ranks_phrase(rollbacks),
                        from_phrase(*version)
                    )?;
                }
                Ok(())
            }
            NoticeKind::Recovered {
                epoch,
                restarted,
                rolled_back,
                seconds,
            } => {
                let mut parts = Vec::new();
                if !restarted.is_empty() {
                    parts.push(format!("{} restarted", ranks_phrase(restarted)));
                }
                if !rolled_back.is_empty() {
                    parts.push(format!("{} rolled back", ranks_phrase(rolled_back)));
                }
                write!(
                    f,
                    "recovered from the failure at epoch {epoch}: {}; computing again {seconds:.2} s after it was agreed",
                    parts.join(", ")
                )
            }
            NoticeKind::RestartFailed { rank, node, reason } => {
                write!(f, "restart of rank {rank} on node {node} failed: {reason}")
            }
            NoticeKind::NodeJoined { epoch, node } => {
                write!(f, "node {node} joined at epoch {epoch} as a spare")
            }
            NoticeKind::Takeover { leader, epoch } => write!(
                f,
                "node {leader} runs the policy from epoch {epoch} (the previous leader is gone)"
            ),
            NoticeKind::JobCompleted => f.write_str("job completed"),
            NoticeKind::JobEnded { error } => write!(f, "job ended: {error}"),
            NoticeKind::Drained {
                node,
                version,
                moved,
                continuing,
                seconds,
            } => {
                if moved.is_empty() {
                    return write!(f, "node {node} drained: it ran no rank");
                }
                write!(f, "node {node} drained:")?;
                for (i, g) in moved.iter().enumerate() {
                    let sep = if i == 0 { "" } else { ";" };
                    let role = if g.spare { "spare node" } else { "node" };
                    write!(
                        f,
                        "{sep} {} moved to {role} {} from {}",
                        ranks_phrase(&g.ranks),
                        g.node,
                        from_phrase(*version)
                    )?;
                    if let Some(src) = g.source {
                        write!(f, " ({src}, {})", human_bytes(src.bytes))?;
                    }
                }
                if !continuing.is_empty() {
                    write!(
                        f,
                        "; {} continue from {}",
                        ranks_phrase(continuing),
                        from_phrase(*version)
                    )?;
                }
                write!(f, "; computing again {seconds:.2} s after the request")
            }
            NoticeKind::DrainRefused { node, reason } => {
                write!(f, "drain of node {node} refused: {reason}")
            }
            NoticeKind::RankCheckpointSafe {
                rank,
                version,
                level,
                bytes,
                seconds,
            } => write!(
                f,
                "rank {rank}: own checkpoint {version} safe at {level} in {seconds:.2} s, {} (no barrier)",
                human_bytes(*bytes)
            ),
            NoticeKind::RecoveryLine {
                epoch,
                failed,
                logging,
                line,
                depth,
                kept,
                rewire,
            } => {
                write!(f, "{} failed at epoch {epoch}", nodes_phrase(failed))?;
                f.write_str(if *logging {
                    " (message logging)"
                } else {
                    " (no message logging)"
                })?;
                if *rewire {
                    f.write_str(
                        " before the job's wiring finished (not every rank was past its \
                         krun_init): every rank re-executes from its start in a new wiring epoch",
                    )?;
                }
                for (i, e) in line.iter().enumerate() {
                    let sep = if i == 0 { ":" } else { ";" };
                    let from = match e.version {
                        Some(v) => format!("its checkpoint {v}"),
                        None => "the start".to_string(),
                    };
                    match e.restart_on {
                        Some(n) => write!(f, "{sep} rank {} restarts on node {n} from {from}", e.rank)?,
                        None => write!(f, "{sep} rank {} rolls back to {from}", e.rank)?,
                    }
                    if e.rolled_past > 0 {
                        write!(f, " (past {} of its checkpoints)", e.rolled_past)?;
                    }
                }
                if !kept.is_empty() {
                    let verb = if kept.len() == 1 { "keeps" } else { "keep" };
                    write!(f, "; {} {verb} running, not rolled back", ranks_phrase(kept))?;
                }
                write!(f, "; rollback depth {depth}")?;
                if *depth > 1 {
                    f.write_str(" (domino effect)")?;
                }
                Ok(())
            }
            NoticeKind::Wired { ranks } => write!(
                f,
                "the job's wiring finished: all {ranks} ranks are past their krun_init"
            ),
            NoticeKind::Replaying {
                rank,
                from,
                messages,
                bytes,
            } => write!(
                f,
                "rank {rank} replays {messages} logged message(s) ({}) received after {} in the recorded order",
                human_bytes(*bytes),
                from_phrase(*from)
            ),
        }
    }
}

/// Totals at the end of a job (or so far).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub checkpoints: u32,
    pub aborted: u32,
    /// Time the ranks were held for checkpoints (committed or not).
    pub checkpoint_seconds: f64,
    pub checkpoint_bytes: u64,
    /// Node failures (a failure agreement naming two nodes counts two).
    pub failures: u32,
    pub recoveries: u32,
    pub restarts: u32,
    pub rollbacks: u32,
    /// Work computed again plus time spent recovering.
    pub lost_seconds: f64,
}

fn count(n: u32, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            count(self.checkpoints, "checkpoint", "checkpoints")
        )?;
        if self.aborted > 0 {
            write!(f, " ({} aborted)", self.aborted)?;
        }
        write!(
            f,
            ", {}, {:.2} s held in them; {}, {}: {} restarted, {} rolled back; {:.2} s lost",
            human_bytes(self.checkpoint_bytes),
            self.checkpoint_seconds,
            count(self.failures, "node failure", "node failures"),
            count(self.recoveries, "recovery", "recoveries"),
            count(self.restarts, "rank", "ranks"),
            self.rollbacks,
            self.lost_seconds
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_line_reads_like_the_issue_example() {
        let n = NoticeKind::RecoveryPlanned {
            epoch: 7,
            failed: vec![2],
            version: Some(12),
            restarts: vec![RestartGroup {
                ranks: vec![4, 5],
                node: 4,
                spare: true,
                source: Some(ImageCopy {
                    level: Level::L2,
                    node: Some(3),
                    bytes: 1 << 30,
                }),
            }],
            rollbacks: vec![0, 1, 2, 3, 6, 7],
        };
        assert_eq!(
            n.to_string(),
            "node 2 failed at epoch 7; ranks 4-5 restart on spare node 4 from checkpoint 12 \
             (L2 from node 3, 1.0 GiB); ranks 0-3,6-7 roll back to checkpoint 12"
        );
    }

    #[test]
    fn a_recovery_left_open_by_a_lost_leader_says_so() {
        let n = NoticeKind::RecoveryPlanned {
            epoch: 9,
            failed: vec![],
            version: None,
            restarts: vec![RestartGroup {
                ranks: vec![3],
                node: 1,
                spare: false,
                source: None,
            }],
            rollbacks: vec![],
        };
        assert_eq!(
            n.to_string(),
            "recovery at epoch 9 (the previous leader left it open); rank 3 restarts on node 1 \
             from the start"
        );
    }

    #[test]
    fn summary_names_every_total() {
        let s = Summary {
            checkpoints: 3,
            aborted: 1,
            checkpoint_seconds: 2.5,
            checkpoint_bytes: 3 << 20,
            failures: 1,
            recoveries: 1,
            restarts: 2,
            rollbacks: 6,
            lost_seconds: 12.25,
        };
        let text = s.to_string();
        assert_eq!(
            text,
            "3 checkpoints (1 aborted), 3.0 MiB, 2.50 s held in them; 1 node failure, \
             1 recovery: 2 ranks restarted, 6 rolled back; 12.25 s lost"
        );
    }

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
    }
}
