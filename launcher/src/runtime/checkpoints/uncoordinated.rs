//! The uncoordinated policy's calls carried out against the krund nodes (`[policy] kind =
//! "uncoordinated"`, `KRUN_POLICY_KIND=uncoordinated`, or `krun --policy FILE` naming it).
//!
//! krun exports `KRUN_UNCOORDINATED=1` and `KRUN_MESSAGE_LOGGING=1|0` to the nodes, which
//! pass them to every rank: the rank library then takes safepoints without a barrier and,
//! with logging, keeps the sender-based log (`rank/src/logging/`,
//! `rank/src/uncoordinated.rs`). The nodes' side is `runtime/uncoordinated.rs`.
//!
//! # Contract between the hub and krund
//!
//! | policy call / event | krun → krund | krund → krun |
//! |---|---|---|
//! | `capture_rank(op, rank, v)` | `CaptureRank{rank, version: n}` (n: the rank's next native version): the rank's node signals that rank only; its next safepoint is answered `Checkpoint{n}` at once, no barrier; the rank writes its log snapshot into its registered log region and takes its own native checkpoint | `Captured{rank, n}` → `CaptureDone`; `Safe`/`NotSafe{rank, n, level}` → `LevelSafe`/`LevelLost`; no `Captured` in [`CAPTURE_TIMEOUT`] → `CaptureFailed` |
//! | `trim_log(rank, v)` | `TrimLog{rank, version: n}` → the rank's watcher: `LogSafe{n}` (the library acknowledges to its senders, which drop the payloads) | |
//! | `keep_from(rank, v)` (no logging) | `KeepFrom{rank, version: n}` to every node → its store, retaining by line, may drop the rank's versions older than n's chain (`Store::keep_from`) | |
//! | `RecoveryLine{rewire: true}` recorded (the job's wiring had not finished) | its restarts, with logging too, go as the line without logging's below (every rank from its start, one new wiring epoch), until `Recovered` | `RankReady{rank, wiring}` (each rank's hello after its `krun_init`) → `RankReady` (newest wiring epoch only) |
//! | `restart(d)` (logging) | `Rejoin{restart, rank, node, version: n}`: on `node`, the image chain of n from the store, then a new process with `KRUN_REJOIN=1`, `KRUN_GHOST_RESTORE=n`; no wiring epoch, the survivors keep running | `Restarted{wiring: restart, ..}` → `RestartDone`; `RestartFailed` → `RestartFailed` |
//! | (each new process) | | `Rejoining{rank, address, ring}` |
//! | | once every rank restarting for the failure said `Rejoining`: `PeerMoved{rank, address, ring}` per restarted rank to every node → each running rank's watcher replaces the address (and, as the buddy's ward, rewrites its determinants into the new ring) | `PeerReplaced{rank, moved}` per (running rank, restarted rank) |
//! | | once every pair is replaced: `Rejoined{rank, cards}` per restarted rank, together → each new process gets every rank's (address, ring), reads its determinants back and asks the others to resend (ranks restarted together answer each other) | |
//! | `replay(rank, v)` | nothing more: the rejoin above is the replay (the library's `Resume`/`Info`); refused without logging | |
//! | `Logged` events | none: the policy's log index is fed by checkpoints only (per-message reports would cost a message per message); the ranks' own counters are in their `log_stats` | |
//! | (each own checkpoint, no logging) | | `ChannelCounts{rank, version: n, sent, delivered}` (the rank's messages sent to and delivered from each rank since its process started, sent by the rank before its `Checkpointed`) → the hub adds the counts of the checkpoint the process was restored from → `Logged{Channels{rank, v, ..}}` |
//! | `restart(d)` / `rollback(op, r, v)` (no logging) | collected; then one wiring epoch for the whole line: `Restart{wiring, bootstrap, version: n, ranks}` once per distinct native version n (same wiring and bootstrap), so every rank restores its own version: running ranks in place (watcher, same pid), lost ones on their new node from the store, a rank back to the start without `KRUN_GHOST_RESTORE`; each rank's library drops its images newer than n and numbers on from n + 1 | `Restarted{wiring, rank}` → `RestartDone`/`RollbackDone`; `RestartFailed` → `RestartFailed`/`RollbackFailed` |
//! | (the last lone restart of a failure runs) | `Reform{wiring, members, ranks}` as after a coordinated recovery: the stores re-form buddies and parity sets among the nodes left, with the restarted ranks where they run now | |
//! | swap to this policy (`swap.rs`) | the cut's capture released as `Release{Switch{version}}`: the node runs the uncoordinated mode from it and answers the held ranks `CheckpointSwitch` | each rank's `LogCard` (kept in `HubCalls::early_cards` until the policy is in force) |
//! | swap back to the coordinated policy | `Realign` → each rank's watcher (`ReportSafepoint`); then `RealignAt{T}` (0: cancelled) → the node drops its capture orders, answers safepoints through its gate, tells each rank `CoordinateAt{T}` | `SafepointIndex{rank, index, next}` per rank |
//!
//! Without logging the policy's line is transitless (every channel's counts agree, so no
//! message is in flight across it) and names every rank, so all of them re-wire in the new
//! epoch: no rank can receive a message from an older incarnation, and every message the
//! line says was not sent yet is sent again by its re-executing sender.
//!
//! Versions: the policy numbers each rank's checkpoints itself (never reused, even after a
//! failed capture); each rank's native checkpointer numbers its own images one by one, and
//! a rank restarted from native n numbers on from n + 1. The hub maps (rank, native) to the
//! policy's version both ways.
//!
//! `--inject-failure node=N@Kckpt` counts, under this policy, the checkpoints every rank
//! has made safe (the fewest among the ranks).
//!
//! The files: this one holds the policy's state at the hub ([`Uncoord`]); `captures.rs`
//! the per-rank captures the policy schedules (and their timeouts, the safe count);
//! `logging.rs` what only message logging does (log trims, lone restarts that rejoin the
//! running ranks, replay); `recovery_line.rs` what only the job without logging does (the
//! store's retention by line, the recovery line's rollbacks and restarts in one wiring
//! epoch); `reports.rs` the nodes' messages as the policy's events.
use super::*;

mod captures;
mod logging;
mod recovery_line;
mod reports;
#[cfg(test)]
mod tests;

pub(super) use captures::{capture_rank, checkpointed, fetch, poll};
use logging::rejoined_if_done;
pub(super) use logging::{replay, restart, trim_log};
pub(super) use recovery_line::{execute_line, keep_from};
pub(super) use reports::translate;

/// How long a rank has to answer its own capture before the policy hears it failed.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(90);

/// The environment krun gives the nodes (and through them the ranks) for `policy`.
pub fn node_env(policy: Option<&Description>) -> Result<Vec<(String, String)>, PolicyError> {
    let desc = match policy {
        Some(d) => Some(d.clone()),
        None => PolicySettings::from_env()?.description(),
    };
    Ok(match desc {
        Some(d) if d.kind == policies::description::Kind::Uncoordinated => vec![
            ("KRUN_UNCOORDINATED".into(), "1".into()),
            (
                "KRUN_MESSAGE_LOGGING".into(),
                if d.logging.messages { "1" } else { "0" }.into(),
            ),
        ],
        _ => Vec::new(),
    })
}

/// A rank's message-log card: its fabric address and the ring it holds for its ward.
pub type Card = (Vec<u8>, Vec<u8>);

/// The uncoordinated policy's state at the hub.
pub(in crate::runtime) struct Uncoord {
    pub(super) logging: bool,
    /// rank -> its checkpointer's newest version.
    native: Vec<u64>,
    /// (rank, native) -> the policy's version.
    versions: BTreeMap<(Rank, u64), Version>,
    /// rank -> the capture ordered: op, policy version, native version, when.
    capturing: BTreeMap<Rank, (OpId, Version, u64, Instant)>,
    /// rank -> its (address, ring), as it reported them.
    cards: Vec<Option<Card>>,
    /// restart id (the job-wide `HubCalls::rejoin_ids`) -> (rank, node, decision).
    restarts: BTreeMap<u64, (Rank, NodeId, policies::primitives::DecisionId)>,
    /// The ranks restarting together (one failure): rank -> its new card once its process
    /// said `Rejoining`.
    rejoining: BTreeMap<Rank, Option<Card>>,
    /// (survivor, restarted rank) pairs whose `PeerReplaced` is awaited.
    replacing: BTreeSet<(Rank, Rank)>,
    /// rank -> own checkpoints made safe.
    safe: Vec<u64>,
    /// rank -> ranks on its node at the job's start (`KRUN_LOCAL_SIZE`).
    local_size: Vec<u32>,
    /// Without logging: (rank, policy version) -> its channel counts since the program's
    /// start (sent to, delivered from each rank).
    counts: BTreeMap<(Rank, Version), Counts>,
    /// rank -> the counts its running process started from (those of the checkpoint it was
    /// restored from; zero at the start): its reports count from its own start.
    base: Vec<Counts>,
    /// A switch back to the coordinated policy (`swap.rs`): rank -> (safepoint index, the
    /// version its checkpointer takes next), as the ranks answered `Realign`.
    pub(super) realign: Option<BTreeMap<Rank, (u64, u64)>>,
    /// The recovery in progress re-wires the job (its `RecoveryLine` says `rewire`: the
    /// job's wiring had not finished): with logging too, its restarts are carried out as
    /// the line without logging, in one new wiring epoch, not as lone rejoins.
    pub(super) rewire: bool,
}

/// A rank's channel counts: messages sent to each rank, delivered from each rank.
type Counts = (Vec<u64>, Vec<u64>);

impl Uncoord {
    /// For ranks placed on `placement` (rank -> node) at the job's start.
    pub(in crate::runtime) fn new(placement: &[NodeId], logging: bool) -> Uncoord {
        let ranks = placement.len();
        let local_size = placement
            .iter()
            .map(|n| placement.iter().filter(|m| *m == n).count() as u32)
            .collect();
        Uncoord {
            local_size,
            logging,
            native: vec![0; ranks],
            versions: BTreeMap::new(),
            capturing: BTreeMap::new(),
            cards: vec![None; ranks],
            restarts: BTreeMap::new(),
            rejoining: BTreeMap::new(),
            replacing: BTreeSet::new(),
            safe: vec![0; ranks],
            counts: BTreeMap::new(),
            base: vec![(vec![0; ranks], vec![0; ranks]); ranks],
            realign: None,
            rewire: false,
        }
    }

    /// The state of a running job that switched to this policy (with logging) at the
    /// coordinated checkpoint `version` (checkpointer version `native` on every rank):
    /// that checkpoint is every rank's first own one; `start`: the ranks' nodes at the
    /// job's start (their buddies' stride); `cards`: the log cards the ranks sent at the
    /// cut; `commits`: the job's commit count so far (`--inject-failure node=N@Kckpt`
    /// counts on from it).
    pub(in crate::runtime) fn at_cut(
        start: &[NodeId],
        native: u64,
        version: Version,
        cards: &BTreeMap<Rank, Card>,
        commits: u64,
    ) -> Uncoord {
        let mut u = Uncoord::new(start, true);
        for r in 0..start.len() {
            u.native[r] = native;
            u.versions.insert((r as Rank, native), version);
            u.safe[r] = commits;
            u.cards[r] = cards.get(&(r as Rank)).cloned();
        }
        u
    }

    /// The newest version the ranks' checkpointers took or were ordered to.
    pub(in crate::runtime) fn newest_native(&self) -> u64 {
        let captures = self.capturing.values().map(|c| c.2);
        self.native
            .iter()
            .copied()
            .chain(captures)
            .max()
            .unwrap_or(0)
    }

    /// The highest policy version used for any rank.
    pub(in crate::runtime) fn newest_version(&self) -> Version {
        let captures = self.capturing.values().map(|c| c.1);
        self.versions
            .values()
            .copied()
            .chain(captures)
            .max()
            .unwrap_or(0)
    }

    fn native_of(&self, rank: Rank, version: Version) -> Option<u64> {
        self.versions
            .iter()
            .find(|(&(r, _), &v)| r == rank && v == version)
            .map(|(&(_, n), _)| n)
    }
}

/// A decision the policy recorded: a recovery line that re-wires the job makes its restarts
/// one wiring epoch until the recovery is over (see [`Uncoord::rewire`]).
pub(in crate::runtime::checkpoints) fn recorded(
    calls: &mut HubCalls,
    kind: &policies::primitives::DecisionKind,
) {
    use policies::primitives::DecisionKind;
    let Some(u) = calls.uncoord.as_mut() else {
        return;
    };
    match kind {
        DecisionKind::RecoveryLine { rewire, .. } => u.rewire = *rewire,
        DecisionKind::Recovered { .. } => u.rewire = false,
        _ => {}
    }
}

fn state(calls: &mut HubCalls) -> Result<&mut Uncoord, String> {
    calls
        .uncoord
        .as_mut()
        .ok_or_else(|| "the job did not start under the uncoordinated policy".to_string())
}
