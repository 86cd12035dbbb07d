//! The capture's progress record: a 4 KiB file `<dir>/<owner>/.progress`, mapped shared by
//! the capturing program (the writer) and by whoever sends the image on (the reader, e.g.
//! the node's store), so that the image can go to the next level while it is being copied.
//!
//! Layout (little endian; the first four fields are 64-bit atomics):
//!
//! ```text
//!   0  version being written (0 while the record is being set up)
//!   8  watermark: every byte of the listed ranges below this file offset is final
//!  16  state: 0 copying, 1 complete (the whole file is final and committed), 2 failed
//!  24  total file length
//!  32  u32 number of ranges (<= MAX_RANGES), u32 length of the path
//!  40  ranges: (u64 start, u64 end) file offsets of whole-region payloads, ascending
//! 552  path of the file being filled (its temporary name; renamed when complete)
//! ```
//!
//! Bytes outside the ranges (the image header, the sections' headers, meta sections) are
//! final only once the state is "complete": the header and the section checksums are
//! written last. The writer sets the version last when it starts a capture, the reader
//! checks it before and after reading the fields.
use crate::error::{GhostError, Result};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Most payload ranges a record lists (regions beyond are sent when the image is complete).
pub const MAX_RANGES: usize = 32;
const RECORD_LEN: usize = 4096;
const RANGES_AT: usize = 40;
const PATH_AT: usize = RANGES_AT + MAX_RANGES * 16;
const MAX_PATH: usize = RECORD_LEN - PATH_AT;

/// Where the state of a capture stands (see [`ProgressView::read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureState {
    Copying,
    Complete,
    Failed,
}

/// A snapshot of the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub version: u64,
    pub total: u64,
    pub ranges: Vec<(u64, u64)>,
    pub watermark: u64,
    pub state: CaptureState,
    /// The file being filled, under its temporary name.
    pub path: PathBuf,
}

/// The record's path for `owner` in L1 directory `dir`.
pub fn progress_path(dir: &Path, owner: &str) -> PathBuf {
    dir.join(owner).join(".progress")
}

struct Mapping {
    ptr: *mut u8,
}

// SAFETY: the mapping is shared memory accessed through atomics and plain copies of bytes
// that are set before the version that publishes them.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn open(path: &Path, create: bool) -> Result<Mapping> {
        let io = |what: &str, e: std::io::Error| GhostError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(|e| io("opening the progress record", e))?;
        if create {
            file.set_len(RECORD_LEN as u64)
                .map_err(|e| io("sizing the progress record", e))?;
        } else if file
            .metadata()
            .map_err(|e| io("reading its size", e))?
            .len()
            < RECORD_LEN as u64
        {
            return Err(GhostError::Invalid(format!(
                "{}: shorter than a progress record ({RECORD_LEN} bytes)",
                path.display()
            )));
        }
        // SAFETY: a shared mapping of RECORD_LEN bytes of a file at least that long.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RECORD_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io(
                "mapping the progress record",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Mapping { ptr: ptr.cast() })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: i < 4: the first 32 bytes, 8-byte aligned (the mapping is page aligned).
        unsafe { &*(self.ptr.add(i * 8) as *const AtomicU64) }
    }

    fn bytes(&self, at: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: at + len <= RECORD_LEN (callers); a racing writer only changes fields
        // that the version check around this read rejects.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), len) };
        out
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping of RECORD_LEN bytes.
        unsafe { libc::munmap(self.ptr.cast(), RECORD_LEN) };
    }
}

/// The capturing program's side.
pub(crate) struct ProgressRecord {
    map: Mapping,
}

impl ProgressRecord {
    /// Opens (creating) the record of `owner` in `dir` and announces `version`.
    pub(crate) fn begin(
        dir: &Path,
        owner: &str,
        version: u64,
        total: u64,
        ranges: &[(u64, u64)],
        file: &Path,
    ) -> Result<ProgressRecord> {
        let map = Mapping::open(&progress_path(dir, owner), true)?;
        let path = file.as_os_str().as_encoded_bytes();
        if path.len() > MAX_PATH {
            return Err(GhostError::Invalid(format!(
                "{}: path too long for the progress record",
                file.display()
            )));
        }
        let ranges = &ranges[..ranges.len().min(MAX_RANGES)];
        map.word(0).store(0, Ordering::Release);
        map.word(1).store(0, Ordering::Release);
        map.word(2).store(0, Ordering::Release);
        map.word(3).store(total, Ordering::Release);
        let mut fields = Vec::with_capacity(8 + ranges.len() * 16);
        fields.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        fields.extend_from_slice(&(path.len() as u32).to_le_bytes());
        for &(s, e) in ranges {
            fields.extend_from_slice(&s.to_le_bytes());
            fields.extend_from_slice(&e.to_le_bytes());
        }
        // SAFETY: 32 + fields <= PATH_AT and PATH_AT + path <= RECORD_LEN (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(fields.as_ptr(), map.ptr.add(32), fields.len());
            std::ptr::copy_nonoverlapping(path.as_ptr(), map.ptr.add(PATH_AT), path.len());
        }
        map.word(0).store(version, Ordering::Release);
        Ok(ProgressRecord { map })
    }

    /// Every byte of the ranges below `offset` is final.
    pub(crate) fn advance(&self, offset: u64) {
        self.map.word(1).fetch_max(offset, Ordering::AcqRel);
    }

    /// The whole file is final and committed (`ok`), or the capture failed.
    pub(crate) fn finish(&self, ok: bool) {
        self.map
            .word(2)
            .store(if ok { 1 } else { 2 }, Ordering::Release);
    }
}

/// The reader's side (see the module docs).
pub struct ProgressView {
    map: Mapping,
}

impl ProgressView {
    /// Opens the record of `owner` in L1 directory `dir` (it exists once a capture started).
    pub fn open(dir: &Path, owner: &str) -> Result<ProgressView> {
        Ok(ProgressView {
            map: Mapping::open(&progress_path(dir, owner), false)?,
        })
    }

    /// The record, if it describes a version newer than `after` (else `None`: that capture
    /// has not started, or the record is being set up).
    pub fn read(&self, after: u64) -> Option<Progress> {
        let version = self.map.word(0).load(Ordering::Acquire);
        if version <= after {
            return None;
        }
        let total = self.map.word(3).load(Ordering::Acquire);
        let head = self.map.bytes(32, 8);
        let n = (u32::from_le_bytes(head[..4].try_into().ok()?) as usize).min(MAX_RANGES);
        let plen = (u32::from_le_bytes(head[4..8].try_into().ok()?) as usize).min(MAX_PATH);
        let raw = self.map.bytes(RANGES_AT, n * 16);
        let ranges = raw
            .chunks_exact(16)
            .map(|c| {
                let s = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                let e = u64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
                (s.min(total), e.min(total).max(s.min(total)))
            })
            .collect();
        let path = PathBuf::from(std::ffi::OsString::from(
            String::from_utf8_lossy(&self.map.bytes(PATH_AT, plen)).into_owned(),
        ));
        let state = self.map.word(2).load(Ordering::Acquire);
        let watermark = self.map.word(1).load(Ordering::Acquire);
        // A new capture started while we read: the fields may mix two captures.
        if self.map.word(0).load(Ordering::Acquire) != version {
            return None;
        }
        Some(Progress {
            version,
            total,
            ranges,
            watermark,
            state: match state {
                0 => CaptureState::Copying,
                1 => CaptureState::Complete,
                _ => CaptureState::Failed,
            },
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_announces_its_ranges_then_its_progress_then_its_end() {
        let dir = std::env::temp_dir().join(format!("krun-progress-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("o")).unwrap();
        let w = ProgressRecord::begin(
            &dir,
            "o",
            7,
            1 << 20,
            &[(8192, 1 << 20)],
            Path::new("/x/.tmp-1"),
        )
        .unwrap();
        let r = ProgressView::open(&dir, "o").unwrap();
        assert!(r.read(7).is_none(), "version 7 is not newer than 7");
        let p = r.read(6).unwrap();
        assert_eq!(p.ranges, vec![(8192, 1 << 20)]);
        assert_eq!(p.path, PathBuf::from("/x/.tmp-1"));
        assert_eq!((p.watermark, p.state), (0, CaptureState::Copying));
        w.advance(65536);
        w.advance(4096); // never goes back
        assert_eq!(r.read(6).unwrap().watermark, 65536);
        w.finish(true);
        assert_eq!(r.read(6).unwrap().state, CaptureState::Complete);
        let w2 = ProgressRecord::begin(&dir, "o", 8, 10, &[], Path::new("/y")).unwrap();
        w2.finish(false);
        let p = r.read(7).unwrap();
        assert_eq!(
            (p.version, p.watermark, p.state),
            (8, 0, CaptureState::Failed)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
