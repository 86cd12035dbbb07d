//! The Raft leader's process dies and the others see its links close with connections
//! refused (`Node::peer_closed`, krund's evidence when a node is SIGKILLed): its failure is
//! agreed within a few ticks, not after the dead leader's lease (the election timeout) and a
//! proposal retry. Without that evidence, the detector and a direct ping take far longer.
use std::collections::{BTreeMap, BTreeSet};

use adaptation::protocol::{Node, NodeConfig, Output};
use adaptation::wire::Msg;
use adaptation::{Change, NodeId};

/// Four nodes, all supervisors (krun's local job with a spare), lossless links with a
/// one-tick delay.
struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    dead: BTreeSet<NodeId>,
    /// (deliver at tick, from, to, message)
    wire: Vec<(u64, NodeId, NodeId, Msg)>,
    now: u64,
}

impl Cluster {
    fn new() -> Cluster {
        let genesis: Vec<NodeId> = vec![0, 1, 2, 3];
        let nodes = genesis
            .iter()
            .map(|&n| {
                let mut c = NodeConfig::new(n, genesis.clone(), genesis.clone());
                c.seed = 7 ^ (u64::from(n) << 32);
                c.group_seed = 7;
                (n, Node::new(c, Vec::new()).expect("node"))
            })
            .collect();
        Cluster {
            nodes,
            dead: BTreeSet::new(),
            wire: Vec::new(),
            now: 0,
        }
    }

    fn drain(&mut self, n: NodeId) {
        for o in self.nodes.get_mut(&n).unwrap().take_outputs() {
            if let Output::Send { to, msg } = o {
                self.wire.push((self.now + 1, n, to, msg));
            }
        }
    }

    fn tick(&mut self) {
        self.now += 1;
        let live: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|n| !self.dead.contains(n))
            .collect();
        for &n in &live {
            self.nodes.get_mut(&n).unwrap().tick();
            self.drain(n);
        }
        while let Some(i) = self.wire.iter().position(|m| m.0 <= self.now) {
            let (_, from, to, msg) = self.wire.remove(i);
            if self.dead.contains(&to) || self.dead.contains(&from) {
                continue;
            }
            self.nodes.get_mut(&to).unwrap().receive(from, msg);
            self.drain(to);
        }
    }

    fn live(&self) -> Vec<NodeId> {
        (0..4).filter(|n| !self.dead.contains(n)).collect()
    }

    /// Ticks (up to `limit`) until every live node agreed `node`'s failure.
    fn ticks_until_failed(&mut self, node: NodeId, limit: u64) -> Option<u64> {
        let start = self.now;
        while self.now - start < limit {
            let agreed = self
                .live()
                .iter()
                .all(|n| self.nodes[n].log().contains(&Change::Fail { node }));
            if agreed {
                return Some(self.now - start);
            }
            self.tick();
        }
        None
    }

    /// Runs until every node follows one leader; returns it.
    fn settle(&mut self) -> NodeId {
        for _ in 0..2000 {
            self.tick();
            let leaders: BTreeSet<Option<NodeId>> =
                self.live().iter().map(|n| self.nodes[n].leader()).collect();
            if leaders.len() == 1 && self.now > 200 {
                if let Some(Some(l)) = leaders.first() {
                    return *l;
                }
            }
        }
        panic!("no leader after 2000 ticks");
    }
}

/// Ticks a follower waits without a heartbeat before it campaigns (at least
/// `AgreementConfig::default().election_ticks`).
const ELECTION_TICKS: u64 = 10;

#[test]
fn a_dead_leader_whose_links_closed_is_replaced_and_its_failure_agreed_within_a_few_ticks() {
    let mut c = Cluster::new();
    let leader = c.settle();
    c.dead.insert(leader);
    for n in c.live() {
        c.nodes.get_mut(&n).unwrap().peer_closed(leader);
        c.drain(n);
    }
    let took = c
        .ticks_until_failed(leader, 1000)
        .expect("the dead leader's failure was never agreed");
    assert!(
        took < ELECTION_TICKS,
        "agreeing the closed leader's failure took {took} ticks: it waited for an election \
         timeout or a proposal retry"
    );
    let new = c
        .live()
        .iter()
        .map(|n| c.nodes[n].leader())
        .collect::<BTreeSet<_>>();
    assert_eq!(new.len(), 1, "the live nodes follow one leader: {new:?}");
    assert_ne!(new.first().copied().flatten(), Some(leader));
}

/// The control: the same death without the closed-link evidence is agreed only after the
/// detector and a direct ping, much later (so the test above measures the fast path).
#[test]
fn a_dead_leader_without_closed_link_evidence_takes_the_detector_and_a_ping() {
    let mut c = Cluster::new();
    let leader = c.settle();
    c.dead.insert(leader);
    let took = c
        .ticks_until_failed(leader, 5000)
        .expect("the dead leader's failure was never agreed");
    assert!(took >= 3 * ELECTION_TICKS, "took only {took} ticks");
}

/// A follower (not the leader) whose links close: its failure is agreed at once by the
/// live leader, and no election happens.
#[test]
fn a_dead_follower_whose_links_closed_is_failed_without_an_election() {
    let mut c = Cluster::new();
    let leader = c.settle();
    let victim = (0..4).find(|&n| n != leader).unwrap();
    c.dead.insert(victim);
    for n in c.live() {
        c.nodes.get_mut(&n).unwrap().peer_closed(victim);
        c.drain(n);
    }
    let took = c
        .ticks_until_failed(victim, 1000)
        .expect("the dead follower's failure was never agreed");
    assert!(took < ELECTION_TICKS, "took {took} ticks");
    for n in c.live() {
        assert_eq!(
            c.nodes[&n].leader(),
            Some(leader),
            "node {n} changed leader"
        );
    }
}
