//! `bench rank`: the rank library (`krun::Rank`, `krun::Window`) beside the raw fabric
//! endpoint it is built on, in the same run, between two processes on this host: tagged
//! send (ping-pong latency, streaming bandwidth), put and get (blocking, zero-copy from
//! registered memory on both sides), for providers shm and tcp and sizes 8 B, 4 KiB, 1 MiB.
//! This process is rank 0; rank 1 is this binary re-executed as the hidden `rank-worker`.
//! Both the library and the raw endpoint are configured with a 1 MiB fabric message size, so
//! a 1 MiB send is one fabric message in both.
//!
//! Writes `bench/results/rank.json`: `{"commit","date","kernel","cpus","runs","target",
//! "rows":[{"op","provider","size","lat_p50_us","bw_gbs","raw_lat_p50_us","raw_bw_gbs",
//! "lat_overhead_pct","bw_loss_pct", and min/max over runs of each}]}`; every value is the
//! median over `--runs` runs (at least 3).
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;
use fabric::{
    Endpoint, EndpointAddress, FabricConfig, MemoryRegion, PeerId, Provider, Region, RemoteRegion,
};
use krun::{Config, Rank, Source, TagMatch, Window};
use serde_json::json;

use crate::report::{self, cell, gbs, json_num, quantile, Args, Table};

const SIZES: [usize; 3] = [8, 4 << 10, 1 << 20];
const BUFFER: usize = 1 << 20;
const RAW_TAG: u64 = 0x5241_5700;
const LIB_TAG: u32 = 11;
const TIMEOUT: Duration = Duration::from_secs(60);

const USAGE: &str = "usage: bench rank [--providers shm,tcp] [--runs N] [--quick] [--out PATH]";

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

/// Iterations for latency and for bandwidth at one size.
fn counts(size: usize, quick: bool) -> (usize, usize) {
    let (lat, bw) = match size {
        s if s <= 4096 => (2000, 10000),
        _ => (200, 400),
    };
    if quick {
        (lat / 10, bw / 10)
    } else {
        (lat, bw)
    }
}

/// Both ways of moving data in one process: the library and a raw endpoint.
struct Pair {
    rank: Arc<Rank>,
    win: Window,
    lib_buf: MemoryRegion,
    ep: Box<dyn Endpoint>,
    raw_peer: PeerId,
    raw_buf: MemoryRegion,
    /// Kept registered while the other rank reads and writes it.
    _raw_win: MemoryRegion,
    raw_remote: RemoteRegion,
}

fn fabric_config(provider: Provider) -> FabricConfig {
    let mut c = FabricConfig::with_provider(provider);
    c.max_message = BUFFER;
    c
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Pair {
    fn open(
        rank: usize,
        provider: Provider,
        bootstrap: std::net::SocketAddr,
    ) -> Result<Pair, String> {
        let r = Rank::init_with(Config {
            rank,
            size: 2,
            bootstrap: Some(bootstrap),
            fabric: fabric_config(provider),
            bind_explicit: true,
            recv_timeout: Some(TIMEOUT),
            checkpoints: None,
            node_socket: None,
        })
        .map_err(err)?;
        let win = r.window(BUFFER).map_err(err)?;
        let lib_buf = r.register(BUFFER).map_err(err)?;
        lib_buf.fill(0, BUFFER, 0x5a).map_err(err)?;
        let ep = fabric::open(&fabric_config(provider)).map_err(err)?;
        let raw_buf = ep
            .register(Region::new(BUFFER).map_err(err)?)
            .map_err(err)?;
        raw_buf.fill(0, BUFFER, 0x5a).map_err(err)?;
        let raw_win = ep
            .register(Region::new(BUFFER).map_err(err)?)
            .map_err(err)?;
        let mut card = ep.address().to_bytes();
        card.extend_from_slice(&raw_win.remote().to_bytes());
        let cards = r.allgather(&card).map_err(err)?;
        let other = &cards[1 - rank];
        let split = other.len() - RemoteRegion::ENCODED_LEN;
        let raw_peer = ep
            .connect(&EndpointAddress::from_bytes(&other[..split]).map_err(err)?)
            .map_err(err)?;
        let raw_remote = RemoteRegion::from_bytes(&other[split..]).map_err(err)?;
        // First contact one way at a time (libfabric 1.17 rxm).
        if rank == 0 {
            ep.send(raw_peer, RAW_TAG + 1, &[]).map_err(err)?;
        } else {
            ep.recv(RAW_TAG + 1, TIMEOUT).map_err(err)?;
        }
        r.barrier().map_err(err)?;
        Ok(Pair {
            rank: r,
            win,
            lib_buf,
            ep,
            raw_peer,
            raw_buf,
            _raw_win: raw_win,
            raw_remote,
        })
    }

    /// One blocking operation of `size` bytes to the other rank.
    fn one(&self, op: Op, raw: bool, size: usize) -> Result<(), String> {
        let other = 1 - self.rank.rank();
        match (op, raw) {
            (Op::Put, false) => self
                .win
                .put_from(other, 0, &self.lib_buf, 0, size)
                .map_err(err),
            (Op::Get, false) => self
                .win
                .get_into(other, 0, &self.lib_buf, 0, size)
                .map_err(err),
            // SAFETY: the source buffer is not written and the target range is only
            // accessed by this benchmark's blocking operations.
            (Op::Put, true) => unsafe {
                self.ep
                    .write(self.raw_peer, &self.raw_buf, 0, size, &self.raw_remote, 0)
                    .map_err(err)
            },
            // SAFETY: as above; the local buffer is written only by this read.
            (Op::Get, true) => unsafe {
                self.ep
                    .read(self.raw_peer, &self.raw_buf, 0, size, &self.raw_remote, 0)
                    .map_err(err)
            },
            (Op::Send, _) => Err("send is measured by ping-pong".into()),
        }
    }

    fn send(&self, raw: bool, data: &[u8]) -> Result<(), String> {
        if raw {
            self.ep.send(self.raw_peer, RAW_TAG, data).map_err(err)
        } else {
            self.rank
                .send(1 - self.rank.rank(), LIB_TAG, data)
                .map(drop)
                .map_err(err)
        }
    }

    fn recv(&self, raw: bool) -> Result<usize, String> {
        if raw {
            self.ep
                .recv(RAW_TAG, TIMEOUT)
                .map(|m| m.data.len())
                .map_err(err)
        } else {
            self.rank
                .recv(Source::Rank(1 - self.rank.rank()), TagMatch::Tag(LIB_TAG))
                .map(|m| m.data.len())
                .map_err(err)
        }
    }

    /// (p50 latency, bandwidth) of `op` at `size`; rank 1 serves sends and meets at the end.
    fn measure(
        &self,
        op: Op,
        raw: bool,
        size: usize,
        quick: bool,
    ) -> Result<(Duration, f64), String> {
        let (lat_n, bw_n) = counts(size, quick);
        let data = vec![0xa5u8; size];
        let me = self.rank.rank();
        let mut lat = Vec::with_capacity(lat_n);
        let mut bw = 0.0;
        match op {
            Op::Send => {
                for _ in 0..lat_n {
                    let t = Instant::now();
                    if me == 0 {
                        self.send(raw, &data)?;
                        self.recv(raw)?;
                    } else {
                        self.recv(raw)?;
                        self.send(raw, &data)?;
                    }
                    lat.push(t.elapsed() / 2);
                }
                let t = Instant::now();
                if me == 0 {
                    for _ in 0..bw_n {
                        self.send(raw, &data)?;
                    }
                    self.recv(raw)?;
                } else {
                    for _ in 0..bw_n {
                        self.recv(raw)?;
                    }
                    self.send(raw, &[])?;
                }
                bw = gbs((size * bw_n) as u64, t.elapsed());
            }
            Op::Put | Op::Get => {
                if me == 0 {
                    for _ in 0..lat_n {
                        let t = Instant::now();
                        self.one(op, raw, size)?;
                        lat.push(t.elapsed());
                    }
                    let t = Instant::now();
                    for _ in 0..bw_n {
                        self.one(op, raw, size)?;
                    }
                    bw = gbs((size * bw_n) as u64, t.elapsed());
                }
            }
        }
        self.rank.barrier().map_err(err)?;
        lat.sort();
        Ok((quantile(&lat, 0.5).unwrap_or_default(), bw))
    }
}

/// Per (op, size): per-run (lib lat, lib bw, raw lat, raw bw).
type Samples = Vec<((Op, usize), Vec<[f64; 4]>)>;

fn run_provider(
    rank: usize,
    provider: Provider,
    bootstrap: std::net::SocketAddr,
    runs: usize,
    quick: bool,
) -> Result<Samples, String> {
    let pair = Pair::open(rank, provider, bootstrap)?;
    let mut out: Samples = Vec::new();
    for op in [Op::Send, Op::Put, Op::Get] {
        for size in SIZES {
            out.push(((op, size), Vec::new()));
        }
    }
    for _ in 0..runs {
        for (key, samples) in out.iter_mut() {
            let (op, size) = *key;
            // Alternate which goes first so warm-up effects do not favour one side.
            let first_raw = samples.len() % 2 == 0;
            let a = pair.measure(op, first_raw, size, quick)?;
            let b = pair.measure(op, !first_raw, size, quick)?;
            let (raw, lib) = if first_raw { (a, b) } else { (b, a) };
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            samples.push([us(lib.0), lib.1, us(raw.0), raw.1]);
        }
    }
    pair.rank.finalize().map_err(err)?;
    Ok(out)
}

fn provider_of(name: &str) -> Result<Provider, String> {
    match name {
        "shm" => Ok(Provider::Shm),
        "tcp" => Ok(Provider::Tcp),
        other => Err(format!("unknown provider {other:?} (shm, tcp)")),
    }
}

/// The hidden `rank-worker`: rank 1 of one provider's measurements.
pub fn worker(raw: &[String]) -> Result<(), String> {
    let args = Args::parse(raw)?;
    let provider = provider_of(args.required("provider")?)?;
    let bootstrap = args
        .required("bootstrap")?
        .parse()
        .map_err(|_| "--bootstrap: not HOST:PORT".to_string())?;
    let runs = args.number("runs", 3usize)?;
    run_provider(1, provider, bootstrap, runs, args.flag("quick")).map(drop)
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn command_text(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

pub fn run(raw: &[String]) -> Result<(), String> {
    let args = Args::parse(raw)?;
    if args.flag("help") {
        return Err(USAGE.into());
    }
    args.only(&["providers", "runs", "quick", "out"])
        .map_err(|e| format!("{e}\n{USAGE}"))?;
    let quick = args.flag("quick");
    let runs = args.number("runs", 3usize)?;
    if runs < 3 {
        return Err("--runs must be at least 3 (median, min and max are reported)".into());
    }
    let out_path = args
        .get("out")
        .map_or_else(|| report::results_path("rank"), PathBuf::from);
    let providers: Vec<String> = args
        .get("providers")
        .unwrap_or("shm,tcp")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let exe = std::env::current_exe().map_err(err)?;
    let mut rows = Vec::new();
    let mut table = Table::new(&[
        "op",
        "provider",
        "size",
        "lat us",
        "raw lat us",
        "lat +%",
        "GB/s",
        "raw GB/s",
        "bw -%",
    ]);
    for name in &providers {
        let provider = provider_of(name)?;
        let server =
            BootstrapServer::start_with(("127.0.0.1", 0), 2, TIMEOUT, None).map_err(err)?;
        let mut child = Command::new(&exe)
            .args([
                "rank-worker",
                "--provider",
                name,
                "--runs",
                &runs.to_string(),
            ])
            .args(["--bootstrap", &server.addr().to_string()])
            .args(if quick { &["--quick"][..] } else { &[][..] })
            .env_remove("KRUN_RANK")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the rank-worker: {e}"))?;
        let result = run_provider(0, provider, server.addr(), runs, quick);
        let status = child.wait().map_err(err)?;
        let samples = result?;
        if !status.success() {
            return Err(format!("{name}: the rank-worker failed: {status}"));
        }
        server.join().map_err(err)?;
        for ((op, size), s) in samples {
            let col = |i: usize| -> Vec<f64> { s.iter().map(|r| r[i]).collect() };
            let (lat, lat_min, lat_max) = stats(&mut col(0));
            let (bw, bw_min, bw_max) = stats(&mut col(1));
            let (raw_lat, raw_lat_min, raw_lat_max) = stats(&mut col(2));
            let (raw_bw, raw_bw_min, raw_bw_max) = stats(&mut col(3));
            let lat_over = (lat / raw_lat - 1.0) * 100.0;
            let bw_loss = (1.0 - bw / raw_bw) * 100.0;
            table.row(vec![
                op.name().into(),
                name.clone(),
                report::size_name(size),
                cell(Some(lat), 2),
                cell(Some(raw_lat), 2),
                cell(Some(lat_over), 1),
                cell(Some(bw), 3),
                cell(Some(raw_bw), 3),
                cell(Some(bw_loss), 1),
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
        "commit": command_text("git", &["rev-parse", "HEAD"]),
        "date": command_text("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "runs": runs,
        "quick": quick,
        "target": {"lat_overhead_pct_max": 10, "bw_loss_pct_max": 5},
        "rows": rows,
    });
    report::write_json(&out_path, &value)?;
    println!("wrote {}", out_path.display());
    Ok(())
}
