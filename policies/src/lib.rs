//! High-availability policies, built from the primitives of the Kerrighed HA framework.
//!
//! - [`primitives`]: the kit: events a policy consumes, primitive calls it emits, what it
//!   reads, and the contract krund honours when it drives a policy.
//! - [`policy`]: the [`Policy`] trait (sans-IO, deterministic).
//! - [`coordinated`]: the coordinated checkpoint policy (barrier, capture all, commit when
//!   safe; on a failure survivors roll back in place and lost ranks restart on a spare).
//! - [`uncoordinated`]: each rank checkpoints alone on its own schedule; with sender-based
//!   message logging only the lost ranks restart and replay, without it the recovery line
//!   from the dependency graph names who rolls back (and the rollback depth).
//! - [`interval`]: Young's and Daly's checkpoint intervals.
//! - [`model`]: analytic makespan models of each policy (Daly's for the coordinated one).
//! - [`report`]: lines and a summary for users.
//! - [`simulator`]: a seeded discrete-event simulator of a job under each policy, with
//!   exponential or Weibull failure traces.
//! - [`engine`]: the adapter krund uses: actions become calls on its [`engine::Runtime`].
//!
//! Every policy is tested in a seeded simulation (`tests/simulation.rs`,
//! `tests/uncoordinated_sim.rs`).
//!
//! # Driving a policy
//!
//! krund (or a test) feeds events and carries out the actions; here, one checkpoint:
//!
//! ```
//! use policies::coordinated::{Config, Coordinated, IntervalChoice};
//! use policies::primitives::{AgreedView, ImageCopy, Layout, Level, Rank, Reads, Version};
//! use policies::{Action, Event, Policy};
//!
//! struct NoCopies;
//! impl Reads for NoCopies {
//!     fn copies(&self, _: Rank, _: Version) -> Vec<ImageCopy> {
//!         Vec::new()
//!     }
//! }
//!
//! let cfg = Config { interval: IntervalChoice::Fixed { ms: 1000 }, ..Config::default() };
//! let layout = Layout { ranks: vec![0, 1], spares: vec![2] };
//! let mut p = Coordinated::new(cfg, 0, &layout, AgreedView::new(1, vec![0, 1, 2]), 0).unwrap();
//! assert_eq!(p.next_deadline(), Some(1000));
//!
//! let actions = p.on_event(1000, Event::Tick, &NoCopies);
//! let Some(Action::Synchronize { op, ranks }) = actions.last().cloned() else { panic!() };
//! assert_eq!(ranks, vec![0, 1]);
//! let captures = p.on_event(1001, Event::Synchronized { op }, &NoCopies);
//! assert_eq!(captures.len(), 2);
//! for rank in 0..2 {
//!     p.on_event(1002, Event::CaptureDone { op, rank, version: 1, bytes: 1 << 20, seconds: 0.1 }, &NoCopies);
//!     p.on_event(1010, Event::LevelSafe { rank, version: 1, level: Level::L2 }, &NoCopies);
//! }
//! assert_eq!(p.recovery_line(), Some(1));
//! println!("{}", p.summary()); // 1 checkpoint, 2.0 MiB, 0.00 s held in them; ...
//! ```
pub mod coordinated;
pub mod description;
pub mod engine;
pub mod error;
pub mod interval;
pub mod model;
pub mod module;
pub mod plug;
pub mod policy;
pub mod primitives;
pub mod report;
pub mod simulator;
pub mod uncoordinated;

pub use coordinated::{Config, Coordinated, IntervalChoice, NoSpare};
pub use error::PolicyError;
pub use plug::make_policy;
pub use policy::{Phase, Policy};
pub use primitives::{Action, Decision, DecisionId, DecisionKind, Event, Reads};
