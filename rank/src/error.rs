//! The one error type of the rank library, and its C error codes.
use std::path::PathBuf;
use std::time::Duration;

use fabric::FabricError;
use ghost::GhostError;

/// Everything a rank library call can fail with. Messages name the rank, tag, window or
/// setting involved.
#[derive(Debug, thiserror::Error)]
pub enum RankError {
    #[error("{name} is not set: {hint}")]
    MissingEnv {
        name: &'static str,
        hint: &'static str,
    },
    #[error("{name}={value:?}: {reason}")]
    BadEnv {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("the rank library is not initialized: call krun_init first")]
    NotInitialized,
    #[error("the rank library is already initialized in this process")]
    AlreadyInitialized,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("rank {rank} does not exist: the job has {size} rank(s), 0..{size}")]
    NoSuchRank { rank: i64, size: usize },
    #[error("tag {tag} is out of range: user tags are 0..={max}")]
    BadTag { tag: i64, max: u32 },
    #[error("message of {len} bytes exceeds the largest message of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("message from rank {src} with tag {tag} has {len} bytes, more than the {capacity}-byte receive buffer (the message stays queued)")]
    Truncated {
        src: usize,
        tag: u32,
        len: usize,
        capacity: usize,
    },
    #[error("no message from {from} with tag {tag} arrived within {timeout:?}")]
    RecvTimeout {
        from: String,
        tag: String,
        timeout: Duration,
    },
    #[error("window {window}: {len} bytes at offset {offset} on rank {target} are out of bounds (its window has {window_len} bytes)")]
    WindowOutOfBounds {
        window: u64,
        target: usize,
        offset: u64,
        len: u64,
        window_len: u64,
    },
    #[error("window {window}: atomic at offset {offset} is not 8-byte aligned")]
    Misaligned { window: u64, offset: u64 },
    #[error("unknown window {0} (never allocated, or freed)")]
    UnknownWindow(i64),
    #[error("rank {rank} sent a malformed message: {reason}")]
    Protocol { rank: usize, reason: String },
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    #[error("checkpoint: {0}")]
    Ghost(#[from] GhostError),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("node link {socket}: {reason}")]
    NodeLink { socket: PathBuf, reason: String },
    #[error("DSM: {0}")]
    Dsm(#[from] ::dsm::DsmError),
    #[error("panic inside {call}: {message}")]
    Panic { call: &'static str, message: String },
}

pub type Result<T, E = RankError> = std::result::Result<T, E>;

/// The C error codes (`KRUN_ERR_*` in `krun.h`), all negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ErrorCode {
    NotInitialized = -1,
    Invalid = -2,
    NoSuchRank = -3,
    BadTag = -4,
    Truncated = -5,
    TooLarge = -6,
    OutOfBounds = -7,
    Misaligned = -8,
    UnknownWindow = -9,
    Timeout = -10,
    Fabric = -11,
    Checkpoint = -12,
    Env = -13,
    NodeLink = -14,
    Protocol = -15,
    Panic = -16,
    AlreadyInitialized = -17,
    Dsm = -18,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::NotInitialized,
        ErrorCode::Invalid,
        ErrorCode::NoSuchRank,
        ErrorCode::BadTag,
        ErrorCode::Truncated,
        ErrorCode::TooLarge,
        ErrorCode::OutOfBounds,
        ErrorCode::Misaligned,
        ErrorCode::UnknownWindow,
        ErrorCode::Timeout,
        ErrorCode::Fabric,
        ErrorCode::Checkpoint,
        ErrorCode::Env,
        ErrorCode::NodeLink,
        ErrorCode::Protocol,
        ErrorCode::Panic,
        ErrorCode::AlreadyInitialized,
        ErrorCode::Dsm,
    ];

    pub fn from_code(code: i32) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| *c as i32 == code)
    }

    /// A fixed description (`krun_strerror`).
    pub fn describe(self) -> &'static std::ffi::CStr {
        match self {
            ErrorCode::NotInitialized => c"the rank library is not initialized",
            ErrorCode::Invalid => c"invalid argument",
            ErrorCode::NoSuchRank => c"no such rank",
            ErrorCode::BadTag => c"tag out of range",
            ErrorCode::Truncated => c"message larger than the receive buffer",
            ErrorCode::TooLarge => c"message too large",
            ErrorCode::OutOfBounds => c"window access out of bounds",
            ErrorCode::Misaligned => c"atomic target not 8-byte aligned",
            ErrorCode::UnknownWindow => c"unknown window",
            ErrorCode::Timeout => c"timed out",
            ErrorCode::Fabric => c"fabric error",
            ErrorCode::Checkpoint => c"checkpoint error",
            ErrorCode::Env => c"bad or missing environment setting",
            ErrorCode::NodeLink => c"node link error",
            ErrorCode::Protocol => c"malformed message from a peer",
            ErrorCode::Panic => c"internal error (panic)",
            ErrorCode::AlreadyInitialized => c"already initialized",
            ErrorCode::Dsm => c"distributed shared memory error",
        }
    }
}

impl RankError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RankError::MissingEnv { .. } | RankError::BadEnv { .. } => ErrorCode::Env,
            RankError::NotInitialized => ErrorCode::NotInitialized,
            RankError::AlreadyInitialized => ErrorCode::AlreadyInitialized,
            RankError::InvalidArgument(_) => ErrorCode::Invalid,
            RankError::NoSuchRank { .. } => ErrorCode::NoSuchRank,
            RankError::BadTag { .. } => ErrorCode::BadTag,
            RankError::MessageTooLarge { .. } => ErrorCode::TooLarge,
            RankError::Truncated { .. } => ErrorCode::Truncated,
            RankError::RecvTimeout { .. } => ErrorCode::Timeout,
            RankError::WindowOutOfBounds { .. } => ErrorCode::OutOfBounds,
            RankError::Misaligned { .. } => ErrorCode::Misaligned,
            RankError::UnknownWindow(_) => ErrorCode::UnknownWindow,
            RankError::Protocol { .. } => ErrorCode::Protocol,
            RankError::Fabric(FabricError::Timeout { .. } | FabricError::RecvTimeout { .. }) => {
                ErrorCode::Timeout
            }
            RankError::Fabric(_) => ErrorCode::Fabric,
            RankError::Ghost(_) | RankError::Checkpoint(_) => ErrorCode::Checkpoint,
            RankError::NodeLink { .. } => ErrorCode::NodeLink,
            RankError::Panic { .. } => ErrorCode::Panic,
            RankError::Dsm(::dsm::DsmError::Fabric(
                FabricError::Timeout { .. } | FabricError::RecvTimeout { .. },
            ))
            | RankError::Dsm(::dsm::DsmError::Timeout { .. }) => ErrorCode::Timeout,
            RankError::Dsm(::dsm::DsmError::Fabric(_)) => ErrorCode::Fabric,
            RankError::Dsm(::dsm::DsmError::Config { .. }) => ErrorCode::Invalid,
            RankError::Dsm(_) => ErrorCode::Dsm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_negative_and_described() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!((c as i32) < 0);
            assert!(seen.insert(c as i32), "{c:?} reused");
            assert_eq!(ErrorCode::from_code(c as i32), Some(c));
            assert!(!c.describe().is_empty());
        }
        assert_eq!(ErrorCode::from_code(0), None);
    }
}
