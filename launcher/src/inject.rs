//! Failure injection for tests, benches and demos: `krun --inject-failure node=N@WHEN`
//! (repeatable) SIGKILLs node N's krund and its ranks (by PID: only processes krun started,
//! and theirs) at time T after the nodes started, once the checkpoint policy committed K
//! checkpoints, or at a named phase of the policy:
//!
//! | WHEN | the node is killed |
//! |---|---|
//! | `5s`, `1.5s`, `500ms` | this long after the nodes started |
//! | `3ckpt` | once 3 checkpoints were committed |
//! | `3ckpt+500ms`, `3ckpt+1s` | this long after the 3rd checkpoint was committed (under the uncoordinated policy a count is committed once every rank made that many of its own checkpoints safe: right at that moment the last rank has just checkpointed and has delivered nothing since; a delay makes every rank work past its checkpoint first) |
//! | `ckpt3:barrier` | when the 3rd checkpoint attempt's barrier starts (before any node is asked) |
//! | `ckpt3:capture` | when the 3rd checkpoint's capture is ordered (every rank held at its safepoint; killed before the order goes out, so checkpoint 3 cannot commit) |
//! | `recovery1` | when the 1st recovery's `Restart` order went to the nodes (mid-recovery: the spare restoring lost ranks, or any other node) |
//!
//! Phase injections are exact: the policy's thread stops at the phase ([`PhaseGate::reached`])
//! until krun's injector has killed the node, and krun prints
//! `injected failure at <phase>: SIGKILL to node N (...)`.
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{LauncherError, Result};

/// `--inject-failure node=N@WHEN`: krun SIGKILLs node N's krund and its ranks (by PID, only
/// processes it started) at that moment (for tests, benches and demos).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Injection {
    pub node: usize,
    pub at: InjectAt,
}

/// When an [`Injection`] fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InjectAt {
    /// This long after every node of the job is up (linked to krun): the job's own time,
    /// not the time its daemons took to start (under load that varied from 0.3 to 2 s,
    /// and a kill before the nodes were up tested the start-up, not the job).
    After(Duration),
    /// `after` past the moment the checkpoint policy had committed `k` checkpoints.
    Commits { k: u64, after: Duration },
    /// When the policy reaches the `k`-th occurrence (from 1) of `phase`.
    Phase { phase: Phase, k: u64 },
}

/// A named phase of the checkpoint policy at krun's hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// A checkpoint attempt's barrier starts.
    CheckpointBarrier,
    /// A checkpoint's capture is ordered (the ranks are held).
    CheckpointCapture,
    /// A recovery's `Restart` order went out (a new wiring epoch).
    Recovery,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::CheckpointBarrier => "the barrier of checkpoint attempt",
            Phase::CheckpointCapture => "the capture of checkpoint attempt",
            Phase::Recovery => "recovery",
        })
    }
}

impl std::str::FromStr for Injection {
    type Err = LauncherError;

    /// `node=N@5s`, `node=N@1.5s`, `node=N@500ms`, `node=N@3ckpt`, `node=N@3ckpt+500ms`,
    /// `node=N@ckpt3:barrier`,
    /// `node=N@ckpt3:capture` or `node=N@recovery1`.
    fn from_str(v: &str) -> Result<Injection> {
        let bad = |why: &str| {
            LauncherError::Usage(format!(
                "--inject-failure {v:?}: {why} (expected node=N@SECONDSs, node=N@MSms, \
                 node=N@Kckpt, node=N@ckptK:barrier, node=N@ckptK:capture or node=N@recoveryK)"
            ))
        };
        let rest = v.strip_prefix("node=").ok_or_else(|| bad("no node="))?;
        let (node, when) = rest.split_once('@').ok_or_else(|| bad("no @"))?;
        let node = node.parse().map_err(|_| bad("the node is not a number"))?;
        let count = |k: &str, what: &str| {
            k.parse::<u64>()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| bad(&format!("the {what} is not a positive number")))
        };
        let duration = |t: &str| -> Result<Duration> {
            if let Some(ms) = t.strip_suffix("ms") {
                Ok(Duration::from_millis(
                    ms.parse()
                        .map_err(|_| bad("not a number of milliseconds"))?,
                ))
            } else if let Some(s) = t.strip_suffix('s') {
                let secs: f64 = s
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| bad("not a number of seconds"))?;
                Ok(Duration::from_secs_f64(secs))
            } else {
                Err(bad("no unit"))
            }
        };
        let at = if let Some(phase) = when.strip_prefix("ckpt") {
            let (k, name) = phase
                .split_once(':')
                .ok_or_else(|| bad("no :barrier or :capture after ckptK"))?;
            let phase = match name {
                "barrier" => Phase::CheckpointBarrier,
                "capture" => Phase::CheckpointCapture,
                _ => return Err(bad("the checkpoint phase is not barrier or capture")),
            };
            InjectAt::Phase {
                phase,
                k: count(k, "checkpoint attempt")?,
            }
        } else if let Some(k) = when.strip_prefix("recovery") {
            InjectAt::Phase {
                phase: Phase::Recovery,
                k: count(k, "recovery number")?,
            }
        } else if let Some((k, after)) = when.split_once("ckpt") {
            let after = match after {
                "" => Duration::ZERO,
                d => duration(
                    d.strip_prefix('+')
                        .ok_or_else(|| bad("after Kckpt only +DELAY may follow"))?,
                )?,
            };
            InjectAt::Commits {
                k: count(k, "checkpoint count")?,
                after,
            }
        } else {
            InjectAt::After(duration(when)?)
        };
        Ok(Injection { node, at })
    }
}

#[derive(Default)]
struct GateState {
    /// The phases injections wait for.
    wanted: Vec<(Phase, u64)>,
    /// How often each phase was reached.
    counts: BTreeMap<Phase, u64>,
    /// Reached and wanted, not yet acted on by the injector.
    pending: Vec<(Phase, u64)>,
}

/// Where the policy's thread meets krun's injector at the phases injections wait for.
#[derive(Clone, Default)]
pub struct PhaseGate(Arc<(Mutex<GateState>, Condvar)>);

/// Longest the policy waits at a phase for the injector.
const GATE_LIMIT: Duration = Duration::from_secs(10);

impl PhaseGate {
    /// A gate for `injections` (only phase injections matter).
    pub fn new(injections: &[Injection]) -> PhaseGate {
        let wanted = injections
            .iter()
            .filter_map(|i| match i.at {
                InjectAt::Phase { phase, k } => Some((phase, k)),
                _ => None,
            })
            .collect();
        PhaseGate(Arc::new((
            Mutex::new(GateState {
                wanted,
                ..GateState::default()
            }),
            Condvar::new(),
        )))
    }

    /// The policy reached `phase`: if an injection waits for this occurrence, blocks until
    /// the injector acted on it (at most 10 s).
    pub fn reached(&self, phase: Phase) {
        let (lock, changed) = &*self.0;
        let mut s = lock.lock().expect("gate lock");
        let k = {
            let c = s.counts.entry(phase).or_insert(0);
            *c += 1;
            *c
        };
        if !s.wanted.contains(&(phase, k)) {
            return;
        }
        s.pending.push((phase, k));
        changed.notify_all();
        let deadline = Instant::now() + GATE_LIMIT;
        while s.pending.contains(&(phase, k)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.pending.retain(|p| *p != (phase, k));
                return;
            }
            s = changed.wait_timeout(s, left).expect("gate lock").0;
        }
    }

    /// The phases reached that injections wait for (the injector then calls
    /// [`PhaseGate::done`] for each).
    pub fn pending(&self) -> Vec<(Phase, u64)> {
        self.0 .0.lock().expect("gate lock").pending.clone()
    }

    /// The injector acted on `(phase, k)`: the policy goes on.
    pub fn done(&self, phase: Phase, k: u64) {
        let (lock, changed) = &*self.0;
        lock.lock()
            .expect("gate lock")
            .pending
            .retain(|p| *p != (phase, k));
        changed.notify_all();
    }
}

/// The children of process `pid` (`/proc/PID/task/*/children`).
pub(crate) fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injections_parse_times_and_checkpoint_counts_and_name_what_is_wrong() {
        let at = |v: &str| v.parse::<Injection>().map(|i| (i.node, i.at));
        assert_eq!(
            at("node=2@5s").unwrap(),
            (2, InjectAt::After(Duration::from_secs(5)))
        );
        assert_eq!(
            at("node=0@1.5s").unwrap(),
            (0, InjectAt::After(Duration::from_millis(1500)))
        );
        assert_eq!(
            at("node=1@500ms").unwrap(),
            (1, InjectAt::After(Duration::from_millis(500)))
        );
        assert_eq!(
            at("node=3@2ckpt").unwrap(),
            (
                3,
                InjectAt::Commits {
                    k: 2,
                    after: Duration::ZERO
                }
            )
        );
        assert_eq!(
            at("node=1@2ckpt+1.5s").unwrap(),
            (
                1,
                InjectAt::Commits {
                    k: 2,
                    after: Duration::from_millis(1500)
                }
            )
        );
        assert_eq!(
            at("node=1@ckpt3:capture").unwrap(),
            (
                1,
                InjectAt::Phase {
                    phase: Phase::CheckpointCapture,
                    k: 3
                }
            )
        );
        assert_eq!(
            at("node=0@ckpt1:barrier").unwrap(),
            (
                0,
                InjectAt::Phase {
                    phase: Phase::CheckpointBarrier,
                    k: 1
                }
            )
        );
        assert_eq!(
            at("node=4@recovery2").unwrap(),
            (
                4,
                InjectAt::Phase {
                    phase: Phase::Recovery,
                    k: 2
                }
            )
        );
        for (bad, why) in [
            ("2@5s", "no node="),
            ("node=2", "no @"),
            ("node=x@5s", "not a number"),
            ("node=2@5", "no unit"),
            ("node=2@0ckpt", "positive"),
            ("node=2@2ckpt500ms", "+DELAY"),
            ("node=2@2ckpt+500", "no unit"),
            ("node=2@2ckpt+xs", "seconds"),
            ("node=2@-1s", "seconds"),
            ("node=2@ckpt3", ":barrier or :capture"),
            ("node=2@ckpt3:write", "barrier or capture"),
            ("node=2@ckpt0:capture", "positive"),
            ("node=2@recoveryx", "recovery number"),
        ] {
            let e = at(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn the_policy_waits_at_a_wanted_phase_until_the_injector_acted() {
        let gate = PhaseGate::new(&[
            "node=1@ckpt2:capture".parse().unwrap(),
            "node=2@5s".parse().unwrap(),
        ]);
        // Not wanted: the policy goes on at once, nothing pending.
        gate.reached(Phase::CheckpointCapture);
        gate.reached(Phase::Recovery);
        assert!(gate.pending().is_empty());
        let policy = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.reached(Phase::CheckpointCapture))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while gate.pending().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the 2nd capture never became pending"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(gate.pending(), vec![(Phase::CheckpointCapture, 2)]);
        assert!(
            !policy.is_finished(),
            "the policy must wait for the injector"
        );
        gate.done(Phase::CheckpointCapture, 2);
        policy.join().unwrap();
        assert!(gate.pending().is_empty());
    }
}
