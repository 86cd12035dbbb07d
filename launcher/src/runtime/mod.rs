//! The node runtime hosted by every krund node process.
//!
//! - [`membership`]: an adaptation node in-process ([`adaptation::daemon::Driver`]), the
//!   job's one source of truth for membership; agreed views go to `krun`.
//! - [`table`]: the process table, an adaptation service (rank -> node, pid, state,
//!   incarnation, newest checkpoint and the levels it is safe at).
//! - [`control`]: the node's control sockets (Unix for this host, TCP for `krun` on
//!   another) and the rank socket (`KRUN_NODE_SOCKET`).
//! - [`status`]: what `krun status` shows; [`jobdir`]: where a running job is found.
//! - `sockets.rs`: what the node answers on its control and rank sockets; `krun_link.rs`:
//!   the node's link to krun and the policy's barrier on this node.
//!
//! # The checkpoint agent
//! The store's agent ([`agent::Agent`], `runtime/agent.rs`) plugs in as the runtime's
//! [`CheckpointAgent`] through [`store_link::StoreAgent`], handed to [`Bound::start`] in
//! [`RuntimeConfig::agent`]. When a rank reports `Checkpointed{rank, version, image, bytes}`
//! on its node socket, the runtime calls [`CheckpointAgent::checkpointed`] (the image goes
//! into the node's store; L1 when it returns) and records the version in the process table;
//! the agent's later reports (L2 and slower) reach the table through
//! [`Runtime::follow_agent`]; `krun status` fills its store slots from
//! [`CheckpointAgent::store_use`]. krund starts a store node beside its ranks
//! ([`store_node`]) and hands its agent over with [`Runtime::set_agent`] once the store is
//! up (after [`Runtime::expect_agent`]: a checkpoint reported before then waits for it); a
//! runtime without an agent records a reported checkpoint as known but safe nowhere.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use adaptation::daemon::{DaemonConfig, Driver};
use adaptation::NodeId;
use fabric::secret::ClusterSecret;
use fabric::wire::Protocol;

use crate::error::{LauncherError, Result};
use crate::ranks::RankEvent;

pub mod agent;
pub mod checkpoints;
pub mod control;
pub mod drain;
pub mod hub;
pub mod jobdir;
mod krun_link;
pub mod membership;
pub mod migrate;
pub mod mpi;
pub mod mpi_recovery;
pub mod pmi;
pub mod pmix;
pub mod recovery;
pub mod safepoint;
mod sockets;
pub mod status;
pub mod store_link;
pub mod store_node;
pub mod table;
pub mod uncoordinated;

use control::{ControlRequest, FetchInfo, NodeAddresses, NodeToLauncher, RankToNode};
use membership::{Shared, TableClient};
use status::{LevelUse, SafeCheckpoint};
use table::{RankState, TableOp};

/// Process-table client ids of a node's writers that may touch the same row at once:
/// control requests, rank-socket requests, the store agent's reports, rank starts and exits, and
/// the marking of a failed node's ranks.
const TABLE_CLIENT_REQUESTS: u32 = 1;
const TABLE_CLIENT_AGENT: u32 = 2;
const TABLE_CLIENT_RANK_EVENTS: u32 = 3;
pub(crate) const TABLE_CLIENT_LOST: u32 = 4;
const TABLE_CLIENT_RANKS: u32 = 5;
// 6: a rollback's new incarnation (`recovery.rs`).
const TABLE_CLIENT_DECISIONS: u32 = 7;

/// Moves a rank's checkpoint images into the store (implemented by the store's agent).
pub trait CheckpointAgent: Send + Sync {
    /// `rank` wrote checkpoint `version` to `image` (`bytes` long): put it in the store.
    /// Returns the levels (1-4) the version is safe at now.
    fn checkpointed(&self, rank: u32, version: u64, image: &Path, bytes: u64) -> Result<Vec<u8>>;
    /// As [`CheckpointAgent::checkpointed`], for a rank whose image runs in wiring epoch
    /// `wiring` (the agent's later reports of this version carry it).
    fn checkpointed_in(
        &self,
        rank: u32,
        version: u64,
        image: &Path,
        bytes: u64,
        _wiring: u64,
    ) -> Result<Vec<u8>> {
        self.checkpointed(rank, version, image, bytes)
    }
    /// Store use per level and the newest version safe per level, for `krun status`.
    fn store_use(&self) -> (Vec<LevelUse>, Vec<SafeCheckpoint>) {
        (Vec::new(), Vec::new())
    }
    /// The agreed view lost `node`: reads skip it and its buddy duty moves on.
    fn node_down(&self, _node: NodeId) -> Result<()> {
        Ok(())
    }
    /// A recovery placed the ranks anew (`ranks`: rank -> node, every rank of the job) in
    /// the view of `members`: buddies and parity sets are re-formed among them.
    fn reform(&self, _members: &[NodeId], _ranks: &[(u32, NodeId)]) -> Result<()> {
        Ok(())
    }
    /// Writes `version` of `rank` and the older images it builds on, read from the store, as
    /// ghost checkpoint files of `owner` under `dir` (a restart from them follows); returns
    /// the bytes written.
    fn write_chain(&self, rank: u32, version: u64, _dir: &Path, _owner: &str) -> Result<u64> {
        Err(LauncherError::Checkpoint {
            rank,
            version,
            what: "this node has no checkpoint store".into(),
        })
    }
    /// No recovery line needs `rank`'s versions older than `version` (the policy's
    /// `KeepFrom`): under retention by line the store may drop them (see
    /// `ckpt_store::Store::keep_from`). Returns the floor set, if any.
    fn keep_from(&self, _rank: u32, _version: u64) -> Option<u64> {
        None
    }
    /// Reads `version` of `rank` back from the store (the fastest valid copy).
    fn fetch(&self, rank: u32, version: u64) -> Result<FetchInfo> {
        Err(LauncherError::Checkpoint {
            rank,
            version,
            what: "this node has no checkpoint store".into(),
        })
    }
    /// The bytes of `version` of `rank` (the fastest valid copy), for a node without a store
    /// of its own ([`ControlRequest::ReadImage`]).
    fn read_image(&self, rank: u32, version: u64) -> Result<Vec<u8>> {
        Err(LauncherError::Checkpoint {
            rank,
            version,
            what: "this node has no checkpoint store".into(),
        })
    }
}

/// The node's checkpoint agent: given at start, or set later (krund starts its store beside
/// its ranks).
#[derive(Default)]
pub struct AgentSlot {
    agent: Mutex<Option<Arc<dyn CheckpointAgent>>>,
    changed: Condvar,
    /// An agent is on its way: a checkpoint reported before it waits for it.
    expected: AtomicBool,
    /// Called when something starts waiting for the expected agent (krund starts its store
    /// then, if it has not yet).
    wanted: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// The newest re-form krun ordered (members, rank -> node), applied to an agent that
    /// comes later.
    reform: Mutex<Option<Reformed>>,
}

/// A recovery's placement: the view's members and every rank's node.
type Reformed = (Vec<NodeId>, Vec<(u32, NodeId)>);

impl AgentSlot {
    pub fn get(&self) -> Option<Arc<dyn CheckpointAgent>> {
        self.agent.lock().expect("agent lock").clone()
    }

    /// The agent, waiting (at most `timeout`) for one that is expected.
    pub fn wait(&self, timeout: Duration) -> Option<Arc<dyn CheckpointAgent>> {
        let deadline = Instant::now() + timeout;
        if self.expected.load(Ordering::SeqCst) && self.get().is_none() {
            if let Some(hook) = &*self.wanted.lock().expect("agent hook lock") {
                hook();
            }
        }
        let mut g = self.agent.lock().expect("agent lock");
        while g.is_none() && self.expected.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self.changed.wait_timeout(g, left).expect("agent lock").0;
        }
        g.clone()
    }

    fn set(&self, agent: Option<Arc<dyn CheckpointAgent>>) {
        let mut g = self.agent.lock().expect("agent lock");
        *g = agent.clone();
        self.expected.store(false, Ordering::SeqCst);
        self.changed.notify_all();
        drop(g);
        let pending = self.reform.lock().expect("reform lock").clone();
        if let (Some(a), Some((members, ranks))) = (agent, pending) {
            if let Err(e) = a.reform(&members, &ranks) {
                eprintln!("krund: {e}");
            }
        }
    }

    /// krun's `Reform` after a recovery: the agent re-forms its store's placement now, or
    /// when it comes.
    pub fn reform(&self, members: Vec<NodeId>, ranks: Vec<(u32, NodeId)>) {
        *self.reform.lock().expect("reform lock") = Some((members.clone(), ranks.clone()));
        if let Some(a) = self.get() {
            if let Err(e) = a.reform(&members, &ranks) {
                eprintln!("krund: {e}");
            }
        }
    }
}

/// How a node's runtime starts.
pub struct RuntimeConfig {
    pub node: NodeId,
    /// Where this node listens (adaptation links and the TCP control socket).
    pub bind: IpAddr,
    /// `krun`'s runtime listener, to register with and report views to.
    pub launcher: Option<SocketAddr>,
    /// Ranks of the job.
    pub job_ranks: u64,
    pub secret: ClusterSecret,
    pub agent: Option<Arc<dyn CheckpointAgent>>,
    /// Log the membership's steps to stderr (`KRUN_RUNTIME_VERBOSE`).
    pub verbose: bool,
    /// How long a node may stay silent before it is declared failed
    /// (`[runtime] failure_timeout_ms`, [`DEFAULT_FAILURE_TIMEOUT`]).
    pub failure_timeout: Duration,
    /// The ranks this node is about to start (its share of the placement): a policy
    /// barrier that arrives before they started waits for them (see [`Shared::starting`]).
    pub starting: Vec<u64>,
}

/// The membership's supervisors (its Raft group, which agrees on every change) among a
/// job's initial nodes `genesis` (sorted), the last `spares` of them spares (`KRUN_SPARES`,
/// set by krun): the first three nodes, as the adaptation layer's default, plus up to two
/// spares. With spares the job is meant to survive failures in a row: five supervisors
/// leave a quorum after two (with three, losing nodes 1 and 2 left node 0 alone and the
/// second failure was never agreed). The group then heals: its leader removes a failed
/// supervisor and adds a live member, keeping an odd group (`adaptation`'s
/// `protocol/supervisors.rs`), so that 4 nodes and 2 spares survive losing a second pair.
/// Spares hold no ranks at first, and the first nodes stay the ones a drain refuses.
pub fn supervisors(genesis: &[NodeId], spares: usize) -> Vec<NodeId> {
    let mut out: Vec<NodeId> = genesis.iter().copied().take(3).collect();
    let first_spare = genesis.len().saturating_sub(spares).max(out.len());
    out.extend(genesis[first_spare..].iter().copied().take(2));
    out
}

/// A node is declared failed after this long without answering. Long enough that a node
/// whose cores are all busy (ranks starting and loading libfabric, checkpoints being
/// written, a loaded CI machine) is not mistaken for a dead one: a false failure costs the
/// job a rollback; a late detection costs a few seconds of a recovery.
pub const DEFAULT_FAILURE_TIMEOUT: Duration = Duration::from_secs(3);

/// A node runtime whose adaptation listener is bound (its address goes to the other nodes
/// before the node starts).
pub struct Bound {
    cfg: RuntimeConfig,
    listener: TcpListener,
    addr: String,
}

/// The runtime of one node: its adaptation node, process table, sockets and link to krun.
pub struct Runtime {
    pub node: NodeId,
    shared: Arc<Shared>,
    table: TableClient,
    dir: PathBuf,
    rank_socket: PathBuf,
    addresses: NodeAddresses,
    events: Sender<RankEvent>,
    agent: Arc<AgentSlot>,
    safepoints: Arc<safepoint::SafepointGate>,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> LauncherError {
    move |e| LauncherError::Io { context, source: e }
}

impl Runtime {
    /// Binds the node's adaptation listener.
    pub fn bind(cfg: RuntimeConfig) -> Result<Bound> {
        let listener =
            TcpListener::bind((cfg.bind, 0)).map_err(io(format!("listening on {}", cfg.bind)))?;
        let addr = listener
            .local_addr()
            .map_err(io("reading the adaptation address".into()))?
            .to_string();
        Ok(Bound {
            cfg,
            listener,
            addr,
        })
    }

    /// Where this node's ranks reach it (`KRUN_NODE_SOCKET`).
    pub fn rank_socket(&self) -> &Path {
        &self.rank_socket
    }

    pub fn addresses(&self) -> &NodeAddresses {
        &self.addresses
    }

    /// Where the node's rank runner reports starts and exits (they update the table).
    pub fn rank_events(&self) -> Sender<RankEvent> {
        self.events.clone()
    }

    /// Plugs in the node's MPI servers (`runtime/pmi.rs`, `runtime/pmix.rs`): krun's
    /// fence answers go to them.
    pub fn set_pmi(&self, servers: Vec<Arc<dyn mpi::RankWatch>>) {
        *self.shared.pmi.lock().expect("pmi lock") = servers;
    }

    /// Sends the node's PMI reports to krun.
    pub fn pmi_teller(&self) -> pmi::Teller {
        let shared = self.shared.clone();
        // Tagged with the node's MPI incarnation: krun drops an older one's reports.
        Arc::new(move |m| {
            let wiring = shared.mpi_wiring.load(Ordering::SeqCst);
            shared.tell_launcher(&NodeToLauncher::Pmi(pmi::PmiToLauncher::Wired {
                wiring,
                msg: Box::new(m),
            }))
        })
    }

    /// Waits (at most `timeout`) until krun was told of every rank killed here
    /// ([`crate::ranks::killed_ranks_reported`]), so that a node leaving after one does not
    /// take the news with it.
    pub fn flush_killed_reports(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.shared.killed_told.load(Ordering::SeqCst) < crate::ranks::killed_ranks_reported()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The node's work is over: tell krun (its departure is not a failure).
    pub fn finish(&self) {
        self.shared.finish();
    }

    /// The node's ranks ended with `code` (the highest): tell krun, then [`Self::finish`].
    pub fn finish_with(&self, code: i32) {
        self.shared
            .tell_launcher(&NodeToLauncher::Finished { code });
        self.finish();
    }

    /// True when a node left or failed, or this one was drained: a job-wide barrier of the
    /// initial nodes cannot complete any more.
    pub fn membership_shrank(&self) -> bool {
        self.was_drained()
            || self.shared.latest_view().is_some_and(|v| {
                v.changes.iter().any(|c| {
                    matches!(
                        c,
                        adaptation::Change::Fail { .. } | adaptation::Change::Leave { .. }
                    )
                })
            })
    }

    /// This node's ranks were moved away (`krun node drain`).
    pub fn was_drained(&self) -> bool {
        self.shared.drained.load(Ordering::SeqCst)
    }

    /// Connects the node's rank runner: ranks can now be moved in and out.
    pub fn set_rank_commands(&self, tx: Sender<crate::ranks::RankCommand>) {
        *self.shared.rank_commands.lock().expect("commands lock") = Some(tx);
    }

    /// An agent will come ([`Runtime::set_agent`]): checkpoints reported until then wait.
    pub fn expect_agent(&self) {
        self.agent.expected.store(true, Ordering::SeqCst);
    }

    /// Plugs in the node's checkpoint agent (None: none will come); from now on every agreed
    /// failure is passed to it ([`CheckpointAgent::node_down`]).
    pub fn set_agent(&self, agent: Option<Arc<dyn CheckpointAgent>>) {
        if let Some(a) = &agent {
            let a = a.clone();
            let me = self.node;
            let tell = move |view: &adaptation::daemon::ViewSnapshot| {
                for c in membership::changes(view) {
                    // A drained node that left takes its store node with it, as a failure.
                    if c.kind == "fail" || c.kind == "leave" {
                        if let Err(e) = a.node_down(c.node) {
                            eprintln!("krund: node {me}: store: node {} down: {e}", c.node);
                        }
                    }
                }
            };
            // Failures agreed before the agent came.
            if let Some(v) = self.shared.latest_view() {
                tell(&v);
            }
            self.shared
                .view_hooks
                .lock()
                .expect("hooks lock")
                .push(Box::new(tell));
        }
        self.agent.set(agent);
    }

    /// Where ranks at an agreed safepoint are held until the node's policy decides.
    pub fn safepoints(&self) -> &Arc<safepoint::SafepointGate> {
        &self.safepoints
    }

    /// `hook` runs whenever something starts waiting for the agent [`Self::expect_agent`]
    /// announced (a checkpoint, a restart's fetch) while it is not there yet.
    pub fn on_agent_wanted(&self, hook: impl Fn() + Send + Sync + 'static) {
        *self.agent.wanted.lock().expect("agent hook lock") = Some(Box::new(hook));
    }

    /// The node's checkpoint agent, if it has one.
    pub fn agent(&self) -> Option<Arc<dyn CheckpointAgent>> {
        self.agent.get()
    }

    /// The cells of the view the node is in (waiting at most `timeout` for a view that has
    /// cells).
    pub fn cells(&self, timeout: Duration) -> Result<Vec<Vec<NodeId>>> {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.table.handle.view().map_err(membership::adapt_err)?;
            if !view.cells.is_empty() || Instant::now() >= deadline {
                return Ok(view.cells);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Applies the store agent's reports to the process table (a version safe at a slower
    /// level; a failed level is logged), until the agent ends.
    pub fn follow_agent(&self, events: mpsc::Receiver<agent::AgentEvent>) {
        let table = self.table.as_client(TABLE_CLIENT_AGENT);
        let me = self.node;
        std::thread::spawn(move || {
            for e in events {
                match e {
                    agent::AgentEvent::Safe {
                        rank,
                        version,
                        level,
                        holder,
                        wiring,
                        ..
                    } => {
                        if level > ckpt_store::Level::L1 {
                            table.shared.tell_launcher(&NodeToLauncher::Safe {
                                rank,
                                version,
                                level: store_link::level_number(level),
                                node: holder.and_then(|n| NodeId::try_from(n).ok()),
                                wiring,
                            });
                        }
                        let op = TableOp::Checkpointed {
                            version,
                            levels: vec![store_link::level_number(level)],
                        };
                        if let Err(e) = table.request(u64::from(rank), &op, Duration::from_secs(30))
                        {
                            eprintln!("krund: node {me}: process table: {e}");
                        }
                    }
                    agent::AgentEvent::Failed {
                        rank,
                        version,
                        level,
                        error,
                        wiring,
                    } => {
                        eprintln!(
                            "krund: node {me}: rank {rank} version {version} is not safe at L{}: {error}",
                            store_link::level_number(level)
                        );
                        table.shared.tell_launcher(&NodeToLauncher::NotSafe {
                            rank,
                            version,
                            level: store_link::level_number(level),
                            error,
                            wiring,
                        });
                    }
                }
            }
        });
    }

    /// Waits (at most `timeout`) until krun stops the node or the membership drops it.
    pub fn wait_stop_timeout(&self, timeout: Duration) -> Option<String> {
        self.shared.wait_stop_timeout(timeout)
    }

    /// Waits until krun stops the node or the membership drops it; returns why.
    pub fn wait_stop(&self) -> String {
        self.shared.wait_stop()
    }

    /// The process table's row for `rank`.
    pub fn row(&self, rank: u64) -> Result<table::TableAnswer> {
        self.table
            .request(rank, &TableOp::Get, Duration::from_secs(10))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bound {
    pub fn adaptation_addr(&self) -> &str {
        &self.addr
    }

    /// Starts the node: `peers` are the other initial members (or, with `join`, the nodes
    /// this one announces itself to).
    pub fn start(self, peers: BTreeMap<NodeId, String>, join: bool) -> Result<Runtime> {
        let Bound {
            cfg,
            listener,
            addr,
        } = self;
        let me = cfg.node;
        let pid = std::process::id();
        remove_stale_node_dirs();
        // One directory per runtime (a process may host several, as tests do).
        static RUNTIMES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNTIMES.fetch_add(1, Ordering::SeqCst);
        let dir = jobdir::base_dir().join(format!("node-{pid}-{n}"));
        jobdir::private_dir(&dir)?;
        let rank_socket = dir.join("ranks.sock");
        let control_socket = dir.join("control.sock");
        let supervisors = if join {
            // A joiner takes the default: it learns the group from the members.
            Vec::new()
        } else {
            let mut genesis: Vec<NodeId> = peers.keys().copied().chain([me]).collect();
            genesis.sort_unstable();
            genesis.dedup();
            let spares = std::env::var("KRUN_SPARES")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            supervisors(&genesis, spares)
        };
        let driver = Driver::start(
            DaemonConfig {
                id: me,
                listen: addr.clone(),
                peers,
                supervisors,
                join,
                tick: Duration::from_millis(10),
                seed: u64::from(me),
                failure_timeout: Some(cfg.failure_timeout),
            },
            listener,
            cfg.secret.clone(),
            vec![Box::new(table::ProcessTable::new())],
        )
        .map_err(membership::adapt_err)?;
        let shared = Shared::new(me, cfg.job_ranks);
        shared
            .starting
            .lock()
            .expect("starting lock")
            .extend(cfg.starting.iter().copied());
        let table = TableClient {
            handle: driver.handle(),
            shared: shared.clone(),
            client: TABLE_CLIENT_REQUESTS,
        };
        let control_tcp =
            TcpListener::bind((cfg.bind, 0)).map_err(io(format!("listening on {}", cfg.bind)))?;
        let addresses = NodeAddresses {
            node: me,
            pid,
            host: hostname(),
            control_tcp: control_tcp
                .local_addr()
                .map_err(io("reading the control address".into()))?
                .to_string(),
            control_unix: control_socket.to_string_lossy().into_owned(),
            adaptation: addr,
        };
        {
            let table = table.clone();
            let verbose = cfg.verbose;
            std::thread::spawn(move || membership::watch(driver, table, verbose));
        }
        let info = addresses.clone();
        let safepoints = Arc::new(safepoint::SafepointGate::default());
        if std::env::var_os("KRUN_RECOVERS").is_some() {
            // krun's checkpoint policy drives this node's safepoints (set by krun for jobs
            // with a checkpoint interval or spares).
            safepoints.mark_driven();
        }
        let agent = Arc::new(AgentSlot::default());
        agent.set(cfg.agent.clone());
        {
            let table = table.clone();
            let agent = agent.clone();
            control::serve(
                Some(control::bind_unix(&control_socket)?),
                Some(control_tcp),
                cfg.secret.clone(),
                Protocol::Runtime,
                "krund: control socket",
                move |req: ControlRequest| {
                    sockets::control_request(&table, &info, agent.get().as_deref(), req)
                },
            );
        }
        {
            let table = table.as_client(TABLE_CLIENT_RANKS);
            let agent = agent.clone();
            let safepoints = safepoints.clone();
            control::serve(
                Some(control::bind_unix(&rank_socket)?),
                None,
                cfg.secret.clone(),
                Protocol::Rank,
                "krund: rank socket",
                move |msg: RankToNode| sockets::rank_message(&table, &agent, &safepoints, msg),
            );
        }
        if let Some(addr) = cfg.launcher {
            krun_link::connect_launcher(
                addr,
                &cfg.secret,
                &addresses,
                shared.clone(),
                safepoints.clone(),
                agent.clone(),
                table.as_client(TABLE_CLIENT_DECISIONS),
            )?;
            // The view the node starts in (a joiner: the view it knows before it is in).
            if let Ok(view) = table.handle.view() {
                if !join {
                    shared.tell_launcher(&NodeToLauncher::View {
                        epoch: view.epoch,
                        members: view.members,
                        failures: Vec::new(),
                    });
                }
            }
        }
        let (events, rx) = mpsc::channel::<RankEvent>();
        {
            // The node's own view of its ranks (local_ranks) and krun's news of a killed rank
            // are updated at once; the process-table writes follow in order on their own
            // thread. (A table request can take seconds while the membership settles at
            // start: a rank started meanwhile was missing from local_ranks, so the first
            // barrier counted the node's ranks held without it, and it was told `Continue`
            // while its peers checkpointed.)
            let (writes, queued) = mpsc::channel::<(usize, TableOp)>();
            let writer = table.as_client(TABLE_CLIENT_RANK_EVENTS);
            std::thread::spawn(move || {
                for (rank, op) in queued {
                    if let Err(e) = writer.request(rank as u64, &op, Duration::from_secs(30)) {
                        eprintln!("krund: node {me}: process table: {e}");
                    }
                }
            });
            let shared = shared.clone();
            std::thread::spawn(move || {
                for e in rx {
                    let (rank, op) = match e {
                        RankEvent::Started { rank, pid } => {
                            let mut local = shared.local_ranks.lock().expect("ranks lock");
                            local.insert(rank as u64, pid);
                            shared
                                .starting
                                .lock()
                                .expect("starting lock")
                                .remove(&(rank as u64));
                            (rank, TableOp::Register { node: me, pid })
                        }
                        RankEvent::Exited { rank, code } => {
                            let mut local = shared.local_ranks.lock().expect("ranks lock");
                            local.remove(&(rank as u64));
                            shared
                                .starting
                                .lock()
                                .expect("starting lock")
                                .remove(&(rank as u64));
                            (rank, TableOp::SetState(RankState::Exited(code)))
                        }
                        RankEvent::Killed { rank, signal } => {
                            shared.tell_launcher(&NodeToLauncher::RankKilled {
                                rank: rank as u32,
                                signal,
                            });
                            shared.killed_told.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        RankEvent::CheckpointAsked => {
                            shared.tell_launcher(&NodeToLauncher::CheckpointAsked);
                            continue;
                        }
                    };
                    let _ = writes.send((rank, op));
                }
            });
        }
        Ok(Runtime {
            node: me,
            shared,
            table,
            dir,
            rank_socket,
            addresses,
            events,
            agent,
            safepoints,
        })
    }
}

/// Removes the directories of node runtimes whose process is gone (a SIGKILLed krund
/// cannot clean up after itself).
fn remove_stale_node_dirs() {
    let Ok(entries) = std::fs::read_dir(jobdir::base_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("node-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod supervisor_tests {
    use super::supervisors;

    #[test]
    fn jobs_with_spares_add_up_to_two_spares_to_the_first_three_supervisors() {
        assert_eq!(supervisors(&[0, 1, 2, 3], 0), [0, 1, 2]);
        assert_eq!(supervisors(&[0, 1, 2, 3], 1), [0, 1, 2, 3]);
        assert_eq!(supervisors(&[0, 1, 2, 3, 4], 2), [0, 1, 2, 3, 4]);
        assert_eq!(supervisors(&[0, 1, 2, 3, 4, 5, 6], 3), [0, 1, 2, 4, 5]);
        // Spares among the first three are not counted twice.
        assert_eq!(supervisors(&[0, 1], 1), [0, 1]);
        assert_eq!(supervisors(&[0, 1, 2], 2), [0, 1, 2]);
    }
}
