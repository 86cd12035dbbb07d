//! The uncoordinated checkpoint policy, with or without sender-based message logging.
//!
//! **Checkpoints.** Each rank checkpoints on its own schedule: every `interval` (per rank,
//! optionally staggered so that the ranks do not checkpoint together), or on request. The
//! policy orders [`Action::CaptureRank`]: the rank takes its own image at its next safe point
//! and goes on; no other rank waits (no [`Action::Synchronize`]). A rank's checkpoint counts
//! once its image is safe at the safe level (L2 by default): recorded as
//! [`DecisionKind::RankCheckpointed`]; with logging, [`Action::TrimLog`] then lets the
//! senders drop the payloads the rank delivered before it (and its buddy the determinants).
//!
//! **Dependencies.** The runtime reports the ranks' communication as [`Event::Logged`]:
//! each send (the payload held in the sender's log) and each delivery (sender, sequence
//! number, receive order, and both sides' checkpoint intervals). They feed the log's index
//! ([`log`]) and, without logging, the dependency graph ([`recovery_line`]).
//!
//! **Recovery with logging.** Only the lost ranks restart (on a spare, as the coordinated
//! policy places them) from their own newest usable checkpoint, then [`Action::Replay`]:
//! the survivors resend what they logged for them, taken in the recorded order; the
//! restarted ranks' repeated sends are suppressed. Survivors are never rolled back.
//!
//! **Recovery without logging.** The recovery line is computed from the dependency graph
//! (rollback propagation, Wang's rollback-dependency graph): the lost ranks restart from
//! their newest usable checkpoint, and exactly the survivors the line names roll back (in
//! place, [`Action::Rollback`]) to the checkpoint it names; the others keep running. The
//! rollback depth (the most checkpoints one rank rolled back past: the domino effect) is in
//! the [`NoticeKind::RecoveryLine`] and in [`Uncoordinated::max_depth`].
//!
//! When the runtime reports each checkpoint's channel counts ([`LoggedEvent::Channels`], as
//! krun does), the line without logging is the transitless one
//! ([`recovery_line::transitless_line`]): no orphan and no message in transit on any
//! channel, every rank restored (a rank kept running would have to resend what the line
//! says its peers have not received yet, which nobody kept). Without counts (the
//! simulations), the orphan-free line of the dependency graph is used and in-transit
//! messages are assumed resent.
//!
//! **Before the job's wiring finished** (not every rank reported [`Event::RankReady`]: some
//! rank is still inside its first `krun_init`, swapping addresses with the others), a lost
//! rank breaks the exchange for the ranks waiting in it, and no rank has delivered a
//! message or checkpointed: nobody can keep running and nobody can be rejoined. The
//! recovery line then names every rank from its start, marked `rewire`
//! ([`DecisionKind::RecoveryLine`]): the lost ranks restart on a spare, the others in
//! place, and all of them swap their addresses again in one new wiring epoch (what the
//! coordinated policy does before its first commit), with or without logging. The wiring
//! counts as finished once every rank reported ready (or took an own checkpoint, or
//! exited); a takeover ([`Uncoordinated::resume`]) starts wired.
//!
//! **Drains** ([`drain`], with logging): the node's ranks take fresh own checkpoints, then
//! restart alone elsewhere from them as after the node's failure; nobody else stops.
//!
//! **Taking over a running job** ([`Uncoordinated::resume`], `krun policy load` from the
//! coordinated policy): at a committed coordinated checkpoint `V` (the swap's cut), every
//! rank's image of `V` is its first safe checkpoint: a rank lost before its next own one
//! restarts from `V` (the rank library started logging at that cut, so the image holds an
//! empty log). Versions go on above every version recorded, so none is reused. Not
//! covered: a new leader taking over this policy with its own checkpoints in the records.
use crate::interval;
use crate::policy::{Phase, Policy};
use crate::primitives::{
    AgreedView, Costs, DecisionId, DecisionKind, Event, Ids, Layout, Level, LoggedEvent, Millis,
    NodeId, OpId, Rank, RankSlot, Reads, Snapshot, Version,
};
use crate::report::{NoticeKind, Summary};
use crate::{Action, PolicyError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

mod drain;
pub mod log;
mod recovery;
pub mod recovery_line;
mod schedule;

pub use crate::coordinated::{IntervalChoice, NoSpare};
pub use log::{LogStats, MessageLog};
pub use recovery_line::{DependencyGraph, Line, Restore};

/// The uncoordinated policy's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Each rank's checkpoint interval (Daly's uses the rank's own measured capture).
    pub interval: IntervalChoice,
    /// Per-rank intervals that override `interval`.
    pub rank_intervals: BTreeMap<Rank, Millis>,
    /// Spread the ranks' first checkpoints over one interval.
    pub stagger: bool,
    /// Levels every capture is flushed to.
    pub levels: Vec<Level>,
    /// A rank's checkpoint counts once safe at this level (or a more durable one).
    pub safe_level: Level,
    /// Sender-based pessimistic message logging: only lost ranks restart and replay.
    pub logging: bool,
    /// Safe checkpoints kept per rank (0: all; without logging the recovery line may need
    /// old ones).
    pub keep_per_rank: usize,
    pub no_spare: NoSpare,
    pub max_restart_attempts: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            interval: IntervalChoice::Fixed { ms: 600_000 },
            rank_intervals: BTreeMap::new(),
            stagger: true,
            levels: vec![Level::L1, Level::L2],
            safe_level: Level::L2,
            logging: true,
            keep_per_rank: 0,
            no_spare: NoSpare::Survivors {
                max_ranks_per_node: None,
            },
            max_restart_attempts: 3,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |s: String| Err(PolicyError::Config(s));
        match self.interval {
            IntervalChoice::Fixed { ms: 0 } => return bad("interval must be > 0 ms".into()),
            IntervalChoice::Daly { mtbf_s, initial_ms }
                if !(mtbf_s.is_finite() && mtbf_s > 0.0) || initial_ms == 0 =>
            {
                return bad(format!(
                    "daly: mtbf ({mtbf_s} s) and the initial interval ({initial_ms} ms) must be > 0"
                ));
            }
            _ => {}
        }
        if let Some((r, _)) = self.rank_intervals.iter().find(|(_, ms)| **ms == 0) {
            return bad(format!("rank {r}: interval must be > 0 ms"));
        }
        if !self.levels.iter().any(|l| l.covers(self.safe_level)) {
            return bad(format!(
                "safe level {} is not among the levels written ({})",
                self.safe_level,
                self.levels
                    .iter()
                    .map(|l| l.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if self.max_restart_attempts == 0 {
            return bad("max_restart_attempts must be >= 1".into());
        }
        Ok(())
    }
}

/// A rank's capture in flight.
#[derive(Debug)]
struct Capture {
    op: OpId,
    version: Version,
    ordered_at: Millis,
    captured: bool,
    bytes: u64,
    lost: BTreeSet<Level>,
    timed: BTreeSet<Level>,
}

/// One rank's own checkpoints.
#[derive(Debug, Default)]
struct RankCkpts {
    next_at: Option<Millis>,
    inflight: Option<Capture>,
    /// Every capture taken (each cuts an interval), oldest first.
    taken: Vec<Version>,
    /// Safe at the safe level: (version, when it was captured), oldest first.
    safe: Vec<(Version, Millis)>,
    next_version: Version,
    /// The newest capture's freeze, for Daly's interval.
    freeze: Option<f64>,
    /// Without logging: per own checkpoint, the rank's channel counts (`LoggedEvent::Channels`).
    counts: BTreeMap<Version, recovery_line::Counts>,
}

/// What one rank of a recovery waits for.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pending {
    Restart {
        id: DecisionId,
        node: NodeId,
        version: Option<Version>,
    },
    Rollback {
        op: OpId,
        version: Version,
    },
    Done,
}

#[derive(Debug)]
struct Recovery {
    epoch: Epoch,
    failed: Vec<NodeId>,
    started_at: Millis,
    ranks: BTreeMap<Rank, Pending>,
    restarted: BTreeSet<Rank>,
    rolled_back: BTreeSet<Rank>,
    attempts: BTreeMap<Rank, u32>,
    /// When the work of each rank restored was last saved (for the work lost).
    saved_at: BTreeMap<Rank, Millis>,
    /// Every rank re-executes from its start in a new wiring epoch (the job's wiring had
    /// not finished): no replay, and every rank is released together at the end.
    rewire: bool,
}

use crate::primitives::Epoch;

#[derive(Debug, PartialEq, Eq)]
enum End {
    Completed,
    Ended,
}

/// The uncoordinated checkpoint policy (see the module doc).
#[derive(Debug)]
pub struct Uncoordinated {
    cfg: Config,
    view: AgreedView,
    slots: Vec<RankSlot>,
    spares: BTreeSet<NodeId>,
    exited: BTreeSet<Rank>,
    ranks: Vec<RankCkpts>,
    graph: DependencyGraph,
    log: MessageLog,
    recovery: Option<Recovery>,
    end: Option<End>,
    ids: Ids,
    costs: Costs,
    summary: Summary,
    max_depth: u32,
    last_line: Option<Line>,
    /// The runtime reports channel counts: without logging the line is then the
    /// transitless one ([`recovery_line::transitless_line`]).
    channels_seen: bool,
    /// Without logging: per rank, the oldest checkpoint a future line may need, as last
    /// told to the runtime ([`Action::KeepFrom`]).
    floors: Vec<Version>,
    /// A drain in progress ([`drain`]).
    drain: Option<drain::Drain>,
    /// Ranks past their `krun_init` in the current wiring ([`Event::RankReady`]).
    ready: BTreeSet<Rank>,
    /// Every rank was ready once since the job's (or the last re-wiring's) start.
    wired: bool,
}

impl Uncoordinated {
    /// A policy for a job that starts now with `layout`, run by `leader`.
    pub fn new(
        cfg: Config,
        leader: NodeId,
        layout: &Layout,
        view: AgreedView,
        now: Millis,
    ) -> Result<Uncoordinated, PolicyError> {
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
        let n = layout.ranks.len();
        let mut p = Uncoordinated {
            slots: layout
                .ranks
                .iter()
                .map(|&node| RankSlot {
                    node,
                    incarnation: 0,
                })
                .collect(),
            spares: layout.spares.iter().copied().collect(),
            exited: BTreeSet::new(),
            ranks: (0..n)
                .map(|_| RankCkpts {
                    next_version: 1,
                    ..RankCkpts::default()
                })
                .collect(),
            graph: DependencyGraph::default(),
            log: MessageLog::default(),
            recovery: None,
            end: None,
            ids: Ids::new(leader),
            costs: Costs::default(),
            summary: Summary::default(),
            max_depth: 0,
            last_line: None,
            channels_seen: false,
            floors: Vec::new(),
            drain: None,
            ready: BTreeSet::new(),
            wired: false,
            cfg,
            view,
        };
        for r in 0..n as Rank {
            let every = p.interval_of(r);
            p.ranks[r as usize].next_at = every.map(|t| {
                let offset = if p.cfg.stagger {
                    t / n as u64 * u64::from(r)
                } else {
                    0
                };
                now + t + offset
            });
        }
        Ok(p)
    }

    /// Takes over a running job at its newest committed coordinated checkpoint (see the
    /// module doc): the ranks' slots, the spares and the exits come from `snapshot`.
    pub fn resume(
        cfg: Config,
        leader: NodeId,
        snapshot: &Snapshot,
        now: Millis,
    ) -> Result<Uncoordinated, PolicyError> {
        let mut line = None;
        let mut newest: Version = 0;
        for d in &snapshot.decisions {
            match &d.kind {
                DecisionKind::Committed { version, .. } => {
                    line = Some(*version);
                    newest = newest.max(*version);
                }
                DecisionKind::CheckpointStarted { version }
                | DecisionKind::Aborted { version, .. }
                | DecisionKind::RankCheckpointed { version, .. } => newest = newest.max(*version),
                DecisionKind::Restart {
                    version: Some(v), ..
                } => newest = newest.max(*v),
                _ => {}
            }
        }
        let line = line.ok_or_else(|| {
            PolicyError::Config(
                "the uncoordinated policy takes over a running job at a committed coordinated \
                 checkpoint, and none was committed"
                    .into(),
            )
        })?;
        let layout = Layout {
            ranks: snapshot.ranks.iter().map(|s| s.node).collect(),
            spares: snapshot.spares.clone(),
        };
        // Ranks may sit on failed nodes: build against a view holding them, then set it.
        let mut all = snapshot.view.nodes.clone();
        all.extend(layout.ranks.iter().copied());
        let mut p = Uncoordinated::new(
            cfg,
            leader,
            &layout,
            AgreedView::new(snapshot.view.epoch, all),
            now,
        )?;
        p.view = snapshot.view.clone();
        p.slots = snapshot.ranks.clone();
        // A running job: its ranks took a coordinated checkpoint, so each is past its
        // `krun_init`.
        p.wired = true;
        p.ids = Ids::resuming(leader, snapshot);
        for c in &mut p.ranks {
            c.taken.push(line);
            c.safe.push((line, now));
            c.next_version = newest + 1;
        }
        for &(rank, code) in &snapshot.exits {
            if (rank as usize) < p.slots.len() && code == 0 {
                p.exited.insert(rank);
                p.ranks[rank as usize].next_at = None;
            }
        }
        Ok(p)
    }

    /// Whether message logging is on.
    pub fn logging(&self) -> bool {
        self.cfg.logging
    }

    /// The message log's totals.
    pub fn log_stats(&self) -> &LogStats {
        self.log.stats()
    }

    /// The deepest rollback so far (own checkpoints one rank rolled back past).
    pub fn max_depth(&self) -> u32 {
        self.max_depth
    }

    /// The newest recovery line planned.
    pub fn last_line(&self) -> Option<&Line> {
        self.last_line.as_ref()
    }

    /// Each rank's newest safe own checkpoint.
    pub fn rank_lines(&self) -> Vec<Option<Version>> {
        self.ranks
            .iter()
            .map(|c| c.safe.last().map(|s| s.0))
            .collect()
    }

    /// Whether the job's wiring finished: every rank was past its `krun_init` (see the
    /// module doc).
    pub fn wired(&self) -> bool {
        self.wired
    }

    /// Whether `rank` can take a checkpoint: it is past its `krun_init` (before, it has no
    /// safepoint, and an order would wait for a process the start-up may replace).
    fn past_init(&self, rank: Rank) -> bool {
        self.wired || self.ready.contains(&rank)
    }

    /// `rank` is past its `krun_init` (it reported ready, checkpointed or exited).
    fn mark_ready(&mut self, rank: Rank) {
        if (rank as usize) < self.slots.len() && !self.wired {
            self.ready.insert(rank);
            if self.ready.len() == self.slots.len() {
                self.wired = true;
            }
        }
    }

    /// The ranks' current placement.
    pub fn slots(&self) -> &[RankSlot] {
        &self.slots
    }

    /// Dependencies held by the graph (without logging).
    pub fn dependencies(&self) -> usize {
        self.graph.len()
    }

    fn on_logged(&mut self, events: Vec<LoggedEvent>) {
        for e in events {
            match e {
                LoggedEvent::Message { bytes, .. } => {
                    if self.cfg.logging {
                        self.log.logged(bytes);
                    }
                }
                LoggedEvent::Delivered {
                    from,
                    to,
                    seq,
                    order,
                    from_interval,
                    to_interval,
                    bytes,
                } => {
                    if (from as usize) >= self.slots.len() || (to as usize) >= self.slots.len() {
                        continue;
                    }
                    if self.cfg.logging {
                        self.log.delivered(
                            to,
                            log::Delivery {
                                from,
                                seq,
                                order,
                                interval: to_interval,
                                bytes,
                            },
                        );
                    } else {
                        self.graph.add(from, from_interval, to, to_interval);
                    }
                }
                LoggedEvent::Channels {
                    rank,
                    version,
                    sent,
                    delivered,
                } => {
                    let n = self.slots.len();
                    if self.cfg.logging
                        || (rank as usize) >= n
                        || sent.len() != n
                        || delivered.len() != n
                    {
                        continue;
                    }
                    self.channels_seen = true;
                    self.ranks[rank as usize]
                        .counts
                        .insert(version, (sent, delivered));
                }
            }
        }
    }

    fn on_exit(&mut self, now: Millis, rank: Rank, code: i32) -> Vec<Action> {
        if (rank as usize) >= self.slots.len() {
            return Vec::new();
        }
        if code != 0 {
            return self.end_with(now, PolicyError::RankFailed { rank, code });
        }
        self.exited.insert(rank);
        self.mark_ready(rank);
        let c = &mut self.ranks[rank as usize];
        c.inflight = None;
        c.next_at = None;
        self.maybe_complete(now)
    }

    fn maybe_complete(&mut self, now: Millis) -> Vec<Action> {
        if self.exited.len() < self.slots.len() || self.recovery.is_some() || self.end.is_some() {
            return Vec::new();
        }
        self.end = Some(End::Completed);
        let d = self
            .ids
            .decision(self.view.epoch, DecisionKind::JobEnded { error: None });
        vec![
            Action::Record(d),
            Action::notice(now, NoticeKind::JobCompleted),
            Action::EndJob { error: None },
        ]
    }
}

impl Policy for Uncoordinated {
    fn name(&self) -> &'static str {
        "uncoordinated"
    }

    fn on_event(&mut self, now: Millis, event: Event, reads: &dyn Reads) -> Vec<Action> {
        if self.end.is_some() {
            return Vec::new();
        }
        let was_wired = self.wired;
        let mut out = match event {
            Event::Tick => Vec::new(),
            Event::CheckpointRequest { .. } => {
                for c in &mut self.ranks {
                    if c.inflight.is_none() {
                        c.next_at = Some(now);
                    }
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
            // This policy never synchronizes.
            Event::Synchronized { .. } | Event::SyncFailed { .. } => Vec::new(),
            Event::CaptureDone {
                op,
                rank,
                version,
                bytes,
                seconds,
            } => self.on_capture_done(now, op, rank, version, bytes, seconds),
            Event::CaptureFailed { op, rank, .. } => {
                if self
                    .ranks
                    .get(rank as usize)
                    .and_then(|c| c.inflight.as_ref())
                    .is_some_and(|c| c.op == op)
                {
                    self.drop_capture(now, rank);
                }
                Vec::new()
            }
            Event::LevelSafe {
                rank,
                version,
                level,
            } => self.on_level(now, rank, version, level, true),
            Event::LevelLost {
                rank,
                version,
                level,
            } => self.on_level(now, rank, version, level, false),
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
            Event::RollbackDone { op, rank, .. } => self.on_rollback_result(now, op, rank, Ok(())),
            Event::RollbackFailed { op, rank, reason } => {
                self.on_rollback_result(now, op, rank, Err(reason))
            }
            Event::RankExited { rank, code, .. } => self.on_exit(now, rank, code),
            Event::DrainRequested { node, view } => self.on_drain(now, node, view),
            Event::RankReady { rank } => {
                self.mark_ready(rank);
                Vec::new()
            }
            Event::Logged { events } => {
                self.on_logged(events);
                // A checkpoint's counts may come after it became safe.
                self.retention()
            }
        };
        if self.wired && !was_wired {
            out.push(Action::notice(
                now,
                NoticeKind::Wired {
                    ranks: self.slots.len() as u32,
                },
            ));
        }
        out.extend(self.drain_progress(now, reads));
        out.extend(self.start_due(now));
        out
    }

    fn next_deadline(&self) -> Option<Millis> {
        if self.end.is_some() {
            return None;
        }
        self.ranks
            .iter()
            .enumerate()
            .filter(|(r, c)| {
                c.inflight.is_none()
                    && !self.exited.contains(&(*r as Rank))
                    && !self.in_recovery(*r as Rank)
                    && self.past_init(*r as Rank)
            })
            .filter_map(|(_, c)| c.next_at)
            .min()
    }

    fn phase(&self) -> Phase {
        match (&self.end, &self.recovery) {
            (Some(End::Completed), _) => Phase::Completed,
            (Some(End::Ended), _) => Phase::Ended,
            (None, Some(_)) => Phase::Recovering,
            (None, None) if self.ranks.iter().any(|c| c.inflight.is_some()) => Phase::Checkpointing,
            _ => Phase::Running,
        }
    }

    /// The oldest of the ranks' newest safe checkpoints (`None` while some rank has none):
    /// with logging, no rank goes back further than its own newest one.
    fn recovery_line(&self) -> Option<Version> {
        self.ranks
            .iter()
            .map(|c| c.safe.last().map(|s| s.0))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().min())
    }

    fn costs(&self) -> &Costs {
        &self.costs
    }

    fn summary(&self) -> Summary {
        self.summary.clone()
    }
}
