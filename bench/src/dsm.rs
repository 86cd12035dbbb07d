//! `bench dsm`: DSM page-fault latencies against the references they are built from,
//! measured in the same run: a 4 KiB RMA read (and an 8-byte fetch-and-add) through the
//! DSM's own endpoint, and a userfaultfd fault resolved from local memory.
//!
//! Each run starts four fresh processes (this binary re-executed as `bench dsm --worker`)
//! joined through a bootstrap service on 127.0.0.1, with the default DSM settings (2 fault
//! threads, prefetch 8, `page % 4` managers, one-sided reads). Timed pages are every other
//! page, so that no prefetch hides a fault. In order:
//! 1. rank 0 writes the pages; rank 1 reads them: a read fault with no owner hint (message
//!    to the manager, forwarded to the owner, which downgrades and replies with the page);
//! 2. rank 0 rewrites them (invalidating rank 1, which keeps rank 0 as its hint) and rank 2
//!    reads them (the owner publishes its copy); rank 1 reads them again: a hinted read
//!    fault, one-sided (join by fetch-and-add, then an RMA read of the owner's copy);
//!    rank 1 then times the references and a sequential scan with prefetch;
//!    ranks 1, 2 and 3 then read a fourth set of pages rank 0 wrote;
//! 3. rank 1 writes the pages it reads (rank 0 owns them, rank 2 holds a copy): a write
//!    upgrade with 2 other copies invalidated; rank 1 writes the fourth set (copies at ranks
//!    0, 2 and 3): 3 other copies; rank 2 writes pages only rank 0 holds: a
//!    write fault with 0 sharers (the page moves to the writer); rank 2 writes pages it read
//!    and rank 0 owns (no other copy): a write upgrade with 1 other copy (the owner's);
//! 4. rank 0 checks it reads every value written (the faults moved real data).
//!
//! Fault threads: each run also starts two runs of three processes with prefetch off, one
//! with 1 fault thread and one with 4: rank 0 writes `4 x --pages` pages, rank 1 reads them
//! (its hint), rank 0 rewrites them and rank 2 reads them (rank 0 publishes); then four
//! threads of rank 1 read disjoint quarters at once (hinted, one-sided faults): faults per
//! second with 1 and 4 fault threads, and their ratio per run.
//!
//! Every value is the median over a run's faults; the JSON gives the median, min and max
//! of those over `--runs` runs (at least 3). `read_fault_vs_reference` is computed per run
//! (the hinted read fault over that run's RMA read + local fault), then summarized. Writes
//! `bench/results/dsm.json` and `dsm.png`: `{"environment":{"commit","date","kernel","cpus"},
//! "plot","runs","pages","target","rows":[{"provider",
//! "<measure>":{"median","min","max","runs"}, "read_fault_vs_reference"}]}`.
//! Targets (issue #12): a hinted remote read fault's p50 <= 1.5 x (RMA 4 KiB read + local
//! userfaultfd fault); a write upgrade with 1 or 2 sharers <= a hinted read fault + 2 round
//! trips (`write_upgrade_target_met`; a round trip is the fetch-and-add's latency), for 0 to
//! 3 sharers; 4 fault threads >= 3 x one (`fault_threads_target_met`). The load average at
//! the start and the end is in the JSON (`loadavg`).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dsm::{Dsm, DsmConfig};
use fabric::bootstrap::{BootstrapClient, BootstrapServer};
use fabric::{FabricConfig, Provider};
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{self, cell, Table};

/// DSM page-fault latencies against the RMA read and local userfaultfd fault
/// they are built from, between three processes; writes bench/results/dsm.json.
#[derive(Debug, clap::Args)]
pub struct DsmArgs {
    /// Providers to measure, comma-separated (shm, tcp).
    #[arg(long, default_value = "shm,tcp")]
    pub providers: String,
    /// Runs per provider (at least 3: median, min and max are reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Timed pages per measure.
    #[arg(long, default_value_t = 64)]
    pub pages: usize,
    /// Where to write the JSON (default bench/results/dsm.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Hidden: run as one of the three worker processes.
    #[arg(long, hide = true, requires_all = ["provider", "rank", "bootstrap"])]
    pub worker: bool,
    #[arg(long, hide = true)]
    pub provider: Option<String>,
    #[arg(long, hide = true)]
    pub rank: Option<usize>,
    #[arg(long, hide = true)]
    pub bootstrap: Option<SocketAddr>,
    /// Hidden: a fault-thread run's worker with this many fault threads.
    #[arg(long, hide = true)]
    pub fault_threads: Option<usize>,
    /// Post a hinted read's RMA read after its join's answer (two round trips, the DSM
    /// before the generation check) instead of with the join (`DsmConfig::speculate`).
    #[arg(long)]
    pub two_round_trips: bool,
}
/// Processes of a latency run, and of a fault-thread run.
const RANKS: usize = 4;
const THREAD_RANKS: usize = 3;
/// Reader threads of the fault-thread runs.
const APP_THREADS: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(60);
const PAGE: usize = 4096;
/// Timed pages are every STRIDE-th page (no prefetch between them).
const STRIDE: usize = 2;

/// The measures, in table order: (key, label).
const MEASURES: [(&str, &str); 12] = [
    ("read_fault_message_us", "read fault, no hint (messages)"),
    ("read_fault_one_sided_us", "read fault, hinted (one-sided)"),
    ("write_fault_0_sharers_us", "write fault, 0 sharers"),
    ("write_upgrade_1_sharer_us", "write upgrade, 1 sharer"),
    ("write_upgrade_2_sharers_us", "write upgrade, 2 sharers"),
    ("write_upgrade_3_sharers_us", "write upgrade, 3 sharers"),
    (
        "fault_threads_1_per_s",
        "4 readers, 1 fault thread (faults/s)",
    ),
    (
        "fault_threads_4_per_s",
        "4 readers, 4 fault threads (faults/s)",
    ),
    ("rma_read_4k_us", "ref: RMA read 4 KiB"),
    ("fetch_add_us", "ref: RMA fetch-add 8 B"),
    ("local_uffd_fault_us", "ref: local userfaultfd fault"),
    ("scan_prefetch_mb_s", "scan with prefetch (MB/s)"),
];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn provider_of(name: &str) -> Result<Provider, String> {
    match name {
        "shm" => Ok(Provider::Shm),
        "tcp" => Ok(Provider::Tcp),
        other => Err(format!("unknown provider {other:?} (shm, tcp)")),
    }
}

fn median(v: &[f64]) -> f64 {
    report::median(v).unwrap_or(f64::NAN)
}

/// One process of a run: prints `dsm-result key=value` lines.
fn worker(args: &DsmArgs) -> Result<(), String> {
    let provider = provider_of(args.provider.as_deref().ok_or("missing --provider")?)?;
    let bootstrap: SocketAddr = args.bootstrap.ok_or("missing --bootstrap")?;
    let rank: usize = args.rank.ok_or("missing --rank")?;
    let n: usize = args.pages;
    if let Some(threads) = args.fault_threads {
        return threads_worker(provider, bootstrap, rank, n, threads, args.two_round_trips);
    }
    let boot = BootstrapClient::connect(bootstrap, rank, RANKS, TIMEOUT).map_err(err)?;
    let fabric = FabricConfig::with_provider(provider)
        .with_env()
        .map_err(err)?;
    let config = DsmConfig {
        speculate: !args.two_round_trips,
        ..DsmConfig::default()
    };
    let d = Dsm::init(boot, &fabric, config).map_err(err)?;
    let bar = || d.barrier().map_err(err);
    // Region: [timed pages A | timed pages B | timed pages C | scan pages | timed pages D].
    let span = n * STRIDE * PAGE;
    let region = d.alloc(5 * span).map_err(err)?;
    let mem = region.as_ptr();
    let a = |i: usize| i * STRIDE * PAGE;
    let b = |i: usize| span + i * STRIDE * PAGE;
    let c = |i: usize| 2 * span + i * STRIDE * PAGE;
    let scan = |i: usize| 3 * span + i * PAGE;
    let dd = |i: usize| 4 * span + i * STRIDE * PAGE;
    // SAFETY (every access below): offsets stay inside the region's 5 * span bytes; ranks
    // take turns between barriers.
    let put = |off: usize, v: u8| unsafe { mem.add(off).write_volatile(v) };
    let get = |off: usize| unsafe { mem.add(off).read_volatile() };
    let timed = |f: &dyn Fn(usize) -> Result<(), String>| -> Result<Vec<f64>, String> {
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            f(i)?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(times)
    };
    let expect = |off: usize, want: u8| -> Result<(), String> {
        let v = get(off);
        if v == want {
            Ok(())
        } else {
            Err(format!(
                "byte {off} of the region reads {v}, expected {want}"
            ))
        }
    };
    let say = |k: &str, v: f64| println!("dsm-result {k}={v}");

    // 1. Read faults without a hint.
    if rank == 0 {
        for i in 0..n {
            put(a(i), 1);
            put(b(i), 1);
            put(c(i), 1);
            put(dd(i), 1);
        }
        for i in 0..n * STRIDE {
            put(scan(i), 1);
        }
    }
    bar()?;
    if rank == 1 {
        say(
            "read_fault_message_us",
            median(&timed(&|i| expect(a(i), 1))?),
        );
        let local = dsm::uffd::local_fault_latency(n).map_err(err)?;
        say("local_uffd_fault_us", median(&local));
    }
    bar()?;
    // 2. Hinted one-sided read faults.
    if rank == 0 {
        for i in 0..n {
            put(a(i), 2);
        }
    }
    bar()?;
    if rank == 2 {
        for i in 0..n {
            expect(a(i), 2)?;
            expect(c(i), 1)?;
        }
        for i in 0..n * STRIDE {
            expect(scan(i), 1)?;
        }
    }
    bar()?;
    if rank == 1 {
        let before = d.stats().1;
        let spec_before = d.speculation_stats();
        let steps_before = d.fault_steps_ns();
        let hinted = timed(&|i| expect(a(i), 2))?;
        let steps_after = d.fault_steps_ns();
        let spec_after = d.speculation_stats();
        say("read_fault_one_sided_us", median(&hinted));
        say("one_sided_reads", (d.stats().1 - before) as f64);
        // Hinted faults whose read went with the join (one round trip), and those whose
        // speculative copy was older or torn (read again after the join).
        say("hinted_speculative", (spec_after.0 - spec_before.0) as f64);
        say("hinted_fallbacks", (spec_after.1 - spec_before.1) as f64);
        // Where a hinted fault's time goes (means over the timed faults; `answer`
        // includes `copy`; `rest`: the trap, the fault's delivery to the fault thread and
        // the faulting thread's wake-up).
        let mean = hinted.iter().sum::<f64>() / hinted.len().max(1) as f64;
        let mut accounted = 0.0;
        for (k, name) in dsm::fault::STEPS.iter().enumerate() {
            let us = (steps_after[k] - steps_before[k]) as f64 / 1e3 / n.max(1) as f64;
            if *name != "copy" {
                accounted += us;
            }
            say(&format!("hinted_step_{name}_us"), us);
        }
        say("hinted_step_rest_us", mean - accounted);
        say("read_fault_one_sided_mean_us", mean);
        let (reads, atomics) = d.reference_rma(&region, 0, n).map_err(err)?;
        say("rma_read_4k_us", median(&reads));
        say("fetch_add_us", median(&atomics));
        let t = Instant::now();
        for i in 0..n * STRIDE {
            expect(scan(i), 1)?;
        }
        let secs = t.elapsed().as_secs_f64();
        say(
            "scan_prefetch_mb_s",
            (n * STRIDE * PAGE) as f64 / secs / 1e6,
        );
    }
    bar()?;
    // Copies of D at ranks 1, 2 and 3 (rank 0 becomes its read owner).
    if rank > 0 {
        for i in 0..n {
            expect(dd(i), 1)?;
        }
    }
    bar()?;
    // 3. Write faults.
    if rank == 1 {
        say(
            "write_upgrade_2_sharers_us",
            median(&timed(&|i| {
                put(a(i), 3);
                Ok(())
            })?),
        );
        say(
            "write_upgrade_3_sharers_us",
            median(&timed(&|i| {
                put(dd(i), 6);
                Ok(())
            })?),
        );
    }
    bar()?;
    if rank == 2 {
        say(
            "write_fault_0_sharers_us",
            median(&timed(&|i| {
                put(b(i), 4);
                Ok(())
            })?),
        );
        say(
            "write_upgrade_1_sharer_us",
            median(&timed(&|i| {
                put(c(i), 5);
                Ok(())
            })?),
        );
    }
    bar()?;
    // 4. The data moved.
    if rank == 0 {
        for i in 0..n {
            expect(a(i), 3)?;
            expect(b(i), 4)?;
            expect(c(i), 5)?;
            expect(dd(i), 6)?;
        }
    }
    bar()?;
    d.free(region).map_err(err)?;
    bar()
}

/// A fault-thread run's worker (see the module doc): rank 1 prints `fault_threads_<T>_per_s`.
fn threads_worker(
    provider: Provider,
    bootstrap: SocketAddr,
    rank: usize,
    n: usize,
    threads: usize,
    two_round_trips: bool,
) -> Result<(), String> {
    let boot = BootstrapClient::connect(bootstrap, rank, THREAD_RANKS, TIMEOUT).map_err(err)?;
    let fabric = FabricConfig::with_provider(provider)
        .with_env()
        .map_err(err)?;
    let config = DsmConfig {
        fault_threads: threads,
        prefetch: 0,
        speculate: !two_round_trips,
        ..DsmConfig::default()
    };
    let d = Dsm::init(boot, &fabric, config).map_err(err)?;
    let bar = || d.barrier().map_err(err);
    let total = n * APP_THREADS;
    let region = d.alloc(total * STRIDE * PAGE).map_err(err)?;
    let base = region.as_ptr() as usize;
    let at = move |i: usize| (base + i * STRIDE * PAGE) as *mut u8;
    // SAFETY (every access): inside the region; ranks take turns between barriers.
    let fill = |v: u8| (0..total).for_each(|i| unsafe { at(i).write_volatile(v) });
    let check = |v: u8| -> Result<(), String> {
        for i in 0..total {
            // SAFETY: as above.
            let got = unsafe { at(i).read_volatile() };
            if got != v {
                return Err(format!("page {}: {got}, expected {v}", i * STRIDE));
            }
        }
        Ok(())
    };
    if rank == 0 {
        fill(1);
    }
    bar()?;
    if rank == 1 {
        check(1)?;
    }
    bar()?;
    if rank == 0 {
        fill(2);
    }
    bar()?;
    if rank == 2 {
        check(2)?;
    }
    bar()?;
    if rank == 1 {
        let before = d.stats().1;
        let t = Instant::now();
        let readers: Vec<_> = (0..APP_THREADS)
            .map(|k| {
                std::thread::spawn(move || {
                    for i in k * n..(k + 1) * n {
                        // SAFETY: as above; nobody writes in this phase.
                        let got = unsafe { at(i).read_volatile() };
                        if got != 2 {
                            return Err(format!("reader {k}: page {}: {got} != 2", i * STRIDE));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for r in readers {
            r.join()
                .map_err(|_| "a reader thread panicked".to_string())??;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "dsm-result fault_threads_{threads}_per_s={}",
            total as f64 / secs
        );
        println!(
            "dsm-result fault_threads_{threads}_one_sided={}",
            d.stats().1 - before
        );
        println!(
            "dsm-result fault_threads_{threads}_max_concurrent={}",
            d.max_concurrent_remote_faults()
        );
    }
    bar()?;
    d.free(region).map_err(err)?;
    bar()
}

/// One run: four workers, then the two fault-thread runs; their results merged.
fn one_run(provider: &str, pages: usize, two: bool) -> Result<BTreeMap<String, f64>, String> {
    let mut results = workers(provider, pages, RANKS, None, two)?;
    for threads in [1, 4] {
        results.extend(workers(provider, pages, THREAD_RANKS, Some(threads), two)?);
    }
    for (k, _) in MEASURES {
        if !results.contains_key(k) {
            return Err(format!("no {k} in the workers' output"));
        }
    }
    Ok(results)
}

/// `ranks` workers (a fault-thread run's when `threads` is set); their results merged.
fn workers(
    provider: &str,
    pages: usize,
    ranks: usize,
    threads: Option<usize>,
    two_round_trips: bool,
) -> Result<BTreeMap<String, f64>, String> {
    let exe = std::env::current_exe().map_err(err)?;
    let server =
        BootstrapServer::start_with(("127.0.0.1", 0), ranks, TIMEOUT, None).map_err(err)?;
    let mut children = Vec::new();
    for rank in 0..ranks {
        let mut cmd = Command::new(&exe);
        cmd.args(["dsm", "--worker", "--provider", provider]);
        if let Some(t) = threads {
            cmd.args(["--fault-threads", &t.to_string()]);
        }
        if two_round_trips {
            cmd.arg("--two-round-trips");
        }
        let child = cmd
            .args(["--rank", &rank.to_string(), "--pages", &pages.to_string()])
            .args(["--bootstrap", &server.addr().to_string()])
            .env_remove("KRUN_RANK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting DSM worker {rank}: {e}"));
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
    let mut results = BTreeMap::new();
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
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            if let Some((k, v)) = line
                .strip_prefix("dsm-result ")
                .and_then(|kv| kv.split_once('='))
            {
                let v: f64 = v
                    .parse()
                    .map_err(|_| format!("worker {rank}: bad value in {line:?}"))?;
                results.insert(k.to_string(), v);
            }
        }
    }
    let _ = server.join();
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    Ok(results)
}

/// Per provider, the samples of each measure and the median ratio (`None`: skipped).
type PerProvider = Option<(BTreeMap<String, Vec<f64>>, Option<f64>)>;

/// The plot: per provider, the fault latencies beside their same-run reference (RMA 4 KiB
/// read + local userfaultfd fault, summed per run), and the scan bandwidth.
fn figure(providers: &[String], per_provider: &[PerProvider], runs: usize) -> Figure {
    let mut faults = Vec::new();
    let mut scan = Vec::new();
    let mut threads = Vec::new();
    for (p, data) in providers.iter().zip(per_provider) {
        let Some((samples, _)) = data else { continue };
        let bar =
            |key: &str, series: &str| samples.get(key).and_then(|v| Bar::from_values(series, v));
        let reference: Vec<f64> = samples
            .get("rma_read_4k_us")
            .into_iter()
            .flatten()
            .zip(samples.get("local_uffd_fault_us").into_iter().flatten())
            .map(|(rma, local)| rma + local)
            .collect();
        faults.push(Group::new(
            p.clone(),
            [
                bar("read_fault_one_sided_us", "read fault, hinted (one-sided)"),
                Bar::from_values("RMA 4 KiB read + local fault (same run)", &reference),
                bar("read_fault_message_us", "read fault, no hint (messages)"),
                bar("write_fault_0_sharers_us", "write fault, 0 sharers"),
                bar("write_upgrade_1_sharer_us", "write upgrade, 1 sharer"),
                bar("write_upgrade_2_sharers_us", "write upgrade, 2 sharers"),
                bar("write_upgrade_3_sharers_us", "write upgrade, 3 sharers"),
            ],
        ));
        scan.push(Group::new(
            p.clone(),
            [bar("scan_prefetch_mb_s", "scan with prefetch")],
        ));
        threads.push(Group::new(
            p.clone(),
            [
                bar("fault_threads_1_per_s", "1 fault thread"),
                bar("fault_threads_4_per_s", "4 fault threads"),
            ],
        ));
    }
    Figure {
        title: "bench dsm: page faults against the RMA read + local fault they are built from"
            .into(),
        note: format!(
            "median of {runs} runs, whiskers min/max; targets: hinted read <= 1.5x reference, 4 fault threads >= 3x one"
        ),
        panels: vec![
            Panel::new("fault latency p50 (lower is better)", "us", faults),
            Panel::new(
                "sequential scan with prefetch (higher is better)",
                "MB/s",
                scan,
            ),
            Panel::new(
                "4 reader threads' hinted faults (higher is better)",
                "faults/s",
                threads,
            ),
        ],
    }
}

pub fn run(args: DsmArgs) -> Result<(), String> {
    if args.worker {
        return worker(&args);
    }
    let runs = args.runs;
    if runs < 3 {
        return Err("--runs must be at least 3 (median, min and max are reported)".into());
    }
    let pages = args.pages;
    if pages == 0 {
        return Err("--pages must be at least 1".into());
    }
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| report::results_path("dsm"));
    let providers: Vec<String> = args
        .providers
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for p in &providers {
        provider_of(p)?;
    }
    let load_start = loadavg();
    let mut headers = vec!["measure"];
    headers.extend(providers.iter().map(String::as_str));
    let mut table = Table::new(&headers);
    let mut per_provider = Vec::new();
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for p in &providers {
        let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut failed = None;
        for r in crate::runs::bar(&format!("dsm: {p}"), 0..runs) {
            match one_run(p, pages, args.two_round_trips) {
                Ok(res) => {
                    for (k, v) in res {
                        samples.entry(k).or_default().push(v);
                    }
                }
                Err(e) => {
                    failed = Some(format!("run {r}: {e}"));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            eprintln!("bench dsm: {p}: skipped: {e}");
            skipped.push(json!({"provider": p, "error": e}));
            per_provider.push(None);
            continue;
        }
        // Per run: the hinted read fault over that run's own references.
        let ratios: Vec<f64> = samples
            .get("read_fault_one_sided_us")
            .into_iter()
            .flatten()
            .zip(samples.get("rma_read_4k_us").into_iter().flatten())
            .zip(samples.get("local_uffd_fault_us").into_iter().flatten())
            .map(|((f, rma), local)| f / (rma + local))
            .collect();
        let ratio = report::median(&ratios);
        let mut row = serde_json::Map::new();
        row.insert("provider".into(), json!(p));
        for (k, _) in MEASURES.iter().chain(&[
            ("one_sided_reads", ""),
            ("hinted_speculative", ""),
            ("hinted_fallbacks", ""),
        ]) {
            if let Some(v) = samples.get(*k) {
                row.insert((*k).into(), report::spread(v));
            }
        }
        // Where a hinted fault's time goes (means per run; see the worker).
        let mut steps = Vec::new();
        for name in dsm::fault::STEPS.iter().chain(&["rest"]) {
            let k = format!("hinted_step_{name}_us");
            if let Some(v) = samples.get(&k) {
                row.insert(k, report::spread(v));
                steps.push(format!(
                    "{name} {:.1}",
                    report::median(v).unwrap_or(f64::NAN)
                ));
            }
        }
        if let Some(m) = samples
            .get("read_fault_one_sided_mean_us")
            .and_then(|v| report::median(v))
        {
            eprintln!(
                "bench dsm: {p}: hinted read fault, mean {m:.1} us: {} us (medians of the \
                 runs' means; answer includes copy)",
                steps.join(", ")
            );
        }
        row.insert("read_fault_vs_reference".into(), report::spread(&ratios));
        row.insert("target_met".into(), json!(ratio.map(|r| r <= 1.5)));
        // Write upgrades, whatever the number of sharers: <= a hinted read fault + 2 round
        // trips (a round trip: the fetch-and-add's latency), medians of the runs.
        let med = |k: &str| samples.get(k).and_then(|v| report::median(v));
        let bound = med("read_fault_one_sided_us")
            .zip(med("fetch_add_us"))
            .map(|(r, rtt)| r + 2.0 * rtt);
        let upgrades = [
            "write_fault_0_sharers_us",
            "write_upgrade_1_sharer_us",
            "write_upgrade_2_sharers_us",
            "write_upgrade_3_sharers_us",
        ];
        row.insert("write_upgrade_bound_us".into(), json!(bound));
        row.insert(
            "write_upgrade_target_met".into(),
            json!(bound.map(|b| upgrades.iter().all(|k| med(k).is_some_and(|v| v <= b)))),
        );
        // Fault threads: per run, 4 threads' faults/s over 1 thread's.
        let speedups: Vec<f64> = samples
            .get("fault_threads_4_per_s")
            .into_iter()
            .flatten()
            .zip(samples.get("fault_threads_1_per_s").into_iter().flatten())
            .map(|(four, one)| four / one)
            .collect();
        for k in [
            "fault_threads_1_max_concurrent",
            "fault_threads_4_max_concurrent",
            "fault_threads_1_one_sided",
            "fault_threads_4_one_sided",
        ] {
            if let Some(v) = samples.get(k) {
                row.insert(k.into(), report::spread(v));
            }
        }
        row.insert("fault_threads_speedup".into(), report::spread(&speedups));
        row.insert(
            "fault_threads_target_met".into(),
            json!(report::median(&speedups).map(|r| r >= 3.0)),
        );
        rows.push(serde_json::Value::Object(row));
        per_provider.push(Some((samples, ratio)));
    }
    for (k, label) in MEASURES {
        let mut cells = vec![label.to_string()];
        for p in &per_provider {
            let v = p
                .as_ref()
                .and_then(|(s, _)| s.get(k).and_then(|v| report::median(v)));
            cells.push(cell(v, 1));
        }
        table.row(cells);
    }
    let mut cells = vec!["4 fault threads / 1 (medians)".to_string()];
    for p in &per_provider {
        let v = p.as_ref().and_then(|(s, _)| {
            let med = |k: &str| s.get(k).and_then(|v| report::median(v));
            med("fault_threads_4_per_s")
                .zip(med("fault_threads_1_per_s"))
                .map(|(a, b)| a / b)
        });
        cells.push(cell(v, 2));
    }
    table.row(cells);
    let mut cells = vec!["hinted read / (RMA read + local fault)".to_string()];
    for p in &per_provider {
        cells.push(cell(p.as_ref().and_then(|(_, r)| *r), 2));
    }
    table.row(cells);
    print!("{}", table.render());
    let value = json!({
        "runs": runs,
        "pages": pages,
        "settings": {"ranks": RANKS, "fault_threads": 2, "prefetch": 8, "locator": "page % 4", "one_sided": true, "join_and_read": if args.two_round_trips { "two round trips" } else { "posted together (generation check)" },
                     "fault_thread_runs": {"ranks": THREAD_RANKS, "reader_threads": APP_THREADS, "prefetch": 0, "pages": pages * APP_THREADS}},
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
        "loadavg": {"start": load_start, "end": loadavg()},
        "target": {"read_fault_vs_reference_max": 1.5, "write_upgrade_max": "read_fault_one_sided_us + 2 x fetch_add_us, 0 to 3 sharers", "fault_threads_speedup_min": 3.0},
        "rows": rows,
        "skipped": skipped,
    });
    report::write_results(&out_path, value, &figure(&providers, &per_provider, runs))?;
    println!("wrote {} and its .png", out_path.display());
    if rows.is_empty() {
        return Err("every provider failed (see skipped)".into());
    }
    Ok(())
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), if readable.
fn loadavg() -> Option<Vec<f64>> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace()
        .take(3)
        .map(|v| v.parse().ok())
        .collect()
}
