//! Bounded TCP probe for network-namespace tests.
//!
//! ```text
//! krun-netns-probe serve ADDR:PORT MAX_CONNS MAX_SECS
//!     listen, print "listening ADDR:PORT" once bound, echo one line per connection back as
//!     "echo <line> from <peer-ip>", exit after MAX_CONNS connections or MAX_SECS seconds
//! krun-netns-probe connect ADDR:PORT MESSAGE ATTEMPTS TIMEOUT_MS
//!     connect (each attempt bounded by TIMEOUT_MS, 100 ms apart), send MESSAGE, print the
//!     reply line; exit 0 on a reply, 1 otherwise
//! krun-netns-probe hold-cluster NODES MAX_SECS
//!     create a NetnsCluster, print "subnet S", one "netns NAME" per namespace, "ready", then
//!     sleep MAX_SECS and drop it (tests SIGKILL it to leave stale state for reap_stale)
//! ```
use clap::Parser;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

/// Bounded TCP probe for network-namespace tests.
#[derive(Debug, Parser)]
#[command(name = "krun-netns-probe", version)]
enum Probe {
    /// Listen, echo one line per connection, exit after MAX_CONNS connections or MAX_SECS.
    Serve {
        addr: SocketAddr,
        max_conns: u32,
        max_secs: u64,
    },
    /// Connect (ATTEMPTS tries of TIMEOUT_MS), send MESSAGE, print the reply line.
    Connect {
        addr: SocketAddr,
        message: String,
        attempts: u32,
        timeout_ms: u64,
    },
    /// Create a namespace cluster, print its names and "ready", hold it MAX_SECS.
    HoldCluster { nodes: usize, max_secs: u64 },
}

fn serve(addr: SocketAddr, max_conns: u32, max_secs: u64) -> Result<(), String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    println!("listening {}", l.local_addr().map_err(|e| e.to_string())?);
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut served = 0;
    while served < max_conns && Instant::now() < deadline {
        match l.accept() {
            Ok((s, peer)) => {
                served += 1;
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut r = BufReader::new(&s);
                if r.read_line(&mut line).is_ok() {
                    let mut w = &s;
                    let _ = writeln!(w, "echo {} from {}", line.trim_end(), peer.ip());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Ok(())
}

fn connect(addr: SocketAddr, msg: &str, attempts: u32, timeout_ms: u64) -> Result<String, String> {
    let t = Duration::from_millis(timeout_ms);
    let mut last = String::from("no attempt");
    for _ in 0..attempts.max(1) {
        match TcpStream::connect_timeout(&addr, t) {
            Ok(mut s) => {
                s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(t)).map_err(|e| e.to_string())?;
                writeln!(s, "{msg}").map_err(|e| format!("write: {e}"))?;
                let mut line = String::new();
                BufReader::new(&s)
                    .read_line(&mut line)
                    .map_err(|e| format!("read: {e}"))?;
                return Ok(line.trim_end().to_string());
            }
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!("connect {addr}: {last}"))
}

fn hold_cluster(n: usize, secs: u64) -> Result<(), String> {
    let c = cluster_tests::NetnsCluster::create(n, None).map_err(|e| e.to_string())?;
    println!("subnet {}", c.subnet());
    for ns in c.namespaces() {
        println!("netns {ns}");
    }
    println!("ready");
    thread::sleep(Duration::from_secs(secs));
    Ok(())
}

fn main() -> ExitCode {
    let res = match Probe::parse() {
        Probe::Serve {
            addr,
            max_conns,
            max_secs,
        } => serve(addr, max_conns, max_secs),
        Probe::Connect {
            addr,
            message,
            attempts,
            timeout_ms,
        } => connect(addr, &message, attempts, timeout_ms).map(|r| println!("{r}")),
        Probe::HoldCluster { nodes, max_secs } => hold_cluster(nodes, max_secs),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("krun-netns-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
