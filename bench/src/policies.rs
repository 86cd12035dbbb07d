//! `bench policies`: the policy evaluation harness. The heat stencil with messages
//! (`rank/examples/c/heat_ha.c`, 6 ranks on 3 local krund nodes, tcp, as `bench ha`) runs
//! under every policy of [`POLICIES`] that this build of krun accepts:
//!
//! - failure-free, round by round (one run of each policy per round, so that the machine's
//!   load drifts alike for all): the overhead against the no-policy run of the same round,
//!   the checkpoints' hold (freeze) and total time; the coordinated policy also at the other
//!   intervals of `--intervals` (overhead against interval);
//! - with failures from a seeded trace ([`policies::simulator::scaled_to_run`]: exponential
//!   or Weibull inter-arrival times stretched over the run; the same trace for every policy
//!   in a round), injected as `krun --inject-failure` does (SIGKILL to the node's krund and
//!   ranks) but timed from the compute's start (one spare per failure):
//!   restart time, work lost, makespan;
//! - beside each measurement, the analytic model's prediction ([`policies::model`]) and the
//!   simulator's replay of the same failures ([`policies::simulator`]), from the costs
//!   measured failure-free and the restart time measured under failures, with their errors.
//!
//! `--simulate` extrapolates every policy to 1,000-100,000 nodes from the costs in
//! `policies.json` ([`extrapolate`]). Results: `bench/results/policies.json` and its PNG.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use policies::simulator::{self, Distribution, Failure};
use serde_json::{json, Value};

use crate::ha::{self, attempt, Cleanup, Job, Setup};
use crate::report::{cell, json_num, results_path};

mod analysis;
mod extrapolate;
pub mod figure;
pub mod observe;
use observe::{observe, RunObs};

/// The HA policies compared on the heat stencil (6 ranks, 3 local nodes),
/// failure-free and with failures from a seeded trace, beside the analytic model and the
/// simulator's replay; `--simulate` extrapolates the measured costs to 1,000-100,000 nodes;
/// writes bench/results/policies.json.
#[derive(Debug, clap::Args)]
pub struct PoliciesArgs {
    /// Runs per configuration (at least 3).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// MiB of state per rank.
    #[arg(long, value_name = "M", default_value_t = 4.0)]
    pub state_mib: f64,
    /// Seconds of the failure-free job.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub job_s: f64,
    /// The checkpoint interval in seconds.
    #[arg(long, value_name = "A", default_value_t = 2.0)]
    pub interval_s: f64,
    /// Further intervals measured, comma-separated seconds.
    #[arg(long, value_name = "A,B,C", default_value = "1,2,4")]
    pub intervals: String,
    /// Failures per faulty run.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub failures: usize,
    /// The failure distribution: exponential or weibull.
    #[arg(long, default_value = "exponential")]
    pub dist: String,
    /// The Weibull shape.
    #[arg(long, value_name = "K", default_value_t = 0.7)]
    pub shape: f64,
    #[arg(long, default_value_t = 20261206)]
    pub seed: u64,
    /// Where to write (and, with --simulate, read) the JSON (default
    /// bench/results/policies.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Extrapolate the measured costs to large node counts instead of measuring.
    #[arg(long)]
    pub simulate: bool,
    /// --simulate: node counts, comma-separated.
    #[arg(long, default_value = "1000,3000,10000,30000,100000")]
    pub nodes: String,
    /// --simulate: the MTBF of one node in hours.
    #[arg(long, value_name = "H", default_value_t = 43_800.0)]
    pub node_mtbf_h: f64,
    /// --simulate: the failure-free solve time in hours.
    #[arg(long, value_name = "H", default_value_t = 24.0)]
    pub solve_h: f64,
    /// --simulate: simulated runs per point.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub sim_runs: u32,
}

/// Ranks and nodes with ranks (as `bench ha`).
const RANKS: usize = 6;
const NODES: usize = 3;

/// How the harness models a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    None,
    Coordinated,
    UncoordinatedLogging,
    UncoordinatedNoLogging,
}

/// A policy the harness runs, selected the way krun selects it.
pub struct Spec {
    pub name: &'static str,
    pub kind: Kind,
    /// Checkpoints on `--checkpoint-interval`.
    pub interval: bool,
    /// Environment selecting it (`KRUN_POLICY_*`, the `[policy]` section of krun's config).
    pub env: &'static [(&'static str, &'static str)],
    /// What `krun config` must print for the selection to count as accepted.
    pub config_shows: &'static [&'static str],
}

/// The policies compared; adding one is one entry here.
pub const POLICIES: &[Spec] = &[
    Spec {
        name: "none",
        kind: Kind::None,
        interval: false,
        env: &[],
        config_shows: &[],
    },
    Spec {
        name: "coordinated",
        kind: Kind::Coordinated,
        interval: true,
        env: &[],
        config_shows: &[],
    },
    Spec {
        name: "uncoordinated with logging",
        kind: Kind::UncoordinatedLogging,
        interval: true,
        env: &[
            ("KRUN_POLICY_KIND", "uncoordinated"),
            ("KRUN_POLICY_LOGGING", "true"),
        ],
        config_shows: &["policy.kind", "uncoordinated", "policy.logging", "true"],
    },
    Spec {
        name: "uncoordinated without logging",
        kind: Kind::UncoordinatedNoLogging,
        interval: true,
        env: &[
            ("KRUN_POLICY_KIND", "uncoordinated"),
            ("KRUN_POLICY_LOGGING", "false"),
        ],
        config_shows: &["policy.kind", "uncoordinated", "policy.logging", "false"],
    },
];

/// `Ok(())` when krun accepts the policy's selection, else why not: `krun config` with the
/// selection must succeed and show it (a build that ignored the variables would otherwise
/// run the default policy under the wrong name).
pub fn available(krun: &std::path::Path, spec: &Spec) -> Result<(), String> {
    if spec.env.is_empty() {
        return Ok(());
    }
    let o = std::process::Command::new(krun)
        .arg("config")
        .envs(spec.env.iter().copied())
        .output()
        .map_err(|e| format!("krun config: {e}"))?;
    let text = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        return Err(format!(
            "krun refuses {}: {}",
            sel(spec),
            err.lines().next().unwrap_or("(no message)")
        ));
    }
    for pair in spec.config_shows.chunks(2) {
        if !config_shows(&text, pair[0], pair[1]) {
            return Err(format!(
                "krun config does not show {} = {} under {}: this build has no such policy",
                pair[0],
                pair[1],
                sel(spec)
            ));
        }
    }
    Ok(())
}

/// Whether `krun config`'s output (TOML: `[section]` headers, then `key = "value"    #
/// where it came from`; or `section.key = value ...` lines) sets `dotted` to `value`.
fn config_shows(text: &str, dotted: &str, value: &str) -> bool {
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        let Some((key, rest)) = line.split_once('=') else {
            continue;
        };
        let full = if section.is_empty() {
            key.trim().to_string()
        } else {
            format!("{section}.{}", key.trim())
        };
        let set = rest
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"');
        if full == dotted && set == value {
            return true;
        }
    }
    false
}

fn sel(spec: &Spec) -> String {
    spec.env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything measured for one policy.
#[derive(Default)]
pub struct Measured {
    /// Failure-free runs per interval (coordinated: several; others: the main one).
    pub steady: Vec<(f64, Vec<RunObs>)>,
    /// Failure runs (one per round) and the trace each met (slot per failure).
    pub failing: Vec<(RunObs, Vec<Failure>)>,
}

fn parse_list(s: &str, what: &str) -> Result<Vec<f64>, String> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("--{what}: {x:?} is not a positive number"))
        })
        .collect()
}

fn dist(args: &PoliciesArgs) -> Result<Distribution, String> {
    match args.dist.as_str() {
        "exponential" | "exp" => Ok(Distribution::Exponential),
        "weibull" => Ok(Distribution::Weibull { shape: args.shape }),
        other => Err(format!("--dist {other:?}: exponential or weibull")),
    }
}

pub fn run(args: PoliciesArgs) -> Result<(), String> {
    let out = args.out.clone().unwrap_or_else(|| results_path("policies"));
    if args.simulate {
        return extrapolate::run(&args, &out);
    }
    let runs: usize = args.runs.max(3);
    let state_mib: f64 = args.state_mib;
    let job_s: f64 = args.job_s;
    let interval_a: f64 = args.interval_s;
    let mut intervals = parse_list(&args.intervals, "intervals")?;
    if !intervals.contains(&interval_a) {
        intervals.push(interval_a);
    }
    intervals.sort_by(f64::total_cmp);
    let failures: usize = args.failures;
    let seed: u64 = args.seed;
    let dist = dist(&args)?;
    if !(state_mib > 0.0 && job_s > 0.0 && interval_a > 0.0) || failures == 0 {
        return Err("--state-mib, --job-s, --interval-s and --failures must be positive".into());
    }
    let started = Instant::now();
    let load_before = ha::uptime();
    let dir = ha::exe_dir()?;
    let (heat, serial) = ha::build_heat(&dir)?;
    let ny = 1024usize;
    let rows_per_rank = ((state_mib * (1 << 20) as f64) / (ny * 8) as f64).ceil() as usize;
    let nx = rows_per_rank.max(3) * RANKS;
    let state_bytes = (rows_per_rank + 2) * ny * 8 + 16;
    let tag = format!("krun-bench-policies-{}", std::process::id());
    let _cleanup = Cleanup(vec![
        PathBuf::from("/dev/shm").join(&tag),
        PathBuf::from("/var/tmp").join(&tag),
    ]);
    let arena_mib = ((2.0 * 8.0 * state_bytes as f64) / (1 << 20) as f64).ceil() as usize + 16;
    let mut setup = Setup {
        krun: dir.join("krun"),
        heat,
        nx,
        steps: 100,
        state_bytes,
        ghost: PathBuf::from("/dev/shm").join(&tag),
        disk: PathBuf::from("/var/tmp").join(&tag),
        arena_mib,
        limit: Duration::from_secs_f64((job_s * 12.0).max(180.0)),
        failed: Default::default(),
    };
    println!(
        "bench policies: heat_ha {nx}x{ny} on {RANKS} ranks / {NODES} local nodes (tcp), {:.1} MiB \
         of state per rank; load {load_before}",
        state_bytes as f64 / (1 << 20) as f64
    );
    let mut skipped: Vec<(&Spec, String)> = Vec::new();
    let mut specs: Vec<&Spec> = Vec::new();
    for s in POLICIES {
        match available(&setup.krun, s) {
            Ok(()) => specs.push(s),
            Err(why) => {
                println!("  {}: not available in this build ({why})", s.name);
                skipped.push((s, why));
            }
        }
    }
    let spawned = cluster_tests::campaign::now_unix();
    let cal = setup.run(
        &Job {
            tag: "calibrate".into(),
            ..Job::default()
        },
        setup.steps,
    )?;
    // From krun's start until the compute starts (nodes, wiring): krun's injection times
    // count from the nodes' start, the trace's from the compute's.
    let startup_s = observe(&cal, None)?.start - spawned;
    println!("start-up: the compute starts {startup_s:.2} s after krun");
    let step_s = crate::ha::parse::loop_seconds(&cal).ok_or("calibration: no loop time")?
        / setup.steps as f64;
    setup.steps = ((job_s / step_s).ceil() as usize).max(20);
    let want = ha::serial_checksum(&serial, nx, ny, setup.steps)?;
    println!(
        "calibration: {:.1} ms per step -> {} steps (~{job_s} s)",
        step_s * 1e3,
        setup.steps
    );

    let mut measured: Vec<Measured> = specs.iter().map(|_| Measured::default()).collect();
    for round in crate::runs::bar("policies: rounds", 0..runs) {
        println!("round {}/{runs} (load {})", round + 1, ha::uptime());
        for (spec, m) in specs.iter().zip(measured.iter_mut()) {
            let ivals: Vec<f64> = match spec.kind {
                Kind::None => vec![0.0],
                Kind::Coordinated => intervals.clone(),
                _ => vec![interval_a],
            };
            for &iv in &ivals {
                let job = policy_job(spec, iv, &format!("ff-{}-{round}-{iv}", slug(spec)));
                let what = format!(
                    "{} failure-free (interval {iv} s) round {}",
                    spec.name,
                    round + 1
                );
                let obs = attempt(&setup, &what, |a| {
                    let mut j = job.clone();
                    j.tag = format!("{}-{a}", job.tag);
                    let o = setup.run(&j, setup.steps)?;
                    ha::check_sum(&o, &want, &j.tag)?;
                    observe(&o, None)
                })?;
                println!(
                    "  {what}: loop {} s, {} checkpoints",
                    cell(obs.loop_s, 2),
                    obs.commits.len()
                );
                match m.steady.iter_mut().find(|s| s.0 == iv) {
                    Some(s) => s.1.push(obs),
                    None => m.steady.push((iv, vec![obs])),
                }
            }
        }
        // The round's trace: failure slots (0..NODES) and times in the compute's seconds,
        // scaled to this round's compute without a policy (the load changes it): from 1.5 s
        // to 60% of it; failures at least half an even share of that apart.
        let base_loop = specs
            .iter()
            .position(|s| s.kind == Kind::None)
            .and_then(|i| measured[i].steady.first())
            .and_then(|s| s.1.last())
            .and_then(|r| r.loop_s)
            .unwrap_or(job_s);
        let (from, to) = (1.5, (0.6 * base_loop).max(2.5));
        let trace = simulator::scaled_to_run(
            dist,
            seed.wrapping_add(round as u64),
            failures,
            from,
            to,
            ((to - from) / (failures + 1) as f64 * 0.5).min(6.0),
            NODES as u32,
        )
        .map_err(|e| format!("--failures {failures} in a {base_loop:.1} s compute: {e}"))?;
        println!(
            "  trace: failures at {}",
            trace
                .iter()
                .map(|f| format!("{:.1} s on node slot {}", f.at_s, f.node))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (spec, m) in specs.iter().zip(measured.iter_mut()) {
            let mut job = policy_job(spec, interval_a, &format!("fail-{}-{round}", slug(spec)));
            job.spares = trace.len();
            // Slot -> node: a failed node's ranks go to the next spare (nodes NODES..).
            let mut slots: Vec<usize> = (0..NODES).collect();
            let kills: Vec<(f64, usize)> = trace
                .iter()
                .enumerate()
                .map(|(k, f)| {
                    let node = slots[f.node as usize];
                    slots[f.node as usize] = NODES + k;
                    (f.at_s, node)
                })
                .collect();
            let what = format!("{} with failures round {}", spec.name, round + 1);
            let obs = attempt(&setup, &what, |a| {
                let mut j = job.clone();
                j.tag = format!("{}-{a}", job.tag);
                let (o, at) = run_with_kills(&setup, &j, &kills)?;
                ha::check_sum(&o, &want, &j.tag)?;
                observe(&o, Some(&at))
            })?;
            println!(
                "  {what}: makespan {:.2} s; {}",
                obs.makespan_s,
                obs.failures
                    .iter()
                    .map(|f| format!(
                        "failure at {:.1} s: computing again after {} s, {} s lost",
                        f.at_s,
                        cell(f.restart_s, 2),
                        cell(f.lost_s, 2)
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            // The model and the simulator get the failures where they really fell.
            // A failure before the compute started (a slow start-up) is outside the measured
            // makespan: the model and the simulator do not see it either.
            let real: Vec<Failure> = obs
                .failures
                .iter()
                .zip(&trace)
                .filter(|(o, _)| o.at_s >= 0.0)
                .map(|(o, t)| Failure {
                    at_s: o.at_s,
                    node: t.node,
                })
                .collect();
            m.failing.push((obs, real));
        }
    }
    let rows = analysis::rows(&specs, &measured, interval_a, setup.steps)?;
    let mut doc = json!({
        "runs_per_point": runs,
        "load_before": load_before,
        "load_after": ha::uptime(),
        "bench_seconds": json_num(Some(started.elapsed().as_secs_f64())),
        "job": {
            "program": "rank/examples/c/heat_ha.c", "nx": nx, "ny": ny, "steps": setup.steps,
            "ranks": RANKS, "nodes": NODES, "provider": "tcp", "store_level": "L2",
            "state_bytes_per_rank": state_bytes,
        },
        "trace": {
            "distribution": dist.name(), "seed": seed, "failures_per_run": failures,
            "scaled_to": "the run: inter-arrival draws stretched over [1.5 s, 0.6 x the round's compute time without a policy] after the compute started; one spare per failure; the same trace for every policy of a round",
            "injected": "by the bench: SIGKILL to the node's krund and its ranks by PID (what krun --inject-failure node=N@T does), at the trace's time after rank 0 started computing; krun's own injection counts from the nodes' start, which came 1-9 s before the compute under this machine's load (start-up in this run's calibration: startup_seconds)",
        },
        "interval_s": interval_a,
        "intervals_s": intervals,
        "startup_seconds": json_num(Some(startup_s)),
        "policies": rows,
        "not_available": skipped.iter().map(|(s, why)| json!({
            "policy": s.name, "selection": sel(s), "status": "not available in this build", "why": why,
        })).collect::<Vec<_>>(),
        "failed_runs_retried": setup.failed.borrow().clone(),
    });
    doc["targets"] = analysis::targets(&doc);
    analysis::print_table(&doc);
    // Keep a simulation section already in the file (from `--simulate`).
    if let Ok(old) = std::fs::read_to_string(&out) {
        if let Ok(old) = serde_json::from_str::<Value>(&old) {
            if !old["simulation"].is_null() {
                doc["simulation"] = old["simulation"].clone();
                doc["simulation"]["note"] = json!(
                    "from an earlier `--simulate` with the costs measured then; run it again to use these"
                );
            }
        }
    }
    figure::write(&out, doc)?;
    println!("wrote {} and its .png", out.display());
    Ok(())
}

/// Runs `job` and SIGKILLs node `n` (its krund and ranks, by PID: processes this bench
/// started) `t` seconds after rank 0 starts computing, for each `(t, n)` of `kills`, as
/// `krun --inject-failure` does. krun counts its injection times from the nodes' start, which
/// under this machine's load came 1-9 s before the compute: the trace would miss the run.
/// Returns the output and when each SIGKILL was sent (Unix seconds).
fn run_with_kills(
    setup: &Setup,
    job: &Job,
    kills: &[(f64, usize)],
) -> Result<(cluster_tests::campaign::JobOutput, Vec<f64>), String> {
    let mut running =
        cluster_tests::campaign::RunningJob::start(&mut setup.command(job, setup.steps))
            .map_err(|e| e.to_string())?;
    let begun = Instant::now();
    let mut start = None;
    let mut sent = Vec::new();
    let fail = |running: cluster_tests::campaign::RunningJob, why: String| {
        let text = running
            .stop(Duration::from_secs(10))
            .map(|o| o.text())
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(setup.ghost.join(&job.tag));
        Err(format!("{}: {why}:\n{}", job.tag, ha::tail(&text, 30)))
    };
    for &(t, node) in kills {
        loop {
            if start.is_none() {
                start = running
                    .first("heat_ha: rank 0 computing from step 0 at ")
                    .and_then(|l| crate::ha::parse::computing(&l.text))
                    .map(|x| x.2);
            }
            if let Some(s) = start {
                if cluster_tests::campaign::now_unix() >= s + t {
                    break;
                }
            }
            if running.ended().map_err(|e| e.to_string())? {
                return fail(running, format!("ended before the failure at {t:.1} s"));
            }
            if begun.elapsed() > setup.limit {
                return fail(running, "timed out".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match ha::kill_node(running.pid(), node) {
            Ok(at) => sent.push(at),
            Err(e) => return fail(running, e),
        }
    }
    let out = running.wait(setup.limit).map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(setup.ghost.join(&job.tag));
    let out = out?;
    if out.code != Some(0) || out.timed_out {
        return Err(format!(
            "{} ended with {:?}:\n{}",
            job.tag,
            out.code,
            ha::tail(&out.text(), 30)
        ));
    }
    Ok((out, sent))
}

fn slug(spec: &Spec) -> String {
    spec.name.replace(' ', "-")
}

fn policy_job(spec: &Spec, interval: f64, tag: &str) -> Job {
    Job {
        interval_s: spec.interval.then_some(interval),
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        tag: tag.into(),
        ..Job::default()
    }
}

#[cfg(test)]
mod tests {
    use super::config_shows;

    #[test]
    fn the_config_check_reads_sections_and_values() {
        let text = "[launcher]\nprovider = \"tcp\"    # default\n\n[policy]\nkind = \"uncoordinated\"    # environment (KRUN_POLICY_KIND)\nlogging = \"false\"\n";
        assert!(config_shows(text, "policy.kind", "uncoordinated"));
        assert!(config_shows(text, "policy.logging", "false"));
        assert!(!config_shows(text, "policy.logging", "true"));
        assert!(!config_shows(text, "launcher.kind", "uncoordinated"));
        assert!(!config_shows(text, "policy.kind", "coordinated"));
    }
}
