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

mod address;
mod members;
mod snapshot;

use address::map;

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
    /// A hinted read fault posts its join and a speculative read of the owner's published
    /// copy together, and keeps the copy when its generation stamp matches the join's
    /// (one round trip; `fault::words`); `false`: the read is posted after the join's
    /// answer (two round trips).
    pub speculate: bool,
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
            speculate: true,
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
        if let Ok(v) = std::env::var("KRUN_DSM_SPECULATE") {
            self.speculate = match v.trim() {
                "1" => true,
                "0" => false,
                _ => {
                    return Err(DsmError::Config {
                        what: "KRUN_DSM_SPECULATE".into(),
                        reason: format!("{v:?}: expected 0 or 1"),
                    })
                }
            };
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
        let mut node = Node::new(
            rank,
            config.locator.build(&ids),
            Engine::words(regions.clone(), ep.clone(), rank, this),
            config.one_sided,
        );
        node.set_members(ids.iter().copied());
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
            .with_fault_timeout(config.fault_timeout)
            .with_speculation(config.speculate),
        );
        engine.members.set_view(crate::fault::members::View::new(
            config.locator,
            size as u32,
            addrs,
        ));
        let mut threads = engine.spawn(config.fault_threads)?;
        let locks = Locks::new(
            rank,
            ep.clone(),
            lock_peers(&engine, rank),
            config.locks.max(1),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let locks = wire_locks(&engine, locks, config.fault_timeout, &stop, &mut threads)?;
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

    /// The node that coordinates the DSM's changes and barriers now: node 0, or the
    /// lowest live node once node 0 died.
    pub fn coordinator(&self) -> NodeId {
        self.engine.coordinator()
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
        let export = self
            .engine
            .ep
            .register(Region::new(crate::fault::words::export_len(pages))?)?;
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

    /// Takes DSM lock `id` (FIFO, granted by the coordinator: rank 0, then the next live
    /// rank, which rebuilds the lock table from the survivors). A node that joined during the run
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

    /// At the node serving the locks (the coordinator): the nodes waiting for DSM lock
    /// `id`, in order (empty elsewhere).
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

    /// Counters of one-sided reads: (joins whose speculative read was used: one round trip,
    /// joins whose speculative read was older or torn and read again after the join, pages
    /// this node published).
    pub fn speculation_stats(&self) -> (u64, u64, u64) {
        let s = &self.engine.stats;
        (
            s.speculative_reads.load(Ordering::Relaxed),
            s.speculation_fallbacks.load(Ordering::Relaxed),
            s.publications.load(Ordering::Relaxed),
        )
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

    /// Time spent in each step of the fault path so far, nanoseconds summed over every
    /// fault (steps named by [`crate::fault::STEPS`]; `answer` includes `copy`).
    pub fn fault_steps_ns(&self) -> [u64; crate::fault::STEPS.len()] {
        std::array::from_fn(|i| self.engine.stats.step_ns[i].load(Ordering::Relaxed))
    }

    /// The protocol's counters.
    pub fn protocol_stats(&self) -> crate::coherence::Stats {
        self.engine.node.lock().map(|n| n.stats).unwrap_or_default()
    }
}

impl Drop for Dsm {
    fn drop(&mut self) {
        if self.rank == self.engine.coordinator() {
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

/// Connects a node's DSM locks to its driver: the coordinator and the dead nodes as the
/// driver knows them, the probe of an overdue holder (at the server) or of a silent server
/// (at a waiter), this node's report to a new coordinator, the release of a dead node's
/// locks at the server once its failure committed, and the takeover of the table by the
/// next coordinator once the old one's failure committed; starts the lock server thread
/// (idle until this node serves).
pub(crate) fn wire_locks(
    engine: &Arc<Engine>,
    locks: Locks,
    fault_timeout: std::time::Duration,
    stop: &Arc<AtomicBool>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<Arc<Locks>> {
    let (e1, e2, e3) = (engine.clone(), engine.clone(), engine.clone());
    let e4 = Arc::downgrade(engine);
    let locks = Arc::new(
        locks
            .with_members(crate::lock::LockMembers {
                coordinator: Arc::new(move || e1.coordinator()),
                dead_peer: Arc::new(move |p| e2.peer_is_dead(p)),
                // The lowest live member other than this node (the coherence witness).
                deputy: Arc::new(move || {
                    e4.upgrade()
                        .and_then(|e| e.node.lock().ok().and_then(|n| n.witness()))
                }),
            })
            .with_holder_check(Arc::new(move |n| e3.probe_holder(n)), fault_timeout),
    );
    let l = Arc::downgrade(&locks);
    engine.members.set_lock_reporter(Arc::new(move || {
        l.upgrade().map(|l| l.report()).unwrap_or_default()
    }));
    let (l, e) = (Arc::downgrade(&locks), Arc::downgrade(engine));
    engine.members.on_failure(Arc::new(move |n| {
        let (Some(l), Some(e)) = (l.upgrade(), e.upgrade()) else {
            return;
        };
        if l.serving() {
            if let Err(err) = l.node_failed(n) {
                eprintln!("krun dsm: releasing the DSM locks of dead node {n}: {err}");
            }
        } else if n < e.me && e.coordinator() == e.me {
            // The dead node served the locks before this one: rebuild its table from the
            // survivors' reports.
            let r = e
                .lock_reports(fault_timeout.max(e.ep.op_timeout()) * 4)
                .and_then(|reports| l.take_over(n, &reports, &e.dead_nodes()));
            if let Err(err) = r {
                e.fail(format!("taking over the DSM locks of dead node {n}: {err}"));
            }
        }
    }));
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
    Ok(locks)
}

/// The lock table's view of the DSM's connections (nodes that join are added to it).
fn lock_peers(engine: &Arc<Engine>, me: NodeId) -> crate::lock::PeerLookup {
    let e = engine.clone();
    Arc::new(move |n| if n == me { None } else { e.peer_of(n).ok() })
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
