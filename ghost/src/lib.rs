//! Ghost processes: capture a process into an image, restore it as a new process, roll a live
//! one back, or migrate it, behind one checkpointer API over several checkpointers (CRIU for
//! transparent capture, a native one for runtime-registered memory).
pub mod capi;
pub mod checkpointer;
pub mod criu;
pub mod descriptors;
pub mod error;
pub mod image;
pub mod native;
mod uffd;

pub use checkpointer::{Backend, CaptureOptions, Captured, Checkpointer, RestoreOptions, Restored};
pub use error::{GhostError, Result};
