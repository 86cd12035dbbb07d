//! Host mode: `krund --listen ADDR` runs as a long-lived daemon on each host; `krun --hosts`
//! connects to it, proves it holds the cluster secret, and asks it to start a node process
//! for a job (or reports its status).
//!
//! Frames are `u32 length (LE) | type byte | payload`. The daemon opens with a challenge
//! `"KRD1" | nonce[16]`; the client answers with HMAC-SHA256(secret, nonce | "krund-control");
//! the daemon replies `0` or `1 | reason`. Requests: `R` (run: argument and environment
//! lists) and `S` (status). While a node process runs the daemon sends `O`/`E` (one output
//! line each) and finally `X | i32 exit code`; the client may send `K | i32 signal` and
//! `I | bytes` (stdin for the node process; empty at end of input). The daemon sends `H`
//! every [`HEARTBEAT`] while the node process runs.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::secret::{ClusterSecret, MAC_LEN};

use crate::error::{LauncherError, Result};
use crate::ranks::{exit_code, for_each_line};

const MAGIC: &[u8; 4] = b"KRD1";
const CONTEXT: &[u8] = b"krund-control";
const MAX_FRAME: usize = 16 << 20;
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

pub fn write_frame(s: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    s.write_all(&buf)
}

pub fn read_frame(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is out of bounds"),
        ));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    let kind = buf.remove(0);
    Ok((kind, buf))
}

fn encode_strings(out: &mut Vec<u8>, items: &[String]) {
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i.as_bytes());
    }
}

fn decode_strings(buf: &[u8], pos: &mut usize) -> Option<Vec<String>> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = buf.get(*pos..*pos + n)?;
        *pos += n;
        Some(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if count > 4096 {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        out.push(String::from_utf8(take(len)?.to_vec()).ok()?);
    }
    Some(out)
}

/// A request to start a node process: krund's arguments and extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl RunRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        encode_strings(&mut out, &self.args);
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        encode_strings(&mut out, &env);
        out
    }

    pub fn decode(buf: &[u8]) -> Option<RunRequest> {
        let mut pos = 0;
        let args = decode_strings(buf, &mut pos)?;
        let env = decode_strings(buf, &mut pos)?
            .into_iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect::<Option<Vec<_>>>()?;
        (pos == buf.len()).then_some(RunRequest { args, env })
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
    secret: Option<ClusterSecret>,
    krund: PathBuf,
    started: Instant,
    running: Mutex<Vec<Running>>,
}

/// Runs the daemon until the listener fails. Each client is served on its own thread.
pub fn serve(listen: SocketAddr, secret: Option<ClusterSecret>) -> Result<()> {
    let listener = TcpListener::bind(listen).map_err(io(format!("listening on {listen}")))?;
    let krund = std::env::current_exe().map_err(io("locating the krund executable"))?;
    eprintln!(
        "krund: listening on {} ({})",
        listener.local_addr().map_err(io("listener address"))?,
        if secret.is_some() {
            "cluster secret required"
        } else {
            "no cluster secret: any client may run jobs"
        }
    );
    let daemon = Arc::new(Daemon {
        secret,
        krund,
        started: Instant::now(),
        running: Mutex::new(Vec::new()),
    });
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let peer = stream.peer_addr().map_err(io("client address"))?;
        let d = daemon.clone();
        std::thread::spawn(move || {
            if let Err(e) = d.client(stream, peer) {
                eprintln!("krund: client {peer}: {e}");
            }
        });
    }
    Ok(())
}

impl Daemon {
    fn client(&self, mut s: TcpStream, peer: SocketAddr) -> Result<()> {
        s.set_nodelay(true).ok();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        let nonce: Vec<u8> = (0..2)
            .flat_map(|_| fabric::random_u64().to_le_bytes())
            .collect();
        let mut challenge = MAGIC.to_vec();
        challenge.extend_from_slice(&nonce);
        write_frame(&mut s, b'C', &challenge).map_err(io("sending the challenge"))?;
        let (_, tag) = read_frame(&mut s).map_err(io("reading the answer to the challenge"))?;
        if let Some(secret) = &self.secret {
            let mut signed = nonce.clone();
            signed.extend_from_slice(CONTEXT);
            if tag.len() != MAC_LEN || !secret.verify(&signed, &tag) {
                let _ = write_frame(&mut s, b'N', b"wrong cluster secret");
                return Err(LauncherError::Usage("refused: wrong cluster secret".into()));
            }
        }
        write_frame(&mut s, b'Y', &[]).map_err(io("welcoming the client"))?;
        let (kind, body) = read_frame(&mut s).map_err(io("reading the request"))?;
        match kind {
            b'S' => {
                let text = self.status();
                write_frame(&mut s, b'S', text.as_bytes()).map_err(io("sending status"))
            }
            b'R' => {
                let req = RunRequest::decode(&body)
                    .ok_or_else(|| LauncherError::Usage("malformed run request".into()))?;
                self.run(s, peer, req)
            }
            other => {
                let _ = write_frame(&mut s, b'N', b"unknown request");
                Err(LauncherError::Usage(format!(
                    "unknown request type {other:#x}"
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

    fn run(&self, s: TcpStream, peer: SocketAddr, req: RunRequest) -> Result<()> {
        s.set_read_timeout(None).ok();
        let mut cmd = Command::new(&self.krund);
        cmd.args(&req.args)
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the node process (and through it its ranks) dies
        // with the daemon, so a killed host leaves nothing behind.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
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
        let out = Arc::new(Mutex::new(
            s.try_clone().map_err(io("cloning the client socket"))?,
        ));
        let pump = |stream: Box<dyn Read + Send>, kind: u8| {
            let out = out.clone();
            std::thread::spawn(move || {
                for_each_line(stream, None, |line| {
                    write_frame(&mut *out.lock().expect("socket lock"), kind, line).is_ok()
                });
            })
        };
        let pumps = [
            pump(Box::new(child.stdout.take().expect("piped")), b'O'),
            pump(Box::new(child.stderr.take().expect("piped")), b'E'),
        ];
        // Signals from the client; a vanished client ends the node process.
        let mut control = s;
        // krun's stdin for rank 0 arrives as `I` frames, its end as an empty `I` frame.
        let mut stdin = child.stdin.take();
        std::thread::spawn(move || loop {
            match read_frame(&mut control) {
                Ok((b'I', data)) => {
                    if data.is_empty() {
                        stdin = None;
                    } else if let Some(w) = stdin.as_mut() {
                        if w.write_all(&data).is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok((b'K', sig)) if sig.len() == 4 => {
                    let sig = i32::from_le_bytes(sig.try_into().expect("4 bytes"));
                    // SAFETY: kill(2) of our own child by PID.
                    unsafe { libc::kill(pid as i32, sig) };
                }
                Ok(_) => {}
                Err(_) => {
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
                    if write_frame(&mut *out.lock().expect("socket lock"), b'H', &[]).is_err() {
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
        let code = exit_code(status);
        let sent = write_frame(
            &mut *out.lock().expect("socket lock"),
            b'X',
            &code.to_le_bytes(),
        );
        sent.map_err(io("sending the exit code"))
    }
}

/// A client connection to a host's krund, authenticated.
pub struct DaemonClient {
    pub stream: TcpStream,
    pub host: String,
}

impl DaemonClient {
    /// Connects to `host` (name or IP, with optional `:port`) within `timeout`.
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
        let mut stream =
            TcpStream::connect_timeout(addr, timeout).map_err(|e| not_answering(e.to_string()))?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(timeout)).ok();
        let (_, challenge) = read_frame(&mut stream).map_err(|e| not_answering(e.to_string()))?;
        if challenge.len() != 20 || &challenge[..4] != MAGIC {
            return Err(not_answering("not a krund daemon".into()));
        }
        let mut signed = challenge[4..].to_vec();
        signed.extend_from_slice(CONTEXT);
        let tag = secret.map_or([0u8; MAC_LEN], |s| s.sign(&signed));
        write_frame(&mut stream, b'A', &tag).map_err(|e| not_answering(e.to_string()))?;
        match read_frame(&mut stream).map_err(|e| not_answering(e.to_string()))? {
            (b'Y', _) => {}
            (_, reason) => {
                return Err(LauncherError::Host {
                    host: host.to_string(),
                    message: format!("refused us: {}", String::from_utf8_lossy(&reason)),
                })
            }
        }
        stream.set_read_timeout(None).ok();
        Ok(DaemonClient {
            stream,
            host: host.to_string(),
        })
    }

    /// Our address as seen on the way to this host: where the host can reach us back.
    pub fn local_ip(&self) -> Result<std::net::IpAddr> {
        Ok(self.stream.local_addr().map_err(io("local address"))?.ip())
    }

    pub fn status(mut self) -> Result<String> {
        write_frame(&mut self.stream, b'S', &[])
            .map_err(io(format!("asking {} for status", self.host)))?;
        let (_, text) =
            read_frame(&mut self.stream).map_err(io(format!("reading status of {}", self.host)))?;
        Ok(String::from_utf8_lossy(&text).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_requests_round_trip_and_garbage_is_rejected() {
        let r = RunRequest {
            args: vec!["--node-id".into(), "3".into(), "".into()],
            env: vec![("A".into(), "b=c".into())],
        };
        assert_eq!(RunRequest::decode(&r.encode()), Some(r.clone()));
        let mut bytes = r.encode();
        bytes.push(0);
        assert_eq!(RunRequest::decode(&bytes), None);
        assert_eq!(RunRequest::decode(&[1, 2]), None);
        assert_eq!(RunRequest::decode(&[255, 255, 255, 255]), None);
    }

    #[test]
    fn frames_round_trip_and_bounds_are_checked() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b'O', b"line\n").unwrap();
        assert_eq!(
            read_frame(&mut buf.as_slice()).unwrap(),
            (b'O', b"line\n".to_vec())
        );
        assert!(read_frame(&mut [0u8, 0, 0, 0].as_slice()).is_err());
        assert!(read_frame(&mut [255u8, 255, 255, 255].as_slice()).is_err());
    }
}
