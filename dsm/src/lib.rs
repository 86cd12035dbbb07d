//! Page-based distributed shared memory.
//!
//! - [`coherence`]: the coherence protocol (sequential consistency, single writer / multiple
//!   readers, IVY / Kerrighed containers) as a sans-IO state machine.
//! - [`directory`]: page -> owner, kept by managers located by the cell-tree locator or
//!   `page % N`, registered with the adaptation layer as a service (migration, failure scan).
pub mod coherence;
pub mod directory;
pub mod error;

pub use error::{DsmError, Result};
