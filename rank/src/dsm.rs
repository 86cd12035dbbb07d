//! Distributed shared memory for the ranks of a job: regions allocated collectively, mapped
//! at the same virtual address on every rank, whose pages move between ranks on demand.
//!
//! Built on the `dsm` crate's driver: the DSM opens its own endpoint on the job's fabric
//! (same provider and address as the rank's) and agrees on addresses and region
//! descriptors through the rank's all-gather over the fabric.
//!
//! # Coherence model
//! Sequential consistency, single writer / multiple readers (IVY, Li and Hudak): a page is
//! either writable on exactly one rank, or readable on any number of ranks. A read of a page
//! this rank holds no copy of faults and fetches the page; a write to a page this rank does
//! not own for writing faults, and every other copy is invalidated (and acknowledged) before
//! the write is allowed. All ranks therefore see every write in one order consistent with
//! each rank's program order, and no flush is needed at [`SharedMemory::lock`],
//! [`SharedMemory::unlock`] or [`SharedMemory::barrier`]: they only order ranks. Programs
//! should still be data-race free (use the lock or the barrier), because a page that two
//! ranks write in turn moves for every turn (false sharing within a 4 KiB page is correct
//! but slow).
//!
//! # What a fault costs
//! A fault is a userfaultfd trap served by one of the DSM's fault threads
//! (`KRUN_DSM_FAULT_THREADS`, default 2):
//! - read fault, owner known (the hint from an earlier access): a one-sided fetch-and-add
//!   joining the page's copyset, then a one-sided 4 KiB RMA read of the owner's published
//!   copy; the owner's CPU is not involved. Two fabric round trips plus the local
//!   `UFFDIO_COPY`.
//! - read fault, owner unknown: a message to the page's manager (`page % size`, or the
//!   cell-tree locator with `KRUN_DSM_LOCATOR=dynamic`), forwarded to the owner, which
//!   replies with the page: about two message round trips.
//! - write fault: a message to the manager, forwarded to the owner, which invalidates every
//!   read copy, waits for every acknowledgement, drops its copy and sends the page. A write
//!   by the page's read owner (a write-protect fault) skips the manager: it invalidates the
//!   other copies itself and writes in place.
//! - a sequential read miss prefetches up to `KRUN_DSM_PREFETCH` (default 8) further pages.
//!
//! `bench -- dsm` measures these against an RMA read and a local userfaultfd fault.
//!
//! # Limits
//! - Regions are whole 4 KiB pages (the length is rounded up); their pages read as zero
//!   until written.
//!
//! # Checkpoints
//! With checkpoints on (`KRUN_GHOST_DIR`), every region has a snapshot registered with the
//! checkpointer as `krun-dsm-<n>` (n: this rank's allocations so far): right before each
//! coordinated capture ([`Rank::checkpoint`], also at a safepoint), each rank writes which
//! pages of the region it owns and their bytes into it (only pages that changed are
//! written, so incremental images stay small). The snapshot costs as much memory as the
//! pages this rank owns. A job started with `KRUN_GHOST_RESTORE` allocates its regions
//! again, in the same order and with the same lengths: each page is mapped at the rank that
//! owned it at the checkpoint, its manager records that owner, and pages nobody owned read
//! as zero; read copies are not restored (they fault in again). A checkpoint is taken with
//! every rank inside [`Rank::checkpoint`], so no page moves while it is taken (call it
//! outside DSM locks, from the thread that accesses the DSM). The lock table is not
//! captured: every lock is free after a restore.
//! - A region allocated after the checkpoint is not in its image: allocating it in the
//!   restored job fails (regions are matched by allocation order).
//! - Allocation, free and the barrier are collective: every rank calls them in the same
//!   order. After [`SharedMemory::free`] the region's addresses are unmapped on every rank.
//! - 64 locks, ids `0..64`, queued FIFO at rank 0.
//! - A rank that dies takes the pages it alone held with it; they are never served as zeros.
//!   An access that waits longer than `KRUN_DSM_FAULT_TIMEOUT_MS` (default 30000) makes the
//!   driver probe every other rank (a one-sided fetch-and-add of 0, bounded by the same
//!   timeout); if one does not answer, the rank prints an error naming the page, its region
//!   and offset, the ranks asked and the dead ones, and exits with code 75
//!   (`dsm::fault::EXIT_PAGE_UNREACHABLE`): the blocked access cannot be resumed without
//!   the page. Under krund the HA policy sees that exit (`RankExited`, code 75). When every
//!   rank answers, the access keeps waiting and a warning is printed. Join and leave during
//!   a run are not wired to the job's membership yet.
//! - The driver needs userfaultfd with write-protect support (Linux >= 5.7; root or
//!   `vm.unprivileged_userfaultfd=1`).
//!
//! ```no_run
//! let rank = krun::Rank::init()?;
//! let shm = rank.dsm()?;
//! let region = shm.alloc(1 << 20)?;
//! let words = region.as_ptr() as *mut u64;
//! if rank.rank() == 0 {
//!     // SAFETY: inside the region; nobody else writes it before the barrier.
//!     unsafe { words.write(42) };
//! }
//! shm.barrier()?;
//! // SAFETY: inside the region; written before the barrier.
//! assert_eq!(unsafe { words.read() }, 42);
//! shm.free(region)?;
//! shm.close()?;
//! rank.finalize()?;
//! # Ok::<(), krun::RankError>(())
//! ```
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ::dsm::{Collective, DsmConfig, SharedRegion};

use crate::error::{RankError, Result};
use crate::world::Rank;

/// The DSM's collectives over the rank's fabric all-gather.
struct RankCollective(Arc<Rank>);

impl Collective for RankCollective {
    fn rank(&self) -> usize {
        self.0.rank()
    }

    fn size(&self) -> usize {
        self.0.size()
    }

    fn allgather(&mut self, blob: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
        self.0.allgather(blob).map_err(|e| e.to_string())
    }
}

/// A region of distributed shared memory: `len` bytes at the same address on every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsmRegion(SharedRegion);

impl DsmRegion {
    /// The first byte. Accesses are ordinary loads and stores (unsafe: the caller keeps
    /// them inside `len` bytes and orders ranks with the lock or the barrier).
    pub fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr()
    }

    /// Length in bytes: the requested length rounded up to whole pages.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Counters of this rank's DSM since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DsmStats {
    /// Page faults served (reads and writes).
    pub faults: u64,
    /// Pages read one-sided from their owner's memory.
    pub remote_fetches: u64,
    /// Pages loaded ahead of a sequential read miss.
    pub prefetched: u64,
    /// Protocol messages received.
    pub messages: u64,
}

/// This rank's part of the job's distributed shared memory (see the [module](self) docs).
/// Dropping it stops the DSM's threads and unmaps its regions; do it collectively, after a
/// [`SharedMemory::barrier`], or the other ranks' faults on pages this rank owns fail.
pub struct SharedMemory {
    inner: Arc<Inner>,
    rank: Arc<Rank>,
    /// The capture hook copying owned pages into the snapshots, when checkpoints run.
    hook: Option<u64>,
}

struct Inner {
    dsm: ::dsm::Dsm,
    regions: Mutex<BTreeMap<usize, Held>>,
    /// Regions allocated so far (names the snapshots: `krun-dsm-<n>`).
    allocated: Mutex<u64>,
}

/// A live region and its snapshot: memory registered with the checkpointer, where every
/// capture first copies the pages this rank owns.
struct Held {
    region: SharedRegion,
    snapshot: Option<(usize, usize)>,
}

impl Inner {
    /// Before a capture: every live region's owned pages into its snapshot.
    fn capture(&self) -> Result<()> {
        let regions = self.regions.lock().map_err(|_| poisoned())?;
        for held in regions.values() {
            if let Some((addr, len)) = held.snapshot {
                // SAFETY: the snapshot memory was mapped for this region and is never
                // unmapped; only this capture (holding the table's lock) writes it.
                let out = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
                self.dsm.snapshot(&held.region, out)?;
            }
        }
        Ok(())
    }
}

impl Rank {
    /// Starts this rank's DSM (collective: every rank calls it). Settings: `KRUN_DSM_*`
    /// (fault threads, prefetch, locator, one-sided reads; see the [`dsm`](self) module).
    pub fn dsm(self: &Arc<Self>) -> Result<SharedMemory> {
        let config = DsmConfig::default().with_env()?;
        let dsm = ::dsm::Dsm::init(RankCollective(self.clone()), &self.fabric, config)?;
        let inner = Arc::new(Inner {
            dsm,
            regions: Mutex::new(BTreeMap::new()),
            allocated: Mutex::new(0),
        });
        let hook = self.ckpt.enabled().then(|| {
            let weak = Arc::downgrade(&inner);
            self.ckpt.add_hook(Box::new(move || match weak.upgrade() {
                Some(inner) => inner.capture(),
                None => Ok(()),
            }))
        });
        Ok(SharedMemory {
            inner,
            rank: self.clone(),
            hook,
        })
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if let Some(id) = self.hook {
            self.rank.ckpt.remove_hook(id);
        }
    }
}

fn poisoned() -> RankError {
    RankError::InvalidArgument("DSM region table poisoned".into())
}

impl SharedMemory {
    /// Allocates `bytes` (rounded up to pages) of shared memory (collective: every rank
    /// calls it in the same order, with the same length, and gets the same address).
    ///
    /// With checkpoints on, the region gets a snapshot registered with the checkpointer
    /// (`krun-dsm-<n>`, n counting this rank's allocations); in a rank restored from a
    /// checkpoint the region is refilled from the ranks' snapshots.
    pub fn alloc(&self, bytes: usize) -> Result<DsmRegion> {
        let inner = &self.inner;
        let (region, snapshot) = if self.hook.is_none() {
            (inner.dsm.alloc(bytes)?, None)
        } else {
            let n = {
                let mut a = inner.allocated.lock().map_err(|_| poisoned())?;
                *a += 1;
                *a - 1
            };
            let len = ::dsm::Dsm::snapshot_len(bytes.max(1));
            let registered = self.rank.alloc(len).and_then(|addr| {
                // SAFETY: fresh page-aligned private anonymous memory, never unmapped.
                let restored = unsafe {
                    self.rank
                        .register_memory(&format!("krun-dsm-{n}"), addr, len)
                }?;
                Ok((addr, restored))
            });
            let restoring = self.rank.restored_version().is_some();
            let (addr, restored) = match registered {
                Ok(r) => r,
                Err(e) => {
                    // Still take part in the collective allocation (with an unusable
                    // snapshot when restoring), so the other ranks fail or go on instead
                    // of waiting.
                    let _ = if restoring {
                        inner.dsm.alloc_restored(bytes, Some(&[]))
                    } else {
                        inner.dsm.alloc(bytes)
                    };
                    return Err(e);
                }
            };
            let region = match (restored, restoring) {
                (false, false) => inner.dsm.alloc(bytes)?,
                (restored, true) => {
                    // SAFETY: registered above: `len` bytes, filled from the image if restored.
                    let s = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                    inner.dsm.alloc_restored(bytes, restored.then_some(s))?
                }
                (true, false) => {
                    return Err(RankError::InvalidArgument(
                        "a DSM snapshot was restored in a rank that restores nothing".into(),
                    ))
                }
            };
            let addr = addr as usize;
            (region, Some((addr, len)))
        };
        inner
            .regions
            .lock()
            .map_err(|_| poisoned())?
            .insert(region.as_ptr() as usize, Held { region, snapshot });
        Ok(DsmRegion(region))
    }

    /// The region that starts at `base`, if this DSM allocated it and did not free it.
    pub fn region_at(&self, base: *const u8) -> Result<DsmRegion> {
        self.inner
            .regions
            .lock()
            .map_err(|_| poisoned())?
            .get(&(base as usize))
            .map(|h| DsmRegion(h.region))
            .ok_or_else(|| {
                RankError::InvalidArgument(format!(
                    "{base:p} is not the start of a DSM region of this rank"
                ))
            })
    }

    /// Frees a region (collective). Its addresses are unmapped on every rank when it
    /// returns.
    pub fn free(&self, region: DsmRegion) -> Result<()> {
        let known = self
            .inner
            .regions
            .lock()
            .map_err(|_| poisoned())?
            .remove(&(region.as_ptr() as usize))
            .map(|h| h.region);
        if known != Some(region.0) {
            return Err(RankError::InvalidArgument(format!(
                "{:p} is not a DSM region of this rank (never allocated, or freed)",
                region.as_ptr()
            )));
        }
        Ok(self.inner.dsm.free(region.0)?)
    }

    /// Takes DSM lock `id` (`0..64`), queued FIFO at rank 0.
    pub fn lock(&self, id: usize) -> Result<()> {
        Ok(self.inner.dsm.lock(id)?)
    }

    /// Releases DSM lock `id`, which this rank holds.
    pub fn unlock(&self, id: usize) -> Result<()> {
        Ok(self.inner.dsm.unlock(id)?)
    }

    /// Returns when every rank has reached it; reports a DSM driver error, if any.
    pub fn barrier(&self) -> Result<()> {
        Ok(self.inner.dsm.barrier()?)
    }

    /// Ends this rank's DSM collectively: a barrier (every rank is done with the pages),
    /// then its threads stop and its regions are unmapped.
    pub fn close(self) -> Result<()> {
        self.barrier()?;
        drop(self);
        Ok(())
    }

    pub fn stats(&self) -> DsmStats {
        let (faults, remote_fetches, prefetched, messages) = self.inner.dsm.stats();
        DsmStats {
            faults,
            remote_fetches,
            prefetched,
            messages,
        }
    }
}
