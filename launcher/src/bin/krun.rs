//! krun: run a job across node daemons. For now: local mode, running the built-in RMA
//! exchange workload on K local nodes.
use std::process::ExitCode;

use launcher::job::{self, Job, NodeSource, ProgramJob};
use launcher::slurm::Allocation;
use launcher::LauncherError;

const USAGE: &str = "usage: krun [-n RANKS] [--local NODES] [--ppn K] [--tag-output] [--provider P] [PROGRAM ARGS...]
       krun hostlist expand EXPR
       krun hostlist compress NAMES...

Starts NODES krund daemons on this machine (default 3). With a PROGRAM, runs RANKS copies
of it (default: one per node) placed in blocks of --ppn per node, each with KRUN_RANK,
KRUN_SIZE, KRUN_LOCAL_RANK, KRUN_LOCAL_SIZE, KRUN_NODE_ID, KRUN_NNODES and KRUN_BOOTSTRAP
(an all-gather service for the ranks); exit code: the highest rank's, or 128+signal.
Without a PROGRAM, runs the built-in workload:
every node writes a block into every other node's memory with one-sided RMA writes,
counts itself in with a remote fetch-add, elects a leader with compare-swap, reads its
block back with an RMA read, and verifies every byte.
Environment: KRUN_FABRIC_PROVIDER and the other KRUN_FABRIC_* settings reach every node.";

fn parse() -> Result<Job, LauncherError> {
    let mut nodes = None;
    let mut provider = None;
    let (mut ranks, mut per_node, mut tag_output) = (None, None, false);
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
            "--local" => {
                let v = args
                    .next()
                    .ok_or_else(|| LauncherError::Usage("--local needs a node count".into()))?;
                nodes = Some(v.parse().map_err(|_| {
                    LauncherError::Usage(format!("--local {v:?} is not a node count"))
                })?);
            }
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
    let mut job = match (nodes, Allocation::from_env()?) {
        (Some(k), _) => Job::local(k)?,
        (None, Some(allocation)) => Job {
            nodes: NodeSource::Slurm(allocation),
            ..Job::local(1)?
        },
        (None, None) => Job::local(3)?,
    };
    if !program.is_empty() {
        job.program = Some(ProgramJob {
            ranks,
            per_node,
            tag_output,
            argv: program,
        });
    } else if ranks.is_some() {
        return Err(LauncherError::Usage("-n needs a PROGRAM to run".into()));
    }
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
    let builtin = job.program.is_none();
    if builtin {
        let mode = match &job.nodes {
            NodeSource::Local(_) => "local".to_string(),
            NodeSource::Slurm(a) => format!("Slurm job {}", a.job_id),
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
