//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building, using or tearing down a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The harness creates namespaces, veths, bridges and routes: it needs root.
    #[error(
        "cluster-tests needs root (euid {euid}): network namespaces, veths and host routes \
         cannot be created otherwise; run the tests as root (CI does)"
    )]
    NotRoot {
        /// The effective uid we run with.
        euid: u32,
    },

    /// A cluster needs at least one node and at most 253 (one /24 per cluster).
    #[error("invalid node count {n}: a cluster has 1..=253 nodes")]
    InvalidNodeCount {
        /// The requested count.
        n: usize,
    },

    /// A node index outside `0..len`.
    #[error("no node {index} in cluster {cluster} ({len} nodes)")]
    NoSuchNode {
        /// The cluster id.
        cluster: String,
        /// The requested index.
        index: usize,
        /// Nodes in the cluster.
        len: usize,
    },

    /// The caller asked for a subnet that is outside 10.200.0.0/16 or already routed on the host.
    #[error("subnet {subnet} cannot be used: {reason}")]
    SubnetUnavailable {
        /// The subnet, e.g. `10.200.7.0/24`.
        subnet: String,
        /// Why not.
        reason: String,
    },

    /// Every 10.200.x.0/24 already has a route on the host (other clusters or other tools).
    #[error("no free 10.200.x.0/24 subnet: all {tried} candidates are already routed on the host")]
    NoFreeSubnet {
        /// How many subnets were tried.
        tried: usize,
    },

    /// An external command (`ip`, ...) could not be started.
    #[error("could not run `{cmd}`: {source}")]
    CommandStart {
        /// The command line.
        cmd: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// An external command (`ip`, ...) exited with a failure.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        cmd: String,
        /// Its exit status, as text.
        status: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },

    /// Opening a namespace file or another path failed.
    #[error("{what} {path}: {source}")]
    Path {
        /// What we tried to do.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Spawning a process inside a node failed.
    #[error("spawning {program:?} in node {node} ({netns}): {source}")]
    Spawn {
        /// Node index.
        node: usize,
        /// The node's network namespace.
        netns: String,
        /// The program.
        program: String,
        /// The OS error (from fork/exec or from setns in the child).
        #[source]
        source: io::Error,
    },

    /// Sending a signal failed.
    #[error("kill({pid}, {signal}): {source}")]
    Signal {
        /// Target PID.
        pid: u32,
        /// Signal number.
        signal: i32,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Waiting for a process failed.
    #[error("waiting for pid {pid}: {source}")]
    Wait {
        /// The PID.
        pid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// Entering a namespace from a thread failed.
    #[error("setns into {netns}: {source}")]
    Setns {
        /// The namespace name.
        netns: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A job run by the HA campaign (or `bench ha`) did not end in time or could not be read.
    #[error("job `{cmd}`: {reason}")]
    Job {
        /// The command line.
        cmd: String,
        /// What went wrong.
        reason: String,
    },

    /// A cluster of `krun-adapt` daemons ([`crate::kv`]) did not do what was awaited.
    #[error("krun-adapt daemons: {reason}")]
    Daemons {
        /// What was awaited, and each daemon's last state.
        reason: String,
    },

    /// A thread started in a node panicked.
    #[error("thread in node {node} panicked")]
    ThreadPanicked {
        /// Node index.
        node: usize,
    },
}

/// Result alias of this crate.
pub type Result<T, E = ClusterError> = std::result::Result<T, E>;
