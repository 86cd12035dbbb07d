//! The node processes krun runs for a job (children of its own, or processes a host's
//! daemon runs for it) and the forwarding of their output and of krun's stdin.
use std::io::{Read, Write};
use std::process::Child;
use std::sync::{mpsc, Arc, Mutex};

use crate::daemon::{self, DaemonControl, DaemonOutput, FromDaemon, ToDaemon};
use crate::inject::child_pids;
use crate::ranks::exit_code;

/// A node process: a child of ours (local, srun, ssh) or one a host's daemon runs for us.
pub(crate) enum NodeProc {
    Child(Child),
    Remote {
        host: String,
        control: Arc<Mutex<DaemonControl>>,
        /// The exit code, and whether the connection was lost instead.
        exit: Arc<Mutex<Option<(i32, bool)>>>,
    },
}

impl NodeProc {
    pub(crate) fn try_wait(&mut self) -> std::io::Result<Option<i32>> {
        match self {
            NodeProc::Child(c) => {
                let status = c.try_wait()?;
                if status.is_some() {
                    crate::ranks::remove_shm_segments(c.id());
                }
                Ok(status.map(exit_code))
            }
            NodeProc::Remote { exit, .. } => {
                Ok(exit.lock().expect("exit lock").map(|(code, _)| code))
            }
        }
    }

    /// `--inject-failure`: SIGKILL of the node process and of its ranks (its children, read
    /// before it dies; a remote node's ranks die with it, PR_SET_PDEATHSIG). Returns what
    /// was killed.
    pub(crate) fn inject_failure(&self) -> String {
        match self {
            NodeProc::Child(c) => {
                let pid = c.id();
                let ranks = child_pids(pid);
                // SAFETY: kill(2) of our own child by PID (not reaped yet), then of its
                // children, read from /proc just before: the ranks it started.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                    for &r in &ranks {
                        libc::kill(r as i32, libc::SIGKILL);
                    }
                }
                format!("krund pid {pid} and its ranks' pids {ranks:?}")
            }
            NodeProc::Remote { host, .. } => {
                self.signal(libc::SIGKILL);
                format!("the node process on host {host} (its ranks die with it)")
            }
        }
    }

    fn signal(&self, sig: i32) {
        match self {
            // SAFETY: kill(2) of our own child by PID; it is not reaped yet (still held).
            NodeProc::Child(c) => unsafe {
                libc::kill(c.id() as i32, sig);
            },
            NodeProc::Remote { control, .. } => {
                if let Ok(mut c) = control.lock() {
                    let _ = c.send(&ToDaemon::Signal(sig));
                }
            }
        }
    }

    /// True when a remote node's host or daemon died under it.
    pub(crate) fn is_lost(&self) -> bool {
        matches!(self, NodeProc::Remote { exit, .. } if matches!(*exit.lock().expect("exit lock"), Some((_, true))))
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            NodeProc::Child(c) => format!("pid {}", c.id()),
            NodeProc::Remote { host, .. } => format!("on host {host}"),
        }
    }
}

/// Kills and reaps the node processes it holds unless they were already reaped; a remote
/// node process dies with its connection.
pub(crate) struct Children(pub(crate) Vec<Option<NodeProc>>);

impl Children {
    pub(crate) fn signal_all(&self, sig: i32) {
        for c in self.0.iter().flatten() {
            c.signal(sig);
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            match c {
                NodeProc::Child(c) => {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                NodeProc::Remote { control, .. } => {
                    if let Ok(c) = control.lock() {
                        c.shutdown();
                    }
                }
            }
        }
    }
}

/// Sends our stdin to a daemon (for its node's rank 0) as `Stdin` frames; an empty one at
/// EOF. Detached: a job that ends first simply leaves it blocked on our stdin.
pub(crate) fn forward_stdin(control: Arc<Mutex<DaemonControl>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut input = std::io::stdin().lock();
        loop {
            let n = input.read(&mut buf).unwrap_or(0);
            let sent = match control.lock() {
                Ok(mut c) => c.send(&ToDaemon::Stdin(buf[..n].to_vec())),
                Err(_) => break,
            };
            if n == 0 || sent.is_err() {
                break;
            }
        }
    });
}

/// Reads a daemon's frames for one node: output lines, then the exit code. A connection
/// that ends without an exit code means the host or its daemon died.
pub(crate) fn forward_remote(
    mut output: DaemonOutput,
    host: String,
    what: String,
    prefix: Option<String>,
    exit: Arc<Mutex<Option<(i32, bool)>>>,
    wake: mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let prefix = prefix.unwrap_or_default();
        // Daemons send heartbeats: silence this long means the host or its link is gone.
        let (code, lost) = loop {
            match output.next(daemon::HOST_SILENCE_LIMIT) {
                Ok(FromDaemon::Stdout(line)) => {
                    let _ = std::io::stdout()
                        .lock()
                        .write_all(&[prefix.as_bytes(), &line].concat());
                }
                Ok(FromDaemon::Stderr(line)) => {
                    let _ = std::io::stderr()
                        .lock()
                        .write_all(&[prefix.as_bytes(), &line].concat());
                }
                Ok(FromDaemon::Exit(c)) => break (c, false),
                Ok(FromDaemon::Refused(why)) => {
                    eprintln!("krun: host {host} refused {what}: {why}");
                    break (255, true);
                }
                Ok(_) => {}
                Err(e) => {
                    let why = match &e {
                        fabric::FabricError::Io { source, .. }
                            if matches!(
                                source.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            format!("no heartbeat for {:?}", daemon::HOST_SILENCE_LIMIT)
                        }
                        _ => e.to_string(),
                    };
                    eprintln!("krun: lost {what} on host {host}: {why}");
                    break (255, true);
                }
            }
        };
        *exit.lock().expect("exit lock") = Some((code, lost));
        let _ = wake.send(());
    })
}

/// Copies a node's output to ours line by line (whole lines, so nodes never interleave
/// inside a line), with an optional prefix.
pub(crate) fn forward(
    stream: impl Read + Send + 'static,
    prefix: Option<String>,
    is_err: bool,
    wake: mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        crate::ranks::copy_lines(stream, prefix.as_deref(), is_err);
        let _ = wake.send(());
    })
}
