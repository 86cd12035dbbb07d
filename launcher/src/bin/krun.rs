//! krun: run a job across node daemons. For now: local mode, running the built-in RMA
//! exchange workload on K local nodes.
use std::process::ExitCode;

use launcher::local::{self, LocalJob};
use launcher::LauncherError;

const USAGE: &str = "usage: krun [--local NODES] [--provider tcp|shm|verbs|auto]
       krun hostlist expand EXPR
       krun hostlist compress NAMES...

Starts NODES krund daemons on this machine (default 3) and runs the built-in workload:
every node writes a block into every other node's memory with one-sided RMA writes,
counts itself in with a remote fetch-add, elects a leader with compare-swap, reads its
block back with an RMA read, and verifies every byte.
Environment: KRUN_FABRIC_PROVIDER and the other KRUN_FABRIC_* settings reach every node.";

fn parse() -> Result<LocalJob, LauncherError> {
    let mut nodes = 3;
    let mut provider = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--local" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--local needs a node count".into()))?;
                nodes = v.parse().map_err(|_| {
                    LauncherError::Usage(format!("--local {v:?} is not a node count"))
                })?;
            }
            "--provider" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--provider needs a name".into()))?;
                v.parse::<fabric::ProviderChoice>()?;
                provider = Some(v);
            }
            "-h" | "--help" => return Err(LauncherError::Usage(USAGE.into())),
            other => {
                return Err(LauncherError::Usage(format!(
                    "unknown argument {other:?}\n{USAGE}"
                )))
            }
        }
    }
    let mut job = LocalJob::new(nodes)?;
    if let Some(p) = provider {
        job.env.push(("KRUN_FABRIC_PROVIDER".into(), p));
    }
    Ok(job)
}

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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("hostlist") {
        return match hostlist(&args[1..]) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
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
    println!(
        "krun: starting {} local nodes ({})",
        job.nodes,
        job.krund.display()
    );
    match local::run(&job) {
        Ok(0) => {
            println!("krun: job finished on {} nodes", job.nodes);
            ExitCode::SUCCESS
        }
        Ok(code) => {
            eprintln!("krun: job failed with exit code {code}");
            ExitCode::from(code.clamp(1, 255) as u8)
        }
        Err(e) => {
            eprintln!("krun: error: {e}");
            ExitCode::FAILURE
        }
    }
}
