//! Multi-host test harness for krun.
//!
//! * [`NetnsCluster`]: `n` "hosts" on one machine, each a network namespace with its own
//!   address on a private bridge, with the host-side route guard DESIGN.md asks for, fault
//!   helpers ([`kill_process`], [`NetnsCluster::cut_link`], [`NetnsCluster::restore_link`]) and
//!   a `Drop` that removes every namespace, veth, bridge and route it created and kills, by
//!   PID, the processes it started.
//! * `cluster-tests/slurm/cluster.sh`: a local multi-node Slurm (see its header) for tests of
//!   krun's Slurm mode, driven from Rust through [`SlurmCluster`];
//!   `cluster-tests/slurm/smoke.sh` checks it.
//! * [`campaign`]: seeded fault campaigns (a random node SIGKILLed at a random time) and
//!   runs of a job with every output line time-stamped (shared with `bench ha`).
//! * [`hosts`]: namespace hosts running a `krund --listen` each, for krun's host-list mode.
//! * [`kv`]: a cluster of real `krun-adapt` daemons with key-value clients that check
//!   exactly-once answers and read every key back (adaptation tests, `bench faults`).
//! * `krun-netns-probe`: a tiny bounded TCP echo server / client to check reachability.
//!
//! Everything here needs root; [`require_root`] gives a clear error otherwise.
//!
//! ```no_run
//! use cluster_tests::NetnsCluster;
//! use std::process::Command;
//!
//! let c = NetnsCluster::create(3, None)?; // 10.200.x.1 .. 10.200.x.3
//! let server = c.node(0)?.spawn(Command::new("sleep").arg("5"))?;
//! c.cut_link(2)?; // node 2 is partitioned
//! c.restore_link(2)?;
//! cluster_tests::kill_process(server.pid(), libc::SIGKILL)?;
//! drop(c); // namespaces, bridge, guard route gone; leftover processes killed
//! # Ok::<(), cluster_tests::ClusterError>(())
//! ```

pub mod campaign;
mod error;
pub mod hosts;
pub mod kv;
mod netns;
mod process;
mod slurm;

pub use error::{ClusterError, Result};
pub use netns::{
    host_routes_for, list_netns, reap_stale, require_root, NetnsCluster, Node, NETNS_PREFIX,
    STATE_DIR,
};
pub use process::{kill_process, NodeProcess};
pub use slurm::SlurmCluster;

/// A binary of this workspace next to the running test (`target/<profile>/NAME`); the test
/// suite builds them first (`cargo build --workspace`).
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        bin.exists(),
        "\n\n*** {} is missing: cargo build --workspace first ***\n",
        bin.display()
    );
    bin
}
