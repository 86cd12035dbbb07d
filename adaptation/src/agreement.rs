//! Agreement: configuration changes are committed by Raft (tikv's `raft-rs`, a sans-IO
//! `RawNode`) among a small set of supervisors before any node acts on them.
//!
//! API CONTRACT (the protocol is written against these signatures; keep them).
//!
//! Every call runs the `RawNode` ready loop to completion: entries and hard state go to an
//! in-memory log, messages come back in the output, committed changes are reported once each.
//! Raft ids are `NodeId + 1` because raft-rs reserves id 0 for "none".
use std::panic::{catch_unwind, AssertUnwindSafe};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType};
use raft::storage::MemStorage;
use raft::{Config, RawNode};

use crate::error::{AdaptError, Result};
use crate::view::{Change, Epoch, NodeId, Proposal};

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
    /// knew then (see [`Proposal`]).
    pub requested_by: Vec<(NodeId, Epoch)>,
}

/// One supervisor's Raft member.
pub struct Agreement {
    me: NodeId,
    /// Sorted, without duplicates.
    supervisors: Vec<NodeId>,
    node: RawNode<MemStorage>,
    /// The single election timeout this member uses (see [`election_timeout_for`]).
    election_timeout: usize,
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
/// raft-rs draws the timeout from its own thread rng in `[min, max)`; giving it a one-value
/// range removes that randomness. The supervisors are ranked by a seeded hash and spread
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
        if config.heartbeat_ticks == 0 || config.election_ticks <= config.heartbeat_ticks {
            return Err(AdaptError::Config {
                what: "agreement timing".into(),
                reason: format!(
                    "need 0 < heartbeat_ticks ({}) < election_ticks ({})",
                    config.heartbeat_ticks, config.election_ticks
                ),
            });
        }
        let election_timeout = election_timeout_for(me, &sups, seed, config.election_ticks);
        let cfg = Config {
            id: raft_id(me),
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            min_election_tick: election_timeout,
            max_election_tick: election_timeout + 1,
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
        let voters: Vec<u64> = sups.iter().map(|&n| raft_id(n)).collect();
        let storage = MemStorage::new_with_conf_state(ConfState::from((voters, vec![])));
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node =
            RawNode::new(&cfg, storage, &logger).map_err(|e| AdaptError::Raft(e.to_string()))?;
        Ok(Agreement {
            me,
            supervisors: sups,
            node,
            election_timeout,
            applied: 0,
            failed: false,
        })
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
        if from == self.me || !self.supervisors.contains(&from) {
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
            m.entries.iter().all(|e: &Entry| {
                e.get_entry_type() == EntryType::EntryNormal
                    && ((allow_empty_data && e.data.is_empty())
                        || Proposal::decode(&e.data).is_some())
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
            // Local kinds, snapshots (the log is never compacted), leader transfer and read
            // index are never sent by this module.
            t => return Err(format!("unexpected message kind {t:?}")),
        }
        Ok(())
    }

    /// Runs `f` on the node and then the ready loop, turning a raft-rs panic into an error
    /// and a stopped member instead of unwinding into the caller.
    fn guarded(
        &mut self,
        f: impl FnOnce(&mut RawNode<MemStorage>) -> Result<()>,
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
            Ok(r) => r,
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

/// The ready loop: persist, send, apply, advance, until raft-rs has nothing more.
fn drain(
    me: NodeId,
    node: &mut RawNode<MemStorage>,
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
        send(me, rd.take_messages(), out);
        // No snapshot is ever produced or accepted (no compaction, MsgSnapshot refused).
        if !rd.entries().is_empty() {
            node.store().wl().append(rd.entries()).map_err(store_err)?;
        }
        if let Some(hs) = rd.hs() {
            node.store().wl().set_hardstate(hs.clone());
        }
        // Votes and append responses must only leave once the log is persisted.
        send(me, rd.take_persisted_messages(), out);
        apply(rd.take_committed_entries(), applied, out);
        let mut light = node.advance(rd);
        if let Some(commit) = light.commit_index() {
            node.store().wl().mut_hard_state().set_commit(commit);
        }
        send(me, light.take_messages(), out);
        apply(light.take_committed_entries(), applied, out);
        node.advance_apply();
    }
    Ok(())
}

fn send(me: NodeId, msgs: Vec<Message>, out: &mut AgreementOutput) {
    for m in msgs {
        let Some(to) = node_id(m.to) else { continue };
        if to == me {
            continue;
        }
        if let Ok(bytes) = m.write_to_bytes() {
            out.messages.push((to, bytes));
        }
    }
}

fn apply(entries: Vec<Entry>, applied: &mut u64, out: &mut AgreementOutput) {
    for e in entries {
        if e.index <= *applied {
            continue;
        }
        *applied = e.index;
        // Empty entries are appended by new leaders; conf changes are never proposed.
        if e.data.is_empty() || e.get_entry_type() != EntryType::EntryNormal {
            continue;
        }
        if let Some(p) = Proposal::decode(&e.data) {
            out.committed.push((e.index, p.change));
            out.requested_by.push((p.by, p.epoch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};

    /// One output of one member, for comparing runs.
    type Event = (u64, NodeId, Vec<(NodeId, Vec<u8>)>, Vec<(u64, Change)>);

    /// Supervisors exchanging messages with seeded random delays (1..=3 ticks), reordering
    /// and optional loss; crashed members get no ticks and their traffic is dropped.
    struct Sim {
        members: BTreeMap<NodeId, Agreement>,
        crashed: BTreeSet<NodeId>,
        /// Members that keep ticking but whose traffic is dropped (a network partition).
        cut: BTreeSet<NodeId>,
        /// (due tick, from, to, bytes)
        queue: Vec<(u64, NodeId, NodeId, Vec<u8>)>,
        now: u64,
        rng: SmallRng,
        loss: f64,
        logs: BTreeMap<NodeId, Vec<(u64, Change)>>,
        trace: Vec<Event>,
    }

    impl Sim {
        fn new(n: u32, seed: u64, loss: f64) -> Sim {
            let ids: Vec<NodeId> = (0..n).map(|i| 10 + 3 * i).collect();
            let members = ids
                .iter()
                .map(|&id| {
                    let a = Agreement::new(id, &ids, seed, AgreementConfig::default()).unwrap();
                    (id, a)
                })
                .collect();
            Sim {
                members,
                crashed: BTreeSet::new(),
                cut: BTreeSet::new(),
                queue: Vec::new(),
                now: 0,
                rng: SmallRng::seed_from_u64(seed),
                loss,
                logs: ids.iter().map(|&id| (id, Vec::new())).collect(),
                trace: Vec::new(),
            }
        }

        fn alive(&self) -> Vec<NodeId> {
            self.members
                .keys()
                .copied()
                .filter(|id| !self.crashed.contains(id))
                .collect()
        }

        fn absorb(&mut self, id: NodeId, out: AgreementOutput) {
            let log = self.logs.get_mut(&id).unwrap();
            for (index, change) in &out.committed {
                if let Some((last, _)) = log.last() {
                    assert!(index > last, "{id}: index {index} after {last}");
                }
                log.push((*index, change.clone()));
            }
            for (to, bytes) in &out.messages {
                assert!(self.members.contains_key(to) && *to != id);
                if self.rng.gen_bool(self.loss) {
                    continue;
                }
                let due = self.now + self.rng.gen_range(1..=3);
                self.queue.push((due, id, *to, bytes.clone()));
            }
            if !out.messages.is_empty() || !out.committed.is_empty() {
                self.trace.push((self.now, id, out.messages, out.committed));
            }
        }

        fn step(&mut self) {
            self.now += 1;
            for id in self.alive() {
                let out = self.members.get_mut(&id).unwrap().tick();
                self.absorb(id, out);
            }
            let now = self.now;
            let (mut due, rest): (Vec<_>, Vec<_>) = self.queue.drain(..).partition(|m| m.0 <= now);
            self.queue = rest;
            due.shuffle(&mut self.rng);
            for (_, from, to, bytes) in due {
                let down = |n| self.crashed.contains(n) || self.cut.contains(n);
                if down(&from) || down(&to) {
                    continue;
                }
                let out = self.members.get_mut(&to).unwrap().handle(from, &bytes);
                let out = out.expect("a genuine message is accepted");
                self.absorb(to, out);
            }
        }

        fn propose(&mut self, id: NodeId, change: &Change) {
            let out = self.members.get_mut(&id).unwrap().propose(change);
            self.absorb(id, out);
        }

        /// The leader every live member agrees on, if any.
        fn agreed_leader(&self) -> Option<NodeId> {
            let alive = self.alive();
            let l = self.members[&alive[0]].leader()?;
            let all = alive.iter().all(|id| self.members[id].leader() == Some(l));
            (all && !self.crashed.contains(&l)).then_some(l)
        }

        fn run_until_leader(&mut self, bound: u64) -> NodeId {
            for _ in 0..bound {
                if let Some(l) = self.agreed_leader() {
                    return l;
                }
                self.step();
            }
            panic!("no leader within {bound} ticks");
        }

        fn has(&self, id: NodeId, change: &Change) -> bool {
            self.logs[&id].iter().any(|(_, c)| c == change)
        }

        /// Each change is proposed by its member and re-proposed every 15 ticks until that
        /// member sees it committed; then runs until every live member has them all.
        fn commit_all(&mut self, work: &[(NodeId, Change)], bound: u64) {
            let mut next_try = vec![self.now; work.len()];
            for _ in 0..bound {
                let alive = self.alive();
                if work
                    .iter()
                    .all(|(_, c)| alive.iter().all(|&id| self.has(id, c)))
                {
                    return;
                }
                for (i, (id, change)) in work.iter().enumerate() {
                    if !self.has(*id, change) && next_try[i] <= self.now {
                        self.propose(*id, change);
                        next_try[i] = self.now + 15;
                    }
                }
                self.step();
            }
            panic!("changes not committed within {bound} ticks");
        }

        /// Live members hold the same log; crashed ones a prefix of it.
        fn check_logs(&self) {
            let alive = self.alive();
            let reference = &self.logs[&alive[0]];
            for (id, log) in &self.logs {
                if self.crashed.contains(id) {
                    assert_eq!(&reference[..log.len()], &log[..], "crashed {id} diverged");
                } else {
                    assert_eq!(reference, log, "{id} differs from {}", alive[0]);
                }
            }
        }
    }

    fn join(n: NodeId) -> Change {
        Change::Join {
            node: n,
            addr: format!("10.0.0.{n}:7000"),
        }
    }

    #[test]
    fn elects_a_leader_and_commits_proposals_from_any_member() {
        for (n, seed, loss) in [(3, 1, 0.0), (3, 2, 0.05), (5, 3, 0.0), (5, 4, 0.05)] {
            let mut sim = Sim::new(n, seed, loss);
            let leader = sim.run_until_leader(300);
            let ids = sim.alive();
            let work: Vec<(NodeId, Change)> = (0..12)
                .map(|i| (ids[i as usize % ids.len()], join(100 + i)))
                .collect();
            assert!(work.iter().any(|(id, _)| *id != leader));
            sim.commit_all(&work, 3000);
            for _ in 0..50 {
                sim.step();
            }
            sim.check_logs();
            // Retries may commit a change twice; the caller dedupes by equality.
            let distinct: BTreeSet<&Change> = sim.logs[&leader].iter().map(|(_, c)| c).collect();
            assert_eq!(distinct.len(), work.len());
        }
    }

    /// Elects, commits, crashes the leader, elects again and commits more; returns the sim.
    fn crash_scenario(n: u32, seed: u64) -> Sim {
        let mut sim = Sim::new(n, seed, 0.0);
        let first = sim.run_until_leader(300);
        let ids = sim.alive();
        let before: Vec<_> = (0..3)
            .map(|i| (ids[i % ids.len()], join(200 + i as u32)))
            .collect();
        sim.commit_all(&before, 3000);
        let old_term = sim.members[&first].term();
        sim.crashed.insert(first);
        let second = sim.run_until_leader(500);
        assert_ne!(second, first);
        assert!(sim.members[&second].term() > old_term);
        let alive = sim.alive();
        let after: Vec<_> = (0..6)
            .map(|i| (alive[i % alive.len()], join(300 + i as u32)))
            .collect();
        sim.commit_all(&after, 3000);
        for _ in 0..50 {
            sim.step();
        }
        sim.check_logs();
        sim
    }

    #[test]
    fn a_crashed_leader_is_replaced_and_commits_continue() {
        for (n, seed) in [(3, 11), (5, 12), (5, 13)] {
            crash_scenario(n, seed);
        }
    }

    #[test]
    fn a_partitioned_leader_steps_down_and_cut_members_rejoin_without_disruption() {
        let mut sim = Sim::new(5, 61, 0.0);
        let first = sim.run_until_leader(300);
        sim.cut.insert(first);
        // check_quorum: without acknowledgements the old leader gives up leadership.
        let mut stepped_down = false;
        for _ in 0..100 {
            sim.step();
            if sim.members[&first].leader() != Some(first) {
                stepped_down = true;
                break;
            }
        }
        assert!(stepped_down, "an isolated leader keeps leading");
        let others: Vec<NodeId> = sim.alive().into_iter().filter(|&n| n != first).collect();
        let mut second = None;
        for _ in 0..500 {
            sim.step();
            let l = sim.members[&others[0]].leader();
            if l.is_some()
                && l != Some(first)
                && others.iter().all(|n| sim.members[n].leader() == l)
            {
                second = l;
                break;
            }
        }
        let second = second.expect("the majority elects a new leader");
        // A follower cut off for a long time, then both heal: pre-vote keeps them from
        // raising the term, so the leader stays in place.
        let follower = *others.iter().find(|&&n| n != second).unwrap();
        sim.cut.insert(follower);
        for _ in 0..300 {
            sim.step();
        }
        let term = sim.members[&second].term();
        sim.cut.clear();
        for _ in 0..300 {
            sim.step();
        }
        assert_eq!(sim.agreed_leader(), Some(second));
        assert_eq!(sim.members[&second].term(), term);
        let work: Vec<_> = [first, follower]
            .iter()
            .map(|&n| (n, join(900 + n)))
            .collect();
        sim.commit_all(&work, 3000);
        for _ in 0..50 {
            sim.step();
        }
        sim.check_logs();
    }

    #[test]
    fn same_seed_same_outputs() {
        let a = crash_scenario(5, 42);
        let b = crash_scenario(5, 42);
        assert_eq!(a.trace, b.trace);
        assert_eq!(a.logs, b.logs);
        let c = crash_scenario(5, 43);
        assert_ne!(a.trace, c.trace, "the seed should matter");
    }

    #[test]
    fn election_timeouts_come_from_the_seed_and_differ() {
        let ids = [4, 8, 15, 16, 23];
        let timeouts = |seed| -> Vec<usize> {
            ids.iter()
                .map(|&me| Agreement::new(me, &ids, seed, AgreementConfig::default()).unwrap())
                .map(|a| a.election_timeout())
                .collect()
        };
        let t = timeouts(5);
        assert_eq!(t, timeouts(5));
        assert!(t.iter().all(|&x| (10..20).contains(&x)));
        assert_eq!(t.iter().collect::<BTreeSet<_>>().len(), ids.len());
    }

    #[test]
    fn no_majority_no_progress() {
        let mut sim = Sim::new(3, 21, 0.0);
        let leader = sim.run_until_leader(300);
        let ids = sim.alive();
        sim.commit_all(&[(ids[0], join(500))], 3000);
        let survivor = *ids.iter().find(|&&id| id != leader).unwrap();
        for id in ids.iter().filter(|&&id| id != survivor) {
            sim.crashed.insert(*id);
        }
        let committed = sim.logs[&survivor].len();
        for t in 0..600 {
            if t % 10 == 0 {
                sim.propose(survivor, &join(501));
            }
            sim.step();
        }
        assert_eq!(sim.logs[&survivor].len(), committed);
        assert_eq!(sim.members[&survivor].leader(), None);
    }

    #[test]
    fn garbage_and_mismatched_senders_are_refused_without_effect() {
        let mut sim = Sim::new(3, 31, 0.0);
        let leader = sim.run_until_leader(300);
        let ids = sim.alive();
        sim.commit_all(&[(ids[1], join(600))], 3000);
        let target = *ids.iter().find(|&&id| id != leader).unwrap();
        let other = *ids
            .iter()
            .find(|&&id| id != leader && id != target)
            .unwrap();
        // A genuine message from the leader to `target`.
        let mut genuine = None;
        for _ in 0..20 {
            sim.step();
            genuine = sim
                .queue
                .iter()
                .find(|m| m.1 == leader && m.2 == target)
                .map(|m| m.3.clone());
            if genuine.is_some() {
                break;
            }
        }
        let genuine = genuine.expect("the leader talks to its followers");
        let state = |a: &Agreement| {
            let r = &a.node.raft;
            (
                r.term,
                r.leader_id,
                r.raft_log.committed,
                r.raft_log.last_index(),
                a.applied,
            )
        };
        let before = state(&sim.members[&target]);
        let mut rng = SmallRng::seed_from_u64(5);
        let member = sim.members.get_mut(&target).unwrap();
        for _ in 0..500 {
            let len = rng.gen_range(0..80);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            assert!(member.handle(leader, &bytes).is_err());
        }
        // Right bytes, wrong sender argument / not a supervisor / ourselves.
        assert!(member.handle(other, &genuine).is_err());
        assert!(member.handle(999, &genuine).is_err());
        assert!(member.handle(target, &genuine).is_err());
        // Forged fields.
        let m = Message::parse_from_bytes(&genuine).unwrap();
        let mut forged = m.clone();
        forged.from = raft_id(other);
        assert!(member
            .handle(leader, &forged.write_to_bytes().unwrap())
            .is_err());
        let mut forged = m.clone();
        forged.to = raft_id(other);
        assert!(member
            .handle(leader, &forged.write_to_bytes().unwrap())
            .is_err());
        let mut forged = m.clone();
        forged.set_msg_type(MessageType::MsgHup);
        assert!(member
            .handle(leader, &forged.write_to_bytes().unwrap())
            .is_err());
        let mut forged = Message::default();
        forged.set_msg_type(MessageType::MsgPropose);
        forged.from = raft_id(leader);
        forged.to = raft_id(target);
        assert!(member
            .handle(leader, &forged.write_to_bytes().unwrap())
            .is_err());
        let mut forged = Message::default();
        forged.set_msg_type(MessageType::MsgHeartbeat);
        forged.from = raft_id(leader);
        forged.to = raft_id(target);
        forged.term = m.term;
        forged.commit = 1 << 40;
        assert!(member
            .handle(leader, &forged.write_to_bytes().unwrap())
            .is_err());
        assert_eq!(state(&sim.members[&target]), before);
        assert!(!sim.members[&target].failed());
        // The group still works.
        sim.commit_all(&[(target, join(601))], 3000);
        sim.check_logs();
    }

    #[test]
    fn mutated_messages_never_panic_the_caller() {
        let mut sim = Sim::new(3, 41, 0.0);
        sim.run_until_leader(300);
        let ids = sim.alive();
        sim.commit_all(&[(ids[0], join(700)), (ids[1], join(701))], 3000);
        let mut rng = SmallRng::seed_from_u64(6);
        let mut samples = Vec::new();
        for _ in 0..40 {
            sim.step();
            samples.extend(sim.queue.iter().map(|m| (m.1, m.2, m.3.clone())));
        }
        let mut accepted = 0;
        for (from, to, bytes) in samples {
            for _ in 0..20 {
                let mut b = bytes.clone();
                for _ in 0..rng.gen_range(1..4) {
                    if b.is_empty() {
                        break;
                    }
                    let i = rng.gen_range(0..b.len());
                    b[i] = rng.gen();
                }
                // Ok, Err or a stopped member are all fine; unwinding is not.
                if sim.members.get_mut(&to).unwrap().handle(from, &b).is_ok() {
                    accepted += 1;
                }
            }
        }
        let stopped = sim.members.values().filter(|a| a.failed()).count();
        eprintln!("accepted {accepted} mutated messages; {stopped} members stopped");
        assert!(accepted > 0, "the mutations should reach raft-rs");
    }

    #[test]
    fn forged_messages_raft_rs_would_trip_on_are_refused() {
        let mut sim = Sim::new(3, 51, 0.0);
        let leader = sim.run_until_leader(300);
        let ids = sim.alive();
        sim.commit_all(&[(ids[0], join(800))], 3000);
        let target = *ids.iter().find(|&&id| id != leader).unwrap();
        let (term, last) = {
            let r = &sim.members[&leader].node.raft;
            (r.term, r.raft_log.last_index())
        };
        // An append past the end of the follower's log that claims term 0 there.
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = raft_id(leader);
        m.to = raft_id(target);
        m.term = term;
        m.index = last + 10;
        m.entries.push(Entry {
            index: last + 11,
            term,
            ..Default::default()
        });
        let member = sim.members.get_mut(&target).unwrap();
        assert!(member.handle(leader, &m.write_to_bytes().unwrap()).is_err());
        // An acknowledgement of entries the leader never had.
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppendResponse);
        m.from = raft_id(target);
        m.to = raft_id(leader);
        m.term = term;
        m.index = last + 1000;
        let member = sim.members.get_mut(&leader).unwrap();
        assert!(member.handle(target, &m.write_to_bytes().unwrap()).is_err());
        sim.commit_all(&[(target, join(801))], 3000);
        sim.check_logs();
    }

    #[test]
    fn a_panic_inside_raft_stops_the_member_instead_of_unwinding() {
        let ids = [1, 2, 3];
        let mut a = Agreement::new(1, &ids, 0, AgreementConfig::default()).unwrap();
        let r = a.guarded(|_| panic!("simulated raft-rs assertion"));
        assert!(matches!(r, Err(AdaptError::Raft(_))));
        assert!(a.failed());
        assert!(a.tick().messages.is_empty());
        assert!(a.propose(&join(1)).messages.is_empty());
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = raft_id(2);
        m.to = raft_id(1);
        assert!(a.handle(2, &m.write_to_bytes().unwrap()).is_err());
        assert_eq!(a.leader(), None);
    }

    #[test]
    fn bad_configuration_is_refused() {
        let cfg = AgreementConfig::default();
        assert!(Agreement::new(7, &[1, 2, 3], 0, cfg.clone()).is_err());
        assert!(Agreement::new(1, &[1, 2, 2], 0, cfg.clone()).is_err());
        let slow_heartbeat = AgreementConfig {
            heartbeat_ticks: 10,
            election_ticks: 10,
        };
        assert!(Agreement::new(1, &[1, 2, 3], 0, slow_heartbeat).is_err());
        // Extreme ids map to valid raft ids.
        let a = Agreement::new(NodeId::MAX, &[0, NodeId::MAX], 0, cfg).unwrap();
        assert_eq!(a.leader(), None);
    }

    #[test]
    fn a_single_supervisor_commits_alone() {
        let mut a = Agreement::new(5, &[5], 9, AgreementConfig::default()).unwrap();
        let mut committed = Vec::new();
        for _ in 0..40 {
            committed.extend(a.tick().committed);
        }
        assert_eq!(a.leader(), Some(5));
        let out = a.propose(&Change::Fail { node: 3 });
        assert!(out.messages.is_empty());
        committed.extend(out.committed);
        assert_eq!(committed, vec![(2, Change::Fail { node: 3 })]);
    }
}
