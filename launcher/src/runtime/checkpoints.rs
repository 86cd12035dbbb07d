//! Coordinated checkpoints driven by the policy, at krun's hub.
//!
//! The hub sees every node and every agreed view, so it is where the view is agreed for the
//! policy: one [`policies::engine::Engine`] running [`policies::Coordinated`] lives on a
//! thread of krun, and implements [`policies::engine::Runtime`] by sending commands to the
//! krund nodes over the runtime control protocol:
//!
//! | policy call | krun → krund | krund → krun |
//! |---|---|---|
//! | `barrier(op)` | `Barrier{op}`: hold ranks that reach a safepoint; once every node answered `Opened{op}`, `Wake{op}` (SIGUSR1 wakes them) | `Held{op}` per node → `Synchronized`; `SyncFailed` |
//! | `capture(op, rank, v)` | `Release{Checkpoint{version}}` once per op: every rank takes the native checkpoint | `Captured{rank, version}` → `CaptureDone`; `Safe`/`NotSafe` → `LevelSafe`/`LevelLost` |
//! | `release` | `Release{Continue}` if the ranks are still held | |
//! | `record` | appended to `decisions.log` in the job directory | |
//! | `fetch` | nothing: the restarting node reads the chain from the store | |
//! | `restart(d)` / `rollback(op, r, v)` | collected, then one `Restart{wiring, bootstrap, version, ranks}` per recovery (after `Release{Abort}`) | `Restarted{wiring, rank}` → `RestartDone`/`RollbackDone`; `RestartFailed` → `RestartFailed`/`RollbackFailed` |
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

/// Which HA policy drives a job's checkpoints (`[policy] kind`, `KRUN_POLICY_KIND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Global checkpoints: a barrier, every rank captured, committed when all are safe.
    Coordinated,
    /// Each rank on its own schedule; with logging only lost ranks restart, else the
    /// recovery line names who rolls back.
    Uncoordinated,
}

impl PolicyKind {
    pub fn parse(v: &str) -> Result<PolicyKind, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "coordinated" => Ok(PolicyKind::Coordinated),
            "uncoordinated" => Ok(PolicyKind::Uncoordinated),
            _ => Err(format!(
                "{v:?} is not a policy (coordinated or uncoordinated)"
            )),
        }
    }
}

/// The `[policy]` settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicySettings {
    pub kind: PolicyKind,
    /// Uncoordinated: sender-based pessimistic message logging.
    pub logging: bool,
}

impl Default for PolicySettings {
    fn default() -> PolicySettings {
        PolicySettings {
            kind: PolicyKind::Coordinated,
            logging: true,
        }
    }
}

impl PolicySettings {
    /// The description these settings name (`None`: the built-in default, coordinated).
    pub fn description(&self) -> Option<policies::description::Description> {
        use policies::description::{Description, Kind};
        match self.kind {
            PolicyKind::Coordinated => None,
            PolicyKind::Uncoordinated => {
                let mut d = Description::builtin(Kind::Uncoordinated);
                d.logging.messages = self.logging;
                d.source = "[policy] kind = \"uncoordinated\"".into();
                Some(d)
            }
        }
    }

    /// From `KRUN_POLICY_KIND` and `KRUN_POLICY_LOGGING` (what `[policy]` exports); a bad
    /// value names the variable.
    pub fn from_env() -> Result<PolicySettings, PolicyError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    pub fn from_lookup(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PolicySettings, PolicyError> {
        let mut s = PolicySettings::default();
        if let Some(v) = get("KRUN_POLICY_KIND") {
            s.kind = PolicyKind::parse(&v)
                .map_err(|e| PolicyError::Config(format!("KRUN_POLICY_KIND: {e}")))?;
        }
        if let Some(v) = get("KRUN_POLICY_LOGGING") {
            s.logging = crate::config::parse_bool(&v)
                .map_err(|e| PolicyError::Config(format!("KRUN_POLICY_LOGGING: {e}")))?;
        }
        Ok(s)
    }
}

/// What any policy of a job is built from.
#[derive(Clone, Debug)]
pub struct PolicyBasis {
    pub layout: Layout,
    pub view: AgreedView,
    /// Checkpoint interval (`None`: on request only).
    pub interval: Option<Duration>,
    /// The level a checkpoint must be safe at.
    pub level: Level,
    /// The node running the policy.
    pub leader: NodeId,
    pub now: Millis,
}

/// The coordinated policy's defaults for a job (what a description leaves out).
pub fn coordinated_defaults(basis: &PolicyBasis) -> Config {
    Config {
        interval: IntervalChoice::Fixed {
            // "On request only": an interval longer than any job.
            ms: basis
                .interval
                .map_or(u64::MAX / 4, |d| (d.as_millis() as u64).max(1)),
        },
        commit_level: basis.level,
        levels: Config::default()
            .levels
            .into_iter()
            .filter(|c| c.level <= basis.level)
            .collect(),
        no_spare: policies::coordinated::NoSpare::Fail,
        ..Config::default()
    }
}

/// Builds the policy `settings` name for a job, from its defaults (the policy itself is
/// built by `policies::plug::make_policy`, the one place policies are made).
pub fn make_policy(
    settings: &PolicySettings,
    basis: &PolicyBasis,
) -> Result<BoxedPolicy, PolicyError> {
    let desc = settings.description().unwrap_or_else(|| {
        policies::description::Description::builtin(policies::description::Kind::Coordinated)
    });
    policies::plug::make_policy(
        &desc,
        &policies::plug::Context {
            leader: basis.leader,
            layout: &basis.layout,
            view: &basis.view,
            now: basis.now,
            snapshot: None,
            defaults: &coordinated_defaults(basis),
        },
    )
}

/// How long every node has to answer `Opened` to a barrier before it fails.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);

use super::control::{LauncherToNode, NodeToLauncher};
use super::safepoint::SafepointOrder;
use crate::inject::{Phase, PhaseGate};

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

/// The policy's copies index: what the nodes reported safe, per level: the node holding
/// the copy when known (L1: the rank's node; the buddy of L2 is the store's business) and
/// the image's size.
#[derive(Default)]
struct Copies(BTreeMap<(Rank, Version), LevelCopies>);

/// Per level: the node holding the copy (if known) and the image's bytes.
type LevelCopies = BTreeMap<Level, (Option<NodeId>, u64)>;

impl Reads for Copies {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        self.0
            .get(&(rank, version))
            .map(|ls| {
                ls.iter()
                    .map(|(&level, &(node, bytes))| ImageCopy { level, node, bytes })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Copies {
    fn add(&mut self, rank: Rank, version: Version, level: Level, node: Option<NodeId>) {
        let levels = self.0.entry((rank, version)).or_default();
        let bytes = levels.values().map(|c| c.1).max().unwrap_or(0);
        levels.entry(level).or_insert((node, bytes));
    }

    fn set_bytes(&mut self, rank: Rank, version: Version, bytes: u64) {
        for c in self.0.entry((rank, version)).or_default().values_mut() {
            c.1 = bytes;
        }
    }
}

/// What a rank of a recovery plan becomes: the answer the policy waits for.
#[derive(Clone, Copy, Debug)]
enum Planned {
    Restart(policies::primitives::DecisionId),
    Rollback(OpId, Version),
}

/// A recovery being carried out: one wiring epoch.
struct Wiring {
    epoch: u64,
    bootstrap: String,
    /// The checkpointer's version restored (`None`: the program's start).
    native: Option<u64>,
    /// rank -> (node, what the policy waits for).
    ranks: BTreeMap<Rank, (NodeId, Planned)>,
}

/// Opens the ranks' next address all-gather (a bootstrap service for the job's size);
/// returns where the ranks reach it.
pub type NewWiring = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Why the job cannot continue, once the policy says so (krun then ends it).
pub type JobError = Arc<std::sync::Mutex<Option<String>>>;

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
    /// The nodes that answered `Opened` for the barrier in progress, whether `Wake` went out
    /// (once all of them opened), and when the barrier started.
    opened: (BTreeSet<NodeId>, bool, Instant),
    /// The op whose capture was ordered, with the checkpointer's version and when.
    capturing: Option<(OpId, Version, u64, Instant)>,
    /// The checkpointer's newest version seen.
    native_newest: u64,
    /// native version -> policy version.
    versions: BTreeMap<u64, Version>,
    /// The job cannot go on (the policy ended it), or a node with ranks failed in a job
    /// that does not recover: no more checkpoints.
    stopped: bool,
    /// Recoveries are driven (the job has spares or checkpoints on an interval); else a
    /// lost node only stops the checkpoints and the job goes on with what is left.
    recover: bool,
    /// rank -> node it runs on now.
    placement: Vec<NodeId>,
    /// Restarts and rollbacks the policy asked for in the current `handle` call.
    plan: Vec<(Rank, NodeId, Planned, Option<Version>)>,
    /// The recovery in progress.
    wiring: Option<Wiring>,
    wirings: u64,
    new_wiring: NewWiring,
    job_error: JobError,
    /// Checkpoints committed so far.
    commits: Arc<AtomicU64>,
    /// Where `--inject-failure node=N@ckptK:capture` and the like stop the policy.
    phases: PhaseGate,
    /// Who waits for the drain in progress (`runtime/drain.rs`).
    drain: super::drain::DrainWaiter,
    /// The recovery in progress, shown to the user: ranks restored of those planned.
    recovery_bar: Option<crate::progress::Progress>,
    /// Every decision recorded, in order (a swapped-in policy resumes from them).
    decisions: Vec<Decision>,
    /// The newest agreed view.
    view: AgreedView,
    /// The spares the job started with.
    spares: Vec<NodeId>,
    /// A swap is settling: the new policy's "runs the policy from epoch" line is not shown.
    quiet_takeover: bool,
}

impl PolicyRuntime for HubCalls {
    fn record(&mut self, decision: &Decision) -> Result<(), String> {
        self.decisions.push(decision.clone());
        if matches!(
            decision.kind,
            policies::primitives::DecisionKind::Committed { .. }
        ) {
            self.commits.fetch_add(1, Ordering::SeqCst);
        }
        if let policies::primitives::DecisionKind::Restart {
            rank,
            incarnation,
            node,
            version,
            failure_epoch,
            ..
        } = decision.kind
        {
            // Into the rank's process-table row too, by the node that carries it out.
            let id = decision.id;
            let line = version.map_or("the program's start".to_string(), |v| {
                format!("checkpoint {v}")
            });
            (self.send)(&LauncherToNode::Decided {
                rank,
                node,
                decision: format!(
                    "decision {}/{}/{}: restart on node {node} from {line} as incarnation \
                     {incarnation} (failure agreed at epoch {failure_epoch})",
                    id.epoch, id.leader, id.seq
                ),
            });
        }
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
        self.phases.reached(Phase::CheckpointBarrier);
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
        self.opened = (BTreeSet::new(), false, Instant::now());
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
        self.phases.reached(Phase::CheckpointCapture);
        (self.send)(&LauncherToNode::Release {
            order: SafepointOrder::Checkpoint { version: native },
        });
        Ok(())
    }

    /// Staging happens on the node that restarts the rank (it reads the chain from the
    /// store as part of the restart: `runtime/recovery.rs`).
    fn fetch(
        &mut self,
        rank: Rank,
        version: Version,
        _source: ImageCopy,
        _to: Option<NodeId>,
    ) -> Result<(), String> {
        self.native_of(version)
            .map(drop)
            .ok_or_else(|| format!("rank {rank}: checkpoint {version} was never taken here"))
    }

    fn restart(&mut self, decision: &Decision) -> Result<(), String> {
        let policies::primitives::DecisionKind::Restart {
            rank,
            node,
            version,
            ..
        } = decision.kind
        else {
            return Err("not a restart decision".into());
        };
        self.plan
            .push((rank, node, Planned::Restart(decision.id), version));
        Ok(())
    }

    fn rollback(&mut self, op: OpId, rank: Rank, version: Version) -> Result<(), String> {
        let node = *self
            .placement
            .get(rank as usize)
            .ok_or_else(|| format!("rank {rank} is not a rank of this job"))?;
        self.plan
            .push((rank, node, Planned::Rollback(op, version), Some(version)));
        (self.send)(&LauncherToNode::Decided {
            rank,
            node,
            decision: format!(
                "decision op {}/{}: roll back in place to checkpoint {version}",
                op.leader, op.seq
            ),
        });
        Ok(())
    }

    fn notify(&mut self, notice: &Notice) {
        if self.quiet_takeover && matches!(notice.kind, NoticeKind::Takeover { .. }) {
            return;
        }
        crate::progress::line(&format!("krun: {notice}"));
        match &notice.kind {
            NoticeKind::RecoveryPlanned {
                restarts,
                rollbacks,
                ..
            } => {
                let n = restarts.iter().map(|g| g.ranks.len()).sum::<usize>() + rollbacks.len();
                self.recovery_bar = Some(crate::progress::Progress::bar(
                    crate::progress::Mode::for_stderr(),
                    n as u64,
                    "recovery: ranks restored",
                ));
            }
            NoticeKind::Recovered { .. } | NoticeKind::JobEnded { .. } => {
                if let Some(bar) = self.recovery_bar.take() {
                    bar.finish(None);
                }
            }
            _ => {}
        }
        self.drain.notice(notice);
    }

    fn end_job(&mut self, error: Option<&PolicyError>) {
        self.drain.job_over();
        if let Some(e) = error {
            eprintln!("krun: the checkpoint policy ended the job: {e}");
            self.stopped = true;
            *self.job_error.lock().expect("job error lock") = Some(e.to_string());
        }
    }
}

impl HubCalls {
    /// The checkpointer's version of the policy's `version`.
    fn native_of(&self, version: Version) -> Option<u64> {
        self.versions
            .iter()
            .find(|(_, &v)| v == version)
            .map(|(&n, _)| n)
    }

    /// Carries out the restarts and rollbacks the policy asked for: a new wiring epoch when
    /// every rank restarts (a new failure), else the ranks retried join the current one.
    /// Returns the policy's answers to calls that could not even be sent.
    fn execute_plan(&mut self) -> Vec<Event> {
        let plan = std::mem::take(&mut self.plan);
        if plan.is_empty() {
            return Vec::new();
        }
        let version = plan.iter().find_map(|p| p.3);
        let native = version.and_then(|v| self.native_of(v));
        let fail_all = |why: String| -> Vec<Event> {
            plan.iter()
                .map(|&(rank, _, planned, _)| match planned {
                    Planned::Restart(decision) => Event::RestartFailed {
                        decision,
                        rank,
                        reason: why.clone(),
                    },
                    Planned::Rollback(op, _) => Event::RollbackFailed {
                        op,
                        rank,
                        reason: why.clone(),
                    },
                })
                .collect()
        };
        if version.is_some() && native.is_none() {
            return fail_all("the recovery line was never taken by the checkpointer".into());
        }
        let everyone = plan.len() == self.placement.len();
        let new_epoch = everyone || self.wiring.is_none();
        if new_epoch {
            let bootstrap = match (self.new_wiring)() {
                Ok(b) => b,
                Err(e) => return fail_all(format!("no address all-gather for the ranks: {e}")),
            };
            self.wirings += 1;
            self.wiring = Some(Wiring {
                epoch: self.wirings,
                bootstrap,
                native,
                ranks: BTreeMap::new(),
            });
        }
        let w = self.wiring.as_mut().expect("wiring set above");
        w.native = native;
        for &(rank, node, planned, _) in &plan {
            w.ranks.insert(rank, (node, planned));
            if let Some(slot) = self.placement.get_mut(rank as usize) {
                *slot = node;
            }
        }
        self.nodes = self.placement.iter().copied().collect();
        // Checkpoints newer than the line were never committed: the checkpointer numbers
        // on from the line.
        if let Some(n) = native {
            self.native_newest = n;
            self.versions.retain(|&k, _| k <= n);
        } else {
            self.native_newest = 0;
            self.versions.clear();
        }
        self.barrier = None;
        self.capturing = None;
        let moved: Vec<Rank> = plan
            .iter()
            .filter(|p| matches!(p.2, Planned::Restart(_)))
            .map(|p| p.0)
            .collect();
        let in_place: Vec<Rank> = plan
            .iter()
            .filter(|p| matches!(p.2, Planned::Rollback(..)))
            .map(|p| p.0)
            .collect();
        let line = match native {
            Some(n) => format!("checkpoint {} (checkpointer v{n})", version.unwrap_or(0)),
            None => "the program's start".into(),
        };
        let mut parts = Vec::new();
        if !moved.is_empty() {
            parts.push(format!(
                "{} start as new processes from {line}",
                policies::primitives::ranks_phrase(&moved)
            ));
        }
        if !in_place.is_empty() {
            parts.push(format!(
                "{} roll back inside their live processes (each re-executes in place, same \
                 pid, from its own images of {line})",
                policies::primitives::ranks_phrase(&in_place)
            ));
        }
        eprintln!(
            "krun: wiring epoch {}: {}; every rank swaps its new address through {}",
            w.epoch,
            parts.join("; "),
            w.bootstrap
        );
        // Ranks held in an open barrier are not coming back: the nodes' gates start afresh.
        (self.send)(&LauncherToNode::Release {
            order: SafepointOrder::Abort("a recovery restarts the ranks".into()),
        });
        let order = LauncherToNode::Restart {
            wiring: w.epoch,
            bootstrap: w.bootstrap.clone(),
            version: native,
            ranks: plan.iter().map(|p| (p.0, p.1)).collect(),
        };
        let sent = (self.send)(&order);
        if new_epoch {
            self.phases.reached(Phase::Recovery);
        }
        let missing: BTreeSet<NodeId> = plan
            .iter()
            .map(|p| p.1)
            .filter(|n| !sent.contains(n))
            .collect();
        if missing.is_empty() {
            return Vec::new();
        }
        plan.iter()
            .filter(|p| missing.contains(&p.1))
            .map(|&(rank, node, planned, _)| {
                let reason = format!("node {node} is not linked to krun");
                match planned {
                    Planned::Restart(decision) => Event::RestartFailed {
                        decision,
                        rank,
                        reason,
                    },
                    Planned::Rollback(op, _) => Event::RollbackFailed { op, rank, reason },
                }
            })
            .collect()
    }
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
        if policy
            .as_ref()
            .is_some_and(|d| d.kind == policies::description::Kind::Uncoordinated)
        {
            // Refused rather than run without checkpoints: the hub cannot carry out its calls.
            return Err(PolicyError::Config(
                "the uncoordinated policy (policies::uncoordinated) and the rank library's \
                 message logging (rank/src/logging.rs) exist, but krund does not carry out \
                 per-rank captures, log trims or replays yet; use the coordinated policy"
                    .into(),
            ));
        }
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
            capturing: None,
            native_newest: 0,
            versions: BTreeMap::new(),
            stopped: false,
            recover,
            placement: ranks,
            plan: Vec::new(),
            wiring: None,
            wirings: 0,
            new_wiring,
            job_error,
            phases,
            drain: Default::default(),
            recovery_bar: None,
            decisions: Vec::new(),
            view,
            spares,
            quiet_takeover: false,
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
                plug.request(&mut engine, now(), &copies, request, reply);
                None
            }
            other => other,
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
                    Some((
                        *op,
                        format!("nodes {missing:?} did not open the barrier in {OPEN_TIMEOUT:?}"),
                    ))
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
        plug.poll(&mut engine, now(), &copies);
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

/// A node's message or a request as the policy's event.
fn translate(calls: &mut HubCalls, copies: &mut Copies, input: Input) -> Option<Event> {
    match input {
        Input::Request(source) => Some(Event::CheckpointRequest { source }),
        // Handled by the swap logic before translation.
        Input::Policy { .. } => None,
        Input::Drain {
            node,
            epoch,
            members,
            reply,
        } => calls
            .drain
            .request(node, reply, calls.stopped)
            .then(|| Event::DrainRequested {
                node,
                view: AgreedView::new(epoch, members),
            }),
        Input::View {
            epoch,
            members,
            failed,
        } => {
            if epoch >= calls.view.epoch {
                calls.view = AgreedView::new(epoch, members.clone());
            }
            let lost: Vec<NodeId> = failed
                .iter()
                .copied()
                .filter(|n| calls.nodes.contains(n))
                .collect();
            if !lost.is_empty() && (calls.barrier.take().is_some() || calls.capturing.is_some()) {
                (calls.send)(&LauncherToNode::Release {
                    order: SafepointOrder::Abort(format!("node(s) {lost:?} failed")),
                });
            }
            if !calls.recover {
                if !lost.is_empty() && !calls.stopped {
                    calls.stopped = true;
                    eprintln!(
                        "krun: no more checkpoints: node(s) {lost:?} ran ranks, and the job \
                         recovers none (no --spares, no --checkpoint-interval)"
                    );
                }
                return None;
            }
            // The policy decides: roll the survivors back, restart the lost ranks on a spare
            // (carried out by `HubCalls::execute_plan`), or end the job naming what is lost.
            Some(Event::FailureAgreed {
                epoch,
                failed,
                view: AgreedView::new(epoch, members),
            })
        }
        Input::FromNode(node, msg) => match msg {
            NodeToLauncher::Opened { op } => {
                let (want, _) = calls.barrier.as_ref()?;
                if want.seq != op {
                    return None;
                }
                calls.opened.0.insert(node);
                if !calls.opened.1 && calls.opened.0.is_superset(&calls.nodes) {
                    // Every node holds ranks that ask now: wake them.
                    calls.opened.1 = true;
                    (calls.send)(&LauncherToNode::Wake { op });
                }
                None
            }
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
            NodeToLauncher::Restarted {
                wiring,
                rank,
                pid,
                fetched,
                seconds,
                in_place,
            } => {
                let w = calls.wiring.as_ref().filter(|w| w.epoch == wiring)?;
                let (node, planned) = *w.ranks.get(&rank)?;
                if let Some(bar) = &calls.recovery_bar {
                    bar.inc(1);
                }
                if matches!(planned, Planned::Rollback(..)) && !in_place {
                    crate::progress::line(&format!(
                        "krun: rank {rank} could not roll back inside its process (gone or \
                         not watching): restarted on node {node} as a new process (pid {pid})"
                    ));
                }
                if fetched > 0 {
                    crate::progress::line(&format!(
                        "krun: rank {rank} runs on node {node} (pid {pid}); its image chain \
                         ({fetched} bytes) came from the checkpoint store in {seconds:.2} s"
                    ));
                }
                Some(match planned {
                    Planned::Restart(decision) => Event::RestartDone {
                        decision,
                        rank,
                        node,
                        seconds,
                    },
                    Planned::Rollback(op, version) => Event::RollbackDone {
                        op,
                        rank,
                        version,
                        seconds,
                    },
                })
            }
            NodeToLauncher::RestartFailed {
                wiring,
                rank,
                reason,
            } => {
                let w = calls.wiring.as_ref().filter(|w| w.epoch == wiring)?;
                let (_, planned) = *w.ranks.get(&rank)?;
                Some(match planned {
                    Planned::Restart(decision) => Event::RestartFailed {
                        decision,
                        rank,
                        reason,
                    },
                    Planned::Rollback(op, _) => Event::RollbackFailed { op, rank, reason },
                })
            }
            NodeToLauncher::Captured {
                rank,
                version,
                bytes,
            } => {
                calls.native_newest = calls.native_newest.max(version);
                let pv = *calls.versions.get(&version)?;
                copies.add(rank, pv, Level::L1, Some(node));
                copies.set_bytes(rank, pv, bytes);
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
                copies.add(rank, pv, level, None);
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
            | NodeToLauncher::RankKilled { .. }
            | NodeToLauncher::CheckpointAsked
            | NodeToLauncher::Finished { .. }
            | NodeToLauncher::Pmi(_) => None,
        },
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
            capturing: None,
            native_newest: 0,
            versions: BTreeMap::new(),
            stopped: false,
            recover: false,
            placement: vec![0, 1, 2],
            plan: Vec::new(),
            wiring: None,
            wirings: 0,
            new_wiring: Arc::new(|| Err("no wiring in this test".into())),
            job_error: Arc::new(Mutex::new(None)),
            phases: PhaseGate::default(),
            drain: Default::default(),
            recovery_bar: None,
            decisions: Vec::new(),
            view: AgreedView::new(0, vec![0, 1, 2]),
            spares: Vec::new(),
            quiet_takeover: false,
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
        let p = make_policy(&s, &basis).unwrap();
        assert_eq!(p.name(), "uncoordinated");
        // Each rank on its own schedule: the first checkpoint is due within the interval.
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
}
