//! krun: run a job across node daemons: locally, on listed hosts, or inside a Slurm
//! allocation.
use std::process::ExitCode;

use std::time::Duration;

use launcher::daemon::DaemonClient;
use launcher::job::{self, Job, Launch, NodeSource, ProgramJob};
use launcher::slurm::Allocation;
use launcher::LauncherError;

const USAGE: &str = "usage: krun [-n RANKS] [--local NODES | --hosts LIST | --hostfile FILE] [--launch daemon|ssh]
            [--ppn K] [--tag-output] [--bind-to core|numa|none] [--report-bindings]
            [--provider P] [--checkpoint-interval SECS] [--spares K] [--mpi pmi1|none]
            [--inject-failure node=N@SECONDSs|node=N@Kckpt] [PROGRAM ARGS...]
       krun status [--job ID] [--json]        (a running job: epoch, members, ranks)
       krun status --hosts LIST | --hostfile FILE
       krun node add [HOST] [--job ID] | krun node drain NODE [--job ID]
       krun checkpoint [--job ID]             (ask the running job for a checkpoint now)
       krun fetch RANK VERSION [--node N] [--job ID]   (read a checkpoint back from the store)
       krun config [--provider P] [--bind-to B]   (effective settings and their origin)
       krun ghost inspect|capture|restore|rollback|migrate ...
      krun hostlist expand EXPR
       krun hostlist compress NAMES...

Nodes: --local NODES starts NODES krund on this machine (the default, with 3); --hosts
(a Slurm hostlist, HOST[:PORT]) or --hostfile (one host per line) use the `krund --listen`
daemons on those hosts (port 7171), or start krund over ssh with --launch ssh; inside a
Slurm allocation (SLURM_JOB_ID set) one krund per allocated node is started with srun. With a PROGRAM, runs RANKS copies
of it (default: one per node) placed in blocks of --ppn per node, each with KRUN_RANK,
KRUN_SIZE, KRUN_LOCAL_RANK, KRUN_LOCAL_SIZE, KRUN_NODE_ID, KRUN_NNODES and KRUN_BOOTSTRAP
(an all-gather service for the ranks), pinned to one core each by default (round robin
over the node's cores, read with hwloc); exit code: the highest rank's, or 128+signal.
--spares K: the last K nodes (locally: K more krund) run no ranks; when a node with ranks
fails, its ranks restart on a spare from the last committed checkpoint. --inject-failure
SIGKILLs node N's krund and its ranks at that time, or after K committed checkpoints.
--mpi: each node serves PMI-1 to its ranks (PMI_FD, PMI_RANK, PMI_SIZE; the default,
pmi1), so MPICH programs run as `krun -n 4 ./mpi_app`; none: no PMI.
Without a PROGRAM, runs the built-in workload:
every node writes a block into every other node's memory with one-sided RMA writes,
counts itself in with a remote fetch-add, elects a leader with compare-swap, reads its
block back with an RMA read, and verifies every byte.
Configuration: /etc/krun/krun.toml, then $XDG_CONFIG_HOME/krun/krun.toml, then the file in
KRUN_CONFIG, then KRUN_* variables, then flags; `krun config` shows the result. The
settings reach every node.";

fn parse() -> Result<Job, LauncherError> {
    let mut nodes = None;
    let mut hosts: Option<Vec<String>> = None;
    let mut launch = Launch::Daemon;
    let mut provider = None;
    let (mut ranks, mut per_node, mut tag_output) = (None, None, false);
    let mut bind_to = match std::env::var("KRUN_BIND_TO") {
        Ok(v) if !v.is_empty() => v.parse()?,
        _ => launcher::binding::BindTo::Core,
    };
    let mut report_bindings = false;
    let mut checkpoint_interval = None;
    let mut spares = 0;
    let mut inject = None;
    let mut mpi = None;
    let mut program = Vec::new();
    let mut args = std::env::args().skip(1);
    let count = |flag: &str, v: Option<String>| -> Result<usize, LauncherError> {
        let v = v.ok_or_else(|| LauncherError::Usage(format!("{flag} needs a number")))?;
        v.parse()
            .map_err(|_| LauncherError::Usage(format!("{flag} {v:?} is not a number")))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "-n" | "--ntasks" => ranks = Some(count("-n", args.next())?),
            "--ppn" => per_node = Some(count("--ppn", args.next())?),
            "--tag-output" => tag_output = true,
            "--bind-to" => {
                let v = args.next().ok_or_else(|| {
                    LauncherError::Usage("--bind-to needs core, numa or none".into())
                })?;
                bind_to = v.parse()?;
            }
            "--report-bindings" => report_bindings = true,
            "--checkpoint-interval" => {
                let v = args.next().ok_or_else(|| {
                    LauncherError::Usage("--checkpoint-interval needs seconds".into())
                })?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        LauncherError::Usage(format!(
                            "--checkpoint-interval {v:?} is not a positive number of seconds"
                        ))
                    })?;
                checkpoint_interval = Some(Duration::from_secs_f64(secs));
            }
            "--spares" => spares = count("--spares", args.next())?,
            "--mpi" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--mpi needs pmi1 or none".into()))?;
                mpi = Some(v.parse::<launcher::runtime::pmi::MpiMode>()?);
            }
            "--inject-failure" => {
                let v = args.next().ok_or_else(|| {
                    LauncherError::Usage("--inject-failure needs node=N@TIME".into())
                })?;
                inject = Some(v.parse::<job::Injection>()?);
            }
            "--local" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--local needs a node count".into()))?;
                nodes = Some(v.parse().map_err(|_| {
                    LauncherError::Usage(format!("--local {v:?} is not a node count"))
                })?);
            }
            "--hosts" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--hosts needs a host list".into()))?;
                hosts = Some(launcher::hostlist::expand(&v)?);
            }
            "--hostfile" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--hostfile needs a file".into()))?;
                hosts = Some(read_hostfile(&v)?);
            }
            "--launch" => match args.next().as_deref() {
                Some("daemon") => launch = Launch::Daemon,
                Some("ssh") => launch = Launch::Ssh,
                other => {
                    return Err(LauncherError::Usage(format!(
                        "--launch {other:?}: expected daemon or ssh"
                    )))
                }
            },
            "--provider" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--provider needs a name".into()))?;
                v.parse::<fabric::ProviderChoice>()?;
                provider = Some(v);
            }
            "-h" | "--help" => return Err(LauncherError::Usage(USAGE.into())),
            other if other.starts_with('-') => {
                return Err(LauncherError::Usage(format!(
                    "unknown argument {other:?}\n{USAGE}"
                )))
            }
            _ => {
                program.push(a);
                program.extend(args.by_ref());
            }
        }
    }
    // An explicit --local wins; inside a Slurm allocation the allocation's nodes are used.
    let mut job = match (nodes, hosts, Allocation::from_env()?) {
        (Some(_), Some(_), _) => {
            return Err(LauncherError::Usage(
                "--local and --hosts/--hostfile exclude each other".into(),
            ))
        }
        (Some(k), None, _) => Job::local(k)?,
        (None, Some(hosts), _) if hosts.is_empty() => {
            return Err(LauncherError::Usage("the host list is empty".into()))
        }
        (None, Some(hosts), _) => Job {
            nodes: NodeSource::Hosts { hosts, launch },
            ..Job::local(1)?
        },
        (None, None, Some(allocation)) => Job {
            nodes: NodeSource::Slurm(allocation),
            ..Job::local(1)?
        },
        (None, None, None) => Job::local(3)?,
    };
    if !program.is_empty() {
        job.program = Some(ProgramJob {
            ranks,
            per_node,
            tag_output,
            bind_to,
            report_bindings,
            argv: program,
            checkpoint_interval,
            spares,
        });
    } else if ranks.is_some() {
        return Err(LauncherError::Usage("-n needs a PROGRAM to run".into()));
    } else if spares > 0 {
        return Err(LauncherError::Usage(
            "--spares needs a PROGRAM to run".into(),
        ));
    }
    if let Some(i) = inject {
        if i.node >= job.node_count() {
            return Err(LauncherError::Usage(format!(
                "--inject-failure names node {}, the job has nodes 0-{}",
                i.node,
                job.node_count() - 1
            )));
        }
        job.inject = Some(i);
    }
    if let Some(p) = provider {
        job.env.push(("KRUN_FABRIC_PROVIDER".into(), p));
    }
    if let Some(m) = mpi {
        job.env.push(("KRUN_MPI".into(), m.name().into()));
    }
    Ok(job)
}

/// Hosts from a file: one per line (hostlist expressions allowed), `#` comments, and
/// anything after the first whitespace (e.g. `slots=4`) ignored.
fn read_hostfile(path: &str) -> Result<Vec<String>, LauncherError> {
    let text = std::fs::read_to_string(path).map_err(|e| LauncherError::Io {
        context: format!("reading hostfile {path}"),
        source: e,
    })?;
    let mut hosts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.split_whitespace().next() {
            hosts.extend(
                launcher::hostlist::expand(name)
                    .map_err(|e| LauncherError::Usage(format!("{path} line {}: {e}", n + 1)))?,
            );
        }
    }
    Ok(hosts)
}

/// `krun status [--job ID] [--json]`: the running job's epoch, members, cells, supervisors
/// and every rank's row, from its nodes; `--hosts`/`--hostfile`: what each host's daemon runs.
fn status(args: &[String]) -> Result<String, LauncherError> {
    let (mut job, mut json, mut hosts) = (None, false, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| LauncherError::Usage(format!("{a} needs {what}")))
        };
        match a.as_str() {
            "--job" => job = Some(value("a job id")?),
            "--json" => json = true,
            "--hosts" => hosts = Some(launcher::hostlist::expand(&value("a host list")?)?),
            "--hostfile" => hosts = Some(read_hostfile(&value("a file")?)?),
            other => {
                return Err(LauncherError::Usage(format!(
                    "unknown argument {other:?}\n{STATUS_USAGE}"
                )))
            }
        }
    }
    if let Some(hosts) = hosts {
        return host_status(&hosts);
    }
    let s = launcher::runtime::status::query(job.as_deref(), Duration::from_secs(10))?;
    if json {
        serde_json::to_string_pretty(&s)
            .map_err(|e| LauncherError::Usage(format!("encoding the status: {e}")))
    } else {
        Ok(s.render())
    }
}

const STATUS_USAGE: &str =
    "krun status [--job ID] [--json] | krun status --hosts LIST | --hostfile FILE";

/// `krun status --hosts`: asks every host's daemon what it runs.
fn host_status(hosts: &[String]) -> Result<String, LauncherError> {
    let secret = fabric::secret::ClusterSecret::from_env()?;
    let mut out = format!("{} host(s)\n", hosts.len());
    for (node, host) in hosts.iter().enumerate() {
        match DaemonClient::connect(host, Duration::from_secs(5), secret.as_ref())
            .and_then(DaemonClient::status)
        {
            Ok(text) => out += &format!("node {node} {host}: {text}"),
            Err(e) => out += &format!("node {node} {host}: down ({e})\n"),
        }
    }
    Ok(out.trim_end().to_string())
}

const NODE_USAGE: &str = "krun node add [HOST] [--job ID] | krun node drain NODE [--job ID]";

/// `krun node add [HOST]` / `krun node drain N`: asks the running krun of the job.
fn node(args: &[String]) -> Result<String, LauncherError> {
    use launcher::runtime::control::{LauncherReply, LauncherRequest};
    let mut job = None;
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--job" {
            job = Some(
                it.next()
                    .cloned()
                    .ok_or_else(|| LauncherError::Usage("--job needs a job id".into()))?,
            );
        } else {
            words.push(a.as_str());
        }
    }
    let req = match words.as_slice() {
        ["add"] => LauncherRequest::AddNode { host: None },
        ["add", host] => LauncherRequest::AddNode {
            host: Some(host.to_string()),
        },
        ["drain", n] => LauncherRequest::DrainNode {
            node: n
                .parse()
                .map_err(|_| LauncherError::Usage(format!("node {n:?} is not a node id")))?,
        },
        _ => return Err(LauncherError::Usage(NODE_USAGE.into())),
    };
    match launcher::runtime::status::ask_launcher(job.as_deref(), &req)? {
        LauncherReply::Added { node, epoch } => {
            Ok(format!("node {node} joined the job at epoch {epoch}"))
        }
        LauncherReply::Drained { node, moved } => Ok(format!(
            "node {node} left the job ({} rank(s) moved)",
            moved.len()
        )),
        LauncherReply::Requested => Ok("checkpoint requested".into()),
        LauncherReply::Refused(why) => Err(LauncherError::Usage(why)),
    }
}

/// `krun checkpoint [--job ID]`: asks the running job's checkpoint policy for a checkpoint.
fn checkpoint(args: &[String]) -> Result<String, LauncherError> {
    use launcher::runtime::control::{LauncherReply, LauncherRequest};
    let job = match args {
        [] => None,
        [flag, id] if flag == "--job" => Some(id.as_str()),
        _ => return Err(LauncherError::Usage("krun checkpoint [--job ID]".into())),
    };
    match launcher::runtime::status::ask_launcher(job, &LauncherRequest::Checkpoint)? {
        LauncherReply::Refused(why) => Err(LauncherError::Usage(why)),
        _ => Ok("checkpoint requested (krun prints the commit)".into()),
    }
}

const FETCH_USAGE: &str = "krun fetch RANK VERSION [--node N] [--job ID]";

/// `krun fetch RANK VERSION [--node N] [--job ID]`: reads a rank's checkpoint image back
/// from the job's checkpoint store through node N (or the first node that answers), as a
/// restart would, and says which level and node served it.
fn fetch(args: &[String]) -> Result<String, LauncherError> {
    let (mut job, mut node, mut words) = (None, None, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| LauncherError::Usage(format!("{name} needs a value")))
        };
        match a.as_str() {
            "--job" => job = Some(value("--job")?),
            "--node" => {
                let v = value("--node")?;
                node =
                    Some(v.parse().map_err(|_| {
                        LauncherError::Usage(format!("--node {v:?} is not a node id"))
                    })?);
            }
            w => words.push(w.to_string()),
        }
    }
    let [rank, version] = words.as_slice() else {
        return Err(LauncherError::Usage(FETCH_USAGE.into()));
    };
    let rank: u32 = rank
        .parse()
        .map_err(|_| LauncherError::Usage(format!("rank {rank:?} is not a number")))?;
    let version: u64 = version
        .trim_start_matches('v')
        .parse()
        .map_err(|_| LauncherError::Usage(format!("version {version:?} is not a number")))?;
    let f = launcher::runtime::status::fetch(
        job.as_deref(),
        node,
        rank,
        version,
        Duration::from_secs(30),
    )?;
    Ok(format!(
        "rank {} v{}: {} bytes from L{} on node {}",
        f.rank, f.version, f.bytes, f.level, f.node
    ))
}

/// A subcommand: arguments in, text to print out.
type Subcommand = fn(&[String]) -> Result<String, LauncherError>;

/// `krun hostlist expand|compress ...`: Slurm's hostlist grammar.
fn hostlist(args: &[String]) -> Result<String, LauncherError> {
    match args {
        [verb, expr] if verb == "expand" => Ok(launcher::hostlist::expand(expr)?.join("\n")),
        [verb, names @ ..] if verb == "compress" && !names.is_empty() => {
            let mut all = Vec::new();
            for n in names {
                all.extend(launcher::hostlist::expand(n)?);
            }
            Ok(launcher::hostlist::compress(&all))
        }
        _ => Err(LauncherError::Usage(
            "krun hostlist expand EXPR | krun hostlist compress NAMES...".into(),
        )),
    }
}

/// `krun config [--provider P] [--bind-to B]`: the effective settings and where each came from.
fn show_config(
    config: &mut launcher::config::Config,
    args: &[String],
) -> Result<String, LauncherError> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let var = match a.as_str() {
            "--provider" => "KRUN_FABRIC_PROVIDER",
            "--bind-to" => "KRUN_BIND_TO",
            other => {
                return Err(LauncherError::Usage(format!(
                    "krun config: unknown argument {other:?} (usage: krun config [--provider P] [--bind-to B])"
                )))
            }
        };
        let v = it
            .next()
            .ok_or_else(|| LauncherError::Usage(format!("{a} needs a value")))?;
        config.set_flag(var, v, a)?;
    }
    Ok(config.render())
}

/// Prints a command's output. A reader that went away (`krun ghost inspect IMG | head`) ends
/// the command quietly instead of a panic on the closed pipe.
fn emit(text: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|_| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("krun: writing the output: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Files and variables first: every later step (and every process krun starts) sees the
    // effective settings.
    let mut config = match launcher::config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("krun: {e}");
            return ExitCode::from(2);
        }
    };
    if args.first().map(String::as_str) == Some("config") {
        return match show_config(&mut config, &args[1..]) {
            Ok(text) => emit(text.trim_end()),
            Err(e) => {
                eprintln!("krun: {e}");
                ExitCode::from(2)
            }
        };
    }
    let subcommand: Option<Subcommand> = match args.first().map(String::as_str) {
        Some("hostlist") => Some(hostlist),
        Some("status") => Some(status),
        Some("node") => Some(node),
        Some("fetch") => Some(fetch),
        Some("checkpoint") => Some(checkpoint),
        Some("ghost") => Some(launcher::ghost_cli::run),
        _ => None,
    };
    if let Some(run) = subcommand {
        return match run(&args[1..]) {
            Ok(out) => emit(&out),
            Err(e) => {
                eprintln!("krun: {e}");
                ExitCode::from(2)
            }
        };
    }
    let job = match parse() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("krun: {e}");
            return ExitCode::from(2);
        }
    };
    let builtin = job.program.is_none();
    if builtin {
        let mode = match &job.nodes {
            NodeSource::Local(_) => "local".to_string(),
            NodeSource::Slurm(a) => format!("Slurm job {}", a.job_id),
            NodeSource::Hosts { .. } => "host".to_string(),
        };
        println!(
            "krun: starting {} {mode} nodes ({})",
            job.node_count(),
            job.krund.display()
        );
    }
    launcher::ranks::catch_forwarded_signals();
    match job::run(&job) {
        Ok(0) => {
            if builtin {
                println!("krun: job finished on {} nodes", job.node_count());
            }
            ExitCode::SUCCESS
        }
        Ok(code) => {
            if builtin {
                eprintln!("krun: job failed with exit code {code}");
            }
            ExitCode::from(code.clamp(1, 255) as u8)
        }
        Err(e) => {
            eprintln!("krun: error: {e}");
            ExitCode::FAILURE
        }
    }
}
