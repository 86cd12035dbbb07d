//! Failure detection: SWIM with suspicion and incarnation numbers (the `foca` crate), as a
//! sans-IO state machine driven by virtual time.
//!
//! - Time: one tick stands for [`TICK`] of foca time. Foca asks for timers through
//!   `Runtime::submit_after`; they wait in a queue keyed by the tick they are due at and
//!   [`Membership::tick`] hands every due timer back to foca. Nothing reads a clock.
//! - Randomness: one `SmallRng` seeded from `seed`, owned by foca. Same seed and same inputs
//!   give the same outputs.
//! - Identity: the `NodeId` itself, which is also the address (the driver maps it to a
//!   socket). Identities never renew: a node declared down never comes back under the same
//!   `NodeId` in this system, so our own foca just goes quiet if the cluster declares us down,
//!   and down members are remembered for good (foca's `RemoveDown` timers are dropped) so a
//!   stale node cannot reappear.
//!
//! Detection bound: foca probes members in shuffled rounds, so every live node probes a given
//! member at least once every `2(n-1)-1` probe periods (`n` members counting itself). A dead
//! member is suspected one period after that probe and declared down `suspect_to_down` later,
//! by each live node on its own if gossip has not told it first: every live node reports
//! `Down` within `2(n-1)·probe_period + suspect_to_down` ticks of the crash (see
//! [`MembershipConfig::detection_bound`]). Typically it takes about one period plus
//! `suspect_to_down`.
use std::collections::BTreeSet;
use std::fmt;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use bytes::{Buf, BufMut};
use foca::{
    Codec, Foca, Header, Identity, Incarnation, Member, Message, NoCustomBroadcast,
    OwnedNotification, Runtime, State, Timer,
};
use rand09::rngs::SmallRng;
use rand09::SeedableRng;

use crate::error::{AdaptError, Result};
use crate::view::NodeId;

/// Foca time per tick.
pub const TICK: Duration = Duration::from_millis(10);

/// Largest packet produced and accepted (fits an Ethernet MTU with room for our wire header).
const MAX_PACKET: usize = 1200;

/// Timing of the failure detector, in ticks (the driver decides what a tick is; the daemon
/// uses 10 ms).
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// Ticks between two probes of a random member.
    pub probe_period: u64,
    /// Ticks a probe may take before indirect probes are sent.
    pub probe_rtt: u64,
    /// Ticks a suspected member has to refute the suspicion before it is declared down.
    pub suspect_to_down: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            probe_period: 20,
            probe_rtt: 8,
            suspect_to_down: 60,
        }
    }
}

impl MembershipConfig {
    /// Ticks after a crash by which every live member has reported it down, in a group of
    /// `members` nodes (counting the crashed one) whose messages arrive within `probe_rtt`
    /// (derivation in the module documentation).
    pub fn detection_bound(&self, members: u64) -> u64 {
        let c = self.sanitized();
        2 * members.saturating_sub(1) * c.probe_period + c.suspect_to_down
    }

    /// Foca refuses a zero duration and needs `probe_rtt < probe_period`; `new` cannot fail,
    /// so nonsense values are clamped instead.
    fn sanitized(&self) -> MembershipConfig {
        let probe_period = self.probe_period.max(2);
        MembershipConfig {
            probe_period,
            probe_rtt: self.probe_rtt.clamp(1, probe_period - 1),
            suspect_to_down: self.suspect_to_down.max(1),
        }
    }

    fn to_foca(&self) -> foca::Config {
        let c = self.sanitized();
        let ticks = |n: u64| TICK * u32::try_from(n).unwrap_or(u32::MAX);
        let mut config = foca::Config::simple();
        config.probe_period = ticks(c.probe_period);
        config.probe_rtt = ticks(c.probe_rtt);
        config.suspect_to_down_after = ticks(c.suspect_to_down);
        config.num_indirect_probes = NonZeroUsize::new(3).expect("non-zero");
        // Enough for the few tens of nodes of a job (memberlist uses 4·log10(n+1)).
        config.max_transmissions = NonZeroU8::new(8).expect("non-zero");
        config.max_packet_size = NonZeroUsize::new(MAX_PACKET).expect("non-zero");
        // Gossip twice per period so suspicions, refutations and downs spread faster than
        // piggybacking on probes alone; foca only sends when it has updates.
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: ticks((c.probe_period / 2).max(1)),
            num_members: NonZeroUsize::new(3).expect("non-zero"),
        });
        // Membership comes from the agreed view, not from announcements.
        config.periodic_announce = None;
        config.periodic_announce_to_down_members = None;
        config.notify_down_members = false;
        config
    }
}

/// What the detector concluded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// The member answers (again).
    Up(NodeId),
    /// The member did not refute its suspicion in time.
    Down(NodeId),
}

/// Messages to send and conclusions reached by one call.
#[derive(Debug, Default)]
pub struct MembershipOutput {
    pub messages: Vec<(NodeId, Vec<u8>)>,
    pub events: Vec<MembershipEvent>,
}

/// Foca's identity: the node id, which is its own address and never renews.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Peer(NodeId);

impl Identity for Peer {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        None
    }

    fn addr(&self) -> NodeId {
        self.0
    }

    fn win_addr_conflict(&self, _adversary: &Self) -> bool {
        // The address is the identity, so two identities never share one; keep what we know.
        true
    }
}

#[derive(Debug)]
struct CodecError(&'static str);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for CodecError {}

/// Fixed-size big-endian encoding of foca's header and member updates.
///
/// Header: src u32, incarnation u16, dst u32, kind u8, then for the probe kinds a probe
/// number u8 preceded, for the indirect ones, by the third party's id u32.
/// Member: id u32, incarnation u16, state u8.
struct WireCodec;

const MEMBER_LEN: usize = 7;

fn kind(message: &Message<Peer>) -> (u8, Option<NodeId>, Option<u8>) {
    match message {
        Message::Ping(p) => (0, None, Some(*p)),
        Message::Ack(p) => (1, None, Some(*p)),
        Message::PingReq {
            target,
            probe_number,
        } => (2, Some(target.0), Some(*probe_number)),
        Message::IndirectPing {
            origin,
            probe_number,
        } => (3, Some(origin.0), Some(*probe_number)),
        Message::IndirectAck {
            target,
            probe_number,
        } => (4, Some(target.0), Some(*probe_number)),
        Message::ForwardedAck {
            origin,
            probe_number,
        } => (5, Some(origin.0), Some(*probe_number)),
        Message::Announce => (6, None, None),
        Message::Feed => (7, None, None),
        Message::Gossip => (8, None, None),
        Message::Broadcast => (9, None, None),
        Message::TurnUndead => (10, None, None),
    }
}

impl Codec<Peer> for WireCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<Peer>,
        mut buf: impl BufMut,
    ) -> std::result::Result<(), CodecError> {
        let (tag, third, probe) = kind(&header.message);
        let len = 11 + third.map_or(0, |_| 4) + probe.map_or(0, |_| 1);
        if buf.remaining_mut() < len {
            return Err(CodecError("no room for the header"));
        }
        buf.put_u32(header.src.0);
        buf.put_u16(header.src_incarnation);
        buf.put_u32(header.dst.0);
        buf.put_u8(tag);
        if let Some(id) = third {
            buf.put_u32(id);
        }
        if let Some(p) = probe {
            buf.put_u8(p);
        }
        Ok(())
    }

    fn decode_header(
        &mut self,
        mut buf: impl Buf,
    ) -> std::result::Result<Header<Peer>, CodecError> {
        if buf.remaining() < 11 {
            return Err(CodecError("truncated header"));
        }
        let src = Peer(buf.get_u32());
        let src_incarnation = buf.get_u16();
        let dst = Peer(buf.get_u32());
        let tag = buf.get_u8();
        let need = match tag {
            0 | 1 => 1,
            2..=5 => 5,
            6..=10 => 0,
            _ => return Err(CodecError("unknown message kind")),
        };
        if buf.remaining() < need {
            return Err(CodecError("truncated message"));
        }
        let third = if need == 5 { Peer(buf.get_u32()) } else { src };
        let probe_number = if need > 0 { buf.get_u8() } else { 0 };
        let message = match tag {
            0 => Message::Ping(probe_number),
            1 => Message::Ack(probe_number),
            2 => Message::PingReq {
                target: third,
                probe_number,
            },
            3 => Message::IndirectPing {
                origin: third,
                probe_number,
            },
            4 => Message::IndirectAck {
                target: third,
                probe_number,
            },
            5 => Message::ForwardedAck {
                origin: third,
                probe_number,
            },
            6 => Message::Announce,
            7 => Message::Feed,
            8 => Message::Gossip,
            9 => Message::Broadcast,
            _ => Message::TurnUndead,
        };
        Ok(Header {
            src,
            src_incarnation,
            dst,
            message,
        })
    }

    fn encode_member(
        &mut self,
        member: &Member<Peer>,
        mut buf: impl BufMut,
    ) -> std::result::Result<(), CodecError> {
        if buf.remaining_mut() < MEMBER_LEN {
            return Err(CodecError("no room for the member"));
        }
        buf.put_u32(member.id().0);
        buf.put_u16(member.incarnation());
        buf.put_u8(match member.state() {
            State::Alive => 0,
            State::Suspect => 1,
            State::Down => 2,
        });
        Ok(())
    }

    fn decode_member(
        &mut self,
        mut buf: impl Buf,
    ) -> std::result::Result<Member<Peer>, CodecError> {
        if buf.remaining() < MEMBER_LEN {
            return Err(CodecError("truncated member"));
        }
        let id = Peer(buf.get_u32());
        let incarnation: Incarnation = buf.get_u16();
        let state = match buf.get_u8() {
            0 => State::Alive,
            1 => State::Suspect,
            2 => State::Down,
            _ => return Err(CodecError("unknown member state")),
        };
        Ok(Member::new(id, incarnation, state))
    }
}

/// Collects what foca asks for during one call; drained right after.
#[derive(Default)]
struct Collect {
    sends: Vec<(NodeId, Vec<u8>)>,
    timers: Vec<(Duration, Timer<Peer>)>,
    notes: Vec<OwnedNotification<Peer>>,
}

impl Runtime<Peer> for Collect {
    fn notify(&mut self, notification: foca::Notification<'_, Peer>) {
        self.notes.push(notification.to_owned());
    }

    fn send_to(&mut self, to: Peer, data: &[u8]) {
        self.sends.push((to.0, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<Peer>, after: Duration) {
        self.timers.push((after, event));
    }
}

/// A foca timer waiting for its tick; `seq` keeps insertion order among equals.
struct Pending {
    due: u64,
    seq: u64,
    timer: Timer<Peer>,
}

/// One node's failure detector.
pub struct Membership {
    me: NodeId,
    foca: Foca<Peer, WireCodec, SmallRng, NoCustomBroadcast>,
    timers: Vec<Pending>,
    next_seq: u64,
    /// Members the agreed view removed: never reported again.
    removed: BTreeSet<NodeId>,
    rt: Collect,
}

impl Membership {
    /// A detector for `me`; randomness comes from `seed` only (reproducible simulations).
    pub fn new(me: NodeId, seed: u64, config: MembershipConfig) -> Self {
        Membership {
            me,
            foca: Foca::new(
                Peer(me),
                config.to_foca(),
                SmallRng::seed_from_u64(seed),
                WireCodec,
            ),
            timers: Vec::new(),
            next_seq: 0,
            removed: BTreeSet::new(),
            rt: Collect::default(),
        }
    }

    /// Starts watching `node` (a member of the agreed view).
    pub fn add_member(&mut self, node: NodeId, now: u64) -> MembershipOutput {
        if node != self.me && !self.removed.contains(&node) {
            // Not broadcast: every node applies the agreed view itself.
            let alive = Member::new(Peer(node), 0, State::Alive);
            let _ = self
                .foca
                .apply_many(std::iter::once(alive), false, &mut self.rt);
        }
        self.drain(now)
    }

    /// Stops watching `node` (evicted or failed by the agreed view).
    pub fn remove_member(&mut self, node: NodeId, now: u64) -> MembershipOutput {
        if node != self.me && self.removed.insert(node) {
            // Down is terminal in foca: it stops probing the node and ignores its messages.
            // Not broadcast, like `add_member`; the foca notification is filtered in `drain`.
            let down = Member::new(Peer(node), Incarnation::MAX, State::Down);
            let _ = self
                .foca
                .apply_many(std::iter::once(down), false, &mut self.rt);
        }
        self.drain(now)
    }

    /// Advances virtual time to `now` (ticks, non-decreasing).
    pub fn tick(&mut self, now: u64) -> MembershipOutput {
        let (mut due, later): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.timers)
            .into_iter()
            .partition(|p| p.due <= now);
        self.timers = later;
        // Foca's timer order puts SendIndirectProbe before ProbeRandomMember when both are
        // due together, as its probe cycle expects.
        due.sort_by(|a, b| (a.due, &a.timer, a.seq).cmp(&(b.due, &b.timer, b.seq)));
        for p in due {
            if matches!(p.timer, Timer::RemoveDown(_)) {
                continue; // down members are remembered for good (module doc)
            }
            // Errors here are foca's own bookkeeping complaints (a late probe cycle); the
            // timers it scheduled are still collected.
            let _ = self.foca.handle_timer(p.timer, &mut self.rt);
        }
        self.drain(now)
    }

    /// A detector message from `from`; bytes that do not decode give an error and change
    /// nothing.
    pub fn handle(&mut self, from: NodeId, bytes: &[u8], now: u64) -> Result<MembershipOutput> {
        // Foca applies some of a packet before finding fault with the rest, so the whole
        // packet is checked first.
        validate(self.me, from, bytes).map_err(|e| {
            AdaptError::Membership(format!("undecodable packet from node {from}: {e}"))
        })?;
        let result = self.foca.handle_data(bytes, &mut self.rt);
        // Timers and notifications are kept even if foca complains (it must get its timers).
        let out = self.drain(now);
        result
            .map(|()| out)
            .map_err(|e| AdaptError::Membership(format!("packet from node {from}: {e}")))
    }

    /// Moves what foca asked for during the last call into an output; timers are due
    /// relative to `now`, at least one tick later so a tick never loops.
    fn drain(&mut self, now: u64) -> MembershipOutput {
        for (after, timer) in self.rt.timers.drain(..) {
            let ticks = after.as_nanos().div_ceil(TICK.as_nanos()).max(1);
            self.timers.push(Pending {
                due: now.saturating_add(u64::try_from(ticks).unwrap_or(u64::MAX)),
                seq: self.next_seq,
                timer,
            });
            self.next_seq += 1;
        }
        let mut events = Vec::new();
        for note in self.rt.notes.drain(..) {
            let event = match note {
                OwnedNotification::MemberUp(p) => MembershipEvent::Up(p.0),
                OwnedNotification::MemberDown(p) => MembershipEvent::Down(p.0),
                _ => continue,
            };
            let (MembershipEvent::Up(node) | MembershipEvent::Down(node)) = event;
            if node != self.me && !self.removed.contains(&node) {
                events.push(event);
            }
        }
        MembershipOutput {
            messages: std::mem::take(&mut self.rt.sends),
            events,
        }
    }
}

/// Checks a whole packet the way foca reads it, so `handle_data` is only given packets it
/// accepts entirely: a header from `from` (not from us), then nothing, or a count and exactly
/// that many member updates. Custom broadcasts are disabled, so no trailing bytes.
fn validate(me: NodeId, from: NodeId, mut bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() > MAX_PACKET {
        return Err(format!("{} bytes, more than {MAX_PACKET}", bytes.len()));
    }
    let header = WireCodec
        .decode_header(&mut bytes)
        .map_err(|e| e.to_string())?;
    if header.src.0 != from {
        return Err(format!("claims to come from node {}", header.src.0));
    }
    if from == me {
        return Err("comes from ourselves".into());
    }
    // Foca rejects indirect probes that point back at us, after applying the updates.
    let third = match &header.message {
        Message::PingReq { target: p, .. }
        | Message::IndirectPing { origin: p, .. }
        | Message::IndirectAck { target: p, .. }
        | Message::ForwardedAck { origin: p, .. } => Some(p.0),
        _ => None,
    };
    if third == Some(me) {
        return Err("indirect probe about ourselves".into());
    }
    if bytes.is_empty() {
        return Ok(());
    }
    if matches!(header.message, Message::Announce | Message::Broadcast) {
        return Err("unexpected payload".into());
    }
    if bytes.len() < 2 {
        return Err("truncated update count".into());
    }
    let count = usize::from(bytes.get_u16());
    for _ in 0..count {
        WireCodec
            .decode_member(&mut bytes)
            .map_err(|e| e.to_string())?;
    }
    if !bytes.is_empty() {
        return Err(format!("{} trailing bytes", bytes.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand09::Rng;
    use std::collections::BTreeMap;

    /// Nodes 1..=n on a network with random delays; `mute` nodes lose everything they send,
    /// `crashed` ones also receive nothing and stop ticking.
    struct Sim {
        nodes: Vec<Membership>,
        now: u64,
        in_flight: BTreeMap<(u64, u64), (NodeId, NodeId, Vec<u8>)>,
        seq: u64,
        rng: SmallRng,
        max_delay: u64,
        mute: BTreeSet<NodeId>,
        crashed: BTreeSet<NodeId>,
        /// (tick, observer, event)
        events: Vec<(u64, NodeId, MembershipEvent)>,
        /// (tick, from, to, bytes) of every message sent, for the determinism test.
        sent: Vec<(u64, NodeId, NodeId, Vec<u8>)>,
    }

    impl Sim {
        fn new(n: u32, seed: u64, max_delay: u64, config: &MembershipConfig) -> Sim {
            let mut sim = Sim {
                nodes: (1..=n)
                    .map(|id| Membership::new(id, seed ^ (u64::from(id) << 32), config.clone()))
                    .collect(),
                now: 0,
                in_flight: BTreeMap::new(),
                seq: 0,
                rng: SmallRng::seed_from_u64(seed),
                max_delay,
                mute: BTreeSet::new(),
                crashed: BTreeSet::new(),
                events: Vec::new(),
                sent: Vec::new(),
            };
            for id in 1..=n {
                for other in 1..=n {
                    let out = sim.node(id).add_member(other, 0);
                    sim.route(id, out);
                }
            }
            sim
        }

        fn node(&mut self, id: NodeId) -> &mut Membership {
            &mut self.nodes[id as usize - 1]
        }

        fn route(&mut self, from: NodeId, out: MembershipOutput) {
            for event in out.events {
                self.events.push((self.now, from, event));
            }
            for (to, bytes) in out.messages {
                self.sent.push((self.now, from, to, bytes.clone()));
                if self.mute.contains(&from) || self.crashed.contains(&from) {
                    continue;
                }
                let at = self.now + self.rng.random_range(1..=self.max_delay);
                self.in_flight.insert((at, self.seq), (from, to, bytes));
                self.seq += 1;
            }
        }

        /// One tick: deliver what is due, then let every live node's timers fire.
        fn step(&mut self) {
            self.now += 1;
            while let Some(entry) = self.in_flight.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (from, to, bytes) = entry.remove();
                if self.crashed.contains(&to) {
                    continue;
                }
                let now = self.now;
                let out = self
                    .node(to)
                    .handle(from, &bytes, now)
                    .expect("valid packet");
                self.route(to, out);
            }
            for id in 1..=self.nodes.len() as NodeId {
                if !self.crashed.contains(&id) {
                    let now = self.now;
                    let out = self.node(id).tick(now);
                    self.route(id, out);
                }
            }
        }

        fn run(&mut self, ticks: u64) {
            for _ in 0..ticks {
                self.step();
            }
        }

        fn downs(&self) -> impl Iterator<Item = (u64, NodeId, NodeId)> + '_ {
            self.events.iter().filter_map(|(t, obs, e)| match e {
                MembershipEvent::Down(n) => Some((*t, *obs, *n)),
                _ => None,
            })
        }

        /// Whether some live node currently suspects `id`.
        fn suspected(&self, id: NodeId) -> bool {
            self.nodes.iter().any(|m| {
                m.foca
                    .iter_membership_state()
                    .any(|mm| mm.id().0 == id && mm.state() == State::Suspect)
            })
        }
    }

    #[test]
    fn crashed_node_is_reported_down_by_everyone_within_bound() {
        let config = MembershipConfig::default();
        let n = 8;
        let bound = config.detection_bound(u64::from(n));
        let mut worst = 0;
        for seed in 1..=10 {
            let mut sim = Sim::new(n, seed, config.probe_rtt / 2, &config);
            sim.run(200);
            let crash_at = sim.now;
            sim.crashed.insert(n);
            sim.run(bound + 200);
            for observer in 1..n {
                let first = sim
                    .downs()
                    .filter(|&(_, obs, node)| obs == observer && node == n)
                    .map(|(t, _, _)| t)
                    .next();
                let t = first.unwrap_or_else(|| panic!("seed {seed}: {observer} never saw it"));
                let latency = t - crash_at;
                assert!(
                    latency <= bound,
                    "seed {seed}: {observer} took {latency} > {bound}"
                );
                worst = worst.max(latency);
            }
            let wrong: Vec<_> = sim.downs().filter(|&(_, _, node)| node != n).collect();
            assert!(wrong.is_empty(), "seed {seed}: false downs {wrong:?}");
        }
        eprintln!("worst detection latency {worst} ticks (bound {bound})");
    }

    #[test]
    fn delayed_messages_never_cause_a_down() {
        let config = MembershipConfig::default();
        for seed in [3, 17, 42, 1234] {
            let mut sim = Sim::new(8, seed, config.probe_rtt / 2, &config);
            sim.run(5_000);
            let downs: Vec<_> = sim.downs().collect();
            assert!(downs.is_empty(), "seed {seed}: {downs:?}");
        }
    }

    #[test]
    fn suspected_node_refutes_and_stays_up() {
        let config = MembershipConfig::default();
        // Shorter than suspect_to_down, so that both the suspicion of x and x's own
        // suspicions of others (its pings are lost too) can be refuted in time.
        let hold = config.suspect_to_down / 2;
        let x = 5;
        for seed in 1..=10 {
            let mut sim = Sim::new(8, seed, config.probe_rtt / 2, &config);
            sim.run(200);
            // Start the silence right after someone pings x, so that probe fails for sure.
            let mark = sim.sent.len();
            let is_ping_to_x =
                |(_, _, to, b): &(u64, NodeId, NodeId, Vec<u8>)| *to == x && b.get(10) == Some(&0);
            while !sim.sent[mark..].iter().any(is_ping_to_x) {
                sim.step();
            }
            sim.mute.insert(x);
            let mut seen_suspected = false;
            for _ in 0..hold {
                sim.step();
                seen_suspected |= sim.suspected(x);
            }
            sim.mute.remove(&x);
            sim.run(1_000);
            let downs: Vec<_> = sim.downs().collect();
            assert!(downs.is_empty(), "seed {seed}: {downs:?}");
            assert!(seen_suspected, "seed {seed}: x was never suspected");
            // Everyone saw the refutation: x's incarnation went up and it is alive.
            for id in (1..=8).filter(|&id| id != x) {
                let view = sim
                    .node(id)
                    .foca
                    .iter_membership_state()
                    .find(|m| m.id().0 == x)
                    .cloned()
                    .expect("x known");
                assert_eq!(view.state(), State::Alive, "seed {seed} at {id}");
                assert!(view.incarnation() > 0, "seed {seed} at {id}");
            }
        }
    }

    #[test]
    fn same_seed_same_outputs() {
        let config = MembershipConfig::default();
        let trace = |seed| {
            let mut sim = Sim::new(6, seed, config.probe_rtt / 2, &config);
            sim.run(300);
            sim.crashed.insert(2);
            sim.run(700);
            (sim.sent, sim.events)
        };
        let (a_sent, a_events) = trace(9);
        let (b_sent, b_events) = trace(9);
        assert!(!a_sent.is_empty() && !a_events.is_empty());
        assert_eq!(a_sent, b_sent);
        assert_eq!(a_events, b_events);
        assert_ne!(a_sent, trace(10).0);
    }

    #[test]
    fn garbage_is_rejected_without_changing_anything() {
        let config = MembershipConfig::default();
        // Collect real packets addressed to node 1.
        let mut sim = Sim::new(4, 5, 2, &config);
        sim.run(300);
        let packets: Vec<(NodeId, Vec<u8>)> = sim
            .sent
            .iter()
            .filter(|(_, from, to, b)| *to == 1 && *from != 1 && b.len() > 11)
            .map(|(_, from, _, b)| (*from, b.clone()))
            .take(50)
            .collect();
        assert!(!packets.is_empty());

        // Two identical detectors; only `victim` gets the garbage. If that changed nothing
        // (membership, timers, rng), both keep producing identical outputs.
        let build = || {
            let mut m = Membership::new(1, 77, config.clone());
            for id in 2..=4 {
                m.add_member(id, 0);
            }
            m
        };
        let mut victim = build();
        let mut twin = build();
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..2_000 {
            let len = rng.random_range(0..64);
            let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let from = rng.random_range(0..6);
            assert!(victim.handle(from, &junk, 1).is_err());
        }
        for (from, packet) in &packets {
            let header_len = packet.len() - {
                let mut rest = &packet[..];
                WireCodec.decode_header(&mut rest).expect("valid header");
                rest.len()
            };
            for cut in 0..packet.len() {
                let r = victim.handle(*from, &packet[..cut], 1);
                assert_eq!(
                    r.is_err(),
                    cut != header_len,
                    "cut {cut} of {}",
                    packet.len()
                );
                if cut == header_len {
                    twin.handle(*from, &packet[..cut], 1)
                        .expect("header-only packet");
                }
            }
            // Trailing bytes, a wrong sender and oversized packets are refused too.
            let mut longer = packet.clone();
            longer.push(0);
            assert!(victim.handle(*from, &longer, 1).is_err());
            assert!(victim.handle(*from + 1, packet, 1).is_err());
            assert!(victim.handle(*from, &vec![0; MAX_PACKET + 1], 1).is_err());
        }
        for now in 1..500 {
            let a = victim.tick(now);
            let b = twin.tick(now);
            assert_eq!(a.messages, b.messages);
            assert_eq!(a.events, b.events);
        }
    }

    #[test]
    fn removed_member_is_not_reported_or_probed() {
        let config = MembershipConfig::default();
        let mut sim = Sim::new(5, 8, 2, &config);
        sim.run(100);
        // The view evicts 5 everywhere, then it stops.
        for id in 1..=4 {
            let out = sim.node(id).remove_member(5, 100);
            sim.route(id, out);
        }
        sim.crashed.insert(5);
        sim.run(1_000);
        assert_eq!(sim.downs().count(), 0);
        let probed_after = sim
            .sent
            .iter()
            .filter(|(t, from, to, _)| *t > 101 && *from != 5 && *to == 5)
            .count();
        assert_eq!(probed_after, 0);
    }
}
