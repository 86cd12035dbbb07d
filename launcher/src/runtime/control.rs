//! The runtime's control messages and sockets.
//!
//! Every connection is a [`fabric::wire::Session`] (mutual handshake over the job's secret,
//! every frame authenticated, no replays):
//! - `krun` (or `krun status`, `krun node ...`) -> a krund node's control socket (a Unix
//!   socket for this host, TCP for another host): [`Protocol::Runtime`],
//!   [`ControlRequest`] -> [`ControlReply`];
//! - a krund node -> `krun`'s runtime listener: [`Protocol::Runtime`], [`NodeToLauncher`]
//!   (registration, agreed views) and [`LauncherToNode`];
//! - `krun node add|drain` -> the running `krun`'s socket in the job directory:
//!   [`Protocol::Runtime`], [`LauncherRequest`] -> [`LauncherReply`];
//! - a rank -> its node's rank socket (`KRUN_NODE_SOCKET`): [`Protocol::Rank`],
//!   [`RankToNode`] -> [`NodeToRank`].
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use adaptation::NodeId;
use fabric::secret::ClusterSecret;
use fabric::wire::{Protocol, Session};
use serde::{Deserialize, Serialize};

/// The signal a node wakes its ranks with for the policy (a barrier's "ask your node", an
/// uncoordinated capture): `SIGRTMIN + 6`, the mirror of `rank::node_link::wake_signal`.
/// Not SIGUSR1: a program may own SIGUSR1 (MPICH's MPI_Init installs a handler of its own),
/// and its ranks then never heard the policy (every barrier of an MPICH job waited 60 s).
pub fn wake_signal() -> i32 {
    libc::SIGRTMIN() + 6
}

use super::status::NodeStatus;
use crate::error::{LauncherError, Result};

/// A request to a krund node's control socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    /// The node's view of the job and the process table's rows for every rank.
    Status,
    /// Ask the membership for a planned departure of `node`.
    Leave { node: NodeId },
    /// Capture `rank` (running here) for a move and end it; `dry_run`: only check that it
    /// can be moved.
    MigrateOut { rank: u64, dry_run: bool },
    /// Start `rank` here from its newest checkpoint (moved from another node).
    Adopt { rank: u64 },
    /// As `Adopt`; a plain program's CRIU image of the move is read from the node whose
    /// control socket is `from` when this node does not see it (no shared `KRUN_GHOST_DIR`).
    AdoptFrom { rank: u64, from: String },
    /// Up to [`IMAGE_CHUNK`] bytes from `offset` of this node's CRIU image of `rank`'s move
    /// (`pipes`: the note of its output pipes instead).
    ReadMoveFile { rank: u64, pipes: bool, offset: u64 },
    /// Read `version` of `rank`'s image back from the checkpoint store (the fastest valid
    /// copy, as a restart would) and say where it came from.
    Fetch { rank: u32, version: u64 },
    /// Up to [`IMAGE_CHUNK`] bytes of `version` of `rank`'s image from `offset`, read from
    /// this node's store (for a node added later, which has no store of its own).
    ReadImage {
        rank: u32,
        version: u64,
        offset: u64,
    },
}

/// The most image bytes one [`ControlReply::Image`] carries.
pub const IMAGE_CHUNK: usize = 4 << 20;

/// Where a fetched checkpoint image came from ([`ControlRequest::Fetch`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchInfo {
    pub rank: u32,
    pub version: u64,
    /// The level (1-4) that served it.
    pub level: u8,
    /// The node whose memory or disk held it.
    pub node: u64,
    pub bytes: u64,
}

/// A krund node's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlReply {
    Status(Box<NodeStatus>),
    Fetched(FetchInfo),
    /// (To `ReadImage`) the image's length and the chunk from the offset asked for.
    Image {
        total: u64,
        bytes: Vec<u8>,
    },
    Done(String),
    Refused(String),
}

/// What a krund node tells the `krun` that started it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NodeToLauncher {
    /// The node is up: where to reach it.
    Register(NodeAddresses),
    /// An agreed view this node applied (sent when the node is stable in it).
    View {
        epoch: u64,
        members: Vec<NodeId>,
        /// `(epoch, node)` of every failure agreed so far.
        failures: Vec<(u64, NodeId)>,
    },
    /// The node's work is over; it leaves now (its departure is not a failure).
    Bye,
    /// (To `Barrier { op }`) this node now holds ranks that reach a safepoint.
    Opened { op: u64 },
    /// (To `Wake { op }`) every rank running on this node is held at a safepoint.
    Held { op: u64, ranks: Vec<u32> },
    /// (To `Barrier { op }`) the node's ranks did not all reach a safepoint.
    SyncFailed { op: u64, reason: String },
    /// A rank of this node took checkpoint `version` (`bytes` long) and the node's store
    /// holds it (L1). `wiring`: the recovery's wiring epoch the rank's image runs in (0:
    /// the job's start); krun drops reports of an older epoch than its newest recovery's
    /// (a checkpoint that recovery undid, under a version number taken again since).
    Captured {
        rank: u32,
        version: u64,
        bytes: u64,
        wiring: u64,
    },
    /// The store made `version` of `rank` safe at `level` (2-4; L1 comes with `Captured`):
    /// its copy is on `node` (L2: the buddy; L3: the parity holder; `None`: L4, or not
    /// known).
    Safe {
        rank: u32,
        version: u64,
        level: u8,
        node: Option<NodeId>,
        /// As in `Captured`.
        wiring: u64,
    },
    /// `version` of `rank` did not reach `level`.
    NotSafe {
        rank: u32,
        version: u64,
        level: u8,
        error: String,
        wiring: u64,
    },
    /// A rank of this node was killed by `signal` (not by the node): the job cannot go on
    /// without it, and krun ends it (the node has ended its other ranks).
    RankKilled { rank: u32, signal: i32 },
    /// (To `Restart { wiring, .. }`) `rank` runs again here (pid), restored as ordered;
    /// `fetched`: bytes of its image chain read from the store first (0: its own files);
    /// `in_place`: its live process rolled back keeping its pid (`runtime/recovery.rs`),
    /// else a new process was started.
    Restarted {
        wiring: u64,
        rank: u32,
        pid: u32,
        fetched: u64,
        seconds: f64,
        in_place: bool,
        /// Why a new process was started (the node's reason, e.g.
        /// [`super::recovery::NEW_WITH_MPI_JOB`]); `None` when rolled back in place or
        /// when the node said nothing.
        #[serde(default)]
        new_because: Option<String>,
    },
    /// (To `Restart { wiring, .. }`) `rank` could not be started here.
    RestartFailed {
        wiring: u64,
        rank: u32,
        reason: String,
    },
    /// The node got SIGUSR1 (Slurm's `--signal=USR1@T` signals every task of the step, that
    /// is every krund): a checkpoint request for krun's policy.
    CheckpointAsked,
    /// The node's ranks are over (sent just before `Bye`): the highest exit code among them
    /// (128 + signal for a killed one). Under Slurm one srun runs every node and its exit
    /// code mixes a killed node's with the others': krun reads the job's from these.
    Finished { code: i32 },
    /// The node's PMI server: a fence, an abort, a rank lost (`runtime/pmi.rs`).
    Pmi(super::pmi::PmiToLauncher),
    /// Uncoordinated policy (`checkpoints/uncoordinated.rs`): a rank's `LogCard`.
    LogCard {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// (To `PeerMoved`) `rank` sends to `moved`'s new process now.
    PeerReplaced { rank: u32, moved: u32 },
    /// A restarted rank's new process asks to rejoin (its `Rejoin`).
    Rejoining {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// A rank's `ChannelCounts` at its own checkpoint `version` (checkpointer's numbering),
    /// as the rank sent them (`checkpoints/uncoordinated.rs`).
    ChannelCounts {
        rank: u32,
        version: u64,
        sent: Vec<u64>,
        delivered: Vec<u64>,
    },
    /// A rank's answer to `Realign` (its watcher's `SafepointIndex`): its safepoint index in
    /// the uncoordinated mode and the version its checkpointer takes next.
    SafepointIndex { rank: u32, index: u64, next: u64 },
    /// `rank` is past its `krun_init` in wiring epoch `wiring` (its library said hello to
    /// the node after swapping addresses with every rank): the policy's
    /// `Event::RankReady`. Sent at each hello, and again for every linked rank when the
    /// node links to krun (a hello before the link would be lost).
    RankReady { rank: u32, wiring: u64 },
}

/// What `krun` tells a krund node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LauncherToNode {
    /// The job is over: a node without ranks of its own (joined later) ends now.
    Stop,
    /// The policy's barrier, in two phases so that no rank asks a node that has not heard
    /// of it yet: on `Barrier` the node holds every rank that reaches a safepoint from now
    /// on and answers `Opened`; once every node opened, `Wake` makes each node wake its ranks
    /// (SIGUSR1) and answer `Held` once every rank it runs is held.
    Barrier { op: u64 },
    /// (After every node's `Opened { op }`) wake the ranks for barrier `op`.
    Wake { op: u64 },
    /// (After the `Restart` of recovery `wiring`) the ranks now run on the nodes `ranks`
    /// names (rank -> node, every rank of the job) in the agreed view of `members`: each
    /// node's checkpoint store re-forms its buddies and parity sets among them
    /// (`runtime/store_node.rs`).
    Reform {
        wiring: u64,
        members: Vec<NodeId>,
        ranks: Vec<(u32, NodeId)>,
    },
    /// The policy's decision for the ranks held: every held rank gets this order.
    Release {
        order: super::safepoint::SafepointOrder,
    },
    /// A recovery (see `runtime/recovery.rs`): every rank of `ranks` placed on this node
    /// is restored from native checkpoint `version` (`None`: from the program's start): a
    /// rank whose live process runs here rolls back inside it (same pid); any other starts
    /// here as a new process, a rank new to the node first fetching its image chain from
    /// the store. The new processes wire up through
    /// the all-gather at `bootstrap`, the job's wiring epoch `wiring`.
    Restart {
        wiring: u64,
        bootstrap: String,
        version: Option<u64>,
        /// (rank, node) of every rank restarted in this wiring epoch.
        ranks: Vec<(u32, NodeId)>,
    },
    /// The policy decided about `rank` (a restart on `node`, or a rollback in place on its
    /// node `node`): `node` records it in the rank's process-table row before it is carried
    /// out (`runtime/recovery.rs`); the other nodes ignore it.
    Decided {
        rank: u32,
        node: NodeId,
        decision: String,
    },
    /// To the node's PMI server: a fence's outcome (`runtime/pmi.rs`).
    Pmi(super::pmi::PmiToNode),
    /// Uncoordinated policy (the contract: `checkpoints/uncoordinated.rs`): `rank` alone
    /// takes its own native checkpoint `version` at its next safepoint, no barrier.
    /// `node` runs the rank (the others ignore the order).
    CaptureRank {
        rank: u32,
        node: NodeId,
        version: u64,
    },
    /// `rank`'s own checkpoint `version` is safe: its library trims the message log.
    TrimLog { rank: u32, version: u64 },
    /// No recovery line needs `rank`'s own checkpoints older than native `version` (the
    /// uncoordinated policy without logging): every node's store may drop the ones it
    /// holds below that version's chain.
    KeepFrom { rank: u32, version: u64 },
    /// `rank` restarts on `node` as a new process from its own native checkpoint `version`
    /// and rejoins the running ranks (message logging); `restart` names the order in the
    /// answers (`Restarted{wiring: restart, ..}`).
    Rejoin {
        restart: u64,
        rank: u32,
        node: NodeId,
        version: u64,
        /// `KRUN_LOCAL_SIZE` the rank started with (its log buddy's stride).
        local_size: u32,
    },
    /// `rank`'s new process is at `address` with `ring`: every node tells its other ranks.
    PeerMoved {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// Every survivor replaced `rank`'s address: its node answers its `Rejoin` with `cards`.
    Rejoined {
        rank: u32,
        cards: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// The switch from the uncoordinated policy back to the coordinated one
    /// (`checkpoints/swap.rs`, `rank::uncoordinated`): every rank running here reports its
    /// safepoint index (`SafepointIndex`).
    Realign,
    /// Every rank leaves the uncoordinated mode at safepoint `index` and asks its node as in
    /// a coordinated job: the node drops its capture orders and answers safepoints through
    /// its gate from now on. `index` 0: the switch is off, the ranks go on uncoordinated.
    RealignAt { index: u64 },
}

/// Where one node of a job is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddresses {
    pub node: NodeId,
    pub pid: u32,
    pub host: String,
    /// The control socket over TCP (for `krun` on another host).
    pub control_tcp: String,
    /// The control socket's Unix path on the node's host.
    pub control_unix: String,
    /// The adaptation node's address (for nodes that join later).
    pub adaptation: String,
}

/// A request to the running `krun` (its socket in the job directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LauncherRequest {
    /// Start one more krund node and join it to the membership: `host` in hosts mode (its
    /// `krund --listen` daemon starts the node process), `None` locally.
    AddNode { host: Option<String> },
    /// Move `node`'s ranks to other nodes, then let the node leave.
    DrainNode { node: NodeId },
    /// `krun checkpoint`: ask the checkpoint policy for a checkpoint now.
    Checkpoint,
    /// `krun policy load|unload|show` (see `runtime/swap.rs`).
    Policy(PolicyRequest),
}

/// What `krun policy` asks the running job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PolicyRequest {
    /// Swap in the description `text` read from `source` (its absolute path).
    Load {
        source: String,
        text: String,
    },
    /// Back to the built-in policy the job started with.
    Unload,
    Show,
}

/// The running `krun`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LauncherReply {
    Added {
        node: NodeId,
        epoch: u64,
    },
    Drained {
        node: NodeId,
        moved: Vec<u64>,
    },
    /// The checkpoint request reached the policy (krun prints the commit).
    Requested,
    Refused(String),
    /// (To `Policy`) what was done or what is in force.
    Policy(String),
}

/// A rank's message to its node (the rank library's `rank::node_link::RankToNode`; this
/// mirror keeps the same variants in the same order, so both encode alike).
// TODO(rank library): use `rank::node_link::{RankToNode, NodeToRank}` once the crate is on
// main, and delete these mirrors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankToNode {
    Hello {
        rank: u32,
        pid: u32,
    },
    Checkpointed {
        rank: u32,
        version: u64,
        image: String,
        bytes: u64,
    },
    Exiting {
        rank: u32,
        code: i32,
    },
    /// The rank is at a safepoint where the ranks agreed to ask their nodes what to do; the
    /// answer is held until the node's policy decides ([`super::safepoint`]).
    AtSafepoint {
        rank: u32,
    },
    /// The rank's rollback watcher asks for an order (`runtime/recovery.rs`): held up to 20 s,
    /// answered `Continue` or `RollbackInPlace`.
    Watch {
        rank: u32,
        pid: u32,
    },
    /// Uncoordinated policy with logging: the rank's fabric address and the ring it holds
    /// for its ward (`checkpoints/uncoordinated.rs`). Answered `Ack`.
    LogCard {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// (After `PeerMoved`) the rank sends to `moved`'s new process now. Answered `Ack`.
    PeerReplaced {
        rank: u32,
        moved: u32,
    },
    /// A restarted rank rejoins: answered `Peers` once every survivor replaced its address.
    Rejoin {
        rank: u32,
        pid: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// Uncoordinated policy without logging, just before `Checkpointed`: at this own
    /// checkpoint, the messages the rank sent to (`sent[j]`) and delivered from
    /// (`delivered[j]`) each rank since its process started. Answered `Ack`.
    ChannelCounts {
        rank: u32,
        version: u64,
        sent: Vec<u64>,
        delivered: Vec<u64>,
    },
    /// (Watcher, after `ReportSafepoint`) the rank's safepoint index and next version.
    SafepointIndex {
        rank: u32,
        index: u64,
        next: u64,
    },
}

/// The node's answer to a rank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeToRank {
    Ack,
    Refused(String),
    /// (To `AtSafepoint`) take checkpoint `version` now, collectively.
    Checkpoint {
        version: u64,
    },
    /// (To `AtSafepoint`) go on computing.
    Continue,
    /// (To `AtSafepoint`) roll back to the committed `version`, collectively.
    Rollback {
        version: u64,
    },
    /// (To `Watch`) roll back now inside the live process: re-execute in place restoring
    /// native `version` (`None`: the program's start), wiring up through `bootstrap` in
    /// wiring epoch `wiring`.
    RollbackInPlace {
        wiring: u64,
        bootstrap: String,
        version: Option<u64>,
    },
    /// (To `Watch`) the rank's own checkpoint `version` is safe: trim the message log.
    LogSafe {
        version: u64,
    },
    /// (To `Watch`) `rank` runs as a new process at `address` holding `ring`.
    PeerMoved {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// (To `Rejoin`) every rank's (address, ring), indexed by rank.
    Peers {
        cards: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// (To `AtSafepoint`) checkpoint `version` collectively, then run uncoordinated with
    /// message logging.
    CheckpointSwitch {
        version: u64,
    },
    /// (To `Watch`) tell your safepoint index (`SafepointIndex`).
    ReportSafepoint,
    /// (To `Watch`) leave the uncoordinated mode at safepoint `index` (0: the switch is off).
    CoordinateAt {
        index: u64,
    },
}

fn wire_err(what: String) -> impl FnOnce(fabric::FabricError) -> LauncherError {
    move |e| LauncherError::Host {
        host: what,
        message: e.to_string(),
    }
}

/// One request, one reply over a fresh session (`krun status`, `krun node ...`).
pub fn call<Req: Serialize, Rep: serde::de::DeserializeOwned>(
    target: &ControlTarget,
    secret: &ClusterSecret,
    request: &Req,
    timeout: Duration,
) -> Result<Rep> {
    let what = target.to_string();
    let mut stream = target.connect(timeout)?;
    let mut s =
        Session::client(&mut stream, secret, Protocol::Runtime).map_err(wire_err(what.clone()))?;
    s.tx.send(&mut stream, request)
        .map_err(wire_err(what.clone()))?;
    s.rx.recv(&mut stream).map_err(wire_err(what))
}

/// A control socket to reach: a Unix path or a TCP address.
#[derive(Clone, Debug)]
pub enum ControlTarget {
    Unix(String),
    Tcp(String),
}

impl std::fmt::Display for ControlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlTarget::Unix(p) => write!(f, "unix:{p}"),
            ControlTarget::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected control stream of either kind.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl ControlTarget {
    fn connect(&self, timeout: Duration) -> Result<Stream> {
        let io = |e: std::io::Error| LauncherError::Io {
            context: format!("connecting to {self}"),
            source: e,
        };
        match self {
            ControlTarget::Unix(p) => {
                let s = UnixStream::connect(p).map_err(io)?;
                s.set_read_timeout(Some(timeout)).map_err(io)?;
                s.set_write_timeout(Some(timeout)).map_err(io)?;
                Ok(Stream::Unix(s))
            }
            ControlTarget::Tcp(a) => {
                let addr: SocketAddr = a
                    .parse()
                    .map_err(|_| LauncherError::Usage(format!("{a:?} is not HOST:PORT")))?;
                let s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
                s.set_read_timeout(Some(timeout)).map_err(io)?;
                s.set_write_timeout(Some(timeout)).map_err(io)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

/// Serves request/reply sessions of `protocol` on a Unix and/or a TCP listener, one thread
/// per connection; a connection that fails the handshake or sends a bad frame is closed with
/// a log line naming it, the others go on.
pub fn serve<Req, Rep>(
    unix: Option<UnixListener>,
    tcp: Option<TcpListener>,
    secret: ClusterSecret,
    protocol: Protocol,
    who: &'static str,
    handler: impl Fn(Req) -> Rep + Send + Sync + 'static,
) where
    Req: serde::de::DeserializeOwned,
    Rep: Serialize,
{
    let handler = std::sync::Arc::new(handler);
    let session =
        move |mut s: Stream,
              peer: String,
              secret: ClusterSecret,
              handler: std::sync::Arc<dyn Fn(Req) -> Rep + Send + Sync>| {
            // A client gets 10 s to prove the secret; an authenticated session may idle.
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut session = match Session::server(&mut s, &secret, protocol) {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("{who}: refused {peer}: {e}");
                    return;
                }
            };
            let _ = s.set_read_timeout(None);
            loop {
                let req: Req = match session.rx.recv(&mut s) {
                    Ok(r) => r,
                    // The client hung up between requests: an orderly end, not worth a line.
                    Err(fabric::FabricError::WireClosed { .. }) => return,
                    Err(e) => {
                        eprintln!("{who}: closing {peer}: {e}");
                        return;
                    }
                };
                let reply = handler(req);
                if session.tx.send(&mut s, &reply).is_err() {
                    return;
                }
            }
        };
    let session = std::sync::Arc::new(session);
    if let Some(l) = unix {
        let (secret, handler, session) = (secret.clone(), handler.clone(), session.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (secret, handler, session) = (secret.clone(), handler.clone(), session.clone());
                std::thread::spawn(move || {
                    session(Stream::Unix(s), "a local client".into(), secret, handler)
                });
            }
        });
    }
    if let Some(l) = tcp {
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let peer = s
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| "unknown peer".into());
                let _ = s.set_nodelay(true);
                let (secret, handler, session) = (secret.clone(), handler.clone(), session.clone());
                std::thread::spawn(move || session(Stream::Tcp(s), peer, secret, handler));
            }
        });
    }
}

/// Binds a Unix socket at `path` (a stale socket file there is replaced), mode 0600.
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| LauncherError::Io {
        context: format!("listening on {}", path.display()),
        source: e,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
        LauncherError::Io {
            context: format!("restricting {}", path.display()),
            source: e,
        }
    })?;
    Ok(l)
}
