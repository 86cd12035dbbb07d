//! The Raft group in a simulated network: elections, commits, crashes, partitions, forged
//! and mutated messages, and changes of the group itself.
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
    /// Members that caught up from a snapshot, with the number of changes it held.
    restores: BTreeMap<NodeId, usize>,
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
            restores: BTreeMap::new(),
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
        if let Some(changes) = &out.restored {
            // Caught up from a snapshot: the changes agreed up to it, without indices.
            *log = changes.iter().map(|c| (0, c.clone())).collect();
            self.restores.insert(id, changes.len());
        }
        for (index, change) in &out.committed {
            if let Some((last, _)) = log.last() {
                assert!(index > last, "{id}: index {index} after {last}");
            }
            log.push((*index, change.clone()));
        }
        // The member's view after what it applied: the snapshot it serves from now on.
        let view = changes(log);
        self.members
            .get_mut(&id)
            .unwrap()
            .set_view(&view)
            .expect("set the view");
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
        if l.is_some() && l != Some(first) && others.iter().all(|n| sim.members[n].leader() == l) {
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
    // Index 1 is the initial configuration (a snapshot), 2 the leader's empty entry.
    assert_eq!(committed, vec![(3, Change::Fail { node: 3 })]);
}

/// The changes of `log`, without indices.
fn changes(log: &[(u64, Change)]) -> Vec<Change> {
    log.iter().map(|(_, c)| c.clone()).collect()
}

/// A live member that leads (the one of the highest term, if two believe they do).
fn self_leader(sim: &Sim) -> Option<NodeId> {
    sim.alive()
        .into_iter()
        .filter(|n| sim.members[n].leader() == Some(*n))
        .max_by_key(|n| sim.members[n].term())
}

/// Runs until a leader has no configuration change pending and sees `want` as voters.
fn settle_voters(sim: &mut Sim, want: &BTreeSet<NodeId>, bound: u64) {
    for _ in 0..bound {
        if let Some(l) = self_leader(sim) {
            let a = &sim.members[&l];
            if !a.changing_voters() && a.voters() == *want {
                return;
            }
        }
        sim.step();
    }
    panic!("voters {want:?} not reached within {bound} ticks");
}

/// Proposes a voter change at the leader until it is applied there.
fn change_voter(sim: &mut Sim, node: NodeId, add: bool) {
    let mut want = BTreeSet::new();
    for _ in 0..500 {
        if let Some(l) = self_leader(sim) {
            want = sim.members[&l].voters();
            break;
        }
        sim.step();
    }
    assert!(!want.is_empty(), "no leader");
    if add {
        want.insert(node);
    } else {
        want.remove(&node);
    }
    for _ in 0..60 {
        let Some(leader) = self_leader(sim) else {
            sim.step();
            continue;
        };
        if sim.members[&leader].voters() == want {
            break;
        }
        if !sim.members[&leader].changing_voters() {
            let out = sim
                .members
                .get_mut(&leader)
                .unwrap()
                .propose_voter(node, add);
            sim.absorb(leader, out);
        }
        for _ in 0..30 {
            sim.step();
        }
    }
    settle_voters(sim, &want, 1000);
}

#[test]
fn failed_supervisors_are_replaced_and_the_group_outlives_its_first_quorum() {
    for seed in [71, 72, 73] {
        let mut sim = Sim::new(3, seed, 0.02);
        let first = sim.run_until_leader(300);
        let ids = sim.alive();
        let work: Vec<_> = (0..90)
            .map(|i| (ids[i % ids.len()], join(1000 + i as u32)))
            .collect();
        sim.commit_all(&work, 20_000);
        // The log was compacted behind a snapshot: it holds far fewer entries than the
        // ~90 committed.
        let (held, compacted) = sim.members[&first].log_size();
        let applied = sim.members[&first].applied();
        assert!(
            applied > 90 && compacted > 0 && (held as u64) + 20 < applied,
            "held {held} of {applied} applied, compacted up to {compacted}"
        );
        // One supervisor dies; the leader removes it and adds a new member, which starts
        // empty and catches up from the snapshot.
        let victim = *ids
            .iter()
            .find(|&&n| Some(n) != sim.agreed_leader())
            .unwrap();
        sim.crashed.insert(victim);
        change_voter(&mut sim, victim, false);
        let newcomer = 100;
        let known: Vec<NodeId> = sim.alive();
        sim.members.insert(
            newcomer,
            Agreement::joining(newcomer, &known, seed, AgreementConfig::default()).unwrap(),
        );
        sim.logs.insert(newcomer, Vec::new());
        change_voter(&mut sim, newcomer, true);
        settle_voters(
            &mut sim,
            &[ids[0], ids[1], ids[2], newcomer]
                .into_iter()
                .filter(|&n| n != victim)
                .collect(),
            1000,
        );
        let leader = self_leader(&sim).expect("a leader");
        let voters = sim.members[&leader].voters();
        assert_eq!(voters.len(), 3);
        assert!(voters.contains(&newcomer) && !voters.contains(&victim));
        let mut more: Vec<_> = (0..5).map(|i| (newcomer, join(2000 + i))).collect();
        sim.commit_all(&more, 5000);
        assert!(
            sim.restores.get(&newcomer).is_some_and(|&n| n > 40),
            "the newcomer did not catch up from a snapshot: {:?}",
            sim.restores
        );
        // The leader's log (what it committed since its start) ends with what the newcomer
        // holds after its snapshot, and the newcomer saw both group changes.
        let lead = changes(&sim.logs[&leader]);
        let new = changes(&sim.logs[&newcomer]);
        assert_eq!(&lead[lead.len() - new.len()..], &new[..]);
        assert!(lead.contains(&Change::Demote { node: victim }));
        assert!(new.contains(&Change::Promote { node: newcomer }));
        // A second original supervisor dies: two of the three first ones are gone, more
        // than their group could lose, and changes are still committed.
        let second = *sim
            .alive()
            .iter()
            .find(|&&n| n != newcomer && n != leader)
            .unwrap_or(&leader);
        sim.crashed.insert(second);
        more = (0..3).map(|i| (newcomer, join(3000 + i))).collect();
        sim.commit_all(&more, 5000);
        let originals_dead = ids.iter().filter(|n| sim.crashed.contains(n)).count();
        assert_eq!(originals_dead, 2);
        for (_, c) in &more {
            assert!(sim.has(newcomer, c));
        }
    }
}

#[test]
fn forged_snapshots_and_group_changes_are_refused() {
    let mut sim = Sim::new(3, 81, 0.0);
    let leader = sim.run_until_leader(300);
    let ids = sim.alive();
    sim.commit_all(&[(ids[0], join(900))], 3000);
    let target = *ids.iter().find(|&&id| id != leader).unwrap();
    let term = sim.members[&leader].term();
    let snapshot = |data: Vec<u8>, voters: Vec<u64>| {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        m.from = raft_id(leader);
        m.to = raft_id(target);
        m.term = term;
        let snap = m.mut_snapshot();
        snap.set_data(data.into());
        snap.mut_metadata().index = 50;
        snap.mut_metadata().term = term;
        snap.mut_metadata().mut_conf_state().voters = voters;
        m.write_to_bytes().unwrap()
    };
    let member = sim.members.get_mut(&target).unwrap();
    let all: Vec<u64> = ids.iter().map(|&n| raft_id(n)).collect();
    // Data that is not an agreed view; a configuration without voters.
    assert!(member
        .handle(leader, &snapshot(vec![1, 2, 3], all.clone()))
        .is_err());
    assert!(member
        .handle(leader, &snapshot(encode_changes(&[]), vec![]))
        .is_err());
    // A forwarded proposal of a group change (only the leader proposes them).
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgPropose);
    m.from = raft_id(target);
    m.to = raft_id(leader);
    let mut cc = ConfChange {
        node_id: raft_id(999),
        ..Default::default()
    };
    cc.set_change_type(ConfChangeType::AddNode);
    let mut e = Entry::default();
    e.set_entry_type(EntryType::EntryConfChange);
    e.data = cc.write_to_bytes().unwrap().into();
    m.entries.push(e);
    let leader_member = sim.members.get_mut(&leader).unwrap();
    assert!(leader_member
        .handle(target, &m.write_to_bytes().unwrap())
        .is_err());
    assert!(!sim.members[&target].failed() && !sim.members[&leader].failed());
    sim.commit_all(&[(target, join(901))], 3000);
    sim.check_logs();
    assert_eq!(sim.members[&leader].voters(), ids.iter().copied().collect());
}

/// A member demoted and promoted again starts from the term and vote it had (its node
/// keeps its [`Ballot`]): a vote request of that term from another candidate, still in
/// flight, is refused. A member started without it would grant it: a second vote in one
/// term, and possibly two leaders of that term.
#[test]
fn a_member_promoted_again_keeps_its_ballot_and_never_votes_twice_in_a_term() {
    for seed in [91, 92, 93] {
        let mut sim = Sim::new(3, seed, 0.0);
        let leader = sim.run_until_leader(300);
        for _ in 0..20 {
            sim.step();
        }
        let ids = sim.alive();
        let (f, ballot) = ids
            .iter()
            .filter(|&&n| n != leader)
            .map(|&n| (n, sim.members[&n].ballot()))
            .find(|(_, b)| b.vote != 0)
            .expect("a follower that voted");
        let other = *ids
            .iter()
            .find(|&&n| n != f && raft_id(n) != ballot.vote)
            .expect("a member it did not vote for");
        let term = ballot.term();
        assert!(term > 1);
        let granted = |a: &mut Agreement| -> bool {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgRequestVote);
            m.from = raft_id(other);
            m.to = raft_id(f);
            m.term = term;
            m.index = 1000;
            m.log_term = term;
            let out = a.handle(other, &m.write_to_bytes().unwrap()).unwrap();
            let answer = out
                .messages
                .iter()
                .filter(|(to, _)| *to == other)
                .map(|(_, b)| parse_message(b).unwrap())
                .find(|r| r.get_msg_type() == MessageType::MsgRequestVoteResponse)
                .expect("an answer to the vote request");
            !answer.reject
        };
        let cfg = AgreementConfig::default();
        let mut again = Agreement::joining_after(f, &ids, seed, cfg.clone(), ballot).unwrap();
        assert_eq!(again.term(), term);
        assert!(
            !granted(&mut again),
            "seed {seed}: node {f}, promoted again, voted twice in term {term}"
        );
        let mut fresh = Agreement::joining(f, &ids, seed, cfg).unwrap();
        assert!(
            granted(&mut fresh),
            "seed {seed}: the test does not force it"
        );
    }
}

/// The leader hands its leadership to another voter (a leader that leaves the group does
/// so before it is removed): the other one leads in a higher term, and a forged
/// `TimeoutNow` from a member that does not lead is refused.
#[test]
fn leadership_is_handed_over_and_a_forged_timeout_now_is_refused() {
    let mut sim = Sim::new(3, 95, 0.0);
    let leader = sim.run_until_leader(300);
    let ids = sim.alive();
    let to = *ids.iter().find(|&&n| n != leader).unwrap();
    let third = *ids.iter().find(|&&n| n != leader && n != to).unwrap();
    let term = sim.members[&leader].term();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgTimeoutNow);
    m.from = raft_id(third);
    m.to = raft_id(to);
    m.term = term;
    let member = sim.members.get_mut(&to).unwrap();
    assert!(member.handle(third, &m.write_to_bytes().unwrap()).is_err());
    let out = sim
        .members
        .get_mut(&leader)
        .unwrap()
        .transfer_leadership(to);
    sim.absorb(leader, out);
    for _ in 0..100 {
        if sim.agreed_leader() == Some(to) {
            break;
        }
        sim.step();
    }
    assert_eq!(sim.agreed_leader(), Some(to));
    assert!(sim.members[&to].term() > term);
    sim.commit_all(&[(leader, join(900))], 3000);
    sim.check_logs();
}
