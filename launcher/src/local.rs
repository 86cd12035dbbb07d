//! Local mode: K node daemons on this machine, wired through bootstrap services on loopback.
//! Without a program the nodes run the built-in RMA exchange workload; with one, they start
//! its ranks.
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;
use fabric::secret::ClusterSecret;

use crate::error::{LauncherError, Result};
use crate::ranks::{exit_code, take_signal, Placement};

/// A user program to run as `ranks` processes.
#[derive(Debug, Clone)]
pub struct ProgramJob {
    pub ranks: usize,
    pub per_node: Option<usize>,
    pub tag_output: bool,
    pub argv: Vec<String>,
}

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
    /// `None`: the built-in exchange workload.
    pub program: Option<ProgramJob>,
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
            timeout: Duration::from_secs(24 * 3600),
            program: None,
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

impl Nodes {
    fn signal_all(&self, sig: i32) {
        for c in self.0.iter().flatten() {
            // SAFETY: kill(2) of our own child by PID; it is not reaped yet (still in the vec).
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the job and returns the highest node exit code (srun's rule: status, or 128+signal).
pub fn run(job: &LocalJob) -> Result<i32> {
    // Nodes and ranks prove they belong to the job with the cluster secret: the configured
    // one (KRUN_SECRET_FILE, which they read themselves) or a fresh one per job.
    let configured = ClusterSecret::from_env()?;
    let secret = configured.clone().unwrap_or_else(ClusterSecret::random);
    let server = BootstrapServer::start_with(
        "127.0.0.1:0",
        job.nodes,
        Duration::from_secs(60),
        Some(secret.clone()),
    )?;
    let placement = match &job.program {
        Some(p) => Some(Placement::block(p.ranks, job.nodes, p.per_node)?),
        None => None,
    };
    // Ranks find each other through their own all-gather service.
    let rank_server = match &job.program {
        Some(p) => Some(BootstrapServer::start_with(
            "127.0.0.1:0",
            p.ranks,
            job.timeout,
            Some(secret.clone()),
        )?),
        None => None,
    };
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
        if let (Some(p), Some(place), Some(rs)) = (&job.program, &placement, &rank_server) {
            cmd.arg("--first-rank")
                .arg(place.first[node].to_string())
                .arg("--local-size")
                .arg(place.count[node].to_string())
                .arg("--size")
                .arg(p.ranks.to_string());
            if p.tag_output {
                cmd.arg("--tag-output");
            }
            cmd.arg("--")
                .args(&p.argv)
                .env("KRUN_BOOTSTRAP", rs.addr().to_string());
            if place.node_of(0) == Some(node) {
                cmd.stdin(Stdio::inherit());
            }
        }
        if configured.is_none() {
            cmd.env("KRUN_SECRET", secret.to_hex());
        }
        for (k, v) in &job.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| LauncherError::Spawn {
            program: job.krund.display().to_string(),
            source: e,
        })?;
        let prefix = job.program.is_none().then(|| format!("[node {node}] "));
        forwarders.push(forward(
            child.stdout.take().expect("piped"),
            prefix.clone(),
            false,
            tx.clone(),
        ));
        forwarders.push(forward(
            child.stderr.take().expect("piped"),
            prefix,
            true,
            tx.clone(),
        ));
        nodes.0.push(Some(child));
    }
    drop(tx);
    let deadline = Instant::now() + job.timeout;
    let mut worst = 0;
    let mut remaining = job.nodes;
    let mut interrupts = 0;
    // Nodes we killed because another failed: their 137 is not the job's story.
    let mut stopped_by_us = false;
    while remaining > 0 {
        if let Some(sig) = take_signal() {
            interrupts += usize::from(sig == libc::SIGINT);
            if interrupts >= 2 {
                eprintln!("krun: second interrupt: killing the job");
                nodes.signal_all(libc::SIGKILL);
            } else {
                nodes.signal_all(sig);
            }
        }
        let mut failed = false;
        for (node, slot) in nodes.0.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let status = child.try_wait().map_err(|e| LauncherError::Io {
                context: format!("waiting for node {node}"),
                source: e,
            })?;
            let Some(status) = status else { continue };
            let code = exit_code(status);
            if code != 0 && job.program.is_none() {
                eprintln!(
                    "krun: node {node} (pid {}) exited with code {code}",
                    child.id()
                );
                failed = true;
            }
            if !stopped_by_us {
                worst = worst.max(code);
            }
            *slot = None;
            remaining -= 1;
        }
        if failed && remaining > 0 {
            // The others would wait for the failed node until their own timeouts: end them now.
            eprintln!("krun: stopping the {remaining} remaining node(s)");
            nodes.signal_all(libc::SIGKILL);
            stopped_by_us = true;
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

/// Copies a node's output to ours line by line (whole lines, so nodes never interleave
/// inside a line), with an optional prefix.
fn forward(
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
