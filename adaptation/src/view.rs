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
    /// A member becomes a supervisor (a voter of the Raft group): it replaces one that
    /// failed or leaves, or refills a group left short. Committed as a Raft configuration
    /// change; nothing moves between nodes.
    Promote { node: NodeId },
    /// A supervisor leaves the Raft group (it failed, it hands its vote over before a
    /// planned leave, or the group shrinks to an odd size); it stays a member if it is
    /// alive (and may be promoted again).
    Demote { node: NodeId },
}

impl Change {
    /// The node the change is about.
    pub fn node(&self) -> NodeId {
        match self {
            Change::Join { node, .. }
            | Change::Leave { node }
            | Change::Fail { node }
            | Change::Promote { node }
            | Change::Demote { node } => *node,
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
            Change::Promote { node } => {
                out.push(4);
                out.extend_from_slice(&node.to_le_bytes());
            }
            Change::Demote { node } => {
                out.push(5);
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
            4 if rest.is_empty() => Some(Change::Promote { node }),
            5 if rest.is_empty() => Some(Change::Demote { node }),
            _ => None,
        }
    }

    /// Whether the change is about the supervisors' Raft group (not the members).
    pub fn is_supervision(&self) -> bool {
        matches!(self, Change::Promote { .. } | Change::Demote { .. })
    }
}

/// The agreed changes so far (a snapshot of the agreed view: the view of epoch `e` is the
/// genesis view with the first `e` changes applied): a count, then each change with its
/// length (little-endian).
pub fn encode_changes(changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
    for c in changes {
        let bytes = c.encode();
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

/// Parses [`encode_changes`]'s output; `None` when the bytes are not a list of changes.
pub fn decode_changes(bytes: &[u8]) -> Option<Vec<Change>> {
    let count = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let mut rest = &bytes[4..];
    // Each change takes at least 9 bytes: no count can announce more than the bytes hold.
    if count > rest.len() / 9 {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let body = rest.get(4..4usize.checked_add(len)?)?;
        out.push(Change::decode(body)?);
        rest = &rest[4 + len..];
    }
    rest.is_empty().then_some(out)
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
            Change::Promote { node: 5 },
            Change::Demote { node: 6 },
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
    fn change_lists_round_trip_and_truncations_are_refused() {
        let list = vec![
            Change::Join {
                node: 9,
                addr: "a:1".into(),
            },
            Change::Fail { node: 2 },
            Change::Promote { node: 9 },
            Change::Demote { node: 2 },
        ];
        let bytes = encode_changes(&list);
        assert_eq!(decode_changes(&bytes), Some(list));
        for cut in 0..bytes.len() {
            assert_eq!(decode_changes(&bytes[..cut]), None, "cut at {cut}");
        }
        assert_eq!(decode_changes(&encode_changes(&[])), Some(vec![]));
        // A count far beyond the bytes is refused before anything is reserved.
        assert_eq!(decode_changes(&u32::MAX.to_le_bytes()), None);
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
