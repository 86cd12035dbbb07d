//! Seeded simulation of the coherence protocol: several nodes issue random reads and writes
//! of a few pages while messages travel over links that delay and reorder them (FIFO per
//! link; one-sided operations travel on their own links, so they overtake messages and are
//! overtaken by them). A page access is performed atomically when the protocol says it may
//! proceed; this gives a total order of accesses, and after every step the simulation checks:
//! - at most one owner and at most one writer per page, and no other valid copy while a
//!   writer exists;
//! - every valid copy holds the last value written in that order (so every read returns the
//!   last write: no stale reader);
//! - every read returns the last written value; at the end every access was answered and
//!   every node is idle.
//!
//! `KRUN_SIM_SEED=N` replays one schedule; `KRUN_SIM_SCHEDULES=N` sets how many run (from
//! `KRUN_SIM_FIRST_SEED`, default 0); `KRUN_SIM_TRACE=N` sets how many events a failure prints.
use std::collections::{BTreeMap, VecDeque};

use dsm::coherence::{
    Access, Action, LocalShareWords, Msg, Node, NodeId, PageId, PageState, Source,
};
use dsm::directory::LocatorKind;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// What travels on a link.
#[derive(Clone, Debug)]
enum Wire {
    Msg(Msg, Option<u64>),
    JoinReq(PageId),
    JoinResult(PageId, bool),
    RmaReq(PageId),
    RmaResult(PageId, Option<u64>),
}

struct SimNode {
    node: Node<LocalShareWords>,
    /// Page values of the valid copies.
    mem: BTreeMap<PageId, u64>,
    /// What one-sided readers read (the published copy).
    export: BTreeMap<PageId, u64>,
    /// The access in flight: (page, access).
    op: Option<(PageId, Access)>,
    done_ops: u64,
}

struct Sim {
    rng: SmallRng,
    now: u64,
    nodes: Vec<SimNode>,
    /// (from, to, one-sided?) -> (deliver at, what).
    links: BTreeMap<(NodeId, NodeId, bool), VecDeque<(u64, Wire)>>,
    last: BTreeMap<PageId, u64>,
    next_value: u64,
    pages: u64,
    max_delay: u64,
    trace: Vec<String>,
    reads_checked: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = rng.gen_range(2..=5u32);
        let pages = rng.gen_range(1..=4u64);
        let one_sided = rng.gen_bool(0.7);
        let kind = if rng.gen_bool(0.5) {
            LocatorKind::Modulo
        } else {
            LocatorKind::CellTree
        };
        let ids: Vec<NodeId> = (0..n).collect();
        let nodes = ids
            .iter()
            .map(|&me| SimNode {
                node: Node::new(me, kind.build(&ids), LocalShareWords::default(), one_sided),
                mem: BTreeMap::new(),
                export: BTreeMap::new(),
                op: None,
                done_ops: 0,
            })
            .collect();
        let max_delay = rng.gen_range(1..=8);
        Sim {
            rng,
            now: 0,
            nodes,
            links: BTreeMap::new(),
            last: BTreeMap::new(),
            next_value: 1,
            pages,
            max_delay,
            trace: Vec::new(),
            reads_checked: 0,
        }
    }

    fn push(&mut self, from: NodeId, to: NodeId, one_sided: bool, w: Wire) {
        let delay = self.rng.gen_range(0..=self.max_delay);
        let q = self.links.entry((from, to, one_sided)).or_default();
        let at = q.back().map(|(t, _)| *t).unwrap_or(0).max(self.now + delay);
        q.push_back((at, w));
    }

    fn log(&mut self, s: String) {
        self.trace.push(format!("t={} {s}", self.now));
    }

    /// Executes a node's actions in order; `data` is the page value that came with the
    /// event being handled.
    fn run(&mut self, n: NodeId, actions: Vec<Action>, data: Option<u64>) -> Result<(), String> {
        // Pages dropped in this batch, whose bytes a later grant of the batch carries.
        let mut dropped: BTreeMap<PageId, u64> = BTreeMap::new();
        for a in actions {
            self.log(format!("node {n}: {a:?}"));
            let node = &mut self.nodes[n as usize];
            match a {
                Action::Send { to, msg } => {
                    // A message that lets another node write (a write grant, an invalidation
                    // acknowledgement) leaves no mapped copy behind: in the real driver local
                    // accesses happen at any moment between the actions of a batch.
                    if let Msg::Grant {
                        page,
                        access: Access::Write,
                        ..
                    }
                    | Msg::InvalidateAck { page } = &msg
                    {
                        if node.mem.contains_key(page) {
                            return Err(format!(
                                "node {n} sends {msg:?} while still mapping page {page}"
                            ));
                        }
                    }
                    let attach =
                        match &msg {
                            Msg::Grant {
                                page, zero: false, ..
                            } => {
                                Some(*node.mem.get(page).or(dropped.get(page)).ok_or(format!(
                                    "node {n} grants page {page} it does not hold"
                                ))?)
                            }
                            _ => None,
                        };
                    self.push(n, to, false, Wire::Msg(msg, attach));
                }
                Action::Join { owner, page } => self.push(n, owner, true, Wire::JoinReq(page)),
                Action::RmaRead { owner, page } => self.push(n, owner, true, Wire::RmaReq(page)),
                Action::Install { page, source, .. } => {
                    let v = match source {
                        Source::Zero => 0,
                        Source::Message | Source::Rma => {
                            data.ok_or(format!("node {n}: install of page {page} without data"))?
                        }
                    };
                    if node.mem.contains_key(&page) {
                        return Err(format!("node {n}: install over a mapped page {page}"));
                    }
                    node.mem.insert(page, v);
                }
                Action::Publish { page } => {
                    let v = *node
                        .mem
                        .get(&page)
                        .ok_or(format!("node {n}: publish of unmapped page {page}"))?;
                    node.export.insert(page, v);
                    node.node.words.open(page);
                }
                Action::Protect { page } => {
                    if !node.mem.contains_key(&page) {
                        return Err(format!("node {n}: protect of unmapped page {page}"));
                    }
                }
                Action::Unprotect { .. } => {}
                Action::Drop { page } => {
                    if let Some(v) = node.mem.remove(&page) {
                        dropped.insert(page, v);
                    }
                }
                Action::Done { page, access } => {
                    if let Some((p, want)) = node.op {
                        if p == page && access >= want {
                            let state = node.node.state(page);
                            if !state.allows(want) {
                                return Err(format!("node {n}: done {want:?} in state {state:?}"));
                            }
                            match want {
                                Access::Read => {
                                    let got = node.mem.get(&page).copied();
                                    let expected = self.last.get(&page).copied().unwrap_or(0);
                                    if got != Some(expected) {
                                        return Err(format!(
                                            "node {n} read {got:?} from page {page}, last write was {expected}"
                                        ));
                                    }
                                    self.reads_checked += 1;
                                }
                                Access::Write => {
                                    let v = self.next_value;
                                    self.next_value += 1;
                                    node.mem.insert(page, v);
                                    self.last.insert(page, v);
                                }
                            }
                            node.op = None;
                            node.done_ops += 1;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        for page in 0..self.pages {
            let last = self.last.get(&page).copied().unwrap_or(0);
            let mut owners = 0;
            let mut writers = 0;
            let mut copies = 0;
            for sn in &self.nodes {
                let st = sn.node.state(page);
                owners += st.is_owner() as u32;
                writers += (st == PageState::WriteOwner) as u32;
                if st != PageState::Invalid {
                    copies += 1;
                    if sn.mem.get(&page) != Some(&last) {
                        return Err(format!(
                            "node {} holds {:?} of page {page} in state {st:?}, last write {last}",
                            sn.node.id(),
                            sn.mem.get(&page)
                        ));
                    }
                } else if sn.mem.contains_key(&page) {
                    return Err(format!("node {} maps invalid page {page}", sn.node.id()));
                }
            }
            if owners > 1 || writers > 1 || (writers == 1 && copies > 1) {
                return Err(format!(
                    "page {page}: {owners} owners, {writers} writers, {copies} copies"
                ));
            }
        }
        Ok(())
    }

    fn issue(&mut self, n: usize) -> Result<(), String> {
        if self.nodes[n].op.is_some() {
            return Ok(());
        }
        let page = self.rng.gen_range(0..self.pages);
        let access = if self.rng.gen_bool(0.4) {
            Access::Write
        } else {
            Access::Read
        };
        self.nodes[n].op = Some((page, access));
        self.log(format!("node {n}: wants {access:?} page {page}"));
        let actions = self.nodes[n].node.fault(page, access);
        self.run(n as NodeId, actions, None)
    }

    /// Delivers one due item; false when nothing is due.
    fn deliver(&mut self) -> Result<bool, String> {
        let due: Vec<(NodeId, NodeId, bool)> = self
            .links
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|(t, _)| *t <= self.now))
            .map(|(k, _)| *k)
            .collect();
        if due.is_empty() {
            return Ok(false);
        }
        let key = due[self.rng.gen_range(0..due.len())];
        let (_, w) = self.links.get_mut(&key).unwrap().pop_front().unwrap();
        let (from, to, _) = key;
        self.log(format!("{from}->{to}: {w:?}"));
        match w {
            Wire::Msg(msg, data) => {
                let actions = self.nodes[to as usize].node.on_message(from, msg);
                self.run(to, actions, data)?;
            }
            Wire::JoinReq(page) => {
                let open = self.nodes[to as usize].node.words.remote_join(page, from);
                self.push(to, from, true, Wire::JoinResult(page, open));
            }
            Wire::JoinResult(page, open) => {
                let actions = self.nodes[to as usize].node.on_join(page, open);
                self.run(to, actions, None)?;
            }
            Wire::RmaReq(page) => {
                let v = self.nodes[to as usize].export.get(&page).copied();
                self.push(to, from, true, Wire::RmaResult(page, v));
            }
            Wire::RmaResult(page, v) => {
                let actions = self.nodes[to as usize].node.on_rma_read(page);
                // A read of a page never published returns whatever the memory held; the
                // protocol must not install it (it only reads open words' pages).
                let data = Some(v.unwrap_or(u64::MAX));
                self.run(to, actions, data)?;
            }
        }
        Ok(true)
    }

    fn run_schedule(&mut self, ops: u64) -> Result<(), String> {
        let n = self.nodes.len();
        let mut issued = 0;
        let mut steps = 0u64;
        while issued < ops {
            steps += 1;
            if self.rng.gen_bool(0.3) {
                let i = self.rng.gen_range(0..n);
                if self.nodes[i].op.is_none() {
                    issued += 1;
                    self.issue(i)?;
                }
            }
            if !self.deliver()? {
                self.now += 1;
            }
            self.check()?;
            if steps > ops * 400 {
                return Err("no progress".into());
            }
        }
        // Drain: every access must be answered.
        let mut idle_rounds = 0;
        while idle_rounds < 2 * self.max_delay + 2 {
            if self.deliver()? {
                idle_rounds = 0;
            } else {
                self.now += 1;
                idle_rounds += 1;
            }
            self.check()?;
        }
        for sn in &self.nodes {
            if let Some(op) = sn.op {
                return Err(format!(
                    "node {}: access {op:?} never answered",
                    sn.node.id()
                ));
            }
            if !sn.node.idle() {
                return Err(format!("node {} not idle at the end", sn.node.id()));
            }
        }
        Ok(())
    }
}

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn random_schedules_keep_sequential_consistency() {
    let (first, count) = match env("KRUN_SIM_SEED") {
        Some(s) => (s, 1),
        None => (
            env("KRUN_SIM_FIRST_SEED").unwrap_or(0),
            env("KRUN_SIM_SCHEDULES").unwrap_or(5000),
        ),
    };
    let trace_len = env("KRUN_SIM_TRACE").unwrap_or(60) as usize;
    let mut reads = 0;
    let mut one_sided = 0;
    let mut invalidations = 0;
    for seed in first..first + count {
        let mut sim = Sim::new(seed);
        if let Err(e) = sim.run_schedule(200) {
            let start = sim.trace.len().saturating_sub(trace_len);
            panic!(
                "seed {seed}: {e}\nlast events:\n{}",
                sim.trace[start..].join("\n")
            );
        }
        reads += sim.reads_checked;
        for sn in &sim.nodes {
            one_sided += sn.node.stats.one_sided_reads;
            invalidations += sn.node.stats.invalidations_sent;
        }
    }
    eprintln!(
        "{count} schedules: {reads} reads checked, {one_sided} one-sided reads, {invalidations} invalidations"
    );
    // The schedules exercise the paths they claim to check.
    assert!(reads > count * 10);
    if count >= 100 {
        assert!(one_sided > 0 && invalidations > 0);
    }
}
