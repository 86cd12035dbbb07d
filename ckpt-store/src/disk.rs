//! L4: checkpoint images on disk, written and read with io_uring and O_DIRECT.
//!
//! # Writing
//!
//! A version is written to a temporary file `.tmp-<pid>-<seq>-<version>.kck` next to its final
//! name, opened with `O_DIRECT` and preallocated (`fallocate`) to its final size. The payload
//! goes out in large chunks (8 MiB by default, [`DiskOptions::chunk_size`]) with several writes
//! in flight ([`DiskOptions::queue_depth`]): straight from the caller's memory when it is
//! page-aligned (a mapped file, a registered region), else copied into a small pool of aligned
//! buffers that the level keeps and reuses (first-touch memory costs ~5x reused memory on our
//! machines). Then
//! the checksum table and the header are written, the file is fsync'd (an io_uring `FSYNC`), it
//! is renamed to its final name and the directory is fsync'd. A crash or an error at any point
//! therefore leaves earlier versions intact and never leaves an incomplete file under a final
//! name; an error removes the temporary file, and [`DiskLevel::open`] removes temporary files
//! whose writer process is gone.
//!
//! # io_uring
//!
//! There is no silent fallback: [`DiskLevel::open`] probes `io_uring_setup` and `O_DIRECT` in
//! the directory and fails with [`StoreError::IoUring`] (or an [`StoreError::Io`] naming
//! `O_DIRECT`) when either is unavailable (old kernel, seccomp, `kernel.io_uring_disabled`,
//! a filesystem without direct I/O). The caller decides whether to run without an L4 level.
//!
//! # On-disk format (version 2, all integers little endian)
//!
//! ```text
//! file   := header block (4096) | payload, zero-padded to 4096 | crc table, zero-padded to 4096
//!
//! header block (4096 bytes; bytes 0..16 keep their meaning in every format version):
//!   0   8  magic "KRCKDSK\0"
//!   8   2  format version (2)
//!  10   2  flags (0; a reader rejects flags it does not know)
//!  12   4  header crc32c: over all 4096 bytes of the block with these 4 bytes zero
//!  16   8  checkpoint version
//!  24   8  payload length in bytes
//!  32   4  crc32c of the whole payload
//!  36   4  block size (4096): the alignment and the checksum granularity
//!  40   8  table offset   = 4096 + round_up(payload length, 4096)
//!  48   8  table length   = 4 * ceil(payload length / 4096)
//!  56   4  crc32c of the table (its table-length bytes)
//!  60   4  owner length n (1..=255)
//!  64   8  file length    = table offset + round_up(table length, 4096)
//!  72   n  owner (UTF-8)
//!  72+n    zero up to 4096
//!
//! crc table := one u32 crc32c per 4096-byte block of the payload (the last block may be short)
//! ```
//!
//! A reader checks, in this order, and fails with a distinct error naming the file and where:
//! length >= 4096 ([`StoreError::Truncated`]), magic ([`StoreError::BadMagic`]), header crc
//! ([`StoreError::HeaderChecksum`]), format version ([`StoreError::Version`]), flags, owner,
//! version and layout fields ([`StoreError::Corrupt`] with the field's offset), file length
//! ([`StoreError::Truncated`]), table crc ([`StoreError::Corrupt`] at the table offset), the
//! whole-payload crc against the table, then every block ([`StoreError::PayloadChecksum`] with
//! the offset of the first bad 4 KiB block).
use crate::error::{Result, StoreError};
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The first 8 bytes of every image.
pub const MAGIC: [u8; 8] = *b"KRCKDSK\0";
/// The format version this build writes and reads.
pub const FORMAT: u16 = 2;
/// Alignment of every I/O and granularity of the checksum table.
pub const BLOCK: usize = 4096;
/// Size of the header block.
pub const HEADER_LEN: usize = BLOCK;
/// Longest owner name.
pub const MAX_OWNER: usize = 255;

/// Header field offsets (see the module documentation).
pub mod field {
    pub const FORMAT: usize = 8;
    pub const FLAGS: usize = 10;
    pub const HEADER_CRC: usize = 12;
    pub const VERSION: usize = 16;
    pub const PAYLOAD_LEN: usize = 24;
    pub const PAYLOAD_CRC: usize = 32;
    pub const BLOCK_SIZE: usize = 36;
    pub const TABLE_OFFSET: usize = 40;
    pub const TABLE_LEN: usize = 48;
    pub const TABLE_CRC: usize = 56;
    pub const OWNER_LEN: usize = 60;
    pub const FILE_LEN: usize = 64;
    pub const OWNER: usize = 72;
}

const TMP_PREFIX: &str = ".tmp-";
const SUFFIX: &str = ".kck";

fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

/// Tuning of a [`DiskLevel`].
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Bytes per I/O (rounded up to 4096). Default 8 MiB.
    pub chunk_size: usize,
    /// I/Os in flight, and buffers kept in the pool. Default 4.
    pub queue_depth: usize,
    /// Read with io_uring + O_DIRECT (default) or with plain buffered `pread`.
    pub direct_reads: bool,
    /// Test hook: make one step of every write fail with an errno.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            chunk_size: 8 << 20,
            queue_depth: 4,
            direct_reads: true,
            fault: None,
        }
    }
}

/// A step of [`DiskLevel::write`], for fault injection in tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteStep {
    Create,
    Preallocate,
    /// The completion of the second payload chunk (or the only one).
    Payload,
    Table,
    Header,
    Fsync,
    Rename,
    SyncDir,
}

/// An injected failure: `step` fails with `errno`.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub step: WriteStep,
    pub errno: i32,
}

/// What a write did.
#[derive(Clone, Debug)]
pub struct WriteReport {
    /// The final file.
    pub path: PathBuf,
    /// Payload bytes.
    pub bytes: u64,
    /// Bytes of the file (header, padding and checksum table included).
    pub file_bytes: u64,
    /// Payload bytes copied through the aligned buffers (the rest went to the device straight
    /// from the caller's page-aligned memory).
    pub copied: u64,
    /// Wall time from the call to the directory fsync.
    pub seconds: f64,
}

/// The decoded header of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub owner: String,
    pub version: u64,
    pub payload_len: u64,
    pub payload_crc: u32,
    pub table_offset: u64,
    pub table_len: u64,
    pub table_crc: u32,
    pub file_len: u64,
}

// ---------------------------------------------------------------------------------------------
// Aligned, pooled buffers.

/// A page-aligned anonymous mapping, the only kind of memory handed to O_DIRECT I/O.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing else aliases it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> Result<AlignedBuf> {
        // SAFETY: a fresh private anonymous mapping; the result is checked before use.
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
            return Err(StoreError::Io {
                path: PathBuf::from("(memory)"),
                what: format!("mapping a {len}-byte aligned I/O buffer"),
                source: std::io::Error::last_os_error(),
            });
        }
        // Large buffers in huge pages make the kernel's page pinning for O_DIRECT cheaper;
        // advice only, so its result does not matter.
        // SAFETY: advising our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Ok(AlignedBuf { ptr: p.cast(), len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, and `&mut self` makes
        // this the only live reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, once; no I/O uses it any more (the pipeline
        // drains or leaks buffers with I/O in flight, it never drops them).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Buffers of `chunk` bytes kept for reuse between writes and reads.
struct Pool {
    chunk: usize,
    keep: usize,
    bufs: Mutex<Vec<AlignedBuf>>,
}

impl Pool {
    fn take(&self) -> Result<AlignedBuf> {
        let reused = self.bufs.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(b) => Ok(b),
            None => AlignedBuf::new(self.chunk),
        }
    }

    fn give(&self, b: AlignedBuf) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        if bufs.len() < self.keep {
            bufs.push(b);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The io_uring pipeline.

fn new_ring(entries: u32) -> Result<IoUring> {
    IoUring::new(entries).map_err(|source| StoreError::IoUring {
        what: format!("io_uring_setup({entries})"),
        source,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    InFlight,
}

struct Slot {
    buf: AlignedBuf,
    state: SlotState,
    /// File offset and length of the I/O in flight (or last completed).
    offset: u64,
    len: usize,
}

/// The user_data of the fsync, which has no buffer.
const FSYNC_TAG: u64 = u64::MAX;

/// A ring with `depth` pooled buffers, each either free or lent to one I/O in flight.
///
/// The buffer-lifetime contract of every push: a buffer handed to the kernel stays owned by
/// its slot, untouched, until its completion has been reaped; `Drop` reaps every I/O still in
/// flight before the buffers go back to the pool, and leaks them if it cannot. The file is
/// borrowed for the pipeline's lifetime, so its descriptor outlives every I/O.
struct Pipeline<'a> {
    ring: IoUring,
    file: &'a File,
    pool: &'a Pool,
    slots: Vec<Slot>,
    in_flight: usize,
}

struct Completion {
    tag: u64,
    result: i32,
}

impl<'a> Pipeline<'a> {
    fn new(file: &'a File, pool: &'a Pool, depth: usize) -> Result<Pipeline<'a>> {
        let ring = new_ring((depth as u32 + 1).next_power_of_two())?;
        let mut slots = Vec::with_capacity(depth);
        for _ in 0..depth {
            slots.push(Slot {
                buf: pool.take()?,
                state: SlotState::Free,
                offset: 0,
                len: 0,
            });
        }
        Ok(Pipeline {
            ring,
            file,
            pool,
            slots,
            in_flight: 0,
        })
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| s.state == SlotState::Free)
    }

    /// The buffer of a free slot, to fill before a write or to read after a completion.
    fn buf(&mut self, slot: usize) -> &mut [u8] {
        debug_assert!(self.slots[slot].state == SlotState::Free);
        self.slots[slot].buf.as_mut_slice()
    }

    fn chunk(&self) -> usize {
        self.pool.chunk
    }

    /// Records that `slot` has an I/O of `len` bytes at `offset` in flight.
    fn mark_in_flight(&mut self, slot: usize, offset: u64, len: usize) {
        let s = &mut self.slots[slot];
        s.state = SlotState::InFlight;
        s.offset = offset;
        s.len = len;
    }

    /// Submits a write of the first `len` bytes of a free slot's buffer at `offset`.
    fn write(&mut self, slot: usize, len: usize, offset: u64) -> std::io::Result<()> {
        let s = &mut self.slots[slot];
        debug_assert!(s.state == SlotState::Free && len <= s.buf.len && len.is_multiple_of(BLOCK));
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), s.buf.ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: the buffer is `len` valid bytes owned by the slot, which is marked in flight
        // below and neither touched nor freed until the completion is reaped (see the type's
        // contract); the descriptor is borrowed for the pipeline's lifetime.
        unsafe { self.push(&entry)? };
        self.mark_in_flight(slot, offset, len);
        Ok(())
    }

    /// Submits a write of `len` bytes at `ptr`, memory of the caller's, using a free slot for
    /// the bookkeeping (its buffer stays unused).
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads of `len` bytes until this I/O's completion has been
    /// reaped: by [`Pipeline::complete`] or, at the latest, by the drain when the pipeline is
    /// dropped. A borrow of the memory that outlives the pipeline guarantees it. (The kernel
    /// only reads this memory, so even a pipeline that cannot drain does not corrupt it.)
    unsafe fn write_from(
        &mut self,
        slot: usize,
        ptr: *const u8,
        len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        debug_assert!(self.slots[slot].state == SlotState::Free);
        debug_assert!((ptr as usize).is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK));
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: our caller keeps `ptr` valid until the completion is reaped; the
        // descriptor is borrowed for the pipeline's lifetime.
        unsafe { self.push(&entry)? };
        self.mark_in_flight(slot, offset, len);
        Ok(())
    }

    /// Submits a read of `len` bytes at `offset` into a free slot's buffer.
    fn read(&mut self, slot: usize, len: usize, offset: u64) -> std::io::Result<()> {
        let s = &mut self.slots[slot];
        debug_assert!(s.state == SlotState::Free && len <= s.buf.len && len.is_multiple_of(BLOCK));
        let entry = opcode::Read::new(types::Fd(self.file.as_raw_fd()), s.buf.ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: as for `write`: the kernel writes into `len` bytes owned by the slot, which
        // nobody reads or frees until the completion is reaped.
        unsafe { self.push(&entry)? };
        self.mark_in_flight(slot, offset, len);
        Ok(())
    }

    /// Submits an fsync of the whole file.
    fn fsync(&mut self) -> std::io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .build()
            .user_data(FSYNC_TAG);
        // SAFETY: no buffer; the descriptor is borrowed for the pipeline's lifetime.
        unsafe { self.push(&entry) }
    }

    /// Queues `entry` and submits it.
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points to must stay valid, and must not be accessed except by the
    /// kernel, until the entry's completion has been reaped by [`Pipeline::complete`] (or by
    /// the drain in `Drop`); any descriptor it names must stay open that long.
    unsafe fn push(&mut self, entry: &io_uring::squeue::Entry) -> std::io::Result<()> {
        // SAFETY: forwarded to our caller. The queue has room: it has more entries than
        // slots + the fsync, and each of those has at most one entry in flight.
        if unsafe { self.ring.submission().push(entry) }.is_err() {
            return Err(std::io::Error::other("io_uring submission queue full"));
        }
        self.in_flight += 1;
        // Submit now so the device starts while we fill the next buffer.
        self.submit(0)
    }

    fn submit(&mut self, want: usize) -> std::io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for one completion; its slot is free again on return.
    fn complete(&mut self) -> std::io::Result<Completion> {
        debug_assert!(self.in_flight > 0);
        loop {
            if let Some(cqe) = self.ring.completion().next() {
                self.in_flight -= 1;
                let tag = cqe.user_data();
                if let Some(s) = self.slots.get_mut(tag as usize) {
                    s.state = SlotState::Free;
                }
                return Ok(Completion {
                    tag,
                    result: cqe.result(),
                });
            }
            self.submit(1)?;
        }
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        // Reap whatever is still in flight (after an error) before the buffers can be reused.
        while self.in_flight > 0 {
            if self.complete().is_err() {
                // The kernel may still write into or read from these buffers: leak them.
                for s in self.slots.drain(..) {
                    std::mem::forget(s.buf);
                }
                return;
            }
        }
        for s in self.slots.drain(..) {
            self.pool.give(s.buf);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// crc32c of a concatenation from the crcs of its 4 KiB blocks.

/// The linear map "append 4096 zero bytes" on a crc32c, as byte tables:
/// crc32c(a ++ b) = shift(crc32c(a)) ^ crc32c(b) when b is 4096 bytes long.
struct Shift([[u32; 256]; 4]);

fn shift_block() -> &'static Shift {
    static SHIFT: OnceLock<Shift> = OnceLock::new();
    SHIFT.get_or_init(|| {
        // Column i of the map is its image of bit i (crc32c_combine is linear in its first
        // argument when the second is zero).
        let cols: Vec<u32> = (0..32)
            .map(|i| crc32c::crc32c_combine(1 << i, 0, BLOCK))
            .collect();
        let mut t = [[0u32; 256]; 4];
        for (k, table) in t.iter_mut().enumerate() {
            for (b, out) in table.iter_mut().enumerate() {
                *out = (0..8)
                    .filter(|j| b & (1 << j) != 0)
                    .fold(0, |acc, j| acc ^ cols[8 * k + j]);
            }
        }
        Shift(t)
    })
}

impl Shift {
    fn apply(&self, crc: u32) -> u32 {
        let t = &self.0;
        t[0][(crc & 0xff) as usize]
            ^ t[1][((crc >> 8) & 0xff) as usize]
            ^ t[2][((crc >> 16) & 0xff) as usize]
            ^ t[3][(crc >> 24) as usize]
    }
}

/// Extends the crc32c of a prefix with the crc32c of the next `len`-byte block.
fn fold_crc(acc: u32, block_crc: u32, len: usize) -> u32 {
    if len == BLOCK {
        shift_block().apply(acc) ^ block_crc
    } else {
        crc32c::crc32c_combine(acc, block_crc, len)
    }
}

/// The crc32c of a payload of `payload_len` bytes from its block crcs.
fn payload_crc_from_blocks(blocks: impl Iterator<Item = u32>, payload_len: u64) -> u32 {
    let mut acc = 0;
    let mut left = payload_len;
    for c in blocks {
        let len = left.min(BLOCK as u64);
        acc = fold_crc(acc, c, len as usize);
        left -= len;
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// The level.

/// A directory of checkpoint images, one file `<dir>/<owner>/<version:010>.kck` per version.
pub struct DiskLevel {
    dir: PathBuf,
    opts: DiskOptions,
    pool: Pool,
}

impl std::fmt::Debug for DiskLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskLevel")
            .field("dir", &self.dir)
            .field("opts", &self.opts)
            .finish()
    }
}

/// Checks a checkpoint owner name: path components of letters, digits, `-_.`, no `..`.
pub(crate) fn check_owner(owner: &str) -> Result<()> {
    let ok = !owner.is_empty()
        && owner.len() <= MAX_OWNER
        && owner.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && !p.starts_with(TMP_PREFIX)
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "checkpoint owner {owner:?}: use path components of letters, digits, '-', '_', '.'"
        )))
    }
}

/// An I/O error on `path`: [`StoreError::NoSpace`] for ENOSPC/EDQUOT, else [`StoreError::Io`].
fn io(path: &Path, what: impl Into<String>, e: std::io::Error) -> StoreError {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        StoreError::NoSpace {
            path: path.to_path_buf(),
            what: format!("the image ({})", what.into()),
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            what: what.into(),
            source: e,
        }
    }
}

fn io_result(res: i32) -> std::io::Result<usize> {
    if res < 0 {
        Err(std::io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Whether the process that wrote temporary file `name` (`.tmp-<pid>-...`) is gone.
fn writer_is_gone(name: &str) -> bool {
    let pid = name
        .strip_prefix(TMP_PREFIX)
        .and_then(|r| r.split('-').next())
        .and_then(|p| p.parse::<i32>().ok());
    match pid {
        Some(pid) if pid > 0 => {
            // SAFETY: signal 0 only checks that the process exists.
            let rc = unsafe { libc::kill(pid, 0) };
            rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        }
        _ => true,
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl DiskLevel {
    /// Opens (creating) `dir` with default options; see [`DiskLevel::open_with`].
    pub fn open(dir: &Path) -> Result<DiskLevel> {
        DiskLevel::open_with(dir, DiskOptions::default())
    }

    /// Opens (creating) `dir`: probes io_uring and O_DIRECT there (failing with an error that
    /// names the missing one) and removes temporary files left by writers that are gone.
    pub fn open_with(dir: &Path, opts: DiskOptions) -> Result<DiskLevel> {
        if opts.queue_depth == 0 || opts.queue_depth > 64 {
            return Err(StoreError::Invalid(format!(
                "disk queue depth {} (use 1..=64)",
                opts.queue_depth
            )));
        }
        if opts.chunk_size == 0 || opts.chunk_size > (1 << 30) {
            return Err(StoreError::Invalid(format!(
                "disk chunk size {} (use 4096..=1 GiB)",
                opts.chunk_size
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| io(dir, "creating the checkpoint directory", e))?;
        drop(new_ring(2)?);
        let probe = dir.join(format!(
            "{TMP_PREFIX}{}-{}-probe",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe);
        let _ = std::fs::remove_file(&probe);
        if let Err(e) = opened {
            let what = if e.raw_os_error() == Some(libc::EINVAL) {
                "this filesystem does not support O_DIRECT, which L4 images need"
            } else {
                "creating a file with O_DIRECT in the checkpoint directory"
            };
            return Err(io(dir, what, e));
        }
        let chunk = round_up(opts.chunk_size);
        let level = DiskLevel {
            dir: dir.to_path_buf(),
            pool: Pool {
                chunk,
                keep: opts.queue_depth,
                bufs: Mutex::new(Vec::new()),
            },
            opts: DiskOptions {
                chunk_size: chunk,
                ..opts
            },
        };
        level.remove_stale(dir);
        Ok(level)
    }

    fn remove_stale(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.is_file() && name.starts_with(TMP_PREFIX) && writer_is_gone(&name) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    eprintln!(
                        "krun-store: L4: cannot remove stale {}: {err}",
                        e.path().display()
                    );
                }
            } else if meta.is_dir() {
                self.remove_stale(&e.path());
            }
        }
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options in effect (chunk size rounded to 4096).
    pub fn options(&self) -> &DiskOptions {
        &self.opts
    }

    /// The file of one version.
    pub fn path(&self, owner: &str, version: u64) -> PathBuf {
        self.dir.join(owner).join(format!("{version:010}{SUFFIX}"))
    }

    /// The versions of `owner` present under a final name, ascending. (A file under a final
    /// name was complete when renamed; [`DiskLevel::read`] verifies it.)
    pub fn versions(&self, owner: &str) -> Result<Vec<u64>> {
        check_owner(owner)?;
        let d = self.dir.join(owner);
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&d, "listing versions", e)),
        };
        let mut v: Vec<u64> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(SUFFIX)?.parse().ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Writes a version; see [`DiskLevel::write_with_progress`].
    pub fn write(&self, owner: &str, version: u64, data: &[u8]) -> Result<WriteReport> {
        self.write_with_progress(owner, version, data, &mut |_| {})
    }

    /// Writes a version (replacing an existing one atomically). `progress` is called with the
    /// payload bytes written so far, last with `data.len()` once the version is durably in
    /// place. On an error nothing is left under a temporary name and earlier versions are
    /// untouched; the exception is a failed fsync of the directory after the rename, where
    /// the new version is complete but its name may not survive a crash.
    pub fn write_with_progress(
        &self,
        owner: &str,
        version: u64,
        data: &[u8],
        progress: &mut dyn FnMut(u64),
    ) -> Result<WriteReport> {
        check_owner(owner)?;
        let start = Instant::now();
        let final_path = self.path(owner, version);
        let dir = final_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.dir.clone());
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| io(&dir, "creating the owner directory", e))?;
            // Make the new directories durable: sync each parent up to the level's root.
            let mut d = dir.as_path();
            while let Some(parent) = d.parent() {
                sync_dir(parent).map_err(|e| io(parent, "syncing the directory", e))?;
                if parent == self.dir {
                    break;
                }
                d = parent;
            }
        }
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}-{}-{version}{SUFFIX}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let fault = |step: WriteStep| match self.opts.fault {
            Some(f) if f.step == step => Err(std::io::Error::from_raw_os_error(f.errno)),
            _ => Ok(()),
        };
        let result = self
            .write_file(&tmp, owner, version, data, progress)
            .and_then(|written| {
                fault(WriteStep::Rename)
                    .and_then(|_| std::fs::rename(&tmp, &final_path))
                    .map_err(|e| {
                        io(
                            &final_path,
                            format!("renaming {} into place", tmp.display()),
                            e,
                        )
                    })?;
                Ok(written)
            });
        let (file_bytes, copied) = match result {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fault(WriteStep::SyncDir)
            .and_then(|_| sync_dir(&dir))
            .map_err(|e| {
                io(
                    &dir,
                    format!(
                        "syncing the directory after renaming {} into place",
                        final_path.display()
                    ),
                    e,
                )
            })?;
        progress(data.len() as u64);
        Ok(WriteReport {
            path: final_path,
            bytes: data.len() as u64,
            file_bytes,
            copied,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Writes and fsyncs the whole temporary file; returns its length and the bytes copied.
    fn write_file(
        &self,
        tmp: &Path,
        owner: &str,
        version: u64,
        data: &[u8],
        progress: &mut dyn FnMut(u64),
    ) -> Result<(u64, u64)> {
        let fault = |step: WriteStep| match self.opts.fault {
            Some(f) if f.step == step => Some(-f.errno),
            _ => None,
        };
        let payload_len = data.len();
        let blocks = payload_len.div_ceil(BLOCK);
        let table_offset = HEADER_LEN + round_up(payload_len);
        let table_len = blocks * 4;
        let file_len = table_offset + round_up(table_len);

        let file = match fault(WriteStep::Create) {
            Some(e) => Err(std::io::Error::from_raw_os_error(-e)),
            None => std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_DIRECT)
                .open(tmp),
        }
        .map_err(|e| io(tmp, "creating the image file (O_DIRECT)", e))?;
        preallocate(&file, tmp, file_len as u64, fault(WriteStep::Preallocate))?;

        let mut pipe = Pipeline::new(&file, &self.pool, self.opts.queue_depth)?;
        let chunk = pipe.chunk();
        let mut crcs: Vec<u32> = Vec::with_capacity(blocks);
        let mut payload_crc = 0u32;
        let mut done = 0u64;
        let mut payload_completions = 0usize;
        let payload_chunks = payload_len.div_ceil(chunk);

        // Reaps one completion, checking it; counts payload progress.
        let mut reap = |pipe: &mut Pipeline, done: &mut u64| -> Result<()> {
            let c = pipe.complete().map_err(|e| io(tmp, "io_uring_enter", e))?;
            let Some(slot) = pipe.slots.get(c.tag as usize) else {
                return Err(StoreError::Io {
                    path: tmp.to_path_buf(),
                    what: format!("unexpected io_uring completion {:#x}", c.tag),
                    source: std::io::Error::other("unexpected completion"),
                });
            };
            let (offset, len) = (slot.offset, slot.len);
            let end = offset + len as u64;
            let (step, what) = if offset == 0 {
                (WriteStep::Header, "writing the header".to_string())
            } else if offset >= table_offset as u64 {
                (
                    WriteStep::Table,
                    format!("writing the checksum table at bytes {offset}..{end}"),
                )
            } else {
                (
                    WriteStep::Payload,
                    format!("writing the payload at file bytes {offset}..{end}"),
                )
            };
            let mut result = c.result;
            if step == WriteStep::Payload {
                payload_completions += 1;
                if payload_completions == 2.min(payload_chunks) {
                    result = fault(WriteStep::Payload).unwrap_or(result);
                }
            } else if let Some(e) = fault(step) {
                result = e;
            }
            let n = io_result(result).map_err(|e| io(tmp, what.clone(), e))?;
            if n != len {
                return Err(StoreError::Io {
                    path: tmp.to_path_buf(),
                    what,
                    source: std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        format!("short write: {n} of {len} bytes"),
                    ),
                });
            }
            if step == WriteStep::Payload {
                *done += end.min((HEADER_LEN + payload_len) as u64) - offset;
                progress((*done).min(payload_len as u64));
            }
            Ok(())
        };

        // The payload, `queue_depth` writes in flight. Page-aligned data (a mapped file, a
        // registered region) goes to the device straight from `data`, checksummed while the
        // write runs; otherwise each chunk is copied into a pooled aligned buffer, checksummed
        // 4 KiB block by block while in cache. A last chunk ending in a short block is copied.
        let aligned = (data.as_ptr() as usize).is_multiple_of(BLOCK);
        let mut copied = 0u64;
        let mut at = 0usize;
        while at < payload_len {
            let Some(slot) = pipe.free_slot() else {
                reap(&mut pipe, &mut done)?;
                continue;
            };
            let n = chunk.min(payload_len - at);
            let src = &data[at..at + n];
            let file_offset = (HEADER_LEN + at) as u64;
            if aligned && n.is_multiple_of(BLOCK) {
                // SAFETY: `src` is borrowed from `data`, which outlives `pipe` (dropped, and
                // so drained, before this function returns); it is 4096-aligned (`data` is,
                // and `at` is a multiple of the chunk size) and `n` is a multiple of 4096.
                unsafe { pipe.write_from(slot, src.as_ptr(), n, file_offset) }
                    .map_err(|e| io(tmp, "io_uring submit (payload)", e))?;
                checksum(src, &mut crcs, &mut payload_crc);
            } else {
                let padded = round_up(n);
                let buf = pipe.buf(slot);
                fill_and_checksum(src, &mut buf[..padded], &mut crcs, &mut payload_crc);
                copied += n as u64;
                pipe.write(slot, padded, file_offset)
                    .map_err(|e| io(tmp, "io_uring submit (payload)", e))?;
            }
            at += n;
        }

        // The checksum table.
        let mut table = Vec::with_capacity(table_len);
        for c in &crcs {
            table.extend_from_slice(&c.to_le_bytes());
        }
        let table_crc = crc32c::crc32c(&table);
        let mut at = 0usize;
        while at < table_len {
            let Some(slot) = pipe.free_slot() else {
                reap(&mut pipe, &mut done)?;
                continue;
            };
            let n = chunk.min(table_len - at);
            let padded = round_up(n);
            let buf = pipe.buf(slot);
            buf[..n].copy_from_slice(&table[at..at + n]);
            buf[n..padded].fill(0);
            pipe.write(slot, padded, (table_offset + at) as u64)
                .map_err(|e| io(tmp, "io_uring submit (checksum table)", e))?;
            at += n;
        }

        // The header, last: it is the only block that needs every checksum.
        let header = ImageHeader {
            owner: owner.to_string(),
            version,
            payload_len: payload_len as u64,
            payload_crc,
            table_offset: table_offset as u64,
            table_len: table_len as u64,
            table_crc,
            file_len: file_len as u64,
        };
        let slot = loop {
            match pipe.free_slot() {
                Some(s) => break s,
                None => reap(&mut pipe, &mut done)?,
            }
        };
        encode_header(&header, &mut pipe.buf(slot)[..HEADER_LEN]);
        pipe.write(slot, HEADER_LEN, 0)
            .map_err(|e| io(tmp, "io_uring submit (header)", e))?;
        while pipe.in_flight > 0 {
            reap(&mut pipe, &mut done)?;
        }

        // Everything is written: make it durable.
        pipe.fsync()
            .map_err(|e| io(tmp, "io_uring submit (fsync)", e))?;
        let c = pipe
            .complete()
            .map_err(|e| io(tmp, "io_uring_enter (fsync)", e))?;
        io_result(fault(WriteStep::Fsync).unwrap_or(c.result))
            .map_err(|e| io(tmp, "fsync of the image", e))?;
        Ok((file_len as u64, copied))
    }

    /// Reads and verifies a version.
    pub fn read(&self, owner: &str, version: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_into(owner, version, &mut out, &mut |_| {})?;
        Ok(out)
    }

    /// Reads and verifies a version into `out` (replacing its contents; reusing a buffer avoids
    /// the first-touch cost of fresh memory). `progress` is called with the payload bytes read
    /// so far. Returns the header.
    pub fn read_into(
        &self,
        owner: &str,
        version: u64,
        out: &mut Vec<u8>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ImageHeader> {
        check_owner(owner)?;
        let path = self.path(owner, version);
        let file = open_image(&path, owner, version, self.opts.direct_reads)?;
        if self.opts.direct_reads {
            self.read_direct(&file, &path, owner, version, out, progress)
        } else {
            read_plain(&file, &path, owner, version, out, progress)
        }
    }

    /// Checks the header and the file length of a version without reading its payload.
    pub fn inspect(&self, owner: &str, version: u64) -> Result<ImageHeader> {
        check_owner(owner)?;
        let path = self.path(owner, version);
        let file = open_image(&path, owner, version, false)?;
        let size = file_size(&file, &path)?;
        let mut block = vec![0u8; HEADER_LEN];
        let n = pread_full(&file, &path, &mut block, 0)?;
        decode_header(&path, &block[..n], size, owner, version)
    }

    fn read_direct(
        &self,
        file: &File,
        path: &Path,
        owner: &str,
        version: u64,
        out: &mut Vec<u8>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ImageHeader> {
        let size = file_size(file, path)?;
        let mut pipe = Pipeline::new(file, &self.pool, self.opts.queue_depth)?;
        let chunk = pipe.chunk();
        let rd = |what: &str, e| io(path, format!("reading {what}"), e);

        // Header.
        pipe.read(0, HEADER_LEN, 0)
            .map_err(|e| rd("the header", e))?;
        let c = pipe.complete().map_err(|e| rd("the header", e))?;
        let n = io_result(c.result).map_err(|e| rd("the header", e))?;
        let h = decode_header(
            path,
            &pipe.buf(0)[..n.min(HEADER_LEN)],
            size,
            owner,
            version,
        )?;

        // Checksum table (completions may arrive in any order).
        let table_len = h.table_len as usize;
        let table_span = round_up(table_len);
        let mut table = vec![0u8; table_span];
        let mut at = 0usize;
        while at < table_span || pipe.in_flight > 0 {
            if at < table_span {
                if let Some(slot) = pipe.free_slot() {
                    let n = chunk.min(table_span - at);
                    pipe.read(slot, n, h.table_offset + at as u64)
                        .map_err(|e| rd("the checksum table", e))?;
                    at += n;
                    continue;
                }
            }
            let c = pipe.complete().map_err(|e| rd("the checksum table", e))?;
            let slot = c.tag as usize;
            let (off, len) = (pipe.slots[slot].offset, pipe.slots[slot].len);
            let got = io_result(c.result).map_err(|e| rd("the checksum table", e))?;
            if got != len {
                return Err(truncated(path, &h, size));
            }
            let rel = (off - h.table_offset) as usize;
            table[rel..rel + len].copy_from_slice(&pipe.buf(slot)[..len]);
        }
        table.truncate(table_len);
        check_table(path, &h, &table)?;

        // Payload: verify each block against the table and copy it out.
        let payload_len = h.payload_len as usize;
        out.clear();
        out.reserve(payload_len);
        let dst = out.as_mut_ptr();
        let mut first_bad: Option<(usize, u32, u32)> = None;
        let mut done = 0u64;
        let mut at = 0usize;
        while at < payload_len || pipe.in_flight > 0 {
            if at < payload_len {
                if let Some(slot) = pipe.free_slot() {
                    let n = chunk.min(payload_len - at);
                    pipe.read(slot, round_up(n), (HEADER_LEN + at) as u64)
                        .map_err(|e| rd("the payload", e))?;
                    at += n;
                    continue;
                }
            }
            let c = pipe.complete().map_err(|e| rd("the payload", e))?;
            let slot = c.tag as usize;
            let (off, len) = (pipe.slots[slot].offset, pipe.slots[slot].len);
            let got = io_result(c.result).map_err(|e| rd("the payload", e))?;
            if got != len {
                return Err(truncated(path, &h, size));
            }
            let rel = off as usize - HEADER_LEN;
            let n = len.min(payload_len - rel);
            let src = &pipe.buf(slot)[..n];
            if let Some(bad) = verify_blocks(src, rel, &table) {
                if first_bad.is_none_or(|f| bad.0 < f.0) {
                    first_bad = Some(bad);
                }
            }
            // SAFETY: `out` has capacity for `payload_len` bytes and rel + n <= payload_len;
            // `src` is a pipeline buffer, which cannot overlap `out`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(rel), n) };
            done += n as u64;
            progress(done);
        }
        if let Some((offset, stored, computed)) = first_bad {
            return Err(payload_error(path, offset, stored, computed));
        }
        // SAFETY: every byte in 0..payload_len was copied above (the chunks tile the payload
        // and each completed in full, or we returned).
        unsafe { out.set_len(payload_len) };
        Ok(h)
    }

    /// Removes a version (absent is fine).
    pub fn remove(&self, owner: &str, version: u64) -> Result<()> {
        check_owner(owner)?;
        let path = self.path(owner, version);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, "removing the image", e)),
        }
    }

    /// Keeps the newest `keep_last` complete versions (at least one) and removes the versions
    /// older than the oldest of them. "Complete" means the header verifies and the file has
    /// its full length ([`DiskLevel::inspect`]); incomplete or corrupt versions newer than
    /// that are left for [`DiskLevel::read`] to report and are not counted, so this never
    /// removes the last complete copy. Returns the removed versions.
    pub fn retain(&self, owner: &str, keep_last: usize) -> Result<Vec<u64>> {
        let versions = self.versions(owner)?;
        let keep = keep_last.max(1);
        let mut complete = 0;
        let mut cut = None;
        for (i, &v) in versions.iter().enumerate().rev() {
            if self.inspect(owner, v).is_ok() {
                complete += 1;
                if complete == keep {
                    cut = Some(i);
                    break;
                }
            }
        }
        let Some(cut) = cut else {
            return Ok(Vec::new());
        };
        let removed = versions[..cut].to_vec();
        for &v in &removed {
            self.remove(owner, v)?;
        }
        Ok(removed)
    }
}

fn preallocate(file: &File, path: &Path, len: u64, fault: Option<i32>) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let err = match fault {
        Some(e) => Some(std::io::Error::from_raw_os_error(-e)),
        None => {
            // SAFETY: fallocate on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
            (rc != 0).then(std::io::Error::last_os_error)
        }
    };
    match err {
        None => Ok(()),
        // A filesystem without fallocate: write into a sparse file instead (slower, and a
        // full disk then shows up as a failed write, which is handled the same way).
        Some(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => file
            .set_len(len)
            .map_err(|e| io(path, format!("setting the length to {len}"), e)),
        Some(e) => Err(io(path, format!("preallocating {len} bytes"), e)),
    }
}

fn open_image(path: &Path, owner: &str, version: u64, direct: bool) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound {
                owner: owner.to_string(),
                version,
            }
        } else {
            io(path, "opening the image", e)
        }
    })
}

/// Appends the crc32c of every 4 KiB block of `src` to `crcs` and extends `payload_crc`.
fn checksum(src: &[u8], crcs: &mut Vec<u32>, payload_crc: &mut u32) {
    for b in src.chunks(BLOCK) {
        let c = crc32c::crc32c(b);
        crcs.push(c);
        *payload_crc = fold_crc(*payload_crc, c, b.len());
    }
}

/// Copies `src` into `dst` (zero-padding the tail) and checksums it like [`checksum`].
fn fill_and_checksum(src: &[u8], dst: &mut [u8], crcs: &mut Vec<u32>, payload_crc: &mut u32) {
    // Work in pieces that stay in cache between the copy and the checksum.
    const PIECE: usize = 64 << 10;
    for (s, d) in src.chunks(PIECE).zip(dst.chunks_mut(PIECE)) {
        d[..s.len()].copy_from_slice(s);
        checksum(s, crcs, payload_crc);
    }
    dst[src.len()..].fill(0);
}

/// The first block of `chunk` (at payload offset `rel`) whose crc differs from the table:
/// (payload offset, stored, computed).
fn verify_blocks(chunk: &[u8], rel: usize, table: &[u8]) -> Option<(usize, u32, u32)> {
    for (i, b) in chunk.chunks(BLOCK).enumerate() {
        let idx = rel / BLOCK + i;
        let stored = u32_at(table, idx * 4);
        let computed = crc32c::crc32c(b);
        if stored != computed {
            return Some((rel + i * BLOCK, stored, computed));
        }
    }
    None
}

fn payload_error(path: &Path, offset: usize, stored: u32, computed: u32) -> StoreError {
    StoreError::PayloadChecksum {
        path: path.to_path_buf(),
        offset: offset as u64,
        file_offset: (HEADER_LEN + offset) as u64,
        stored,
        computed,
    }
}

fn truncated(path: &Path, h: &ImageHeader, size: u64) -> StoreError {
    StoreError::Truncated {
        path: path.to_path_buf(),
        expected: h.file_len,
        actual: size,
    }
}

fn file_size(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| io(path, "reading the image's length", e))
}

/// Reads up to `buf.len()` bytes at `offset`, stopping early only at the end of the file.
fn pread_full(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io(
                    path,
                    format!("reading at offset {}", offset + n as u64),
                    e,
                ))
            }
        }
    }
    Ok(n)
}

/// Buffered reads (the alternative to O_DIRECT, kept for comparison and for filesystems where
/// buffered reads are faster).
fn read_plain(
    file: &File,
    path: &Path,
    owner: &str,
    version: u64,
    out: &mut Vec<u8>,
    progress: &mut dyn FnMut(u64),
) -> Result<ImageHeader> {
    let size = file_size(file, path)?;
    let mut block = vec![0u8; HEADER_LEN];
    let n = pread_full(file, path, &mut block, 0)?;
    let h = decode_header(path, &block[..n], size, owner, version)?;
    let mut table = vec![0u8; h.table_len as usize];
    if pread_full(file, path, &mut table, h.table_offset)? != table.len() {
        return Err(truncated(path, &h, size));
    }
    check_table(path, &h, &table)?;
    let payload_len = h.payload_len as usize;
    out.clear();
    out.resize(payload_len, 0);
    const PIECE: usize = 8 << 20;
    let mut first_bad: Option<(usize, u32, u32)> = None;
    for (i, piece) in out.chunks_mut(PIECE).enumerate() {
        let rel = i * PIECE;
        if pread_full(file, path, piece, (HEADER_LEN + rel) as u64)? != piece.len() {
            return Err(truncated(path, &h, size));
        }
        if first_bad.is_none() {
            first_bad = verify_blocks(piece, rel, &table);
        }
        progress((rel + piece.len()) as u64);
    }
    if let Some((offset, stored, computed)) = first_bad {
        return Err(payload_error(path, offset, stored, computed));
    }
    Ok(h)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The crc32c of a 4096-byte header block, computed with its crc field as zero.
pub fn header_crc(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..field::HEADER_CRC]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[field::HEADER_CRC + 4..])
}

/// Encodes `h` into a 4096-byte header block (the owner was checked to fit).
fn encode_header(h: &ImageHeader, block: &mut [u8]) {
    block.fill(0);
    block[..8].copy_from_slice(&MAGIC);
    block[field::FORMAT..field::FORMAT + 2].copy_from_slice(&FORMAT.to_le_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put64(block, field::VERSION, h.version);
    put64(block, field::PAYLOAD_LEN, h.payload_len);
    put32(block, field::PAYLOAD_CRC, h.payload_crc);
    put32(block, field::BLOCK_SIZE, BLOCK as u32);
    put64(block, field::TABLE_OFFSET, h.table_offset);
    put64(block, field::TABLE_LEN, h.table_len);
    put32(block, field::TABLE_CRC, h.table_crc);
    put32(block, field::OWNER_LEN, h.owner.len() as u32);
    put64(block, field::FILE_LEN, h.file_len);
    block[field::OWNER..field::OWNER + h.owner.len()].copy_from_slice(h.owner.as_bytes());
    let crc = header_crc(block);
    put32(block, field::HEADER_CRC, crc);
}

/// Decodes and checks a header block read from `path`, whose length is `size`.
fn decode_header(
    path: &Path,
    b: &[u8],
    size: u64,
    owner: &str,
    version: u64,
) -> Result<ImageHeader> {
    let corrupt = |what: String, offset: usize| StoreError::Corrupt {
        path: path.to_path_buf(),
        what,
        offset: offset as u64,
    };
    if b.len() < HEADER_LEN {
        return Err(StoreError::Truncated {
            path: path.to_path_buf(),
            expected: HEADER_LEN as u64,
            actual: size,
        });
    }
    let b = &b[..HEADER_LEN];
    if b[..8] != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[..8]);
        return Err(StoreError::BadMagic {
            path: path.to_path_buf(),
            found,
        });
    }
    let stored = u32_at(b, field::HEADER_CRC);
    let computed = header_crc(b);
    if stored != computed {
        return Err(StoreError::HeaderChecksum {
            path: path.to_path_buf(),
            len: HEADER_LEN as u64,
            stored,
            computed,
        });
    }
    let format = u16_at(b, field::FORMAT);
    if format != FORMAT {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: format,
            supported: FORMAT,
        });
    }
    let flags = u16_at(b, field::FLAGS);
    if flags != 0 {
        return Err(corrupt(format!("unknown flags {flags:#06x}"), field::FLAGS));
    }
    let owner_len = u32_at(b, field::OWNER_LEN) as usize;
    if owner_len == 0 || owner_len > MAX_OWNER {
        return Err(corrupt(
            format!("owner length {owner_len} (1..={MAX_OWNER})"),
            field::OWNER_LEN,
        ));
    }
    let file_owner = String::from_utf8_lossy(&b[field::OWNER..field::OWNER + owner_len]);
    let file_version = u64_at(b, field::VERSION);
    if file_owner != owner || file_version != version {
        return Err(corrupt(
            format!("holds {file_owner} v{file_version}, expected {owner} v{version}"),
            field::VERSION,
        ));
    }
    let h = ImageHeader {
        owner: file_owner.into_owned(),
        version: file_version,
        payload_len: u64_at(b, field::PAYLOAD_LEN),
        payload_crc: u32_at(b, field::PAYLOAD_CRC),
        table_offset: u64_at(b, field::TABLE_OFFSET),
        table_len: u64_at(b, field::TABLE_LEN),
        table_crc: u32_at(b, field::TABLE_CRC),
        file_len: u64_at(b, field::FILE_LEN),
    };
    let block_size = u32_at(b, field::BLOCK_SIZE);
    if block_size as usize != BLOCK {
        return Err(corrupt(
            format!("block size {block_size} (this build uses {BLOCK})"),
            field::BLOCK_SIZE,
        ));
    }
    // The layout follows from the payload length; checked arithmetic, since this is input.
    let bl = BLOCK as u64;
    let layout = (|| {
        let blocks = h.payload_len.checked_add(bl - 1)? / bl;
        let table_offset = (HEADER_LEN as u64).checked_add(blocks.checked_mul(bl)?)?;
        let table_len = blocks.checked_mul(4)?;
        let file_len = table_offset.checked_add(table_len.checked_add(bl - 1)? / bl * bl)?;
        Some((table_offset, table_len, file_len))
    })();
    let Some((table_offset, table_len, file_len)) = layout else {
        return Err(corrupt(
            format!("payload length {} is impossible", h.payload_len),
            field::PAYLOAD_LEN,
        ));
    };
    for (name, got, want, at) in [
        (
            "table offset",
            h.table_offset,
            table_offset,
            field::TABLE_OFFSET,
        ),
        ("table length", h.table_len, table_len, field::TABLE_LEN),
        ("file length", h.file_len, file_len, field::FILE_LEN),
    ] {
        if got != want {
            return Err(corrupt(
                format!(
                    "{name} {got} does not match payload length {} (expected {want})",
                    h.payload_len
                ),
                at,
            ));
        }
    }
    if size < h.file_len {
        return Err(truncated(path, &h, size));
    }
    if size > h.file_len {
        return Err(corrupt(
            format!(
                "{} unexpected bytes after the checksum table (file is {size} bytes, header says {})",
                size - h.file_len,
                h.file_len
            ),
            h.file_len as usize,
        ));
    }
    Ok(h)
}

/// Checks the checksum table against its crc and the whole-payload crc in the header.
fn check_table(path: &Path, h: &ImageHeader, table: &[u8]) -> Result<()> {
    let computed = crc32c::crc32c(table);
    if computed != h.table_crc {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: format!(
                "checksum table fails its crc32c (stored {:#010x}, computed {computed:#010x})",
                h.table_crc
            ),
            offset: h.table_offset,
        });
    }
    let whole = payload_crc_from_blocks(table.chunks_exact(4).map(|c| u32_at(c, 0)), h.payload_len);
    if whole != h.payload_crc {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: format!(
                "checksum table does not add up to the payload crc32c in the header (header {:#010x}, table {whole:#010x})",
                h.payload_crc
            ),
            offset: field::PAYLOAD_CRC as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_crcs_fold_to_the_crc_of_the_whole() {
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 13) as u8).collect();
            let blocks = data.chunks(BLOCK).map(crc32c::crc32c);
            assert_eq!(
                payload_crc_from_blocks(blocks, len as u64),
                crc32c::crc32c(&data),
                "len {len}"
            );
        }
    }

    #[test]
    fn owner_names() {
        assert!(check_owner("job/r0").is_ok());
        for bad in ["", "../x", "a//b", "a/./b", ".tmp-1", "a b", "/abs"] {
            assert!(check_owner(bad).is_err(), "{bad:?}");
        }
    }
}
