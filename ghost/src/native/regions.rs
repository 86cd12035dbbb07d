//! Registering the memory a program checkpoints, and giving parts of it back.
//!
//! A registered region is write-protected through userfaultfd chunk by chunk (see the
//! module doc of [`crate::native`]); `discard` zeroes whole chunks and marks them known
//! zero, so that full images leave them out as holes.
//!
//! Restoring a region from a single full image on tmpfs whose region payload sits at a page
//! boundary (what captures write) maps the file's pages over the region, private and
//! copy-on-write (`MAP_PRIVATE | MAP_FIXED`): no byte is copied and no fresh memory is
//! touched until the program writes. Otherwise (an incremental chain, a sparse region, an
//! image on another file system, a kernel without tmpfs write-protection) the region is
//! filled by copying.
use super::{files, image_path, NativeRuntime, TrackedRegion, CLEAN, COPYING, DIRTY, PENDING};
use crate::error::{GhostError, Result};
use crate::image::{self, Image, DELTA_CHUNK};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

impl NativeRuntime {
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
        let mut mapped = false;
        let from = restore.then(|| self.restored_from.lock().expect("lock"));
        if let Some((version, chain)) = from.as_ref().and_then(|g| g.as_ref()) {
            let images = chain
                .iter()
                .map(|b| Image::parse_verified(b))
                .collect::<Result<Vec<_>>>()?;
            // SAFETY: the caller's contract (private memory of ours, page-aligned).
            mapped =
                self.uffd.shmem() && unsafe { self.map_region(&images, *version, name, addr, len) };
            if mapped && self.uffd.register(addr as u64, len as u64).is_err() {
                // This kernel does not write-protect such a mapping: copy after all.
                // SAFETY: as above.
                unsafe { anonymous_over(addr, len) }?;
                mapped = false;
            }
            if mapped {
                self.pinned.lock().expect("lock").push(*version);
            } else {
                // SAFETY: the caller guarantees the range is writable memory we may fill.
                let out = unsafe { std::slice::from_raw_parts_mut(addr, len) };
                image::materialize_region(&images, name, out)?;
            }
            restored = true;
        }
        let zeros = if mapped {
            // Not scanned: pages of the file not yet mapped would read as absent, not zero.
            vec![false; len.div_ceil(DELTA_CHUNK)]
        } else {
            // SAFETY: the caller guarantees the range is readable memory of this process.
            unsafe { files::zero_chunks(addr, len, DELTA_CHUNK) }
        };
        if !mapped {
            self.uffd.register(addr as u64, len as u64)?;
        }
        self.uffd.set_protection(addr as u64, len as u64, true)?;
        let chunks = len.div_ceil(DELTA_CHUNK);
        let region = TrackedRegion {
            name: name.to_string(),
            addr: addr as usize,
            len,
            states: (0..chunks).map(|_| AtomicU8::new(CLEAN)).collect(),
            zero: zeros.into_iter().map(AtomicBool::new).collect(),
            dest: Mutex::new(vec![0; chunks]),
            crcs: (0..chunks).map(|_| AtomicU32::new(0)).collect(),
            file_backed: AtomicBool::new(mapped),
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
            if region.file_backed.load(Ordering::Acquire) {
                // Pages of the image file would come back with MADV_DONTNEED: map fresh
                // anonymous memory over them instead (a new mapping: registered again).
                // SAFETY: inside a registered region, which nothing else touches now (the
                // caller's contract).
                unsafe { anonymous_over(addr as *mut u8, len) }?;
                self.uffd.register(addr as u64, len as u64)?;
            } else if {
                // SAFETY: private anonymous memory of a registered region (the contract of
                // `register`), which nothing else touches now (the caller's contract).
                unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) }
            } != 0
            {
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
}

impl NativeRuntime {
    /// Maps region `name` of a single full image straight from its file over
    /// `addr..addr+len` (see the module doc); `false` (memory untouched) when the image or
    /// its file does not allow it.
    ///
    /// # Safety
    /// `addr..addr+len` must be private memory of this process that nothing else uses.
    unsafe fn map_region(
        &self,
        images: &[Image<'_>],
        version: u64,
        name: &str,
        addr: *mut u8,
        len: usize,
    ) -> bool {
        let [image] = images else { return false };
        let Some(section) = image.region(name) else {
            return false;
        };
        if section.kind != image::SectionKind::Region
            || section.compressed
            || section.raw_len != len as u64
            || !section.offset.is_multiple_of(4096)
        {
            return false;
        }
        let path = image_path(&self.config.dir, &self.config.owner, version);
        let Ok(file) = std::fs::File::open(&path) else {
            return false;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: fstatfs fills the struct we own.
        let on_tmpfs = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::fstatfs(fd, &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
        };
        if !on_tmpfs {
            return false;
        }
        // SAFETY: replaces the caller's private memory (its contract) with a private,
        // copy-on-write mapping of the file's bytes at the section's page-aligned offset;
        // the file is at least offset + len long (the image parsed).
        let p = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                fd,
                section.offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            // A failed MAP_FIXED may have unmapped the range: put anonymous memory back.
            // SAFETY: as above.
            let _ = unsafe { anonymous_over(addr, len) };
            return false;
        }
        true
    }
}

/// Maps fresh private anonymous memory over `addr..addr+len`.
///
/// # Safety
/// The range must be memory of this process that nothing else uses; its content is lost.
unsafe fn anonymous_over(addr: *mut u8, len: usize) -> Result<()> {
    // SAFETY: the caller's contract.
    let p = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(GhostError::Io {
            path: PathBuf::from("mmap"),
            what: format!("mapping {len} bytes of fresh memory at {addr:p}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
