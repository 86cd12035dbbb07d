//! `bench launch-slurm`: the MPI hello world (`rank/examples/mpi/hello.c`, MPI_Init's
//! wire-up included) inside the local Slurm lane (`cluster-tests/slurm/cluster.sh`: a real
//! slurmctld and 3 slurmd in network namespaces, 2 ranks per node): `krun` in the
//! allocation (one krund per node through srun, krund serving PMI-1 to MPICH's build and
//! PMIx to Open MPI's) against Slurm's own launch, `srun --mpi=pmi2` (MPICH) and
//! `srun --mpi=pmix` (Open MPI), each inside `salloc` so that both pay for one allocation.
//! A launcher Slurm cannot serve here is recorded in the results with the reason (the
//! lab's `srun --mpi=pmix` fails: its nodes share /tmp, and the pmix plugin's per-step
//! directory has the same name on every node: slurmd says `Cannot create directory
//! "/tmp/spmix_appdir_0_<job>.0": File exists`, kept in the results). Needs root; brings the
//! cluster up and down.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{json_num, median, results_path, spread, write_results, Table};

const NODES: usize = 3;
const PER_NODE: usize = 2;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-tests/slurm/cluster.sh")
}

/// `cluster.sh exec ARGS` (a Slurm client on the lab's login node).
fn exec(args: &[&str]) -> Command {
    let mut c = Command::new(script());
    c.env("KRUN_SLURM_NODES", NODES.to_string())
        .arg("exec")
        .args(args);
    c
}

fn cluster(verb: &str) -> Result<(), String> {
    let o = Command::new(script())
        .env("KRUN_SLURM_NODES", NODES.to_string())
        .arg(verb)
        .output()
        .map_err(|e| format!("cluster.sh {verb}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "cluster.sh {verb} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// Wall times of `runs` runs (after a warm-up) of `cmd`'s output checked by `ok`; `None`
/// with the reason when a run fails or takes longer than `limit` (killed by PID).
fn time_runs(
    what: &str,
    make: &dyn Fn() -> Command,
    ok: &dyn Fn(&str) -> bool,
    runs: usize,
    limit: Duration,
) -> Result<Vec<f64>, String> {
    let mut times = Vec::new();
    for i in crate::runs::bar(&format!("launch-slurm: {what}"), 0..=runs) {
        let mut cmd = make();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let o = child.wait_with_output();
            let _ = tx.send(());
            o
        });
        if rx.recv_timeout(limit).is_err() {
            // SAFETY: SIGKILL to the client this bench started (not reaped: the waiter
            // holds it).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = waiter.join();
            return Err(format!("{what}: no end within {limit:?}"));
        }
        let took = start.elapsed().as_secs_f64();
        let o = waiter
            .join()
            .map_err(|_| format!("{what}: waiter panicked"))?
            .map_err(|e| format!("{what}: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if !o.status.success() || !ok(&text) {
            let tail: Vec<&str> = text.lines().rev().take(6).collect();
            return Err(format!(
                "{what}: {} ({})",
                o.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            ));
        }
        if i > 0 {
            times.push(took);
        }
    }
    Ok(times)
}

/// An MPI hello world (6 ranks, 3 nodes) in the local Slurm lab: krun against srun
/// --mpi=pmi2 (MPICH) and --mpi=pmix (Open MPI), both inside salloc; a launcher Slurm cannot
/// serve is recorded with the reason; writes bench/results/launch_slurm.json (root).
#[derive(Debug, clap::Args)]
pub struct LaunchSlurmArgs {
    /// Runs per launcher (at least 3).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Seconds one launch may take.
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub limit_secs: u64,
    /// Where to write the JSON (default bench/results/launch_slurm.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

pub fn run(args: LaunchSlurmArgs) -> Result<(), String> {
    let runs: usize = args.runs.max(3);
    let limit = Duration::from_secs(args.limit_secs);
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("bench launch-slurm needs root (network namespaces, slurmd)".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating bench: {e}"))?;
    let krun = exe.with_file_name("krun");
    if !krun.exists() {
        return Err(format!(
            "{} is missing: cargo build --release -p launcher",
            krun.display()
        ));
    }
    // The lab's nodes share the filesystem: binaries built here run there.
    let jobs = Path::new("/var/tmp/krun-slurm/jobs");
    std::fs::create_dir_all(jobs).map_err(|e| format!("{}: {e}", jobs.display()))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/mpi/hello.c");
    let mut hellos = Vec::new();
    for mpicc in ["mpicc.mpich", "mpicc.openmpi"] {
        let out = jobs.join(format!("bench-hello-{mpicc}"));
        let o = Command::new(mpicc)
            .arg("-O2")
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .output()
            .map_err(|e| format!("{mpicc}: {e}"))?;
        if !o.status.success() {
            return Err(format!("{mpicc}: {}", String::from_utf8_lossy(&o.stderr)));
        }
        hellos.push(out);
    }
    cluster("up")?;
    let result = measure(&krun, &hellos, runs, limit);
    // Why Slurm's pmix plugin failed, in slurmd's words (its logs stay after `down`).
    let slurmd_says = (1..=NODES)
        .filter_map(|n| {
            std::fs::read_to_string(format!("/var/tmp/krun-slurm/log/slurmd-node{n}.log")).ok()
        })
        .flat_map(|log| {
            log.lines()
                .filter(|l| l.contains("mpi/pmix") && l.contains("Cannot create"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        // Lines start with their time stamp: the newest is the last in order.
        .max();
    let down = cluster("down");
    for h in &hellos {
        let _ = std::fs::remove_file(h);
    }
    let (plugins, rows) = result?;
    down?;
    let n = NODES * PER_NODE;
    let mut table = Table::new(&["MPI hello", "krun s", "srun s", "krun/srun"]);
    let mut groups = Vec::new();
    let mut json_rows = Vec::new();
    for r in &rows {
        let (k, s) = (
            r.krun.as_ref().ok().and_then(|v| median(v)),
            r.srun.as_ref().ok().and_then(|v| median(v)),
        );
        let cell = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
        table.row(vec![
            format!("{n} ranks, {} ({})", r.label, r.srun_mpi),
            cell(k),
            cell(s),
            k.zip(s)
                .map_or("-".into(), |(k, s)| format!("{:.2}", k / s)),
        ]);
        groups.push(Group::new(
            format!("{n} ranks, {}", r.label),
            [
                r.krun
                    .as_ref()
                    .ok()
                    .and_then(|v| Bar::from_values("krun", v)),
                r.srun
                    .as_ref()
                    .ok()
                    .and_then(|v| Bar::from_values(&format!("srun {}", r.srun_mpi), v)),
            ],
        ));
        json_rows.push(json!({
            "mpi": r.label,
            "ranks": n,
            "nodes": NODES,
            "krun_s": json_num(k),
            "krun": r.krun.as_ref().map_or(json!(null), |v| spread(v)),
            "krun_error": r.krun.as_ref().err(),
            "against": format!("salloc srun {}", r.srun_mpi),
            "srun_s": json_num(s),
            "srun": r.srun.as_ref().map_or(json!(null), |v| spread(v)),
            "srun_unavailable": r.srun.as_ref().err(),
            "slurmd_says": if r.srun.is_err() && r.srun_mpi == "--mpi=pmix" {
                json!(slurmd_says)
            } else {
                json!(null)
            },
        }));
    }
    print!("{}", table.render());
    println!(
        "median of {runs} runs after a warm-up; Slurm lab of {NODES} nodes in network \
         namespaces, {PER_NODE} ranks per node; both inside salloc; srun --mpi=list: {plugins:?}"
    );
    for r in &rows {
        if let Err(e) = &r.srun {
            println!("srun {} for {}: not measured: {e}", r.srun_mpi, r.label);
        }
        if let Err(e) = &r.krun {
            println!("krun for {}: failed: {e}", r.label);
        }
    }
    let path = args
        .out
        .clone()
        .unwrap_or_else(|| results_path("launch_slurm"));
    let figure = Figure {
        title: "bench launch-slurm: an MPI hello world, krun against srun in the Slurm lab".into(),
        note: format!("median of {runs} runs, whiskers min/max; a missing bar did not run"),
        panels: vec![Panel::new(
            "time to run all ranks (lower is better)",
            "seconds",
            groups,
        )],
    };
    write_results(
        &path,
        json!({
            "runs_per_point": runs,
            "krun_build": if krun.to_string_lossy().contains("/release/") { "release" } else { "debug" },
            "srun_mpi_plugins": plugins,
            "rows": json_rows,
        }),
        &figure,
    )?;
    println!("wrote {} and its .png", path.display());
    Ok(())
}

/// One MPI library's comparison.
struct Row {
    label: &'static str,
    srun_mpi: &'static str,
    krun: Result<Vec<f64>, String>,
    srun: Result<Vec<f64>, String>,
}

fn measure(
    krun: &Path,
    hellos: &[PathBuf],
    runs: usize,
    limit: Duration,
) -> Result<(Vec<String>, Vec<Row>), String> {
    let o = exec(&["srun", "--mpi=list"])
        .output()
        .map_err(|e| format!("srun --mpi=list: {e}"))?;
    let plugins: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&o.stderr).lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains(' ') && !l.ends_with(':'))
        .map(str::to_string)
        .collect();
    let n = NODES * PER_NODE;
    let alloc = [
        "salloc".to_string(),
        "-N".into(),
        NODES.to_string(),
        format!("--ntasks-per-node={PER_NODE}"),
    ];
    let all_ranks = move |text: &str| text.matches("hello from rank ").count() == n;
    let mut rows = Vec::new();
    for (label, hello, mpi) in [
        ("MPICH", &hellos[0], "--mpi=pmi2"),
        ("Open MPI", &hellos[1], "--mpi=pmix"),
    ] {
        let hello = hello.display().to_string();
        let krun_cmd: Vec<String> = alloc
            .iter()
            .cloned()
            .chain([
                krun.display().to_string(),
                "--bind-to".into(),
                "none".into(),
                hello.clone(),
            ])
            .collect();
        let srun_cmd: Vec<String> = alloc
            .iter()
            .cloned()
            .chain(["srun".into(), mpi.into(), hello.clone()])
            .collect();
        let as_cmd = |v: &[String]| {
            let v: Vec<&str> = v.iter().map(String::as_str).collect();
            exec(&v)
        };
        let k = time_runs(
            &format!("krun {label} hello"),
            &|| as_cmd(&krun_cmd),
            &all_ranks,
            runs,
            limit,
        );
        let plugin = mpi.trim_start_matches("--mpi=");
        let s = if plugins.iter().any(|p| p == plugin) {
            time_runs(
                &format!("srun {mpi} {label} hello"),
                &|| as_cmd(&srun_cmd),
                &all_ranks,
                runs,
                limit,
            )
        } else {
            Err(format!(
                "srun has no {plugin} plugin here (srun --mpi=list)"
            ))
        };
        rows.push(Row {
            label,
            srun_mpi: mpi,
            krun: k,
            srun: s,
        });
    }
    Ok((plugins, rows))
}
