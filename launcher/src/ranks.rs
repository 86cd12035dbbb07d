//! Running a job's ranks on one node: what a node runs and the messages about its ranks
//! (here), placement across nodes (`placement.rs`), starting a rank without copying the
//! daemon (`spawn.rs`), output forwarding (`output.rs`), signals (`signals.rs`) and the
//! runner that starts, watches and ends the ranks (`runner.rs`).
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use crate::binding::BindTo;

mod output;
mod placement;
mod runner;
mod signals;
pub mod spawn;

pub use output::{copy_lines, for_each_line, OutputHub};
pub use placement::Placement;
pub use runner::run_share;
pub use signals::{
    catch_checkpoint_requests, catch_forwarded_signals, killed_ranks_reported, signal_name,
    spare_signalled, take_checkpoint_requests, take_signal,
};

/// What one node runs.
#[derive(Debug, Clone)]
pub struct NodeShare {
    pub node_id: usize,
    pub nnodes: usize,
    pub first_rank: usize,
    pub local_size: usize,
    pub size: usize,
    pub tag_output: bool,
    pub program: Vec<String>,
    /// Environment added for every rank (e.g. the address to bind the fabric to).
    pub env: Vec<(String, String)>,
    pub bind_to: BindTo,
    pub report_bindings: bool,
    /// How this node's ranks sit on the machine: nodes of a job may share one (containers,
    /// network namespaces, `--local`); see [`MachineShare`].
    pub machine: MachineShare,
    /// Where rank starts and exits are reported (the node runtime's process table).
    pub events: Option<std::sync::mpsc::Sender<RankEvent>>,
    /// A spare's share (no ranks of its own): it waits for ranks moved in until this is
    /// set (krun stopped the node), instead of ending at once.
    pub stay: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// A rank that fails (non-zero exit) is held back this long before it counts (its
    /// node's exit code, the process table): a recovery may restart it meanwhile (its peers
    /// on a failed node are gone). `None`: it counts at once.
    pub exit_grace: Option<Duration>,
    /// Ranks moved to or from this node while the share runs.
    pub commands: Option<std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<RankCommand>>>>,
    /// Called before each rank starts: environment and a descriptor it keeps (the node's
    /// PMI server, `runtime/pmi.rs`).
    pub rank_setup: Option<crate::runtime::pmi::RankSetup>,
    /// Told once the node's own ranks have all been started (krund's checkpoint store
    /// counts its delay from then, not from the node's start).
    pub started: Option<std::sync::mpsc::Sender<()>>,
}

/// This node's ranks among all the job's ranks on the same machine (nodes that share a
/// kernel). Pinning counts them all: the first of this node's ranks takes the machine's
/// `offset`-th domain, and when the machine has more ranks than domains nobody is pinned
/// (several busy ranks forced onto one core starve each other and the node's daemons,
/// while unpinned the kernel spreads them), as Open MPI does when oversubscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineShare {
    /// Ranks of co-located nodes before this node's.
    pub offset: usize,
    /// Ranks of the job on this machine, this node's included (0: only this node's).
    pub ranks: usize,
}

impl MachineShare {
    /// From every node's machine identity and rank count (node order): the nodes whose
    /// identity equals ours share the machine.
    pub fn among(node: usize, machines: &[Vec<u8>], counts: &[usize]) -> MachineShare {
        let mine = &machines[node];
        let same = |n: &usize| machines.get(*n) == Some(mine) && !mine.is_empty();
        MachineShare {
            offset: (0..node).filter(same).map(|n| counts[n]).sum(),
            ranks: (0..counts.len()).filter(same).map(|n| counts[n]).sum(),
        }
    }
}

/// This machine's identity: the kernel's boot id (shared by containers and namespaces of
/// one host, distinct between hosts); empty when it cannot be read.
pub fn machine_id() -> Vec<u8> {
    std::fs::read("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim_ascii().to_vec())
        .unwrap_or_default()
}

/// A rank started or ended on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankEvent {
    Started {
        rank: usize,
        pid: u32,
    },
    Exited {
        rank: usize,
        code: i32,
    },
    /// The rank was killed by `signal`, not by its node (sent before its `Exited`).
    Killed {
        rank: usize,
        signal: i32,
    },
    /// The node got SIGUSR1 (a scheduler's "checkpoint now"): krun's policy is asked.
    CheckpointAsked,
}

pub use fabric::ofi::remove_shm_segments;

/// Exit code as srun reports it: the status code, or 128 + signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// What the node runtime asks of a running share: take a rank moved here, or let one go.
#[derive(Debug)]
pub enum RankCommand {
    /// Start `rank` here with `env` added (e.g. `KRUN_GHOST_RESTORE=latest`); the answer is
    /// its pid. A process of the same rank still running here is killed first (a recovery
    /// restarts a rank whose live process did not take its rollback order), and an exit of
    /// it held back ([`NodeShare::exit_grace`]) is forgotten.
    Adopt {
        rank: usize,
        env: Vec<(String, String)>,
        reply: std::sync::mpsc::Sender<std::result::Result<u32, String>>,
    },
    /// `rank` is leaving this node: its end is not its exit (no code, no event). The answer
    /// is its pid.
    Release {
        rank: usize,
        reply: std::sync::mpsc::Sender<std::result::Result<u32, String>>,
    },
    /// The job is over for this node (its krun is gone): every rank gets SIGTERM, then
    /// SIGKILL after [`TERMINATE_GRACE`]; the share ends with exit code 1.
    Terminate { reason: String },
    /// Bring `rank` here by running `start` on the runner's own thread (a CRIU restore: the
    /// restored root becomes a child of the calling thread, and its parent-death signal
    /// follows that thread, so it must be the long-lived runner); `start` returns the pid of
    /// that child, which is then waited for, signalled and ended like the node's own ranks.
    Watch {
        rank: usize,
        start: StartFn,
        reply: std::sync::mpsc::Sender<std::result::Result<u32, String>>,
    },
}

/// How a watched rank's process is brought up ([`RankCommand::Watch`]): given the write
/// ends of new pipes for its standard output and error (forwarded like a spawned rank's,
/// valid during the call), it returns the process's pid.
pub struct StartFn(pub Box<dyn FnOnce(RankPipes) -> std::result::Result<u32, String> + Send>);

/// The write ends of a watched rank's output pipes ([`StartFn`]).
#[derive(Clone, Copy, Debug)]
pub struct RankPipes {
    pub stdout: std::os::fd::RawFd,
    pub stderr: std::os::fd::RawFd,
}

impl std::fmt::Debug for StartFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartFn")
    }
}

/// How long ranks told to end (SIGTERM) have before they are killed.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(5);

/// The owner of a rank's native checkpoints under krun: stable across moves, so a rank
/// restarted elsewhere finds its images (`KRUN_GHOST_OWNER`, when the user set none).
pub fn ghost_owner(job: &str, rank: usize) -> String {
    format!("krun-job{job}/rank{rank}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_share_counts_only_the_nodes_on_the_same_kernel() {
        let a = b"boot-a".to_vec();
        let b = b"boot-b".to_vec();
        let machines = [a.clone(), b.clone(), a.clone(), a, b];
        let counts = [2, 3, 4, 1, 5];
        assert_eq!(
            MachineShare::among(2, &machines, &counts),
            MachineShare {
                offset: 2,
                ranks: 7
            }
        );
        assert_eq!(
            MachineShare::among(4, &machines, &counts),
            MachineShare {
                offset: 3,
                ranks: 8
            }
        );
        // An unknown identity shares with nobody.
        let machines = [Vec::new(), Vec::new()];
        assert_eq!(
            MachineShare::among(1, &machines, &[2, 2]),
            MachineShare {
                offset: 0,
                ranks: 0
            }
        );
    }
}
