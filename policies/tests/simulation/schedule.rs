//! Failure scenarios: crashes at random times, in a row, of buddy pairs, of the leader, more
//! than the spares, and crashes armed to fire at a step of a checkpoint or of a restart.
use super::model::{STEPS, STEP_MS};
use super::{Ev, Sim};
use policies::primitives::{Event, NodeId, Rank, RequestSource};
use rand::rngs::SmallRng;
use rand::Rng;

/// Where an armed crash strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
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
pub enum Step {
    CkptSync,
    CkptCapture(u32),
    CkptRelease,
    CkptCommit,
    RestartDecided,
    RestartMidFetch,
    RestartUp,
    RecoveryRelease,
}

pub const STEP_NAMES: [&str; 8] = [
    "ckpt-sync",
    "ckpt-capture",
    "ckpt-release",
    "ckpt-commit",
    "restart-decided",
    "restart-mid-fetch",
    "restart-up",
    "recovery-release",
];

pub fn step_index(s: Step) -> usize {
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
pub struct Armed {
    pub step: Step,
    /// Fires at the n-th occurrence (0: the first).
    pub skip: u32,
    pub victim: Victim,
}

impl Sim {
    /// Picks this seed's failure scenario.
    pub(super) fn schedule_failures(&mut self, compute: u32, per_node: u32) {
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
}
