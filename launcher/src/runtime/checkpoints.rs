//! Coordinated checkpoints driven by the policy, at krun's hub.
//!
//! The hub sees every node and every agreed view, so it is where the view is agreed for the
//! policy: one [`policies::engine::Engine`] running [`policies::Coordinated`] lives on a
//! thread of krun, and implements [`policies::engine::Runtime`] by sending commands to the
//! krund nodes over the runtime control protocol:
//!
//! | policy call | krun → krund | krund → krun |
//! |---|---|---|
//! | `barrier(op)` | `Barrier{op}`: hold ranks that reach a safepoint; once every node answered `Opened{op}`, `Wake{op}` (SIGUSR1 wakes them); a node with ranks not linked yet gets it when it links (`Register`), the barrier waits up to `OPEN_TIMEOUT` for it (then `SyncFailed` naming it) | `Held{op}` per node → `Synchronized`; `SyncFailed` |
//! | `capture(op, rank, v)` | `Release{Checkpoint{version}}` once per op: every rank takes the native checkpoint | `Captured{rank, version, wiring}` → `CaptureDone`; `Safe{.., node, wiring}`/`NotSafe` → `LevelSafe`/`LevelLost` (L2 at the buddy, L3 at the parity holder: the copies index); a report of an older wiring epoch than the newest recovery's is dropped |
//! | `release` | `Release{Continue}` if the ranks are still held | |
//! | `record` | appended to `decisions.log` in the job directory | |
//! | `fetch` | nothing: the restarting node reads the chain from the store | |
//! | `restart(d)` / `rollback(op, r, v)` | collected, then one `Restart{wiring, bootstrap, version, ranks}` per recovery (after `Release{Abort}`), then `Reform{wiring, members, ranks}`: the stores re-form buddies and parity sets among the nodes left | `Restarted{wiring, rank}` → `RestartDone`/`RollbackDone`; `RestartFailed` → `RestartFailed`/`RollbackFailed` |
//! | `notify` / end | printed by krun; an end with an error stops the job ([`JobError`]) | |
//!
//! Decisions (commits, aborts, recoveries and each restart) are appended to the job
//! directory's `decisions.log`, one per line, so that a later move of the engine into a
//! krund leader can resume from them. The decisions about one rank (each restart, each
//! rollback) also go into that rank's process-table row (`LauncherToNode::Decided`, written
//! by the node that carries it out, before the `Restart` order): the table is replicated by
//! the membership, survives the loss of krun's host's files, and `krun status` shows it.
//!
//! Recovery: an agreed failure becomes `Event::FailureAgreed`; the policy's restarts and
//! rollbacks of one `handle` call are carried out together by `HubCalls::execute_plan`: a
//! new wiring epoch (the ranks' next address all-gather, [`NewWiring`]) when every rank
//! restarts, and one `Restart` order to every node; the nodes' side and the re-wiring
//! contract are in [`super::recovery`].
//!
//! The policy numbers versions itself (never reused); the native checkpointer numbers its
//! images one by one. The driver orders each capture as the checkpointer's next version and
//! maps the two both ways.
//!
//! The uncoordinated policy (`kind = "uncoordinated"`: per-rank captures without a barrier;
//! with logging log trims and lone restarts that rejoin the running ranks, without it the
//! recovery line's per-rank rollbacks in one wiring epoch) has its own table of calls and
//! krund commands in [`uncoordinated`].
//!
//! The policy is a `Box<dyn Policy + Send>` built from a description (`krun --policy FILE`,
//! default: the built-in coordinated policy) and swapped while the job runs by
//! `krun policy load|unload` ([`swap`]).
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policies::description::Description;
use policies::engine::{Engine, Runtime as PolicyRuntime};
use policies::primitives::{
    AgreedView, Decision, Event, ImageCopy, Layout, Level, Millis, NodeId, OpId, Rank, Reads,
    RequestSource, Version,
};
use policies::report::{Notice, NoticeKind, Summary};
use policies::{Config, IntervalChoice, Policy, PolicyError};

mod swap;

/// The engine the policy thread drives: any policy (built in or a module) against the hub.
type Driven = Engine<Box<dyn Policy + Send>, HubCalls>;

/// The policy a driver runs (any policy: `[policy] kind`).
pub type BoxedPolicy = Box<dyn Policy + Send>;

mod calls;
mod flush_bar;
mod settings;
mod translate;
pub mod uncoordinated;

/// How long every node has to answer `Opened` to a barrier before it fails.
use super::control::{LauncherToNode, NodeToLauncher};
use super::safepoint::SafepointOrder;
use crate::inject::{Phase, PhaseGate};
use calls::*;
pub use calls::{JobError, NewWiring};
pub use settings::*;
use translate::*;

/// What the driver is told.
pub enum Input {
    FromNode(NodeId, NodeToLauncher),
    Request(RequestSource),
    View {
        epoch: u64,
        members: Vec<NodeId>,
        failed: Vec<NodeId>,
    },
    /// `krun node drain` (see `runtime/drain.rs`): the policy moves the node's ranks; the
    /// answer is the user's line and the ranks moved, or why nothing moved.
    Drain {
        node: NodeId,
        epoch: u64,
        members: Vec<NodeId>,
        reply: Sender<super::drain::DrainAnswer>,
    },
    /// `krun policy load|unload|show` ([`swap`]): the answer is the user's line or why not.
    Policy {
        request: super::control::PolicyRequest,
        reply: Sender<Result<String, String>>,
    },
}

/// Sends a command to every node linked to krun; returns the nodes it went to.
pub type Broadcast = Arc<dyn Fn(&LauncherToNode) -> BTreeSet<NodeId> + Send + Sync>;

/// The running driver: feed it with [`CheckpointDriver::input`]; [`CheckpointDriver::finish`]
/// stops it and returns the policy's summary.
pub struct CheckpointDriver {
    tx: Sender<Option<Input>>,
    commits: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Summary>>,
}
impl CheckpointDriver {
    /// Starts the coordinated policy for `ranks` (rank -> node) with checkpoints every
    /// `interval` (None: on request only), committing at `level`; decisions go to `log`.
    /// With `recover`, ranks lost with a node restart on one of `spares` (none left: the
    /// job ends with an error naming them); `new_wiring` opens the ranks' address
    /// all-gather of a recovery; `job_error` receives why the job cannot continue; the
    /// policy stops at the phases `phases` names (failure injection). `policy`: the job's
    /// description (`krun --policy FILE`; `None`: the built-in coordinated policy), over
    /// these defaults.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ranks: Vec<NodeId>,
        spares: Vec<NodeId>,
        recover: bool,
        interval: Option<Duration>,
        level: Level,
        log: Option<PathBuf>,
        send: Broadcast,
        new_wiring: NewWiring,
        job_error: JobError,
        phases: PhaseGate,
        policy: Option<Description>,
    ) -> Result<CheckpointDriver, PolicyError> {
        let nodes: BTreeSet<NodeId> = ranks.iter().copied().collect();
        let settings = PolicySettings::from_env()?;
        let basis = PolicyBasis {
            layout: Layout {
                ranks: ranks.clone(),
                spares: spares.clone(),
            },
            view: AgreedView::new(0, nodes.iter().chain(&spares).copied().collect()),
            interval,
            level,
            leader: 0,
            now: 0,
        };
        // `krun --policy FILE` wins; else the `[policy]` settings.
        let policy = policy.or_else(|| settings.description());
        // The uncoordinated policy: per-rank captures; with logging lone restarts, without
        // it the recovery line's rollbacks (`checkpoints/uncoordinated.rs`).
        let uncoord = match policy.as_ref() {
            Some(d) if d.kind == policies::description::Kind::Uncoordinated => {
                Some(uncoordinated::Uncoord::new(&ranks, d.logging.messages))
            }
            _ => None,
        };
        let cfg = coordinated_defaults(&basis);
        let layout = Layout {
            ranks: ranks.clone(),
            spares: spares.clone(),
        };
        let view = AgreedView::new(0, nodes.iter().chain(&spares).copied().collect());
        let (plug, policy) = swap::Plug::start(policy, cfg, layout, &view)?;
        let commits = Arc::new(AtomicU64::new(0));
        let calls = HubCalls {
            commits: commits.clone(),
            send,
            nodes,
            log,
            barrier: None,
            opened: (BTreeSet::new(), false, Instant::now()),
            linking: BTreeSet::new(),
            capturing: None,
            native_newest: 0,
            versions: BTreeMap::new(),
            stopped: false,
            recover,
            placement: ranks,
            plan: Vec::new(),
            wiring: None,
            wirings: 0,
            rejoin_ids: 0,
            new_wiring,
            job_error,
            phases,
            drain: Default::default(),
            recovery_bar: None,
            flush_bar: None,
            commit_level: level,
            decisions: Vec::new(),
            view,
            spares,
            quiet_takeover: false,
            uncoord,
            switch_cut: None,
            early_cards: BTreeMap::new(),
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("krun-policy".into())
            .spawn(move || run(Engine::new(policy, calls), plug, rx))
            .map_err(|e| PolicyError::Config(format!("starting the policy thread: {e}")))?;
        Ok(CheckpointDriver {
            tx,
            commits,
            thread: Some(thread),
        })
    }

    /// Checkpoints committed so far.
    pub fn commits(&self) -> Arc<AtomicU64> {
        self.commits.clone()
    }

    pub fn input(&self, input: Input) {
        let _ = self.tx.send(Some(input));
    }

    /// A sender for inputs (for the hub's node links).
    pub fn sender(&self) -> Sender<Option<Input>> {
        self.tx.clone()
    }

    /// Stops the policy and returns its summary.
    pub fn finish(mut self) -> Option<Summary> {
        let _ = self.tx.send(None);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

fn run(mut engine: Driven, mut plug: swap::Plug, rx: Receiver<Option<Input>>) -> Summary {
    let start = Instant::now();
    let now = || start.elapsed().as_millis() as Millis;
    let mut copies = Copies::default();
    loop {
        // SIGUSR1 to krun is a checkpoint request: looked at every 100 ms.
        let wait = engine
            .next_deadline()
            .map_or(Duration::from_millis(100), |d| {
                Duration::from_millis(d.saturating_sub(now()))
            })
            .min(Duration::from_millis(100));
        let input = match rx.recv_timeout(wait) {
            Ok(Some(i)) => Some(i),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => None,
        };
        let requests = crate::ranks::take_checkpoint_requests();
        for _ in 0..if engine.runtime().stopped {
            0
        } else {
            requests
        } {
            feed(
                &mut engine,
                now(),
                Event::CheckpointRequest {
                    source: RequestSource::Signal,
                },
                &copies,
            );
        }
        let input = match input {
            Some(Input::Policy { request, reply }) => {
                plug.request(&mut engine, now(), &mut copies, request, reply);
                None
            }
            other => other,
        };
        // The uncoordinated policy's messages first (`uncoordinated.rs`).
        let input = match input {
            Some(i) => match uncoordinated::translate(engine.runtime_mut(), &mut copies, i) {
                Ok(Some(event)) => {
                    if !engine.runtime().stopped {
                        feed(&mut engine, now(), event, &copies);
                    }
                    None
                }
                Ok(None) => None,
                Err(i) => Some(i),
            },
            None => None,
        };
        if let Some(input) = input {
            if let Some(event) = translate(engine.runtime_mut(), &mut copies, input) {
                if !engine.runtime().stopped {
                    feed(&mut engine, now(), event, &copies);
                }
            }
        }
        if engine.runtime().stopped {
            continue;
        }
        // A node that never opened the barrier (alive but stuck) would hold it forever: the
        // nodes only time their ranks out once woken.
        let unopened = {
            let calls = engine.runtime();
            match &calls.barrier {
                Some((op, _)) if !calls.opened.1 && calls.opened.2.elapsed() > OPEN_TIMEOUT => {
                    let missing: Vec<_> = calls.nodes.difference(&calls.opened.0).collect();
                    let unlinked: Vec<_> = missing
                        .iter()
                        .filter(|n| calls.linking.contains(n))
                        .collect();
                    let reason = if unlinked.is_empty() {
                        format!("nodes {missing:?} did not open the barrier in {OPEN_TIMEOUT:?}")
                    } else {
                        format!(
                            "nodes {unlinked:?} did not link to krun in {OPEN_TIMEOUT:?} (nodes \
                             {missing:?} did not open the barrier)"
                        )
                    };
                    Some((*op, reason))
                }
                _ => None,
            }
        };
        if let Some((op, reason)) = unopened {
            engine.runtime_mut().opened.1 = true;
            feed(
                &mut engine,
                now(),
                Event::SyncFailed { op, reason },
                &copies,
            );
        }
        if let Err(e) = engine.tick(now(), &copies) {
            eprintln!("krun: checkpoint policy: {e}");
        }
        for event in engine.runtime_mut().execute_plan() {
            feed(&mut engine, now(), event, &copies);
        }
        for event in uncoordinated::poll(engine.runtime_mut()) {
            feed(&mut engine, now(), event, &copies);
        }
        plug.poll(&mut engine, now(), &mut copies);
    }
    plug.total(engine.policy().summary())
}

/// Feeds `event`, then carries out the recovery it planned (if any), feeding back the
/// answers of calls that could not be sent (bounded: each round needs a failed send).
fn feed(engine: &mut Driven, now: Millis, event: Event, reads: &Copies) {
    let mut queue = vec![event];
    let mut rounds = 0;
    while let Some(event) = queue.pop() {
        if let Err(e) = engine.handle(now, event, reads) {
            eprintln!("krun: checkpoint policy: {e}");
        }
        rounds += 1;
        if rounds < 100 {
            queue.extend(engine.runtime_mut().execute_plan());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A hub whose broadcasts are recorded, for nodes 0-2.
    pub(super) fn hub() -> (HubCalls, Arc<Mutex<Vec<LauncherToNode>>>) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        let nodes: BTreeSet<NodeId> = [0, 1, 2].into();
        let linked = nodes.clone();
        let calls = HubCalls {
            commits: Arc::new(AtomicU64::new(0)),
            send: Arc::new(move |m: &LauncherToNode| {
                log.lock().unwrap().push(m.clone());
                linked.clone()
            }),
            nodes,
            log: None,
            barrier: None,
            opened: (BTreeSet::new(), false, Instant::now()),
            linking: BTreeSet::new(),
            capturing: None,
            native_newest: 0,
            versions: BTreeMap::new(),
            stopped: false,
            recover: false,
            placement: vec![0, 1, 2],
            plan: Vec::new(),
            wiring: None,
            wirings: 0,
            rejoin_ids: 0,
            new_wiring: Arc::new(|| Err("no wiring in this test".into())),
            job_error: Arc::new(Mutex::new(None)),
            phases: PhaseGate::default(),
            drain: Default::default(),
            recovery_bar: None,
            flush_bar: None,
            commit_level: Level::L2,
            decisions: Vec::new(),
            view: AgreedView::new(0, vec![0, 1, 2]),
            spares: Vec::new(),
            quiet_takeover: false,
            uncoord: None,
            switch_cut: None,
            early_cards: BTreeMap::new(),
        };
        (calls, sent)
    }

    #[test]
    fn the_policy_settings_choose_the_policy_and_name_a_bad_value() {
        let get = |k: &str| match k {
            "KRUN_POLICY_KIND" => Some("Uncoordinated".to_string()),
            "KRUN_POLICY_LOGGING" => Some("off".to_string()),
            _ => None,
        };
        let s = PolicySettings::from_lookup(&get).unwrap();
        assert_eq!(
            s,
            PolicySettings {
                kind: PolicyKind::Uncoordinated,
                logging: false
            }
        );
        let basis = PolicyBasis {
            layout: Layout {
                ranks: vec![0, 1],
                spares: vec![2],
            },
            view: AgreedView::new(0, vec![0, 1, 2]),
            interval: Some(Duration::from_secs(2)),
            level: Level::L2,
            leader: 0,
            now: 0,
        };
        let mut p = make_policy(&s, &basis).unwrap();
        assert_eq!(p.name(), "uncoordinated");
        // Each rank on its own schedule, once past its `krun_init`: the first checkpoint is
        // due within the interval.
        assert_eq!(p.next_deadline(), None);
        for rank in 0..2 {
            p.on_event(0, Event::RankReady { rank }, &Copies::default());
        }
        assert!(p.next_deadline().is_some_and(|d| d <= 2000));
        let p = make_policy(&PolicySettings::default(), &basis).unwrap();
        assert_eq!(p.name(), "coordinated");
        let err = PolicySettings::from_lookup(&|k: &str| {
            (k == "KRUN_POLICY_KIND").then(|| "tmr".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("KRUN_POLICY_KIND") && err.contains("\"tmr\""),
            "{err}"
        );
        let err = PolicySettings::from_lookup(&|k: &str| {
            (k == "KRUN_POLICY_LOGGING").then(|| "maybe".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("KRUN_POLICY_LOGGING"), "{err}");
    }

    /// A late report of a checkpoint a recovery undid (e.g. an L2 safety the store only
    /// reached after the node that held it back was agreed lost) names a native version
    /// the ranks take again after the recovery: it must not count for the new checkpoint of
    /// that number. Its wiring epoch, older than the recovery's, gives it away.
    #[test]
    fn a_late_report_of_a_checkpoint_a_recovery_undid_is_not_credited_to_the_next_one() {
        let (mut calls, sent) = hub();
        calls.new_wiring = Arc::new(|| Ok::<_, String>("127.0.0.1:1".to_string()));
        let mut copies = Copies(BTreeMap::new());
        let captured = |rank: Rank, version: u64, wiring: u64| {
            Input::FromNode(
                rank,
                NodeToLauncher::Captured {
                    rank,
                    version,
                    bytes: 100,
                    wiring,
                },
            )
        };
        let safe = |rank: Rank, version: u64, wiring: u64| {
            Input::FromNode(
                rank,
                NodeToLauncher::Safe {
                    rank,
                    version,
                    level: 2,
                    node: Some((rank + 1) % 3),
                    wiring,
                },
            )
        };
        // Checkpoint 1 (native 1): captured and safe everywhere.
        calls
            .capture(OpId { leader: 0, seq: 1 }, 0, 1, &[])
            .unwrap();
        for r in 0..3 {
            let done = translate(&mut calls, &mut copies, captured(r, 1, 0));
            assert!(matches!(done, Some(Event::CaptureDone { version: 1, .. })));
            let l2 = translate(&mut calls, &mut copies, safe(r, 1, 0));
            assert!(matches!(l2, Some(Event::LevelSafe { version: 1, .. })));
        }
        // Checkpoint 2 (native 2) is being captured when a node fails: every rank goes
        // back to checkpoint 1 in wiring epoch 1.
        calls
            .capture(OpId { leader: 0, seq: 2 }, 0, 2, &[])
            .unwrap();
        assert!(translate(&mut calls, &mut copies, captured(0, 2, 0)).is_some());
        let back = OpId { leader: 0, seq: 3 };
        calls.plan = (0..3)
            .map(|r| (r, r, Planned::Rollback(back, 1), Some(1)))
            .collect();
        assert!(calls.execute_plan().is_empty());
        assert_eq!(calls.wirings, 1);
        assert!(sent.lock().unwrap().iter().any(|m| matches!(
            m,
            LauncherToNode::Reform { wiring: 1, ranks, .. } if ranks.len() == 3
        )));
        // Checkpoint 3 is ordered as native 2 again.
        calls
            .capture(OpId { leader: 0, seq: 4 }, 0, 3, &[])
            .unwrap();
        assert_eq!(calls.native_of(3), Some(2));
        // The old checkpoint 2's late reports (epoch 0) are dropped...
        assert!(translate(&mut calls, &mut copies, safe(0, 2, 0)).is_none());
        assert!(translate(&mut calls, &mut copies, captured(1, 2, 0)).is_none());
        let lost = Input::FromNode(
            2,
            NodeToLauncher::NotSafe {
                rank: 2,
                version: 2,
                level: 2,
                error: "the buddy is gone".into(),
                wiring: 0,
            },
        );
        assert!(translate(&mut calls, &mut copies, lost).is_none());
        for r in 0..3 {
            assert!(copies.copies(r, 3).is_empty(), "rank {r}");
        }
        // ...and the new ones (epoch 1) count for checkpoint 3, with the copies' nodes.
        let done = translate(&mut calls, &mut copies, captured(0, 2, 1));
        assert!(matches!(
            done,
            Some(Event::CaptureDone {
                rank: 0,
                version: 3,
                ..
            })
        ));
        let l2 = translate(&mut calls, &mut copies, safe(0, 2, 1));
        assert!(matches!(
            l2,
            Some(Event::LevelSafe {
                rank: 0,
                version: 3,
                level: Level::L2
            })
        ));
        let at: Vec<_> = copies
            .copies(0, 3)
            .iter()
            .map(|c| (c.level, c.node))
            .collect();
        assert_eq!(at, vec![(Level::L1, Some(0)), (Level::L2, Some(1))]);
    }

    /// The first-barrier race seen under load: a rank of a node that had already heard of
    /// the barrier woke its peers, whose own node had not heard of it yet and let them go
    /// on ("the ranks' nodes gave different orders"). Ranks are now woken only once every
    /// node holds ranks that ask.
    #[test]
    fn ranks_are_woken_only_once_every_node_opened_the_barrier() {
        let (mut calls, sent) = hub();
        let mut copies = Copies(BTreeMap::new());
        let op = OpId { leader: 0, seq: 7 };
        calls.barrier(op, &[]).unwrap();
        let wakes = |sent: &Arc<Mutex<Vec<LauncherToNode>>>| {
            sent.lock()
                .unwrap()
                .iter()
                .filter(|m| matches!(m, LauncherToNode::Wake { op: 7 }))
                .count()
        };
        assert!(matches!(
            sent.lock().unwrap()[0],
            LauncherToNode::Barrier { op: 7 }
        ));
        let opened = |node| Input::FromNode(node, NodeToLauncher::Opened { op: 7 });
        for (node, woken) in [(2, 0), (0, 0), (0, 0), (1, 1)] {
            assert!(translate(&mut calls, &mut copies, opened(node)).is_none());
            assert_eq!(wakes(&sent), woken, "after node {node} opened");
        }
        // A late answer to an older barrier wakes nobody again.
        let stale = Input::FromNode(1, NodeToLauncher::Opened { op: 6 });
        assert!(translate(&mut calls, &mut copies, stale).is_none());
        translate(&mut calls, &mut copies, opened(2));
        assert_eq!(wakes(&sent), 1);
    }

    /// Under load a krund can link to krun after the first barrier went out: the barrier
    /// waits for it (no abort, no release) and goes out again once it links; a node that
    /// dies meanwhile ends the barrier with the failure.
    #[test]
    fn a_barrier_waits_for_a_node_that_links_late_and_a_failure_ends_the_wait() {
        let (mut calls, sent) = hub();
        let linked = Arc::new(Mutex::new(BTreeSet::from([0u32, 2])));
        let (log, now) = (sent.clone(), linked.clone());
        calls.send = Arc::new(move |m: &LauncherToNode| {
            log.lock().unwrap().push(m.clone());
            now.lock().unwrap().clone()
        });
        let mut copies = Copies(BTreeMap::new());
        let op = OpId { leader: 0, seq: 9 };
        calls.barrier(op, &[]).unwrap();
        let count = |sent: &Arc<Mutex<Vec<LauncherToNode>>>, f: fn(&LauncherToNode) -> bool| {
            sent.lock().unwrap().iter().filter(|m| f(m)).count()
        };
        let barriers = |m: &LauncherToNode| matches!(m, LauncherToNode::Barrier { op: 9 });
        let releases = |m: &LauncherToNode| matches!(m, LauncherToNode::Release { .. });
        let wakes = |m: &LauncherToNode| matches!(m, LauncherToNode::Wake { op: 9 });
        assert_eq!(calls.linking, BTreeSet::from([1]));
        assert_eq!(count(&sent, releases), 0, "the barrier is not given up");
        let opened = |node| Input::FromNode(node, NodeToLauncher::Opened { op: 9 });
        for n in [0, 2] {
            assert!(translate(&mut calls, &mut copies, opened(n)).is_none());
        }
        assert_eq!(count(&sent, wakes), 0, "node 1 has not opened it");
        // Node 1 links: the barrier goes out again, it opens, every rank is woken.
        linked.lock().unwrap().insert(1);
        let addresses = super::super::control::NodeAddresses {
            node: 1,
            pid: 1,
            host: "h".into(),
            control_tcp: String::new(),
            control_unix: String::new(),
            adaptation: String::new(),
        };
        let register = Input::FromNode(1, NodeToLauncher::Register(addresses.clone()));
        assert!(translate(&mut calls, &mut copies, register).is_none());
        assert_eq!(count(&sent, barriers), 2);
        assert!(calls.linking.is_empty());
        // A second Register (or one of a node the barrier did not wait for) sends nothing.
        let again = Input::FromNode(1, NodeToLauncher::Register(addresses));
        assert!(translate(&mut calls, &mut copies, again).is_none());
        assert_eq!(count(&sent, barriers), 2);
        assert!(translate(&mut calls, &mut copies, opened(1)).is_none());
        assert_eq!(count(&sent, wakes), 1);

        // Another barrier waits for node 1 again; node 1 dies before it links: the failure
        // gives the barrier up (the policy hears the failure; nothing waits for node 1).
        linked.lock().unwrap().remove(&1);
        calls.recover = true;
        calls.barrier(OpId { leader: 0, seq: 10 }, &[]).unwrap();
        assert_eq!(calls.linking, BTreeSet::from([1]));
        let view = Input::View {
            epoch: 2,
            members: vec![0, 2],
            failed: vec![1],
        };
        assert!(matches!(
            translate(&mut calls, &mut copies, view),
            Some(Event::FailureAgreed { .. })
        ));
        assert!(calls.barrier.is_none());
        assert!(matches!(
            sent.lock().unwrap().last(),
            Some(LauncherToNode::Release {
                order: SafepointOrder::Abort(_)
            })
        ));
    }
}
