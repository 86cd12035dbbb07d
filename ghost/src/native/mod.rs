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
//! Images are files `<dir>/<owner>/<version>.kgi` (L1, by default in /dev/shm); the
//! checkpoint store flushes them to slower levels. A process started with
//! `KRUN_GHOST_RESTORE=<version>|latest` gets its regions filled from that image when it
//! registers them: that is "restore as a new process". `rollback()` rewrites the regions in
//! place from an image.
use crate::error::{GhostError, Result};
use crate::image::{self, Image, ImageBuilder, SectionKind, DELTA_CHUNK};
use crate::uffd::WriteProtectFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

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
static CHECKPOINT_REQUESTED: AtomicBool = AtomicBool::new(false);
static ROLLBACK_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_request_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        CHECKPOINT_REQUESTED.store(true, Ordering::SeqCst);
    } else if sig == libc::SIGUSR2 {
        ROLLBACK_REQUESTED.store(true, Ordering::SeqCst);
    }
}

/// Makes SIGUSR1 (checkpoint) and SIGUSR2 (rollback to the latest image) requests that the
/// next `safepoint` acts on, unless the program already handles those signals.
fn install_request_handlers() {
    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: sigaction with a zeroed struct reads the current disposition only; the
        // handler installed is async-signal-safe (one atomic store).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction != libc::SIG_DFL
            {
                continue;
            }
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_request_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

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

    /// Registers `len` bytes at `addr` under `name`. When the process was started to restore,
    /// the region is first filled from the image and `Ok(true)` is returned.
    ///
    /// # Safety
    /// `addr..addr+len` must be private anonymous memory (mmap'd or from `alloc_region`),
    /// page-aligned, writable, and stay mapped for the life of the process.
    pub unsafe fn register(&self, name: &str, addr: *mut u8, len: usize) -> Result<bool> {
        // SAFETY: the caller's contract.
        unsafe { self.register_as(name, addr, len, true) }
    }

    /// As [`NativeRuntime::register`], but never filled from the image the process was
    /// restored from: for a region the program adds while it runs (e.g. one that grows
    /// another), which the restored image may not hold.
    ///
    /// # Safety
    /// As for [`NativeRuntime::register`].
    pub unsafe fn register_fresh(&self, name: &str, addr: *mut u8, len: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.register_as(name, addr, len, false) }.map(|_| ())
    }

    /// # Safety
    /// As for [`NativeRuntime::register`].
    unsafe fn register_as(
        &self,
        name: &str,
        addr: *mut u8,
        len: usize,
        restore: bool,
    ) -> Result<bool> {
        let page = 4096;
        if addr.is_null()
            || !(addr as usize).is_multiple_of(page)
            || len == 0
            || !len.is_multiple_of(page)
        {
            return Err(GhostError::Invalid(format!(
                "region '{name}' at {addr:p}, {len} bytes: address and length must be non-zero multiples of 4096"
            )));
        }
        if name.is_empty() || name.len() > 200 {
            return Err(GhostError::Invalid(format!(
                "region name {name:?}: 1 to 200 bytes"
            )));
        }
        if self
            .regions
            .read()
            .expect("lock")
            .iter()
            .any(|r| r.name == name)
        {
            return Err(GhostError::Invalid(format!(
                "region '{name}' is already registered"
            )));
        }
        let mut restored = false;
        let from = restore.then(|| self.restored_from.lock().expect("lock"));
        if let Some((_, chain)) = from.as_ref().and_then(|g| g.as_ref()) {
            let images = chain
                .iter()
                .map(|b| Image::parse(b))
                .collect::<Result<Vec<_>>>()?;
            // SAFETY: the caller guarantees the range is writable memory we may fill.
            let out = unsafe { std::slice::from_raw_parts_mut(addr, len) };
            image::materialize_region(&images, name, out)?;
            restored = true;
        }
        // SAFETY: the caller guarantees the range is readable memory of this process.
        let zeros = unsafe { files::zero_chunks(addr, len, DELTA_CHUNK) };
        self.uffd.register(addr as u64, len as u64)?;
        self.uffd.set_protection(addr as u64, len as u64, true)?;
        let chunks = len.div_ceil(DELTA_CHUNK);
        let region = TrackedRegion {
            name: name.to_string(),
            addr: addr as usize,
            len,
            states: (0..chunks).map(|_| AtomicU8::new(CLEAN)).collect(),
            zero: zeros.into_iter().map(AtomicBool::new).collect(),
            dest: Mutex::new(vec![0; chunks]),
        };
        self.regions.write().expect("lock").push(Arc::new(region));
        // A region added after the last capture is not in its image: the next one is full.
        self.next_version.lock().expect("lock").2 = u32::MAX;
        Ok(restored)
    }

    /// Zeroes `len` bytes at `addr`, inside a registered region, and gives their memory back
    /// (`MADV_DONTNEED`): the chunks read as zero, are left out of the next full image (as
    /// holes) and are counted changed for the next incremental one. `addr` must start a chunk
    /// of the region ([`DELTA_CHUNK`] bytes from its start) and `len` cover whole chunks (or
    /// reach the region's end). A capture in flight is waited for first (it keeps what it
    /// froze).
    ///
    /// # Safety
    /// No other thread may access `addr..addr+len` during the call.
    pub unsafe fn discard(&self, addr: *mut u8, len: usize) -> Result<()> {
        let (addr, end) = (addr as usize, addr as usize + len);
        let region = self
            .regions
            .read()
            .expect("lock")
            .iter()
            .find(|r| addr >= r.addr && end <= r.addr + r.len)
            .cloned()
            .ok_or_else(|| {
                GhostError::Invalid(format!(
                    "discard of {len} bytes at {addr:#x}: not inside one registered region"
                ))
            })?;
        let off = addr - region.addr;
        if !off.is_multiple_of(DELTA_CHUNK)
            || !(len.is_multiple_of(DELTA_CHUNK) || end == region.addr + region.len)
        {
            return Err(GhostError::Invalid(format!(
                "discard of {len} bytes at offset {off} of region '{}': whole chunks of \
                 {DELTA_CHUNK} bytes only",
                region.name
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let chunks = off / DELTA_CHUNK..(off + len).div_ceil(DELTA_CHUNK);
        loop {
            self.wait_idle();
            let guard = self.freeze.lock().expect("lock");
            if chunks
                .clone()
                .any(|c| matches!(region.states[c].load(Ordering::Acquire), PENDING | COPYING))
            {
                // A capture started meanwhile: let it copy first.
                drop(guard);
                continue;
            }
            // SAFETY: private anonymous memory of a registered region (the contract of
            // `register`), which nothing else touches now (the caller's contract).
            if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
                return Err(GhostError::Io {
                    path: PathBuf::from("madvise"),
                    what: format!("discarding {len} bytes of region '{}'", region.name),
                    source: std::io::Error::last_os_error(),
                });
            }
            // Dropped pages lose their write protection: protect them again, so that the
            // next write faults and clears the chunk's zero flag.
            self.uffd.set_protection(addr as u64, len as u64, true)?;
            for c in chunks {
                region.zero[c].store(true, Ordering::Release);
                region.states[c].store(DIRTY, Ordering::Release);
            }
            drop(guard);
            return Ok(());
        }
    }

    /// Waits until no capture is copying (its report stays for [`NativeRuntime::wait`]).
    fn wait_idle(&self) {
        let mut slot = self.inflight.lock().expect("lock");
        while slot.as_ref().is_some_and(|i| !i.done) {
            slot = self.inflight_done.wait(slot).expect("lock");
        }
    }

    fn serve_faults(self: Arc<Self>) {
        loop {
            let fault = match self.uffd.next_fault() {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("krun-ghost: write-fault thread stops: {e}");
                    return;
                }
            };
            let addr = fault.address as usize;
            let region = self
                .regions
                .read()
                .expect("lock")
                .iter()
                .find(|r| addr >= r.addr && addr < r.addr + r.len)
                .cloned();
            let Some(region) = region else { continue };
            let c = (addr - region.addr) / DELTA_CHUNK;
            let guard = self.freeze.lock().expect("lock");
            loop {
                match region.states[c].load(Ordering::Acquire) {
                    PENDING => {
                        if region.states[c]
                            .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            self.copy_chunk(&region, c);
                            self.cow_chunks.fetch_add(1, Ordering::Relaxed);
                            region.zero[c].store(false, Ordering::Release);
                            region.states[c].store(DIRTY, Ordering::Release);
                            break;
                        }
                    }
                    COPYING => std::thread::yield_now(),
                    _ => {
                        region.zero[c].store(false, Ordering::Release);
                        region.states[c].store(DIRTY, Ordering::Release);
                        break;
                    }
                }
            }
            drop(guard);
            let (start, len) = region.chunk_range(c);
            if let Err(e) = self.uffd.set_protection(start as u64, len as u64, false) {
                eprintln!(
                    "krun-ghost: cannot unprotect chunk {c} of region '{}': {e}",
                    region.name
                );
            }
        }
    }

    /// Copies chunk `c` of `region` to its place in the image being filled.
    fn copy_chunk(&self, region: &TrackedRegion, c: usize) {
        let base = self.filling.lock().expect("lock").as_ref().map(|f| f.base);
        let Some(base) = base else { return };
        let dest = region.dest.lock().expect("lock")[c];
        let (start, len) = region.chunk_range(c);
        // SAFETY: the chunk lies inside a registered region (mapped for the process's life);
        // `dest` is this chunk's reserved, disjoint range of the image buffer, which stays
        // allocated until every PENDING/COPYING chunk is copied.
        unsafe { std::ptr::copy_nonoverlapping(start as *const u8, (base + dest) as *mut u8, len) };
    }

    /// Waits for the capture in flight, if any, and returns its report.
    pub fn wait(&self) -> Result<Option<CaptureReport>> {
        let mut slot = self.inflight.lock().expect("lock");
        while slot.as_ref().is_some_and(|i| !i.done) {
            slot = self.inflight_done.wait(slot).expect("lock");
        }
        match slot.take() {
            None => Ok(None),
            Some(i) => match i.result {
                Some(Ok(r)) => Ok(Some(r)),
                Some(Err(e)) => Err(GhostError::Invalid(format!(
                    "capture of v{} failed: {e}",
                    i.version
                ))),
                None => Ok(None),
            },
        }
    }

    /// Freezes the registered memory and captures it in the background; returns the version
    /// being written. The program is stopped only for the freeze. A capture still in flight
    /// is waited for first.
    pub fn checkpoint(self: &Arc<Self>) -> Result<u64> {
        self.wait()?;
        let freeze_start = Instant::now();
        let regions = self.regions.read().expect("lock").clone();
        if regions.is_empty() {
            return Err(GhostError::Invalid(
                "checkpoint with no registered region".into(),
            ));
        }
        let (version, parent) = {
            let mut v = self.next_version.lock().expect("lock");
            let version = v.0;
            let full = v.1 == 0 || v.2 == u32::MAX || v.2 + 1 >= self.config.full_every;
            let parent = if full { 0 } else { v.1 };
            v.0 += 1;
            v.1 = version;
            v.2 = if full { 0 } else { v.2 + 1 };
            (version, parent)
        };
        let meta = format!(
            "backend=native\nowner={}\nversion={version}\nparent={parent}\npid={}\nprogram={}\ncmdline={}\ncwd={}\nregions={}\ncreated_unix={}\n",
            self.config.owner,
            std::process::id(),
            std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
            hex(&std::fs::read("/proc/self/cmdline").unwrap_or_default()),
            std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
            regions.iter().map(|r| format!("{}:{}", r.name, r.len)).collect::<Vec<_>>().join(","),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        );
        let guard = self.freeze.lock().expect("lock");
        // Decide each region's chunks, size the image and lay out its sections in L1.
        let mut choices = Vec::with_capacity(regions.len());
        let mut sizes = vec![(4, meta.len())];
        for r in &regions {
            let dirty: Vec<bool> = r
                .states
                .iter()
                .map(|s| s.load(Ordering::Acquire) == DIRTY)
                .collect();
            // A full image leaves the known-zero chunks out (holes).
            let take: Vec<bool> = if parent == 0 {
                r.zero.iter().map(|z| !z.load(Ordering::Acquire)).collect()
            } else {
                dirty.clone()
            };
            let sparse = parent == 0 && take.iter().any(|&t| !t);
            let stored = if parent == 0 && !sparse {
                r.len
            } else {
                ImageBuilder::delta_len(r.len, &take)
            };
            sizes.push((r.name.len(), stored));
            choices.push((dirty, take));
        }
        let total = ImageBuilder::planned_len(&sizes);
        let l1 = match L1File::create(&self.config.dir, &self.config.owner, version, total) {
            Ok(f) => f,
            Err(e) => {
                self.next_version.lock().expect("lock").2 = u32::MAX;
                return Err(e);
            }
        };
        // SAFETY: the mapping is `total` bytes, writable, ours alone, and lives in `l1`,
        // which travels with the builder to the copy thread.
        let mut builder = unsafe { ImageBuilder::in_place(version, parent, l1.base(), total)? };
        builder.add(SectionKind::Meta, "meta", meta.as_bytes(), false)?;
        let mut plans = Vec::with_capacity(regions.len());
        for (r, (dirty, take)) in regions.iter().zip(choices) {
            let whole = parent == 0 && take.iter().all(|&t| t);
            let first = if whole {
                builder.reserve_offset(SectionKind::Region, &r.name, r.len)?
            } else if parent == 0 {
                builder.reserve_sparse(&r.name, r.len, &take)?
            } else {
                builder.reserve_delta(&r.name, r.len, &take)?
            };
            plans.push((dirty, take, first, whole));
        }
        let base = builder.base_ptr() as usize;
        *self.filling.lock().expect("lock") = Some(Filling { base });
        let mut memory_bytes = 0u64;
        for (r, (dirty, take, first, whole)) in regions.iter().zip(&plans) {
            // Protect runs of dirty chunks (clean ones are still protected).
            let mut c = 0;
            while c < dirty.len() {
                if dirty[c] {
                    let run_start = c;
                    while c < dirty.len() && dirty[c] {
                        c += 1;
                    }
                    let (start, _) = r.chunk_range(run_start);
                    let end = (r.addr + c * DELTA_CHUNK).min(r.addr + r.len);
                    self.uffd
                        .set_protection(start as u64, (end - start) as u64, true)?;
                } else {
                    c += 1;
                }
            }
            let mut dest = r.dest.lock().expect("lock");
            let mut k = 0;
            for c in 0..take.len() {
                if take[c] {
                    dest[c] = if *whole {
                        first + c * DELTA_CHUNK
                    } else {
                        first + k * DELTA_CHUNK
                    };
                    k += 1;
                    memory_bytes += r.chunk_range(c).1 as u64;
                    r.states[c].store(PENDING, Ordering::Release);
                } else {
                    r.states[c].store(CLEAN, Ordering::Release);
                }
            }
        }
        drop(guard);
        let freeze = freeze_start.elapsed();

        *self.inflight.lock().expect("lock") = Some(Inflight {
            version,
            done: false,
            result: None,
        });
        let rt = self.clone();
        std::thread::Builder::new()
            .name("krun-ghost-copy".into())
            .spawn(move || {
                let result = rt
                    .complete_capture(
                        regions,
                        builder,
                        l1,
                        version,
                        parent,
                        memory_bytes,
                        freeze,
                        freeze_start,
                    )
                    .map_err(|e| e.to_string());
                let mut slot = rt.inflight.lock().expect("lock");
                if let Some(i) = slot.as_mut() {
                    i.done = true;
                    i.result = Some(result);
                }
                rt.inflight_done.notify_all();
            })
            .map_err(|e| GhostError::Io {
                path: PathBuf::from("thread"),
                what: "spawning the copy thread".into(),
                source: e,
            })?;
        Ok(version)
    }

    #[allow(clippy::too_many_arguments)]
    fn complete_capture(
        &self,
        regions: Vec<Arc<TrackedRegion>>,
        mut builder: ImageBuilder,
        l1: L1File,
        version: u64,
        parent: u64,
        memory_bytes: u64,
        freeze: Duration,
        freeze_start: Instant,
    ) -> Result<CaptureReport> {
        let cow_before = self.cow_chunks.load(Ordering::Relaxed);
        for r in &regions {
            for c in 0..r.states.len() {
                if r.states[c]
                    .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.copy_chunk(r, c);
                    r.states[c].store(CLEAN, Ordering::Release);
                }
            }
        }
        // The fault thread may still be copying a chunk it claimed.
        for r in &regions {
            for s in &r.states {
                while matches!(s.load(Ordering::Acquire), PENDING | COPYING) {
                    std::thread::yield_now();
                }
            }
        }
        *self.filling.lock().expect("lock") = None;
        let image_bytes = builder.seal() as u64;
        drop(builder);
        let path = match l1.commit() {
            Ok(p) => p,
            Err(e) => {
                // No file for this version: the next image must not build on it.
                self.next_version.lock().expect("lock").2 = u32::MAX;
                return Err(e);
            }
        };
        self.prune()?;
        Ok(CaptureReport {
            version,
            parent,
            path,
            image_bytes,
            memory_bytes,
            cow_chunks: self.cow_chunks.load(Ordering::Relaxed) - cow_before,
            freeze,
            total: freeze_start.elapsed(),
        })
    }

    /// Keeps the images from the newest full image on (the newest complete chain; older
    /// versions live on in the checkpoint store's levels). Replaced files become spares whose
    /// memory the next images reuse.
    fn prune(&self) -> Result<()> {
        let versions = list_versions(&self.config.dir, &self.config.owner)?;
        let mut fulls = Vec::new();
        for &v in &versions {
            let path = image_path(&self.config.dir, &self.config.owner, v);
            let Ok(bytes) = read_header(&path) else {
                continue;
            };
            if bytes.1 == 0 {
                fulls.push(v);
            }
        }
        if fulls.len() > 1 {
            let keep_from = fulls[fulls.len() - 1];
            let owner_dir = self.config.dir.join(&self.config.owner);
            let mut spares = spare_files(&owner_dir).len();
            let limit = spare_limit()?;
            for v in versions.into_iter().filter(|&v| v < keep_from) {
                let path = image_path(&self.config.dir, &self.config.owner, v);
                // Keep old files as spares: their memory is reused by the next images.
                if spares < limit
                    && std::fs::rename(&path, owner_dir.join(format!(".spare-{v}"))).is_ok()
                {
                    spares += 1;
                } else {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Ok(())
    }

    /// Rewrites every registered region in place from `version` (the newest when `None`) and
    /// returns the version used. The caller must be at a point where no other thread of the
    /// program touches the regions.
    pub fn rollback(&self, version: Option<u64>) -> Result<u64> {
        self.wait()?;
        let version = match version {
            Some(v) => v,
            None => *list_versions(&self.config.dir, &self.config.owner)?
                .last()
                .ok_or_else(|| {
                    GhostError::Invalid(format!("rollback: no image of {}", self.config.owner))
                })?,
        };
        let chain = load_chain(&self.config.dir, &self.config.owner, version)?;
        let images = chain
            .iter()
            .map(|b| Image::parse(b))
            .collect::<Result<Vec<_>>>()?;
        let regions = self.regions.read().expect("lock").clone();
        for r in &regions {
            if images[0].region(&r.name).is_none() {
                return Err(GhostError::Invalid(format!(
                    "rollback to v{version}: the image has no region '{}'",
                    r.name
                )));
            }
        }
        for r in &regions {
            // Materialize into scratch first so a corrupt chain leaves memory untouched
            // (zeroed memory from the allocator: the holes of a sparse region stay untouched).
            let mut scratch = vec![0u8; r.len];
            image::materialize_region(&images, &r.name, &mut scratch)?;
            // SAFETY: the region is registered memory, mapped and writable for the process's
            // life; writes to protected chunks fault and are released by the fault thread.
            let live = unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, r.len) };
            for (want, now) in scratch
                .chunks(DELTA_CHUNK)
                .zip(live.chunks_mut(DELTA_CHUNK))
            {
                // A chunk zero on both sides is left alone (not touched, not faulted).
                if !(image::is_zero(want) && image::is_zero(now)) {
                    now.copy_from_slice(want);
                }
            }
        }
        Ok(version)
    }

    /// The rollback target named by `krun ghost rollback` in `<dir>/<owner>/rollback-request`
    /// (removed once read), else the newest image.
    fn requested_rollback_version(&self) -> Option<u64> {
        let path = self
            .config
            .dir
            .join(&self.config.owner)
            .join(ROLLBACK_REQUEST);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        text.trim().parse().ok().filter(|&v| v > 0)
    }

    /// Acts on a pending SIGUSR1 (checkpoint) or SIGUSR2 (rollback to the newest image).
    pub fn safepoint(self: &Arc<Self>) -> Result<SafepointAction> {
        if ROLLBACK_REQUESTED.swap(false, Ordering::SeqCst) {
            let version = self.rollback(self.requested_rollback_version())?;
            let marker = self.config.dir.join(&self.config.owner).join(ROLLED_BACK);
            let _ = std::fs::write(marker, format!("{version} {}\n", std::process::id()));
            return Ok(SafepointAction::RolledBack(version));
        }
        if CHECKPOINT_REQUESTED.swap(false, Ordering::SeqCst) {
            let owner_dir = self.config.dir.join(&self.config.owner);
            let _ = std::fs::remove_file(owner_dir.join(CAPTURE_FAILED));
            return match self.checkpoint() {
                Ok(v) => Ok(SafepointAction::CheckpointStarted(v)),
                Err(e) => {
                    // Best effort: on a full disk even this may fail, and the waiter times out.
                    let _ = std::fs::write(
                        owner_dir.join(CAPTURE_FAILED),
                        format!("{} {e}\n", std::process::id()),
                    );
                    Err(e)
                }
            };
        }
        Ok(SafepointAction::Nothing)
    }
}
