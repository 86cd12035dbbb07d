//! `bench mgs --addition`: a node addition during MGS, the seed's second measurement.
//!
//! A job starts MGS on 2 ranks; two more processes ask to join the DSM and rank 0 admits
//! them before steps n/3 and 2n/3 (`Mgs::run`'s `before_step`), so the DSM grows 2 -> 3 ->
//! 4 nodes during the run: each newcomer maps the matrix, becomes the manager of the
//! directory entries the locator gives it (they migrate while the ranks keep faulting),
//! and serves them until the job ends. Rank 0 times each addition in the seed's phases
//! (start, physical, setting, logical, end; [`dsm::PHASES`]). The same job without the
//! addition runs just before each one (paired), so the cost is the run's time with the
//! additions against without: target at most 5% (the seed measured up to a third of an
//! execution). The joiners' start-up is not in the run: rank 0 waits for both requests
//! before the timed run begins (then a barrier).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dsm::{Dsm, DsmConfig, LocatorKind};
use fabric::bootstrap::BootstrapServer;
use fabric::FabricConfig;
use serde_json::json;

use crate::mgs::{merge, Job, MgsArgs};
use crate::plot::{Bar, Group, Panel};
use crate::report;

/// Ranks running MGS; nodes added during the run.
pub const BASE_NODES: usize = 2;
pub const JOINERS: usize = 2;
/// The cost target: the additions cost at most this fraction of the run.
pub const TARGET: f64 = 0.05;
/// How long a process waits for the others (the second joiner waits for most of a run).
const WAIT: Duration = Duration::from_secs(1800);

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The steps before which rank 0 admits a joiner: `cols * i / (joiners + 1)`.
pub fn admission_steps(cols: usize, joiners: usize) -> Vec<usize> {
    (1..=joiners).map(|i| cols * i / (joiners + 1)).collect()
}

/// The `mgs-change` lines rank 0 printed: seconds per phase of each addition.
pub fn parse_changes(out: &str) -> Result<Vec<[f64; 5]>, String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("mgs-change "))
        .map(|l| {
            let mut phases = [f64::NAN; 5];
            for kv in l.split_whitespace() {
                let (k, v) = kv.split_once('=').ok_or(format!("bad pair {kv:?}"))?;
                let i = dsm::PHASES
                    .iter()
                    .position(|p| *p == k)
                    .ok_or(format!("unknown phase {k:?}"))?;
                phases[i] = v.parse().map_err(|_| format!("bad value in {kv:?}"))?;
            }
            if phases.iter().any(|p| !p.is_finite()) {
                return Err(format!("incomplete change {l:?}"));
            }
            Ok(phases)
        })
        .collect()
}

/// Rank `rank`'s side of a job with additions: rank 0 publishes its contact, waits for
/// the joiners' requests and admits them at [`admission_steps`]; returns the runs' result.
pub fn worker_run(
    d: &Dsm,
    m: &dsm::mgs::Mgs<'_>,
    rank: usize,
    n: usize,
    joiners: usize,
    contact_file: &Path,
) -> Result<dsm::mgs::Measured, String> {
    if rank == 0 {
        d.set_auto_admit(false);
        let tmp = contact_file.with_extension("tmp");
        std::fs::write(&tmp, d.contact().map_err(err)?).map_err(err)?;
        std::fs::rename(&tmp, contact_file).map_err(err)?;
        let start = Instant::now();
        while d.pending_joins() < joiners {
            if start.elapsed() > WAIT {
                return Err(format!(
                    "{joiners} nodes did not ask to join within {WAIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    d.barrier().map_err(err)?;
    let steps = admission_steps(n, joiners);
    let mut reports = Vec::new();
    let run = m
        .run(|k| {
            if rank == 0 && steps.contains(&k) {
                reports.push(d.admit(WAIT)?);
            }
            Ok(())
        })
        .map_err(err)?;
    for r in reports {
        let pairs: Vec<String> = dsm::PHASES
            .iter()
            .zip(r.phases)
            .map(|(p, s)| format!("{p}={s}"))
            .collect();
        println!("mgs-change {}", pairs.join(" "));
    }
    Ok(run)
}

/// A joining process: joins through the contact file, serves until rank 0 ends the job.
pub fn joiner(args: &MgsArgs) -> Result<(), String> {
    let path = args
        .contact_file
        .as_ref()
        .ok_or("--joiner needs --contact-file")?;
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > WAIT {
            return Err(format!("{} never appeared", path.display()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let contact = std::fs::read_to_string(path).map_err(err)?;
    let provider = crate::mgs::provider_of(&args.provider)?;
    let fabric = FabricConfig::with_provider(provider)
        .with_env()
        .map_err(err)?;
    let config = DsmConfig::default().with_env().map_err(err)?;
    let d = Dsm::join(&contact, &fabric, config, WAIT).map_err(|e| format!("join: {e}"))?;
    if !d.wait_dismissed(WAIT) {
        return Err("rank 0 did not end the job".into());
    }
    Ok(())
}

/// A job with additions: its time and faults as [`Job`], and the phases of each addition.
#[derive(Clone, Debug)]
pub struct AddJob {
    pub job: Job,
    pub changes: Vec<[f64; 5]>,
}

fn kill_all(children: &mut [Child]) {
    for c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// One job of [`BASE_NODES`] ranks on an n x n matrix, [`JOINERS`] nodes added during it.
pub fn job(provider: &str, n: usize, locator: LocatorKind) -> Result<AddJob, String> {
    let exe = std::env::current_exe().map_err(err)?;
    let dir = std::env::temp_dir().join(format!(
        "krun-bench-mgs-add-{}-{}",
        std::process::id(),
        fabric::random_u64().map_err(err)?
    ));
    std::fs::create_dir_all(&dir).map_err(err)?;
    let contact: PathBuf = dir.join("contact");
    let server =
        BootstrapServer::start_with(("127.0.0.1", 0), BASE_NODES, WAIT, None).map_err(err)?;
    let mut ranks = Vec::new();
    let mut joiners = Vec::new();
    let spawn = |args: Vec<String>| {
        Command::new(&exe)
            .args(args)
            .env_remove("KRUN_RANK")
            .env_remove("KRUN_DSM_LOCATOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting an MGS process: {e}"))
    };
    let contact_arg = contact.to_string_lossy().into_owned();
    for rank in 0..BASE_NODES {
        let args: Vec<String> = [
            "mgs",
            "--worker",
            "--provider",
            provider,
            "--rank",
            &rank.to_string(),
            "--size",
            &BASE_NODES.to_string(),
            "--n",
            &n.to_string(),
            "--locator",
            locator.name(),
            "--bootstrap",
            &server.addr().to_string(),
            "--joiners",
            &JOINERS.to_string(),
            "--contact-file",
            &contact_arg,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match spawn(args) {
            Ok(c) => ranks.push(c),
            Err(e) => {
                kill_all(&mut ranks);
                return Err(e);
            }
        }
    }
    for _ in 0..JOINERS {
        let args = ["mgs", "--joiner", "--provider", provider, "--contact-file"]
            .iter()
            .map(|s| s.to_string())
            .chain([contact_arg.clone()])
            .collect();
        match spawn(args) {
            Ok(c) => joiners.push(c),
            Err(e) => {
                kill_all(&mut ranks);
                kill_all(&mut joiners);
                return Err(e);
            }
        }
    }
    let mut outputs = Vec::new();
    let mut failures = Vec::new();
    for (rank, c) in ranks.into_iter().enumerate() {
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
    // The joiners end once rank 0 dismissed them (bounded; killed past it).
    let deadline = Instant::now() + Duration::from_secs(30);
    for (i, mut c) in joiners.into_iter().enumerate() {
        let status = loop {
            match c.try_wait().map_err(err)? {
                Some(s) => break Some(s),
                None if Instant::now() > deadline => break None,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        match status {
            Some(s) if s.success() => {}
            other => {
                let _ = c.kill();
                let o = c.wait_with_output().map_err(err)?;
                failures.push(format!(
                    "joiner {i} {}: {}",
                    other.map_or("did not end".to_string(), |s| s.to_string()),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
        }
    }
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    let changes = parse_changes(&outputs[0])?;
    if changes.len() != JOINERS {
        return Err(format!(
            "rank 0 reported {} additions, {JOINERS} expected",
            changes.len()
        ));
    }
    Ok(AddJob {
        job: merge(&outputs)?,
        changes,
    })
}

/// Per (n, locator): the paired runs, without and with the additions.
pub type Samples = BTreeMap<(usize, &'static str), Vec<(Job, AddJob)>>;

/// The JSON's `addition` rows.
pub fn rows(samples: &Samples) -> Vec<serde_json::Value> {
    samples
        .iter()
        .map(|(&(n, locator), runs)| {
            let without: Vec<f64> = runs.iter().map(|(w, _)| w.seconds).collect();
            let with: Vec<f64> = runs.iter().map(|(_, a)| a.job.seconds).collect();
            let paired: Vec<f64> = runs
                .iter()
                .map(|(w, a)| a.job.seconds / w.seconds - 1.0)
                .collect();
            let cost = report::median(&with)
                .zip(report::median(&without))
                .map(|(a, w)| a / w - 1.0);
            let additions: Vec<serde_json::Value> = (0..JOINERS)
                .map(|i| {
                    let mut phases = serde_json::Map::new();
                    for (p, name) in dsm::PHASES.iter().enumerate() {
                        let v: Vec<f64> = runs.iter().map(|(_, a)| a.changes[i][p]).collect();
                        phases.insert(name.to_string(), report::spread(&v));
                    }
                    let total: Vec<f64> = runs
                        .iter()
                        .map(|(_, a)| a.changes[i].iter().sum())
                        .collect();
                    json!({
                        "nodes": format!("{} -> {}", BASE_NODES + i, BASE_NODES + i + 1),
                        "phases_seconds": phases,
                        "total_seconds": report::spread(&total),
                    })
                })
                .collect();
            json!({
                "n": n,
                "locator": locator,
                "nodes": format!("{BASE_NODES} -> {}", BASE_NODES + JOINERS),
                "seconds_without": report::spread(&without),
                "seconds_with": report::spread(&with),
                "cost_fraction": report::json_num(cost),
                "paired_cost_fraction": report::spread(&paired),
                "within_5pct": cost.map(|c| c <= TARGET),
                "additions": additions,
            })
        })
        .collect()
}

/// The plot's panel: per (n, locator), the run without and with the additions.
pub fn panel(samples: &Samples) -> Panel {
    let groups = samples
        .iter()
        .map(|(&(n, locator), runs)| {
            let without: Vec<f64> = runs.iter().map(|(w, _)| w.seconds).collect();
            let with: Vec<f64> = runs.iter().map(|(_, a)| a.job.seconds).collect();
            Group::new(
                format!("n = {n}\n{locator}"),
                [
                    Bar::from_values("2 nodes", &without),
                    Bar::from_values("2 -> 3 -> 4 nodes during the run", &with),
                ],
            )
        })
        .collect();
    Panel::new(
        "node addition during MGS (lower is better; target: at most 5% slower)",
        "s",
        groups,
    )
}

/// Runs the paired jobs: for each size, locator and run, the job without the additions,
/// then the same job with them.
pub fn run_samples(
    provider: &str,
    sizes: &[usize],
    runs: usize,
    locators: &[LocatorKind],
) -> Result<Samples, String> {
    let mut samples: Samples = BTreeMap::new();
    for &n in sizes {
        for r in 0..runs {
            for &l in locators {
                let what = |e: String| format!("addition, n = {n}, {}, run {r}: {e}", l.name());
                let without = crate::mgs::job(provider, BASE_NODES, n, l).map_err(what)?;
                let with = job(provider, n, l).map_err(what)?;
                eprintln!(
                    "bench mgs: n = {n}, {}: {:.3} s, with {JOINERS} additions {:.3} s \
                     (phases of the first: {:?})",
                    l.name(),
                    without.seconds,
                    with.job.seconds,
                    with.changes[0]
                );
                samples
                    .entry((n, l.name()))
                    .or_default()
                    .push((without, with));
            }
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn additions_are_spread_over_the_run_and_their_phases_parse() {
        assert_eq!(admission_steps(64, 2), vec![21, 42]);
        let out = "x\nmgs-change start=0.1 physical=0.2 setting=0.3 logical=0.4 end=0.5\n";
        assert_eq!(parse_changes(out).unwrap(), vec![[0.1, 0.2, 0.3, 0.4, 0.5]]);
        assert!(parse_changes("mgs-change start=1").is_err());
        assert!(parse_changes("mgs-change start=1 bogus=2").is_err());
    }

    #[test]
    fn rows_report_the_cost_against_the_run_without_additions() {
        let job = |seconds| Job {
            seconds,
            page_faults: 1.0,
            remote_fetches: 1.0,
        };
        let add = |seconds| AddJob {
            job: job(seconds),
            changes: vec![[0.01, 0.02, 0.03, 0.04, 0.05]; JOINERS],
        };
        let mut s: Samples = BTreeMap::new();
        s.insert(
            (64, "static"),
            vec![
                (job(1.0), add(1.02)),
                (job(2.0), add(2.2)),
                (job(3.0), add(3.03)),
            ],
        );
        let rows = rows(&s);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(
            r["cost_fraction"].as_f64().map(|c| (c * 100.0).round()),
            Some(10.0)
        );
        assert_eq!(r["within_5pct"], json!(false));
        assert_eq!(r["additions"].as_array().map(Vec::len), Some(JOINERS));
        assert_eq!(r["additions"][0]["nodes"], "2 -> 3");
        assert!(r["additions"][1]["phases_seconds"]["logical"]["median"].is_number());
        assert_eq!(panel(&s).groups.len(), 1);
    }
}
