//! Local mode: K node daemons on this machine, wired through a bootstrap service on loopback.
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;

use crate::error::{LauncherError, Result};

/// How to run a local job.
#[derive(Debug, Clone)]
pub struct LocalJob {
    pub nodes: usize,
    /// Path of the krund binary.
    pub krund: PathBuf,
    /// Extra environment for every node (e.g. KRUN_FABRIC_PROVIDER).
    pub env: Vec<(String, String)>,
    /// The whole job is killed after this long.
    pub timeout: Duration,
}

impl LocalJob {
    pub fn new(nodes: usize) -> Result<LocalJob> {
        if nodes == 0 {
            return Err(LauncherError::Usage("--local needs at least 1 node".into()));
        }
        Ok(LocalJob {
            nodes,
            krund: default_krund()?,
            env: Vec::new(),
            timeout: Duration::from_secs(300),
        })
    }
}

/// `KRUN_KRUND`, else `krund` next to the running executable.
pub fn default_krund() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("KRUN_KRUND") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| LauncherError::Io {
        context: "locating the krun executable".into(),
        source: e,
    })?;
    Ok(exe.with_file_name("krund"))
}

/// Kills and reaps the node processes it holds unless they were already reaped.
struct Nodes(Vec<Option<Child>>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Exit code as srun reports it: the status code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs the job; streams each node's output prefixed with `[node i]`; returns the highest
/// node exit code.
pub fn run(job: &LocalJob) -> Result<i32> {
    let server = BootstrapServer::start("127.0.0.1:0", job.nodes, Duration::from_secs(60))?;
    let (tx, rx) = mpsc::channel::<()>();
    let mut nodes = Nodes(Vec::with_capacity(job.nodes));
    let mut forwarders = Vec::new();
    for node in 0..job.nodes {
        let mut cmd = Command::new(&job.krund);
        cmd.arg("--bootstrap")
            .arg(server.addr().to_string())
            .arg("--node-id")
            .arg(node.to_string())
            .arg("--nnodes")
            .arg(job.nodes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &job.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| LauncherError::Spawn {
            program: job.krund.display().to_string(),
            source: e,
        })?;
        forwarders.push(forward(
            child.stdout.take().expect("piped"),
            node,
            false,
            tx.clone(),
        ));
        forwarders.push(forward(
            child.stderr.take().expect("piped"),
            node,
            true,
            tx.clone(),
        ));
        nodes.0.push(Some(child));
    }
    drop(tx);
    let deadline = Instant::now() + job.timeout;
    let mut worst = 0;
    let mut remaining = job.nodes;
    while remaining > 0 {
        let mut failed = false;
        for (node, slot) in nodes.0.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait().map_err(|e| LauncherError::Io {
                context: format!("waiting for node {node}"),
                source: e,
            })? {
                let code = exit_code(status);
                if code != 0 {
                    eprintln!(
                        "krun: node {node} (pid {}) exited with code {code}",
                        child.id()
                    );
                    failed = true;
                }
                worst = worst.max(code);
                *slot = None;
                remaining -= 1;
            }
        }
        if failed && remaining > 0 {
            // The others would wait for the failed node until their own timeouts: end them now.
            eprintln!("krun: stopping the {remaining} remaining node(s)");
            for c in nodes.0.iter_mut().flatten() {
                let _ = c.kill();
            }
        }
        if remaining > 0 {
            if Instant::now() >= deadline {
                return Err(LauncherError::JobTimeout(job.timeout));
            }
            let _ = rx.recv_timeout(Duration::from_millis(20));
        }
    }
    for f in forwarders {
        let _ = f.join();
    }
    if worst == 0 {
        server.join()?;
    }
    Ok(worst)
}

fn forward(
    stream: impl Read + Send + 'static,
    node: usize,
    is_err: bool,
    wake: mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if is_err {
                eprintln!("[node {node}] {line}");
            } else {
                println!("[node {node}] {line}");
            }
        }
        let _ = wake.send(());
    })
}
