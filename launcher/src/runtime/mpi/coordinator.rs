//! krun's side of the MPI wires ([`Coordinator`], in the hub): gathers fences across nodes
//! for PMI-1 and PMIx, ends the job on an abort or a rank lost, fails a fence a gone rank
//! never joins, and follows the job's MPI incarnations (`runtime/mpi_recovery.rs`).
use std::collections::{BTreeMap, BTreeSet};

use super::{FenceData, PmiToLauncher, PmiToNode, Wire};

/// What the hub does for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send to every node still linked.
    Broadcast(PmiToNode),
    /// Send to one node.
    Send(adaptation::NodeId, PmiToNode),
    /// End the job: the reason (printed by krun) and its exit code.
    End { reason: String, code: i32 },
}

/// One fence being gathered.
struct Gathering {
    joined: BTreeSet<u32>,
    data: FenceData,
}

/// Marks a job-ending reason that only follows from an earlier one (a fence failing as
/// the job's ranks are stopped): "PMI fence 3 cannot complete: ...".
const FENCE_FAILED: &str = " cannot complete: ";

/// krun's side: gathers fences across nodes, for both wires (sans-IO: the hub sends what
/// it returns).
pub struct Coordinator {
    size: u32,
    fences: BTreeMap<(Wire, u64), Gathering>,
    /// PMIx fences over a part of the job: (group, seq).
    groups: BTreeMap<(Vec<u32>, u64), Gathering>,
    /// Ranks that will never join a fence, and why.
    gone: BTreeMap<u32, String>,
    /// Ranks each node reported (from its fences).
    nodes: BTreeMap<adaptation::NodeId, BTreeSet<u32>>,
    /// The job is ending (an End was returned): fences failing as its ranks are stopped
    /// are not news.
    ended: bool,
    /// The job's MPI incarnation: the wiring epoch of the recovery that restarted every
    /// rank (0: the start). Reports of an older one are dropped.
    wiring: u64,
    /// Some node reported MPI activity (a fence, an abort, a lost initialised rank, a
    /// direct modex): the job's ranks use MPI.
    used: bool,
}

impl Coordinator {
    pub fn new(size: u32) -> Coordinator {
        Coordinator {
            size,
            fences: BTreeMap::new(),
            groups: BTreeMap::new(),
            gone: BTreeMap::new(),
            nodes: BTreeMap::new(),
            ended: false,
            wiring: 0,
            used: false,
        }
    }

    /// Whether some node ever reported MPI activity (the job's ranks use MPI; a drain then
    /// restarts the whole job, `runtime/drain.rs`).
    pub fn used(&self) -> bool {
        self.used
    }

    /// The job's current MPI incarnation (the wiring epoch every rank started in).
    pub fn wiring(&self) -> u64 {
        self.wiring
    }

    /// Every rank restarts in wiring epoch `wiring` (a recovery that restarts the whole job
    /// as new processes): the ranks wire up afresh, so fences count from 1 again, no rank
    /// is gone and the job is not ending. An older or the current epoch changes nothing.
    pub fn reincarnate(&mut self, wiring: u64) {
        if wiring <= self.wiring {
            return;
        }
        self.wiring = wiring;
        self.fences.clear();
        self.groups.clear();
        self.gone.clear();
        self.nodes.clear();
        self.ended = false;
    }

    /// A node's report.
    pub fn from_node(&mut self, node: adaptation::NodeId, msg: PmiToLauncher) -> Vec<Action> {
        self.used |= activity(&msg);
        let msg = match msg {
            PmiToLauncher::Wired { wiring, msg } => {
                if wiring < self.wiring {
                    // From ranks of an older incarnation (stopped by the recovery).
                    return Vec::new();
                }
                // A node cannot be ahead of krun, which starts each incarnation; if one
                // is, it is the truth.
                self.reincarnate(wiring);
                *msg
            }
            other => other,
        };
        let actions = self.step(node, msg);
        let ending = actions.iter().any(|a| matches!(a, Action::End { .. }));
        let actions = if self.ended {
            // Only what is news: an abort, a rank that left on its own without finalize.
            actions
                .into_iter()
                .filter(|a| match a {
                    Action::End { reason, .. } => !reason.contains(FENCE_FAILED),
                    _ => true,
                })
                .collect()
        } else {
            actions
        };
        self.ended |= ending;
        actions
    }

    fn step(&mut self, node: adaptation::NodeId, msg: PmiToLauncher) -> Vec<Action> {
        match msg {
            PmiToLauncher::Fence { seq, ranks, data } => {
                let wire = data.wire();
                self.nodes.entry(node).or_default().extend(&ranks);
                let g = self.fences.entry((wire, seq)).or_insert_with(|| Gathering {
                    joined: BTreeSet::new(),
                    data: FenceData::empty(wire),
                });
                g.joined.extend(ranks);
                g.data.extend(data);
                let mut actions = self.check_gone();
                if let Some(g) = self.fences.get(&(wire, seq)) {
                    if g.joined.len() as u32 >= self.size {
                        if let Some(g) = self.fences.remove(&(wire, seq)) {
                            actions
                                .push(Action::Broadcast(PmiToNode::Fenced { seq, data: g.data }));
                        }
                    }
                }
                actions
            }
            PmiToLauncher::GroupFence {
                group,
                seq,
                ranks,
                data,
            } => {
                self.nodes.entry(node).or_default().extend(&ranks);
                let key = (group, seq);
                let g = self.groups.entry(key.clone()).or_insert_with(|| Gathering {
                    joined: BTreeSet::new(),
                    data: FenceData::empty(Wire::Pmix),
                });
                g.joined.extend(ranks);
                g.data.extend(data);
                let mut actions = self.check_gone();
                let complete = self
                    .groups
                    .get(&key)
                    .is_some_and(|g| key.0.iter().all(|r| g.joined.contains(r)));
                if complete {
                    if let Some(g) = self.groups.remove(&key) {
                        actions.push(Action::Broadcast(PmiToNode::GroupFenced {
                            group: key.0,
                            seq,
                            data: g.data,
                        }));
                    }
                }
                actions
            }
            PmiToLauncher::Abort { wire, rank, code } => vec![Action::End {
                reason: format!(
                    "rank {rank} on node {node} called MPI_Abort ({} abort) with exit code {code}",
                    wire.name()
                ),
                code: exit_status(code),
            }],
            PmiToLauncher::Lost {
                rank,
                code,
                initialized,
            } => {
                self.gone.insert(
                    rank,
                    format!("rank {rank} on node {node} exited with code {code}"),
                );
                let mut actions = Vec::new();
                // Above 128: ended by a signal (a killed rank is reported as such; ranks
                // stopped with the job are not news).
                if initialized && code <= 128 {
                    actions.push(Action::End {
                        reason: format!(
                            "rank {rank} on node {node} exited with code {code} without MPI_Finalize (no PMI finalize)"
                        ),
                        code: if code == 0 { 1 } else { code },
                    });
                }
                actions.extend(self.check_gone());
                actions
            }
            PmiToLauncher::DmodexAsk {
                node: holder,
                id,
                rank,
            } => vec![Action::Send(
                holder,
                PmiToNode::DmodexAsk {
                    from: node,
                    id,
                    rank,
                },
            )],
            PmiToLauncher::DmodexData { to, id, data } => {
                vec![Action::Send(to, PmiToNode::DmodexData { id, data })]
            }
            PmiToLauncher::Wired { msg, .. } => self.step(node, *msg),
        }
    }

    /// `node`'s link to krun ended before it said goodbye: its ranks never join a fence.
    pub fn node_gone(&mut self, node: adaptation::NodeId) -> Vec<Action> {
        let ranks = self.nodes.get(&node).cloned().unwrap_or_default();
        if (self.fences.is_empty() && self.groups.is_empty()) || self.ended {
            for r in ranks {
                self.gone
                    .insert(r, format!("rank {r}'s node {node} is gone"));
            }
            return Vec::new();
        }
        let mut actions = Vec::new();
        for (&(wire, seq), g) in &self.fences {
            let missing: Vec<u32> = (0..self.size).filter(|r| !g.joined.contains(r)).collect();
            let reason = format!(
                "{} fence {seq} cannot complete: node {node} is gone (its link to krun ended); ranks that never joined: {missing:?}",
                wire.name()
            );
            actions.push(Action::Broadcast(PmiToNode::FenceFailed {
                wire,
                seq,
                reason: reason.clone(),
            }));
            actions.push(Action::End { reason, code: 1 });
        }
        for ((group, seq), g) in &self.groups {
            let missing: Vec<u32> = group
                .iter()
                .copied()
                .filter(|r| !g.joined.contains(r))
                .collect();
            let reason = format!(
                "PMIx fence {seq} over ranks {group:?}{FENCE_FAILED}node {node} is gone (its link to krun ended); ranks that never joined: {missing:?}"
            );
            actions.push(Action::Broadcast(PmiToNode::GroupFenceFailed {
                group: group.clone(),
                seq: *seq,
                reason: reason.clone(),
            }));
            actions.push(Action::End { reason, code: 1 });
        }
        self.fences.clear();
        self.groups.clear();
        self.ended = true;
        actions
    }

    /// Fails every open fence that a gone rank has not joined.
    fn check_gone(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut failed = Vec::new();
        for (&(wire, seq), g) in &self.fences {
            let missing: Vec<&String> = self
                .gone
                .iter()
                .filter(|(r, _)| !g.joined.contains(r))
                .map(|(_, why)| why)
                .collect();
            if let Some(first) = missing.first() {
                let reason = format!(
                    "{} fence {seq} cannot complete: {first} without joining it{}",
                    wire.name(),
                    if missing.len() > 1 {
                        format!(" (and {} more rank(s))", missing.len() - 1)
                    } else {
                        String::new()
                    }
                );
                actions.push(Action::Broadcast(PmiToNode::FenceFailed {
                    wire,
                    seq,
                    reason: reason.clone(),
                }));
                actions.push(Action::End { reason, code: 1 });
                failed.push((wire, seq));
            }
        }
        for key in failed {
            self.fences.remove(&key);
        }
        let mut failed = Vec::new();
        for ((group, seq), g) in &self.groups {
            let missing: Vec<&String> = self
                .gone
                .iter()
                .filter(|(r, _)| group.contains(r) && !g.joined.contains(r))
                .map(|(_, why)| why)
                .collect();
            if let Some(first) = missing.first() {
                let reason = format!(
                    "PMIx fence {seq} over ranks {group:?}{FENCE_FAILED}{first} without joining it"
                );
                actions.push(Action::Broadcast(PmiToNode::GroupFenceFailed {
                    group: group.clone(),
                    seq: *seq,
                    reason: reason.clone(),
                }));
                actions.push(Action::End { reason, code: 1 });
                failed.push((group.clone(), *seq));
            }
        }
        for key in failed {
            self.groups.remove(&key);
        }
        actions
    }
}

/// Whether a report shows a rank using MPI (a rank that exits before it initialised does
/// not).
fn activity(msg: &PmiToLauncher) -> bool {
    match msg {
        PmiToLauncher::Lost { initialized, .. } => *initialized,
        PmiToLauncher::Wired { msg, .. } => activity(msg),
        _ => true,
    }
}

/// The status a process exiting with `code` reports (its low 8 bits; MPICH passes MPI
/// error codes to abort), never 0 for a non-zero code.
pub fn exit_status(code: i32) -> i32 {
    match code & 0xff {
        0 if code != 0 => 1,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(seq: u64, ranks: &[u32], puts: &[(&str, &str)]) -> PmiToLauncher {
        PmiToLauncher::Fence {
            seq,
            ranks: ranks.to_vec(),
            data: FenceData::Puts(
                puts.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_fence_completes_once_every_rank_joined_with_every_nodes_puts() {
        let mut c = Coordinator::new(4);
        assert!(c.from_node(0, fence(1, &[0, 1], &[("a", "1")])).is_empty());
        let a = c.from_node(1, fence(1, &[2, 3], &[("b", "2")]));
        assert_eq!(
            a,
            vec![Action::Broadcast(PmiToNode::Fenced {
                seq: 1,
                data: FenceData::Puts(vec![("a".into(), "1".into()), ("b".into(), "2".into())])
            })]
        );
        // The next fence starts empty.
        assert!(c.from_node(1, fence(2, &[2, 3], &[])).is_empty());
    }

    #[test]
    fn a_fence_a_gone_rank_never_joins_fails_naming_it() {
        let mut c = Coordinator::new(3);
        assert!(c.from_node(0, fence(1, &[0], &[])).is_empty());
        // Rank 2 exits before it ever used PMI: not an error by itself, but the open fence
        // fails naming it.
        let a = c.from_node(
            1,
            PmiToLauncher::Lost {
                rank: 2,
                code: 0,
                initialized: false,
            },
        );
        assert_eq!(a.len(), 2, "{a:?}");
        match &a[1] {
            Action::End { reason, code } => {
                assert_eq!(*code, 1);
                assert!(
                    reason.contains("fence 1") && reason.contains("rank 2"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A later fence fails at once too (the job is ending already: no second End).
        let a = c.from_node(0, fence(2, &[0], &[]));
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Broadcast(PmiToNode::FenceFailed { seq: 2, reason, .. }) if reason.contains("rank 2")
            )),
            "{a:?}"
        );
        assert!(!a.iter().any(|x| matches!(x, Action::End { .. })), "{a:?}");
    }

    #[test]
    fn exit_without_finalize_and_abort_end_the_job_with_codes() {
        let mut c = Coordinator::new(2);
        let a = c.from_node(
            0,
            PmiToLauncher::Lost {
                rank: 1,
                code: 0,
                initialized: true,
            },
        );
        assert!(
            matches!(&a[0], Action::End { reason, code: 1 } if reason.contains("without MPI_Finalize")),
            "{a:?}"
        );
        let a = c.from_node(
            0,
            PmiToLauncher::Abort {
                wire: Wire::Pmi1,
                rank: 0,
                code: 7,
            },
        );
        assert!(matches!(&a[0], Action::End { code: 7, .. }), "{a:?}");
        // MPICH aborts with MPI error codes: the job reports what the process would.
        let a = c.from_node(
            0,
            PmiToLauncher::Abort {
                wire: Wire::Pmi1,
                rank: 0,
                code: 607768079,
            },
        );
        assert!(matches!(&a[0], Action::End { code: 15, .. }), "{a:?}");
        assert_eq!(exit_status(256), 1);
    }

    fn group_fence(group: &[u32], seq: u64, ranks: &[u32], blob: &[u8]) -> PmiToLauncher {
        PmiToLauncher::GroupFence {
            group: group.to_vec(),
            seq,
            ranks: ranks.to_vec(),
            data: FenceData::Blobs(vec![blob.to_vec()]),
        }
    }

    #[test]
    fn a_fence_over_part_of_the_job_completes_with_only_its_nodes_data() {
        let mut c = Coordinator::new(6);
        // Group {0, 1, 4}: node 0 holds 0-1, node 2 holds 4; node 1 takes no part.
        assert!(c
            .from_node(0, group_fence(&[0, 1, 4], 1, &[0, 1], b"n0"))
            .is_empty());
        // A whole-job fence 1 and another group's fence 1 are gathered apart.
        assert!(c.from_node(1, blobs(1, &[2, 3], b"all")).is_empty());
        assert!(c
            .from_node(1, group_fence(&[2, 4], 1, &[2], b"x"))
            .is_empty());
        let a = c.from_node(2, group_fence(&[0, 1, 4], 1, &[4], b"n2"));
        assert_eq!(
            a,
            vec![Action::Broadcast(PmiToNode::GroupFenced {
                group: vec![0, 1, 4],
                seq: 1,
                data: FenceData::Blobs(vec![b"n0".to_vec(), b"n2".to_vec()])
            })]
        );
        // A gone member fails the group's fence naming it; a rank outside the group does
        // not fail it.
        c.from_node(0, group_fence(&[0, 4], 1, &[0], b""));
        let a = c.from_node(
            1,
            PmiToLauncher::Lost {
                rank: 3,
                code: 0,
                initialized: false,
            },
        );
        assert!(
            !a.iter().any(|x| matches!(x, Action::Broadcast(PmiToNode::GroupFenceFailed { group, .. }) if group == &vec![0, 4])),
            "{a:?}"
        );
        let a = c.node_gone(2);
        assert!(
            a.iter().any(|x| matches!(x, Action::End { reason, .. }
                if reason.contains("fence 1 over ranks [0, 4] cannot complete") && reason.contains("[4]"))),
            "{a:?}"
        );
    }

    #[test]
    fn a_job_uses_mpi_once_a_rank_initialised() {
        let mut c = Coordinator::new(2);
        c.from_node(
            0,
            PmiToLauncher::Lost {
                rank: 1,
                code: 0,
                initialized: false,
            },
        );
        assert!(!c.used());
        c.from_node(
            0,
            PmiToLauncher::Wired {
                wiring: 0,
                msg: Box::new(fence(1, &[0], &[])),
            },
        );
        assert!(c.used());
    }

    #[test]
    fn a_node_gone_fails_open_fences() {
        let mut c = Coordinator::new(4);
        c.from_node(0, fence(1, &[0, 1], &[]));
        let a = c.node_gone(1);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::End { reason, .. } if reason.contains("[2, 3]"))),
            "{a:?}"
        );
    }

    fn blobs(seq: u64, ranks: &[u32], blob: &[u8]) -> PmiToLauncher {
        PmiToLauncher::Fence {
            seq,
            ranks: ranks.to_vec(),
            data: FenceData::Blobs(vec![blob.to_vec()]),
        }
    }

    #[test]
    fn pmix_and_pmi1_fences_of_one_number_are_gathered_apart() {
        let mut c = Coordinator::new(2);
        assert!(c.from_node(0, blobs(1, &[0], b"zero")).is_empty());
        // A PMI-1 fence 1 does not complete PMIx's.
        assert!(c.from_node(1, fence(1, &[1], &[("k", "v")])).is_empty());
        let a = c.from_node(1, blobs(1, &[1], b"one"));
        assert_eq!(
            a,
            vec![Action::Broadcast(PmiToNode::Fenced {
                seq: 1,
                data: FenceData::Blobs(vec![b"zero".to_vec(), b"one".to_vec()])
            })]
        );
        let a = c.from_node(0, fence(1, &[0], &[]));
        assert!(
            matches!(&a[..], [Action::Broadcast(PmiToNode::Fenced { seq: 1, data: FenceData::Puts(p) })] if p.len() == 1),
            "{a:?}"
        );
        // A gone rank fails a PMIx fence naming the wire and the rank.
        c.from_node(0, blobs(2, &[0], b""));
        let a = c.from_node(
            1,
            PmiToLauncher::Lost {
                rank: 1,
                code: 0,
                initialized: false,
            },
        );
        assert!(
            a.iter().any(|x| matches!(x, Action::End { reason, code: 1 }
                if reason.starts_with("PMIx fence 2 cannot complete: rank 1 on node 1"))),
            "{a:?}"
        );
    }

    #[test]
    fn direct_modex_requests_and_answers_are_routed_between_nodes() {
        let mut c = Coordinator::new(4);
        let a = c.from_node(
            0,
            PmiToLauncher::DmodexAsk {
                node: 2,
                id: 5,
                rank: 3,
            },
        );
        assert_eq!(
            a,
            vec![Action::Send(
                2,
                PmiToNode::DmodexAsk {
                    from: 0,
                    id: 5,
                    rank: 3
                }
            )]
        );
        let a = c.from_node(
            2,
            PmiToLauncher::DmodexData {
                to: 0,
                id: 5,
                data: Some(vec![1, 2]),
            },
        );
        assert_eq!(
            a,
            vec![Action::Send(
                0,
                PmiToNode::DmodexData {
                    id: 5,
                    data: Some(vec![1, 2])
                }
            )]
        );
    }

    fn wired(wiring: u64, msg: PmiToLauncher) -> PmiToLauncher {
        PmiToLauncher::Wired {
            wiring,
            msg: Box::new(msg),
        }
    }

    #[test]
    fn a_new_incarnation_forgets_gone_ranks_and_open_fences_and_drops_the_old_ones_reports() {
        let mut c = Coordinator::new(2);
        assert!(c.from_node(0, wired(0, fence(1, &[0], &[]))).is_empty());
        // Node 1 died with rank 1: no End yet (a recovery may restart the job) but the
        // open fence fails.
        let a = c.node_gone(1);
        assert!(a.iter().any(|x| matches!(x, Action::End { .. })), "{a:?}");
        // Every rank restarts in wiring epoch 3: fences count from 1 again, rank 1 is not
        // gone any more, and the job is not ending.
        c.reincarnate(3);
        assert_eq!(c.wiring(), 3);
        // A late abort from the old incarnation's survivor is not news.
        let a = c.from_node(
            0,
            wired(
                0,
                PmiToLauncher::Abort {
                    wire: Wire::Pmix,
                    rank: 0,
                    code: 1,
                },
            ),
        );
        assert!(a.is_empty(), "{a:?}");
        assert!(c
            .from_node(0, wired(3, fence(1, &[0], &[("a", "0")])))
            .is_empty());
        let a = c.from_node(2, wired(3, fence(1, &[1], &[("b", "1")])));
        assert!(
            matches!(&a[..], [Action::Broadcast(PmiToNode::Fenced { seq: 1, data: FenceData::Puts(p) })] if p.len() == 2),
            "{a:?}"
        );
        // An abort of the new incarnation ends the job.
        let a = c.from_node(
            2,
            wired(
                3,
                PmiToLauncher::Abort {
                    wire: Wire::Pmi1,
                    rank: 1,
                    code: 4,
                },
            ),
        );
        assert!(matches!(&a[..], [Action::End { code: 4, .. }]), "{a:?}");
        // An older epoch does not go back.
        c.reincarnate(2);
        assert_eq!(c.wiring(), 3);
    }
}
