//! `bench fabric`: one-sided RMA latency and bandwidth per provider, with the target endpoint
//! in a separate process (this binary re-executed as the hidden `fabric-target` subcommand),
//! against references measured in the same run: loopback iperf3, memcpy, and libfabric itself
//! through a plain C client (`bench/csrc/fi_reference.c`, compiled by this command against
//! the libfabric krun loads; fabtests are not packaged in Debian).
//!
//! Writes `bench/results/fabric.json`:
//! `{"environment":{..},"rounds":N,"runs":[{"backend","provider","op","size","lat_p50_us",
//!   "lat_p99_us","bw_gbs","spread":{"median","min","max","runs"}}...],
//!   "reference":{"iperf3_gbs","memcpy_gbs","fabtests":[{"provider","op","size","lat_p50_us",
//!   "bw_gbs"}...]}}`. Each value is the median of `rounds` rounds. Latency rows have sizes
//! 8 B and 4 KiB and a null `bw_gbs`; bandwidth rows have null latencies.
use std::collections::VecDeque;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fabric::bootstrap::{BootstrapClient, BootstrapServer};
use fabric::{
    open, Endpoint, EndpointAddress, FabricConfig, MemoryRegion, PeerId, Provider, Region,
    RemoteRegion,
};
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{self, cell, gbs, json_num, quantile, size_name, Table};

/// Sizes of the bandwidth rows.
pub const SIZES: [usize; 4] = [4 << 10, 64 << 10, 1 << 20, 16 << 20];
/// Local and remote buffer size: room for several 16 MiB operations in flight.
const BUFFER: usize = 64 << 20;
/// Size of the latency operations.
const LAT_SIZE: usize = 8;
/// Sizes of the latency rows.
const LAT_SIZES: [usize; 2] = [LAT_SIZE, 4 << 10];
/// The reference client's source, compiled at run time against krun's libfabric.
const REFERENCE_C: &str = include_str!("../csrc/fi_reference.c");
/// Setup (spawn, bootstrap, connect) must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// One-sided RMA latency and bandwidth per provider (tcp, shm, verbs),
/// against loopback iperf3 and memcpy; writes bench/results/fabric.json.
#[derive(Debug, clap::Args)]
pub struct FabricArgs {
    /// Providers to measure, comma-separated (tcp, shm, verbs, verbs-ofi).
    #[arg(long, default_value = "tcp,shm,verbs")]
    pub providers: String,
    /// Operations per latency measurement (default 10000; 2000 with --quick).
    #[arg(long, value_name = "N")]
    pub lat_ops: Option<usize>,
    /// Seconds per bandwidth measurement (default 1; 0.3 with --quick).
    #[arg(long, value_name = "S")]
    pub bw_secs: Option<f64>,
    /// Seconds of each iperf3 reference (default 3; 1 with --quick).
    #[arg(long, value_name = "S")]
    pub iperf_secs: Option<u32>,
    /// Rounds (1 to 20).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Shorter measurements (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Where to write the JSON (default bench/results/fabric.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// The hidden `fabric-target`: the target process `bench fabric` re-executes itself as.
#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    #[arg(long)]
    pub provider: String,
    /// The bootstrap server, HOST:PORT.
    #[arg(long)]
    pub bootstrap: SocketAddr,
    /// Bytes of the registered region.
    #[arg(long, default_value_t = BUFFER)]
    pub region: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
        }
    }
}

/// One measured row.
#[derive(Debug, Clone)]
struct Row {
    backend: &'static str,
    provider: &'static str,
    op: Op,
    size: usize,
    lat_p50_us: Option<f64>,
    lat_p99_us: Option<f64>,
    bw_gbs: Option<f64>,
}

/// A transport to measure: how it is reported and how it is opened.
struct Target {
    /// Name in "<label>: skipped" lines.
    label: &'static str,
    backend: &'static str,
    provider_field: &'static str,
    provider: Provider,
}

const TARGETS: [Target; 4] = [
    Target {
        label: "tcp",
        backend: "libfabric",
        provider_field: "tcp",
        provider: Provider::Tcp,
    },
    Target {
        label: "shm",
        backend: "libfabric",
        provider_field: "shm",
        provider: Provider::Shm,
    },
    Target {
        label: "verbs-ofi",
        backend: "libfabric",
        provider_field: "verbs",
        provider: Provider::VerbsOfi,
    },
    Target {
        label: "verbs",
        backend: "verbs",
        provider_field: "verbs",
        provider: Provider::Verbs,
    },
];

struct Settings {
    providers: Vec<String>,
    lat_ops: usize,
    bw_time: Duration,
    iperf_secs: u32,
    rounds: usize,
    out: PathBuf,
}

impl Settings {
    fn from_args(args: FabricArgs) -> Result<Settings, String> {
        let quick = args.quick;
        let providers = args
            .providers
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>();
        for p in &providers {
            if !["tcp", "shm", "verbs", "verbs-ofi"].contains(&p.as_str()) {
                return Err(format!(
                    "unknown provider {p:?} in --providers (tcp, shm, verbs)"
                ));
            }
        }
        let bw_secs: f64 = args.bw_secs.unwrap_or(if quick { 0.3 } else { 1.0 });
        if !(bw_secs > 0.0 && bw_secs < 600.0) {
            return Err("--bw-secs must be in (0, 600)".into());
        }
        Ok(Settings {
            providers,
            lat_ops: args
                .lat_ops
                .unwrap_or(if quick { 2_000 } else { 10_000 })
                .max(1),
            bw_time: Duration::from_secs_f64(bw_secs),
            iperf_secs: args.iperf_secs.unwrap_or(if quick { 1 } else { 3 }).max(1),
            rounds: args.rounds.clamp(1, 20),
            out: args.out.unwrap_or_else(|| report::results_path("fabric")),
        })
    }

    fn wants(&self, t: &Target) -> bool {
        // "verbs" covers both the verbs backend and libfabric's verbs provider.
        self.providers
            .iter()
            .any(|p| p == t.label || (p == "verbs" && t.label == "verbs-ofi"))
    }
}

/// `bench fabric`.
pub fn run(args: FabricArgs) -> Result<(), String> {
    let settings = Settings::from_args(args)?;
    println!("bench fabric: target endpoint in a separate process; GB/s = 1e9 bytes/s");

    // References first, while nothing else runs.
    let iperf = match iperf3(settings.iperf_secs) {
        Ok(v) => {
            println!("reference: iperf3 loopback, 1 stream, 1 MiB writes: {v:.2} GB/s");
            Some(v)
        }
        Err(e) => {
            println!("reference: iperf3 failed: {e}");
            None
        }
    };
    let memcpy = memcpy_gbs(Duration::from_millis(
        if settings.bw_time < Duration::from_secs(1) {
            300
        } else {
            1000
        },
    ));
    println!("reference: memcpy 1 MiB, one thread, buffers reused: {memcpy:.2} GB/s");

    let reference_bin = build_reference();
    let mut rounds: Vec<Vec<Row>> = Vec::new();
    let mut fab_rounds: Vec<Vec<FabRow>> = Vec::new();
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    for round in 0..settings.rounds {
        println!("round {}/{}", round + 1, settings.rounds);
        let mut rows = Vec::new();
        for t in TARGETS.iter().filter(|t| settings.wants(t)) {
            let ep = match open(&FabricConfig::with_provider(t.provider)) {
                Ok(ep) => ep,
                Err(e) => {
                    println!("{}: skipped: {e}", t.label);
                    if round == 0 {
                        skipped.push(json!({"provider": t.label, "reason": e.to_string()}));
                    }
                    continue;
                }
            };
            println!("{}: measuring ({} backend)...", t.label, t.backend);
            if let Err(e) = measure_provider(t, ep.as_ref(), &settings, &mut rows) {
                println!("{}: FAILED: {e}", t.label);
                failures.push(format!("{}: {e}", t.label));
            }
        }
        rounds.push(rows);
        let mut fab = Vec::new();
        match &reference_bin {
            Ok(bin) => {
                for (label, prov) in [("shm", "shm"), ("tcp", "tcp;ofi_rxm")] {
                    if !settings.providers.iter().any(|p| p == label) {
                        continue;
                    }
                    match run_reference(bin, prov, &settings) {
                        Ok(mut r) => {
                            for f in &r {
                                println!(
                                    "  reference {:<3} {:<5} {:>7}  p50 {:>7} us  {:>7} GB/s",
                                    f.provider,
                                    f.op,
                                    size_name(f.size),
                                    cell(f.lat_p50_us, 2),
                                    cell(f.bw_gbs, 2)
                                );
                            }
                            fab.append(&mut r);
                        }
                        Err(e) => println!("reference {label}: failed: {e}"),
                    }
                }
            }
            Err(e) if round == 0 => println!("reference: libfabric client not built: {e}"),
            Err(_) => {}
        }
        fab_rounds.push(fab);
    }
    let rows = merge_rounds(&rounds);
    let fabtests = merge_fab_rounds(&fab_rounds);

    let mut table = Table::new(&[
        "backend", "provider", "op", "size", "p50 us", "p99 us", "GB/s",
    ]);
    for (r, _) in &rows {
        table.row(vec![
            r.backend.to_string(),
            r.provider.to_string(),
            r.op.name().to_string(),
            size_name(r.size),
            cell(r.lat_p50_us, 2),
            cell(r.lat_p99_us, 2),
            cell(r.bw_gbs, 2),
        ]);
    }
    println!();
    println!("median of {} rounds:", settings.rounds);
    print!("{}", table.render());
    println!(
        "reference: iperf3 {} GB/s, memcpy {} GB/s",
        cell(iperf, 2),
        cell(Some(memcpy), 2)
    );
    for f in &fabtests {
        println!(
            "reference libfabric client: {:<3} {:<5} {:>7}  p50 {:>7} us  {:>7} GB/s",
            f.provider,
            f.op,
            size_name(f.size),
            cell(f.lat_p50_us, 2),
            cell(f.bw_gbs, 2)
        );
    }
    println!();
    let plain: Vec<Row> = rows.iter().map(|(r, _)| r.clone()).collect();
    print_targets(&plain, &fabtests, iperf, memcpy);

    let figure = figure(&rows, &fabtests, iperf, memcpy, settings.rounds);
    let json = json!({
        "rounds": settings.rounds,
        "skipped": skipped,
        "runs": rows.iter().map(|(r, values)| json!({
            "backend": r.backend,
            "provider": r.provider,
            "op": r.op.name(),
            "size": r.size,
            "lat_p50_us": json_num(r.lat_p50_us),
            "lat_p99_us": json_num(r.lat_p99_us),
            "bw_gbs": json_num(r.bw_gbs),
            "spread": report::spread(values),
        })).collect::<Vec<_>>(),
        "reference": {
            "iperf3_gbs": json_num(iperf),
            "memcpy_gbs": json_num(Some(memcpy)),
            "fabtests_source": "bench/csrc/fi_reference.c (plain C libfabric client, same hints and flags as krun)",
            "fabtests": fabtests.iter().map(|f| json!({
                "provider": f.provider,
                "op": f.op,
                "size": f.size,
                "lat_p50_us": json_num(f.lat_p50_us),
                "bw_gbs": json_num(f.bw_gbs),
                "spread": report::spread(&f.values),
            })).collect::<Vec<_>>(),
        },
    });
    report::write_results(&settings.out, json, &figure)?;
    println!(
        "wrote {} and {}",
        settings.out.display(),
        settings.out.with_extension("png").display()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("some providers failed: {}", failures.join("; ")))
    }
}

/// The plot: latency of small operations and bandwidth of large ones, krun beside the plain C
/// libfabric client of the same run, per provider.
fn figure(
    rows: &[(Row, Vec<f64>)],
    fab: &[FabRow],
    iperf: Option<f64>,
    memcpy: f64,
    rounds: usize,
) -> Figure {
    let label = |r: &Row| {
        let backend = if r.backend == "libfabric" {
            ""
        } else {
            " (verbs)"
        };
        format!(
            "{}{backend} {}\n{}",
            r.provider,
            r.op.name(),
            size_name(r.size)
        )
    };
    let reference = |r: &Row| {
        (r.backend == "libfabric")
            .then(|| find_ref(fab, r.provider, r.op, r.size))
            .flatten()
    };
    let mut lat = Vec::new();
    let mut bw = Vec::new();
    for (r, values) in rows {
        if r.lat_p50_us.is_some() && r.size <= 4096 {
            let f = reference(r).filter(|f| f.lat_p50_us.is_some());
            lat.push(Group::new(
                label(r),
                [
                    Bar::from_values("krun", values),
                    f.and_then(|f| Bar::from_values("C libfabric client", &f.values)),
                ],
            ));
        }
        if r.bw_gbs.is_some() && r.size >= 64 << 10 {
            let f = reference(r).filter(|f| f.bw_gbs.is_some());
            let krun = if r.lat_p50_us.is_none() {
                Bar::from_values("krun", values)
            } else {
                Bar::single("krun", r.bw_gbs)
            };
            let fab = f.and_then(|f| {
                if f.lat_p50_us.is_none() {
                    Bar::from_values("C libfabric client", &f.values)
                } else {
                    Bar::single("C libfabric client", f.bw_gbs)
                }
            });
            bw.push(Group::new(label(r), [krun, fab]));
        }
    }
    bw.push(Group::new(
        "loopback\nreferences",
        [
            Bar::single("iperf3 -l 1M", iperf),
            Bar::single("memcpy 1 MiB", Some(memcpy)),
        ],
    ));
    Figure {
        title: "bench fabric: one-sided RMA, krun against the C libfabric client (same run)".into(),
        note: format!("median of {rounds} rounds, whiskers min/max"),
        panels: vec![
            Panel::new("latency p50 (lower is better)", "us", lat),
            Panel::new("bandwidth (higher is better)", "GB/s", bw),
        ],
    }
}

/// One row of the libfabric reference client.
#[derive(Debug, Clone)]
struct FabRow {
    provider: String,
    op: String,
    size: usize,
    lat_p50_us: Option<f64>,
    bw_gbs: Option<f64>,
    /// The per-round values behind the median (latency or bandwidth).
    values: Vec<f64>,
}

/// Median per row over rounds (rows keyed by backend, provider, op and size), with the
/// per-round values of its headline number (latency p50, else bandwidth).
fn merge_rounds(rounds: &[Vec<Row>]) -> Vec<(Row, Vec<f64>)> {
    type Cols = Vec<[Option<f64>; 3]>;
    let mut out: Vec<(Row, Cols)> = Vec::new();
    for r in rounds.iter().flatten() {
        // A 4 KiB latency row and a 4 KiB bandwidth row are different rows.
        let key = |x: &Row| (x.backend, x.provider, x.op, x.size, x.lat_p50_us.is_some());
        let vals = [r.lat_p50_us, r.lat_p99_us, r.bw_gbs];
        match out.iter_mut().find(|(x, _)| key(x) == key(r)) {
            Some((_, v)) => v.push(vals),
            None => out.push((r.clone(), vec![vals])),
        }
    }
    out.into_iter()
        .map(|(mut row, all)| {
            let col = |i: usize| -> Vec<f64> { all.iter().filter_map(|v| v[i]).collect() };
            row.lat_p50_us = report::median(&col(0));
            row.lat_p99_us = report::median(&col(1));
            row.bw_gbs = report::median(&col(2));
            let values = if row.lat_p50_us.is_some() {
                col(0)
            } else {
                col(2)
            };
            (row, values)
        })
        .collect()
}

fn merge_fab_rounds(rounds: &[Vec<FabRow>]) -> Vec<FabRow> {
    let mut out: Vec<FabRow> = Vec::new();
    for f in rounds.iter().flatten() {
        let v = f.lat_p50_us.or(f.bw_gbs).unwrap_or(f64::NAN);
        match out
            .iter_mut()
            .find(|x| x.provider == f.provider && x.op == f.op && x.size == f.size)
        {
            Some(x) => x.values.push(v),
            None => out.push(FabRow {
                values: vec![v],
                ..f.clone()
            }),
        }
    }
    for f in &mut out {
        let m = report::median(&f.values);
        if f.lat_p50_us.is_some() {
            f.lat_p50_us = m;
        } else {
            f.bw_gbs = m;
        }
    }
    out
}

/// Compiles `fi_reference.c` against the libfabric krun loads (the headers beside it, or the
/// system's) into a private temporary directory.
fn build_reference() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("krun-bench-fi-reference-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let src = dir.join("fi_reference.c");
    let bin = dir.join("fi_reference");
    std::fs::write(&src, REFERENCE_C).map_err(|e| format!("writing {}: {e}", src.display()))?;
    let mut cc = Command::new("cc");
    cc.arg("-O2").arg("-o").arg(&bin).arg(&src);
    let lib = std::path::Path::new(libfabric_sys::LIBRARY);
    if let Some(prefix) = lib
        .is_absolute()
        .then(|| lib.parent().and_then(|d| d.parent()))
        .flatten()
    {
        cc.arg(format!("-I{}", prefix.join("include").display()))
            .arg(format!("-L{}", prefix.join("lib").display()))
            .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()));
    }
    cc.arg("-lfabric");
    let out = cc.output();
    let _ = std::fs::remove_file(&src);
    let out = out.map_err(|e| format!("running cc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cc failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(400)
                .collect::<String>()
        ));
    }
    Ok(bin)
}

/// Runs the reference client for one provider and parses its JSON lines.
fn run_reference(
    bin: &std::path::Path,
    prov: &str,
    settings: &Settings,
) -> Result<Vec<FabRow>, String> {
    let secs = settings.bw_time.as_secs_f64().to_string();
    let ops = settings.lat_ops.max(10).to_string();
    let (status, out) = run_bounded(
        Command::new(bin).args([prov, ops.as_str(), secs.as_str()]),
        Duration::from_secs(120),
    )?;
    if !status.success() {
        return Err(format!("{} {prov} exited with {status}", bin.display()));
    }
    parse_reference(&out)
}

fn parse_reference(out: &str) -> Result<Vec<FabRow>, String> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).map_err(|e| format!("bad reference line {l:?}: {e}"))?;
            let text = |k: &str| {
                v[k].as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("reference line {l:?} has no {k}"))
            };
            Ok(FabRow {
                provider: text("provider")?,
                op: text("op")?,
                size: v["size"]
                    .as_u64()
                    .ok_or_else(|| format!("reference line {l:?} has no size"))?
                    as usize,
                lat_p50_us: v["lat_p50_us"].as_f64(),
                bw_gbs: v["bw_gbs"].as_f64(),
                values: Vec::new(),
            })
        })
        .collect()
}

fn find<'a>(rows: &'a [Row], provider: &str, op: Op, size: usize) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.backend == "libfabric" && r.provider == provider && r.op == op && r.size == size
    })
}

fn find_ref<'a>(fab: &'a [FabRow], provider: &str, op: Op, size: usize) -> Option<&'a FabRow> {
    fab.iter()
        .find(|f| f.provider == provider && f.op == op.name() && f.size == size)
}

/// Prints each target with the measured ratio. Numbers never fail the benchmark.
fn print_targets(rows: &[Row], fab: &[FabRow], iperf: Option<f64>, memcpy: f64) {
    println!("targets (krun against the libfabric reference client, same run):");
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    for provider in ["shm", "tcp"] {
        for (op, size) in [(Op::Read, 8), (Op::Write, 8), (Op::Read, 4096)] {
            let k = find(rows, provider, op, size).and_then(|r| r.lat_p50_us);
            let f = find_ref(fab, provider, op, size).and_then(|r| r.lat_p50_us);
            match (k, f) {
                (Some(k), Some(f)) if f > 0.0 => println!(
                    "  {provider} {:<5} {:>5} p50: {k:.2} / {f:.2} us = {:.2}x (target <= 1.5x): {}",
                    op.name(),
                    size_name(size),
                    k / f,
                    verdict(k / f <= 1.5)
                ),
                _ => println!(
                    "  {provider} {} {} p50: not measured",
                    op.name(),
                    size_name(size)
                ),
            }
        }
        let k = find(rows, provider, Op::Write, 1 << 20).and_then(|r| r.bw_gbs);
        let f = find_ref(fab, provider, Op::Write, 1 << 20).and_then(|r| r.bw_gbs);
        match (k, f) {
            (Some(k), Some(f)) if f > 0.0 => println!(
                "  {provider} write 1 MiB: {k:.2} / {f:.2} GB/s = {:.2}x (target >= 0.8x): {}",
                k / f,
                verdict(k / f >= 0.8)
            ),
            _ => println!("  {provider} write 1 MiB: not measured"),
        }
    }
    match (
        find(rows, "tcp", Op::Write, 1 << 20).and_then(|r| r.bw_gbs),
        iperf,
    ) {
        (Some(bw), Some(ip)) if ip > 0.0 => println!(
            "  tcp write 1 MiB / iperf3: {bw:.2} / {ip:.2} GB/s = {:.2}x (target >= 0.9x): {}",
            bw / ip,
            verdict(bw / ip >= 0.9)
        ),
        _ => println!("  tcp write 1 MiB / iperf3: not measured"),
    }
    if let Some(bw) = find(rows, "shm", Op::Write, 1 << 20).and_then(|r| r.bw_gbs) {
        println!(
            "  shm write 1 MiB / memcpy: {bw:.2} / {memcpy:.2} GB/s = {:.2}x",
            bw / memcpy
        );
    }
}

/// Kills (by PID) and reaps a child process when dropped, however the benchmark ends.
struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the PID of our own child, which is not reaped yet (try_wait above
        // returned None), so the PID cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if let Err(e) = self.child.wait() {
            eprintln!("bench: reaping {} (pid {pid}): {e}", self.what);
        }
    }
}

/// Spawns the target process, swaps addresses and measures every row for one provider.
fn measure_provider(
    t: &Target,
    ep: &dyn Endpoint,
    settings: &Settings,
    rows: &mut Vec<Row>,
) -> Result<(), String> {
    let server =
        BootstrapServer::start("127.0.0.1:0", 2, SETUP_TIMEOUT).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("locating the bench binary: {e}"))?;
    let child = Command::new(exe)
        .args([
            "fabric-target",
            "--provider",
            t.provider.name(),
            "--bootstrap",
            &server.addr().to_string(),
            "--region",
            &BUFFER.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawning the fabric-target process: {e}"))?;
    let mut guard = ChildGuard {
        child,
        what: format!("fabric-target {}", t.label),
    };
    println!("{}: target process pid {}", t.label, guard.pid());

    let (peer, remote) = {
        let mut client = BootstrapClient::connect(server.addr(), 0, 2, SETUP_TIMEOUT)
            .map_err(|e| format!("bootstrap: {e}"))?;
        let all = client
            .allgather(&ep.address().to_bytes())
            .map_err(|e| format!("bootstrap all-gather (did the target process start?): {e}"))?;
        let (addr, remote) = decode_target_blob(&all[1])?;
        let peer = ep
            .connect(&addr)
            .map_err(|e| format!("connecting to the target: {e}"))?;
        client
            .barrier()
            .map_err(|e| format!("bootstrap barrier: {e}"))?;
        (peer, remote)
        // The client is dropped here: the bootstrap service ends.
    };
    let local = ep
        .register(Region::new(BUFFER).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    // Touch every page once: first-touch costs would otherwise land in the first measurement.
    local.fill(0, BUFFER, 0xa5).map_err(|e| e.to_string())?;

    let ctx = Ctx {
        ep,
        peer,
        local: &local,
        remote,
    };
    let mut push = |op: Op, size: usize, lat: Option<(f64, f64)>, bw: Option<f64>| {
        let r = Row {
            backend: t.backend,
            provider: t.provider_field,
            op,
            size,
            lat_p50_us: lat.map(|l| l.0),
            lat_p99_us: lat.map(|l| l.1),
            bw_gbs: bw,
        };
        println!(
            "  {:<5} {:>7}  p50 {:>7} us  p99 {:>7} us  {:>7} GB/s",
            r.op.name(),
            size_name(size),
            cell(r.lat_p50_us, 2),
            cell(r.lat_p99_us, 2),
            cell(r.bw_gbs, 2)
        );
        rows.push(r);
    };
    for size in LAT_SIZES {
        for op in [Op::Write, Op::Read] {
            let (p50, p99) = ctx.latency(op, size, settings.lat_ops)?;
            push(op, size, Some((p50, p99)), None);
        }
    }
    for op in [Op::Write, Op::Read] {
        for &size in &SIZES {
            let bw = ctx.bandwidth(op, size, settings.bw_time)?;
            push(op, size, None, Some(bw));
        }
    }
    drop(guard.child.stdin.take());
    drop(guard);
    if let Err(e) = server.join() {
        eprintln!("{}: bootstrap service: {e}", t.label);
    }
    Ok(())
}

fn encode_target_blob(addr: &EndpointAddress, remote: &RemoteRegion) -> Vec<u8> {
    let a = addr.to_bytes();
    let mut out = Vec::with_capacity(4 + a.len() + RemoteRegion::ENCODED_LEN);
    out.extend_from_slice(&(a.len() as u32).to_le_bytes());
    out.extend_from_slice(&a);
    out.extend_from_slice(&remote.to_bytes());
    out
}

pub(crate) fn decode_target_blob(blob: &[u8]) -> Result<(EndpointAddress, RemoteRegion), String> {
    let bad = || format!("malformed target blob ({} bytes)", blob.len());
    let n = u32::from_le_bytes(
        blob.get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let addr = blob.get(4..4 + n).ok_or_else(bad)?;
    let remote = blob.get(4 + n..).ok_or_else(bad)?;
    Ok((
        EndpointAddress::from_bytes(addr).map_err(|e| e.to_string())?,
        RemoteRegion::from_bytes(remote).map_err(|e| e.to_string())?,
    ))
}

struct Ctx<'a> {
    ep: &'a dyn Endpoint,
    peer: PeerId,
    local: &'a MemoryRegion,
    remote: RemoteRegion,
}

impl Ctx<'_> {
    fn post(&self, op: Op, offset: usize, size: usize) -> Result<fabric::Completion, String> {
        // SAFETY: the benchmark owns both buffers; operations in flight at once use distinct
        // local ranges (slot rotation), and nothing reads the data.
        let r = unsafe {
            match op {
                Op::Write => self.ep.post_write(
                    self.peer,
                    self.local,
                    offset,
                    size,
                    &self.remote,
                    offset as u64,
                ),
                Op::Read => self.ep.post_read(
                    self.peer,
                    self.local,
                    offset,
                    size,
                    &self.remote,
                    offset as u64,
                ),
            }
        };
        r.map_err(|e| format!("posting {} of {size} bytes: {e}", op.name()))
    }

    /// One operation in flight at a time: (p50, p99) in microseconds.
    fn latency(&self, op: Op, size: usize, ops: usize) -> Result<(f64, f64), String> {
        let limit = Duration::from_secs(20);
        let warm = Instant::now();
        for i in 0..1000 {
            if i > 10 && warm.elapsed() > Duration::from_millis(500) {
                break;
            }
            self.post(op, 0, size)?.wait().map_err(|e| e.to_string())?;
        }
        let mut samples = Vec::with_capacity(ops);
        let start = Instant::now();
        for _ in 0..ops {
            let t0 = Instant::now();
            self.post(op, 0, size)?
                .wait()
                .map_err(|e| format!("{} of {size} bytes: {e}", op.name()))?;
            samples.push(t0.elapsed());
            if start.elapsed() > limit {
                break;
            }
        }
        samples.sort_unstable();
        let us = |q| quantile(&samples, q).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
        Ok((us(0.5), us(0.99)))
    }

    /// Many operations in flight: keeps `depth` posted, for `time` after a short warm-up.
    fn bandwidth(&self, op: Op, size: usize, time: Duration) -> Result<f64, String> {
        // Up to 64 in flight, 16 MiB in flight for large sizes. Each operation in flight has
        // its own slot and slots are reused (like the memcpy reference), so small and
        // medium sizes stay in cache.
        let depth = (BUFFER / size).clamp(1, 64).min(((16 << 20) / size).max(4));
        let slots = depth;
        let _ = self.stream(op, size, slots, depth, time / 5)?;
        let (bytes, elapsed) = self.stream(op, size, slots, depth, time)?;
        Ok(gbs(bytes, elapsed))
    }

    fn stream(
        &self,
        op: Op,
        size: usize,
        slots: usize,
        depth: usize,
        time: Duration,
    ) -> Result<(u64, Duration), String> {
        let mut queue = VecDeque::with_capacity(depth);
        let mut next = 0usize;
        let mut bytes = 0u64;
        let mut ops = 0usize;
        let start = Instant::now();
        loop {
            // At least two windows of operations, so a large size is never a single op.
            while queue.len() < depth && (start.elapsed() < time || next < 2 * depth) {
                queue.push_back(self.post(op, (next % slots) * size, size)?);
                next += 1;
            }
            let Some(c) = queue.pop_front() else { break };
            c.wait()
                .map_err(|e| format!("{} of {size} bytes: {e}", op.name()))?;
            bytes += size as u64;
            ops += 1;
        }
        debug_assert_eq!(ops, next);
        Ok((bytes, start.elapsed()))
    }
}

/// `bench fabric-target` (hidden): opens an endpoint, registers a region, swaps addresses
/// over the bootstrap service, then serves one-sided operations until its stdin closes or
/// it is killed.
pub fn target(args: TargetArgs) -> Result<(), String> {
    // Die with the parent, whatever happens to it.
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let provider = match args.provider.parse::<fabric::ProviderChoice>() {
        Ok(fabric::ProviderChoice::Exactly(p)) => p,
        Ok(fabric::ProviderChoice::Auto) => return Err("--provider must name a provider".into()),
        Err(e) => return Err(e.to_string()),
    };
    let bootstrap: SocketAddr = args.bootstrap;
    let len: usize = args.region;
    let ep = open(&FabricConfig::with_provider(provider)).map_err(|e| e.to_string())?;
    let region = ep
        .register(Region::new(len).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    region.fill(0, len, 0x3c).map_err(|e| e.to_string())?;
    let mut client =
        BootstrapClient::connect(bootstrap, 1, 2, SETUP_TIMEOUT).map_err(|e| e.to_string())?;
    let all = client
        .allgather(&encode_target_blob(&ep.address(), &region.remote()))
        .map_err(|e| e.to_string())?;
    let parent = EndpointAddress::from_bytes(&all[0]).map_err(|e| e.to_string())?;
    ep.connect(&parent).map_err(|e| e.to_string())?;
    client.barrier().map_err(|e| e.to_string())?;
    // Serve (the endpoint's progress thread does the work) until the parent closes stdin.
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin();
    while let Ok(n) = stdin.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    drop(client);
    drop(region);
    drop(ep);
    Ok(())
}

/// Single-thread memcpy of 1 MiB between two reused buffers, in GB/s (bytes copied / s).
pub fn memcpy_gbs(time: Duration) -> f64 {
    const SIZE: usize = 1 << 20;
    let src = vec![0x11u8; SIZE];
    let mut dst = vec![0u8; SIZE];
    dst.copy_from_slice(&src); // warm-up, touches the pages
    let mut copies = 0u64;
    let start = Instant::now();
    while start.elapsed() < time {
        for _ in 0..64 {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        }
        copies += 64;
    }
    gbs(copies * SIZE as u64, start.elapsed())
}

/// Runs `cmd`, collecting stdout, killing it (by PID) after `timeout`.
fn run_bounded(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<(std::process::ExitStatus, String), String> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut guard = ChildGuard {
        child,
        what: format!("{cmd:?}"),
    };
    let mut stdout = guard.child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match guard.child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return Err(format!("{cmd:?} did not finish within {timeout:?}; killed")),
            Err(e) => return Err(format!("{cmd:?}: {e}")),
        }
    };
    let out = reader.join().unwrap_or_default();
    Ok((status, out))
}

fn iperf3_present() -> bool {
    Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Makes sure iperf3 is installed (apt-get when missing), or says why not.
fn ensure_iperf3() -> Result<(), String> {
    if iperf3_present() {
        return Ok(());
    }
    println!("reference: iperf3 not found; installing it with apt-get");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "iperf3"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok && iperf3_present() {
        Ok(())
    } else {
        Err("iperf3 is not installed and `apt-get install -y iperf3` failed (install it, or run as root)".into())
    }
}

/// Loopback TCP bandwidth: one stream, 1 MiB writes, `secs` seconds, in GB/s.
pub fn iperf3(secs: u32) -> Result<f64, String> {
    ensure_iperf3()?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))?
        .port()
        .to_string();
    let server = Command::new("iperf3")
        .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the iperf3 server: {e}"))?;
    let _server = ChildGuard {
        child: server,
        what: "iperf3 server".into(),
    };
    let started = Instant::now();
    loop {
        let (status, out) = run_bounded(
            Command::new("iperf3").args([
                "-c",
                "127.0.0.1",
                "-p",
                &port,
                "-l",
                "1M",
                "-t",
                &secs.to_string(),
                "-J",
            ]),
            Duration::from_secs(u64::from(secs) + 30),
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| format!("iperf3 -J printed no JSON ({e}): {out:.200}"))?;
        if let Some(bps) = v
            .pointer("/end/sum_received/bits_per_second")
            .and_then(|b| b.as_f64())
        {
            return Ok(bps / 8.0 / 1e9);
        }
        let err = v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no end.sum_received");
        // The server may not listen yet: retry connection errors for a few seconds.
        if err.contains("connect") && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        return Err(format!("iperf3 client ({status}): {err}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_lines_parse_and_bad_ones_are_named() {
        let rows = parse_reference(
            "{\"provider\":\"shm\",\"op\":\"read\",\"size\":8,\"lat_p50_us\":1.1,\"bw_gbs\":null}\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].op.as_str(), rows[0].size), ("read", 8));
        assert_eq!(rows[0].lat_p50_us, Some(1.1));
        let e = parse_reference("{\"op\":\"read\"}").unwrap_err();
        assert!(e.contains("provider"), "{e}");
    }

    #[test]
    fn rounds_merge_to_their_median() {
        let row = |p50: f64| Row {
            backend: "libfabric",
            provider: "shm",
            op: Op::Read,
            size: 8,
            lat_p50_us: Some(p50),
            lat_p99_us: Some(p50 * 2.0),
            bw_gbs: None,
        };
        let bw = Row {
            lat_p50_us: None,
            lat_p99_us: None,
            bw_gbs: Some(5.0),
            ..row(0.0)
        };
        let merged = merge_rounds(&[
            vec![row(3.0), bw.clone()],
            vec![row(1.0), bw.clone()],
            vec![row(2.0), bw],
        ]);
        assert_eq!(
            merged.len(),
            2,
            "latency and bandwidth rows of one size stay apart"
        );
        assert_eq!(merged[1].0.bw_gbs, Some(5.0));
        assert_eq!(merged[1].0.lat_p50_us, None);
        assert_eq!(merged[0].0.lat_p50_us, Some(2.0));
        assert_eq!(merged[0].1.len(), 3);
    }

    #[test]
    fn target_blob_round_trips() {
        let addr = EndpointAddress {
            provider: Provider::Tcp,
            token: 42,
            raw: vec![1, 2, 3],
        };
        let remote = RemoteRegion {
            addr: 4096,
            key: 7,
            len: 99,
        };
        let (a, r) = decode_target_blob(&encode_target_blob(&addr, &remote)).unwrap();
        assert_eq!((a, r), (addr, remote));
        assert!(decode_target_blob(&[9, 0, 0, 0, 1]).is_err());
    }

    #[test]
    fn settings_reject_unknown_providers_and_options() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cmd {
            #[command(flatten)]
            args: FabricArgs,
        }
        let s = |v: &[&str]| {
            let cmd = Cmd::try_parse_from(std::iter::once("fabric").chain(v.iter().copied()))
                .map_err(|e| e.to_string())?;
            Settings::from_args(cmd.args)
        };
        assert!(s(&["--providers", "tcp,carrier-pigeon"]).is_err());
        assert!(s(&["--bogus"]).is_err());
        let ok = s(&["--providers", "shm", "--quick"]).unwrap();
        assert!(ok.wants(&TARGETS[1]) && !ok.wants(&TARGETS[0]));
    }
}
