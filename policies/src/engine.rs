//! The adapter krund puts between a policy and the node runtime: it feeds events to the
//! policy and turns each action into calls on a small [`Runtime`] trait that krund implements
//! (barrier, release, capture, fetch, restart, rollback, record, notify, end).
//!
//! Runtime calls only *start* operations; completions come back later as [`Event`]s through
//! [`Engine::handle`]. A call that fails at once (the runtime refuses it) becomes the matching
//! failure event (`SyncFailed`, `CaptureFailed`, `RestartFailed`, `RollbackFailed`) and is fed
//! back to the policy within the same `handle` call.
//!
//! Order guarantees the engine adds:
//! - a restart is **recorded** (`Runtime::record`, the process table's compare-and-set on the
//!   rank's incarnation) before anything else; a refused record starts nothing;
//! - the image is **fetched** to the node that will use it before the restart or rollback
//!   that needs it is started;
//! - a commit, abort or end that cannot be recorded stops the engine with
//!   [`PolicyError::NotRecorded`]: krund then knows this node no longer leads and drops the
//!   instance (the next leader resumes from what was recorded).
//!
//! # How krund maps the calls (a guide for the runtime)
//!
//! | call | krund |
//! |---|---|
//! | `record` | the process table: a compare-and-set on (rank, incarnation) for restarts; the agreed log for commits, aborts and the end |
//! | `barrier` / `release` | the rank library's safepoint (native ranks), CRIU freeze (others); release lets them return |
//! | `capture` | ghost capture of the held rank, `Store::put` as (rank, version), flush to the levels; `Store::is_safe` answers `LevelSafe` |
//! | `fetch` | `Store::get_bytes` on the node named, from the copy named (its level and holder) |
//! | `restart` | ghost restore as a new process on the decided node, registered with the decided incarnation |
//! | `rollback` | ghost rollback of the live process to the fetched image |
//!
//! [`Reads::copies`] can be answered from the process table (each rank's versions and the
//! levels they are safe at) and the store's placement (L1 on the rank's node, L2 on its
//! buddy, L3 at the parity holder, L4 on disk), leaving out nodes not in the agreed view.
use crate::policy::Policy;
use crate::primitives::{
    Action, Decision, DecisionKind, Event, ImageCopy, Level, LoggedEvent, Millis, NodeId, OpId,
    Rank, Reads, Version,
};
use crate::report::Notice;
use crate::PolicyError;
use std::collections::VecDeque;

/// What krund provides to the engine. Every method starts an operation and returns at once;
/// `Err` says the runtime refused it (the reason is shown to the user).
pub trait Runtime {
    /// Writes a decision to the process table or the agreed log.
    fn record(&mut self, decision: &Decision) -> Result<(), String>;
    /// Brings `ranks` to a safe point and holds them; answers `Synchronized`.
    fn barrier(&mut self, op: OpId, ranks: &[Rank]) -> Result<(), String>;
    /// Lets held ranks continue.
    fn release(&mut self, ranks: &[Rank]);
    /// Captures a held rank as `version` into the store's `levels`; answers `CaptureDone`
    /// then `LevelSafe`/`LevelLost`.
    fn capture(
        &mut self,
        op: OpId,
        rank: Rank,
        version: Version,
        levels: &[Level],
    ) -> Result<(), String>;
    /// Stages `rank`'s image `version` from `source` on node `to` (`None`: the node the rank
    /// runs on), for the restart or rollback that follows.
    fn fetch(
        &mut self,
        rank: Rank,
        version: Version,
        source: ImageCopy,
        to: Option<NodeId>,
    ) -> Result<(), String>;
    /// Starts the recorded restart (a [`DecisionKind::Restart`]), held; answers
    /// `RestartDone`/`RestartFailed`.
    fn restart(&mut self, decision: &Decision) -> Result<(), String>;
    /// Brings the live process of `rank` back to the fetched image `version`, held; answers
    /// `RollbackDone`/`RollbackFailed`.
    fn rollback(&mut self, op: OpId, rank: Rank, version: Version) -> Result<(), String>;
    /// Appends to the event log (uncoordinated policies).
    fn log_event(&mut self, _event: &LoggedEvent) {}
    /// Has `rank` alone take its own checkpoint as `version` at its next safe point, with
    /// no barrier (uncoordinated policies); answers `CaptureDone` then
    /// `LevelSafe`/`LevelLost`. A runtime that cannot refuses it.
    fn capture_rank(
        &mut self,
        _op: OpId,
        rank: Rank,
        _version: Version,
        _levels: &[Level],
    ) -> Result<(), String> {
        Err(format!(
            "rank {rank}: this runtime cannot capture one rank without a barrier"
        ))
    }
    /// Message logging: `rank`'s checkpoint `version` is safe; its senders and its buddy
    /// may drop what it delivered before it.
    fn trim_log(&mut self, _rank: Rank, _version: Version) {}
    /// Retention: no future recovery line needs `rank`'s checkpoints older than `version`
    /// ([`Action::KeepFrom`]); a runtime that keeps a fixed number of versions ignores it.
    fn keep_from(&mut self, _rank: Rank, _version: Version) {}
    /// Message logging: the survivors resend to the restarted `rank` what they logged for
    /// it after its checkpoint `version`; it takes them in the recorded order. A runtime
    /// that cannot refuses it.
    fn replay(&mut self, rank: Rank, _version: Option<Version>) -> Result<(), String> {
        Err(format!(
            "rank {rank}: this runtime keeps no message log to replay"
        ))
    }
    /// Shows a line to the user.
    fn notify(&mut self, notice: &Notice);
    /// Stops every rank: the job is over.
    fn end_job(&mut self, error: Option<&PolicyError>);
}

/// Events fed back within one `handle` call before the engine calls it a runaway loop.
const MAX_FEEDBACK: usize = 10_000;

/// A policy driven against a runtime.
pub struct Engine<P, R> {
    policy: P,
    runtime: R,
    outcome: Option<Option<PolicyError>>,
}

impl<P: Policy, R: Runtime> Engine<P, R> {
    pub fn new(policy: P, runtime: R) -> Engine<P, R> {
        Engine {
            policy,
            runtime,
            outcome: None,
        }
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Puts `policy` in place of the current one (a swap while the job runs: the caller
    /// built it from the job's recovery line) and returns the one it replaces.
    pub fn replace_policy(&mut self, policy: P) -> P {
        std::mem::replace(&mut self.policy, policy)
    }

    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    pub fn runtime_mut(&mut self) -> &mut R {
        &mut self.runtime
    }

    /// `Some(None)`: the job completed; `Some(Some(e))`: it ended with `e`.
    pub fn outcome(&self) -> Option<&Option<PolicyError>> {
        self.outcome.as_ref()
    }

    /// When to call [`Engine::tick`] at the latest.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.policy.next_deadline()
    }

    /// Delivers `Tick` if the policy's deadline has come.
    pub fn tick(&mut self, now: Millis, reads: &dyn Reads) -> Result<(), PolicyError> {
        match self.policy.next_deadline() {
            Some(d) if d <= now => self.handle(now, Event::Tick, reads),
            _ => Ok(()),
        }
    }

    /// Feeds `event` to the policy and carries out what it asks, including the failure
    /// events of calls the runtime refused.
    pub fn handle(
        &mut self,
        now: Millis,
        event: Event,
        reads: &dyn Reads,
    ) -> Result<(), PolicyError> {
        let mut queue = VecDeque::from([event]);
        let mut fed = 0;
        while let Some(ev) = queue.pop_front() {
            if self.outcome.is_some() {
                return Ok(());
            }
            fed += 1;
            if fed > MAX_FEEDBACK {
                return Err(PolicyError::Runaway { events: fed });
            }
            for action in self.policy.on_event(now, ev, reads) {
                if let Some(back) = self.execute(action)? {
                    queue.push_back(back);
                }
            }
        }
        Ok(())
    }

    fn execute(&mut self, action: Action) -> Result<Option<Event>, PolicyError> {
        let rt = &mut self.runtime;
        Ok(match action {
            Action::Synchronize { op, ranks } => rt
                .barrier(op, &ranks)
                .err()
                .map(|reason| Event::SyncFailed { op, reason }),
            Action::Release { ranks } => {
                rt.release(&ranks);
                None
            }
            Action::Capture {
                op,
                rank,
                version,
                levels,
            } => rt
                .capture(op, rank, version, &levels)
                .err()
                .map(|reason| Event::CaptureFailed {
                    op,
                    rank,
                    version,
                    reason,
                }),
            Action::Rollback {
                op,
                rank,
                version,
                source,
            } => rt
                .fetch(rank, version, source, None)
                .and_then(|()| rt.rollback(op, rank, version))
                .err()
                .map(|reason| Event::RollbackFailed { op, rank, reason }),
            Action::Restart(d) => {
                let DecisionKind::Restart {
                    rank,
                    node,
                    version,
                    source,
                    ..
                } = d.kind
                else {
                    return Err(PolicyError::NotRecorded {
                        decision: d.id,
                        reason: "a restart action carries no restart decision".into(),
                    });
                };
                let started = rt
                    .record(&d)
                    .map_err(|e| format!("the decision was not recorded: {e}"))
                    .and_then(|()| match (version, source) {
                        (Some(v), Some(src)) => rt.fetch(rank, v, src, Some(node)),
                        _ => Ok(()),
                    })
                    .and_then(|()| rt.restart(&d));
                started.err().map(|reason| Event::RestartFailed {
                    decision: d.id,
                    rank,
                    reason,
                })
            }
            Action::Record(d) => {
                rt.record(&d).map_err(|reason| PolicyError::NotRecorded {
                    decision: d.id,
                    reason,
                })?;
                None
            }
            Action::LogEvent(e) => {
                rt.log_event(&e);
                None
            }
            Action::CaptureRank {
                op,
                rank,
                version,
                levels,
            } => rt
                .capture_rank(op, rank, version, &levels)
                .err()
                .map(|reason| Event::CaptureFailed {
                    op,
                    rank,
                    version,
                    reason,
                }),
            Action::TrimLog { rank, version } => {
                rt.trim_log(rank, version);
                None
            }
            Action::KeepFrom { rank, version } => {
                rt.keep_from(rank, version);
                None
            }
            Action::Replay {
                decision,
                rank,
                version,
            } => rt
                .replay(rank, version)
                .err()
                .map(|reason| Event::RestartFailed {
                    decision,
                    rank,
                    reason,
                }),
            Action::Notify(n) => {
                rt.notify(&n);
                None
            }
            Action::EndJob { error } => {
                rt.end_job(error.as_ref());
                self.outcome = Some(error);
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinated::{Config, Coordinated, IntervalChoice};
    use crate::primitives::{AgreedView, Layout};
    use std::collections::{BTreeMap, BTreeSet};

    /// A runtime that records the calls and refuses what the test says.
    #[derive(Default)]
    struct Fake {
        calls: Vec<String>,
        /// Refuse the record of a restart of this (rank, incarnation).
        refuse_restart: BTreeSet<(Rank, u32)>,
        refuse_commit: bool,
        refuse_capture: BTreeSet<Rank>,
        lines: Vec<String>,
        ended: Option<Option<String>>,
    }

    impl Runtime for Fake {
        fn record(&mut self, d: &Decision) -> Result<(), String> {
            self.calls.push(format!("record {:?}", d.kind));
            match d.kind {
                DecisionKind::Restart {
                    rank, incarnation, ..
                } if self.refuse_restart.remove(&(rank, incarnation)) => {
                    Err(format!("rank {rank} incarnation {incarnation} is taken"))
                }
                DecisionKind::Committed { .. } if self.refuse_commit => {
                    Err("this node no longer leads".into())
                }
                _ => Ok(()),
            }
        }
        fn barrier(&mut self, _op: OpId, ranks: &[Rank]) -> Result<(), String> {
            self.calls.push(format!("barrier {ranks:?}"));
            Ok(())
        }
        fn release(&mut self, ranks: &[Rank]) {
            self.calls.push(format!("release {ranks:?}"));
        }
        fn capture(&mut self, _: OpId, rank: Rank, v: Version, _: &[Level]) -> Result<(), String> {
            self.calls.push(format!("capture {rank} v{v}"));
            if self.refuse_capture.contains(&rank) {
                return Err("no space in L1".into());
            }
            Ok(())
        }
        fn fetch(
            &mut self,
            rank: Rank,
            v: Version,
            src: ImageCopy,
            to: Option<NodeId>,
        ) -> Result<(), String> {
            self.calls
                .push(format!("fetch {rank} v{v} {src} to {to:?}"));
            Ok(())
        }
        fn restart(&mut self, d: &Decision) -> Result<(), String> {
            if let DecisionKind::Restart {
                rank,
                node,
                incarnation,
                ..
            } = d.kind
            {
                self.calls
                    .push(format!("restart {rank} on {node} as {incarnation}"));
            }
            Ok(())
        }
        fn rollback(&mut self, _: OpId, rank: Rank, v: Version) -> Result<(), String> {
            self.calls.push(format!("rollback {rank} v{v}"));
            Ok(())
        }
        fn notify(&mut self, n: &Notice) {
            self.lines.push(n.to_string());
        }
        fn end_job(&mut self, error: Option<&PolicyError>) {
            self.ended = Some(error.map(|e| e.to_string()));
        }
    }

    struct Index(BTreeMap<(Rank, Version), Vec<ImageCopy>>);

    impl Reads for Index {
        fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
            self.0.get(&(rank, version)).cloned().unwrap_or_default()
        }
    }

    fn engine(fake: Fake) -> (Engine<Coordinated, Fake>, Index) {
        let cfg = Config {
            interval: IntervalChoice::Fixed { ms: 10 },
            ..Config::default()
        };
        let layout = Layout {
            ranks: vec![0, 1],
            spares: vec![2],
        };
        let p = Coordinated::new(cfg, 0, &layout, AgreedView::new(1, vec![0, 1, 2]), 0).unwrap();
        (Engine::new(p, fake), Index(BTreeMap::new()))
    }

    /// Runs checkpoint 1 to its commit through the engine.
    fn commit_one(e: &mut Engine<Coordinated, Fake>, idx: &mut Index) -> Result<(), PolicyError> {
        e.tick(10, idx)?;
        let op = OpId { leader: 0, seq: 1 };
        e.handle(11, Event::Synchronized { op }, idx)?;
        for r in 0..2 {
            e.handle(
                12,
                Event::CaptureDone {
                    op,
                    rank: r,
                    version: 1,
                    bytes: 1,
                    seconds: 0.0,
                },
                idx,
            )?;
        }
        for r in 0..2u32 {
            let copy = |level, node| ImageCopy {
                level,
                node: Some(node),
                bytes: 1,
            };
            // L1 at home (node r), L2 on the other node.
            idx.0.insert(
                (r, 1),
                vec![copy(Level::L1, r), copy(Level::L2, (r + 1) % 2)],
            );
            e.handle(
                13,
                Event::LevelSafe {
                    rank: r,
                    version: 1,
                    level: Level::L2,
                },
                idx,
            )?;
        }
        Ok(())
    }

    fn fail_node_1(e: &mut Engine<Coordinated, Fake>, idx: &Index) {
        e.handle(
            20,
            Event::FailureAgreed {
                epoch: 2,
                failed: vec![1],
                view: AgreedView::new(2, vec![0, 2]),
            },
            idx,
        )
        .unwrap();
    }

    #[test]
    fn a_restart_is_recorded_then_fetched_then_started() {
        let (mut e, mut idx) = engine(Fake::default());
        commit_one(&mut e, &mut idx).unwrap();
        assert_eq!(e.policy().recovery_line(), Some(1));
        let before = e.runtime().calls.len();
        fail_node_1(&mut e, &idx);
        let calls = &e.runtime().calls[before..];
        let pos = |prefix: &str| {
            calls
                .iter()
                .position(|c| c.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {calls:?}"))
        };
        let (rec, fetch, start) = (
            pos("record Restart { rank: 1"),
            pos("fetch 1 v1 L2 from node 0 to Some(2)"),
            pos("restart 1 on 2 as 1"),
        );
        assert!(rec < fetch && fetch < start, "{calls:?}");
        // The survivor's image is fetched where it runs, then it rolls back.
        assert!(pos("fetch 0 v1 L1 from node 0 to None") < pos("rollback 0 v1"));
        assert!(e
            .runtime()
            .lines
            .iter()
            .any(|l| l.contains("rank 1 restarts on spare node 2")));
    }

    #[test]
    fn a_refused_restart_record_starts_nothing_and_the_policy_decides_again() {
        let mut fake = Fake::default();
        fake.refuse_restart.insert((1, 1));
        let (mut e, mut idx) = engine(fake);
        commit_one(&mut e, &mut idx).unwrap();
        fail_node_1(&mut e, &idx);
        assert!(
            !e.runtime().calls.iter().any(|c| c.starts_with("restart 1")),
            "{:?}",
            e.runtime().calls
        );
        // Its only copy just failed: the policy tries again after a delay.
        let retry = e.next_deadline().expect("a retry is scheduled");
        assert!(retry > 20);
        e.tick(retry, &idx).unwrap();
        let calls = &e.runtime().calls;
        assert!(
            calls.iter().any(|c| c == "restart 1 on 2 as 2"),
            "{calls:?}"
        );
        assert!(e
            .runtime()
            .lines
            .iter()
            .any(|l| l.contains("the decision was not recorded: rank 1 incarnation 1 is taken")));
    }

    #[test]
    fn a_capture_refused_at_once_aborts_the_checkpoint() {
        let mut fake = Fake::default();
        fake.refuse_capture.insert(1);
        let (mut e, idx) = engine(fake);
        e.tick(10, &idx).unwrap();
        e.handle(
            11,
            Event::Synchronized {
                op: OpId { leader: 0, seq: 1 },
            },
            &idx,
        )
        .unwrap();
        let calls = &e.runtime().calls;
        assert!(calls
            .iter()
            .any(|c| c.starts_with("record Aborted { version: 1")));
        let at = |c: &str| calls.iter().position(|x| x == c);
        assert!(at("release [0, 1]") > at("capture 1 v1"), "{calls:?}");
        assert_eq!(e.policy().summary().aborted, 1);
    }

    #[test]
    fn a_boxed_policy_drives_the_engine() {
        let (e, idx) = engine(Fake::default());
        let (p, fake) = (e.policy, e.runtime);
        let mut e: Engine<Box<dyn Policy>, Fake> = Engine::new(Box::new(p), fake);
        assert_eq!(e.policy().name(), "coordinated");
        e.tick(10, &idx).unwrap();
        assert_eq!(e.runtime().calls[1], "barrier [0, 1]");
    }

    #[test]
    fn a_commit_that_cannot_be_recorded_stops_the_engine() {
        let fake = Fake {
            refuse_commit: true,
            ..Fake::default()
        };
        let (mut e, mut idx) = engine(fake);
        let err = commit_one(&mut e, &mut idx).unwrap_err();
        assert!(
            err.to_string().contains("this node no longer leads"),
            "{err}"
        );
    }

    #[test]
    fn the_end_of_the_job_reaches_the_runtime_and_later_events_do_nothing() {
        let (mut e, idx) = engine(Fake::default());
        e.handle(
            5,
            Event::RankExited {
                rank: 0,
                node: 0,
                code: 2,
            },
            &idx,
        )
        .unwrap();
        assert_eq!(
            e.runtime().ended,
            Some(Some("rank 0 exited with code 2".to_string()))
        );
        assert!(e.outcome().is_some());
        let n = e.runtime().calls.len();
        e.handle(6, Event::Tick, &idx).unwrap();
        e.tick(100, &idx).unwrap();
        assert_eq!(e.runtime().calls.len(), n);
    }
}
