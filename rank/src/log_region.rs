//! Where a rank keeps its message log's snapshot for its own checkpoints: registered memory
//! that grows with the log ([`crate::uncoordinated`] writes it, ghost captures it).
//!
//! # Layout
//! The first part is the region [`LOG_REGION`] (`KRUN_LOG_REGION_BYTES`, default
//! [`DEFAULT_LOG_REGION`]); when a snapshot does not fit, a further part
//! `krun-message-log.<i>` is registered, at least as large as all parts so far (so the
//! space doubles), up to [`MAX_EXTENSIONS`] parts and `KRUN_LOG_REGION_MAX_BYTES` in all
//! (default [`DEFAULT_LOG_REGION_MAX`]). The first part starts with a header:
//!
//! ```text
//! header := snapshot_len u64 | extensions u32 | 0 u32 | extension_len u64 x MAX_EXTENSIONS
//! ```
//! then the snapshot's bytes, continued in each extension in order. A restored rank reads
//! the header of its first part and registers the extensions it names (filled from the same
//! image).
//!
//! # Why growing is cheap
//! Memory is touched only where a snapshot is written, and what a smaller snapshot leaves
//! unused behind it is given back to ghost ([`ghost::native::NativeRuntime::discard`]): it
//! reads as zero, and full images keep such chunks as holes. An image therefore holds the
//! current snapshot, not the region's size. So a log that outgrows the first part does not
//! skip the rank's checkpoint: before this, a snapshot larger than its fixed 1 MiB region
//! skipped the checkpoint, so the rank acknowledged nothing to its senders, whose logs grew
//! until they skipped too (every rank after ~7 checkpoints of `heat_ha`'s 24 KiB halos at
//! a 2 s interval). Only the cap (or memory) can now make a rank skip, said on stderr.
use std::sync::Mutex;

use ghost::image::DELTA_CHUNK;

use crate::checkpoint::Checkpoints;
use crate::error::{RankError, Result};

/// The registered region holding the log snapshot of each own checkpoint (its first part).
pub const LOG_REGION: &str = "krun-message-log";
/// The first part's default size (`KRUN_LOG_REGION_BYTES`).
pub const DEFAULT_LOG_REGION: usize = 1 << 20;
/// The default cap of all parts together (`KRUN_LOG_REGION_MAX_BYTES`).
pub const DEFAULT_LOG_REGION_MAX: usize = 4 << 30;
/// Parts registered beyond the first, at most.
pub const MAX_EXTENSIONS: usize = 24;
const HEADER: usize = 16 + 8 * MAX_EXTENSIONS;

struct Part {
    addr: usize,
    len: usize,
    /// Bytes from the part's start that may be non-zero (written and not given back).
    written: usize,
}

static PARTS: Mutex<Vec<Part>> = Mutex::new(Vec::new());

fn env_bytes(name: &'static str, default: usize, min: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= min)
            .map(|n| n.next_multiple_of(4096))
            .ok_or(RankError::BadEnv {
                name,
                value: v,
                reason: format!("expected a byte count >= {min}"),
            }),
        Err(_) => Ok(default),
    }
}

fn part_name(i: usize) -> String {
    if i == 0 {
        LOG_REGION.to_string()
    } else {
        format!("{LOG_REGION}.{i}")
    }
}

/// Registers the first part with `ckpt`'s checkpointer (once per process), and when the
/// process was restored, the extensions its header names; returns the snapshot it was
/// restored with.
pub(crate) fn register(ckpt: &Checkpoints) -> Result<Option<Vec<u8>>> {
    let mut parts = PARTS.lock().expect("log region lock");
    if !ckpt.enabled() || !parts.is_empty() {
        return Ok(None);
    }
    let rt = ckpt.runtime()?.clone();
    let len = env_bytes("KRUN_LOG_REGION_BYTES", DEFAULT_LOG_REGION, 4096)?;
    let addr = ghost::native::alloc_region(len)?;
    // SAFETY: `alloc_region` maps whole private anonymous pages that are never freed.
    let restored = unsafe { rt.register(LOG_REGION, addr, len) }?;
    parts.push(Part {
        addr: addr as usize,
        len,
        written: if restored { len } else { 0 },
    });
    if !restored {
        return Ok(None);
    }
    // SAFETY: the part is `len` bytes of this process's memory, mapped for good.
    let head = unsafe { std::slice::from_raw_parts(addr, HEADER) };
    let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    let n = u64_at(0) as usize;
    let extensions = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    if extensions > MAX_EXTENSIONS {
        return Err(RankError::Checkpoint(format!(
            "the restored {LOG_REGION} region names {extensions} extensions, more than \
             {MAX_EXTENSIONS}"
        )));
    }
    for i in 1..=extensions {
        let ext = u64_at(8 + 8 * i) as usize;
        if ext == 0 || !ext.is_multiple_of(4096) {
            return Err(RankError::Checkpoint(format!(
                "the restored {LOG_REGION} region names extension {i} of {ext} bytes"
            )));
        }
        let addr = ghost::native::alloc_region(ext)?;
        // SAFETY: as above.
        unsafe { rt.register(&part_name(i), addr, ext) }?;
        parts.push(Part {
            addr: addr as usize,
            len: ext,
            written: ext,
        });
    }
    let capacity: usize = parts.iter().map(|p| p.len).sum::<usize>() - HEADER;
    if n > capacity {
        return Err(RankError::Checkpoint(format!(
            "the restored {LOG_REGION} region says {n} bytes, more than its {capacity}"
        )));
    }
    if n == 0 {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(n);
    for (i, p) in parts.iter().enumerate() {
        let start = if i == 0 { HEADER } else { 0 };
        let take = (p.len - start).min(n - out.len());
        // SAFETY: inside the part, mapped for good.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts((p.addr + start) as *const u8, take)
        });
    }
    Ok(Some(out))
}

/// Writes `snap` as the snapshot of the checkpoint about to be taken, growing the region
/// when it does not fit (see the module doc). Error (the rank skips the checkpoint): no
/// region, or the cap reached.
pub(crate) fn write(ckpt: &Checkpoints, rank: usize, snap: &[u8]) -> Result<()> {
    let mut parts = PARTS.lock().expect("log region lock");
    if parts.is_empty() {
        return Err(RankError::Checkpoint(format!(
            "message logging is on but the {LOG_REGION} region is not registered"
        )));
    }
    let rt = ckpt.runtime()?.clone();
    let total: usize = parts.iter().map(|p| p.len).sum();
    if snap.len() + HEADER > total {
        let cap = env_bytes("KRUN_LOG_REGION_MAX_BYTES", DEFAULT_LOG_REGION_MAX, 4096)?;
        let grow = (snap.len() + HEADER - total)
            .max(total)
            .next_multiple_of(DELTA_CHUNK);
        if parts.len() > MAX_EXTENSIONS || total + grow > cap {
            return Err(RankError::Checkpoint(format!(
                "the message log's snapshot ({} bytes: payloads held for receivers that have \
                 not checkpointed) does not fit the {LOG_REGION} region ({total} bytes in {} \
                 parts), which may not grow past KRUN_LOG_REGION_MAX_BYTES={cap} or \
                 {MAX_EXTENSIONS} extensions: raise it or checkpoint more often",
                snap.len(),
                parts.len()
            )));
        }
        let addr = ghost::native::alloc_region(grow)?;
        let i = parts.len();
        // SAFETY: fresh private anonymous pages, never freed.
        unsafe { rt.register_fresh(&part_name(i), addr, grow) }?;
        parts.push(Part {
            addr: addr as usize,
            len: grow,
            written: 0,
        });
        eprintln!(
            "krun: rank {rank}: the message-log region grows to {} bytes (a snapshot of {} \
             bytes)",
            total + grow,
            snap.len()
        );
    }
    let mut header = vec![0u8; HEADER];
    header[..8].copy_from_slice(&(snap.len() as u64).to_le_bytes());
    header[8..12].copy_from_slice(&((parts.len() - 1) as u32).to_le_bytes());
    for (i, p) in parts.iter().enumerate().skip(1) {
        header[8 + 8 * i..16 + 8 * i].copy_from_slice(&(p.len as u64).to_le_bytes());
    }
    let mut rest: &[u8] = snap;
    for (i, p) in parts.iter_mut().enumerate() {
        let mut end = 0;
        if i == 0 {
            // SAFETY: the part is mapped for good; only this rank's checkpoint writes it,
            // and the checkpoint is taken by this thread after the write.
            unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), p.addr as *mut u8, HEADER) };
            end = HEADER;
        }
        let take = (p.len - end).min(rest.len());
        // SAFETY: as above; `end + take <= p.len`.
        unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), (p.addr + end) as *mut u8, take) };
        rest = &rest[take..];
        end += take;
        // Give back what an earlier, larger snapshot left behind (whole chunks).
        let from = end.next_multiple_of(DELTA_CHUNK).min(p.len);
        let to = p.written.next_multiple_of(DELTA_CHUNK).min(p.len);
        if to > from {
            // SAFETY: this thread alone writes the part; whole chunks from a chunk start
            // (or up to the part's end).
            match unsafe { rt.discard((p.addr + from) as *mut u8, to - from) } {
                Ok(()) => p.written = end,
                Err(e) => eprintln!(
                    "krun: rank {rank}: giving back the unused part of {}: {e}",
                    part_name(i)
                ),
            }
        } else {
            p.written = p.written.max(end);
        }
    }
    Ok(())
}
