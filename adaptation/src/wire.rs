//! Protocol messages. On the wire they travel in the wire toolkit's frames
//! ([`fabric::wire`], [`PROTOCOL`]): each link is a stream session with a mutual handshake
//! over the cluster secret, its first frame a [`LinkHello`] naming the sending node, then one
//! [`Msg`] per frame, every frame authenticated and sequenced. Only nodes holding the secret
//! can join, vote or move entries; a frame that does not authenticate or decode ends its
//! connection with a log line naming the sender. Nothing here panics on input.
//!
//! [`Writer`] and [`Reader`] are the little-endian field helpers the services use for their
//! own payloads (requests, answers, entry states).
use crate::service::{RequestId, ServiceId};
use crate::view::{Change, EntryId, Epoch, NodeId};
use serde::{Deserialize, Serialize};

/// The wire toolkit protocol of node-to-node links.
pub const PROTOCOL: fabric::wire::Protocol = fabric::wire::Protocol::Adaptation;
/// Largest message accepted (an entry's state travels in one message).
pub const MAX_MESSAGE: usize = 64 << 20;

/// The first frame on a link: which node is sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkHello {
    pub node: NodeId,
}

/// A client request on its way to the entry's manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Buckets of a service whose entries were lost (see the failure repair in
    /// [`crate::protocol`]): sent to a joining node, which keeps them as every member does.
    Lost {
        service: ServiceId,
        buckets: Vec<u32>,
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
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
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
            Msg::Lost { .. } => "lost",
        }
    }

    /// The message's wire encoding (postcard), as a frame carries it.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding into memory fails only for types serde cannot describe; Msg has none.
        fabric::wire::encode(PROTOCOL, self).unwrap_or_default()
    }

    /// Parses [`Msg::encode`]'s output; the error says what is wrong.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Msg, String> {
        fabric::wire::decode(PROTOCOL, bytes).map_err(|e| e.to_string())
    }
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
            Msg::Lost {
                service: 1,
                buckets: vec![0, 7, 1023],
            },
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
        assert!(Msg::decode(&[200]).unwrap_err().contains("adaptation"));
    }

    #[test]
    fn random_bytes_never_panic() {
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
        }
    }
}
