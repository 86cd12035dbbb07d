//! High-availability policies, built from the primitives of the Kerrighed HA framework.
//!
//! - [`primitives`]: the kit: events a policy consumes, primitive calls it emits, what it
//!   reads, and the contract krund honours when it drives a policy.
//! - [`policy`]: the [`Policy`] trait (sans-IO, deterministic).
//! - [`coordinated`]: the coordinated checkpoint policy (barrier, capture all, commit when
//!   safe; on a failure survivors roll back in place and lost ranks restart on a spare).
//! - [`interval`]: Young's and Daly's checkpoint intervals.
//! - [`report`]: lines and a summary for users.
//! - [`engine`]: the adapter krund uses: actions become calls on its [`engine::Runtime`].
//!
//! Every policy is tested in a seeded simulation (`tests/simulation.rs`).
pub mod coordinated;
pub mod engine;
pub mod error;
pub mod interval;
pub mod policy;
pub mod primitives;
pub mod report;

pub use coordinated::{Config, Coordinated, IntervalChoice, NoSpare};
pub use error::PolicyError;
pub use policy::{Phase, Policy};
pub use primitives::{Action, Decision, DecisionId, DecisionKind, Event, Reads};
