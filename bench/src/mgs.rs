//! `bench mgs`: Modified Gram-Schmidt on the DSM (the Gobelins seed's evaluation), with the
//! directory's managers located by the static `page % N` scheme and by the adaptation
//! layer's cell-tree locator (dynamic), on 2, 3 and 4 nodes and several matrix sizes.
//!
//! A job is `nodes` fresh processes (this binary re-executed as `bench mgs --worker`)
//! joined through a bootstrap service on 127.0.0.1, running [`dsm::mgs::Mgs`] on an `n` x
//! `n` matrix (column-major, column `j` at rank `j % nodes`) with the default DSM settings
//! (2 fault threads, prefetch 8, one-sided reads) but the locator. Each rank times the
//! factorization between barriers; a job's time is the slowest rank's, its page faults and
//! remote (one-sided) fetches the sum over ranks. Rank 0 checks Q against a serial MGS
//! (max difference < 1e-9), so a wrong run is an error, never a figure.
//!
//! Static and dynamic jobs alternate within each run (the machine's drift hits both). Every
//! row gives the median of `--runs` runs (at least 3) with min and max. Writes
//! `bench/results/mgs.json` and `mgs.png`: `{"environment":{...},"plot","runs","provider",
//! "rows":[{"nodes","n","locator":"static"|"dynamic","seconds","seconds_min","seconds_max",
//! "runs","page_faults","remote_fetches"}],"comparison":[{"nodes","n",
//! "dynamic_over_static","paired_ratio":{"median","min","max","runs"},"within_2pct"}]}`.
//! Target (issue #12, the seed's claim): dynamic within 2% of static.
//! `--quick`: 3 runs of small matrices (a check that the bench works, not figures).
//! `--addition`: also a node addition during the run (2 -> 3 -> 4 nodes), timed in the
//! seed's phases, against the same run without it (rows `addition` in the JSON, one more
//! panel in the plot; [`crate::mgs_addition`]).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use dsm::{Dsm, DsmConfig, LocatorKind};
use fabric::bootstrap::{BootstrapClient, BootstrapServer};
use fabric::{FabricConfig, Provider};
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{self, cell, json_num, Table};

/// MGS on the DSM with the static (`page % N`) and the dynamic (cell-tree) directory
/// locator, 2 to 4 nodes; writes bench/results/mgs.json.
#[derive(Debug, clap::Args)]
pub struct MgsArgs {
    /// Node counts, comma-separated (each at least 1).
    #[arg(long, default_value = "2,3,4")]
    pub nodes: String,
    /// Matrix sizes n (an n x n matrix), comma-separated [default: 256,512,1024; with
    /// --quick 64,128].
    #[arg(long)]
    pub sizes: Option<String>,
    /// Runs per (nodes, n, locator), at least 3: median, min and max are reported
    /// [default: 5; with --quick 3].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Small matrices and 3 runs, unless --sizes / --runs say otherwise: checks that the
    /// bench works, fast (CI); not figures to compare.
    #[arg(long)]
    pub quick: bool,
    /// Fabric provider (tcp or shm).
    #[arg(long, default_value = "tcp")]
    pub provider: String,
    /// Where to write the JSON (default bench/results/mgs.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Also measure a node addition during MGS: 2 ranks, 2 more nodes join before steps
    /// n/3 and 2n/3, against the same 2-node run without them (both locators).
    #[arg(long)]
    pub addition: bool,
    /// Hidden: run as one of a job's processes.
    #[arg(long, hide = true, requires_all = ["rank", "size", "n", "locator", "bootstrap"])]
    pub worker: bool,
    /// Hidden: run as a process that joins a job's DSM during its run.
    #[arg(long, hide = true, requires = "contact_file")]
    pub joiner: bool,
    /// Hidden: nodes rank 0 admits during the run.
    #[arg(long, hide = true)]
    pub joiners: Option<usize>,
    /// Hidden: where rank 0 writes its DSM contact for the joiners.
    #[arg(long, hide = true)]
    pub contact_file: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub rank: Option<usize>,
    #[arg(long, hide = true)]
    pub size: Option<usize>,
    #[arg(long, hide = true)]
    pub n: Option<usize>,
    #[arg(long, hide = true)]
    pub locator: Option<String>,
    #[arg(long, hide = true)]
    pub bootstrap: Option<SocketAddr>,
}

/// How long a job's processes wait for each other in the bootstrap service.
const TIMEOUT: Duration = Duration::from_secs(120);
const LOCATORS: [LocatorKind; 2] = [LocatorKind::Modulo, LocatorKind::CellTree];
const SIZES: &str = "256,512,1024";
const QUICK_SIZES: &str = "64,128";

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub(crate) fn provider_of(name: &str) -> Result<Provider, String> {
    match name {
        "shm" => Ok(Provider::Shm),
        "tcp" => Ok(Provider::Tcp),
        other => Err(format!("unknown provider {other:?} (shm, tcp)")),
    }
}

fn locator_of(name: &str) -> Result<LocatorKind, String> {
    LOCATORS
        .into_iter()
        .find(|l| l.name() == name)
        .ok_or_else(|| format!("unknown locator {name:?} (static, dynamic)"))
}

/// A comma-separated list of positive integers.
fn list(what: &str, s: &str) -> Result<Vec<usize>, String> {
    let v: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<usize>()
                .ok()
                .filter(|&x| x > 0)
                .ok_or_else(|| format!("--{what}: {t:?} is not a positive integer"))
        })
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err(format!("--{what}: empty list"));
    }
    Ok(v)
}

/// One process of a job: prints `mgs-result key=value` lines.
fn worker(args: &MgsArgs) -> Result<(), String> {
    let provider = provider_of(&args.provider)?;
    let (rank, size, n) = (
        args.rank.ok_or("missing --rank")?,
        args.size.ok_or("missing --size")?,
        args.n.ok_or("missing --n")?,
    );
    let locator = locator_of(args.locator.as_deref().ok_or("missing --locator")?)?;
    let bootstrap = args.bootstrap.ok_or("missing --bootstrap")?;
    let boot = BootstrapClient::connect(bootstrap, rank, size, TIMEOUT).map_err(err)?;
    let fabric = FabricConfig::with_provider(provider)
        .with_env()
        .map_err(err)?;
    let mut config = DsmConfig::default().with_env().map_err(err)?;
    config.locator = locator;
    let d = Dsm::init(boot, &fabric, config).map_err(err)?;
    let m = dsm::mgs::Mgs::new(&d, n, n).map_err(err)?;
    let run = match (args.joiners.unwrap_or(0), &args.contact_file) {
        (0, _) => m.run(|_| Ok(())).map_err(err)?,
        (k, Some(f)) => crate::mgs_addition::worker_run(&d, &m, rank, n, k, f)?,
        (_, None) => return Err("--joiners needs --contact-file".into()),
    };
    if rank == 0 {
        let diff = m.max_diff_from_serial();
        if diff.is_nan() || diff > 1e-9 {
            return Err(format!(
                "Q differs from the serial MGS's by {diff:e} ({size} nodes, n = {n}, {})",
                locator.name()
            ));
        }
    }
    println!(
        "mgs-result seconds={} page_faults={} remote_fetches={}",
        run.seconds, run.page_faults, run.remote_fetches
    );
    m.free().map_err(err)?;
    d.barrier().map_err(err)
}

/// What one job measured: the slowest rank's time, faults and fetches summed over ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Job {
    pub seconds: f64,
    pub page_faults: f64,
    pub remote_fetches: f64,
}

/// Merges the ranks' `mgs-result` lines into a job's figures.
pub fn merge(outputs: &[String]) -> Result<Job, String> {
    let mut job = Job::default();
    for (rank, out) in outputs.iter().enumerate() {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix("mgs-result "))
            .ok_or_else(|| format!("rank {rank} printed no result"))?;
        let mut seen = 0;
        for kv in line.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("rank {rank}: bad result {kv:?}"))?;
            let v: f64 = v
                .parse()
                .map_err(|_| format!("rank {rank}: bad value in {kv:?}"))?;
            match k {
                "seconds" => job.seconds = job.seconds.max(v),
                "page_faults" => job.page_faults += v,
                "remote_fetches" => job.remote_fetches += v,
                _ => continue,
            }
            seen += 1;
        }
        if seen != 3 {
            return Err(format!("rank {rank}: incomplete result {line:?}"));
        }
    }
    Ok(job)
}

/// One job: `nodes` workers on an n x n matrix.
pub(crate) fn job(
    provider: &str,
    nodes: usize,
    n: usize,
    locator: LocatorKind,
) -> Result<Job, String> {
    let exe = std::env::current_exe().map_err(err)?;
    let server =
        BootstrapServer::start_with(("127.0.0.1", 0), nodes, TIMEOUT, None).map_err(err)?;
    let mut children = Vec::new();
    for rank in 0..nodes {
        let child = Command::new(&exe)
            .args(["mgs", "--worker", "--provider", provider])
            .args(["--rank", &rank.to_string(), "--size", &nodes.to_string()])
            .args(["--n", &n.to_string(), "--locator", locator.name()])
            .args(["--bootstrap", &server.addr().to_string()])
            .env_remove("KRUN_RANK")
            .env_remove("KRUN_DSM_LOCATOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting MGS worker {rank}: {e}"));
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    let mut outputs = Vec::new();
    let mut failures = Vec::new();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().map_err(err)?;
        if !o.status.success() {
            failures.push(format!(
                "worker {rank} {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        outputs.push(String::from_utf8_lossy(&o.stdout).into_owned());
    }
    let _ = server.join();
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    merge(&outputs)
}

/// The samples of one (nodes, n, locator).
pub type Samples = BTreeMap<(usize, usize, &'static str), Vec<Job>>;

/// Rows of the JSON, one per (nodes, n, locator).
pub fn rows(samples: &Samples) -> Vec<serde_json::Value> {
    samples
        .iter()
        .map(|(&(nodes, n, locator), jobs)| {
            let secs: Vec<f64> = jobs.iter().map(|j| j.seconds).collect();
            let faults: Vec<f64> = jobs.iter().map(|j| j.page_faults).collect();
            let fetches: Vec<f64> = jobs.iter().map(|j| j.remote_fetches).collect();
            let s = report::spread(&secs);
            json!({
                "nodes": nodes,
                "n": n,
                "locator": locator,
                "seconds": s["median"],
                "seconds_min": s["min"],
                "seconds_max": s["max"],
                "runs": s["runs"],
                "page_faults": report::median(&faults),
                "remote_fetches": report::median(&fetches),
            })
        })
        .collect()
}

/// Per (nodes, n): dynamic's median time over static's, and the ratios of the runs paired
/// (run i's dynamic job over run i's static job, which ran just before it).
pub fn comparison(samples: &Samples) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (&(nodes, n, locator), stat) in samples {
        if locator != LocatorKind::Modulo.name() {
            continue;
        }
        let Some(dynamic) = samples.get(&(nodes, n, LocatorKind::CellTree.name())) else {
            continue;
        };
        let med =
            |jobs: &[Job]| report::median(&jobs.iter().map(|j| j.seconds).collect::<Vec<_>>());
        let ratio = med(dynamic.as_slice())
            .zip(med(stat.as_slice()))
            .map(|(d, s)| d / s);
        let paired: Vec<f64> = dynamic
            .iter()
            .zip(stat)
            .map(|(d, s)| d.seconds / s.seconds)
            .collect();
        out.push(json!({
            "nodes": nodes,
            "n": n,
            "dynamic_over_static": json_num(ratio),
            "paired_ratio": report::spread(&paired),
            "within_2pct": ratio.map(|r| r <= 1.02),
        }));
    }
    out
}

/// The plot: one panel per matrix size, a group per node count, static beside dynamic.
pub fn figure(samples: &Samples, sizes: &[usize], nodes: &[usize], runs: usize) -> Figure {
    let panels = sizes
        .iter()
        .map(|&n| {
            let groups = nodes
                .iter()
                .map(|&k| {
                    let bar = |l: LocatorKind| {
                        samples.get(&(k, n, l.name())).and_then(|jobs| {
                            let secs: Vec<f64> = jobs.iter().map(|j| j.seconds).collect();
                            Bar::from_values(
                                match l {
                                    LocatorKind::Modulo => "static (page % N)",
                                    LocatorKind::CellTree => "dynamic (cell tree)",
                                },
                                &secs,
                            )
                        })
                    };
                    Group::new(
                        format!("{k} nodes"),
                        [bar(LocatorKind::Modulo), bar(LocatorKind::CellTree)],
                    )
                })
                .collect();
            Panel::new(format!("n = {n} (lower is better)"), "s", groups)
        })
        .collect();
    Figure {
        title: "bench mgs: MGS on the DSM, static against dynamic directory locator".into(),
        note: format!(
            "median of {runs} runs, whiskers min/max; target: dynamic within 2% of static"
        ),
        panels,
    }
}

pub fn run(args: MgsArgs) -> Result<(), String> {
    if args.worker {
        return worker(&args);
    }
    if args.joiner {
        return crate::mgs_addition::joiner(&args);
    }
    provider_of(&args.provider)?;
    let runs = args.runs.unwrap_or(if args.quick { 3 } else { 5 });
    if runs < 3 {
        return Err("--runs must be at least 3 (median, min and max are reported)".into());
    }
    let nodes = list("nodes", &args.nodes)?;
    let default_sizes = if args.quick { QUICK_SIZES } else { SIZES };
    let sizes = list("sizes", args.sizes.as_deref().unwrap_or(default_sizes))?;
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| report::results_path("mgs"));
    let mut samples: Samples = BTreeMap::new();
    for &k in &nodes {
        for &n in &sizes {
            for r in 0..runs {
                for l in LOCATORS {
                    let j = job(&args.provider, k, n, l)
                        .map_err(|e| format!("{k} nodes, n = {n}, {}, run {r}: {e}", l.name()))?;
                    eprintln!(
                        "bench mgs: {k} nodes, n = {n}, {}: {:.3} s, {} faults, {} fetches",
                        l.name(),
                        j.seconds,
                        j.page_faults,
                        j.remote_fetches
                    );
                    samples.entry((k, n, l.name())).or_default().push(j);
                }
            }
        }
    }
    let mut table = Table::new(&[
        "nodes",
        "n",
        "static s",
        "dynamic s",
        "dyn/static",
        "faults st/dyn",
        "fetches st/dyn",
    ]);
    for &k in &nodes {
        for &n in &sizes {
            let med = |l: LocatorKind, f: fn(&Job) -> f64| {
                samples
                    .get(&(k, n, l.name()))
                    .and_then(|jobs| report::median(&jobs.iter().map(f).collect::<Vec<_>>()))
            };
            let (s, d) = (
                med(LocatorKind::Modulo, |j| j.seconds),
                med(LocatorKind::CellTree, |j| j.seconds),
            );
            let pair = |f: fn(&Job) -> f64| {
                format!(
                    "{}/{}",
                    cell(med(LocatorKind::Modulo, f), 0),
                    cell(med(LocatorKind::CellTree, f), 0)
                )
            };
            table.row(vec![
                k.to_string(),
                n.to_string(),
                cell(s, 3),
                cell(d, 3),
                cell(d.zip(s).map(|(d, s)| d / s), 3),
                pair(|j| j.page_faults),
                pair(|j| j.remote_fetches),
            ]);
        }
    }
    print!("{}", table.render());
    let addition = if args.addition {
        let a = crate::mgs_addition::run_samples(&args.provider, &sizes, runs, &LOCATORS)?;
        let mut t = Table::new(&["n", "locator", "2 nodes s", "2->3->4 s", "cost"]);
        for r in crate::mgs_addition::rows(&a) {
            t.row(vec![
                r["n"].to_string(),
                r["locator"].as_str().unwrap_or("").to_string(),
                cell(r["seconds_without"]["median"].as_f64(), 3),
                cell(r["seconds_with"]["median"].as_f64(), 3),
                cell(r["cost_fraction"].as_f64().map(|c| c * 100.0), 1) + "%",
            ]);
        }
        print!("{}", t.render());
        Some(a)
    } else {
        None
    };
    let value = json!({
        "runs": runs,
        "quick": args.quick,
        "provider": args.provider,
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "settings": {"fault_threads": 2, "prefetch": 8, "one_sided": true, "matrix": "n x n, column-major, column j at rank j % nodes"},
        "target": {"dynamic_over_static_max": 1.02},
        "rows": rows(&samples),
        "comparison": comparison(&samples),
        "addition": addition.as_ref().map(crate::mgs_addition::rows),
        "addition_target": {"cost_fraction_max": crate::mgs_addition::TARGET},
    });
    let mut fig = figure(&samples, &sizes, &nodes, runs);
    if let Some(a) = &addition {
        fig.panels.push(crate::mgs_addition::panel(a));
    }
    report::write_results(&out_path, value, &fig)?;
    println!("wrote {} and its .png", out_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seconds: f64) -> Job {
        Job {
            seconds,
            page_faults: 10.0,
            remote_fetches: 4.0,
        }
    }

    #[test]
    fn a_job_takes_the_slowest_rank_and_sums_the_counters() {
        let outs = vec![
            "noise\nmgs-result seconds=1.5 page_faults=10 remote_fetches=3\n".to_string(),
            "mgs-result seconds=2.0 page_faults=7 remote_fetches=1\n".to_string(),
        ];
        let j = merge(&outs).unwrap();
        assert_eq!(
            (j.seconds, j.page_faults, j.remote_fetches),
            (2.0, 17.0, 4.0)
        );
        assert!(merge(&["nothing".into()])
            .unwrap_err()
            .contains("no result"));
        assert!(merge(&["mgs-result seconds=1".into()])
            .unwrap_err()
            .contains("incomplete"));
        assert!(merge(&["mgs-result seconds=x page_faults=1 remote_fetches=1".into()]).is_err());
    }

    #[test]
    fn rows_and_the_comparison_follow_the_issue_schema() {
        let mut s: Samples = BTreeMap::new();
        s.insert((2, 64, "static"), vec![job(1.0), job(2.0), job(3.0)]);
        s.insert((2, 64, "dynamic"), vec![job(1.01), job(2.0), job(3.3)]);
        let rows = rows(&s);
        assert_eq!(rows.len(), 2);
        for r in &rows {
            for k in [
                "nodes",
                "n",
                "locator",
                "seconds",
                "page_faults",
                "remote_fetches",
            ] {
                assert!(!r[k].is_null(), "{k} missing in {r}");
            }
        }
        let st = rows.iter().find(|r| r["locator"] == "static").unwrap();
        assert_eq!(
            (st["seconds"].as_f64(), st["seconds_max"].as_f64()),
            (Some(2.0), Some(3.0))
        );
        let c = comparison(&s);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0]["dynamic_over_static"], json!(1.0));
        assert_eq!(c[0]["within_2pct"], json!(true));
        assert_eq!(c[0]["paired_ratio"]["max"], json!(1.1));
    }

    #[test]
    fn bad_lists_are_refused_by_name() {
        assert_eq!(list("nodes", "2, 3,4").unwrap(), vec![2, 3, 4]);
        assert!(list("nodes", "2,0").unwrap_err().contains("--nodes"));
        assert!(list("sizes", "").unwrap_err().contains("empty"));
        assert!(locator_of("modulo").is_err());
    }
}
