//! `bench faults`: the reliability campaign. Trials of each kind of fault, drawn from one
//! seed, and what survived them:
//!
//! - `node`: a job under the coordinated policy (heat_ha, 6 ranks on 3 local nodes and a
//!   spare) with a random node SIGKILLed at a random time (`cluster_tests::campaign`, as
//!   `bench ha --campaign`); it ended correctly if it exited 0 with the serial checksum;
//! - `kill`: 6 `krun-adapt` daemons (the adaptation layer with its key-value service, two
//!   copies of each entry) while 4 clients keep adding; a random member that is not a
//!   supervisor is SIGKILLed; `supervisor`: the same with a random supervisor;
//! - `two`: 6 daemons keeping three copies (`--tolerate 2`); two members that follow each
//!   other in the view, one of them possibly a supervisor, SIGKILLed at once;
//! - `partition`: 5 daemons in network namespaces (root); a random member's link is cut
//!   until it is evicted, then restored: it must rejoin as a new member.
//!
//! For the daemon kinds every acknowledged write is read back once the view is repaired
//! (`cluster_tests::kv`): a key answered lost or with another value than its last
//! acknowledged one counts as lost (the target is 0), and a trial ended correctly if the
//! view was repaired, every answer matched an exactly-once execution and nothing was lost.
//!
//! The JSON also carries the adaptation layer's seeded simulation (`--sim-schedules N`
//! wide schedules, run as the `simulation` test in release, split over the CPUs) and the
//! fuzz executions per target of the newest `bench/results/fuzz.json` (`scripts/fuzz.sh`).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_tests::campaign::SplitMix;
use cluster_tests::kv::{Clients, KvCluster, KvSpec, REJOIN_STRIDE};
use cluster_tests::NetnsCluster;
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{results_path, write_results, Table};

/// Trials of every kind of fault (a job's node SIGKILLed; adaptation daemons SIGKILLed one,
/// two at once, a supervisor; a partition), acknowledged writes lost, the simulation's
/// schedules and the fuzz executions; writes bench/results/faults.json.
#[derive(Debug, clap::Args)]
pub struct FaultsArgs {
    /// Trials per kind.
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Kinds to run (comma-separated): node, kill, supervisor, two, partition.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "node,kill,supervisor,two,partition"
    )]
    pub kinds: Vec<String>,
    /// Wide schedules of the adaptation layer's simulation to run (0: none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub sim_schedules: u64,
    /// Only the simulation: its result replaces the `"simulation"` of the results already
    /// at the output path (their trials and environment stay; it records its own).
    #[arg(long)]
    pub sim_only: bool,
    #[arg(long, default_value_t = 20261207)]
    pub seed: u64,
    /// Where to write the JSON (default bench/results/faults.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

const KINDS: [&str; 5] = ["node", "kill", "supervisor", "two", "partition"];

/// What one trial of a daemon kind did.
struct Outcome {
    /// Acknowledged writes (adds and puts answered ok).
    acked: u64,
    /// Keys read back lost or with another value than the last acknowledged one.
    lost: u64,
    /// What was SIGKILLed or cut.
    what: String,
    /// Seconds from the fault until the view was repaired.
    repair_s: f64,
}

pub fn run(args: FaultsArgs) -> Result<(), String> {
    if args.trials == 0 {
        return Err("--trials must be at least 1".into());
    }
    for k in &args.kinds {
        if !KINDS.contains(&k.as_str()) {
            return Err(format!(
                "--kinds: unknown kind {k:?} (known: {})",
                KINDS.join(", ")
            ));
        }
    }
    let out = args.out.clone().unwrap_or_else(|| results_path("faults"));
    if args.sim_only {
        if args.sim_schedules == 0 {
            return Err("--sim-only needs --sim-schedules N".into());
        }
        let mut sim = simulation(args.sim_schedules)?;
        sim["environment"] = crate::report::environment();
        println!(
            "simulation: {} of {} wide schedules passed",
            sim["schedules_passed"], args.sim_schedules
        );
        // Read only now: the results may have been rewritten while the simulation ran.
        let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let mut v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", out.display()))?;
        v["simulation"] = sim;
        crate::report::write_json(&out, &v)?;
        println!("updated the simulation in {}", out.display());
        return Ok(());
    }
    let dir = crate::ha::exe_dir()?;
    let adapt = dir.join("krun-adapt");
    if !adapt.exists() {
        return Err(format!(
            "{} is missing: cargo build --release -p adaptation first",
            adapt.display()
        ));
    }
    let mut table = Table::new(&[
        "kind",
        "trials",
        "ended correctly",
        "acked writes",
        "acked lost",
        "repair s (median)",
    ]);
    let mut kinds = serde_json::Map::new();
    let mut g = SplitMix::new(args.seed);
    for kind in &args.kinds {
        let seed = g.next_u64();
        let v = if kind == "node" {
            node_trials(args.trials, seed)?
        } else {
            daemon_trials(kind, &adapt, args.trials, seed)?
        };
        let repairs: Vec<f64> = v["repair_s"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        table.row(vec![
            kind.clone(),
            v["trials"].to_string(),
            v["ended_correctly"].to_string(),
            v["acked_writes"].to_string(),
            v["acked_writes_lost"].to_string(),
            crate::report::cell(crate::report::median(&repairs), 2),
        ]);
        kinds.insert(kind.clone(), v);
    }
    let sum = |key: &str| -> u64 { kinds.values().filter_map(|v| v[key].as_u64()).sum() };
    let totals = json!({
        "trials": sum("trials"),
        "ended_correctly": sum("ended_correctly"),
        "acked_writes": sum("acked_writes"),
        "acked_writes_lost": sum("acked_writes_lost"),
        "injected": kinds.iter().map(|(k, v)| (k.clone(), v["trials"].clone())).collect::<serde_json::Map<_, _>>(),
    });
    let simulation = simulation(args.sim_schedules)?;
    let fuzz = fuzz_summary(&results_path("fuzz"));
    println!("{}", table.render());
    println!(
        "totals: {} trials, {} ended correctly, {} of {} acknowledged writes lost",
        totals["trials"],
        totals["ended_correctly"],
        totals["acked_writes_lost"],
        totals["acked_writes"]
    );
    if let Some(n) = simulation["schedules_passed"].as_u64() {
        println!("simulation: {n} wide schedules passed");
    }
    let figure = figure(&kinds);
    write_results(
        &out,
        json!({
            "command": format!("bench faults --trials {} --kinds {} --sim-schedules {} --seed {}",
                args.trials, args.kinds.join(","), args.sim_schedules, args.seed),
            "seed": args.seed,
            "totals": totals,
            "kinds": kinds,
            "simulation": simulation,
            "fuzz": fuzz,
        }),
        &figure,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}

/// `node`: the HA campaign of `bench ha`.
fn node_trials(n: usize, seed: u64) -> Result<serde_json::Value, String> {
    let (setup, serial, _cleanup) = crate::ha::campaign_setup()?;
    let c = crate::ha::campaign_json(&setup, &serial, n, seed)?;
    Ok(json!({
        "what": c["job"],
        "trials": n,
        "ended_correctly": c["passed"],
        "acked_writes": 0,
        "acked_writes_lost": 0,
        "repair_s": [],
        "failures": c["failures"],
    }))
}

/// The daemon kinds: `n` trials, each on a fresh cluster.
fn daemon_trials(
    kind: &str,
    adapt: &Path,
    n: usize,
    seed: u64,
) -> Result<serde_json::Value, String> {
    if kind == "partition" {
        if let Err(e) = cluster_tests::require_root() {
            return Ok(
                json!({"skipped": e.to_string(), "trials": 0, "ended_correctly": 0,
                "acked_writes": 0, "acked_writes_lost": 0, "repair_s": []}),
            );
        }
    }
    let mut g = SplitMix::new(seed);
    let (mut ok, mut acked, mut lost) = (0u64, 0u64, 0u64);
    let mut repairs = Vec::new();
    let mut trials = Vec::new();
    for i in 0..n {
        let pick = g.next_u64();
        let start = Instant::now();
        let r = match kind {
            "kill" => one_killed(adapt, 3 + pick % 3),
            "supervisor" => one_killed(adapt, pick % 3),
            "two" => two_at_once(adapt, 2 + (pick % 3) as u32),
            "partition" => partition(adapt, 1 + (pick % 4) as usize, i),
            _ => unreachable!("kinds are checked"),
        };
        let took = start.elapsed().as_secs_f64();
        match r {
            Ok(o) => {
                println!(
                    "  {kind} trial {i}: {}: repaired in {:.2} s, {} of {} acknowledged writes lost",
                    o.what, o.repair_s, o.lost, o.acked
                );
                acked += o.acked;
                lost += o.lost;
                if o.lost == 0 {
                    ok += 1;
                }
                repairs.push(o.repair_s);
                trials.push(
                    json!({"trial": i, "what": o.what, "acked": o.acked, "lost": o.lost,
                    "repair_s": o.repair_s, "seconds": took}),
                );
            }
            Err(e) => {
                let short: String = e.lines().take(3).collect::<Vec<_>>().join(" | ");
                println!("  {kind} trial {i}: FAILED: {short}");
                trials.push(json!({"trial": i, "failed": e, "seconds": took}));
            }
        }
    }
    Ok(json!({
        "what": match kind {
            "kill" => "6 krun-adapt daemons, 2 copies, 4 clients adding; one non-supervisor SIGKILLed",
            "supervisor" => "6 krun-adapt daemons, 2 copies, 4 clients adding; one supervisor SIGKILLed",
            "two" => "6 krun-adapt daemons, 3 copies (--tolerate 2), 150 keys put; two view neighbours SIGKILLed at once",
            _ => "5 krun-adapt daemons in network namespaces, 60 keys put; one member's link cut until evicted, then restored",
        },
        "trials": n,
        "ended_correctly": ok,
        "acked_writes": acked,
        "acked_writes_lost": lost,
        "repair_s": repairs,
        "runs": trials,
    }))
}

fn spec(adapt: &Path) -> KvSpec {
    KvSpec::new(adapt.to_path_buf())
}

/// 6 daemons, clients adding for a second, `victim` SIGKILLed, clients until the view is
/// repaired, a second more, then every key read back.
fn one_killed(adapt: &Path, victim: u64) -> Result<Outcome, String> {
    let e = |e: cluster_tests::ClusterError| e.to_string();
    let victim = victim as u32;
    let mut c = KvCluster::start(&spec(adapt), 6).map_err(e)?;
    let mut clients = Clients::new();
    clients.run_for(&c, Duration::from_secs(1)).map_err(e)?;
    let left: Vec<u32> = (0..6).filter(|&m| m != victim).collect();
    let at = Instant::now();
    c.kill(&[victim]).map_err(e)?;
    clients
        .run_until(&c, "the repair", |c| c.members_are(&left))
        .map_err(e)?;
    let repair_s = at.elapsed().as_secs_f64();
    clients.run_for(&c, Duration::from_secs(1)).map_err(e)?;
    let back = clients.read_back(&c, &left).map_err(e)?;
    Ok(Outcome {
        acked: clients.answered,
        lost: back.lost + back.wrong.len() as u64,
        what: format!("node {victim} SIGKILLed"),
        repair_s,
    })
}

/// 6 daemons keeping three copies, 150 keys put, `first` and `first + 1` SIGKILLed at
/// once, every key read back.
fn two_at_once(adapt: &Path, first: u32) -> Result<Outcome, String> {
    let e = |e: cluster_tests::ClusterError| e.to_string();
    let keys = 150u64;
    let mut c = KvCluster::start(
        &KvSpec {
            extra: vec!["--tolerate".into(), "2".into()],
            ..spec(adapt)
        },
        6,
    )
    .map_err(e)?;
    let acked = put_keys(&c, keys, 6)?;
    let victims = [first, first + 1];
    let left: Vec<u32> = (0..6).filter(|m| !victims.contains(m)).collect();
    let at = Instant::now();
    c.kill(&victims).map_err(e)?;
    c.wait("the repair", cluster_tests::kv::WAIT, |c| {
        c.members_are(&left)
    })
    .map_err(e)?;
    let repair_s = at.elapsed().as_secs_f64();
    let lost = read_puts(&c, keys, &left)?;
    Ok(Outcome {
        acked,
        lost,
        what: format!("nodes {first} and {} SIGKILLed at once", first + 1),
        repair_s,
    })
}

/// Puts keys `0..keys` as `v{key}`, each through daemon `key % nodes`; returns how many
/// were acknowledged.
fn put_keys(c: &KvCluster, keys: u64, nodes: u64) -> Result<u64, String> {
    let mut acked = 0;
    for key in 0..keys {
        let line = c
            .ask(
                key as u32,
                1,
                &format!("req {key} 1 {key} put v{key}"),
                (key % nodes) as u32,
            )
            .map_err(|e| e.to_string())?;
        if line.contains(" ok ") {
            acked += 1;
        }
    }
    Ok(acked)
}

/// Reads keys `0..keys` (put as `v{key}`) back through `via` in turn; returns how many are
/// lost or wrong.
fn read_puts(c: &KvCluster, keys: u64, via: &[u32]) -> Result<u64, String> {
    let mut lost = 0;
    for key in 0..keys {
        let client = 10_000 + key as u32;
        let line = c
            .ask(
                client,
                1,
                &format!("req {client} 1 {key} get"),
                via[key as usize % via.len()],
            )
            .map_err(|e| e.to_string())?;
        let w: Vec<&str> = line.split_whitespace().collect();
        if !(w.get(3) == Some(&"ok") && w.get(5).copied() == Some(format!("v{key}").as_str())) {
            println!("    key {key}: {line}");
            lost += 1;
        }
    }
    Ok(lost)
}

/// 5 daemons in namespaces, 60 keys put, `victim`'s link cut until the others evict it,
/// restored until it rejoins as a new member, every key read back through every member.
fn partition(adapt: &Path, victim: usize, trial: usize) -> Result<Outcome, String> {
    let e = |e: cluster_tests::ClusterError| e.to_string();
    let hosts = NetnsCluster::create(5, None).map_err(e)?;
    let c = KvCluster::start_in(
        &KvSpec {
            failure_timeout_ms: 1000,
            ..spec(adapt)
        },
        &hosts,
        47400 + (trial % 50) as u16 * 10,
    )
    .map_err(e)?;
    let keys = 60u64;
    let acked = put_keys(&c, keys, 5)?;
    let others: Vec<u32> = (0..5u32).filter(|&m| m as usize != victim).collect();
    let at = Instant::now();
    hosts.cut_link(victim).map_err(e)?;
    let watcher = others[0];
    c.wait("the eviction", Duration::from_secs(30), |c| {
        c.daemons[&watcher].seen().members == others
    })
    .map_err(e)?;
    let repair_s = at.elapsed().as_secs_f64();
    hosts.restore_link(victim).map_err(e)?;
    let new = victim as u32 + REJOIN_STRIDE;
    let mut with_new = others.clone();
    with_new.push(new);
    c.wait("the rejoin as a new member", Duration::from_secs(60), |c| {
        c.daemons[&watcher].seen().members == with_new
    })
    .map_err(e)?;
    let via: Vec<u32> = (0..5).collect();
    let lost = read_puts(&c, keys, &via)?;
    Ok(Outcome {
        acked,
        lost,
        what: format!("node {victim} cut off, evicted and healed"),
        repair_s,
    })
}

/// Runs `n` wide schedules of the adaptation layer's simulation (the `simulation` test in
/// release, one process per CPU on its own range of seeds).
fn simulation(n: u64) -> Result<serde_json::Value, String> {
    if n == 0 {
        return Ok(json!({"schedules_passed": null, "note": "not run (--sim-schedules 0)"}));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // Built (or found up to date) by cargo; run directly, so that no cargo holds the
    // release build's lock while the schedules run.
    let build = Command::new("cargo")
        .args([
            "test",
            "--release",
            "-p",
            "adaptation",
            "--test",
            "simulation",
        ])
        .args(["--no-run", "--message-format", "json"])
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo test --no-run: {e}"))?;
    if !build.status.success() {
        return Err("building the simulation test failed".into());
    }
    let exe = String::from_utf8_lossy(&build.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "simulation")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .ok_or("cargo named no executable for the simulation test")?;
    let parts = std::thread::available_parallelism().map_or(1, |p| p.get()) as u64;
    let start = Instant::now();
    let children = (0..parts)
        .map(|p| {
            let first = p * n / parts;
            let count = (p + 1) * n / parts - first;
            Command::new(&exe)
                .args(["--ignored", "--exact", "a_hundred_thousand_wide_schedules"])
                .arg("--nocapture")
                .env("KRUN_SIM_SCHEDULES", count.to_string())
                .env("KRUN_SIM_FIRST_SEED", first.to_string())
                .current_dir(root.join("adaptation"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("{}: {e}", exe.display()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut passed = 0u64;
    let mut failed = Vec::new();
    for child in children {
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for the simulation: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "N Wide schedules from seed F, all passed: ..."
        match text
            .lines()
            .find(|l| l.contains("Wide schedules from seed") && l.contains("all passed"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        {
            Some(k) if out.status.success() => passed += k,
            // The failing seed and its check are in the panic message, on stderr.
            _ => failed.push(format!(
                "{}\n{}",
                crate::ha::tail(&text, 4),
                crate::ha::tail(&String::from_utf8_lossy(&out.stderr), 30)
            )),
        }
    }
    Ok(json!({
        "model": "wide (message loss and duplication, partitions, two failures at once, failures during repair, f = 2 in half)",
        "schedules": n,
        "schedules_passed": passed,
        "failed": failed,
        "seconds": start.elapsed().as_secs_f64(),
        "command": "KRUN_SIM_SCHEDULES=N KRUN_SIM_FIRST_SEED=F cargo test --release -p adaptation --test simulation -- --ignored a_hundred_thousand_wide_schedules",
    }))
}

/// Executions per fuzz target from `scripts/fuzz.sh`'s results.
fn fuzz_summary(path: &Path) -> serde_json::Value {
    let Ok(text) = std::fs::read_to_string(path) else {
        return json!({"note": format!("{} not found: run scripts/fuzz.sh", path.display())});
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return json!({"note": format!("{} is not JSON", path.display())});
    };
    let targets: serde_json::Map<String, serde_json::Value> = v["targets"]
        .as_object()
        .map(|t| {
            t.iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        json!({"executions": t["executions"], "crashes": t["crashes"], "hangs": t["hangs"]}),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "from": path.display().to_string(),
        "measured": v["environment"]["date"],
        "command": v["command"],
        "targets": targets,
    })
}

fn figure(kinds: &serde_json::Map<String, serde_json::Value>) -> Figure {
    let groups = kinds
        .iter()
        .map(|(k, v)| {
            let f = |key: &str| v[key].as_f64();
            Group::new(
                k.clone(),
                [
                    Bar::single("trials", f("trials")),
                    Bar::single("ended correctly", f("ended_correctly")),
                    Bar::single("acknowledged writes lost", f("acked_writes_lost")),
                ],
            )
        })
        .collect();
    Figure {
        title: "bench faults: trials by kind of fault".into(),
        note: String::new(),
        panels: vec![Panel::new("trials and outcomes", "count", groups)],
    }
}
