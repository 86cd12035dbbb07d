//! `krun-store`: one node of a checkpoint store, driven line by line on stdin.
//!
//! ```text
//! krun-store --bootstrap IP:PORT --rank R --size N [--provider tcp|shm|verbs|loopback]
//!            [--group G] [--arena-mib M] [--disk DIR] [--parity K] [--keep N]
//!            [--timeout-secs S] [--cells 0,1,2/3,4]
//! ```
//! `--cells` places buddies and parity sets from the locator's cells (lists of nodes
//! separated by `/`; see `ckpt_store::Placement::from_cells`) instead of the default ring.
//! The nodes swap fabric addresses and failure groups through the bootstrap service
//! (authenticated with the cluster secret from `KRUN_SECRET` or `KRUN_SECRET_FILE`, which the
//! control messages are signed with too). Commands, one per line; each answers one line
//! starting with `ok` or `error`:
//!
//! ```text
//! put OWNER VERSION FILE          store FILE's bytes (returns once L1 holds them)
//! putfile OWNER VERSION FILE      the same without a copy: L1 is FILE, mapped (do not
//!                                 truncate or rewrite FILE while the store holds it)
//! usage                           "ok usage L1 L2HELD L3PARITY L4DISK" (bytes)
//! safe OWNER                      "ok safe V1 V2 V3 V4": newest version safe per level (- none)
//! down NODE                       the membership reports NODE gone: get skips it
//! wait OWNER VERSION LEVEL [SECS] wait until the version is safe at L1..L4
//! get OWNER VERSION OUTFILE       fetch the fastest valid copy: "ok get LEVEL NODE BYTES"
//! quit
//! ```
use ckpt_store::{Level, NodeInfo, Placement, Store, StoreConfig};
use clap::Parser;
use fabric::bootstrap::BootstrapClient;
use fabric::secret::ClusterSecret;
use fabric::{open, EndpointAddress, FabricConfig, Provider, ProviderChoice};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// One node of a checkpoint store, driven line by line on stdin (commands in the module doc).
#[derive(Debug, Parser)]
#[command(name = "krun-store", version)]
struct Args {
    /// The bootstrap service the nodes swap fabric addresses through.
    #[arg(long, value_name = "IP:PORT")]
    bootstrap: std::net::SocketAddr,
    /// This node's rank among the store's nodes.
    #[arg(long)]
    rank: usize,
    /// The number of store nodes.
    #[arg(long)]
    size: usize,
    /// The fabric provider.
    #[arg(long, value_name = "tcp|shm|verbs|loopback", default_value = "tcp", value_parser = provider)]
    provider: Provider,
    /// This node's failure group (default: its own).
    #[arg(long)]
    group: Option<u32>,
    /// Memory for L1 and buddy copies.
    #[arg(long, value_name = "M", default_value_t = 256)]
    arena_mib: usize,
    /// Directory of the L4 copies (none: no L4).
    #[arg(long, value_name = "DIR")]
    disk: Option<PathBuf>,
    /// Parity set size (0: no L3).
    #[arg(long, value_name = "K", default_value_t = 0)]
    parity: usize,
    /// Versions kept per owner.
    #[arg(long, value_name = "N", default_value_t = 2)]
    keep: usize,
    /// Timeout of a remote operation.
    #[arg(long = "timeout-secs", value_name = "S", default_value = "10", value_parser = secs)]
    timeout: Duration,
    /// Buddies and parity sets from the locator's cells: 0,1,2/3,4.
    #[arg(long, value_name = "CELLS", value_parser = cells)]
    cells: Option<Cells>,
}

/// `--cells`: lists of nodes separated by `/`.
#[derive(Debug, Clone)]
struct Cells(Vec<Vec<usize>>);

fn provider(v: &str) -> Result<Provider, String> {
    Provider::all()
        .into_iter()
        .find(|p| p.name() == v)
        .ok_or_else(|| format!("unknown provider '{v}'"))
}

fn secs(v: &str) -> Result<Duration, String> {
    v.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("'{v}' is not a number of seconds"))
}

fn cells(v: &str) -> Result<Cells, String> {
    v.split('/')
        .map(|c| {
            c.split(',')
                .filter(|m| !m.is_empty())
                .map(|m| {
                    m.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("'{m}' is not a node number"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Cells)
}

fn parse() -> Result<Args, String> {
    let out = Args::parse();
    if out.rank >= out.size {
        return Err(format!(
            "--rank {} is not below --size {}",
            out.rank, out.size
        ));
    }
    Ok(out)
}

fn start(args: &Args) -> Result<Store, String> {
    let secret = ClusterSecret::from_env()
        .map_err(|e| e.to_string())?
        .ok_or(
        "set KRUN_SECRET or KRUN_SECRET_FILE: store messages are signed with the cluster secret",
    )?;
    let cfg = FabricConfig {
        provider: ProviderChoice::Exactly(args.provider),
        ..FabricConfig::default()
    }
    .with_env()
    .map_err(|e| e.to_string())?;
    let ep = open(&cfg).map_err(|e| format!("opening the fabric: {e}"))?;
    let mut boot = BootstrapClient::connect_with(
        args.bootstrap,
        args.rank,
        args.size,
        args.timeout,
        Some(&secret),
    )
    .map_err(|e| format!("bootstrap: {e}"))?;
    let group = args.group.unwrap_or(args.rank as u32);
    let mut blob = group.to_le_bytes().to_vec();
    blob.extend_from_slice(&ep.address().to_bytes());
    let all = boot
        .allgather(&blob)
        .map_err(|e| format!("bootstrap: {e}"))?;
    let mut nodes = Vec::with_capacity(all.len());
    for (i, b) in all.iter().enumerate() {
        if b.len() < 4 {
            return Err(format!("node {i} sent a malformed bootstrap blob"));
        }
        nodes.push(NodeInfo {
            group: u32::from_le_bytes(b[..4].try_into().expect("4")),
            address: EndpointAddress::from_bytes(&b[4..]).map_err(|e| format!("node {i}: {e}"))?,
        });
    }
    let groups: Vec<u32> = nodes.iter().map(|n| n.group).collect();
    let placement = match &args.cells {
        Some(Cells(cells)) => Placement::from_cells(cells, &groups, args.parity)
            .map_err(|e| format!("--cells: {e}"))?,
        None => Placement::ring(&groups, args.parity),
    };
    let store = Store::start_placed(
        ep,
        StoreConfig {
            node: args.rank,
            nodes,
            arena_bytes: args.arena_mib << 20,
            disk: args.disk.clone(),
            keep: args.keep,
            parity_set: args.parity,
            secret,
            request_timeout: args.timeout,
        },
        placement,
    )
    .map_err(|e| e.to_string())?;
    // Every store is serving before anyone puts.
    boot.barrier()
        .map_err(|e| format!("bootstrap barrier: {e}"))?;
    Ok(store)
}

fn command(store: &Store, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let version = |w: &str| {
        w.parse::<u64>()
            .map_err(|_| format!("'{w}' is not a version"))
    };
    match words.as_slice() {
        ["put", owner, v, file] => {
            let data = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            store
                .put(owner, version(v)?, &data)
                .map_err(|e| e.to_string())?;
            Ok(format!("ok put {} bytes", data.len()))
        }
        ["putfile", owner, v, file] => {
            // SAFETY: the user of this test worker promises not to truncate or rewrite FILE
            // while the store holds it (documented with the command).
            let r = unsafe { store.put_file(owner, version(v)?, std::path::Path::new(file)) }
                .map_err(|e| e.to_string())?;
            Ok(format!("ok put {} bytes, {} copied", r.bytes, r.copied))
        }
        ["usage"] => {
            let u = store.usage();
            Ok(format!(
                "ok usage {} {} {} {}",
                u.l1, u.l2_held, u.l3_parity, u.l4_disk
            ))
        }
        ["safe", owner] => {
            let s = store.newest_safe(owner);
            let text: Vec<String> = s
                .by_level
                .iter()
                .map(|v| v.map_or("-".to_string(), |v| v.to_string()))
                .collect();
            Ok(format!("ok safe {}", text.join(" ")))
        }
        ["down", node] => {
            let node = node
                .parse::<usize>()
                .map_err(|_| format!("'{node}' is not a node number"))?;
            store.set_down(node, true).map_err(|e| e.to_string())?;
            Ok(format!("ok down {node}"))
        }
        ["wait", owner, v, level, rest @ ..] => {
            let secs = rest.first().map_or(Ok(60), |s| {
                s.parse::<u64>()
                    .map_err(|_| format!("'{s}' is not seconds"))
            })?;
            let level = Level::parse(level).map_err(|e| e.to_string())?;
            let v = version(v)?;
            // Progress on stderr: each level as it becomes safe, with bytes and rate.
            let start = std::time::Instant::now();
            let bytes = store.stored_len(owner, v).unwrap_or(0);
            for l in Level::ALL.into_iter().filter(|l| *l <= level) {
                let left = Duration::from_secs(secs).saturating_sub(start.elapsed());
                store
                    .wait_safe(owner, v, l, left)
                    .map_err(|e| e.to_string())?;
                let t = start.elapsed().as_secs_f64();
                eprintln!(
                    "krun-store: {owner} v{v}: safe at {l} after {t:.3} s ({bytes} bytes, {:.2} GB/s)",
                    bytes as f64 / t.max(1e-9) / 1e9
                );
            }
            Ok(format!("ok safe {level}"))
        }
        ["get", owner, v, out] => {
            let start = std::time::Instant::now();
            let (data, report) = store.get(owner, version(v)?).map_err(|e| e.to_string())?;
            let t = start.elapsed().as_secs_f64();
            eprintln!(
                "krun-store: {owner}: read from {} on node {} ({} bytes in {t:.3} s, {:.2} GB/s)",
                report.level,
                report.node,
                data.len(),
                data.len() as f64 / t.max(1e-9) / 1e9
            );
            std::fs::write(out, &data).map_err(|e| format!("{out}: {e}"))?;
            Ok(format!(
                "ok get {} {} {}",
                report.level,
                report.node,
                data.len()
            ))
        }
        _ => Err(format!("unknown command {line:?}")),
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("krun-store: {e}");
            return ExitCode::from(2);
        }
    };
    let store = match start(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("krun-store: node {}: {e}", args.rank);
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready node {} buddy {}", store.node(), store.buddy());
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "quit" {
            break;
        }
        let answer = command(&store, line).unwrap_or_else(|e| format!("error {e}"));
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
    }
    ExitCode::SUCCESS
}
