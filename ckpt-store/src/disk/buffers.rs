//! Aligned, pooled buffers.
use super::*;

/// A page-aligned anonymous mapping, the only kind of memory handed to O_DIRECT I/O.
pub(super) struct AlignedBuf {
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; nothing else aliases it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub(super) fn new(len: usize) -> Result<AlignedBuf> {
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

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
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
pub(super) struct Pool {
    pub(super) chunk: usize,
    pub(super) keep: usize,
    pub(super) bufs: Mutex<Vec<AlignedBuf>>,
}

impl Pool {
    pub(super) fn take(&self) -> Result<AlignedBuf> {
        let reused = self.bufs.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(b) => Ok(b),
            None => AlignedBuf::new(self.chunk),
        }
    }

    pub(super) fn give(&self, b: AlignedBuf) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        if bufs.len() < self.keep {
            bufs.push(b);
        }
    }
}
