//! Identifiers and the configuration changes the supervisors agree on.

/// A node of the job, stable for its lifetime (a node that comes back gets a new id).
pub type NodeId = u32;
/// A directory entry of a service (a page number, a process id, a key's hash).
pub type EntryId = u64;
/// The number of configuration changes applied so far; every stable view has one.
pub type Epoch = u64;

/// One configuration change, committed by the supervisors before any node acts on it.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Change {
    /// A node announced itself; `addr` is where the others reach it.
    Join { node: NodeId, addr: String },
    /// A planned eviction: the node hands its entries over, then leaves.
    Leave { node: NodeId },
    /// The failure detector and the supervisors agree the node is gone.
    Fail { node: NodeId },
}

impl Change {
    /// The node the change is about.
    pub fn node(&self) -> NodeId {
        match self {
            Change::Join { node, .. } | Change::Leave { node } | Change::Fail { node } => *node,
        }
    }

    /// Binary form (used inside Raft log entries and protocol messages).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Change::Join { node, addr } => {
                out.push(1);
                out.extend_from_slice(&node.to_le_bytes());
                out.extend_from_slice(&(addr.len() as u32).to_le_bytes());
                out.extend_from_slice(addr.as_bytes());
            }
            Change::Leave { node } => {
                out.push(2);
                out.extend_from_slice(&node.to_le_bytes());
            }
            Change::Fail { node } => {
                out.push(3);
                out.extend_from_slice(&node.to_le_bytes());
            }
        }
        out
    }

    /// Parses [`Change::encode`]'s output; `None` when the bytes are not a change.
    pub fn decode(bytes: &[u8]) -> Option<Change> {
        let (&kind, rest) = bytes.split_first()?;
        let node = NodeId::from_le_bytes(rest.get(..4)?.try_into().ok()?);
        let rest = &rest[4..];
        match kind {
            1 => {
                let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                let addr = rest.get(4..4 + len)?;
                if rest.len() != 4 + len {
                    return None;
                }
                Some(Change::Join {
                    node,
                    addr: String::from_utf8(addr.to_vec()).ok()?,
                })
            }
            2 if rest.is_empty() => Some(Change::Leave { node }),
            3 if rest.is_empty() => Some(Change::Fail { node }),
            _ => None,
        }
    }
}

/// A change as it travels through Raft: who asked for it and in which epoch it was asked.
/// The supervisors refuse, at its place in the log, a change asked by a node that is out of
/// the configuration by then (a request from an evicted member is fenced: a supervisor cut
/// off from the others must not get a `leave` it took while isolated committed later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    pub change: Change,
    /// The node the request entered through.
    pub by: NodeId,
    /// The number of agreed changes that node knew when it asked.
    pub epoch: Epoch,
}

impl Proposal {
    /// `change`, then `by` and `epoch` (12 bytes, little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.change.encode();
        out.extend_from_slice(&self.by.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out
    }

    /// Parses [`Proposal::encode`]'s output; `None` when the bytes are not a proposal.
    pub fn decode(bytes: &[u8]) -> Option<Proposal> {
        let split = bytes.len().checked_sub(12)?;
        let (change, tail) = bytes.split_at(split);
        Some(Proposal {
            change: Change::decode(change)?,
            by: NodeId::from_le_bytes(tail[..4].try_into().ok()?),
            epoch: Epoch::from_le_bytes(tail[4..].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_garbage_is_refused() {
        for c in [
            Change::Join {
                node: 7,
                addr: "127.0.0.1:9000".into(),
            },
            Change::Leave { node: 3 },
            Change::Fail { node: u32::MAX },
        ] {
            assert_eq!(Change::decode(&c.encode()), Some(c.clone()));
            let bytes = c.encode();
            for cut in 0..bytes.len() {
                assert_eq!(Change::decode(&bytes[..cut]), None, "{c:?} cut at {cut}");
            }
        }
        assert_eq!(Change::decode(&[9, 0, 0, 0, 0]), None);
    }

    #[test]
    fn proposals_round_trip_and_a_bare_change_is_not_one() {
        let p = Proposal {
            change: Change::Leave { node: 4 },
            by: 2,
            epoch: 17,
        };
        assert_eq!(Proposal::decode(&p.encode()), Some(p.clone()));
        assert_eq!(Proposal::decode(&p.change.encode()), None);
        let bytes = p.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Proposal::decode(&bytes[..cut]), None, "cut at {cut}");
        }
    }
}
