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
//!
//! # Where each part lives
//!
//! `disk/format.rs` (the on-disk format: header, checksum table, their checks),
//! `disk/writer.rs` (writing a version), `disk/reader.rs` (reading and verifying one),
//! `disk/ring.rs` (the io_uring pipeline both use), `disk/buffers.rs` (the aligned buffer
//! pool), `disk/crc.rs` (the crc32c of a payload from its blocks' crcs); this file: the
//! level itself (its directory, names, listing, removal and retention).
use crate::error::{Result, StoreError};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

mod buffers;
mod crc;
mod format;
mod reader;
mod ring;
mod writer;

use buffers::{AlignedBuf, Pool};
use crc::{fold_crc, payload_crc_from_blocks};
use format::{check_table, decode_header, encode_header, u32_at};
pub use format::{field, header_crc, ImageHeader, BLOCK, FORMAT, HEADER_LEN, MAGIC, MAX_OWNER};
use reader::truncated;
use ring::{new_ring, Pipeline};
pub use writer::{Fault, WriteReport, WriteStep};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names() {
        assert!(check_owner("job/r0").is_ok());
        for bad in ["", "../x", "a//b", "a/./b", ".tmp-1", "a b", "/abs"] {
            assert!(check_owner(bad).is_err(), "{bad:?}");
        }
    }
}
