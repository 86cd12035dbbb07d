//! The I/O driver of a node: TCP links between nodes (one connection per direction, so
//! each link is FIFO), authenticated frames, a clock, and a line protocol on stdin/stdout for
//! clients and operators. All decisions are taken by [`crate::protocol::Node`].
//!
//! Commands (stdin, one per line) and what they print (stdout):
//! - `req CLIENT SEQ KEY put VALUE | get | add DELTA` → `ans CLIENT SEQ ok|err VERSION VALUE`
//!   (the toy key-value service; a client retrying through another node keeps CLIENT SEQ)
//! - `leave NODE` → `ok leave NODE` or `err ...` (a planned eviction)
//! - `fill COUNT BYTES` → `ok fill N`: loads the keys `0..COUNT` this node manages
//! - `status` → `status id=.. epoch=.. known=.. stable=.. members=.. cells=A+B|C+D keys=..`
//!
//! Events: `ready`, `phase EPOCH NAME t=MS`, `stable EPOCH t=MS members=A,B,..`,
//! `stopped REASON`. Times are milliseconds since the Unix epoch (comparable across the
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
use crate::protocol::{Node, NodeConfig, Output};
use crate::service::RequestId;
use crate::view::{Change, NodeId};
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
}

pub const USAGE: &str = "\
krun-adapt --id N --listen HOST:PORT --peer ID=HOST:PORT ... --supervisors A,B,C
           [--join] [--tick-ms 10] [--seed S]
krun-adapt --under-krun [--supervisors A,B,C]   (as a krun job: `krun --local 4 krun-adapt
           --under-krun`; rank r is node r, rank 0 reads the commands)
  Runs one node of the adaptation layer with the toy key-value service. The initial members
  are the --peer nodes plus this one (unless --join: then this node announces itself to
  them). The cluster secret comes from KRUN_SECRET_FILE (a 0600 file) or KRUN_SECRET (hex).";

impl DaemonConfig {
    pub fn from_args(args: &[String]) -> Result<DaemonConfig> {
        let usage = |why: String| AdaptError::Config {
            what: "arguments".into(),
            reason: format!("{why}\n{USAGE}"),
        };
        let mut id = None;
        let mut listen = None;
        let mut peers = BTreeMap::new();
        let mut supervisors = Vec::new();
        let mut join = false;
        let mut tick_ms = 10u64;
        let mut seed = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| usage(format!("{a} needs a value")))
            };
            let number = |v: String, what: &str| {
                v.parse::<u64>()
                    .map_err(|_| usage(format!("{what} '{v}' is not a number")))
            };
            match a.as_str() {
                "--id" => id = Some(number(value()?, "--id")? as NodeId),
                "--listen" => listen = Some(value()?),
                "--peer" => {
                    let v = value()?;
                    let (n, addr) = v
                        .split_once('=')
                        .ok_or_else(|| usage(format!("--peer '{v}' is not ID=HOST:PORT")))?;
                    peers.insert(
                        number(n.to_string(), "peer id")? as NodeId,
                        addr.to_string(),
                    );
                }
                "--supervisors" => {
                    for s in value()?.split(',') {
                        supervisors.push(number(s.to_string(), "supervisor")? as NodeId);
                    }
                }
                "--join" => join = true,
                "--tick-ms" => tick_ms = number(value()?, "--tick-ms")?.max(1),
                "--seed" => seed = Some(number(value()?, "--seed")?),
                "-h" | "--help" => return Err(usage("usage:".into())),
                other => return Err(usage(format!("unknown argument {other}"))),
            }
        }
        let id = id.ok_or_else(|| usage("--id is required".into()))?;
        let listen = listen.ok_or_else(|| usage("--listen is required".into()))?;
        if peers.contains_key(&id) {
            return Err(usage(format!("--peer lists this node's own id {id}")));
        }
        Ok(DaemonConfig {
            id,
            listen,
            peers,
            supervisors,
            join,
            tick: Duration::from_millis(tick_ms),
            seed: seed.unwrap_or(u64::from(id)),
        })
    }
}

enum Event {
    Frame(NodeId, Msg),
    Command(String),
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
}

impl Links {
    fn send(&mut self, to: NodeId, msg: &Msg) {
        let tx = self.writers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel::<Msg>();
            let (addrs, me, secret) = (self.addrs.clone(), self.me, self.secret.clone());
            self.threads.push(std::thread::spawn(move || {
                write_link(me, to, &secret, addrs, rx)
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

/// Writes messages to one peer in order; reconnects once per failed message, then gives up
/// on that message (the protocol retries what matters).
fn write_link(
    me: NodeId,
    to: NodeId,
    secret: &ClusterSecret,
    addrs: Arc<Mutex<BTreeMap<NodeId, String>>>,
    rx: Receiver<Msg>,
) {
    let mut link: Option<(TcpStream, Session)> = None;
    let mut warned = false;
    while let Ok(msg) = rx.recv() {
        for attempt in 0..2 {
            if link.is_none() {
                let addr = addrs.lock().map(|a| a.get(&to).cloned()).ok().flatten();
                let Some(addr) = addr else {
                    break;
                };
                match open_link(me, &addr, secret) {
                    Ok(l) => {
                        link = Some(l);
                        warned = false;
                    }
                    Err(why) => {
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
    loop {
        match session.rx.recv::<Msg>(&mut s) {
            Ok(msg) => {
                if tx.send(Event::Frame(from, msg)).is_err() {
                    return;
                }
            }
            Err(fabric::FabricError::WireClosed { .. }) => return,
            Err(e) => {
                eprintln!("dropped connection from node {from} ({peer}): {e}");
                return;
            }
        }
    }
}

/// Runs a node until it leaves the configuration; returns the reason.
pub fn run(cfg: DaemonConfig, secret: ClusterSecret) -> Result<String> {
    let listener = TcpListener::bind(&cfg.listen).map_err(|e| AdaptError::Io {
        what: format!("listening on {}", cfg.listen),
        source: e,
    })?;
    run_on(cfg, listener, secret)
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
    };
    run_on(cfg, listener, secret)
}

/// Runs a node on an already bound listener.
pub fn run_on(cfg: DaemonConfig, listener: TcpListener, secret: ClusterSecret) -> Result<String> {
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
    ncfg.joining = cfg.join.then(|| listen.clone());
    let mut node = Node::new(ncfg, vec![Box::new(KvService::new())])?;

    let mut addrs = cfg.peers.clone();
    addrs.insert(cfg.id, listen.clone());
    let addrs = Arc::new(Mutex::new(addrs));
    let mut links = Links {
        me: cfg.id,
        secret: secret.clone(),
        addrs: addrs.clone(),
        writers: BTreeMap::new(),
        threads: Vec::new(),
    };
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
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines().map_while(|l| l.ok()) {
                if tx.send(Event::Command(line)).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready id={} listen={listen}", cfg.id);
    let _ = out.flush();
    let mut known_joins = 0usize;
    let mut next_tick = Instant::now() + cfg.tick;
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Event::Frame(from, msg)) => node.receive(from, msg),
            Ok(Event::Command(line)) => {
                let reply = command(&mut node, &line);
                let _ = writeln!(out, "{reply}");
            }
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
            match o {
                Output::Send { to, msg } => links.send(to, &msg),
                Output::Response { id, payload } => {
                    let _ = writeln!(out, "{}", answer_line(id, &payload));
                }
                Output::Stable { epoch } => {
                    let members: Vec<String> =
                        node.members().iter().map(|m| m.to_string()).collect();
                    let _ = writeln!(
                        out,
                        "stable {epoch} t={:.3} members={}",
                        now_ms(),
                        members.join(",")
                    );
                }
                Output::Phase { epoch, phase } => {
                    let _ = writeln!(out, "phase {epoch} {phase} t={:.3}", now_ms());
                }
                Output::Stopped { reason } => stopped = Some(reason),
                Output::Log(line) => eprintln!("node {}: {line}", cfg.id),
            }
        }
        let _ = out.flush();
        if let Some(reason) = stopped {
            links.close();
            let _ = writeln!(out, "stopped {reason}");
            let _ = out.flush();
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
            let Some(svc) = node.service_mut(0) else {
                return "err no key-value service".into();
            };
            for &k in &mine {
                svc.receive(k, state.clone());
            }
            format!("ok fill {}", mine.len())
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
