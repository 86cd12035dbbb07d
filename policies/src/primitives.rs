//! The primitives kit: what a policy consumes ([`Event`]), what it emits ([`Action`]) and
//! what it may read ([`Reads`]). This is the interface krund drives; the same types drive the
//! seeded simulation (`tests/simulation.rs`).
//!
//! # Contract between krund and a policy
//!
//! - **One instance, one place.** The policy runs on one node only: the leader of the
//!   supervisors, where the view is agreed. Every other node executes what the leader's
//!   actions ask. When the leader fails, the next leader builds a new instance with
//!   `resume` (for the coordinated policy, [`crate::coordinated::Coordinated::resume`]) from a
//!   [`Snapshot`]: the agreed view, the process table's rows and exit codes, and the recorded
//!   decisions.
//! - **Events in, actions out.** krund calls `Policy::on_event(now, event, reads)` for each
//!   event, in the order it learnt them, and executes the returned actions in order. The call
//!   never blocks and does no I/O; the same inputs give the same outputs. `now` is
//!   milliseconds on a clock that never goes back (krund: since the job started).
//!   krund delivers [`Event::Tick`] no later than `Policy::next_deadline()`.
//! - **Operations are named.** Every action that completes later carries an [`OpId`] (or, for
//!   restarts, a [`DecisionId`]); krund echoes it in the completion event. A completion whose
//!   id the policy no longer waits for (an operation overtaken by a failure, or issued by a
//!   previous leader) is ignored, so krund need not cancel anything.
//! - **Decisions are recorded before they are executed.** [`Action::Record`] and
//!   [`Action::Restart`] carry a [`Decision`]; krund writes it to the process table (or the
//!   agreed log) and only then executes it. A restart decision names the rank's new
//!   incarnation: the table accepts one decision per (rank, incarnation), and a process that
//!   comes up for an incarnation older than the newest decided one is ended at registration
//!   (incarnations are fencing tokens). So two leaders can never bring up two live copies of
//!   a rank, and no rank is restarted twice for one failure.
//! - **Store housekeeping.** A recorded [`DecisionKind::Committed`] lets the store drop a
//!   rank's versions older than the oldest commit the policy keeps (`keep_commits`), except
//!   the ancestors an incremental image of a kept version needs; [`DecisionKind::Aborted`]
//!   lets it drop that version (unless a later image builds on it).
//! - **Store events.** The checkpoint agent's "safe at level L" becomes [`Event::LevelSafe`];
//!   a level it can no longer reach becomes [`Event::LevelLost`] (the policy then aborts the
//!   checkpoint in flight if no level at or above the commit level is left for that rank).
//! - **Synchronize holds.** [`Action::Synchronize`] brings the ranks to a safe point (native
//!   ranks: the rank library's safepoint; CRIU ranks: frozen) and keeps them there until
//!   [`Action::Release`]. Ranks rolled back or restarted also stay held until released.
//! - **Reads are local.** [`Reads`] answers from state krund already holds (the store's index
//!   of copies and which nodes are alive); it never waits on the network.
use serde::{Deserialize, Serialize};
use std::fmt;

/// A node, as the adaptation layer numbers it (`adaptation::NodeId`).
pub type NodeId = u32;
/// A view's epoch (`adaptation::Epoch`): it grows with every agreed change.
pub type Epoch = u64;
/// A rank of the job.
pub type Rank = u32;
/// A checkpoint version (global checkpoint number N); never reused, even after an abort.
pub type Version = u64;
/// Milliseconds on krund's monotonic job clock.
pub type Millis = u64;

/// Storage levels of the multilevel store, fastest first (as `ckpt_store::Level`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Level {
    /// Local memory of the rank's node.
    L1,
    /// A buddy node's memory.
    L2,
    /// XOR parity across a set of nodes.
    L3,
    /// Disk images.
    L4,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::L1, Level::L2, Level::L3, Level::L4];

    pub fn name(self) -> &'static str {
        ["L1", "L2", "L3", "L4"][self as usize]
    }

    /// Parses `L1`..`L4` (any case).
    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s))
    }

    /// Whether a copy safe at `self` survives at least what a copy at `wanted` survives
    /// (a later level is more durable).
    pub fn covers(self, wanted: Level) -> bool {
        self >= wanted
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Names an operation the policy waits for (unique across leaders: it holds the leader's node).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId {
    pub leader: NodeId,
    pub seq: u64,
}

/// Names a recorded decision. Unique: one leader per node id, and a leader continues the
/// sequence of the decisions it finds in the [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DecisionId {
    /// The agreed epoch when the decision was taken.
    pub epoch: Epoch,
    pub leader: NodeId,
    pub seq: u64,
}

/// The ids a policy's leader hands out, for every policy: its operations and its recorded
/// decisions.
#[derive(Clone, Debug)]
pub struct Ids {
    leader: NodeId,
    next_op: u64,
    next_decision: u64,
}

impl Ids {
    /// A leader starting a job.
    pub fn new(leader: NodeId) -> Ids {
        Ids {
            leader,
            next_op: 0,
            next_decision: 0,
        }
    }

    /// A leader taking over a running job from `snapshot`. It may have led before: its
    /// operations are numbered from the snapshot's epoch on (`epoch << 32`), so none
    /// matches an old one still in flight, and its decisions continue after the last one it
    /// finds there.
    pub fn resuming(leader: NodeId, snapshot: &Snapshot) -> Ids {
        Ids {
            leader,
            next_op: snapshot.view.epoch << 32,
            next_decision: snapshot
                .decisions
                .iter()
                .filter(|d| d.id.leader == leader)
                .map(|d| d.id.seq)
                .max()
                .unwrap_or(0),
        }
    }

    /// The next operation's id.
    pub fn op(&mut self) -> OpId {
        self.next_op += 1;
        OpId {
            leader: self.leader,
            seq: self.next_op,
        }
    }

    /// The actions that end a job on `error`, in `epoch`: the decision recorded, the user
    /// told, the job ended (every policy ends a job this way).
    pub fn end_job(&mut self, epoch: Epoch, now: Millis, error: crate::PolicyError) -> Vec<Action> {
        let d = self.decision(
            epoch,
            DecisionKind::JobEnded {
                error: Some(error.to_string()),
            },
        );
        vec![
            Action::Record(d),
            Action::notice(
                now,
                crate::report::NoticeKind::JobEnded {
                    error: error.clone(),
                },
            ),
            Action::EndJob { error: Some(error) },
        ]
    }

    /// A decision taken in `epoch`, with the next id.
    pub fn decision(&mut self, epoch: Epoch, kind: DecisionKind) -> Decision {
        self.next_decision += 1;
        Decision {
            id: DecisionId {
                epoch,
                leader: self.leader,
                seq: self.next_decision,
            },
            kind,
        }
    }
}

impl fmt::Display for DecisionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.epoch, self.leader, self.seq)
    }
}

/// The agreed view: its epoch and the nodes in it (alive as far as the group agreed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgreedView {
    pub epoch: Epoch,
    /// Sorted, without duplicates.
    pub nodes: Vec<NodeId>,
}

impl AgreedView {
    pub fn new(epoch: Epoch, mut nodes: Vec<NodeId>) -> AgreedView {
        nodes.sort_unstable();
        nodes.dedup();
        AgreedView { epoch, nodes }
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.nodes.binary_search(&node).is_ok()
    }
}

/// Where the job starts: rank r runs on `ranks[r]`; `spares` run no rank until needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub ranks: Vec<NodeId>,
    pub spares: Vec<NodeId>,
}

/// A valid copy of a rank's image, as the store's index knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCopy {
    pub level: Level,
    /// The node whose memory or disk holds it (`None`: shared storage, or a copy rebuilt
    /// from parity that no single node holds).
    pub node: Option<NodeId>,
    pub bytes: u64,
}

impl fmt::Display for ImageCopy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(n) => write!(f, "{} from node {n}", self.level),
            None => write!(f, "{}", self.level),
        }
    }
}

/// What a policy may read at any time. Answers come from state krund holds locally.
pub trait Reads {
    /// The valid copies of `rank`'s image `version`, fastest first: copies on failed nodes,
    /// copies that failed their checksum, levels not yet safe and versions the store dropped
    /// are left out. Empty: the image is lost.
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy>;
}

/// Why a checkpoint was requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestSource {
    /// The policy's own interval.
    Interval,
    /// SIGUSR1 to krun (also Slurm's `--signal=USR1@T`).
    Signal,
    /// `krun checkpoint` from another shell.
    Command,
}

impl fmt::Display for RequestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestSource::Interval => "interval",
            RequestSource::Signal => "SIGUSR1",
            RequestSource::Command => "krun checkpoint",
        })
    }
}

/// What a policy consumes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Time passed (delivered at least at `Policy::next_deadline()`).
    Tick,
    /// A checkpoint is asked for now.
    CheckpointRequest { source: RequestSource },
    /// The group agreed that `failed` are gone; `view` is the new view.
    FailureAgreed {
        epoch: Epoch,
        failed: Vec<NodeId>,
        view: AgreedView,
    },
    /// `node` joined the view (it becomes a spare).
    NodeJoined {
        epoch: Epoch,
        node: NodeId,
        view: AgreedView,
    },
    /// The ranks of a [`Action::Synchronize`] are all held at a safe point.
    Synchronized { op: OpId },
    /// The barrier could not complete (not a node failure: those come as `FailureAgreed`).
    SyncFailed { op: OpId, reason: String },
    /// A rank's image is taken (the freeze is over; the store flushes in the background) and
    /// L1 holds it.
    CaptureDone {
        op: OpId,
        rank: Rank,
        version: Version,
        bytes: u64,
        seconds: f64,
    },
    CaptureFailed {
        op: OpId,
        rank: Rank,
        version: Version,
        reason: String,
    },
    /// The store made `rank`'s image `version` safe at `level`.
    LevelSafe {
        rank: Rank,
        version: Version,
        level: Level,
    },
    /// The store lost or rejected a copy (for example a checksum failure, or a level that can
    /// no longer be made safe).
    LevelLost {
        rank: Rank,
        version: Version,
        level: Level,
    },
    /// A restart decision is carried out: the rank runs (held) on `node`.
    RestartDone {
        decision: DecisionId,
        rank: Rank,
        node: NodeId,
        seconds: f64,
    },
    RestartFailed {
        decision: DecisionId,
        rank: Rank,
        reason: String,
    },
    RollbackDone {
        op: OpId,
        rank: Rank,
        version: Version,
        seconds: f64,
    },
    RollbackFailed {
        op: OpId,
        rank: Rank,
        reason: String,
    },
    /// A rank's process ended by itself (not through a node failure).
    RankExited { rank: Rank, node: NodeId, code: i32 },
    /// `krun node drain`: move the ranks of `node` to other nodes (a checkpoint first, then
    /// a planned move from it), after which `node` may leave. `view`: the membership now (a
    /// node in it that runs no rank is a spare, such as one added by `krun node add`).
    /// Answered by [`crate::report::NoticeKind::Drained`] or `DrainRefused`.
    DrainRequested { node: NodeId, view: AgreedView },
    /// `rank` is past its `krun_init` in the job's current wiring: it swapped addresses
    /// with every other rank and linked to its node (the runtime reports it once per
    /// process and wiring epoch). Until every rank is, the job's wiring is not finished: a
    /// rank lost then leaves the others stuck in a broken address exchange, with nothing
    /// logged or checkpointed yet (the uncoordinated policy then restarts every rank from
    /// its start in a new wiring epoch).
    RankReady { rank: Rank },
    /// What the ranks reported of their communication since the last report (uncoordinated
    /// policies: the dependencies between the ranks' checkpoint intervals, and what the
    /// message logs hold). Batched; order within the batch is the order of the reports.
    Logged { events: Vec<LoggedEvent> },
}

/// A recorded decision (what krund writes to the process table or the agreed log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub id: DecisionId,
    pub kind: DecisionKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DecisionKind {
    /// Checkpoint `version` started (its number is used).
    CheckpointStarted { version: Version },
    /// Global checkpoint `version` is the recovery line: every rank's image is safe at
    /// `level` (or a more durable level).
    Committed { version: Version, level: Level },
    /// Checkpoint `version` is abandoned; the previous commit stays the recovery line.
    Aborted { version: Version, reason: String },
    /// Restart `rank` as a new process on `node` from `version` (`None`: from the program's
    /// start) as incarnation `incarnation`, fetching from `source`. Taken for the failure
    /// agreed at `failure_epoch`.
    Restart {
        rank: Rank,
        incarnation: u32,
        node: NodeId,
        version: Option<Version>,
        source: Option<ImageCopy>,
        failure_epoch: Epoch,
    },
    /// A recovery began after the failure agreed at `failure_epoch`, towards `version`
    /// (`None`: the program's start). Until `Recovered`, ranks may be half restored: a new
    /// leader finishes the recovery.
    RecoveryStarted {
        failure_epoch: Epoch,
        version: Option<Version>,
    },
    /// Every rank is restored and released.
    Recovered { failure_epoch: Epoch },
    /// The job is over (`error`: why it could not continue).
    JobEnded { error: Option<String> },
    /// `krun node drain`: the ranks of `node` move away from the next committed checkpoint.
    DrainStarted { node: NodeId },
    /// The ranks of `node` run elsewhere from checkpoint `version`; `node` may leave.
    Drained { node: NodeId, version: Version },
    /// Uncoordinated policies: `rank`'s own checkpoint `version` (taken without a barrier)
    /// is safe at `level`; with message logging, what `rank` received before it may be
    /// dropped from its senders' logs.
    RankCheckpointed {
        rank: Rank,
        version: Version,
        level: Level,
    },
    /// Uncoordinated policies: the recovery after the failure agreed at `failure_epoch`
    /// restores each rank named to its own checkpoint (`None`: the program's start); ranks
    /// not named keep running. `depth`: the most checkpoints one rank rolled back past (the
    /// domino effect). `rewire`: the job's wiring had not finished (some rank was not past
    /// its `krun_init`): every rank named re-executes from its start and they all swap
    /// their addresses again in one new wiring epoch (no rank keeps running, none rejoins
    /// alone).
    RecoveryLine {
        failure_epoch: Epoch,
        line: Vec<(Rank, Option<Version>)>,
        depth: u32,
        #[serde(default)]
        rewire: bool,
    },
}

/// What a policy emits: primitive calls, records and messages for the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Bring `ranks` to a safe point and hold them; answered by `Synchronized` or `SyncFailed`.
    Synchronize { op: OpId, ranks: Vec<Rank> },
    /// Let held ranks continue (fire and forget).
    Release { ranks: Vec<Rank> },
    /// Capture a held rank into the store as `version` and flush it to `levels`; answered by
    /// `CaptureDone`/`CaptureFailed`, then `LevelSafe`/`LevelLost` per level.
    Capture {
        op: OpId,
        rank: Rank,
        version: Version,
        levels: Vec<Level>,
    },
    /// Bring the live process of `rank` back to image `version` in place, fetched from
    /// `source`; the rank stays held. Answered by `RollbackDone`/`RollbackFailed`.
    Rollback {
        op: OpId,
        rank: Rank,
        version: Version,
        source: ImageCopy,
    },
    /// Record the decision (a [`DecisionKind::Restart`]), then start the rank as a new
    /// process, held; answered by `RestartDone`/`RestartFailed` with the decision's id.
    Restart(Decision),
    /// Record a decision that needs no execution (commit, abort, end).
    Record(Decision),
    /// Append to the event log (messages and DSM events; used by the uncoordinated policies).
    LogEvent(LoggedEvent),
    /// Tell the user (krun prints the line).
    Notify(crate::report::Notice),
    /// The job is over: stop every rank; `error` says what could not be restored.
    EndJob { error: Option<crate::PolicyError> },
    /// Uncoordinated policies: `rank` alone takes its own checkpoint as `version` at its
    /// next safe point (no barrier, no other rank waits) and goes on; answered by
    /// `CaptureDone`/`CaptureFailed`, then `LevelSafe`/`LevelLost` per level.
    CaptureRank {
        op: OpId,
        rank: Rank,
        version: Version,
        levels: Vec<Level>,
    },
    /// Message logging: `rank`'s checkpoint `version` is safe, so its senders may drop the
    /// payloads `rank` delivered before it, and its buddy the determinants (fire and forget).
    TrimLog { rank: Rank, version: Version },
    /// Message logging: `rank` was restarted (by `decision`) from its checkpoint `version`
    /// (`None`: the start); its senders resend what they logged for it after that point and
    /// it takes them in the recorded receive order until it has caught up; what it sends
    /// again that its receivers already have is suppressed by sequence number. Refused at
    /// once: answered `RestartFailed` for `decision`.
    Replay {
        decision: DecisionId,
        rank: Rank,
        version: Option<Version>,
    },
    /// Retention: no recovery line the policy can compute from now on needs `rank`'s
    /// checkpoints older than `version` (`version` itself and newer are still needed), so
    /// the runtime may drop the older ones from its levels; until the first such action
    /// for a rank, a runtime told to retain by line keeps all of them (fire and forget;
    /// versions only rise). The uncoordinated policy without logging issues it: its line
    /// can lie many checkpoints back (the domino effect), further than a store that keeps
    /// a fixed number of versions would hold.
    KeepFrom { rank: Rank, version: Version },
}

impl Action {
    /// A message for the user, dated `now`.
    pub fn notice(now: Millis, kind: crate::report::NoticeKind) -> Action {
        Action::Notify(crate::report::Notice { at: now, kind })
    }
}

/// An entry of the event log: message sends and receives with sequence numbers and receive
/// order (DSM faults, copies and invalidations once the DSM reports them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoggedEvent {
    /// `from` sent its `seq`-th message to `to` (per pair, from 0) and holds its payload in
    /// its log (sender-based logging).
    Message {
        from: Rank,
        to: Rank,
        seq: u64,
        bytes: u64,
    },
    /// `to` delivered `from`'s message `seq` as its `order`-th delivery (from 0, every
    /// source counted), after its determinant was made durable. `from_interval`: the
    /// sender's newest own checkpoint when it sent (0: none yet); `to_interval`: the
    /// receiver's newest own checkpoint at delivery. These give the checkpoint and
    /// communication dependency graph.
    Delivered {
        from: Rank,
        to: Rank,
        seq: u64,
        order: u64,
        from_interval: Version,
        to_interval: Version,
        bytes: u64,
    },
    /// Without logging: at `rank`'s own checkpoint `version`, the messages it had sent to
    /// each rank (`sent[j]`) and delivered from each rank (`delivered[j]`) since the program's
    /// start (every message of the rank library, one entry per rank of the job). A set of
    /// checkpoints on which every channel's counts agree has no orphan and no message in
    /// transit ([`crate::uncoordinated::recovery_line::transitless_line`]).
    Channels {
        rank: Rank,
        version: Version,
        sent: Vec<u64>,
        delivered: Vec<u64>,
    },
}

/// A row of the process table, as the policy needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankSlot {
    pub node: NodeId,
    /// 0 for the first start; each restart decision adds one.
    pub incarnation: u32,
}

/// What a new leader reads to take over: the view, the process table, the decision log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub view: AgreedView,
    /// Indexed by rank.
    pub ranks: Vec<RankSlot>,
    /// Nodes designated as spares at start or joined since (those hosting a rank are busy).
    pub spares: Vec<NodeId>,
    /// Every decision recorded so far, in record order.
    pub decisions: Vec<Decision>,
    /// Ranks whose current incarnation ended by itself, with its exit code.
    pub exits: Vec<(Rank, i32)>,
}

/// Costs measured so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// How long the ranks were held for the newest checkpoint (synchronize to release).
    pub freeze_seconds: Option<f64>,
    /// Mean time from the start of a checkpoint to its images being safe at each level
    /// (indexed by `Level as usize`).
    pub level_seconds: [Option<f64>; 4],
    /// Mean time of a restart (decision to running).
    pub restart_seconds: Option<f64>,
    samples: [u32; 6],
}

impl Costs {
    fn mean(slot: &mut Option<f64>, n: &mut u32, x: f64) {
        *n += 1;
        let m = slot.unwrap_or(0.0);
        *slot = Some(m + (x - m) / f64::from(*n));
    }

    pub fn observe_freeze(&mut self, seconds: f64) {
        self.freeze_seconds = Some(seconds);
    }

    pub fn observe_level(&mut self, level: Level, seconds: f64) {
        let i = level as usize;
        Self::mean(&mut self.level_seconds[i], &mut self.samples[i], seconds);
    }

    pub fn observe_restart(&mut self, seconds: f64) {
        Self::mean(&mut self.restart_seconds, &mut self.samples[4], seconds);
    }
}

/// Formats ranks as ranges: `0-3,6-7`.
pub fn rank_ranges(ranks: &[Rank]) -> String {
    let mut v = ranks.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j == i {
            out.push_str(&v[i].to_string());
        } else {
            out.push_str(&format!("{}-{}", v[i], v[j]));
        }
        i = j + 1;
    }
    out
}

/// "rank 3" or "ranks 0-3,6".
pub fn ranks_phrase(ranks: &[Rank]) -> String {
    if ranks.len() == 1 {
        format!("rank {}", ranks[0])
    } else {
        format!("ranks {}", rank_ranges(ranks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resuming_leader_reuses_no_id_of_the_snapshot() {
        let mut before = Ids::new(2);
        let old_op = before.op();
        let mut decisions: Vec<Decision> = (0..3)
            .map(|_| before.decision(5, DecisionKind::JobEnded { error: None }))
            .collect();
        // Another leader's decision with a higher sequence does not move this leader's.
        let mut other = Ids::new(3);
        for _ in 0..9 {
            other.decision(5, DecisionKind::JobEnded { error: None });
        }
        decisions.push(other.decision(5, DecisionKind::JobEnded { error: None }));
        let snapshot = Snapshot {
            view: AgreedView::new(7, vec![2, 3]),
            ranks: Vec::new(),
            spares: Vec::new(),
            decisions: decisions.clone(),
            exits: Vec::new(),
        };
        let mut again = Ids::resuming(2, &snapshot);
        let op = again.op();
        assert!(op.seq > 7 << 32 && op.seq > old_op.seq, "{op:?}");
        let d = again.decision(7, DecisionKind::JobEnded { error: None });
        assert_eq!((d.id.leader, d.id.seq, d.id.epoch), (2, 4, 7));
        assert!(decisions.iter().all(|old| old.id != d.id));
    }

    #[test]
    fn rank_ranges_merge_consecutive_ranks() {
        assert_eq!(rank_ranges(&[6, 0, 1, 2, 3, 7]), "0-3,6-7");
        assert_eq!(rank_ranges(&[5]), "5");
        assert_eq!(rank_ranges(&[1, 3, 4]), "1,3-4");
        assert_eq!(ranks_phrase(&[4]), "rank 4");
        assert_eq!(ranks_phrase(&[4, 5]), "ranks 4-5");
    }

    #[test]
    fn later_levels_cover_earlier_ones() {
        assert!(Level::L4.covers(Level::L2));
        assert!(Level::L2.covers(Level::L2));
        assert!(!Level::L1.covers(Level::L2));
        assert_eq!(Level::parse("l3"), Some(Level::L3));
        assert_eq!(Level::parse("L5"), None);
    }

    #[test]
    fn costs_average_the_samples() {
        let mut c = Costs::default();
        c.observe_level(Level::L2, 1.0);
        c.observe_level(Level::L2, 3.0);
        c.observe_restart(4.0);
        assert_eq!(c.level_seconds[Level::L2 as usize], Some(2.0));
        assert_eq!(c.level_seconds[Level::L1 as usize], None);
        assert_eq!(c.restart_seconds, Some(4.0));
    }
}
