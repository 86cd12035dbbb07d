//! Membership messages (tag `TAG_DSM_MEMBER`): what they say and how they are encoded.
use super::*;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Ctl {
    Join {
        addr: Vec<u8>,
    },
    Welcome(Box<Welcome>),
    Ready {
        regions: Descriptors,
    },
    Install {
        epoch: u64,
        change: ViewChange,
        addr: Vec<u8>,
        regions: Descriptors,
    },
    Installed {
        epoch: u64,
    },
    Migrate {
        epoch: u64,
    },
    Migrated {
        epoch: u64,
        /// The pages this member, as a manager, knows lost.
        lost: Vec<PageId>,
    },
    Commit {
        epoch: u64,
    },
    Committed {
        epoch: u64,
    },
    Leave {
        owned: Vec<PageId>,
    },
    Left,
    Arrive {
        gen: u64,
    },
    Release {
        gen: u64,
    },
    Dismiss,
    /// From a new coordinator (the one before died): what a change of the old one left
    /// here ([`Ctl::State`]).
    StateQuery,
    /// The answer: the epoch of the view in use, the change prepared and not committed,
    /// whether this node switched to it (its entries moved), and, once its step 4 ran, the
    /// pages it found lost.
    State {
        epoch: u64,
        pending: Option<(u64, ViewChange)>,
        switched: bool,
        migrated: Option<Vec<PageId>>,
    },
    /// From a new coordinator, once the old one's failure committed: what DSM locks this
    /// node holds and waits for ([`Ctl::Locks`]).
    LockQuery,
    Locks(crate::lock::LockReport),
    /// Node 0's own queue only (never sent): `node` died, run its failure.
    Failed {
        node: NodeId,
    },
    /// From a new coordinator to a joining node: the dead coordinator left its join before
    /// any member switched, so the join is dropped; the node asks again at `contact` (the
    /// new coordinator's endpoint address) and joins from the start.
    JoinDropped {
        contact: Vec<u8>,
    },
}

pub(super) fn encode(from: NodeId, ctl: &Ctl) -> Result<Vec<u8>> {
    let mut wire = vec![WIRE_VERSION];
    wire.extend(
        postcard::to_allocvec(&(from, ctl)).map_err(|e| DsmError::Config {
            what: "membership message".into(),
            reason: e.to_string(),
        })?,
    );
    let crc = crc32c::crc32c(&wire);
    wire.extend_from_slice(&crc.to_le_bytes());
    Ok(wire)
}

/// Parses [`encode`]'s output.
pub fn decode(data: &[u8]) -> std::result::Result<(NodeId, Ctl), String> {
    let (body, crc) = data
        .split_last_chunk::<4>()
        .ok_or_else(|| format!("{} bytes", data.len()))?;
    if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
        return Err("checksum mismatch (corrupted in transit)".into());
    }
    let (&version, rest) = body.split_first().ok_or("empty")?;
    if version != WIRE_VERSION {
        return Err(format!("wire version {version}, expected {WIRE_VERSION}"));
    }
    postcard::from_bytes(rest).map_err(|e| e.to_string())
}

/// Sends `ctl` from `from` to `peer` (also before the driver runs: a newcomer's request).
pub fn send_raw(ep: &dyn fabric::Endpoint, peer: PeerId, from: NodeId, ctl: &Ctl) -> Result<()> {
    ep.send(peer, TAG_DSM_MEMBER, &encode(from, ctl)?)?;
    Ok(())
}
