//! Memory that remote peers may read and write: page-aligned regions, their registrations,
//! and the descriptors (address, key, length) handed to peers.
use std::any::Any;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::error::{FabricError, Result};

/// Page-aligned anonymous memory, unmapped on drop. Large regions reserve address space only;
/// pages are backed when first touched.
///
/// Registered memory can change under us (remote writes), so the region never hands out
/// plain `&[u8]`: reads and writes go through copies and atomics.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    /// The mapping is this region's (unmapped on drop); `false` for a [`Region::view`].
    owned: bool,
}

// SAFETY: the region is plain memory owned by this value; all access goes through raw
// copies or atomics whose races are the caller's documented responsibility.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes (rounded up to a page) of zeroed memory.
    pub fn new(len: usize) -> Result<Region> {
        if len == 0 {
            return Err(FabricError::Registration {
                len,
                reason: "a region must hold at least one byte".into(),
            });
        }
        // SAFETY: anonymous private mapping; no file, no fixed address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(FabricError::Registration {
                len,
                reason: format!("mmap failed: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(Region {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            owned: true,
        })
    }

    /// Maps the first `len` bytes of `file` (private, readable and writable) so the file's
    /// pages can be registered and sent with RMA without copying them into fresh memory: on
    /// tmpfs (`/dev/shm`) or in the page cache the region uses the file's own pages. Writes
    /// through the region (by this process or remote peers) stay private: the file is never
    /// modified. With the verbs backend, registration asks for write access, so the kernel
    /// copies each page once when pinning it; libfabric's tcp and shm providers do not pin.
    ///
    /// # Safety
    /// For as long as the region (and any registration of it) lives, no one may truncate the
    /// file below `len` bytes (touching a page past the end raises SIGBUS), and the caller
    /// accepts that writes to the file by others show through in pages this process has not
    /// written (the region is a view of the file, not a snapshot).
    pub unsafe fn map_file(file: &std::fs::File, len: usize) -> Result<Region> {
        // Map the file's pages now, read-only, in one call instead of one fault per page
        // (MAP_POPULATE would break copy-on-write on this writable private mapping, copying
        // every page).
        Self::map_file_with(
            file,
            len,
            libc::MAP_PRIVATE,
            libc::MADV_POPULATE_READ,
            "mmap",
        )
    }

    /// Maps the first `len` bytes of `file` shared, readable and writable: what is written
    /// into the region (by this process or by RMA from a peer) lands in the file itself. For
    /// receiving an image straight into its file (a restore's fetch) instead of into a buffer
    /// that is copied out afterwards. The file must be at least `len` bytes long.
    ///
    /// # Safety
    /// For as long as the region (and any registration of it) lives, no one may truncate the
    /// file below `len` bytes (touching a page past the end raises SIGBUS); whoever else maps
    /// or reads the file sees the region's writes as they land.
    pub unsafe fn map_file_shared(file: &std::fs::File, len: usize) -> Result<Region> {
        // Map the file's pages now for writing, in one call instead of one fault per page.
        Self::map_file_with(
            file,
            len,
            libc::MAP_SHARED,
            libc::MADV_POPULATE_WRITE,
            "shared mmap",
        )
    }

    /// [`Region::map_file`] and [`Region::map_file_shared`]: maps the first `len` bytes of
    /// `file` readable and writable with `flags`, then asks the kernel to populate them with
    /// `advice` (best effort: kernels before 5.14 lack it and fault pages in later).
    ///
    /// # Safety
    /// As for the two callers: no one may truncate the file below `len` bytes while the
    /// region (and any registration of it) lives.
    unsafe fn map_file_with(
        file: &std::fs::File,
        len: usize,
        flags: libc::c_int,
        advice: libc::c_int,
        what: &str,
    ) -> Result<Region> {
        use std::os::fd::AsRawFd;
        let size = file
            .metadata()
            .map_err(|e| FabricError::Registration {
                len,
                reason: format!("reading the size of the file to map: {e}"),
            })?
            .len();
        if len == 0 || (len as u64) > size {
            return Err(FabricError::Registration {
                len,
                reason: format!("cannot map {len} bytes of a file of {size} bytes"),
            });
        }
        // SAFETY: a mapping of a file we hold open, no fixed address; the caller keeps the
        // file at least `len` bytes long while the mapping lives.
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            file.as_raw_fd(),
            0,
        );
        if ptr == libc::MAP_FAILED {
            return Err(FabricError::Registration {
                len,
                reason: format!(
                    "{what} of the file failed: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
        libc::madvise(ptr, len, advice);
        Ok(Region {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            owned: true,
        })
    }

    /// A region over `len` bytes of `parent` at `offset`, without a mapping of its own: a
    /// registration of it gives peers a remote key for that range alone (the checkpoint
    /// store lends each buddy only the range it reserved, not its whole arena).
    ///
    /// # Safety
    /// The view, and any registration of it, must be dropped before `parent` is.
    pub unsafe fn view(parent: &Region, offset: usize, len: usize) -> Result<Region> {
        if len == 0 {
            return Err(FabricError::Registration {
                len,
                reason: "a region must hold at least one byte".into(),
            });
        }
        parent.check(offset, len)?;
        Ok(Region {
            // SAFETY (of the add): offset + len is within the parent's mapping.
            ptr: NonNull::new(parent.as_ptr().add(offset)).expect("inside a mapping"),
            len,
            owned: false,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(FabricError::OutOfBounds {
                what: "local",
                offset: offset as u64,
                len: len as u64,
                region_len: self.len as u64,
            });
        }
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: bounds checked; the region is valid for its whole length.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Copies bytes of the region at `offset` into `out`.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check(offset, out.len())?;
        // SAFETY: bounds checked; the region is valid for its whole length.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check(offset, len)?;
        // SAFETY: bounds checked.
        unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), byte, len) };
        Ok(())
    }

    /// The 64-bit word at `offset` as an atomic (remote atomics target such words).
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64> {
        self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(FabricError::Misaligned(offset as u64));
        }
        // SAFETY: in bounds, 8-byte aligned (the mapping is page aligned), lives as long as &self.
        Ok(unsafe { &*(self.as_ptr().add(offset) as *const AtomicU64) })
    }

    /// A view of the bytes.
    ///
    /// # Safety
    /// No remote peer and no local RMA operation may write the range while the slice lives.
    pub unsafe fn as_slice(&self) -> &[u8] {
        std::slice::from_raw_parts(self.as_ptr(), self.len)
    }

    /// A mutable view of the bytes.
    ///
    /// # Safety
    /// No one else (remote peer, local RMA operation, another slice) may access the range
    /// while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        std::slice::from_raw_parts_mut(self.as_ptr(), self.len)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: ptr/len come from our own successful mmap.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({:p}, {} bytes)", self.ptr, self.len)
    }
}

/// What a peer needs to reach a registered region: its remote base address, key and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub key: u64,
    pub len: u64,
}

impl RemoteRegion {
    pub const ENCODED_LEN: usize = 24;

    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.key.to_le_bytes());
        out[16..].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<RemoteRegion> {
        if bytes.len() != Self::ENCODED_LEN {
            return Err(FabricError::BadAddress(format!(
                "remote region descriptor has {} bytes, expected {}",
                bytes.len(),
                Self::ENCODED_LEN
            )));
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Ok(RemoteRegion {
            addr: word(0),
            key: word(8),
            len: word(16),
        })
    }

    /// Checks `offset + len` against the region and returns the absolute remote address.
    pub fn target(&self, offset: u64, len: u64) -> Result<u64> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(FabricError::OutOfBounds {
                what: "remote",
                offset,
                len,
                region_len: self.len,
            });
        }
        Ok(self.addr + offset)
    }
}

/// A region registered with an endpoint. Cheap to clone; the registration is released (and
/// the memory unmapped) when the last clone and the last operation using it are gone.
#[derive(Clone)]
pub struct MemoryRegion {
    inner: Arc<RegisteredInner>,
}

struct RegisteredInner {
    // Field order matters: the registration is released before the memory is unmapped.
    registration: Box<dyn Any + Send + Sync>,
    remote: RemoteRegion,
    region: Region,
}

impl MemoryRegion {
    /// Used by backends: `registration` is dropped (deregistering) before `region`.
    pub(crate) fn new(
        region: Region,
        registration: Box<dyn Any + Send + Sync>,
        remote: RemoteRegion,
    ) -> Self {
        MemoryRegion {
            inner: Arc::new(RegisteredInner {
                registration,
                remote,
                region,
            }),
        }
    }

    pub fn region(&self) -> &Region {
        &self.inner.region
    }

    pub fn len(&self) -> usize {
        self.inner.region.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The descriptor to give to peers.
    pub fn remote(&self) -> RemoteRegion {
        self.inner.remote
    }

    pub(crate) fn registration<T: 'static>(&self) -> Option<&T> {
        self.inner.registration.downcast_ref()
    }

    pub(crate) fn check_local(&self, offset: usize, len: usize) -> Result<*mut u8> {
        self.inner.region.check(offset, len)?;
        // SAFETY: in bounds.
        Ok(unsafe { self.inner.region.as_ptr().add(offset) })
    }
}

impl std::ops::Deref for MemoryRegion {
    type Target = Region;
    fn deref(&self) -> &Region {
        &self.inner.region
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("region", &self.inner.region)
            .field("remote", &self.inner.remote)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn region_copies_and_bounds() {
        let r = Region::new(4096).unwrap();
        r.write_bytes(10, b"hello").unwrap();
        let mut out = [0u8; 5];
        r.read_bytes(10, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        let err = r.write_bytes(4094, b"abc").unwrap_err();
        assert!(
            matches!(
                err,
                FabricError::OutOfBounds {
                    offset: 4094,
                    len: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(r.atomic_u64(12), Err(FabricError::Misaligned(12))));
        assert!(Region::new(0).is_err());
    }

    #[test]
    fn remote_descriptor_round_trips_and_checks_bounds() {
        let d = RemoteRegion {
            addr: 0x1000,
            key: 77,
            len: 100,
        };
        assert_eq!(RemoteRegion::from_bytes(&d.to_bytes()).unwrap(), d);
        assert!(RemoteRegion::from_bytes(&[1, 2, 3]).is_err());
        assert_eq!(d.target(90, 10).unwrap(), 0x1000 + 90);
        assert!(d.target(91, 10).is_err());
        assert!(d.target(u64::MAX, 2).is_err());
    }

    #[test]
    fn file_region_reads_the_file_and_never_writes_it() {
        use std::io::Write;
        let path = std::env::temp_dir().join(format!("krun-map-file-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"checkpoint image bytes").unwrap();
        drop(f);
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: the test owns the file and does not truncate it.
        let r = unsafe { Region::map_file(&f, 10) }.unwrap();
        let mut out = [0u8; 10];
        r.read_bytes(0, &mut out).unwrap();
        assert_eq!(&out, b"checkpoint");
        r.write_bytes(0, b"XXXX").unwrap();
        drop(r);
        assert_eq!(std::fs::read(&path).unwrap(), b"checkpoint image bytes");
        // SAFETY: as above.
        let too_long = unsafe { Region::map_file(&f, 4096) }.unwrap_err();
        assert!(
            too_long.to_string().contains("file of 22 bytes"),
            "{too_long}"
        );
        // SAFETY: as above.
        assert!(unsafe { Region::map_file(&f, 0) }.is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn huge_region_reserves_without_touching() {
        // 64 GiB of address space: only reserved (MAP_NORESERVE), never backed.
        let r = Region::new(64 << 30).unwrap();
        r.write_bytes((64 << 30) - 8, &[7; 8]).unwrap();
        assert_eq!(
            r.atomic_u64((64 << 30) - 8)
                .unwrap()
                .load(Ordering::Relaxed),
            u64::from_le_bytes([7; 8])
        );
    }
}
