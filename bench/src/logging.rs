//! `bench logging`: small-message latency of the rank library with sender-based
//! pessimistic message logging against without it, between two processes on this host.
//!
//! Each run starts a fresh pair of processes per mode (this process is rank 0, rank 1 is
//! this binary re-executed as the hidden `logging-worker`), alternating which mode goes
//! first. A session warms up, then times batches of 8-byte ping-pongs (`krun::Rank::send`
//! and `recv`); between batches (untimed) both ranks mark a checkpoint and declare it safe,
//! so the senders' logs are collected as in a job. With logging, every delivery posts its
//! determinant to the peer (the buddy, in a job of two) by a one-sided write. The two ranks
//! count as on two nodes (`KRUN_LOCAL_SIZE=1` for both: the target is logging
//! between nodes), so a reply does not wait for that write: it carries the determinant if
//! the write has not completed yet (the piggyback of `krun::logging`). The latency is half
//! a round trip, the median over batches; the figure reported is the median over `--runs`
//! runs (at least 3).
//!
//! Writes `bench/results/logging.json` and `logging.png`: `{"environment":{"commit","date",
//! "kernel","cpus"},"plot","runs","batch","batches","target_ratio","rows":[{"provider",
//! "lat_us":{"off","on"},"off":{"median","min","max","runs"},"on":{..},"runs_us":{"off":[..],
//! "on":[..]},"ratio","ratio_paired":{..},"met"}]}`; `ratio` divides the two medians,
//! `ratio_paired` is the spread of each run's own ratio (its two sessions back to back).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;
use fabric::{FabricConfig, Provider};
use krun::{Config, Rank, Source, TagMatch};
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report;

/// The bound: latency with logging at most this many times without.
const TARGET_RATIO: f64 = 1.2;

const TIMEOUT: Duration = Duration::from_secs(60);
const TAG: u32 = 21;

/// 8-byte ping-pong latency of the rank library with sender-based message
/// logging against without, between two processes; writes bench/results/logging.json.
#[derive(Debug, clap::Args)]
pub struct LoggingArgs {
    /// The fabric providers, comma-separated: shm, tcp.
    #[arg(long, default_value = "shm,tcp")]
    pub providers: String,
    /// Runs per mode (at least 3: the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Ping-pongs per timed batch.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Timed batches per session.
    #[arg(long, default_value_t = 20)]
    pub batches: usize,
    /// Where to write the JSON (default bench/results/logging.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// The hidden `logging-worker`: rank 1 of one `bench logging` session.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub provider: String,
    /// The bootstrap server, HOST:PORT.
    #[arg(long)]
    pub bootstrap: SocketAddr,
    #[arg(long)]
    pub logging: bool,
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    #[arg(long, default_value_t = 20)]
    pub batches: usize,
}

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

/// One session as rank `me`: the median half round trip over `batches` batches.
fn session(
    me: usize,
    provider: Provider,
    bootstrap: SocketAddr,
    logging: bool,
    batch: usize,
    batches: usize,
) -> Result<f64, String> {
    let mut fabric = FabricConfig::with_provider(provider);
    fabric.max_message = 1 << 16;
    fabric.recv_poll = report::recv_poll_from_env()?;
    let r = Rank::init_with(Config {
        rank: me,
        size: 2,
        bootstrap: Some(bootstrap),
        fabric,
        bind_explicit: true,
        recv_timeout: Some(TIMEOUT),
        checkpoints: None,
        node_socket: None,
    })
    .map_err(err)?;
    if logging {
        r.enable_logging(0).map_err(err)?;
    }
    let other = 1 - me;
    let msg = [0x5au8; 8];
    let mut buf = [0u8; 8];
    let mut pingpong = |n: usize| -> Result<(), String> {
        for _ in 0..n {
            if me == 0 {
                r.send(other, TAG, &msg).map_err(err)?;
                r.recv_into(Source::Rank(other), TagMatch::Tag(TAG), &mut buf)
                    .map_err(err)?;
            } else {
                r.recv_into(Source::Rank(other), TagMatch::Tag(TAG), &mut buf)
                    .map_err(err)?;
                r.send(other, TAG, &msg).map_err(err)?;
            }
        }
        Ok(())
    };
    pingpong(batch)?;
    let mut lat = Vec::with_capacity(batches);
    for b in 0..batches {
        r.barrier().map_err(err)?;
        let t = Instant::now();
        pingpong(batch)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6 / (2 * batch) as f64);
        if logging {
            let v = b as u64 + 1;
            r.log_mark_checkpoint(v).map_err(err)?;
            r.log_checkpoint_safe(v).map_err(err)?;
        }
    }
    if logging {
        let s = r.log_stats().ok_or("logging was not on")?;
        if s.determinants < (batch * batches) as u64 {
            return Err(format!("only {} determinants were written", s.determinants));
        }
    }
    r.finalize().map_err(err)?;
    lat.sort_by(f64::total_cmp);
    Ok(lat[lat.len() / 2])
}

/// The hidden `logging-worker`: rank 1 of one session.
pub fn worker(args: WorkerArgs) -> Result<(), String> {
    let provider = provider_of(&args.provider)?;
    let bootstrap = args.bootstrap;
    let logging = args.logging;
    let batch = args.batch;
    let batches = args.batches;
    session(1, provider, bootstrap, logging, batch, batches).map(drop)
}

fn paired(
    exe: &Path,
    name: &str,
    logging: bool,
    batch: usize,
    batches: usize,
) -> Result<f64, String> {
    let provider = provider_of(name)?;
    let server = BootstrapServer::start_with(("127.0.0.1", 0), 2, TIMEOUT, None).map_err(err)?;
    let mut child = Command::new(exe)
        .args(["logging-worker", "--provider", name])
        .args(["--bootstrap", &server.addr().to_string()])
        .args([
            "--batch",
            &batch.to_string(),
            "--batches",
            &batches.to_string(),
        ])
        .args(if logging { &["--logging"][..] } else { &[][..] })
        .env_remove("KRUN_RANK")
        .env("KRUN_LOCAL_SIZE", "1")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the logging-worker: {e}"))?;
    let result = session(0, provider, server.addr(), logging, batch, batches);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(err)?;
    let out = result?;
    if !status.success() {
        return Err(format!("the logging-worker failed: {status}"));
    }
    server.join().map_err(err)?;
    Ok(out)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: LoggingArgs) -> Result<(), String> {
    let runs = args.runs;
    if runs < 3 {
        return Err("--runs must be at least 3 (the median is reported)".into());
    }
    let (batch, batches) = (args.batch, args.batches);
    if batch == 0 || batches == 0 {
        return Err("--batch and --batches must be at least 1".into());
    }
    let providers: Vec<String> = args
        .providers
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(bad) = providers
        .iter()
        .find(|p| !matches!(p.as_str(), "shm" | "tcp"))
    {
        return Err(format!("--providers: unknown provider {bad:?} (shm, tcp)"));
    }
    if providers.is_empty() {
        return Err("--providers: name at least one provider (shm, tcp)".into());
    }
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| report::results_path("logging"));
    let exe = std::env::current_exe().map_err(err)?;
    // Rank 0 (this process) and rank 1 on two nodes as the log sees them (see the doc).
    std::env::set_var("KRUN_LOCAL_SIZE", "1");
    let mut rows = Vec::new();
    let mut groups = Vec::new();
    for provider in &providers {
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for i in crate::runs::bar(&format!("logging: {provider}"), 0..runs) {
            let order = if i % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for logging in order {
                let us = paired(&exe, provider, logging, batch, batches)?;
                println!(
                    "run {}: {provider} 8 B latency {} logging: {us:.2} us",
                    i + 1,
                    if logging { "with" } else { "without" }
                );
                if logging {
                    on.push(us)
                } else {
                    off.push(us)
                }
            }
        }
        let (m_off, m_on) = (median(&off), median(&on));
        let ratio = m_on / m_off;
        let paired_ratios: Vec<f64> = on.iter().zip(&off).map(|(a, b)| a / b).collect();
        println!(
            "{provider} 8 B latency, median of {runs} runs: {m_off:.2} us without logging, \
             {m_on:.2} us with ({ratio:.2}x; target <= {TARGET_RATIO}x)"
        );
        rows.push(json!({
            "provider": provider,
            "lat_us": {"off": m_off, "on": m_on},
            "off": report::spread(&off),
            "on": report::spread(&on),
            "runs_us": {"off": off, "on": on},
            "ratio": ratio,
            "ratio_paired": report::spread(&paired_ratios),
            "met": ratio <= TARGET_RATIO,
        }));
        groups.push(Group::new(
            format!("{provider} 8 B"),
            [
                Bar::from_values("without logging", &off),
                Bar::from_values("with logging", &on),
            ],
        ));
    }
    let doc = json!({
        "runs": runs,
        "batch": batch,
        "batches": batches,
        "target_ratio": TARGET_RATIO,
        "recv_poll_us": report::recv_poll_from_env()?.map(|d| d.as_micros() as u64),
        "rows": rows,
    });
    let figure = Figure {
        title: "bench logging: 8 B ping-pong latency with and without message logging".into(),
        note: format!(
            "median of {runs} runs, whiskers min/max; target: with <= {TARGET_RATIO}x without"
        ),
        panels: vec![Panel::new(
            "latency, half a round trip (lower is better)",
            "us",
            groups,
        )],
    };
    report::write_results(&out_path, doc, &figure)?;
    println!("wrote {}", out_path.display());
    Ok(())
}
