//! krund: the node runtime. Joins the job's bootstrap service, opens this node's fabric
//! endpoint, and runs the node's share of the job: its ranks of a program, or the built-in
//! RMA exchange workload.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use fabric::bootstrap::BootstrapClient;
use fabric::FabricConfig;
use launcher::ranks::{NodeShare, Placement};
use launcher::{exchange, LauncherError};

const USAGE: &str = "krund --listen [ADDR][:PORT]   (daemon: runs node processes for krun --hosts; port 7171)
krund --bootstrap HOST:PORT [--node-id I] --nnodes N [--counts C0,C1,...] [--tag-output] [--bind-to core|numa|none] [--report-bindings] [-- PROGRAM ARGS...]
(normally started by krun; under srun the node id comes from SLURM_NODEID)";

struct Args {
    bootstrap: SocketAddr,
    node_id: usize,
    nnodes: usize,
    placement: Option<Placement>,
    tag_output: bool,
    bind_to: launcher::binding::BindTo,
    report_bindings: bool,
    program: Vec<String>,
}

fn number(name: &str, v: &str) -> Result<usize, LauncherError> {
    v.parse()
        .map_err(|_| LauncherError::Usage(format!("{name} {v:?} is not a number")))
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, LauncherError> {
    let (mut bootstrap, mut node_id, mut nnodes, mut placement) = (None, None, None, None);
    let mut tag_output = false;
    let mut bind_to = launcher::binding::BindTo::Core;
    let mut report_bindings = false;
    let mut program = Vec::new();
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| LauncherError::Usage(format!("{name} needs a value")))
        };
        match a.as_str() {
            "--bootstrap" => {
                let v = value("--bootstrap")?;
                bootstrap = Some(v.parse().map_err(|_| {
                    LauncherError::Usage(format!("--bootstrap {v:?} is not HOST:PORT"))
                })?);
            }
            "--node-id" => node_id = Some(number("--node-id", &value("--node-id")?)?),
            "--nnodes" => nnodes = Some(number("--nnodes", &value("--nnodes")?)?),
            "--counts" => placement = Some(Placement::parse_counts(&value("--counts")?)?),
            "--tag-output" => tag_output = true,
            "--bind-to" => bind_to = value("--bind-to")?.parse()?,
            "--report-bindings" => report_bindings = true,
            "--" => {
                program = args.by_ref().collect();
                break;
            }
            "-h" | "--help" => return Err(LauncherError::Usage(USAGE.into())),
            other => {
                return Err(LauncherError::Usage(format!(
                    "unknown argument {other:?}\n{USAGE}"
                )))
            }
        }
    }
    let missing = |n: &str| LauncherError::Usage(format!("{n} is required\n{USAGE}"));
    if node_id.is_none() {
        if let Ok(v) = std::env::var("SLURM_NODEID") {
            node_id = Some(number("SLURM_NODEID", &v)?);
        }
    }
    let args = Args {
        bootstrap: bootstrap.ok_or_else(|| missing("--bootstrap"))?,
        node_id: node_id.ok_or_else(|| missing("--node-id (or SLURM_NODEID)"))?,
        nnodes: nnodes.ok_or_else(|| missing("--nnodes"))?,
        placement,
        tag_output,
        bind_to,
        report_bindings,
        program,
    };
    if args.node_id >= args.nnodes {
        return Err(LauncherError::Usage(format!(
            "node id {} is not below --nnodes {}",
            args.node_id, args.nnodes
        )));
    }
    if let Some(p) = &args.placement {
        if p.count.len() != args.nnodes {
            return Err(LauncherError::Usage(format!(
                "--counts names {} nodes, --nnodes is {}",
                p.count.len(),
                args.nnodes
            )));
        }
    }
    if args.program.is_empty() != args.placement.is_none() {
        return Err(LauncherError::Usage(
            "--counts and a PROGRAM go together".into(),
        ));
    }
    Ok(args)
}

fn run() -> Result<i32, LauncherError> {
    launcher::config::load()?;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--listen") {
        let spec = argv.get(1).map(String::as_str).unwrap_or("0.0.0.0");
        let addr = if spec.contains(':') {
            spec.to_string()
        } else {
            format!("{spec}:{}", launcher::daemon::DEFAULT_PORT)
        };
        let addr = addr
            .parse()
            .map_err(|_| LauncherError::Usage(format!("--listen {spec:?} is not ADDR[:PORT]")))?;
        launcher::daemon::serve(addr, fabric::secret::ClusterSecret::from_env()?)?;
        return Ok(0);
    }
    let args = parse(argv.into_iter())?;
    let mut boot = BootstrapClient::connect(
        args.bootstrap,
        args.node_id,
        args.nnodes,
        Duration::from_secs(60),
    )?;
    let mut config = FabricConfig::default().with_env()?;
    let mut rank_env = Vec::new();
    if std::env::var_os("KRUN_FABRIC_BIND").is_none() {
        // Bind the fabric where this host reaches the job: its address on that network.
        let ip = boot.local_addr()?.ip().to_string();
        config.bind_address = ip.clone();
        rank_env.push(("KRUN_FABRIC_BIND".to_string(), ip));
    }
    if let Some(placement) = &args.placement {
        // The node's endpoint comes up beside the ranks, not before them: opening libfabric
        // costs ~0.3 s here (it reads /proc/kallsyms), and no node service needs it at launch.
        let endpoint = std::thread::spawn(move || fabric::open(&config));
        launcher::ranks::catch_forwarded_signals();
        let share = NodeShare {
            node_id: args.node_id,
            nnodes: args.nnodes,
            first_rank: placement.first[args.node_id],
            local_size: placement.count[args.node_id],
            size: placement.total(),
            tag_output: args.tag_output,
            program: args.program,
            env: rank_env,
            bind_to: args.bind_to,
            report_bindings: args.report_bindings,
        };
        let code = launcher::ranks::run_share(&share)?;
        boot.barrier()?;
        match endpoint.join() {
            Ok(Ok(ep)) => drop(ep),
            Ok(Err(e)) => eprintln!("krund: node {}: fabric endpoint: {e}", args.node_id),
            Err(_) => eprintln!("krund: node {}: the fabric thread panicked", args.node_id),
        }
        return Ok(code);
    }
    let ep = fabric::open(&config)?;
    let report = exchange::run(ep.as_ref(), &mut boot)?;
    println!(
        "node {}/{}: done: {} blocks verified, leader is node {}",
        args.node_id,
        args.nnodes,
        report.verified_blocks,
        report.leader - 1
    );
    Ok(0)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("krund: error: {e}");
            ExitCode::from(if matches!(e, LauncherError::Usage(_)) {
                2
            } else {
                1
            })
        }
    }
}
