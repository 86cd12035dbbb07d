//! What a run (or a batch of runs) counts.
use std::collections::BTreeMap;

#[derive(Default, Debug, Clone)]
pub struct Outcome {
    pub completed: u64,
    pub ended: BTreeMap<&'static str, u64>,
    pub crashes: BTreeMap<&'static str, u64>,
    pub armed_fired: [u64; 8],
    pub restarts: u64,
    pub rollbacks: u64,
    pub committed: u64,
    pub aborted: u64,
    pub takeovers: u64,
    /// Takeovers that rolled nothing back (the lost leader hosted no rank).
    pub quiet_takeovers: u64,
    /// Failure agreements naming several nodes.
    pub grouped_agreements: u64,
    pub restart_failures: u64,
    pub events: u64,
    pub max_restarts_one_run: u64,
    pub joins: u64,
    pub capture_failures: u64,
    /// Restarts per level the image came from (L1..L4), and from the program's start.
    pub restart_sources: [u64; 5],
    /// Ranks placed on a survivor because no spare was left.
    pub survivor_placements: u64,
    /// A few seeds per way a job ended with an error.
    pub examples: BTreeMap<&'static str, Vec<u64>>,
}

impl Outcome {
    pub fn add(&mut self, o: &Outcome) {
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
