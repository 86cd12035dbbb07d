//! `bench rank`: the rank library (`krun::Rank`, `krun::Window`) beside the raw fabric
//! endpoint it is built on, in the same run, between two processes on this host: tagged
//! send (ping-pong latency, streaming bandwidth), put and get (blocking, zero-copy from
//! registered memory on both sides), for providers shm and tcp and sizes 8 B, 4 KiB, 1 MiB.
//! This process is rank 0; rank 1 is this binary re-executed as the hidden `rank-worker`.
//! Each run measures the raw endpoint and the library in turn (alternating which goes
//! first), each in a fresh pair of processes with one endpoint each: two shm endpoints in
//! one process lose messages with libfabric 1.17. Both are configured with a 1 MiB fabric
//! message size, so a 1 MiB send is one fabric message in both.
//!
//! The raw side uses its endpoint as a latency-minded user would, the way the library does:
//! the same registered buffers and message size, receives that busy-poll the endpoint (one
//! pass of its progress per poll, [`raw_recv`]) instead of blocking in its receive, and a
//! target of one-sided operations that waits for the end polling its endpoint (a fabric
//! "done" message) instead of parking in the bootstrap's TCP barrier.
//!
//! One-sided bandwidth is measured with [`DEPTH`] operations in flight (OSU's window: 64
//! puts or gets posted, then completed together, as `MPI_Put` x 64 + `MPI_Win_flush`; the
//! library's `Window::put_batch_from` / `get_batch_into` against the raw endpoint's posts and
//! one `wait_all`): a loop of blocking operations measures 1 / latency, and its mean was set
//! by the tails of single operations on 2 shared cores (stop 27: tcp put 4 KiB at 0.21-0.26
//! GB/s where its p50 latency gives 0.46 GB/s, the library/raw pairs ranging -83% to +27%).
//! Latency stays one blocking operation at a time.
//!
//! Bandwidth is the median of [`BURSTS`] timed bursts of the same operations back to back in
//! one session (each burst as long as one measurement was before): a single burst of 10-100
//! ms was moved by tens of percent by one scheduler hiccup on these 2 shared cores, so a
//! run's library/raw ratio swung from -76% to +47% (stop 26); the median burst does not see
//! a hiccup that hits one burst. Both sides are measured the same way.
//!
//! `BENCH_RANK_DEBUG=1` prints each measurement as it starts (to find a hanging one).
//!
//! Writes `bench/results/rank.json` (and `rank.png`): `{"environment":{"commit","date",
//! "kernel","cpus"},"plot","runs","bandwidth_bursts","bandwidth_depth","target",
//! "rows":[{"op","provider","size","lat_p50_us","bw_gbs","raw_lat_p50_us","raw_bw_gbs",
//! "lat_overhead_pct","bw_loss_pct", and min/max over runs of each,
//! "lat_overhead_pct_paired","bw_loss_pct_paired" with their min/max}]}`; every value is the
//! median over `--runs` runs (at least 3). The `_paired` values are the medians of each
//! run's own ratio (library against raw measured back to back in that run), which cancel
//! the drift between runs; the others compare the two medians.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::bootstrap::{BootstrapClient, BootstrapServer};
use fabric::{
    Endpoint, EndpointAddress, FabricConfig, FabricError, MemoryRegion, Message, PeerId, Provider,
    Region, RemoteRegion,
};
use krun::{Config, Rank, Source, Span, TagMatch, Window};
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{self, cell, gbs, json_num, quantile, Table};

const SIZES: [usize; 3] = [8, 4 << 10, 1 << 20];
const BUFFER: usize = 1 << 20;
/// The registered source/target memory of one-sided operations on each side: room for
/// [`DEPTH`] operations of up to 1 MiB side by side (16 of them at 1 MiB).
const RMA_BUFFER: usize = 16 << 20;
/// One-sided operations in flight at once in a bandwidth burst (OSU's window of 64).
const DEPTH: usize = 64;
const RAW_TAG: u64 = 0x5241_5700;
/// The raw side's "measurement done" message (the library's is [`DONE_TAG`]).
const RAW_DONE_TAG: u64 = RAW_TAG + 2;
const DONE_TAG: u32 = 12;
/// How long one poll of the raw endpoint's receive may wait: the same as the library's
/// (`rank/src/messages.rs`, `pull`): one pass of the endpoint's progress, no blocking.
const POLL: Duration = Duration::from_micros(1);
const LIB_TAG: u32 = 11;
const TIMEOUT: Duration = Duration::from_secs(60);
/// Timed bursts per bandwidth measurement; the bandwidth is their median.
const BURSTS: usize = 5;

/// The rank library beside the raw fabric endpoint between two processes:
/// send, put, get at 8 B, 4 KiB, 1 MiB over shm and tcp; writes bench/results/rank.json.
#[derive(Debug, clap::Args)]
pub struct RankArgs {
    /// Providers to measure, comma-separated (shm, tcp).
    #[arg(long, default_value = "shm,tcp")]
    pub providers: String,
    /// Runs per provider (at least 3: median, min and max are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Fewer operations per measurement (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Where to write the JSON (default bench/results/rank.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// The hidden `rank-worker`: rank 1 of one `bench rank` session.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub provider: String,
    /// The bootstrap server, HOST:PORT.
    #[arg(long)]
    pub bootstrap: SocketAddr,
    /// raw or lib.
    #[arg(long)]
    pub mode: String,
    #[arg(long)]
    pub quick: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Send,
    Put,
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Put => "put",
            Op::Get => "get",
        }
    }
}

/// Iterations for latency and for bandwidth of `op` at one size. Small sends stream
/// 100,000 messages: 10,000 took 10-20 ms on shm, short enough for one scheduler hiccup on
/// these 2 shared cores to move a run's bandwidth by tens of percent.
fn counts(op: Op, size: usize, quick: bool) -> (usize, usize) {
    let (lat, bw) = match (op, size) {
        (Op::Send, s) if s <= 64 => (2000, 100_000),
        (_, s) if s <= 4096 => (2000, 10000),
        _ => (200, 400),
    };
    if quick {
        (lat / 10, bw / 10)
    } else {
        (lat, bw)
    }
}

/// One side of a measured pair: the raw endpoint or the rank library.
enum Side {
    Raw {
        boot: std::sync::Mutex<BootstrapClient>,
        me: usize,
        ep: Box<dyn Endpoint>,
        peer: PeerId,
        buf: MemoryRegion,
        /// Kept registered while the other rank reads and writes it.
        _win: MemoryRegion,
        remote: RemoteRegion,
    },
    Lib {
        rank: Arc<Rank>,
        win: Window,
        buf: MemoryRegion,
    },
}

fn fabric_config(provider: Provider) -> Result<FabricConfig, String> {
    let mut c = FabricConfig::with_provider(provider);
    c.max_message = BUFFER;
    c.recv_poll = report::recv_poll_from_env()?;
    Ok(c)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Side {
    fn open(
        raw: bool,
        me: usize,
        provider: Provider,
        bootstrap: SocketAddr,
    ) -> Result<Side, String> {
        if !raw {
            let rank = Rank::init_with(Config {
                rank: me,
                size: 2,
                bootstrap: Some(bootstrap),
                fabric: fabric_config(provider)?,
                bind_explicit: true,
                recv_timeout: Some(TIMEOUT),
                checkpoints: None,
                node_socket: None,
            })
            .map_err(err)?;
            let win = rank.window(RMA_BUFFER).map_err(err)?;
            let buf = rank.register(RMA_BUFFER).map_err(err)?;
            buf.fill(0, RMA_BUFFER, 0x5a).map_err(err)?;
            rank.barrier().map_err(err)?;
            return Ok(Side::Lib { rank, win, buf });
        }
        let mut boot =
            BootstrapClient::connect_with(bootstrap, me, 2, TIMEOUT, None).map_err(err)?;
        let ep = fabric::open(&fabric_config(provider)?).map_err(err)?;
        let buf = ep
            .register(Region::new(RMA_BUFFER).map_err(err)?)
            .map_err(err)?;
        buf.fill(0, RMA_BUFFER, 0x5a).map_err(err)?;
        let win = ep
            .register(Region::new(RMA_BUFFER).map_err(err)?)
            .map_err(err)?;
        let mut card = ep.address().to_bytes();
        card.extend_from_slice(&win.remote().to_bytes());
        let cards = boot.allgather(&card).map_err(err)?;
        let other = &cards[1 - me];
        let split = other
            .len()
            .checked_sub(RemoteRegion::ENCODED_LEN)
            .ok_or("short address card")?;
        // The endpoint knows its own address first, as the library's does (every rank
        // connects to every rank of the job, itself included): with shm, whether a peer is
        // reached through the kernel's cross-memory copy is probed per connection, and this
        // is the library's set-up exactly.
        ep.connect(&ep.address()).map_err(err)?;
        let peer = ep
            .connect(&EndpointAddress::from_bytes(&other[..split]).map_err(err)?)
            .map_err(err)?;
        let remote = RemoteRegion::from_bytes(&other[split..]).map_err(err)?;
        boot.barrier().map_err(err)?;
        // First contact one way at a time (libfabric 1.17 rxm).
        if me == 0 {
            ep.send(peer, RAW_TAG + 1, &[]).map_err(err)?;
        } else {
            ep.recv(RAW_TAG + 1, TIMEOUT).map_err(err)?;
        }
        boot.barrier().map_err(err)?;
        Ok(Side::Raw {
            boot: std::sync::Mutex::new(boot),
            me,
            ep,
            peer,
            buf,
            _win: win,
            remote,
        })
    }

    fn me(&self) -> usize {
        match self {
            Side::Raw { me, .. } => *me,
            Side::Lib { rank, .. } => rank.rank(),
        }
    }

    fn barrier(&self) -> Result<(), String> {
        match self {
            Side::Raw { boot, .. } => boot.lock().map_err(err)?.barrier().map_err(err),
            Side::Lib { rank, .. } => rank.barrier().map_err(err),
        }
    }

    /// One blocking put or get of `size` bytes to the other rank.
    fn one(&self, op: Op, size: usize) -> Result<(), String> {
        let other = 1 - self.me();
        match (self, op) {
            (Side::Lib { win, buf, .. }, Op::Put) => {
                win.put_from(other, 0, buf, 0, size).map_err(err)
            }
            (Side::Lib { win, buf, .. }, Op::Get) => {
                win.get_into(other, 0, buf, 0, size).map_err(err)
            }
            // SAFETY: the source buffer is not written and the target range is only accessed
            // by this benchmark's blocking operations.
            (
                Side::Raw {
                    ep,
                    peer,
                    buf,
                    remote,
                    ..
                },
                Op::Put,
            ) => unsafe { ep.write(*peer, buf, 0, size, remote, 0).map_err(err) },
            // SAFETY: as above; the local buffer is written only by this read.
            (
                Side::Raw {
                    ep,
                    peer,
                    buf,
                    remote,
                    ..
                },
                Op::Get,
            ) => unsafe { ep.read(*peer, buf, 0, size, remote, 0).map_err(err) },
            (_, Op::Send) => Err("send is measured by ping-pong".into()),
        }
    }

    /// One batch of puts or gets, all in flight at once and completed together: `spans`
    /// side by side in both buffers (the library's batch call; the raw endpoint's posts and
    /// one `wait_all`).
    fn batch(&self, op: Op, spans: &[Span]) -> Result<(), String> {
        let other = 1 - self.me();
        match self {
            Side::Lib { win, buf, .. } => match op {
                Op::Put => win.put_batch_from(other, buf, spans).map_err(err),
                Op::Get => win.get_batch_into(other, buf, spans).map_err(err),
                Op::Send => Err("send is measured by ping-pong".into()),
            },
            Side::Raw {
                ep,
                peer,
                buf,
                remote,
                ..
            } => {
                let mut posted = Vec::with_capacity(spans.len());
                for s in spans {
                    // SAFETY: the spans' ranges are disjoint in both buffers, the source is
                    // not written and every operation completes before this call returns.
                    let c = unsafe {
                        match op {
                            Op::Put => {
                                ep.post_write(*peer, buf, s.local_offset, s.len, remote, s.offset)
                            }
                            Op::Get => {
                                ep.post_read(*peer, buf, s.local_offset, s.len, remote, s.offset)
                            }
                            Op::Send => return Err("send is measured by ping-pong".into()),
                        }
                    };
                    posted.push(c.map_err(err)?);
                }
                fabric::wait_all(posted).map_err(err)
            }
        }
    }

    fn send(&self, data: &[u8]) -> Result<(), String> {
        match self {
            Side::Raw { ep, peer, .. } => ep.send(*peer, RAW_TAG, data).map_err(err),
            Side::Lib { rank, .. } => rank
                .send(1 - rank.rank(), LIB_TAG, data)
                .map(drop)
                .map_err(err),
        }
    }

    fn recv(&self) -> Result<usize, String> {
        match self {
            Side::Raw { ep, .. } => raw_recv(ep.as_ref(), RAW_TAG).map(|m| m.data.len()),
            Side::Lib { rank, .. } => rank
                .recv(Source::Rank(1 - rank.rank()), TagMatch::Tag(LIB_TAG))
                .map(|m| m.data.len())
                .map_err(err),
        }
    }

    /// Rank 0 tells rank 1 that a one-sided measurement is over; rank 1 waits for it,
    /// polling (the library through its receive, the raw side through [`raw_recv`]).
    fn done(&self, me: usize) -> Result<(), String> {
        match (self, me) {
            (Side::Raw { ep, peer, .. }, 0) => ep.send(*peer, RAW_DONE_TAG, &[]).map_err(err),
            (Side::Raw { ep, .. }, _) => raw_recv(ep.as_ref(), RAW_DONE_TAG).map(drop),
            (Side::Lib { rank, .. }, 0) => rank.send(1, DONE_TAG, &[]).map(drop).map_err(err),
            (Side::Lib { rank, .. }, _) => rank
                .recv(Source::Rank(0), TagMatch::Tag(DONE_TAG))
                .map(drop)
                .map_err(err),
        }
    }

    /// (p50 latency, bandwidth) of `op` at `size`; rank 1 serves sends and meets at the end.
    fn measure(&self, op: Op, size: usize, quick: bool) -> Result<(Duration, f64), String> {
        let (lat_n, bw_n) = counts(op, size, quick);
        if std::env::var_os("BENCH_RANK_DEBUG").is_some() {
            eprintln!("rank {} {op:?} {size}", self.me());
        }
        let data = vec![0xa5u8; size];
        let me = self.me();
        let mut lat = Vec::with_capacity(lat_n);
        let mut bw = 0.0;
        self.barrier()?;
        match op {
            Op::Send => {
                for _ in 0..lat_n {
                    let t = Instant::now();
                    if me == 0 {
                        self.send(&data)?;
                        self.recv()?;
                    } else {
                        self.recv()?;
                        self.send(&data)?;
                    }
                    lat.push(t.elapsed() / 2);
                }
                let mut bursts = Vec::with_capacity(BURSTS);
                for _ in 0..BURSTS {
                    // Each burst ends with the receiver's acknowledgement: every message of
                    // the burst has arrived before the next burst starts.
                    let t = Instant::now();
                    if me == 0 {
                        for _ in 0..bw_n {
                            self.send(&data)?;
                        }
                        self.recv()?;
                    } else {
                        for _ in 0..bw_n {
                            self.recv()?;
                        }
                        self.send(&[])?;
                    }
                    bursts.push(gbs((size * bw_n) as u64, t.elapsed()));
                }
                bw = median(&mut bursts);
            }
            Op::Put | Op::Get => {
                if me == 0 {
                    for _ in 0..lat_n {
                        let t = Instant::now();
                        self.one(op, size)?;
                        lat.push(t.elapsed());
                    }
                    let depth = DEPTH.min(RMA_BUFFER / size);
                    let spans: Vec<Span> = (0..depth)
                        .map(|i| Span {
                            offset: (i * size) as u64,
                            local_offset: i * size,
                            len: size,
                        })
                        .collect();
                    let batches = bw_n.div_ceil(depth);
                    let mut bursts = Vec::with_capacity(BURSTS);
                    for _ in 0..BURSTS {
                        let t = Instant::now();
                        for _ in 0..batches {
                            self.batch(op, &spans)?;
                        }
                        bursts.push(gbs((size * depth * batches) as u64, t.elapsed()));
                    }
                    bw = median(&mut bursts);
                }
                // The target waits for the end polling its endpoint, as a target of one-sided
                // operations does in an application (the library's ranks poll in their
                // barrier; parked in the bootstrap's TCP barrier, the raw target would leave
                // its endpoint to the progress thread and make the raw reference slow).
                self.done(me)?;
            }
        }
        self.barrier()?;
        lat.sort();
        Ok((quantile(&lat, 0.5).unwrap_or_default(), bw))
    }

    fn close(self) -> Result<(), String> {
        match self {
            Side::Raw { boot, .. } => boot.lock().map_err(err)?.barrier().map_err(err),
            Side::Lib { rank, win, .. } => {
                win.free().map_err(err)?;
                rank.finalize().map_err(err)
            }
        }
    }
}

/// Receives a `tag` message on the raw endpoint the way a latency-minded user of it does:
/// busy-polling (one pass of the endpoint's progress per [`POLL`], giving the core away only
/// every 64th poll), not blocking in the endpoint's receive, which naps up to 200 us on a
/// condition variable between checks.
fn raw_recv(ep: &dyn Endpoint, tag: u64) -> Result<Message, String> {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        match ep.recv(tag, POLL) {
            Ok(m) => return Ok(m),
            Err(FabricError::RecvTimeout { .. }) => {}
            Err(e) => return Err(err(e)),
        }
        if start.elapsed() >= TIMEOUT {
            return Err(format!("no message with tag {tag:#x} in {TIMEOUT:?}"));
        }
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

const KEYS: [(Op, usize); 9] = [
    (Op::Send, SIZES[0]),
    (Op::Send, SIZES[1]),
    (Op::Send, SIZES[2]),
    (Op::Put, SIZES[0]),
    (Op::Put, SIZES[1]),
    (Op::Put, SIZES[2]),
    (Op::Get, SIZES[0]),
    (Op::Get, SIZES[1]),
    (Op::Get, SIZES[2]),
];

/// One session: every (op, size) once, as rank `me`, raw or library.
fn session(
    raw: bool,
    me: usize,
    provider: Provider,
    bootstrap: SocketAddr,
    quick: bool,
) -> Result<Vec<(Duration, f64)>, String> {
    let side = Side::open(raw, me, provider, bootstrap)?;
    let out = KEYS
        .iter()
        .map(|&(op, size)| side.measure(op, size, quick))
        .collect::<Result<Vec<_>, String>>()?;
    side.close()?;
    Ok(out)
}

fn provider_of(name: &str) -> Result<Provider, String> {
    match name {
        "shm" => Ok(Provider::Shm),
        "tcp" => Ok(Provider::Tcp),
        other => Err(format!("unknown provider {other:?} (shm, tcp)")),
    }
}

/// The hidden `rank-worker`: rank 1 of one session.
pub fn worker(args: WorkerArgs) -> Result<(), String> {
    let provider = provider_of(&args.provider)?;
    let bootstrap = args.bootstrap;
    let raw_mode = match args.mode.as_str() {
        "raw" => true,
        "lib" => false,
        other => return Err(format!("--mode {other:?}: raw or lib")),
    };
    session(raw_mode, 1, provider, bootstrap, args.quick).map(drop)
}

/// Runs one session with a rank-worker as rank 1.
fn paired_session(
    exe: &Path,
    raw: bool,
    name: &str,
    quick: bool,
) -> Result<Vec<(Duration, f64)>, String> {
    let provider = provider_of(name)?;
    let server = BootstrapServer::start_with(("127.0.0.1", 0), 2, TIMEOUT, None).map_err(err)?;
    let mut child = Command::new(exe)
        .args([
            "rank-worker",
            "--provider",
            name,
            "--mode",
            if raw { "raw" } else { "lib" },
        ])
        .args(["--bootstrap", &server.addr().to_string()])
        .args(if quick { &["--quick"][..] } else { &[][..] })
        .env_remove("KRUN_RANK")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the rank-worker: {e}"))?;
    let result = session(raw, 0, provider, server.addr(), quick);
    if result.is_err() {
        let _ = child.kill();
    }
    let status = child.wait().map_err(err)?;
    let out = result?;
    if !status.success() {
        return Err(format!("{name}: the rank-worker failed: {status}"));
    }
    server.join().map_err(err)?;
    Ok(out)
}

/// The median of `v` (the upper one of an even count); 0 when empty.
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    stats(v).0
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn run(args: RankArgs) -> Result<(), String> {
    let quick = args.quick;
    let runs = args.runs;
    if runs < 3 {
        return Err("--runs must be at least 3 (median, min and max are reported)".into());
    }
    let out_path = args
        .out
        .clone()
        .unwrap_or_else(|| report::results_path("rank"));
    let providers: Vec<String> = args
        .providers
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let exe = std::env::current_exe().map_err(err)?;
    let mut rows = Vec::new();
    let (mut lat_groups, mut bw_groups) = (Vec::new(), Vec::new());
    let mut skipped = Vec::new();
    let mut table = Table::new(&[
        "op",
        "provider",
        "size",
        "lat us",
        "raw lat us",
        "lat +%",
        "paired",
        "GB/s",
        "raw GB/s",
        "bw -%",
        "paired",
    ]);
    for name in &providers {
        // Per key, per run: [lib lat us, lib GB/s, raw lat us, raw GB/s].
        let mut samples: Vec<Vec<[f64; 4]>> = vec![Vec::new(); KEYS.len()];
        let mut failed = None;
        for run in crate::runs::bar(&format!("rank: {name}"), 0..runs) {
            let raw_first = run % 2 == 0;
            let pair = paired_session(&exe, raw_first, name, quick).and_then(|first| {
                paired_session(&exe, !raw_first, name, quick).map(|second| (first, second))
            });
            let (first, second) = match pair {
                Ok(p) => p,
                Err(e) => {
                    failed = Some(format!("run {run}: {e}"));
                    break;
                }
            };
            let (raw, lib) = if raw_first {
                (first, second)
            } else {
                (second, first)
            };
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            for (i, s) in samples.iter_mut().enumerate() {
                s.push([us(lib[i].0), lib[i].1, us(raw[i].0), raw[i].1]);
            }
        }
        if let Some(e) = failed {
            eprintln!("bench rank: {name}: skipped: {e}");
            skipped.push(json!({"provider": name, "error": e}));
            continue;
        }
        for (&(op, size), s) in KEYS.iter().zip(samples) {
            let col = |i: usize| -> Vec<f64> { s.iter().map(|r| r[i]).collect() };
            let (lat, lat_min, lat_max) = stats(&mut col(0));
            let (bw, bw_min, bw_max) = stats(&mut col(1));
            let (raw_lat, raw_lat_min, raw_lat_max) = stats(&mut col(2));
            let (raw_bw, raw_bw_min, raw_bw_max) = stats(&mut col(3));
            let label = format!("{} {name}\n{}", op.name(), report::size_name(size));
            let spread = |series: &str, m: f64, lo: f64, hi: f64| {
                Bar::spread(series, Some(m), Some(lo), Some(hi))
            };
            if size <= 4096 {
                lat_groups.push(Group::new(
                    label.clone(),
                    [
                        spread("rank library", lat, lat_min, lat_max),
                        spread("raw endpoint (same run)", raw_lat, raw_lat_min, raw_lat_max),
                    ],
                ));
            } else {
                bw_groups.push(Group::new(
                    label,
                    [
                        spread("rank library", bw, bw_min, bw_max),
                        spread("raw endpoint (same run)", raw_bw, raw_bw_min, raw_bw_max),
                    ],
                ));
            }
            let lat_over = (lat / raw_lat - 1.0) * 100.0;
            let bw_loss = (1.0 - bw / raw_bw) * 100.0;
            // The runs paired one by one: each run measures both sides back to back, so its
            // ratio cancels the drift between runs (on 2 cores a run's p50 at 8 B moves by
            // up to 70x), which the ratio of the two medians does not.
            let (lat_over_paired, lat_over_paired_min, lat_over_paired_max) = stats(
                &mut s
                    .iter()
                    .map(|r| (r[0] / r[2] - 1.0) * 100.0)
                    .collect::<Vec<_>>(),
            );
            let (bw_loss_paired, bw_loss_paired_min, bw_loss_paired_max) = stats(
                &mut s
                    .iter()
                    .map(|r| (1.0 - r[1] / r[3]) * 100.0)
                    .collect::<Vec<_>>(),
            );
            table.row(vec![
                op.name().into(),
                name.clone(),
                report::size_name(size),
                cell(Some(lat), 2),
                cell(Some(raw_lat), 2),
                cell(Some(lat_over), 1),
                cell(Some(lat_over_paired), 1),
                cell(Some(bw), 3),
                cell(Some(raw_bw), 3),
                cell(Some(bw_loss), 1),
                cell(Some(bw_loss_paired), 1),
            ]);
            rows.push(json!({
                "op": op.name(),
                "provider": name,
                "size": size,
                "lat_p50_us": json_num(Some(lat)),
                "bw_gbs": json_num(Some(bw)),
                "raw_lat_p50_us": json_num(Some(raw_lat)),
                "raw_bw_gbs": json_num(Some(raw_bw)),
                "lat_overhead_pct": json_num(Some(lat_over)),
                "bw_loss_pct": json_num(Some(bw_loss)),
                "lat_overhead_pct_paired": json_num(Some(lat_over_paired)),
                "lat_overhead_pct_paired_min": json_num(Some(lat_over_paired_min)),
                "lat_overhead_pct_paired_max": json_num(Some(lat_over_paired_max)),
                "bw_loss_pct_paired": json_num(Some(bw_loss_paired)),
                "bw_loss_pct_paired_min": json_num(Some(bw_loss_paired_min)),
                "bw_loss_pct_paired_max": json_num(Some(bw_loss_paired_max)),
                "lat_p50_us_min": json_num(Some(lat_min)),
                "lat_p50_us_max": json_num(Some(lat_max)),
                "bw_gbs_min": json_num(Some(bw_min)),
                "bw_gbs_max": json_num(Some(bw_max)),
                "raw_lat_p50_us_min": json_num(Some(raw_lat_min)),
                "raw_lat_p50_us_max": json_num(Some(raw_lat_max)),
                "raw_bw_gbs_min": json_num(Some(raw_bw_min)),
                "raw_bw_gbs_max": json_num(Some(raw_bw_max)),
            }));
        }
    }
    print!("{}", table.render());
    let value = json!({
        "runs": runs,
        "bandwidth_bursts": BURSTS,
        "bandwidth_depth": DEPTH,
        "recv_poll_us": report::recv_poll_from_env()?.map(|d| d.as_micros() as u64),
        "quick": quick,
        "target": {"lat_overhead_pct_max": 10, "bw_loss_pct_max": 5},
        "rows": rows,
        "skipped": skipped,
    });
    let figure = Figure {
        title: "bench rank: the rank library against the raw fabric endpoint".into(),
        note: format!(
            "median of {runs} runs, whiskers min/max{}",
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; skipped: {}", skipped.len())
            }
        ),
        panels: vec![
            Panel::new("latency p50 (lower is better)", "us", lat_groups),
            Panel::new("bandwidth (higher is better)", "GB/s", bw_groups),
        ],
    };
    report::write_results(&out_path, value, &figure)?;
    println!("wrote {}", out_path.display());
    Ok(())
}
