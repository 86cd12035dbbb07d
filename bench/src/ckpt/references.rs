//! The references `bench ckpt` measures in the same run: `dd oflag=direct`, memcpy and the
//! fabric's RMA write bandwidth.
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use fabric::{open, FabricConfig, Provider, Region};

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

/// One-sided RMA writes of `gib` GiB over tcp between two endpoints, 8 MiB per write.
pub(super) fn rma_write_gbs(gib: u64) -> Result<f64, String> {
    let a = open(&FabricConfig::with_provider(Provider::Tcp)).map_err(|e| e.to_string())?;
    let b = open(&FabricConfig::with_provider(Provider::Tcp)).map_err(|e| e.to_string())?;
    let n = (gib << 30) as usize;
    let src = a
        .register(Region::new(n).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let dst = b
        .register(Region::new(n).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    src.region().fill(0, n, 7).map_err(|e| e.to_string())?;
    dst.region().fill(0, n, 0).map_err(|e| e.to_string())?;
    let peer = a.connect(&b.address()).map_err(|e| e.to_string())?;
    let remote = dst.remote();
    let chunk = 8 << 20;
    let start = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    let mut at = 0;
    while at < n || !inflight.is_empty() {
        while at < n && inflight.len() < 8 {
            // SAFETY: nothing else touches either buffer while the writes are in flight.
            let c = unsafe { a.post_write(peer, &src, at, chunk.min(n - at), &remote, at as u64) }
                .map_err(|e| e.to_string())?;
            inflight.push_back(c);
            at += chunk;
        }
        if let Some(c) = inflight.pop_front() {
            c.wait().map_err(|e| e.to_string())?;
        }
    }
    Ok(gbs(n as u64, start.elapsed()))
}
