//! The adaptation layer's one error type.
use crate::view::NodeId;

pub type Result<T> = std::result::Result<T, AdaptError>;

#[derive(Debug, thiserror::Error)]
pub enum AdaptError {
    /// A message that does not decode (truncated, unknown kind, bad version).
    #[error("undecodable message from {from}: {reason}")]
    BadMessage { from: String, reason: String },
    /// An error reported by the Raft library.
    #[error("raft: {0}")]
    Raft(String),
    /// A membership (SWIM) error.
    #[error("membership: {0}")]
    Membership(String),
    /// A request the locator cannot satisfy.
    #[error("locator: {0}")]
    Locator(String),
    /// A node the current view does not hold.
    #[error("node {0} is not a member of the current view")]
    UnknownNode(NodeId),
    /// A change that is not allowed (evicting a supervisor, the last node, ...).
    #[error("change refused: {0}")]
    ChangeRefused(String),
    /// A configuration value that makes no sense.
    #[error("bad configuration {what}: {reason}")]
    Config { what: String, reason: String },
    /// A service name nobody registered.
    #[error("no service named {0:?} is registered")]
    UnknownService(String),
    /// A request that did not get an answer in time.
    #[error("{what} timed out after {seconds:.1} s")]
    Timeout { what: String, seconds: f64 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
