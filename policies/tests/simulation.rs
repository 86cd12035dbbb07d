//! Seeded deterministic simulation of the coordinated policy driving a job: N ranks on M nodes
//! plus spares, a model of the multilevel store (L1 local, L2 buddy, L3 parity, L4 disk), of
//! the primitives (barrier, capture, rollback, restart, release, each with delays and per-rank
//! FIFO order), of failure detection and of the supervisors' leader (the policy runs there; a
//! new leader resumes from the recorded decisions and the process table).
//!
//! The application is deterministic: every rank holds a value that each global step mixes
//! with its neighbours' values, so a wrong image, a rank at the wrong step or a lost step
//! changes the result. Failures come from seeded schedules: random crashes, a crash at each
//! step of a checkpoint and of a restart (of the target, the image's source, or a survivor),
//! two crashes in a row, spare exhaustion, the loss of a buddy pair, the loss of the node
//! holding rank 0 and the leader.
//!
//! Every run must end with the failure-free reference result or with an error the store and
//! the placement justify; no rank is brought up twice for one failure; no decision reuses an
//! incarnation; the same seed gives the same run.
//!
//! `KRUN_SIM_SEED=N` replays one schedule (and prints its event lines); `KRUN_SIM_SCHEDULES=N`
//! sets how many run (from `KRUN_SIM_FIRST_SEED`, default 0); `KRUN_SIM_TRACE=N` sets how many
//! events a failure prints.
use std::collections::{BTreeMap, BTreeSet};

use policies::coordinated::{Config, Coordinated, IntervalChoice, LevelCadence, NoSpare};
use policies::primitives::{
    AgreedView, Decision, DecisionKind, Epoch, Event, ImageCopy, Layout, Level, Millis, NodeId,
    Rank, RankSlot, Reads, RequestSource, Snapshot, Version,
};
use policies::{Action, Phase, Policy, PolicyError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const STEP_MS: Millis = 10;
const STEPS: u64 = 150;
const PARITY_SET: u32 = 3;

/// A rank's application state: the step it reached and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AppState {
    step: u64,
    x: u64,
}

fn initial(rank: Rank) -> AppState {
    AppState {
        step: 0,
        x: 0x9e37_79b9_7f4a_7c15 ^ u64::from(rank),
    }
}

fn mix(me: u64, left: u64, right: u64, step: u64) -> u64 {
    let mut z = me
        .wrapping_mul(31)
        .wrapping_add(left.rotate_left(7))
        .wrapping_add(right.rotate_left(13))
        .wrapping_add(step);
    z ^= z >> 29;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 32)
}

fn advance(xs: &mut [u64], step: u64) {
    let n = xs.len();
    let old = xs.to_vec();
    for r in 0..n {
        xs[r] = mix(old[r], old[(r + n - 1) % n], old[(r + 1) % n], step);
    }
}

fn reference(n: usize) -> Vec<u64> {
    let mut xs: Vec<u64> = (0..n as Rank).map(|r| initial(r).x).collect();
    for s in 0..STEPS {
        advance(&mut xs, s);
    }
    xs
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcStatus {
    Running,
    Held,
    Exited,
}

#[derive(Clone, Copy, Debug)]
struct Proc {
    node: NodeId,
    incarnation: u32,
    status: ProcStatus,
    state: AppState,
}

#[derive(Clone, Debug)]
struct Img {
    data: AppState,
    node: NodeId,
    buddy: Option<NodeId>,
    parity_set: Vec<NodeId>,
    holder: Option<NodeId>,
    safe: [bool; 4],
    bytes: u64,
}

/// The store's index seen through the agreed view (what krund's `Reads` answers).
struct StoreIndex<'a> {
    store: &'a BTreeMap<(Rank, Version), Img>,
    agreed_dead: &'a BTreeSet<NodeId>,
}

fn copies_of(img: &Img, alive: &dyn Fn(NodeId) -> bool) -> Vec<ImageCopy> {
    let mut out = Vec::new();
    let c = |level, node| ImageCopy {
        level,
        node,
        bytes: img.bytes,
    };
    if img.safe[0] && alive(img.node) {
        out.push(c(Level::L1, Some(img.node)));
    }
    if let Some(b) = img.buddy.filter(|b| img.safe[1] && alive(*b)) {
        out.push(c(Level::L2, Some(b)));
    }
    if let Some(h) = img.holder.filter(|h| img.safe[2] && alive(*h)) {
        if img.parity_set.iter().filter(|n| !alive(**n)).count() <= 1 {
            out.push(c(Level::L3, Some(h)));
        }
    }
    if img.safe[3] {
        out.push(c(Level::L4, None));
    }
    out
}

impl Reads for StoreIndex<'_> {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        match self.store.get(&(rank, version)) {
            Some(img) => copies_of(img, &|n| !self.agreed_dead.contains(&n)),
            None => Vec::new(),
        }
    }
}

/// Where an armed crash strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// The node hosting this rank.
    RankHost(Rank),
    /// The target of the restart that armed it.
    RestartTarget,
    /// The node the restart fetches from.
    RestartSource,
    /// The buddy of the node hosting rank 0.
    Buddy,
    Leader,
}

/// A step of a checkpoint or a restart at which an armed crash fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    CkptSync,
    CkptCapture(u32),
    CkptRelease,
    CkptCommit,
    RestartDecided,
    RestartMidFetch,
    RestartUp,
    RecoveryRelease,
}

const STEP_NAMES: [&str; 8] = [
    "ckpt-sync",
    "ckpt-capture",
    "ckpt-release",
    "ckpt-commit",
    "restart-decided",
    "restart-mid-fetch",
    "restart-up",
    "recovery-release",
];

fn step_index(s: Step) -> usize {
    match s {
        Step::CkptSync => 0,
        Step::CkptCapture(_) => 1,
        Step::CkptRelease => 2,
        Step::CkptCommit => 3,
        Step::RestartDecided => 4,
        Step::RestartMidFetch => 5,
        Step::RestartUp => 6,
        Step::RecoveryRelease => 7,
    }
}

#[derive(Clone, Debug)]
struct Armed {
    step: Step,
    /// Fires at the n-th occurrence (0: the first).
    skip: u32,
    victim: Victim,
}

#[derive(Clone, Debug)]
enum Ev {
    AppStep,
    PolicyTick,
    Deliver(Event),
    /// An effect on a rank (per-rank FIFO), issued by `leader`.
    Effect(Rank, Effect),
    Flush(Rank, Version, Level),
    Crash(NodeId, &'static str),
    Agree(NodeId),
    Join(NodeId),
}

#[derive(Clone, Debug)]
enum Effect {
    Hold(policies::primitives::OpId, usize),
    Capture(policies::primitives::OpId, Version, Vec<Level>),
    Release,
    Rollback(policies::primitives::OpId, Version, ImageCopy),
    Restart(Decision),
}

#[derive(Default, Debug, Clone)]
struct Outcome {
    completed: u64,
    ended: BTreeMap<&'static str, u64>,
    crashes: BTreeMap<&'static str, u64>,
    armed_fired: [u64; 8],
    restarts: u64,
    rollbacks: u64,
    committed: u64,
    aborted: u64,
    takeovers: u64,
    /// Takeovers that rolled nothing back (the lost leader hosted no rank).
    quiet_takeovers: u64,
    /// Failure agreements naming several nodes.
    grouped_agreements: u64,
    restart_failures: u64,
    events: u64,
    max_restarts_one_run: u64,
    joins: u64,
    capture_failures: u64,
    /// Restarts per level the image came from (L1..L4), and from the program's start.
    restart_sources: [u64; 5],
    /// Ranks placed on a survivor because no spare was left.
    survivor_placements: u64,
    /// A few seeds per way a job ended with an error.
    examples: BTreeMap<&'static str, Vec<u64>>,
}

impl Outcome {
    fn add(&mut self, o: &Outcome) {
        self.completed += o.completed;
        for (k, v) in &o.ended {
            *self.ended.entry(k).or_default() += v;
        }
        for (k, v) in &o.crashes {
            *self.crashes.entry(k).or_default() += v;
        }
        for i in 0..8 {
            self.armed_fired[i] += o.armed_fired[i];
        }
        self.restarts += o.restarts;
        self.rollbacks += o.rollbacks;
        self.committed += o.committed;
        self.aborted += o.aborted;
        self.takeovers += o.takeovers;
        self.quiet_takeovers += o.quiet_takeovers;
        self.grouped_agreements += o.grouped_agreements;
        self.restart_failures += o.restart_failures;
        self.events += o.events;
        self.max_restarts_one_run = self.max_restarts_one_run.max(o.restarts);
        self.joins += o.joins;
        self.capture_failures += o.capture_failures;
        for i in 0..5 {
            self.restart_sources[i] += o.restart_sources[i];
        }
        self.survivor_placements += o.survivor_placements;
        for (k, v) in &o.examples {
            let e = self.examples.entry(k).or_default();
            if e.len() < 6 {
                e.extend(v);
            }
        }
    }
}

struct Sim {
    seed: u64,
    rng: SmallRng,
    now: Millis,
    seq: u64,
    queue: BTreeMap<(Millis, u64), Ev>,
    nranks: usize,
    nodes: u32,
    cfg: Config,
    alive: Vec<bool>,
    agreed_dead: BTreeSet<NodeId>,
    epoch: Epoch,
    leader: NodeId,
    /// Who leads next when the leader is lost: the first live node in this order.
    leaders: Vec<NodeId>,
    /// The process table's exit codes of ranks whose process ended by itself.
    exits: BTreeMap<Rank, i32>,
    /// A new leader took over and has not handled its first event yet.
    took_over: bool,
    policy: Coordinated,
    procs: Vec<Option<Proc>>,
    /// Highest incarnation decided per rank (the process table refuses a lower one).
    decided: Vec<u32>,
    /// The process table: registered placement per rank.
    table: Vec<RankSlot>,
    spares: Vec<NodeId>,
    decisions: Vec<Decision>,
    /// Kept commits (the store drops older versions).
    commits: Vec<Version>,
    store: BTreeMap<(Rank, Version), Img>,
    /// When each rank's FIFO of effects is free.
    fifo: Vec<Millis>,
    /// Ranks held per barrier.
    holds: BTreeMap<policies::primitives::OpId, usize>,
    armed: Vec<Armed>,
    /// Processes brought up per (rank, failure epoch).
    created: BTreeMap<(Rank, Epoch), u32>,
    tick_at: Option<Millis>,
    trace: Vec<String>,
    hash: u64,
    out: Outcome,
    done: Option<Result<(), PolicyError>>,
    lines: Vec<String>,
    detect: (Millis, Millis),
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let compute = rng.gen_range(3..=5u32);
        let per_node = rng.gen_range(1..=2u32);
        let spares = [0u32, 1, 1, 2][rng.gen_range(0..4)];
        // Sometimes one more node joins during the run (it starts out of the view).
        let joiner = rng.gen_bool(0.3).then_some(compute + spares);
        let nodes = compute + spares + u32::from(joiner.is_some());
        let nranks = (compute * per_node) as usize;
        let mut levels = vec![
            LevelCadence {
                level: Level::L1,
                every: 1,
            },
            LevelCadence {
                level: Level::L2,
                every: 1,
            },
        ];
        if nodes >= 2 * PARITY_SET && rng.gen_bool(0.5) {
            levels.push(LevelCadence {
                level: Level::L3,
                every: rng.gen_range(1..=2),
            });
        }
        if rng.gen_bool(0.75) {
            levels.push(LevelCadence {
                level: Level::L4,
                every: rng.gen_range(1..=3),
            });
        }
        let cfg = Config {
            interval: if rng.gen_bool(0.2) {
                IntervalChoice::Daly {
                    mtbf_s: 0.5,
                    initial_ms: 200,
                }
            } else {
                IntervalChoice::Fixed {
                    ms: rng.gen_range(120..400),
                }
            },
            levels,
            commit_level: Level::L2,
            keep_commits: rng.gen_range(1..=2),
            no_spare: match rng.gen_range(0..4) {
                0 => NoSpare::Fail,
                1 => NoSpare::Survivors {
                    max_ranks_per_node: Some(per_node + 1),
                },
                _ => NoSpare::Survivors {
                    max_ranks_per_node: None,
                },
            },
            max_restart_attempts: 3,
        };
        let layout = Layout {
            ranks: (0..nranks as u32).map(|r| r / per_node).collect(),
            spares: (compute..nodes).collect(),
        };
        let view = AgreedView::new(1, (0..nodes).filter(|n| Some(*n) != joiner).collect());
        // The supervisors' order of leadership: usually the compute nodes first (the leader
        // hosts rank 0), sometimes the spares first (a leader that hosts no rank).
        let mut leaders: Vec<NodeId> = (0..nodes).collect();
        if spares > 0 && rng.gen_bool(0.4) {
            leaders.rotate_left(compute as usize);
        }
        let leader = leaders[0];
        let policy = Coordinated::new(cfg.clone(), leader, &layout, view, 0).expect("valid config");
        let procs = (0..nranks as Rank)
            .map(|r| {
                Some(Proc {
                    node: layout.ranks[r as usize],
                    incarnation: 0,
                    status: ProcStatus::Running,
                    state: initial(r),
                })
            })
            .collect();
        let table = layout
            .ranks
            .iter()
            .map(|&node| RankSlot {
                node,
                incarnation: 0,
            })
            .collect();
        let detect = (rng.gen_range(20..60), rng.gen_range(60..120));
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            nranks,
            nodes,
            cfg,
            alive: (0..nodes).map(|n| Some(n) != joiner).collect(),
            agreed_dead: joiner.into_iter().collect(),
            epoch: 1,
            leader,
            leaders,
            exits: BTreeMap::new(),
            took_over: false,
            policy,
            procs,
            decided: vec![0; nranks],
            table,
            spares: layout.spares.clone(),
            decisions: Vec::new(),
            commits: Vec::new(),
            store: BTreeMap::new(),
            fifo: vec![0; nranks],
            holds: BTreeMap::new(),
            armed: Vec::new(),
            created: BTreeMap::new(),
            tick_at: None,
            trace: Vec::new(),
            hash: 0xcbf2_9ce4_8422_2325,
            out: Outcome::default(),
            done: None,
            lines: Vec::new(),
            detect,
        };
        sim.log(format!(
            "job: {nranks} ranks on {compute} nodes x {per_node}, spares {:?}, joiner {joiner:?}, leaders {:?}, {:?}",
            layout.spares, sim.leaders, sim.cfg
        ));
        if let Some(j) = joiner {
            let t = sim.rng.gen_range(1..STEPS * STEP_MS);
            sim.push(t, Ev::Join(j));
        }
        sim.schedule_failures(compute, per_node);
        sim.push(STEP_MS, Ev::AppStep);
        sim
    }

    /// Picks this seed's failure scenario.
    fn schedule_failures(&mut self, compute: u32, per_node: u32) {
        let span = STEPS * STEP_MS;
        let rank_on = |rng: &mut SmallRng| rng.gen_range(0..compute * per_node);
        match self.rng.gen_range(0..8) {
            0 => {
                for _ in 0..self.rng.gen_range(1..=3) {
                    let t = self.rng.gen_range(1..span * 2);
                    let n = self.rng.gen_range(0..self.nodes);
                    self.push(t, Ev::Crash(n, "random"));
                }
            }
            1 => {
                // A crash at a step of a checkpoint.
                let step = match self.rng.gen_range(0..4) {
                    0 => Step::CkptSync,
                    1 => Step::CkptCapture(self.rng.gen_range(0..compute * per_node)),
                    2 => Step::CkptRelease,
                    _ => Step::CkptCommit,
                };
                let victim = match self.rng.gen_range(0..3) {
                    0 => Victim::Buddy,
                    1 => Victim::Leader,
                    _ => Victim::RankHost(rank_on(&mut self.rng)),
                };
                let skip = self.rng.gen_range(0..3);
                self.armed.push(Armed { step, skip, victim });
            }
            2 | 3 => {
                // A crash, then another at a step of the restart it causes.
                let t = self.rng.gen_range(1..span);
                let n = self.rng.gen_range(0..compute);
                self.push(t, Ev::Crash(n, "random"));
                let step = match self.rng.gen_range(0..4) {
                    0 => Step::RestartDecided,
                    1 => Step::RestartMidFetch,
                    2 => Step::RestartUp,
                    _ => Step::RecoveryRelease,
                };
                let victim = match self.rng.gen_range(0..4) {
                    0 => Victim::RestartTarget,
                    1 => Victim::RestartSource,
                    2 => Victim::Leader,
                    _ => Victim::RankHost(rank_on(&mut self.rng)),
                };
                self.armed.push(Armed {
                    step,
                    skip: 0,
                    victim,
                });
            }
            4 => {
                // Two (or three) crashes in a row, closer than detection.
                let t = self.rng.gen_range(1..span);
                let mut nodes: Vec<NodeId> = (0..self.nodes).collect();
                for k in 0..self.rng.gen_range(2..=3) {
                    let i = self.rng.gen_range(0..nodes.len());
                    let n = nodes.swap_remove(i);
                    let dt = k * self.rng.gen_range(0..80);
                    self.push(t + dt, Ev::Crash(n, "in-a-row"));
                }
            }
            5 => {
                // A buddy pair: a node and the next one (its buddy) at once.
                let t = self.rng.gen_range(1..span);
                let n = self.rng.gen_range(0..compute);
                self.push(t, Ev::Crash(n, "buddy-pair"));
                let dt = self.rng.gen_range(0..3);
                self.push(t + dt, Ev::Crash((n + 1) % self.nodes, "buddy-pair"));
            }
            6 => {
                // The node of rank 0, which is also the leader.
                let t = self.rng.gen_range(1..span);
                self.push(t, Ev::Crash(0, "rank0-leader"));
            }
            _ => {
                // More failures than spares: spare exhaustion.
                let k = (self.nodes - compute) + 1;
                let mut t = self.rng.gen_range(1..span / 2);
                let mut nodes: Vec<NodeId> = (0..compute).collect();
                for _ in 0..k.min(compute - 1) {
                    let i = self.rng.gen_range(0..nodes.len());
                    let n = nodes.swap_remove(i);
                    self.push(t, Ev::Crash(n, "spare-exhaustion"));
                    t += self.rng.gen_range(100..500);
                }
            }
        }
        if self.rng.gen_bool(0.3) {
            let t = self.rng.gen_range(1..span);
            self.push(
                t,
                Ev::Deliver(Event::CheckpointRequest {
                    source: RequestSource::Signal,
                }),
            );
        }
    }

    fn push(&mut self, at: Millis, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn log(&mut self, s: String) {
        for b in s.bytes() {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.trace.push(format!("t={} {s}", self.now));
    }

    fn fail(&self, what: &str) -> ! {
        let n: usize = std::env::var("KRUN_SIM_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        let tail: Vec<&str> = self
            .trace
            .iter()
            .rev()
            .take(n)
            .map(|s| s.as_str())
            .collect();
        panic!(
            "seed {} t={}: {what}\nreplay with KRUN_SIM_SEED={}\nlast events (newest first):\n{}",
            self.seed,
            self.now,
            self.seed,
            tail.join("\n")
        );
    }

    fn alive(&self, n: NodeId) -> bool {
        self.alive[n as usize]
    }

    fn view(&self) -> AgreedView {
        AgreedView::new(
            self.epoch,
            (0..self.nodes)
                .filter(|n| !self.agreed_dead.contains(n))
                .collect(),
        )
    }

    /// The next node in the ring that the agreed view holds.
    fn buddy_of(&self, n: NodeId) -> Option<NodeId> {
        (1..self.nodes)
            .map(|k| (n + k) % self.nodes)
            .find(|b| !self.agreed_dead.contains(b))
    }

    fn fire(
        &mut self,
        step: Step,
        rank: Option<Rank>,
        target: Option<NodeId>,
        source: Option<NodeId>,
    ) {
        let mut fired = Vec::new();
        self.armed.retain_mut(|a| {
            let matches = match (a.step, step) {
                (Step::CkptCapture(r), Step::CkptCapture(_)) => Some(r) == rank,
                (x, y) => x == y,
            };
            if !matches {
                return true;
            }
            if a.skip > 0 {
                a.skip -= 1;
                return true;
            }
            fired.push(a.victim);
            false
        });
        for v in fired {
            let node = match v {
                Victim::RankHost(r) => self.procs[r as usize].map(|p| p.node),
                Victim::RestartTarget => target,
                Victim::RestartSource => source,
                Victim::Buddy => self.procs[0].map(|p| p.node).and_then(|n| self.buddy_of(n)),
                Victim::Leader => Some(self.leader),
            };
            self.out.armed_fired[step_index(step)] += 1;
            if let Some(n) = node {
                let name = STEP_NAMES[step_index(step)];
                let dt = self.rng.gen_range(0..3);
                self.push(self.now + dt, Ev::Crash(n, name));
            }
        }
    }

    fn deliver(&mut self, ev: Event) {
        if !self.alive(self.leader) {
            self.log(format!("lost (leader {} dead): {ev:?}", self.leader));
            return;
        }
        self.log(format!("-> policy: {ev:?}"));
        let reads = StoreIndex {
            store: &self.store,
            agreed_dead: &self.agreed_dead,
        };
        let actions = self.policy.on_event(self.now, ev, &reads);
        if std::mem::take(&mut self.took_over)
            && !actions
                .iter()
                .any(|a| matches!(a, Action::Rollback { .. } | Action::Restart(_)))
        {
            self.out.quiet_takeovers += 1;
        }
        for a in actions {
            self.execute(a);
        }
    }

    fn effect(&mut self, rank: Rank, e: Effect, delay: Millis) {
        let at = (self.now + delay).max(self.fifo[rank as usize] + 1);
        self.fifo[rank as usize] = at;
        self.push(at, Ev::Effect(rank, e));
    }

    fn record(&mut self, d: &Decision) {
        if self.decisions.iter().any(|x| x.id == d.id) {
            self.fail(&format!("decision id {} recorded twice", d.id));
        }
        self.decisions.push(d.clone());
    }

    fn execute(&mut self, a: Action) {
        self.log(format!("<- policy: {a:?}"));
        match a {
            Action::Synchronize { op, ranks } => {
                self.fire(Step::CkptSync, None, None, None);
                let n = ranks.len();
                for r in ranks {
                    let d = self.rng.gen_range(1..6);
                    self.effect(r, Effect::Hold(op, n), d);
                }
            }
            Action::Capture {
                op,
                rank,
                version,
                levels,
            } => {
                let d = self.rng.gen_range(3..15);
                self.effect(rank, Effect::Capture(op, version, levels), d);
            }
            Action::Release { ranks } => {
                let recovering =
                    self.policy.phase() == Phase::Running && self.policy.summary().recoveries > 0;
                if recovering {
                    self.fire(Step::RecoveryRelease, None, None, None);
                } else {
                    self.fire(Step::CkptRelease, None, None, None);
                }
                for r in ranks {
                    let d = self.rng.gen_range(1..4);
                    self.effect(r, Effect::Release, d);
                }
            }
            Action::Rollback {
                op,
                rank,
                version,
                source,
            } => {
                self.out.rollbacks += 1;
                let d = self.rng.gen_range(4..20);
                self.effect(rank, Effect::Rollback(op, version, source), d);
            }
            Action::Restart(d) => {
                self.record(&d);
                let DecisionKind::Restart {
                    rank,
                    incarnation,
                    node,
                    source,
                    ..
                } = d.kind.clone()
                else {
                    self.fail(&format!("Restart carries {d:?}"));
                };
                if incarnation <= self.decided[rank as usize] {
                    self.fail(&format!(
                        "restart decision {} reuses incarnation {incarnation} of rank {rank} (decided {})",
                        d.id, self.decided[rank as usize]
                    ));
                }
                self.decided[rank as usize] = incarnation;
                self.out.restarts += 1;
                self.out.restart_sources[source.map_or(4, |s| s.level as usize)] += 1;
                let fetch = match source.map(|s| s.level) {
                    Some(Level::L1) | None => self.rng.gen_range(5..15),
                    Some(Level::L2) => self.rng.gen_range(10..30),
                    Some(Level::L3) => self.rng.gen_range(30..60),
                    Some(Level::L4) => self.rng.gen_range(50..120),
                };
                self.fire(
                    Step::RestartDecided,
                    Some(rank),
                    Some(node),
                    source.and_then(|s| s.node),
                );
                // A crash armed mid-fetch strikes half-way.
                if self.armed.iter().any(|a| a.step == Step::RestartMidFetch) {
                    let saved = self.now;
                    self.now += fetch / 2;
                    self.fire(
                        Step::RestartMidFetch,
                        Some(rank),
                        Some(node),
                        source.and_then(|s| s.node),
                    );
                    self.now = saved;
                }
                self.effect(rank, Effect::Restart(d), fetch);
            }
            Action::Record(d) => {
                self.record(&d);
                match &d.kind {
                    DecisionKind::Committed { version, .. } => {
                        self.out.committed += 1;
                        self.fire(Step::CkptCommit, None, None, None);
                        self.commits.push(*version);
                        let keep = self.cfg.keep_commits;
                        if self.commits.len() > keep {
                            self.commits.drain(..self.commits.len() - keep);
                        }
                        let oldest = self.commits[0];
                        self.store.retain(|(_, v), _| *v >= oldest);
                    }
                    DecisionKind::Aborted { version, .. } => {
                        self.out.aborted += 1;
                        let v = *version;
                        self.store.retain(|(_, x), _| *x != v);
                    }
                    _ => {}
                }
            }
            Action::LogEvent(e) => self.fail(&format!("the coordinated policy logged {e:?}")),
            Action::Notify(n) => {
                if let policies::report::NoticeKind::RecoveryPlanned { restarts, .. } = &n.kind {
                    for g in restarts.iter().filter(|g| !g.spare && g.source.is_some()) {
                        self.out.survivor_placements += g.ranks.len() as u64;
                    }
                }
                self.lines.push(format!("[{:>5} ms] {n}", n.at));
            }
            Action::EndJob { error } => {
                self.done = Some(match error {
                    None => Ok(()),
                    Some(e) => Err(e),
                });
            }
        }
    }

    fn apply(&mut self, rank: Rank, e: Effect) {
        let r = rank as usize;
        let proc_alive = |s: &Sim| s.procs[r].filter(|p| s.alive(p.node));
        match e {
            Effect::Hold(op, n) => {
                let Some(p) = proc_alive(self) else { return };
                if p.status == ProcStatus::Exited {
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::SyncFailed {
                            op,
                            reason: format!("rank {rank} exited"),
                        }),
                    );
                    return;
                }
                self.procs[r].as_mut().unwrap().status = ProcStatus::Held;
                // The barrier completes when every rank is held for this op: the last one
                // to be held answers (counted per op).
                let held = self.holds.entry(op).or_default();
                *held += 1;
                if *held == n {
                    self.push(self.now + 1, Ev::Deliver(Event::Synchronized { op }));
                }
            }
            Effect::Capture(op, version, levels) => {
                let Some(p) = proc_alive(self) else { return };
                if p.status != ProcStatus::Held {
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::CaptureFailed {
                            op,
                            rank,
                            version,
                            reason: format!("rank {rank} is not held ({:?})", p.status),
                        }),
                    );
                    return;
                }
                self.fire(Step::CkptCapture(0), Some(rank), None, None);
                if self.rng.gen_bool(0.005) {
                    self.out.capture_failures += 1;
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::CaptureFailed {
                            op,
                            rank,
                            version,
                            reason: "injected: the image write failed".into(),
                        }),
                    );
                    return;
                }
                let set_start = p.node / PARITY_SET * PARITY_SET;
                let parity_set: Vec<NodeId> =
                    (set_start..(set_start + PARITY_SET).min(self.nodes)).collect();
                let holder = (self.nodes >= 2 * PARITY_SET).then(|| {
                    ((set_start / PARITY_SET + 1) * PARITY_SET)
                        % (self.nodes / PARITY_SET * PARITY_SET)
                });
                let bytes = 1 << 20;
                self.store.insert(
                    (rank, version),
                    Img {
                        data: p.state,
                        node: p.node,
                        buddy: self.buddy_of(p.node),
                        parity_set,
                        holder,
                        safe: [true, false, false, false],
                        bytes,
                    },
                );
                self.push(
                    self.now + 1,
                    Ev::Deliver(Event::CaptureDone {
                        op,
                        rank,
                        version,
                        bytes,
                        seconds: 0.005,
                    }),
                );
                self.push(
                    self.now + 1,
                    Ev::Deliver(Event::LevelSafe {
                        rank,
                        version,
                        level: Level::L1,
                    }),
                );
                for l in levels {
                    let d = match l {
                        Level::L1 => continue,
                        Level::L2 => self.rng.gen_range(5..30),
                        Level::L3 => self.rng.gen_range(20..60),
                        Level::L4 => self.rng.gen_range(40..150),
                    };
                    self.push(self.now + d, Ev::Flush(rank, version, l));
                }
            }
            Effect::Release => {
                if let Some(p) = self.procs[r].as_mut() {
                    if p.status == ProcStatus::Held {
                        p.status = ProcStatus::Running;
                    }
                }
            }
            Effect::Rollback(op, version, source) => {
                let registered = self.procs[r].filter(|p| !self.agreed_dead.contains(&p.node));
                if registered.is_none() {
                    let reason = format!("rank {rank} has no process in the view");
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::RollbackFailed { op, rank, reason }),
                    );
                    return;
                }
                let Some(p) = proc_alive(self) else { return };
                if p.status == ProcStatus::Exited {
                    let reason = format!("rank {rank}'s process has exited");
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::RollbackFailed { op, rank, reason }),
                    );
                    return;
                }
                let img = self.store.get(&(rank, version)).cloned();
                let valid = img.as_ref().is_some_and(|i| {
                    copies_of(i, &|n| self.alive(n))
                        .iter()
                        .any(|c| c.level == source.level && c.node == source.node)
                });
                let ev = if valid {
                    let q = self.procs[r].as_mut().unwrap();
                    q.state = img.unwrap().data;
                    q.status = ProcStatus::Held;
                    Event::RollbackDone {
                        op,
                        rank,
                        version,
                        seconds: 0.01,
                    }
                } else {
                    Event::RollbackFailed {
                        op,
                        rank,
                        reason: format!("copy {source} of version {version} is unreachable"),
                    }
                };
                let _ = p;
                self.push(self.now + 1, Ev::Deliver(ev));
            }
            Effect::Restart(d) => {
                let DecisionKind::Restart {
                    incarnation,
                    node,
                    version,
                    source,
                    failure_epoch,
                    ..
                } = d.kind
                else {
                    return;
                };
                if !self.alive(node) {
                    return;
                }
                if self.decided[r] > incarnation {
                    self.log(format!(
                        "rank {rank} incarnation {incarnation} fenced (decided {})",
                        self.decided[r]
                    ));
                    return;
                }
                let state = match (version, source) {
                    (None, _) => Some(initial(rank)),
                    (Some(v), Some(src)) => self.store.get(&(rank, v)).and_then(|i| {
                        copies_of(i, &|n| self.alive(n))
                            .iter()
                            .any(|c| c.level == src.level && c.node == src.node)
                            .then_some(i.data)
                    }),
                    (Some(_), None) => self.fail("a restart from a version names no source"),
                };
                let Some(state) = state else {
                    self.out.restart_failures += 1;
                    self.push(
                        self.now + 1,
                        Ev::Deliver(Event::RestartFailed {
                            decision: d.id,
                            rank,
                            reason: format!(
                                "copy {} is unreachable",
                                source.map(|s| s.to_string()).unwrap_or_default()
                            ),
                        }),
                    );
                    return;
                };
                self.fire(
                    Step::RestartUp,
                    Some(rank),
                    Some(node),
                    source.and_then(|s| s.node),
                );
                let c = self.created.entry((rank, failure_epoch)).or_default();
                *c += 1;
                if *c > 1 {
                    self.fail(&format!(
                        "rank {rank} brought up twice for the failure of epoch {failure_epoch}"
                    ));
                }
                // Registering the new incarnation ends any older one.
                self.procs[r] = Some(Proc {
                    node,
                    incarnation,
                    status: ProcStatus::Held,
                    state,
                });
                self.table[r] = RankSlot { node, incarnation };
                self.exits.remove(&rank);
                self.push(
                    self.now + 1,
                    Ev::Deliver(Event::RestartDone {
                        decision: d.id,
                        rank,
                        node,
                        seconds: 0.02,
                    }),
                );
            }
        }
    }
}

impl Sim {
    fn crash(&mut self, n: NodeId, kind: &'static str) {
        if !self.alive(n) {
            return;
        }
        self.alive[n as usize] = false;
        *self.out.crashes.entry(kind).or_default() += 1;
        self.log(format!("CRASH node {n} ({kind})"));
        let d = self.rng.gen_range(self.detect.0..=self.detect.1);
        self.push(self.now + d, Ev::Agree(n));
    }

    fn agree(&mut self, n: NodeId) {
        if !self.agreed_dead.insert(n) {
            return;
        }
        // Sometimes the group agrees on every crash it has seen so far at once.
        let mut failed = vec![n];
        if self.rng.gen_bool(0.5) {
            for m in 0..self.nodes {
                if !self.alive(m) && self.agreed_dead.insert(m) {
                    failed.push(m);
                }
            }
        }
        if failed.len() > 1 {
            self.out.grouped_agreements += 1;
        }
        self.epoch += 1;
        let view = self.view();
        if !self.alive(self.leader) {
            let Some(next) = self.leaders.iter().copied().find(|m| self.alive(*m)) else {
                self.log("every node is dead".into());
                self.done = Some(Err(PolicyError::AllNodesLost { failed }));
                return;
            };
            let snapshot = Snapshot {
                view: view.clone(),
                ranks: self.table.clone(),
                spares: self.spares.clone(),
                decisions: self.decisions.clone(),
                exits: self.exits.iter().map(|(r, c)| (*r, *c)).collect(),
            };
            // The table's newest decided incarnation is part of what the snapshot gives.
            self.policy = Coordinated::resume(self.cfg.clone(), next, &snapshot, self.now)
                .unwrap_or_else(|e| self.fail(&format!("resume failed: {e}")));
            self.log(format!("leader {} -> {next}", self.leader));
            self.leader = next;
            self.out.takeovers += 1;
            self.took_over = true;
        }
        self.deliver(Event::FailureAgreed {
            epoch: self.epoch,
            failed,
            view,
        });
    }

    fn join(&mut self, n: NodeId) {
        self.alive[n as usize] = true;
        self.agreed_dead.remove(&n);
        self.epoch += 1;
        self.spares.push(n);
        self.out.joins += 1;
        self.log(format!("JOIN node {n}"));
        let view = self.view();
        self.deliver(Event::NodeJoined {
            epoch: self.epoch,
            node: n,
            view,
        });
    }

    fn flush(&mut self, rank: Rank, version: Version, level: Level) {
        let Some(img) = self.store.get(&(rank, version)) else {
            return;
        };
        if !self.alive(img.node) {
            return;
        }
        let target = match level {
            Level::L1 | Level::L4 => Some(img.node),
            Level::L2 => img.buddy,
            Level::L3 => img.holder,
        };
        let ok = target.is_some_and(|t| self.alive(t));
        if ok {
            self.store.get_mut(&(rank, version)).unwrap().safe[level as usize] = true;
        }
        let ev = if ok {
            Event::LevelSafe {
                rank,
                version,
                level,
            }
        } else {
            Event::LevelLost {
                rank,
                version,
                level,
            }
        };
        self.deliver(ev);
    }

    fn app_step(&mut self) {
        let procs: Vec<Proc> = self.procs.iter().flatten().copied().collect();
        let all_up = procs.len() == self.nranks
            && procs
                .iter()
                .all(|p| self.alive(p.node) && p.status == ProcStatus::Running);
        if all_up {
            let step = procs[0].state.step;
            if let Some(p) = procs.iter().find(|p| p.state.step != step) {
                self.fail(&format!(
                    "ranks compute at different steps ({step} and {}): inconsistent cut",
                    p.state.step
                ));
            }
            let mut xs: Vec<u64> = procs.iter().map(|p| p.state.x).collect();
            advance(&mut xs, step);
            for (r, x) in xs.into_iter().enumerate() {
                let p = self.procs[r].as_mut().unwrap();
                p.state = AppState { step: step + 1, x };
                if step + 1 == STEPS {
                    p.status = ProcStatus::Exited;
                }
            }
            if step + 1 == STEPS {
                for r in 0..self.nranks as Rank {
                    self.exits.insert(r, 0);
                    let node = self.procs[r as usize].unwrap().node;
                    let d = self.rng.gen_range(1..5);
                    self.push(
                        self.now + d,
                        Ev::Deliver(Event::RankExited {
                            rank: r,
                            node,
                            code: 0,
                        }),
                    );
                }
            }
        }
        self.push(self.now + STEP_MS, Ev::AppStep);
    }

    fn run(mut self) -> (Outcome, u64, Vec<String>) {
        let limit = STEPS * STEP_MS * 60;
        while self.done.is_none() {
            if let Some(d) = self.policy.next_deadline() {
                if self.tick_at != Some(d) {
                    self.tick_at = Some(d);
                    self.push(d.max(self.now), Ev::PolicyTick);
                }
            }
            let Some(((t, _), ev)) = self.queue.pop_first() else {
                self.fail("nothing is left to happen and the job did not end");
            };
            if t > limit {
                self.fail(&format!(
                    "the job did not end within {limit} ms (policy phase {:?})",
                    self.policy.phase()
                ));
            }
            self.now = t;
            self.out.events += 1;
            match ev {
                Ev::AppStep => self.app_step(),
                Ev::PolicyTick => self.deliver(Event::Tick),
                Ev::Deliver(e) => self.deliver(e),
                Ev::Effect(r, e) => self.apply(r, e),
                Ev::Flush(r, v, l) => self.flush(r, v, l),
                Ev::Crash(n, kind) => self.crash(n, kind),
                Ev::Agree(n) => self.agree(n),
                Ev::Join(n) => self.join(n),
            }
        }
        self.check_end();
        (self.out.clone(), self.hash, self.lines.clone())
    }

    fn check_end(&mut self) {
        match self.done.clone().unwrap() {
            Ok(()) => {
                let want = reference(self.nranks);
                for (r, p) in self.procs.iter().enumerate() {
                    let Some(p) = p else {
                        self.fail(&format!("rank {r} has no process at the end"));
                    };
                    if p.incarnation != self.table[r].incarnation {
                        self.fail(&format!(
                            "rank {r}'s process is not the registered incarnation"
                        ));
                    }
                    if p.state.step != STEPS || p.state.x != want[r] {
                        self.fail(&format!(
                            "rank {r} ends at step {} with {:#x}; the reference is step {STEPS} with {:#x}",
                            p.state.step, p.state.x, want[r]
                        ));
                    }
                }
                self.out.completed += 1;
                if self.out.takeovers == 0 {
                    let sum = self.policy.summary();
                    let want = (
                        self.out.committed,
                        self.out.aborted,
                        self.out.restarts,
                        self.out.rollbacks,
                    );
                    let got = (
                        u64::from(sum.checkpoints),
                        u64::from(sum.aborted),
                        u64::from(sum.restarts),
                        u64::from(sum.rollbacks),
                    );
                    if want != got {
                        self.fail(&format!(
                            "summary {sum:?} disagrees with the run (checkpoints, aborted, restarts, rollbacks) = {want:?}"
                        ));
                    }
                }
            }
            Err(e) => {
                let name = match &e {
                    PolicyError::ImagesLost { versions, .. } => {
                        for v in versions {
                            let lost = (0..self.nranks as Rank).any(|r| {
                                self.store
                                    .get(&(r, *v))
                                    .is_none_or(|i| copies_of(i, &|n| self.alive(n)).is_empty())
                            });
                            if !lost {
                                self.fail(&format!(
                                    "the policy says checkpoint {v} is lost, but every rank has a copy: {e}"
                                ));
                            }
                        }
                        "images-lost"
                    }
                    PolicyError::NoNode { .. } => {
                        let live: Vec<NodeId> =
                            (0..self.nodes).filter(|n| self.alive(*n)).collect();
                        let slots = self.policy.slots();
                        let free_spares = live
                            .iter()
                            .filter(|n| {
                                self.spares.contains(n) && !slots.iter().any(|s| s.node == **n)
                            })
                            .count();
                        let lost_nodes: BTreeSet<NodeId> = slots
                            .iter()
                            .map(|s| s.node)
                            .filter(|n| self.agreed_dead.contains(n))
                            .collect();
                        // Each failed node's ranks take one free spare; the rest go to
                        // survivors under the cap (least-loaded placement fails only when
                        // the ranks exceed the live nodes' capacity).
                        let room = match self.cfg.no_spare {
                            NoSpare::Fail => free_spares >= lost_nodes.len(),
                            NoSpare::Survivors {
                                max_ranks_per_node: None,
                            } => !live.is_empty(),
                            NoSpare::Survivors {
                                max_ranks_per_node: Some(c),
                            } => live.len() as u32 * c >= self.nranks as u32,
                        };
                        if room {
                            self.fail(&format!("the policy found no node, but one was free: {e}"));
                        }
                        "no-node"
                    }
                    PolicyError::AllNodesLost { .. } => {
                        if (0..self.nodes).any(|n| self.alive(n)) {
                            self.fail(&format!("a node is alive: {e}"));
                        }
                        "all-nodes-lost"
                    }
                    other => self.fail(&format!("the job ended with an unexpected error: {other}")),
                };
                *self.out.ended.entry(name).or_default() += 1;
                self.out.examples.entry(name).or_default().push(self.seed);
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

#[test]
fn coordinated_policy_survives_seeded_failure_schedules() {
    if let Some(seed) = env_u64("KRUN_SIM_SEED") {
        let (o, _, lines) = Sim::new(seed).run();
        for l in lines {
            println!("{l}");
        }
        println!("seed {seed}: {o:?}");
        return;
    }
    let schedules = env_u64("KRUN_SIM_SCHEDULES").unwrap_or(6000);
    let first = env_u64("KRUN_SIM_FIRST_SEED").unwrap_or(0);
    let mut total = Outcome::default();
    for seed in first..first + schedules {
        let (o, _, _) = Sim::new(seed).run();
        total.add(&o);
    }
    println!("{schedules} schedules: {total:#?}");
    let crashes: u64 = total.crashes.values().sum();
    let ended: u64 = total.ended.values().sum();
    assert_eq!(total.completed + ended, schedules);
    if schedules >= 500 {
        // The schedules reach what they are meant to reach.
        assert!(crashes >= schedules / 2, "{crashes} crashes");
        for (i, n) in total.armed_fired.iter().enumerate() {
            assert!(*n > 0, "no crash at step {}", STEP_NAMES[i]);
        }
        for kind in ["buddy-pair", "rank0-leader", "spare-exhaustion", "in-a-row"] {
            assert!(
                total.crashes.get(kind).copied().unwrap_or(0) > 0,
                "no {kind} crash"
            );
        }
        assert!(total.takeovers > 0 && total.restarts > 0 && total.rollbacks > 0);
        assert!(
            total.quiet_takeovers > 0,
            "no leader without ranks was lost"
        );
        assert!(total.aborted > 0 && total.committed > 0);
        // Most runs recover: errors are the exception the schedule forces.
        assert!(total.completed > schedules * 3 / 5, "{total:?}");
        // Buddy pairs lost: images come back from parity or disk.
        assert!(total.restart_sources[2] > 0 && total.restart_sources[3] > 0);
        assert!(total.survivor_placements > 0 && total.joins > 0);
        assert!(total.capture_failures > 0);
    }
}

#[test]
fn same_seed_same_run() {
    for seed in 0..40 {
        let (a, ha, la) = Sim::new(seed).run();
        let (b, hb, lb) = Sim::new(seed).run();
        assert_eq!(ha, hb, "seed {seed}: traces differ");
        assert_eq!(la, lb);
        assert_eq!(a.restarts, b.restarts);
    }
}
