//! Store-to-store control messages, carried by fabric tagged messages; the bulk data moves
//! with one-sided RMA.
//!
//! Every message is a datagram frame of the wire toolkit's [`Protocol::Store`]
//! ([`fabric::wire`]): the payload is the postcard encoding of an [`Envelope`], the frame is
//! authenticated with a key derived from the cluster secret, and each frame is accepted at
//! most once (a sealer's incarnation and sequence number, checked in a replay window). A
//! message from a node without the secret, altered, replayed or undecodable is dropped with
//! a log line naming its sender.
use std::sync::Mutex;

use fabric::secret::ClusterSecret;
use fabric::wire::{Opener, Protocol, Sealer};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};

const P: Protocol = Protocol::Store;
/// Bound on one control message (the largest is a parity set's member list).
pub const MAX_MESSAGE: usize = 1 << 20;

/// One member of a parity set: (member index, node, owner, length, crc32c).
pub type ParityMember = (u32, u32, String, u64, u32);

/// What the messages say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Reserve `len` bytes of the receiver's arena for a copy (`kind` 0: L2, 1: L3 member).
    Reserve {
        owner: String,
        version: u64,
        len: u64,
        kind: u8,
        set: u32,
        member: u32,
    },
    /// The reservation: where to write, and the arena's remote key.
    Reserved {
        offset: u64,
        remote: Vec<u8>,
    },
    /// The copy was written: verify and keep it.
    Commit {
        owner: String,
        version: u64,
        kind: u8,
        set: u32,
        member: u32,
        offset: u64,
        len: u64,
        crc: u32,
    },
    /// Done; `complete` says a parity set is now complete (always true for L2).
    Ack {
        complete: bool,
    },
    Lookup {
        owner: String,
        version: u64,
    },
    /// A copy: `level` 1 (the holder's L1) or 2 (a buddy copy in its arena).
    Found {
        level: u8,
        offset: u64,
        len: u64,
        crc: u32,
        remote: Vec<u8>,
    },
    NotFound,
    Drop {
        owner: String,
        version: u64,
    },
    Parity {
        set: u32,
        version: u64,
    },
    ParityFound {
        offset: u64,
        len: u64,
        crc: u32,
        remote: Vec<u8>,
        members: Vec<ParityMember>,
    },
    /// The request failed; the text says why.
    Error(String),
}

impl Body {
    pub fn name(&self) -> &'static str {
        match self {
            Body::Reserve { .. } => "Reserve",
            Body::Reserved { .. } => "Reserved",
            Body::Commit { .. } => "Commit",
            Body::Ack { .. } => "Ack",
            Body::Lookup { .. } => "Lookup",
            Body::Found { .. } => "Found",
            Body::NotFound => "NotFound",
            Body::Drop { .. } => "Drop",
            Body::Parity { .. } => "Parity",
            Body::ParityFound { .. } => "ParityFound",
            Body::Error(_) => "Error",
        }
    }
}

/// A message: the request it belongs to, the sending node and what it says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub request: u64,
    pub from_node: u32,
    pub body: Body,
}

/// A node's sealer and opener for store messages (shared by its service and client threads).
pub struct Channel {
    sealer: Mutex<Sealer>,
    opener: Mutex<Opener>,
}

impl Channel {
    pub fn new(secret: &ClusterSecret) -> Result<Channel> {
        Ok(Channel {
            sealer: Mutex::new(Sealer::new(secret, P)?),
            opener: Mutex::new(Opener::new(secret, P, MAX_MESSAGE)),
        })
    }

    /// A sealed frame carrying `env`.
    pub fn seal(&self, env: &Envelope) -> Result<Vec<u8>> {
        let mut s = self
            .sealer
            .lock()
            .map_err(|_| StoreError::Invalid("the store's sealer lock is poisoned".into()))?;
        Ok(s.seal(env)?)
    }

    /// Checks and decodes a frame; the error says what is wrong (for the log line).
    pub fn open(&self, frame: &[u8]) -> std::result::Result<Envelope, String> {
        let mut o = self
            .opener
            .lock()
            .map_err(|_| "the store's opener lock is poisoned".to_string())?;
        o.open::<Envelope>(frame)
            .map(|(_, env)| env)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(body: Body) -> Envelope {
        Envelope {
            request: 42,
            from_node: 2,
            body,
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let s = ClusterSecret::random().unwrap();
        let a = Channel::new(&s).unwrap();
        let b = Channel::new(&s).unwrap();
        let msg = env(Body::Reserve {
            owner: "job/r1".into(),
            version: 7,
            len: 3,
            kind: 0,
            set: 0,
            member: 0,
        });
        let f = a.seal(&msg).unwrap();
        assert_eq!(b.open(&f).unwrap(), msg);
        assert!(b.open(&f).unwrap_err().contains("replayed"), "a replay");

        let other = Channel::new(&ClusterSecret::random().unwrap()).unwrap();
        let f = a.seal(&msg).unwrap();
        assert!(other.open(&f).unwrap_err().contains("authentication"));
        let mut altered = f.clone();
        altered[30] ^= 1;
        assert!(b.open(&altered).is_err());
        assert!(b.open(&f[..10]).is_err());
        assert!(b.open(&f[..f.len() - 1]).is_err());
        assert!(b
            .open(b"garbage that is long enough to pass the size check but no magic..")
            .is_err());
        let mut huge = f.clone();
        huge[24..28].copy_from_slice(&(64u32 << 20).to_le_bytes());
        assert!(b.open(&huge).unwrap_err().contains("exceeds"));
        // The untouched frame is still accepted once.
        assert_eq!(b.open(&f).unwrap(), msg);
    }
}
