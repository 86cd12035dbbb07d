//! Two-sided messages between ranks: the ONE place every message of the library passes
//! through (user messages and the library's own: barrier rounds, window setup, wire-up).
//!
//! # Observers
//! A policy (e.g. uncoordinated checkpointing with message logging) installs an
//! [`Observer`] with [`crate::Rank::set_observer`]. Its contract:
//! - `on_send(dest, tag, seq, len)` is called exactly once per message this rank sends,
//!   before any byte of it is handed to the fabric, with the message's per-pair sequence
//!   number: the n-th message from this rank to `dest` (any tag) has `seq == n - 1`.
//! - `on_deliver(src, tag, seq, len)` is called exactly once per message this rank's caller
//!   receives, when a receive call hands it over, with the `seq` its sender's `on_send` saw.
//!   A message that is queued but never received is never delivered.
//! - For one (src, dest) pair, messages with the same tag are delivered in `seq` order
//!   (non-overtaking); messages with different tags may be delivered in any order, so
//!   `(src, seq)` — not arrival order — identifies a message for replay.
//! - Tags at or above [`INTERNAL_TAG_BASE`] are the library's own messages; they are
//!   observed too, since they also order events between ranks.
//! - Observers run on the caller's thread, must not call back into the library, and should
//!   be quick: they sit on the latency path of every message.
//!
//! # Wire form
//! The whole header travels in the fabric's 64-bit tag, so payloads are never copied to
//! prepend one: bits 60..64 a marker (`0xB`), 33..60 the tag, 12..33 the low 21 bits of the
//! sequence number, bit 11 "last fragment", 0..11 the fragment index. A message larger than
//! the fabric's message size is cut into fragments (at most [`MAX_FRAGMENTS`]). The sender
//! is known from the fabric (the endpoint token). With message logging, a message to
//! another node may carry the sender's determinants not yet durable at its buddy (see
//! [`crate::logging`]): its marker is then `0xA` and its payload starts with the
//! piggyback (`durable_upto` u64 LE, a count u32 LE, that many 40-byte determinants),
//! always in one fragment; the receiver hands the piggyback to its log and delivers the
//! rest. Every other message keeps marker `0xB` and its payload as it is (no copy).
//! The receiver rebuilds the full sequence
//! number from its per-source counter, which holds while a sender is fewer than 2^20
//! messages ahead of what its receiver has taken off the fabric.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fabric::{Endpoint, FabricError, Message, PeerId};

use crate::error::{RankError, Result};
use crate::logging::{Logger, LOG_CTRL_TAG};

/// Watches every message of the library; see the module documentation for the contract.
pub trait Observer: Send + Sync {
    fn on_send(&self, dest: usize, tag: u32, seq: u64, len: usize);
    fn on_deliver(&self, src: usize, tag: u32, seq: u64, len: usize);
}

/// Largest user tag.
pub const MAX_TAG: u32 = (1 << 26) - 1;
/// Tags from here on belong to the library itself.
pub const INTERNAL_TAG_BASE: u32 = 1 << 26;
/// Most fragments one message may have.
pub const MAX_FRAGMENTS: usize = 1 << 11;

const MARKER: u64 = 0xB << 60;
/// The marker of a message whose payload starts with a piggyback of determinants
/// ([`crate::logging`]); the receive accepts both markers (they differ in bit 60 only).
const PIGGY_MARKER: u64 = 0xA << 60;
const MARKER_MASK: u64 = 0xF << 60;
/// The bits both markers share.
const MARKERS_MASK: u64 = 0xE << 60;
const TAG_SHIFT: u32 = 33;
const TAG_MASK: u64 = (1 << 27) - 1;
const SEQ_SHIFT: u32 = 12;
const SEQ_BITS: u32 = 21;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const LAST_FRAGMENT: u64 = 1 << 11;
const FRAGMENT_MASK: u64 = (1 << 11) - 1;
/// How a receive waits: it takes messages off the fabric without blocking in it (a thread
/// blocked in the fabric's receive makes the endpoint's progress thread step aside, which
/// delays remote reads and writes targeting this rank), busy-polling for [`SPIN`] after the
/// last message (giving the core away every [`YIELD_EVERY`]th poll only: yielding on every
/// poll hands the core to any other runnable task for its whole slice, which on a loaded
/// node costs tens of microseconds per message), then napping [`NAP`] between checks.
const SPIN: Duration = Duration::from_millis(1);
const NAP: Duration = Duration::from_micros(100);
const YIELD_EVERY: u32 = 64;

fn wire_tag(tag: u32, seq: u64, fragment: usize, last: bool) -> u64 {
    MARKER
        | (tag as u64 & TAG_MASK) << TAG_SHIFT
        | (seq & SEQ_MASK) << SEQ_SHIFT
        | if last { LAST_FRAGMENT } else { 0 }
        | (fragment as u64 & FRAGMENT_MASK)
}

struct WireHeader {
    /// The payload starts with a piggyback of determinants.
    piggy: bool,
    tag: u32,
    seq_low: u64,
    fragment: usize,
    last: bool,
}

fn parse_wire_tag(t: u64) -> Option<WireHeader> {
    let marker = t & MARKER_MASK;
    (marker == MARKER || marker == PIGGY_MARKER).then_some(WireHeader {
        piggy: marker == PIGGY_MARKER,
        tag: ((t >> TAG_SHIFT) & TAG_MASK) as u32,
        seq_low: (t >> SEQ_SHIFT) & SEQ_MASK,
        fragment: (t & FRAGMENT_MASK) as usize,
        last: t & LAST_FRAGMENT != 0,
    })
}

/// Which sender a receive accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Rank(usize),
    Any,
}

/// Which tag a receive accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagMatch {
    Tag(u32),
    Any,
}

/// A message handed to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub src: usize,
    pub tag: u32,
    pub seq: u64,
    pub data: Vec<u8>,
}

/// A complete message, queued until a receive takes it.
struct Arrived {
    src: usize,
    tag: u32,
    seq: u64,
    /// One part for a single-fragment message (handed over without a copy).
    parts: Vec<Vec<u8>>,
    len: usize,
}

impl Arrived {
    fn into_data(mut self) -> Vec<u8> {
        if self.parts.len() == 1 {
            self.parts.pop().unwrap_or_default()
        } else {
            self.parts.concat()
        }
    }

    fn copy_into(&self, out: &mut [u8]) {
        let mut at = 0;
        for p in &self.parts {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
    }
}

struct Partial {
    tag: u32,
    fragments: BTreeMap<usize, Vec<u8>>,
    last: Option<usize>,
}

#[derive(Default)]
struct RecvState {
    /// Per source: the next sequence number to become receivable.
    next: Vec<u64>,
    /// Per source: sequence numbers delivered before a restart, out of order: never
    /// coming again, so skipped (message logging).
    skip: Vec<std::collections::BTreeSet<u64>>,
    /// Per source: complete messages waiting for an earlier sequence number.
    held: Vec<BTreeMap<u64, Arrived>>,
    partial: HashMap<(usize, u64), Partial>,
    /// Receivable messages; per source in sequence order.
    ready: VecDeque<Arrived>,
}

/// The message layer of one rank.
pub(crate) struct Messages {
    ep: Arc<dyn Endpoint>,
    rank: usize,
    /// Fabric peer of every rank (a restarted rank's is replaced: message logging).
    peers: RwLock<Vec<PeerId>>,
    /// Rank of every fabric peer id.
    rank_of: RwLock<Vec<Option<usize>>>,
    fragment: usize,
    send_seq: Vec<AtomicU64>,
    /// Messages delivered per source (where message logging starts counting).
    delivered: Vec<AtomicU64>,
    state: Mutex<RecvState>,
    observer: RwLock<Option<Arc<dyn Observer>>>,
    /// Sender-based message logging ([`crate::logging`]), when enabled.
    logger: RwLock<Option<Arc<Logger>>>,
    /// The logger after [`Messages::retire_logger`] (its totals, its ring kept registered).
    retired: RwLock<Option<Arc<Logger>>>,
    /// While `Some`: data messages are kept off the fabric as they came, not yet placed by
    /// sequence number (a rank rejoining from its start learns its counters from its peers
    /// first: [`Messages::hold_data`]); control messages are handled as usual.
    unplaced: Mutex<Option<Vec<Message>>>,
}

fn describe_source(s: Source) -> String {
    match s {
        Source::Rank(r) => format!("rank {r}"),
        Source::Any => "any rank".into(),
    }
}

fn describe_tag(t: TagMatch) -> String {
    match t {
        TagMatch::Tag(t) => t.to_string(),
        TagMatch::Any => "any".into(),
    }
}

impl Messages {
    /// `peers[r]` is rank r's fabric peer; `fragment` the largest fabric message.
    pub(crate) fn new(
        ep: Arc<dyn Endpoint>,
        rank: usize,
        peers: Vec<PeerId>,
        fragment: usize,
    ) -> Messages {
        let size = peers.len();
        let max_id = peers.iter().map(|p| p.0 as usize + 1).max().unwrap_or(0);
        let mut rank_of = vec![None; max_id];
        for (r, p) in peers.iter().enumerate() {
            rank_of[p.0 as usize] = Some(r);
        }
        Messages {
            ep,
            rank,
            peers: RwLock::new(peers),
            rank_of: RwLock::new(rank_of),
            fragment: fragment.max(1),
            send_seq: (0..size).map(|_| AtomicU64::new(0)).collect(),
            delivered: (0..size).map(|_| AtomicU64::new(0)).collect(),
            state: Mutex::new(RecvState {
                next: vec![0; size],
                skip: vec![Default::default(); size],
                held: (0..size).map(|_| BTreeMap::new()).collect(),
                ..Default::default()
            }),
            observer: RwLock::new(None),
            logger: RwLock::new(None),
            retired: RwLock::new(None),
            unplaced: Mutex::new(None),
        }
    }

    /// From now until [`Messages::place_held`], data messages are kept as they come: their
    /// sequence numbers are read against counters this rank does not know yet.
    pub(crate) fn hold_data(&self) {
        *self.unplaced.lock().expect("unplaced lock") = Some(Vec::new());
    }

    /// Places the data messages kept since [`Messages::hold_data`] (after
    /// [`Messages::restore_counters`]) and stops keeping them.
    pub(crate) fn place_held(&self) {
        let held = self.unplaced.lock().expect("unplaced lock").take();
        for msg in held.unwrap_or_default() {
            self.ingest(msg);
        }
    }

    pub(crate) fn size(&self) -> usize {
        self.send_seq.len()
    }

    /// The fabric peer of `rank` (checked by the caller).
    pub(crate) fn peer(&self, rank: usize) -> PeerId {
        self.peers.read().expect("peers lock")[rank]
    }

    pub(crate) fn endpoint(&self) -> &Arc<dyn Endpoint> {
        &self.ep
    }

    /// Rank `rank` now answers at `peer` (a restarted rank's new process).
    pub(crate) fn replace_peer(&self, rank: usize, peer: PeerId) {
        self.peers.write().expect("peers lock")[rank] = peer;
        let mut of = self.rank_of.write().expect("peers lock");
        let i = peer.0 as usize;
        if of.len() <= i {
            of.resize(i + 1, None);
        }
        of[i] = Some(rank);
    }

    pub(crate) fn set_logger(&self, logger: Option<Arc<Logger>>) {
        *self.logger.write().expect("logger lock") = logger;
    }

    pub(crate) fn logger(&self) -> Option<Arc<Logger>> {
        self.logger.read().expect("logger lock").clone()
    }

    /// Stops logging; the logger's ring stays registered (a ward may still write to it) and
    /// its totals readable.
    pub(crate) fn retire_logger(&self) {
        let lg = self.logger.write().expect("logger lock").take();
        if let Some(l) = &lg {
            // Best effort: what was delivered under logging is durable before the end.
            if let Err(e) = l.flush(self) {
                eprintln!("krun rank {}: message log at its end: {e}", self.rank);
            }
            l.report_totals();
            l.report_timing();
        }
        if lg.is_some() {
            *self.retired.write().expect("logger lock") = lg;
        }
    }

    /// The logger, or the retired one.
    pub(crate) fn any_logger(&self) -> Option<Arc<Logger>> {
        self.logger()
            .or_else(|| self.retired.read().expect("logger lock").clone())
    }

    /// Messages delivered from each rank so far.
    pub(crate) fn delivered_counts(&self) -> Vec<u64> {
        self.delivered
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
    }

    /// The next sequence number to each rank.
    pub(crate) fn send_counters(&self) -> Vec<u64> {
        self.send_seq
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
    }

    /// A restarted rank's counters, from its log snapshot: it sends on from `send_seq` and
    /// waits for `prefix` per source, skipping what it had delivered out of order.
    pub(crate) fn restore_counters(&self, send_seq: &[u64], prefix: &[u64], extra: &[Vec<u64>]) {
        for (c, v) in self.send_seq.iter().zip(send_seq) {
            c.store(*v, Ordering::Relaxed);
        }
        let mut st = self.state.lock().expect("message state");
        st.next = prefix.to_vec();
        st.skip = extra.iter().map(|v| v.iter().copied().collect()).collect();
        for src in 0..st.next.len() {
            Self::skip_delivered(&mut st, src);
        }
    }

    fn skip_delivered(st: &mut RecvState, src: usize) {
        loop {
            let n = st.next[src];
            if !st.skip[src].remove(&n) {
                break;
            }
            st.next[src] += 1;
        }
    }

    /// How many of `src`'s messages this rank holds without a gap (received or delivered).
    pub(crate) fn contiguous_from(&self, src: usize) -> u64 {
        self.state.lock().expect("message state").next[src]
    }

    /// Takes what waits on the fabric into the queues (control messages are handled).
    pub(crate) fn poll(&self) -> Result<bool> {
        self.pull()
    }

    /// Puts one message on the wire with its own sequence number (no new number is taken).
    pub(crate) fn put_on_wire(&self, dest: usize, tag: u32, seq: u64, data: &[u8]) -> Result<()> {
        let peer = self.peer(dest);
        let count = data.len().div_ceil(self.fragment).max(1);
        for i in 0..count {
            let chunk = &data
                [(i * self.fragment).min(data.len())..((i + 1) * self.fragment).min(data.len())];
            self.ep
                .send(peer, wire_tag(tag, seq, i, i + 1 == count), chunk)?;
        }
        Ok(())
    }

    /// A message-log control message, outside the sequence numbers.
    pub(crate) fn control(&self, dest: usize, data: &[u8]) -> Result<()> {
        self.ep
            .send(self.peer(dest), wire_tag(LOG_CTRL_TAG, 0, 0, true), data)?;
        Ok(())
    }

    pub(crate) fn largest_message(&self) -> usize {
        self.fragment.saturating_mul(MAX_FRAGMENTS)
    }

    pub(crate) fn set_observer(&self, observer: Option<Arc<dyn Observer>>) {
        *self.observer.write().expect("observer lock") = observer;
    }

    fn observer(&self) -> Option<Arc<dyn Observer>> {
        self.observer.read().expect("observer lock").clone()
    }

    pub(crate) fn check_rank(&self, rank: i64) -> Result<usize> {
        if rank < 0 || rank as u64 >= self.size() as u64 {
            return Err(RankError::NoSuchRank {
                rank,
                size: self.size(),
            });
        }
        Ok(rank as usize)
    }

    /// Sends `data` to `dest` with `tag` (user or internal); returns its sequence number.
    pub(crate) fn send(&self, dest: usize, tag: u32, data: &[u8]) -> Result<u64> {
        self.check_rank(dest as i64)?;
        if data.len() > self.largest_message() {
            return Err(RankError::MessageTooLarge {
                len: data.len(),
                max: self.largest_message(),
            });
        }
        let seq = self.send_seq[dest].fetch_add(1, Ordering::Relaxed);
        if let Some(o) = self.observer() {
            o.on_send(dest, tag, seq, data.len());
        }
        let logger = self.logger();
        let mut piggy = None;
        let mut _wire = None;
        if let Some(lg) = &logger {
            if !lg.on_send(dest, tag, seq, data) {
                return Ok(seq); // a replay's send the receiver already has
            }
            if dest != self.rank {
                // Nothing leaves that may depend on a delivery not durable at the buddy,
                // unless it carries the determinants to another node.
                if lg.same_node(dest) {
                    lg.flush(self)?;
                } else {
                    _wire = Some(lg.wire.lock().expect("wire lock"));
                    piggy = lg.piggyback(self, dest, self.fragment.saturating_sub(data.len()))?;
                }
            }
        }
        if dest == self.rank {
            let parts = vec![data.to_vec()];
            let mut st = self.state.lock().expect("message state");
            Self::complete(
                &mut st,
                Arrived {
                    src: dest,
                    tag,
                    seq,
                    parts,
                    len: data.len(),
                },
            );
            return Ok(seq);
        }
        let sent = match piggy {
            Some(mut prefix) => {
                prefix.extend_from_slice(data);
                self.ep
                    .send(
                        self.peer(dest),
                        PIGGY_MARKER | (wire_tag(tag, seq, 0, true) & !MARKER_MASK),
                        &prefix,
                    )
                    .map_err(RankError::from)
            }
            None => self.put_on_wire(dest, tag, seq, data),
        };
        match sent {
            Ok(()) => Ok(seq),
            // Logged: a dead receiver gets it again when it restarts (`Resume`).
            Err(_) if logger.is_some() => Ok(seq),
            Err(e) => Err(crate::rollback::hold(e)),
        }
    }

    /// Takes one waiting message off the fabric into the queues; false if there was none.
    /// Drives the endpoint's progress once (a zero timeout would not, and while a receive
    /// is inside the fabric its progress thread steps aside).
    fn pull(&self) -> Result<bool> {
        let msg = match self
            .ep
            .recv_masked(MARKER, !MARKERS_MASK, Duration::from_micros(1))
        {
            Ok(m) => m,
            Err(FabricError::RecvTimeout { .. }) => return Ok(false),
            // A peer's node may have died: a recovery's rollback order may be on its way.
            Err(e) => return Err(crate::rollback::hold(e.into())),
        };
        self.ingest(msg);
        Ok(true)
    }

    fn ingest(&self, msg: Message) {
        let src = msg.peer.and_then(|p| {
            self.rank_of
                .read()
                .expect("peers lock")
                .get(p.0 as usize)
                .copied()
                .flatten()
        });
        let Some(src) = src else {
            eprintln!(
                "krun rank {}: dropping a {}-byte message from an endpoint outside the job",
                self.rank,
                msg.data.len()
            );
            return;
        };
        let Some(h) = parse_wire_tag(msg.tag) else {
            return;
        };
        if h.tag == LOG_CTRL_TAG {
            if let Some(lg) = self.logger() {
                lg.on_control(self, src, &msg.data);
            }
            return;
        }
        if let Some(kept) = self.unplaced.lock().expect("unplaced lock").as_mut() {
            kept.push(msg);
            return;
        }
        let mut msg = msg;
        if h.piggy {
            // The sender's determinants first (held for it), then the message itself.
            let Some((upto, dets, at)) = crate::logging::parse_piggyback(&msg.data) else {
                eprintln!(
                    "krun rank {}: dropping a message from rank {src} with a malformed \
                     determinant piggyback",
                    self.rank
                );
                return;
            };
            if let Some(lg) = self.logger() {
                lg.on_piggyback(src, upto, dets);
            }
            msg.data.drain(..at);
        }
        let mut st = self.state.lock().expect("message state");
        let next = st.next[src];
        let ahead = h.seq_low.wrapping_sub(next) & SEQ_MASK;
        if ahead >= 1 << (SEQ_BITS - 1) {
            // Behind what this rank holds: a copy resent after a restart (message logging).
            return;
        }
        let seq = next + ahead;
        if h.fragment == 0 && h.last {
            let len = msg.data.len();
            Self::complete(
                &mut st,
                Arrived {
                    src,
                    tag: h.tag,
                    seq,
                    parts: vec![msg.data],
                    len,
                },
            );
            return;
        }
        let p = st.partial.entry((src, seq)).or_insert_with(|| Partial {
            tag: h.tag,
            fragments: BTreeMap::new(),
            last: None,
        });
        p.fragments.insert(h.fragment, msg.data);
        if h.last {
            p.last = Some(h.fragment);
        }
        if p.last.is_some_and(|l| p.fragments.len() == l + 1) {
            let p = st.partial.remove(&(src, seq)).expect("partial present");
            let parts: Vec<Vec<u8>> = p.fragments.into_values().collect();
            let len = parts.iter().map(Vec::len).sum();
            Self::complete(
                &mut st,
                Arrived {
                    src,
                    tag: p.tag,
                    seq,
                    parts,
                    len,
                },
            );
        }
    }

    /// A whole message arrived: make it receivable in per-source sequence order.
    fn complete(st: &mut RecvState, m: Arrived) {
        let src = m.src;
        if m.seq < st.next[src] {
            return; // a duplicate; cannot happen on a reliable fabric
        }
        if m.seq > st.next[src] {
            st.held[src].insert(m.seq, m);
            return;
        }
        st.ready.push_back(m);
        st.next[src] += 1;
        loop {
            Self::skip_delivered(st, src);
            let n = st.next[src];
            match st.held[src].remove(&n) {
                Some(m) => {
                    st.ready.push_back(m);
                    st.next[src] += 1;
                }
                None => break,
            }
        }
    }

    /// Waits for a message matching `from` and `tag`; `take` decides, under the queue lock,
    /// whether to take it (returning the value) or leave it queued (returning an error).
    fn wait_for<T>(
        &self,
        from: Source,
        tag: TagMatch,
        timeout: Option<Duration>,
        take: impl Fn(&Arrived) -> Result<T>,
    ) -> Result<(T, Arrived)> {
        let start = Instant::now();
        let mut idle_since = start;
        let mut polls = 0u32;
        let logger = self.logger();
        let matches = |m: &Arrived| {
            (match from {
                Source::Rank(r) => m.src == r,
                Source::Any => true,
            }) && (match tag {
                TagMatch::Tag(t) => m.tag == t,
                TagMatch::Any => m.tag < INTERNAL_TAG_BASE,
            })
        };
        loop {
            {
                let mut st = self.state.lock().expect("message state");
                // Replaying after a restart: the recorded delivery, and no other.
                let replay = logger.as_ref().and_then(|l| l.replay_front());
                let found = match replay {
                    Some((s, q)) => match st.ready.iter().position(|m| m.src == s && m.seq == q) {
                        Some(i) if !matches(&st.ready[i]) => {
                            return Err(RankError::Protocol {
                                rank: s,
                                reason: format!(
                                    "replay diverged: the recorded delivery {q} from rank {s} \
                                     (tag {}) does not match this receive (from {}, tag {})",
                                    st.ready[i].tag,
                                    describe_source(from),
                                    describe_tag(tag)
                                ),
                            })
                        }
                        found => found,
                    },
                    None => st.ready.iter().position(&matches),
                };
                if let Some(i) = found {
                    let v = take(&st.ready[i])?;
                    let m = st.ready.remove(i).expect("index from position");
                    // Another message waits: its delivery may follow at once, and the two
                    // determinants then share one write to the buddy.
                    let more = !st.ready.is_empty();
                    drop(st);
                    if let Some(lg) = &logger {
                        // Pessimistic: durable at the buddy before this rank's next send.
                        if let Err(e) = lg.before_deliver(self, m.src, m.tag, m.seq, more) {
                            self.state.lock().expect("message state").ready.insert(i, m);
                            return Err(e);
                        }
                    }
                    self.delivered[m.src].fetch_add(1, Ordering::Relaxed);
                    if let Some(o) = self.observer() {
                        o.on_deliver(m.src, m.tag, m.seq, m.len);
                    }
                    return Ok((v, m));
                }
            }
            if self.pull()? {
                idle_since = Instant::now();
                continue;
            }
            if let Some(lg) = &logger {
                // Nothing to take: determinants deferred for a burst go now, while waiting.
                lg.post_queued(self)?;
            }
            if let Some(t) = timeout {
                if start.elapsed() >= t {
                    return Err(RankError::RecvTimeout {
                        from: describe_source(from),
                        tag: describe_tag(tag),
                        timeout: t,
                    });
                }
            }
            if idle_since.elapsed() < SPIN {
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(YIELD_EVERY) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(NAP);
            }
        }
    }

    /// Receives a message as an owned buffer (no copy for a single-fragment message).
    pub(crate) fn recv(
        &self,
        from: Source,
        tag: TagMatch,
        timeout: Option<Duration>,
    ) -> Result<Received> {
        let ((), m) = self.wait_for(from, tag, timeout, |_| Ok(()))?;
        Ok(Received {
            src: m.src,
            tag: m.tag,
            seq: m.seq,
            data: m.into_data(),
        })
    }

    /// Receives into `out`; a message larger than `out` stays queued and fails with
    /// [`RankError::Truncated`]. Returns (source, tag, length).
    pub(crate) fn recv_into(
        &self,
        from: Source,
        tag: TagMatch,
        out: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<(usize, u32, usize)> {
        let capacity = out.len();
        let ((), m) = self.wait_for(from, tag, timeout, |m| {
            if m.len > capacity {
                Err(RankError::Truncated {
                    src: m.src,
                    tag: m.tag,
                    len: m.len,
                    capacity,
                })
            } else {
                Ok(())
            }
        })?;
        m.copy_into(&mut out[..m.len]);
        Ok((m.src, m.tag, m.len))
    }

    /// User messages received from the fabric but not yet taken by a receive call.
    pub(crate) fn undelivered_user(&self) -> usize {
        let st = self.state.lock().expect("message state");
        let user = |tag: u32| tag < INTERNAL_TAG_BASE;
        st.ready.iter().filter(|m| user(m.tag)).count()
            + st.held
                .iter()
                .flat_map(|h| h.values())
                .filter(|m| user(m.tag))
                .count()
            + st.partial.values().filter(|p| user(p.tag)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_tags_round_trip_every_field() {
        for (tag, seq, frag, last) in [
            (0u32, 0u64, 0usize, true),
            (MAX_TAG, (1 << 40) + 5, 2047, false),
            (INTERNAL_TAG_BASE + 3, 17, 3, true),
        ] {
            let h = parse_wire_tag(wire_tag(tag, seq, frag, last)).unwrap();
            assert_eq!(
                (h.tag, h.seq_low, h.fragment, h.last),
                (tag, seq & SEQ_MASK, frag, last)
            );
        }
        assert!(parse_wire_tag(0x1234).is_none());
    }
}
