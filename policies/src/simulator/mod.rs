//! A seeded discrete-event simulator of one job under a policy, with failures from a trace
//! ([`trace`]): the evaluation harness's extrapolation from the costs measured on a few nodes
//! to 1,000-100,000 nodes, and its cross-check of the analytic [`crate::model`].
//!
//! The job computes `solve_s` seconds of work on `nodes` nodes (weak scaling: the work per
//! node and the checkpoint per node do not grow with the node count). Each failure takes one
//! node; a spare replaces it after `restart_s` (detection, placement, fetch, re-wiring), and
//! a failure during a restart starts the restart over. Per policy:
//!
//! - [`SimPolicy::None`]: every failure sends the job back to its start.
//! - [`SimPolicy::Coordinated`]: every `interval_s` of compute all ranks are held `freeze_s`;
//!   the checkpoint becomes the recovery line `commit_s` after the release (flushed to the
//!   buddy, L2), and every `l4_every`-th one also on disk `l4_commit_s` after the release. A
//!   buddy copy is lost when both nodes of a buddy pair (nodes `2k` and `2k+1`) failed since
//!   the checkpoint was taken; disk copies survive. A failure during the hold aborts that
//!   checkpoint. A failure rolls every rank back to the newest checkpoint that is committed
//!   and survives.
//! - [`SimPolicy::Uncoordinated`]: ranks checkpoint on their own schedule, node `x` at the
//!   progress points `off(x) + k·interval_s` (`off` spreads the nodes over `stagger` phases
//!   of the interval); the checkpoints' stalls and the logging are a failure-free overhead
//!   (`overhead`: the job computes at `1 / (1 + overhead)`). With
//!   [`Recovery::Replay`] a failure costs the job the restart plus the lost node's replay of
//!   its work since its own committed checkpoint (`replay_factor` x that work); nobody else
//!   loses work. With [`Recovery::RollbackTo`] every rank rolls back to the recovery line:
//!   for a code that exchanges with its neighbours every step, the newest progress point at
//!   which every node has a committed checkpoint: with one phase (`stagger = 1`) the newest
//!   aligned checkpoint, otherwise the start (the domino effect).
//!
//! Deterministic: the same job, policy and trace give the same [`Outcome`].
pub mod trace;

use crate::model::Recovery;
use crate::PolicyError;
pub use trace::{scaled_to_run, Distribution, Failure, Rng, Trace};

/// The job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Job {
    pub nodes: u32,
    /// Compute time without failures and without a policy.
    pub solve_s: f64,
    /// From a failure until the replacement computes again.
    pub restart_s: f64,
}

/// A policy and its measured costs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SimPolicy {
    None,
    Coordinated {
        interval_s: f64,
        freeze_s: f64,
        commit_s: f64,
        /// Every n-th checkpoint also goes to disk (`None`: never).
        l4_every: Option<u32>,
        l4_commit_s: f64,
    },
    Uncoordinated {
        interval_s: f64,
        commit_s: f64,
        /// Failure-free overhead (fraction of the compute): stalls and logging.
        overhead: f64,
        /// How many phases the nodes' checkpoints are spread over (1: all at once).
        stagger: u32,
        recovery: Recovery,
    },
}

impl SimPolicy {
    pub fn name(&self) -> &'static str {
        match self {
            SimPolicy::None => "none",
            SimPolicy::Coordinated { .. } => "coordinated",
            SimPolicy::Uncoordinated {
                recovery: Recovery::Replay { .. },
                ..
            } => "uncoordinated with logging",
            SimPolicy::Uncoordinated { .. } => "uncoordinated without logging",
        }
    }
}

/// What happened, for a timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mark {
    /// A checkpoint's hold began at `at_s` and lasted `hold_s`.
    Checkpoint {
        hold_s: f64,
    },
    /// A node failed; the job went back `lost_s` of compute.
    Failure {
        node: u32,
        lost_s: f64,
    },
    /// The job computes again.
    Resumed,
    Done,
}

/// How a simulated run went.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub makespan_s: f64,
    /// False when the run hit the time limit (failures faster than progress).
    pub completed: bool,
    pub failures: u32,
    /// Compute done again (seconds of job time; a replayed rank's work counts once).
    pub lost_s: f64,
    /// Time spent restarting (including restarts started over).
    pub restart_total_s: f64,
    pub checkpoints: u64,
    /// The deepest rollback (compute seconds).
    pub max_rollback_s: f64,
    /// The first events (up to [`TIMELINE_CAP`]): time and what.
    pub timeline: Vec<(f64, Mark)>,
}

pub const TIMELINE_CAP: usize = 256;

impl Outcome {
    fn mark(&mut self, at: f64, m: Mark) {
        if self.timeline.len() < TIMELINE_CAP {
            self.timeline.push((at, m));
        }
    }
}

fn check(name: &str, x: f64, zero_ok: bool) -> Result<f64, PolicyError> {
    if x.is_finite() && (x > 0.0 || (zero_ok && x == 0.0)) {
        Ok(x)
    } else {
        Err(PolicyError::Config(format!(
            "simulator: {name} must be a {}number, not {x}",
            if zero_ok {
                "non-negative "
            } else {
                "positive "
            }
        )))
    }
}

/// A checkpoint the coordinated policy holds.
#[derive(Clone, Debug)]
struct Ckpt {
    progress: f64,
    commit_at: f64,
    l4_at: Option<f64>,
    failed_since: Vec<u32>,
}

impl Ckpt {
    fn survives(&self, now: f64) -> bool {
        if self.l4_at.is_some_and(|t| t <= now) {
            return true;
        }
        self.commit_at <= now
            && !self
                .failed_since
                .iter()
                .any(|&a| self.failed_since.iter().any(|&b| a != b && a / 2 == b / 2))
    }
}

/// Runs the job under `policy` with the failures of `trace` (ascending times). Stops at
/// `limit_s` of wall time (`completed = false`).
pub fn simulate(
    job: &Job,
    policy: &SimPolicy,
    trace: impl IntoIterator<Item = Failure>,
    limit_s: f64,
) -> Result<Outcome, PolicyError> {
    if job.nodes == 0 {
        return Err(PolicyError::Config("simulator: the job has no node".into()));
    }
    check("solve time", job.solve_s, false)?;
    check("restart time", job.restart_s, true)?;
    let mut trace = trace.into_iter().peekable();
    let mut out = Outcome::default();
    match *policy {
        SimPolicy::None => coordinated(
            job,
            f64::INFINITY,
            0.0,
            0.0,
            None,
            0.0,
            &mut trace,
            limit_s,
            &mut out,
        )?,
        SimPolicy::Coordinated {
            interval_s,
            freeze_s,
            commit_s,
            l4_every,
            l4_commit_s,
        } => {
            check("interval", interval_s, false)?;
            check("freeze", freeze_s, true)?;
            check("commit latency", commit_s, true)?;
            check("L4 commit latency", l4_commit_s, true)?;
            if l4_every == Some(0) {
                return Err(PolicyError::Config(
                    "simulator: L4 cadence must be at least 1".into(),
                ));
            }
            coordinated(
                job,
                interval_s,
                freeze_s,
                commit_s,
                l4_every,
                l4_commit_s,
                &mut trace,
                limit_s,
                &mut out,
            )?
        }
        SimPolicy::Uncoordinated {
            interval_s,
            commit_s,
            overhead,
            stagger,
            recovery,
        } => {
            check("interval", interval_s, false)?;
            check("commit latency", commit_s, true)?;
            check("overhead", overhead, true)?;
            if stagger == 0 {
                return Err(PolicyError::Config(
                    "simulator: stagger must be at least 1 phase".into(),
                ));
            }
            if let Recovery::Replay { replay_factor } = recovery {
                check("replay factor", replay_factor, true)?;
            }
            uncoordinated(
                job, interval_s, commit_s, overhead, stagger, recovery, &mut trace, limit_s,
                &mut out,
            )?
        }
    }
    Ok(out)
}

/// Restarts after a failure at `at`: returns when the job computes again, taking the
/// failures that fall inside the restart (each starts it over) through `on_failure`.
fn restart(
    at: f64,
    r: f64,
    trace: &mut std::iter::Peekable<impl Iterator<Item = Failure>>,
    out: &mut Outcome,
    mut on_failure: impl FnMut(&Failure, &mut Outcome),
) -> f64 {
    let mut until = at + r;
    out.restart_total_s += r;
    while let Some(f) = trace.next_if(|f| f.at_s < until) {
        out.failures += 1;
        on_failure(&f, out);
        out.restart_total_s += f.at_s + r - until;
        until = f.at_s + r;
    }
    out.mark(until, Mark::Resumed);
    until
}

#[allow(clippy::too_many_arguments)]
fn coordinated(
    job: &Job,
    tau: f64,
    delta: f64,
    commit: f64,
    l4_every: Option<u32>,
    l4_commit: f64,
    trace: &mut std::iter::Peekable<impl Iterator<Item = Failure>>,
    limit: f64,
    out: &mut Outcome,
) -> Result<(), PolicyError> {
    let (mut t, mut p) = (0.0f64, 0.0f64);
    let mut ckpts: Vec<Ckpt> = Vec::new();
    let mut taken = 0u64;
    let mut next_ckpt = tau;
    loop {
        if t > limit {
            out.makespan_s = t;
            return Ok(());
        }
        let target = next_ckpt.min(job.solve_s);
        let compute_end = t + (target - p);
        let hold_end = if target < job.solve_s {
            compute_end + delta
        } else {
            compute_end
        };
        match trace.peek().copied() {
            Some(f) if f.at_s < hold_end => {
                trace.next();
                out.failures += 1;
                // Progress at the failure (a failure in the hold aborts that checkpoint).
                let now_p = p + (f.at_s.min(compute_end) - t);
                let fail = |f: &Failure, ckpts: &mut Vec<Ckpt>| {
                    for c in ckpts.iter_mut() {
                        c.failed_since.push(f.node);
                    }
                    ckpts.retain(|c| c.survives(f.at_s));
                };
                fail(&f, &mut ckpts);
                let line = ckpts.last().map_or(0.0, |c| c.progress);
                let lost = now_p - line;
                out.lost_s += lost;
                out.max_rollback_s = out.max_rollback_s.max(lost);
                out.mark(
                    f.at_s,
                    Mark::Failure {
                        node: f.node,
                        lost_s: lost,
                    },
                );
                let mut extra = 0.0;
                t = restart(f.at_s, job.restart_s, trace, out, |g, _| {
                    fail(g, &mut ckpts);
                    let deeper = line - ckpts.last().map_or(0.0, |c| c.progress);
                    if deeper > extra {
                        extra = deeper;
                    }
                });
                p = ckpts.last().map_or(0.0, |c| c.progress);
                out.lost_s += extra;
                next_ckpt = p + tau;
            }
            _ => {
                p = target;
                if p >= job.solve_s {
                    out.makespan_s = compute_end;
                    out.completed = true;
                    out.mark(compute_end, Mark::Done);
                    return Ok(());
                }
                taken += 1;
                out.checkpoints += 1;
                out.mark(compute_end, Mark::Checkpoint { hold_s: delta });
                t = hold_end;
                let l4 = l4_every.filter(|&k| taken.is_multiple_of(u64::from(k)));
                ckpts.push(Ckpt {
                    progress: p,
                    commit_at: t + commit,
                    l4_at: l4.map(|_| t + l4_commit),
                    failed_since: Vec::new(),
                });
                // Keep the newest few and the newest on disk: older ones never serve.
                let newest_l4 = ckpts.iter().rposition(|c| c.l4_at.is_some());
                let n = ckpts.len();
                let mut i = 0;
                ckpts.retain(|_| {
                    i += 1;
                    i + 4 > n || Some(i - 1) == newest_l4
                });
                next_ckpt = p + tau;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn uncoordinated(
    job: &Job,
    tau: f64,
    commit: f64,
    overhead: f64,
    stagger: u32,
    recovery: Recovery,
    trace: &mut std::iter::Peekable<impl Iterator<Item = Failure>>,
    limit: f64,
    out: &mut Outcome,
) -> Result<(), PolicyError> {
    let rate = 1.0 / (1.0 + overhead);
    let phases = stagger.min(job.nodes).max(1);
    let offset = |node: u32| f64::from(node % phases) * tau / f64::from(phases);
    // The newest committed checkpoint of `node` at progress `p` (commit: `commit` of wall
    // time after it, i.e. `commit · rate` of progress); 0 = the start.
    let last_ckpt = |node: u32, p: f64| -> f64 {
        let settled = p - commit * rate;
        let off = offset(node);
        let c = off + ((settled - off) / tau).floor() * tau;
        if settled > 0.0 && c > 0.0 {
            c
        } else {
            0.0
        }
    };
    let (mut t, mut p) = (0.0f64, 0.0f64);
    let mut ckpt_count = 0.0;
    loop {
        if t > limit {
            out.makespan_s = t;
            break;
        }
        let end = t + (job.solve_s - p) / rate;
        match trace.peek().copied() {
            Some(f) if f.at_s < end => {
                trace.next();
                out.failures += 1;
                p += (f.at_s - t) * rate;
                let (lost, stall, new_p) = match recovery {
                    Recovery::Replay { replay_factor } => {
                        let lost = p - last_ckpt(f.node, p);
                        (lost, replay_factor * lost, p)
                    }
                    // Without logging the line is where every node has a checkpoint: an
                    // aligned one when they all checkpoint at once, else the start.
                    Recovery::RollbackTo(_) => {
                        let line = if phases == 1 { last_ckpt(0, p) } else { 0.0 };
                        (p - line, 0.0, line)
                    }
                };
                out.lost_s += lost;
                out.max_rollback_s = out.max_rollback_s.max(lost);
                out.mark(
                    f.at_s,
                    Mark::Failure {
                        node: f.node,
                        lost_s: lost,
                    },
                );
                ckpt_count += (p - new_p).max(0.0) / tau * f64::from(job.nodes);
                p = new_p;
                // A failure during the restart or the replay starts the restart over; with
                // logging the other node's replay adds up.
                let mut more = 0.0;
                let resumed = restart(f.at_s, job.restart_s + stall, trace, out, |g, o| {
                    if let Recovery::Replay { replay_factor } = recovery {
                        let l = p - last_ckpt(g.node, p);
                        o.lost_s += l;
                        more += replay_factor * l;
                    }
                });
                t = resumed + more;
                out.restart_total_s -= stall;
            }
            _ => {
                out.makespan_s = end;
                out.completed = true;
                out.mark(end, Mark::Done);
                break;
            }
        }
    }
    ckpt_count += job.solve_s / tau * f64::from(job.nodes);
    out.checkpoints = ckpt_count as u64;
    Ok(())
}

/// Median, mean, min and max of the makespans of `runs` seeded runs (seeds `seed..seed+runs`)
/// with failures from an endless [`Trace`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Runs that hit the limit (their makespan counts as the limit).
    pub incomplete: u32,
    pub mean_failures: f64,
    pub mean_lost_s: f64,
}

pub fn monte_carlo(
    job: &Job,
    policy: &SimPolicy,
    dist: Distribution,
    mtbf_s: f64,
    seed: u64,
    runs: u32,
    limit_s: f64,
) -> Result<Stats, PolicyError> {
    if runs == 0 {
        return Err(PolicyError::Config(
            "simulator: runs must be at least 1".into(),
        ));
    }
    let mut spans = Vec::with_capacity(runs as usize);
    let (mut incomplete, mut failures, mut lost) = (0, 0.0, 0.0);
    for s in 0..u64::from(runs) {
        let trace = Trace::new(dist, mtbf_s, job.nodes, seed.wrapping_add(s))?;
        let o = simulate(job, policy, trace, limit_s)?;
        if !o.completed {
            incomplete += 1;
        }
        failures += f64::from(o.failures);
        lost += o.lost_s;
        spans.push(o.makespan_s);
    }
    spans.sort_by(f64::total_cmp);
    let n = f64::from(runs);
    Ok(Stats {
        mean: spans.iter().sum::<f64>() / n,
        median: spans[spans.len() / 2],
        min: spans[0],
        max: spans[spans.len() - 1],
        incomplete,
        mean_failures: failures / n,
        mean_lost_s: lost / n,
    })
}

#[cfg(test)]
mod tests;
