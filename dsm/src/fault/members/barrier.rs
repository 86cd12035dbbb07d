//! The barrier among the job's live ranks, counted by node 0.
use super::*;

#[derive(Default)]
pub(super) struct Barrier {
    /// This rank's next generation.
    pub(super) next: u64,
    /// Generations below this are released.
    pub(super) released: u64,
    /// At node 0: who arrived at each generation.
    pub(super) arrivals: BTreeMap<u64, BTreeSet<NodeId>>,
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
        self.ctl_to(COORDINATOR, Ctl::Arrive { gen })?;
        let mut probed = Instant::now();
        let mut b = self.members.barrier.lock().map_err(|_| poisoned())?;
        loop {
            if b.released > gen {
                return Ok(());
            }
            let missing: Vec<NodeId> = match b.arrivals.get(&gen) {
                Some(arrived) if me == COORDINATOR => self
                    .members
                    .participants()
                    .into_iter()
                    .filter(|p| !arrived.contains(p))
                    .collect(),
                _ => Vec::new(),
            };
            drop(b);
            if !missing.is_empty() && probed.elapsed() > self.fault_timeout {
                // Node 0 waited a fault timeout: ranks that do not answer a probe are dead,
                // and the barrier goes on without them.
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
            if self.dead_nodes().contains(&COORDINATOR) {
                return Err(DsmError::Collective {
                    what: "barrier".into(),
                    reason: "node 0, which coordinates barriers, died".into(),
                });
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

    /// Node 0: releases every generation every live rank arrived at.
    pub(in crate::fault) fn barrier_recheck(&self) -> Result<()> {
        if self.me != COORDINATOR {
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
            let gens: Vec<u64> = b.arrivals.keys().copied().collect();
            for g in gens {
                if waiting_for.is_subset(&b.arrivals[&g]) {
                    b.arrivals.remove(&g);
                    release.push(g);
                }
            }
        }
        for g in release {
            // The others first, node 0 itself last: a program may end right after the
            // barrier (mgs_dsm's MGS_STOP_AT exits at once), and node 0 released first
            // could end before its releases were sent, leaving the others waiting.
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
