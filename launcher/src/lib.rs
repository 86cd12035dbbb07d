//! The launcher: `krun` starts one `krund` per node and runs a job across them; `krund` is
//! the node runtime (fabric endpoint now; DSM, checkpoint store and policies later).
//!
//! Local mode (`krun --local K`) starts K node daemons on this machine, wires them together
//! through the bootstrap service and streams their output back. Host and Slurm modes come
//! with the launcher issue.
pub mod added_nodes;
pub mod binding;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod exchange;
pub mod ghost_cli;
pub mod hostlist;
pub mod inject;
pub mod job;
pub mod node_proc;
pub mod progress;
pub mod ranks;
pub mod runtime;
pub mod slurm;
pub mod topology;

pub use error::LauncherError;
