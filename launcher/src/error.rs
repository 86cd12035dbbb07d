//! The one error type of the launcher crate.

#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("bad arguments: {0}")]
    Usage(String),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host {host}: {message}")]
    Host { host: String, message: String },
    #[error("node {node}: {message}")]
    Node { node: usize, message: String },
    #[error("job did not finish within {0:?}; nodes were killed")]
    JobTimeout(std::time::Duration),
    #[error(transparent)]
    Fabric(#[from] fabric::FabricError),
    #[error(transparent)]
    Ghost(#[from] ghost::GhostError),
    #[error("rank {rank} checkpoint v{version}: {what}")]
    Checkpoint {
        rank: u32,
        version: u64,
        what: String,
    },
    #[error("configuration {place}: {key}: {reason}")]
    Config {
        place: String,
        key: String,
        reason: String,
    },
    #[error("I/O error during {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = LauncherError> = std::result::Result<T, E>;
