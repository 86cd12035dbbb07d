//! The protocol's messages between nodes ([`Msg`]) and the actions a node asks its driver
//! to perform ([`Action`]).
use serde::{Deserialize, Serialize};

use super::{Access, NodeId, PageId, Source};

/// Protocol messages. [`Msg::Grant`] carries the page bytes (attached by the driver from the
/// sender's memory unless `zero`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// A read request, sent to the probable owner (`via_manager == false`) or forwarded by
    /// the manager to the owner it has on record.
    Read {
        page: PageId,
        from: NodeId,
        via_manager: bool,
    },
    /// To the manager: `from` wants to read / write the page.
    ManagerRead {
        page: PageId,
        from: NodeId,
    },
    ManagerWrite {
        page: PageId,
        from: NodeId,
    },
    /// From the manager to the owner: hand the page over to `from` for writing. `gen`: the
    /// manager's epoch when it forwarded the request (a rebuilt entry voids older ones,
    /// [`Msg::Unqueue`]).
    Write {
        page: PageId,
        from: NodeId,
        gen: u64,
    },
    Invalidate {
        page: PageId,
    },
    InvalidateAck {
        page: PageId,
    },
    /// Access granted; `owner`: the receiver becomes the owner.
    Grant {
        page: PageId,
        access: Access,
        owner: bool,
        zero: bool,
    },
    /// From a manager that rebuilt its entry after a failure: the receiver, which holds a
    /// read copy, is the owner now; `copyset` are the other surviving copies.
    Promote {
        page: PageId,
        copyset: Vec<NodeId>,
    },
    /// A membership change moves directory entries (step 2 of the adaptation layer's
    /// migration): the states of entries the sender managed and the receiver manages from
    /// `epoch` on ([`crate::directory::DirectoryService`]'s `send_out` form).
    Entries {
        epoch: u64,
        entries: Vec<(PageId, Vec<u8>)>,
    },
    /// The sender has sent every entry it hands over for `epoch` and forwards from now on
    /// (links are FIFO: whatever it sent before, this node has received).
    MigrationDone {
        epoch: u64,
    },
    /// A failure's flush: the sender dropped the dead node (whatever that released, such
    /// as a write grant it had held for the dead node's acknowledgement, was sent before
    /// this) and will scan once every live member's flush arrived.
    Flush {
        epoch: u64,
    },
    /// From a manager to a requester: every copy of the page died (after a failure's
    /// rebuild); the access cannot be served.
    Lost {
        page: PageId,
    },
    /// From a manager that rebuilt a broken entry (a write forwarded through a dead node)
    /// in the failure's change to `epoch`: the write requests forwarded before (`gen <
    /// epoch`) belong to the old chain; those the receiver holds are dropped, and so are
    /// those that reach it later (their requesters ask again after the failure).
    Unqueue {
        page: PageId,
        epoch: u64,
    },
    /// To the sender's witness ([`Node::witness`](super::Node::witness)): the sender, the
    /// page's manager, granted the page to itself as a zero page (it is written from now
    /// on, and only the sender knows).
    Touched {
        page: PageId,
    },
}

impl Msg {
    /// Whether the message belongs to a membership change (no page of its own).
    pub fn is_migration(&self) -> bool {
        matches!(
            self,
            Msg::Entries { .. } | Msg::MigrationDone { .. } | Msg::Flush { .. }
        )
    }

    /// The page the message is about (a migration message: its first entry's, or 0).
    pub fn page(&self) -> PageId {
        match self {
            Msg::Entries { entries, .. } => entries.first().map(|e| e.0).unwrap_or(0),
            Msg::MigrationDone { .. } | Msg::Flush { .. } => 0,
            Msg::Read { page, .. }
            | Msg::ManagerRead { page, .. }
            | Msg::ManagerWrite { page, .. }
            | Msg::Write { page, .. }
            | Msg::Invalidate { page }
            | Msg::InvalidateAck { page }
            | Msg::Grant { page, .. }
            | Msg::Promote { page, .. }
            | Msg::Lost { page }
            | Msg::Unqueue { page, .. }
            | Msg::Touched { page } => *page,
        }
    }
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        to: NodeId,
        msg: Msg,
    },
    /// Remote fetch-and-add of `1 << me` on `owner`'s share word of `page`; answer with
    /// [`Node::on_join`](super::Node::on_join) (whether the old word was open).
    Join {
        owner: NodeId,
        page: PageId,
    },
    /// One-sided read of `owner`'s published copy of `page`; answer with [`Node::on_rma_read`](super::Node::on_rma_read).
    RmaRead {
        owner: NodeId,
        page: PageId,
    },
    /// Map the page's data (read-only unless `writable`); the page was not mapped before.
    Install {
        page: PageId,
        source: Source,
        writable: bool,
    },
    /// Write-protect the local (mapped) page.
    Protect {
        page: PageId,
    },
    /// Copy the (read-only) page where one-sided readers read it, then open its share word:
    /// readers may join.
    Publish {
        page: PageId,
    },
    /// Make the (mapped, read-only) page writable.
    Unprotect {
        page: PageId,
    },
    /// Discard the local copy (the next access faults). A [`Msg::Grant`] sent later in the
    /// same batch carries the bytes the page held when it was dropped.
    Drop {
        page: PageId,
    },
    /// The waiting accesses of `page` may proceed.
    Done {
        page: PageId,
        access: Access,
    },
    /// The page's every copy died: the waiting accesses cannot be served (the driver
    /// reports it; never zero-filled).
    Lost {
        page: PageId,
    },
}
