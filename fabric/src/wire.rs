//! The wire toolkit: one frame type, one reader/writer and one codec for every control
//! protocol of the runtime (launcher <-> krund, krund <-> krund, the store, the adaptation
//! layer, the bootstrap, a rank <-> its krund).
//!
//! # Frame
//! All integers little-endian:
//!
//! ```text
//! | magic "KRW1" | version u8 | protocol u8 | flags u16 | sender u64 | seq u64 | len u32 |   28 bytes
//! | payload: len bytes, postcard encoding of the protocol's serde message type       |
//! | tag: HMAC-SHA256(key, header | payload), 32 bytes                                  |
//! ```
//!
//! The frame's kind is its [`Protocol`]; inside a protocol the message enum's variant says
//! what the message is. `flags` is 0 in version 1 (a reader rejects other values).
//!
//! # Keys, authentication, replay
//! Every frame is authenticated, not only a handshake, and no frame is accepted twice:
//!
//! - **Streams** (TCP, Unix sockets): [`Session::client`] / [`Session::server`] run a mutual
//!   challenge-response over the cluster secret (each side proves it holds the secret over
//!   both sides' fresh 32-byte nonces; the secret never crosses the wire), then derive one
//!   key per direction from the secret and both nonces. `seq` starts at 0 in each direction
//!   and must be exactly the next one: a frame replayed from this or another connection,
//!   dropped, reordered or forged fails ([`FabricError::WireAuth`] or
//!   [`FabricError::WireReplay`]). `sender` is 0.
//! - **Datagrams** (fabric tagged messages, which have no connection): a [`Sealer`] keys
//!   frames by the secret and the protocol; `sender` is a random incarnation number drawn by
//!   each sealer, and an [`Opener`] accepts each `(sender, seq)` once, within a sliding
//!   window of [`REPLAY_WINDOW`] sequence numbers (older ones are rejected).
//!
//! # Bounds
//! A reader checks the header (magic, version, protocol, flags, length against its limit)
//! before it allocates anything for the payload; the handshake is fixed-size, so a peer that
//! has not proven the secret cannot make a reader hold more than 64 bytes. Decoding never
//! panics: truncation, trailing bytes and unknown variants are errors naming the protocol.
//! Listeners handshake each connection on its own thread with [`Session::server_within`]
//! (the whole handshake within one deadline, [`HANDSHAKE_TIMEOUT`], so a peer trickling one
//! byte at a time is cut off) and at most [`MAX_HANDSHAKES`] at once ([`HandshakeSlots`]).
//! A connection closed between frames reads as [`FabricError::WireClosed`].
//!
//! ```
//! use fabric::secret::ClusterSecret;
//! use fabric::wire::{Protocol, Session};
//! use std::os::unix::net::UnixStream;
//! let secret = ClusterSecret::new(b"a secret of enough length".to_vec()).unwrap();
//! let (mut a, mut b) = UnixStream::pair().unwrap();
//! let s2 = secret.clone();
//! let server = std::thread::spawn(move || {
//!     let mut s = Session::server(&mut b, &s2, Protocol::Control).unwrap();
//!     let hello: String = s.rx.recv(&mut b).unwrap();
//!     s.tx.send(&mut b, &format!("{hello}, back")).unwrap();
//! });
//! let mut s = Session::client(&mut a, &secret, Protocol::Control).unwrap();
//! s.tx.send(&mut a, &"hi".to_string()).unwrap();
//! assert_eq!(s.rx.recv::<String>(&mut a).unwrap(), "hi, back");
//! server.join().unwrap();
//! ```
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Sha256;

use crate::error::{FabricError, Result};
use crate::secret::{ClusterSecret, MAC_LEN};

pub const MAGIC: &[u8; 4] = b"KRW1";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 28;
pub const TAG_LEN: usize = MAC_LEN;
/// Default bound on one frame's payload.
pub const DEFAULT_MAX_PAYLOAD: usize = 16 << 20;
/// How far behind the newest sequence number a datagram may arrive and still be accepted.
pub const REPLAY_WINDOW: u64 = 1024;
/// Datagram senders an [`Opener`] remembers; the least recently heard is forgotten first
/// (only authenticated senders are remembered).
pub const MAX_SENDERS: usize = 4096;
const NONCE_LEN: usize = 32;

/// The runtime's control protocols; a frame's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Protocol {
    /// `krun` <-> a host's `krund` (run, status, signals, output).
    Control = 1,
    /// `krund` <-> `krund` of one job (runtime requests: drain, migrate, status).
    Runtime = 2,
    /// The checkpoint store's control messages.
    Store = 3,
    /// The adaptation layer (membership, agreement, migration).
    Adaptation = 4,
    /// The job bootstrap (address all-gather, barriers).
    Bootstrap = 5,
    /// A rank <-> its node's krund.
    Rank = 6,
    /// The HA policy engine's messages.
    Policy = 7,
    /// The DSM's control messages.
    Dsm = 8,
    /// The verbs backend's queue-pair exchange (its side channel).
    Verbs = 9,
}

impl Protocol {
    pub const ALL: [Protocol; 9] = [
        Protocol::Control,
        Protocol::Runtime,
        Protocol::Store,
        Protocol::Adaptation,
        Protocol::Bootstrap,
        Protocol::Rank,
        Protocol::Policy,
        Protocol::Dsm,
        Protocol::Verbs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Control => "control",
            Protocol::Runtime => "runtime",
            Protocol::Store => "store",
            Protocol::Adaptation => "adaptation",
            Protocol::Bootstrap => "bootstrap",
            Protocol::Rank => "rank",
            Protocol::Policy => "policy",
            Protocol::Dsm => "dsm",
            Protocol::Verbs => "verbs",
        }
    }

    fn from_u8(v: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| *p as u8 == v)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub protocol: Protocol,
    pub sender: u64,
    pub seq: u64,
    pub len: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(MAGIC);
        h[4] = VERSION;
        h[5] = self.protocol as u8;
        // h[6..8]: flags, 0 in version 1.
        h[8..16].copy_from_slice(&self.sender.to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h[24..28].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// Parses and checks a header: magic, version, flags, the expected protocol, the length
    /// against `max_payload`.
    pub fn decode(h: &[u8], expected: Protocol, max_payload: usize) -> Result<Header> {
        let bad = |what: String| FabricError::WireMalformed {
            protocol: expected.name(),
            what,
        };
        if h.len() < HEADER_LEN {
            return Err(bad(format!(
                "truncated header ({} of {HEADER_LEN} bytes)",
                h.len()
            )));
        }
        if &h[..4] != MAGIC {
            return Err(bad(format!("bad magic {:02x?}", &h[..4])));
        }
        if h[4] != VERSION {
            return Err(bad(format!(
                "frame version {} (this build speaks {VERSION})",
                h[4]
            )));
        }
        let protocol = Protocol::from_u8(h[5])
            .ok_or_else(|| bad(format!("unknown protocol number {}", h[5])))?;
        if protocol != expected {
            return Err(bad(format!("a {protocol} frame on a {expected} channel")));
        }
        if h[6] != 0 || h[7] != 0 {
            return Err(bad(format!("unknown flags {:02x}{:02x}", h[7], h[6])));
        }
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
        if len as usize > max_payload {
            return Err(FabricError::WireTooLarge {
                protocol: expected.name(),
                len: len as usize,
                max: max_payload,
            });
        }
        Ok(Header {
            protocol,
            sender: u64_at(8),
            seq: u64_at(16),
            len,
        })
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn derive(secret: &ClusterSecret, label: &[u8], protocol: Protocol, parts: &[&[u8]]) -> [u8; 32] {
    let mut msg = b"krun-wire-v1 ".to_vec();
    msg.extend_from_slice(label);
    msg.push(protocol as u8);
    for p in parts {
        msg.extend_from_slice(p);
    }
    secret.sign(&msg)
}

/// Encodes a message with the wire codec (postcard).
pub fn encode<M: Serialize + ?Sized>(protocol: Protocol, msg: &M) -> Result<Vec<u8>> {
    postcard::to_allocvec(msg).map_err(|e| FabricError::WireMalformed {
        protocol: protocol.name(),
        what: format!("cannot encode message: {e}"),
    })
}

/// Decodes a whole payload; trailing bytes are an error.
pub fn decode<M: DeserializeOwned>(protocol: Protocol, payload: &[u8]) -> Result<M> {
    let (msg, rest) =
        postcard::take_from_bytes::<M>(payload).map_err(|e| FabricError::WireMalformed {
            protocol: protocol.name(),
            what: format!("undecodable payload of {} bytes: {e}", payload.len()),
        })?;
    if !rest.is_empty() {
        return Err(FabricError::WireMalformed {
            protocol: protocol.name(),
            what: format!("{} trailing bytes after the message", rest.len()),
        });
    }
    Ok(msg)
}

fn seal_frame(key: &[u8; 32], header: Header, payload: &[u8]) -> Vec<u8> {
    let h = header.encode();
    let mut m = mac(key);
    m.update(&h);
    m.update(payload);
    let tag: [u8; TAG_LEN] = m.finalize().into_bytes().into();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    out.extend_from_slice(&tag);
    out
}

fn verify_frame(key: &[u8; 32], header: &[u8], payload: &[u8], tag: &[u8]) -> bool {
    let mut m = mac(key);
    m.update(header);
    m.update(payload);
    m.verify_slice(tag).is_ok()
}

/// The sending half of a stream session: seals frames under this direction's key with
/// consecutive sequence numbers.
pub struct FrameWriter {
    key: [u8; 32],
    protocol: Protocol,
    seq: u64,
}

impl FrameWriter {
    /// A writer keyed directly with `key`, its first sequence number 0 (tests and fuzz
    /// targets, which need frames a [`FrameReader::with_key`] reader accepts in any run;
    /// sessions get their keys from the handshake).
    pub fn with_key(protocol: Protocol, key: [u8; 32]) -> FrameWriter {
        FrameWriter {
            key,
            protocol,
            seq: 0,
        }
    }

    /// A sealed frame carrying `msg` (the next sequence number is used up).
    pub fn seal<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<Vec<u8>> {
        let payload = encode(self.protocol, msg)?;
        let len = u32::try_from(payload.len()).map_err(|_| FabricError::WireTooLarge {
            protocol: self.protocol.name(),
            len: payload.len(),
            max: u32::MAX as usize,
        })?;
        let header = Header {
            protocol: self.protocol,
            sender: 0,
            seq: self.seq,
            len,
        };
        self.seq += 1;
        Ok(seal_frame(&self.key, header, &payload))
    }

    /// Seals `msg` and writes the frame in one `write_all`.
    pub fn send<M: Serialize + ?Sized>(&mut self, w: &mut impl Write, msg: &M) -> Result<()> {
        let frame = self.seal(msg)?;
        w.write_all(&frame)
            .map_err(|e| FabricError::io(format!("sending a {} frame", self.protocol), e))
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

/// The receiving half of a stream session: checks each frame's header, length bound, tag and
/// sequence number before decoding it.
pub struct FrameReader {
    key: [u8; 32],
    protocol: Protocol,
    seq: u64,
    max_payload: usize,
}

impl FrameReader {
    /// A reader keyed directly with `key`, expecting sequence number 0 first, with the
    /// default payload bound (see [`FrameWriter::with_key`]).
    pub fn with_key(protocol: Protocol, key: [u8; 32]) -> FrameReader {
        FrameReader {
            key,
            protocol,
            seq: 0,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }

    /// Changes the bound on one frame's payload (default [`DEFAULT_MAX_PAYLOAD`]).
    pub fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max;
    }

    /// Reads and checks one frame; returns its payload.
    pub fn recv_payload(&mut self, r: &mut impl Read) -> Result<Vec<u8>> {
        let p = self.protocol;
        let mut h = [0u8; HEADER_LEN];
        read_exact(r, &mut h, p, "frame header")?;
        let header = Header::decode(&h, p, self.max_payload)?;
        let body = read_body(r, header.len as usize + TAG_LEN, p)?;
        let (payload, tag) = body.split_at(header.len as usize);
        if !verify_frame(&self.key, &h, payload, tag) {
            return Err(FabricError::WireAuth { protocol: p.name() });
        }
        if header.seq != self.seq {
            return Err(FabricError::WireReplay {
                protocol: p.name(),
                seq: header.seq,
                expected: self.seq,
            });
        }
        self.seq += 1;
        let mut body = body;
        body.truncate(header.len as usize);
        Ok(body)
    }

    /// Reads, checks and decodes one frame.
    pub fn recv<M: DeserializeOwned>(&mut self, r: &mut impl Read) -> Result<M> {
        let payload = self.recv_payload(r)?;
        decode(self.protocol, &payload)
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
}

/// What a reader allocates for a payload before its bytes arrive: a header announcing more
/// makes the buffer grow only as the bytes come in, so a peer cannot make a reader hold
/// more than it actually sent (plus this much).
const PAYLOAD_CHUNK: usize = 1 << 20;

/// Reads `len` bytes of a frame's payload and tag.
fn read_body(r: &mut impl Read, len: usize, p: Protocol) -> Result<Vec<u8>> {
    let mut body = Vec::with_capacity(len.min(PAYLOAD_CHUNK));
    loop {
        match (&mut *r)
            .take((len - body.len()) as u64)
            .read_to_end(&mut body)
        {
            Ok(_) if body.len() == len => return Ok(body),
            Ok(_) => {
                return Err(FabricError::WireMalformed {
                    protocol: p.name(),
                    what: "connection closed inside a frame payload (truncated frame)".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FabricError::io(format!("reading a {p} frame payload"), e)),
        }
    }
}

/// Fills `buf`; the connection closing before the first byte of a frame header is
/// [`FabricError::WireClosed`] (an orderly end between frames), anywhere else a truncation.
fn read_exact(r: &mut impl Read, buf: &mut [u8], p: Protocol, what: &str) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && what == "frame header" => {
                return Err(FabricError::WireClosed { protocol: p.name() })
            }
            Ok(0) => {
                return Err(FabricError::WireMalformed {
                    protocol: p.name(),
                    what: format!("connection closed inside a {what} (truncated frame)"),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FabricError::io(format!("reading a {p} {what}"), e)),
        }
    }
    Ok(())
}

/// How long a listener gives a connecting peer to complete the handshake (and its first
/// request): a peer that sends one byte at a time cannot hold a connection longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many connections a listener handshakes at once; more wait in the kernel's backlog
/// until one of those ends (completes, fails or times out).
pub const MAX_HANDSHAKES: usize = 64;

/// A TCP stream whose reads and writes all end by one deadline (each read waits at most
/// until then), so the whole exchange is bounded in time, not only each read.
pub struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl<'a> Deadline<'a> {
    pub fn new(stream: &'a TcpStream, within: Duration) -> Deadline<'a> {
        Deadline {
            stream,
            until: Instant::now() + within,
        }
    }

    fn left(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer did not complete the exchange in time",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut s = self.stream;
        s.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Counts a listener's connections in their handshake; [`HandshakeSlots::try_take`] fails
/// when [`MAX_HANDSHAKES`] (or the given bound) are under way.
#[derive(Clone)]
pub struct HandshakeSlots {
    busy: Arc<AtomicUsize>,
    max: usize,
}

/// One connection's place among the handshakes; frees it when dropped.
pub struct HandshakeSlot(Arc<AtomicUsize>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HandshakeSlots {
    pub fn new(max: usize) -> HandshakeSlots {
        HandshakeSlots {
            busy: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Waits for a free slot. A listener takes one before it accepts, so connections beyond
    /// the bound wait in the kernel's backlog, costing the daemon nothing.
    pub fn take(&self) -> HandshakeSlot {
        loop {
            if let Some(slot) = self.try_take() {
                return slot;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn try_take(&self) -> Option<HandshakeSlot> {
        let taken = self
            .busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        taken.ok().map(|_| HandshakeSlot(self.busy.clone()))
    }
}

impl Default for HandshakeSlots {
    fn default() -> Self {
        HandshakeSlots::new(MAX_HANDSHAKES)
    }
}

/// An authenticated stream connection: `tx` and `rx` can move to different threads.
pub struct Session {
    pub tx: FrameWriter,
    pub rx: FrameReader,
}

// Handshake messages (fixed size, not frames):
//   server hello: "KRW1" | version | protocol | 'H' | nonce_s[32]                     (39 bytes)
//   client proof: "KRW1" | version | protocol | 'C' | nonce_c[32] | proof_c[32]       (71 bytes)
//   server proof: "KRW1" | version | protocol | 'S' | proof_s[32]                     (39 bytes)
//   or refusal:   "KRW1" | version | protocol | 'N' | reason (padded to 32 bytes)     (39 bytes)
const HELLO_LEN: usize = 7 + NONCE_LEN;
const PROOF_LEN: usize = 7 + NONCE_LEN + MAC_LEN;

fn hs_prefix(protocol: Protocol, step: u8) -> [u8; 7] {
    let mut p = [0u8; 7];
    p[..4].copy_from_slice(MAGIC);
    p[4] = VERSION;
    p[5] = protocol as u8;
    p[6] = step;
    p
}

fn check_prefix(buf: &[u8], protocol: Protocol, step: u8, who: &str) -> Result<()> {
    let bad = |what: String| FabricError::WireMalformed {
        protocol: protocol.name(),
        what,
    };
    if &buf[..4] != MAGIC {
        return Err(bad(format!("{who} did not open with the KRW1 magic")));
    }
    if buf[4] != VERSION {
        return Err(bad(format!(
            "{who} speaks wire version {} (this build speaks {VERSION})",
            buf[4]
        )));
    }
    if buf[5] != protocol as u8 {
        return Err(bad(format!(
            "{who} speaks protocol {} on a {protocol} channel",
            Protocol::from_u8(buf[5]).map_or_else(|| buf[5].to_string(), |p| p.to_string())
        )));
    }
    if buf[6] == b'N' && step != b'N' {
        let reason = String::from_utf8_lossy(&buf[7..]);
        return Err(FabricError::WireRefused {
            protocol: protocol.name(),
            reason: reason.trim_end_matches('\0').to_string(),
        });
    }
    if buf[6] != step {
        return Err(bad(format!("{who} sent handshake step {:#x}", buf[6])));
    }
    Ok(())
}

fn nonce() -> Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    crate::secret::fill_random(&mut n)?;
    Ok(n)
}

impl Session {
    /// The connecting side: answers the server's challenge, checks the server's proof.
    /// Set a read timeout on the stream first: the handshake reads at most 39 bytes.
    pub fn client<S: Read + Write>(
        stream: &mut S,
        secret: &ClusterSecret,
        protocol: Protocol,
    ) -> Result<Session> {
        let mut hello = [0u8; HELLO_LEN];
        read_exact(stream, &mut hello, protocol, "handshake hello")?;
        check_prefix(&hello, protocol, b'H', "the server")?;
        let nonce_s = &hello[7..];
        let nonce_c = nonce()?;
        let proof_c = derive(secret, b"client", protocol, &[nonce_s, &nonce_c]);
        let mut msg = hs_prefix(protocol, b'C').to_vec();
        msg.extend_from_slice(&nonce_c);
        msg.extend_from_slice(&proof_c);
        stream
            .write_all(&msg)
            .map_err(|e| FabricError::io(format!("{protocol} handshake"), e))?;
        let mut answer = [0u8; HELLO_LEN];
        read_exact(stream, &mut answer, protocol, "handshake answer")?;
        check_prefix(&answer, protocol, b'S', "the server")?;
        let expect = derive(secret, b"server", protocol, &[nonce_s, &nonce_c]);
        if !constant_eq(&answer[7..], &expect) {
            return Err(FabricError::WireAuth {
                protocol: protocol.name(),
            });
        }
        Ok(Session::keyed(secret, protocol, nonce_s, &nonce_c, false))
    }

    /// The accepting side: challenges the client and refuses it (telling it why) unless it
    /// proves it holds the secret.
    pub fn server<S: Read + Write>(
        stream: &mut S,
        secret: &ClusterSecret,
        protocol: Protocol,
    ) -> Result<Session> {
        let nonce_s = nonce()?;
        let mut hello = hs_prefix(protocol, b'H').to_vec();
        hello.extend_from_slice(&nonce_s);
        stream
            .write_all(&hello)
            .map_err(|e| FabricError::io(format!("{protocol} handshake"), e))?;
        let mut proof = [0u8; PROOF_LEN];
        read_exact(stream, &mut proof, protocol, "handshake proof")?;
        check_prefix(&proof, protocol, b'C', "the client")?;
        let nonce_c = &proof[7..7 + NONCE_LEN];
        let expect = derive(secret, b"client", protocol, &[&nonce_s, nonce_c]);
        if !constant_eq(&proof[7 + NONCE_LEN..], &expect) {
            let mut no = hs_prefix(protocol, b'N').to_vec();
            let mut reason = [0u8; 32];
            reason[..20].copy_from_slice(b"wrong cluster secret");
            no.extend_from_slice(&reason);
            let _ = stream.write_all(&no);
            return Err(FabricError::WireAuth {
                protocol: protocol.name(),
            });
        }
        let mut ok = hs_prefix(protocol, b'S').to_vec();
        ok.extend_from_slice(&derive(secret, b"server", protocol, &[&nonce_s, nonce_c]));
        stream
            .write_all(&ok)
            .map_err(|e| FabricError::io(format!("{protocol} handshake"), e))?;
        Ok(Session::keyed(secret, protocol, &nonce_s, nonce_c, true))
    }

    /// [`Session::client`] over TCP, the whole handshake within `within`; the stream's
    /// timeouts are cleared afterwards.
    pub fn client_within(
        stream: &TcpStream,
        secret: &ClusterSecret,
        protocol: Protocol,
        within: Duration,
    ) -> Result<Session> {
        let s = Session::client(&mut Deadline::new(stream, within), secret, protocol);
        clear_timeouts(stream);
        s
    }

    /// [`Session::server`] over TCP, the whole handshake within `within` (a peer that
    /// trickles bytes is cut off); the stream's timeouts are cleared afterwards.
    pub fn server_within(
        stream: &TcpStream,
        secret: &ClusterSecret,
        protocol: Protocol,
        within: Duration,
    ) -> Result<Session> {
        let s = Session::server(&mut Deadline::new(stream, within), secret, protocol);
        clear_timeouts(stream);
        s
    }

    fn keyed(
        secret: &ClusterSecret,
        protocol: Protocol,
        nonce_s: &[u8],
        nonce_c: &[u8],
        server: bool,
    ) -> Session {
        let c2s = derive(secret, b"key c2s", protocol, &[nonce_s, nonce_c]);
        let s2c = derive(secret, b"key s2c", protocol, &[nonce_s, nonce_c]);
        let (send, recv) = if server { (s2c, c2s) } else { (c2s, s2c) };
        Session {
            tx: FrameWriter {
                key: send,
                protocol,
                seq: 0,
            },
            rx: FrameReader {
                key: recv,
                protocol,
                seq: 0,
                max_payload: DEFAULT_MAX_PAYLOAD,
            },
        }
    }
}

fn clear_timeouts(stream: &TcpStream) {
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Seals datagram frames (fabric tagged messages) of one protocol.
pub struct Sealer {
    key: [u8; 32],
    protocol: Protocol,
    sender: u64,
    seq: u64,
}

impl Sealer {
    /// A sealer with a fresh random incarnation number.
    pub fn new(secret: &ClusterSecret, protocol: Protocol) -> Result<Sealer> {
        let mut s = [0u8; 8];
        crate::secret::fill_random(&mut s)?;
        Ok(Sealer {
            key: derive(secret, b"datagram", protocol, &[]),
            protocol,
            sender: u64::from_le_bytes(s),
            seq: 0,
        })
    }

    /// This sealer's incarnation (the `sender` of its frames).
    pub fn sender(&self) -> u64 {
        self.sender
    }

    pub fn seal<M: Serialize + ?Sized>(&mut self, msg: &M) -> Result<Vec<u8>> {
        let payload = encode(self.protocol, msg)?;
        let len = u32::try_from(payload.len()).map_err(|_| FabricError::WireTooLarge {
            protocol: self.protocol.name(),
            len: payload.len(),
            max: u32::MAX as usize,
        })?;
        let header = Header {
            protocol: self.protocol,
            sender: self.sender,
            seq: self.seq,
            len,
        };
        self.seq += 1;
        Ok(seal_frame(&self.key, header, &payload))
    }
}

struct Window {
    highest: u64,
    /// Bit i set: `highest - i` was accepted.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
    last_heard: u64,
}

impl Window {
    fn bit(&self, back: u64) -> bool {
        self.seen[(back / 64) as usize] >> (back % 64) & 1 == 1
    }
    fn set(&mut self, back: u64) {
        self.seen[(back / 64) as usize] |= 1 << (back % 64);
    }
    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = [0; (REPLAY_WINDOW / 64) as usize];
            return;
        }
        let (words, bits) = ((by / 64) as usize, by % 64);
        let n = self.seen.len();
        for i in (0..n).rev() {
            let lo = if i >= words { self.seen[i - words] } else { 0 };
            let below = if bits > 0 && i > words {
                self.seen[i - words - 1] >> (64 - bits)
            } else {
                0
            };
            self.seen[i] = if bits > 0 { lo << bits | below } else { lo };
        }
    }
}

/// Checks datagram frames of one protocol: header, length bound, tag, and that each
/// `(sender, seq)` is accepted once.
pub struct Opener {
    key: [u8; 32],
    protocol: Protocol,
    max_payload: usize,
    windows: HashMap<u64, Window>,
    clock: u64,
}

impl Opener {
    pub fn new(secret: &ClusterSecret, protocol: Protocol, max_payload: usize) -> Opener {
        Opener {
            key: derive(secret, b"datagram", protocol, &[]),
            protocol,
            max_payload,
            windows: HashMap::new(),
            clock: 0,
        }
    }

    /// Checks one frame; returns its sender incarnation and payload.
    pub fn open_payload<'a>(&mut self, frame: &'a [u8]) -> Result<(u64, &'a [u8])> {
        let p = self.protocol;
        let header = Header::decode(frame, p, self.max_payload)?;
        let total = HEADER_LEN + header.len as usize + TAG_LEN;
        if frame.len() != total {
            return Err(FabricError::WireMalformed {
                protocol: p.name(),
                what: format!(
                    "frame of {} bytes, its header announces {total}",
                    frame.len()
                ),
            });
        }
        let payload = &frame[HEADER_LEN..HEADER_LEN + header.len as usize];
        if !verify_frame(
            &self.key,
            &frame[..HEADER_LEN],
            payload,
            &frame[total - TAG_LEN..],
        ) {
            return Err(FabricError::WireAuth { protocol: p.name() });
        }
        self.accept(header.sender, header.seq)?;
        Ok((header.sender, payload))
    }

    /// Checks and decodes one frame.
    pub fn open<M: DeserializeOwned>(&mut self, frame: &[u8]) -> Result<(u64, M)> {
        let p = self.protocol;
        let (sender, payload) = self.open_payload(frame)?;
        Ok((sender, decode(p, payload)?))
    }

    fn accept(&mut self, sender: u64, seq: u64) -> Result<()> {
        self.clock += 1;
        let clock = self.clock;
        let replay = |expected: u64| FabricError::WireReplay {
            protocol: self.protocol.name(),
            seq,
            expected,
        };
        if !self.windows.contains_key(&sender) && self.windows.len() >= MAX_SENDERS {
            let oldest = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.last_heard)
                .map(|(s, _)| *s);
            if let Some(s) = oldest {
                self.windows.remove(&s);
            }
        }
        let w = self.windows.entry(sender).or_insert(Window {
            highest: seq,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
            last_heard: clock,
        });
        w.last_heard = clock;
        if seq > w.highest {
            w.shift(seq - w.highest);
            w.highest = seq;
            w.set(0);
            return Ok(());
        }
        let back = w.highest - seq;
        if back >= REPLAY_WINDOW {
            return Err(replay(w.highest + 1));
        }
        if w.bit(back) {
            return Err(replay(w.highest + 1));
        }
        w.set(back);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(format!("{s} and enough bytes").into_bytes()).unwrap()
    }

    fn pair(p: Protocol) -> (Session, UnixStream, Session, UnixStream) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let sec = secret("one");
        let s2 = sec.clone();
        let t = std::thread::spawn(move || {
            let s = Session::server(&mut b, &s2, p).unwrap();
            (s, b)
        });
        let c = Session::client(&mut a, &sec, p).unwrap();
        let (s, b) = t.join().unwrap();
        (c, a, s, b)
    }

    #[test]
    fn messages_round_trip_both_ways() {
        let (mut c, mut a, mut s, mut b) = pair(Protocol::Runtime);
        c.tx.send(&mut a, &(1u32, "x".to_string())).unwrap();
        c.tx.send(&mut a, &vec![7u8; 100_000]).unwrap();
        assert_eq!(
            s.rx.recv::<(u32, String)>(&mut b).unwrap(),
            (1, "x".to_string())
        );
        assert_eq!(s.rx.recv::<Vec<u8>>(&mut b).unwrap(), vec![7u8; 100_000]);
        s.tx.send(&mut b, &42u64).unwrap();
        assert_eq!(c.rx.recv::<u64>(&mut a).unwrap(), 42);
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides_with_the_reason() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t =
            std::thread::spawn(move || Session::server(&mut b, &secret("one"), Protocol::Control));
        let e = Session::client(&mut a, &secret("two"), Protocol::Control)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("wrong cluster secret"), "{e}");
        let e = t.join().unwrap().err().unwrap();
        assert!(
            matches!(
                e,
                FabricError::WireAuth {
                    protocol: "control"
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_protocol_mismatch_is_named() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let t =
            std::thread::spawn(move || Session::server(&mut b, &secret("one"), Protocol::Store));
        let e = Session::client(&mut a, &secret("one"), Protocol::Control)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("protocol store on a control channel"), "{e}");
        drop(a);
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn every_flipped_bit_of_a_frame_is_rejected() {
        let (mut c, _a, mut s, _b) = pair(Protocol::Control);
        let frame = c.tx.seal(&("run".to_string(), vec![1u32, 2, 3])).unwrap();
        for bit in 0..frame.len() * 8 {
            let mut f = frame.clone();
            f[bit / 8] ^= 1 << (bit % 8);
            let r = s.rx.recv::<(String, Vec<u32>)>(&mut f.as_slice());
            assert!(r.is_err(), "bit {bit} flipped was accepted");
        }
        // The untouched frame is still the next one expected.
        let got =
            s.rx.recv::<(String, Vec<u32>)>(&mut frame.as_slice())
                .unwrap();
        assert_eq!(got.1, vec![1, 2, 3]);
    }

    #[test]
    fn a_replayed_frame_and_a_frame_from_another_session_are_rejected() {
        let (mut c, _a, mut s, _b) = pair(Protocol::Control);
        let f0 = c.tx.seal(&1u8).unwrap();
        let f1 = c.tx.seal(&2u8).unwrap();
        assert_eq!(s.rx.recv::<u8>(&mut f0.as_slice()).unwrap(), 1);
        let e = s.rx.recv::<u8>(&mut f0.as_slice()).unwrap_err();
        assert!(
            matches!(
                e,
                FabricError::WireReplay {
                    seq: 0,
                    expected: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(s.rx.recv::<u8>(&mut f1.as_slice()).unwrap(), 2);
        // Same secret, another connection: other keys.
        let (mut c2, _a2, _s2, _b2) = pair(Protocol::Control);
        let foreign = c2.tx.seal(&3u8).unwrap();
        let e = s.rx.recv::<u8>(&mut foreign.as_slice()).unwrap_err();
        assert!(matches!(e, FabricError::WireAuth { .. }), "{e}");
    }

    #[test]
    fn truncated_huge_and_garbage_frames_are_errors_without_allocating() {
        let (mut c, _a, mut s, _b) = pair(Protocol::Bootstrap);
        let frame = c.tx.seal(&"hello".to_string()).unwrap();
        let e = s.rx.recv::<String>(&mut &frame[..0]).unwrap_err();
        assert!(matches!(e, FabricError::WireClosed { .. }), "{e}");
        for cut in 1..frame.len() {
            let e = s.rx.recv::<String>(&mut &frame[..cut]).unwrap_err();
            assert!(e.to_string().contains("truncated"), "cut {cut}: {e}");
        }
        let mut huge = frame.clone();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = s.rx.recv::<String>(&mut huge.as_slice()).unwrap_err();
        assert!(matches!(e, FabricError::WireTooLarge { .. }), "{e}");
        let e =
            s.rx.recv::<String>(&mut [0x55u8; 100].as_slice())
                .unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }

    #[test]
    fn a_payload_that_does_not_decode_is_named() {
        let (mut c, _a, mut s, _b) = pair(Protocol::Store);
        let f = c.tx.seal(&vec![0xffu8; 3]).unwrap();
        let e = s.rx.recv::<(u64, String)>(&mut f.as_slice()).unwrap_err();
        assert!(e.to_string().contains("store"), "{e}");
    }

    #[test]
    fn datagrams_are_accepted_once_within_the_window() {
        let sec = secret("one");
        let mut tx = Sealer::new(&sec, Protocol::Store).unwrap();
        let mut rx = Opener::new(&sec, Protocol::Store, 1 << 20);
        let frames: Vec<Vec<u8>> = (0..3000u32).map(|i| tx.seal(&i).unwrap()).collect();
        // Out of order inside the window is fine, each once.
        for i in [5usize, 3, 4, 0, 1, 2] {
            assert_eq!(rx.open::<u32>(&frames[i]).unwrap().1, i as u32);
        }
        for i in [0usize, 3, 5] {
            assert!(matches!(
                rx.open::<u32>(&frames[i]),
                Err(FabricError::WireReplay { .. })
            ));
        }
        for f in &frames[6..2000] {
            rx.open::<u32>(f).unwrap();
        }
        // 7 is more than REPLAY_WINDOW behind 1999: rejected although never seen.
        assert!(rx.open::<u32>(&frames[7]).is_err());
        assert!(rx.open::<u32>(&frames[1999]).is_err());
        // Another secret, another protocol: not authentic.
        let mut other = Opener::new(&secret("two"), Protocol::Store, 1 << 20);
        assert!(matches!(
            other.open::<u32>(&frames[2500]),
            Err(FabricError::WireAuth { .. })
        ));
        let mut other = Opener::new(&sec, Protocol::Dsm, 1 << 20);
        assert!(other.open::<u32>(&frames[2500]).is_err());
        // Trailing garbage after a valid frame.
        let mut long = frames[2600].clone();
        long.push(0);
        assert!(rx.open::<u32>(&long).is_err());
    }

    #[test]
    fn a_client_trickling_bytes_is_cut_off_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let trickler = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            let mut hello = [0u8; HELLO_LEN];
            c.read_exact(&mut hello).unwrap();
            // One valid byte every 50 ms: each read succeeds, the whole never completes.
            for b in hs_prefix(Protocol::Control, b'C') {
                if c.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            c
        });
        let (s, _) = listener.accept().unwrap();
        let e = Session::server_within(
            &s,
            &secret("one"),
            Protocol::Control,
            Duration::from_millis(120),
        )
        .err()
        .expect("cut off");
        assert!(
            matches!(&e, FabricError::Io { source, .. } if matches!(source.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)),
            "{e}"
        );
        drop(trickler.join().unwrap());
    }

    #[test]
    fn handshake_slots_are_bounded_and_freed() {
        let slots = HandshakeSlots::new(2);
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        drop(a);
        assert!(slots.try_take().is_some());
    }

    #[test]
    fn the_window_shift_keeps_recent_bits() {
        let mut w = Window {
            highest: 100,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
            last_heard: 0,
        };
        for back in [0u64, 1, 63, 64, 65, 700] {
            w.set(back);
        }
        w.shift(70);
        for back in [70u64, 71, 133, 134, 135, 770] {
            assert!(w.bit(back), "{back}");
        }
        assert!(!w.bit(0) && !w.bit(69) && !w.bit(72));
    }
}
