//! The DSM driver of one process: page faults trapped with userfaultfd and served by the
//! coherence state machine ([`crate::coherence::Node`]), protocol messages over the fabric's
//! tagged messages, and one-sided reads of owners' pages.
//!
//! - Several fault-handling threads read the same userfaultfd (the kernel hands each fault
//!   to one of them); one service thread receives protocol messages.
//! - A read owner publishes a page by copying it (write-protected) into its **export**
//!   region, registered with the fabric, and opening the page's share word in its **words**
//!   region. A reader with a hint joins with a remote fetch-and-add on the word and reads the
//!   page with an RMA read into its landing buffer, then maps it with `UFFDIO_COPY`: the
//!   owner's CPU does nothing.
//! - Prefetch: a read miss on the page after the previous miss also starts reads of the next
//!   `prefetch` pages; their one-sided operations are posted together.
//!
//! The state machine runs under one mutex; its actions run in order under it, except the
//! one-sided operations, which the fault thread posts after releasing it.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fabric::{Endpoint, MemoryRegion, PeerId, Region, RemoteRegion};

use crate::coherence::{Access, Msg, Node, NodeId, PageId};
use crate::error::{DsmError, Result};
use crate::uffd::{Uffd, PAGE};

mod actions;
mod dead;
pub mod liveness;
pub mod members;
mod remote;
mod watchdog;
pub mod words;
use remote::{landing_len, Remote};
pub use watchdog::{exit_handler, UnreachableHandler, EXIT_PAGE_UNREACHABLE};
pub use words::RegisteredWords;

/// The fabric tag of DSM protocol messages.
pub const TAG_DSM: u64 = 0x4b44_534d_0000_0001;
/// The fabric tag of a node's announcement that nodes died ([`Engine::node_failed`]); it
/// differs from [`TAG_DSM`] in one bit, so the service thread receives both with one call.
pub const TAG_DSM_FAILED: u64 = 0x4b44_534d_0000_0003;
/// The fabric tag of membership messages (joins, leaves, the barrier: [`members`]); it
/// differs from [`TAG_DSM`] in one other bit.
pub const TAG_DSM_MEMBER: u64 = 0x4b44_534d_0000_0005;
/// Version of the DSM's wire format (2: `Msg::Write` carries its epoch, `Msg::Unqueue` the
/// rebuild's).
const WIRE_VERSION: u8 = 2;

/// One shared region as the driver sees it.
pub struct RegionInfo {
    pub first_page: PageId,
    pub pages: u64,
    /// The region's virtual address (the same on every rank).
    pub base: u64,
    pub export: MemoryRegion,
    pub words: MemoryRegion,
    pub remote_export: Vec<RemoteRegion>,
    pub remote_words: Vec<RemoteRegion>,
}

impl RegionInfo {
    fn addr(&self, page: PageId) -> u64 {
        self.base + (page - self.first_page) * PAGE as u64
    }

    fn index(&self, page: PageId) -> usize {
        (page - self.first_page) as usize
    }
}

pub type Regions = Arc<RwLock<BTreeMap<PageId, Arc<RegionInfo>>>>;

fn region_of(regions: &Regions, page: PageId) -> Option<Arc<RegionInfo>> {
    let map = regions.read().ok()?;
    let (_, r) = map.range(..=page).next_back()?;
    (page < r.first_page + r.pages).then(|| r.clone())
}

/// Counters of the driver.
#[derive(Default)]
pub struct DriverStats {
    pub faults: AtomicU64,
    pub remote_fetches: AtomicU64,
    pub prefetched: AtomicU64,
    pub messages: AtomicU64,
    /// Accesses reported unreachable (fault timeout with a dead node).
    pub unreachable: AtomicU64,
    /// Faults whose one-sided operations were in flight at once, at most (fault threads).
    pub max_concurrent_remote: AtomicU64,
    /// Joins whose speculative read, posted with them, was the copy of the generation they
    /// joined: one round trip ([`words`]).
    pub speculative_reads: AtomicU64,
    /// Joins whose speculative read was older or torn: read again after the join.
    pub speculation_fallbacks: AtomicU64,
    /// Pages this node published (copied into its export region, share word opened).
    pub publications: AtomicU64,
    /// Time spent in the fault path's steps, nanoseconds summed over every fault
    /// ([`STEPS`] names them).
    pub step_ns: [AtomicU64; STEPS.len()],
}

/// The fault path's steps timed in [`DriverStats::step_ns`]: at the fault thread, from the
/// fault read off the userfaultfd to the state machine's first actions (`locate`: the
/// region, the page state, the owner hint or the manager), the one-sided join's round
/// trip (`join`), the RMA read's (`read`), the wait for the state machine's lock after
/// them (`lock`), the state machine's answer to them (`answer`), and the `UFFDIO_COPY` that
/// installs the page and wakes the faulting thread (`copy`, part of `answer`).
/// The rest of an access's time (the trap, the fault's delivery to the fault thread, the
/// wake-up of the faulting thread) is the access's time less these.
pub const STEPS: [&str; 6] = ["locate", "join", "read", "lock", "answer", "copy"];

/// Shared state of the driver's threads.
pub struct Engine {
    pub me: NodeId,
    pub ep: Arc<dyn Endpoint>,
    /// The connection to each node (by id; nodes that joined are added, ids are never
    /// reused).
    peers: RwLock<Vec<Option<PeerId>>>,
    rank_of_peer: RwLock<HashMap<PeerId, NodeId>>,
    pub node: Mutex<Node<RegisteredWords>>,
    pub regions: Regions,
    pub uffd: Uffd,
    pub prefetch: usize,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
    last_miss: AtomicU64,
    pub stats: DriverStats,
    zero: Vec<u8>,
    trace: bool,
    /// Joins are posted with a speculative read of the slot (`KRUN_DSM_SPECULATE`, on by
    /// default; off: the read is posted after the join's answer, two round trips).
    speculate: bool,
    /// Test injection ([`remote::join_hold`]).
    join_hold: Option<std::path::PathBuf>,
    /// Fault injection for tests (`KRUN_DSM_PUBLISH_DELAY_MS`): how long a publication
    /// waits before it reads the page, to widen the window in which the reader moves on.
    publish_delay: Duration,
    /// Next sequence number towards each node.
    send_seq: Mutex<Vec<u64>>,
    /// Pages local accesses wait for ([`watchdog`]).
    pending: Mutex<HashMap<PageId, watchdog::Pending>>,
    /// How long an access may wait before the nodes it depends on are probed.
    fault_timeout: Duration,
    unreachable: Mutex<Option<UnreachableHandler>>,
    /// Fault threads inside one-sided operations now.
    remote_now: AtomicUsize,
    /// Fault injection for tests (`KRUN_DSM_FAULT_RENDEZVOUS`): a fault thread about to post
    /// one-sided operations waits (at most 10 s) until this many fault threads are there.
    rendezvous: usize,
    /// Next expected from each node, and messages that arrived early.
    #[allow(clippy::type_complexity)]
    reorder: Mutex<(Vec<u64>, BTreeMap<(NodeId, u64), Vec<u8>>)>,
    /// Nodes known to have died: dropped from copysets, never sent to or probed again.
    dead: Mutex<BTreeSet<NodeId>>,
    /// Nodes a send to failed (with the error), for the watchdog to probe: a dead one is
    /// declared failed, a live one makes the error the driver's (its message was lost).
    suspects: Mutex<BTreeMap<NodeId, String>>,
    /// The node set and its changes, and the barrier ([`members`]).
    pub(crate) members: members::Members,
    /// Pages a manager answered lost while local accesses waited (reported by the watchdog).
    lost_reports: Mutex<Vec<PageId>>,
    /// Nodes a probe found silent whose process lives ([`liveness`]).
    stalled: Mutex<BTreeSet<NodeId>>,
}

/// Bytes of the event being handled: a message's page, or RMA landing slots.
enum Data<'a> {
    None,
    Message(&'a [u8]),
    Rma(&'a HashMap<PageId, *const u8>),
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: NodeId,
        ep: Arc<dyn Endpoint>,
        peers: Vec<Option<PeerId>>,
        node: Node<RegisteredWords>,
        regions: Regions,
        uffd: Uffd,
        prefetch: usize,
    ) -> Engine {
        let n = peers.len();
        let rank_of_peer = peers
            .iter()
            .enumerate()
            .filter_map(|(r, p)| p.map(|p| (p, r as NodeId)))
            .collect();
        Engine {
            me,
            ep,
            peers: RwLock::new(peers),
            rank_of_peer: RwLock::new(rank_of_peer),
            node: Mutex::new(node),
            regions,
            uffd,
            prefetch,
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
            last_miss: AtomicU64::new(u64::MAX),
            stats: DriverStats::default(),
            zero: vec![0u8; PAGE],
            trace: std::env::var_os("KRUN_DSM_TRACE").is_some(),
            speculate: true,
            join_hold: remote::join_hold(),
            publish_delay: Duration::from_millis(
                std::env::var("KRUN_DSM_PUBLISH_DELAY_MS")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0),
            ),
            send_seq: Mutex::new(vec![0; n]),
            pending: Mutex::new(HashMap::new()),
            fault_timeout: Duration::from_secs(30),
            unreachable: Mutex::new(Some(exit_handler(me))),
            remote_now: AtomicUsize::new(0),
            rendezvous: std::env::var("KRUN_DSM_FAULT_RENDEZVOUS")
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0),
            reorder: Mutex::new((vec![0; n], BTreeMap::new())),
            dead: Mutex::new(BTreeSet::new()),
            suspects: Mutex::new(BTreeMap::new()),
            members: members::Members::new(n as u32),
            lost_reports: Mutex::new(Vec::new()),
            stalled: Mutex::new(BTreeSet::new()),
        }
    }

    /// Number of node ids so far (the initial ranks and the nodes that joined).
    pub fn peer_count(&self) -> usize {
        self.peers.read().map(|p| p.len()).unwrap_or(0)
    }

    /// Every node's connection, by id.
    pub fn peers(&self) -> Vec<Option<PeerId>> {
        self.peers.read().map(|p| p.clone()).unwrap_or_default()
    }

    fn rank_of(&self, peer: PeerId) -> Option<NodeId> {
        self.rank_of_peer.read().ok()?.get(&peer).copied()
    }

    /// Adds node `id` reached through `peer` (a join): its tables grow. A node that asks
    /// to join again under the same id (its first join was dropped when the coordinator
    /// running it died) comes with a new endpoint: its message sequences start again
    /// from 0 both ways, and what the old endpoint sent and was not delivered is dropped.
    pub fn add_peer(&self, id: NodeId, peer: PeerId) -> Result<()> {
        let n = id as usize + 1;
        let old = {
            let mut peers = self.peers.write().map_err(|_| poisoned())?;
            if peers.len() < n {
                peers.resize(n, None);
            }
            peers[id as usize].replace(peer)
        };
        let renewed = old.is_some_and(|o| o != peer);
        {
            let mut by_peer = self.rank_of_peer.write().map_err(|_| poisoned())?;
            if let Some(o) = old.filter(|_| renewed) {
                by_peer.remove(&o);
            }
            by_peer.insert(peer, id);
        }
        {
            let mut seqs = self.send_seq.lock().map_err(|_| poisoned())?;
            if seqs.len() < n {
                seqs.resize(n, 0);
            }
            if renewed {
                seqs[id as usize] = 0;
            }
        }
        let mut r = self.reorder.lock().map_err(|_| poisoned())?;
        if r.0.len() < n {
            r.0.resize(n, 0);
        }
        if renewed {
            r.0[id as usize] = 0;
            r.1.retain(|&(from, _), _| from != id);
        }
        Ok(())
    }

    pub fn words(
        regions: Regions,
        ep: Arc<dyn Endpoint>,
        me: NodeId,
        this: PeerId,
    ) -> RegisteredWords {
        RegisteredWords {
            regions,
            ep,
            me,
            this,
            open: Default::default(),
            generations: Default::default(),
            error: None,
        }
    }

    /// Sets how long a local access may wait before the nodes it depends on are probed (and
    /// it is reported unreachable if one of them does not answer).
    pub fn with_fault_timeout(mut self, timeout: Duration) -> Engine {
        self.fault_timeout = timeout;
        self
    }

    /// Posts each join with a speculative read of the owner's slot (`true`, one round trip
    /// when the copy is current) or the read after the join's answer (`false`).
    pub fn with_speculation(mut self, speculate: bool) -> Engine {
        self.speculate = speculate;
        self
    }

    /// Replaces what is called when an access cannot be served (`None`: only record the
    /// error; the faulting thread then stays blocked).
    pub fn set_unreachable_handler(&self, handler: Option<UnreachableHandler>) {
        if let Ok(mut h) = self.unreachable.lock() {
            *h = handler;
        }
    }

    /// The first error a background thread met, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    pub(crate) fn fail(&self, e: String) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Starts `fault_threads` fault handlers and the service thread.
    pub fn spawn(self: &Arc<Self>, fault_threads: usize) -> Result<Vec<JoinHandle<()>>> {
        let mut handles = Vec::new();
        for i in 0..fault_threads.max(1) {
            let e = self.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("dsm-fault-{i}"))
                    .spawn(move || e.fault_loop())
                    .map_err(|e| DsmError::Os {
                        what: "spawning a fault thread".into(),
                        source: e,
                    })?,
            );
        }
        // The watchdog has its own thread: the service and fault threads may be held (a
        // send to a dead node can block under the state machine's lock).
        let e = self.clone();
        handles.push(
            std::thread::Builder::new()
                .name("dsm-watchdog".into())
                .spawn(move || {
                    while !e.stopped() {
                        std::thread::sleep(watchdog::CHECK_EVERY);
                        e.check_waits();
                    }
                })
                .map_err(|e| DsmError::Os {
                    what: "spawning the watchdog thread".into(),
                    source: e,
                })?,
        );
        // On every node: a node becomes the coordinator when the ones before it die.
        {
            let e = self.clone();
            handles.push(
                std::thread::Builder::new()
                    .name("dsm-members".into())
                    .spawn(move || e.members_loop())
                    .map_err(|e| DsmError::Os {
                        what: "spawning the membership thread".into(),
                        source: e,
                    })?,
            );
        }
        let e = self.clone();
        handles.push(
            std::thread::Builder::new()
                .name("dsm-service".into())
                .spawn(move || e.service_loop())
                .map_err(|e| DsmError::Os {
                    what: "spawning the service thread".into(),
                    source: e,
                })?,
        );
        Ok(handles)
    }

    fn service_loop(&self) {
        while !self.stopped() {
            match self.ep.recv_masked(
                TAG_DSM,
                (TAG_DSM ^ TAG_DSM_FAILED) | (TAG_DSM ^ TAG_DSM_MEMBER),
                Duration::from_millis(20),
            ) {
                Ok(m) => {
                    let r = if m.tag == TAG_DSM_FAILED {
                        self.on_failed_wire(m.peer, &m.data)
                    } else if m.tag == TAG_DSM_MEMBER {
                        self.on_member_wire(m.peer, &m.data)
                    } else if m.tag != TAG_DSM {
                        Err(DsmError::BadMessage {
                            from: m.peer.and_then(|p| self.rank_of(p)).unwrap_or(u32::MAX),
                            reason: format!("unknown tag {:#x}", m.tag),
                        })
                    } else {
                        self.on_wire(m.peer, &m.data)
                    };
                    if let Err(e) = r {
                        self.fail(e.to_string());
                    }
                }
                Err(fabric::FabricError::RecvTimeout { .. }) => {}
                Err(e) => {
                    self.fail(format!("receiving DSM messages: {e}"));
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// A message off the fabric. Messages carry a sequence number per (sender, receiver):
    /// the protocol assumes FIFO links, and a provider may deliver a large message (a page)
    /// after a small one sent later (shm does).
    fn on_wire(&self, peer: Option<PeerId>, data: &[u8]) -> Result<()> {
        let from_peer = peer.and_then(|p| self.rank_of(p));
        let bad = |reason: String| DsmError::BadMessage {
            from: from_peer.unwrap_or(u32::MAX),
            reason,
        };
        let (body, crc) = data
            .split_last_chunk::<4>()
            .ok_or_else(|| bad(format!("{} bytes", data.len())))?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err(bad("checksum mismatch (corrupted in transit)".into()));
        }
        let data = body;
        let (&version, rest) = data.split_first().ok_or_else(|| bad("empty".into()))?;
        if version != WIRE_VERSION {
            return Err(bad(format!(
                "wire version {version}, expected {WIRE_VERSION}"
            )));
        }
        let ((from, seq), _): ((NodeId, u64), &[u8]) =
            postcard::take_from_bytes(rest).map_err(|e| bad(e.to_string()))?;
        if from_peer.is_some_and(|p| p != from) || from as usize >= self.peer_count() {
            return Err(bad(format!("claims to be node {from}")));
        }
        let mut ready = Vec::new();
        {
            let mut r = self.reorder.lock().map_err(|_| poisoned())?;
            let (next, early) = &mut *r;
            let expected = next[from as usize];
            if seq < expected || early.contains_key(&(from, seq)) {
                return Err(bad(format!("message {seq} again (expected {expected})")));
            }
            if seq > expected {
                if early.len() >= 1 << 16 {
                    return Err(bad(format!("too many messages ahead of {expected}")));
                }
                early.insert((from, seq), data.to_vec());
                return Ok(());
            }
            ready.push(data.to_vec());
            next[from as usize] += 1;
            while let Some(d) = early.remove(&(from, next[from as usize])) {
                ready.push(d);
                next[from as usize] += 1;
            }
        }
        for d in ready {
            self.deliver(from, &d[1..])?;
        }
        Ok(())
    }

    fn deliver(&self, from: NodeId, rest: &[u8]) -> Result<()> {
        let bad = |reason: String| DsmError::BadMessage { from, reason };
        let ((_, _, msg), page_bytes): ((NodeId, u64, Msg), &[u8]) =
            postcard::take_from_bytes(rest).map_err(|e| bad(e.to_string()))?;
        let carries = matches!(msg, Msg::Grant { zero: false, .. });
        if carries && page_bytes.len() != PAGE || !carries && !page_bytes.is_empty() {
            return Err(bad(format!("{} page bytes with {msg:?}", page_bytes.len())));
        }
        if !msg.is_migration() && region_of(&self.regions, msg.page()).is_none() {
            // A late message about a region freed since (the protocol may still be settling
            // when the collective free runs): nothing to do.
            if self.trace {
                eprintln!(
                    "{} dsm {}: dropped {msg:?} (region freed)",
                    now_ns(),
                    self.me
                );
            }
            return Ok(());
        }
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        if self.trace {
            eprintln!("{} dsm {}: from {from}: {msg:?}", now_ns(), self.me);
        }
        let mut node = self.node.lock().map_err(|_| bad("state poisoned".into()))?;
        let actions = node.on_message(from, msg);
        let mut remote = Vec::new();
        self.execute(&mut node, actions, Data::Message(page_bytes), &mut remote)?;
        let finished = node.take_finished();
        drop(node);
        for epoch in finished {
            self.migration_finished(epoch)?;
        }
        // The service thread never blocks on one-sided operations: hand them to a helper.
        if !remote.is_empty() {
            self.run_remote(remote)?;
        }
        Ok(())
    }

    fn fault_loop(&self) {
        let mut slots = Region::new(landing_len(self.prefetch)).and_then(|r| self.ep.register(r));
        while !self.stopped() {
            let fault = match self.uffd.next_fault(50) {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    self.fail(e.to_string());
                    break;
                }
            };
            let slots = match &mut slots {
                Ok(s) => s.clone(),
                Err(e) => {
                    self.fail(format!("registering a landing buffer: {e}"));
                    break;
                }
            };
            if let Err(e) = self.on_fault(fault.address, fault.write, &slots) {
                self.fail(e.to_string());
            }
        }
    }

    fn page_of(&self, address: u64) -> Option<(PageId, Arc<RegionInfo>)> {
        let map = self.regions.read().ok()?;
        for r in map.values() {
            if address >= r.base && address < r.base + r.pages * PAGE as u64 {
                return Some((r.first_page + (address - r.base) / PAGE as u64, r.clone()));
            }
        }
        None
    }

    fn on_fault(&self, address: u64, write: bool, slots: &MemoryRegion) -> Result<()> {
        let t_fault = Instant::now();
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let Some((page, region)) = self.page_of(address) else {
            return Err(DsmError::Config {
                what: "fault address".into(),
                reason: format!("{address:#x} is in no shared region"),
            });
        };
        let access = if write { Access::Write } else { Access::Read };
        if self.trace {
            eprintln!(
                "dsm {}: fault {access:?} page {page} at {address:#x}",
                self.me
            );
        }
        let mut pages = vec![(page, access)];
        if access == Access::Read {
            let prev = self.last_miss.swap(page, Ordering::Relaxed);
            if prev != u64::MAX && prev + 1 == page {
                let end = (region.first_page + region.pages).min(page + 1 + self.prefetch as u64);
                pages.extend((page + 1..end).map(|p| (p, Access::Read)));
            }
        }
        let mut remote = Vec::new();
        {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            for (i, &(p, a)) in pages.iter().enumerate() {
                if i > 0
                    && (node.state(p) != crate::coherence::PageState::Invalid
                        || node.waiting(p).is_some())
                {
                    continue;
                }
                if i > 0 {
                    self.last_miss.store(p, Ordering::Relaxed);
                    self.stats.prefetched.fetch_add(1, Ordering::Relaxed);
                }
                self.track_fault(p, a, i == 0);
                let actions = node.fault(p, a);
                self.execute(&mut node, actions, Data::None, &mut remote)?;
            }
        }
        self.step(0, t_fault);
        if remote.is_empty() {
            return Ok(());
        }
        let now = self.remote_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.stats
            .max_concurrent_remote
            .fetch_max(now as u64, Ordering::Relaxed);
        if self.rendezvous > 1 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.remote_now.load(Ordering::SeqCst) < self.rendezvous
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let r = self.run_remote_with(remote, slots);
        self.remote_now.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Adds the time since `since` to step `i` of [`STEPS`].
    pub(crate) fn step(&self, i: usize, since: Instant) {
        self.stats.step_ns[i].fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// The connection to `rank`.
    pub fn peer_of(&self, rank: NodeId) -> Result<PeerId> {
        self.peer(rank)
    }

    fn peer(&self, rank: NodeId) -> Result<PeerId> {
        self.peers
            .read()
            .map_err(|_| poisoned())?
            .get(rank as usize)
            .copied()
            .flatten()
            .ok_or_else(|| DsmError::Config {
                what: "peer".into(),
                reason: format!("node {rank} is not connected"),
            })
    }
}

fn poisoned() -> DsmError {
    DsmError::Config {
        what: "DSM state".into(),
        reason: "a DSM thread panicked".into(),
    }
}

fn no_region(page: PageId) -> DsmError {
    DsmError::Config {
        what: "page".into(),
        reason: format!("page {page} is in no shared region"),
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process: trace lines of several
/// processes sort into one timeline).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
