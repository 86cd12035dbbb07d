//! Zero-copy puts: the L1 copy of a version is the image file itself, mapped and registered
//! with the store's endpoint, so the L2 and L3 RMA writes and the L4 disk write read the
//! file's own pages (tmpfs or page cache) and no byte is copied into store memory.
//!
//! The store keeps the mapping until the version leaves L1 (retention or
//! [`Store::forget_local`]); the file may be unlinked or renamed meanwhile, but must not be
//! truncated or rewritten in place while it is mapped (see [`fabric::Region::map_file`]).
//! Every read of the L1 copy checks its crc32c, so an image rewritten in place is detected
//! and the next level is used.
use super::{Inner, L1Copy, Level, Store};
use crate::disk::check_owner;
use crate::error::{Result, StoreError};
use fabric::{MemoryRegion, Region};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a put did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutReport {
    /// Bytes of the image.
    pub bytes: u64,
    /// Bytes copied into store memory for it (0 for a mapped file).
    pub copied: u64,
    /// crc32c of the image (checked by every reader).
    pub crc: u32,
}

impl Store {
    /// Stores the file at `path` as `owner`'s `version` at L1 without copying it: the file
    /// is mapped and registered with the store's endpoint (see the module docs), then its
    /// flush to L2-L4 is queued as for [`Store::put`].
    ///
    /// # Safety
    /// Until the version leaves this node's L1 (retention, [`Store::forget_local`] or the
    /// store's drop) and its flushes are done, no one may truncate the file (reading a page
    /// past its end raises SIGBUS) or rewrite it in place (the store's readers would see
    /// bytes change under them; the crc checks then reject the copy). Unlinking or renaming
    /// the file is fine.
    pub unsafe fn put_file(&self, owner: &str, version: u64, path: &Path) -> Result<PutReport> {
        check_owner(owner)?;
        let io = |what: &str, e: std::io::Error| StoreError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(|e| io("opening the image", e))?;
        let len = file
            .metadata()
            .map_err(|e| io("reading the image size", e))?
            .len();
        if len == 0 {
            return Err(StoreError::Truncated {
                path: path.to_path_buf(),
                expected: 1,
                actual: 0,
            });
        }
        let len = usize::try_from(len)
            .map_err(|_| StoreError::Invalid(format!("{}: {len} bytes", path.display())))?;
        // SAFETY: the caller keeps the file whole while the store holds the mapping (this
        // function's contract); the store only reads it.
        let region = unsafe { Region::map_file(&file, len) }?;
        let mr = self.inner.ep.register(region)?;
        self.insert_l1(owner, version, mr, len)
    }

    /// Stores an image that already lives in memory registered with this store's endpoint
    /// (see [`Store::register`]) as `owner`'s `version` at L1, without copying it. The store
    /// keeps `mr` until the version leaves L1.
    ///
    /// # Safety
    /// No one (this process through other clones of `mr`, or a remote peer holding its key)
    /// may write the first `len` bytes of `mr` from now on.
    pub unsafe fn put_registered(
        &self,
        owner: &str,
        version: u64,
        mr: MemoryRegion,
        len: usize,
    ) -> Result<PutReport> {
        check_owner(owner)?;
        if len == 0 || len > mr.len() {
            return Err(StoreError::Invalid(format!(
                "{owner} v{version}: {len} bytes of a {}-byte region",
                mr.len()
            )));
        }
        self.insert_l1(owner, version, mr, len)
    }

    /// Registers memory with this store's endpoint (for [`Store::put_registered`]).
    pub fn register(&self, region: Region) -> Result<MemoryRegion> {
        Ok(self.inner.ep.register(region)?)
    }

    /// Bytes [`Store::put`] copied into store memory since the store started.
    pub fn copied_bytes(&self) -> u64 {
        self.inner.copied.load(Ordering::Relaxed)
    }

    pub(super) fn insert_l1(
        &self,
        owner: &str,
        version: u64,
        mr: MemoryRegion,
        len: usize,
    ) -> Result<PutReport> {
        let inner: &Inner = &self.inner;
        // SAFETY: nobody writes the image while the store holds it (the callers' contract).
        let crc = crc32c::crc32c(unsafe { &mr.region().as_slice()[..len] });
        let key = (owner.to_string(), version);
        let old = inner.l1.lock().expect("lock").insert(
            key.clone(),
            L1Copy {
                mr: Arc::new(mr),
                len,
                crc,
                mapped: true,
            },
        );
        if let Some(old) = old {
            inner.recycle(old);
        }
        inner.errors.lock().expect("lock").remove(&key);
        inner.reset_key(&key);
        inner.mark_safe_at(&key, Level::L1, inner.cfg.node);
        inner.retain(owner, Level::L1);
        if let Some(tx) = &self.jobs {
            let _ = tx.send(key);
        }
        Ok(PutReport {
            bytes: len as u64,
            copied: 0,
            crc,
        })
    }
}
