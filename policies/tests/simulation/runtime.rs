//! The model of krund carrying out the policy's actions: per-rank FIFO effects with delays,
//! the barrier, captures into the store model, rollbacks, restarts fenced by incarnations,
//! and the crashes armed at each step.
use super::model::*;
use super::schedule::Step;
use super::{Effect, Ev, Sim};
use policies::primitives::{Decision, DecisionKind, Event, Level, Millis, NodeId, Rank, RankSlot};
use policies::{Action, Phase, Policy};
use rand::Rng;

impl Sim {
    pub(super) fn effect(&mut self, rank: Rank, e: Effect, delay: Millis) {
        let at = (self.now + delay).max(self.fifo[rank as usize] + 1);
        self.fifo[rank as usize] = at;
        self.push(at, Ev::Effect(rank, e));
    }

    pub(super) fn record(&mut self, d: &Decision) {
        if self.decisions.iter().any(|x| x.id == d.id) {
            self.fail(&format!("decision id {} recorded twice", d.id));
        }
        self.decisions.push(d.clone());
    }

    pub(super) fn execute(&mut self, a: Action) {
        self.log(format!("<- policy: {a:?}"));
        match a {
            Action::Synchronize { op, ranks } => {
                self.fire(Step::CkptSync, None, None, None);
                let n = ranks.len();
                for r in ranks {
                    let d = self.rng.gen_range(1..6);
                    self.effect(r, Effect::Hold(op, n), d);
                }
            }
            Action::Capture {
                op,
                rank,
                version,
                levels,
            } => {
                let d = self.rng.gen_range(3..15);
                self.effect(rank, Effect::Capture(op, version, levels), d);
            }
            Action::Release { ranks } => {
                let recovering =
                    self.policy.phase() == Phase::Running && self.policy.summary().recoveries > 0;
                if recovering {
                    self.fire(Step::RecoveryRelease, None, None, None);
                } else {
                    self.fire(Step::CkptRelease, None, None, None);
                }
                for r in ranks {
                    let d = self.rng.gen_range(1..4);
                    self.effect(r, Effect::Release, d);
                }
            }
            Action::Rollback {
                op,
                rank,
                version,
                source,
            } => {
                self.out.rollbacks += 1;
                let d = self.rng.gen_range(4..20);
                self.effect(rank, Effect::Rollback(op, version, source), d);
            }
            Action::Restart(d) => {
                self.record(&d);
                let DecisionKind::Restart {
                    rank,
                    incarnation,
                    node,
                    source,
                    ..
                } = d.kind.clone()
                else {
                    self.fail(&format!("Restart carries {d:?}"));
                };
                if incarnation <= self.decided[rank as usize] {
                    self.fail(&format!(
                        "restart decision {} reuses incarnation {incarnation} of rank {rank} (decided {})",
                        d.id, self.decided[rank as usize]
                    ));
                }
                self.decided[rank as usize] = incarnation;
                self.out.restarts += 1;
                self.out.restart_sources[source.map_or(4, |s| s.level as usize)] += 1;
                let fetch = match source.map(|s| s.level) {
                    Some(Level::L1) | None => self.rng.gen_range(5..15),
                    Some(Level::L2) => self.rng.gen_range(10..30),
                    Some(Level::L3) => self.rng.gen_range(30..60),
                    Some(Level::L4) => self.rng.gen_range(50..120),
                };
                self.fire(
                    Step::RestartDecided,
                    Some(rank),
                    Some(node),
                    source.and_then(|s| s.node),
                );
                // A crash armed mid-fetch strikes half-way.
                if self.armed.iter().any(|a| a.step == Step::RestartMidFetch) {
                    let saved = self.now;
                    self.now += fetch / 2;
                    self.fire(
                        Step::RestartMidFetch,
                        Some(rank),
                        Some(node),
                        source.and_then(|s| s.node),
                    );
                    self.now = saved;
                }
                self.effect(rank, Effect::Restart(d), fetch);
            }
            Action::Record(d) => {
                self.record(&d);
                match &d.kind {
                    DecisionKind::Committed { version, .. } => {
                        self.out.committed += 1;
                        self.fire(Step::CkptCommit, None, None, None);
                        self.commits.push(*version);
                        let keep = self.cfg.keep_commits;
                        if self.commits.len() > keep {
                            self.commits.drain(..self.commits.len() - keep);
                        }
                        let oldest = self.commits[0];
                        self.store.retain(|(_, v), _| *v >= oldest);
                    }
                    DecisionKind::Aborted { version, .. } => {
                        self.out.aborted += 1;
                        let v = *version;
                        self.store.retain(|(_, x), _| *x != v);
                    }
                    _ => {}
                }
            }
            Action::LogEvent(e) => self.fail(&format!("the coordinated policy logged {e:?}")),
            a @ (Action::CaptureRank { .. }
            | Action::TrimLog { .. }
            | Action::KeepFrom { .. }
            | Action::Replay { .. }) => {
                self.fail(&format!("the coordinated policy asked for {a:?}"))
            }
            Action::Notify(n) => {
                if let policies::report::NoticeKind::RecoveryPlanned { restarts, .. } = &n.kind {
                    for g in restarts.iter().filter(|g| !g.spare && g.source.is_some()) {
                        self.out.survivor_placements += g.ranks.len() as u64;
                    }
                }
                self.lines.push(format!("[{:>5} ms] {n}", n.at));
            }
            Action::EndJob { error } => {
                self.done = Some(match error {
                    None => Ok(()),
                    Some(e) => Err(e),
                });
            }
        }
    }

    pub(super) fn apply(&mut self, rank: Rank, e: Effect) {
        let r = rank as usize;
        let proc_alive = |s: &Sim| s.procs[r].filter(|p| s.alive(p.node));
        match e {
            Effect::Hold(op, n) => {
                let Some(p) = proc_alive(self) else { return };
                if p.status == ProcStatus::Exited {
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::SyncFailed {
                            op,
                            reason: format!("rank {rank} exited"),
                        }),
                    );
                    return;
                }
                self.procs[r].as_mut().unwrap().status = ProcStatus::Held;
                // The barrier completes when every rank is held for this op: the last one
                // to be held answers (counted per op).
                let held = self.holds.entry(op).or_default();
                *held += 1;
                if *held == n {
                    self.push(self.now + 1, Ev::Deliver(Event::Synchronized { op }));
                }
            }
            Effect::Capture(op, version, levels) => {
                let Some(p) = proc_alive(self) else { return };
                if p.status != ProcStatus::Held {
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::CaptureFailed {
                            op,
                            rank,
                            version,
                            reason: format!("rank {rank} is not held ({:?})", p.status),
                        }),
                    );
                    return;
                }
                self.fire(Step::CkptCapture(0), Some(rank), None, None);
                if self.rng.gen_bool(0.005) {
                    self.out.capture_failures += 1;
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::CaptureFailed {
                            op,
                            rank,
                            version,
                            reason: "injected: the image write failed".into(),
                        }),
                    );
                    return;
                }
                let set_start = p.node / PARITY_SET * PARITY_SET;
                let parity_set: Vec<NodeId> =
                    (set_start..(set_start + PARITY_SET).min(self.nodes)).collect();
                let holder = (self.nodes >= 2 * PARITY_SET).then(|| {
                    ((set_start / PARITY_SET + 1) * PARITY_SET)
                        % (self.nodes / PARITY_SET * PARITY_SET)
                });
                let bytes = 1 << 20;
                self.store.insert(
                    (rank, version),
                    Img {
                        data: p.state,
                        node: p.node,
                        buddy: self.buddy_of(p.node),
                        parity_set,
                        holder,
                        safe: [true, false, false, false],
                        bytes,
                    },
                );
                self.push(
                    self.now + 1,
                    Ev::Deliver(Event::CaptureDone {
                        op,
                        rank,
                        version,
                        bytes,
                        seconds: 0.005,
                    }),
                );
                self.push(
                    self.now + 1,
                    Ev::Deliver(Event::LevelSafe {
                        rank,
                        version,
                        level: Level::L1,
                    }),
                );
                for l in levels {
                    let d = match l {
                        Level::L1 => continue,
                        Level::L2 => self.rng.gen_range(5..30),
                        Level::L3 => self.rng.gen_range(20..60),
                        Level::L4 => self.rng.gen_range(40..150),
                    };
                    self.push(self.now + d, Ev::Flush(rank, version, l));
                }
            }
            Effect::Release => {
                if let Some(p) = self.procs[r].as_mut() {
                    if p.status == ProcStatus::Held {
                        p.status = ProcStatus::Running;
                    }
                }
            }
            Effect::Rollback(op, version, source) => {
                let registered = self.procs[r].filter(|p| !self.agreed_dead.contains(&p.node));
                if registered.is_none() {
                    let reason = format!("rank {rank} has no process in the view");
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::RollbackFailed { op, rank, reason }),
                    );
                    return;
                }
                let Some(p) = proc_alive(self) else { return };
                if p.status == ProcStatus::Exited {
                    let reason = format!("rank {rank}'s process has exited");
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::RollbackFailed { op, rank, reason }),
                    );
                    return;
                }
                let img = self.store.get(&(rank, version)).cloned();
                let valid = img.as_ref().is_some_and(|i| {
                    copies_of(i, &|n| self.alive(n))
                        .iter()
                        .any(|c| c.level == source.level && c.node == source.node)
                });
                let ev = if valid {
                    let q = self.procs[r].as_mut().unwrap();
                    q.state = img.unwrap().data;
                    q.status = ProcStatus::Held;
                    Event::RollbackDone {
                        op,
                        rank,
                        version,
                        seconds: 0.01,
                    }
                } else {
                    Event::RollbackFailed {
                        op,
                        rank,
                        reason: format!("copy {source} of version {version} is unreachable"),
                    }
                };
                let _ = p;
                self.push(self.now + 1, Ev::Deliver(ev));
            }
            Effect::Restart(d) => {
                let DecisionKind::Restart {
                    incarnation,
                    node,
                    version,
                    source,
                    failure_epoch,
                    ..
                } = d.kind
                else {
                    return;
                };
                if !self.alive(node) {
                    return;
                }
                if self.decided[r] > incarnation {
                    self.log(format!(
                        "rank {rank} incarnation {incarnation} fenced (decided {})",
                        self.decided[r]
                    ));
                    return;
                }
                let state = match (version, source) {
                    (None, _) => Some(initial(rank)),
                    (Some(v), Some(src)) => self.store.get(&(rank, v)).and_then(|i| {
                        copies_of(i, &|n| self.alive(n))
                            .iter()
                            .any(|c| c.level == src.level && c.node == src.node)
                            .then_some(i.data)
                    }),
                    (Some(_), None) => self.fail("a restart from a version names no source"),
                };
                let Some(state) = state else {
                    self.out.restart_failures += 1;
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::RestartFailed {
                            decision: d.id,
                            rank,
                            reason: format!(
                                "copy {} is unreachable",
                                source.map(|s| s.to_string()).unwrap_or_default()
                            ),
                        }),
                    );
                    return;
                };
                self.fire(
                    Step::RestartUp,
                    Some(rank),
                    Some(node),
                    source.and_then(|s| s.node),
                );
                let c = self.created.entry((rank, failure_epoch)).or_default();
                *c += 1;
                if *c > 1 {
                    self.fail(&format!(
                        "rank {rank} brought up twice for the failure of epoch {failure_epoch}"
                    ));
                }
                // Registering the new incarnation ends any older one.
                self.procs[r] = Some(Proc {
                    node,
                    incarnation,
                    status: ProcStatus::Held,
                    state,
                });
                self.table[r] = RankSlot { node, incarnation };
                self.exits.remove(&rank);
                self.push(
                    self.now + 1,
                    Ev::Deliver(Event::RestartDone {
                        decision: d.id,
                        rank,
                        node,
                        seconds: 0.02,
                    }),
                );
            }
        }
    }
}
