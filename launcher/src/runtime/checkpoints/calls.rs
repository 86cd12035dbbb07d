//! The hub's side of the policy's primitive calls ([`HubCalls`]): each call becomes a
//! command to the krund nodes (the table in the parent module's documentation), and a
//! recovery plan becomes one wiring epoch and one `Restart` order per node.

use super::*;

/// How long every node has to answer `Opened` to a barrier before it fails; a node not yet
/// linked to krun when the barrier starts (a krund slow to start under CPU load) has this
/// long to link and open it too.
pub(super) const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// The policy's copies index: what the nodes reported safe, per level: the node holding
/// the copy when known (L1: the rank's node; L2: the buddy the copy landed on; L3: the
/// node keeping the parity that covers it; L4: none, a disk directory) and the image's
/// size. The policy leaves out copies on nodes no longer in the view, so a rank whose node
/// and buddy are both lost is planned from L3 (from its parity holder) by name.
#[derive(Default)]
pub(super) struct Copies(pub(super) BTreeMap<(Rank, Version), LevelCopies>);

/// Per level: the node holding the copy (if known) and the image's bytes.
pub(super) type LevelCopies = BTreeMap<Level, (Option<NodeId>, u64)>;

impl Reads for Copies {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        self.0
            .get(&(rank, version))
            .map(|ls| {
                ls.iter()
                    .map(|(&level, &(node, bytes))| ImageCopy { level, node, bytes })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Copies {
    /// `rank`'s `version` is safe at `level` on `node`: a later report with a node (an L2
    /// copy sent again to a new buddy) moves the copy there.
    pub(super) fn add(&mut self, rank: Rank, version: Version, level: Level, node: Option<NodeId>) {
        let levels = self.0.entry((rank, version)).or_default();
        let bytes = levels.values().map(|c| c.1).max().unwrap_or(0);
        let copy = levels.entry(level).or_insert((node, bytes));
        if node.is_some() {
            copy.0 = node;
        }
    }

    pub(super) fn set_bytes(&mut self, rank: Rank, version: Version, bytes: u64) {
        for c in self.0.entry((rank, version)).or_default().values_mut() {
            c.1 = bytes;
        }
    }
}

/// What a rank of a recovery plan becomes: the answer the policy waits for.
#[derive(Clone, Copy, Debug)]
pub(super) enum Planned {
    Restart(policies::primitives::DecisionId),
    Rollback(OpId, Version),
}

/// A recovery being carried out: one wiring epoch.
pub(super) struct Wiring {
    pub(super) epoch: u64,
    pub(super) bootstrap: String,
    /// The checkpointer's version restored (`None`: the program's start).
    pub(super) native: Option<u64>,
    /// rank -> (node, what the policy waits for).
    pub(super) ranks: BTreeMap<Rank, (NodeId, Planned)>,
}

/// Opens the ranks' next address all-gather (a bootstrap service for the job's size);
/// returns where the ranks reach it.
pub type NewWiring = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Why the job cannot continue, once the policy says so (krun then ends it).
pub type JobError = Arc<std::sync::Mutex<Option<String>>>;

pub(super) fn level_of(n: u8) -> Option<Level> {
    match n {
        1 => Some(Level::L1),
        2 => Some(Level::L2),
        3 => Some(Level::L3),
        4 => Some(Level::L4),
        _ => None,
    }
}

/// The hub's side of the policy's calls.
pub(super) struct HubCalls {
    pub(super) send: Broadcast,
    /// Nodes that run ranks, still in the job.
    pub(super) nodes: BTreeSet<NodeId>,
    pub(super) log: Option<PathBuf>,
    /// The barrier in progress: its op and the nodes that answered `Held`.
    pub(super) barrier: Option<(OpId, BTreeSet<NodeId>)>,
    /// The nodes that answered `Opened` for the barrier in progress, whether `Wake` went out
    /// (once all of them opened), and when the barrier started.
    pub(super) opened: (BTreeSet<NodeId>, bool, Instant),
    /// The nodes with ranks that were not linked to krun when the barrier in progress
    /// started: it waits for them (up to [`OPEN_TIMEOUT`]) and goes out again to everyone
    /// as each one links (`Register`).
    pub(super) linking: BTreeSet<NodeId>,
    /// The op whose capture was ordered, with the checkpointer's version and when.
    pub(super) capturing: Option<(OpId, Version, u64, Instant)>,
    /// The checkpointer's newest version seen.
    pub(super) native_newest: u64,
    /// native version -> policy version.
    pub(super) versions: BTreeMap<u64, Version>,
    /// The job cannot go on (the policy ended it), or a node with ranks failed in a job
    /// that does not recover: no more checkpoints.
    pub(super) stopped: bool,
    /// Recoveries are driven (the job has spares or checkpoints on an interval); else a
    /// lost node only stops the checkpoints and the job goes on with what is left.
    pub(super) recover: bool,
    /// rank -> node it runs on now.
    pub(super) placement: Vec<NodeId>,
    /// Restarts and rollbacks the policy asked for in the current `handle` call.
    pub(super) plan: Vec<(Rank, NodeId, Planned, Option<Version>)>,
    /// The recovery in progress.
    pub(super) wiring: Option<Wiring>,
    pub(super) wirings: u64,
    /// Lone restarts (`Rejoin`) ordered so far in the job, under any policy instance: each
    /// `Rejoin` carries the next number, so krund can drop an order a newer one supersedes
    /// (`runtime/uncoordinated.rs`), also across policy swaps.
    pub(super) rejoin_ids: u64,
    pub(super) new_wiring: NewWiring,
    pub(super) job_error: JobError,
    /// Checkpoints committed so far.
    pub(super) commits: Arc<AtomicU64>,
    /// Where `--inject-failure node=N@ckptK:capture` and the like stop the policy.
    pub(super) phases: PhaseGate,
    /// Who waits for the drain in progress (`runtime/drain.rs`).
    pub(super) drain: super::super::drain::DrainWaiter,
    /// The recovery in progress, shown to the user: ranks restored of those planned.
    pub(super) recovery_bar: Option<crate::progress::Progress>,
    /// The checkpoint being flushed to the commit level, shown to the user.
    pub(super) flush_bar: Option<super::flush_bar::FlushBar>,
    /// The level a checkpoint commits at.
    pub(super) commit_level: Level,
    /// Every decision recorded, in order (a swapped-in policy resumes from them).
    pub(super) decisions: Vec<Decision>,
    /// The newest agreed view.
    pub(super) view: AgreedView,
    /// The spares the job started with.
    pub(super) spares: Vec<NodeId>,
    /// A swap is settling: the new policy's "runs the policy from epoch" line is not shown.
    pub(super) quiet_takeover: bool,
    /// The uncoordinated policy's state (`None`: the job runs a coordinated policy).
    pub(super) uncoord: Option<super::uncoordinated::Uncoord>,
    /// A swap to the uncoordinated policy (`swap.rs`): `Some(None)` while its cut is
    /// awaited (the next capture is released as `Switch`), `Some(Some(v))` once checkpoint
    /// `v` was released so.
    pub(super) switch_cut: Option<Option<Version>>,
    /// The ranks' message-log cards sent at that cut, before the policy is in force.
    pub(super) early_cards: BTreeMap<Rank, super::uncoordinated::Card>,
}

impl PolicyRuntime for HubCalls {
    fn record(&mut self, decision: &Decision) -> Result<(), String> {
        self.decisions.push(decision.clone());
        if matches!(
            decision.kind,
            policies::primitives::DecisionKind::Committed { .. }
        ) {
            self.commits.fetch_add(1, Ordering::SeqCst);
        }
        if let policies::primitives::DecisionKind::RankCheckpointed { rank, .. } = decision.kind {
            super::uncoordinated::checkpointed(self, rank);
        }
        super::uncoordinated::recorded(self, &decision.kind);
        if let policies::primitives::DecisionKind::Restart {
            rank,
            incarnation,
            node,
            version,
            failure_epoch,
            ..
        } = decision.kind
        {
            // Into the rank's process-table row too, by the node that carries it out.
            let id = decision.id;
            let line = version.map_or("the program's start".to_string(), |v| {
                format!("checkpoint {v}")
            });
            (self.send)(&LauncherToNode::Decided {
                rank,
                node,
                decision: format!(
                    "decision {}/{}/{}: restart on node {node} from {line} as incarnation \
                     {incarnation} (failure agreed at epoch {failure_epoch})",
                    id.epoch, id.leader, id.seq
                ),
            });
        }
        let Some(path) = &self.log else {
            return Ok(());
        };
        let line = format!("{:?} {:?}\n", decision.id, decision.kind);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn barrier(&mut self, op: OpId, _ranks: &[Rank]) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no node runs ranks".into());
        }
        self.phases.reached(Phase::CheckpointBarrier);
        let sent = (self.send)(&LauncherToNode::Barrier { op: op.seq });
        self.barrier = Some((op, BTreeSet::new()));
        self.opened = (BTreeSet::new(), false, Instant::now());
        // Not every node is up yet (a krund slow to link under load): the barrier waits for
        // them, bounded by `OPEN_TIMEOUT` like a node that does not open it; a node that
        // dies meanwhile is a failure, which ends the barrier (`translate.rs`).
        self.linking = self.nodes.difference(&sent).copied().collect();
        if !self.linking.is_empty() {
            crate::progress::line(&format!(
                "krun: the checkpoint barrier waits for nodes {:?} to link to krun (at most \
                 {OPEN_TIMEOUT:?})",
                self.linking.iter().collect::<Vec<_>>()
            ));
        }
        Ok(())
    }

    fn release(&mut self, _ranks: &[Rank]) {
        // After a capture the ranks went on by themselves (the checkpoint is collective).
        if self.barrier.take().is_some() {
            (self.send)(&LauncherToNode::Release {
                order: SafepointOrder::Continue,
            });
        }
    }

    fn capture(
        &mut self,
        op: OpId,
        _rank: Rank,
        version: Version,
        _levels: &[Level],
    ) -> Result<(), String> {
        if self.capturing.is_some_and(|(o, ..)| o == op) {
            return Ok(());
        }
        let native = self.native_newest + 1;
        self.versions.insert(native, version);
        self.capturing = Some((op, version, native, Instant::now()));
        if let Some(old) = self.flush_bar.take() {
            old.finish();
        }
        self.flush_bar = super::flush_bar::FlushBar::start(
            crate::progress::Mode::for_stderr(),
            version,
            self.commit_level,
            self.placement.len(),
        );
        self.barrier = None;
        self.phases.reached(Phase::CheckpointCapture);
        let order = if self.switch_cut == Some(None) {
            // The swap's cut: every rank runs uncoordinated with logging from it.
            self.switch_cut = Some(Some(version));
            self.early_cards.clear();
            SafepointOrder::Switch { version: native }
        } else {
            SafepointOrder::Checkpoint { version: native }
        };
        (self.send)(&LauncherToNode::Release { order });
        Ok(())
    }

    /// Staging happens on the node that restarts the rank (it reads the chain from the
    /// store as part of the restart: `runtime/recovery.rs`).
    fn fetch(
        &mut self,
        rank: Rank,
        version: Version,
        _source: ImageCopy,
        _to: Option<NodeId>,
    ) -> Result<(), String> {
        if self.uncoord.is_some() {
            return super::uncoordinated::fetch(self, rank, version);
        }
        self.native_of(version)
            .map(drop)
            .ok_or_else(|| format!("rank {rank}: checkpoint {version} was never taken here"))
    }

    fn restart(&mut self, decision: &Decision) -> Result<(), String> {
        if self.uncoord.as_ref().is_some_and(|u| u.logging) {
            // Alone, rejoining the running ranks (`uncoordinated.rs`).
            return super::uncoordinated::restart(self, decision);
        }
        let policies::primitives::DecisionKind::Restart {
            rank,
            node,
            version,
            ..
        } = decision.kind
        else {
            return Err("not a restart decision".into());
        };
        self.plan
            .push((rank, node, Planned::Restart(decision.id), version));
        Ok(())
    }

    fn rollback(&mut self, op: OpId, rank: Rank, version: Version) -> Result<(), String> {
        if self.uncoord.as_ref().is_some_and(|u| u.logging) {
            return Err(format!(
                "rank {rank}: with message logging no rank rolls back (only lost ranks \
                 restart and replay)"
            ));
        }
        let node = *self
            .placement
            .get(rank as usize)
            .ok_or_else(|| format!("rank {rank} is not a rank of this job"))?;
        self.plan
            .push((rank, node, Planned::Rollback(op, version), Some(version)));
        (self.send)(&LauncherToNode::Decided {
            rank,
            node,
            decision: format!(
                "decision op {}/{}: roll back in place to checkpoint {version}",
                op.leader, op.seq
            ),
        });
        Ok(())
    }

    fn capture_rank(
        &mut self,
        op: OpId,
        rank: Rank,
        version: Version,
        _levels: &[Level],
    ) -> Result<(), String> {
        super::uncoordinated::capture_rank(self, op, rank, version)
    }

    fn trim_log(&mut self, rank: Rank, version: Version) {
        super::uncoordinated::trim_log(self, rank, version);
    }

    fn keep_from(&mut self, rank: Rank, version: Version) {
        super::uncoordinated::keep_from(self, rank, version);
    }

    fn replay(&mut self, rank: Rank, _version: Option<Version>) -> Result<(), String> {
        super::uncoordinated::replay(self, rank)
    }

    fn notify(&mut self, notice: &Notice) {
        if self.quiet_takeover && matches!(notice.kind, NoticeKind::Takeover { .. }) {
            return;
        }
        crate::progress::line(&format!("krun: {notice}"));
        match &notice.kind {
            NoticeKind::RecoveryPlanned {
                restarts,
                rollbacks,
                ..
            } => {
                // A checkpoint being flushed is given up by the recovery.
                if let Some(bar) = self.flush_bar.take() {
                    bar.finish();
                }
                let n = restarts.iter().map(|g| g.ranks.len()).sum::<usize>() + rollbacks.len();
                self.recovery_bar = Some(crate::progress::Progress::bar(
                    crate::progress::Mode::for_stderr(),
                    n as u64,
                    "recovery: ranks restored",
                ));
            }
            NoticeKind::Recovered { .. } | NoticeKind::JobEnded { .. } => {
                if let Some(bar) = self.recovery_bar.take() {
                    bar.finish(None);
                }
                if let Some(bar) = self.flush_bar.take() {
                    bar.finish();
                }
            }
            NoticeKind::CheckpointCommitted { .. } | NoticeKind::CheckpointAborted { .. } => {
                if let Some(bar) = self.flush_bar.take() {
                    bar.finish();
                }
            }
            _ => {}
        }
        self.drain.notice(notice);
    }

    fn end_job(&mut self, error: Option<&PolicyError>) {
        self.drain.job_over();
        if let Some(e) = error {
            eprintln!("krun: the checkpoint policy ended the job: {e}");
            self.stopped = true;
            *self.job_error.lock().expect("job error lock") = Some(e.to_string());
        }
    }
}

impl HubCalls {
    /// Node `node` linked to krun: a barrier waiting for it goes out again (to every node:
    /// those that opened it already open it again and answer once more, which is harmless).
    pub(super) fn linked(&mut self, node: NodeId) {
        let Some((op, _)) = &self.barrier else {
            return;
        };
        if !self.linking.remove(&node) || self.opened.1 {
            return;
        }
        let op = op.seq;
        crate::progress::line(&format!(
            "krun: node {node} linked to krun; the checkpoint barrier goes out to it"
        ));
        let sent = (self.send)(&LauncherToNode::Barrier { op });
        self.linking = self.nodes.difference(&sent).copied().collect();
    }

    /// The checkpointer's version of the policy's `version`.
    pub(super) fn native_of(&self, version: Version) -> Option<u64> {
        self.versions
            .iter()
            .find(|(_, &v)| v == version)
            .map(|(&n, _)| n)
    }

    /// Carries out the restarts and rollbacks the policy asked for: a new wiring epoch when
    /// every rank restarts (a new failure), else the ranks retried join the current one.
    /// Returns the policy's answers to calls that could not even be sent.
    pub(super) fn execute_plan(&mut self) -> Vec<Event> {
        if self.plan.is_empty() {
            return Vec::new();
        }
        if self.uncoord.is_some() {
            // Per-rank versions of a recovery line (`uncoordinated.rs`).
            return super::uncoordinated::execute_line(self);
        }
        let plan = std::mem::take(&mut self.plan);
        let version = plan.iter().find_map(|p| p.3);
        let native = version.and_then(|v| self.native_of(v));
        let fail_all = |why: String| -> Vec<Event> {
            plan.iter()
                .map(|&(rank, _, planned, _)| match planned {
                    Planned::Restart(decision) => Event::RestartFailed {
                        decision,
                        rank,
                        reason: why.clone(),
                    },
                    Planned::Rollback(op, _) => Event::RollbackFailed {
                        op,
                        rank,
                        reason: why.clone(),
                    },
                })
                .collect()
        };
        if version.is_some() && native.is_none() {
            return fail_all("the recovery line was never taken by the checkpointer".into());
        }
        let everyone = plan.len() == self.placement.len();
        let new_epoch = everyone || self.wiring.is_none();
        if new_epoch {
            let bootstrap = match (self.new_wiring)() {
                Ok(b) => b,
                Err(e) => return fail_all(format!("no address all-gather for the ranks: {e}")),
            };
            self.wirings += 1;
            self.wiring = Some(Wiring {
                epoch: self.wirings,
                bootstrap,
                native,
                ranks: BTreeMap::new(),
            });
        }
        let w = self.wiring.as_mut().expect("wiring set above");
        w.native = native;
        for &(rank, node, planned, _) in &plan {
            w.ranks.insert(rank, (node, planned));
            if let Some(slot) = self.placement.get_mut(rank as usize) {
                *slot = node;
            }
        }
        self.nodes = self.placement.iter().copied().collect();
        // Checkpoints newer than the line were never committed: the checkpointer numbers
        // on from the line.
        if let Some(n) = native {
            self.native_newest = n;
            self.versions.retain(|&k, _| k <= n);
        } else {
            self.native_newest = 0;
            self.versions.clear();
        }
        self.barrier = None;
        self.capturing = None;
        let moved: Vec<Rank> = plan
            .iter()
            .filter(|p| matches!(p.2, Planned::Restart(_)))
            .map(|p| p.0)
            .collect();
        let in_place: Vec<Rank> = plan
            .iter()
            .filter(|p| matches!(p.2, Planned::Rollback(..)))
            .map(|p| p.0)
            .collect();
        let line = match native {
            Some(n) => format!("checkpoint {} (checkpointer v{n})", version.unwrap_or(0)),
            None => "the program's start".into(),
        };
        let mut parts = Vec::new();
        if !moved.is_empty() {
            parts.push(format!(
                "{} start as new processes from {line}",
                policies::primitives::ranks_phrase(&moved)
            ));
        }
        if !in_place.is_empty() {
            parts.push(format!(
                "{} roll back inside their live processes (each re-executes in place, same \
                 pid, from its own images of {line}; an MPI job's ranks restart as new \
                 processes from them instead)",
                policies::primitives::ranks_phrase(&in_place)
            ));
        }
        eprintln!(
            "krun: wiring epoch {}: {}; every rank swaps its new address through {}",
            w.epoch,
            parts.join("; "),
            w.bootstrap
        );
        // Ranks held in an open barrier are not coming back: the nodes' gates start afresh.
        (self.send)(&LauncherToNode::Release {
            order: SafepointOrder::Abort("a recovery restarts the ranks".into()),
        });
        let order_epoch = w.epoch;
        let order = LauncherToNode::Restart {
            wiring: w.epoch,
            bootstrap: w.bootstrap.clone(),
            version: native,
            ranks: plan.iter().map(|p| (p.0, p.1)).collect(),
        };
        let sent = (self.send)(&order);
        // The nodes' stores re-form buddies and parity sets among the nodes left, with the
        // ranks where they run now (`runtime/store_node.rs`): the next buddy pair lost is
        // rebuilt from parity again.
        // A node being drained is about to leave: it holds no copy of the new placement.
        let leaving = self.drain.draining();
        (self.send)(&LauncherToNode::Reform {
            wiring: order_epoch,
            members: self
                .view
                .nodes
                .iter()
                .copied()
                .filter(|&n| Some(n) != leaving)
                .collect(),
            ranks: self
                .placement
                .iter()
                .enumerate()
                .map(|(r, &n)| (r as Rank, n))
                .collect(),
        });
        if new_epoch {
            self.phases.reached(Phase::Recovery);
        }
        let missing: BTreeSet<NodeId> = plan
            .iter()
            .map(|p| p.1)
            .filter(|n| !sent.contains(n))
            .collect();
        if missing.is_empty() {
            return Vec::new();
        }
        plan.iter()
            .filter(|p| missing.contains(&p.1))
            .map(|&(rank, node, planned, _)| {
                let reason = format!("node {node} is not linked to krun");
                match planned {
                    Planned::Restart(decision) => Event::RestartFailed {
                        decision,
                        rank,
                        reason,
                    },
                    Planned::Rollback(op, _) => Event::RollbackFailed { op, rank, reason },
                }
            })
            .collect()
    }
}
