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
    /// A page whose every copy died (reported to the HA policy).
    #[error("page {page} is lost: its only copy died")]
    PageLost { page: PageId },
    /// A collective call that the ranks did not agree on.
    #[error("collective {what} failed: {reason}")]
    Collective { what: String, reason: String },
    /// A bad argument or configuration value.
    #[error("bad {what}: {reason}")]
    Config { what: String, reason: String },
    #[error("{what} timed out after {seconds:.1} s")]
    Timeout { what: String, seconds: f64 },
}
