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
//!   until written. DSM pages are not part of checkpoints: a job restored from a checkpoint
//!   allocates its regions again and finds them zero.
//! - Allocation, free and the barrier are collective: every rank calls them in the same
//!   order. After [`SharedMemory::free`] the region's addresses are unmapped on every rank.
//! - 64 locks, ids `0..64`, queued FIFO at rank 0.
//! - A rank that dies takes the pages it alone held with it: the driver reports them lost
//!   (an error of the next DSM call), never as zeros. Join and leave during a run are not
//!   wired to the job's membership yet.
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
    inner: ::dsm::Dsm,
    regions: Mutex<BTreeMap<usize, SharedRegion>>,
}

impl Rank {
    /// Starts this rank's DSM (collective: every rank calls it). Settings: `KRUN_DSM_*`
    /// (fault threads, prefetch, locator, one-sided reads; see the [`dsm`](self) module).
    pub fn dsm(self: &Arc<Self>) -> Result<SharedMemory> {
        let config = DsmConfig::default().with_env()?;
        let inner = ::dsm::Dsm::init(RankCollective(self.clone()), &self.fabric, config)?;
        Ok(SharedMemory {
            inner,
            regions: Mutex::new(BTreeMap::new()),
        })
    }
}

fn poisoned() -> RankError {
    RankError::InvalidArgument("DSM region table poisoned".into())
}

impl SharedMemory {
    /// Allocates `bytes` (rounded up to pages) of shared memory (collective: every rank
    /// calls it in the same order, with the same length, and gets the same address).
    pub fn alloc(&self, bytes: usize) -> Result<DsmRegion> {
        let region = self.inner.alloc(bytes)?;
        self.regions
            .lock()
            .map_err(|_| poisoned())?
            .insert(region.as_ptr() as usize, region);
        Ok(DsmRegion(region))
    }

    /// The region that starts at `base`, if this DSM allocated it and did not free it.
    pub fn region_at(&self, base: *const u8) -> Result<DsmRegion> {
        self.regions
            .lock()
            .map_err(|_| poisoned())?
            .get(&(base as usize))
            .copied()
            .map(DsmRegion)
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
            .regions
            .lock()
            .map_err(|_| poisoned())?
            .remove(&(region.as_ptr() as usize));
        if known != Some(region.0) {
            return Err(RankError::InvalidArgument(format!(
                "{:p} is not a DSM region of this rank (never allocated, or freed)",
                region.as_ptr()
            )));
        }
        Ok(self.inner.free(region.0)?)
    }

    /// Takes DSM lock `id` (`0..64`), queued FIFO at rank 0.
    pub fn lock(&self, id: usize) -> Result<()> {
        Ok(self.inner.lock(id)?)
    }

    /// Releases DSM lock `id`, which this rank holds.
    pub fn unlock(&self, id: usize) -> Result<()> {
        Ok(self.inner.unlock(id)?)
    }

    /// Returns when every rank has reached it; reports a DSM driver error, if any.
    pub fn barrier(&self) -> Result<()> {
        Ok(self.inner.barrier()?)
    }

    /// Ends this rank's DSM collectively: a barrier (every rank is done with the pages),
    /// then its threads stop and its regions are unmapped.
    pub fn close(self) -> Result<()> {
        self.barrier()?;
        drop(self);
        Ok(())
    }

    pub fn stats(&self) -> DsmStats {
        let (faults, remote_fetches, prefetched, messages) = self.inner.stats();
        DsmStats {
            faults,
            remote_fetches,
            prefetched,
            messages,
        }
    }
}
