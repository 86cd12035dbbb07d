//! Coordinated checkpoints driven by the policy, at krun's hub.
//!
//! The hub sees every node and every agreed view, so it is where the view is agreed for the
//! policy: one [`policies::engine::Engine`] running [`policies::Coordinated`] lives on a
//! thread of krun, and implements [`policies::engine::Runtime`] by sending commands to the
//! krund nodes over the runtime control protocol:
//!
//! | policy call | krun → krund | krund → krun |
//! |---|---|---|
//! | `barrier(op)` | `Barrier{op}`: hold ranks at their safepoints (SIGUSR1 wakes them) | `Held{op}` per node → `Synchronized`; `SyncFailed` |
//! | `capture(op, rank, v)` | `Release{Checkpoint{version}}` once per op: every rank takes the native checkpoint | `Captured{rank, version}` → `CaptureDone`; `Safe`/`NotSafe` → `LevelSafe`/`LevelLost` |
//! | `release` | `Release{Continue}` if the ranks are still held | |
//! | `record` | appended to `decisions.log` in the job directory | |
//! | `notify` / end | printed by krun | |
//!
//! Decisions (commits, aborts) are appended to the job directory's `decisions.log`, one
//! per line, so that a later move of the engine into a krund leader can resume from them
//! (moving them into the process table is the next step). Recovery from a lost node is not
//! driven yet: when a node that runs ranks fails, the driver says so and takes no more
//! checkpoints (fetch, restart and rollback are refused).
//!
//! The policy numbers versions itself (never reused); the native checkpointer numbers its
//! images one by one. The driver orders each capture as the checkpointer's next version and
//! maps the two both ways.
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policies::engine::{Engine, Runtime as PolicyRuntime};
use policies::primitives::{
    AgreedView, Decision, Event, ImageCopy, Layout, Level, Millis, NodeId, OpId, Rank, Reads,
    RequestSource, Version,
};
use policies::report::{Notice, Summary};
use policies::{Config, Coordinated, IntervalChoice, Policy, PolicyError};

use super::control::{LauncherToNode, NodeToLauncher};
use super::safepoint::SafepointOrder;

/// What the driver is told.
pub enum Input {
    FromNode(NodeId, NodeToLauncher),
    Request(RequestSource),
    View {
        epoch: u64,
        members: Vec<NodeId>,
        failed: Vec<NodeId>,
    },
}

/// Sends a command to every node linked to krun; returns the nodes it went to.
pub type Broadcast = Arc<dyn Fn(&LauncherToNode) -> BTreeSet<NodeId> + Send + Sync>;

/// The running driver: feed it with [`CheckpointDriver::input`]; [`CheckpointDriver::finish`]
/// stops it and returns the policy's summary.
pub struct CheckpointDriver {
    tx: Sender<Option<Input>>,
    thread: Option<std::thread::JoinHandle<Summary>>,
}

/// The policy's copies index: what the nodes reported safe.
#[derive(Default)]
struct Copies(BTreeMap<(Rank, Version), BTreeSet<Level>>);

impl Reads for Copies {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        self.0
            .get(&(rank, version))
            .map(|ls| {
                ls.iter()
                    .map(|&level| ImageCopy {
                        level,
                        node: None,
                        bytes: 0,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn level_of(n: u8) -> Option<Level> {
    match n {
        1 => Some(Level::L1),
        2 => Some(Level::L2),
        3 => Some(Level::L3),
        4 => Some(Level::L4),
        _ => None,
    }
}

/// The hub's side of the policy's calls.
struct HubCalls {
    send: Broadcast,
    /// Nodes that run ranks, still in the job.
    nodes: BTreeSet<NodeId>,
    log: Option<PathBuf>,
    /// The barrier in progress: its op and the nodes that answered `Held`.
    barrier: Option<(OpId, BTreeSet<NodeId>)>,
    /// The op whose capture was ordered, with the checkpointer's version and when.
    capturing: Option<(OpId, Version, u64, Instant)>,
    /// The checkpointer's newest version seen.
    native_newest: u64,
    /// native version -> policy version.
    versions: BTreeMap<u64, Version>,
    /// A node with ranks failed: no more checkpoints (recovery is not driven yet).
    stopped: bool,
}

impl PolicyRuntime for HubCalls {
    fn record(&mut self, decision: &Decision) -> Result<(), String> {
        let Some(path) = &self.log else {
            return Ok(());
        };
        let line = format!("{:?} {:?}\n", decision.id, decision.kind);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn barrier(&mut self, op: OpId, _ranks: &[Rank]) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("no node runs ranks".into());
        }
        let sent = (self.send)(&LauncherToNode::Barrier { op: op.seq });
        if !sent.is_superset(&self.nodes) {
            // Not every node is up yet: the policy aborts this one and tries again later.
            (self.send)(&LauncherToNode::Release {
                order: SafepointOrder::Continue,
            });
            let missing: Vec<_> = self.nodes.difference(&sent).collect();
            return Err(format!("nodes {missing:?} are not linked to krun yet"));
        }
        self.barrier = Some((op, BTreeSet::new()));
        Ok(())
    }

    fn release(&mut self, _ranks: &[Rank]) {
        // After a capture the ranks went on by themselves (the checkpoint is collective).
        if self.barrier.take().is_some() {
            (self.send)(&LauncherToNode::Release {
                order: SafepointOrder::Continue,
            });
        }
    }

    fn capture(
        &mut self,
        op: OpId,
        _rank: Rank,
        version: Version,
        _levels: &[Level],
    ) -> Result<(), String> {
        if self.capturing.is_some_and(|(o, ..)| o == op) {
            return Ok(());
        }
        let native = self.native_newest + 1;
        self.versions.insert(native, version);
        self.capturing = Some((op, version, native, Instant::now()));
        self.barrier = None;
        (self.send)(&LauncherToNode::Release {
            order: SafepointOrder::Checkpoint { version: native },
        });
        Ok(())
    }

    fn fetch(
        &mut self,
        rank: Rank,
        version: Version,
        _source: ImageCopy,
        _to: Option<NodeId>,
    ) -> Result<(), String> {
        Err(format!(
            "krun does not fetch images for a recovery yet (rank {rank} v{version})"
        ))
    }

    fn restart(&mut self, _decision: &Decision) -> Result<(), String> {
        Err("krun does not restart lost ranks yet".into())
    }

    fn rollback(&mut self, _op: OpId, rank: Rank, _version: Version) -> Result<(), String> {
        Err(format!("krun does not roll rank {rank} back yet"))
    }

    fn notify(&mut self, notice: &Notice) {
        eprintln!("krun: {notice}");
    }

    fn end_job(&mut self, error: Option<&PolicyError>) {
        if let Some(e) = error {
            eprintln!("krun: the checkpoint policy ended: {e}");
        }
    }
}

impl CheckpointDriver {
    /// Starts the coordinated policy for `ranks` (rank -> node) with checkpoints every
    /// `interval` (None: on request only), committing at `level`; decisions go to `log`.
    pub fn start(
        ranks: Vec<NodeId>,
        interval: Option<Duration>,
        level: Level,
        log: Option<PathBuf>,
        send: Broadcast,
    ) -> Result<CheckpointDriver, PolicyError> {
        let nodes: BTreeSet<NodeId> = ranks.iter().copied().collect();
        let cfg = Config {
            interval: IntervalChoice::Fixed {
                // "On request only": an interval longer than any job.
                ms: interval.map_or(u64::MAX / 4, |d| (d.as_millis() as u64).max(1)),
            },
            commit_level: level,
            levels: Config::default()
                .levels
                .into_iter()
                .filter(|c| c.level <= level)
                .collect(),
            ..Config::default()
        };
        let layout = Layout {
            ranks,
            spares: Vec::new(),
        };
        let view = AgreedView::new(0, nodes.iter().copied().collect());
        let policy = Coordinated::new(cfg, 0, &layout, view, 0)?;
        let calls = HubCalls {
            send,
            nodes,
            log,
            barrier: None,
            capturing: None,
            native_newest: 0,
            versions: BTreeMap::new(),
            stopped: false,
        };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("krun-policy".into())
            .spawn(move || run(Engine::new(policy, calls), rx))
            .map_err(|e| PolicyError::Config(format!("starting the policy thread: {e}")))?;
        Ok(CheckpointDriver {
            tx,
            thread: Some(thread),
        })
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

fn run(mut engine: Engine<Coordinated, HubCalls>, rx: Receiver<Option<Input>>) -> Summary {
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
        if let Err(e) = engine.tick(now(), &copies) {
            eprintln!("krun: checkpoint policy: {e}");
        }
    }
    engine.policy().summary()
}

fn feed(engine: &mut Engine<Coordinated, HubCalls>, now: Millis, event: Event, reads: &Copies) {
    if let Err(e) = engine.handle(now, event, reads) {
        eprintln!("krun: checkpoint policy: {e}");
    }
}

/// A node's message or a request as the policy's event.
fn translate(calls: &mut HubCalls, copies: &mut Copies, input: Input) -> Option<Event> {
    match input {
        Input::Request(source) => Some(Event::CheckpointRequest { source }),
        Input::View {
            epoch,
            members,
            failed,
        } => {
            let lost: Vec<NodeId> = failed
                .into_iter()
                .filter(|n| calls.nodes.remove(n))
                .collect();
            if !lost.is_empty() && !calls.stopped {
                // HOOK (recovery): feed Event::FailureAgreed { epoch, failed: lost, view }
                // once krun drives rollbacks and restarts.
                let _ = (epoch, members);
                calls.stopped = true;
                if calls.barrier.take().is_some() || calls.capturing.is_some() {
                    (calls.send)(&LauncherToNode::Release {
                        order: SafepointOrder::Abort(format!("node(s) {lost:?} failed")),
                    });
                }
                eprintln!(
                    "krun: no more checkpoints: node(s) {lost:?} ran ranks, and krun does not \
                     drive their recovery yet"
                );
            }
            None
        }
        Input::FromNode(node, msg) => match msg {
            NodeToLauncher::Held { op, .. } => {
                let (want, held) = calls.barrier.as_mut()?;
                if want.seq != op {
                    return None;
                }
                held.insert(node);
                (held.is_superset(&calls.nodes)).then_some(Event::Synchronized { op: *want })
            }
            NodeToLauncher::SyncFailed { op, reason } => {
                let (want, _) = calls.barrier.as_ref()?;
                (want.seq == op).then_some(Event::SyncFailed { op: *want, reason })
            }
            NodeToLauncher::Captured {
                rank,
                version,
                bytes,
            } => {
                calls.native_newest = calls.native_newest.max(version);
                let pv = *calls.versions.get(&version)?;
                copies.0.entry((rank, pv)).or_default().insert(Level::L1);
                let (op, _, _, started) = calls.capturing.as_ref()?;
                Some(Event::CaptureDone {
                    op: *op,
                    rank,
                    version: pv,
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                })
            }
            NodeToLauncher::Safe {
                rank,
                version,
                level,
            } => {
                let pv = *calls.versions.get(&version)?;
                let level = level_of(level)?;
                copies.0.entry((rank, pv)).or_default().insert(level);
                Some(Event::LevelSafe {
                    rank,
                    version: pv,
                    level,
                })
            }
            NodeToLauncher::NotSafe {
                rank,
                version,
                level,
                ..
            } => Some(Event::LevelLost {
                rank,
                version: *calls.versions.get(&version)?,
                level: level_of(level)?,
            }),
            NodeToLauncher::Register(_)
            | NodeToLauncher::View { .. }
            | NodeToLauncher::Bye
            | NodeToLauncher::RankKilled { .. } => None,
        },
    }
}
