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

/// The path of one image.
pub fn image_path(dir: &Path, owner: &str, version: u64) -> PathBuf {
    dir.join(owner).join(format!("{version:010}.kgi"))
}

/// The versions held in `<dir>/<owner>`, ascending.
pub fn list_versions(dir: &Path, owner: &str) -> Result<Vec<u64>> {
    let d = dir.join(owner);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(GhostError::Io {
                path: d,
                what: "listing images".into(),
                source: e,
            })
        }
    };
    let mut out: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".kgi")?.parse().ok()
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// A read-only private mapping of an image file: reading an image this way costs no fresh
/// memory (its page-cache or tmpfs pages are used as they are). Images are replaced by
/// rename, never rewritten in place while they have their final name.
pub struct MappedFile {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a read-only mapping owned by this value.
unsafe impl Send for MappedFile {}
// SAFETY: as above; shared reads only.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    pub fn open(path: &Path) -> Result<MappedFile> {
        let file = std::fs::File::open(path).map_err(|e| GhostError::Io {
            path: path.to_path_buf(),
            what: "opening image".into(),
            source: e,
        })?;
        let len = file
            .metadata()
            .map_err(|e| GhostError::Io {
                path: path.to_path_buf(),
                what: "reading image size".into(),
                source: e,
            })?
            .len() as usize;
        if len == 0 {
            return Ok(MappedFile {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        // SAFETY: a private read-only mapping of a file we opened; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(GhostError::Io {
                path: path.to_path_buf(),
                what: "mapping image".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(MappedFile {
            ptr: p as *const u8,
            len,
        })
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: our mapping, unmapped once.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }
}

/// Loads `version` and its ancestors down to a full image, newest first (mapped).
pub fn load_chain(dir: &Path, owner: &str, version: u64) -> Result<Vec<MappedFile>> {
    let mut chain = Vec::new();
    let mut next = version;
    loop {
        let bytes = MappedFile::open(&image_path(dir, owner, next))?;
        let parent = Image::parse(&bytes)?.parent_id;
        chain.push(bytes);
        if parent == 0 {
            return Ok(chain);
        }
        if chain.len() > 10_000 || parent >= next {
            return Err(GhostError::Invalid(format!(
                "image {owner} v{next} names parent v{parent}: not an older image"
            )));
        }
        next = parent;
    }
}

/// Writes `bytes` as `path` atomically: a temporary file, fsync, rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| GhostError::Io {
        path: dir.to_path_buf(),
        what: "creating the image directory".into(),
        source: e,
    })?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("image")
    ));
    let io = |what: &str, e: std::io::Error| GhostError::Io {
        path: tmp.clone(),
        what: what.to_string(),
        source: e,
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
        f.write_all(bytes).map_err(|e| io("writing image", e))?;
        f.sync_all().map_err(|e| io("syncing image", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

struct TrackedRegion {
    name: String,
    addr: usize,
    len: usize,
    states: Vec<AtomicU8>,
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
        if let Some((_, chain)) = self.restored_from.lock().expect("lock").as_ref() {
            let images = chain
                .iter()
                .map(|b| Image::parse(b))
                .collect::<Result<Vec<_>>>()?;
            // SAFETY: the caller guarantees the range is writable memory we may fill.
            let out = unsafe { std::slice::from_raw_parts_mut(addr, len) };
            image::materialize_region(&images, name, out)?;
            restored = true;
        }
        self.uffd.register(addr as u64, len as u64)?;
        self.uffd.set_protection(addr as u64, len as u64, true)?;
        let chunks = len.div_ceil(DELTA_CHUNK);
        let region = TrackedRegion {
            name: name.to_string(),
            addr: addr as usize,
            len,
            states: (0..chunks).map(|_| AtomicU8::new(CLEAN)).collect(),
            dest: Mutex::new(vec![0; chunks]),
        };
        self.regions.write().expect("lock").push(Arc::new(region));
        // A region added after the last capture is not in its image: the next one is full.
        self.next_version.lock().expect("lock").2 = u32::MAX;
        Ok(restored)
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
                            region.states[c].store(DIRTY, Ordering::Release);
                            break;
                        }
                    }
                    COPYING => std::thread::yield_now(),
                    _ => {
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
            let take: Vec<bool> = if parent == 0 {
                vec![true; dirty.len()]
            } else {
                dirty.clone()
            };
            let stored = if parent == 0 {
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
        let mut builder = unsafe { ImageBuilder::in_place(version, parent, l1.map, total)? };
        builder.add(SectionKind::Meta, "meta", meta.as_bytes(), false)?;
        let mut plans = Vec::with_capacity(regions.len());
        for (r, (dirty, take)) in regions.iter().zip(choices) {
            let first = if parent == 0 {
                builder.reserve_offset(SectionKind::Region, &r.name, r.len)?
            } else {
                builder.reserve_delta(&r.name, r.len, &take)?
            };
            plans.push((dirty, take, first));
        }
        let base = builder.base_ptr() as usize;
        *self.filling.lock().expect("lock") = Some(Filling { base });
        let mut memory_bytes = 0u64;
        for (r, (dirty, take, first)) in regions.iter().zip(&plans) {
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
                    dest[c] = if parent == 0 {
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
        let mut scratch = Vec::new();
        for r in &regions {
            // Materialize into scratch first so a corrupt chain leaves memory untouched.
            scratch.resize(r.len, 0);
            image::materialize_region(&images, &r.name, &mut scratch)?;
            // SAFETY: the region is registered memory, mapped and writable for the process's
            // life; writes to protected chunks fault and are released by the fault thread.
            unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr(), r.addr as *mut u8, r.len) };
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

/// How many old image files to keep as spares, whose memory the next images reuse by
/// rewriting them in place: `KRUN_GHOST_SPARES` (0-16), else 2 — but 0 under a krund
/// (`KRUN_NODE_SOCKET` set), whose checkpoint agent maps committed image files into the
/// checkpoint store as their L1 copy: such a file may be unlinked (the mapping keeps it), never
/// rewritten or truncated under the store.
fn spare_limit() -> Result<usize> {
    match std::env::var("KRUN_GHOST_SPARES") {
        Ok(v) => v.parse::<usize>().ok().filter(|&n| n <= 16).ok_or_else(|| {
            GhostError::Invalid(format!("KRUN_GHOST_SPARES={v}: expected an integer 0-16"))
        }),
        Err(_) if std::env::var_os("KRUN_NODE_SOCKET").is_some() => Ok(0),
        Err(_) => Ok(2),
    }
}

/// Spare image files (old images kept for their memory), oldest first.
fn spare_files(owner_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(owner_dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(".spare-"))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// An L1 image file being written through a shared mapping: the capture copies memory
/// straight into it. A spare file is reused when there is one, because its pages are
/// already allocated (first-touch memory costs ~5x reused memory on these machines).
pub(crate) struct L1File {
    file: std::fs::File,
    map: *mut u8,
    len: usize,
    tmp: PathBuf,
    path: PathBuf,
}

// SAFETY: the mapping is owned by this value alone.
unsafe impl Send for L1File {}

impl L1File {
    fn create(dir: &Path, owner: &str, version: u64, len: usize) -> Result<L1File> {
        let path = image_path(dir, owner, version);
        let owner_dir = path
            .parent()
            .expect("image paths have a directory")
            .to_path_buf();
        let spare = spare_files(&owner_dir).into_iter().next();
        L1File::create_at(&path, len, spare)
    }

    /// An image file written in place at `path` (through a temporary name), reusing the file
    /// `spare` when given.
    pub(crate) fn create_at(path: &Path, len: usize, spare: Option<PathBuf>) -> Result<L1File> {
        let path = path.to_path_buf();
        let owner_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let io = |p: &Path, what: &str, e: std::io::Error| GhostError::Io {
            path: p.to_path_buf(),
            what: what.to_string(),
            source: e,
        };
        std::fs::create_dir_all(&owner_dir)
            .map_err(|e| io(&owner_dir, "creating the image directory", e))?;
        let tmp = owner_dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name().and_then(|n| n.to_str()).unwrap_or("image")
        ));
        if let Some(spare) = spare {
            let _ = std::fs::rename(spare, &tmp);
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)
            .map_err(|e| io(&tmp, "creating the image file", e))?;
        let fail = |what: &str, e: std::io::Error| {
            let _ = std::fs::remove_file(&tmp);
            io(&tmp, what, e)
        };
        file.set_len(len as u64)
            .map_err(|e| fail("sizing the image file", e))?;
        // Reserve the blocks now so a full tmpfs fails here, not with SIGBUS mid-copy.
        // SAFETY: fallocate on a descriptor we own.
        if unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, len as i64) }
            != 0
        {
            return Err(fail(
                "reserving space for the image (device full?)",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        // SAFETY: a shared mapping of `len` bytes of a file we just sized; checked below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(fail(
                "mapping the image file",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(L1File {
            file,
            map: map.cast(),
            len,
            tmp,
            path,
        })
    }

    /// The start of the mapping (valid until commit or drop).
    pub(crate) fn base(&self) -> *mut u8 {
        self.map
    }

    /// Unmaps, syncs and renames the file into place.
    pub(crate) fn commit(mut self) -> Result<PathBuf> {
        self.unmap();
        let result = self
            .file
            .sync_all()
            .and_then(|_| std::fs::rename(&self.tmp, &self.path));
        match result {
            Ok(()) => Ok(std::mem::take(&mut self.path)),
            Err(e) => Err(GhostError::Io {
                path: self.tmp.clone(),
                what: "syncing and renaming the image into place".into(),
                source: e,
            }),
        }
    }

    fn unmap(&mut self) {
        if !self.map.is_null() {
            // SAFETY: the mapping made in `create`, unmapped once.
            unsafe { libc::munmap(self.map.cast(), self.len) };
            self.map = std::ptr::null_mut();
        }
    }
}

impl Drop for L1File {
    fn drop(&mut self) {
        self.unmap();
        if !self.path.as_os_str().is_empty() {
            // Not committed: remove the partial file.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads just an image's header: (image id, parent id).
pub fn read_header(path: &Path) -> Result<(u64, u64)> {
    use std::io::Read;
    let mut head = [0u8; image::HEADER_LEN];
    let mut f = std::fs::File::open(path).map_err(|e| GhostError::Io {
        path: path.to_path_buf(),
        what: "opening image".into(),
        source: e,
    })?;
    f.read_exact(&mut head).map_err(|e| GhostError::Io {
        path: path.to_path_buf(),
        what: "reading image header".into(),
        source: e,
    })?;
    let crc = crc32c::crc32c(&head[..32]);
    if head[..8] != image::MAGIC || u32::from_le_bytes(head[32..36].try_into().expect("4")) != crc {
        return Err(GhostError::ImageCorrupt {
            what: format!("{}: bad image header", path.display()),
            offset: 0,
        });
    }
    Ok((
        u64::from_le_bytes(head[16..24].try_into().expect("8")),
        u64::from_le_bytes(head[24..32].try_into().expect("8")),
    ))
}

/// Allocates `len` bytes (rounded up to pages) of private anonymous memory suitable for
/// `register`. It is never freed: registered memory lives as long as the process.
pub fn alloc_region(len: usize) -> Result<*mut u8> {
    let len = len.div_ceil(4096) * 4096;
    // SAFETY: an anonymous private mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(GhostError::Io {
            path: PathBuf::from("mmap"),
            what: format!("allocating {len} bytes"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(p.cast())
}
