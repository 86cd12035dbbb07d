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
//! - **Determinants go to the buddy first.** Before a receive call hands a message over, the
//!   receiver writes its determinant (source, tag, sequence number, receive order, its
//!   checkpoint interval) by a one-sided RMA write into a ring that its *buddy* (a rank on
//!   another node: `(rank + KRUN_LOCAL_SIZE) mod size`) registered for it, and waits for the
//!   write to complete: the delivery is durable off the receiver's node before it happens
//!   (pessimistic). The receiver also keeps the determinants since its newest safe
//!   checkpoint, to write them again into a new buddy's ring when its buddy is replaced.
//! - **Restart.** A lost rank starts as a new process ([`Rank::rejoin_open`], then
//!   [`Rejoining::join`]) from its own newest safe checkpoint: the application's state plus
//!   the log snapshot taken with it (send and receive counters, its own sender log). Every
//!   survivor learns its new address and ring ([`Rank::replace_peer`]: from krund in a job,
//!   from the test in-process). The new process reads its determinants back from its buddy's
//!   ring, sends every survivor `Resume{prefix, extra}` (what it had delivered from it at the
//!   checkpoint); each survivor resends from its log what the restarted rank has not
//!   delivered, and answers `Info{has}` (how many of the restarted rank's messages it holds
//!   without a gap). The restarted rank then re-executes: each receive takes the message the
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
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use fabric::{Endpoint, EndpointAddress, MemoryRegion, Region, RemoteRegion};
use serde::{Deserialize, Serialize};

use crate::error::{RankError, Result};
use crate::messages::Messages;
use crate::world::{Config, Rank};

/// The wire tag field value of the log's control messages (above every tag in use).
pub(crate) const LOG_CTRL_TAG: u32 = (1 << 27) - 1;
/// Determinants a ring holds by default.
pub const DEFAULT_RING: usize = 1 << 16;
const DET_BYTES: usize = 40;
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
    /// I hold your messages below `has` (without a gap).
    Info { has: u64 },
}

/// A delivery's determinant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Messages this rank resent on a peer's `Resume`.
    pub resent_messages: u64,
    /// Sends not put on the wire during a replay (the receiver had them).
    pub suppressed_sends: u64,
    /// Deliveries taken in the recorded order after a restart.
    pub replayed_deliveries: u64,
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
    /// One delivery at a time (each takes the next receive order).
    delivering: Mutex<()>,
    inner: Mutex<Inner>,
    info_changed: Condvar,
    stats: [AtomicU64; 7],
}

const S_LOGGED: usize = 0;
const S_LOGGED_BYTES: usize = 1;
const S_COLLECTED: usize = 2;
const S_DETS: usize = 3;
const S_RESENT: usize = 4;
const S_SUPPRESSED: usize = 5;
const S_REPLAYED: usize = 6;

fn buddy_of(rank: usize, size: usize) -> usize {
    let stride = std::env::var("KRUN_LOCAL_SIZE")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&s| s >= 1 && s < size)
        .unwrap_or(1);
    (rank + stride) % size
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
            delivering: Mutex::new(()),
            inner: Mutex::new(Inner {
                prefix: vec![0; size],
                extra: vec![BTreeSet::new(); size],
                suppress: vec![0; size],
                info: vec![None; size],
                ..Inner::default()
            }),
            info_changed: Condvar::new(),
            stats: Default::default(),
        })
    }

    fn bump(&self, i: usize, n: u64) {
        self.stats[i].fetch_add(n, Ordering::Relaxed);
    }

    /// A send: keep the payload; false if it must not go on the wire (a replay's send the
    /// receiver already holds).
    pub(crate) fn on_send(&self, dest: usize, tag: u32, seq: u64, data: &[u8]) -> bool {
        if dest == self.rank {
            return true;
        }
        let mut g = self.inner.lock().expect("log lock");
        g.sent.insert((dest, seq), (tag, data.to_vec()));
        self.bump(S_LOGGED, 1);
        self.bump(S_LOGGED_BYTES, data.len() as u64);
        if seq < g.suppress[dest] {
            self.bump(S_SUPPRESSED, 1);
            return false;
        }
        true
    }

    /// The delivery the recorded order asks for next, if replaying.
    pub(crate) fn replay_front(&self) -> Option<(usize, u64)> {
        self.inner.lock().expect("log lock").replay.front().copied()
    }

    /// Makes the determinant of a delivery durable at the buddy, then counts it delivered.
    /// While the buddy is unreachable (its node died) the delivery waits, up to
    /// [`BUDDY_WAIT`], for the buddy to be replaced ([`Rank::replace_peer`]).
    pub(crate) fn before_deliver(
        &self,
        msgs: &Messages,
        src: usize,
        tag: u32,
        seq: u64,
    ) -> Result<()> {
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
        let deadline = Instant::now() + BUDDY_WAIT;
        loop {
            match self.write_det(msgs, &det) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(RankError::Protocol {
                        rank: self.buddy.read().expect("buddy lock").0,
                        reason: format!(
                            "message log: the determinant of delivery {} could not be made \
                             durable at the buddy within {BUDDY_WAIT:?}: {e}",
                            det.order
                        ),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
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
        Ok(())
    }

    fn write_det(&self, msgs: &Messages, det: &Determinant) -> Result<()> {
        let (buddy, remote, peer) = {
            let b = self.buddy.read().expect("buddy lock");
            (b.0, b.1, msgs.peer(b.0))
        };
        if buddy == self.rank {
            return Ok(()); // a job of one: nowhere else to keep it
        }
        let stage = self.stage.lock().expect("stage lock");
        stage.write_bytes(0, &det.encode())?;
        let off = (det.order % self.ring_len as u64) * DET_BYTES as u64;
        // SAFETY: the stage is written only under its lock, held for this blocking write;
        // the buddy's ring slot is written by this rank only.
        unsafe {
            msgs.endpoint()
                .write(peer, &stage, 0, DET_BYTES, &remote, off)?
        };
        Ok(())
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
                let _ = msgs.control(
                    src,
                    &postcard::to_stdvec(&Ctrl::Info { has }).unwrap_or_default(),
                );
            }
            Ctrl::Info { has } => {
                let mut g = self.inner.lock().expect("log lock");
                g.info[src] = Some(has);
                g.suppress[src] = has;
                self.info_changed.notify_all();
            }
        }
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
            resent_messages: s(S_RESENT),
            suppressed_sends: s(S_SUPPRESSED),
            replayed_deliveries: s(S_REPLAYED),
        }
    }
}

/// A restarted rank between opening its endpoint and rejoining the job.
pub struct Rejoining {
    config: Config,
    ep: Arc<dyn Endpoint>,
    ring: MemoryRegion,
    ring_len: usize,
}

impl Rejoining {
    /// This process's fabric address: every survivor passes it to [`Rank::replace_peer`].
    pub fn address(&self) -> Vec<u8> {
        self.ep.address().to_bytes()
    }

    /// The ring this process holds for its ward, for [`Rank::replace_peer`].
    pub fn ring(&self) -> Vec<u8> {
        self.ring.remote().to_bytes().to_vec()
    }

    /// Rejoins the job once every survivor replaced this rank's address: `peers[r]` is rank
    /// r's (address, ring) (this rank's own entry is ignored); `snapshot` is what
    /// [`Rank::log_mark_checkpoint`] returned at the checkpoint the application restored.
    /// Reads the determinants back from the buddy, asks every survivor to resend, and returns
    /// once every survivor said what it holds: the rank then re-executes from the
    /// checkpoint, its receives following the recorded order.
    pub fn join(self, peers: &[(Vec<u8>, Vec<u8>)], snapshot: &[u8]) -> Result<Arc<Rank>> {
        self.join_with(peers, snapshot, None, None)
    }

    /// As [`Rejoining::join`], for a restarted rank of a krun job: the rank keeps the
    /// checkpointer that restored it (`ckpt`) and its node link (`crate::uncoordinated`).
    pub(crate) fn join_with(
        self,
        peers: &[(Vec<u8>, Vec<u8>)],
        snapshot: &[u8],
        ckpt: Option<crate::checkpoint::Checkpoints>,
        node: Option<crate::node_link::NodeLink>,
    ) -> Result<Arc<Rank>> {
        let (rank, size) = (self.config.rank, self.config.size);
        if peers.len() != size {
            return Err(RankError::InvalidArgument(format!(
                "rejoin: {} peer addresses for a job of {size}",
                peers.len()
            )));
        }
        let snap: Snapshot = postcard::from_bytes(snapshot).map_err(|e| {
            RankError::InvalidArgument(format!("rejoin: the log snapshot does not decode: {e}"))
        })?;
        if snap.send_seq.len() != size || snap.prefix.len() != size || snap.extra.len() != size {
            return Err(RankError::InvalidArgument(format!(
                "rejoin: the log snapshot is for a job of {} ranks, not {size}",
                snap.send_seq.len()
            )));
        }
        let mut ids = Vec::with_capacity(size);
        for (r, (addr, _)) in peers.iter().enumerate() {
            let a = if r == rank {
                self.ep.address()
            } else {
                EndpointAddress::from_bytes(addr)?
            };
            ids.push(self.ep.connect(&a)?);
        }
        let msgs = Messages::new(self.ep.clone(), rank, ids, self.config.fabric.max_message);
        msgs.restore_counters(&snap.send_seq, &snap.prefix, &snap.extra);
        crate::uncoordinated::set_safepoint_index(snap.safepoints);
        let logger = Logger::new(
            rank,
            size,
            self.ring.clone(),
            self.ring_len,
            self.ep.as_ref(),
        )?;
        let buddy = buddy_of(rank, size);
        let remote = RemoteRegion::from_bytes(&peers[buddy].1)?;
        *logger.buddy.write().expect("buddy lock") = (buddy, remote);
        {
            let mut g = logger.inner.lock().expect("log lock");
            g.prefix = snap.prefix.clone();
            g.extra = snap
                .extra
                .iter()
                .map(|v| v.iter().copied().collect())
                .collect();
            g.order = snap.order;
            g.safe_order = snap.order;
            g.interval = snap.interval;
            g.sent = snap
                .sent
                .iter()
                .map(|(d, s, t, p)| ((*d as usize, *s), (*t, p.clone())))
                .collect();
        }
        // The determinants after the checkpoint, from the buddy's ring.
        if buddy != rank {
            let len = self.ring_len * DET_BYTES;
            let buf = self.ep.register(Region::new(len)?)?;
            // SAFETY: `buf` is this call's own registered memory; the ring is written only
            // by this rank, which is not running.
            unsafe {
                self.ep
                    .read(ids_peer(&msgs, buddy), &buf, 0, len, &remote, 0)?
            };
            let mut bytes = vec![0u8; len];
            buf.read_bytes(0, &mut bytes)?;
            let mut g = logger.inner.lock().expect("log lock");
            let mut order = snap.order;
            loop {
                let at = (order % self.ring_len as u64) as usize * DET_BYTES;
                match Determinant::decode(&bytes[at..at + DET_BYTES]) {
                    Some(d) if d.order == order => {
                        g.replay.push_back((d.src as usize, d.seq));
                        g.recent.push_back(d);
                        order += 1;
                    }
                    _ => break,
                }
                if order - snap.order >= self.ring_len as u64 {
                    break;
                }
            }
        }
        let logger = Arc::new(logger);
        msgs.set_logger(Some(logger.clone()));
        let this = Rank::assemble(self.config, self.ep, msgs, ckpt, node)?;
        // Every survivor resends what this rank had not delivered, and says what it holds.
        for r in (0..size).filter(|&r| r != rank) {
            let ctrl = Ctrl::Resume {
                prefix: snap.prefix[r],
                extra: snap.extra[r].clone(),
            };
            this.msgs
                .control(r, &postcard::to_stdvec(&ctrl).unwrap_or_default())?;
        }
        let deadline = Instant::now() + INFO_TIMEOUT;
        loop {
            {
                let g = logger.inner.lock().expect("log lock");
                let missing: Vec<usize> = (0..size)
                    .filter(|&r| r != rank && g.info[r].is_none())
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(RankError::Protocol {
                        rank: missing[0],
                        reason: format!(
                            "rejoin: ranks {missing:?} did not answer within {INFO_TIMEOUT:?}"
                        ),
                    });
                }
            }
            this.msgs.poll()?;
        }
        Ok(this)
    }
}

fn ids_peer(msgs: &Messages, r: usize) -> fabric::PeerId {
    msgs.peer(r)
}

impl Rank {
    /// Collective: turns on sender-based pessimistic logging (see the module doc). `ring`:
    /// determinants the buddy keeps for this rank (0: [`DEFAULT_RING`]).
    pub fn enable_logging(&self, ring: usize) -> Result<()> {
        let ring_len = if ring == 0 { DEFAULT_RING } else { ring };
        let local = self.register(ring_len * DET_BYTES)?;
        let logger = Logger::new(
            self.rank(),
            self.size(),
            local.clone(),
            ring_len,
            self.ep.as_ref(),
        )?;
        let rings = self.allgather(&local.remote().to_bytes())?;
        let buddy = buddy_of(self.rank(), self.size());
        let remote = RemoteRegion::from_bytes(&rings[buddy])?;
        *logger.buddy.write().expect("buddy lock") = (buddy, remote);
        // Nobody delivers before everyone logs.
        self.barrier()?;
        // What was delivered before is below the log's prefix.
        logger.inner.lock().expect("log lock").prefix = self.msgs.delivered_counts();
        self.msgs.set_logger(Some(Arc::new(logger)));
        self.barrier()
    }

    fn logger(&self) -> Result<Arc<Logger>> {
        self.msgs.logger().ok_or_else(|| {
            RankError::InvalidArgument(
                "message logging is not enabled (Rank::enable_logging)".into(),
            )
        })
    }

    /// This rank's checkpoint `version` is being taken: returns the log snapshot to keep
    /// with it (counters, and the payloads this rank holds as a sender). Call where the
    /// application's state is captured, with no receive or send in between.
    pub fn log_mark_checkpoint(&self, version: u64) -> Result<Vec<u8>> {
        let lg = self.logger()?;
        let send_seq = self.msgs.send_counters();
        let mut g = lg.inner.lock().expect("log lock");
        g.interval = version;
        let mark = (g.prefix.clone(), g.order);
        g.marks.insert(version, mark);
        let snap = Snapshot {
            send_seq,
            prefix: g.prefix.clone(),
            extra: g
                .extra
                .iter()
                .map(|s| s.iter().copied().collect())
                .collect(),
            order: g.order,
            interval: version,
            sent: g
                .sent
                .iter()
                .map(|((d, s), (t, p))| (*d as u32, *s, *t, p.clone()))
                .collect(),
            safepoints: crate::uncoordinated::safepoint_index(),
        };
        postcard::to_stdvec(&snap).map_err(|e| RankError::InvalidArgument(e.to_string()))
    }

    /// This rank's checkpoint `version` is safe (the policy's `TrimLog`): its senders drop
    /// what it delivered before it, and older determinants may be overwritten.
    pub fn log_checkpoint_safe(&self, version: u64) -> Result<()> {
        let lg = self.logger()?;
        let (prefix, order) = {
            let mut g = lg.inner.lock().expect("log lock");
            let Some(mark) = g.marks.get(&version).cloned() else {
                return Err(RankError::InvalidArgument(format!(
                    "message log: checkpoint {version} was never marked"
                )));
            };
            g.marks = g.marks.split_off(&(version + 1));
            g.safe_order = g.safe_order.max(mark.1);
            let drop_upto = mark.1;
            while g.recent.front().is_some_and(|d| d.order < drop_upto) {
                g.recent.pop_front();
            }
            mark
        };
        let _ = order;
        for (src, upto) in prefix.into_iter().enumerate() {
            if src != self.rank() && upto > 0 {
                let ctrl = postcard::to_stdvec(&Ctrl::Ack { upto }).unwrap_or_default();
                // A sender that is gone keeps its checkpointed log; it is trimmed by the
                // next acknowledgement after it rejoins.
                let _ = self.msgs.control(src, &ctrl);
            }
        }
        Ok(())
    }

    /// This rank's fabric address and the ring it holds for its ward: what a restarted rank
    /// needs of it to [`Rejoining::join`].
    pub fn rejoin_card(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let lg = self.logger()?;
        Ok((
            self.ep.address().to_bytes(),
            lg.ring_local.remote().to_bytes().to_vec(),
        ))
    }

    /// Deliveries still to take in the recorded order (after a rejoin; 0 otherwise).
    pub fn log_replay_pending(&self) -> usize {
        self.msgs
            .logger()
            .map_or(0, |l| l.inner.lock().expect("log lock").replay.len())
    }

    /// The log's totals (`None` without logging).
    pub fn log_stats(&self) -> Option<LogStats> {
        self.msgs.any_logger().map(|l| l.stats())
    }

    /// Rank `rank` restarted as a new process with `address` and `ring` (see
    /// [`Rejoining`]): messages go there from now on; if it is this rank's buddy, the
    /// determinants since the newest safe checkpoint are written into its new ring.
    pub fn replace_peer(&self, rank: usize, address: &[u8], ring: &[u8]) -> Result<()> {
        self.msgs.check_rank(rank as i64)?;
        let peer = self.ep.connect(&EndpointAddress::from_bytes(address)?)?;
        let ring = RemoteRegion::from_bytes(ring)?;
        let old = self.msgs.peer(rank);
        let logger = self.msgs.logger();
        // The peer and, when it is this rank's buddy, its ring change together: a
        // determinant write reads both under the buddy lock ([`Logger::write_det`]), so it
        // never writes the new process with the old ring's key.
        let rewrite = match &logger {
            Some(lg) => {
                let mut b = lg.buddy.write().expect("buddy lock");
                self.msgs.replace_peer(rank, peer);
                if b.0 == rank {
                    b.1 = ring;
                }
                b.0 == rank
            }
            None => {
                self.msgs.replace_peer(rank, peer);
                false
            }
        };
        // The old process is gone: what is still in flight to it (a determinant write when
        // it was this rank's buddy, a send) fails now, and is retried towards the new one,
        // instead of waiting out the operation timeout (10 s: a delivery held the
        // determinant stage that long and the rewrite below waited for it, so rejoins took
        // 10-30 s in `bench policies`).
        if old != peer {
            self.ep
                .peer_failed(old, &format!("rank {rank} was restarted in a new process"));
        }
        if let (Some(lg), true) = (logger, rewrite) {
            let recent: Vec<Determinant> = lg
                .inner
                .lock()
                .expect("log lock")
                .recent
                .iter()
                .copied()
                .collect();
            for d in &recent {
                lg.write_det(&self.msgs, d)?;
            }
        }
        Ok(())
    }

    /// A lost rank's new process: opens its endpoint and the ring it will hold for its ward
    /// (`ring`: as given to [`Rank::enable_logging`]); [`Rejoining::join`] then rejoins.
    pub fn rejoin_open(config: Config, ring: usize) -> Result<Rejoining> {
        let ring_len = if ring == 0 { DEFAULT_RING } else { ring };
        let ep: Arc<dyn Endpoint> = Arc::from(fabric::open(&config.fabric)?);
        let ring = ep.register(Region::new(ring_len * DET_BYTES)?)?;
        Ok(Rejoining {
            config,
            ep,
            ring,
            ring_len,
        })
    }
}

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
}
