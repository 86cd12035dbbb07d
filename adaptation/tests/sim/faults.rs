//! The fault model of a schedule: joins, leaves, crashes (one at a time, two neighbours at
//! once, one during the repair of another, at a given step of a change), message loss and
//! duplication, and partitions that cut one or two nodes off for a while.
use std::collections::BTreeSet;

use adaptation::view::{Change, NodeId};
use rand::rngs::SmallRng;
use rand::Rng;

use super::{Sim, FAULT_SPACING};

/// Which faults the schedules draw from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// Joins, leaves, one crash at a time; reliable links; 2 copies per key.
    Classic,
    /// Also message loss and duplication, partitions, two nodes failing at once, failures
    /// during a repair; 2 or 3 copies per key.
    Wide,
    /// Supervisors crash one after another (each once the group healed from the last),
    /// more of them than the first group could lose, or leave in a planned way (their vote
    /// handed over first), while nodes join; lossy links.
    Supervisors,
}

/// Nodes cut off from the others until a tick.
#[derive(Clone, Debug)]
pub struct Partition {
    pub side: BTreeSet<NodeId>,
    pub until: u64,
    /// The most agreed changes any node knew when the cut began.
    pub known_at_cut: usize,
}

#[derive(Clone, Debug)]
pub struct Faults {
    pub model: Model,
    /// Simultaneous failures the keys survive (f; f + 1 copies).
    pub tolerate: usize,
    pub loss_permille: u32,
    pub dup_permille: u32,
    pub joins: u32,
    pub leaves: u32,
    pub crashes: u32,
    pub doubles: u32,
    pub cuts: u32,
    /// Whether a crash brings a second one during its repair.
    pub repair: bool,
    pub crash_at: Option<(u64, NodeId)>,
    pub partition: Option<Partition>,
    pub last_fault_at: Option<u64>,
    /// The most nodes that failed (or were cut off) at once in this schedule.
    pub max_burst: usize,
    pub double_crashes: u64,
    pub repair_crashes: u64,
    pub partitions: u64,
    pub partitions_evicting: u64,
    pub lost_messages: u64,
    pub duplicated: u64,
}

impl Faults {
    pub fn draw(model: Model, rng: &mut SmallRng) -> Faults {
        if model == Model::Supervisors {
            return Faults {
                model,
                tolerate: 1,
                loss_permille: if rng.gen_ratio(1, 2) {
                    rng.gen_range(1..=10)
                } else {
                    0
                },
                dup_permille: 0,
                joins: rng.gen_range(2..=3),
                leaves: rng.gen_range(1..=2),
                crashes: rng.gen_range(3..=4),
                doubles: 0,
                cuts: 0,
                repair: false,
                crash_at: None,
                partition: None,
                last_fault_at: None,
                max_burst: 0,
                double_crashes: 0,
                repair_crashes: 0,
                partitions: 0,
                partitions_evicting: 0,
                lost_messages: 0,
                duplicated: 0,
            };
        }
        let wide = model == Model::Wide;
        Faults {
            model,
            tolerate: if wide { rng.gen_range(1..=2) } else { 1 },
            loss_permille: if wide && rng.gen_ratio(1, 2) {
                rng.gen_range(1..=20)
            } else {
                0
            },
            dup_permille: if wide && rng.gen_ratio(1, 2) {
                rng.gen_range(1..=20)
            } else {
                0
            },
            joins: rng.gen_range(0..=2),
            leaves: rng.gen_range(0..=1),
            crashes: rng.gen_range(0..=2),
            doubles: if wide { rng.gen_range(0..=1) } else { 0 },
            cuts: if wide { rng.gen_range(0..=1) } else { 0 },
            repair: wide && rng.gen_ratio(1, 3),
            crash_at: None,
            partition: None,
            last_fault_at: None,
            max_burst: 0,
            double_crashes: 0,
            repair_crashes: 0,
            partitions: 0,
            partitions_evicting: 0,
            lost_messages: 0,
            duplicated: 0,
        }
    }
}

impl Sim {
    /// Whether the links between `from` and `to` are cut.
    pub fn cut(&self, from: NodeId, to: NodeId) -> bool {
        self.faults
            .partition
            .as_ref()
            .is_some_and(|p| p.side.contains(&from) != p.side.contains(&to))
    }

    /// Heals a partition whose time is up.
    pub fn partition_step(&mut self) {
        let Some(p) = &self.faults.partition else {
            return;
        };
        if self.now < p.until {
            return;
        }
        let side = p.side.clone();
        // Did the majority evict the cut-off side meanwhile?
        let majority = self
            .alive()
            .into_iter()
            .find(|n| !side.contains(n) && self.nodes[n].is_member());
        if let Some(m) = majority {
            let log = self.nodes[&m].log();
            if side
                .iter()
                .all(|s| log.contains(&Change::Fail { node: *s }))
            {
                self.faults.partitions_evicting += 1;
            }
        }
        self.trace.push(format!("HEAL partition of {side:?}"));
        self.faults.partition = None;
        self.faults.last_fault_at = Some(self.now);
    }

    /// Cuts `side` off from the other nodes for `length` ticks.
    pub fn cut_off(&mut self, side: &[NodeId], length: u64) {
        let known_at_cut = self
            .nodes
            .values()
            .map(|n| n.log().len())
            .max()
            .unwrap_or(0);
        self.trace
            .push(format!("PARTITION {side:?} cut off for {length} ticks"));
        self.faults.partitions += 1;
        self.faults.partition = Some(Partition {
            side: side.iter().copied().collect(),
            until: self.now + length,
            known_at_cut,
        });
        self.burst(side.len());
    }

    /// Heals the partition now.
    pub fn heal(&mut self) {
        self.end_faults();
    }

    /// Ends every fault still going on (the schedule's quiet end).
    pub fn end_faults(&mut self) {
        if let Some(p) = self.faults.partition.as_mut() {
            p.until = p.until.min(self.now);
        }
        self.partition_step();
    }

    /// Whether a new fault may start: the cluster settled after the last one, and the
    /// last one is older than [`FAULT_SPACING`].
    fn fault_ready(&self) -> bool {
        self.faults.crash_at.is_none()
            && self.crash_on.is_none()
            && self.faults.partition.is_none()
            && self
                .faults
                .last_fault_at
                .is_none_or(|t| self.now >= t + FAULT_SPACING)
            && self
                .settled_since
                .is_some_and(|t| self.now >= t + 2 * self.max_delay + 2)
    }

    /// Live members that may fail now: a supervisor only while the group keeps a
    /// majority without it (see [`Sim::supervisor_may_fail`]).
    fn crash_candidates(&self) -> Vec<NodeId> {
        let sups = self.current_supervisors();
        let sup_may_fail = self.supervisor_may_fail();
        self.alive()
            .into_iter()
            .filter(|n| self.nodes[n].is_member())
            .filter(|n| !sups.contains(n) || sup_may_fail)
            .collect()
    }

    fn burst(&mut self, size: usize) {
        self.faults.max_burst = self.faults.max_burst.max(size);
        self.faults.last_fault_at = Some(self.now);
    }

    pub fn random_event(&mut self) {
        let alive = self.alive();
        let sups = self.current_supervisors();
        if self.faults.model == Model::Supervisors {
            self.supervisor_event(&sups);
            return;
        }
        let r = self.rng.gen_range(0..1000);
        if r < 4 && self.faults.joins > 0 {
            self.faults.joins -= 1;
            self.join();
        } else if r < 7 && self.faults.leaves > 0 {
            let candidates: Vec<NodeId> = alive
                .iter()
                .copied()
                .filter(|n| !sups.contains(n) && self.nodes[n].is_member())
                .collect();
            if candidates.len() > 1 {
                self.faults.leaves -= 1;
                let victim = candidates[self.rng.gen_range(0..candidates.len())];
                let via = alive[self.rng.gen_range(0..alive.len())];
                self.trace
                    .push(format!("LEAVE node {victim} asked via {via}"));
                let _ = self.nodes.get_mut(&via).unwrap().request_leave(victim);
                self.drain(via);
            }
        } else if r < 10 && self.faults.crashes > 0 && self.fault_ready() {
            let candidates = self.crash_candidates();
            if candidates.len() > 3 {
                self.faults.crashes -= 1;
                let victim = candidates[self.rng.gen_range(0..candidates.len())];
                if self.rng.gen_ratio(1, 2) {
                    let at = self.now + self.rng.gen_range(0..40);
                    self.faults.crash_at = Some((at, victim));
                } else {
                    // At a given step of the next change the victim takes part in.
                    let steps = ["agreed", "prepared", "sent", "received"];
                    let step = steps[self.rng.gen_range(0..steps.len())];
                    self.crash_on = Some((step, victim, self.now));
                }
                self.burst(1);
            }
        } else if r < 13 && self.faults.doubles > 0 && self.fault_ready() {
            self.double_crash();
        } else if r < 16 && self.faults.cuts > 0 && self.fault_ready() {
            self.start_partition();
        }
        // A step that never comes (no further change) turns into a plain crash.
        if let Some((_, v, armed)) = self.crash_on {
            if self.now > armed + 600 {
                self.crash_on = None;
                if !self.dead.contains(&v) {
                    self.crash(v);
                }
            }
        }
        if let Some((at, v)) = self.faults.crash_at {
            if self.now >= at {
                self.faults.crash_at = None;
                if !self.dead.contains(&v) {
                    self.crash(v);
                    if self.faults.repair {
                        self.arm_repair_crash(v);
                    }
                }
            }
        }
    }

    /// Two members that follow each other in the view fail at the same tick (the keys
    /// one of them manages have their first witness in the other).
    fn double_crash(&mut self) {
        let sups = self.current_supervisors();
        let candidates = self.crash_candidates();
        let Some(viewer) = candidates.first() else {
            return;
        };
        let members: Vec<NodeId> = self.nodes[viewer].members().iter().copied().collect();
        if members.len() < 5 {
            return;
        }
        let pairs: Vec<(NodeId, NodeId)> = (0..members.len())
            .map(|i| (members[i], members[(i + 1) % members.len()]))
            .filter(|(a, b)| candidates.contains(a) && candidates.contains(b))
            .filter(|(a, b)| !(sups.contains(a) && sups.contains(b)))
            .collect();
        if pairs.is_empty() {
            return;
        }
        let (a, b) = pairs[self.rng.gen_range(0..pairs.len())];
        self.faults.doubles -= 1;
        self.faults.double_crashes += 1;
        self.trace
            .push(format!("DOUBLE CRASH of neighbours {a} and {b}"));
        self.crash(a);
        self.crash(b);
        self.burst(2);
    }

    /// After `first` crashed, a second member fails at a step of the next change it takes
    /// part in (the repair of the first).
    fn arm_repair_crash(&mut self, first: NodeId) {
        let sups = self.current_supervisors();
        let candidates: Vec<NodeId> = self
            .crash_candidates()
            .into_iter()
            .filter(|n| !(sups.contains(n) && sups.contains(&first)))
            .collect();
        if candidates.len() < 4 || self.crash_on.is_some() {
            return;
        }
        let victim = candidates[self.rng.gen_range(0..candidates.len())];
        let step = ["prepared", "sent"][self.rng.gen_range(0..2)];
        self.trace.push(format!(
            "node {victim} will fail at step {step} of the repair of {first}"
        ));
        self.crash_on = Some((step, victim, self.now));
        self.faults.repair_crashes += 1;
        self.burst(2);
    }

    /// Cuts one node (or, with 3 copies per key, two neighbours) off from the others.
    fn start_partition(&mut self) {
        let sups = self.current_supervisors();
        let candidates = self.crash_candidates();
        if candidates.len() < 5 {
            return;
        }
        let mut side = BTreeSet::new();
        let a = candidates[self.rng.gen_range(0..candidates.len())];
        side.insert(a);
        if self.faults.tolerate >= 2 && self.rng.gen_ratio(1, 2) {
            // Its neighbour in the view too (both may hold the same keys).
            let members: Vec<NodeId> = self.nodes[&a].members().iter().copied().collect();
            if let Some(i) = members.iter().position(|m| *m == a) {
                let b = members[(i + 1) % members.len()];
                if candidates.contains(&b) && !(sups.contains(&a) && sups.contains(&b)) {
                    side.insert(b);
                }
            }
        }
        let length = self.rng.gen_range(50..900);
        self.faults.cuts -= 1;
        let side: Vec<NodeId> = side.into_iter().collect();
        self.cut_off(&side, length);
    }
}

impl Sim {
    /// [`Model::Supervisors`]: a node joins now and then; once the cluster settled and the
    /// group healed, a supervisor of the current group crashes (at a random tick soon, or
    /// at a step of the next change it takes part in).
    fn supervisor_event(&mut self, sups: &std::collections::BTreeSet<NodeId>) {
        let r = self.rng.gen_range(0..1000);
        if r < 6 && self.faults.joins > 0 {
            self.faults.joins -= 1;
            self.join();
        } else if r < 60
            && self.faults.crashes > 0
            && self.fault_ready()
            && self.supervisor_may_fail()
        {
            let victims: Vec<NodeId> = sups
                .iter()
                .copied()
                .filter(|n| !self.dead.contains(n) && self.nodes[n].is_member())
                .collect();
            let members = self.crash_candidates().len();
            if !victims.is_empty()
                && members > 3
                && self.faults.leaves > 0
                && self.rng.gen_ratio(1, 3)
            {
                // A planned leave instead: the supervisor hands its vote over, then goes.
                let victim = victims[self.rng.gen_range(0..victims.len())];
                let alive = self.alive();
                let via = alive[self.rng.gen_range(0..alive.len())];
                match self.nodes.get_mut(&via).unwrap().request_leave(victim) {
                    Ok(()) => {
                        self.faults.leaves -= 1;
                        self.faults.last_fault_at = Some(self.now);
                        self.trace.push(format!(
                            "SUPERVISOR {victim} of {sups:?} asked to leave via {via}"
                        ));
                    }
                    Err(e) => self.trace.push(format!(
                        "leave of supervisor {victim} via {via} refused: {e}"
                    )),
                }
                self.drain(via);
            } else if !victims.is_empty() && members > 3 {
                self.faults.crashes -= 1;
                let victim = victims[self.rng.gen_range(0..victims.len())];
                self.trace
                    .push(format!("SUPERVISOR {victim} of {sups:?} will crash"));
                if self.rng.gen_ratio(1, 2) {
                    self.faults.crash_at = Some((self.now + self.rng.gen_range(0..40), victim));
                } else {
                    let steps = ["agreed", "prepared", "sent", "received"];
                    let step = steps[self.rng.gen_range(0..steps.len())];
                    self.crash_on = Some((step, victim, self.now));
                }
                self.burst(1);
            }
        }
        if let Some((_, v, armed)) = self.crash_on {
            if self.now > armed + 600 {
                self.crash_on = None;
                if !self.dead.contains(&v) {
                    self.crash(v);
                }
            }
        }
        if let Some((at, v)) = self.faults.crash_at {
            if self.now >= at {
                self.faults.crash_at = None;
                if !self.dead.contains(&v) {
                    self.crash(v);
                }
            }
        }
    }
}
