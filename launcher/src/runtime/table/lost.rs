//! Rows whose every copy died, through the adaptation layer: six in-process nodes run the
//! process table; a row's manager and its witness (the member after it in the view) fail
//! at the same tick. Once the failures are agreed, a read of the row answers "lost" (never
//! an empty row), as does marking it lost; a registration (the rank's restart) writes it
//! anew; rows that kept a copy read back whole.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use adaptation::protocol::{Node, NodeConfig, Output};
use adaptation::service::RequestId;
use adaptation::wire::Msg;
use adaptation::NodeId;

use super::*;

struct Net {
    nodes: BTreeMap<NodeId, Node>,
    dead: BTreeSet<NodeId>,
    queue: VecDeque<(NodeId, NodeId, Msg)>,
    answers: BTreeMap<RequestId, Vec<u8>>,
    seq: u64,
}

impl Net {
    fn new(n: NodeId) -> Net {
        let genesis: Vec<NodeId> = (0..n).collect();
        let nodes = genesis
            .iter()
            .map(|&me| {
                let mut cfg = NodeConfig::new(me, genesis.clone(), vec![0, 1, 2]);
                cfg.locator.buckets = 1 << 8;
                let node = Node::new(cfg, vec![Box::new(ProcessTable::new())]).unwrap();
                (me, node)
            })
            .collect();
        Net {
            nodes,
            dead: BTreeSet::new(),
            queue: VecDeque::new(),
            answers: BTreeMap::new(),
            seq: 0,
        }
    }

    fn drain(&mut self, n: NodeId) {
        for o in self.nodes.get_mut(&n).unwrap().take_outputs() {
            match o {
                Output::Send { to, msg } => self.queue.push_back((n, to, msg)),
                Output::Response { id, payload } => {
                    self.answers.insert(id, payload);
                }
                _ => {}
            }
        }
    }

    fn tick(&mut self) {
        let alive: Vec<NodeId> = self
            .nodes
            .keys()
            .copied()
            .filter(|n| !self.dead.contains(n))
            .collect();
        for &n in &alive {
            self.nodes.get_mut(&n).unwrap().tick();
            self.drain(n);
        }
        // Everything sent now arrives now (bounded: a round of replies per tick).
        for _ in 0..8 {
            let batch: Vec<_> = self.queue.drain(..).collect();
            if batch.is_empty() {
                break;
            }
            for (from, to, msg) in batch {
                if self.dead.contains(&to) || self.dead.contains(&from) {
                    continue;
                }
                if let Some(node) = self.nodes.get_mut(&to) {
                    node.receive(from, msg);
                    self.drain(to);
                }
            }
        }
    }

    fn ask(&mut self, via: NodeId, rank: u64, op: &TableOp) -> TableAnswer {
        self.seq += 1;
        let id = RequestId {
            origin: via,
            client: 7,
            seq: self.seq,
        };
        let node = self.nodes.get_mut(&via).unwrap();
        node.submit(id, TABLE_SERVICE, rank, encode_op(op)).unwrap();
        self.drain(via);
        for _ in 0..2000 {
            if let Some(p) = self.answers.remove(&id) {
                return parse_answer(&p).expect("a table answer");
            }
            self.tick();
        }
        panic!("no answer for {op:?} on rank {rank} via node {via}");
    }

    fn settle(&mut self, members: &[NodeId]) {
        for _ in 0..20_000 {
            let done = self
                .nodes
                .iter()
                .filter(|(n, _)| !self.dead.contains(n))
                .all(|(_, x)| {
                    x.is_stable() && x.members().iter().copied().collect::<Vec<_>>() == members
                });
            if done {
                return;
            }
            self.tick();
        }
        panic!("the view never settled on {members:?}");
    }
}

#[test]
fn rows_whose_manager_and_witness_failed_together_answer_lost_until_registered_again() {
    let mut net = Net::new(6);
    net.settle(&[0, 1, 2, 3, 4, 5]);
    let ranks = 64u64;
    for rank in 0..ranks {
        let a = net.ask(
            0,
            rank,
            &TableOp::Register {
                node: 1,
                pid: 1000 + rank as u32,
            },
        );
        assert!(a.error.is_none(), "{a:?}");
    }
    // Nodes 3 and 4 follow each other in the view: the rows node 3 manages have their only
    // copy (their witness) on node 4. Both fail at the same tick.
    let managed_by = |net: &Net, m: NodeId| -> Vec<u64> {
        (0..ranks)
            .filter(|&r| net.nodes[&0].manager_of(TABLE_SERVICE, r) == Some(m))
            .collect()
    };
    let lost_rows = managed_by(&net, 3);
    assert!(!lost_rows.is_empty(), "node 3 manages no row");
    net.dead.extend([3, 4]);
    net.settle(&[0, 1, 2, 5]);
    for &rank in &lost_rows {
        let a = net.ask(1, rank, &TableOp::Get);
        assert!(a.is_lost(), "rank {rank}: {a:?}");
        assert!(
            a.record.is_none(),
            "rank {rank}: a lost row served as {a:?}"
        );
        let a = net.ask(2, rank, &TableOp::MarkLost { node: 3 });
        assert!(a.is_lost(), "rank {rank}: {a:?}");
    }
    // The rows node 4 managed had their copy on node 5: they survive whole.
    for rank in managed_by_before(&lost_rows, ranks) {
        let a = net.ask(5, rank, &TableOp::Get);
        assert!(!a.is_lost(), "rank {rank}: {a:?}");
        let r = a.record.unwrap_or_else(|| panic!("rank {rank} has no row"));
        assert_eq!(r.pid, 1000 + rank as u32);
    }
    // The rank's restart registers it anew.
    let rank = lost_rows[0];
    let a = net.ask(0, rank, &TableOp::Register { node: 5, pid: 9 });
    assert!(a.error.is_none(), "{a:?}");
    let r = net.ask(1, rank, &TableOp::Get).record.unwrap();
    assert_eq!((r.node, r.pid, r.incarnation), (5, 9, 0));
}

/// The ranks not in `lost`.
fn managed_by_before(lost: &[u64], ranks: u64) -> Vec<u64> {
    (0..ranks).filter(|r| !lost.contains(r)).collect()
}
