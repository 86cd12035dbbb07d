//! Running a job's ranks on one node: placement across nodes, the rank environment, output
//! forwarding, signal forwarding and exit-status reporting.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use crate::binding::{self, BindTo, CpuMask};
use crate::error::{LauncherError, Result};

/// Which ranks run on which node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `first[node]..first[node] + count[node]` are the node's ranks.
    pub first: Vec<usize>,
    pub count: Vec<usize>,
}

impl Placement {
    /// Block distribution as Slurm's default: ranks fill nodes in order, `per_node` each
    /// (`ceil(ranks / nodes)` when not given).
    pub fn block(ranks: usize, nodes: usize, per_node: Option<usize>) -> Result<Placement> {
        if ranks == 0 || nodes == 0 {
            return Err(LauncherError::Usage(
                "a job needs at least one rank and one node".into(),
            ));
        }
        let per = per_node.unwrap_or(ranks.div_ceil(nodes));
        if per == 0 || per.saturating_mul(nodes) < ranks {
            return Err(LauncherError::Usage(format!(
                "{ranks} ranks do not fit on {nodes} nodes with {per} per node"
            )));
        }
        let mut first = Vec::with_capacity(nodes);
        let mut count = Vec::with_capacity(nodes);
        for node in 0..nodes {
            let start = (node * per).min(ranks);
            first.push(start);
            count.push((start + per).min(ranks) - start);
        }
        Ok(Placement { first, count })
    }

    /// Slurm's layout: `counts[node]` ranks on each node, in node order.
    pub fn from_counts(counts: &[usize]) -> Placement {
        let mut first = Vec::with_capacity(counts.len());
        let mut next = 0;
        for &c in counts {
            first.push(next);
            next += c;
        }
        Placement {
            first,
            count: counts.to_vec(),
        }
    }

    /// Parses the `--counts 3,3,2` argument krun gives krund.
    pub fn parse_counts(arg: &str) -> Result<Placement> {
        let counts = arg
            .split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| {
                LauncherError::Usage(format!("--counts {arg:?} is not a list of numbers"))
            })?;
        Ok(Placement::from_counts(&counts))
    }

    pub fn counts_arg(&self) -> String {
        self.count
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn total(&self) -> usize {
        self.count.iter().sum()
    }

    /// Node hosting `rank`.
    pub fn node_of(&self, rank: usize) -> Option<usize> {
        (0..self.first.len())
            .find(|&n| rank >= self.first[n] && rank < self.first[n] + self.count[n])
    }
}

/// What one node runs.
#[derive(Debug, Clone)]
pub struct NodeShare {
    pub node_id: usize,
    pub nnodes: usize,
    pub first_rank: usize,
    pub local_size: usize,
    pub size: usize,
    pub tag_output: bool,
    pub program: Vec<String>,
    /// Environment added for every rank (e.g. the address to bind the fabric to).
    pub env: Vec<(String, String)>,
    pub bind_to: BindTo,
    pub report_bindings: bool,
    /// How this node's ranks sit on the machine: nodes of a job may share one (containers,
    /// network namespaces, `--local`); see [`MachineShare`].
    pub machine: MachineShare,
    /// Where rank starts and exits are reported (the node runtime's process table).
    pub events: Option<std::sync::mpsc::Sender<RankEvent>>,
    /// A spare's share (no ranks of its own): it waits for ranks moved in until this is
    /// set (krun stopped the node), instead of ending at once.
    pub stay: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// A rank that fails (non-zero exit) is held back this long before it counts (its
    /// node's exit code, the process table): a recovery may restart it meanwhile (its peers
    /// on a failed node are gone). `None`: it counts at once.
    pub exit_grace: Option<Duration>,
    /// Ranks moved to or from this node while the share runs.
    pub commands: Option<std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<RankCommand>>>>,
    /// Called before each rank starts: environment and a descriptor it keeps (the node's
    /// PMI server, `runtime/pmi.rs`).
    pub rank_setup: Option<crate::runtime::pmi::RankSetup>,
}

/// This node's ranks among all the job's ranks on the same machine (nodes that share a
/// kernel). Pinning counts them all: the first of this node's ranks takes the machine's
/// `offset`-th domain, and when the machine has more ranks than domains nobody is pinned
/// (several busy ranks forced onto one core starve each other and the node's daemons,
/// while unpinned the kernel spreads them), as Open MPI does when oversubscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineShare {
    /// Ranks of co-located nodes before this node's.
    pub offset: usize,
    /// Ranks of the job on this machine, this node's included (0: only this node's).
    pub ranks: usize,
}

impl MachineShare {
    /// From every node's machine identity and rank count (node order): the nodes whose
    /// identity equals ours share the machine.
    pub fn among(node: usize, machines: &[Vec<u8>], counts: &[usize]) -> MachineShare {
        let mine = &machines[node];
        let same = |n: &usize| machines.get(*n) == Some(mine) && !mine.is_empty();
        MachineShare {
            offset: (0..node).filter(same).map(|n| counts[n]).sum(),
            ranks: (0..counts.len()).filter(same).map(|n| counts[n]).sum(),
        }
    }
}

/// This machine's identity: the kernel's boot id (shared by containers and namespaces of
/// one host, distinct between hosts); empty when it cannot be read.
pub fn machine_id() -> Vec<u8> {
    std::fs::read("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim_ascii().to_vec())
        .unwrap_or_default()
}

/// A rank started or ended on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankEvent {
    Started {
        rank: usize,
        pid: u32,
    },
    Exited {
        rank: usize,
        code: i32,
    },
    /// The rank was killed by `signal`, not by its node (sent before its `Exited`).
    Killed {
        rank: usize,
        signal: i32,
    },
    /// The node got SIGUSR1 (a scheduler's "checkpoint now"): krun's policy is asked.
    CheckpointAsked,
}

/// Name of a signal for messages.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

/// Signal received by this process and not yet forwarded (0 = none).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Checkpoint requests (SIGUSR1, e.g. Slurm's pre-timeout `--signal`) not yet handled.
static CHECKPOINT_REQUESTS: AtomicI32 = AtomicI32::new(0);
/// `RankEvent::Killed` events sent by this process (see [`killed_ranks_reported`]).
static KILLED_SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many `RankEvent::Killed` this process sent: a node leaving after a killed rank waits
/// until its runtime has told krun of each (the report decides whether the job ends).
pub fn killed_ranks_reported() -> usize {
    KILLED_SENT.load(Ordering::SeqCst)
}

extern "C" fn remember_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        CHECKPOINT_REQUESTS.fetch_add(1, Ordering::SeqCst);
    } else {
        PENDING_SIGNAL.store(sig, Ordering::SeqCst);
    }
}

/// Installs handlers that record SIGINT/SIGTERM for forwarding instead of dying, and
/// SIGUSR1 as a "checkpoint now" event.
pub fn catch_forwarded_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches atomics, which is async-signal-safe.
        unsafe { libc::signal(sig, remember_signal as *const () as libc::sighandler_t) };
    }
}

/// Records SIGUSR1 as a checkpoint request from now on (the runtime takes it once its ranks
/// run). A node runtime installs it first thing: Slurm's `--signal` may come up to a minute
/// early, also while the node is still starting, and SIGUSR1's default action would end it.
pub fn catch_checkpoint_requests() {
    // SAFETY: the handler only touches atomics, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            remember_signal as *const () as libc::sighandler_t,
        )
    };
}

/// Set when a node that never ran a rank (a spare) ended on SIGINT or SIGTERM.
static SPARE_SIGNALLED: AtomicBool = AtomicBool::new(false);

/// Whether [`run_share`] returned because this node, running no rank, was told to end by
/// SIGINT or SIGTERM.
pub fn spare_signalled() -> bool {
    SPARE_SIGNALLED.load(Ordering::SeqCst)
}

/// Takes the checkpoint requests received since the last call.
pub fn take_checkpoint_requests() -> i32 {
    CHECKPOINT_REQUESTS.swap(0, Ordering::SeqCst)
}

/// Takes the signal received since the last call, if any.
pub fn take_signal() -> Option<i32> {
    match PENDING_SIGNAL.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Calls `sink` with each whole line of `stream` (prefixed; a last line without a newline
/// gets one), so that each line can be written with a single call and concurrent writers
/// never split a line.
pub fn for_each_line(stream: impl Read, prefix: Option<&str>, mut sink: impl FnMut(&[u8]) -> bool) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        line.extend_from_slice(prefix.unwrap_or("").as_bytes());
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                if !sink(&line) {
                    break;
                }
            }
        }
    }
}

/// Copies `stream` to our stdout or stderr in whole lines.
pub fn copy_lines(stream: impl Read, prefix: Option<&str>, to_err: bool) {
    for_each_line(stream, prefix, |line| {
        let _ = if to_err {
            std::io::stderr().lock().write_all(line)
        } else {
            std::io::stdout().lock().write_all(line)
        };
        true
    });
}

fn forward_output(
    stream: impl Read + Send + 'static,
    rank: usize,
    tag: bool,
    to_err: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let prefix = tag.then(|| format!("[{rank}] "));
        copy_lines(stream, prefix.as_deref(), to_err);
    })
}

pub use fabric::ofi::remove_shm_segments;

/// Exit code as srun reports it: the status code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// What the node runtime asks of a running share: take a rank moved here, or let one go.
#[derive(Debug)]
pub enum RankCommand {
    /// Start `rank` here with `env` added (e.g. `KRUN_GHOST_RESTORE=latest`); the answer is
    /// its pid. A process of the same rank still running here is killed first (a recovery
    /// restarts a rank whose live process did not take its rollback order), and an exit of
    /// it held back ([`NodeShare::exit_grace`]) is forgotten.
    Adopt {
        rank: usize,
        env: Vec<(String, String)>,
        reply: std::sync::mpsc::Sender<std::result::Result<u32, String>>,
    },
    /// `rank` is leaving this node: its end is not its exit (no code, no event). The answer
    /// is its pid.
    Release {
        rank: usize,
        reply: std::sync::mpsc::Sender<std::result::Result<u32, String>>,
    },
    /// The job is over for this node (its krun is gone): every rank gets SIGTERM, then
    /// SIGKILL after [`TERMINATE_GRACE`]; the share ends with exit code 1.
    Terminate { reason: String },
    /// Bring `rank` here by running `start` on the runner's own thread (a CRIU restore: the
    /// restored root becomes a child of the calling thread, and its parent-death signal
    /// follows that thread, so it must be the long-lived runner); `start` returns the pid of
    /// that child, which is then waited for, signalled and ended like the node's own ranks.
    Watch {
        rank: usize,
        start: StartFn,
        reply: std::sync::mpsc::Sender<std::result::Result<u32, String>>,
    },
}

/// How a watched rank's process is brought up ([`RankCommand::Watch`]): given the write
/// ends of new pipes for its standard output and error (forwarded like a spawned rank's,
/// valid during the call), it returns the process's pid.
pub struct StartFn(pub Box<dyn FnOnce(RankPipes) -> std::result::Result<u32, String> + Send>);

/// The write ends of a watched rank's output pipes ([`StartFn`]).
#[derive(Clone, Copy, Debug)]
pub struct RankPipes {
    pub stdout: std::os::fd::RawFd,
    pub stderr: std::os::fd::RawFd,
}

/// A pipe (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned from here on.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

impl std::fmt::Debug for StartFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartFn")
    }
}

/// A rank's process the node did not spawn itself ([`RankCommand::Watch`]): reaped with
/// waitpid(2) by pid.
struct Watched {
    rank: usize,
    pid: u32,
}

impl Watched {
    /// Its exit status, once it ended (reaped).
    fn try_wait(&self) -> Option<ExitStatus> {
        let mut status = 0;
        // SAFETY: waitpid on a child of this process, with a valid status pointer.
        let r = unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) };
        if r == self.pid as i32 {
            use std::os::unix::process::ExitStatusExt;
            return Some(ExitStatus::from_raw(status));
        }
        if r < 0 {
            // Not (or no longer) our child: treat it as gone once its pid is.
            if !std::path::Path::new(&format!("/proc/{}", self.pid)).exists() {
                use std::os::unix::process::ExitStatusExt;
                return Some(ExitStatus::from_raw(0));
            }
        }
        None
    }
}

/// How long ranks told to end (SIGTERM) have before they are killed.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// The owner of a rank's native checkpoints under krun: stable across moves, so a rank
/// restarted elsewhere finds its images (`KRUN_GHOST_OWNER`, when the user set none).
pub fn ghost_owner(job: &str, rank: usize) -> String {
    format!("krun-job{job}/rank{rank}")
}

/// Starts one rank (the `local`-th process of the node: its binding slot).
fn spawn_rank(
    share: &NodeShare,
    domains: &[Vec<usize>],
    rank: usize,
    local: usize,
    extra_env: &[(String, String)],
) -> Result<Child> {
    let (program, args) = share
        .program
        .split_first()
        .ok_or_else(|| LauncherError::Usage("no program to run".into()))?;
    let on_machine = share.machine.ranks.max(share.local_size);
    let oversubscribed = on_machine > domains.len();
    let slot = share.machine.offset + local;
    let mask = if oversubscribed {
        None
    } else {
        binding::cpus_for(domains, slot).map(|cpus| {
            if share.report_bindings {
                eprintln!(
                    "krun: rank {rank} on node {} bound to {} {} (cpus {cpus:?})",
                    share.node_id,
                    share.bind_to.name(),
                    slot % domains.len()
                );
            }
            CpuMask::new(cpus)
        })
    };
    if mask.is_none() && share.report_bindings {
        if oversubscribed && !domains.is_empty() {
            eprintln!(
                "krun: rank {rank} on node {} not bound: {on_machine} ranks on this machine \
                 and {} {} domains",
                share.node_id,
                domains.len(),
                share.bind_to.name()
            );
        } else {
            eprintln!("krun: rank {rank} on node {} not bound", share.node_id);
        }
    }
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env("KRUN_RANK", rank.to_string())
        .env("KRUN_SIZE", share.size.to_string())
        .env("KRUN_LOCAL_RANK", local.to_string())
        .env("KRUN_LOCAL_SIZE", share.local_size.to_string())
        .env("KRUN_NODE_ID", share.node_id.to_string())
        .env("KRUN_NNODES", share.nnodes.to_string())
        .envs(share.env.iter().map(|(k, v)| (k, v)));
    if let Some(var) = binding::hwloc_plugins_quieted() {
        // krund's own setting, not the user's.
        cmd.env_remove(var);
    }
    if let (Ok(job), None) = (
        std::env::var("KRUN_JOB_ID"),
        std::env::var_os("KRUN_GHOST_OWNER"),
    ) {
        cmd.env("KRUN_GHOST_OWNER", ghost_owner(&job, rank));
    }
    let extras = match &share.rank_setup {
        Some(setup) => Some((setup.0)(rank)?),
        None => None,
    };
    if let Some(x) = &extras {
        cmd.envs(x.env.iter().map(|(k, v)| (k, v)));
    }
    let keep: Vec<std::os::fd::RawFd> = extras
        .iter()
        .filter_map(|x| x.keep_fd.as_ref())
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    cmd.envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(if rank == 0 && extra_env.is_empty() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: isatty only inspects fd 0.
    let own_group = !(rank == 0 && extra_env.is_empty() && unsafe { libc::isatty(0) } == 1);
    // SAFETY: setpgid, prctl and the descriptor calls are async-signal-safe; ranks die with
    // their node daemon instead of lingering as orphans, and inherit none of its descriptors
    // (libfabric's endpoint sockets are not close-on-exec).
    unsafe {
        cmd.pre_exec(move || {
            // Each rank leads its own session and process group, so that signals and a
            // forced end reach the processes it starts too (a shell script's children) —
            // except a rank reading a terminal, which must stay in the terminal's foreground
            // group. Its own session also lets CRIU move it: CRIU refuses a process whose
            // session leader it cannot see (the launcher's session leader may sit outside
            // the PID namespace the job runs in, as under a CI runner or a container).
            if own_group && libc::setsid() == -1 {
                libc::setpgid(0, 0);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            ghost::descriptors::cloexec_above_stdio()?;
            ghost::descriptors::keep_across_exec(&keep)?;
            match mask {
                Some(m) => m.apply(),
                None => Ok(()),
            }
        });
    }
    let child = cmd.spawn().map_err(|e| LauncherError::Node {
        node: share.node_id,
        message: format!("cannot start rank {rank}: {program}: {e}"),
    });
    // The rank holds its end now; ours closes here.
    drop(extras);
    child
}

/// Sends `sig` to a rank's process group (it leads one, see `spawn_rank`), or to the rank
/// alone when it does not (a rank left in the terminal's group).
fn signal_rank(pid: u32, sig: i32) {
    // SAFETY: kill(2) of our own child (or its group) by PID; no memory is involved.
    unsafe {
        if libc::kill(-(pid as i32), sig) != 0 {
            libc::kill(pid as i32, sig);
        }
    }
}

/// Starts the node's ranks, forwards their output and signals, and returns the highest
/// exit code. Rank 0 (when it is here) inherits stdin; the others read /dev/null. Ranks
/// moved here ([`RankCommand::Adopt`]) are run and waited for like the node's own; ranks
/// moved away ([`RankCommand::Release`]) are not.
pub fn run_share(share: &NodeShare) -> Result<i32> {
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut released: Vec<(usize, Child)> = Vec::new();
    let mut watched: Vec<Watched> = Vec::new();
    let mut forwarders = Vec::new();
    let kill_all = |children: &mut Vec<(usize, Child)>| {
        for (_, c) in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    let domains = binding::domains(share.bind_to)?;
    let mut started = 0usize;
    let mut start = |rank: usize,
                     env: &[(String, String)],
                     children: &mut Vec<(usize, Child)>,
                     forwarders: &mut Vec<std::thread::JoinHandle<()>>|
     -> Result<u32> {
        let mut child = spawn_rank(share, &domains, rank, started, env)?;
        started += 1;
        forwarders.push(forward_output(
            child.stdout.take().expect("piped"),
            rank,
            share.tag_output,
            false,
        ));
        forwarders.push(forward_output(
            child.stderr.take().expect("piped"),
            rank,
            share.tag_output,
            true,
        ));
        let pid = child.id();
        if let Some(tx) = &share.events {
            let _ = tx.send(RankEvent::Started { rank, pid });
        }
        children.push((rank, child));
        Ok(pid)
    };
    for local in 0..share.local_size {
        if let Err(e) = start(
            share.first_rank + local,
            &[],
            &mut children,
            &mut forwarders,
        ) {
            kill_all(&mut children);
            return Err(e);
        }
    }
    let mut worst = 0;
    // Failed ranks held back for `exit_grace`: (rank, code, signal, when).
    let mut held_exits: Vec<(usize, i32, Option<i32>, std::time::Instant)> = Vec::new();
    let report_exit = |rank: usize, code: i32, signal: Option<i32>| {
        if let Some(sig) = signal {
            eprintln!(
                "krun: rank {rank} on node {} was killed by {}",
                share.node_id,
                signal_name(sig)
            );
        } else if code != 0 {
            eprintln!(
                "krun: rank {rank} on node {} exited with code {code}",
                share.node_id
            );
        }
        if let Some(tx) = &share.events {
            let _ = tx.send(RankEvent::Exited { rank, code });
        }
    };
    // A spare waits for ranks until it is stopped; once it ran some, it ends with them.
    let mut ran_ranks = !children.is_empty();
    let stopped = || {
        share
            .stay
            .as_ref()
            .is_none_or(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    };
    let mut terminating: Option<std::time::Instant> = None;
    // Ranks ended by a signal krun forwarded are not reported as killed.
    let mut forwarded = false;
    loop {
        if let Some(commands) = &share.commands {
            let pending: Vec<RankCommand> = commands
                .lock()
                .map(|rx| rx.try_iter().collect())
                .unwrap_or_default();
            for c in pending {
                match c {
                    RankCommand::Adopt { rank, env, reply } => {
                        held_exits.retain(|p| p.0 != rank);
                        if let Some(i) = children.iter().position(|(r, _)| *r == rank) {
                            let (r, mut c) = children.remove(i);
                            let _ = c.kill();
                            released.push((r, c));
                        }
                        let r = start(rank, &env, &mut children, &mut forwarders)
                            .map_err(|e| e.to_string());
                        let _ = reply.send(r);
                    }
                    RankCommand::Release { rank, reply } => {
                        match children.iter().position(|(r, _)| *r == rank) {
                            Some(i) => {
                                let (r, c) = children.remove(i);
                                let _ = reply.send(Ok(c.id()));
                                released.push((r, c));
                            }
                            None => {
                                let _ = reply.send(Err(format!(
                                    "rank {rank} does not run on node {}",
                                    share.node_id
                                )));
                            }
                        }
                    }
                    RankCommand::Watch { rank, start, reply } => {
                        held_exits.retain(|p| p.0 != rank);
                        let started = pipe()
                            .and_then(|o| Ok((o, pipe()?)))
                            .map_err(|e| format!("creating rank {rank}'s output pipes: {e}"));
                        let started = started.and_then(|((out_r, out_w), (err_r, err_w))| {
                            use std::os::fd::AsRawFd;
                            let pid = (start.0)(RankPipes {
                                stdout: out_w.as_raw_fd(),
                                stderr: err_w.as_raw_fd(),
                            })?;
                            // The process holds its own copies now.
                            drop((out_w, err_w));
                            forwarders.push(forward_output(
                                std::fs::File::from(out_r),
                                rank,
                                share.tag_output,
                                false,
                            ));
                            forwarders.push(forward_output(
                                std::fs::File::from(err_r),
                                rank,
                                share.tag_output,
                                true,
                            ));
                            Ok(pid)
                        });
                        if let Ok(pid) = started {
                            if let Some(tx) = &share.events {
                                let _ = tx.send(RankEvent::Started { rank, pid });
                            }
                            watched.push(Watched { rank, pid });
                        }
                        let _ = reply.send(started);
                    }
                    RankCommand::Terminate { reason } => {
                        if terminating.is_none() {
                            // A node with no rank left (a spare, a node the job did not
                            // need) ends silently: the line is for ranks being ended.
                            let running = children.len() + released.len() + watched.len();
                            if running > 0 {
                                eprintln!(
                                    "krund: node {}: ending {running} rank(s): {reason}",
                                    share.node_id,
                                );
                            }
                            for (_, c) in children.iter().chain(released.iter()) {
                                signal_rank(c.id(), libc::SIGTERM);
                            }
                            for w in &watched {
                                signal_rank(w.pid, libc::SIGTERM);
                            }
                            terminating = Some(std::time::Instant::now());
                            // A spare with no rank ends cleanly, and so does a drained node
                            // whose released ranks (moved away: their end is not this node's
                            // story) are still on their way out.
                            if !children.is_empty() || !watched.is_empty() {
                                worst = worst.max(1);
                            }
                        }
                    }
                }
            }
        }
        if terminating.is_some_and(|t| t.elapsed() >= TERMINATE_GRACE) {
            for (_, c) in children.iter_mut().chain(released.iter_mut()) {
                signal_rank(c.id(), libc::SIGKILL);
                let _ = c.kill();
            }
            for w in &watched {
                signal_rank(w.pid, libc::SIGKILL);
            }
        }
        ran_ranks |= !children.is_empty() || !watched.is_empty();
        let now = std::time::Instant::now();
        held_exits.retain(|&(rank, code, signal, at)| {
            let due = share.exit_grace.is_none_or(|g| now.duration_since(at) >= g);
            if due {
                report_exit(rank, code, signal);
                worst = worst.max(code);
            }
            !due
        });
        if children.is_empty() && released.is_empty() && held_exits.is_empty() && watched.is_empty()
        {
            if ran_ranks || stopped() || terminating.is_some() {
                break;
            }
            // A spare (no rank to forward it to) ends on SIGINT or SIGTERM, a scheduler or a
            // user stopping the job's processes ([`spare_signalled`]: krund then leaves
            // without waiting for the other nodes; its ranks, which it never ran, all ended
            // well).
            // Silent: krun itself ends a failed job's nodes this way.
            if take_signal().is_some_and(|s| s == libc::SIGINT || s == libc::SIGTERM) {
                SPARE_SIGNALLED.store(true, Ordering::SeqCst);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let requests = take_checkpoint_requests();
        if requests > 0 {
            // krun's policy takes the checkpoint (the requests of all nodes coalesce there).
            let told = share
                .events
                .as_ref()
                .is_some_and(|tx| tx.send(RankEvent::CheckpointAsked).is_ok());
            eprintln!(
                "krund: node {}: checkpoint requested (SIGUSR1 from the scheduler); {}",
                share.node_id,
                if told {
                    "krun's policy is asked"
                } else {
                    "this node runs no runtime to ask a policy"
                }
            );
        }
        if let Some(sig) = take_signal() {
            for (_, c) in children.iter() {
                signal_rank(c.id(), sig);
                forwarded = true;
            }
            for w in &watched {
                signal_rank(w.pid, sig);
                forwarded = true;
            }
        }
        // Ranks restored here by CRIU: reaped by pid, reported like the node's own.
        watched.retain(|w| match w.try_wait() {
            Some(status) => {
                remove_shm_segments(w.pid);
                let code = exit_code(status);
                if code != 0 && share.exit_grace.is_some() && terminating.is_none() && !forwarded {
                    held_exits.push((w.rank, code, status.signal(), std::time::Instant::now()));
                } else {
                    report_exit(w.rank, code, status.signal());
                    if terminating.is_none() {
                        worst = worst.max(code);
                    }
                }
                false
            }
            None => true,
        });
        // A released rank's process ends when it is captured: reap it quietly.
        released.retain_mut(|(_, c)| match c.try_wait() {
            Ok(Some(_)) => {
                remove_shm_segments(c.id());
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
        let mut ended = Vec::new();
        let mut killed = false;
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            let status = c.try_wait().map_err(|e| LauncherError::Io {
                context: format!("waiting for rank {rank}"),
                source: e,
            })?;
            let Some(status) = status else { continue };
            remove_shm_segments(c.id());
            let code = exit_code(status);
            // Held for a recovery, unless the rank ended on a signal this node forwarded
            // (the job is being stopped: no failure to recover from).
            if code != 0 && share.exit_grace.is_some() && terminating.is_none() && !forwarded {
                held_exits.push((*rank, code, status.signal(), std::time::Instant::now()));
            } else {
                if let (Some(sig), None, false) = (status.signal(), terminating, forwarded) {
                    // The job cannot go on without it (its peers would wait for its messages
                    // until their timeouts): end the node's other ranks and tell krun, which
                    // ends the other nodes.
                    if let Some(tx) = &share.events {
                        if tx
                            .send(RankEvent::Killed {
                                rank: *rank,
                                signal: sig,
                            })
                            .is_ok()
                        {
                            KILLED_SENT.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    killed = true;
                }
                report_exit(*rank, code, status.signal());
                // Ranks ended by the node after a failure are not the job's story.
                if terminating.is_none() {
                    worst = worst.max(code);
                }
            }
            ended.push(i);
        }
        for i in ended.into_iter().rev() {
            children.remove(i);
        }
        if killed && terminating.is_none() && !(children.is_empty() && released.is_empty()) {
            eprintln!(
                "krund: node {}: a rank was killed; ending the node's other rank(s)",
                share.node_id
            );
            for (_, c) in children.iter().chain(released.iter()) {
                signal_rank(c.id(), libc::SIGTERM);
            }
            terminating = Some(std::time::Instant::now());
        }
        if !children.is_empty()
            || !released.is_empty()
            || !held_exits.is_empty()
            || !watched.is_empty()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // A rank's output ends when every process holding its pipes has ended; after a forced
    // end, processes it left behind (outside its group) must not hold the node here.
    let limit = std::time::Instant::now()
        + if terminating.is_some() {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(3600)
        };
    for f in forwarders {
        while !f.is_finished() && std::time::Instant::now() < limit {
            std::thread::sleep(Duration::from_millis(5));
        }
        if f.is_finished() {
            let _ = f.join();
        }
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_share_counts_only_the_nodes_on_the_same_kernel() {
        let a = b"boot-a".to_vec();
        let b = b"boot-b".to_vec();
        let machines = [a.clone(), b.clone(), a.clone(), a, b];
        let counts = [2, 3, 4, 1, 5];
        assert_eq!(
            MachineShare::among(2, &machines, &counts),
            MachineShare {
                offset: 2,
                ranks: 7
            }
        );
        assert_eq!(
            MachineShare::among(4, &machines, &counts),
            MachineShare {
                offset: 3,
                ranks: 8
            }
        );
        // An unknown identity shares with nobody.
        let machines = [Vec::new(), Vec::new()];
        assert_eq!(
            MachineShare::among(1, &machines, &[2, 2]),
            MachineShare {
                offset: 0,
                ranks: 0
            }
        );
    }

    #[test]
    fn block_placement_like_slurm() {
        let p = Placement::block(12, 4, None).unwrap();
        assert_eq!(p.first, [0, 3, 6, 9]);
        assert_eq!(p.count, [3, 3, 3, 3]);
        let p = Placement::block(5, 3, None).unwrap();
        assert_eq!(p.count, [2, 2, 1]);
        let p = Placement::block(2, 3, None).unwrap();
        assert_eq!(p.count, [1, 1, 0]);
        assert_eq!(p.node_of(1), Some(1));
        assert!(Placement::block(9, 2, Some(4)).is_err());
        assert_eq!(Placement::block(4, 2, Some(4)).unwrap().count, [4, 0]);
        assert!(Placement::block(0, 2, None).is_err());
        let p = Placement::from_counts(&[2, 2, 2, 1]);
        assert_eq!(p.first, [0, 2, 4, 6]);
        assert_eq!(p.total(), 7);
        assert_eq!(Placement::parse_counts(&p.counts_arg()).unwrap(), p);
        assert!(Placement::parse_counts("1,x").is_err());
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), "signal 9 (SIGKILL)");
        assert_eq!(signal_name(64), "signal 64");
    }
}
