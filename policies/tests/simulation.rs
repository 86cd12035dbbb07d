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
    AgreedView, Decision, Epoch, Event, ImageCopy, Layout, Level, Millis, NodeId, Rank, RankSlot,
    Snapshot, Version,
};
use policies::{Action, Policy, PolicyError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[path = "simulation/model.rs"]
mod model;
#[path = "simulation/outcome.rs"]
mod outcome;
#[path = "simulation/runtime.rs"]
mod runtime;
#[path = "simulation/schedule.rs"]
mod schedule;

use model::*;
use outcome::Outcome;
use schedule::{step_index, Armed, Step, Victim, STEP_NAMES};

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
