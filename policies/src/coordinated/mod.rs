//! The coordinated checkpoint policy.
//!
//! **Checkpoint.** Every interval (fixed, or Daly's from the measured freeze and an MTBF), or
//! on request: record `CheckpointStarted(N)`, synchronize every rank at a safe point, capture
//! every rank as version N to the levels of this checkpoint (cadence: for example L1 and L2
//! every time, L4 every 10th), release the ranks once all are captured, and commit N (record
//! `Committed`) once every rank's image is safe at the commit level (L2 by default) or a more
//! durable one. A capture or barrier failure, a rank's exit or a node failure before the
//! commit aborts N everywhere (record `Aborted`), and the previous commit stays the recovery
//! line.
//!
//! **Recovery.** When a failure takes ranks with it: pick the newest kept commit from which
//! every rank has a valid copy (fastest first, as the store reports them), restart each lost
//! rank as a new process (a recorded decision with a new incarnation) on a spare (all ranks of
//! one failed node on one spare) or, with no spare left, on the least-loaded survivor (if the
//! policy allows it), and roll every surviving rank back in place. Once every rank is back,
//! release them all. A failure during a recovery re-plans it: work already done towards the
//! same version on live nodes is kept, the rest is decided again (new incarnations fence the
//! old decisions). With no commit yet, every rank restarts from the program's start. When no
//! kept commit can be restored, or no node can host a lost rank, the job ends with an error
//! naming what was lost.
//!
//! A recovery is recorded as started (`RecoveryStarted`) before its first decision and as
//! finished (`Recovered`) after the ranks are released.
//!
//! **Leader change.** A new leader builds the policy with [`Coordinated::resume`] from the
//! [`Snapshot`] and, on its first event, settles only what the records leave open: a recovery
//! started and not finished (or a restart decided and never registered) is planned again
//! from the recovery line; a checkpoint started and neither committed nor aborted is aborted,
//! its ranks released and a new one started. Otherwise nothing is rolled back: losing a
//! supervisor that hosts no rank costs the job nothing. Ranks the process table shows as
//! exited count as exited.
use crate::interval;
use crate::policy::{Phase, Policy};
use crate::primitives::{
    AgreedView, Costs, DecisionId, DecisionKind, Epoch, Event, Ids, ImageCopy, Layout, Level,
    Millis, NodeId, OpId, Rank, RankSlot, Reads, RequestSource, Snapshot, Version,
};
use crate::report::{NoticeKind, Summary};
use crate::{Action, PolicyError};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

mod config;
mod drain;
mod recovery;

pub use config::{Config, IntervalChoice, LevelCadence, NoSpare};

#[derive(Clone, Copy, Debug)]
struct Commit {
    version: Version,
    /// When the ranks were released after the capture: work after it is lost on a rollback.
    captured_at: Millis,
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    Syncing,
    Capturing,
    /// Released; waiting for the images to be safe.
    Flushing,
}

#[derive(Debug)]
struct Ckpt {
    version: Version,
    source: RequestSource,
    op: OpId,
    started_at: Millis,
    released_at: Option<Millis>,
    levels: Vec<Level>,
    stage: Stage,
    captured: BTreeSet<Rank>,
    bytes: u64,
    /// Levels safe per rank, and lost per rank.
    safe: BTreeMap<Rank, BTreeSet<Level>>,
    lost: BTreeMap<Rank, BTreeSet<Level>>,
    level_timed: [bool; 4],
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum RankState {
    Rollback {
        op: OpId,
        version: Version,
        source: ImageCopy,
    },
    Restart {
        id: DecisionId,
        node: NodeId,
        version: Option<Version>,
        source: Option<ImageCopy>,
    },
    /// Back at `version` and held.
    Done { version: Option<Version> },
    /// Its restart or rollback failed: it runs nowhere and must be restarted.
    NeedsRestart,
    /// As `NeedsRestart`, and its restart was put off once because every copy left had
    /// failed a fetch: the next plan tries it anyway.
    Deferred,
}

#[derive(Debug)]
struct Recovery {
    epoch: Epoch,
    failed: Vec<NodeId>,
    version: Option<Version>,
    started_at: Millis,
    ranks: BTreeMap<Rank, RankState>,
    restarted: BTreeSet<Rank>,
    rolled_back: BTreeSet<Rank>,
    attempts: BTreeMap<Rank, u32>,
    /// Copies a fetch failed from during this recovery, (rank, level, node): other copies
    /// are preferred.
    suspects: BTreeSet<(Rank, Level, Option<NodeId>)>,
    /// When to plan again the restarts deferred because every copy left had failed a fetch.
    retry_at: Option<Millis>,
}

#[derive(Debug)]
enum State {
    Running,
    Checkpoint(Ckpt),
    Recovery(Recovery),
    Completed,
    Ended,
}

/// The coordinated checkpoint policy (see the module doc).
#[derive(Debug)]
pub struct Coordinated {
    cfg: Config,
    leader: NodeId,
    view: AgreedView,
    slots: Vec<RankSlot>,
    spares: BTreeSet<NodeId>,
    exited: BTreeSet<Rank>,
    commits: VecDeque<Commit>,
    next_version: Version,
    started: u64,
    ids: Ids,
    state: State,
    next_checkpoint_at: Option<Millis>,
    pending_request: Option<RequestSource>,
    costs: Costs,
    summary: Summary,
    /// Work before this instant is not lost by a rollback (the newest recovery or capture).
    progress_mark: Millis,
    /// Set by `resume`: the first event first settles what the previous leader left open.
    takeover: bool,
    /// Set by `resume`: a recovery was recorded as started and not as finished.
    open_recovery: bool,
    /// Set by `resume`: a checkpoint was recorded as started and neither committed nor
    /// aborted.
    open_checkpoint: Option<Version>,
    /// Set by `resume`: a rank had exited with an error (the job ends at takeover).
    exit_failure: Option<(Rank, i32)>,
    /// Set by `resume`: ranks decided for a restart that never registered (they may run
    /// nowhere), restarted again by the first recovery.
    unconfirmed: BTreeSet<Rank>,
    /// The `krun node drain` in progress (see `drain.rs`).
    drain: Option<drain::Drain>,
}

impl Coordinated {
    /// A policy for a job that starts now with `layout`, run by `leader`.
    pub fn new(
        cfg: Config,
        leader: NodeId,
        layout: &Layout,
        view: AgreedView,
        now: Millis,
    ) -> Result<Coordinated, PolicyError> {
        cfg.validate()?;
        if layout.ranks.is_empty() {
            return Err(PolicyError::Config("the job has no rank".into()));
        }
        if let Some((r, n)) = layout
            .ranks
            .iter()
            .enumerate()
            .find(|(_, n)| !view.contains(**n))
        {
            return Err(PolicyError::Config(format!(
                "rank {r} is placed on node {n}, which is not in the view"
            )));
        }
        let slots = layout
            .ranks
            .iter()
            .map(|&node| RankSlot {
                node,
                incarnation: 0,
            })
            .collect();
        let mut p = Coordinated {
            cfg,
            leader,
            view,
            slots,
            spares: layout.spares.iter().copied().collect(),
            exited: BTreeSet::new(),
            commits: VecDeque::new(),
            next_version: 1,
            started: 0,
            ids: Ids::new(leader),
            state: State::Running,
            next_checkpoint_at: None,
            pending_request: None,
            costs: Costs::default(),
            summary: Summary::default(),
            progress_mark: now,
            takeover: false,
            open_recovery: false,
            open_checkpoint: None,
            exit_failure: None,
            unconfirmed: BTreeSet::new(),
            drain: None,
        };
        p.next_checkpoint_at = p.interval_ms().map(|t| now + t);
        Ok(p)
    }

    /// A policy for a new leader, from what the previous one left recorded.
    pub fn resume(
        cfg: Config,
        leader: NodeId,
        snapshot: &Snapshot,
        now: Millis,
    ) -> Result<Coordinated, PolicyError> {
        let layout = Layout {
            ranks: snapshot.ranks.iter().map(|s| s.node).collect(),
            spares: snapshot.spares.clone(),
        };
        // Ranks may sit on failed nodes: build against a view holding them, then set the view.
        let mut all = snapshot.view.nodes.clone();
        all.extend(layout.ranks.iter().copied());
        let mut p = Coordinated::new(
            cfg,
            leader,
            &layout,
            AgreedView::new(snapshot.view.epoch, all),
            now,
        )?;
        p.view = snapshot.view.clone();
        p.slots = snapshot.ranks.clone();
        p.ids = Ids::resuming(leader, snapshot);
        for d in &snapshot.decisions {
            match &d.kind {
                DecisionKind::CheckpointStarted { version } => {
                    p.next_version = p.next_version.max(version + 1);
                    p.open_checkpoint = Some(*version);
                }
                DecisionKind::Aborted { version, .. } => {
                    p.next_version = p.next_version.max(version + 1);
                    p.open_checkpoint = None;
                }
                DecisionKind::RecoveryStarted { .. } => p.open_recovery = true,
                DecisionKind::Recovered { .. } => p.open_recovery = false,
                DecisionKind::Committed { version, .. } => {
                    p.open_checkpoint = None;
                    p.next_version = p.next_version.max(version + 1);
                    p.push_commit(Commit {
                        version: *version,
                        captured_at: now,
                    });
                    p.started += 1;
                }
                DecisionKind::Restart {
                    rank,
                    incarnation,
                    node,
                    ..
                } => {
                    if let Some(slot) = p.slots.get_mut(*rank as usize) {
                        if *incarnation > slot.incarnation {
                            *slot = RankSlot {
                                node: *node,
                                incarnation: *incarnation,
                            };
                            p.unconfirmed.insert(*rank);
                        }
                    }
                }
                DecisionKind::JobEnded { .. } => p.state = State::Ended,
                // A move in flight is an open recovery (planned again by the new leader).
                DecisionKind::DrainStarted { .. } | DecisionKind::Drained { .. } => {}
                // Another policy's records (an uncoordinated policy ran before a swap): its
                // per-rank versions are not reused.
                DecisionKind::RankCheckpointed { version, .. } => {
                    p.next_version = p.next_version.max(version + 1);
                }
                DecisionKind::RecoveryLine { .. } => {}
            }
        }
        for &(rank, code) in &snapshot.exits {
            if (rank as usize) < p.slots.len() {
                if code == 0 {
                    p.exited.insert(rank);
                } else {
                    p.exit_failure = Some((rank, code));
                }
            }
        }
        p.takeover = !matches!(p.state, State::Ended);
        Ok(p)
    }

    /// The ranks' current placement (the process table's view of it).
    pub fn slots(&self) -> &[RankSlot] {
        &self.slots
    }

    fn push_commit(&mut self, c: Commit) {
        self.commits.push_back(c);
        while self.commits.len() > self.cfg.keep_commits {
            self.commits.pop_front();
        }
    }

    pub(super) fn interval_ms(&self) -> Option<Millis> {
        match self.cfg.interval {
            IntervalChoice::Fixed { ms } => Some(ms),
            IntervalChoice::Never => None,
            IntervalChoice::Daly { mtbf_s, initial_ms } => Some(
                self.costs
                    .freeze_seconds
                    .filter(|d| *d > 0.0)
                    .and_then(|d| interval::daly(d, mtbf_s).ok())
                    .map(|t| ((t * 1000.0).round() as Millis).max(1))
                    .unwrap_or(initial_ms),
            ),
        }
    }

    pub(super) fn all_ranks(&self) -> Vec<Rank> {
        (0..self.slots.len() as Rank).collect()
    }

    pub(super) fn end(&mut self, now: Millis, error: PolicyError) -> Vec<Action> {
        self.state = State::Ended;
        self.ids.end_job(self.view.epoch, now, error)
    }

    // ---- checkpoints -------------------------------------------------------------------

    fn start_checkpoint(&mut self, now: Millis) -> Vec<Action> {
        let source = self
            .pending_request
            .take()
            .unwrap_or(RequestSource::Interval);
        self.next_checkpoint_at = None;
        let version = self.next_version;
        self.next_version += 1;
        self.started += 1;
        let k = self.started;
        let levels: Vec<Level> = Level::ALL
            .into_iter()
            .filter(|l| {
                self.cfg
                    .levels
                    .iter()
                    .any(|c| c.level == *l && k.is_multiple_of(u64::from(c.every)))
            })
            .collect();
        let op = self.ids.op();
        let started = self
            .ids
            .decision(self.view.epoch, DecisionKind::CheckpointStarted { version });
        self.state = State::Checkpoint(Ckpt {
            version,
            source,
            op,
            started_at: now,
            released_at: None,
            levels,
            stage: Stage::Syncing,
            captured: BTreeSet::new(),
            bytes: 0,
            safe: BTreeMap::new(),
            lost: BTreeMap::new(),
            level_timed: [false; 4],
        });
        vec![
            Action::Record(started),
            Action::Synchronize {
                op,
                ranks: self.all_ranks(),
            },
        ]
    }

    /// Abandons the checkpoint in flight; releases the ranks if they are held.
    pub(super) fn abort(&mut self, now: Millis, reason: String, release: bool) -> Vec<Action> {
        let State::Checkpoint(c) = std::mem::replace(&mut self.state, State::Running) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if c.released_at.is_none() {
            self.summary.checkpoint_seconds += (now - c.started_at) as f64 / 1000.0;
            if release {
                out.push(Action::Release {
                    ranks: self.all_ranks(),
                });
            }
        }
        self.summary.aborted += 1;
        let d = self.ids.decision(
            self.view.epoch,
            DecisionKind::Aborted {
                version: c.version,
                reason: reason.clone(),
            },
        );
        out.push(Action::Record(d));
        out.push(Action::notice(
            now,
            NoticeKind::CheckpointAborted {
                version: c.version,
                reason,
                recovery_line: self.recovery_line(),
            },
        ));
        self.next_checkpoint_at = self.interval_ms().map(|t| now + t);
        out
    }

    fn on_captured(&mut self, now: Millis) -> Vec<Action> {
        let n = self.slots.len();
        let all = self.all_ranks();
        let State::Checkpoint(c) = &mut self.state else {
            return Vec::new();
        };
        if c.stage != Stage::Capturing || c.captured.len() < n {
            return Vec::new();
        }
        c.stage = Stage::Flushing;
        c.released_at = Some(now);
        let freeze = (now - c.started_at) as f64 / 1000.0;
        self.costs.observe_freeze(freeze);
        self.summary.checkpoint_seconds += freeze;
        let mut out = vec![Action::Release { ranks: all }];
        out.extend(self.try_commit(now));
        out
    }

    /// Commits the checkpoint in flight if every image is safe at the commit level; aborts
    /// it if some rank can no longer get there.
    fn try_commit(&mut self, now: Millis) -> Vec<Action> {
        let n = self.slots.len();
        let want = self.cfg.commit_level;
        let State::Checkpoint(c) = &mut self.state else {
            return Vec::new();
        };
        for l in Level::ALL {
            let i = l as usize;
            if !c.level_timed[i] && c.safe.len() == n && c.safe.values().all(|s| s.contains(&l)) {
                c.level_timed[i] = true;
                self.costs
                    .observe_level(l, (now - c.started_at) as f64 / 1000.0);
            }
        }
        let safe_at =
            |s: Option<&BTreeSet<Level>>| s.is_some_and(|s| s.iter().any(|l| l.covers(want)));
        let hopeless = (0..n as Rank).find(|r| {
            !safe_at(c.safe.get(r))
                && c.levels
                    .iter()
                    .filter(|l| l.covers(want))
                    .all(|l| c.lost.get(r).is_some_and(|x| x.contains(l)))
        });
        if let Some(r) = hopeless {
            let reason = format!("rank {r}'s image cannot be made safe at {want}");
            return self.abort(now, reason, true);
        }
        if c.stage != Stage::Flushing || !(0..n as Rank).all(|r| safe_at(c.safe.get(&r))) {
            return Vec::new();
        }
        let source = c.source;
        let (version, bytes, started_at, released_at) = (
            c.version,
            c.bytes,
            c.started_at,
            c.released_at.unwrap_or(now),
        );
        let freeze = (released_at - started_at) as f64 / 1000.0;
        self.state = State::Running;
        self.push_commit(Commit {
            version,
            captured_at: released_at,
        });
        self.progress_mark = self.progress_mark.max(released_at);
        self.summary.checkpoints += 1;
        self.summary.checkpoint_bytes += bytes;
        let d = self.ids.decision(
            self.view.epoch,
            DecisionKind::Committed {
                version,
                level: want,
            },
        );
        self.next_checkpoint_at = if self.pending_request.is_some() {
            Some(now)
        } else {
            self.interval_ms().map(|t| released_at + t)
        };
        vec![
            Action::Record(d),
            Action::notice(
                now,
                NoticeKind::CheckpointCommitted {
                    version,
                    source,
                    level: want,
                    ranks: n as u32,
                    bytes,
                    freeze_seconds: freeze,
                    seconds: (now - started_at) as f64 / 1000.0,
                },
            ),
        ]
    }

    fn on_exit(&mut self, now: Millis, rank: Rank, code: i32) -> Vec<Action> {
        if (rank as usize) >= self.slots.len()
            || matches!(self.state, State::Completed | State::Ended)
        {
            return Vec::new();
        }
        if code != 0 {
            return self.end(now, PolicyError::RankFailed { rank, code });
        }
        self.exited.insert(rank);
        self.next_checkpoint_at = None;
        let mut out = Vec::new();
        if let State::Checkpoint(c) = &self.state {
            if !c.captured.contains(&rank) || c.stage == Stage::Flushing {
                let reason = format!("rank {rank} exited");
                out.extend(self.abort(now, reason, true));
                self.next_checkpoint_at = None;
            }
        }
        out.extend(self.maybe_complete(now));
        out
    }

    /// Ends the job as completed once every rank exited by itself.
    pub(super) fn maybe_complete(&mut self, now: Millis) -> Vec<Action> {
        if self.exited.len() < self.slots.len() || !matches!(self.state, State::Running) {
            return Vec::new();
        }
        self.state = State::Completed;
        self.next_checkpoint_at = None;
        let d = self
            .ids
            .decision(self.view.epoch, DecisionKind::JobEnded { error: None });
        vec![
            Action::Record(d),
            Action::notice(now, NoticeKind::JobCompleted),
            Action::EndJob { error: None },
        ]
    }

    fn maybe_start(&mut self, now: Millis) -> Vec<Action> {
        if !matches!(self.state, State::Running) || !self.exited.is_empty() {
            return Vec::new();
        }
        let due = self.next_checkpoint_at.is_some_and(|t| t <= now);
        if due || self.pending_request.is_some() {
            self.start_checkpoint(now)
        } else {
            Vec::new()
        }
    }
}

impl Policy for Coordinated {
    fn name(&self) -> &'static str {
        "coordinated"
    }

    fn on_event(&mut self, now: Millis, event: Event, reads: &dyn Reads) -> Vec<Action> {
        if matches!(self.state, State::Completed | State::Ended) {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.takeover {
            let mut failed = Vec::new();
            if let Event::FailureAgreed {
                view, failed: f, ..
            } = &event
            {
                if view.epoch >= self.view.epoch {
                    self.view = view.clone();
                }
                failed = f
                    .iter()
                    .copied()
                    .filter(|n| !self.view.contains(*n))
                    .collect();
            }
            out.extend(self.take_over(now, failed, reads));
            if matches!(self.state, State::Ended) {
                return out;
            }
        }
        out.extend(match event {
            Event::Tick => match &mut self.state {
                State::Recovery(rec) if rec.retry_at.is_some_and(|t| t <= now) => {
                    rec.retry_at = None;
                    let epoch = rec.epoch;
                    self.recover(now, epoch, Vec::new(), reads)
                }
                _ => Vec::new(),
            },
            Event::CheckpointRequest { source } => {
                if !matches!(self.state, State::Checkpoint(_)) {
                    self.pending_request = Some(source);
                }
                Vec::new()
            }
            Event::FailureAgreed {
                epoch,
                failed,
                view,
            } => self.on_failure(now, epoch, failed, view, reads),
            Event::NodeJoined { epoch, node, view } => {
                if view.epoch >= self.view.epoch {
                    self.view = view;
                }
                if self.view.contains(node) && !self.slots.iter().any(|s| s.node == node) {
                    self.spares.insert(node);
                }
                vec![Action::notice(now, NoticeKind::NodeJoined { epoch, node })]
            }
            Event::Synchronized { op } => match &mut self.state {
                State::Checkpoint(c) if c.op == op && c.stage == Stage::Syncing => {
                    c.stage = Stage::Capturing;
                    let (version, levels) = (c.version, c.levels.clone());
                    (0..self.slots.len() as Rank)
                        .map(|rank| Action::Capture {
                            op,
                            rank,
                            version,
                            levels: levels.clone(),
                        })
                        .collect()
                }
                _ => Vec::new(),
            },
            Event::SyncFailed { op, reason } => match &self.state {
                State::Checkpoint(c) if c.op == op => {
                    self.abort(now, format!("the barrier failed: {reason}"), true)
                }
                _ => Vec::new(),
            },
            Event::CaptureDone {
                op,
                rank,
                version,
                bytes,
                ..
            } => match &mut self.state {
                State::Checkpoint(c)
                    if c.op == op && c.version == version && c.stage == Stage::Capturing =>
                {
                    if c.captured.insert(rank) {
                        c.bytes += bytes;
                    }
                    self.on_captured(now)
                }
                _ => Vec::new(),
            },
            Event::CaptureFailed {
                op,
                rank,
                version,
                reason,
            } => match &self.state {
                State::Checkpoint(c) if c.op == op && c.version == version => self.abort(
                    now,
                    format!("capture of rank {rank} failed: {reason}"),
                    true,
                ),
                _ => Vec::new(),
            },
            Event::LevelSafe {
                rank,
                version,
                level,
            } => match &mut self.state {
                State::Checkpoint(c) if c.version == version => {
                    c.safe.entry(rank).or_default().insert(level);
                    self.try_commit(now)
                }
                _ => Vec::new(),
            },
            Event::LevelLost {
                rank,
                version,
                level,
            } => match &mut self.state {
                State::Checkpoint(c) if c.version == version => {
                    c.lost.entry(rank).or_default().insert(level);
                    if let Some(s) = c.safe.get_mut(&rank) {
                        s.remove(&level);
                    }
                    self.try_commit(now)
                }
                _ => Vec::new(),
            },
            Event::RestartDone {
                decision,
                rank,
                seconds,
                ..
            } => self.on_restart_result(now, decision, rank, Ok(seconds), reads),
            Event::RestartFailed {
                decision,
                rank,
                reason,
            } => self.on_restart_result(now, decision, rank, Err(reason), reads),
            Event::RollbackDone {
                op, rank, version, ..
            } => self.on_rollback_result(now, op, rank, Ok(version), reads),
            Event::RollbackFailed { op, rank, reason } => {
                self.on_rollback_result(now, op, rank, Err(reason), reads)
            }
            Event::RankExited { rank, code, .. } => self.on_exit(now, rank, code),
            Event::DrainRequested { node, view } => self.on_drain_request(now, node, view),
            // The coordinated policy needs no dependency information.
            // Before its first commit every rank restarts from the start in a new wiring
            // epoch anyway: the wiring's progress changes nothing here.
            Event::Logged { .. } | Event::RankReady { .. } => Vec::new(),
        });
        out.extend(self.maybe_start(now));
        self.drain_follow(now, &mut out, reads);
        out
    }

    fn next_deadline(&self) -> Option<Millis> {
        match self.state {
            State::Running if self.exited.is_empty() => self.next_checkpoint_at,
            State::Recovery(ref rec) => rec.retry_at,
            _ => None,
        }
    }

    fn phase(&self) -> Phase {
        match self.state {
            State::Running => Phase::Running,
            State::Checkpoint(_) => Phase::Checkpointing,
            State::Recovery(_) => Phase::Recovering,
            State::Completed => Phase::Completed,
            State::Ended => Phase::Ended,
        }
    }

    fn recovery_line(&self) -> Option<Version> {
        self.commits.back().map(|c| c.version)
    }

    fn costs(&self) -> &Costs {
        &self.costs
    }

    fn summary(&self) -> Summary {
        self.summary.clone()
    }
}
