//! The seeded simulation's harness: nodes, links, clients and the fault model (see
//! `tests/simulation.rs` for what is checked). `faults.rs` holds the schedule's faults.
#![allow(dead_code)]
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use adaptation::kv::{parse_answer, KvOp, KvService};
use adaptation::protocol::{Node, NodeConfig, Output};
use adaptation::service::{RequestId, Service};
use adaptation::view::{Change, NodeId};
use adaptation::wire::Msg;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub mod faults;
pub use faults::{Faults, Model};

pub const INITIAL: u32 = 6;
pub const SUPERVISORS: [NodeId; 3] = [0, 1, 2];
const KEYS_PER_CLIENT: u64 = 4;
const CLIENTS: u32 = 4;
/// Ticks between two fault events of a schedule (each one a single failure, a double
/// failure, or a partition): longer than the layer's loss window (failures it counts as
/// simultaneous), so that a schedule's bursts are exactly the ones it meant.
pub const FAULT_SPACING: u64 = 800;

pub struct Client {
    pub id: u32,
    pub node: NodeId,
    pub seq: u64,
    /// The request in flight: (seq, key, op, sent at).
    pub pending: Option<(u64, u64, KvOp, u64)>,
    /// The value every key of this client must hold (sum of the acknowledged adds).
    pub sums: BTreeMap<u64, i64>,
    /// Keys with an acknowledged write.
    pub written: BTreeSet<u64>,
    /// Keys answered "lost": the client writes them anew (a put) before using them again.
    pub needs_put: BTreeSet<u64>,
}

pub struct Sim {
    pub seed: u64,
    pub rng: SmallRng,
    pub now: u64,
    pub nodes: BTreeMap<NodeId, Node>,
    /// Nodes that crashed (their in-flight messages are dropped) or stopped.
    pub dead: BTreeSet<NodeId>,
    pub crashed: BTreeSet<NodeId>,
    /// Nodes that left the configuration and stopped (a failure agreed for one of them
    /// after it stopped evicts nobody alive).
    pub left: BTreeSet<NodeId>,
    /// Live nodes the others declared failed (cut off, or unlucky with lost messages); each
    /// stopped once it learned it and came back as a new member.
    pub evicted: BTreeSet<NodeId>,
    pub links: BTreeMap<(NodeId, NodeId), VecDeque<(u64, Msg)>>,
    pub clients: Vec<Client>,
    pub next_node: NodeId,
    pub max_delay: u64,
    pub answers: u64,
    pub trace: Vec<String>,
    /// Since when every live node has been stable with every crash repaired.
    pub settled_since: Option<u64>,
    /// A crash armed to happen when the victim reaches a step of a change: (step, victim,
    /// armed at).
    pub crash_on: Option<(&'static str, NodeId, u64)>,
    pub step_crashes: u64,
    pub faults: Faults,
    /// Reads answered "lost" for keys with an acknowledged write / without one.
    pub lost_written: u64,
    pub lost_unwritten: u64,
    pub rejoins: u64,
    /// When nodes crashed or were evicted.
    pub deaths: Vec<u64>,
    /// Supervisors (of the group of their time) that crashed.
    pub supervisor_crashes: u64,
    /// Supervisors (of the group of their time) that left in a planned way.
    pub supervisor_leaves: u64,
}

/// Two key-value services: one over the whole tree, one small enough for a sub-tree.
pub fn services(tolerate: usize) -> Vec<Box<dyn Service>> {
    vec![
        Box::new(KvService::new().tolerating(tolerate)),
        Box::new(KvService::with_size_hint(1).tolerating(tolerate)),
    ]
}

/// The service a client key belongs to.
pub fn service_of(key: u64) -> u16 {
    (key % 2) as u16
}

pub fn config(me: NodeId, genesis: &[NodeId], seed: u64) -> NodeConfig {
    let mut c = NodeConfig::new(me, genesis.to_vec(), SUPERVISORS.to_vec());
    c.seed = seed ^ (u64::from(me) << 32);
    c.group_seed = seed;
    c.locator.buckets = 1 << 10;
    c.locator.max_cell = 4;
    c.retry_ticks = 60;
    c.status_ticks = 25;
    c
}

/// Whether a message kind is sent again by the protocol when it goes missing (the ones the
/// fault model may lose; migration steps travel on links that lose nothing short of a
/// failure, as TCP connections do).
fn retried(msg: &Msg) -> bool {
    matches!(
        msg,
        Msg::Swim(_)
            | Msg::Raft(_)
            | Msg::Propose(_)
            | Msg::ViewChange { .. }
            | Msg::Status { .. }
            | Msg::Ping { .. }
            | Msg::Pong { .. }
            | Msg::Request(_)
            | Msg::Response { .. }
            | Msg::Observe { .. }
            | Msg::Observed { .. }
    )
}

impl Sim {
    pub fn new(seed: u64, model: Model) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let faults = Faults::draw(model, &mut rng);
        let genesis: Vec<NodeId> = (0..INITIAL).collect();
        let nodes = genesis
            .iter()
            .map(|&n| {
                let node =
                    Node::new(config(n, &genesis, seed), services(faults.tolerate)).expect("node");
                (n, node)
            })
            .collect();
        let clients = (0..CLIENTS)
            .map(|id| Client {
                id,
                node: rng.gen_range(0..INITIAL),
                seq: 0,
                pending: None,
                sums: BTreeMap::new(),
                written: BTreeSet::new(),
                needs_put: BTreeSet::new(),
            })
            .collect();
        let max_delay = rng.gen_range(1..=4);
        Sim {
            seed,
            rng,
            now: 0,
            nodes,
            dead: BTreeSet::new(),
            crashed: BTreeSet::new(),
            left: BTreeSet::new(),
            evicted: BTreeSet::new(),
            links: BTreeMap::new(),
            clients,
            next_node: INITIAL,
            max_delay,
            answers: 0,
            trace: Vec::new(),
            settled_since: None,
            crash_on: None,
            step_crashes: 0,
            faults,
            lost_written: 0,
            lost_unwritten: 0,
            rejoins: 0,
            deaths: Vec::new(),
            supervisor_crashes: 0,
            supervisor_leaves: 0,
        }
    }

    /// The same schedule with keys that survive `f` failures at once (before any tick).
    pub fn with_tolerance(mut self, f: usize) -> Sim {
        self.faults.tolerate = f;
        let genesis: Vec<NodeId> = (0..INITIAL).collect();
        for (&n, node) in self.nodes.iter_mut() {
            *node = Node::new(config(n, &genesis, self.seed), services(f)).expect("node");
        }
        self
    }

    pub fn fail(&self, what: String) -> ! {
        let tail: Vec<&String> = self
            .trace
            .iter()
            .rev()
            .take(
                std::env::var("KRUN_SIM_TRACE")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(40),
            )
            .collect();
        panic!(
            "seed {} ({:?}) tick {}: {what}\nreplay with KRUN_SIM_SEED={}\nlast events (newest first):\n{}",
            self.seed,
            self.faults,
            self.now,
            self.seed,
            tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
    }

    pub fn alive(&self) -> Vec<NodeId> {
        self.nodes
            .keys()
            .copied()
            .filter(|n| !self.dead.contains(n))
            .collect()
    }

    /// Nodes that are gone for good: crashed, or evicted while alive.
    pub fn gone(&self, n: &NodeId) -> bool {
        self.crashed.contains(n) || self.evicted.contains(n)
    }

    /// The supervisors after the longest log a live node knows (the first group, as
    /// replaced since).
    pub fn current_supervisors(&self) -> BTreeSet<NodeId> {
        self.alive()
            .into_iter()
            .max_by_key(|n| self.nodes[n].known_epoch())
            .map(|n| self.nodes[&n].supervisors().into_iter().collect())
            .unwrap_or_default()
    }

    /// What is wrong with the supervisor group once the cluster settled: it must be made
    /// of live members, as many as configured (fewer, and odd, when fewer members are
    /// left), each running a Raft member. `None`: healed.
    pub fn group_problem(&self) -> Option<String> {
        let group = self.current_supervisors();
        let alive = self.alive();
        let members = self.nodes[alive.first()?].members().clone();
        let want = SUPERVISORS.len().min(members.len());
        let want = if want.is_multiple_of(2) {
            want - 1
        } else {
            want
        };
        if !group.is_subset(&members) || group.len() != want {
            return Some(format!(
                "the supervisor group {group:?} did not heal among the members {members:?}"
            ));
        }
        group
            .iter()
            .find(|s| !self.nodes[s].is_supervisor())
            .map(|s| format!("supervisor {s} runs no Raft member"))
    }

    /// Whether `node` was a supervisor when it was asked to leave.
    pub fn supervisor_left(&self, node: NodeId) -> bool {
        self.left.contains(&node)
            && self.trace.iter().any(|l| {
                l.starts_with(&format!("SUPERVISOR {node} ")) && l.contains("asked to leave")
            })
    }

    /// Whether one more supervisor may fail now: every supervisor of the group is alive
    /// (the last failure healed) and the others keep a majority of it.
    pub fn supervisor_may_fail(&self) -> bool {
        let sups = self.current_supervisors();
        let alive = sups.iter().filter(|s| !self.gone(s)).count();
        alive == sups.len() && 2 * alive.saturating_sub(1) > sups.len()
    }

    /// Collects a node's outputs: messages onto links, answers to clients.
    pub fn drain(&mut self, n: NodeId) {
        let outs = match self.nodes.get_mut(&n) {
            Some(node) => node.take_outputs(),
            None => return,
        };
        let mut crash_now = false;
        for o in outs {
            if crash_now {
                // The node died at that step: nothing after it leaves the node.
                break;
            }
            match o {
                Output::Send { to, msg } => {
                    if self.dead.contains(&to) && self.crashed.contains(&to) {
                        continue;
                    }
                    if retried(&msg) && self.rng.gen_ratio(self.faults.loss_permille, 1000) {
                        self.faults.lost_messages += 1;
                        continue;
                    }
                    // Every message also goes through the wire format once in a while.
                    let msg = if self.rng.gen_ratio(1, 16) {
                        Msg::decode(&msg.encode()).expect("own message decodes")
                    } else {
                        msg
                    };
                    let twice = self.rng.gen_ratio(self.faults.dup_permille, 1000);
                    let q = self.links.entry((n, to)).or_default();
                    let last = q.back().map(|(t, _)| *t).unwrap_or(0);
                    let at = (self.now + self.rng.gen_range(1..=self.max_delay)).max(last);
                    if twice {
                        q.push_back((at, msg.clone()));
                        self.faults.duplicated += 1;
                    }
                    q.push_back((at, msg));
                }
                Output::Response { id, payload } => self.answer(n, id, payload),
                Output::Stable { epoch } => self.trace.push(format!("node {n} stable at {epoch}")),
                Output::Phase { epoch, phase } => {
                    self.trace.push(format!("node {n} epoch {epoch}: {phase}"));
                    if self.crash_on.is_some_and(|(p, v, _)| p == phase && v == n) {
                        self.crash_on = None;
                        crash_now = true;
                    }
                }
                Output::Stopped { reason } => {
                    self.trace.push(format!("node {n} stopped: {reason}"));
                    if reason.starts_with("left") {
                        self.left.insert(n);
                    }
                    self.dead.insert(n);
                    if self.nodes[&n].evicted().is_some() {
                        self.rejoin(n);
                    }
                }
                Output::Log(line) => {
                    if line.contains("arrived") || line.contains("DIVERGENCE") {
                        self.fail(format!("node {n}: {line}"));
                    }
                    self.trace.push(format!("node {n}: {line}"));
                }
            }
        }
        if crash_now && !self.dead.contains(&n) {
            self.trace.push("(crash at a step of a change)".to_string());
            self.step_crashes += 1;
            self.crash(n);
        }
    }

    /// A node evicted while alive comes back as a new member (as the daemon does).
    fn rejoin(&mut self, old: NodeId) {
        self.evicted.insert(old);
        let cut_off = self
            .faults
            .partition
            .as_ref()
            .is_some_and(|p| p.side.contains(&old));
        if !cut_off {
            self.death();
        }
        let cfg = self.nodes[&old]
            .rejoin_config(format!("sim:{old}+"))
            .expect("rejoin id");
        let new = cfg.me;
        let node = Node::new(cfg, services(self.faults.tolerate)).expect("rejoiner");
        self.trace
            .push(format!("REJOIN node {old} evicted, back as node {new}"));
        self.rejoins += 1;
        self.nodes.insert(new, node);
        self.drain(new);
    }

    fn answer(&mut self, n: NodeId, id: RequestId, payload: Vec<u8>) {
        let Some(ci) = self.clients.iter().position(|c| c.id == id.client) else {
            self.fail(format!("answer for unknown client {id:?}"));
        };
        let c = &self.clients[ci];
        let Some((seq, key, op, _)) = c.pending.clone() else {
            let what = format!(
                "node {n}: answer for {id:?} but client {} has nothing pending",
                c.id
            );
            self.fail(what);
        };
        if seq != id.seq {
            let what = format!("node {n}: answer for {id:?} but client waits for seq {seq}");
            self.fail(what);
        }
        let Some(a) = parse_answer(&payload) else {
            self.fail(format!("undecodable answer for {id:?}"));
        };
        if a.is_lost() {
            let written = c.written.contains(&key);
            if written && self.faults.max_burst <= self.faults.tolerate {
                let what = format!(
                    "client {} key {key}: an acknowledged key answered lost, with at most {} \
                     failure(s) at once and {} tolerated",
                    c.id, self.faults.max_burst, self.faults.tolerate
                );
                self.fail(what);
            }
            if written {
                self.lost_written += 1;
            } else {
                self.lost_unwritten += 1;
            }
            self.trace.push(format!(
                "client {} key {key}: lost (written before: {written})",
                id.client
            ));
            let c = &mut self.clients[ci];
            c.sums.remove(&key);
            c.written.remove(&key);
            c.needs_put.insert(key);
            c.pending = None;
            return;
        }
        let sum = *c.sums.get(&key).unwrap_or(&0);
        let expected = match op {
            KvOp::Add(d) => sum + d,
            _ => sum,
        };
        if !a.ok || a.number() != expected {
            let what = format!(
                "client {} key {key}: {op:?} answered {} (ok {}, {:?}), exactly-once gives {expected}",
                c.id,
                a.number(),
                a.ok,
                String::from_utf8_lossy(&a.value)
            );
            self.fail(what);
        }
        let c = &mut self.clients[ci];
        c.sums.insert(key, expected);
        match op {
            KvOp::Add(_) => {
                c.written.insert(key);
            }
            KvOp::Put(_) => {
                c.written.insert(key);
                c.needs_put.remove(&key);
            }
            KvOp::Get => {}
        }
        c.pending = None;
        self.answers += 1;
        let node = &self.nodes[&n];
        let manager = node.manager_of(service_of(key), key);
        self.trace.push(format!(
            "client {} got {op:?} on key {key} = {expected} (at node {n}, epoch {}, manager {manager:?}, view {:?})",
            id.client,
            node.epoch(),
            node.members()
        ));
    }

    pub fn submit(&mut self, ci: usize, op: Option<KvOp>, key: Option<u64>) {
        let alive = self.alive();
        let c = &mut self.clients[ci];
        if c.pending.is_none() {
            c.seq += 1;
            let key = key
                .unwrap_or_else(|| u64::from(c.id) * 1000 + self.rng.gen_range(0..KEYS_PER_CLIENT));
            let op = if c.needs_put.contains(&key) {
                // A lost key is written anew (value 0, what the client now expects).
                KvOp::Put(0i64.to_le_bytes().to_vec())
            } else {
                op.unwrap_or_else(|| {
                    if self.rng.gen_ratio(1, 3) {
                        KvOp::Get
                    } else {
                        KvOp::Add(self.rng.gen_range(1..100))
                    }
                })
            };
            c.pending = Some((c.seq, key, op, self.now));
        } else if !self.dead.contains(&c.node) {
            return;
        }
        // A client whose node is gone retries through another, with the same id.
        if self.dead.contains(&c.node) {
            c.node = alive[self.rng.gen_range(0..alive.len())];
        }
        let (seq, key, op, _) = c.pending.clone().unwrap();
        let id = RequestId {
            origin: 1000,
            client: c.id,
            seq,
        };
        let node = c.node;
        self.trace
            .push(format!("client {} sends {op:?} key {key} via {node}", c.id));
        self.nodes
            .get_mut(&node)
            .unwrap()
            .submit(id, service_of(key), key, op.encode())
            .unwrap();
        self.drain(node);
    }

    /// A node is gone (crashed, or evicted while alive): counts the failures within
    /// [`FAULT_SPACING`] of each other.
    pub fn death(&mut self) {
        self.deaths.push(self.now);
        let recent = self
            .deaths
            .iter()
            .filter(|&&t| t + FAULT_SPACING > self.now)
            .count();
        self.faults.max_burst = self.faults.max_burst.max(recent);
        self.faults.last_fault_at = Some(self.now);
    }

    pub fn crash(&mut self, n: NodeId) {
        self.death();
        if self.current_supervisors().contains(&n) {
            self.supervisor_crashes += 1;
        }
        self.trace.push(format!("CRASH node {n}"));
        self.dead.insert(n);
        self.crashed.insert(n);
        self.links.retain(|(from, to), _| *from != n && *to != n);
    }

    pub fn join(&mut self) {
        let n = self.next_node;
        self.next_node += 1;
        let genesis: Vec<NodeId> = (0..INITIAL).collect();
        let mut cfg = config(n, &genesis, self.seed);
        cfg.joining = Some(format!("sim:{n}"));
        let node = Node::new(cfg, services(self.faults.tolerate)).expect("joiner");
        self.trace.push(format!("JOIN node {n}"));
        self.nodes.insert(n, node);
        self.drain(n);
    }

    pub fn tick(&mut self) {
        self.now += 1;
        self.partition_step();
        for n in self.alive() {
            self.nodes.get_mut(&n).unwrap().tick();
            self.drain(n);
        }
        // Deliver what is due, interleaving links at random, FIFO within a link; a link
        // across a partition holds its messages until it heals.
        loop {
            let due: Vec<(NodeId, NodeId)> = self
                .links
                .iter()
                .filter(|((from, to), q)| {
                    q.front().is_some_and(|(t, _)| *t <= self.now) && !self.cut(*from, *to)
                })
                .map(|(k, _)| *k)
                .collect();
            if due.is_empty() {
                break;
            }
            let (from, to) = due[self.rng.gen_range(0..due.len())];
            let (_, msg) = self
                .links
                .get_mut(&(from, to))
                .unwrap()
                .pop_front()
                .unwrap();
            if self.dead.contains(&to) {
                continue;
            }
            self.nodes.get_mut(&to).unwrap().receive(from, msg);
            self.drain(to);
        }
        self.links.retain(|_, q| !q.is_empty());
        if self.stable_nodes().is_some() && self.repaired() {
            self.settled_since.get_or_insert(self.now);
        } else {
            self.settled_since = None;
        }
        self.check_logs();
    }

    pub fn stable_nodes(&self) -> Option<Vec<NodeId>> {
        let alive = self.alive();
        let max = alive
            .iter()
            .map(|n| self.nodes[n].known_epoch())
            .max()
            .unwrap_or(0);
        let all = alive.iter().all(|n| {
            let node = &self.nodes[n];
            node.is_stable() && node.epoch() == max && node.is_member()
        });
        all.then_some(alive)
    }

    /// No split brain: any two nodes' agreed logs (live or not) are one a prefix of the
    /// other; during a partition the cut-off side agrees on nothing new.
    fn check_logs(&self) {
        let logs: Vec<(NodeId, &[Change])> =
            self.nodes.iter().map(|(n, x)| (*n, x.log())).collect();
        let longest = logs.iter().max_by_key(|(_, l)| l.len()).map(|(_, l)| *l);
        if let Some(longest) = longest {
            for (n, l) in &logs {
                if longest[..l.len()] != **l {
                    self.fail(format!(
                        "split brain: node {n}'s log {l:?} is not a prefix of {longest:?}"
                    ));
                }
            }
        }
        if let Some(p) = &self.faults.partition {
            for n in &p.side {
                let len = self.nodes.get(n).map_or(0, |x| x.log().len());
                if !self.dead.contains(n) && len > p.known_at_cut {
                    self.fail(format!(
                        "node {n}, cut off with {:?}, knows {len} agreed changes; {} were agreed \
                         when the partition began",
                        p.side, p.known_at_cut
                    ));
                }
            }
        }
    }

    /// In a stable state: one view, one locator, each entry at exactly its manager.
    pub fn check_stable(&self) {
        let Some(alive) = self.stable_nodes() else {
            return;
        };
        let first = &self.nodes[&alive[0]];
        let mut holder: BTreeMap<(u16, u64), NodeId> = BTreeMap::new();
        for n in &alive {
            let node = &self.nodes[n];
            if node.members() != first.members() || node.log() != first.log() {
                self.fail(format!(
                    "stable nodes {} and {n} disagree on the view: {:?} vs {:?}",
                    alive[0],
                    first.members(),
                    node.members()
                ));
            }
            if node.locator() != first.locator() {
                self.fail(format!(
                    "stable nodes {} and {n} have different locators",
                    alive[0]
                ));
            }
            // The view holds every live node, and only live nodes besides crashed or
            // evicted ones not removed yet.
            let live: BTreeSet<NodeId> = alive.iter().copied().collect();
            if !node.members().is_superset(&live)
                || !node.members().difference(&live).all(|m| self.gone(m))
            {
                self.fail(format!(
                    "stable view {:?} does not match the live nodes {live:?}",
                    node.members()
                ));
            }
            for s in 0..2u16 {
                for key in node.service(s).unwrap().managed() {
                    if let Some(other) = holder.insert((s, key), *n) {
                        self.fail(format!(
                            "service {s} key {key} managed by both {other} and {n}"
                        ));
                    }
                    let m = node.manager_of(s, key).unwrap();
                    if m != *n {
                        self.fail(format!(
                            "service {s} key {key} held by {n} but the locator says {m}"
                        ));
                    }
                }
            }
        }
        // Once every crash is repaired, every key a client wrote has its manager (unless
        // more nodes failed at once than the copies tolerate: then keys may be lost).
        if self.repaired() && self.faults.max_burst <= self.faults.tolerate {
            for c in &self.clients {
                for key in &c.written {
                    if !holder.contains_key(&(service_of(*key), *key)) {
                        self.fail(format!("key {key} of client {} has no manager", c.id));
                    }
                }
            }
        }
    }

    /// Every crashed or evicted node has been removed from the view of every live node.
    pub fn repaired(&self) -> bool {
        self.alive().iter().all(|n| {
            let m = self.nodes[n].members();
            self.crashed.iter().all(|c| !m.contains(c))
                && self.evicted.iter().all(|c| !m.contains(c))
        })
    }
}

/// What one schedule did.
#[derive(Debug, PartialEq, Eq, Default, Clone)]
pub struct Outcome {
    pub answers: u64,
    pub changes: usize,
    pub crashes: usize,
    pub step_crashes: u64,
    /// Two nodes failing at once, and failures during a repair.
    pub double_crashes: u64,
    pub repair_crashes: u64,
    pub partitions: u64,
    /// Partitions after which the majority had evicted the cut-off side.
    pub partitions_evicting: u64,
    pub rejoins: u64,
    pub lost_messages: u64,
    pub duplicated: u64,
    /// Reads answered "lost" for keys with an acknowledged write (allowed only after more
    /// simultaneous failures than tolerated) and for keys never written.
    pub lost_written: u64,
    pub lost_unwritten: u64,
    /// Schedules whose keys had f + 1 = 3 copies and that lost two nodes at once.
    pub f2_bursts: u64,
    /// Supervisors that crashed, and how many of the first group were gone at the end
    /// (crashed, evicted or left).
    pub supervisor_crashes: u64,
    pub first_group_gone: u64,
    /// Supervisors that left in a planned way (their vote handed over first).
    pub supervisor_leaves: u64,
    /// Nodes that caught up from the leader's snapshot after being promoted.
    pub promotions: u64,
}

impl Outcome {
    pub fn add(&mut self, o: &Outcome) {
        self.answers += o.answers;
        self.changes += o.changes;
        self.crashes += o.crashes;
        self.step_crashes += o.step_crashes;
        self.double_crashes += o.double_crashes;
        self.repair_crashes += o.repair_crashes;
        self.partitions += o.partitions;
        self.partitions_evicting += o.partitions_evicting;
        self.rejoins += o.rejoins;
        self.lost_messages += o.lost_messages;
        self.duplicated += o.duplicated;
        self.lost_written += o.lost_written;
        self.lost_unwritten += o.lost_unwritten;
        self.f2_bursts += o.f2_bursts;
        self.supervisor_crashes += o.supervisor_crashes;
        self.supervisor_leaves += o.supervisor_leaves;
        self.first_group_gone += o.first_group_gone;
        self.promotions += o.promotions;
    }
}

pub fn run(seed: u64, model: Model) -> Outcome {
    let mut sim = Sim::new(seed, model);
    let active = if model == Model::Supervisors {
        5000
    } else {
        1500
    };
    for _ in 0..active {
        sim.random_event();
        for ci in 0..sim.clients.len() {
            let idle = sim.clients[ci].pending.is_none();
            let stranded = !idle && sim.dead.contains(&sim.clients[ci].node);
            if (idle && sim.rng.gen_ratio(1, 8)) || stranded {
                sim.submit(ci, None, None);
            }
        }
        sim.tick();
        sim.check_stable();
    }
    sim.end_faults();
    // Quiesce: pending requests must all be answered and the cluster must settle.
    let limit = sim.now + 6000;
    loop {
        sim.end_faults();
        for ci in 0..sim.clients.len() {
            if sim.clients[ci].pending.is_some() && sim.dead.contains(&sim.clients[ci].node) {
                sim.submit(ci, None, None);
            }
        }
        sim.tick();
        sim.check_stable();
        let idle = sim.clients.iter().all(|c| c.pending.is_none());
        if idle && sim.stable_nodes().is_some() && sim.repaired() && sim.group_problem().is_none() {
            break;
        }
        if sim.now > limit {
            let pending: Vec<String> = sim
                .clients
                .iter()
                .filter_map(|c| c.pending.as_ref().map(|p| format!("client {} {p:?}", c.id)))
                .collect();
            let states: Vec<String> = sim
                .alive()
                .iter()
                .map(|n| {
                    let x = &sim.nodes[n];
                    format!(
                        "node {n}: epoch {} known {} stable {} leader {:?} members {:?}",
                        x.epoch(),
                        x.known_epoch(),
                        x.is_stable(),
                        x.leader(),
                        x.members()
                    )
                })
                .collect();
            sim.fail(format!(
                "no quiescence: pending {pending:?}; group {:?}; {}",
                sim.group_problem(),
                states.join("; ")
            ));
        }
    }
    // Every key reads back its last written value (or, after more failures at once than
    // tolerated, is reported lost: never an empty or older value).
    for ci in 0..sim.clients.len() {
        for k in 0..KEYS_PER_CLIENT {
            let key = u64::from(sim.clients[ci].id) * 1000 + k;
            sim.submit(ci, Some(KvOp::Get), Some(key));
            let deadline = sim.now + 3000;
            while sim.clients[ci].pending.is_some() {
                sim.tick();
                sim.check_stable();
                if sim.now > deadline {
                    sim.fail(format!("final read of key {key} got no answer"));
                }
            }
        }
    }
    // The group healed (see `Sim::group_problem`).
    if let Some(problem) = sim.group_problem() {
        sim.fail(problem);
    }
    // No live node was declared failed, unless it was cut off or messages were lost (then
    // it came back as a new member).
    let any = sim.alive()[0];
    for c in sim.nodes[&any].log() {
        if let Change::Fail { node } = c {
            let excused = sim.evicted.contains(node)
                && (sim.faults.loss_permille > 0 || sim.faults.partitions > 0);
            if !sim.crashed.contains(node) && !sim.left.contains(node) && !excused {
                sim.fail(format!("live node {node} was evicted as failed"));
            }
        }
    }
    // Every node evicted while alive is back as a member (or failed or left since).
    for old in &sim.evicted {
        let new = old + adaptation::protocol::REJOIN_STRIDE;
        let back =
            sim.nodes[&any].members().contains(&new) || sim.gone(&new) || sim.left.contains(&new);
        if !back {
            sim.fail(format!(
                "node {old} was evicted but node {new} is not a member: {:?}",
                sim.nodes[&any].members()
            ));
        }
    }
    Outcome {
        answers: sim.answers,
        changes: sim.nodes[&any].log().len(),
        crashes: sim.crashed.len(),
        step_crashes: sim.step_crashes,
        double_crashes: sim.faults.double_crashes,
        repair_crashes: sim.faults.repair_crashes,
        partitions: sim.faults.partitions,
        partitions_evicting: sim.faults.partitions_evicting,
        rejoins: sim.rejoins,
        lost_messages: sim.faults.lost_messages,
        duplicated: sim.faults.duplicated,
        lost_written: sim.lost_written,
        lost_unwritten: sim.lost_unwritten,
        f2_bursts: u64::from(sim.faults.tolerate == 2 && sim.faults.max_burst == 2),
        supervisor_crashes: sim.supervisor_crashes,
        supervisor_leaves: sim.nodes[&any]
            .log()
            .iter()
            .filter(|c| matches!(c, Change::Leave { node } if sim.supervisor_left(*node)))
            .count() as u64,
        first_group_gone: SUPERVISORS
            .iter()
            .filter(|s| sim.gone(s) || sim.left.contains(s))
            .count() as u64,
        promotions: sim.nodes[&any]
            .log()
            .iter()
            .filter(|c| matches!(c, Change::Promote { .. }))
            .count() as u64,
    }
}
