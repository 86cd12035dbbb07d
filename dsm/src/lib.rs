//! Page-based distributed shared memory over one-sided RDMA.
//!
//! - [`coherence`]: the coherence protocol (sequential consistency, single writer / multiple
//!   readers, IVY / Kerrighed containers) as a sans-IO state machine.
//! - [`directory`]: page -> owner, kept by managers located by the cell-tree locator or
//!   `page % N`, registered with the adaptation layer as a service (migration, failure scan).
//! - [`fault`]: the driver: userfaultfd faults, protocol messages and one-sided page reads
//!   through `fabric`.
//! - [`mgs`]: Modified Gram-Schmidt on the DSM (the seed's evaluation application).
//! - [`region`]: the collective API: [`Dsm::alloc`] / [`Dsm::free`] of regions mapped at the
//!   same address on every rank, a DSM lock and a barrier.
pub mod coherence;
pub mod directory;
pub mod error;
pub mod fault;
pub mod lock;
pub mod mgs;
pub mod region;
pub mod uffd;

pub use directory::LocatorKind;
pub use error::{DsmError, Result};
pub use fault::members::{ChangeReport, ViewChange, PHASES};
pub use region::{Collective, Dsm, DsmConfig, SharedRegion};
