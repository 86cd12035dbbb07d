//! The one error type of the fabric crate.
use std::time::Duration;

use crate::PeerId;

/// Everything that can go wrong in the fabric layer. Variants name what failed: the
/// provider, the peer, the key, the operation.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    #[error("unknown fabric provider {0:?} (expected tcp, shm, verbs, loopback or auto)")]
    UnknownProvider(String),
    #[error("fabric provider {provider} is not available on this machine: {reason}")]
    ProviderUnavailable { provider: String, reason: String },
    #[error("invalid configuration {key}={value:?}: {reason}")]
    BadConfig {
        key: String,
        value: String,
        reason: String,
    },
    #[error("{call} failed on provider {provider}: {message} (error {code})")]
    Call {
        provider: String,
        call: &'static str,
        code: i64,
        message: String,
    },
    #[error("malformed endpoint address: {0}")]
    BadAddress(String),
    #[error("address is for provider {found}, this endpoint uses {expected}")]
    ProviderMismatch { expected: String, found: String },
    #[error("unknown peer {0}")]
    UnknownPeer(PeerId),
    #[error("cannot register {len} bytes: {reason}")]
    Registration { len: usize, reason: String },
    #[error("access out of bounds: offset {offset} + length {len} exceeds the {what} region of {region_len} bytes")]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
        region_len: u64,
    },
    #[error("atomic target offset {0} is not 8-byte aligned")]
    Misaligned(u64),
    #[error("{op} to peer {peer} failed: {message}")]
    Remote {
        op: &'static str,
        peer: PeerId,
        message: String,
    },
    #[error("{op} to peer {peer} rejected by the target: bad key {key:#x} or address range")]
    RemoteAccess {
        op: &'static str,
        peer: PeerId,
        key: u64,
    },
    #[error("{op} to peer {peer} did not complete within {timeout:?} (peer dead or unreachable?)")]
    Timeout {
        op: &'static str,
        peer: PeerId,
        timeout: Duration,
    },
    #[error("no message with tag {tag:#x} arrived within {timeout:?}")]
    RecvTimeout { tag: u64, timeout: Duration },
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    MessageTooLarge { len: usize, max: usize },
    #[error("endpoint is shut down")]
    Closed,
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("{protocol} frame: {what}")]
    WireMalformed {
        protocol: &'static str,
        what: String,
    },
    #[error("{protocol} frame of {len} bytes exceeds the limit of {max} bytes")]
    WireTooLarge {
        protocol: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{protocol} frame failed authentication (wrong cluster secret, forged or altered)")]
    WireAuth { protocol: &'static str },
    #[error("{protocol} frame replayed or out of order: sequence {seq}, expected {expected}")]
    WireReplay {
        protocol: &'static str,
        seq: u64,
        expected: u64,
    },
    #[error("the peer closed the {protocol} connection")]
    WireClosed { protocol: &'static str },
    #[error("the peer refused the {protocol} connection: {reason}")]
    WireRefused {
        protocol: &'static str,
        reason: String,
    },
    #[error("the operating system's random source failed: {0}")]
    Random(std::io::Error),
    #[error("I/O error during {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl FabricError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        FabricError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = FabricError> = std::result::Result<T, E>;
