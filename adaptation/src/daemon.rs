//! The I/O driver of a node: TCP links between nodes (one connection per direction, so
//! each link is FIFO), authenticated frames and a clock. All decisions are taken by
//! [`crate::protocol::Node`]. [`Driver`] is the library (krund hosts one in-process, with
//! its services); [`run_on`] puts a line protocol on stdin/stdout around it for clients and
//! operators (`krun-adapt`, with the toy key-value service).
//!
//! Commands (stdin, one per line) and what they print (stdout):
//! - `req CLIENT SEQ KEY put VALUE | get | add DELTA` → `ans CLIENT SEQ ok|err VERSION VALUE`
//!   (the toy key-value service; a client retrying through another node keeps CLIENT SEQ)
//! - `leave NODE` → `ok leave NODE` or `err ...` (a planned eviction)
//! - `fill COUNT BYTES` → `ok fill N`: loads the keys `0..COUNT` this node manages (and
//!   sends their copies to its witnesses)
//! - `status` → `status id=.. epoch=.. known=.. stable=.. members=.. cells=A+B|C+D keys=..`
//!
//! Events: `ready`, `phase EPOCH NAME t=MS`, `stable EPOCH t=MS members=A,B,..`,
//! `stopped REASON`, `rejoined as node NEW: node OLD was evicted at epoch E (...) t=MS`.
//! A key whose every copy was lost answers `ans CLIENT SEQ err 0 lost: key K was lost: ...`. Times are milliseconds since the Unix epoch (comparable across the
//! processes of one machine).
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fabric::secret::ClusterSecret;

use crate::error::{AdaptError, Result};
use crate::kv::{parse_answer, KvOp, KvService};
use crate::membership::MembershipConfig;
use crate::protocol::{Node, NodeConfig, Output};
use crate::service::{RequestId, Service, ServiceId};
use crate::view::{Change, EntryId, Epoch, NodeId};
use crate::wire::{self, LinkHello, Msg};
use fabric::wire::{Deadline, HandshakeSlot, HandshakeSlots, Session, HANDSHAKE_TIMEOUT};

/// How a daemon is started (`krun-adapt --help`).
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub id: NodeId,
    pub listen: String,
    /// Addresses of the initial members (for a joiner: of the nodes it contacts).
    pub peers: BTreeMap<NodeId, String>,
    pub supervisors: Vec<NodeId>,
    pub join: bool,
    pub tick: Duration,
    pub seed: u64,
    /// How long a member may stay silent (missed probes, no refutation) before it is
    /// declared failed; `None`: the layer's defaults, tuned for an idle LAN (about 0.6 s of
    /// suspicion). A busy node (oversubscribed cores, a rank loading libraries) can be
    /// silent for longer without having failed: see [`DaemonConfig::detector_for`].
    pub failure_timeout: Option<Duration>,
}

impl DaemonConfig {
    /// The failure detector's timing in ticks for a given `failure_timeout`: a member is
    /// probed every `failure_timeout / 6`, suspected after a missed probe, and declared down
    /// if it has not refuted the suspicion within `failure_timeout`; a supervisor then
    /// pings it directly for half of that before it proposes the failure.
    pub fn detector_for(timeout: Duration, tick: Duration) -> (MembershipConfig, u64) {
        let ticks = (timeout.as_millis() / tick.as_millis().max(1)).max(10) as u64;
        let probe_period = (ticks / 6).max(2);
        (
            MembershipConfig {
                probe_period,
                probe_rtt: (probe_period * 2 / 5).max(1),
                suspect_to_down: ticks,
            },
            (ticks / 2).max(1),
        )
    }
}

enum Event {
    Frame(NodeId, Msg),
    /// A link from this node, which had carried frames, closed, or a link to it that was
    /// open once cannot be opened again (see [`Node::peer_closed`]).
    Closed(NodeId),
    /// Work for the node, run inside the loop.
    Call(Call),
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Outgoing links: a writer thread per peer, connecting on first use.
struct Links {
    me: NodeId,
    secret: ClusterSecret,
    addrs: Arc<Mutex<BTreeMap<NodeId, String>>>,
    writers: BTreeMap<NodeId, Sender<Msg>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The driver's events: a link that worked and cannot be opened again is reported.
    events: Sender<Event>,
}

impl Links {
    fn send(&mut self, to: NodeId, msg: &Msg) {
        let tx = self.writers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Msg>();
            let (addrs, me, secret) = (self.addrs.clone(), self.me, self.secret.clone());
            let events = self.events.clone();
            self.threads.push(std::thread::spawn(move || {
                write_link(me, to, &secret, addrs, rx, events)
            }));
            tx
        });
        let _ = tx.send(msg.clone());
    }

    /// Closes every link after what was queued is written (bounded wait).
    fn close(mut self) {
        self.writers.clear();
        let deadline = Instant::now() + Duration::from_secs(2);
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Opens a link to a peer: TCP, the wire toolkit's handshake, then our [`LinkHello`].
fn open_link(
    me: NodeId,
    addr: &str,
    secret: &ClusterSecret,
) -> std::result::Result<(TcpStream, Session), String> {
    let a = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not HOST:PORT"))?;
    let mut s =
        TcpStream::connect_timeout(&a, Duration::from_millis(300)).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut session = Session::client_within(&s, secret, wire::PROTOCOL, HANDSHAKE_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    session
        .tx
        .send(&mut s, &LinkHello { node: me })
        .map_err(|e| e.to_string())?;
    Ok((s, session))
}

/// How long a link that could not connect drops messages before it tries again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// Writes messages to one peer in order; reconnects once per failed message, then gives up
/// on that message (the protocol retries what matters). A link that was open once and
/// cannot be opened again is reported to the driver ([`Event::Closed`]), which checks
/// whether the peer's process is gone.
fn write_link(
    me: NodeId,
    to: NodeId,
    secret: &ClusterSecret,
    addrs: Arc<Mutex<BTreeMap<NodeId, String>>>,
    rx: Receiver<Msg>,
    events: Sender<Event>,
) {
    let mut link: Option<(TcpStream, Session)> = None;
    let mut opened_once = false;
    let mut warned = false;
    // After a failed connection attempt, messages are dropped without another attempt for
    // a while: each attempt may take the connect timeout, and a backlog of messages queued
    // during a cut would otherwise be tried one by one long after the link came back
    // (stale messages ahead of the ones that tell a cut-off node it was evicted).
    let mut quiet_until: Option<Instant> = None;
    while let Ok(msg) = rx.recv() {
        if quiet_until.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        for attempt in 0..2 {
            if link.is_none() {
                let addr = addrs.lock().map(|a| a.get(&to).cloned()).ok().flatten();
                let Some(addr) = addr else {
                    break;
                };
                match open_link(me, &addr, secret) {
                    Ok(l) => {
                        link = Some(l);
                        opened_once = true;
                        warned = false;
                    }
                    Err(why) => {
                        quiet_until = Some(Instant::now() + RECONNECT_PAUSE);
                        if opened_once {
                            let _ = events.send(Event::Closed(to));
                        }
                        if !warned {
                            eprintln!("link to node {to} ({addr}): cannot connect ({why}); dropping messages until it answers");
                            warned = true;
                        }
                        break;
                    }
                }
            }
            if let Some((s, session)) = link.as_mut() {
                if session.tx.send(s, &msg).is_ok() {
                    break;
                }
                link = None;
                if attempt == 1 {
                    eprintln!("link to node {to}: write failed twice; message dropped");
                }
            }
        }
    }
}

/// Reads messages from one connection: the handshake and the sender's [`LinkHello`] within
/// [`HANDSHAKE_TIMEOUT`], then frames; a frame that does not authenticate, is replayed or
/// does not decode ends the connection with a log line naming the sender.
fn read_link(mut s: TcpStream, secret: ClusterSecret, tx: Sender<Event>, slot: HandshakeSlot) {
    let peer = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let opened = Session::server_within(&s, &secret, wire::PROTOCOL, HANDSHAKE_TIMEOUT).and_then(
        |mut session| {
            session.rx.set_max_payload(64);
            let hello = session
                .rx
                .recv::<LinkHello>(&mut Deadline::new(&s, HANDSHAKE_TIMEOUT));
            let _ = s.set_read_timeout(None);
            Ok((hello?, session))
        },
    );
    drop(slot);
    let (from, mut session) = match opened {
        Ok((hello, session)) => (hello.node, session),
        Err(e) => {
            eprintln!("dropped connection from {peer}: {e}");
            return;
        }
    };
    session.rx.set_max_payload(wire::MAX_MESSAGE);
    let mut frames = false;
    loop {
        match session.rx.recv::<Msg>(&mut s) {
            Ok(msg) => {
                frames = true;
                if tx.send(Event::Frame(from, msg)).is_err() {
                    return;
                }
            }
            Err(fabric::FabricError::WireClosed { .. }) => break,
            Err(e) => {
                eprintln!("dropped connection from node {from} ({peer}): {e}");
                return;
            }
        }
    }
    // The peer closed a link it used: its process may be gone (the driver checks).
    if frames {
        let _ = tx.send(Event::Closed(from));
    }
}

/// Whether nothing listens at `addr` any more: a connection is refused (not timed out: a
/// slow or unreachable node proves nothing). Connects without a handshake (the peer, if
/// alive, drops the connection with a log line) so that the check itself never looks like
/// a used link closing.
fn refuses_connections(addr: &str) -> bool {
    let Ok(a) = addr.parse::<std::net::SocketAddr>() else {
        return false;
    };
    matches!(
        TcpStream::connect_timeout(&a, Duration::from_millis(300)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Probes that a closed link's peer refuses connections, up to [`CLOSED_PROBES`] times
/// [`CLOSED_PROBE_PAUSE`] apart (stopping at the first refusal).
///
/// A SIGKILLed process's links close while the kernel tears it down, one descriptor after
/// another: a probe sent on the first closed link can still reach the listening socket
/// (accepted into its backlog) a moment before it closes too. One probe then found the
/// node "alive", and the driver ignored the next closed-link reports for
/// [`CLOSED_RECHECK`]: the failure waited for the detector (~0.5 s in half the bench runs).
/// Probing again a few times keeps the evidence the same (a closed link *and* a refused
/// connection; a live listener never refuses) and only adds a few handshake-less
/// connections, dropped with a log line, when the peer is in fact alive.
fn refuses_connections_soon(addr: &str, probes: u32, pause: Duration) -> bool {
    for i in 0..probes.max(1) {
        if i > 0 {
            std::thread::sleep(pause);
        }
        if refuses_connections(addr) {
            return true;
        }
    }
    false
}

/// Probes of a closed link's peer ([`refuses_connections_soon`]).
const CLOSED_PROBES: u32 = 4;
const CLOSED_PROBE_PAUSE: Duration = Duration::from_millis(25);
/// A node whose closed link was checked is not checked again for this long (its other
/// links report their closing at the same time).
const CLOSED_RECHECK: Duration = Duration::from_millis(150);

/// Runs a node until it leaves the configuration; returns the reason.
pub fn run(cfg: DaemonConfig, secret: ClusterSecret) -> Result<String> {
    run_tolerating(cfg, secret, 1)
}

/// [`run`] with keys that survive `tolerate` simultaneous failures (`--tolerate`).
pub fn run_tolerating(cfg: DaemonConfig, secret: ClusterSecret, tolerate: usize) -> Result<String> {
    let listener = TcpListener::bind(&cfg.listen).map_err(|e| AdaptError::Io {
        what: format!("listening on {}", cfg.listen),
        source: e,
    })?;
    run_kv(cfg, listener, secret, tolerate)
}

/// A node of a krun job (`krun ... krun-adapt --under-krun`): rank r of n is node r, the
/// ranks swap their listening addresses through krun's bootstrap service (`KRUN_BOOTSTRAP`,
/// `KRUN_RANK`, `KRUN_SIZE`), and the cluster secret is the job's (`KRUN_SECRET`). Listens on
/// `KRUN_FABRIC_BIND` (default 127.0.0.1), any port. `supervisors` empty: the first three.
pub fn under_krun(supervisors: Vec<NodeId>) -> Result<String> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| AdaptError::Config {
            what: name.to_string(),
            reason: "not set: run krun-adapt --under-krun as a krun job".into(),
        })
    };
    let number = |name: &str| -> Result<usize> {
        var(name)?.parse().map_err(|_| AdaptError::Config {
            what: name.to_string(),
            reason: "not a number".into(),
        })
    };
    let rank = number("KRUN_RANK")?;
    let size = number("KRUN_SIZE")?;
    let boot = var("KRUN_BOOTSTRAP")?;
    let boot = boot.parse().map_err(|_| AdaptError::Config {
        what: "KRUN_BOOTSTRAP".into(),
        reason: format!("{boot:?} is not HOST:PORT"),
    })?;
    let secret = ClusterSecret::from_env()
        .map_err(|e| AdaptError::Config {
            what: "cluster secret".into(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| AdaptError::Config {
            what: "KRUN_SECRET".into(),
            reason: "not set: run krun-adapt --under-krun as a krun job".into(),
        })?;
    let host = std::env::var("KRUN_FABRIC_BIND")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into());
    let listener = TcpListener::bind((host.as_str(), 0)).map_err(|e| AdaptError::Io {
        what: format!("listening on {host}"),
        source: e,
    })?;
    let listen = listener
        .local_addr()
        .map_err(|e| AdaptError::Io {
            what: "reading the listening address".into(),
            source: e,
        })?
        .to_string();
    let mut client = fabric::bootstrap::BootstrapClient::connect_with(
        boot,
        rank,
        size,
        Duration::from_secs(60),
        Some(&secret),
    )
    .map_err(|e| AdaptError::Config {
        what: "KRUN_BOOTSTRAP".into(),
        reason: e.to_string(),
    })?;
    let cards = client
        .allgather(listen.as_bytes())
        .map_err(|e| AdaptError::Config {
            what: "bootstrap all-gather".into(),
            reason: e.to_string(),
        })?;
    let peers = cards
        .iter()
        .enumerate()
        .filter(|(r, _)| *r != rank)
        .map(|(r, c)| (r as NodeId, String::from_utf8_lossy(c).into_owned()))
        .collect();
    let cfg = DaemonConfig {
        id: rank as NodeId,
        listen,
        peers,
        supervisors,
        join: false,
        tick: Duration::from_millis(10),
        seed: rank as u64,
        failure_timeout: None,
    };
    run_on(cfg, listener, secret)
}

/// Runs a node of the toy key-value service on an already bound listener, with the line
/// protocol on stdin/stdout (`krun-adapt`).
pub fn run_on(cfg: DaemonConfig, listener: TcpListener, secret: ClusterSecret) -> Result<String> {
    run_kv(cfg, listener, secret, 1)
}

/// [`run_on`] with keys that survive `tolerate` simultaneous failures (f + 1 copies). A
/// node evicted while alive (cut off) rejoins as a new member (line `rejoined ...`).
pub fn run_kv(
    cfg: DaemonConfig,
    listener: TcpListener,
    secret: ClusterSecret,
    tolerate: usize,
) -> Result<String> {
    let driver = Driver::start_rejoining(
        cfg,
        listener,
        secret,
        Box::new(move || vec![Box::new(KvService::new().tolerating(tolerate)) as Box<dyn Service>]),
    )?;
    let handle = driver.handle();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines().map_while(|l| l.ok()) {
            // The reply is printed inside the driver, before the outputs the command causes.
            let sent = handle.call(move |node| {
                let reply = command(node, &line);
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{reply}");
                let _ = out.flush();
            });
            if sent.is_err() {
                return;
            }
        }
    });
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready id={} listen={}", driver.id(), driver.listen());
    let _ = out.flush();
    loop {
        let Ok(event) = driver.events().recv() else {
            return driver.join();
        };
        match event {
            DriverEvent::Response { id, payload } => {
                let _ = writeln!(out, "{}", answer_line(id, &payload));
            }
            DriverEvent::Stable(view) => {
                let list = |v: &[NodeId]| -> String {
                    v.iter()
                        .map(|m| m.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let _ = writeln!(
                    out,
                    "stable {} t={:.3} supervisors={} members={}",
                    view.epoch,
                    now_ms(),
                    list(&view.supervisors),
                    list(&view.members)
                );
            }
            DriverEvent::Phase { epoch, phase } => {
                let _ = writeln!(out, "phase {epoch} {phase} t={:.3}", now_ms());
            }
            DriverEvent::Log(line) if line.starts_with("rejoined ") => {
                let _ = writeln!(out, "{line} t={:.3}", now_ms());
            }
            DriverEvent::Log(line) => eprintln!("node {}: {line}", driver.id()),
            DriverEvent::Stopped { reason } => {
                let _ = writeln!(out, "stopped {reason}");
                let _ = out.flush();
                driver.join()?;
                return Ok(reason);
            }
        }
        let _ = out.flush();
    }
}

/// A view of the membership as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewSnapshot {
    pub me: NodeId,
    /// The epoch of the view this node applied (changes processed).
    pub epoch: Epoch,
    /// The newest epoch this node knows was agreed.
    pub known_epoch: Epoch,
    pub stable: bool,
    pub members: Vec<NodeId>,
    /// The locator's cells, each a list of members.
    pub cells: Vec<Vec<NodeId>>,
    pub supervisors: Vec<NodeId>,
    /// The supervisor leading the agreement, when this node knows it.
    pub leader: Option<NodeId>,
    /// The agreed changes: the change to epoch `i + 1` is `changes[i]`.
    pub changes: Vec<Change>,
}

impl ViewSnapshot {
    pub fn of(node: &Node) -> ViewSnapshot {
        ViewSnapshot {
            me: node.id(),
            epoch: node.epoch(),
            known_epoch: node.known_epoch(),
            stable: node.is_stable(),
            members: node.members().iter().copied().collect(),
            cells: node
                .locator()
                .cells()
                .into_iter()
                .map(|c| c.members)
                .collect(),
            supervisors: node.supervisors(),
            leader: node.leader(),
            changes: node.log().to_vec(),
        }
    }
}

/// What a running [`Driver`] reports.
#[derive(Clone, Debug)]
pub enum DriverEvent {
    /// The answer to a request submitted through this node.
    Response { id: RequestId, payload: Vec<u8> },
    /// This node finished a change and is stable in this view.
    Stable(ViewSnapshot),
    /// A step of the change to `epoch` ended here.
    Phase { epoch: Epoch, phase: &'static str },
    /// This node is out of the configuration; the driver has ended.
    Stopped { reason: String },
    /// Something worth a log line.
    Log(String),
}

type Call = Box<dyn FnOnce(&mut Node) + Send>;

/// Makes a node's services afresh (every node registers the same ones, in the same order).
pub type ServiceFactory = Box<dyn Fn() -> Vec<Box<dyn Service>> + Send>;

/// Sends work to a running driver; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct DriverHandle {
    calls: Sender<Event>,
}

impl DriverHandle {
    /// Runs `f` on the node inside the driver's loop (between two events), so that it sees
    /// and changes the node's state consistently; what it makes the node do is carried out
    /// right after.
    pub fn call(&self, f: impl FnOnce(&mut Node) + Send + 'static) -> Result<()> {
        self.calls
            .send(Event::Call(Box::new(f)))
            .map_err(|_| stopped_error())
    }

    /// Runs `f` on the node and waits for its result.
    pub fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Node) -> T + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        self.call(move |node| {
            let _ = tx.send(f(node));
        })?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| stopped_error())
    }

    /// Submits a request to `(service, entry)`; its answer comes as
    /// [`DriverEvent::Response`].
    pub fn submit(
        &self,
        id: RequestId,
        service: ServiceId,
        entry: EntryId,
        payload: Vec<u8>,
    ) -> Result<()> {
        self.query(move |node| node.submit(id, service, entry, payload))?
    }

    /// Asks for `node` to leave the configuration (a planned eviction).
    pub fn request_leave(&self, node: NodeId) -> Result<()> {
        self.query(move |n| n.request_leave(node))?
    }

    /// The membership as this node sees it now.
    pub fn view(&self) -> Result<ViewSnapshot> {
        self.query(|node| ViewSnapshot::of(node))
    }
}

fn stopped_error() -> AdaptError {
    AdaptError::Io {
        what: "adaptation driver".into(),
        source: std::io::Error::other("the driver has stopped"),
    }
}

/// The TCP driver of one adaptation node, as a library: links to the other nodes, a clock,
/// the node's services; requests come in through [`DriverHandle`]s, what happens comes out
/// as [`DriverEvent`]s. `krun-adapt` and every `krund` run one.
pub struct Driver {
    id: NodeId,
    listen: String,
    handle: DriverHandle,
    events: Receiver<DriverEvent>,
    thread: Option<std::thread::JoinHandle<Result<String>>>,
}

impl Driver {
    /// Starts a node on an already bound listener with `services` (every node of a job
    /// registers the same services in the same order).
    pub fn start(
        cfg: DaemonConfig,
        listener: TcpListener,
        secret: ClusterSecret,
        services: Vec<Box<dyn Service>>,
    ) -> Result<Driver> {
        Self::launch(cfg, listener, secret, services, None)
    }

    /// As [`Driver::start`], but a node evicted while alive (cut off, declared failed)
    /// comes back at once as a new member ([`Node::rejoin_config`]) with services from
    /// `make`, instead of stopping; it says so with a [`DriverEvent::Log`] line starting
    /// with `rejoined `.
    pub fn start_rejoining(
        cfg: DaemonConfig,
        listener: TcpListener,
        secret: ClusterSecret,
        make: ServiceFactory,
    ) -> Result<Driver> {
        let services = make();
        Self::launch(cfg, listener, secret, services, Some(make))
    }

    fn launch(
        cfg: DaemonConfig,
        listener: TcpListener,
        secret: ClusterSecret,
        services: Vec<Box<dyn Service>>,
        rejoin: Option<ServiceFactory>,
    ) -> Result<Driver> {
        let listen = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| cfg.listen.clone());
        let mut genesis: Vec<NodeId> = cfg.peers.keys().copied().collect();
        if !cfg.join {
            genesis.push(cfg.id);
        }
        genesis.sort_unstable();
        let supervisors = if cfg.supervisors.is_empty() {
            genesis.iter().copied().take(3).collect()
        } else {
            cfg.supervisors.clone()
        };
        let mut ncfg = NodeConfig::new(cfg.id, genesis, supervisors);
        ncfg.seed = cfg.seed;
        if let Some(t) = cfg.failure_timeout {
            let (membership, confirm) = DaemonConfig::detector_for(t, cfg.tick);
            ncfg.membership = membership;
            ncfg.confirm_ticks = confirm;
        }
        ncfg.joining = cfg.join.then(|| listen.clone());
        let node = Node::new(ncfg, services)?;
        let (tx, rx) = mpsc::channel::<Event>();
        {
            let tx = tx.clone();
            let secret = secret.clone();
            std::thread::spawn(move || {
                let slots = HandshakeSlots::default();
                loop {
                    // A free handshake slot first: more connections wait in the backlog.
                    let slot = slots.take();
                    let s = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) => {
                            eprintln!("accepting a connection: {e}");
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        }
                    };
                    let (tx, secret) = (tx.clone(), secret.clone());
                    std::thread::spawn(move || read_link(s, secret, tx, slot));
                }
            });
        }
        let (events_tx, events) = mpsc::channel();
        let id = cfg.id;
        let thread = {
            let listen = listen.clone();
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("adapt-node-{id}"))
                .spawn(move || drive(cfg, listen, node, secret, (tx, rx), events_tx, rejoin))
                .map_err(|e| AdaptError::Io {
                    what: "starting the driver thread".into(),
                    source: e,
                })?
        };
        Ok(Driver {
            id,
            listen,
            handle: DriverHandle { calls: tx },
            events,
            thread: Some(thread),
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Where the other nodes reach this one.
    pub fn listen(&self) -> &str {
        &self.listen
    }

    pub fn handle(&self) -> DriverHandle {
        self.handle.clone()
    }

    pub fn events(&self) -> &Receiver<DriverEvent> {
        &self.events
    }

    /// Waits for the driver to end; returns why it stopped.
    pub fn join(mut self) -> Result<String> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(AdaptError::Io {
                what: "adaptation driver".into(),
                source: std::io::Error::other("the driver thread panicked"),
            }),
            None => Err(stopped_error()),
        }
    }
}

/// The driver's loop: feeds the node ticks, frames and calls, and carries out its outputs.
fn drive(
    cfg: DaemonConfig,
    listen: String,
    mut node: Node,
    secret: ClusterSecret,
    (tx, rx): (Sender<Event>, Receiver<Event>),
    events: Sender<DriverEvent>,
    rejoin: Option<ServiceFactory>,
) -> Result<String> {
    // Nodes whose closed link is being checked, and when the last check started.
    let mut checked: BTreeMap<NodeId, Instant> = BTreeMap::new();
    let mut addrs = cfg.peers.clone();
    addrs.insert(cfg.id, listen.clone());
    let addrs = Arc::new(Mutex::new(addrs));
    let mut links = Links {
        me: cfg.id,
        secret,
        addrs: addrs.clone(),
        writers: BTreeMap::new(),
        threads: Vec::new(),
        events: tx.clone(),
    };
    let mut known_joins = 0usize;
    let mut next_tick = Instant::now() + cfg.tick;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Event::Frame(from, msg)) => node.receive(from, msg),
            Ok(Event::Closed(from)) => {
                let recent = checked
                    .get(&from)
                    .is_some_and(|t| t.elapsed() < CLOSED_RECHECK);
                let addr = addrs.lock().ok().and_then(|a| a.get(&from).cloned());
                if let (false, Some(addr)) = (recent, addr) {
                    checked.insert(from, Instant::now());
                    let tx = tx.clone();
                    std::thread::spawn(move || {
                        if refuses_connections_soon(&addr, CLOSED_PROBES, CLOSED_PROBE_PAUSE) {
                            let _ = tx.send(Event::Call(Box::new(move |n: &mut Node| {
                                n.peer_closed(from)
                            })));
                        }
                    });
                }
            }
            Ok(Event::Call(f)) => f(&mut node),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                return Err(AdaptError::Io {
                    what: "event loop".into(),
                    source: std::io::Error::other("all event sources closed"),
                })
            }
        }
        if Instant::now() >= next_tick {
            node.tick();
            next_tick += cfg.tick;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + cfg.tick;
            }
        }
        // Addresses of joined nodes come from the agreed log.
        if node.log().len() > known_joins {
            if let Ok(mut a) = addrs.lock() {
                for c in &node.log()[known_joins..] {
                    if let Change::Join { node, addr } = c {
                        a.insert(*node, addr.clone());
                    }
                }
            }
            known_joins = node.log().len();
        }
        let mut stopped = None;
        for o in node.take_outputs() {
            let event = match o {
                Output::Send { to, msg } => {
                    links.send(to, &msg);
                    continue;
                }
                Output::Response { id, payload } => DriverEvent::Response { id, payload },
                Output::Stable { .. } => DriverEvent::Stable(ViewSnapshot::of(&node)),
                Output::Phase { epoch, phase } => DriverEvent::Phase { epoch, phase },
                Output::Stopped { reason } => {
                    stopped = Some(reason);
                    continue;
                }
                Output::Log(line) => DriverEvent::Log(line),
            };
            // Nobody listening any more is not the node's problem.
            let _ = events.send(event);
        }
        if let (Some(reason), Some(make), Some(epoch)) = (&stopped, &rejoin, node.evicted()) {
            let old = node.id();
            let next = node
                .rejoin_config(listen.clone())
                .and_then(|c| Node::new(c, make()));
            match next {
                Ok(n) => {
                    node = n;
                    let new = node.id();
                    if let Ok(mut a) = addrs.lock() {
                        a.insert(new, listen.clone());
                    }
                    // The links named the old id in their hello: open new ones.
                    let secret = links.secret.clone();
                    let old_links = std::mem::replace(
                        &mut links,
                        Links {
                            me: new,
                            secret,
                            addrs: addrs.clone(),
                            writers: BTreeMap::new(),
                            threads: Vec::new(),
                            events: tx.clone(),
                        },
                    );
                    old_links.close();
                    known_joins = 0;
                    let _ = events.send(DriverEvent::Log(format!(
                        "rejoined as node {new}: node {old} was evicted at epoch {epoch} ({reason})"
                    )));
                    continue;
                }
                Err(e) => {
                    let _ = events.send(DriverEvent::Log(format!("node {old} cannot rejoin: {e}")));
                }
            }
        }
        if let Some(reason) = stopped {
            links.close();
            let _ = events.send(DriverEvent::Stopped {
                reason: reason.clone(),
            });
            return Ok(reason);
        }
    }
}

fn answer_line(id: RequestId, payload: &[u8]) -> String {
    match parse_answer(payload) {
        Some(a) => {
            let value = if a.value.len() == 8 && a.value.iter().any(|b| !b.is_ascii_graphic()) {
                a.number().to_string()
            } else {
                String::from_utf8_lossy(&a.value).into_owned()
            };
            format!(
                "ans {} {} {} {} {value}",
                id.client,
                id.seq,
                if a.ok { "ok" } else { "err" },
                a.version
            )
        }
        None => format!("ans {} {} err 0 undecodable answer", id.client, id.seq),
    }
}

/// Executes one operator or client command; returns the line to print (answers to requests
/// come later as `ans` lines).
fn command(node: &mut Node, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["req", client, seq, key, op @ ..] => {
            let (Ok(client), Ok(seq), Ok(key)) = (
                client.parse::<u32>(),
                seq.parse::<u64>(),
                key.parse::<u64>(),
            ) else {
                return format!("err bad request line: {line}");
            };
            let op = match op {
                ["put", value] => KvOp::Put(value.as_bytes().to_vec()),
                ["get"] => KvOp::Get,
                ["add", d] => match d.parse::<i64>() {
                    Ok(d) => KvOp::Add(d),
                    Err(_) => return format!("err '{d}' is not a number"),
                },
                _ => return format!("err unknown operation in: {line}"),
            };
            let id = RequestId {
                origin: 0,
                client,
                seq,
            };
            match node.submit(id, 0, key, op.encode()) {
                Ok(()) => format!("sent {client} {seq}"),
                Err(e) => format!("err {e}"),
            }
        }
        ["leave", n] => match n.parse::<NodeId>() {
            Ok(n) => match node.request_leave(n) {
                Ok(()) => format!("ok leave {n}"),
                Err(e) => format!("err {e}"),
            },
            Err(_) => format!("err '{n}' is not a node id"),
        },
        ["fill", count, bytes] => {
            let (Ok(count), Ok(bytes)) = (count.parse::<u64>(), bytes.parse::<usize>()) else {
                return format!("err bad fill line: {line}");
            };
            let me = node.id();
            let mine: Vec<u64> = (0..count)
                .filter(|&k| node.manager_of(0, k) == Some(me))
                .collect();
            let value = vec![b'x'; bytes];
            let state = crate::kv::state_with_value(&value);
            let n = mine.len();
            match node.load(0, mine.into_iter().map(|k| (k, state.clone())).collect()) {
                Ok(()) => format!("ok fill {n}"),
                Err(e) => format!("err {e}"),
            }
        }
        ["status"] => {
            let members: Vec<String> = node.members().iter().map(|m| m.to_string()).collect();
            let keys = node.service(0).map(|s| s.managed().len()).unwrap_or(0);
            let cells: Vec<String> = node
                .locator()
                .cells()
                .iter()
                .map(|c| {
                    let m: Vec<String> = c.members.iter().map(|m| m.to_string()).collect();
                    m.join("+")
                })
                .collect();
            format!(
                "status id={} epoch={} known={} stable={} members={} cells={} keys={keys}",
                node.id(),
                node.epoch(),
                node.known_epoch(),
                node.is_stable(),
                members.join(","),
                cells.join("|")
            )
        }
        [] => String::new(),
        _ => format!("err unknown command: {line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer's listener is still open at the first probe (a process being torn down)
    /// and closed a moment later: the later probe's refusal counts. A listener that stays
    /// open is never taken for a gone process.
    #[test]
    fn a_listener_that_closes_just_after_the_first_probe_is_found_gone_and_a_live_one_is_not() {
        let live = TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap().to_string();
        assert!(!refuses_connections_soon(
            &live_addr,
            3,
            Duration::from_millis(5)
        ));

        let dying = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dying.local_addr().unwrap().to_string();
        // Closed once the first probe's connection reached it.
        let closer = std::thread::spawn(move || {
            let first = dying.accept().map(|(s, _)| s);
            drop(dying);
            first.is_ok()
        });
        assert!(
            refuses_connections_soon(&addr, 100, Duration::from_millis(20)),
            "the closed listener was never found refusing"
        );
        assert!(
            closer.join().unwrap(),
            "the first probe reached the listener"
        );
        // One probe alone, against the still-open listener, would have said "alive".
        let again = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = again.local_addr().unwrap().to_string();
        assert!(!refuses_connections_soon(&a, 1, Duration::ZERO));
    }

    #[test]
    fn a_failure_timeout_sets_the_detector_and_the_confirmation_in_ticks() {
        let tick = Duration::from_millis(10);
        let (m, confirm) = DaemonConfig::detector_for(Duration::from_secs(3), tick);
        assert_eq!(
            (m.probe_period, m.probe_rtt, m.suspect_to_down, confirm),
            (50, 20, 300, 150)
        );
        // Tiny timeouts are clamped to something foca accepts.
        let (m, confirm) = DaemonConfig::detector_for(Duration::from_millis(1), tick);
        assert!(m.probe_period >= 2 && m.probe_rtt >= 1 && m.probe_rtt < m.probe_period);
        assert!(m.suspect_to_down >= 10 && confirm >= 1);
    }
}
