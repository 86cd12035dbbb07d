//! Progress of long operations (bars and spinners when stderr is a terminal, plain lines
//! otherwise): the shared `krun-progress` crate, which `bench` uses too.
pub use krun_progress::{line, Mode, Progress};
