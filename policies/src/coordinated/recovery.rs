//! Failures and recovery: the recovery line, placement of lost ranks, restart decisions,
//! rollbacks, and the results of both.
use super::{Coordinated, NoSpare, RankState, Recovery, State};
use crate::policy::Policy;
use crate::primitives::{
    AgreedView, DecisionId, DecisionKind, Epoch, ImageCopy, Level, Millis, NodeId, OpId, Rank,
    RankSlot, Reads, RequestSource, Version,
};
use crate::report::{NoticeKind, RestartGroup};
use crate::{Action, PolicyError};
use std::collections::{BTreeMap, BTreeSet};

/// The first delay before a restart is tried again from a copy that already failed.
const RETRY_MS: Millis = 100;

fn node_list(nodes: &[NodeId]) -> String {
    nodes
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Coordinated {
    // ---- failures and recovery ----------------------------------------------------------

    pub(super) fn alive(&self, node: NodeId) -> bool {
        self.view.contains(node)
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
        let mut out = Vec::new();
        if matches!(self.state, State::Completed | State::Ended) {
            return out;
        }
        if self.view.nodes.is_empty() {
            return self.end(now, PolicyError::AllNodesLost { failed });
        }
        let lost_ranks = self.slots.iter().any(|s| !self.alive(s.node));
        let recovering = matches!(self.state, State::Recovery(_));
        if lost_ranks || recovering {
            out.extend(self.recover(now, epoch, failed, reads));
            return out;
        }
        if failed.is_empty() {
            return out;
        }
        out.push(Action::notice(
            now,
            NoticeKind::NodesLost {
                epoch,
                failed: failed.clone(),
            },
        ));
        if matches!(self.state, State::Checkpoint(_)) {
            let reason = format!("node(s) {} failed while it was taken", node_list(&failed));
            out.extend(self.abort(now, reason, true));
            self.pending_request = Some(RequestSource::Interval);
            self.next_checkpoint_at = Some(now);
        } else if let Some(line) = self.recovery_line() {
            // The recovery line may have lost copies with the node: if some image is down to
            // one copy, take a new checkpoint now.
            if (0..self.slots.len() as Rank).any(|r| reads.copies(r, line).len() < 2) {
                self.next_checkpoint_at = Some(now);
            }
        }
        out
    }

    /// Settles what the previous leader left open: a recovery in flight is planned again
    /// from the recovery line; a checkpoint in flight is aborted and its ranks released.
    /// Otherwise the job goes on untouched.
    pub(super) fn take_over(
        &mut self,
        now: Millis,
        failed: Vec<NodeId>,
        reads: &dyn Reads,
    ) -> Vec<Action> {
        self.takeover = false;
        let epoch = self.view.epoch;
        let mut out = vec![Action::notice(
            now,
            NoticeKind::Takeover {
                leader: self.leader,
                epoch,
            },
        )];
        if let Some((rank, code)) = self.exit_failure.take() {
            out.extend(self.end(now, PolicyError::RankFailed { rank, code }));
            return out;
        }
        if self.open_recovery || !self.unconfirmed.is_empty() {
            self.open_checkpoint = None;
            out.extend(self.recover(now, epoch, failed, reads));
            return out;
        }
        if let Some(version) = self.open_checkpoint.take() {
            let reason = "the policy's leader changed while it was taken".to_string();
            self.summary.aborted += 1;
            let d = self.ids.decision(
                self.view.epoch,
                DecisionKind::Aborted {
                    version,
                    reason: reason.clone(),
                },
            );
            out.push(Action::Record(d));
            out.push(Action::Release {
                ranks: self.all_ranks(),
            });
            out.push(Action::notice(
                now,
                NoticeKind::CheckpointAborted {
                    version,
                    reason,
                    recovery_line: self.recovery_line(),
                },
            ));
            self.next_checkpoint_at = Some(now);
        }
        if !self.exited.is_empty() {
            self.next_checkpoint_at = None;
        }
        out.extend(self.maybe_complete(now));
        out
    }

    /// Plans (or re-plans) the recovery after the failure agreed at `epoch`.
    pub(super) fn recover(
        &mut self,
        now: Millis,
        epoch: Epoch,
        failed: Vec<NodeId>,
        reads: &dyn Reads,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if matches!(self.state, State::Checkpoint(_)) {
            let reason = if failed.is_empty() {
                "the policy's leader changed".to_string()
            } else {
                format!("node(s) {} failed while it was taken", node_list(&failed))
            };
            out.extend(self.abort(now, reason, false));
        }
        let prev = match std::mem::replace(&mut self.state, State::Running) {
            State::Recovery(r) => Some(r),
            _ => None,
        };
        let n = self.slots.len() as Rank;
        let mut all_failed = prev.as_ref().map(|r| r.failed.clone()).unwrap_or_default();
        for f in &failed {
            if !all_failed.contains(f) {
                all_failed.push(*f);
            }
        }
        let suspects: BTreeSet<(Rank, Level, Option<NodeId>)> = prev
            .as_ref()
            .map(|r| r.suspects.clone())
            .unwrap_or_default();
        // Copies on nodes out of the view are not used, whatever the index still says;
        // copies a fetch failed from are used only when nothing else is left.
        let view = self.view.clone();
        let copies = |r: Rank, v: Version| -> Vec<ImageCopy> {
            let all: Vec<ImageCopy> = reads
                .copies(r, v)
                .into_iter()
                .filter(|c| c.node.is_none_or(|n| view.contains(n)))
                .collect();
            let good: Vec<ImageCopy> = all
                .iter()
                .copied()
                .filter(|c| !suspects.contains(&(r, c.level, c.node)))
                .collect();
            if good.is_empty() {
                all
            } else {
                good
            }
        };
        // The recovery line: the newest kept commit every rank has a copy of.
        let version = if self.commits.is_empty() {
            None
        } else {
            let found = self
                .commits
                .iter()
                .rev()
                .map(|c| c.version)
                .find(|&v| (0..n).all(|r| !copies(r, v).is_empty()));
            match found {
                Some(v) => Some(v),
                None => {
                    let newest = self.commits.back().map(|c| c.version).unwrap_or(0);
                    let rank = (0..n).find(|&r| copies(r, newest).is_empty()).unwrap_or(0);
                    out.extend(self.end(
                        now,
                        PolicyError::ImagesLost {
                            rank,
                            versions: self.commits.iter().map(|c| c.version).collect(),
                            failed: all_failed,
                            levels: self.cfg.levels_text(),
                        },
                    ));
                    return out;
                }
            }
        };
        if prev.is_none() {
            let d = self.ids.decision(
                self.view.epoch,
                DecisionKind::RecoveryStarted {
                    failure_epoch: epoch,
                    version,
                },
            );
            out.push(Action::Record(d));
        }
        let prev_retry = prev.as_ref().and_then(|r| r.retry_at);
        let retry_due = prev_retry.is_none_or(|t| t <= now);
        let mut rec = Recovery {
            epoch,
            failed: all_failed,
            version,
            started_at: prev.as_ref().map(|r| r.started_at).unwrap_or(now),
            ranks: BTreeMap::new(),
            restarted: prev
                .as_ref()
                .map(|r| r.restarted.clone())
                .unwrap_or_default(),
            rolled_back: prev
                .as_ref()
                .map(|r| r.rolled_back.clone())
                .unwrap_or_default(),
            // A new failure explains the failed attempts: count afresh.
            attempts: match &prev {
                Some(r) if failed.is_empty() => r.attempts.clone(),
                _ => BTreeMap::new(),
            },
            suspects: suspects.clone(),
            retry_at: prev_retry.filter(|t| *t > now),
        };
        let mut carried = prev.map(|r| r.ranks).unwrap_or_default();
        for r in std::mem::take(&mut self.unconfirmed) {
            carried.insert(r, RankState::NeedsRestart);
        }
        let source_alive =
            |s: Option<ImageCopy>| s.and_then(|c| c.node).is_none_or(|n| self.view.contains(n));
        // Decide per rank: keep, roll back, or restart (placed below).
        let mut to_place: BTreeMap<NodeId, Vec<Rank>> = BTreeMap::new();
        let mut in_place: Vec<Rank> = Vec::new();
        let mut rollbacks: Vec<(Rank, Version, ImageCopy)> = Vec::new();
        for r in 0..n {
            let slot = self.slots[r as usize];
            if !self.alive(slot.node) || self.draining() == Some(slot.node) {
                to_place.entry(slot.node).or_default().push(r);
                continue;
            }
            let keep = match carried.get(&r) {
                Some(RankState::Done { version: v }) => *v == version,
                Some(RankState::Rollback {
                    version: v, source, ..
                }) => Some(*v) == version && source_alive(Some(*source)),
                Some(RankState::Restart {
                    version: v, source, ..
                }) => *v == version && source_alive(*source),
                Some(RankState::NeedsRestart | RankState::Deferred) | None => false,
            };
            if keep && !self.exited.contains(&r) {
                rec.ranks.insert(r, carried[&r]);
                continue;
            }
            let never_ran = matches!(
                carried.get(&r),
                Some(RankState::Restart { .. } | RankState::NeedsRestart | RankState::Deferred)
            );
            match version {
                Some(v) if !self.exited.contains(&r) && !never_ran => {
                    // Survivors' rollback source: their fastest copy (L1 at home).
                    let copy = copies(r, v)[0];
                    rollbacks.push((r, v, copy));
                }
                _ => in_place.push(r),
            }
        }
        self.exited.clear();
        // Place the lost ranks: one spare per failed node, else the least-loaded survivor.
        let mut load: BTreeMap<NodeId, u32> =
            self.view.nodes.iter().map(|&node| (node, 0)).collect();
        for s in &self.slots {
            if let Some(l) = load.get_mut(&s.node) {
                *l += 1;
            }
        }
        // A node being drained takes no rank.
        if let Some(d) = self.draining() {
            load.remove(&d);
        }
        let mut placements: Vec<(Rank, NodeId, bool)> = Vec::new();
        for (from, ranks) in to_place {
            let spare = self
                .spares
                .iter()
                .copied()
                .find(|s| load.get(s) == Some(&0));
            if let Some(s) = spare {
                load.insert(s, ranks.len() as u32);
                placements.extend(ranks.iter().map(|&r| (r, s, true)));
                continue;
            }
            let lost_here = ranks.clone();
            for r in ranks {
                let cap = match self.cfg.no_spare {
                    // A drained node's ranks go to the least-loaded other node.
                    NoSpare::Fail if self.draining() == Some(from) => None,
                    NoSpare::Fail => {
                        let reason = "no spare node is left and the policy does not allow running on fewer nodes".to_string();
                        out.extend(self.end(
                            now,
                            PolicyError::NoNode {
                                // Every rank the node took with it is lost.
                                ranks: lost_here,
                                failed: rec.failed.clone(),
                                reason,
                            },
                        ));
                        return out;
                    }
                    NoSpare::Survivors { max_ranks_per_node } => max_ranks_per_node,
                };
                let best = load
                    .iter()
                    .filter(|(_, l)| cap.is_none_or(|c| **l < c))
                    .min_by_key(|(node, l)| (**l, **node))
                    .map(|(node, _)| *node);
                let Some(node) = best else {
                    let reason = format!(
                        "no spare node is left and every surviving node holds {} ranks (the maximum)",
                        cap.unwrap_or(0)
                    );
                    out.extend(self.end(
                        now,
                        PolicyError::NoNode {
                            ranks: vec![r],
                            failed: rec.failed.clone(),
                            reason,
                        },
                    ));
                    return out;
                };
                *load.entry(node).or_default() += 1;
                placements.push((r, node, false));
            }
        }
        for r in in_place {
            placements.push((r, self.slots[r as usize].node, false));
        }
        placements.sort_by_key(|p| p.0);
        // Restart decisions, recorded then executed.
        let mut groups: Vec<RestartGroup> = Vec::new();
        for (r, node, spare) in placements {
            let source = version.map(|v| copies(r, v)[0]);
            let tried = rec.attempts.get(&r).copied().unwrap_or(0);
            let deferred = matches!(carried.get(&r), Some(RankState::Deferred));
            let all_failed_once = source.is_some_and(|c| suspects.contains(&(r, c.level, c.node)));
            if tried > 0 && all_failed_once && (!deferred || !retry_due) {
                // Every copy left already failed a fetch: its node is probably dead and not
                // yet agreed. Try again later (or when the failure is agreed).
                rec.ranks.insert(r, RankState::Deferred);
                if !deferred {
                    let at = now + (RETRY_MS << (tried - 1).min(6));
                    rec.retry_at = Some(rec.retry_at.map_or(at, |t| t.min(at)));
                }
                continue;
            }
            let inc = self.slots[r as usize].incarnation + 1;
            self.slots[r as usize] = RankSlot {
                node,
                incarnation: inc,
            };
            let d = self.ids.decision(
                self.view.epoch,
                DecisionKind::Restart {
                    rank: r,
                    incarnation: inc,
                    node,
                    version,
                    source,
                    failure_epoch: epoch,
                },
            );
            rec.ranks.insert(
                r,
                RankState::Restart {
                    id: d.id,
                    node,
                    version,
                    source,
                },
            );
            rec.restarted.insert(r);
            self.summary.restarts += 1;
            out.push(Action::Restart(d));
            match groups.iter_mut().find(|g| {
                g.node == node
                    && g.source.map(|s| (s.level, s.node)) == source.map(|s| (s.level, s.node))
            }) {
                Some(g) => {
                    g.ranks.push(r);
                    if let (Some(gs), Some(s)) = (g.source.as_mut(), source) {
                        gs.bytes += s.bytes;
                    }
                }
                None => groups.push(RestartGroup {
                    ranks: vec![r],
                    node,
                    spare,
                    source,
                }),
            }
        }
        let mut rolled = Vec::new();
        for (r, v, copy) in rollbacks {
            let op = self.ids.op();
            rec.ranks.insert(
                r,
                RankState::Rollback {
                    op,
                    version: v,
                    source: copy,
                },
            );
            rec.rolled_back.insert(r);
            self.summary.rollbacks += 1;
            rolled.push(r);
            out.push(Action::Rollback {
                op,
                rank: r,
                version: v,
                source: copy,
            });
        }
        if !groups.is_empty() || !rolled.is_empty() {
            out.push(Action::notice(
                now,
                NoticeKind::RecoveryPlanned {
                    epoch,
                    failed: if failed.is_empty() {
                        rec.failed.clone()
                    } else {
                        failed
                    },
                    version,
                    restarts: groups,
                    rollbacks: rolled,
                },
            ));
        }
        self.state = State::Recovery(rec);
        out.extend(self.try_finish_recovery(now));
        out
    }

    pub(super) fn try_finish_recovery(&mut self, now: Millis) -> Vec<Action> {
        let State::Recovery(rec) = &self.state else {
            return Vec::new();
        };
        if !rec
            .ranks
            .values()
            .all(|s| matches!(s, RankState::Done { .. }))
        {
            return Vec::new();
        }
        let captured_at = rec
            .version
            .and_then(|v| self.commits.iter().find(|c| c.version == v))
            .map(|c| c.captured_at)
            .unwrap_or(0);
        let lost = now.saturating_sub(captured_at.max(self.progress_mark));
        let failure_epoch = rec.epoch;
        let notice = NoticeKind::Recovered {
            epoch: rec.epoch,
            restarted: rec.restarted.iter().copied().collect(),
            rolled_back: rec.rolled_back.iter().copied().collect(),
            seconds: (now - rec.started_at) as f64 / 1000.0,
        };
        self.summary.lost_seconds += lost as f64 / 1000.0;
        self.summary.recoveries += 1;
        self.progress_mark = now;
        self.state = State::Running;
        self.next_checkpoint_at = if self.pending_request.is_some() {
            Some(now)
        } else {
            self.interval_ms().map(|t| now + t)
        };
        // Released before it is recorded as over: a leader lost in between leaves the
        // recovery open, and the next one plans it again (never ranks held for ever).
        let release = Action::Release {
            ranks: self.all_ranks(),
        };
        let d = self
            .ids
            .decision(self.view.epoch, DecisionKind::Recovered { failure_epoch });
        vec![release, Action::Record(d), Action::notice(now, notice)]
    }

    pub(super) fn on_restart_result(
        &mut self,
        now: Millis,
        decision: DecisionId,
        rank: Rank,
        result: Result<f64, String>,
        reads: &dyn Reads,
    ) -> Vec<Action> {
        let State::Recovery(rec) = &mut self.state else {
            return Vec::new();
        };
        let Some(RankState::Restart {
            id, node, version, ..
        }) = rec.ranks.get(&rank).copied()
        else {
            return Vec::new();
        };
        if id != decision {
            return Vec::new();
        }
        match result {
            Ok(seconds) => {
                self.costs.observe_restart(seconds);
                rec.ranks.insert(rank, RankState::Done { version });
                self.try_finish_recovery(now)
            }
            Err(reason) => {
                let attempts = rec.attempts.entry(rank).or_default();
                *attempts += 1;
                let attempts = *attempts;
                if let Some(RankState::Restart {
                    source: Some(src), ..
                }) = rec.ranks.get(&rank)
                {
                    rec.suspects.insert((rank, src.level, src.node));
                }
                rec.ranks.insert(rank, RankState::NeedsRestart);
                let epoch = rec.epoch;
                let mut out = vec![Action::notice(
                    now,
                    NoticeKind::RestartFailed {
                        rank,
                        node,
                        reason: reason.clone(),
                    },
                )];
                if attempts >= self.cfg.max_restart_attempts {
                    out.extend(self.end(
                        now,
                        PolicyError::RestartFailed {
                            rank,
                            attempts,
                            reason,
                        },
                    ));
                    return out;
                }
                out.extend(self.recover(now, epoch, Vec::new(), reads));
                out
            }
        }
    }

    pub(super) fn on_rollback_result(
        &mut self,
        now: Millis,
        op: OpId,
        rank: Rank,
        result: Result<Version, String>,
        reads: &dyn Reads,
    ) -> Vec<Action> {
        let State::Recovery(rec) = &mut self.state else {
            return Vec::new();
        };
        let Some(RankState::Rollback {
            op: want, source, ..
        }) = rec.ranks.get(&rank).copied()
        else {
            return Vec::new();
        };
        if want != op {
            return Vec::new();
        }
        match result {
            Ok(version) => {
                rec.ranks.insert(
                    rank,
                    RankState::Done {
                        version: Some(version),
                    },
                );
                self.try_finish_recovery(now)
            }
            Err(reason) => {
                // Restart it in place instead.
                let epoch = rec.epoch;
                let node = self.slots[rank as usize].node;
                rec.suspects.insert((rank, source.level, source.node));
                rec.ranks.insert(rank, RankState::NeedsRestart);
                let mut out = vec![Action::notice(
                    now,
                    NoticeKind::RestartFailed {
                        rank,
                        node,
                        reason: format!("rollback failed ({reason}); restarting it in place"),
                    },
                )];
                out.extend(self.recover(now, epoch, Vec::new(), reads));
                out
            }
        }
    }
}
