//! `fabric-node`: one process of a multi-process fabric scenario. It is a test and diagnostic
//! tool, not part of the runtime: `fabric/tests/multiprocess.rs` starts several of them on one
//! machine, and an engineer can run the same scenarios by hand to check a provider.
//!
//! ```text
//! fabric-node <scenario> --provider <tcp|shm|...> --bootstrap <ip:port> --rank <r> --size <n>
//!             [--endpoints <k>] [--bytes <n>] [--chunk <n>] [--window <n>] [--iters <n>]
//!             [--deadline-secs <s>]
//! ```
//!
//! Every rank connects to a [`fabric::bootstrap::BootstrapServer`] (started by the test, or by
//! hand with any program that runs one) and swaps endpoint addresses and region descriptors
//! with the other ranks. Scenarios:
//!
//! | scenario     | ranks | what happens |
//! |--------------|-------|--------------|
//! | `bulk`       | 2     | rank 1 writes `--bytes` (chunks of `--chunk`, `--window` in flight) into rank 0's region; rank 0 verifies every word; rank 1 reads it all back and verifies |
//! | `fetch-add`  | any   | `--endpoints` endpoints per rank fetch-add `--iters` times on one counter owned by rank 0; rank 0 checks the final value and that the fetched values form one chain |
//! | `lock`       | any   | every rank takes a compare-swap spin lock in rank 0's memory `--iters` times and read-modify-writes a multi-word record with RMA; rank 0 checks the record |
//! | `errors`     | 2     | rank 1 makes out-of-bounds and forged-key accesses to rank 0; every one must fail, none may hang, rank 0's memory must be untouched |
//! | `kill`       | 2     | rank 1 streams writes to rank 0 until an operation fails (the test SIGKILLs rank 0 after `krun-event transferring`) |
//! | `messages`   | any   | every rank sends tagged messages to every other rank, then ranks 0 and 1 ping-pong; senders must be named |
//! | `visibility` | 2     | rank 1 writes block N into rank 0, waits for its completion, then sends "seq N"; rank 0 must already see block N |
//!
//! Results are printed on stdout as `krun-result key=value` lines (and `krun-event ...` lines
//! for progress); problems go to stderr. The exit code is 0 on success, 1 when a check failed,
//! 2 on bad arguments and 3 when the `--deadline-secs` watchdog fired.
//!
//! Configuration of the endpoints comes from `KRUN_FABRIC_*` on top of the provider given on
//! the command line (e.g. `KRUN_FABRIC_TIMEOUT_MS=2500`).
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use fabric::bootstrap::BootstrapClient;
use fabric::{
    open, Completion, Endpoint, EndpointAddress, FabricConfig, FabricError, MemoryRegion, PeerId,
    Provider, ProviderChoice, Region, RemoteRegion,
};

type Res<T> = std::result::Result<T, String>;

/// Adds context to fabric errors.
trait Context<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T> Context<T> for fabric::Result<T> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// A test and bench driver: one rank of a fabric scenario between processes.
#[derive(Debug, Parser)]
#[command(name = "fabric-node", version)]
struct Args {
    /// What to run.
    #[arg(value_enum)]
    scenario: Scenario,
    /// The provider (a named one, not auto).
    #[arg(long, value_parser = provider)]
    provider: Provider,
    /// The bootstrap service the ranks swap addresses through.
    #[arg(long, value_name = "IP:PORT")]
    bootstrap: SocketAddr,
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    size: usize,
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    endpoints: usize,
    #[arg(long, default_value_t = 1 << 30)]
    bytes: usize,
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(8..))]
    chunk: usize,
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    window: usize,
    #[arg(long, default_value_t = 1000)]
    iters: usize,
    /// The process ends (exit 3) after this long, so a hang cannot stall a test run.
    #[arg(long = "deadline-secs", value_name = "S", default_value = "120", value_parser = deadline_secs)]
    deadline: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Bulk,
    FetchAdd,
    Lock,
    Errors,
    Kill,
    Messages,
    Visibility,
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = clap::ValueEnum::to_possible_value(self).map(|v| v.get_name().to_string());
        f.write_str(&name.unwrap_or_default())
    }
}

fn provider(v: &str) -> Res<Provider> {
    match v.parse::<ProviderChoice>().map_err(|e| e.to_string())? {
        ProviderChoice::Exactly(p) => Ok(p),
        ProviderChoice::Auto => Err("name a provider, not auto".into()),
    }
}

fn deadline_secs(v: &str) -> Res<Duration> {
    v.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{v:?} is not a number of seconds"))
}

fn parse_args() -> Res<Args> {
    let args = Args::parse();
    if args.size == 0 || args.rank >= args.size {
        return Err(format!(
            "rank {} of size {} is not valid",
            args.rank, args.size
        ));
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fabric-node: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = args.deadline;
    let who = format!("fabric-node {} rank {}", args.scenario, args.rank);
    {
        let who = who.clone();
        // The watchdog: a scenario that hangs ends the process instead of the test run.
        std::thread::spawn(move || {
            std::thread::sleep(deadline);
            eprintln!("{who}: deadline of {deadline:?} reached, exiting");
            std::process::exit(3);
        });
    }
    let result = match args.scenario {
        Scenario::Bulk => bulk(&args),
        Scenario::FetchAdd => fetch_add(&args),
        Scenario::Lock => lock(&args),
        Scenario::Errors => errors(&args),
        Scenario::Kill => kill(&args),
        Scenario::Messages => messages(&args),
        Scenario::Visibility => visibility(&args),
    };
    let _ = std::io::stdout().flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{who}: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

/// Prints one result line for the test to parse.
fn report(key: &str, value: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "krun-result {key}={value}");
    let _ = out.flush();
}

fn event(what: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "krun-event {what}");
    let _ = out.flush();
}

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Res<()> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// The variant name of an error, for reports.
fn kind(e: &FabricError) -> &'static str {
    match e {
        FabricError::UnknownProvider(_) => "UnknownProvider",
        FabricError::ProviderUnavailable { .. } => "ProviderUnavailable",
        FabricError::BadConfig { .. } => "BadConfig",
        FabricError::Call { .. } => "Call",
        FabricError::BadAddress(_) => "BadAddress",
        FabricError::ProviderMismatch { .. } => "ProviderMismatch",
        FabricError::UnknownPeer(_) => "UnknownPeer",
        FabricError::Registration { .. } => "Registration",
        FabricError::OutOfBounds { .. } => "OutOfBounds",
        FabricError::Misaligned(_) => "Misaligned",
        FabricError::Remote { .. } => "Remote",
        FabricError::RemoteAccess { .. } => "RemoteAccess",
        FabricError::Timeout { .. } => "Timeout",
        FabricError::RecvTimeout { .. } => "RecvTimeout",
        FabricError::MessageTooLarge { .. } => "MessageTooLarge",
        FabricError::Closed => "Closed",
        FabricError::Bootstrap(_) => "Bootstrap",
        FabricError::Io { .. } => "Io",
        FabricError::WireMalformed { .. } => "WireMalformed",
        FabricError::WireTooLarge { .. } => "WireTooLarge",
        FabricError::WireAuth { .. } => "WireAuth",
        FabricError::WireReplay { .. } => "WireReplay",
        FabricError::WireRefused { .. } => "WireRefused",
        FabricError::WireClosed { .. } => "WireClosed",
        FabricError::Random(_) => "Random",
    }
}

/// The peer an error names, if any.
fn peer_of(e: &FabricError) -> Option<PeerId> {
    match e {
        FabricError::Remote { peer, .. }
        | FabricError::RemoteAccess { peer, .. }
        | FabricError::Timeout { peer, .. } => Some(*peer),
        FabricError::UnknownPeer(p) => Some(*p),
        _ => None,
    }
}

/// A cheap pattern, a bijection of the byte offset of each 64-bit word (for a given seed).
fn pattern(seed: u64, offset: u64) -> u64 {
    (offset ^ seed.rotate_left(40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed
}

/// Fills `len` bytes (a multiple of 8) of `region` at `base` with the pattern of `seed`,
/// the pattern's offsets starting at `pattern_base`.
///
/// Safety contract (checked by the caller's scenario): nobody else accesses the range.
fn fill_pattern(region: &Region, base: usize, len: usize, seed: u64, pattern_base: u64) -> Res<()> {
    ensure(
        base.is_multiple_of(8) && len.is_multiple_of(8) && base + len <= region.len(),
        || format!("fill {base}+{len} is not word aligned or out of bounds"),
    )?;
    // SAFETY: bounds checked above; the scenario guarantees no remote access meanwhile.
    let bytes = unsafe { &mut region.as_mut_slice()[base..base + len] };
    // SAFETY: any bit pattern is a valid u64; align_to handles the alignment.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<u64>() };
    ensure(head.is_empty() && tail.is_empty(), || {
        "region is not 8-byte aligned".into()
    })?;
    for (i, w) in words.iter_mut().enumerate() {
        *w = pattern(seed, pattern_base + 8 * i as u64);
    }
    Ok(())
}

/// Counts words of `region[base..base+len]` that differ from the pattern; returns the count
/// and the first bad offset (relative to `pattern_base`) with the value found there.
fn check_pattern(
    region: &Region,
    base: usize,
    len: usize,
    seed: u64,
    pattern_base: u64,
) -> Res<(u64, Option<(u64, u64)>)> {
    ensure(
        base.is_multiple_of(8) && len.is_multiple_of(8) && base + len <= region.len(),
        || format!("check {base}+{len} is not word aligned or out of bounds"),
    )?;
    // SAFETY: bounds checked; the scenario guarantees nobody writes the range meanwhile.
    let bytes = unsafe { &region.as_slice()[base..base + len] };
    // SAFETY: any bit pattern is a valid u64.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    ensure(head.is_empty() && tail.is_empty(), || {
        "region is not 8-byte aligned".into()
    })?;
    let mut bad = 0u64;
    let mut first = None;
    for (i, &w) in words.iter().enumerate() {
        let off = pattern_base + 8 * i as u64;
        if w != pattern(seed, off) {
            bad += 1;
            first.get_or_insert((off, w));
        }
    }
    Ok((bad, first))
}

/// Encodes a list of byte strings as one blob: `(u32 len | bytes)*`.
fn encode(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in items {
        out.extend_from_slice(&(i.len() as u32).to_le_bytes());
        out.extend_from_slice(i);
    }
    out
}

fn decode(blob: &[u8]) -> Res<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < blob.len() {
        let len = blob
            .get(pos..pos + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or("truncated blob")?;
        pos += 4;
        out.push(
            blob.get(pos..pos + len)
                .ok_or("truncated blob item")?
                .to_vec(),
        );
        pos += len;
    }
    Ok(out)
}

/// One process of a scenario: its bootstrap connection and endpoint configuration.
struct Node {
    boot: BootstrapClient,
    config: FabricConfig,
    rank: usize,
    size: usize,
}

impl Node {
    fn start(args: &Args, min_size: usize, max_size: usize) -> Res<Node> {
        ensure(args.size >= min_size && args.size <= max_size, || {
            format!(
                "scenario {} needs {min_size}..={max_size} ranks, got {}",
                args.scenario, args.size
            )
        })?;
        let config = FabricConfig::with_provider(args.provider)
            .with_env()
            .ctx("configuration")?;
        // The provider named on the command line wins over KRUN_FABRIC_PROVIDER.
        let config = FabricConfig {
            provider: ProviderChoice::Exactly(args.provider),
            ..config
        };
        let boot = BootstrapClient::connect(
            args.bootstrap,
            args.rank,
            args.size,
            Duration::from_secs(120),
        )
        .ctx("bootstrap connect")?;
        Ok(Node {
            boot,
            config,
            rank: args.rank,
            size: args.size,
        })
    }

    fn open(&self) -> Res<Box<dyn Endpoint>> {
        open(&self.config).ctx("opening the endpoint")
    }

    /// All-gathers every rank's list of items.
    fn exchange(&mut self, items: &[Vec<u8>]) -> Res<Vec<Vec<Vec<u8>>>> {
        let all = self
            .boot
            .allgather(&encode(items))
            .ctx("bootstrap all-gather")?;
        all.iter().map(|b| decode(b)).collect()
    }

    fn barrier(&mut self) -> Res<()> {
        self.boot.barrier().ctx("bootstrap barrier")
    }
}

fn address(bytes: &[u8]) -> Res<EndpointAddress> {
    EndpointAddress::from_bytes(bytes).ctx("peer address")
}

fn descriptor(bytes: &[u8]) -> Res<RemoteRegion> {
    RemoteRegion::from_bytes(bytes).ctx("region descriptor")
}

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

fn gbps(bytes: usize, d: Duration) -> String {
    format!("{:.2}", bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9)
}

/// Posts operations through a window of at most `window` in flight; `post(i)` posts the i-th.
fn windowed(
    count: usize,
    window: usize,
    mut post: impl FnMut(usize) -> fabric::Result<Completion>,
) -> fabric::Result<()> {
    let mut in_flight: VecDeque<Completion> = VecDeque::with_capacity(window);
    let mut first_error = None;
    for i in 0..count {
        if in_flight.len() >= window {
            if let Err(e) = in_flight.pop_front().expect("non-empty").wait() {
                first_error.get_or_insert(e);
                break;
            }
        }
        match post(i) {
            Ok(c) => in_flight.push_back(c),
            Err(e) => {
                first_error.get_or_insert(e);
                break;
            }
        }
    }
    // Every posted operation is waited for, even after an error.
    for c in in_flight {
        if let Err(e) = c.wait() {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

// ---------------------------------------------------------------------------------------
// bulk: a large region written, verified at the target, read back and verified.

fn bulk(args: &Args) -> Res<()> {
    let mut node = Node::start(args, 2, 2)?;
    let ep = node.open()?;
    let bytes = args.bytes.div_ceil(8) * 8;
    let chunk = args.chunk.div_ceil(8) * 8;
    let chunks = bytes.div_ceil(chunk);
    let seed = 0xB01C_u64 ^ args.provider.name().len() as u64;
    if node.rank == 0 {
        let target = ep
            .register(Region::new(bytes).ctx("target region")?)
            .ctx("register target")?;
        // Touch every page first (first touch is slow on these VMs), so the write below
        // measures the fabric rather than page faults.
        let t = Instant::now();
        target.fill(0, bytes, 0).ctx("touching the target")?;
        report("target_touch_s", secs(t.elapsed()));
        node.exchange(&[ep.address().to_bytes(), target.remote().to_bytes().to_vec()])?;
        // Round 2: the writer is done writing.
        node.barrier()?;
        let t = Instant::now();
        let (bad, first) = check_pattern(&target, 0, bytes, seed, 0)?;
        report("target_verify_s", secs(t.elapsed()));
        report("target_verified_bytes", bytes);
        report("target_mismatched_words", bad);
        // Round 3: verdict known; the writer now reads back while we keep serving.
        node.barrier()?;
        // Round 4: the writer is done reading.
        node.barrier()?;
        ensure(bad == 0, || {
            format!("{bad} words differ at the target, first {first:x?}")
        })
    } else {
        let local = ep
            .register(Region::new(bytes).ctx("local region")?)
            .ctx("register local")?;
        let all = node.exchange(&[ep.address().to_bytes()])?;
        let peer = ep.connect(&address(&all[0][0])?).ctx("connect")?;
        let remote = descriptor(&all[0][1])?;
        ensure(remote.len as usize >= bytes, || {
            format!("target region is only {} bytes", remote.len)
        })?;
        let t = Instant::now();
        fill_pattern(&local, 0, bytes, seed, 0)?;
        report("fill_s", secs(t.elapsed()));
        let range = |i: usize| (i * chunk, chunk.min(bytes - i * chunk));
        let t = Instant::now();
        windowed(chunks, args.window, |i| {
            let (off, len) = range(i);
            // SAFETY: the local buffer is not written while writes are in flight; the target
            // does not touch its region until the barrier after all completions.
            unsafe { ep.post_write(peer, &local, off, len, &remote, off as u64) }
        })
        .ctx("writing")?;
        let write_time = t.elapsed();
        report("write_s", secs(write_time));
        report("write_gbps", gbps(bytes, write_time));
        node.barrier()?;
        node.barrier()?;
        // Overwrite the local copy so the read-back has to bring every byte.
        local.fill(0, bytes, 0xA5).ctx("clearing local")?;
        let t = Instant::now();
        let read = windowed(chunks, args.window, |i| {
            let (off, len) = range(i);
            // SAFETY: we do not touch `local` until every read has completed; nobody writes the
            // remote region any more.
            unsafe { ep.post_read(peer, &local, off, len, &remote, off as u64) }
        });
        let read_time = t.elapsed();
        node.barrier()?;
        read.ctx("reading back")?;
        report("read_s", secs(read_time));
        report("read_gbps", gbps(bytes, read_time));
        let t = Instant::now();
        let (bad, first) = check_pattern(&local, 0, bytes, seed, 0)?;
        report("readback_verify_s", secs(t.elapsed()));
        report("readback_mismatched_words", bad);
        report("chunks", chunks);
        ensure(bad == 0, || {
            format!("{bad} words differ after read-back, first {first:x?}")
        })
    }
}

// ---------------------------------------------------------------------------------------
// fetch-add: many endpoints on one counter.

fn fetch_add(args: &Args) -> Res<()> {
    let mut node = Node::start(args, 1, 64)?;
    let owner = if node.rank == 0 {
        Some(node.open()?)
    } else {
        None
    };
    let counter = match &owner {
        Some(ep) => Some(
            ep.register(Region::new(4096).ctx("counter region")?)
                .ctx("register counter")?,
        ),
        None => None,
    };
    let workers: Vec<Box<dyn Endpoint>> = (0..args.endpoints)
        .map(|_| node.open())
        .collect::<Res<_>>()?;
    let mut items = Vec::new();
    if let (Some(ep), Some(c)) = (&owner, &counter) {
        items.push(ep.address().to_bytes());
        items.push(c.remote().to_bytes().to_vec());
    }
    let all = node.exchange(&items)?;
    let owner_addr = address(&all[0][0])?;
    let remote = descriptor(&all[0][1])?;
    let first_index = node.rank * args.endpoints;
    let total_endpoints = node.size * args.endpoints;
    let t = Instant::now();
    let results: Vec<Res<Vec<(u64, u64)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .enumerate()
            .map(|(i, ep)| {
                let owner_addr = owner_addr.clone();
                s.spawn(move || -> Res<Vec<(u64, u64)>> {
                    let peer = ep.connect(&owner_addr).ctx("connect to the owner")?;
                    // Distinct increments per endpoint make the chain check meaningful.
                    let add = (first_index + i + 1) as u64;
                    let mut pending: VecDeque<Completion> = VecDeque::new();
                    let mut seen = Vec::with_capacity(args.iters);
                    for _ in 0..args.iters {
                        if pending.len() >= args.window {
                            seen.push((
                                pending
                                    .pop_front()
                                    .expect("non-empty")
                                    .wait()
                                    .ctx("fetch-add")?,
                                add,
                            ));
                        }
                        pending.push_back(
                            ep.post_fetch_add(peer, &remote, 0, add)
                                .ctx("posting fetch-add")?,
                        );
                    }
                    for c in pending {
                        seen.push((c.wait().ctx("fetch-add")?, add));
                    }
                    Ok(seen)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("worker thread panicked".into()))
            })
            .collect()
    });
    let elapsed = t.elapsed();
    let mut mine = Vec::new();
    let mut failure = None;
    for r in results {
        match r {
            Ok(v) => mine.extend(v),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    report("ops", mine.len());
    report("ops_s", secs(elapsed));
    // Everyone sends its (previous, add) pairs to the owner, even after a failure.
    let blob: Vec<u8> = mine
        .iter()
        .flat_map(|(p, a)| p.to_le_bytes().into_iter().chain(a.to_le_bytes()))
        .collect();
    let gathered = node.exchange(&[blob])?;
    if let Some(e) = failure {
        return Err(e);
    }
    let Some(counter) = counter else {
        return Ok(());
    };
    let mut pairs = Vec::new();
    for (rank, items) in gathered.iter().enumerate() {
        let b = items
            .first()
            .ok_or_else(|| format!("rank {rank} sent no results"))?;
        ensure(b.len() % 16 == 0, || {
            format!("rank {rank} sent {} bytes of results", b.len())
        })?;
        for p in b.chunks_exact(16) {
            let word =
                |r: std::ops::Range<usize>| u64::from_le_bytes(p[r].try_into().expect("8 bytes"));
            pairs.push((word(0..8), word(8..16)));
        }
    }
    let expected_ops = total_endpoints * args.iters;
    let expected: u64 = (1..=total_endpoints as u64)
        .map(|a| a * args.iters as u64)
        .sum();
    let fin = counter.atomic_u64(0).ctx("counter")?.load(Ordering::SeqCst);
    report("endpoints", total_endpoints);
    report("total_ops", pairs.len());
    report("final", fin);
    report("expected", expected);
    ensure(pairs.len() == expected_ops, || {
        format!("{} results, expected {expected_ops}", pairs.len())
    })?;
    ensure(fin == expected, || {
        format!("counter is {fin}, expected {expected}")
    })?;
    // Atomicity: sorted by fetched value, each operation saw exactly the sum of the ones before.
    pairs.sort_unstable();
    let mut running = 0u64;
    for (i, &(prev, add)) in pairs.iter().enumerate() {
        ensure(prev == running, || {
            format!("operation {i} in fetch order saw {prev}, expected {running}: an update was lost or duplicated")
        })?;
        running += add;
    }
    report("chain", "ok");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// lock: a compare-swap spin lock protecting a record read and written with RMA.

const LOCK_OFFSET: u64 = 0;
const RECORD_OFFSET: u64 = 64;
const RECORD_WORDS: usize = 8;

/// Word k (k >= 2) of a record whose counter is `c`.
fn record_word(c: u64, k: usize) -> u64 {
    pattern(c, k as u64 * 8)
}

/// Checks a record: `[counter, last holder, derived words...]`.
fn record_consistent(words: &[u64], holders: u64) -> std::result::Result<(), String> {
    let c = words[0];
    if c == 0 && words[1] != 0 || c > 0 && (words[1] == 0 || words[1] > holders) {
        return Err(format!("record counter {c} with holder {}", words[1]));
    }
    for (k, &w) in words.iter().enumerate().skip(2) {
        let want = if c == 0 { 0 } else { record_word(c, k) };
        if w != want {
            return Err(format!(
                "record word {k} is {w:#x}, expected {want:#x} for counter {c} (torn record)"
            ));
        }
    }
    Ok(())
}

fn lock(args: &Args) -> Res<()> {
    let mut node = Node::start(args, 1, 64)?;
    let owner = if node.rank == 0 {
        Some(node.open()?)
    } else {
        None
    };
    let shared = match &owner {
        Some(ep) => Some(
            ep.register(Region::new(4096).ctx("shared region")?)
                .ctx("register shared")?,
        ),
        None => None,
    };
    let ep = node.open()?;
    let mut items = Vec::new();
    if let (Some(o), Some(s)) = (&owner, &shared) {
        items.push(o.address().to_bytes());
        items.push(s.remote().to_bytes().to_vec());
    }
    let all = node.exchange(&items)?;
    let peer = ep
        .connect(&address(&all[0][0])?)
        .ctx("connect to the owner")?;
    let remote = descriptor(&all[0][1])?;
    let local = ep
        .register(Region::new(4096).ctx("local record")?)
        .ctx("register local")?;
    let me = node.rank as u64 + 1;
    let holders = node.size as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut contended = 0u64;
    let mut last_seen = 0u64;
    let t = Instant::now();
    let mut work = || -> Res<()> {
        for it in 0..args.iters {
            let mut spins = 0u32;
            loop {
                let prev = ep
                    .compare_swap(peer, &remote, LOCK_OFFSET, 0, me)
                    .ctx("lock compare-swap")?;
                if prev == 0 {
                    break;
                }
                ensure(prev <= holders, || {
                    format!("lock word holds {prev}, not a rank id")
                })?;
                ensure(Instant::now() < deadline, || {
                    format!("iteration {it}: lock still held by {prev} after 60 s")
                })?;
                contended += 1;
                spins += 1;
                // Back off so the holder (maybe on the same core) can finish.
                if spins < 4 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(20 * u64::from(spins.min(50))));
                }
            }
            // SAFETY: `local` is ours alone; the record is protected by the lock we hold.
            unsafe { ep.read(peer, &local, 0, RECORD_WORDS * 8, &remote, RECORD_OFFSET) }
                .ctx("record read")?;
            let mut words = [0u64; RECORD_WORDS];
            for (k, w) in words.iter_mut().enumerate() {
                *w = local
                    .atomic_u64(k * 8)
                    .ctx("local word")?
                    .load(Ordering::Acquire);
            }
            record_consistent(&words, holders)
                .map_err(|e| format!("iteration {it}, under the lock: {e}"))?;
            ensure(words[0] >= last_seen, || {
                format!(
                    "counter went back from {last_seen} to {} (a write was lost)",
                    words[0]
                )
            })?;
            let c = words[0] + 1;
            last_seen = c;
            local
                .atomic_u64(0)
                .ctx("local word")?
                .store(c, Ordering::Release);
            local
                .atomic_u64(8)
                .ctx("local word")?
                .store(me, Ordering::Release);
            for k in 2..RECORD_WORDS {
                local
                    .atomic_u64(k * 8)
                    .ctx("local word")?
                    .store(record_word(c, k), Ordering::Release);
            }
            // Two writes, tail first: a broken lock shows up as a torn record.
            let half = RECORD_WORDS / 2 * 8;
            // SAFETY: as above; each write completes (visible at the owner) before the next step.
            unsafe {
                ep.write(
                    peer,
                    &local,
                    half,
                    half,
                    &remote,
                    RECORD_OFFSET + half as u64,
                )
                .ctx("record write (tail)")?;
                ep.write(peer, &local, 0, half, &remote, RECORD_OFFSET)
                    .ctx("record write (head)")?;
            }
            let prev = ep
                .compare_swap(peer, &remote, LOCK_OFFSET, me, 0)
                .ctx("unlock compare-swap")?;
            ensure(prev == me, || {
                format!("iteration {it}: unlocking found {prev} in the lock, not {me}")
            })?;
        }
        Ok(())
    };
    let outcome = work();
    report("iterations", args.iters);
    report("contended_attempts", contended);
    report("lock_s", secs(t.elapsed()));
    let verdicts = node.exchange(&[vec![outcome.is_ok() as u8]])?;
    outcome?;
    let Some(shared) = shared else { return Ok(()) };
    ensure(
        verdicts
            .iter()
            .all(|v| v.first().map(|b| b.as_slice()) == Some(&[1u8][..])),
        || "another rank failed".into(),
    )?;
    let lock_word = shared
        .atomic_u64(LOCK_OFFSET as usize)
        .ctx("lock word")?
        .load(Ordering::SeqCst);
    let mut words = [0u64; RECORD_WORDS];
    for (k, w) in words.iter_mut().enumerate() {
        *w = shared
            .atomic_u64(RECORD_OFFSET as usize + k * 8)
            .ctx("record")?
            .load(Ordering::SeqCst);
    }
    let expected = (node.size * args.iters) as u64;
    report("final_counter", words[0]);
    report("expected", expected);
    report("final_lock", lock_word);
    ensure(lock_word == 0, || {
        format!("lock still held by {lock_word} at the end")
    })?;
    record_consistent(&words, holders).map_err(|e| format!("final record: {e}"))?;
    ensure(words[0] == expected, || {
        format!("counter is {}, expected {expected}", words[0])
    })
}

// ---------------------------------------------------------------------------------------
// errors: out-of-bounds and forged keys across processes.

const ERR_REGION: usize = 1 << 16;

fn errors(args: &Args) -> Res<()> {
    let mut node = Node::start(args, 2, 2)?;
    let ep = node.open()?;
    let seed = 0xE4404;
    if node.rank == 0 {
        let target = ep
            .register(Region::new(ERR_REGION).ctx("target")?)
            .ctx("register")?;
        fill_pattern(&target, 0, ERR_REGION, seed, 0)?;
        node.exchange(&[ep.address().to_bytes(), target.remote().to_bytes().to_vec()])?;
        // The initiator probes; then it writes one good block at 0..4096 with seed + 1.
        node.barrier()?;
        let (bad_head, _) = check_pattern(&target, 0, 4096, seed + 1, 0)?;
        let (bad_rest, first) = check_pattern(&target, 4096, ERR_REGION - 4096, seed, 4096)?;
        report("target_good_write_mismatches", bad_head);
        report("target_untouched_mismatches", bad_rest);
        node.barrier()?;
        ensure(bad_head == 0, || {
            "the valid write after the errors did not land".into()
        })?;
        ensure(bad_rest == 0, || {
            format!("{bad_rest} words changed by rejected accesses, first {first:x?}")
        })
    } else {
        let all = node.exchange(&[ep.address().to_bytes()])?;
        let target_addr = address(&all[0][0])?;
        let peer = ep.connect(&target_addr).ctx("connect")?;
        let r = descriptor(&all[0][1])?;
        let local = ep
            .register(Region::new(ERR_REGION).ctx("local")?)
            .ctx("register")?;
        let bound = ep.op_timeout() + Duration::from_secs(5);
        let mut problems = Vec::new();
        // Runs one probe, reports its outcome and time, and checks the error it gave.
        let mut probe = |name: &str,
                         expected_peer: PeerId,
                         accept: &dyn Fn(&FabricError) -> bool,
                         f: &mut dyn FnMut() -> fabric::Result<u64>| {
            let t = Instant::now();
            let r = f();
            let took = t.elapsed();
            match &r {
                Ok(v) => {
                    report(name, format!("ok({v})"));
                    problems.push(format!("{name} succeeded"));
                }
                Err(e) => {
                    report(name, kind(e));
                    report(&format!("{name}_message"), e.to_string().replace('\n', " "));
                    if !accept(e) {
                        problems.push(format!("{name}: unexpected error {e}"));
                    }
                    if let Some(p) = peer_of(e) {
                        if p != expected_peer {
                            problems
                                .push(format!("{name}: error names {p}, expected {expected_peer}"));
                        }
                    }
                }
            }
            report(&format!("{name}_ms"), took.as_millis());
            if took > bound {
                problems.push(format!("{name} took {took:?}, more than {bound:?}"));
            }
        };
        let oob_remote =
            |e: &FabricError| matches!(e, FabricError::OutOfBounds { what: "remote", .. });
        let oob_local =
            |e: &FabricError| matches!(e, FabricError::OutOfBounds { what: "local", .. });
        let remote_failure = |e: &FabricError| {
            matches!(
                e,
                FabricError::RemoteAccess { .. }
                    | FabricError::Remote { .. }
                    | FabricError::Timeout { .. }
            )
        };
        // Rejected locally, before anything is sent.
        // SAFETY (all probes): only our own buffers are used locally; rejected or failing
        // accesses leave them alone, and nothing else uses them.
        probe("oob_remote_write", peer, &oob_remote, &mut || unsafe {
            ep.write(peer, &local, 0, 64, &r, r.len - 32).map(|_| 0)
        });
        probe("oob_remote_read", peer, &oob_remote, &mut || unsafe {
            ep.read(peer, &local, 0, 16, &r, u64::MAX - 4).map(|_| 0)
        });
        probe("oob_local_read", peer, &oob_local, &mut || unsafe {
            ep.read(peer, &local, ERR_REGION - 8, 64, &r, 0).map(|_| 0)
        });
        probe("oob_atomic", peer, &oob_remote, &mut || {
            ep.fetch_add(peer, &r, r.len, 1)
        });
        probe(
            "misaligned_atomic",
            peer,
            &|e| matches!(e, FabricError::Misaligned(12)),
            &mut || ep.compare_swap(peer, &r, 12, 0, 1),
        );
        // A forged key goes to the target, which must reject it. A provider may leave the
        // endpoint (or its connection) unusable afterwards, as an RC queue pair goes to the
        // error state: every forged probe runs on an endpoint of its own, and whether the
        // first endpoint still works is reported, not required.
        let forged = RemoteRegion {
            key: r.key ^ 0x5a5a_0000_1234_0001,
            ..r
        };
        probe("forged_key_write", peer, &remote_failure, &mut || unsafe {
            ep.write(peer, &local, 0, 4096, &forged, 8192).map(|_| 0)
        });
        // SAFETY: local 0..4096 is ours alone.
        let same = unsafe { ep.write(peer, &local, 0, 8, &r, 8) };
        report(
            "same_endpoint_after_forged_key",
            same.as_ref().map_or_else(|e| kind(e), |_| "ok"),
        );
        let fresh = || -> Res<(Box<dyn Endpoint>, PeerId, MemoryRegion)> {
            let e = open(&node.config).ctx("opening another endpoint")?;
            let p = e.connect(&target_addr).ctx("connect")?;
            let l = e
                .register(Region::new(ERR_REGION).ctx("local")?)
                .ctx("register")?;
            Ok((e, p, l))
        };
        let (e1, p1, l1) = fresh()?;
        probe("forged_key_read", p1, &remote_failure, &mut || unsafe {
            e1.read(p1, &l1, 0, 4096, &forged, 8192).map(|_| 0)
        });
        let (e2, p2, _) = fresh()?;
        probe("forged_key_fetch_add", p2, &remote_failure, &mut || {
            e2.fetch_add(p2, &forged, 12288, 1)
        });
        let (e3, p3, _) = fresh()?;
        probe("forged_key_compare_swap", p3, &remote_failure, &mut || {
            e3.compare_swap(p3, &forged, 12296, pattern(seed, 12296), 1)
        });
        // The target still serves a new endpoint correctly.
        let (good_ep, gp, gl) = fresh()?;
        fill_pattern(&gl, 0, 4096, seed + 1, 0)?;
        // SAFETY: gl 0..4096 is not touched until the write completes.
        let good = unsafe { good_ep.write(gp, &gl, 0, 4096, &r, 0) };
        report(
            "good_write_after_errors",
            good.as_ref().map_or_else(|e| kind(e), |_| "ok"),
        );
        if let Err(e) = good {
            problems.push(format!(
                "a valid write from a new endpoint after the errors failed: {e}"
            ));
        }
        // SAFETY: gl 8192.. is ours alone.
        let back = unsafe { good_ep.read(gp, &gl, 8192, 4096, &r, 4096) };
        report(
            "good_read_after_errors",
            back.as_ref().map_or_else(|e| kind(e), |_| "ok"),
        );
        match back {
            Ok(()) => {
                let (bad, _) = check_pattern(&gl, 8192, 4096, seed, 4096)?;
                if bad > 0 {
                    problems.push(format!("read after errors returned {bad} wrong words"));
                }
            }
            Err(e) => problems.push(format!(
                "a valid read from a new endpoint after the errors failed: {e}"
            )),
        }
        node.barrier()?;
        node.barrier()?;
        let t = Instant::now();
        drop((e1, e2, e3, ep));
        report("close_ms", t.elapsed().as_millis());
        ensure(problems.is_empty(), || problems.join("; "))
    }
}

// ---------------------------------------------------------------------------------------
// kill: the target dies in the middle of a transfer.

const DONE_TAG: u64 = 0x444f_4e45;

fn kill(args: &Args) -> Res<()> {
    let mut node = Node::start(args, 3, 3)?;
    let ep = node.open()?;
    let bytes = args.bytes.div_ceil(args.chunk) * args.chunk;
    match node.rank {
        // The victim: serves writes until it is killed.
        0 => {
            let target = ep
                .register(Region::new(bytes).ctx("target")?)
                .ctx("register")?;
            node.exchange(&[ep.address().to_bytes(), target.remote().to_bytes().to_vec()])?;
            event("ready");
            // The progress thread serves; the watchdog bounds this.
            loop {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // A bystander that stays alive: the initiator must still reach it after the kill.
        2 => {
            let counter = ep
                .register(Region::new(4096).ctx("counter")?)
                .ctx("register")?;
            let all = node.exchange(&[
                ep.address().to_bytes(),
                counter.remote().to_bytes().to_vec(),
            ])?;
            let initiator = ep.connect(&address(&all[1][0])?).ctx("connect")?;
            event("ready");
            let m = ep
                .recv(DONE_TAG, Duration::from_secs(150))
                .ctx("waiting for the initiator")?;
            let value = counter.atomic_u64(0).ctx("counter")?.load(Ordering::SeqCst);
            report(
                "done_from",
                m.peer.map_or("none".to_string(), |p| p.to_string()),
            );
            report("counter", value);
            ensure(m.peer == Some(initiator), || {
                format!("done message names {:?}", m.peer)
            })?;
            return ensure(value == 1, || format!("counter is {value}, expected 1"));
        }
        _ => {}
    }
    let all = node.exchange(&[ep.address().to_bytes()])?;
    let peer = ep.connect(&address(&all[0][0])?).ctx("connect")?;
    let remote = descriptor(&all[0][1])?;
    let live = ep.connect(&address(&all[2][0])?).ctx("connect")?;
    let live_counter = descriptor(&all[2][1])?;
    let local = ep
        .register(Region::new(args.chunk * args.window).ctx("local")?)
        .ctx("register")?;
    local.fill(0, local.len(), 0x3c).ctx("fill")?;
    report("peer", peer);
    report("op_timeout_ms", ep.op_timeout().as_millis());
    let chunks = bytes / args.chunk;
    let start = Instant::now();
    let give_up = start + Duration::from_secs(60);
    let mut pending: VecDeque<Completion> = VecDeque::new();
    let mut done_bytes = 0usize;
    let mut announced = false;
    let mut first_error: Option<FabricError> = None;
    let mut posted = 0usize;
    // Bounded: at most 60 s and 1M operations.
    while first_error.is_none() && Instant::now() < give_up && posted < 1 << 20 {
        if pending.len() >= args.window {
            match pending.pop_front().expect("non-empty").wait() {
                Ok(_) => done_bytes += args.chunk,
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
            if !announced && done_bytes >= 4 * args.chunk * args.window {
                announced = true;
                event("transferring");
                if args.provider == Provider::Shm {
                    // libfabric 1.17 shm: a post towards a peer that dies holding its region
                    // lock spins forever inside the provider, so the peer is killed while we
                    // are between operations; our next post must then fail at once.
                    for c in pending.drain(..) {
                        c.wait()
                            .map_err(|e| format!("before the quiet window: {e}"))?;
                    }
                    event("quiet");
                    std::thread::sleep(Duration::from_millis(1500));
                }
            }
        }
        let slot = posted % args.window;
        let at = ((posted % chunks) * args.chunk) as u64;
        // SAFETY: the local buffer is only read by the writes; we never write it meanwhile.
        match unsafe { ep.post_write(peer, &local, slot * args.chunk, args.chunk, &remote, at) } {
            Ok(c) => pending.push_back(c),
            Err(e) => first_error = Some(e),
        }
        posted += 1;
    }
    let error_after = start.elapsed();
    event("failed");
    report("posted", posted);
    report("completed_bytes", done_bytes);
    let Some(e) = first_error else {
        return Err(format!("no operation failed within {:?}", give_up - start));
    };
    report("first_error", kind(&e));
    report(
        "first_error_peer",
        peer_of(&e).map_or("none".to_string(), |p| p.to_string()),
    );
    report("first_error_message", e.to_string().replace('\n', " "));
    // Every other operation in flight must end too.
    let (mut drained_ok, mut drained_err) = (0usize, 0usize);
    let drain_start = Instant::now();
    for c in pending {
        match c.wait() {
            Ok(_) => drained_ok += 1,
            Err(_) => drained_err += 1,
        }
    }
    event("drained");
    report("drained_ok", drained_ok);
    report("drained_err", drained_err);
    report("drain_ms", drain_start.elapsed().as_millis());
    // A new operation to the dead peer fails too, within a bounded time.
    let t = Instant::now();
    let after = ep.fetch_add(peer, &remote, 0, 1);
    report(
        "after_kill_fetch_add",
        after.as_ref().map_or_else(|e| kind(e), |_| "ok"),
    );
    report("after_kill_fetch_add_ms", t.elapsed().as_millis());
    // The dead peer does not take the endpoint down: the live peer is still served.
    let t = Instant::now();
    let live_op = ep.fetch_add(live, &live_counter, 0, 1);
    report(
        "live_peer_fetch_add",
        live_op
            .as_ref()
            .map_or_else(|e| kind(e), |v| if *v == 0 { "ok" } else { "wrong" }),
    );
    report("live_peer_fetch_add_ms", t.elapsed().as_millis());
    let done = ep.send(live, DONE_TAG, b"done");
    report(
        "live_peer_send",
        done.as_ref().map_or_else(|e| kind(e), |_| "ok"),
    );
    let t = Instant::now();
    drop(ep);
    report("close_ms", t.elapsed().as_millis());
    report("error_after_ms", error_after.as_millis());
    ensure(
        matches!(e, FabricError::Remote { .. } | FabricError::Timeout { .. }),
        || format!("unexpected error kind: {e}"),
    )?;
    ensure(peer_of(&e) == Some(peer), || {
        format!("error does not name the peer {peer}: {e}")
    })?;
    ensure(after.is_err(), || {
        "an operation to the dead peer succeeded".into()
    })?;
    match (live_op, done) {
        (Ok(0), Ok(())) => Ok(()),
        (live_op, done) => Err(format!(
            "the live peer is no longer served after another peer died: fetch-add {live_op:?}, send {done:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// messages: tagged messages among all ranks, both ways.

const MSG_TAG_BASE: u64 = 0x4d53_0000;
const PING_TAG: u64 = 0x5049_4e47;
const PONG_TAG: u64 = 0x504f_4e47;

fn msg_payload(from: usize, to: usize, k: usize, max: usize) -> Vec<u8> {
    let head = format!("from {from} to {to} #{k};");
    // Sizes from a few bytes to the maximum message size.
    let len = match k % 4 {
        0 => head.len(),
        1 => 1000,
        2 => 20_000,
        _ => max,
    }
    .max(head.len());
    let mut v = head.into_bytes();
    v.extend((v.len()..len).map(|i| (i * 31 + from * 7 + k) as u8));
    v
}

fn messages(args: &Args) -> Res<()> {
    let mut node = Node::start(args, 2, 64)?;
    let ep = node.open()?;
    let all = node.exchange(&[ep.address().to_bytes()])?;
    // peers[r] is this endpoint's id for rank r (None for ourselves).
    let mut peers = vec![None; node.size];
    for (r, items) in all.iter().enumerate() {
        if r != node.rank {
            peers[r] = Some(ep.connect(&address(&items[0])?).ctx("connect")?);
        }
    }
    // Nobody sends before every receiver knows every sender.
    node.barrier()?;
    let max = node.config.max_message;
    let k_max = args.iters;
    let t = Instant::now();
    for (to, p) in peers.iter().enumerate() {
        if let Some(p) = p {
            for k in 0..k_max {
                ep.send(
                    *p,
                    MSG_TAG_BASE + node.rank as u64,
                    &msg_payload(node.rank, to, k, max),
                )
                .ctx("send")?;
            }
        }
    }
    let timeout = Duration::from_secs(20);
    let mut out_of_order = 0usize;
    for (from, p) in peers.iter().enumerate() {
        let Some(p) = p else { continue };
        let mut got = vec![false; k_max];
        for i in 0..k_max {
            let m = ep.recv(MSG_TAG_BASE + from as u64, timeout).ctx("recv")?;
            ensure(m.peer == Some(*p), || {
                format!("message from rank {from} names {:?}, expected {p}", m.peer)
            })?;
            let head = format!("from {from} to {} #", node.rank);
            let text = String::from_utf8_lossy(&m.data[..m.data.len().min(64)]).into_owned();
            let k: usize = text
                .strip_prefix(&head)
                .and_then(|s| s.split(';').next())
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("unexpected payload {text:?} with tag of rank {from}"))?;
            ensure(k < k_max && !got[k], || {
                format!("message #{k} from rank {from} duplicated or unknown")
            })?;
            ensure(m.data == msg_payload(from, node.rank, k, max), || {
                format!("message #{k} from rank {from} corrupted")
            })?;
            got[k] = true;
            if k != i {
                out_of_order += 1;
            }
        }
    }
    report("received", k_max * (node.size - 1));
    report("out_of_order", out_of_order);
    report("all_to_all_s", secs(t.elapsed()));
    // Ping-pong between ranks 0 and 1: request and reply, both ways named.
    let rounds = args.iters;
    let t = Instant::now();
    if node.rank <= 1 {
        let other = 1 - node.rank;
        let p = peers[other].expect("connected");
        for i in 0..rounds {
            let (first_tag, second_tag) = if node.rank == 0 {
                (PING_TAG, PONG_TAG)
            } else {
                (PONG_TAG, PING_TAG)
            };
            if node.rank == 0 {
                ep.send(p, first_tag, format!("ping {i}").as_bytes())
                    .ctx("ping")?;
                let m = ep.recv(second_tag, timeout).ctx("pong")?;
                ensure(
                    m.peer == Some(p) && m.data == format!("pong {i}").as_bytes(),
                    || {
                        format!(
                            "round {i}: got {:?} from {:?}",
                            String::from_utf8_lossy(&m.data),
                            m.peer
                        )
                    },
                )?;
            } else {
                let m = ep.recv(second_tag, timeout).ctx("ping")?;
                ensure(
                    m.peer == Some(p) && m.data == format!("ping {i}").as_bytes(),
                    || {
                        format!(
                            "round {i}: got {:?} from {:?}",
                            String::from_utf8_lossy(&m.data),
                            m.peer
                        )
                    },
                )?;
                ep.send(p, first_tag, format!("pong {i}").as_bytes())
                    .ctx("pong")?;
            }
        }
        report("ping_pong_rounds", rounds);
        report(
            "ping_pong_us",
            format!(
                "{:.1}",
                t.elapsed().as_secs_f64() * 1e6 / rounds.max(1) as f64
            ),
        );
    }
    // Keep serving until everyone is done (a peer may still be waiting for our messages).
    node.barrier()
}

// ---------------------------------------------------------------------------------------
// visibility: a write's completion means the data is at the target.

const VIS_TAG: u64 = 0x5345_5100;
const VIS_SLOT: usize = 64 * 1024;
const VIS_SIZES: [usize; 4] = [8, 4096, 64, VIS_SLOT];

fn visibility(args: &Args) -> Res<()> {
    let mut node = Node::start(args, 2, 2)?;
    // `ep` carries the writes and one "seq N" message; `sig` is a second endpoint pair that
    // carries another "seq N" message with no ordering at all relative to the writes.
    let ep = node.open()?;
    let sig = node.open()?;
    let iters = args.iters.max(1);
    let bytes = iters * VIS_SLOT;
    let check_block = |target: &MemoryRegion, n: usize| -> Res<bool> {
        let len = VIS_SIZES[n % VIS_SIZES.len()];
        let base = n * VIS_SLOT;
        // The first word is N itself; the rest of the block is N's pattern.
        let first = target
            .atomic_u64(base)
            .ctx("seq word")?
            .load(Ordering::Acquire);
        let (bad, _) = check_pattern(target, base + 8, len - 8, n as u64, 8)?;
        Ok(first == n as u64 && bad == 0)
    };
    if node.rank == 0 {
        let target = ep
            .register(Region::new(bytes).ctx("target")?)
            .ctx("register")?;
        let all = node.exchange(&[
            ep.address().to_bytes(),
            target.remote().to_bytes().to_vec(),
            sig.address().to_bytes(),
        ])?;
        let writer = ep.connect(&address(&all[1][0])?).ctx("connect")?;
        let writer_sig = sig.connect(&address(&all[1][1])?).ctx("connect")?;
        // The writer starts once we can name it as the sender of its messages.
        node.barrier()?;
        // (seq, which path) of every message that arrived before its block was visible.
        let mut stale: Vec<(usize, &str)> = Vec::new();
        let mut seen = [vec![false; iters], vec![false; iters]];
        let t = Instant::now();
        for _ in 0..iters {
            for (path, (e, from)) in [(&sig, writer_sig), (&ep, writer)].into_iter().enumerate() {
                let m = e.recv(VIS_TAG, Duration::from_secs(20)).ctx("recv seq")?;
                ensure(m.peer == Some(from), || {
                    format!("seq message names {:?}, expected {from}", m.peer)
                })?;
                let text = String::from_utf8_lossy(&m.data).into_owned();
                let n: usize = text
                    .strip_prefix("seq ")
                    .and_then(|s| s.parse().ok())
                    .filter(|&n| n < iters)
                    .ok_or_else(|| format!("bad seq message {text:?}"))?;
                ensure(!seen[path][n], || format!("seq {n} received twice"))?;
                seen[path][n] = true;
                if !check_block(&target, n)? {
                    stale.push((
                        n,
                        if path == 0 {
                            "other-endpoint"
                        } else {
                            "same-endpoint"
                        },
                    ));
                }
            }
        }
        report("iterations", iters);
        report("visibility_s", secs(t.elapsed()));
        report("stale", stale.len());
        report(
            "stale_other_endpoint",
            stale.iter().filter(|s| s.1 == "other-endpoint").count(),
        );
        report(
            "stale_same_endpoint",
            stale.iter().filter(|s| s.1 == "same-endpoint").count(),
        );
        // Stale blocks: did the data arrive later?
        std::thread::sleep(Duration::from_millis(200));
        let mut late = 0;
        for &(n, _) in &stale {
            if check_block(&target, n)? {
                late += 1;
            }
        }
        report("stale_arrived_later", late);
        if let Some(&(n, path)) = stale.first() {
            report(
                "first_stale",
                format!("seq {n} size {} via {path}", VIS_SIZES[n % VIS_SIZES.len()]),
            );
        }
        node.barrier()?;
        ensure(stale.is_empty(), || {
            format!(
                "{} of {} messages arrived before the write they follow was visible",
                stale.len(),
                2 * iters
            )
        })
    } else {
        let all = node.exchange(&[ep.address().to_bytes(), sig.address().to_bytes()])?;
        let peer = ep.connect(&address(&all[0][0])?).ctx("connect")?;
        let remote = descriptor(&all[0][1])?;
        let sig_peer = sig.connect(&address(&all[0][2])?).ctx("connect")?;
        let local = ep
            .register(Region::new(bytes).ctx("local")?)
            .ctx("register")?;
        node.barrier()?;
        let t = Instant::now();
        for n in 0..iters {
            let len = VIS_SIZES[n % VIS_SIZES.len()];
            let base = n * VIS_SLOT;
            local
                .atomic_u64(base)
                .ctx("seq word")?
                .store(n as u64, Ordering::Release);
            fill_pattern(&local, base + 8, len - 8, n as u64, 8)?;
            // SAFETY: each block is written once and not touched again.
            unsafe { ep.write(peer, &local, base, len, &remote, base as u64) }.ctx("write")?;
            let msg = format!("seq {n}");
            sig.send(sig_peer, VIS_TAG, msg.as_bytes())
                .ctx("send seq (other endpoint)")?;
            ep.send(peer, VIS_TAG, msg.as_bytes()).ctx("send seq")?;
        }
        report("writer_s", secs(t.elapsed()));
        node.barrier()
    }
}
