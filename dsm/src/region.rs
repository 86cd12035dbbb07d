//! The collective API of the DSM: a [`Dsm`] per process, shared regions allocated and freed
//! collectively at the same virtual address on every rank, a DSM lock (a compare-and-swap
//! word at rank 0) and a barrier. Memory is sequentially consistent, so data-race-free
//! programs need no flush at the lock or the barrier.
//!
//! Configuration (`KRUN_DSM_*`, over [`DsmConfig::default`]): `KRUN_DSM_FAULT_THREADS`
//! (2), `KRUN_DSM_PREFETCH` (8 pages), `KRUN_DSM_LOCATOR` (`static` = `page % N`, or
//! `dynamic` = the cell-tree locator), `KRUN_DSM_ONE_SIDED` (1: readers join and read
//! one-sided; 0: by messages), `KRUN_DSM_FAULT_TIMEOUT_MS` (30000: how long an access waits
//! before the nodes it depends on are probed; see [`crate::fault`]'s watchdog).
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use fabric::bootstrap::BootstrapClient;
use fabric::{Endpoint, FabricConfig, Region, RemoteRegion};

use crate::coherence::{Node, NodeId, PageId};
use crate::directory::LocatorKind;
use crate::error::{DsmError, Result};
use crate::fault::{Engine, RegionInfo, Regions};
use crate::lock::Locks;
use crate::uffd::{Uffd, PAGE};

mod members;

/// Settings of a DSM process.
#[derive(Clone, Debug)]
pub struct DsmConfig {
    pub fault_threads: usize,
    /// Pages a sequential read miss loads beyond the faulting one.
    pub prefetch: usize,
    pub locator: LocatorKind,
    pub one_sided: bool,
    /// Number of DSM locks.
    pub locks: usize,
    /// How long a local access may wait before the nodes it depends on are probed; a node
    /// that does not answer makes the access fail ([`DsmError::PageUnreachable`]).
    pub fault_timeout: std::time::Duration,
}

impl Default for DsmConfig {
    fn default() -> Self {
        DsmConfig {
            fault_threads: 2,
            prefetch: 8,
            locator: LocatorKind::Modulo,
            one_sided: true,
            locks: 64,
            fault_timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl DsmConfig {
    /// Applies the `KRUN_DSM_*` variables.
    pub fn with_env(mut self) -> Result<Self> {
        fn number(key: &str, v: &str) -> Result<usize> {
            v.trim().parse().map_err(|_| DsmError::Config {
                what: key.into(),
                reason: format!("{v:?} is not a non-negative integer"),
            })
        }
        if let Ok(v) = std::env::var("KRUN_DSM_FAULT_THREADS") {
            self.fault_threads = number("KRUN_DSM_FAULT_THREADS", &v)?.max(1);
        }
        if let Ok(v) = std::env::var("KRUN_DSM_PREFETCH") {
            self.prefetch = number("KRUN_DSM_PREFETCH", &v)?;
        }
        if let Ok(v) = std::env::var("KRUN_DSM_LOCATOR") {
            self.locator = match v.trim() {
                "static" | "modulo" => LocatorKind::Modulo,
                "dynamic" | "cell-tree" => LocatorKind::CellTree,
                _ => {
                    return Err(DsmError::Config {
                        what: "KRUN_DSM_LOCATOR".into(),
                        reason: format!("{v:?}: expected static or dynamic"),
                    })
                }
            };
        }
        if let Ok(v) = std::env::var("KRUN_DSM_FAULT_TIMEOUT_MS") {
            let ms = number("KRUN_DSM_FAULT_TIMEOUT_MS", &v)?;
            if ms == 0 {
                return Err(DsmError::Config {
                    what: "KRUN_DSM_FAULT_TIMEOUT_MS".into(),
                    reason: "must be at least 1 ms".into(),
                });
            }
            self.fault_timeout = std::time::Duration::from_millis(ms as u64);
        }
        if let Ok(v) = std::env::var("KRUN_DSM_ONE_SIDED") {
            self.one_sided = number("KRUN_DSM_ONE_SIDED", &v)? != 0;
        }
        Ok(self)
    }
}

/// A region of shared memory: the same address on every rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedRegion {
    base: u64,
    len: usize,
    first_page: PageId,
}

impl SharedRegion {
    pub fn as_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    /// Length in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn first_page(&self) -> PageId {
        self.first_page
    }
}

/// The collective calls the DSM needs from the job it runs in: who this process is, and an
/// all-gather in rank order. The bootstrap client provides them (tests, `dsm-node`); the
/// rank library provides them over the job's fabric (`krun::dsm`). Every rank calls
/// `allgather` in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's `blob`, in rank order.
    fn allgather(&mut self, blob: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String>;
}

impl Collective for BootstrapClient {
    fn rank(&self) -> usize {
        BootstrapClient::rank(self)
    }

    fn size(&self) -> usize {
        BootstrapClient::size(self)
    }

    fn allgather(&mut self, blob: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
        BootstrapClient::allgather(self, blob).map_err(|e| e.to_string())
    }
}

/// One process of a DSM job.
pub struct Dsm {
    engine: Arc<Engine>,
    boot: Mutex<Box<dyn Collective>>,
    threads: Vec<JoinHandle<()>>,
    rank: NodeId,
    size: usize,
    next_page: Mutex<PageId>,
    locks: Arc<Locks>,
    stop: Arc<AtomicBool>,
    mapped: Mutex<BTreeMap<u64, usize>>,
}

fn collective(what: &str, e: impl std::fmt::Display) -> DsmError {
    DsmError::Collective {
        what: what.into(),
        reason: e.to_string(),
    }
}

impl Dsm {
    /// Joins the DSM: opens an endpoint, swaps addresses through `boot` (collective), and
    /// starts the fault and service threads.
    pub fn init(
        boot: impl Collective + 'static,
        fabric: &FabricConfig,
        config: DsmConfig,
    ) -> Result<Dsm> {
        let mut boot: Box<dyn Collective> = Box::new(boot);
        let rank = boot.rank() as NodeId;
        let size = boot.size();
        if size == 0 || rank as usize >= size {
            return Err(collective(
                "init",
                format!("rank {rank} of a job of {size}"),
            ));
        }
        let ep: Arc<dyn Endpoint> = Arc::from(fabric::open(fabric)?);
        let blob = ep.address().to_bytes();
        let all = boot.allgather(&blob).map_err(|e| collective("init", e))?;
        let mut peers = vec![None; size];
        let addrs: BTreeMap<NodeId, Vec<u8>> = all
            .iter()
            .enumerate()
            .map(|(r, b)| (r as NodeId, b.clone()))
            .collect();
        for (r, b) in all.iter().enumerate() {
            let addr = fabric::EndpointAddress::from_bytes(b)?;
            // Every rank reaches its own memory through the fabric too for atomics (one
            // atomicity domain with the other ranks' operations).
            peers[r] = Some(ep.connect(&addr)?);
        }
        let regions: Regions = Arc::new(RwLock::new(BTreeMap::new()));
        let ids: Vec<NodeId> = (0..size as NodeId).collect();
        let this = peers[rank as usize].ok_or_else(|| collective("init", "no self connection"))?;
        let node = Node::new(
            rank,
            config.locator.build(&ids),
            Engine::words(regions.clone(), ep.clone(), rank, this),
            config.one_sided,
        );
        let engine = Arc::new(
            Engine::new(
                rank,
                ep.clone(),
                peers.clone(),
                node,
                regions,
                Uffd::open()?,
                config.prefetch,
            )
            .with_fault_timeout(config.fault_timeout),
        );
        engine.members.set_view(crate::fault::members::View::new(
            config.locator,
            size as u32,
            addrs,
        ));
        let mut threads = engine.spawn(config.fault_threads)?;
        let mut locks = Locks::new(
            rank,
            ep.clone(),
            lock_peers(&engine, rank),
            config.locks.max(1),
        );
        if rank == crate::fault::members::COORDINATOR {
            // A holder that keeps a lock others wait for past the fault timeout is probed;
            // a dead one's failure releases its locks once committed.
            let e = engine.clone();
            locks =
                locks.with_holder_check(Arc::new(move |n| e.probe_holder(n)), config.fault_timeout);
        }
        let locks = Arc::new(locks);
        if rank == crate::fault::members::COORDINATOR {
            let l = Arc::downgrade(&locks);
            engine.members.on_failure(Arc::new(move |n| {
                if let Some(l) = l.upgrade() {
                    if let Err(e) = l.node_failed(n) {
                        eprintln!("krun dsm: releasing the DSM locks of dead node {n}: {e}");
                    }
                }
            }));
        }
        let stop = Arc::new(AtomicBool::new(false));
        if rank == 0 {
            let (l, s) = (locks.clone(), stop.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("dsm-locks".into())
                    .spawn(move || {
                        if let Err(e) = l.serve(&s) {
                            eprintln!("dsm lock server: {e}");
                        }
                    })
                    .map_err(|e| DsmError::Os {
                        what: "spawning the lock server".into(),
                        source: e,
                    })?,
            );
        }
        let dsm = Dsm {
            engine,
            boot: Mutex::new(boot),
            threads,
            rank,
            size,
            next_page: Mutex::new(0),
            locks,
            stop,
            mapped: Mutex::new(BTreeMap::new()),
        };
        dsm.barrier()?;
        Ok(dsm)
    }

    pub fn rank(&self) -> NodeId {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn check(&self) -> Result<()> {
        match self.engine.error() {
            Some(e) => Err(DsmError::Collective {
                what: "DSM driver".into(),
                reason: e,
            }),
            None => Ok(()),
        }
    }

    fn allgather(&self, what: &str, blob: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut boot = self.boot.lock().map_err(|_| collective(what, "poisoned"))?;
        boot.allgather(blob).map_err(|e| collective(what, e))
    }

    /// Returns when every rank has reached it (and reports a driver error, if any). The
    /// ranks tell node 0 over the DSM's endpoint, which releases them; ranks that left the
    /// DSM or died are not waited for ([`crate::fault::members`]). A node that joined
    /// during the run takes no part (an error).
    pub fn barrier(&self) -> Result<()> {
        self.check()?;
        let trace = std::env::var_os("KRUN_DSM_TRACE").is_some();
        if trace {
            eprintln!(
                "{} dsm {}: barrier enter",
                crate::fault::now_ns(),
                self.rank
            );
        }
        self.engine.barrier()?;
        if trace {
            eprintln!("{} dsm {}: barrier exit", crate::fault::now_ns(), self.rank);
        }
        self.check()
    }

    /// Allocates a shared region of `len` bytes (rounded up to pages), collectively: every
    /// rank calls it in the same order and gets the same address. Its pages read as zero
    /// until written.
    pub fn alloc(&self, len: usize) -> Result<SharedRegion> {
        self.alloc_inner(len, None)
    }

    /// [`Dsm::alloc`] in a job restored from a checkpoint: every rank calls this instead,
    /// with the [`Dsm::snapshot`] of the region it took at the checkpoint (None when it has
    /// none). The ranks swap which pages their snapshots hold: each page's owner maps its
    /// bytes writable, its manager records the owner, and pages no snapshot holds read as
    /// zero. Regions are matched to snapshots by allocation order: the restored program
    /// allocates its regions in the order it did before the checkpoint, with the same
    /// lengths.
    pub fn alloc_restored(&self, len: usize, snapshot: Option<&[u8]>) -> Result<SharedRegion> {
        self.alloc_inner(len, Some(snapshot))
    }

    fn alloc_inner(&self, len: usize, restore: Option<Option<&[u8]>>) -> Result<SharedRegion> {
        self.check()?;
        if self.engine.members.epoch() > 0 {
            return Err(DsmError::Config {
                what: "alloc".into(),
                reason: "regions are allocated before the DSM's first membership change (a \
                         node joined or left since)"
                    .into(),
            });
        }
        if len == 0 {
            return Err(DsmError::Config {
                what: "region length".into(),
                reason: "must be at least one byte".into(),
            });
        }
        let pages = len.div_ceil(PAGE);
        let bytes = pages * PAGE;
        let base = self.agree_address(bytes)?;
        let export = self.engine.ep.register(Region::new(bytes)?)?;
        let words = self.engine.ep.register(Region::new(pages * 8)?)?;
        let mut blob = export.remote().to_bytes().to_vec();
        blob.extend_from_slice(&words.remote().to_bytes());
        let all = self.allgather("alloc", &blob)?;
        let mut remote_export = Vec::new();
        let mut remote_words = Vec::new();
        for b in &all {
            if b.len() != 2 * RemoteRegion::ENCODED_LEN {
                return Err(collective("alloc", "malformed region descriptors"));
            }
            remote_export.push(RemoteRegion::from_bytes(&b[..RemoteRegion::ENCODED_LEN])?);
            remote_words.push(RemoteRegion::from_bytes(&b[RemoteRegion::ENCODED_LEN..])?);
        }
        let first_page = {
            let mut next = self
                .next_page
                .lock()
                .map_err(|_| collective("alloc", "poisoned"))?;
            let first = *next;
            *next += pages as u64;
            first
        };
        let info = Arc::new(RegionInfo {
            first_page,
            pages: pages as u64,
            base,
            export,
            words,
            remote_export,
            remote_words,
        });
        self.engine
            .regions
            .write()
            .map_err(|_| collective("alloc", "poisoned"))?
            .insert(first_page, info);
        self.engine.uffd.register(base, bytes as u64)?;
        self.mapped
            .lock()
            .map_err(|_| collective("alloc", "poisoned"))?
            .insert(base, bytes);
        if let Some(snapshot) = restore {
            self.restore(base, first_page, pages, snapshot)?;
        }
        self.barrier()?;
        Ok(SharedRegion {
            base,
            len: bytes,
            first_page,
        })
    }

    /// Maps `bytes` at an address every rank can use: rank 0 proposes, the others map at
    /// the same place (`MAP_FIXED_NOREPLACE`), and a refusal anywhere makes rank 0 propose
    /// another ([`Proposals`]: the kernel's choice first, then random addresses).
    fn agree_address(&self, bytes: usize) -> Result<u64> {
        let mut proposals = Proposals::new(bytes);
        for _ in 0..PROPOSALS {
            let proposal = if self.rank == 0 { proposals.next()? } else { 0 };
            let all = self.allgather("alloc address", &proposal.to_le_bytes())?;
            let addr = all
                .first()
                .and_then(|b| b.as_slice().try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| collective("alloc", "malformed address proposal"))?;
            let ok = self.rank == 0 || map(addr, bytes, true).is_ok();
            let oks = self.allgather("alloc address", &[ok as u8])?;
            if oks.iter().all(|b| b == &[1]) {
                if self.rank == 0 {
                    proposals.keep(addr);
                }
                return Ok(addr);
            }
            if ok && self.rank != 0 {
                // SAFETY: we mapped exactly this range just above.
                unsafe { libc::munmap(addr as *mut _, bytes) };
            }
        }
        Err(collective(
            "alloc",
            format!("no address free on every rank after {PROPOSALS} proposals"),
        ))
    }

    /// Restores a region just allocated from the ranks' snapshots (collective).
    fn restore(
        &self,
        base: u64,
        first_page: PageId,
        pages: usize,
        snapshot: Option<&[u8]>,
    ) -> Result<()> {
        let mine = snapshot.map(|s| Snapshot::parse(s, pages, self.rank, self.size));
        // A snapshot this rank cannot use still takes part (with a blob of the wrong
        // length), so every rank fails instead of waiting.
        let refused = vec![0u8; pages.div_ceil(8) + 1];
        let blob = match &mine {
            None => &[][..],
            Some(Ok(m)) => m.bitmap,
            Some(Err(_)) => &refused[..],
        };
        let all = self.allgather("alloc restore", blob)?;
        let mine = mine.transpose()?;
        let mut owners: Vec<Option<NodeId>> = vec![None; pages];
        for (r, bitmap) in all.iter().enumerate() {
            if bitmap.is_empty() {
                continue;
            }
            if bitmap.len() != pages.div_ceil(8) {
                return Err(collective(
                    "alloc restore",
                    format!(
                        "rank {r}'s snapshot is of another region ({} bitmap bytes)",
                        bitmap.len()
                    ),
                ));
            }
            for (i, owner) in owners.iter_mut().enumerate() {
                if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                    if let Some(o) = owner {
                        return Err(collective(
                            "alloc restore",
                            format!("page {i} of the region is held by the snapshots of ranks {o} and {r}"),
                        ));
                    }
                    *owner = Some(r as NodeId);
                }
            }
        }
        let mut node = self
            .engine
            .node
            .lock()
            .map_err(|_| collective("alloc restore", "poisoned"))?;
        for (i, &owner) in owners.iter().enumerate() {
            node.restore(first_page + i as u64, owner);
            if owner == Some(self.rank) {
                let data = mine
                    .as_ref()
                    .map(|m| m.page(i))
                    .ok_or_else(|| collective("alloc restore", "no snapshot here"))?;
                // SAFETY: `data` is one page of the snapshot; the destination page of the
                // region was never mapped (the region is new).
                unsafe {
                    self.engine
                        .uffd
                        .copy(base + (i * PAGE) as u64, data.as_ptr(), true)?
                };
            }
        }
        Ok(())
    }

    /// Bytes of a [`Dsm::snapshot`] of a region of `len` bytes (as asked of
    /// [`Dsm::alloc`]: rounded up to pages).
    pub fn snapshot_len(len: usize) -> usize {
        Snapshot::len(len.div_ceil(PAGE))
    }

    /// Writes what this rank holds of `region` into `out` ([`Dsm::snapshot_len`] bytes):
    /// which pages it owns and their bytes; returns how many pages it owns. Meant for a
    /// coordinated checkpoint, where no rank accesses the DSM: ownership does not move
    /// while the snapshots are taken, so every written page is in exactly one snapshot.
    /// Pages whose bytes did not change since the last snapshot into `out` are not
    /// written (an incremental capture of `out` leaves them out).
    pub fn snapshot(&self, region: &SharedRegion, out: &mut [u8]) -> Result<usize> {
        let pages = region.len / PAGE;
        if out.len() != Snapshot::len(pages) {
            return Err(DsmError::Config {
                what: "snapshot buffer".into(),
                reason: format!("{} bytes, {} expected", out.len(), Snapshot::len(pages)),
            });
        }
        let node = self
            .engine
            .node
            .lock()
            .map_err(|_| collective("snapshot", "poisoned"))?;
        let live = self
            .engine
            .regions
            .read()
            .map_err(|_| collective("snapshot", "poisoned"))?
            .get(&region.first_page)
            .is_some_and(|r| r.base == region.base);
        if !live {
            return Err(DsmError::Config {
                what: "snapshot".into(),
                reason: format!("the region at {:#x} was freed", region.base),
            });
        }
        let header = Snapshot::header(pages, self.rank, self.size);
        if out[..header.len()] != header {
            out[..header.len()].copy_from_slice(&header);
        }
        let data_at = Snapshot::data_offset(pages);
        let mut owned = 0;
        for i in 0..pages {
            let mine = node.state(region.first_page + i as u64).is_owner();
            let (byte, bit) = (SNAPSHOT_HEADER + i / 8, 1u8 << (i % 8));
            let want = if mine {
                out[byte] | bit
            } else {
                out[byte] & !bit
            };
            if out[byte] != want {
                out[byte] = want;
            }
            if mine {
                owned += 1;
                // SAFETY: this rank owns the page, so it is mapped here (read-only or
                // writable): reading it does not fault. The region is in the table, and a
                // free takes the state lock we hold.
                let page = unsafe {
                    std::slice::from_raw_parts((region.base + (i * PAGE) as u64) as *const u8, PAGE)
                };
                let dst = &mut out[data_at + i * PAGE..data_at + (i + 1) * PAGE];
                if dst != page {
                    dst.copy_from_slice(page);
                }
            }
        }
        Ok(owned)
    }

    /// Frees a region collectively (every rank, same order).
    ///
    /// The barrier does not mean the driver is done with the region: a page served to
    /// another rank is published (read from the mapping and copied into the export region)
    /// after its grant is sent, so the reader may pass the barrier while this rank's service
    /// thread still reads the page. The region therefore leaves the table, is unregistered
    /// and unmapped while the state machine's lock is held: every action on a page runs
    /// under that lock and looks its region up there, so none touches the mapping after it
    /// is gone (before, such a late read of an unmapped page killed the rank with SIGSEGV).
    pub fn free(&self, region: SharedRegion) -> Result<()> {
        self.barrier()?;
        {
            let _actions = self
                .engine
                .node
                .lock()
                .map_err(|_| collective("free", "poisoned"))?;
            self.engine
                .regions
                .write()
                .map_err(|_| collective("free", "poisoned"))?
                .remove(&region.first_page);
            self.engine
                .uffd
                .unregister(region.base, region.len as u64)?;
            self.mapped
                .lock()
                .map_err(|_| collective("free", "poisoned"))?
                .remove(&region.base);
            // SAFETY: the region was mapped by alloc; it is out of the table, and no action
            // runs while we hold the state machine's lock.
            unsafe { libc::munmap(region.base as *mut _, region.len) };
        }
        self.barrier()
    }

    /// Takes DSM lock `id` (FIFO, granted by rank 0). A node that joined during the run
    /// takes the locks too.
    pub fn lock(&self, id: usize) -> Result<()> {
        self.check()?;
        self.locks.lock(id, self.engine.ep.op_timeout() * 6)
    }

    pub fn unlock(&self, id: usize) -> Result<()> {
        self.locks.unlock(id)
    }

    /// Whether DSM lock `id`, held by this process, was granted after the node holding it
    /// died (that node): the data the lock protects may be half-updated (pages whose every
    /// copy died are reported lost on their first access, never read as zeros).
    pub fn lock_inherited(&self, id: usize) -> Option<NodeId> {
        self.locks.inherited(id)
    }

    /// At rank 0: the nodes waiting for DSM lock `id`, in order (empty elsewhere).
    pub fn lock_waiters(&self, id: usize) -> Vec<NodeId> {
        self.locks.waiters(id)
    }

    /// Nodes a probe found silent past the fault timeout whose process lives (stalled,
    /// not dead: they stay members).
    pub fn stalled_nodes(&self) -> Vec<NodeId> {
        self.engine.stalled_nodes()
    }

    /// Replaces what runs when a local access cannot be served because a node it depends on
    /// died (the default prints the error and ends the process with
    /// [`crate::fault::EXIT_PAGE_UNREACHABLE`]; `None` only records it for the next call).
    pub fn set_unreachable_handler(&self, handler: Option<crate::fault::UnreachableHandler>) {
        self.engine.set_unreachable_handler(handler);
    }

    /// `node` died (the job's membership reports the failure): its read copies leave every
    /// copyset, so writes that waited for its invalidation acknowledgement are granted,
    /// and nothing is sent to it again. At node 0 this starts the failure's change: its
    /// directory entries are rebuilt from the survivors' copies, a read copy of each page
    /// it owned is promoted, and pages whose every copy died are reported lost
    /// ([`Dsm::lost_pages`]; an access fails with [`DsmError::PageLost`], never zeros). The
    /// watchdog declares a node failed by itself when a probe finds it silent, and tells
    /// the others.
    pub fn node_failed(&self, node: NodeId) -> Result<()> {
        let count = self.engine.peer_count();
        if node as usize >= count {
            return Err(DsmError::Config {
                what: "failed node".into(),
                reason: format!("node {node}, the DSM has had {count} nodes"),
            });
        }
        self.engine.node_failed(&[node], false)
    }

    /// Nodes known to have died (declared by [`Dsm::node_failed`], a probe, or another
    /// node's announcement).
    pub fn dead_nodes(&self) -> Vec<NodeId> {
        let gone = self
            .engine
            .members
            .view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().map(|v| v.gone.clone()))
            .unwrap_or_default();
        self.engine
            .dead_nodes()
            .into_iter()
            .filter(|n| !gone.contains(n))
            .collect()
    }

    /// The node managing `page`'s directory entry.
    pub fn manager_of(&self, page: PageId) -> Result<NodeId> {
        self.engine
            .node
            .lock()
            .map(|n| n.manager_of(page))
            .map_err(|_| collective("manager", "poisoned"))
    }

    /// Fault threads that were inside one-sided operations at once, at most.
    pub fn max_concurrent_remote_faults(&self) -> u64 {
        self.engine
            .stats
            .max_concurrent_remote
            .load(Ordering::Relaxed)
    }

    /// Counters: (faults, remote one-sided page reads, prefetched pages, messages received).
    pub fn stats(&self) -> (u64, u64, u64, u64) {
        let s = &self.engine.stats;
        (
            s.faults.load(Ordering::Relaxed),
            s.remote_fetches.load(Ordering::Relaxed),
            s.prefetched.load(Ordering::Relaxed),
            s.messages.load(Ordering::Relaxed),
        )
    }

    /// The protocol's counters.
    pub fn protocol_stats(&self) -> crate::coherence::Stats {
        self.engine.node.lock().map(|n| n.stats).unwrap_or_default()
    }
}

impl Drop for Dsm {
    fn drop(&mut self) {
        if self.rank == crate::fault::members::COORDINATOR {
            self.engine.dismiss_joined();
        }
        self.engine.stop();
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Ok(mapped) = self.mapped.lock() {
            for (&base, &len) in mapped.iter() {
                // SAFETY: regions alloc mapped; the driver threads have stopped.
                unsafe { libc::munmap(base as *mut _, len) };
            }
        }
    }
}

/// The lock table's view of the DSM's connections (nodes that join are added to it).
fn lock_peers(engine: &Arc<Engine>, me: NodeId) -> crate::lock::PeerLookup {
    let e = engine.clone();
    Arc::new(move |n| if n == me { None } else { e.peer_of(n).ok() })
}

/// Maps `bytes` of private anonymous memory, at `addr` exactly when `fixed`.
fn map(addr: u64, bytes: usize, fixed: bool) -> Result<u64> {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | libc::MAP_NORESERVE
        | if fixed { libc::MAP_FIXED_NOREPLACE } else { 0 };
    // SAFETY: anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || (fixed && p as u64 != addr) {
        if p != libc::MAP_FAILED {
            // SAFETY: an old kernel placed it elsewhere; undo.
            unsafe { libc::munmap(p, bytes) };
        }
        return Err(DsmError::Os {
            what: format!("mapping {bytes} bytes at {addr:#x}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(p as u64)
}

/// Bytes before a snapshot's bitmap.
const SNAPSHOT_HEADER: usize = 32;
const SNAPSHOT_MAGIC: &[u8; 8] = b"KDSMSNP1";

/// A snapshot of what one rank holds of a region ([`Dsm::snapshot`]): a 32-byte header
/// (magic, rank, job size, pages), a bitmap of the pages it owns, then, from the next page
/// boundary, every page's slot (meaningful where the bitmap is set).
struct Snapshot<'a> {
    bitmap: &'a [u8],
    data: &'a [u8],
}

impl<'a> Snapshot<'a> {
    fn data_offset(pages: usize) -> usize {
        (SNAPSHOT_HEADER + pages.div_ceil(8)).next_multiple_of(PAGE)
    }

    fn len(pages: usize) -> usize {
        Self::data_offset(pages) + pages * PAGE
    }

    fn header(pages: usize, rank: NodeId, size: usize) -> [u8; SNAPSHOT_HEADER] {
        let mut h = [0u8; SNAPSHOT_HEADER];
        h[..8].copy_from_slice(SNAPSHOT_MAGIC);
        h[8..12].copy_from_slice(&rank.to_le_bytes());
        h[12..16].copy_from_slice(&(size as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(pages as u64).to_le_bytes());
        h
    }

    fn parse(bytes: &'a [u8], pages: usize, rank: NodeId, size: usize) -> Result<Snapshot<'a>> {
        let bad = |reason: String| DsmError::Config {
            what: "DSM snapshot".into(),
            reason,
        };
        if bytes.len() != Self::len(pages) {
            return Err(bad(format!(
                "{} bytes for a region of {pages} pages ({} expected)",
                bytes.len(),
                Self::len(pages)
            )));
        }
        if &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a DSM snapshot (bad magic)".into()));
        }
        let want = Self::header(pages, rank, size);
        if bytes[..SNAPSHOT_HEADER] != want {
            let num = |r: std::ops::Range<usize>| {
                bytes[r]
                    .iter()
                    .rev()
                    .fold(0u64, |acc, &b| (acc << 8) | b as u64)
            };
            return Err(bad(format!(
                "taken by rank {} of {} for {} pages; this is rank {rank} of {size}, {pages} pages",
                num(8..12),
                num(12..16),
                num(16..24)
            )));
        }
        let data_at = Self::data_offset(pages);
        Ok(Snapshot {
            bitmap: &bytes[SNAPSHOT_HEADER..SNAPSHOT_HEADER + pages.div_ceil(8)],
            data: &bytes[data_at..],
        })
    }

    fn page(&self, i: usize) -> &'a [u8] {
        &self.data[i * PAGE..(i + 1) * PAGE]
    }
}

/// How many addresses rank 0 proposes for a region before the allocation fails.
const PROPOSALS: usize = 16;
/// Random proposals lie in `[RANDOM_LOW, RANDOM_HIGH)`: far from where the kernel places
/// mappings (just below the stack, and the executable's heap), inside the 47-bit user
/// address space of x86-64 and of 48-bit arm64.
const RANDOM_LOW: u64 = 1 << 44;
const RANDOM_HIGH: u64 = 1 << 46;

/// Rank 0's address proposals for one region. The first is where the kernel maps it in
/// rank 0; the others are random. Each proposal stays mapped in rank 0 until the
/// allocation ends, so no proposal is made twice.
///
/// Random, not the kernel's next choice: the kernel places each new mapping just below
/// the previous one, so when another rank has a large mapping (thread stacks, allocator
/// arenas, fabric buffers) where rank 0's first proposal falls, every later proposal fell
/// inside it too and the allocation failed ("no address free on every rank", seen under
/// load in CI).
struct Proposals {
    bytes: usize,
    held: Vec<u64>,
}

impl Proposals {
    fn new(bytes: usize) -> Proposals {
        Proposals {
            bytes,
            held: Vec::new(),
        }
    }

    /// The next address, mapped here.
    fn next(&mut self) -> Result<u64> {
        let addr = if self.held.is_empty() {
            map(0, self.bytes, false)?
        } else {
            self.random().or_else(|_| map(0, self.bytes, false))?
        };
        self.held.push(addr);
        Ok(addr)
    }

    /// A random page-aligned address in the random window that is free here.
    fn random(&self) -> Result<u64> {
        let span = (RANDOM_HIGH - RANDOM_LOW).saturating_sub(self.bytes as u64) / PAGE as u64;
        let mut last = None;
        for _ in 0..32 {
            let r = fabric::random_u64()?;
            let addr = RANDOM_LOW + (r % span.max(1)) * PAGE as u64;
            match map(addr, self.bytes, true) {
                Ok(a) => return Ok(a),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| collective("alloc", "no random address")))
    }

    /// The agreed address: it stays mapped when the other proposals are unmapped.
    fn keep(&mut self, addr: u64) {
        self.held.retain(|&a| a != addr);
    }
}

impl Drop for Proposals {
    fn drop(&mut self) {
        for &a in &self.held {
            // SAFETY: proposals this rank mapped and nobody uses.
            unsafe { libc::munmap(a as *mut _, self.bytes) };
        }
    }
}

/// Reference measurements for benchmarks, taken with the DSM's own endpoint.
impl Dsm {
    /// Times `iters` blocking 4 KiB RMA reads of `owner`'s published copy of the region's
    /// first page, and `iters` fetch-and-adds of 0 on its share word (microseconds each).
    pub fn reference_rma(
        &self,
        region: &SharedRegion,
        owner: NodeId,
        iters: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let info = self
            .engine
            .regions
            .read()
            .map_err(|_| collective("reference", "poisoned"))?
            .get(&region.first_page)
            .cloned()
            .ok_or_else(|| collective("reference", "unknown region"))?;
        let ep = &self.engine.ep;
        let peer = self.engine.peer_of(owner)?;
        let local = ep.register(Region::new(PAGE)?)?;
        let mut reads = Vec::new();
        let mut atomics = Vec::new();
        for _ in 0..iters {
            let t = std::time::Instant::now();
            // SAFETY: `local` is ours alone; the remote page is only read.
            unsafe {
                ep.read(
                    peer,
                    &local,
                    0,
                    PAGE,
                    &info.remote_export[owner as usize],
                    0,
                )?
            };
            reads.push(t.elapsed().as_secs_f64() * 1e6);
            let t = std::time::Instant::now();
            ep.fetch_add(peer, &info.remote_words[owner as usize], 0, 0)?;
            atomics.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((reads, atomics))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another rank whose mappings cover 64 GiB on either side of rank 0's first proposal
    /// (the kernel's choice) refuses it and every address near it: rank 0's later proposals
    /// must leave that neighbourhood (before, each was the kernel's next choice, just
    /// below the last, and all eight were refused).
    #[test]
    fn a_rank_whose_mappings_cover_the_first_proposals_still_gets_an_address() {
        let bytes = 96 * PAGE;
        let mut proposals = Proposals::new(bytes);
        let first = proposals.next().unwrap();
        let taken = 64u64 << 30;
        let refused = |a: u64| a + bytes as u64 > first.saturating_sub(taken) && a < first + taken;
        assert!(refused(first));
        let mut tries = 1;
        let agreed = loop {
            let a = proposals.next().unwrap();
            tries += 1;
            assert!(tries <= PROPOSALS, "every proposal near the first one");
            assert_eq!(a % PAGE as u64, 0);
            if !refused(a) {
                break a;
            }
        };
        proposals.keep(agreed);
        drop(proposals);
        // The agreed proposal is still mapped here (the others were unmapped).
        // SAFETY: mapped read-write by the proposal; unmapped just below.
        unsafe {
            (agreed as *mut u8).write(1);
            libc::munmap(agreed as *mut _, bytes);
        }
    }
}
