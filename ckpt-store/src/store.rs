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

mod mapped;
mod membership;
mod placed;
mod retention;
mod usage;

pub use mapped::PutReport;
pub use placed::ParityState;
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

struct Contribution {
    node: u32,
    owner: String,
    offset: u64,
    len: u64,
    crc: u32,
}

#[derive(Default)]
struct ParitySet {
    contributions: BTreeMap<u32, Contribution>,
    /// (offset, len, crc) of the parity once complete.
    parity: Option<(u64, u64, u32)>,
    /// A registration of the parity's range alone, for the peers that rebuild from it.
    parity_mr: Option<MemoryRegion>,
    members: Vec<(u32, u32, String, u64, u32)>, // member, node, owner, len, crc
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

    /// Reads the fastest valid copy of a version, from any level of any node.
    pub fn get(&self, owner: &str, version: u64) -> Result<(Vec<u8>, GetReport)> {
        let (bytes, report) = self.get_bytes(owner, version)?;
        Ok((bytes.to_vec(), report))
    }

    /// As [`Store::get`], leaving the image in store memory when it can (no copy of L1, no
    /// fresh buffer for a remote read).
    pub fn get_bytes(&self, owner: &str, version: u64) -> Result<(ImageBytes, GetReport)> {
        check_owner(owner)?;
        let inner = &self.inner;
        let mut rejected = Vec::new();
        let me = inner.cfg.node;
        // L1 here.
        if let Some((data, crc)) = inner.local_l1(owner, version) {
            if crc32c::crc32c(&data) == crc {
                return Ok((
                    data,
                    GetReport {
                        level: Level::L1,
                        node: me,
                        rejected,
                    },
                ));
            }
            rejected.push(format!("L1 on node {me}: checksum mismatch"));
            eprintln!("krun-store: {owner} v{version}: L1 copy on node {me} fails its checksum; trying L2");
        }
        // L2 held here for another node (this node is its buddy).
        if let Some(data) = inner.held_copy(owner, version) {
            let stored = inner
                .held
                .lock()
                .expect("lock")
                .get(&(owner.to_string(), version))
                .map(|h| h.crc);
            if stored == Some(crc32c::crc32c(&data)) {
                return Ok((
                    ImageBytes::Owned(data),
                    GetReport {
                        level: Level::L2,
                        node: me,
                        rejected,
                    },
                ));
            }
            rejected.push(format!("L2 held on node {me}: checksum mismatch"));
            eprintln!(
                "krun-store: {owner} v{version}: L2 copy held on node {me} fails its checksum"
            );
        }
        // L1 or L2 on other nodes (an L1 elsewhere is the owner's home node).
        let mut found_l2 = None;
        for node in (0..inner.cfg.nodes.len()).filter(|&n| n != me && !inner.is_down(n)) {
            match inner.fetch_remote(node, owner, version) {
                Ok(Some((data, level))) => {
                    found_l2 = Some((data, level, node));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    let text = format!("{} on node {node}: {e}", Level::L2);
                    eprintln!("krun-store: {owner} v{version}: {text}");
                    rejected.push(text);
                }
            }
        }
        if let Some((data, level, node)) = found_l2 {
            return Ok((
                data,
                GetReport {
                    level,
                    node,
                    rejected,
                },
            ));
        }
        // L3: rebuild from parity.
        if inner.cfg.parity_set > 1 {
            match inner.rebuild(owner, version) {
                Ok(Some((data, node))) => {
                    return Ok((
                        ImageBytes::Owned(data),
                        GetReport {
                            level: Level::L3,
                            node,
                            rejected,
                        },
                    ))
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("krun-store: {owner} v{version}: L3 rebuild failed: {e}");
                    rejected.push(format!("L3: {e}"));
                }
            }
        }
        // L4.
        if let Some(disk) = &inner.disk {
            match disk.read(owner, version) {
                Ok(data) => {
                    return Ok((
                        ImageBytes::Owned(data),
                        GetReport {
                            level: Level::L4,
                            node: me,
                            rejected,
                        },
                    ))
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => {
                    eprintln!("krun-store: {owner} v{version}: L4: {e}");
                    rejected.push(format!("L4: {e}"));
                }
            }
        }
        if rejected.is_empty() {
            Err(StoreError::NotFound {
                owner: owner.to_string(),
                version,
            })
        } else {
            Err(StoreError::Invalid(format!(
                "no valid copy of {owner} v{version}: {}",
                rejected.join("; ")
            )))
        }
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

    /// Where `key`'s image goes for L3: (lane set, member index, holder), or `None` when
    /// this store writes no parity, this node is in no parity set, runs more owners than
    /// the sets have lanes, or the set cannot complete (a member or the holder is gone: the
    /// set would wait for an image that never comes).
    fn parity_target(&self, key: &Key) -> Option<(u32, u32, usize)> {
        if self.cfg.parity_set < 2 || self.cfg.nodes.len() < 2 {
            return None;
        }
        let placement = self.placement();
        let (set, member) = placement.parity_member(self.cfg.node)?;
        if placement.set_members(set).len() < 2 {
            // A set of one (no parity among the nodes left) would only copy the image.
            return None;
        }
        let lane = {
            let mut lanes = self.lanes.lock().expect("lock");
            let next = lanes.len() as u32;
            *lanes.entry(key.0.clone()).or_insert(next)
        };
        if lane >= placement.lanes() {
            return None;
        }
        let vset = placement.lane_set(set, lane);
        let holder = placement.parity_holder(vset, key.1);
        if self.is_down(holder) || placement.set_members(set).iter().any(|&m| self.is_down(m)) {
            return None;
        }
        Some((vset, member, holder))
    }

    fn set_size(&self, set: u32) -> usize {
        self.placement().set_size(set)
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

    /// Sends `body` to `node` and waits for its answer (an `Error` answer is an error).
    fn request(&self, node: usize, body: Body) -> Result<Body> {
        let peer = self
            .peers
            .get(node)
            .copied()
            .flatten()
            .ok_or_else(|| StoreError::Peer {
                node,
                what: "not a peer of this node".into(),
            })?;
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let what = body.name();
        let msg = self.chan.seal(&Envelope {
            request: id,
            from_node: self.cfg.node as u32,
            body,
        })?;
        self.ep
            .send(peer, STORE_TAG, &msg)
            .map_err(|e| StoreError::Peer {
                node,
                what: format!("sending {what}: {e}"),
            })?;
        let reply = self
            .ep
            .recv(
                REPLY_TAG | (id & 0xffff_ffff_ffff),
                self.cfg.request_timeout,
            )
            .map_err(|e| StoreError::Peer {
                node,
                what: format!(
                    "no answer to {what} within {:?} ({e})",
                    self.cfg.request_timeout
                ),
            })?;
        let env = self.chan.open(&reply.data).map_err(|e| StoreError::Peer {
            node,
            what: format!("bad reply: {e}"),
        })?;
        if env.request != id || env.from_node as usize != node {
            return Err(StoreError::Peer {
                node,
                what: format!(
                    "reply to request {} from node {} where request {id} to node {node} was expected",
                    env.request, env.from_node
                ),
            });
        }
        match env.body {
            Body::Error(text) => Err(StoreError::Peer { node, what: text }),
            body => Ok(body),
        }
    }

    /// Writes `len` bytes of `mr` into `remote` at `offset` with pipelined RMA writes.
    fn rma_write(
        &self,
        node: usize,
        mr: &MemoryRegion,
        len: usize,
        remote: &RemoteRegion,
        offset: u64,
    ) -> Result<()> {
        let peer = self.peers[node].expect("remote node");
        let mut inflight = std::collections::VecDeque::new();
        let mut at = 0;
        while at < len || !inflight.is_empty() {
            while at < len && inflight.len() < RMA_WINDOW {
                let n = RMA_CHUNK.min(len - at);
                // SAFETY: the L1 region is not written while it is being flushed (copies are
                // write-once); the remote range was reserved for this copy alone.
                let c = unsafe {
                    self.ep
                        .post_write(peer, mr, at, n, remote, offset + at as u64)?
                };
                inflight.push_back(c);
                at += n;
            }
            if let Some(c) = inflight.pop_front() {
                c.wait().map_err(|e| StoreError::Peer {
                    node,
                    what: format!("RMA write: {e}"),
                })?;
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `remote` on `node`.
    fn rma_read(
        &self,
        node: usize,
        remote: &RemoteRegion,
        offset: u64,
        len: usize,
    ) -> Result<ImageBytes> {
        let peer = self.peers[node].expect("remote node");
        let mr = self.take_region(len)?;
        let mut inflight = std::collections::VecDeque::new();
        let mut at = 0;
        let result = (|| {
            while at < len || !inflight.is_empty() {
                while at < len && inflight.len() < RMA_WINDOW {
                    let n = RMA_CHUNK.min(len - at);
                    // SAFETY: `mr` is ours alone until every read completed.
                    let c = unsafe {
                        self.ep
                            .post_read(peer, &mr, at, n, remote, offset + at as u64)?
                    };
                    inflight.push_back(c);
                    at += n;
                }
                if let Some(c) = inflight.pop_front() {
                    c.wait().map_err(|e| StoreError::Peer {
                        node,
                        what: format!("RMA read: {e}"),
                    })?;
                }
            }
            Ok(())
        })();
        for c in inflight {
            let _ = c.wait();
        }
        let bytes = ImageBytes::Pooled(Some(mr), len, self.pool.clone());
        result.map(|()| bytes)
    }

    /// Sends one copy to `node`: reserve, RMA write, commit (verified there).
    fn send_copy(&self, node: usize, key: &Key, kind: u8, set: u32, member: u32) -> Result<bool> {
        if self.is_down(node) {
            return Err(self.down_error(node));
        }
        if node == self.cfg.node {
            return Err(StoreError::Invalid(
                "no other node is up to hold the copy".into(),
            ));
        }
        let (mr, len, crc) = {
            let l1 = self.l1.lock().expect("lock");
            let c = l1.get(key).ok_or_else(|| StoreError::NotFound {
                owner: key.0.clone(),
                version: key.1,
            })?;
            (c.mr.clone(), c.len, c.crc)
        };
        let reply = self.request(
            node,
            Body::Reserve {
                owner: key.0.clone(),
                version: key.1,
                len: len as u64,
                kind,
                set,
                member,
            },
        )?;
        let Body::Reserved { offset, remote } = reply else {
            return Err(unexpected(node, "Reserve", &reply));
        };
        // The key covers the reserved range alone: the copy goes at its start.
        let remote = RemoteRegion::from_bytes(&remote)?;
        self.rma_write(node, &mr, len, &remote, 0)?;
        let ack = self.request(
            node,
            Body::Commit {
                owner: key.0.clone(),
                version: key.1,
                kind,
                set,
                member,
                offset,
                len: len as u64,
                crc,
            },
        )?;
        match ack {
            Body::Ack { complete } => Ok(complete),
            other => Err(unexpected(node, "Commit", &other)),
        }
    }

    fn flush_loop(self: Arc<Self>, jobs: mpsc::Receiver<Key>) {
        let mut pending_l3: Vec<(Key, u32, usize, Instant)> = Vec::new();
        loop {
            let job = match jobs.recv_timeout(Duration::from_millis(20)) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Some(key) = job {
                self.flush(&key, &mut pending_l3);
            }
            self.reprotect();
            // Parity sets complete when the other members have contributed.
            pending_l3.retain(|(key, set, holder, since)| {
                match self.parity_lookup(*holder, *set, key.1) {
                    Ok(Some(p)) if p.members.iter().any(|m| m.2 == key.0) => {
                        self.mark_safe_at(key, Level::L3, *holder);
                        false
                    }
                    _ if since.elapsed() < Duration::from_secs(600) => true,
                    _ => {
                        let why = format!("the parity set at node {holder} never completed");
                        self.plan_parity(key, Err(why));
                        false
                    }
                }
            });
        }
    }

    fn flush(&self, key: &Key, pending_l3: &mut Vec<(Key, u32, usize, Instant)>) {
        let n = self.cfg.nodes.len();
        if n > 1 {
            let buddy = self.buddy_of(self.cfg.node);
            match self.send_copy(buddy, key, 0, 0, 0) {
                Ok(_) => {
                    self.mark_safe_at(key, Level::L2, buddy);
                    self.retain(&key.0, Level::L2);
                }
                Err(e) => self.fail(key, format!("L2 at node {buddy}: {e}")),
            }
        }
        match self.parity_target(key) {
            Some((set, member, holder)) => {
                self.plan_parity(key, Ok(Some(holder)));
                let sent = if holder == self.cfg.node {
                    self.contribute_locally(key, set, member)
                } else {
                    self.send_copy(holder, key, 1, set, member)
                };
                match sent {
                    Ok(true) => self.mark_safe_at(key, Level::L3, holder),
                    Ok(false) => pending_l3.push((key.clone(), set, holder, Instant::now())),
                    Err(e) => {
                        let why = format!("L3 at node {holder}: {e}");
                        self.plan_parity(key, Err(why.clone()));
                        self.fail(key, why);
                    }
                }
            }
            None => self.plan_parity(key, Ok(None)),
        }
        if let Some(disk) = &self.disk {
            let copy = self
                .l1
                .lock()
                .expect("lock")
                .get(key)
                .map(|c| (c.mr.clone(), c.len));
            if let Some((mr, len)) = copy {
                // SAFETY: L1 copies are write-once.
                let data = unsafe { &mr.region().as_slice()[..len] };
                match disk.write(&key.0, key.1, data) {
                    Ok(_) => {
                        self.mark_safe(key, Level::L4);
                        self.retain(&key.0, Level::L4);
                    }
                    Err(e) => self.fail(key, format!("L4: {e}")),
                }
            }
        }
    }

    /// The parity holder is this node: contribute without RMA.
    fn contribute_locally(&self, key: &Key, set: u32, member: u32) -> Result<bool> {
        let (data, crc) = self
            .local_l1(&key.0, key.1)
            .ok_or_else(|| StoreError::NotFound {
                owner: key.0.clone(),
                version: key.1,
            })?;
        let offset = self
            .arena
            .lock()
            .expect("lock")
            .alloc(data.len() as u64)
            .ok_or_else(|| StoreError::Peer {
                node: self.cfg.node,
                what: "arena full".into(),
            })?;
        // SAFETY: freshly allocated arena range, ours alone.
        unsafe {
            self.arena_mr.region().as_mut_slice()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(&data)
        };
        Ok(self.add_contribution(
            set,
            key.1,
            member,
            self.cfg.node as u32,
            &key.0,
            offset,
            data.len() as u64,
            crc,
        ))
    }

    /// Asks `node` for a copy and reads it: (data, level there).
    fn fetch_remote(
        &self,
        node: usize,
        owner: &str,
        version: u64,
    ) -> Result<Option<(ImageBytes, Level)>> {
        let reply = self.request(
            node,
            Body::Lookup {
                owner: owner.to_string(),
                version,
            },
        )?;
        let (level, offset, len, crc, remote) = match reply {
            Body::NotFound => return Ok(None),
            Body::Found {
                level,
                offset,
                len,
                crc,
                remote,
            } => (level, offset, len, crc, remote),
            other => return Err(unexpected(node, "Lookup", &other)),
        };
        let level = if level == 1 { Level::L1 } else { Level::L2 };
        let len = usize::try_from(len).map_err(|_| StoreError::Peer {
            node,
            what: format!("a copy of {len} bytes does not fit this machine"),
        })?;
        let remote = RemoteRegion::from_bytes(&remote)?;
        let data = self.rma_read(node, &remote, offset, len)?;
        let got = crc32c::crc32c(&data);
        if got != crc {
            return Err(StoreError::Checksum {
                level: format!("{level} on node {node}"),
                owner: owner.to_string(),
                version,
                stored: crc,
                computed: got,
            });
        }
        Ok(Some((data, level)))
    }

    fn parity_lookup(&self, holder: usize, set: u32, version: u64) -> Result<Option<ParityInfo>> {
        let reply = if holder == self.cfg.node {
            self.handle_parity(set, version)
        } else {
            self.request(holder, Body::Parity { set, version })?
        };
        let (offset, len, crc, remote, members) = match reply {
            Body::NotFound => return Ok(None),
            Body::ParityFound {
                offset,
                len,
                crc,
                remote,
                members,
            } => (offset, len, crc, remote, members),
            other => return Err(unexpected(holder, "Parity", &other)),
        };
        let remote = RemoteRegion::from_bytes(&remote)?;
        Ok(Some(ParityInfo {
            holder,
            offset,
            len,
            crc,
            remote,
            members,
        }))
    }

    /// Rebuilds a lost owner's version from its parity set: (data, holder node).
    fn rebuild(&self, owner: &str, version: u64) -> Result<Option<(Vec<u8>, usize)>> {
        // The placement in force first, then the earlier ones (the version may have been
        // flushed before the last re-form); each (set, holder) asked once.
        let placements: Vec<Arc<Placement>> = std::iter::once(self.placement())
            .chain(self.earlier.lock().expect("lock").iter().rev().cloned())
            .collect();
        let mut asked = std::collections::BTreeSet::new();
        let candidates = placements
            .iter()
            .flat_map(|p| (0..p.lane_sets()).map(move |set| (set, p.parity_holder(set, version))));
        for (set, holder) in candidates {
            if !asked.insert((set, holder)) || self.is_down(holder) {
                continue;
            }
            let info = match self.parity_lookup(holder, set, version) {
                Ok(Some(i)) => i,
                Ok(None) | Err(_) => continue,
            };
            let Some(lost) = info.members.iter().find(|m| m.2 == owner).cloned() else {
                continue;
            };
            let mut acc = if holder == self.cfg.node {
                // Our own parity: read where it lies in the arena (`info` describes the
                // range as lent to peers, from the start of its own registration).
                let sets = self.parity.lock().expect("lock");
                let Some((offset, len, _)) = sets.get(&(set, version)).and_then(|p| p.parity)
                else {
                    continue;
                };
                // SAFETY: the parity range is immutable once complete.
                unsafe {
                    self.arena_mr.region().as_slice()[offset as usize..(offset + len) as usize]
                        .to_vec()
                }
            } else {
                self.rma_read(holder, &info.remote, info.offset, info.len as usize)?
                    .to_vec()
            };
            if crc32c::crc32c(&acc) != info.crc {
                return Err(StoreError::Invalid(format!(
                    "parity of set {set} v{version} at node {holder} fails its checksum"
                )));
            }
            for m in info.members.iter().filter(|m| m.2 != owner) {
                let data = self.fetch_any(&m.2, version, m.1 as usize)?;
                if crc32c::crc32c(&data) != m.4 {
                    return Err(StoreError::Invalid(format!(
                        "member {} image for the rebuild fails its checksum",
                        m.2
                    )));
                }
                xor_into(&mut acc, &data);
            }
            acc.truncate(lost.3 as usize);
            let got = crc32c::crc32c(&acc);
            if got != lost.4 {
                return Err(StoreError::Checksum {
                    level: format!("L3 rebuild from set {set}"),
                    owner: owner.to_string(),
                    version,
                    stored: lost.4,
                    computed: got,
                });
            }
            return Ok(Some((acc, info.holder)));
        }
        Ok(None)
    }

    /// A member's image from its home node or its buddy (or this node), else from any node
    /// still up (its L2 copy may sit on a buddy of an earlier placement).
    fn fetch_any(&self, owner: &str, version: u64, home: usize) -> Result<Vec<u8>> {
        if let Some((d, _)) = self.local_l1(owner, version) {
            return Ok(d.to_vec());
        }
        let mut last = None;
        let first = [home, self.buddy_of(home)];
        let others = (0..self.cfg.nodes.len()).filter(|n| !first.contains(n));
        let mut tried = std::collections::BTreeSet::new();
        for node in first.into_iter().chain(others) {
            if !tried.insert(node) {
                continue;
            }
            if node == self.cfg.node {
                if let Some(h) = self.held_copy(owner, version) {
                    return Ok(h);
                }
                continue;
            }
            if self.is_down(node) {
                last = Some(self.down_error(node));
                continue;
            }
            match self.fetch_remote(node, owner, version) {
                Ok(Some((d, _))) => return Ok(d.to_vec()),
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(StoreError::NotFound {
            owner: owner.to_string(),
            version,
        }))
    }

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

    fn serve(self: Arc<Self>) {
        while !self.stop.load(Ordering::SeqCst) {
            let msg = match self.ep.recv(STORE_TAG, Duration::from_millis(100)) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let sender = msg
                .peer
                .and_then(|p| self.peers.iter().position(|q| *q == Some(p)));
            let env = match self.chan.open(&msg.data) {
                Ok(e) => e,
                Err(why) => {
                    eprintln!(
                        "krun-store: node {}: dropped a message from {}: {why}",
                        self.cfg.node,
                        sender.map_or("an unknown peer".to_string(), |n| format!("node {n}"))
                    );
                    continue;
                }
            };
            let Some(node) = sender.filter(|&n| n == env.from_node as usize) else {
                eprintln!(
                    "krun-store: node {}: dropped a message claiming node {} from {:?}",
                    self.cfg.node, env.from_node, sender
                );
                continue;
            };
            let body = self
                .handle(node, env.body)
                .unwrap_or_else(|e| Body::Error(e.to_string()));
            let reply = match self.chan.seal(&Envelope {
                request: env.request,
                from_node: self.cfg.node as u32,
                body,
            }) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!(
                        "krun-store: node {}: sealing a reply to node {node}: {e}",
                        self.cfg.node
                    );
                    continue;
                }
            };
            let tag = REPLY_TAG | (env.request & 0xffff_ffff_ffff);
            if let Some(peer) = self.peers[node] {
                if let Err(e) = self.ep.send(peer, tag, &reply) {
                    eprintln!(
                        "krun-store: node {}: replying to node {node}: {e}",
                        self.cfg.node
                    );
                }
            }
        }
    }

    /// Registers `len` bytes of the arena at `offset` on their own, so that a peer given
    /// the remote key reaches that range and nothing else of the arena.
    fn register_range(&self, offset: u64, len: u64) -> Result<MemoryRegion> {
        // SAFETY: the view is kept in `held`, `reserved` or `parity`, which drop before
        // `arena_mr` (field order of `Inner`), and the range lies inside the arena.
        let view = unsafe {
            Region::view(
                self.arena_mr.region(),
                offset as usize,
                (len.max(1)) as usize,
            )?
        };
        Ok(self.ep.register(view)?)
    }

    fn handle(&self, from: usize, body: Body) -> Result<Body> {
        match body {
            Body::Reserve {
                owner,
                version,
                len,
                kind,
                set: _,
                member: _,
            } => {
                check_owner(&owner)?;
                let key = ((owner.clone(), version), kind);
                if let Some(old) = self.reserved.lock().expect("lock").remove(&key) {
                    let (off, l) = (old.offset, old.len);
                    drop(old);
                    self.arena.lock().expect("lock").release(off, l);
                }
                let offset = self.arena.lock().expect("lock").alloc(len).ok_or_else(|| StoreError::Peer {
                    node: self.cfg.node,
                    what: format!("arena full: no {len} bytes free for {owner} v{version} from node {from}"),
                })?;
                let mr = match self.register_range(offset, len) {
                    Ok(mr) => mr,
                    Err(e) => {
                        self.arena.lock().expect("lock").release(offset, len);
                        return Err(e);
                    }
                };
                let remote = mr.remote().to_bytes().to_vec();
                self.reserved.lock().expect("lock").insert(
                    key,
                    Reservation {
                        offset,
                        len,
                        _key: mr,
                    },
                );
                Ok(Body::Reserved { offset, remote })
            }
            Body::Commit {
                owner,
                version,
                kind,
                set,
                member,
                offset,
                len,
                crc,
            } => {
                let key = ((owner.clone(), version), kind);
                let reserved = self
                    .reserved
                    .lock()
                    .expect("lock")
                    .get(&key)
                    .map(|r| (r.offset, r.len));
                if reserved != Some((offset, len)) {
                    return Err(StoreError::Invalid(format!(
                        "commit of {owner} v{version} without its reservation"
                    )));
                }
                // SAFETY: the writer's RMA writes completed before it sent the commit.
                let got = crc32c::crc32c(unsafe {
                    &self.arena_mr.region().as_slice()[offset as usize..(offset + len) as usize]
                });
                self.reserved.lock().expect("lock").remove(&key);
                if got != crc {
                    self.arena.lock().expect("lock").release(offset, len);
                    return Err(StoreError::Checksum {
                        level: format!("copy landed on node {}", self.cfg.node),
                        owner,
                        version,
                        stored: crc,
                        computed: got,
                    });
                }
                let complete = if kind == 0 {
                    let mr = match self.register_range(offset, len) {
                        Ok(mr) => mr,
                        Err(e) => {
                            self.arena.lock().expect("lock").release(offset, len);
                            return Err(e);
                        }
                    };
                    let old = self.held.lock().expect("lock").insert(
                        (owner, version),
                        Held {
                            offset,
                            len,
                            crc,
                            mr,
                        },
                    );
                    if let Some(old) = old {
                        self.arena
                            .lock()
                            .expect("lock")
                            .release(old.offset, old.len);
                    }
                    true
                } else {
                    self.add_contribution(
                        set,
                        version,
                        member,
                        from as u32,
                        &owner,
                        offset,
                        len,
                        crc,
                    )
                };
                Ok(Body::Ack { complete })
            }
            Body::Lookup { owner, version } => {
                let key = (owner, version);
                if let Some(c) = self.l1.lock().expect("lock").get(&key) {
                    return Ok(Body::Found {
                        level: 1,
                        offset: 0,
                        len: c.len as u64,
                        crc: c.crc,
                        remote: c.mr.remote().to_bytes().to_vec(),
                    });
                }
                if let Some(h) = self.held.lock().expect("lock").get(&key) {
                    // The copy's own registration: the reader reaches this copy alone.
                    return Ok(Body::Found {
                        level: 2,
                        offset: 0,
                        len: h.len,
                        crc: h.crc,
                        remote: h.mr.remote().to_bytes().to_vec(),
                    });
                }
                Ok(Body::NotFound)
            }
            Body::Drop { owner, version } => {
                if let Some(h) = self.held.lock().expect("lock").remove(&(owner, version)) {
                    self.arena.lock().expect("lock").release(h.offset, h.len);
                }
                Ok(Body::Ack { complete: true })
            }
            Body::Parity { set, version } => Ok(self.handle_parity(set, version)),
            other => Err(StoreError::Invalid(format!(
                "unexpected request {}",
                other.name()
            ))),
        }
    }

    fn handle_parity(&self, set: u32, version: u64) -> Body {
        let sets = self.parity.lock().expect("lock");
        let Some(p) = sets.get(&(set, version)) else {
            return Body::NotFound;
        };
        let (Some((_, len, crc)), Some(mr)) = (p.parity, p.parity_mr.as_ref()) else {
            return Body::NotFound;
        };
        // The parity's own registration: the rebuilding peer reaches this range alone.
        Body::ParityFound {
            offset: 0,
            len,
            crc,
            remote: mr.remote().to_bytes().to_vec(),
            members: p
                .members
                .iter()
                .map(|(m, n, o, l, c)| (*m, *n, o.clone(), *l, *c))
                .collect(),
        }
    }

    /// Records a member's image for a parity set; computes the parity once all are in.
    #[allow(clippy::too_many_arguments)]
    fn add_contribution(
        &self,
        set: u32,
        version: u64,
        member: u32,
        node: u32,
        owner: &str,
        offset: u64,
        len: u64,
        crc: u32,
    ) -> bool {
        let expected = self.set_size(set);
        let mut sets = self.parity.lock().expect("lock");
        let p = sets.entry((set, version)).or_default();
        if let Some((o, l, _)) = p.parity {
            // A complete set gets a new image: the version was taken again after a
            // recovery rolled the job back (the old images are gone); start afresh.
            p.parity = None;
            p.parity_mr = None;
            p.members.clear();
            self.arena.lock().expect("lock").release(o, l);
        }
        // Images from nodes that are no longer the members at their index (left from
        // before a re-form of the sets) are not this set's.
        let placement = self.placement();
        let members = placement.set_members(set);
        let stale: Vec<u32> = p
            .contributions
            .iter()
            .filter(|(m, c)| members.get(**m as usize) != Some(&(c.node as usize)))
            .map(|(m, _)| *m)
            .collect();
        for m in stale {
            if let Some(c) = p.contributions.remove(&m) {
                self.arena.lock().expect("lock").release(c.offset, c.len);
            }
        }
        if let Some(old) = p.contributions.insert(
            member,
            Contribution {
                node,
                owner: owner.to_string(),
                offset,
                len,
                crc,
            },
        ) {
            self.arena
                .lock()
                .expect("lock")
                .release(old.offset, old.len);
        }
        if p.contributions.len() < expected {
            return false;
        }
        let plen = p.contributions.values().map(|c| c.len).max().unwrap_or(0);
        let Some(poff) = self.arena.lock().expect("lock").alloc(plen) else {
            eprintln!(
                "krun-store: node {}: arena full, parity of set {set} v{version} not computed",
                self.cfg.node
            );
            return false;
        };
        // SAFETY: the parity range is freshly allocated; contributions are committed and
        // immutable; both are disjoint ranges of the lent arena.
        let arena = unsafe { self.arena_mr.region().as_mut_slice() };
        arena[poff as usize..(poff + plen) as usize].fill(0);
        for c in p.contributions.values() {
            let (src, dst) = if c.offset < poff {
                let (a, b) = arena.split_at_mut(poff as usize);
                (
                    &a[c.offset as usize..(c.offset + c.len) as usize],
                    &mut b[..plen as usize],
                )
            } else {
                let (a, b) = arena.split_at_mut(c.offset as usize);
                (
                    &b[..c.len as usize],
                    &mut a[poff as usize..(poff + plen) as usize],
                )
            };
            xor_into(dst, src);
        }
        let pcrc = crc32c::crc32c(&arena[poff as usize..(poff + plen) as usize]);
        p.members = p
            .contributions
            .iter()
            .map(|(m, c)| (*m, c.node, c.owner.clone(), c.len, c.crc))
            .collect();
        let mut arena_alloc = self.arena.lock().expect("lock");
        for c in std::mem::take(&mut p.contributions).into_values() {
            arena_alloc.release(c.offset, c.len);
        }
        p.parity = Some((poff, plen, pcrc));
        p.parity_mr = match self.register_range(poff, plen) {
            Ok(mr) => Some(mr),
            Err(e) => {
                eprintln!(
                    "krun-store: node {}: parity of set {set} v{version} cannot be lent ({e}): \
                     not served",
                    self.cfg.node
                );
                None
            }
        };
        // Keep the newest `keep` complete parity sets of this set.
        let complete: Vec<u64> = sets
            .iter()
            .filter(|((s, _), p)| *s == set && p.parity.is_some())
            .map(|((_, v), _)| *v)
            .collect();
        let keep = self.cfg.keep.max(1);
        if complete.len() > keep {
            for v in &complete[..complete.len() - keep] {
                if let Some(old) = sets.remove(&(set, *v)) {
                    if let Some((o, l, _)) = old.parity {
                        arena_alloc.release(o, l);
                    }
                }
            }
        }
        true
    }
}

struct ParityInfo {
    holder: usize,
    offset: u64,
    len: u64,
    crc: u32,
    remote: RemoteRegion,
    members: Vec<(u32, u32, String, u64, u32)>,
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    let (d, s) = (&mut dst[..n], &src[..n]);
    let mut dc = d.chunks_exact_mut(8);
    let mut sc = s.chunks_exact(8);
    for (a, b) in (&mut dc).zip(&mut sc) {
        let x = u64::from_ne_bytes(a[..].try_into().expect("8"))
            ^ u64::from_ne_bytes(b.try_into().expect("8"));
        a.copy_from_slice(&x.to_ne_bytes());
    }
    for (a, b) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        *a ^= b;
    }
}

#[cfg(test)]
mod tests {
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
