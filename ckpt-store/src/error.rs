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
    #[error("{path}: bad magic {found:02x?} at offset 0: not a krun checkpoint image")]
    BadMagic { path: PathBuf, found: [u8; 8] },
    #[error("{path}: header checksum mismatch over header bytes 0..{len} (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum {
        path: PathBuf,
        len: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{path}: payload checksum mismatch in the 4 KiB block at payload offset {offset} (file offset {file_offset}): stored {stored:#010x}, computed {computed:#010x}")]
    PayloadChecksum {
        path: PathBuf,
        offset: u64,
        file_offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("io_uring is unavailable ({what}: {source}); L4 disk images need it (Linux >= 5.6, not blocked by seccomp or sysctl kernel.io_uring_disabled)")]
    IoUring {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node}: {what}")]
    Peer { node: usize, what: String },
    #[error("{level} copy of {owner} v{version} on node {node}: {what}")]
    Copy {
        level: String,
        owner: String,
        version: u64,
        node: usize,
        what: String,
    },
    #[error("{owner} v{version} is not safe at {level}: {what}")]
    NotSafe {
        level: String,
        owner: String,
        version: u64,
        what: String,
    },
    #[error("no valid copy of {owner} v{version}: {}", .tried.join("; "))]
    Unavailable {
        owner: String,
        version: u64,
        tried: Vec<String>,
    },
    #[error("fabric: {0}")]
    Fabric(#[from] fabric::FabricError),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;
