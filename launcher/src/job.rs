//! Running a job: start one krund per node (locally, or with `srun` inside a Slurm
//! allocation), wire them and their ranks through bootstrap services, stream their output,
//! forward signals, and report srun-style exit codes.
//!
//! Without a program the nodes run the built-in RMA exchange workload; with one, they start
//! its ranks.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;
use fabric::secret::ClusterSecret;

use crate::added_nodes::{start_hub, AddedNodes};
use crate::daemon::{DaemonClient, RunRequest};
use crate::error::{LauncherError, Result};
use crate::inject::InjectAt;
pub use crate::inject::Injection;
use crate::node_proc::{forward, forward_remote, forward_stdin, Children, NodeProc};
use crate::ranks::{take_signal, Placement};

use crate::runtime::hub::Hub;
use crate::slurm::Allocation;

/// A user program to run as `ranks` processes.
#[derive(Debug, Clone)]
pub struct ProgramJob {
    /// `None`: one rank per Slurm task, or one per node locally.
    pub ranks: Option<usize>,
    pub per_node: Option<usize>,
    pub tag_output: bool,
    pub bind_to: crate::binding::BindTo,
    pub report_bindings: bool,
    pub argv: Vec<String>,
    /// `--checkpoint-interval SECS`: the coordinated policy checkpoints this often (None:
    /// on request only: SIGUSR1 to krun, `krun checkpoint`).
    pub checkpoint_interval: Option<Duration>,
    /// `--spares K`: the last K nodes run no ranks until a recovery needs them (local mode:
    /// K more krund).
    pub spares: usize,
    /// `--policy FILE`: the job's HA policy (`None`: the built-in coordinated policy).
    pub policy: Option<policies::description::Description>,
}

/// Where the nodes come from.
#[derive(Debug, Clone)]
pub enum NodeSource {
    /// K krund processes on this machine.
    Local(usize),
    /// One krund per node of a Slurm allocation, started with `srun`.
    Slurm(Allocation),
    /// Listed hosts (`--hosts` / `--hostfile`), reached through their krund daemons or ssh.
    Hosts { hosts: Vec<String>, launch: Launch },
}

/// How node processes are started on listed hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// Ask the `krund --listen` daemon running on each host.
    Daemon,
    /// `ssh HOST krund ...` (needs KRUN_SECRET_FILE, present on every host).
    Ssh,
}

/// How to run a job.
#[derive(Debug, Clone)]
pub struct Job {
    pub nodes: NodeSource,
    /// Path of the krund binary.
    pub krund: PathBuf,
    /// Extra environment for every node (e.g. KRUN_FABRIC_PROVIDER).
    pub env: Vec<(String, String)>,
    /// The whole job is killed after this long.
    pub timeout: Duration,
    /// `None`: the built-in exchange workload.
    pub program: Option<ProgramJob>,
    /// `--inject-failure` (repeatable).
    pub inject: Vec<Injection>,
    /// `--summary-json FILE`: the end-of-job summary for scripts ([`write_summary`]).
    pub summary_json: Option<PathBuf>,
}

impl Job {
    pub fn local(nodes: usize) -> Result<Job> {
        if nodes == 0 {
            return Err(LauncherError::Usage("--local needs at least 1 node".into()));
        }
        Ok(Job {
            nodes: NodeSource::Local(nodes),
            krund: default_krund()?,
            env: Vec::new(),
            timeout: Duration::from_secs(24 * 3600),
            program: None,
            inject: Vec::new(),
            summary_json: None,
        })
    }

    /// Nodes started, spares included (local mode: `--local K` plus the spares).
    pub fn node_count(&self) -> usize {
        match &self.nodes {
            NodeSource::Local(k) => *k + self.spares(),
            NodeSource::Slurm(a) => a.nodes.len(),
            NodeSource::Hosts { hosts, .. } => hosts.len(),
        }
    }

    /// `--spares K`: the last K nodes.
    pub fn spares(&self) -> usize {
        self.program.as_ref().map_or(0, |p| p.spares)
    }

    /// Ranks per node: Slurm's layout unless `-n`/`--ppn` ask for a block layout; the
    /// spares (the last nodes) get none.
    pub fn placement(&self, p: &ProgramJob) -> Result<Placement> {
        let k = self.node_count();
        let working = k.checked_sub(p.spares).filter(|&w| w > 0).ok_or_else(|| {
            LauncherError::Usage(format!(
                "--spares {} leaves no node to run ranks ({k} nodes)",
                p.spares
            ))
        })?;
        let mut placement = match (&self.nodes, p.ranks, p.per_node, p.spares) {
            (NodeSource::Slurm(a), None, None, 0) => Placement::from_counts(&a.tasks_per_node),
            (_, ranks, per_node, _) => {
                Placement::block(ranks.unwrap_or(working), working, per_node)?
            }
        };
        let total = placement.total();
        for _ in working..k {
            placement.first.push(total);
            placement.count.push(0);
        }
        Ok(placement)
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

/// The address nodes on other hosts reach this one at: `KRUN_BOOTSTRAP_HOST`, else the
/// first non-loopback IPv4 address of this host.
fn advertised_ip() -> Result<IpAddr> {
    if let Ok(h) = std::env::var("KRUN_BOOTSTRAP_HOST") {
        return h.parse().map_err(|_| {
            LauncherError::Usage(format!("KRUN_BOOTSTRAP_HOST={h:?} is not an IP address"))
        });
    }
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut addrs) } != 0 {
        return Err(LauncherError::Io {
            context: "listing network interfaces".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let mut found = None;
    let mut cur = addrs;
    while !cur.is_null() {
        // SAFETY: cur walks the list getifaddrs returned; ifa_addr may be null.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && unsafe { (*ifa.ifa_addr).sa_family } as i32 == libc::AF_INET {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() && found.is_none() {
                found = Some(IpAddr::V4(ip));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: addrs came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(addrs) };
    found.ok_or_else(|| {
        LauncherError::Usage(
            "no non-loopback IPv4 address to offer other nodes; set KRUN_BOOTSTRAP_HOST".into(),
        )
    })
}

/// `word` as one POSIX shell word.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

/// Runs the job and returns its exit code: the highest rank (or node) exit code, with
/// 128 + signal for a process killed by a signal.
pub fn run(job: &Job) -> Result<i32> {
    let started = Instant::now();
    let k = job.node_count();
    if let (false, NodeSource::Slurm(_)) = (job.inject.is_empty(), &job.nodes) {
        return Err(LauncherError::Usage(
            "--inject-failure needs --local or --hosts (under Slurm one srun runs every node)"
                .into(),
        ));
    }
    // Nodes and ranks prove they belong to the job with the cluster secret: the configured
    // one (KRUN_SECRET_FILE, which they read themselves) or a fresh one per job.
    let configured = ClusterSecret::from_env()?;
    let secret = match &configured {
        Some(s) => s.clone(),
        None => ClusterSecret::random()?,
    };
    // Daemons first: a host that does not answer fails the job before anything starts, and
    // the connection tells which of our addresses the hosts reach us at.
    let mut daemons = Vec::new();
    if let NodeSource::Hosts {
        hosts,
        launch: Launch::Daemon,
    } = &job.nodes
    {
        for host in hosts {
            daemons.push(DaemonClient::connect(
                host,
                Duration::from_secs(10),
                configured.as_ref(),
            )?);
        }
    }
    let (bind, advertised): (IpAddr, IpAddr) = match (&job.nodes, daemons.first()) {
        (NodeSource::Local(_), _) => (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into()),
        (_, Some(d)) if std::env::var_os("KRUN_BOOTSTRAP_HOST").is_none() => {
            (Ipv4Addr::UNSPECIFIED.into(), d.local_ip()?)
        }
        _ => (Ipv4Addr::UNSPECIFIED.into(), advertised_ip()?),
    };
    if let NodeSource::Hosts {
        launch: Launch::Ssh,
        ..
    } = &job.nodes
    {
        if configured.is_none() {
            return Err(LauncherError::Usage(
                "--launch ssh needs KRUN_SECRET_FILE: the cluster secret file, present on every host".into(),
            ));
        }
    }
    let server =
        BootstrapServer::start_with((bind, 0), k, Duration::from_secs(120), Some(secret.clone()))?;
    let node_service = SocketAddr::new(advertised, server.addr().port());
    let placement = job.program.as_ref().map(|p| job.placement(p)).transpose()?;
    let mut hub = start_hub(job, placement.as_ref(), bind, advertised, &secret)?;
    let hub_addr = hub.addr();
    // Ranks find each other through their own all-gather service; a recovery opens a new
    // one for every wiring epoch (runtime/recovery.rs).
    let rank_server = match &placement {
        Some(place) => Some(BootstrapServer::start_with(
            (bind, 0),
            place.total(),
            job.timeout,
            Some(secret.clone()),
        )?),
        None => None,
    };
    let job_error: crate::runtime::checkpoints::JobError = Arc::new(Mutex::new(None));
    let phases = crate::inject::PhaseGate::new(&job.inject);
    // The coordinated checkpoint policy runs here, where every view is seen.
    let policy = match (&placement, &job.program) {
        (Some(place), Some(p)) => {
            let ranks: Vec<u32> = (0..place.count.len())
                .flat_map(|n| std::iter::repeat_n(n as u32, place.count[n]))
                .collect();
            let spares: Vec<u32> = (place.count.len() - p.spares..place.count.len())
                .map(|n| n as u32)
                .collect();
            let level = crate::runtime::store_node::StoreSettings::from_env()?.level;
            let level = match level {
                ckpt_store::Level::L1 => policies::primitives::Level::L1,
                ckpt_store::Level::L2 => policies::primitives::Level::L2,
                ckpt_store::Level::L3 => policies::primitives::Level::L3,
                ckpt_store::Level::L4 => policies::primitives::Level::L4,
            };
            // A one-node job's store has no L2: commit at what it has.
            let level = if place.count.len() < 2 {
                policies::primitives::Level::L1
            } else {
                level
            };
            let wirings = Arc::new(Mutex::new(Vec::<BootstrapServer>::new()));
            let (total, timeout, wiring_secret) = (place.total(), job.timeout, secret.clone());
            let new_wiring: crate::runtime::checkpoints::NewWiring = Arc::new(move || {
                let server = BootstrapServer::start_with(
                    (bind, 0),
                    total,
                    timeout,
                    Some(wiring_secret.clone()),
                )
                .map_err(|e| e.to_string())?;
                let addr = SocketAddr::new(advertised, server.addr().port()).to_string();
                wirings.lock().expect("wirings lock").push(server);
                Ok(addr)
            });
            let driver = crate::runtime::checkpoints::CheckpointDriver::start(
                ranks,
                spares,
                recovers(p),
                p.checkpoint_interval,
                level,
                Some(hub.job_dir().join("decisions.log")),
                hub.broadcaster(),
                new_wiring,
                job_error.clone(),
                phases.clone(),
                p.policy.clone(),
            )
            .map_err(|e| LauncherError::Usage(format!("the checkpoint policy: {e}")))?;
            hub.set_policy(driver.sender());
            if recovers(p) {
                // As long as the nodes hold a failed rank's exit (krund's exit grace).
                let timeout = std::env::var("KRUN_FAILURE_TIMEOUT_MS")
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map_or(
                        crate::runtime::DEFAULT_FAILURE_TIMEOUT,
                        Duration::from_millis,
                    );
                hub.hold_mpi_ends(timeout + Duration::from_secs(20));
            }
            Some(driver)
        }
        _ => None,
    };

    let uncoordinated_env = match (&policy, &job.program) {
        (Some(_), Some(p)) => {
            crate::runtime::checkpoints::uncoordinated::node_env(p.policy.as_ref())
                .map_err(|e| LauncherError::Usage(format!("the checkpoint policy: {e}")))?
        }
        _ => Vec::new(),
    };
    // The krund command line shared by all nodes; local mode adds --node-id per node,
    // under Slurm krund takes it from SLURM_NODEID.
    let node_command = |stdin_for_rank0: bool| {
        let mut cmd = Command::new(&job.krund);
        cmd.arg("--bootstrap")
            .arg(node_service.to_string())
            .arg("--nnodes")
            .arg(k.to_string())
            .arg("--runtime")
            .arg(hub_addr.to_string())
            .stdin(if stdin_for_rank0 {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if configured.is_none() {
            cmd.env("KRUN_SECRET", secret.to_hex());
        }
        cmd.env("KRUN_JOB_ID", std::process::id().to_string());
        if job.spares() > 0 {
            // The nodes hold failed ranks' exits back while a recovery may restart them.
            cmd.env("KRUN_SPARES", job.spares().to_string());
        }
        if job.program.as_ref().is_some_and(recovers) {
            // Also without spares: a survivor whose peer's node died must not leave before
            // the failure is agreed (its leaving could take the supervisors' quorum with it);
            // the policy then restarts the lost ranks or ends the job naming them.
            cmd.env("KRUN_RECOVERS", "1");
        }
        // The uncoordinated policy: no barrier at the ranks' safepoints, message logging.
        for (key, v) in &uncoordinated_env {
            cmd.env(key, v);
        }
        for (key, v) in &job.env {
            cmd.env(key, v);
        }
        cmd
    };
    let program_args = |cmd: &mut Command| {
        if let (Some(p), Some(place), Some(rs)) = (&job.program, &placement, &rank_server) {
            cmd.arg("--counts").arg(place.counts_arg());
            if p.tag_output {
                cmd.arg("--tag-output");
            }
            cmd.arg("--bind-to").arg(p.bind_to.name());
            if p.report_bindings {
                cmd.arg("--report-bindings");
            }
            cmd.env(
                "KRUN_BOOTSTRAP",
                SocketAddr::new(advertised, rs.addr().port()).to_string(),
            );
            cmd.arg("--").args(&p.argv);
        }
    };
    let mut commands = Vec::new();
    let mut remote = Vec::new();
    match &job.nodes {
        NodeSource::Hosts {
            launch: Launch::Daemon,
            ..
        } => {
            for (node, d) in daemons.into_iter().enumerate() {
                let mut cmd = node_command(false);
                cmd.arg("--node-id").arg(node.to_string());
                program_args(&mut cmd);
                let request = RunRequest {
                    args: cmd
                        .get_args()
                        .map(|a| a.to_string_lossy().into_owned())
                        .collect(),
                    env: cmd
                        .get_envs()
                        .filter_map(|(k, v)| {
                            Some((
                                k.to_string_lossy().into_owned(),
                                v?.to_string_lossy().into_owned(),
                            ))
                        })
                        .collect(),
                };
                remote.push((node, d, request));
            }
        }
        NodeSource::Hosts {
            hosts,
            launch: Launch::Ssh,
        } => {
            for (node, host) in hosts.iter().enumerate() {
                let mut template = node_command(false);
                template.arg("--node-id").arg(node.to_string());
                program_args(&mut template);
                let mut ssh =
                    Command::new(std::env::var("KRUN_SSH").unwrap_or_else(|_| "ssh".into()));
                // ssh hands the remote shell one string: quote every word of it.
                let mut words = vec!["env".to_string()];
                for (k, v) in template.get_envs() {
                    if let Some(v) = v {
                        words.push(format!("{}={}", k.to_string_lossy(), v.to_string_lossy()));
                    }
                }
                if let Ok(f) = std::env::var("KRUN_SECRET_FILE") {
                    words.push(format!("KRUN_SECRET_FILE={f}"));
                }
                words.push(template.get_program().to_string_lossy().into_owned());
                words.extend(
                    template
                        .get_args()
                        .map(|a| a.to_string_lossy().into_owned()),
                );
                let remote: Vec<String> = words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>();
                ssh.args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "ConnectTimeout=10",
                    host.as_str(),
                ])
                .arg(remote.join(" "))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
                commands.push((Some(node), ssh));
            }
        }
        NodeSource::Local(_) => {
            for node in 0..k {
                let rank0_here = placement
                    .as_ref()
                    .is_some_and(|p| p.node_of(0) == Some(node));
                let mut cmd = node_command(rank0_here);
                cmd.arg("--node-id").arg(node.to_string());
                program_args(&mut cmd);
                commands.push((Some(node), cmd));
            }
        }
        NodeSource::Slurm(a) => {
            let recovering = job.program.as_ref().is_some_and(recovers);
            let mut srun = crate::slurm::srun_command(&a.nodes, recovering);
            srun.arg(&job.krund);
            // srun passes its environment (and so the secret and settings) to every krund.
            let template = node_command(placement.is_some());
            for (key, v) in template.get_envs() {
                if let Some(v) = v {
                    srun.env(key, v);
                }
            }
            srun.args(template.get_args())
                .stdin(if placement.is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            program_args(&mut srun);
            commands.push((None, srun));
        }
    }

    let (tx, rx) = mpsc::channel::<()>();
    let mut children = Children(Vec::with_capacity(commands.len()));
    let mut forwarders = Vec::new();
    for (node, mut cmd) in commands {
        let mut child = cmd.spawn().map_err(|e| LauncherError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source: e,
        })?;
        // The built-in workload's lines are prefixed with the node; ranks' output is the user's.
        let prefix = match (job.program.is_none(), node) {
            (true, Some(n)) => Some(format!("[node {n}] ")),
            _ => None,
        };
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
        children.0.push(Some(NodeProc::Child(child)));
    }
    for (node, d, request) in remote {
        let host = d.host.clone();
        let (control, output) = d.start(request).map_err(|e| LauncherError::Node {
            node,
            message: e.to_string(),
        })?;
        let prefix = job.program.is_none().then(|| format!("[node {node}] "));
        let exit = Arc::new(Mutex::new(None));
        let what = match &placement {
            Some(p) if p.count[node] > 0 => format!(
                "node {node} (ranks {}..{})",
                p.first[node],
                p.first[node] + p.count[node] - 1
            ),
            _ => format!("node {node}"),
        };
        forwarders.push(forward_remote(
            output,
            host.clone(),
            what,
            prefix,
            exit.clone(),
            tx.clone(),
        ));
        let control = Arc::new(Mutex::new(control));
        if placement
            .as_ref()
            .is_some_and(|p| p.node_of(0) == Some(node))
        {
            forward_stdin(control.clone());
        }
        children.0.push(Some(NodeProc::Remote {
            host,
            control: control.clone(),
            exit,
        }));
    }
    let added = AddedNodes {
        starts: hub.take_starts(),
        secret: secret.clone(),
        configured: configured.is_some(),
        hub_addr,
        wake: tx.clone(),
    };
    drop(tx);
    let ended_by_policy = job_error.clone();
    let watch = Watch {
        phases,
        commits: policy.as_ref().map(|d| d.commits()),
        recoverable: policy.is_some() && job.program.as_ref().is_some_and(recovers),
        job_error,
    };
    let worst = wait_all(&mut children, job, &rx, &hub, added, &mut forwarders, watch);
    let summary = policy.and_then(|d| d.finish());
    if let Some(summary) = &summary {
        if summary.checkpoints + summary.aborted + summary.failures > 0 {
            eprintln!("krun: {summary}");
        }
    }
    let mut worst = worst;
    // A node lost to a failure the policy recovered from exits 137 (under Slurm, one srun
    // runs every node and exits 137 for it); its ranks ran on elsewhere. The job's code is
    // then its ranks', as the nodes that ended reported it (`Finished`).
    let policy_ended_it = ended_by_policy.lock().expect("job error lock").is_some();
    let recovered = !policy_ended_it && summary.as_ref().is_some_and(|s| s.recoveries > 0);
    if let Ok(w) = worst.as_mut() {
        if *w != 0
            && !policy_ended_it
            && summary
                .as_ref()
                .is_some_and(|s| s.failures > 0 && s.recoveries > 0)
        {
            if let Some(code) = hub.ranks_code() {
                *w = code;
            }
        }
    }
    if let Some(path) = &job.summary_json {
        write_summary(path, job, &worst, summary.as_ref(), started.elapsed())?;
    }
    let worst = worst?;
    for f in forwarders {
        let _ = f.join();
    }
    if worst == 0 {
        match server.join() {
            // A node killed during the start-up address exchange leaves it broken; the
            // recovery re-wired every rank through its own exchange, and the job completed.
            Err(e) if recovered => {
                eprintln!("krun: the start-up address exchange failed ({e}); the recovery re-wired the ranks")
            }
            r => r?,
        }
    }
    Ok(worst)
}

/// The end-of-job summary as JSON (`krun --summary-json FILE`), written whether the job
/// succeeded or not:
/// `{"exit_code": N | null, "error": null | "...", "nodes": N, "spares": K, "ranks": R | null,
///   "seconds": S, "policy": null | {"checkpoints", "aborted", "checkpoint_seconds",
///   "checkpoint_bytes", "failures", "recoveries", "restarts", "rollbacks", "lost_seconds"}}`.
pub fn write_summary(
    path: &Path,
    job: &Job,
    outcome: &Result<i32>,
    policy: Option<&policies::report::Summary>,
    elapsed: Duration,
) -> Result<()> {
    let (exit_code, error) = match outcome {
        Ok(code) => (Some(*code), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let body = serde_json::json!({
        "exit_code": exit_code,
        "error": error,
        "nodes": job.node_count(),
        "spares": job.spares(),
        "ranks": job.program.as_ref().and_then(|p| p.ranks),
        "seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "policy": policy,
    });
    let text = serde_json::to_string_pretty(&body)
        .map_err(|e| LauncherError::Usage(format!("encoding the summary: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| LauncherError::Io {
        context: format!("writing the summary to {}", path.display()),
        source: e,
    })
}

/// Whether the policy drives recoveries for `p`: it has spares or checkpoints on an
/// interval (a job with neither goes on with what is left after a node loss).
fn recovers(p: &ProgramJob) -> bool {
    p.spares > 0
        || p.checkpoint_interval.is_some()
        || p.policy.as_ref().is_some_and(|d| d.interval.is_some())
}

/// What [`wait_all`] follows besides the node processes.
struct Watch {
    /// Where the policy stops at the phases injections wait for (`node=N@ckptK:capture`).
    phases: crate::inject::PhaseGate,
    /// Checkpoints the policy committed (for `--inject-failure node=N@Kckpt`).
    commits: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// The policy recovers lost ranks (or ends the job through `job_error`): a node with
    /// ranks that dies does not end the job by itself.
    recoverable: bool,
    /// Set when the policy ended the job: krun stops every node.
    job_error: crate::runtime::checkpoints::JobError,
}

fn wait_all(
    children: &mut Children,
    job: &Job,
    wake: &mpsc::Receiver<()>,
    hub: &Hub,
    added: AddedNodes,
    forwarders: &mut Vec<std::thread::JoinHandle<()>>,
    watch: Watch,
) -> Result<i32> {
    let started = Instant::now();
    let deadline = started + job.timeout;
    let mut inject = job.inject.clone();
    let mut injected = std::collections::BTreeSet::new();
    let mut policy_failed = false;
    let mut worst = 0;
    let mut remaining = children.0.len();
    // The nodes the job started; nodes added later run no ranks and end when these have.
    let originals = children.0.len();
    let mut originals_left = originals;
    let mut stop_sent = false;
    let mut interrupts = 0;
    // Nodes we killed because another failed: their 137 is not the job's story.
    let mut stopped_by_us = false;
    let mut kill_at: Option<Instant> = None;
    // When every node the job started was first linked to krun: `@5s` injections count
    // from then.
    let mut all_up: Option<Instant> = None;
    // When the commit count first reached each `Kckpt` injection's K.
    let mut committed_at: BTreeMap<u64, Instant> = BTreeMap::new();
    while remaining > 0 {
        if all_up.is_none() && hub.linked() >= originals {
            all_up = Some(Instant::now());
        }
        if let Some(sig) = take_signal() {
            interrupts += usize::from(sig == libc::SIGINT);
            if interrupts >= 2 {
                eprintln!("krun: second interrupt: killing the job");
                children.signal_all(libc::SIGKILL);
            } else {
                children.signal_all(sig);
            }
        }
        let phases = watch.phases.pending();
        let mut fired = Vec::new();
        inject.retain(|i| {
            let due = match i.at {
                InjectAt::After(d) => all_up.is_some_and(|t| t.elapsed() >= d),
                InjectAt::Commits { k, after } => {
                    let reached = watch
                        .commits
                        .as_ref()
                        .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst) >= k);
                    reached && committed_at.entry(k).or_insert_with(Instant::now).elapsed() >= after
                }
                InjectAt::Phase { phase, k } => phases.contains(&(phase, k)),
            };
            if due {
                fired.push(*i);
            }
            !due
        });
        for i in fired {
            let at = match i.at {
                InjectAt::Phase { phase, k } => format!(" at {phase} {k}"),
                _ => String::new(),
            };
            match children.0.get(i.node).and_then(|c| c.as_ref()) {
                Some(c) => {
                    let what = c.inject_failure();
                    eprintln!(
                        "krun: injected failure{at}: SIGKILL to node {} ({what})",
                        i.node
                    );
                    injected.insert(i.node);
                }
                None => eprintln!(
                    "krun: --inject-failure: node {} has already ended; nothing killed",
                    i.node
                ),
            }
            if let InjectAt::Phase { phase, k } = i.at {
                watch.phases.done(phase, k);
            }
        }
        let mut failed = false;
        if !stopped_by_us {
            if let Some(why) = watch.job_error.lock().expect("job error lock").clone() {
                eprintln!("krun: the job cannot continue: {why}");
                failed = true;
                policy_failed = true;
            }
        }
        for (i, slot) in children.0.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            let code = child.try_wait().map_err(|e| LauncherError::Io {
                context: format!("waiting for node process {i}"),
                source: e,
            })?;
            let Some(code) = code else { continue };
            // A lost node fails the job: its ranks are gone and the others would wait for them
            // (unless the policy restarts them on a spare).
            let killed = injected.contains(&i) || child.is_lost();
            if code != 0 && (job.program.is_none() || (killed && !watch.recoverable)) {
                eprintln!(
                    "krun: node {i} ({}) exited with code {code}",
                    child.describe()
                );
                failed = true;
            }
            if !stopped_by_us && i < originals && !(killed && watch.recoverable) {
                worst = worst.max(code);
            }
            if i < originals {
                originals_left -= 1;
            }
            *slot = None;
            remaining -= 1;
        }
        if let Some(starts) = &added.starts {
            for n in starts.try_iter() {
                match added.start(job, n.clone(), forwarders) {
                    Ok(p) => {
                        children.0.push(Some(p));
                        remaining += 1;
                    }
                    Err(e) => eprintln!("krun: cannot add node {}: {e}", n.node),
                }
            }
        }
        if originals_left == 0 && !stop_sent {
            hub.stop_all();
            stop_sent = true;
        }
        if kill_at.is_none() && remaining > 0 {
            // A node reported a killed rank: the job cannot go on without it.
            if let Some((why, code)) = hub.abort_reason() {
                eprintln!("krun: {why}: ending the job");
                worst = worst.max(code);
                failed = true;
            }
        }
        if failed && remaining > 0 && kill_at.is_none() {
            // The others would wait for the failed node until their own timeouts: end them now
            // (SIGTERM: each node ends its ranks and what they started; SIGKILL after a grace).
            eprintln!("krun: stopping the {remaining} remaining node(s)");
            children.signal_all(libc::SIGTERM);
            kill_at = Some(Instant::now() + crate::ranks::TERMINATE_GRACE + Duration::from_secs(2));
            stopped_by_us = true;
        }
        if remaining > 0 && kill_at.is_some_and(|t| Instant::now() >= t) {
            children.signal_all(libc::SIGKILL);
            kill_at = Some(Instant::now() + Duration::from_secs(3600));
        }
        if remaining > 0 {
            if Instant::now() >= deadline {
                return Err(LauncherError::JobTimeout(job.timeout));
            }
            let _ = wake.recv_timeout(Duration::from_millis(20));
        }
    }
    if policy_failed {
        // The policy could not restore the job (it said what was lost).
        return Ok(worst.max(1));
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_are_the_last_nodes_and_get_no_ranks() {
        let mut job = Job::local(3).unwrap();
        job.program = Some(ProgramJob {
            ranks: Some(6),
            per_node: None,
            tag_output: false,
            bind_to: crate::binding::BindTo::None,
            report_bindings: false,
            argv: vec!["true".into()],
            checkpoint_interval: None,
            policy: None,
            spares: 1,
        });
        assert_eq!(job.node_count(), 4);
        let p = job.placement(job.program.as_ref().unwrap()).unwrap();
        assert_eq!(p.count, vec![2, 2, 2, 0]);
        assert_eq!(p.total(), 6);
        job.nodes = NodeSource::Hosts {
            hosts: vec!["a".into(), "b".into()],
            launch: Launch::Daemon,
        };
        assert_eq!(job.node_count(), 2);
        let p = job.placement(job.program.as_ref().unwrap()).unwrap();
        assert_eq!(p.count, vec![6, 0]);
        job.program.as_mut().unwrap().spares = 2;
        let e = job
            .placement(job.program.as_ref().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--spares 2 leaves no node"), "{e}");
    }

    #[test]
    fn shell_words_survive_a_shell() {
        for word in ["plain", "with space", "it's", "$HOME `x` \\ \"q\"", ""] {
            let out = std::process::Command::new("sh")
                .args(["-c", &format!("printf %s {}", shell_quote(word))])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), word);
        }
    }
}
