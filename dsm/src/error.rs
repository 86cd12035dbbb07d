//! The DSM's one error type.
use crate::coherence::{NodeId, PageId};

pub type Result<T> = std::result::Result<T, DsmError>;

#[derive(Debug, thiserror::Error)]
pub enum DsmError {
    /// A system call on the region or the userfaultfd failed.
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fabric: {0}")]
    Fabric(#[from] fabric::FabricError),
    /// A message from a peer that does not decode.
    #[error("undecodable DSM message from node {from}: {reason}")]
    BadMessage { from: NodeId, reason: String },
    /// A page whose every copy died: after a failure the survivors rebuilt the directory
    /// and found no copy of it. Reported to the program (and the HA policy, through node
    /// 0's change report), never served as zeros.
    #[error(
        "page {page} (region at {region:#x}, offset {offset:#x}) is lost for a {access}: \
         its only copy died with nodes {dead:?} (the survivors rebuilt the directory and hold \
         no copy); restore it from a checkpoint (not zero-filled)"
    )]
    PageLost {
        page: PageId,
        region: u64,
        offset: u64,
        access: String,
        dead: Vec<NodeId>,
    },
    /// A collective call that the ranks did not agree on.
    #[error("collective {what} failed: {reason}")]
    Collective { what: String, reason: String },
    /// A bad argument or configuration value.
    #[error("bad {what}: {reason}")]
    Config { what: String, reason: String },
    /// A local access waited past the fault timeout and nodes it may depend on do not
    /// answer: the page's owner (or a copy holder the owner waits for) died; when it held
    /// the only copy, the page is lost. Never served as zeros.
    #[error(
        "page {page} (region at {region:#x}, offset {offset:#x}) cannot be served for a \
         {access}: no answer for {seconds:.1} s; asked nodes {asked:?}; nodes {dead:?} do not \
         answer (dead): the page's owner or a node it waits for died, and the page is lost if \
         it held the only copy (not zero-filled)"
    )]
    PageUnreachable {
        page: PageId,
        region: u64,
        offset: u64,
        access: String,
        asked: Vec<NodeId>,
        dead: Vec<NodeId>,
        seconds: f64,
    },
    #[error("{what} timed out after {seconds:.1} s")]
    Timeout { what: String, seconds: f64 },
}
