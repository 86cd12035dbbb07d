//! Sender-based pessimistic message logging, for uncoordinated checkpoints in which only a
//! lost rank restarts and the survivors keep running.
//!
//! # Protocol
//! - **Payloads stay with the sender.** Every message a rank sends (user and library
//!   messages, except to itself) is kept in its memory, keyed by (destination, sequence
//!   number), until the destination says that a checkpoint of its own covering it is safe
//!   ([`Rank::log_checkpoint_safe`] sends an `Ack` out of band); then it is dropped (garbage
//!   collection). The log is part of the rank's log snapshot ([`Rank::log_mark_checkpoint`]),
//!   so a sender that restarts keeps the payloads its receivers may still need.
//! - **Determinants are durable before they matter.** When a receive call hands a message
//!   over, the receiver posts its determinant (source, tag, sequence number, receive order,
//!   its checkpoint interval) as a one-sided RMA write into a ring that its *buddy* (a rank
//!   on another node: `(rank + KRUN_LOCAL_SIZE) mod size`) registered for it; the write
//!   overlaps what follows (nobody waits for it at the delivery). The rule (pessimistic, as
//!   sender-based logging requires): no other process may depend on a delivery whose
//!   determinant could be lost with this rank's node. So before a message leaves:
//!   - to a rank on **this node** (ranks are placed in blocks of `KRUN_LOCAL_SIZE`; it dies
//!     with this rank): it waits until every determinant posted is durable at the buddy
//!     ([`Logger::flush`]);
//!   - to a rank on **another node**: no wait. If some determinants are not yet durable
//!     (their writes not complete), the message **carries them** (a *piggyback*: the
//!     payload is prefixed with `durable_upto` and those determinants, and the wire tag's
//!     marker says so, see [`crate::messages`]). The receiver holds them per source
//!     (`held[src]`): one node lost cannot take both this rank and a receiver on another
//!     node, so a receiver holding them is as good as the buddy. `durable_upto` (every
//!     order below it is durable at the buddy, as the writes' completions say at the send)
//!     lets the receiver drop what it holds; a message after the last piggyback carries
//!     just the mark (12 bytes) when the receiver may still hold something, so held
//!     determinants go with the next message. A message that would not fit in one fabric
//!     message with its piggyback waits as a same-node send does. Messages with nothing to
//!     carry keep the plain, zero-copy path.
//!
//!   A checkpoint ([`Rank::log_mark_checkpoint`]) and the end of logging wait for
//!   durability too. A rank lost with determinants neither durable nor carried sent
//!   nothing after those deliveries: its re-execution may take them in another order,
//!   which nobody observed. Waiting for the buddy's write before each send cost 2.3x of the
//!   small-message latency (`bench logging`, one more round trip per ping-pong step), and
//!   waiting at each delivery cost +151% of `heat_ha`'s loop in `bench policies`. The
//!   receiver also keeps the determinants since its newest safe checkpoint, to write them
//!   again into a new buddy's ring when its buddy is replaced.
//! - **Restart.** A lost rank starts as a new process ([`Rank::rejoin_open`], then
//!   [`Rejoining::join`]) from its own newest safe checkpoint: the application's state plus
//!   the log snapshot taken with it (send and receive counters, its own sender log). Every
//!   survivor learns its new address and ring ([`Rank::replace_peer`]: from krund in a job,
//!   from the test in-process). The new process reads its determinants back from its buddy's
//!   ring, sends every survivor `Resume{prefix, extra}` (what it had delivered from it at the
//!   checkpoint); each survivor resends from its log what the restarted rank has not
//!   delivered (no piggyback on those),
//!   and answers `Info{has, held}` (how many of the restarted rank's messages it holds
//!   without a gap, and the restarted rank's determinants it holds from piggybacks, which
//!   it then forgets). The restarted rank merges the ring's determinants with the held ones
//!   (one order, one delivery: where they differ, a survivor's copy wins, since the ring
//!   may still hold an older process's entry where the newest write never landed), takes
//!   the gap-free run of orders from its checkpoint's, and writes those the ring lacked into
//!   it. It then re-executes: each receive takes the message the
//!   next determinant names (the recorded order) until the determinants run out, and each
//!   send whose sequence number is below the receiver's `has` is logged but not sent
//!   again (suppressed). Survivors never roll back; a survivor's send to the dead rank is
//!   kept in the log and resent on `Resume`.
//! - Control messages (`Ack`, `Resume`, `Info`) travel with a reserved tag outside the
//!   sequence numbers, so logging never changes the numbering a replay must reproduce.
//!
//! # Limits
//! - A rank must restart from its *newest* safe checkpoint: the senders dropped what came
//!   before it.
//! - The ring holds [`DEFAULT_RING`] determinants (or what [`Rank::enable_logging`] asks):
//!   a rank that delivers more between two safe checkpoints gets a clear error (checkpoint
//!   more often), never a silent overwrite.
//! - Messages delivered out of per-source sequence order (different tags) are tracked as
//!   exceptions of the per-source prefix; they are never garbage-collected before the
//!   prefix passes them.
//! - A rank and its buddy lost together lose the determinants: not recoverable by logging.
//! - Piggybacked determinants live in the receivers' memory only: a receiver restarted from
//!   its checkpoint forgets what it held. The sender stops carrying a determinant only
//!   once its buddy write completed, so what such a receiver lost is durable at the buddy,
//!   or its write is still in flight (or being written again after the buddy's node died):
//!   a second failure, of the sender, in that window (microseconds on a healthy buddy)
//!   loses those determinants; the failure model is one node at a time.
//! - Messages resent on a `Resume` carry no piggyback: what they depend on was posted to
//!   the buddy at least a restart earlier, durable unless that buddy was lost too and its
//!   replacement is still being written (a second failure of this rank then is outside the
//!   one-node model).
//! - A sender's determinants held by a receiver it never sends to again stay held (a
//!   bounded amount: at most what was in flight at its last send) until the sender
//!   restarts.
//! - Node placement comes from `KRUN_LOCAL_SIZE` (blocks of consecutive ranks per node, as
//!   krund places them); without it every rank counts as a node of its own.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use fabric::{Endpoint, MemoryRegion, Region, RemoteRegion};
use serde::{Deserialize, Serialize};

use crate::error::{RankError, Result};
use crate::messages::Messages;
#[cfg(doc)]
use crate::world::Rank;

/// The wire tag field value of the log's control messages (above every tag in use).
pub(crate) const LOG_CTRL_TAG: u32 = (1 << 27) - 1;
/// Determinants a ring holds by default.
pub const DEFAULT_RING: usize = 1 << 16;
const DET_BYTES: usize = 40;
/// Determinants in flight at once, each from its own slot of the 4 KiB stage; the slot
/// after them is the blocking writes'.
const STAGE_SLOTS: usize = 4096 / DET_BYTES - 1;
/// Most determinants one write carries (deliveries deferred while more messages were ready).
const MAX_BATCH: usize = 16;
/// With lazy determinant writes: the longest a queued determinant waits for a full batch
/// before a receive that waits (or a send) posts it.
const LAZY: Duration = Duration::from_micros(500);
/// How long a restarted rank waits for every survivor's `Info`.
const INFO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a delivery waits for an unreachable buddy to be replaced.
pub const BUDDY_WAIT: Duration = Duration::from_secs(60);

#[derive(Serialize, Deserialize, Debug)]
enum Ctrl {
    /// The receiver's checkpoint covering your messages below `upto` is safe.
    Ack { upto: u64 },
    /// I restarted: resend your messages from `prefix` on, except `extra`.
    Resume { prefix: u64, extra: Vec<u64> },
    /// I hold your messages below `has` (without a gap), and these determinants of yours
    /// that came piggybacked on your messages (perhaps never durable at your buddy).
    Info { has: u64, held: Vec<Determinant> },
    /// I am your ward: keep my counters where the logging started (per rank: sent to it,
    /// delivered from it), for a restart of mine from my start.
    KeepStart { marks: Vec<(u64, u64)> },
    /// I restarted from my start (lost before my first own checkpoint): the counters I
    /// gave you to keep?
    StartQuery,
    /// Your counters where the logging started (`None`: I kept none).
    StartMarks { marks: Option<Vec<(u64, u64)>> },
}

/// A delivery's determinant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Determinant {
    pub src: u32,
    pub tag: u32,
    pub seq: u64,
    pub order: u64,
    pub interval: u64,
}

impl Determinant {
    fn encode(&self) -> [u8; DET_BYTES] {
        let mut b = [0u8; DET_BYTES];
        b[0..4].copy_from_slice(&self.src.to_le_bytes());
        b[4..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        // order + 1: a zeroed slot is empty.
        b[16..24].copy_from_slice(&(self.order + 1).to_le_bytes());
        b[24..32].copy_from_slice(&self.interval.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Determinant> {
        let u = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().expect("8 bytes"));
        let order1 = u(16..24);
        (order1 > 0).then(|| Determinant {
            src: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            tag: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            seq: u(8..16),
            order: order1 - 1,
            interval: u(24..32),
        })
    }
}

/// Totals of this rank's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Messages (and payload bytes) this rank logged as a sender.
    pub logged_messages: u64,
    pub logged_bytes: u64,
    /// Payloads held now.
    pub held_messages: u64,
    pub held_bytes: u64,
    /// Dropped on receivers' acknowledgements.
    pub collected_messages: u64,
    /// Determinants written to the buddy.
    pub determinants: u64,
    /// One-sided writes that carried them (fewer when deliveries came in bursts).
    pub det_writes: u64,
    /// Messages this rank resent on a peer's `Resume`.
    pub resent_messages: u64,
    /// Sends not put on the wire during a replay (the receiver had them).
    pub suppressed_sends: u64,
    /// Deliveries taken in the recorded order after a restart.
    pub replayed_deliveries: u64,
    /// Nanoseconds spent keeping payloads (copy into the log) on sends.
    pub send_log_ns: u64,
    /// Nanoseconds spent at deliveries (posting determinants).
    pub deliver_ns: u64,
    /// Nanoseconds spent before sends waiting for determinants to be durable.
    pub durable_wait_ns: u64,
    /// Nanoseconds spent encoding log snapshots for checkpoints.
    pub snapshot_ns: u64,
    /// Sends that waited for determinants to be durable at the buddy (a send to a rank on
    /// this node, a checkpoint, the end of logging, a piggyback too large for the message).
    pub durable_waits: u64,
    /// Messages to ranks on other nodes that carried this rank's determinants not yet
    /// durable at the buddy (or only the mark up to which they are), instead of waiting.
    pub piggybacked_messages: u64,
    /// Determinants those messages carried.
    pub piggybacked_determinants: u64,
    /// Other ranks' determinants this rank holds now (piggybacked, not yet said durable).
    pub held_determinants: u64,
    /// After a restart: determinants taken from the survivors' held ones that the buddy's
    /// ring did not have.
    pub determinants_from_peers: u64,
}

/// What a checkpoint must keep of the log (see [`Rank::log_mark_checkpoint`]).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
struct Snapshot {
    send_seq: Vec<u64>,
    prefix: Vec<u64>,
    extra: Vec<Vec<u64>>,
    order: u64,
    interval: u64,
    /// (dest, seq, tag, payload)
    sent: Vec<(u32, u64, u32, Vec<u8>)>,
    /// The rank's safepoint index in the uncoordinated mode (`crate::uncoordinated`).
    safepoints: u64,
    /// Per rank: (sent to it, delivered from it) when logging started ([`Ctrl::KeepStart`]).
    start: Vec<(u64, u64)>,
    /// The ward's `start`, kept for it.
    ward_start: Option<Vec<(u64, u64)>>,
}

/// A [`Snapshot`] borrowing the log's payloads (serializes to the same bytes).
#[derive(Serialize)]
struct SnapshotRef<'a> {
    send_seq: Vec<u64>,
    prefix: Vec<u64>,
    extra: Vec<Vec<u64>>,
    order: u64,
    interval: u64,
    sent: Vec<(u32, u64, u32, &'a [u8])>,
    safepoints: u64,
    start: Vec<(u64, u64)>,
    ward_start: Option<Vec<(u64, u64)>>,
}

#[derive(Default)]
struct Inner {
    sent: BTreeMap<(usize, u64), (u32, Vec<u8>)>,
    prefix: Vec<u64>,
    extra: Vec<BTreeSet<u64>>,
    order: u64,
    interval: u64,
    /// Determinants since the newest safe checkpoint.
    recent: VecDeque<Determinant>,
    /// version -> (prefix per source, order) at that checkpoint.
    marks: BTreeMap<u64, (Vec<u64>, u64)>,
    /// Determinants below this order may be overwritten in the ring.
    safe_order: u64,
    /// After a restart: per destination, sends below are not put on the wire.
    suppress: Vec<u64>,
    /// After a restart: the deliveries to take first, in order.
    replay: VecDeque<(usize, u64)>,
    /// `Info` answers awaited after a restart.
    info: Vec<Option<u64>>,
    /// Per rank: (sent to it, delivered from it) when logging started; its buddy keeps a
    /// copy (`Ctrl::KeepStart`) for a restart of this rank from its start.
    start: Vec<(u64, u64)>,
    /// The ward's `start`, kept for it.
    ward_start: Option<Vec<(u64, u64)>>,
    /// The buddy's answer to `StartQuery` (a rank rejoining from its start).
    start_marks: Option<Option<Vec<(u64, u64)>>>,
    /// Per source: its determinants that came piggybacked, by order, until it says they
    /// are durable at its buddy (`durable_upto` of a later piggyback) or it restarts.
    held: Vec<BTreeMap<u64, Determinant>>,
    /// After a restart: the determinants the survivors held for this rank (`Info`).
    from_peers: BTreeMap<u64, Determinant>,
    /// How many of them the replay took (the buddy's ring lacked them).
    from_peers_used: u64,
}

/// One rank's log (installed in its message layer).
pub(crate) struct Logger {
    rank: usize,
    ring_len: usize,
    /// The ring this rank holds for its ward (the rank whose buddy it is).
    ring_local: MemoryRegion,
    /// The buddy holding this rank's determinants, and its ring.
    buddy: RwLock<(usize, RemoteRegion)>,
    stage: Mutex<MemoryRegion>,
    /// Determinants on their way to the buddy ([`dets`]).
    dets: Mutex<dets::DetQueue>,
    /// Per destination: the order after the newest determinant piggybacked to it, and the
    /// `durable_upto` it was last told ([`Logger::piggyback`]).
    piggy_marks: Mutex<(Vec<u64>, Vec<u64>)>,
    /// How many determinants wait unposted (read without the lock by receives).
    deferred: std::sync::atomic::AtomicUsize,
    /// One delivery at a time (each takes the next receive order).
    delivering: Mutex<()>,
    /// Held from a piggyback's making until its message is on the wire: what a message
    /// leaves out (the receiver holds it already) went in an earlier message from this
    /// rank, even with several threads sending.
    pub(crate) wire: Mutex<()>,
    inner: Mutex<Inner>,
    info_changed: Condvar,
    /// Ranks per node (`KRUN_LOCAL_SIZE`, ranks placed in blocks): a send to a rank of this
    /// node waits for durability, one to another node piggybacks.
    node_size: AtomicUsize,
    /// Lazy determinant writes (`KRUN_LOG_LAZY=1`: [`LAZY`]), in nanoseconds, 0 when off:
    /// posted by batches of [`MAX_BATCH`] or once the oldest waited this long, not at each
    /// delivery (see [`dets`]).
    lazy_ns: AtomicU64,
    stats: [AtomicU64; 17],
}

const S_LOGGED: usize = 0;
const S_LOGGED_BYTES: usize = 1;
const S_COLLECTED: usize = 2;
const S_DETS: usize = 3;
const S_RESENT: usize = 4;
const S_SUPPRESSED: usize = 5;
const S_REPLAYED: usize = 6;
const T_SEND_LOG: usize = 7;
const T_DELIVER: usize = 8;
const T_DURABLE_WAIT: usize = 9;
const T_SNAPSHOT: usize = 10;
/// Flushes that found a determinant write not yet complete (and so waited).
const S_FLUSH_BLOCKED: usize = 11;
/// Nanoseconds inside the endpoint's `post_write` for determinants.
const T_POST: usize = 12;
/// Flushes that had determinants to make durable.
const S_FLUSHES: usize = 13;
/// Determinant writes posted (several determinants each when deliveries came in a burst).
const S_WRITES: usize = 14;
/// Messages that carried determinants (or a durability mark) to another node.
const S_PIGGYBACKS: usize = 15;
/// Determinants they carried.
const S_PIGGY_DETS: usize = 16;

/// Ranks per node: `KRUN_LOCAL_SIZE` (krund places ranks in blocks of it), 1 without it (or
/// when it covers the whole job: then the buddy is the next rank, as if each were alone).
fn node_size(size: usize) -> usize {
    std::env::var("KRUN_LOCAL_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&s| s >= 1 && s < size)
        .unwrap_or(1)
}

fn buddy_of(rank: usize, size: usize) -> usize {
    (rank + node_size(size)) % size
}

impl Logger {
    fn new(
        rank: usize,
        size: usize,
        ring_local: MemoryRegion,
        ring_len: usize,
        ep: &dyn Endpoint,
    ) -> Result<Logger> {
        Ok(Logger {
            rank,
            ring_len,
            ring_local,
            buddy: RwLock::new((
                rank,
                RemoteRegion {
                    addr: 0,
                    key: 0,
                    len: 0,
                },
            )),
            stage: Mutex::new(ep.register(Region::new(4096)?)?),
            dets: Mutex::new(dets::DetQueue::new()),
            piggy_marks: Mutex::new((vec![0; size], vec![0; size])),
            deferred: Default::default(),
            delivering: Mutex::new(()),
            wire: Mutex::new(()),
            inner: Mutex::new(Inner {
                prefix: vec![0; size],
                extra: vec![BTreeSet::new(); size],
                suppress: vec![0; size],
                info: vec![None; size],
                held: vec![BTreeMap::new(); size],
                ..Inner::default()
            }),
            info_changed: Condvar::new(),
            node_size: AtomicUsize::new(node_size(size)),
            lazy_ns: AtomicU64::new(if crate::uncoordinated::env_flag("KRUN_LOG_LAZY")? {
                LAZY.as_nanos() as u64
            } else {
                0
            }),
            stats: Default::default(),
        })
    }

    fn bump(&self, i: usize, n: u64) {
        self.stats[i].fetch_add(n, Ordering::Relaxed);
    }

    fn time_since(&self, i: usize, t0: Instant) {
        self.bump(i, t0.elapsed().as_nanos() as u64);
    }

    /// A send: keep the payload; false if it must not go on the wire (a replay's send the
    /// receiver already holds).
    pub(crate) fn on_send(&self, dest: usize, tag: u32, seq: u64, data: &[u8]) -> bool {
        if dest == self.rank {
            return true;
        }
        let t0 = Instant::now();
        // The copy outside the lock: a control message handled meanwhile is not held up.
        let payload = data.to_vec();
        let suppressed = {
            let mut g = self.inner.lock().expect("log lock");
            g.sent.insert((dest, seq), (tag, payload));
            seq < g.suppress[dest]
        };
        self.time_since(T_SEND_LOG, t0);
        self.bump(S_LOGGED, 1);
        self.bump(S_LOGGED_BYTES, data.len() as u64);
        if suppressed {
            self.bump(S_SUPPRESSED, 1);
            return false;
        }
        true
    }

    /// The delivery the recorded order asks for next, if replaying.
    pub(crate) fn replay_front(&self) -> Option<(usize, u64)> {
        self.inner.lock().expect("log lock").replay.front().copied()
    }

    /// Posts the determinant of a delivery to the buddy, then counts it delivered; it is
    /// durable before this rank's next send ([`Logger::flush`]). `defer`: another message
    /// is ready to be received, so the determinant waits to go with the next ones in one
    /// write ([`Logger::queue_det`]). When the post fails (the buddy unreachable: its node
    /// died) the delivery waits, up to [`BUDDY_WAIT`], for the buddy to be replaced
    /// ([`Rank::replace_peer`]).
    pub(crate) fn before_deliver(
        &self,
        msgs: &Messages,
        src: usize,
        tag: u32,
        seq: u64,
        defer: bool,
    ) -> Result<()> {
        let t0 = Instant::now();
        let _one = self.delivering.lock().expect("deliver lock");
        let det = {
            let g = self.inner.lock().expect("log lock");
            if g.order - g.safe_order >= self.ring_len as u64 {
                return Err(RankError::Protocol {
                    rank: self.rank,
                    reason: format!(
                        "message log: {} deliveries since the newest safe checkpoint fill the \
                         buddy's determinant ring ({} entries): checkpoint more often",
                        g.order - g.safe_order,
                        self.ring_len
                    ),
                });
            }
            Determinant {
                src: src as u32,
                tag,
                seq,
                order: g.order,
                interval: g.interval,
            }
        };
        self.queue_det(msgs, det, defer)?;
        let mut g = self.inner.lock().expect("log lock");
        g.order += 1;
        g.recent.push_back(det);
        if g.replay.front() == Some(&(src, seq)) {
            g.replay.pop_front();
            self.bump(S_REPLAYED, 1);
        }
        if seq == g.prefix[src] {
            g.prefix[src] += 1;
            loop {
                let next = g.prefix[src];
                if !g.extra[src].remove(&next) {
                    break;
                }
                g.prefix[src] += 1;
            }
        } else {
            g.extra[src].insert(seq);
        }
        self.bump(S_DETS, 1);
        drop(g);
        self.time_since(T_DELIVER, t0);
        Ok(())
    }

    /// Whether `dest` runs on this rank's node (ranks in blocks of the node size).
    pub(crate) fn same_node(&self, dest: usize) -> bool {
        let n = self.node_size.load(Ordering::Relaxed).max(1);
        dest / n == self.rank / n
    }

    /// `src`'s determinants that came piggybacked on one of its messages: held until `src`
    /// says they are durable at its buddy (every order below `durable_upto` is).
    pub(crate) fn on_piggyback(&self, src: usize, durable_upto: u64, dets: Vec<Determinant>) {
        let mut g = self.inner.lock().expect("log lock");
        let held = &mut g.held[src];
        *held = held.split_off(&durable_upto);
        for d in dets.into_iter().filter(|d| d.order >= durable_upto) {
            held.insert(d.order, d);
        }
    }

    /// A control message from `src`.
    pub(crate) fn on_control(&self, msgs: &Messages, src: usize, data: &[u8]) {
        let Ok(ctrl) = postcard::from_bytes::<Ctrl>(data) else {
            eprintln!(
                "krun rank {}: malformed message-log control from rank {src}",
                self.rank
            );
            return;
        };
        match ctrl {
            Ctrl::Ack { upto } => {
                let mut g = self.inner.lock().expect("log lock");
                let before = g.sent.len();
                g.sent.retain(|&(d, s), _| d != src || s >= upto);
                self.bump(S_COLLECTED, (before - g.sent.len()) as u64);
            }
            Ctrl::Resume { prefix, extra } => {
                // The resent messages carry no piggyback, and this does not wait for the
                // buddy either: when this rank's buddy was lost with the restarted rank, its
                // replacement may come only after this restart (waiting here held up both
                // rejoins). What they depend on was posted at least a restart ago.
                let resend: Vec<(u64, u32, Vec<u8>)> = {
                    let g = self.inner.lock().expect("log lock");
                    g.sent
                        .range((src, prefix)..(src + 1, 0))
                        .filter(|((_, s), _)| !extra.contains(s))
                        .map(|((_, s), (t, d))| (*s, *t, d.clone()))
                        .collect()
                };
                for (seq, tag, data) in resend {
                    if let Err(e) = msgs.put_on_wire(src, tag, seq, &data) {
                        eprintln!("krun rank {}: resending to rank {src}: {e}", self.rank);
                        return;
                    }
                    self.bump(S_RESENT, 1);
                }
                let has = msgs.contiguous_from(src);
                // Its old process's piggybacked determinants go back to it; its new process
                // starts with nothing piggybacked here either way.
                let held: Vec<Determinant> = {
                    let mut g = self.inner.lock().expect("log lock");
                    std::mem::take(&mut g.held[src]).into_values().collect()
                };
                self.forget_piggybacks_to(src);
                let _ = msgs.control(
                    src,
                    &postcard::to_stdvec(&Ctrl::Info { has, held }).unwrap_or_default(),
                );
            }
            Ctrl::Info { has, held } => {
                let mut g = self.inner.lock().expect("log lock");
                for d in held {
                    g.from_peers.insert(d.order, d);
                }
                g.info[src] = Some(has);
                g.suppress[src] = has;
                self.info_changed.notify_all();
            }
            Ctrl::KeepStart { marks } => {
                self.inner.lock().expect("log lock").ward_start = Some(marks);
            }
            Ctrl::StartQuery => {
                let marks = self.inner.lock().expect("log lock").ward_start.clone();
                if marks.is_none() {
                    eprintln!(
                        "krun rank {}: rank {src} rejoins from its start, but this rank (its \
                         buddy) kept no counters of its logging's start",
                        self.rank
                    );
                }
                let _ = msgs.control(
                    src,
                    &postcard::to_stdvec(&Ctrl::StartMarks { marks }).unwrap_or_default(),
                );
            }
            Ctrl::StartMarks { marks } => {
                self.inner.lock().expect("log lock").start_marks = Some(marks);
                self.info_changed.notify_all();
            }
        }
    }

    /// The log's totals when it ends, one line on stderr (krun forwards it; `bench
    /// policies` sums the ranks' lines into the messages and bytes logged per run).
    pub(crate) fn report_totals(&self) {
        let s = self.stats();
        eprintln!(
            "krun: rank {}: message log: {} messages logged ({} bytes); {} sends carried {} \
             determinants to other nodes; {} waited for the buddy",
            self.rank,
            s.logged_messages,
            s.logged_bytes,
            s.piggybacked_messages,
            s.piggybacked_determinants,
            s.durable_waits,
        );
    }

    /// With `KRUN_LOG_TIMING=1`: where this rank's logging time went, on stderr.
    pub(crate) fn report_timing(&self) {
        if !crate::uncoordinated::env_flag("KRUN_LOG_TIMING").unwrap_or(false) {
            return;
        }
        let s = self.stats();
        let ms = |ns: u64| ns as f64 / 1e6;
        eprintln!(
            "krun: rank {} log timing: {} sends ({} bytes) kept in {:.1} ms; {} deliveries \
             ({} writes) posted in {:.1} ms; {:.1} ms waiting for determinants before sends; snapshots \
             encoded in {:.1} ms; {:.1} ms inside post_write; {} of {} flushes found a write \
             in flight",
            self.rank,
            s.logged_messages,
            s.logged_bytes,
            ms(s.send_log_ns),
            s.determinants,
            s.det_writes,
            ms(s.deliver_ns),
            ms(s.durable_wait_ns),
            ms(s.snapshot_ns),
            ms(self.stats[T_POST].load(Ordering::Relaxed)),
            self.stats[S_FLUSH_BLOCKED].load(Ordering::Relaxed),
            self.stats[S_FLUSHES].load(Ordering::Relaxed),
        );
    }

    fn stats(&self) -> LogStats {
        let g = self.inner.lock().expect("log lock");
        let s = |i: usize| self.stats[i].load(Ordering::Relaxed);
        LogStats {
            logged_messages: s(S_LOGGED),
            logged_bytes: s(S_LOGGED_BYTES),
            held_messages: g.sent.len() as u64,
            held_bytes: g.sent.values().map(|v| v.1.len() as u64).sum(),
            collected_messages: s(S_COLLECTED),
            determinants: s(S_DETS),
            det_writes: s(S_WRITES),
            resent_messages: s(S_RESENT),
            suppressed_sends: s(S_SUPPRESSED),
            replayed_deliveries: s(S_REPLAYED),
            send_log_ns: s(T_SEND_LOG),
            deliver_ns: s(T_DELIVER),
            durable_wait_ns: s(T_DURABLE_WAIT),
            snapshot_ns: s(T_SNAPSHOT),
            durable_waits: s(S_FLUSHES),
            piggybacked_messages: s(S_PIGGYBACKS),
            piggybacked_determinants: s(S_PIGGY_DETS),
            held_determinants: g.held.iter().map(|h| h.len() as u64).sum(),
            determinants_from_peers: g.from_peers_used,
        }
    }
}

mod api;
mod dets;
mod rejoin;
pub(crate) use dets::parse_piggyback;
pub use rejoin::Rejoining;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn determinants_round_trip_and_an_empty_slot_is_none() {
        let d = Determinant {
            src: 3,
            tag: 7,
            seq: 1 << 40,
            order: 0,
            interval: 9,
        };
        assert_eq!(Determinant::decode(&d.encode()), Some(d));
        assert_eq!(Determinant::decode(&[0u8; DET_BYTES]), None);
    }

    #[test]
    fn control_messages_round_trip() {
        let c = Ctrl::Resume {
            prefix: 5,
            extra: vec![7, 9],
        };
        let back: Ctrl = postcard::from_bytes(&postcard::to_stdvec(&c).unwrap()).unwrap();
        assert!(matches!(back, Ctrl::Resume { prefix: 5, ref extra } if extra == &[7, 9]));
    }

    #[test]
    fn a_borrowed_snapshot_encodes_as_the_owned_one() {
        let payload = vec![1u8, 2, 3, 250];
        let owned = Snapshot {
            send_seq: vec![4, 5],
            prefix: vec![1, 0],
            extra: vec![vec![3], vec![]],
            order: 9,
            interval: 2,
            sent: vec![(1, 4, 7, payload.clone())],
            safepoints: 11,
            start: vec![(2, 3), (0, 0)],
            ward_start: Some(vec![(1, 1), (5, 6)]),
        };
        let borrowed = SnapshotRef {
            send_seq: vec![4, 5],
            prefix: vec![1, 0],
            extra: vec![vec![3], vec![]],
            order: 9,
            interval: 2,
            sent: vec![(1, 4, 7, payload.as_slice())],
            safepoints: 11,
            start: vec![(2, 3), (0, 0)],
            ward_start: Some(vec![(1, 1), (5, 6)]),
        };
        let bytes = postcard::to_stdvec(&borrowed).unwrap();
        assert_eq!(bytes, postcard::to_stdvec(&owned).unwrap());
        let back: Snapshot = postcard::from_bytes(&bytes).unwrap();
        assert_eq!((back.sent[0].3.clone(), back.safepoints), (payload, 11));
        assert_eq!(back.start, vec![(2, 3), (0, 0)]);
        assert_eq!(back.ward_start, Some(vec![(1, 1), (5, 6)]));
    }
}
