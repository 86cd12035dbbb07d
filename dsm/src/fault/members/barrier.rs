//! The barrier among the job's live ranks, counted by the coordinator
//! ([`Engine::coordinator`]: node 0 while it lives).
//!
//! When the coordinator dies, each rank waiting in a barrier learns it (its own probe of
//! the coordinator after a fault timeout, an announcement, a failed send) and sends its
//! arrival again to the next coordinator. The ranks call barriers in the same order, so
//! an arrival at a later generation, or the new coordinator having passed a generation
//! itself, means every live rank arrived at the earlier one: it is released at once
//! (some ranks may have been released by the dead coordinator and others not).
use super::*;

#[derive(Default)]
pub(super) struct Barrier {
    /// This rank's next generation.
    pub(super) next: u64,
    /// Generations below this are released.
    pub(super) released: u64,
    /// At the coordinator: who arrived at each generation.
    pub(super) arrivals: BTreeMap<u64, BTreeSet<NodeId>>,
    /// At the coordinator: generations below this were released to every live rank.
    pub(super) done: u64,
}

impl Engine {
    /// Returns when every live rank of the job reached it.
    pub fn barrier(&self) -> Result<()> {
        let me = self.me;
        if !self.members.participants().contains(&me) {
            return Err(DsmError::Collective {
                what: "barrier".into(),
                reason: format!(
                    "node {me} joined during the run or left: barriers are among the job's ranks"
                ),
            });
        }
        let gen = {
            let mut b = self.members.barrier.lock().map_err(|_| poisoned())?;
            b.next += 1;
            b.next - 1
        };
        let mut told = self.coordinator();
        self.arrive(told, gen);
        let mut probed = Instant::now();
        let mut b = self.members.barrier.lock().map_err(|_| poisoned())?;
        loop {
            if b.released > gen {
                return Ok(());
            }
            let coordinator = self.coordinator();
            let missing: Vec<NodeId> = match b.arrivals.get(&gen) {
                Some(arrived) if me == coordinator => self
                    .members
                    .participants()
                    .into_iter()
                    .filter(|p| !arrived.contains(p))
                    .collect(),
                _ if me != coordinator => vec![coordinator],
                _ => Vec::new(),
            };
            drop(b);
            if !missing.is_empty() && probed.elapsed() > self.fault_timeout {
                // Waited a fault timeout: the coordinator probes the ranks missing, the
                // others the coordinator. Nodes that do not answer a probe (and whose
                // process is gone) are dead, and the barrier goes on without them.
                probed = Instant::now();
                if let Some(dead) = self.probe_nodes(&missing) {
                    if !dead.is_empty() {
                        self.drop_dead(&dead)?;
                    }
                }
            }
            if let Some(e) = self.error() {
                return Err(DsmError::Collective {
                    what: "barrier".into(),
                    reason: e,
                });
            }
            let coordinator = self.coordinator();
            if coordinator != told {
                // The coordinator died: the next one is told this rank arrived.
                told = coordinator;
                self.arrive(told, gen);
            }
            b = self.members.barrier.lock().map_err(|_| poisoned())?;
            b = self
                .members
                .released
                .wait_timeout(b, Duration::from_millis(100))
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// Tells `coordinator` this rank arrived at generation `gen` (a failed send makes the
    /// watchdog probe it; the barrier's own probe finds it dead too).
    fn arrive(&self, coordinator: NodeId, gen: u64) {
        if let Err(e) = self.ctl_to(coordinator, Ctl::Arrive { gen }) {
            self.suspect(coordinator, format!("arriving at barrier {gen}: {e}"));
        }
    }

    /// At the coordinator: `from` arrived at generation `gen`.
    pub(super) fn on_arrive(&self, from: NodeId, gen: u64) -> Result<()> {
        if let Ok(mut b) = self.members.barrier.lock() {
            b.arrivals.entry(gen).or_default().insert(from);
        }
        self.barrier_recheck()
    }

    /// The coordinator: releases every generation every live rank arrived at.
    pub(in crate::fault) fn barrier_recheck(&self) -> Result<()> {
        if self.me != self.coordinator() {
            return Ok(());
        }
        let dead = self.dead_nodes();
        let waiting_for: BTreeSet<NodeId> = self
            .members
            .participants()
            .difference(&dead)
            .copied()
            .collect();
        let mut release = Vec::new();
        {
            let mut b = self.members.barrier.lock().map_err(|_| poisoned())?;
            // Passed by this node, or by a rank that arrived at a later one: complete.
            let passed = b.done.max(b.released);
            let gens: Vec<u64> = b.arrivals.keys().copied().collect();
            let last = gens.last().copied().unwrap_or(0);
            for g in gens {
                if g < passed || g < last || waiting_for.is_subset(&b.arrivals[&g]) {
                    b.arrivals.remove(&g);
                    b.done = b.done.max(g + 1);
                    release.push(g);
                }
            }
        }
        for g in release {
            // The others first, the coordinator itself last: a program may end right after
            // the barrier (mgs_dsm's MGS_STOP_AT exits at once), and the coordinator
            // released first could end before its releases were sent, leaving the others
            // waiting.
            for &p in waiting_for.iter().filter(|&&p| p != self.me) {
                if let Err(e) = self.ctl_to(p, Ctl::Release { gen: g }) {
                    self.suspect(p, format!("releasing barrier {g}: {e}"));
                }
            }
            if waiting_for.contains(&self.me) {
                self.members.release(g);
            }
        }
        Ok(())
    }
}
