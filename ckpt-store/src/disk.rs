//! L4: checkpoint images on disk, written with io_uring.
//!
//! A version is written to a temporary file opened with O_DIRECT and preallocated to its final
//! size, in 8 MiB chunks with up to 4 writes in flight, then fsync'd and renamed into place
//! (and the directory fsync'd): a crash or an error at any point leaves the previous version
//! intact and no incomplete file under a final name.
//!
//! ```text
//! file    := header (4096) | payload padded to 4096 | crc table padded to 4096
//! header  := magic "KRCKDSK\0" (8) | format u16 | reserved u16 | owner_len u32 | version u64
//!            | payload_len u64 | crc_chunk u32 | crc_count u32 | table_crc u32 | header_crc u32
//!            | owner (owner_len)                       (little endian; header_crc covers all
//!                                                        header bytes before it and the owner)
//! table   := crc32c of each 1 MiB of payload (u32 each)
//! ```
use crate::error::{Result, StoreError};
use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const MAGIC: [u8; 8] = *b"KRCKDSK\0";
pub const FORMAT: u16 = 1;
const BLOCK: usize = 4096;
const HEADER_FIXED: usize = 48;
/// Granularity of the checksum table: a bad byte is located to within this.
pub const CRC_CHUNK: usize = 1 << 20;
const IO_CHUNK: usize = 8 << 20;
const DEPTH: usize = 4;

fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

/// Page-aligned buffers for O_DIRECT, kept for reuse: first-touch memory costs ~5x reused
/// memory on these machines.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> Result<AlignedBuf> {
        // SAFETY: anonymous mapping, checked below.
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
                path: "mmap".into(),
                what: format!("allocating a {len}-byte I/O buffer"),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(AlignedBuf { ptr: p.cast(), len })
    }

    fn slice_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes and ours.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

static BUFFERS: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

fn take_buffer() -> Result<AlignedBuf> {
    match BUFFERS.lock().expect("buffer pool").pop() {
        Some(b) => Ok(b),
        None => AlignedBuf::new(IO_CHUNK),
    }
}

fn give_buffer(b: AlignedBuf) {
    let mut pool = BUFFERS.lock().expect("buffer pool");
    if pool.len() < DEPTH + 1 {
        pool.push(b);
    }
}

/// What a write did.
#[derive(Clone, Debug)]
pub struct WriteReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
}

/// A directory of checkpoint images, one file per (owner, version).
pub struct DiskLevel {
    dir: PathBuf,
}

/// Checks a checkpoint owner name: path components of letters, digits, `-_.`, no `..`.
pub(crate) fn check_owner(owner: &str) -> Result<()> {
    let ok = !owner.is_empty()
        && owner.len() <= 255
        && owner.split('/').all(|p| {
            !p.is_empty()
                && p != "."
                && p != ".."
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

fn io(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        StoreError::NoSpace {
            path: path.to_path_buf(),
            what: what.to_string(),
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source: e,
        }
    }
}

impl DiskLevel {
    /// Opens (creating) `dir` and removes temporary files left by interrupted writes.
    pub fn open(dir: &Path) -> Result<DiskLevel> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io(dir, "creating the checkpoint directory", e))?;
        let level = DiskLevel {
            dir: dir.to_path_buf(),
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
            let path = e.path();
            if name.starts_with(".tmp-") {
                let _ = std::fs::remove_file(&path);
            } else if path.is_dir() {
                self.remove_stale(&path);
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of one version.
    pub fn path(&self, owner: &str, version: u64) -> PathBuf {
        self.dir.join(owner).join(format!("{version:010}.kck"))
    }

    /// The complete versions of `owner`, ascending.
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
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".kck")?.parse().ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    pub fn write(&self, owner: &str, version: u64, data: &[u8]) -> Result<WriteReport> {
        self.write_with_progress(owner, version, data, &mut |_| {})
    }

    /// Writes a version; `progress` is called with the bytes written so far.
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
        let dir = final_path.parent().expect("has a directory").to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, "creating the owner directory", e))?;
        let tmp = dir.join(format!(".tmp-{}-{version}", std::process::id()));
        let result = self
            .write_file(&tmp, owner, version, data, progress)
            .and_then(|_| {
                std::fs::rename(&tmp, &final_path)
                    .map_err(|e| io(&final_path, "renaming the image into place", e))?;
                let d =
                    std::fs::File::open(&dir).map_err(|e| io(&dir, "opening the directory", e))?;
                d.sync_all()
                    .map_err(|e| io(&dir, "syncing the directory", e))
            });
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(WriteReport {
            path: final_path,
            bytes: data.len() as u64,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    fn write_file(
        &self,
        tmp: &Path,
        owner: &str,
        version: u64,
        data: &[u8],
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let payload_blocks = round_up(data.len());
        let crc_count = data.len().div_ceil(CRC_CHUNK);
        let table_len = round_up(crc_count * 4);
        let total = BLOCK + payload_blocks + table_len;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(tmp)
            .map_err(|e| io(tmp, "creating the image file (O_DIRECT)", e))?;
        // SAFETY: fallocate on our descriptor.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, total as i64) };
        if rc != 0 {
            return Err(io(
                tmp,
                &format!("preallocating {total} bytes"),
                std::io::Error::last_os_error(),
            ));
        }
        let mut ring = IoUring::new(DEPTH as u32 * 2)
            .map_err(|e| io(tmp, "io_uring_setup (io_uring unavailable?)", e))?;
        let mut crcs = Vec::with_capacity(crc_count);
        for chunk in data.chunks(CRC_CHUNK) {
            crcs.push(crc32c::crc32c(chunk));
        }
        // Payload: chunks copied into aligned buffers, DEPTH writes in flight.
        let mut in_flight: Vec<Option<AlignedBuf>> = (0..DEPTH).map(|_| None).collect();
        let mut free_slots: Vec<usize> = (0..DEPTH).collect();
        let mut offset = 0usize;
        let mut done = 0u64;
        let fd = types::Fd(file.as_raw_fd());
        let mut outstanding = 0;
        let mut first_error: Option<std::io::Error> = None;
        while (offset < data.len() || outstanding > 0) && first_error.is_none() {
            while offset < data.len() && !free_slots.is_empty() {
                let slot = free_slots.pop().expect("non-empty");
                let mut buf = take_buffer()?;
                let n = IO_CHUNK.min(data.len() - offset);
                let padded = round_up(n);
                let dst = buf.slice_mut();
                dst[..n].copy_from_slice(&data[offset..offset + n]);
                dst[n..padded].fill(0);
                let entry = opcode::Write::new(fd, buf.ptr, padded as u32)
                    .offset((BLOCK + offset) as u64)
                    .build()
                    .user_data(slot as u64 | ((padded as u64) << 8));
                // SAFETY: the buffer stays alive in `in_flight[slot]` until its completion
                // is reaped below; the file descriptor outlives the ring's use of it.
                unsafe { ring.submission().push(&entry) }
                    .map_err(|_| StoreError::Invalid("io_uring queue full".into()))?;
                in_flight[slot] = Some(buf);
                offset += n;
                outstanding += 1;
            }
            ring.submit_and_wait(1)
                .map_err(|e| io(tmp, "io_uring submit", e))?;
            let completions: Vec<(u64, i32)> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user, res) in completions {
                let slot = (user & 0xff) as usize;
                let want = (user >> 8) as i32;
                outstanding -= 1;
                if let Some(b) = in_flight[slot].take() {
                    give_buffer(b);
                }
                free_slots.push(slot);
                if res < 0 {
                    first_error.get_or_insert(std::io::Error::from_raw_os_error(-res));
                } else if res != want {
                    first_error.get_or_insert(std::io::Error::other(format!(
                        "short write: {res} of {want} bytes"
                    )));
                } else {
                    done += res as u64;
                    progress(done.min(data.len() as u64));
                }
            }
        }
        // Drain anything still in flight after an error before the buffers go away.
        while outstanding > 0 {
            ring.submit_and_wait(1)
                .map_err(|e| io(tmp, "io_uring submit", e))?;
            let n = ring.completion().count();
            outstanding -= n;
        }
        for b in in_flight.into_iter().flatten() {
            give_buffer(b);
        }
        if let Some(e) = first_error {
            return Err(io(tmp, "writing the payload", e));
        }
        // Trailer (crc table) and header, then fsync.
        let mut tail = AlignedBuf::new(table_len.max(BLOCK))?;
        let t = tail.slice_mut();
        t.fill(0);
        for (i, c) in crcs.iter().enumerate() {
            t[i * 4..i * 4 + 4].copy_from_slice(&c.to_le_bytes());
        }
        let table_crc = crc32c::crc32c(&t[..crc_count * 4]);
        pwrite_direct(&file, tmp, &t[..table_len], (BLOCK + payload_blocks) as u64)?;
        let mut head = AlignedBuf::new(BLOCK)?;
        let h = head.slice_mut();
        h.fill(0);
        let header = encode_header(
            owner,
            version,
            data.len() as u64,
            crc_count as u32,
            table_crc,
        )?;
        h[..header.len()].copy_from_slice(&header);
        pwrite_direct(&file, tmp, h, 0)?;
        file.sync_all().map_err(|e| io(tmp, "fsync", e))?;
        Ok(())
    }

    /// Reads and verifies a version.
    pub fn read(&self, owner: &str, version: u64) -> Result<Vec<u8>> {
        check_owner(owner)?;
        let path = self.path(owner, version);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotFound {
                    owner: owner.to_string(),
                    version,
                }
            } else {
                io(&path, "reading the image", e)
            }
        })?;
        decode_file(&path, owner, version, bytes)
    }

    pub fn remove(&self, owner: &str, version: u64) -> Result<()> {
        check_owner(owner)?;
        let path = self.path(owner, version);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, "removing", e)),
        }
    }

    /// Keeps the newest `keep_last` versions (at least one) and removes older ones.
    pub fn retain(&self, owner: &str, keep_last: usize) -> Result<()> {
        let versions = self.versions(owner)?;
        let keep = keep_last.max(1);
        if versions.len() > keep {
            for v in &versions[..versions.len() - keep] {
                self.remove(owner, *v)?;
            }
        }
        Ok(())
    }
}

fn pwrite_direct(file: &std::fs::File, path: &Path, data: &[u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(data, offset)
        .map_err(|e| io(path, "writing header/trailer", e))
}

fn encode_header(
    owner: &str,
    version: u64,
    payload_len: u64,
    crc_count: u32,
    table_crc: u32,
) -> Result<Vec<u8>> {
    let mut h = Vec::with_capacity(HEADER_FIXED + owner.len());
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&FORMAT.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&(owner.len() as u32).to_le_bytes());
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&payload_len.to_le_bytes());
    h.extend_from_slice(&(CRC_CHUNK as u32).to_le_bytes());
    h.extend_from_slice(&crc_count.to_le_bytes());
    h.extend_from_slice(&table_crc.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h), owner.as_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(owner.as_bytes());
    if h.len() > BLOCK {
        return Err(StoreError::Invalid(format!(
            "owner name of {} bytes",
            owner.len()
        )));
    }
    Ok(h)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Verifies a whole image file and returns its payload.
pub fn decode_file(path: &Path, owner: &str, version: u64, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
    let corrupt = |what: String, offset: usize| StoreError::Corrupt {
        path: path.to_path_buf(),
        what,
        offset: offset as u64,
    };
    if bytes.len() < BLOCK {
        return Err(StoreError::Truncated {
            path: path.to_path_buf(),
            expected: BLOCK as u64,
            actual: bytes.len() as u64,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(corrupt(
            format!("bad magic {:?}", String::from_utf8_lossy(&bytes[..8])),
            0,
        ));
    }
    let owner_len = u32_at(&bytes, 12) as usize;
    if HEADER_FIXED + owner_len > BLOCK {
        return Err(corrupt(
            format!("owner length {owner_len} exceeds the header block"),
            12,
        ));
    }
    let stored = u32_at(&bytes, 44);
    let computed = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[..44]),
        &bytes[HEADER_FIXED..HEADER_FIXED + owner_len],
    );
    if stored != computed {
        return Err(StoreError::Checksum {
            level: format!("L4 {} header", path.display()),
            owner: owner.to_string(),
            version,
            stored,
            computed,
        });
    }
    let format = u16::from_le_bytes([bytes[8], bytes[9]]);
    if format != FORMAT {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: format,
            supported: FORMAT,
        });
    }
    let file_owner =
        String::from_utf8_lossy(&bytes[HEADER_FIXED..HEADER_FIXED + owner_len]).to_string();
    let file_version = u64_at(&bytes, 16);
    if file_owner != owner || file_version != version {
        return Err(corrupt(
            format!("holds {file_owner} v{file_version}, expected {owner} v{version}"),
            16,
        ));
    }
    let payload_len = u64_at(&bytes, 24) as usize;
    let crc_chunk = u32_at(&bytes, 32) as usize;
    let crc_count = u32_at(&bytes, 36) as usize;
    let table_crc = u32_at(&bytes, 40);
    if crc_chunk != CRC_CHUNK || crc_count != payload_len.div_ceil(CRC_CHUNK) {
        return Err(corrupt(
            format!("checksum table of {crc_count} x {crc_chunk} bytes for {payload_len} bytes"),
            32,
        ));
    }
    let table_at = BLOCK + round_up(payload_len);
    let expected = table_at + round_up(crc_count * 4);
    if bytes.len() < expected {
        return Err(StoreError::Truncated {
            path: path.to_path_buf(),
            expected: expected as u64,
            actual: bytes.len() as u64,
        });
    }
    let table = &bytes[table_at..table_at + crc_count * 4];
    let computed = crc32c::crc32c(table);
    if computed != table_crc {
        return Err(corrupt(
            "checksum table does not match its checksum".into(),
            table_at,
        ));
    }
    for (i, chunk) in bytes[BLOCK..BLOCK + payload_len]
        .chunks(CRC_CHUNK)
        .enumerate()
    {
        let want = u32_at(table, i * 4);
        let got = crc32c::crc32c(chunk);
        if want != got {
            return Err(StoreError::Checksum {
                level: format!(
                    "L4 {} payload bytes {}..{}",
                    path.display(),
                    i * CRC_CHUNK,
                    i * CRC_CHUNK + chunk.len()
                ),
                owner: owner.to_string(),
                version,
                stored: want,
                computed: got,
            });
        }
    }
    bytes.truncate(BLOCK + payload_len);
    bytes.drain(..BLOCK);
    Ok(bytes)
}
