//! The multilevel store of one node.
//!
//! - **L1**: a copy in this node's memory (registered regions, pooled and reused), or the
//!   image file itself, mapped ([`Store::put_file`], no copy).
//! - **L2**: a copy in a buddy node's memory: the buddy reserves space in the arena it lends,
//!   this node writes the image there with one-sided RMA writes, and the buddy verifies the
//!   crc32c of what landed before it acknowledges (only then is L2 safe). Buddies and parity
//!   sets come from a [`Placement`]: by default the buddy is the next node in another failure
//!   group and sets are K consecutive nodes; [`Placement::from_cells`] derives both from the
//!   locator's cells. A buddy the membership reports gone is replaced ([`Store::set_down`]).
//! - **L3**: XOR parity over a parity set of K nodes.
//!   Each member sends its image for version v to the set's parity holder for v, a node of
//!   the next set (rotating with v; inside the set when there is only one set); once all
//!   members' images are in, the holder computes the parity, keeps it with each member's
//!   owner, length and crc, and frees the images. A lost member's image is the XOR of the
//!   parity with the other members' images (fetched from their nodes or their buddies). One
//!   loss per set is tolerated. L3 expects one owner per node per version (a node's image).
//! - **L4**: io_uring disk images ([`crate::disk`]).
//!
//! `put` returns once L1 holds the copy; a background thread flushes to L2, L3 and L4.
//! `get` reads the fastest valid copy; copies failing their checksum are reported and skipped.
//!
//! Where each part lives: `store/flush.rs` (the flush thread: L2, L3, L4), `store/parity.rs`
//! (L3), `store/serve.rs` (answers to other nodes), `store/transfer.rs` (requests and RMA
//! transfers to other nodes), `store/mapped.rs` (puts of mapped image files),
//! `store/get.rs` (reads of the fastest valid copy), `store/to_file.rs` (fetches straight into
//! a file), `store/streamed.rs` (puts of files still
//! being written, L2 overlapping L1),
//! `store/membership.rs` (gone nodes, re-formed placements), `store/placed.rs` (which node
//! holds each copy), `store/retention.rs` (what is kept), `store/usage.rs` (figures).
use crate::buddy::Placement;
use crate::disk::{check_owner, DiskLevel};
use crate::error::{Result, StoreError};
use crate::wire::{Body, Channel, Envelope};
use fabric::secret::ClusterSecret;
use fabric::{Endpoint, EndpointAddress, MemoryRegion, PeerId, Region, RemoteRegion};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod flush;
mod get;
mod mapped;
mod membership;
mod parity;
mod pipeline;
mod placed;
mod retention;
mod serve;
mod streamed;
mod to_file;
mod transfer;
mod usage;

use parity::ParitySet;

pub use mapped::PutReport;
pub use pipeline::{PIPE_CHUNK, PIPE_WINDOW};
pub use placed::ParityState;
pub use streamed::Ready;
pub use usage::{NewestSafe, Usage};

/// Request messages carry this tag; replies carry `REPLY_TAG | request id`.
pub const STORE_TAG: u64 = 0x4b53_0000_0000_0001;
pub const REPLY_TAG: u64 = 0x4b52_0000_0000_0000;
const RMA_CHUNK: usize = 8 << 20;
const RMA_WINDOW: usize = 8;
const ALIGN: usize = 4096;

/// Storage levels, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    L1 = 0,
    L2 = 1,
    L3 = 2,
    L4 = 3,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::L1, Level::L2, Level::L3, Level::L4];
    pub fn name(self) -> &'static str {
        ["L1", "L2", "L3", "L4"][self as usize]
    }
    pub fn parse(s: &str) -> Result<Level> {
        Level::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| StoreError::Invalid(format!("unknown level {s:?} (L1..L4)")))
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One node of the store.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub address: EndpointAddress,
    /// Failure group: a buddy is chosen in another group.
    pub group: u32,
}

/// Configuration of one node's store.
#[derive(Clone)]
pub struct StoreConfig {
    pub node: usize,
    pub nodes: Vec<NodeInfo>,
    /// Memory this node lends to others for L2 copies and L3 parity.
    pub arena_bytes: usize,
    /// L4 directory (None: no L4).
    pub disk: Option<PathBuf>,
    /// Versions kept per owner and level.
    pub keep: usize,
    /// Parity set size K (0 or 1: no L3).
    pub parity_set: usize,
    pub secret: ClusterSecret,
    /// Bound on each control request.
    pub request_timeout: Duration,
}

/// Where `get` found a copy, and what it skipped.
#[derive(Clone, Debug)]
pub struct GetReport {
    pub level: Level,
    /// The node whose memory or disk held the copy.
    pub node: usize,
    /// Copies that failed their checks, in the order tried.
    pub rejected: Vec<String>,
}

/// An image read from the store, without copying it out of store memory where possible.
pub enum ImageBytes {
    Owned(Vec<u8>),
    /// This node's L1 copy.
    Shared(Arc<MemoryRegion>, usize),
    /// A pooled receive buffer (an RMA read), returned to the pool on drop.
    Pooled(Option<MemoryRegion>, usize, Arc<Mutex<Vec<MemoryRegion>>>),
}

impl std::ops::Deref for ImageBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ImageBytes::Owned(v) => v,
            // SAFETY: L1 copies and completed receive buffers are not written while shared.
            ImageBytes::Shared(mr, len) => unsafe { &mr.region().as_slice()[..*len] },
            // SAFETY: as above.
            ImageBytes::Pooled(mr, len, _) => unsafe {
                &mr.as_ref().expect("present until drop").region().as_slice()[..*len]
            },
        }
    }
}

impl Drop for ImageBytes {
    fn drop(&mut self) {
        if let ImageBytes::Pooled(mr, _, pool) = self {
            if let Some(mr) = mr.take() {
                let mut pool = pool.lock().expect("lock");
                if pool.len() < 4 {
                    pool.push(mr);
                }
            }
        }
    }
}

struct L1Copy {
    mr: Arc<MemoryRegion>,
    len: usize,
    crc: u32,
    /// A mapped image file (never returned to the pool of copy buffers).
    mapped: bool,
}

struct Held {
    offset: u64,
    len: u64,
    crc: u32,
    /// A registration of this copy's range alone, for the peers that read it back.
    mr: MemoryRegion,
}

/// A range of the arena lent to one writer until it commits its copy: the writer gets a
/// remote key for this range alone (never for the whole arena, where other owners' copies
/// live), and the key dies with the reservation.
struct Reservation {
    offset: u64,
    len: u64,
    /// Held only to keep the writer's key alive; dropping it revokes the key.
    _key: MemoryRegion,
}

/// A first-fit allocator over the lent arena.
struct Arena {
    free: Vec<(u64, u64)>,
}

impl Arena {
    /// A free range of `len` bytes (rounded up to [`ALIGN`]); `None` when none is free (or
    /// `len` is beyond any arena).
    fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.max(1).checked_next_multiple_of(ALIGN as u64)?;
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (off, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (off + len, l - len);
        }
        Some(off)
    }
    fn release(&mut self, off: u64, len: u64) {
        let len = (len.max(1)).div_ceil(ALIGN as u64) * ALIGN as u64;
        let i = self.free.partition_point(|&(o, _)| o < off);
        self.free.insert(i, (off, len));
        // Merge neighbours.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.free.len());
        for &(o, l) in &self.free {
            if let Some(last) = merged.last_mut() {
                if last.0 + last.1 == o {
                    last.1 += l;
                    continue;
                }
            }
            merged.push((o, l));
        }
        self.free = merged;
    }
}

type Key = (String, u64);

struct Inner {
    cfg: StoreConfig,
    ep: Box<dyn Endpoint>,
    peers: Vec<Option<PeerId>>,
    arena: Mutex<Arena>,
    held: Mutex<HashMap<Key, Held>>,
    reserved: Mutex<HashMap<(Key, u8), Reservation>>,
    parity: Mutex<BTreeMap<(u32, u64), ParitySet>>,
    /// owner -> its parity lane on this node (in order of first put: a node's owners keep
    /// their lanes from version to version).
    lanes: Mutex<HashMap<String, u32>>,
    l1: Mutex<HashMap<Key, L1Copy>>,
    pool: Arc<Mutex<Vec<MemoryRegion>>>,
    safe: Mutex<HashMap<Key, [bool; 4]>>,
    /// Per version and level, the node its copy went to (`store/placed.rs`).
    holders: Mutex<HashMap<Key, [Option<usize>; 4]>>,
    /// Per version, the flush's L3 decision (`store/placed.rs`).
    parity_plan: Mutex<HashMap<Key, placed::ParityPlan>>,
    safe_changed: Condvar,
    errors: Mutex<HashMap<Key, String>>,
    next_request: AtomicU64,
    chan: Channel,
    disk: Option<DiskLevel>,
    stop: AtomicBool,
    /// Buddies and parity sets in force (re-formed after failures: [`Store::reform`]).
    placement: Mutex<Arc<Placement>>,
    /// The placements before the one in force, oldest first: versions flushed under them
    /// keep their parity where those placed it (`rebuild` looks there too).
    earlier: Mutex<Vec<Arc<Placement>>>,
    /// Nodes the membership reports gone: not asked for copies (see [`Store::set_down`]).
    down: Mutex<Vec<bool>>,
    /// Versions whose L2 copy went with a gone buddy: sent again to the new buddy.
    reflush: Mutex<Vec<Key>>,
    /// Bytes `put` copied into store memory (mapped puts copy none).
    copied: AtomicU64,
    /// RMA writes posted by streamed puts so far (`store/pipeline.rs`).
    pipe_writes: AtomicU64,
    /// The number of the streamed put's RMA write that fails, 0 for none (a test hook:
    /// [`Store::fail_rma_write_for_test`]).
    pipe_fault: AtomicU64,
    /// Retention by the policy's line (see `store/retention.rs`).
    retention: retention::Floors,
    /// The lent arena. Declared last: fields drop in order, and the registrations of its
    /// ranges (in `held`, `reserved`, `parity`) are views of it that must go first.
    arena_mr: MemoryRegion,
}

/// One node's checkpoint store (see the module docs).
pub struct Store {
    inner: Arc<Inner>,
    jobs: Option<mpsc::Sender<Key>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The error for an answer that does not fit the request.
fn unexpected(node: usize, request: &str, answer: &Body) -> StoreError {
    StoreError::Peer {
        node,
        what: format!("answered {request} with {}", answer.name()),
    }
}

#[cfg(test)]
fn parity_holder(set: u32, version: u64, nodes: usize, k: usize) -> usize {
    let sets = nodes.div_ceil(k);
    let next = ((set as usize + 1) % sets) * k;
    let size = k.min(nodes - next);
    next + (version as usize % size)
}

impl Store {
    /// Starts the node's store on an open endpoint whose address is `cfg.nodes[cfg.node]`,
    /// with the default placement ([`Placement::ring`]).
    pub fn start(ep: Box<dyn Endpoint>, cfg: StoreConfig) -> Result<Store> {
        let groups: Vec<u32> = cfg.nodes.iter().map(|n| n.group).collect();
        let placement = Placement::ring(&groups, cfg.parity_set);
        Store::start_placed(ep, cfg, placement)
    }

    /// As [`Store::start`], with buddies and parity sets from `placement` (for instance
    /// [`Placement::from_cells`] over the locator's cells).
    pub fn start_placed(
        ep: Box<dyn Endpoint>,
        cfg: StoreConfig,
        placement: Placement,
    ) -> Result<Store> {
        if cfg.node >= cfg.nodes.len() {
            return Err(StoreError::Invalid(format!(
                "node {} of {}",
                cfg.node,
                cfg.nodes.len()
            )));
        }
        if placement.nodes() != cfg.nodes.len() {
            return Err(StoreError::Invalid(format!(
                "the placement covers {} nodes, the store has {}",
                placement.nodes(),
                cfg.nodes.len()
            )));
        }
        let mut peers = Vec::with_capacity(cfg.nodes.len());
        for (i, n) in cfg.nodes.iter().enumerate() {
            peers.push(if i == cfg.node {
                None
            } else {
                Some(ep.connect(&n.address)?)
            });
        }
        let arena_len = cfg.arena_bytes.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        let arena_mr = ep.register(Region::new(arena_len)?)?;
        // The lent memory is committed now, in one call, rather than page by page in the
        // fabric's receive path while the first copies land (measured in `bench ckpt`: the
        // first two 1 GiB L2 copies, each into untouched arena, took ~1.3 s after L1 against
        // 0.28 s for the third, which reused touched memory). Best effort: an older kernel
        // faults the pages in later.
        // SAFETY: our own fresh anonymous mapping of `arena_len` bytes; populating changes
        // no byte.
        unsafe {
            libc::madvise(
                arena_mr.region().as_ptr().cast(),
                arena_len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        let disk = match &cfg.disk {
            Some(d) => Some(DiskLevel::open(d)?),
            None => None,
        };
        let chan = Channel::new(&cfg.secret)?;
        let inner = Arc::new(Inner {
            cfg,
            ep,
            peers,
            arena_mr,
            arena: Mutex::new(Arena {
                free: vec![(0, arena_len as u64)],
            }),
            held: Default::default(),
            reserved: Default::default(),
            parity: Default::default(),
            lanes: Default::default(),
            l1: Default::default(),
            pool: Default::default(),
            safe: Default::default(),
            holders: Default::default(),
            parity_plan: Default::default(),
            safe_changed: Condvar::new(),
            errors: Default::default(),
            next_request: AtomicU64::new(1),
            chan,
            disk,
            stop: AtomicBool::new(false),
            down: Mutex::new(vec![false; placement.nodes()]),
            reflush: Mutex::new(Vec::new()),
            placement: Mutex::new(Arc::new(placement)),
            earlier: Mutex::new(Vec::new()),
            copied: AtomicU64::new(0),
            pipe_writes: AtomicU64::new(0),
            pipe_fault: AtomicU64::new(0),
            retention: retention::Floors::default(),
        });
        let (tx, rx) = mpsc::channel::<Key>();
        let service = inner.clone();
        let flusher = inner.clone();
        let threads = vec![
            std::thread::Builder::new()
                .name("krun-store-service".into())
                .spawn(move || service.serve())
                .map_err(|e| StoreError::Invalid(format!("spawning the service thread: {e}")))?,
            std::thread::Builder::new()
                .name("krun-store-flush".into())
                .spawn(move || flusher.flush_loop(rx))
                .map_err(|e| StoreError::Invalid(format!("spawning the flush thread: {e}")))?,
        ];
        Ok(Store {
            inner,
            jobs: Some(tx),
            threads,
        })
    }

    pub fn node(&self) -> usize {
        self.inner.cfg.node
    }

    /// The node holding this node's L2 copies.
    pub fn buddy(&self) -> usize {
        self.inner.buddy_of(self.inner.cfg.node)
    }

    /// Stores a version at L1 and queues its flush to the slower levels.
    pub fn put(&self, owner: &str, version: u64, data: &[u8]) -> Result<()> {
        check_owner(owner)?;
        let inner = &self.inner;
        let mr = inner.take_region(data.len())?;
        // SAFETY: the region is ours alone until inserted into the L1 map below.
        unsafe { mr.region().as_mut_slice()[..data.len()].copy_from_slice(data) };
        let crc = crc32c::crc32c(data);
        let key = (owner.to_string(), version);
        if let Some(old) = inner.l1.lock().expect("lock").insert(
            key.clone(),
            L1Copy {
                mr: Arc::new(mr),
                len: data.len(),
                crc,
                mapped: false,
            },
        ) {
            inner.recycle(old);
        }
        inner.copied.fetch_add(data.len() as u64, Ordering::Relaxed);
        inner.errors.lock().expect("lock").remove(&key);
        inner.reset_key(&key);
        inner.mark_safe_at(&key, Level::L1, inner.cfg.node);
        inner.retain(owner, Level::L1);
        if let Some(tx) = &self.jobs {
            let _ = tx.send(key);
        }
        Ok(())
    }

    pub fn is_safe(&self, owner: &str, version: u64, level: Level) -> bool {
        self.inner
            .safe
            .lock()
            .expect("lock")
            .get(&(owner.to_string(), version))
            .is_some_and(|s| s[level as usize])
    }

    /// Waits until a version is safe at `level`; fails at once if its flush failed.
    pub fn wait_safe(
        &self,
        owner: &str,
        version: u64,
        level: Level,
        timeout: Duration,
    ) -> Result<()> {
        let key = (owner.to_string(), version);
        let start = Instant::now();
        let mut safe = self.inner.safe.lock().expect("lock");
        loop {
            if safe.get(&key).is_some_and(|s| s[level as usize]) {
                return Ok(());
            }
            if let Some(e) = self.inner.errors.lock().expect("lock").get(&key) {
                return Err(StoreError::Invalid(format!(
                    "{owner} v{version} cannot reach {level}: {e}"
                )));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(StoreError::Invalid(format!(
                    "{owner} v{version} not safe at {level} within {timeout:?}"
                )));
            }
            safe = self
                .inner
                .safe_changed
                .wait_timeout(safe, left.min(Duration::from_millis(50)))
                .expect("lock")
                .0;
        }
    }

    /// The newest version of `owner` this node holds at L1 or L4.
    pub fn latest(&self, owner: &str) -> Option<u64> {
        let mem = self
            .inner
            .l1
            .lock()
            .expect("lock")
            .keys()
            .filter(|k| k.0 == owner)
            .map(|k| k.1)
            .max();
        let disk = self
            .inner
            .disk
            .as_ref()
            .and_then(|d| d.versions(owner).ok()?.last().copied());
        mem.max(disk)
    }

    /// The length of this node's L1 copy of a version, if it holds one.
    pub fn stored_len(&self, owner: &str, version: u64) -> Option<usize> {
        self.inner
            .l1
            .lock()
            .expect("lock")
            .get(&(owner.to_string(), version))
            .map(|c| c.len)
    }

    /// Frees this node's L1 copy of a version (its other levels are kept); `get` then reads
    /// it from a slower level.
    pub fn forget_local(&self, owner: &str, version: u64) {
        if let Some(c) = self
            .inner
            .l1
            .lock()
            .expect("lock")
            .remove(&(owner.to_string(), version))
        {
            self.inner.recycle(c);
        }
        if let Some(s) = self
            .inner
            .safe
            .lock()
            .expect("lock")
            .get_mut(&(owner.to_string(), version))
        {
            s[Level::L1 as usize] = false;
        }
    }

    /// Test hook: flips one byte of this node's L1 copy (to exercise the fallbacks).
    pub fn corrupt_l1_for_test(&self, owner: &str, version: u64, offset: usize) -> bool {
        let l1 = self.inner.l1.lock().expect("lock");
        let Some(c) = l1.get(&(owner.to_string(), version)) else {
            return false;
        };
        // SAFETY: test-only mutation of our own L1 copy; no RMA reads it concurrently here.
        unsafe { c.mr.region().as_mut_slice()[offset % c.len.max(1)] ^= 0x40 };
        true
    }

    /// Test hook: the `nth` RMA write that streamed puts post from now on (1 = the next
    /// one) fails when its turn comes, while the writes posted after it are in flight.
    pub fn fail_rma_write_for_test(&self, nth: u64) {
        let inner = &self.inner;
        let base = inner.pipe_writes.load(Ordering::Relaxed);
        inner.pipe_fault.store(base + nth, Ordering::Relaxed);
    }

    /// Test hook: flips one byte of the L2 copy this node holds for someone else.
    pub fn corrupt_held_for_test(&self, owner: &str, version: u64, offset: usize) -> bool {
        let held = self.inner.held.lock().expect("lock");
        let Some(h) = held.get(&(owner.to_string(), version)) else {
            return false;
        };
        // SAFETY: test-only mutation of the lent arena.
        unsafe {
            self.inner.arena_mr.region().as_mut_slice()
                [h.offset as usize + offset % h.len.max(1) as usize] ^= 0x40
        };
        true
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Inner {
    /// The placement in force.
    pub(super) fn placement(&self) -> Arc<Placement> {
        self.placement.lock().expect("lock").clone()
    }

    fn buddy_of(&self, node: usize) -> usize {
        let placement = self.placement();
        let down = self.down.lock().expect("lock");
        placement.buddy_among(node, &down).unwrap_or(node)
    }

    fn mark_safe(&self, key: &Key, level: Level) {
        self.safe
            .lock()
            .expect("lock")
            .entry(key.clone())
            .or_default()[level as usize] = true;
        self.safe_changed.notify_all();
    }

    fn fail(&self, key: &Key, what: String) {
        eprintln!(
            "krun-store: node {}: {} v{}: {what}",
            self.cfg.node, key.0, key.1
        );
        self.errors.lock().expect("lock").insert(key.clone(), what);
        self.safe_changed.notify_all();
    }

    fn take_region(&self, len: usize) -> Result<MemoryRegion> {
        let mut pool = self.pool.lock().expect("lock");
        if let Some(i) = pool
            .iter()
            .enumerate()
            .filter(|(_, m)| m.len() >= len)
            .min_by_key(|(_, m)| m.len())
            .map(|(i, _)| i)
        {
            return Ok(pool.swap_remove(i));
        }
        drop(pool);
        let size = len.max(1).div_ceil(1 << 20) << 20;
        Ok(self.ep.register(Region::new(size)?)?)
    }

    fn recycle(&self, copy: L1Copy) {
        if copy.mapped {
            return; // unmapped when the last reference goes
        }
        // Only when no RMA read is using it (the map held the last reference).
        if let Ok(mr) = Arc::try_unwrap(copy.mr) {
            let mut pool = self.pool.lock().expect("lock");
            if pool.len() < 4 {
                pool.push(mr);
            }
        }
    }

    fn local_l1(&self, owner: &str, version: u64) -> Option<(ImageBytes, u32)> {
        let l1 = self.l1.lock().expect("lock");
        let c = l1.get(&(owner.to_string(), version))?;
        Some((ImageBytes::Shared(c.mr.clone(), c.len), c.crc))
    }

    // ---- client side ----

    fn held_copy(&self, owner: &str, version: u64) -> Option<Vec<u8>> {
        let held = self.held.lock().expect("lock");
        let h = held.get(&(owner.to_string(), version))?;
        // SAFETY: committed copies are immutable.
        Some(unsafe {
            self.arena_mr.region().as_slice()[h.offset as usize..(h.offset + h.len) as usize]
                .to_vec()
        })
    }

    // ---- service side ----
}

#[cfg(test)]
mod tests {
    use super::parity::xor_into;
    use super::*;

    #[test]
    fn arena_allocates_first_fit_and_merges() {
        let mut a = Arena {
            free: vec![(0, 16 * 4096)],
        };
        let x = a.alloc(4096).unwrap();
        let y = a.alloc(5000).unwrap();
        let z = a.alloc(4096).unwrap();
        assert_eq!((x, y, z), (0, 4096, 3 * 4096));
        a.release(y, 5000);
        assert_eq!(a.alloc(8192), Some(4096));
        a.release(4096, 8192);
        a.release(x, 4096);
        a.release(z, 4096);
        assert_eq!(a.free, vec![(0, 16 * 4096)]);
        assert_eq!(a.alloc(17 * 4096), None);
    }

    #[test]
    fn the_default_placement_keeps_the_old_parity_holders() {
        for n in 1..=12usize {
            for k in 2..=5usize {
                let p = Placement::ring(&vec![0; n], k);
                for set in 0..n.div_ceil(k) as u32 {
                    for v in 0..7 {
                        assert_eq!(
                            p.parity_holder(set, v),
                            parity_holder(set, v, n, k),
                            "n {n} k {k} set {set} v {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn parity_holders_rotate_in_the_next_set() {
        // 6 nodes, K=3: set 0's parity lives on nodes 3..5, set 1's on 0..2.
        assert_eq!(parity_holder(0, 0, 6, 3), 3);
        assert_eq!(parity_holder(0, 1, 6, 3), 4);
        assert_eq!(parity_holder(1, 2, 6, 3), 2);
        // One set only: inside it.
        assert_eq!(parity_holder(0, 4, 3, 3), 1);
    }

    #[test]
    fn xor_twice_is_identity() {
        let a: Vec<u8> = (0..1003).map(|i| i as u8).collect();
        let b: Vec<u8> = (0..1003).map(|i| (i * 7) as u8).collect();
        let mut x = a.clone();
        xor_into(&mut x, &b);
        xor_into(&mut x, &b);
        assert_eq!(x, a);
    }
}
