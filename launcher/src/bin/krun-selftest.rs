//! krun-selftest: a rank program that checks a job's wiring. Run as `krun -n N krun-selftest`:
//! each rank opens a fabric endpoint, swaps addresses through KRUN_BOOTSTRAP, writes a
//! message into its right neighbour's memory with an RMA write, counts itself in on rank 0
//! with a fetch-add, and verifies what its left neighbour wrote.
use std::process::ExitCode;
use std::time::Duration;

use fabric::bootstrap::BootstrapClient;
use fabric::{EndpointAddress, FabricConfig, Region, RemoteRegion};
use launcher::LauncherError;

fn env_number(name: &str) -> Result<usize, LauncherError> {
    let v = std::env::var(name)
        .map_err(|_| LauncherError::Usage(format!("{name} is not set: run me under krun")))?;
    v.parse()
        .map_err(|_| LauncherError::Usage(format!("{name}={v:?} is not a number")))
}

fn message(rank: usize) -> Vec<u8> {
    format!("greetings from rank {rank}")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(64 * 1024)
        .collect()
}

fn run() -> Result<String, LauncherError> {
    let rank = env_number("KRUN_RANK")?;
    let size = env_number("KRUN_SIZE")?;
    let boot_addr = std::env::var("KRUN_BOOTSTRAP")
        .map_err(|_| LauncherError::Usage("KRUN_BOOTSTRAP is not set: run me under krun".into()))?;
    let boot_addr = boot_addr.parse().map_err(|_| {
        LauncherError::Usage(format!("KRUN_BOOTSTRAP={boot_addr:?} is not HOST:PORT"))
    })?;
    let ep = fabric::open(&FabricConfig::default().with_env()?)?;
    let mut boot = BootstrapClient::connect(boot_addr, rank, size, Duration::from_secs(60))?;
    let inbox = ep.register(Region::new(64 * 1024 + 4096)?)?;
    let mut card = ep.address().to_bytes();
    card.extend_from_slice(&inbox.remote().to_bytes());
    let cards = boot.allgather(&card)?;
    let mut peers = Vec::with_capacity(size);
    for c in &cards {
        let split = c
            .len()
            .checked_sub(RemoteRegion::ENCODED_LEN)
            .ok_or_else(|| LauncherError::Usage("a rank sent a malformed address card".into()))?;
        let peer = ep.connect(&EndpointAddress::from_bytes(&c[..split])?)?;
        peers.push((peer, RemoteRegion::from_bytes(&c[split..])?));
    }
    let source = ep.register(Region::new(64 * 1024)?)?;
    source.write_bytes(0, &message(rank))?;
    let (right, right_region) = peers[(rank + 1) % size];
    // First contact between two endpoints goes one way at a time: libfabric 1.17's rxm can
    // fail a connection both sides open at once. Even ranks write first, then odd ones, then
    // everybody counts in at rank 0 (whose connections to them exist by then or are one-way).
    for turn in 0..2 {
        if rank % 2 == turn {
            // SAFETY: `source` is not modified during the write; each rank writes only its
            // right neighbour's inbox, which nobody else writes.
            unsafe { ep.write(right, &source, 0, 64 * 1024, &right_region, 4096)? };
        }
        boot.barrier()?;
    }
    let (root, root_region) = peers[0];
    ep.fetch_add(root, &root_region, 0, 1)?;
    boot.barrier()?;
    let left = (rank + size - 1) % size;
    let mut got = vec![0u8; 64 * 1024];
    inbox.read_bytes(4096, &mut got)?;
    if got != message(left) {
        return Err(LauncherError::Node {
            node: rank,
            message: format!("data from rank {left} is wrong"),
        });
    }
    let counted = (rank == 0)
        .then(|| {
            inbox
                .atomic_u64(0)
                .map(|w| w.load(std::sync::atomic::Ordering::SeqCst))
        })
        .transpose()?;
    boot.barrier()?;
    Ok(match counted {
        Some(c) if c != size as u64 => {
            return Err(LauncherError::Node {
                node: rank,
                message: format!("counter is {c}, expected {size}"),
            })
        }
        Some(c) => format!(
            "rank {rank}/{size}: ok: verified 64 KiB from rank {left} over {}; counter {c}",
            ep.provider()
        ),
        None => format!(
            "rank {rank}/{size}: ok: verified 64 KiB from rank {left} over {}",
            ep.provider()
        ),
    })
}

/// A rank program that checks a job's wiring: run it as `krun -n N krun-selftest` (it reads
/// KRUN_RANK, KRUN_SIZE and KRUN_BOOTSTRAP; it takes no arguments).
#[derive(clap::Parser)]
#[command(name = "krun-selftest", version)]
struct Cli {}

fn main() -> ExitCode {
    <Cli as clap::Parser>::parse();
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("krun-selftest: error: {e}");
            ExitCode::FAILURE
        }
    }
}
