//! The one error type of the checkpoint store.
use std::path::PathBuf;

/// Everything a checkpoint-store operation can fail with; each variant names what failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("checkpoint {owner} v{version} is not held at any level")]
    NotFound { owner: String, version: u64 },
    #[error("{level}: checkpoint {owner} v{version} fails its checksum (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        level: String,
        owner: String,
        version: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no space left on the device while writing {what}; the previous checkpoint is intact")]
    NoSpace { path: PathBuf, what: String },
    #[error("{path}: corrupt at offset {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        what: String,
        offset: u64,
    },
    #[error("{path}: truncated: {actual} bytes, {expected} expected")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: format version {found} is not supported (this build reads {supported})")]
    Version {
        path: PathBuf,
        found: u16,
        supported: u16,
    },
    #[error("node {node}: {what}")]
    Peer { node: usize, what: String },
    #[error("fabric: {0}")]
    Fabric(#[from] fabric::FabricError),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;
