//! Protocol messages and their frames on the wire.
//!
//! A frame is `"KRA1" | version u8 | sender u32 | length u32 | message | HMAC-SHA256 tag`,
//! the tag computed with the cluster secret over everything before it: only nodes holding
//! the secret can join, vote or move entries. A frame that does not authenticate or decode
//! is dropped by the caller with a log line naming the sender; nothing here panics on input.
use crate::error::{AdaptError, Result};
use crate::service::{RequestId, ServiceId};
use crate::view::{Change, EntryId, Epoch, NodeId};
use fabric::secret::{ClusterSecret, MAC_LEN};

pub const MAGIC: &[u8; 4] = b"KRA1";
pub const VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 4 + 4;
/// Largest message accepted (an entry's state travels in one message).
pub const MAX_MESSAGE: usize = 64 << 20;

/// A client request on its way to the entry's manager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    /// The node to answer (where the client waits; it may differ from `id.origin` when a
    /// client retries through another node).
    pub reply_to: NodeId,
    pub service: ServiceId,
    pub entry: EntryId,
    pub payload: Vec<u8>,
}

/// Everything nodes say to each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Failure detector traffic (SWIM).
    Swim(Vec<u8>),
    /// Raft traffic among supervisors.
    Raft(Vec<u8>),
    /// Asks a supervisor to get a change agreed.
    Propose(Change),
    /// A committed change: the view of `epoch` is the previous one with `change` applied.
    ViewChange {
        epoch: Epoch,
        change: Change,
    },
    /// "I know the views up to `epoch`": a supervisor answers with the ones after it.
    Status {
        epoch: Epoch,
        done: Epoch,
    },
    /// Migration step 1 done (before-migration callbacks ran) for `epoch`.
    Prepared {
        epoch: Epoch,
    },
    /// Migration step 2: states of entries of one service for their new manager (batched:
    /// a change moves many entries to few nodes).
    EntryData {
        epoch: Epoch,
        service: ServiceId,
        entries: Vec<(EntryId, Vec<u8>)>,
    },
    /// Copies for a node to keep for failure repair (what `observe_response` takes): sent
    /// to witnesses after a change and by a leaving node to a member that stays.
    Copies {
        service: ServiceId,
        entries: Vec<(EntryId, Vec<u8>)>,
    },
    /// Migration step 2 done: how many `EntryData` this node sent to the receiver, per
    /// service (the receiver checks it got exactly that many).
    Sent {
        epoch: Epoch,
        counts: Vec<u32>,
    },
    Request(Request),
    Response {
        id: RequestId,
        service: ServiceId,
        entry: EntryId,
        payload: Vec<u8>,
    },
    /// A response shown to a witness before the client gets it.
    Observe {
        id: RequestId,
        service: ServiceId,
        entry: EntryId,
        payload: Vec<u8>,
    },
    Observed {
        id: RequestId,
    },
    /// A supervisor checking a suspected node directly before its failure is proposed.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
}

/// Appends little-endian fields.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
    }
    fn entries(&mut self, entries: &[(EntryId, Vec<u8>)]) -> &mut Self {
        self.u32(entries.len() as u32);
        for (e, state) in entries {
            self.u64(*e).bytes(state);
        }
        self
    }
    fn id(&mut self, id: &RequestId) -> &mut Self {
        self.u32(id.origin).u32(id.client).u64(id.seq)
    }
}

/// Reads little-endian fields; running out of bytes is an error, never a panic.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {} (wanted {n} more)", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    pub fn bytes(&mut self) -> std::result::Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn entries(&mut self) -> std::result::Result<Vec<(EntryId, Vec<u8>)>, String> {
        let n = self.u32()? as usize;
        // Each entry takes at least 12 bytes: refuse counts the message cannot hold.
        if n > self.bytes.len().saturating_sub(self.pos) / 12 {
            return Err(format!("{n} entries do not fit in the message"));
        }
        (0..n).map(|_| Ok((self.u64()?, self.bytes()?))).collect()
    }
    fn id(&mut self) -> std::result::Result<RequestId, String> {
        Ok(RequestId {
            origin: self.u32()?,
            client: self.u32()?,
            seq: self.u64()?,
        })
    }
    fn change(&mut self) -> std::result::Result<Change, String> {
        let raw = self.bytes()?;
        Change::decode(&raw).ok_or_else(|| "not a configuration change".to_string())
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }
    fn end(&self) -> std::result::Result<(), String> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.bytes.len() - self.pos))
        }
    }
}

impl Msg {
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Swim(_) => "swim",
            Msg::Raft(_) => "raft",
            Msg::Propose(_) => "propose",
            Msg::ViewChange { .. } => "view-change",
            Msg::Status { .. } => "status",
            Msg::Prepared { .. } => "prepared",
            Msg::EntryData { .. } => "entry-data",
            Msg::Copies { .. } => "copies",
            Msg::Sent { .. } => "sent",
            Msg::Request(_) => "request",
            Msg::Response { .. } => "response",
            Msg::Observe { .. } => "observe",
            Msg::Observed { .. } => "observed",
            Msg::Ping { .. } => "ping",
            Msg::Pong { .. } => "pong",
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Msg::Swim(b) => w.u8(1).bytes(b),
            Msg::Raft(b) => w.u8(2).bytes(b),
            Msg::Propose(c) => w.u8(3).bytes(&c.encode()),
            Msg::ViewChange { epoch, change } => w.u8(4).u64(*epoch).bytes(&change.encode()),
            Msg::Status { epoch, done } => w.u8(5).u64(*epoch).u64(*done),
            Msg::Prepared { epoch } => w.u8(6).u64(*epoch),
            Msg::EntryData {
                epoch,
                service,
                entries,
            } => w.u8(7).u64(*epoch).u16(*service).entries(entries),
            Msg::Copies { service, entries } => w.u8(15).u16(*service).entries(entries),
            Msg::Sent { epoch, counts } => {
                w.u8(8).u64(*epoch).u32(counts.len() as u32);
                for c in counts {
                    w.u32(*c);
                }
                &mut w
            }
            Msg::Request(r) => w
                .u8(9)
                .id(&r.id)
                .u32(r.reply_to)
                .u16(r.service)
                .u64(r.entry)
                .bytes(&r.payload),
            Msg::Response {
                id,
                service,
                entry,
                payload,
            } => w.u8(10).id(id).u16(*service).u64(*entry).bytes(payload),
            Msg::Observe {
                id,
                service,
                entry,
                payload,
            } => w.u8(11).id(id).u16(*service).u64(*entry).bytes(payload),
            Msg::Observed { id } => w.u8(12).id(id),
            Msg::Ping { nonce } => w.u8(13).u64(*nonce),
            Msg::Pong { nonce } => w.u8(14).u64(*nonce),
        };
        w.0
    }

    /// Parses [`Msg::encode`]'s output; the error says what is wrong.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Msg, String> {
        let mut r = Reader::new(bytes);
        let msg = match r.u8()? {
            1 => Msg::Swim(r.bytes()?),
            2 => Msg::Raft(r.bytes()?),
            3 => Msg::Propose(r.change()?),
            4 => Msg::ViewChange {
                epoch: r.u64()?,
                change: r.change()?,
            },
            5 => Msg::Status {
                epoch: r.u64()?,
                done: r.u64()?,
            },
            6 => Msg::Prepared { epoch: r.u64()? },
            7 => Msg::EntryData {
                epoch: r.u64()?,
                service: r.u16()?,
                entries: r.entries()?,
            },
            15 => Msg::Copies {
                service: r.u16()?,
                entries: r.entries()?,
            },
            8 => {
                let epoch = r.u64()?;
                let n = r.u32()? as usize;
                if n > 1 << 16 {
                    return Err(format!("{n} service counts"));
                }
                let counts = (0..n)
                    .map(|_| r.u32())
                    .collect::<std::result::Result<_, _>>()?;
                Msg::Sent { epoch, counts }
            }
            9 => Msg::Request(Request {
                id: r.id()?,
                reply_to: r.u32()?,
                service: r.u16()?,
                entry: r.u64()?,
                payload: r.bytes()?,
            }),
            10 => Msg::Response {
                id: r.id()?,
                service: r.u16()?,
                entry: r.u64()?,
                payload: r.bytes()?,
            },
            11 => Msg::Observe {
                id: r.id()?,
                service: r.u16()?,
                entry: r.u64()?,
                payload: r.bytes()?,
            },
            12 => Msg::Observed { id: r.id()? },
            13 => Msg::Ping { nonce: r.u64()? },
            14 => Msg::Pong { nonce: r.u64()? },
            k => return Err(format!("unknown message kind {k}")),
        };
        r.end()?;
        Ok(msg)
    }
}

/// Builds an authenticated frame for `msg` from `sender`.
pub fn seal(secret: &ClusterSecret, sender: NodeId, msg: &Msg) -> Vec<u8> {
    let body = msg.encode();
    let mut frame = Vec::with_capacity(HEADER + body.len() + MAC_LEN);
    frame.extend_from_slice(MAGIC);
    frame.push(VERSION);
    frame.extend_from_slice(&sender.to_le_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    let tag = secret.sign(&frame);
    frame.extend_from_slice(&tag);
    frame
}

/// Length of the whole frame whose first bytes are `head` (at least the header), or an
/// error when the header is not ours; `peer` names the connection in errors.
pub fn frame_len(head: &[u8], peer: &str) -> Result<usize> {
    let bad = |reason: String| AdaptError::BadMessage {
        from: peer.to_string(),
        reason,
    };
    if head.len() < HEADER {
        return Err(bad(format!("{} bytes, shorter than a header", head.len())));
    }
    if &head[..4] != MAGIC {
        return Err(bad(format!("bad magic {:02x?}", &head[..4])));
    }
    if head[4] != VERSION {
        return Err(bad(format!(
            "version {} (this node speaks {VERSION})",
            head[4]
        )));
    }
    let len = u32::from_le_bytes([head[9], head[10], head[11], head[12]]) as usize;
    if len > MAX_MESSAGE {
        return Err(bad(format!("message of {len} bytes exceeds {MAX_MESSAGE}")));
    }
    Ok(HEADER + len + MAC_LEN)
}

/// The header's length: read this many bytes, then [`frame_len`] says how many in total.
pub const fn header_len() -> usize {
    HEADER
}

/// Checks and opens a whole frame: returns the sender and the message.
pub fn open(secret: &ClusterSecret, frame: &[u8], peer: &str) -> Result<(NodeId, Msg)> {
    let total = frame_len(frame, peer)?;
    if frame.len() != total {
        return Err(AdaptError::BadMessage {
            from: peer.to_string(),
            reason: format!("frame of {} bytes, header says {total}", frame.len()),
        });
    }
    let sender = u32::from_le_bytes([frame[5], frame[6], frame[7], frame[8]]);
    let (signed, tag) = frame.split_at(total - MAC_LEN);
    if !secret.verify(signed, tag) {
        return Err(AdaptError::Unauthenticated {
            from: format!("{peer} (claims node {sender})"),
        });
    }
    let msg = Msg::decode(&signed[HEADER..]).map_err(|reason| AdaptError::BadMessage {
        from: format!("node {sender} ({peer})"),
        reason,
    })?;
    Ok((sender, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        let id = RequestId {
            origin: 3,
            client: 9,
            seq: 77,
        };
        vec![
            Msg::Swim(vec![1, 2, 3]),
            Msg::Raft(vec![]),
            Msg::Propose(Change::Fail { node: 4 }),
            Msg::ViewChange {
                epoch: 5,
                change: Change::Join {
                    node: 9,
                    addr: "127.0.0.1:1".into(),
                },
            },
            Msg::Status { epoch: 2, done: 1 },
            Msg::Prepared { epoch: 2 },
            Msg::EntryData {
                epoch: 2,
                service: 1,
                entries: vec![(u64::MAX, vec![7; 100]), (3, vec![])],
            },
            Msg::Copies {
                service: 0,
                entries: vec![(9, vec![1, 2])],
            },
            Msg::Sent {
                epoch: 2,
                counts: vec![0, 5],
            },
            Msg::Request(Request {
                id,
                reply_to: 5,
                service: 0,
                entry: 12,
                payload: b"put".to_vec(),
            }),
            Msg::Response {
                id,
                service: 0,
                entry: 12,
                payload: b"ok".to_vec(),
            },
            Msg::Observe {
                id,
                service: 0,
                entry: 12,
                payload: b"ok".to_vec(),
            },
            Msg::Observed { id },
            Msg::Ping { nonce: 9 },
            Msg::Pong { nonce: u64::MAX },
        ]
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_is_an_error() {
        for m in samples() {
            let b = m.encode();
            assert_eq!(Msg::decode(&b).as_ref(), Ok(&m));
            for cut in 0..b.len() {
                assert!(Msg::decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert!(Msg::decode(&longer).is_err());
        }
        assert!(Msg::decode(&[200])
            .unwrap_err()
            .contains("unknown message kind"));
    }

    #[test]
    fn frames_authenticate_with_the_cluster_secret_only() {
        let secret = ClusterSecret::new(vec![7u8; 32]).unwrap();
        let other = ClusterSecret::new(vec![8u8; 32]).unwrap();
        for m in samples() {
            let f = seal(&secret, 4, &m);
            assert_eq!(frame_len(&f[..header_len()], "t").unwrap(), f.len());
            let (from, back) = open(&secret, &f, "t").unwrap();
            assert_eq!((from, back), (4, m.clone()));
            assert!(matches!(
                open(&other, &f, "t"),
                Err(AdaptError::Unauthenticated { .. })
            ));
            // Every single flipped bit is caught (by the header checks or the tag).
            for i in (0..f.len()).step_by(3) {
                let mut g = f.clone();
                g[i] ^= 0x10;
                assert!(open(&secret, &g, "t").is_err(), "bit flip at {i} accepted");
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let secret = ClusterSecret::new(vec![7u8; 32]).unwrap();
        let mut x = 0x1234_5678_9abc_def0u64;
        for n in 0..2000 {
            let len = n % 97;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Msg::decode(&bytes);
            let _ = open(&secret, &bytes, "fuzz");
        }
    }
}
