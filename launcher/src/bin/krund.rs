//! krund: the node runtime. Joins the job's bootstrap service, opens this node's fabric
//! endpoint and runs the node's share of the job.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use fabric::bootstrap::BootstrapClient;
use fabric::FabricConfig;
use launcher::{exchange, LauncherError};

struct Args {
    bootstrap: SocketAddr,
    node_id: usize,
    nnodes: usize,
    first_rank: usize,
    local_size: usize,
    size: usize,
    tag_output: bool,
    program: Vec<String>,
}

fn number(name: &str, v: &str) -> Result<usize, LauncherError> {
    v.parse()
        .map_err(|_| LauncherError::Usage(format!("{name} {v:?} is not a number")))
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, LauncherError> {
    let (mut bootstrap, mut node_id, mut nnodes) = (None, None, None);
    let (mut first_rank, mut local_size, mut size, mut tag_output) = (0, 0, 0, false);
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
            "--node-id" => {
                let v = value("--node-id")?;
                node_id = Some(v.parse().map_err(|_| {
                    LauncherError::Usage(format!("--node-id {v:?} is not a number"))
                })?);
            }
            "--nnodes" => {
                let v = value("--nnodes")?;
                nnodes = Some(v.parse().map_err(|_| {
                    LauncherError::Usage(format!("--nnodes {v:?} is not a number"))
                })?);
            }
            "--first-rank" => first_rank = number("--first-rank", &value("--first-rank")?)?,
            "--local-size" => local_size = number("--local-size", &value("--local-size")?)?,
            "--size" => size = number("--size", &value("--size")?)?,
            "--tag-output" => tag_output = true,
            "--" => {
                program = args.by_ref().collect();
                break;
            }
            "-h" | "--help" => {
                return Err(LauncherError::Usage(
                    "krund --bootstrap HOST:PORT --node-id I --nnodes N (normally started by krun)"
                        .into(),
                ))
            }
            other => return Err(LauncherError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    let missing = |n: &str| LauncherError::Usage(format!("{n} is required"));
    let args = Args {
        bootstrap: bootstrap.ok_or_else(|| missing("--bootstrap"))?,
        node_id: node_id.ok_or_else(|| missing("--node-id"))?,
        nnodes: nnodes.ok_or_else(|| missing("--nnodes"))?,
        first_rank,
        local_size,
        size,
        tag_output,
        program,
    };
    if args.node_id >= args.nnodes {
        return Err(LauncherError::Usage(format!(
            "--node-id {} is not below --nnodes {}",
            args.node_id, args.nnodes
        )));
    }
    Ok(args)
}

fn run() -> Result<i32, LauncherError> {
    let args = parse(std::env::args().skip(1))?;
    let config = FabricConfig::default().with_env()?;
    let ep = fabric::open(&config)?;
    let mut boot = BootstrapClient::connect(
        args.bootstrap,
        args.node_id,
        args.nnodes,
        Duration::from_secs(60),
    )?;
    if !args.program.is_empty() {
        launcher::ranks::catch_forwarded_signals();
        let share = launcher::ranks::NodeShare {
            node_id: args.node_id,
            nnodes: args.nnodes,
            first_rank: args.first_rank,
            local_size: args.local_size,
            size: args.size,
            tag_output: args.tag_output,
            program: args.program,
        };
        let code = launcher::ranks::run_share(&share)?;
        boot.barrier()?;
        return Ok(code);
    }
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
