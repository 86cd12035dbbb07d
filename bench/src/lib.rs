//! krun benchmarks. The `bench` binary runs `bench <subcommand>`; each subcommand is one
//! module here, printing a table and writing `bench/results/<subcommand>.json`. Shared table
//! printing, JSON writing and argument parsing live in [`report`].
pub mod ckpt;
pub mod dsm;
pub mod fabric;
pub mod ha;
pub mod l4;
pub mod launch;
pub mod launch_slurm;
pub mod locator;
pub mod logging;
pub mod plot;
pub mod policies;
pub mod rank;
pub mod reconfig;
pub mod report;
