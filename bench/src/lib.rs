//! krun benchmarks. The `bench` binary runs `bench <subcommand>`; each subcommand is one
//! module here, printing a table and writing `bench/results/<subcommand>.json`. Shared table
//! printing and JSON writing live in [`report`]; the command line (clap) in [`cli`], each
//! subcommand's options beside its code; one progress bar per benchmark over its runs in
//! [`runs`].
pub mod ckpt;
pub mod cli;
pub mod dsm;
pub mod fabric;
pub mod faults;
pub mod ha;
pub mod l4;
pub mod launch;
pub mod launch_slurm;
pub mod locator;
pub mod logging;
pub mod mgs;
pub mod mgs_addition;
pub mod plot;
pub mod policies;
pub mod rank;
pub mod reconfig;
pub mod report;
pub mod runs;
