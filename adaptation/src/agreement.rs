//! Agreement: configuration changes are committed by Raft (tikv's `raft-rs`, a sans-IO
//! `RawNode`) among a small set of supervisors before any node acts on them.
//!
//! API CONTRACT (the protocol is written against these signatures; keep them).
//!
//! Every call runs the `RawNode` ready loop to completion: entries and hard state go to an
//! in-memory log, messages come back in the output, committed changes are reported once each.
//! Raft ids are `NodeId + 1` because raft-rs reserves id 0 for "none".
//!
//! The group changes: its leader replaces a failed supervisor by a Raft configuration
//! change (one voter removed or added at a time, [`Agreement::propose_voter`]); each
//! committed one is reported as a [`Change::Promote`] or [`Change::Demote`] at its place
//! in the log. The log is compacted behind a snapshot of the agreed view
//! ([`Agreement::set_view`]); a new supervisor starts empty ([`Agreement::joining`]) and
//! catches up from that snapshot ([`AgreementOutput::restored`]).
use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType};
use raft::{Config, RawNode, SnapshotStatus};

use crate::error::{AdaptError, Result};
use crate::view::{decode_changes, encode_changes, Change, Epoch, NodeId, Proposal};

mod storage;
use storage::ViewStorage;

/// Entries kept behind the last applied one when the log is compacted (a follower that
/// lags by fewer catches up from entries, not from a snapshot).
pub const LOG_KEEP: u64 = 32;

/// Raft timing in ticks.
#[derive(Clone, Debug)]
pub struct AgreementConfig {
    pub heartbeat_ticks: usize,
    pub election_ticks: usize,
}

impl Default for AgreementConfig {
    fn default() -> Self {
        AgreementConfig {
            heartbeat_ticks: 2,
            election_ticks: 10,
        }
    }
}

/// Messages to send to other supervisors and changes committed, in log order.
#[derive(Debug, Default)]
pub struct AgreementOutput {
    pub messages: Vec<(NodeId, Vec<u8>)>,
    /// (Raft log index, change); each index is reported once, in increasing order.
    pub committed: Vec<(u64, Change)>,
    /// For each committed change (same order): the node that asked for it and the epoch it
    /// knew then (see [`Proposal`]). For a change of the group itself: the member that
    /// applied it, and epoch 0.
    pub requested_by: Vec<(NodeId, Epoch)>,
    /// A snapshot from the leader replaced this member's log: the changes agreed up to it
    /// (reported before `committed`, which follows it).
    pub restored: Option<Vec<Change>>,
}

/// The term and vote a member had when its node left the group. The node keeps it: a
/// member promoted again starts from it (not from term 0 with no vote), so that it never
/// votes twice in one term (a vote request of that term still in flight would otherwise get
/// a second vote, and two leaders could be elected in one term).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ballot {
    term: u64,
    vote: u64,
}

impl Ballot {
    /// The term of the ballot.
    pub fn term(&self) -> u64 {
        self.term
    }
}

/// One supervisor's Raft member.
pub struct Agreement {
    me: NodeId,
    /// Nodes whose Raft messages are taken: the supervisors of the view this node knows
    /// (see [`Agreement::set_peers`]); the voters of the Raft configuration are taken too.
    peers: BTreeSet<NodeId>,
    node: RawNode<ViewStorage>,
    /// The election timeout this member uses (see [`election_timeout_for`]), ranked among
    /// the voters of the configuration it applied; `seed` and `election_ticks` give it.
    election_timeout: usize,
    seed: u64,
    election_ticks: usize,
    /// Highest log index already handed to the caller (reported or skipped).
    applied: u64,
    /// Set when raft-rs panicked inside a call; the member then stops (fail-stop), because
    /// its state may be half-updated and must not vote or replicate any more.
    failed: bool,
}

fn raft_id(n: NodeId) -> u64 {
    u64::from(n) + 1
}

fn node_id(id: u64) -> Option<NodeId> {
    id.checked_sub(1).and_then(|n| NodeId::try_from(n).ok())
}

/// SplitMix64 finaliser: a fixed, well-mixed hash so timeouts depend on the seed only.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The election timeout of `me`, in `[election_ticks, 2 * election_ticks)`.
///
/// raft-rs draws the timeout from its own thread rng in `[min, max)`; the member replaces
/// the draw by this after every call, which removes that randomness. The supervisors (the
/// voters of the configuration applied) are ranked by a seeded hash and spread
/// evenly over the range, so (up to `election_ticks` supervisors) no two share a timeout and
/// repeated split votes between two candidates that always time out together cannot happen.
fn election_timeout_for(
    me: NodeId,
    supervisors: &[NodeId],
    seed: u64,
    election_ticks: usize,
) -> usize {
    let key = |n: NodeId| (mix(seed ^ mix(u64::from(n))), n);
    let mine = key(me);
    let rank = supervisors.iter().filter(|&&n| key(n) < mine).count();
    election_ticks + rank * election_ticks / supervisors.len().max(1)
}

fn bad(from: NodeId, reason: impl Into<String>) -> AdaptError {
    AdaptError::BadMessage {
        from: format!("supervisor {from}"),
        reason: reason.into(),
    }
}

impl Agreement {
    /// A Raft member `me` of the group `supervisors` (which must contain `me`); randomness
    /// comes from `seed` only.
    pub fn new(
        me: NodeId,
        supervisors: &[NodeId],
        seed: u64,
        config: AgreementConfig,
    ) -> Result<Self> {
        let mut sups = supervisors.to_vec();
        sups.sort_unstable();
        sups.dedup();
        if sups.len() != supervisors.len() {
            return Err(AdaptError::Config {
                what: "supervisors".into(),
                reason: "duplicate supervisor ids".into(),
            });
        }
        if !sups.contains(&me) {
            return Err(AdaptError::Config {
                what: "supervisors".into(),
                reason: format!("node {me} is not one of the supervisors {sups:?}"),
            });
        }
        let voters: Vec<u64> = sups.iter().map(|&n| raft_id(n)).collect();
        let storage = ViewStorage::genesis(voters, encode_changes(&[]));
        Agreement::with_storage(me, &sups, seed, config, storage, 1)
    }

    /// A member added to the group by a configuration change (see [`Change::Promote`]):
    /// it starts with an empty log and catches up from the leader's snapshot; `supervisors`
    /// are the group as this node knows it.
    pub fn joining(
        me: NodeId,
        supervisors: &[NodeId],
        seed: u64,
        config: AgreementConfig,
    ) -> Result<Self> {
        Agreement::joining_after(me, supervisors, seed, config, Ballot::default())
    }

    /// As [`Agreement::joining`], for a node that was a supervisor before (demoted, now
    /// promoted again): its member starts from the term and vote it had then
    /// ([`Agreement::ballot`]).
    pub fn joining_after(
        me: NodeId,
        supervisors: &[NodeId],
        seed: u64,
        config: AgreementConfig,
        ballot: Ballot,
    ) -> Result<Self> {
        let mut sups = supervisors.to_vec();
        sups.push(me);
        sups.sort_unstable();
        sups.dedup();
        let mut storage = ViewStorage::default();
        storage.set_hard_state(raft::eraftpb::HardState {
            term: ballot.term,
            vote: ballot.vote,
            commit: 0,
            ..Default::default()
        });
        Agreement::with_storage(me, &sups, seed, config, storage, 0)
    }

    /// This member's current term and vote (what its node keeps when it leaves the group).
    pub fn ballot(&self) -> Ballot {
        Ballot {
            term: self.node.raft.term,
            vote: self.node.raft.vote,
        }
    }

    fn with_storage(
        me: NodeId,
        sups: &[NodeId],
        seed: u64,
        config: AgreementConfig,
        storage: ViewStorage,
        applied: u64,
    ) -> Result<Self> {
        if config.heartbeat_ticks == 0 || config.election_ticks <= config.heartbeat_ticks {
            return Err(AdaptError::Config {
                what: "agreement timing".into(),
                reason: format!(
                    "need 0 < heartbeat_ticks ({}) < election_ticks ({})",
                    config.heartbeat_ticks, config.election_ticks
                ),
            });
        }
        let election_timeout = election_timeout_for(me, sups, seed, config.election_ticks);
        let cfg = Config {
            id: raft_id(me),
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            // raft-rs draws a timeout in this range from its own rng at every reset; it is
            // replaced after every call by the seeded one (`pin_timeout`).
            min_election_tick: config.election_ticks,
            max_election_tick: 2 * config.election_ticks,
            // A rejoining or lagging member must not bump the term and depose a healthy
            // leader; a leader cut off from a majority must step down.
            pre_vote: true,
            check_quorum: true,
            max_inflight_msgs: 256,
            max_size_per_msg: 1 << 20,
            ..Default::default()
        };
        cfg.validate().map_err(|e| AdaptError::Config {
            what: "raft".into(),
            reason: e.to_string(),
        })?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node =
            RawNode::new(&cfg, storage, &logger).map_err(|e| AdaptError::Raft(e.to_string()))?;
        Ok(Agreement {
            me,
            peers: sups.iter().copied().filter(|&n| n != me).collect(),
            node,
            election_timeout,
            seed,
            election_ticks: config.election_ticks,
            applied,
            failed: false,
        })
        .map(|mut a: Agreement| {
            a.pin_timeout();
            a
        })
    }

    /// The supervisors of the view this node knows (their Raft messages are taken).
    pub fn set_peers(&mut self, supervisors: &BTreeSet<NodeId>) {
        self.peers = supervisors
            .iter()
            .copied()
            .filter(|&n| n != self.me)
            .collect();
        self.pin_timeout();
    }

    /// Sets the election timeout from the seed, ranked among the voters of the
    /// configuration applied here (the peers and this member before any): every member of
    /// one group gets a distinct timeout, also after the group changed (a member ranked in
    /// an older group could share its timeout with a new one, and two members timing out
    /// together split every vote forever).
    fn pin_timeout(&mut self) {
        if self.failed {
            return;
        }
        let mut group: Vec<NodeId> = self.voters().into_iter().collect();
        if !group.contains(&self.me) {
            group = self.peers.iter().copied().collect();
            group.push(self.me);
        }
        let t = election_timeout_for(self.me, &group, self.seed, self.election_ticks);
        self.election_timeout = t;
        if self.node.raft.randomized_election_timeout() != t {
            self.node.raft.set_randomized_election_timeout(t);
        }
    }

    /// The voters of the Raft configuration this member applied (empty for a member that
    /// has not caught up yet).
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.node
            .store()
            .conf_state()
            .voters
            .iter()
            .filter_map(|&id| node_id(id))
            .collect()
    }

    /// Whether a configuration change is proposed and not applied yet (raft-rs takes one
    /// at a time).
    pub fn changing_voters(&self) -> bool {
        self.node.raft.has_pending_conf()
    }

    /// The leader proposes adding (`add`) or removing one voter. Like any proposal it may
    /// be lost; the caller proposes again once none is pending.
    pub fn propose_voter(&mut self, node: NodeId, add: bool) -> AgreementOutput {
        if self.leader() != Some(self.me) || self.changing_voters() {
            return AgreementOutput::default();
        }
        let mut cc = ConfChange {
            node_id: raft_id(node),
            ..Default::default()
        };
        cc.set_change_type(if add {
            ConfChangeType::AddNode
        } else {
            ConfChangeType::RemoveNode
        });
        self.guarded(|node| {
            let _ = node.propose_conf_change(Vec::new(), cc);
            Ok(())
        })
        .unwrap_or_default()
    }

    /// The leader hands its leadership to voter `to` (raft-rs sends it a `TimeoutNow` once
    /// its log is complete; it then campaigns at once): a leader that is to leave the group
    /// is removed by the next leader, not by itself.
    pub fn transfer_leadership(&mut self, to: NodeId) -> AgreementOutput {
        if self.leader() != Some(self.me) || to == self.me || !self.voters().contains(&to) {
            return AgreementOutput::default();
        }
        self.guarded(|node| {
            node.transfer_leader(raft_id(to));
            Ok(())
        })
        .unwrap_or_default()
    }

    /// Starts an election at once, as a leader transfer does (no pre-vote; voters grant it
    /// even while they still count on the old leader's lease). Only for when the leader's
    /// process is known to be gone (its links closed and it refuses connections): waiting
    /// out the lease would only add the election timeout to every agreement. A no-op on the
    /// leader and on a member that is not a voter.
    pub fn campaign_now(&mut self) -> AgreementOutput {
        if self.leader() == Some(self.me) || !self.voters().contains(&self.me) {
            return AgreementOutput::default();
        }
        let me = raft_id(self.me);
        self.guarded(|node| {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgTimeoutNow);
            m.to = me;
            // raft-rs starts the election itself (`hup(true)`); it declines while
            // configuration changes are pending, and the normal timeout then applies.
            let _ = node.step(m);
            Ok(())
        })
        .unwrap_or_default()
    }

    /// The agreed view after the last applied entry (`changes`, all agreed so far): the
    /// snapshot a member that needs compacted entries gets from now on. The log is then
    /// compacted up to [`LOG_KEEP`] entries behind.
    pub fn set_view(&mut self, changes: &[Change]) -> Result<()> {
        if self.failed || self.applied == 0 {
            return Ok(());
        }
        let store_err = |e: raft::Error| AdaptError::Raft(format!("storage: {e}"));
        let applied = self.applied;
        let store = self.node.mut_store();
        store
            .set_latest(applied, encode_changes(changes))
            .map_err(store_err)?;
        if applied > store.compacted() + 2 * LOG_KEEP {
            store.compact(applied - LOG_KEEP).map_err(store_err)?;
        }
        Ok(())
    }

    /// Log entries held (not compacted) and the index of the last compacted one.
    pub fn log_size(&self) -> (usize, u64) {
        let s = self.node.store();
        (s.held(), s.compacted())
    }

    /// The highest log index applied here.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Proposes a change; it may be lost (leader change), so callers retry until they see it
    /// committed. On a follower the proposal is forwarded to the leader when one is known.
    pub fn propose(&mut self, change: &Change) -> AgreementOutput {
        let me = self.me;
        self.propose_by(&Proposal {
            change: change.clone(),
            by: me,
            epoch: 0,
        })
    }

    /// Proposes a change asked for by `proposal.by` (this node, or the node that sent it a
    /// `Propose`); see [`Proposal`].
    pub fn propose_by(&mut self, proposal: &Proposal) -> AgreementOutput {
        let data = proposal.encode();
        // An error here means the proposal was dropped (no leader known, leadership being
        // transferred); the caller retries, so it is not reported.
        self.guarded(|node| {
            let _ = node.propose(Vec::new(), data);
            Ok(())
        })
        .unwrap_or_default()
    }

    /// One logical clock tick.
    pub fn tick(&mut self) -> AgreementOutput {
        self.guarded(|node| {
            node.tick();
            Ok(())
        })
        .unwrap_or_default()
    }

    /// A Raft message from supervisor `from`; bytes that do not decode give an error.
    pub fn handle(&mut self, from: NodeId, bytes: &[u8]) -> Result<AgreementOutput> {
        let m = parse_message(bytes).map_err(|e| bad(from, format!("not a raft message: {e}")))?;
        self.check(from, &m).map_err(|reason| bad(from, reason))?;
        self.guarded(|node| match node.step(m) {
            // A forwarded proposal reaching a member that cannot take it: the proposer retries.
            Ok(()) | Err(raft::Error::ProposalDropped) => Ok(()),
            Err(e) => Err(AdaptError::Raft(e.to_string())),
        })
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<NodeId> {
        if self.failed {
            return None;
        }
        node_id(self.node.raft.leader_id)
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.me
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// The ticks without a heartbeat after which this member starts an election.
    pub fn election_timeout(&self) -> usize {
        self.election_timeout
    }

    /// True once raft-rs hit an internal assertion (only a forged, well-formed message can
    /// cause that); the member then ignores every call, as if it had crashed.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Refuses what raft-rs would mishandle or panic on: messages that are not from the
    /// claimed sender or not for us, local-only or unused kinds, proposals that are not
    /// changes. Authentication is the wire layer's job; this catches mix-ups and corruption.
    fn check(&self, from: NodeId, m: &Message) -> std::result::Result<(), String> {
        if self.failed {
            return Err("this member has stopped after an internal raft error".into());
        }
        if from == self.me || !(self.peers.contains(&from) || self.voters().contains(&from)) {
            return Err(format!("node {from} is not another supervisor"));
        }
        if m.from != raft_id(from) {
            return Err(format!(
                "message claims raft sender {}, expected {}",
                m.from,
                raft_id(from)
            ));
        }
        if m.to != raft_id(self.me) {
            return Err(format!(
                "message is for raft id {}, not {}",
                m.to,
                raft_id(self.me)
            ));
        }
        use MessageType::*;
        let entries_ok = |allow_empty_data: bool| {
            m.entries.iter().all(|e: &Entry| match e.get_entry_type() {
                EntryType::EntryNormal => {
                    (allow_empty_data && e.data.is_empty()) || Proposal::decode(&e.data).is_some()
                }
                // Only the leader proposes changes of the group (never forwarded).
                EntryType::EntryConfChange => allow_empty_data && voter_change(&e.data).is_some(),
                EntryType::EntryConfChangeV2 => false,
            })
        };
        match m.get_msg_type() {
            MsgPropose => {
                if m.entries.is_empty() || !entries_ok(false) {
                    return Err("proposal without changes or with other entries".into());
                }
            }
            MsgAppend => {
                // Leaders append empty entries on election; we never propose anything but
                // changes (no conf changes).
                if !entries_ok(true) {
                    return Err("append of entries that are not changes".into());
                }
                let consecutive = m
                    .entries
                    .iter()
                    .enumerate()
                    .all(|(i, e)| Some(e.index) == m.index.checked_add(i as u64 + 1));
                if !consecutive {
                    return Err("append with non-consecutive indices".into());
                }
                // raft-rs reads the term of an index past our log as 0, so this would
                // "match" and append after a gap (an assertion failure); real logs have no
                // term-0 entry past index 0.
                if m.index > 0 && m.log_term == 0 {
                    return Err("append after an index of term 0".into());
                }
            }
            MsgHeartbeat => {
                // raft-rs asserts a heartbeat never commits past our log; a real leader only
                // sends what we acknowledged. Stale terms are ignored by raft-rs anyway.
                if m.term >= self.node.raft.term && m.commit > self.node.raft.raft_log.last_index()
                {
                    return Err(format!("heartbeat commits {} beyond our log", m.commit));
                }
            }
            MsgAppendResponse => {
                // Within our term the log only grows, so a real follower cannot have
                // acknowledged more than we hold; a forged ack would count towards commit.
                if m.term == self.node.raft.term
                    && !m.reject
                    && m.index > self.node.raft.raft_log.last_index()
                {
                    return Err(format!("acknowledges index {} beyond our log", m.index));
                }
            }
            // raft-rs panics answering a vote request of term 0 (a real candidate's term is
            // at least 1), and would count a term-0 grant.
            MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
                if m.term == 0 =>
            {
                return Err(format!("{:?} of term 0", m.get_msg_type()));
            }
            MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
            | MsgHeartbeatResponse => {}
            MsgSnapshot => check_snapshot(m)?,
            // The leader hands its leadership over (see `transfer_leadership`): only from
            // the leader of our term.
            MsgTimeoutNow => {
                if m.term != self.node.raft.term || self.leader() != Some(from) {
                    return Err("TimeoutNow from a node that is not our term's leader".into());
                }
            }
            // Local kinds, leader transfer and read index are never sent by this module.
            t => return Err(format!("unexpected message kind {t:?}")),
        }
        Ok(())
    }

    /// Runs `f` on the node and then the ready loop, turning a raft-rs panic into an error
    /// and a stopped member instead of unwinding into the caller.
    fn guarded(
        &mut self,
        f: impl FnOnce(&mut RawNode<ViewStorage>) -> Result<()>,
    ) -> Result<AgreementOutput> {
        if self.failed {
            return Err(AdaptError::Raft(
                "member stopped after an internal raft error".into(),
            ));
        }
        let me = self.me;
        let node = &mut self.node;
        let applied = &mut self.applied;
        let run = catch_unwind(AssertUnwindSafe(|| -> Result<AgreementOutput> {
            f(node)?;
            let mut out = AgreementOutput::default();
            drain(me, node, applied, &mut out)?;
            Ok(out)
        }));
        match run {
            Ok(r) => {
                self.pin_timeout();
                r
            }
            Err(_) => {
                self.failed = true;
                Err(AdaptError::Raft("raft-rs panicked; member stopped".into()))
            }
        }
    }
}

/// Parses a raft message from exactly `bytes`. protobuf's own `parse_from_bytes` sets no
/// limit and reads raft's `Bytes` fields into a buffer of the announced length, so a field
/// announcing a huge length made it reserve up to 10 MB before finding the bytes missing.
/// Read from a `Bytes` input (fields are slices of it) with the input's length as the
/// limit, such a field fails at once.
fn parse_message(bytes: &[u8]) -> protobuf::ProtobufResult<Message> {
    let input = bytes::Bytes::copy_from_slice(bytes);
    let mut is = protobuf::CodedInputStream::from_carllerche_bytes(&input);
    is.push_limit(bytes.len() as u64)?;
    let mut m = Message::new();
    m.merge_from(&mut is)?;
    is.check_eof()?;
    m.check_initialized()?;
    Ok(m)
}

/// The change of the group a conf-change entry holds: (node, added), for the single-voter
/// changes this module proposes; `None` for anything else.
fn voter_change(data: &[u8]) -> Option<(NodeId, bool)> {
    let cc = ConfChange::parse_from_bytes(data).ok()?;
    let node = node_id(cc.node_id)?;
    match cc.get_change_type() {
        ConfChangeType::AddNode => Some((node, true)),
        ConfChangeType::RemoveNode => Some((node, false)),
        ConfChangeType::AddLearnerNode => None,
    }
}

/// A snapshot raft-rs can restore without tripping: a plain configuration of voters and an
/// agreed view that decodes.
fn check_snapshot(m: &Message) -> std::result::Result<(), String> {
    let snap = m.get_snapshot();
    let meta = snap.get_metadata();
    let cs = meta.get_conf_state();
    if meta.index == 0 || meta.term == 0 || m.term == 0 {
        return Err("snapshot at index or term 0".into());
    }
    if cs.voters.is_empty()
        || cs.voters.iter().any(|&v| node_id(v).is_none())
        || !cs.learners.is_empty()
        || !cs.voters_outgoing.is_empty()
        || !cs.learners_next.is_empty()
        || cs.auto_leave
    {
        return Err(format!("snapshot with an unexpected configuration {cs:?}"));
    }
    if decode_changes(&snap.data).is_none() {
        return Err("snapshot whose data is not an agreed view".into());
    }
    Ok(())
}

/// The ready loop: persist, send, apply, advance, until raft-rs has nothing more.
fn drain(
    me: NodeId,
    node: &mut RawNode<ViewStorage>,
    applied: &mut u64,
    out: &mut AgreementOutput,
) -> Result<()> {
    let store_err = |e: raft::Error| AdaptError::Raft(format!("storage: {e}"));
    // One round normally suffices; the bound only guards against a library bug looping.
    for _ in 0..16 {
        if !node.has_ready() {
            break;
        }
        let mut rd = node.ready();
        // Messages of the Ready may leave before persisting (leader-side parallelism).
        send(me, node, rd.take_messages(), out);
        if !rd.snapshot().is_empty() {
            // The leader's snapshot replaces this member's log and view.
            let snap = rd.snapshot().clone();
            node.mut_store().apply_snapshot(&snap).map_err(store_err)?;
            let changes = decode_changes(&snap.data)
                .ok_or_else(|| AdaptError::Raft("snapshot without an agreed view".into()))?;
            *applied = snap.get_metadata().index;
            out.restored = Some(changes);
            out.committed.clear();
            out.requested_by.clear();
        }
        if !rd.entries().is_empty() {
            node.mut_store().append(rd.entries()).map_err(store_err)?;
        }
        if let Some(hs) = rd.hs() {
            node.mut_store().set_hard_state(hs.clone());
        }
        // Votes and append responses must only leave once the log is persisted.
        send(me, node, rd.take_persisted_messages(), out);
        apply(me, node, rd.take_committed_entries(), applied, out)?;
        let mut light = node.advance(rd);
        if let Some(commit) = light.commit_index() {
            node.mut_store().set_commit(commit);
        }
        send(me, node, light.take_messages(), out);
        apply(me, node, light.take_committed_entries(), applied, out)?;
        node.advance_apply();
    }
    Ok(())
}

fn send(
    me: NodeId,
    node: &mut RawNode<ViewStorage>,
    msgs: Vec<Message>,
    out: &mut AgreementOutput,
) {
    for m in msgs {
        let Some(to) = node_id(m.to) else { continue };
        if to == me {
            continue;
        }
        if let Ok(bytes) = m.write_to_bytes() {
            out.messages.push((to, bytes));
        }
        if m.get_msg_type() == MessageType::MsgSnapshot {
            // Counted as delivered: the leader goes on probing the member, which asks for
            // it again if it was lost (else the leader would wait for it forever).
            node.report_snapshot(m.to, SnapshotStatus::Finish);
        }
    }
}

fn apply(
    me: NodeId,
    node: &mut RawNode<ViewStorage>,
    entries: Vec<Entry>,
    applied: &mut u64,
    out: &mut AgreementOutput,
) -> Result<()> {
    for e in entries {
        if e.index <= *applied {
            continue;
        }
        *applied = e.index;
        // Empty entries are appended by new leaders.
        if e.data.is_empty() {
            continue;
        }
        match e.get_entry_type() {
            EntryType::EntryNormal => {
                if let Some(p) = Proposal::decode(&e.data) {
                    out.committed.push((e.index, p.change));
                    out.requested_by.push((p.by, p.epoch));
                }
            }
            EntryType::EntryConfChange => {
                let Ok(cc) = ConfChange::parse_from_bytes(&e.data) else {
                    continue;
                };
                let before: BTreeSet<u64> =
                    node.store().conf_state().voters.iter().copied().collect();
                let cs = node
                    .apply_conf_change(&cc)
                    .map_err(|e| AdaptError::Raft(format!("configuration change: {e}")))?;
                let after: BTreeSet<u64> = cs.voters.iter().copied().collect();
                node.mut_store().set_conf_state(cs);
                for id in after.difference(&before).filter_map(|&id| node_id(id)) {
                    out.committed.push((e.index, Change::Promote { node: id }));
                    out.requested_by.push((me, 0));
                }
                for id in before.difference(&after).filter_map(|&id| node_id(id)) {
                    out.committed.push((e.index, Change::Demote { node: id }));
                    out.requested_by.push((me, 0));
                }
            }
            EntryType::EntryConfChangeV2 => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
