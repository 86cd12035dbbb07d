//! Adaptation layer: nodes join, leave and fail while jobs run, and every distributed service
//! keeps working without knowing it happened (Gobelins/Kerrighed, INRIA RR-4347).
//!
//! - [`membership`]: failure detection (SWIM with suspicion and incarnations, via `foca`).
//! - [`agreement`]: configuration changes committed by Raft (`raft-rs`) among a small set of
//!   supervisors before any node acts on them.
//! - [`locator`]: a tree of cells; inside a cell an array gives an entry's manager in O(1);
//!   a change of membership touches one cell.
//! - [`service`]: the plug-in interface a distributed service registers (migration callbacks
//!   and the failure scan).
//! - [`protocol`]: the sans-IO node state machine: agreed views, the 4-step migration with
//!   acknowledgements, failure repair, delayed and forwarded requests.
//! - [`wire`]: versioned, HMAC-authenticated messages.
//!
//! [`kv`] is a toy key-value service used by the tests and the benchmark.
//!
//! Everything protocol-related is a deterministic state machine (events in, actions out); the
//! simulation in `tests/simulation.rs` and the daemon drive the same code.
pub mod agreement;
pub mod cli;
pub mod daemon;
pub mod error;
pub mod kv;
pub mod locator;
pub mod membership;
pub mod protocol;
pub mod service;
pub mod view;
pub mod wire;

pub use error::{AdaptError, Result};
pub use view::{Change, EntryId, Epoch, NodeId};
