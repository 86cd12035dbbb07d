//! The rank library: what the ranks of a krun job link, in Rust (`krun::...`), C
//! (`libkrun.so` + `rank/include/krun.h`) and Fortran (`rank/include/krun.f90`).
//!
//! - init and finalize, rank and size ([`Rank`]);
//! - a barrier through the fabric (dissemination, [`Rank::barrier`]);
//! - tagged two-sided messages: send, receive from one rank or from any rank
//!   ([`messages`], the one place every message passes, where an [`Observer`] watches);
//! - one-sided put, get, fetch-add and compare-swap on collectively allocated windows of
//!   registered memory ([`Window`]);
//! - collective checkpoint, safepoint and restore-on-start through the ghost native
//!   checkpointer ([`checkpoint`]); libghost's C functions (`krun_ghost_*`) stay available;
//! - distributed shared memory: regions at the same address on every rank, pages moved on
//!   demand with sequential consistency, a DSM lock and barrier ([`dsm`], [`Rank::dsm`]);
//! - the link to the local krund ([`node_link`]), and rollback in place on its order at any
//!   moment ([`rollback`]);
//! - sender-based pessimistic message logging for uncoordinated checkpoints: payloads kept
//!   by senders, determinants written to a buddy by one-sided RMA before each delivery, a
//!   lost rank rejoins and replays while the others keep running ([`logging`]).
//!
//! Each rank opens its own fabric endpoint and swaps addresses through the job's bootstrap
//! all-gather; ranks then talk to each other directly.
//!
//! ```no_run
//! use krun::{Rank, Source, TagMatch};
//! let rank = Rank::init()?;
//! let right = (rank.rank() + 1) % rank.size();
//! rank.send(right, 7, b"hello")?;
//! let m = rank.recv(Source::Any, TagMatch::Tag(7))?;
//! println!("rank {} got {:?} from {}", rank.rank(), m.data, m.src);
//! rank.finalize()?;
//! # Ok::<(), krun::RankError>(())
//! ```
pub mod capi;
pub mod checkpoint;
pub mod dsm;
pub mod error;
pub mod log_region;
pub mod logging;
pub mod messages;
pub mod node_link;
mod pacer;
pub mod rollback;
pub mod trace;
pub mod uncoordinated;
pub mod window;
pub mod world;

pub use checkpoint::{CheckpointConfig, Safepoint};
pub use dsm::{DsmRegion, DsmStats, SharedMemory};
pub use error::{ErrorCode, RankError, Result};
pub use logging::{LogStats, Rejoining};
pub use messages::{Observer, Received, Source, TagMatch, INTERNAL_TAG_BASE, MAX_TAG};
pub use window::{Span, Window};
pub use world::{Config, Rank};

// libghost's C ABI is part of libkrun.so: keep the dependency's exported symbols linked in.
#[doc(hidden)]
pub use ghost::capi as ghost_capi;
