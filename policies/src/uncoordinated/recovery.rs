//! Failures: the recovery line (with logging: only the lost ranks), placement of the lost
//! ranks, restart and rollback decisions, replay, and the results of each.
use super::recovery_line::Restore;
use super::{Pending, Recovery, Uncoordinated};
use crate::primitives::{
    AgreedView, DecisionId, DecisionKind, Epoch, ImageCopy, Millis, NodeId, OpId, Rank, RankSlot,
    Reads, Version,
};
use crate::report::{LineEntry, NoticeKind};
use crate::{Action, PolicyError};
use std::collections::{BTreeMap, BTreeSet};

impl Uncoordinated {
    fn alive(&self, node: NodeId) -> bool {
        self.view.contains(node)
    }

    /// A usable copy of `rank`'s checkpoint `version`: safe, and held by a live node.
    fn source(&self, reads: &dyn Reads, rank: Rank, version: Version) -> Option<ImageCopy> {
        let c = &self.ranks[rank as usize];
        if !c.safe.iter().any(|s| s.0 == version) {
            return None;
        }
        reads
            .copies(rank, version)
            .into_iter()
            .find(|c| c.node.is_none_or(|n| self.view.contains(n)))
    }

    /// Without logging: [`Action::KeepFrom`] for every rank whose oldest needed checkpoint
    /// rose. That is the rank's checkpoint on the line every rank would roll back to if
    /// all of them failed now, over the checkpoints safe so far: a later line, with more
    /// checkpoints to choose from, is never older on any rank (the transitless cuts form a
    /// lattice: the greatest one over more checkpoints is at least the greatest over
    /// fewer), so nothing older is ever needed again. Channel counts are needed (without
    /// them the line is the graph's, which is not computed ahead).
    pub(super) fn retention(&mut self) -> Vec<Action> {
        if self.cfg.logging || !self.channels_seen {
            return Vec::new();
        }
        let n = self.ranks.len();
        let counts: Vec<_> = self.ranks.iter().map(|c| c.counts.clone()).collect();
        let taken: Vec<Vec<Version>> = self.ranks.iter().map(|c| c.taken.clone()).collect();
        let line = super::recovery_line::transitless_line(&counts, &taken, |r, v| {
            self.ranks[r as usize].safe.iter().any(|s| s.0 == v)
        });
        self.floors.resize(n, 0);
        let mut out = Vec::new();
        for (r, at) in line.ranks.iter().enumerate() {
            let Restore::At(v) = *at else { continue };
            if v > self.floors[r] {
                self.floors[r] = v;
                out.push(Action::KeepFrom {
                    rank: r as Rank,
                    version: v,
                });
            }
        }
        out
    }

    pub(super) fn on_failure(
        &mut self,
        now: Millis,
        epoch: Epoch,
        failed: Vec<NodeId>,
        view: AgreedView,
        reads: &dyn Reads,
    ) -> Vec<Action> {
        if view.epoch >= self.view.epoch {
            self.view = view;
        }
        let failed: Vec<NodeId> = failed.into_iter().filter(|n| !self.alive(*n)).collect();
        for n in &failed {
            self.spares.remove(n);
        }
        self.summary.failures += failed.len() as u32;
        if self.view.nodes.is_empty() {
            return self.end_with(now, PolicyError::AllNodesLost { failed });
        }
        // Lost: ranks on dead nodes (a rank that had exited stays exited).
        let lost: BTreeSet<Rank> = (0..self.slots.len() as Rank)
            .filter(|r| !self.alive(self.slots[*r as usize].node) && !self.exited.contains(r))
            .collect();
        if lost.is_empty() {
            if failed.is_empty() {
                return Vec::new();
            }
            return vec![Action::notice(now, NoticeKind::NodesLost { epoch, failed })];
        }
        self.plan(now, epoch, failed, lost, reads)
    }

    /// Plans the recovery of `lost` (adding to one in progress).
    pub(super) fn plan(
        &mut self,
        now: Millis,
        epoch: Epoch,
        failed: Vec<NodeId>,
        lost: BTreeSet<Rank>,
        reads: &dyn Reads,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let n = self.slots.len() as Rank;
        // Before the job's wiring finished, the ranks still in their first address exchange
        // cannot go on without the lost ones (it broke under them), and nothing was logged
        // or checkpointed: every rank re-executes from its start in a new wiring epoch. A
        // recovery that re-wires already stays one (its restarted ranks are not ready yet).
        let rewire = !self.wired || self.recovery.as_ref().is_some_and(|r| r.rewire);
        // Where each rank is restored to.
        let line: Vec<Restore> = if rewire {
            vec![Restore::At(0); n as usize]
        } else if self.cfg.logging {
            (0..n)
                .map(|r| {
                    if lost.contains(&r) {
                        let newest = self.ranks[r as usize]
                            .safe
                            .iter()
                            .rev()
                            .map(|s| s.0)
                            .find(|&v| self.source(reads, r, v).is_some());
                        Restore::At(newest.unwrap_or(0))
                    } else {
                        Restore::Keep
                    }
                })
                .collect()
        } else {
            let taken: Vec<Vec<Version>> = self.ranks.iter().map(|c| c.taken.clone()).collect();
            // Without any channel counts yet (none of the ranks' checkpoints brought them)
            // and no reported delivery either, nothing says which ranks depend on which: the
            // transitless line over no counts, every rank from its start, is the one line
            // known to be consistent (a runtime that reports counts, as krun, has not sent
            // any before the first checkpoint; keeping survivors then left them waiting for
            // halos the lost ranks re-execute in another wiring epoch).
            let line = if self.channels_seen || self.graph.is_empty() {
                let counts: Vec<_> = self.ranks.iter().map(|c| c.counts.clone()).collect();
                super::recovery_line::transitless_line(&counts, &taken, |r, v| {
                    self.source(reads, r, v).is_some()
                })
            } else {
                self.graph
                    .recovery_line(&taken, &lost, |r, v| self.source(reads, r, v).is_some())
            };
            let v = line.ranks.clone();
            self.last_line = Some(line);
            v
        };
        // With logging, a lost rank whose safe checkpoints are all gone can restart only
        // from the start, and only if the log still holds everything it delivered.
        if self.cfg.logging && !rewire {
            for &r in &lost {
                let c = &self.ranks[r as usize];
                if line[r as usize] == Restore::At(0) && !c.safe.is_empty() {
                    let versions = c.safe.iter().map(|s| s.0).collect();
                    return self.end_with(
                        now,
                        PolicyError::ImagesLost {
                            rank: r,
                            versions,
                            failed: failed.clone(),
                            levels: format!(
                                "{} (the message log was collected up to them)",
                                self.cfg.safe_level
                            ),
                        },
                    );
                }
            }
        }
        let rolled_past: Vec<u32> = (0..n as usize)
            .map(|r| match line[r] {
                Restore::Keep => 0,
                Restore::At(v) => self.ranks[r].taken.iter().filter(|&&t| t > v).count() as u32,
            })
            .collect();
        let depth = rolled_past.iter().copied().max().unwrap_or(0);
        self.max_depth = self.max_depth.max(depth);
        // Placement of the lost ranks: all ranks of one failed node on one spare, else the
        // least-loaded survivor.
        let mut load: BTreeMap<NodeId, u32> =
            self.view.nodes.iter().map(|&node| (node, 0)).collect();
        for (r, s) in self.slots.iter().enumerate() {
            if !lost.contains(&(r as Rank)) {
                if let Some(l) = load.get_mut(&s.node) {
                    *l += 1;
                }
            }
        }
        let mut by_node: BTreeMap<NodeId, Vec<Rank>> = BTreeMap::new();
        for &r in &lost {
            by_node
                .entry(self.slots[r as usize].node)
                .or_default()
                .push(r);
        }
        let mut placed: BTreeMap<Rank, NodeId> = BTreeMap::new();
        for (_, ranks) in by_node {
            if let Some(s) = self
                .spares
                .iter()
                .copied()
                .find(|s| load.get(s) == Some(&0))
            {
                load.insert(s, ranks.len() as u32);
                placed.extend(ranks.iter().map(|&r| (r, s)));
                continue;
            }
            let cap = match self.cfg.no_spare {
                super::NoSpare::Fail => {
                    return self.end_with(
                        now,
                        PolicyError::NoNode {
                            ranks,
                            failed,
                            reason: "no spare node is left and the policy does not allow running on fewer nodes".into(),
                        },
                    )
                }
                super::NoSpare::Survivors { max_ranks_per_node } => max_ranks_per_node,
            };
            for r in ranks {
                let best = load
                    .iter()
                    .filter(|(_, l)| cap.is_none_or(|c| **l < c))
                    .min_by_key(|(node, l)| (**l, **node))
                    .map(|(node, _)| *node);
                let Some(node) = best else {
                    return self.end_with(
                        now,
                        PolicyError::NoNode {
                            ranks: vec![r],
                            failed,
                            reason: "no spare node is left and every surviving node is full".into(),
                        },
                    );
                };
                *load.entry(node).or_default() += 1;
                placed.insert(r, node);
            }
        }
        let mut rec = self.recovery.take().unwrap_or_else(|| Recovery {
            epoch,
            failed: Vec::new(),
            started_at: now,
            ranks: BTreeMap::new(),
            restarted: BTreeSet::new(),
            rolled_back: BTreeSet::new(),
            attempts: BTreeMap::new(),
            saved_at: BTreeMap::new(),
            rewire,
        });
        rec.epoch = epoch;
        if rewire {
            rec.rewire = true;
            // The new epoch's processes report their readiness afresh.
            self.ready.clear();
            self.wired = false;
            if self.cfg.logging {
                // Nothing delivered before the start is replayed: every rank re-executes.
                self.log.forget_deliveries();
            }
        }
        for f in &failed {
            if !rec.failed.contains(f) {
                rec.failed.push(*f);
            }
        }
        let mut entries = Vec::new();
        let mut recorded = Vec::new();
        for r in 0..n {
            let Restore::At(v) = line[r as usize] else {
                continue;
            };
            let version = (v > 0).then_some(v);
            // Everything after the checkpoint restored is undone.
            self.drop_capture(now, r);
            let c = &mut self.ranks[r as usize];
            c.taken.retain(|&t| t <= v);
            c.safe.retain(|s| s.0 <= v);
            c.counts.retain(|&t, _| t <= v);
            let saved = c.safe.last().filter(|s| s.0 == v).map_or(0, |s| s.1);
            rec.saved_at.insert(r, saved);
            self.graph.undo(r, v);
            recorded.push((r, version));
            entries.push(LineEntry {
                rank: r,
                version,
                rolled_past: rolled_past[r as usize],
                restart_on: placed.get(&r).copied(),
            });
        }
        let kept: Vec<Rank> = (0..n)
            .filter(|r| line[*r as usize] == Restore::Keep && !self.exited.contains(r))
            .collect();
        let d = self.ids.decision(
            self.view.epoch,
            DecisionKind::RecoveryLine {
                failure_epoch: epoch,
                line: recorded,
                depth,
                rewire,
            },
        );
        out.push(Action::Record(d));
        out.push(Action::notice(
            now,
            NoticeKind::RecoveryLine {
                epoch,
                failed,
                logging: self.cfg.logging,
                line: entries.clone(),
                depth,
                kept,
                rewire,
            },
        ));
        for e in entries {
            let r = e.rank;
            self.exited.remove(&r);
            let src = e.version.and_then(|v| self.source(reads, r, v));
            match e.restart_on {
                Some(node) => out.extend(self.decide_restart(&mut rec, r, node, e.version, src)),
                None => {
                    let Some(v) = e.version else {
                        // Back to the start in place: a restart on its own node.
                        let node = self.slots[r as usize].node;
                        out.extend(self.decide_restart(&mut rec, r, node, None, None));
                        continue;
                    };
                    let Some(source) = self.source(reads, r, v) else {
                        let node = self.slots[r as usize].node;
                        out.extend(self.decide_restart(&mut rec, r, node, Some(v), None));
                        continue;
                    };
                    let op = self.ids.op();
                    rec.ranks.insert(r, Pending::Rollback { op, version: v });
                    rec.rolled_back.insert(r);
                    self.summary.rollbacks += 1;
                    out.push(Action::Rollback {
                        op,
                        rank: r,
                        version: v,
                        source,
                    });
                }
            }
        }
        self.recovery = Some(rec);
        out
    }

    /// Records and orders the restart of `rank` on `node` from `version`.
    fn decide_restart(
        &mut self,
        rec: &mut Recovery,
        rank: Rank,
        node: NodeId,
        version: Option<Version>,
        source: Option<ImageCopy>,
    ) -> Vec<Action> {
        let inc = self.slots[rank as usize].incarnation + 1;
        self.slots[rank as usize] = RankSlot {
            node,
            incarnation: inc,
        };
        self.spares.remove(&node);
        let d = self.ids.decision(
            self.view.epoch,
            DecisionKind::Restart {
                rank,
                incarnation: inc,
                node,
                version,
                source,
                failure_epoch: rec.epoch,
            },
        );
        rec.ranks.insert(
            rank,
            Pending::Restart {
                id: d.id,
                node,
                version,
            },
        );
        rec.restarted.insert(rank);
        self.summary.restarts += 1;
        vec![Action::Restart(d)]
    }

    pub(super) fn on_restart_result(
        &mut self,
        now: Millis,
        decision: DecisionId,
        rank: Rank,
        result: Result<f64, String>,
        reads: &dyn Reads,
    ) -> Vec<Action> {
        let Some(mut rec) = self.recovery.take() else {
            return Vec::new();
        };
        let Some(Pending::Restart { id, node, version }) = rec.ranks.get(&rank).copied() else {
            self.recovery = Some(rec);
            return Vec::new();
        };
        if id != decision {
            self.recovery = Some(rec);
            return Vec::new();
        }
        let mut out = Vec::new();
        match result {
            Ok(seconds) => {
                self.costs.observe_restart(seconds);
                if self.cfg.logging && !rec.rewire {
                    let replay = self.log.replay_of(rank, version);
                    let bytes = replay.iter().map(|d| d.bytes).sum();
                    self.log.count_replayed(replay.len() as u64);
                    out.push(Action::Replay {
                        decision,
                        rank,
                        version,
                    });
                    out.push(Action::notice(
                        now,
                        NoticeKind::Replaying {
                            rank,
                            from: version,
                            messages: replay.len() as u64,
                            bytes,
                        },
                    ));
                    // Only this rank waited: it goes on now (it replays as it runs).
                    out.push(Action::Release { ranks: vec![rank] });
                }
                rec.ranks.insert(rank, Pending::Done);
            }
            Err(reason) => {
                let attempts = rec.attempts.entry(rank).or_default();
                *attempts += 1;
                let attempts = *attempts;
                out.push(Action::notice(
                    now,
                    NoticeKind::RestartFailed {
                        rank,
                        node,
                        reason: reason.clone(),
                    },
                ));
                if attempts >= self.cfg.max_restart_attempts {
                    self.recovery = Some(rec);
                    out.extend(self.end_with(
                        now,
                        PolicyError::RestartFailed {
                            rank,
                            attempts,
                            reason,
                        },
                    ));
                    return out;
                }
                // Again, on the same node if it lives (else the failure replans it).
                if self.alive(node) {
                    let src = version.and_then(|v| self.source(reads, rank, v));
                    out.extend(self.decide_restart(&mut rec, rank, node, version, src));
                }
            }
        }
        self.recovery = Some(rec);
        out.extend(self.try_finish(now));
        out
    }

    pub(super) fn on_rollback_result(
        &mut self,
        now: Millis,
        op: OpId,
        rank: Rank,
        result: Result<(), String>,
    ) -> Vec<Action> {
        let Some(rec) = self.recovery.as_mut() else {
            return Vec::new();
        };
        let Some(Pending::Rollback { op: want, version }) = rec.ranks.get(&rank).copied() else {
            return Vec::new();
        };
        if want != op {
            return Vec::new();
        }
        match result {
            Ok(()) => {
                rec.ranks.insert(rank, Pending::Done);
                self.try_finish(now)
            }
            Err(reason) => {
                let node = self.slots[rank as usize].node;
                let mut rec = self.recovery.take().expect("checked above");
                rec.rolled_back.remove(&rank);
                let mut out = vec![Action::notice(
                    now,
                    NoticeKind::RestartFailed {
                        rank,
                        node,
                        reason: format!("rollback failed ({reason}); restarting it in place"),
                    },
                )];
                out.extend(self.decide_restart(&mut rec, rank, node, Some(version), None));
                self.recovery = Some(rec);
                out
            }
        }
    }

    fn try_finish(&mut self, now: Millis) -> Vec<Action> {
        let Some(rec) = &self.recovery else {
            return Vec::new();
        };
        if !rec.ranks.values().all(|p| *p == Pending::Done) {
            return Vec::new();
        }
        let rec = self.recovery.take().expect("checked above");
        let lost = rec
            .saved_at
            .values()
            .map(|&t| now.saturating_sub(t))
            .max()
            .unwrap_or(0);
        self.summary.lost_seconds += lost as f64 / 1000.0;
        self.summary.recoveries += 1;
        for &r in rec.ranks.keys() {
            self.reschedule(r, now);
        }
        let mut out = Vec::new();
        if !self.cfg.logging || rec.rewire {
            // Restored ranks were held until every one of them is back.
            out.push(Action::Release {
                ranks: rec.ranks.keys().copied().collect(),
            });
        }
        let d = self.ids.decision(
            self.view.epoch,
            DecisionKind::Recovered {
                failure_epoch: rec.epoch,
            },
        );
        out.push(Action::Record(d));
        out.push(Action::notice(
            now,
            NoticeKind::Recovered {
                epoch: rec.epoch,
                restarted: rec.restarted.iter().copied().collect(),
                rolled_back: rec.rolled_back.iter().copied().collect(),
                seconds: (now - rec.started_at) as f64 / 1000.0,
            },
        ));
        out
    }
}
