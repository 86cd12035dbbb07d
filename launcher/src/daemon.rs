//! Host mode: `krund --listen ADDR` runs as a long-lived daemon on each host; `krun --hosts`
//! connects to it, proves it holds the cluster secret, and asks it to start a node process
//! for a job (or reports its status).
//!
//! The connection speaks the wire toolkit's [`Protocol::Control`] ([`fabric::wire`]): a
//! mutual handshake over the cluster secret (within [`HANDSHAKE_TIMEOUT`], at most
//! [`fabric::wire::MAX_HANDSHAKES`] at once), then every frame authenticated and sequenced,
//! so a relay between krun and krund can neither alter nor replay a request. krun sends
//! [`ToDaemon::Run`] or [`ToDaemon::Status`]; while a node process runs the daemon sends
//! output lines, a heartbeat every [`HEARTBEAT`] and finally [`FromDaemon::Exit`], and krun
//! may send signals and stdin for the node process.
//!
//! A daemon needs the cluster secret; without one it runs only in insecure mode
//! ([`Access::Insecure`]), which is refused unless it listens on a loopback address.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::secret::ClusterSecret;
use fabric::wire::{
    Deadline, FrameReader, FrameWriter, HandshakeSlots, Protocol, Session, HANDSHAKE_TIMEOUT,
};
use fabric::FabricError;
use serde::{Deserialize, Serialize};

use crate::error::{LauncherError, Result};
use crate::ranks::{exit_code, for_each_line};

const P: Protocol = Protocol::Control;
/// Bound on one control frame (a run request carries krund's arguments and environment).
const MAX_FRAME: usize = 4 << 20;
/// How often a daemon tells krun it is alive while a node process runs.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// Silence after which krun declares a host lost.
pub const HOST_SILENCE_LIMIT: Duration = Duration::from_secs(5);
/// The port krund listens on when none is given.
pub const DEFAULT_PORT: u16 = 7171;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LauncherError {
    let context = context.into();
    move |source| LauncherError::Io { context, source }
}

/// A request to start a node process: krund's arguments and extra environment.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRequest {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Shows the environment's names only: its values include the job's secret.
impl std::fmt::Debug for RunRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("RunRequest")
            .field("args", &self.args)
            .field("env", &names)
            .finish()
    }
}

/// What krun says to a daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToDaemon {
    /// Start a node process (the first message of a connection).
    Run(RunRequest),
    /// Report what this daemon runs (the first message of a connection).
    Status,
    /// Input for the node process; empty at end of input.
    Stdin(Vec<u8>),
    /// Send this signal to the node process.
    Signal(i32),
}

impl ToDaemon {
    pub fn name(&self) -> &'static str {
        match self {
            ToDaemon::Run(_) => "run",
            ToDaemon::Status => "status",
            ToDaemon::Stdin(_) => "stdin",
            ToDaemon::Signal(_) => "signal",
        }
    }
}

/// What a daemon says to krun.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromDaemon {
    Status(String),
    /// One line of the node process's standard output.
    Stdout(Vec<u8>),
    /// One line of its standard error.
    Stderr(Vec<u8>),
    /// The node process still runs.
    Heartbeat,
    /// The node process ended with this code (128 + signal when killed).
    Exit(i32),
    /// The request was refused.
    Refused(String),
}

/// How a daemon admits clients.
#[derive(Clone, Debug)]
pub enum Access {
    /// Clients must prove they hold the cluster secret.
    Secret(ClusterSecret),
    /// `--insecure`: any local client may run anything as this daemon's user. Only on a
    /// loopback address.
    Insecure,
}

impl Access {
    fn key(&self) -> ClusterSecret {
        match self {
            Access::Secret(s) => s.clone(),
            Access::Insecure => ClusterSecret::insecure(),
        }
    }
}

/// The daemon's refusal to start in insecure mode on a non-loopback address (or without
/// a secret and without `--insecure`), naming what to do.
pub fn check_access(
    listen: &SocketAddr,
    secret: Option<ClusterSecret>,
    insecure: bool,
) -> Result<Access> {
    match (secret, insecure) {
        (Some(s), _) => Ok(Access::Secret(s)),
        (None, false) => Err(LauncherError::Usage(
            "krund --listen refuses to start without a cluster secret: set KRUN_SECRET_FILE \
             (a 0600 file holding the secret, the same on every host) or KRUN_SECRET (hex); \
             --insecure runs without one on a loopback address only"
                .into(),
        )),
        (None, true) if !listen.ip().is_loopback() => Err(LauncherError::Usage(format!(
            "--insecure is accepted only on a loopback address, not {}: anyone who reaches \
             the port could run anything as this user; set KRUN_SECRET_FILE instead",
            listen.ip()
        ))),
        (None, true) => Ok(Access::Insecure),
    }
}

/// One running node process, for `krun status`.
#[derive(Debug, Clone)]
struct Running {
    pid: u32,
    peer: SocketAddr,
    started: Instant,
    summary: String,
}

struct Daemon {
    secret: ClusterSecret,
    krund: PathBuf,
    started: Instant,
    running: Mutex<Vec<Running>>,
}

/// Runs the daemon; returns only when it cannot start. Each client is handshaken and served
/// on its own thread; at most [`fabric::wire::MAX_HANDSHAKES`] unauthenticated connections
/// at once (more wait in the backlog), each given [`HANDSHAKE_TIMEOUT`] for its handshake
/// and first request.
pub fn serve(listen: SocketAddr, access: Access) -> Result<()> {
    if matches!(access, Access::Insecure) && !listen.ip().is_loopback() {
        return Err(LauncherError::Usage(format!(
            "insecure mode is accepted only on a loopback address, not {}",
            listen.ip()
        )));
    }
    let listener = TcpListener::bind(listen).map_err(io(format!("listening on {listen}")))?;
    let krund = std::env::current_exe().map_err(io("locating the krund executable"))?;
    let bound = listener.local_addr().map_err(io("listener address"))?;
    match access {
        Access::Secret(_) => eprintln!("krund: listening on {bound} (cluster secret required)"),
        Access::Insecure => {
            eprintln!("krund: listening on {bound} (INSECURE: no cluster secret)");
            eprintln!(
                "krund: WARNING: --insecure: any local user who reaches {bound} can run any \
                 program as this daemon's user (uid {}); use KRUN_SECRET_FILE",
                // SAFETY: getuid(2) cannot fail.
                unsafe { libc::getuid() }
            );
        }
    }
    let daemon = Arc::new(Daemon {
        secret: access.key(),
        krund,
        started: Instant::now(),
        running: Mutex::new(Vec::new()),
    });
    let slots = HandshakeSlots::default();
    loop {
        // A free handshake slot first: more connections wait in the kernel's backlog.
        let slot = slots.take();
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or the like: say so, and do not spin.
                eprintln!("krund: accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let d = daemon.clone();
        let spawned = std::thread::Builder::new()
            .name("krund-client".into())
            .spawn(move || {
                if let Err(e) = d.client(stream, peer, slot) {
                    eprintln!("krund: client {peer}: {e}");
                }
            });
        if let Err(e) = spawned {
            eprintln!("krund: refusing {peer}: cannot start a thread: {e}");
        }
    }
}

/// The sending half of a control connection, shared by the threads that write to it.
type Out = Arc<Mutex<(TcpStream, FrameWriter)>>;

fn send(out: &Out, msg: &FromDaemon) -> Result<()> {
    let mut guard = out
        .lock()
        .map_err(|_| LauncherError::Usage("a control writer panicked".into()))?;
    let (stream, tx) = &mut *guard;
    Ok(tx.send(stream, msg)?)
}

impl Daemon {
    fn client(
        &self,
        mut s: TcpStream,
        peer: SocketAddr,
        slot: fabric::wire::HandshakeSlot,
    ) -> Result<()> {
        s.set_nodelay(true).ok();
        let Session { mut tx, mut rx } =
            Session::server_within(&s, &self.secret, P, HANDSHAKE_TIMEOUT)?;
        rx.set_max_payload(MAX_FRAME);
        let first = rx.recv::<ToDaemon>(&mut Deadline::new(&s, HANDSHAKE_TIMEOUT));
        s.set_read_timeout(None).ok();
        s.set_write_timeout(None).ok();
        drop(slot);
        match first? {
            ToDaemon::Status => Ok(tx.send(&mut s, &FromDaemon::Status(self.status()))?),
            ToDaemon::Run(req) => self.run(s, tx, rx, peer, req),
            other => {
                let _ = tx.send(
                    &mut s,
                    &FromDaemon::Refused("expected a run or status request".into()),
                );
                Err(LauncherError::Usage(format!(
                    "unexpected first request {}",
                    other.name()
                )))
            }
        }
    }

    fn status(&self) -> String {
        let running = self.running.lock().expect("running lock");
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut out = format!(
            "host {} pid {} up {}s state up jobs {}\n",
            host.trim(),
            std::process::id(),
            self.started.elapsed().as_secs(),
            running.len()
        );
        for r in running.iter() {
            out += &format!(
                "  node process pid {} for {} running {}s: {}\n",
                r.pid,
                r.peer,
                r.started.elapsed().as_secs(),
                r.summary
            );
        }
        out
    }

    fn run(
        &self,
        s: TcpStream,
        tx: FrameWriter,
        mut rx: FrameReader,
        peer: SocketAddr,
        req: RunRequest,
    ) -> Result<()> {
        let mut cmd = Command::new(&self.krund);
        cmd.args(&req.args)
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl and the descriptor call are async-signal-safe; the node process (and
        // through it its ranks) dies with the daemon, so a killed host leaves nothing behind,
        // and it inherits none of the daemon's descriptors (client connections, listeners).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                ghost::descriptors::cloexec_above_stdio()
            });
        }
        let mut child = cmd.spawn().map_err(|e| LauncherError::Spawn {
            program: self.krund.display().to_string(),
            source: e,
        })?;
        let pid = child.id();
        self.running.lock().expect("running lock").push(Running {
            pid,
            peer,
            started: Instant::now(),
            summary: req.args.join(" "),
        });
        let out: Out = Arc::new(Mutex::new((
            s.try_clone().map_err(io("cloning the client socket"))?,
            tx,
        )));
        let pump = |stream: Option<Box<dyn Read + Send>>, err: bool| {
            let out = out.clone();
            std::thread::spawn(move || {
                let Some(stream) = stream else { return };
                for_each_line(stream, None, |line| {
                    let msg = if err {
                        FromDaemon::Stderr(line.to_vec())
                    } else {
                        FromDaemon::Stdout(line.to_vec())
                    };
                    send(&out, &msg).is_ok()
                });
            })
        };
        let pumps = [
            pump(
                child
                    .stdout
                    .take()
                    .map(|o| Box::new(o) as Box<dyn Read + Send>),
                false,
            ),
            pump(
                child
                    .stderr
                    .take()
                    .map(|e| Box::new(e) as Box<dyn Read + Send>),
                true,
            ),
        ];
        // Signals from the client; a vanished client ends the node process.
        let mut control = s;
        // krun's stdin for rank 0 arrives as `Stdin` frames, its end as an empty one. A
        // frame that fails authentication, is replayed or does not decode ends the node
        // process like a vanished client.
        let mut stdin = child.stdin.take();
        std::thread::spawn(move || loop {
            match rx.recv::<ToDaemon>(&mut control) {
                Ok(ToDaemon::Stdin(data)) => {
                    if data.is_empty() {
                        stdin = None;
                    } else if let Some(w) = stdin.as_mut() {
                        if w.write_all(&data).is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(ToDaemon::Signal(sig)) => {
                    // SAFETY: kill(2) of our own child by PID.
                    unsafe { libc::kill(pid as i32, sig) };
                }
                Ok(other) => eprintln!(
                    "krund: client {peer}: ignoring a {} request during a run",
                    other.name()
                ),
                Err(e) => {
                    if !matches!(e, FabricError::WireClosed { .. }) {
                        eprintln!("krund: client {peer}: {e}; ending its node process");
                    }
                    // SAFETY: as above; the child may already be gone, then this is a no-op.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    break;
                }
            }
        });
        // Heartbeats let krun tell a silent host (cut link, frozen machine) from a quiet job.
        let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let beat = {
            let (out, running) = (out.clone(), running.clone());
            std::thread::spawn(move || {
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    if send(&out, &FromDaemon::Heartbeat).is_err() {
                        break;
                    }
                    std::thread::sleep(HEARTBEAT);
                }
            })
        };
        let status = child.wait().map_err(io("waiting for the node process"))?;
        crate::ranks::remove_shm_segments(pid);
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = beat.join();
        for p in pumps {
            let _ = p.join();
        }
        self.running
            .lock()
            .expect("running lock")
            .retain(|r| r.pid != pid);
        send(&out, &FromDaemon::Exit(exit_code(status)))
    }
}

/// A client connection to a host's krund, authenticated.
pub struct DaemonClient {
    pub stream: TcpStream,
    pub host: String,
    session: Session,
}

/// The sending half of a running node's connection: signals and stdin.
pub struct DaemonControl {
    stream: TcpStream,
    tx: FrameWriter,
}

impl DaemonControl {
    pub fn send(&mut self, msg: &ToDaemon) -> Result<()> {
        Ok(self.tx.send(&mut self.stream, msg)?)
    }

    /// Closes the connection (the daemon then kills the node process).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The receiving half of a running node's connection: output, heartbeats, the exit code.
pub struct DaemonOutput {
    stream: TcpStream,
    rx: FrameReader,
}

impl DaemonOutput {
    /// The next message; an error after `silence` without any (heartbeats included).
    pub fn next(&mut self, silence: Duration) -> fabric::Result<FromDaemon> {
        self.stream.set_read_timeout(Some(silence)).ok();
        self.rx.recv(&mut self.stream)
    }
}

impl DaemonClient {
    /// Connects to `host` (name or IP, with optional `:port`) within `timeout`; `None`: the
    /// daemon must run in insecure mode.
    pub fn connect(
        host: &str,
        timeout: Duration,
        secret: Option<&ClusterSecret>,
    ) -> Result<DaemonClient> {
        let target = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:{DEFAULT_PORT}")
        };
        let not_answering = |why: String| LauncherError::Host {
            host: host.to_string(),
            message: format!("does not answer at {target}: {why}"),
        };
        let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&target)
            .map_err(|e| not_answering(format!("cannot resolve: {e}")))?
            .collect();
        let addr = addrs
            .first()
            .ok_or_else(|| not_answering("no address".into()))?;
        let stream =
            TcpStream::connect_timeout(addr, timeout).map_err(|e| not_answering(e.to_string()))?;
        stream.set_nodelay(true).ok();
        let insecure = ClusterSecret::insecure();
        let key = secret.unwrap_or(&insecure);
        let mut session =
            Session::client_within(&stream, key, P, timeout).map_err(|e| match e {
                FabricError::WireRefused { reason, .. } => LauncherError::Host {
                    host: host.to_string(),
                    message: format!("refused us: {reason}"),
                },
                FabricError::WireAuth { .. } => LauncherError::Host {
                    host: host.to_string(),
                    message: "failed to prove it holds the cluster secret".into(),
                },
                other => not_answering(other.to_string()),
            })?;
        session.rx.set_max_payload(MAX_FRAME);
        Ok(DaemonClient {
            stream,
            host: host.to_string(),
            session,
        })
    }

    /// Our address as seen on the way to this host: where the host can reach us back.
    pub fn local_ip(&self) -> Result<std::net::IpAddr> {
        Ok(self.stream.local_addr().map_err(io("local address"))?.ip())
    }

    pub fn status(mut self) -> Result<String> {
        let host = self.host.clone();
        let ctx = |e: FabricError| LauncherError::Host {
            host: host.clone(),
            message: format!("status: {e}"),
        };
        self.session
            .tx
            .send(&mut self.stream, &ToDaemon::Status)
            .map_err(ctx)?;
        self.stream.set_read_timeout(Some(HOST_SILENCE_LIMIT)).ok();
        match self
            .session
            .rx
            .recv::<FromDaemon>(&mut self.stream)
            .map_err(ctx)?
        {
            FromDaemon::Status(text) => Ok(text),
            FromDaemon::Refused(why) => Err(LauncherError::Host {
                host: self.host,
                message: format!("refused the status request: {why}"),
            }),
            other => Err(LauncherError::Host {
                host: self.host,
                message: format!("answered a status request with {other:?}"),
            }),
        }
    }

    /// Asks the daemon to start a node process; returns the connection's two halves.
    pub fn start(mut self, request: RunRequest) -> Result<(DaemonControl, DaemonOutput)> {
        self.session
            .tx
            .send(&mut self.stream, &ToDaemon::Run(request))
            .map_err(|e| LauncherError::Host {
                host: self.host.clone(),
                message: format!("sending the job: {e}"),
            })?;
        let reader = self
            .stream
            .try_clone()
            .map_err(io("cloning a daemon connection"))?;
        Ok((
            DaemonControl {
                stream: self.stream,
                tx: self.session.tx,
            },
            DaemonOutput {
                stream: reader,
                rx: self.session.rx,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_the_wire_codec() {
        let r = ToDaemon::Run(RunRequest {
            args: vec!["--node-id".into(), "3".into(), "".into()],
            env: vec![("A".into(), "b=c".into())],
        });
        let bytes = fabric::wire::encode(P, &r).unwrap();
        assert_eq!(fabric::wire::decode::<ToDaemon>(P, &bytes).unwrap(), r);
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(fabric::wire::decode::<ToDaemon>(P, &longer).is_err());
        assert!(fabric::wire::decode::<ToDaemon>(P, &[200, 1]).is_err());
        assert!(fabric::wire::decode::<ToDaemon>(P, &[0, 255, 255, 255, 255, 15]).is_err());
        let secret_env = RunRequest {
            args: vec![],
            env: vec![("KRUN_SECRET".into(), "00112233".into())],
        };
        let shown = format!("{secret_env:?}");
        assert!(
            shown.contains("KRUN_SECRET") && !shown.contains("00112233"),
            "{shown}"
        );
    }

    #[test]
    fn no_secret_is_refused_and_insecure_only_on_loopback() {
        let lo: SocketAddr = "127.0.0.1:7171".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7171".parse().unwrap();
        let e = check_access(&lo, None, false).unwrap_err().to_string();
        assert!(
            e.contains("KRUN_SECRET_FILE") && e.contains("KRUN_SECRET"),
            "{e}"
        );
        let e = check_access(&any, None, true).unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        assert!(matches!(
            check_access(&lo, None, true),
            Ok(Access::Insecure)
        ));
        let s = ClusterSecret::new(b"a secret of enough length".to_vec()).unwrap();
        assert!(matches!(
            check_access(&any, Some(s), false),
            Ok(Access::Secret(_))
        ));
        assert!(serve(any, Access::Insecure).is_err());
    }
}
