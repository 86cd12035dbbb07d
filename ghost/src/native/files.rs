//! Image files of the native checkpointer: their names and versions, read-only mappings of
//! them, atomic writes, the L1 file a capture fills in place (with spare files reused for
//! their memory), and the private anonymous memory regions are allocated from.
use crate::error::{GhostError, Result};
use crate::image::{self, Image};
use std::path::{Path, PathBuf};
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
/// How many old image files to keep as spares, whose memory the next images reuse by
/// rewriting them in place: `KRUN_GHOST_SPARES` (0-16), else 2 — but 0 under a krund
/// (`KRUN_NODE_SOCKET` set), whose checkpoint agent maps committed image files into the
/// checkpoint store as their L1 copy: such a file may be unlinked (the mapping keeps it), never
/// rewritten or truncated under the store.
pub(crate) fn spare_limit() -> Result<usize> {
    match std::env::var("KRUN_GHOST_SPARES") {
        Ok(v) => v.parse::<usize>().ok().filter(|&n| n <= 16).ok_or_else(|| {
            GhostError::Invalid(format!("KRUN_GHOST_SPARES={v}: expected an integer 0-16"))
        }),
        Err(_) if std::env::var_os("KRUN_NODE_SOCKET").is_some() => Ok(0),
        Err(_) => Ok(2),
    }
}

/// Spare image files (old images kept for their memory), oldest first.
pub(crate) fn spare_files(owner_dir: &Path) -> Vec<PathBuf> {
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
    /// Every page is mapped already ([`L1File::populate`]).
    populated: bool,
}

// SAFETY: the mapping is owned by this value alone.
unsafe impl Send for L1File {}

impl L1File {
    pub(crate) fn create(dir: &Path, owner: &str, version: u64, len: usize) -> Result<L1File> {
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
            populated: false,
        })
    }

    /// A file of `len` bytes readied under a temporary name, its pages mapped for writing,
    /// for the next capture to take without doing this work during its freeze or faulting
    /// on its pages while it copies (see [`L1File::retarget`]): the oldest spare of
    /// `<dir>/<owner>` when there is one, else a new file (after the first capture, before
    /// any image was replaced: the one extra file the spare budget allows).
    pub(crate) fn prepare(dir: &Path, owner: &str, len: usize) -> Result<L1File> {
        let owner_dir = dir.join(owner);
        let spare = spare_files(&owner_dir).into_iter().next();
        let mut f = L1File::create_at(&owner_dir.join("next"), len, spare)?;
        f.populate();
        Ok(f)
    }

    /// Maps every page of the file for writing now (one call instead of a page fault per
    /// 4 KiB while the capture copies); best effort, no byte changes.
    pub(crate) fn populate(&mut self) {
        if !self.populated && !self.map.is_null() {
            // SAFETY: our own mapping of `len` bytes; populating changes no byte.
            unsafe { libc::madvise(self.map.cast(), self.len, libc::MADV_POPULATE_WRITE) };
            self.populated = true;
        }
    }

    /// Names the image the file becomes at commit.
    pub(crate) fn retarget(&mut self, path: PathBuf) {
        self.path = path;
    }

    /// The file's temporary name (until [`L1File::commit`]).
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    pub(crate) fn len(&self) -> usize {
        self.len
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

/// For each `chunk`-byte chunk of `addr..addr+len`: whether it is all zero. A chunk none of
/// whose pages is present or swapped out (`/proc/self/pagemap`) is zero without being read
/// (private anonymous memory never touched or given back); the others are read.
///
/// # Safety
/// `addr..addr+len` must be readable private anonymous memory of this process.
pub(crate) unsafe fn zero_chunks(addr: *const u8, len: usize, chunk: usize) -> Vec<bool> {
    use std::io::{Read, Seek, SeekFrom};
    const PAGE: usize = 4096;
    let pages = len.div_ceil(PAGE);
    // Bit 63: present; bit 62: swapped.
    let mapped: Option<Vec<bool>> = (|| {
        let mut f = std::fs::File::open("/proc/self/pagemap").ok()?;
        f.seek(SeekFrom::Start((addr as usize / PAGE * 8) as u64))
            .ok()?;
        let mut raw = vec![0u8; pages * 8];
        f.read_exact(&mut raw).ok()?;
        Some(
            raw.chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) >> 62 != 0)
                .collect(),
        )
    })();
    // SAFETY: the caller's contract.
    let bytes = unsafe { std::slice::from_raw_parts(addr, len) };
    bytes
        .chunks(chunk)
        .enumerate()
        .map(|(c, data)| {
            let first = c * chunk / PAGE;
            let last = (c * chunk + data.len()).div_ceil(PAGE);
            match &mapped {
                Some(m) if !m[first..last].iter().any(|&p| p) => true,
                _ => image::is_zero(data),
            }
        })
        .collect()
}
