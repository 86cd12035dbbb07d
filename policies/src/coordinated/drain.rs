//! Planned moves (`krun node drain N`): the ranks of a node move to another node before it
//! leaves, through the same primitives as a recovery.
//!
//! 1. `DrainRequested{node, view}`: refused (a `DrainRefused` notice naming why) when a
//!    recovery or another drain is in progress, when the node is not in the view, when ranks
//!    have already exited, or when no other node is left to take the ranks. Otherwise
//!    `DrainStarted{node}` is recorded and a checkpoint is requested (one in flight is let
//!    finish first: the drain uses the next one started after the request).
//! 2. When that checkpoint commits, the move is planned as a recovery towards it in which the
//!    drained node counts as lost: its ranks restart (new incarnations, recorded `Restart`
//!    decisions) on a spare with no rank (a node added by `krun node add` is one), else on
//!    the least-loaded other node; every other rank rolls back to the same checkpoint. The
//!    runtime carries it out as any recovery (one wiring epoch).
//! 3. When every rank is back, `Drained{node, version}` is recorded and the `Drained` notice
//!    tells the user where the ranks went; the node may now leave the membership.
//!
//! If the checkpoint aborts, the drain is given up (`DrainRefused` with the reason) and the
//! ranks stay where they are. A failure during the move re-plans it as any recovery (the
//! drained node still takes no rank). The job's summary does not count a drain as a
//! recovery.
use super::{Coordinated, State};
use crate::primitives::{
    AgreedView, Decision, DecisionKind, Millis, NodeId, Rank, Reads, RequestSource, Version,
};
use crate::report::{NoticeKind, RestartGroup, Summary};
use crate::Action;

#[derive(Debug)]
pub(super) struct Drain {
    node: NodeId,
    /// The checkpoint the ranks move from, once it started.
    version: Option<Version>,
    /// The move is planned (a recovery towards `version` runs).
    moving: bool,
    requested_at: Millis,
    /// Where the ranks go (from the recovery's plan).
    moved: Vec<RestartGroup>,
    continuing: Vec<Rank>,
    /// The totals before the move (a drain is not a recovery in the job's summary).
    summary: Option<Summary>,
}

impl Coordinated {
    /// The node whose ranks are being moved now.
    pub(super) fn draining(&self) -> Option<NodeId> {
        self.drain.as_ref().filter(|d| d.moving).map(|d| d.node)
    }

    pub(super) fn on_drain_request(
        &mut self,
        now: Millis,
        node: NodeId,
        view: AgreedView,
    ) -> Vec<Action> {
        let refuse = |reason: String| {
            vec![Action::notice(
                now,
                NoticeKind::DrainRefused { node, reason },
            )]
        };
        if view.epoch >= self.view.epoch {
            self.view = view;
        }
        // Nodes that joined since the start and run no rank are spares.
        for &n in &self.view.nodes {
            if n != node && !self.slots.iter().any(|s| s.node == n) {
                self.spares.insert(n);
            }
        }
        if let Some(d) = &self.drain {
            return refuse(format!(
                "node {} is being drained; drain again once that is over",
                d.node
            ));
        }
        match self.state {
            State::Recovery(_) => {
                return refuse("a recovery is in progress; drain again once it is over".to_string())
            }
            State::Completed | State::Ended => return refuse("the job is over".to_string()),
            State::Running | State::Checkpoint(_) => {}
        }
        if !self.view.contains(node) {
            return refuse(format!(
                "node {node} is not in the view (members {:?})",
                self.view.nodes
            ));
        }
        let ranks: Vec<Rank> = (0..self.slots.len() as Rank)
            .filter(|&r| self.slots[r as usize].node == node)
            .collect();
        if ranks.is_empty() {
            return vec![Action::notice(
                now,
                NoticeKind::Drained {
                    node,
                    version: None,
                    moved: Vec::new(),
                    continuing: Vec::new(),
                    seconds: 0.0,
                },
            )];
        }
        if !self.exited.is_empty() {
            let done: Vec<Rank> = self.exited.iter().copied().collect();
            return refuse(format!(
                "{} already exited: the job is ending",
                crate::primitives::ranks_phrase(&done)
            ));
        }
        if !self.view.nodes.iter().any(|&n| n != node) {
            return refuse(format!(
                "node {node} runs {} and no other node is left to take them (add one with \
                 `krun node add`)",
                crate::primitives::ranks_phrase(&ranks)
            ));
        }
        self.drain = Some(Drain {
            node,
            version: None,
            moving: false,
            requested_at: now,
            moved: Vec::new(),
            continuing: Vec::new(),
            summary: None,
        });
        // The next checkpoint to start is the drain's (one in flight is let finish).
        self.pending_request = Some(RequestSource::Command);
        let d = self
            .ids
            .decision(self.view.epoch, DecisionKind::DrainStarted { node });
        vec![Action::Record(d)]
    }

    /// Follows the actions of one event for the drain in progress: notes its checkpoint,
    /// plans the move once it commits, gives up if it aborts, and ends the drain when the
    /// move's recovery is over.
    pub(super) fn drain_follow(&mut self, now: Millis, out: &mut Vec<Action>, reads: &dyn Reads) {
        let Some(d) = self.drain.as_mut() else {
            return;
        };
        let node = d.node;
        let mut commit = false;
        let mut give_up: Option<String> = None;
        let mut finished = false;
        for a in out.iter() {
            let kind = match a {
                Action::Record(Decision { kind, .. }) => kind,
                Action::EndJob { .. } if !d.moving => {
                    give_up = Some("the job ended".to_string());
                    continue;
                }
                _ => continue,
            };
            match kind {
                DecisionKind::CheckpointStarted { version } if d.version.is_none() => {
                    d.version = Some(*version);
                }
                DecisionKind::Committed { version, .. }
                    if d.version == Some(*version) && !d.moving =>
                {
                    commit = true;
                }
                DecisionKind::Aborted { version, reason }
                    if d.version == Some(*version) && !d.moving =>
                {
                    give_up = Some(format!("checkpoint {version} was aborted ({reason})"));
                }
                DecisionKind::Recovered { .. } if d.moving => finished = true,
                DecisionKind::JobEnded { error } => {
                    give_up = Some(match error {
                        Some(e) => format!("the job ended: {e}"),
                        None => "the job completed".to_string(),
                    });
                }
                _ => {}
            }
        }
        if let Some(reason) = give_up {
            self.drain = None;
            out.push(Action::notice(
                now,
                NoticeKind::DrainRefused { node, reason },
            ));
            return;
        }
        if commit {
            d.moving = true;
            d.summary = Some(self.summary.clone());
            let epoch = self.view.epoch;
            let planned = self.recover(now, epoch, Vec::new(), reads);
            self.take_plan_notices(planned, out);
            // The recovery may be over at once (nothing to wait for).
            if self.drain.as_ref().is_some_and(|d| d.moving) && matches!(self.state, State::Running)
            {
                finished = true;
            }
        }
        if finished {
            self.finish_drain(now, out);
        }
    }

    /// Appends the recovery's actions for the move, keeping its plan for the drain's notice
    /// instead of the recovery's own (this is not a failure).
    fn take_plan_notices(&mut self, planned: Vec<Action>, out: &mut Vec<Action>) {
        for a in planned {
            if let Action::Notify(n) = &a {
                if let NoticeKind::RecoveryPlanned {
                    restarts,
                    rollbacks,
                    ..
                } = &n.kind
                {
                    if let Some(d) = self.drain.as_mut() {
                        d.moved = restarts.clone();
                        d.continuing = rollbacks.clone();
                    }
                    continue;
                }
            }
            out.push(a);
        }
    }

    fn finish_drain(&mut self, now: Millis, out: &mut Vec<Action>) {
        let Some(d) = self.drain.take() else {
            return;
        };
        // The recovery's own notice: replaced by the drain's.
        out.retain(
            |a| !matches!(a, Action::Notify(n) if matches!(n.kind, NoticeKind::Recovered { .. })),
        );
        if let Some(before) = d.summary {
            if self.summary.failures == before.failures {
                self.summary = before;
            }
        }
        let version = d.version.unwrap_or(0);
        let rec = self.ids.decision(
            self.view.epoch,
            DecisionKind::Drained {
                node: d.node,
                version,
            },
        );
        out.push(Action::Record(rec));
        out.push(Action::notice(
            now,
            NoticeKind::Drained {
                node: d.node,
                version: d.version,
                moved: d.moved,
                continuing: d.continuing,
                seconds: now.saturating_sub(d.requested_at) as f64 / 1000.0,
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use crate::coordinated::{Config, Coordinated, IntervalChoice};
    use crate::policy::Policy;
    use crate::primitives::{
        AgreedView, DecisionKind, Event, ImageCopy, Layout, Level, NodeId, Rank, Reads, Version,
    };
    use crate::report::NoticeKind;
    use crate::Action;
    use std::collections::BTreeMap;

    /// Copies reported safe, as the store's index would.
    #[derive(Default)]
    struct Index(BTreeMap<(Rank, Version), Vec<ImageCopy>>);
    impl Reads for Index {
        fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
            self.0.get(&(rank, version)).cloned().unwrap_or_default()
        }
    }

    /// Nodes 0-2 run ranks 0-5 (two each), node 3 is a spare; checkpoints on request only.
    fn policy(spares: Vec<NodeId>) -> Coordinated {
        let cfg = Config {
            interval: IntervalChoice::Never,
            commit_level: Level::L1,
            ..Config::default()
        };
        let layout = Layout {
            ranks: vec![0, 0, 1, 1, 2, 2],
            spares: spares.clone(),
        };
        let mut nodes = vec![0, 1, 2];
        nodes.extend(spares);
        Coordinated::new(cfg, 0, &layout, AgreedView::new(1, nodes), 0).unwrap()
    }

    /// Carries out `first` (the drain request's actions) as the runtime would: barrier,
    /// captures safe at L1 at once; returns every action seen (restarts and rollbacks are
    /// returned, not answered).
    fn run(p: &mut Coordinated, idx: &mut Index, first: Vec<Action>, mut now: u64) -> Vec<Action> {
        let mut all = Vec::new();
        let mut queue = first;
        while !queue.is_empty() {
            let a = queue.remove(0);
            now += 1;
            let next = match &a {
                Action::Synchronize { op, .. } => {
                    p.on_event(now, Event::Synchronized { op: *op }, idx)
                }
                Action::Capture {
                    op, rank, version, ..
                } => {
                    idx.0.entry((*rank, *version)).or_default().push(ImageCopy {
                        level: Level::L1,
                        node: Some(*rank / 2),
                        bytes: 100,
                    });
                    let mut v = p.on_event(
                        now,
                        Event::CaptureDone {
                            op: *op,
                            rank: *rank,
                            version: *version,
                            bytes: 100,
                            seconds: 0.01,
                        },
                        idx,
                    );
                    v.extend(p.on_event(
                        now,
                        Event::LevelSafe {
                            rank: *rank,
                            version: *version,
                            level: Level::L1,
                        },
                        idx,
                    ));
                    v
                }
                _ => Vec::new(),
            };
            all.push(a);
            queue.extend(next);
        }
        all
    }

    fn notices(actions: &[Action]) -> Vec<NoticeKind> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Notify(n) => Some(n.kind.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_drain_checkpoints_then_moves_the_nodes_ranks_to_the_spare_and_rolls_the_others_back() {
        let mut p = policy(vec![3]);
        let mut idx = Index::default();
        let view = AgreedView::new(1, vec![0, 1, 2, 3]);
        let first = p.on_event(10, Event::DrainRequested { node: 1, view }, &idx);
        assert!(first.iter().any(|a| matches!(
            a,
            Action::Record(d) if d.kind == DecisionKind::DrainStarted { node: 1 }
        )));
        // The checkpoint the drain asked for is started at once (the policy was idle).
        assert!(first
            .iter()
            .any(|a| matches!(a, Action::Synchronize { .. })));
        let acts = run(&mut p, &mut idx, first, 10);
        let now = 100;
        let mut restarts = Vec::new();
        let mut rollbacks = Vec::new();
        for a in &acts {
            match a {
                Action::Restart(d) => {
                    if let DecisionKind::Restart { rank, node, .. } = d.kind {
                        restarts.push((rank, node, d.id));
                    }
                }
                Action::Rollback {
                    op, rank, version, ..
                } => rollbacks.push((*rank, *op, *version)),
                _ => {}
            }
        }
        // Ranks 2-3 restart on the spare (node 3), the others roll back to the checkpoint.
        let moved: Vec<(Rank, NodeId)> = restarts.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(moved, vec![(2, 3), (3, 3)]);
        let rolled: Vec<Rank> = rollbacks.iter().map(|r| r.0).collect();
        assert_eq!(rolled, vec![0, 1, 4, 5]);
        assert!(
            !notices(&acts)
                .iter()
                .any(|n| matches!(n, NoticeKind::RecoveryPlanned { .. })),
            "a drain is not told as a failure"
        );
        let mut end = Vec::new();
        for (rank, node, decision) in restarts {
            end.extend(p.on_event(
                now,
                Event::RestartDone {
                    decision,
                    rank,
                    node,
                    seconds: 0.1,
                },
                &idx,
            ));
        }
        for (rank, op, version) in rollbacks {
            end.extend(p.on_event(
                now + 5,
                Event::RollbackDone {
                    op,
                    rank,
                    version,
                    seconds: 0.1,
                },
                &idx,
            ));
        }
        let told = notices(&end);
        let drained = told
            .iter()
            .find(|n| matches!(n, NoticeKind::Drained { .. }))
            .expect("a Drained notice");
        let NoticeKind::Drained {
            node,
            version,
            moved,
            continuing,
            ..
        } = drained
        else {
            unreachable!()
        };
        assert_eq!((*node, *version), (1, Some(1)));
        assert_eq!(moved.len(), 1);
        assert_eq!((moved[0].ranks.clone(), moved[0].node), (vec![2, 3], 3));
        assert_eq!(continuing, &vec![0, 1, 4, 5]);
        let line = drained.to_string();
        assert!(
            line.starts_with("node 1 drained: ranks 2-3 moved to spare node 3 from checkpoint 1"),
            "{line}"
        );
        assert!(!told
            .iter()
            .any(|n| matches!(n, NoticeKind::Recovered { .. })));
        assert!(end.iter().any(|a| matches!(
            a,
            Action::Record(d) if d.kind == DecisionKind::Drained { node: 1, version: 1 }
        )));
        // The ranks' placement now names the spare; the summary counts no recovery.
        let nodes: Vec<NodeId> = p.slots().iter().map(|s| s.node).collect();
        assert_eq!(nodes, vec![0, 0, 3, 3, 2, 2]);
        assert_eq!(p.summary().recoveries, 0);
        // A second drain of the (now empty) node has nothing to move.
        let again = p.on_event(
            now + 10,
            Event::DrainRequested {
                node: 1,
                view: AgreedView::new(1, vec![0, 1, 2, 3]),
            },
            &idx,
        );
        assert!(notices(&again)
            .iter()
            .any(|n| matches!(n, NoticeKind::Drained { moved, .. } if moved.is_empty())));
    }

    #[test]
    fn without_a_spare_a_drain_moves_ranks_to_the_least_loaded_nodes() {
        let mut p = policy(Vec::new());
        let mut idx = Index::default();
        let view = AgreedView::new(1, vec![0, 1, 2]);
        let first = p.on_event(1, Event::DrainRequested { node: 2, view }, &idx);
        let acts = run(&mut p, &mut idx, first, 2);
        let moved: Vec<(Rank, NodeId)> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Restart(d) => match d.kind {
                    DecisionKind::Restart { rank, node, .. } => Some((rank, node)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        // Ranks 4 and 5 spread over nodes 0 and 1 (two ranks each before).
        assert_eq!(moved, vec![(4, 0), (5, 1)]);
    }

    #[test]
    fn a_drain_is_refused_with_a_reason_during_a_recovery_and_for_unknown_or_last_nodes() {
        let idx = Index::default();
        let mut p = policy(Vec::new());
        let refused = |acts: &[Action]| -> String {
            notices(acts)
                .into_iter()
                .find_map(|n| match n {
                    NoticeKind::DrainRefused { reason, .. } => Some(reason),
                    _ => None,
                })
                .expect("a refusal")
        };
        let why = refused(&p.on_event(
            1,
            Event::DrainRequested {
                node: 7,
                view: AgreedView::new(1, vec![0, 1, 2]),
            },
            &idx,
        ));
        assert!(why.contains("node 7 is not in the view"), "{why}");
        // A failure takes node 2: its ranks restart on the spare from the start (no commit
        // yet), and a drain meanwhile is refused.
        let mut p2 = policy(vec![3]);
        p2.on_event(
            2,
            Event::FailureAgreed {
                epoch: 2,
                failed: vec![2],
                view: AgreedView::new(2, vec![0, 1, 3]),
            },
            &idx,
        );
        let why = refused(&p2.on_event(
            3,
            Event::DrainRequested {
                node: 1,
                view: AgreedView::new(2, vec![0, 1, 3]),
            },
            &idx,
        ));
        assert!(why.contains("a recovery is in progress"), "{why}");
        // The last node: nowhere to go.
        let cfg = Config {
            interval: IntervalChoice::Never,
            commit_level: Level::L1,
            ..Config::default()
        };
        let layout = Layout {
            ranks: vec![0, 0],
            spares: Vec::new(),
        };
        let mut alone = Coordinated::new(cfg, 0, &layout, AgreedView::new(1, vec![0]), 0).unwrap();
        let why = refused(&alone.on_event(
            1,
            Event::DrainRequested {
                node: 0,
                view: AgreedView::new(1, vec![0]),
            },
            &idx,
        ));
        assert!(why.contains("no other node is left"), "{why}");
        // A second drain while one is under way.
        p.on_event(
            4,
            Event::DrainRequested {
                node: 1,
                view: AgreedView::new(1, vec![0, 1, 2]),
            },
            &idx,
        );
        let why = refused(&p.on_event(
            5,
            Event::DrainRequested {
                node: 2,
                view: AgreedView::new(1, vec![0, 1, 2]),
            },
            &idx,
        ));
        assert!(why.contains("node 1 is being drained"), "{why}");
    }

    #[test]
    fn a_drain_whose_checkpoint_aborts_is_given_up_and_nothing_moves() {
        let idx = Index::default();
        let mut p = policy(vec![3]);
        let first = p.on_event(
            1,
            Event::DrainRequested {
                node: 1,
                view: AgreedView::new(1, vec![0, 1, 2, 3]),
            },
            &idx,
        );
        let op = first
            .iter()
            .find_map(|a| match a {
                Action::Synchronize { op, .. } => Some(*op),
                _ => None,
            })
            .unwrap();
        let out = p.on_event(
            2,
            Event::SyncFailed {
                op,
                reason: "rank 3 is stuck".into(),
            },
            &idx,
        );
        let told = notices(&out);
        assert!(told.iter().any(|n| matches!(
            n,
            NoticeKind::DrainRefused { node: 1, reason } if reason.contains("rank 3 is stuck")
        )));
        assert!(!out.iter().any(|a| matches!(a, Action::Restart(_))));
        let nodes: Vec<NodeId> = p.slots().iter().map(|s| s.node).collect();
        assert_eq!(nodes, vec![0, 0, 1, 1, 2, 2]);
    }
}
