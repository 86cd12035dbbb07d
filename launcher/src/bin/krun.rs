//! krun: run a job across node daemons: locally, on listed hosts, or inside a Slurm
//! allocation.
use std::process::ExitCode;

use std::time::Duration;

use std::path::PathBuf;

use clap::Parser;
use launcher::cli::{
    HostlistAction, KrunCli, KrunCommand, LaunchArg, NodeAction, PolicyAction, RunArgs,
};
use launcher::daemon::DaemonClient;
use launcher::job::{self, Job, Launch, NodeSource, ProgramJob};
use launcher::slurm::Allocation;
use launcher::LauncherError;

/// The job a `krun [flags] [PROGRAM ...]` command line describes.
fn job_from(mut run: RunArgs) -> Result<Job, LauncherError> {
    let hosts = match (&run.hosts, &run.hostfile) {
        (Some(list), _) => Some(launcher::hostlist::expand(list)?),
        (None, Some(file)) => Some(read_hostfile(file)?),
        (None, None) => None,
    };
    // -N is --local's count locally, and takes the first N hosts or allocated nodes.
    let nodes = match (run.local, run.nodes) {
        (Some(l), Some(n)) if l != n => {
            return Err(LauncherError::Usage(format!(
                "--local {l} and -N {n} name different node counts"
            )))
        }
        (l, n) => l.or(n),
    };
    let take = |names: Vec<String>, what: &str| -> Result<Vec<String>, LauncherError> {
        match run.nodes {
            Some(n) if n > names.len() => Err(LauncherError::Usage(format!(
                "-N {n}: {what} has only {} node(s)",
                names.len()
            ))),
            Some(n) => Ok(names.into_iter().take(n).collect()),
            None => Ok(names),
        }
    };
    let launch = match run.launch {
        LaunchArg::Daemon => Launch::Daemon,
        LaunchArg::Ssh => Launch::Ssh,
    };
    // An explicit --local wins; inside a Slurm allocation the allocation's nodes are used.
    let mut job = match (run.local, hosts, Allocation::from_env()?) {
        (None, Some(hosts), _) if hosts.is_empty() => {
            return Err(LauncherError::Usage("the host list is empty".into()))
        }
        (None, Some(hosts), _) => Job {
            nodes: NodeSource::Hosts {
                hosts: take(hosts, "the host list")?,
                launch,
            },
            ..Job::local(1)?
        },
        (None, None, Some(mut allocation)) => {
            if let Some(n) = run.nodes {
                allocation.nodes = take(allocation.nodes, "the allocation")?;
                allocation.tasks_per_node.truncate(n);
            }
            Job {
                nodes: NodeSource::Slurm(allocation),
                ..Job::local(1)?
            }
        }
        _ => Job::local(nodes.unwrap_or(3))?,
    };
    let bind_to = match run.bind_to {
        Some(b) => b,
        None => match std::env::var("KRUN_BIND_TO") {
            Ok(v) if !v.is_empty() => v.parse()?,
            _ => launcher::binding::BindTo::Core,
        },
    };
    if !run.program.is_empty() {
        job.program = Some(ProgramJob {
            ranks: run.ranks,
            per_node: run.per_node,
            tag_output: run.tag_output,
            bind_to,
            report_bindings: run.report_bindings,
            argv: run.program,
            checkpoint_interval: run.checkpoint_interval,
            spares: run.spares,
            policy: None,
        });
        if let (Some(file), Some(program)) = (&run.policy, job.program.as_mut()) {
            apply_policy(file, program, &mut run.inject_failure, run.spares > 0)?;
        }
    } else if run.ranks.is_some() {
        return Err(LauncherError::Usage("-n needs a PROGRAM to run".into()));
    } else if run.spares > 0 {
        return Err(LauncherError::Usage(
            "--spares needs a PROGRAM to run".into(),
        ));
    } else if run.policy.is_some() {
        return Err(LauncherError::Usage(
            "--policy needs a PROGRAM to run".into(),
        ));
    }
    for i in run.inject_failure {
        if i.node >= job.node_count() {
            return Err(LauncherError::Usage(format!(
                "--inject-failure names node {}, the job has nodes 0-{}",
                i.node,
                job.node_count() - 1
            )));
        }
        job.inject.push(i);
    }
    if let Some(p) = run.provider {
        job.env.push(("KRUN_FABRIC_PROVIDER".into(), p));
    }
    if let Some(m) = run.mpi {
        job.env.push(("KRUN_MPI".into(), m.name().into()));
    }
    job.env.extend(run.export);
    job.summary_json = run.summary_json;
    Ok(job)
}

/// Hosts from a file: one per line (hostlist expressions allowed), `#` comments, and
/// anything after the first whitespace (e.g. `slots=4`) ignored.
fn read_hostfile(path: &std::path::Path) -> Result<Vec<String>, LauncherError> {
    let text = std::fs::read_to_string(path).map_err(|e| LauncherError::Io {
        context: format!("reading hostfile {}", path.display()),
        source: e,
    })?;
    let mut hosts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.split_whitespace().next() {
            hosts.extend(launcher::hostlist::expand(name).map_err(|e| {
                LauncherError::Usage(format!("{} line {}: {e}", path.display(), n + 1))
            })?);
        }
    }
    Ok(hosts)
}

/// `krun status [--job ID] [--json]`: the running job's epoch, members, cells, supervisors
/// and every rank's row, from its nodes; `--hosts`/`--hostfile`: what each host's daemon runs.
fn status(
    job: Option<String>,
    json: bool,
    hosts: Option<String>,
    hostfile: Option<PathBuf>,
) -> Result<String, LauncherError> {
    let hosts = match (hosts, hostfile) {
        (Some(list), _) => Some(launcher::hostlist::expand(&list)?),
        (None, Some(file)) => Some(read_hostfile(&file)?),
        (None, None) => None,
    };
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

/// `krun node add [HOST]` / `krun node drain N`: asks the running krun of the job.
fn node(action: NodeAction) -> Result<String, LauncherError> {
    use launcher::runtime::control::{LauncherReply, LauncherRequest};
    let (job, req) = match action {
        NodeAction::Add { host, job } => (job, LauncherRequest::AddNode { host }),
        NodeAction::Drain { node, job } => (job, LauncherRequest::DrainNode { node }),
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
        LauncherReply::Policy(text) => Ok(text),
        LauncherReply::Refused(why) => Err(LauncherError::Usage(why)),
    }
}

/// `krun policy load FILE|unload|show [--job ID]`: asks the running job's policy thread.
fn policy(action: PolicyAction) -> Result<String, LauncherError> {
    use launcher::runtime::control::{LauncherReply, LauncherRequest, PolicyRequest};
    let (job, req) = match action {
        PolicyAction::Load { file, job } => {
            let path = std::path::absolute(&file).map_err(|e| LauncherError::Io {
                context: format!("resolving {}", file.display()),
                source: e,
            })?;
            // Checked here first: errors name the file, the line and the key.
            let text = std::fs::read_to_string(&path).map_err(|e| LauncherError::Io {
                context: format!("reading the policy description {}", path.display()),
                source: e,
            })?;
            let source = path.display().to_string();
            policies::description::Description::parse(&source, &text)
                .map_err(|e| LauncherError::Usage(e.to_string()))?;
            (job, PolicyRequest::Load { source, text })
        }
        PolicyAction::Unload { job } => (job, PolicyRequest::Unload),
        PolicyAction::Show { job } => (job, PolicyRequest::Show),
    };
    match launcher::runtime::status::ask_launcher(job.as_deref(), &LauncherRequest::Policy(req))? {
        LauncherReply::Policy(text) => Ok(text),
        LauncherReply::Refused(why) => Err(LauncherError::Usage(why)),
        other => Err(LauncherError::Usage(format!("unexpected answer {other:?}"))),
    }
}

/// `krun --policy FILE`: the description, with its spares and failure injections applied to
/// the job (flags win: --checkpoint-interval over the file's interval; --spares and the
/// file's spares must agree).
fn apply_policy(
    file: &std::path::Path,
    program: &mut ProgramJob,
    inject: &mut Vec<launcher::job::Injection>,
    spares_flag: bool,
) -> Result<(), LauncherError> {
    let path = std::path::absolute(file).map_err(|e| LauncherError::Io {
        context: format!("resolving {}", file.display()),
        source: e,
    })?;
    let mut desc = policies::description::Description::load(&path)
        .map_err(|e| LauncherError::Usage(e.to_string()))?;
    if let Some(s) = desc.spares {
        let s = s as usize;
        if spares_flag && s != program.spares {
            return Err(LauncherError::Usage(format!(
                "--spares {} and {} (spares = {s}) disagree",
                program.spares,
                path.display()
            )));
        }
        program.spares = s;
    }
    for (text, line) in &desc.inject {
        let i: launcher::job::Injection = text.parse().map_err(|e| {
            LauncherError::Usage(format!(
                "policy description {}:{line}: inject.failures: {e}",
                path.display()
            ))
        })?;
        inject.push(i);
    }
    if program.checkpoint_interval.is_some() {
        desc.interval = None;
    }
    program.policy = Some(desc);
    Ok(())
}

/// `krun checkpoint [--job ID]`: asks the running job's checkpoint policy for a checkpoint.
fn checkpoint(job: Option<String>) -> Result<String, LauncherError> {
    use launcher::runtime::control::{LauncherReply, LauncherRequest};
    match launcher::runtime::status::ask_launcher(job.as_deref(), &LauncherRequest::Checkpoint)? {
        LauncherReply::Refused(why) => Err(LauncherError::Usage(why)),
        _ => Ok("checkpoint requested (krun prints the commit)".into()),
    }
}

/// `krun fetch RANK VERSION [--node N] [--job ID]`: reads a rank's checkpoint image back
/// from the job's checkpoint store through node N (or the first node that answers), as a
/// restart would, and says which level and node served it.
fn fetch(
    rank: u32,
    version: u64,
    node: Option<u32>,
    job: Option<String>,
) -> Result<String, LauncherError> {
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

/// `krun hostlist expand|compress ...`: Slurm's hostlist grammar.
fn hostlist(action: HostlistAction) -> Result<String, LauncherError> {
    match action {
        HostlistAction::Expand { expr } => Ok(launcher::hostlist::expand(&expr)?.join("\n")),
        HostlistAction::Compress { names } => {
            let mut all = Vec::new();
            for n in names {
                all.extend(launcher::hostlist::expand(&n)?);
            }
            Ok(launcher::hostlist::compress(&all))
        }
    }
}

/// `krun config [--provider P] [--bind-to B]`: the effective settings and where each came from.
fn show_config(
    config: &mut launcher::config::Config,
    provider: Option<String>,
    bind_to: Option<String>,
) -> Result<String, LauncherError> {
    if let Some(p) = provider {
        config.set_flag("KRUN_FABRIC_PROVIDER", &p, "--provider")?;
    }
    if let Some(b) = bind_to {
        config.set_flag("KRUN_BIND_TO", &b, "--bind-to")?;
    }
    Ok(config.render())
}

/// Runs a subcommand: what to print, or the error.
fn subcommand(
    config: &mut launcher::config::Config,
    command: KrunCommand,
) -> Result<String, LauncherError> {
    match command {
        KrunCommand::Status {
            job,
            json,
            hosts,
            hostfile,
        } => status(job, json, hosts, hostfile),
        KrunCommand::Node { action } => node(action),
        KrunCommand::Checkpoint { job } => checkpoint(job),
        KrunCommand::Policy { action } => policy(action),
        KrunCommand::Fetch {
            rank,
            version,
            node,
            job,
        } => fetch(rank, version, node, job),
        KrunCommand::Config { provider, bind_to } => {
            show_config(config, provider, bind_to).map(|t| t.trim_end().to_string())
        }
        KrunCommand::Ghost { action } => launcher::ghost_cli::run(action),
        KrunCommand::Hostlist { action } => hostlist(action),
        KrunCommand::Completions { shell } => {
            let mut script = Vec::new();
            launcher::cli::completions(shell, &mut script);
            Ok(String::from_utf8_lossy(&script).trim_end().to_string())
        }
        KrunCommand::Man { dir } => {
            let pages = launcher::cli::man_pages(&dir)?;
            Ok(format!(
                "{} man pages written to {}",
                pages.len(),
                dir.display()
            ))
        }
    }
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
    // Usage errors exit 2 with clap's message (and a suggestion for a mistyped flag);
    // --help and --version exit 0.
    let cli = KrunCli::parse();
    // Files and variables first: every later step (and every process krun starts) sees the
    // effective settings.
    let mut config = match launcher::config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("krun: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(command) = cli.command {
        return match subcommand(&mut config, command) {
            Ok(out) => emit(&out),
            Err(e) => {
                eprintln!("krun: {e}");
                ExitCode::from(2)
            }
        };
    }
    let job = match job_from(cli.run) {
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
