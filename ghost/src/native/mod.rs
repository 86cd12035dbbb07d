//! The native checkpointer, for programs that link krun's runtime library and register the
//! memory that holds their state.
//!
//! Capture is copy-on-write through userfaultfd write-protection, at 64 KiB chunk granularity:
//! - between captures every clean chunk is write-protected; the first write to it faults,
//!   the chunk is marked dirty and unprotected (one fault per chunk per checkpoint interval);
//! - `checkpoint()` freezes: it protects the dirty chunks and marks every chunk to copy as
//!   pending, then returns; the program runs on while a background thread copies pending
//!   chunks straight into the image buffer;
//! - a write to a pending chunk faults; the fault thread copies that chunk first, then lets
//!   the write proceed. The image is therefore exactly the memory at the freeze.
//!
//! Chunks unchanged since the previous capture are left out of incremental images (they
//! reference the parent image); every `full_every`-th image is full.
//!
//! Each chunk also carries a "known zero" flag: set when the region is registered (or
//! restored) for the chunks that are all zero then, and by [`NativeRuntime::discard`];
//! cleared by the chunk's first write fault. A full image leaves the known-zero chunks out
//! as holes (`RegionSparse`, see [`crate::image`]), so a large region that is mostly unused
//! costs its used part only, in the image as in memory.
//!
//! A full image puts each whole region's payload at a page boundary of its file; a process
//! restored from such an image on tmpfs maps the region's pages from the file (private,
//! copy-on-write) instead of copying them into fresh memory (see `regions.rs`).
//!
//! Images are files `<dir>/<owner>/<version>.kgi` (L1, by default in /dev/shm); the
//! checkpoint store flushes them to slower levels. A process started with
//! `KRUN_GHOST_RESTORE=<version>|latest` gets its regions filled from that image when it
//! registers them: that is "restore as a new process". `rollback()` rewrites the regions in
//! place from an image.
use crate::error::{GhostError, Result};
use crate::image::DELTA_CHUNK;
use crate::uffd::WriteProtectFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Duration;

const CLEAN: u8 = 0;
const DIRTY: u8 = 1;
const PENDING: u8 = 2;
const COPYING: u8 = 3;

/// Where images go and how they are made.
#[derive(Clone, Debug)]
pub struct NativeConfig {
    /// Names this program's checkpoints (e.g. `job7/rank3`).
    pub owner: String,
    /// L1 directory; images are `<dir>/<owner>/<version>.kgi`.
    pub dir: PathBuf,
    /// Every n-th image is full, the others incremental.
    pub full_every: u32,
    /// Version to restore registered regions from when they are registered.
    pub restore: Option<RestoreFrom>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreFrom {
    Latest,
    Version(u64),
}

impl NativeConfig {
    /// From `KRUN_GHOST_OWNER` (default: the program name and pid... see below),
    /// `KRUN_GHOST_DIR` (default /dev/shm/krun-ghost), `KRUN_GHOST_FULL_EVERY` (default 4) and
    /// `KRUN_GHOST_RESTORE` (`latest` or a version number).
    pub fn from_env(default_owner: &str) -> Result<NativeConfig> {
        let owner = std::env::var("KRUN_GHOST_OWNER").unwrap_or_else(|_| default_owner.to_string());
        let dir = std::env::var_os("KRUN_GHOST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm/krun-ghost"));
        let full_every = match std::env::var("KRUN_GHOST_FULL_EVERY") {
            Ok(v) => v.parse::<u32>().ok().filter(|&n| n >= 1).ok_or_else(|| {
                GhostError::Invalid(format!(
                    "KRUN_GHOST_FULL_EVERY={v}: expected an integer >= 1"
                ))
            })?,
            Err(_) => 4,
        };
        let restore = match std::env::var("KRUN_GHOST_RESTORE") {
            Ok(v) if v == "latest" => Some(RestoreFrom::Latest),
            Ok(v) if v.is_empty() => None,
            Ok(v) => Some(RestoreFrom::Version(v.parse().map_err(|_| {
                GhostError::Invalid(format!(
                    "KRUN_GHOST_RESTORE={v}: expected 'latest' or a version number"
                ))
            })?)),
            Err(_) => None,
        };
        Ok(NativeConfig {
            owner,
            dir,
            full_every,
            restore,
        })
    }
}

/// Checks an owner name: path components of letters, digits, `-_.`, no `..`.
fn check_owner(owner: &str) -> Result<()> {
    let ok = !owner.is_empty()
        && owner.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(GhostError::Invalid(format!(
            "checkpoint owner {owner:?}: use path components of letters, digits, '-', '_', '.'"
        )))
    }
}

mod files;
pub use files::{
    alloc_region, image_path, list_versions, load_chain, read_header, write_atomically, MappedFile,
};
pub(crate) use files::{spare_files, spare_limit, L1File};

struct TrackedRegion {
    name: String,
    addr: usize,
    len: usize,
    states: Vec<AtomicU8>,
    /// Chunks known to be all zero (see the module doc); changed under the freeze lock.
    zero: Vec<AtomicBool>,
    /// Where each chunk goes in the image being filled (valid while PENDING or COPYING).
    dest: Mutex<Vec<usize>>,
    /// The crc32c of each chunk as last copied into an image (valid once it is copied).
    crcs: Vec<AtomicU32>,
    /// The region is (partly) a private mapping of the image file it was restored from
    /// (see `regions.rs`): giving pages back must map fresh anonymous memory over them
    /// instead of `MADV_DONTNEED`, which would bring the file's bytes back.
    file_backed: AtomicBool,
}

impl TrackedRegion {
    fn chunk_range(&self, c: usize) -> (usize, usize) {
        let start = self.addr + c * DELTA_CHUNK;
        (start, DELTA_CHUNK.min(self.addr + self.len - start))
    }
}

/// The image under construction: its buffer is filled in place by the copy thread and by
/// the fault thread, at disjoint offsets.
struct Filling {
    base: usize,
}

struct Inflight {
    version: u64,
    done: bool,
    result: Option<std::result::Result<CaptureReport, String>>,
}

/// What one capture did.
#[derive(Clone, Debug)]
pub struct CaptureReport {
    pub version: u64,
    pub parent: u64,
    pub path: PathBuf,
    pub image_bytes: u64,
    pub memory_bytes: u64,
    /// Chunks copied by the write-fault thread before the program could write them.
    pub cow_chunks: u64,
    /// How long the program was stopped (the freeze).
    pub freeze: Duration,
    /// From the freeze to the image file being complete.
    pub total: Duration,
}

/// What `safepoint` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SafepointAction {
    Nothing,
    /// A checkpoint was requested (SIGUSR1) and started; the version is given.
    CheckpointStarted(u64),
    /// A rollback was requested (SIGUSR2) and the regions now hold that version.
    RolledBack(u64),
}

/// The per-process native checkpointer.
pub struct NativeRuntime {
    config: NativeConfig,
    uffd: WriteProtectFd,
    regions: RwLock<Vec<Arc<TrackedRegion>>>,
    /// Held by a freeze and by the fault thread's state changes, so that no write slips
    /// between protecting a chunk and marking it pending.
    freeze: Mutex<()>,
    filling: Mutex<Option<Filling>>,
    inflight: Mutex<Option<Inflight>>,
    inflight_done: Condvar,
    next_version: Mutex<(u64, u64, u32)>, // (next version, last version, images since full)
    cow_chunks: std::sync::atomic::AtomicU64,
    restored_from: Mutex<Option<(u64, Vec<MappedFile>)>>,
    /// Versions whose image file backs region memory (a mapped restore): never recycled as
    /// spare files (rewritten in place), only unlinked.
    pinned: Mutex<Vec<u64>>,
    /// The next capture's L1 file, readied by the copy thread after the previous capture
    /// (from a spare file) so that the freeze does not size and allocate it.
    next_l1: Mutex<Option<L1File>>,
}

/// File naming the version a SIGUSR2 rollback should use.
pub const ROLLBACK_REQUEST: &str = "rollback-request";
/// File the runtime writes after a requested rollback: "VERSION PID".
pub const ROLLED_BACK: &str = "rolled-back";
/// File the runtime writes when a requested checkpoint failed: "PID REASON". A checkpointer
/// waiting for the image reads it and reports the reason at once instead of timing out.
pub const CAPTURE_FAILED: &str = "capture-failed";

/// The reason process `pid` gave for a failed capture, if it wrote one (see
/// [`CAPTURE_FAILED`]).
pub fn capture_failure(dir: &Path, owner: &str, pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(owner).join(CAPTURE_FAILED)).ok()?;
    let (who, reason) = text.trim_end().split_once(' ')?;
    (who.parse::<i32>().ok()? == pid).then(|| reason.to_string())
}

/// File the runtime writes (atomically) after each capture it completed, for tools that
/// measure captures from outside the process: "VERSION FREEZE_NS TOTAL_NS COW_CHUNKS
/// IMAGE_BYTES MEMORY_BYTES PID". FREEZE_NS is how long the program was stopped (the freeze);
/// TOTAL_NS runs from the freeze's start until the image file was complete under its final
/// name.
pub const CAPTURED: &str = "captured";

/// The report of the newest capture process `pid` completed in `<dir>/<owner>` (see
/// [`CAPTURED`]): (version, freeze, total, copy-on-write chunks, image bytes, memory bytes).
pub fn last_capture(dir: &Path, owner: &str, pid: i32) -> Option<CapturedFile> {
    let text = std::fs::read_to_string(dir.join(owner).join(CAPTURED)).ok()?;
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    if f.len() != 7 || f[6] != pid as u64 {
        return None;
    }
    Some(CapturedFile {
        version: f[0],
        freeze: Duration::from_nanos(f[1]),
        total: Duration::from_nanos(f[2]),
        cow_chunks: f[3],
        image_bytes: f[4],
        memory_bytes: f[5],
    })
}

/// A capture as reported in the [`CAPTURED`] file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapturedFile {
    pub version: u64,
    pub freeze: Duration,
    pub total: Duration,
    pub cow_chunks: u64,
    pub image_bytes: u64,
    pub memory_bytes: u64,
}

/// A random 32-bit value from the kernel (scratch names, image ids).
pub fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), 4, 0) };
    if n == 4 {
        u32::from_le_bytes(buf)
    } else {
        std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a lower-case hex string.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

static RUNTIME: OnceLock<Arc<NativeRuntime>> = OnceLock::new();

mod capture;
mod progress;
pub use progress::{progress_path, CaptureState, Progress, ProgressView};
mod regions;
mod requests;
mod rollback;
pub use requests::install_handler_if_default;
use requests::install_request_handlers;

impl NativeRuntime {
    /// Initializes the process's runtime once; later calls return the same runtime.
    pub fn init(config: NativeConfig) -> Result<Arc<NativeRuntime>> {
        if let Some(rt) = RUNTIME.get() {
            return Ok(rt.clone());
        }
        check_owner(&config.owner)?;
        let uffd = WriteProtectFd::open()?;
        let existing = list_versions(&config.dir, &config.owner)?;
        let last = existing.last().copied().unwrap_or(0);
        let restored = match config.restore {
            None => None,
            Some(from) => {
                let version = match from {
                    RestoreFrom::Version(v) => v,
                    RestoreFrom::Latest => last,
                };
                if version == 0 {
                    return Err(GhostError::Invalid(format!(
                        "KRUN_GHOST_RESTORE: no image of {} in {}",
                        config.owner,
                        config.dir.display()
                    )));
                }
                let chain = load_chain(&config.dir, &config.owner, version)?;
                Some((version, chain))
            }
        };
        let rt = Arc::new(NativeRuntime {
            config,
            uffd,
            regions: RwLock::new(Vec::new()),
            freeze: Mutex::new(()),
            filling: Mutex::new(None),
            inflight: Mutex::new(None),
            inflight_done: Condvar::new(),
            next_version: Mutex::new((last + 1, last, 0)),
            cow_chunks: Default::default(),
            restored_from: Mutex::new(restored),
            pinned: Mutex::new(Vec::new()),
            next_l1: Mutex::new(None),
        });
        let rt = RUNTIME.get_or_init(|| rt).clone();
        let fault_rt = rt.clone();
        std::thread::Builder::new()
            .name("krun-ghost-wp".into())
            .spawn(move || fault_rt.serve_faults())
            .map_err(|e| GhostError::Io {
                path: PathBuf::from("thread"),
                what: "spawning the write-fault thread".into(),
                source: e,
            })?;
        install_request_handlers();
        Ok(rt)
    }

    /// The runtime, if `init` was called.
    pub fn get() -> Option<Arc<NativeRuntime>> {
        RUNTIME.get().cloned()
    }

    pub fn config(&self) -> &NativeConfig {
        &self.config
    }

    /// The version the next [`NativeRuntime::checkpoint`] takes.
    pub fn next_version(&self) -> u64 {
        self.next_version.lock().expect("lock").0
    }

    /// Numbers the next checkpoint `version` at least (never backwards); the chain of
    /// parents is unchanged. For ranks whose own checkpoints were numbered apart and that
    /// take a collective checkpoint together again (the rank library's mode switch).
    pub fn skip_to(&self, version: u64) {
        let mut v = self.next_version.lock().expect("lock");
        v.0 = v.0.max(version);
    }

    /// The version the regions were restored from at start, if any.
    pub fn restored_version(&self) -> Option<u64> {
        self.restored_from
            .lock()
            .expect("lock")
            .as_ref()
            .map(|(v, _)| *v)
    }
}
