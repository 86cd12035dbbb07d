//! The command lines of `krun` and `krund`, defined once with clap: the parsers, `--help`
//! per subcommand, `--version`, suggestions for mistyped flags, shell completions
//! (`krun completions bash`) and man pages (`scripts/man-pages.sh`, through `krun man DIR`)
//! all come from these definitions, so the usage texts cannot drift from what is parsed.
//!
//! Flags follow srun and mpirun where they overlap: `-n/--ntasks`, `-N/--nodes`,
//! `--ntasks-per-node` (`--ppn`), `--cpu-bind`/`--bind-to`, `--label`/`--tag-output`,
//! `-x/--export`. Values are checked here by the same parsers the components use
//! ([`BindTo`], [`Injection`], the hostlist grammar), so an error names the flag and the value.
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::binding::BindTo;
use crate::error::{LauncherError, Result};
use crate::inject::Injection;

const KRUN_AFTER_HELP: &str = "\
Nodes: --local NODES starts NODES krund on this machine (the default, with 3); --hosts (a
Slurm hostlist, HOST[:PORT]) or --hostfile (one host per line) use the `krund --listen`
daemons on those hosts (port 7171), or start krund over ssh with --launch ssh; inside a Slurm
allocation (SLURM_JOB_ID set) one krund per allocated node is started with srun. -N takes the
first NODES of the hosts or of the allocation.

With a PROGRAM, runs RANKS copies of it (default: one per node) placed in blocks of
--ntasks-per-node per node, each with KRUN_RANK, KRUN_SIZE, KRUN_LOCAL_RANK, KRUN_LOCAL_SIZE,
KRUN_NODE_ID, KRUN_NNODES and KRUN_BOOTSTRAP (an all-gather service for the ranks), pinned
to one core each by default (round robin over the node's cores, read with hwloc); exit code:
the highest rank's, or 128+signal.

--spares K: the last K nodes (locally: K more krund) run no ranks; when a node with ranks
fails, its ranks restart on a spare from the last committed checkpoint and the surviving
ranks roll back inside their live processes (same pids). --inject-failure (repeatable)
SIGKILLs node N's krund and its ranks at WHEN: SECONDSs or MSms after every node is up, Kckpt after
K committed checkpoints (Kckpt+DELAY: DELAY after that), ckptK:barrier or ckptK:capture at that phase of the K-th checkpoint
attempt, recoveryK once the K-th recovery's restart order went out. --policy FILE runs the HA
policy a TOML file describes (a built-in one or a policy module); `krun policy load FILE`,
`unload` and `show` swap or show it while the job runs.

Without a PROGRAM, runs the built-in workload: every node writes a block into every other
node's memory with one-sided RMA writes, counts itself in with a remote fetch-add, elects a
leader with compare-swap, reads its block back with an RMA read, and verifies every byte.

Configuration: /etc/krun/krun.toml, then $XDG_CONFIG_HOME/krun/krun.toml, then the file in
KRUN_CONFIG, then KRUN_* variables, then flags; `krun config` shows the result. The settings
reach every node.";

/// `krun`: run a job across node daemons, locally, on listed hosts, or inside a Slurm
/// allocation; or ask a running job.
#[derive(Debug, Parser)]
#[command(
    name = "krun",
    version,
    about = "Run a job across node daemons: locally, on listed hosts, or inside a Slurm allocation",
    after_long_help = KRUN_AFTER_HELP,
    args_conflicts_with_subcommands = true
)]
pub struct KrunCli {
    #[command(subcommand)]
    pub command: Option<KrunCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// How `krun` starts krund on listed hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LaunchArg {
    /// Use the `krund --listen` daemon already running on each host.
    Daemon,
    /// Start krund on each host over ssh (KRUN_SSH, default `ssh`).
    Ssh,
}

/// Running a job: where its nodes come from and what its ranks run.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Number of ranks (default: one per node).
    #[arg(short = 'n', long = "ntasks", value_name = "RANKS")]
    pub ranks: Option<usize>,
    /// Number of nodes: krund started locally, or the first NODES hosts or allocated nodes.
    #[arg(short = 'N', long = "nodes", value_name = "NODES", value_parser = positive)]
    pub nodes: Option<usize>,
    /// Start NODES krund on this machine (the default, with 3).
    #[arg(long, value_name = "NODES", value_parser = positive, conflicts_with_all = ["hosts", "hostfile"])]
    pub local: Option<usize>,
    /// Hosts running `krund --listen`, as a Slurm hostlist (node[1-4],other:7272).
    #[arg(long, value_name = "LIST", conflicts_with = "hostfile")]
    pub hosts: Option<String>,
    /// A file of hosts, one per line (hostlists allowed, `#` comments).
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// How krund is started on listed hosts.
    #[arg(long, value_enum, default_value = "daemon")]
    pub launch: LaunchArg,
    /// Ranks placed on each node, in blocks.
    #[arg(long = "ntasks-per-node", visible_alias = "ppn", value_name = "K", value_parser = positive)]
    pub per_node: Option<usize>,
    /// Prefix every output line with the rank that wrote it.
    #[arg(long = "tag-output", visible_alias = "label")]
    pub tag_output: bool,
    /// Pin each rank to a core, a NUMA domain, or nothing (also core|cores, numa|ldoms, none).
    #[arg(long = "bind-to", visible_alias = "cpu-bind", value_name = "core|numa|none", value_parser = bind_to)]
    pub bind_to: Option<BindTo>,
    /// Print each rank's binding (and why it has none).
    #[arg(long)]
    pub report_bindings: bool,
    /// The fabric provider (tcp, shm, verbs, or auto).
    #[arg(long, value_name = "P", value_parser = provider)]
    pub provider: Option<String>,
    /// Take a coordinated checkpoint every SECS seconds.
    #[arg(long, value_name = "SECS", value_parser = seconds)]
    pub checkpoint_interval: Option<Duration>,
    /// Run the HA policy described in FILE (TOML: which policy or module, interval or
    /// daly, levels, spares, restart placement, ...; see the README). Default: the built-in
    /// coordinated policy.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Keep the last K nodes (locally: K more krund) as spares that run no ranks.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub spares: usize,
    /// SIGKILL node N's krund and its ranks (repeatable): node=N@5s, node=N@500ms,
    /// node=N@Kckpt, node=N@Kckpt+DELAY, node=N@ckptK:barrier, node=N@ckptK:capture or node=N@recoveryK.
    #[arg(long, value_name = "node=N@WHEN", value_parser = injection)]
    pub inject_failure: Vec<Injection>,
    /// Pass a variable to the ranks: VAR=VALUE, or VAR to pass krun's own value (repeatable).
    #[arg(short = 'x', long = "export", value_name = "VAR[=VALUE]", value_parser = export)]
    pub export: Vec<(String, String)>,
    /// PMI for MPI programs: both (the default: each node serves PMI over PMI_FD, PMI-1
    /// or PMI-2 as the client asks, and PMIx for Open MPI), pmi (or pmi1, pmi2), pmix or
    /// none.
    #[arg(long, value_name = "both|pmi|pmix|none", value_parser = mpi_mode)]
    pub mpi: Option<crate::runtime::pmi::MpiMode>,
    /// Write the end-of-job summary (exit code, nodes, checkpoints, failures, recoveries,
    /// time lost) to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// The program every rank runs, and its arguments.
    #[arg(value_name = "PROGRAM", trailing_var_arg = true)]
    pub program: Vec<String>,
}

/// `krun`'s subcommands.
#[derive(Debug, Subcommand)]
pub enum KrunCommand {
    /// A running job's epoch, members, cells, supervisors and ranks.
    Status {
        /// The job (krun's process id; default: the only job of this user on this host).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// Print JSON for scripts.
        #[arg(long, conflicts_with_all = ["hosts", "hostfile"])]
        json: bool,
        /// Ask each host's daemon what it runs instead.
        #[arg(long, value_name = "LIST", conflicts_with = "hostfile")]
        hosts: Option<String>,
        /// Ask the daemons of the hosts in FILE.
        #[arg(long, value_name = "FILE")]
        hostfile: Option<PathBuf>,
    },
    /// Add a node to a running job, or drain one.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Ask a running job's checkpoint policy for a checkpoint now.
    Checkpoint {
        /// The job (krun's process id).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
    /// Load, unload or show a running job's HA policy (swapped at a consistent cut).
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Read a rank's checkpoint back from the job's store, as a restart would.
    Fetch {
        /// The rank.
        rank: u32,
        /// The checkpoint version (7 or v7).
        #[arg(value_parser = version)]
        version: u64,
        /// Ask this node (default: the first that answers).
        #[arg(long, value_name = "N")]
        node: Option<u32>,
        /// The job (krun's process id).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
    /// The effective settings and where each came from.
    Config {
        /// As if given to krun.
        #[arg(long, value_name = "P")]
        provider: Option<String>,
        /// As if given to krun.
        #[arg(long = "bind-to", value_name = "B")]
        bind_to: Option<String>,
    },
    /// Capture, restore, roll back, migrate and inspect processes (the backend, CRIU or the
    /// native checkpointer, is chosen from the process or the image).
    Ghost {
        #[command(subcommand)]
        action: GhostAction,
    },
    /// Slurm's hostlist grammar.
    Hostlist {
        #[command(subcommand)]
        action: HostlistAction,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages of krun and krund into DIR (used by scripts/man-pages.sh).
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// `krun node ...`.
/// `krun ghost ...`: the uniform checkpointer API on one process (`launcher/src/ghost_cli.rs`).
#[derive(Subcommand, Debug)]
pub enum GhostAction {
    /// Start a program CRIU can capture and restore beside itself (PID 1 of its own PID
    /// namespace).
    Run {
        /// Where the program's output goes (default: /dev/null).
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The program and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "PROGRAM"
        )]
        program: Vec<String>,
    },
    /// Verify an image and print what it holds.
    Inspect { image: PathBuf },
    /// Capture a process (kept running unless --kill).
    Capture {
        #[arg(value_parser = pid)]
        pid: i32,
        /// The image to write.
        #[arg(short = 'o', long = "image", value_name = "IMAGE")]
        image: PathBuf,
        /// End the process once captured.
        #[arg(long)]
        kill: bool,
        /// Compress the image with zstd.
        #[arg(long)]
        zstd: bool,
    },
    /// Start a new process from an image; prints its pid.
    Restore {
        image: PathBuf,
        /// Where the restored process's output goes.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The owner name its native images are kept under.
        #[arg(long, value_name = "NAME")]
        owner: Option<String>,
        /// Native: the directory that holds its images from then on.
        #[arg(long, value_name = "DIR")]
        workdir: Option<PathBuf>,
    },
    /// Bring a live process back to an image.
    Rollback {
        #[arg(value_parser = pid)]
        pid: i32,
        image: PathBuf,
    },
    /// Capture and end a process, and restore it elsewhere: in network namespace NAME (a node
    /// of a namespace cluster), or on HOST through its `krund --listen` daemon (the image
    /// travels over the authenticated link; KRUN_SECRET_FILE), which watches and reaps it;
    /// krun then follows it (its output, its exit code) until it ends.
    Migrate {
        #[arg(value_parser = pid)]
        pid: i32,
        /// The image to write.
        #[arg(short = 'o', long = "image", value_name = "IMAGE")]
        image: PathBuf,
        /// Restore in this network namespace.
        #[arg(
            long,
            value_name = "NAME",
            required_unless_present = "to",
            conflicts_with = "to"
        )]
        netns: Option<String>,
        /// Restore on this host (HOST[:PORT]).
        #[arg(long, value_name = "HOST[:PORT]")]
        to: Option<String>,
        /// Where the restored process's output goes.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

fn pid(v: &str) -> std::result::Result<i32, String> {
    v.parse::<i32>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!("'{v}' is not a process id"))
}

#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Join a new node (locally: a new krund; HOST: its `krund --listen` daemon).
    Add {
        host: Option<String>,
        /// The job (krun's process id).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
    /// Move the node's ranks to other nodes, then let it leave.
    Drain {
        node: u32,
        /// The job (krun's process id).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
}

/// `krun policy ...`.
#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Swap in the policy described in FILE: after a coordinated checkpoint (or at the
    /// recovery line), with no work lost; refused with the reason when unsafe.
    Load {
        file: PathBuf,
        /// The job (krun's process id).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
    /// Go back to the built-in policy the job started with (a module is unloaded).
    Unload {
        /// The job (krun's process id).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
    /// The policy in force, its settings, phase and recovery line.
    Show {
        /// The job (krun's process id).
        #[arg(long, value_name = "ID")]
        job: Option<String>,
    },
}

/// `krun hostlist ...`.
#[derive(Debug, Subcommand)]
pub enum HostlistAction {
    /// Print every name of EXPR, one per line.
    Expand { expr: String },
    /// Print the shortest hostlist naming every NAME.
    Compress {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// `krund`: the node runtime. Normally started by krun; `--listen` runs the host daemon.
#[derive(Debug, Parser)]
#[command(
    name = "krund",
    version,
    about = "The krun node runtime: one per node of a job, or the host daemon (--listen)",
    after_long_help = "Normally started by krun; under srun the node id comes from SLURM_NODEID. \
--runtime is krun's runtime listener: the node registers there and reports agreed views. \
--join adds a node to a running job's membership: it starts with no ranks, runs ranks a drain moves \
to it (their images read from the members' stores, --store-peers) and ends when krun stops it or its \
ranks end. --ghost-restore (for krun ghost migrate --to) restores an image read on stdin. \
--listen needs KRUN_SECRET_FILE or KRUN_SECRET; --insecure only on loopback."
)]
pub struct KrundCli {
    /// Run the host daemon on ADDR[:PORT] (default 127.0.0.1:7171) for `krun --hosts`.
    #[arg(long, value_name = "ADDR[:PORT]", num_args = 0..=1, default_missing_value = "",
          conflicts_with_all = ["bootstrap", "join"])]
    pub listen: Option<String>,
    /// Allow --listen without a cluster secret (loopback addresses only).
    #[arg(long, requires = "listen")]
    pub insecure: bool,
    /// The job's bootstrap service.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "join")]
    pub bootstrap: Option<SocketAddr>,
    /// Join a running job's membership through these nodes: ID=HOST:PORT,...
    #[arg(long, value_name = "ID=HOST:PORT,...", value_parser = join_peers)]
    pub join: Option<std::collections::BTreeMap<u32, String>>,
    /// This node's id (default under srun: SLURM_NODEID).
    #[arg(long, value_name = "I")]
    pub node_id: Option<usize>,
    /// The job's node count.
    #[arg(long, value_name = "N", requires = "bootstrap")]
    pub nnodes: Option<usize>,
    /// The job's rank count (a joining node).
    #[arg(long, value_name = "N", requires = "join")]
    pub job_ranks: Option<u64>,
    /// krun's runtime listener.
    #[arg(long, value_name = "HOST:PORT")]
    pub runtime: Option<SocketAddr>,
    /// The address a joining node's links bind to.
    #[arg(long, value_name = "IP", requires = "join")]
    pub bind: Option<IpAddr>,
    /// Members whose checkpoint stores a joining node reads moved ranks' images from
    /// (their control sockets): ID=HOST:PORT,...
    #[arg(long, value_name = "ID=HOST:PORT,...", value_parser = join_peers, requires = "join")]
    pub store_peers: Option<std::collections::BTreeMap<u32, String>>,
    /// Read a ghost image on stdin, restore it, and wait for it (`krun ghost migrate --to`,
    /// through a host's daemon).
    #[arg(long, conflicts_with_all = ["listen", "bootstrap", "join"])]
    pub ghost_restore: bool,
    /// Where the restored process's output goes (with --ghost-restore).
    #[arg(long, value_name = "FILE", requires = "ghost_restore")]
    pub output: Option<std::path::PathBuf>,
    /// Ranks per node: C0,C1,... (with a PROGRAM).
    #[arg(long, value_name = "C0,C1,...", requires = "bootstrap")]
    pub counts: Option<String>,
    /// Prefix every output line with its rank.
    #[arg(long)]
    pub tag_output: bool,
    /// Pin each rank to a core, a NUMA domain, or nothing.
    #[arg(long = "bind-to", value_name = "core|numa|none", value_parser = bind_to, default_value = "core")]
    pub bind_to: BindTo,
    /// Print each rank's binding.
    #[arg(long)]
    pub report_bindings: bool,
    /// The program this node's ranks run.
    #[arg(last = true, value_name = "PROGRAM")]
    pub program: Vec<String>,
}

fn positive(v: &str) -> std::result::Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{v:?} is not a positive number")),
    }
}

fn bind_to(v: &str) -> std::result::Result<BindTo, String> {
    let v = match v {
        "cores" => "core",
        "ldoms" => "numa",
        other => other,
    };
    v.parse::<BindTo>().map_err(|e| e.to_string())
}

fn mpi_mode(v: &str) -> std::result::Result<crate::runtime::pmi::MpiMode, String> {
    v.parse().map_err(|e: crate::LauncherError| e.to_string())
}

fn provider(v: &str) -> std::result::Result<String, String> {
    v.parse::<fabric::ProviderChoice>()
        .map(|_| v.to_string())
        .map_err(|e| e.to_string())
}

fn seconds(v: &str) -> std::result::Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{v:?} is not a positive number of seconds"))
}

fn injection(v: &str) -> std::result::Result<Injection, String> {
    v.parse::<Injection>().map_err(|e| e.to_string())
}

fn version(v: &str) -> std::result::Result<u64, String> {
    v.trim_start_matches('v')
        .parse()
        .map_err(|_| format!("version {v:?} is not a number"))
}

/// `-x VAR=VALUE` sets it; `-x VAR` passes krun's own value (an error if krun has none).
fn export(v: &str) -> std::result::Result<(String, String), String> {
    let (name, value) = match v.split_once('=') {
        Some((n, val)) => (n, Some(val.to_string())),
        None => (v, None),
    };
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{name:?} is not a variable name"));
    }
    let value = match value {
        Some(v) => v,
        None => std::env::var(name)
            .map_err(|_| format!("{name} is not set in krun's environment (give {name}=VALUE)"))?,
    };
    Ok((name.to_string(), value))
}

fn join_peers(v: &str) -> std::result::Result<std::collections::BTreeMap<u32, String>, String> {
    let mut map = std::collections::BTreeMap::new();
    for p in v.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) = p
            .split_once('=')
            .ok_or_else(|| format!("entry {p:?} is not ID=HOST:PORT"))?;
        addr.parse::<SocketAddr>()
            .map_err(|_| format!("address {addr:?} is not HOST:PORT"))?;
        let id = id
            .parse::<u32>()
            .map_err(|_| format!("node id {id:?} is not a number"))?;
        map.insert(id, addr.to_string());
    }
    if map.is_empty() {
        return Err("names no node".into());
    }
    Ok(map)
}

/// Writes a completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut KrunCli::command(), "krun", out);
}

/// Writes `krun.1`, one page per subcommand (`krun-status.1`, ...) and `krund.1` into `dir`;
/// returns the files written.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |path: &Path, source: std::io::Error| LauncherError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let mut written = Vec::new();
    let mut pages = vec![
        ("krun".to_string(), KrunCli::command()),
        ("krund".to_string(), KrundCli::command()),
    ];
    let krun = KrunCli::command();
    for sub in krun.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("krun-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, cmd) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|e| io(&path, e))?;
        std::fs::write(&path, buf).map_err(|e| io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn krun(args: &[&str]) -> std::result::Result<KrunCli, clap::Error> {
        KrunCli::try_parse_from(std::iter::once("krun").chain(args.iter().copied()))
    }

    #[test]
    fn the_definitions_are_consistent() {
        KrunCli::command().debug_assert();
        KrundCli::command().debug_assert();
    }

    #[test]
    fn srun_and_mpirun_spellings_parse_to_the_same_job() {
        let a = krun(&[
            "-n",
            "4",
            "-N",
            "2",
            "--ntasks-per-node",
            "2",
            "--label",
            "--cpu-bind",
            "cores",
            "./a.out",
            "-n",
            "9",
        ])
        .unwrap();
        let b = krun(&[
            "--ntasks",
            "4",
            "--nodes",
            "2",
            "--ppn",
            "2",
            "--tag-output",
            "--bind-to",
            "core",
            "./a.out",
            "-n",
            "9",
        ])
        .unwrap();
        for r in [&a.run, &b.run] {
            assert_eq!(
                (r.ranks, r.nodes, r.per_node, r.tag_output, r.bind_to),
                (Some(4), Some(2), Some(2), true, Some(BindTo::Core))
            );
            // Everything after the program is the program's.
            assert_eq!(r.program, ["./a.out", "-n", "9"]);
        }
    }

    #[test]
    fn export_takes_a_value_or_krun_s_own_and_refuses_a_bad_name() {
        std::env::set_var("KRUN_CLI_TEST_EXPORT", "from-krun");
        let r = krun(&["-x", "A=1=2", "-x", "KRUN_CLI_TEST_EXPORT", "prog"]).unwrap();
        assert_eq!(
            r.run.export,
            [
                ("A".to_string(), "1=2".to_string()),
                ("KRUN_CLI_TEST_EXPORT".to_string(), "from-krun".to_string())
            ]
        );
        let e = krun(&["-x", "KRUN_CLI_TEST_SURELY_UNSET", "prog"]).unwrap_err();
        assert!(
            e.to_string().contains("is not set in krun's environment"),
            "{e}"
        );
        let e = krun(&["-x", "1BAD=2", "prog"]).unwrap_err();
        assert!(e.to_string().contains("is not a variable name"), "{e}");
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        for (args, says) in [
            (&["--bind-to", "socket", "p"][..], "--bind-to"),
            (
                &["--checkpoint-interval", "0", "p"][..],
                "not a positive number of seconds",
            ),
            (&["--inject-failure", "node=1", "p"][..], "no @"),
            (&["-N", "0", "p"][..], "not a positive number"),
            (&["--provider", "infiniband", "p"][..], "infiniband"),
            (
                &["--local", "2", "--hosts", "a", "p"][..],
                "cannot be used with",
            ),
        ] {
            let e = krun(args).unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn a_mistyped_flag_gets_the_closest_suggestion() {
        let e = krun(&["--checkpoint-intervall", "1", "p"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tip: a similar argument exists: '--checkpoint-interval'"),
            "{e}"
        );
        let e = krun(&["status", "--jsno"]).unwrap_err().to_string();
        assert!(e.contains("'--json'"), "{e}");
    }

    #[test]
    fn subcommands_parse_their_own_arguments() {
        match krun(&["fetch", "3", "v7", "--node", "1"]).unwrap().command {
            Some(KrunCommand::Fetch {
                rank,
                version,
                node,
                job,
            }) => {
                assert_eq!((rank, version, node, job), (3, 7, Some(1), None))
            }
            other => panic!("{other:?}"),
        }
        match krun(&["node", "drain", "2", "--job", "77"])
            .unwrap()
            .command
        {
            Some(KrunCommand::Node {
                action: NodeAction::Drain { node, job },
            }) => {
                assert_eq!((node, job.as_deref()), (2, Some("77")))
            }
            other => panic!("{other:?}"),
        }
        match krun(&["ghost", "capture", "12", "-o", "img", "--kill"])
            .unwrap()
            .command
        {
            Some(KrunCommand::Ghost {
                action:
                    GhostAction::Capture {
                        pid, image, kill, ..
                    },
            }) => {
                assert_eq!((pid, image, kill), (12, PathBuf::from("img"), true))
            }
            other => panic!("{other:?}"),
        }
        match krun(&["ghost", "run", "--output", "o.txt", "prog", "--flag", "x"])
            .unwrap()
            .command
        {
            Some(KrunCommand::Ghost {
                action: GhostAction::Run { output, program },
            }) => {
                assert_eq!(output, Some(PathBuf::from("o.txt")));
                assert_eq!(program, ["prog", "--flag", "x"]);
            }
            other => panic!("{other:?}"),
        }
        let e = krun(&["ghost", "capture", "-3", "-o", "img"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'-3'") || e.contains("unexpected argument"),
            "{e}"
        );
        let e = krun(&["ghost", "capture", "zero", "-o", "img"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'zero' is not a process id"), "{e}");
        let e = krun(&["ghost", "migrate", "12", "-o", "img"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--netns"), "{e}");
        assert!(krun(&["ghost", "migrate", "12", "-o", "i", "--netns", "a", "--to", "h"]).is_err());
        assert!(krun(&["ghost", "capture", "12"]).is_err());
        assert!(krun(&["hostlist", "compress"]).is_err());
    }

    #[test]
    fn krund_modes_exclude_each_other_and_take_the_program_after_dashes() {
        let k = |args: &[&str]| {
            KrundCli::try_parse_from(std::iter::once("krund").chain(args.iter().copied()))
        };
        let a = k(&[
            "--bootstrap",
            "127.0.0.1:5",
            "--nnodes",
            "2",
            "--counts",
            "1,1",
            "--",
            "prog",
            "--x",
        ])
        .unwrap();
        assert_eq!(a.program, ["prog", "--x"]);
        assert_eq!(k(&["--listen"]).unwrap().listen.as_deref(), Some(""));
        assert!(k(&["--listen", "--bootstrap", "127.0.0.1:5"]).is_err());
        assert!(k(&["--insecure"]).is_err());
        let e = k(&["--join", "1=nowhere"]).unwrap_err().to_string();
        assert!(e.contains("not HOST:PORT"), "{e}");
    }

    #[test]
    fn man_pages_and_completions_come_from_the_definitions() {
        let dir = std::env::temp_dir().join(format!("krun-man-{}", std::process::id()));
        let pages = man_pages(&dir).unwrap();
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "krun.1",
            "krund.1",
            "krun-status.1",
            "krun-node.1",
            "krun-completions.1",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n == "krun-man.1"),
            "the hidden command has no page"
        );
        let krun1 = std::fs::read_to_string(dir.join("krun.1")).unwrap();
        assert!(krun1.contains("ntasks\\-per\\-node") || krun1.contains("ntasks-per-node"));
        std::fs::remove_dir_all(&dir).unwrap();
        let mut script = Vec::new();
        completions(clap_complete::Shell::Bash, &mut script);
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("--checkpoint-interval") && script.contains("drain"));
    }
}
