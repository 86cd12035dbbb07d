//! The references `bench ckpt` measures in the same run: `dd oflag=direct`, memcpy and the
//! fabric's RMA write and read bandwidth to another process.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fabric::bootstrap::{BootstrapClient, BootstrapServer};
use fabric::{open, Endpoint, FabricConfig, MemoryRegion, PeerId, Provider, Region, RemoteRegion};

use super::holder::Holder;
use super::{sh, WORK};
use crate::report::gbs;

pub(super) fn dd_direct_gbs(gib: u64) -> Result<f64, String> {
    let file = PathBuf::from(WORK).join("dd.bin");
    let start = Instant::now();
    sh(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", file.display()))
            .args(["bs=16M", &format!("count={}", gib * 64), "oflag=direct"]),
        "dd",
    )?;
    let t = start.elapsed();
    let _ = std::fs::remove_file(&file);
    Ok(gbs(gib << 30, t))
}

pub(super) fn memcpy_gbs(gib: u64) -> f64 {
    let n = (gib << 30) as usize;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src); // touch
    let start = Instant::now();
    dst.copy_from_slice(std::hint::black_box(&src));
    std::hint::black_box(&dst);
    gbs(n as u64, start.elapsed())
}

/// Bandwidth of one shape of one-sided transfers (see [`rma_gbs`]).
pub(super) struct RmaShape {
    pub chunk: usize,
    pub window: usize,
    pub write_gbs: f64,
    pub read_gbs: f64,
}

/// One-sided RMA writes, then reads, of `gib` GiB over tcp between this process and a
/// target process (`bench fabric-target`, re-executed from this binary: another process, as
/// the buddy is), out of and into registered buffers of that size (out of cache, as an
/// image is), for each (bytes per operation, operations in flight) of `shapes`.
pub(super) fn rma_gbs(gib: u64, shapes: &[(usize, usize)]) -> Result<Vec<RmaShape>, String> {
    let n = (gib << 30) as usize;
    let setup = Duration::from_secs(60);
    let server = BootstrapServer::start("127.0.0.1:0", 2, setup).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("locating bench: {e}"))?;
    let child = Command::new(exe)
        .args(["fabric-target", "--provider", "tcp", "--bootstrap"])
        .arg(server.addr().to_string())
        .args(["--region", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning the fabric-target process: {e}"))?;
    // Ends the target by PID however this returns.
    let _target = Holder::of(child);
    let ep = open(&FabricConfig::with_provider(Provider::Tcp)).map_err(|e| e.to_string())?;
    let (peer, remote) = {
        let mut client =
            BootstrapClient::connect(server.addr(), 0, 2, setup).map_err(|e| e.to_string())?;
        let all = client
            .allgather(&ep.address().to_bytes())
            .map_err(|e| format!("bootstrap all-gather (did the target start?): {e}"))?;
        let (addr, remote) = crate::fabric::decode_target_blob(&all[1])?;
        let peer = ep.connect(&addr).map_err(|e| e.to_string())?;
        client.barrier().map_err(|e| e.to_string())?;
        (peer, remote)
    };
    let local = ep
        .register(Region::new(n).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    local.region().fill(0, n, 7).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for &(chunk, window) in shapes {
        let write_gbs = stream(&*ep, peer, &local, &remote, n, chunk, window, true)?;
        let read_gbs = stream(&*ep, peer, &local, &remote, n, chunk, window, false)?;
        out.push(RmaShape {
            chunk,
            window,
            write_gbs,
            read_gbs,
        });
    }
    let _ = server.join();
    Ok(out)
}

/// `n` bytes in `chunk`-byte operations, `window` in flight: GB/s.
#[allow(clippy::too_many_arguments)]
fn stream(
    ep: &dyn Endpoint,
    peer: PeerId,
    local: &MemoryRegion,
    remote: &RemoteRegion,
    n: usize,
    chunk: usize,
    window: usize,
    write: bool,
) -> Result<f64, String> {
    let start = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    let mut at = 0;
    while at < n || !inflight.is_empty() {
        while at < n && inflight.len() < window {
            let len = chunk.min(n - at);
            // SAFETY: nothing else touches either buffer while the operations are in flight.
            let c = unsafe {
                if write {
                    ep.post_write(peer, local, at, len, remote, at as u64)
                } else {
                    ep.post_read(peer, local, at, len, remote, at as u64)
                }
            }
            .map_err(|e| e.to_string())?;
            inflight.push_back(c);
            at += len;
        }
        if let Some(c) = inflight.pop_front() {
            c.wait().map_err(|e| e.to_string())?;
        }
    }
    Ok(gbs(n as u64, start.elapsed()))
}
