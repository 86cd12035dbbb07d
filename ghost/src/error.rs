//! The one error type of the ghost crate.
use std::path::PathBuf;

/// Everything a ghost operation can fail with; each variant names what failed.
#[derive(Debug, thiserror::Error)]
pub enum GhostError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid argument: {0}")]
    Invalid(String),
    // --- image format (ghost/src/image/) ---
    #[error("not a ghost image: bad magic {found:?} at offset 0 (expected \"KRGHOST\\0\")")]
    ImageBadMagic { found: String },
    #[error("ghost image format version {found} is not supported (this build reads version {supported})")]
    ImageVersion { found: u16, supported: u16 },
    #[error(
        "ghost image truncated: {what} at offset {offset} needs {needed} bytes, {available} left"
    )]
    ImageTruncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error("ghost image checksum mismatch: {what} at offset {offset} (stored {stored:#010x}, computed {computed:#010x})")]
    ImageChecksum {
        what: String,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("ghost image corrupt at offset {offset}: {what}")]
    ImageCorrupt { what: String, offset: u64 },
    // --- native backend (ghost/src/native.rs) ---
    #[error("userfaultfd: {what}: {source}")]
    Userfaultfd {
        what: String,
        #[source]
        source: std::io::Error,
    },
    // --- CRIU backend (ghost/src/criu.rs) ---
    #[error("CRIU 4.x is needed and was not found: {reason} (run scripts/build-criu.sh or set KRUN_CRIU)")]
    CriuMissing { reason: String },
    #[error("criu {op} failed: {reason}; log: {log}")]
    CriuFailed {
        op: &'static str,
        reason: String,
        log: String,
    },
    #[error("cannot restore: pid {pid} is in use by another process (capture programs started with `krun ghost run` to restore copies in their own PID namespace)")]
    PidInUse { pid: i32 },
    #[error("cannot restore: {path} (fd {fd} of pid {pid} at capture) is missing; it moved or was deleted")]
    FileMissing { path: PathBuf, fd: i32, pid: i32 },
}

pub type Result<T> = std::result::Result<T, GhostError>;
