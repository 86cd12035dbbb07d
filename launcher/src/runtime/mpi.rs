//! What krund's MPI servers share (PMI-1 in `pmi.rs`, PMIx in `pmix.rs`): their reports
//! to krun and its answers, `--mpi`, the hook that sets up each rank, and krun's
//! [`Coordinator`] (in the hub, `mpi/coordinator.rs`) that gathers fences across nodes for
//! both wires, ends the job on an abort or a rank lost, and fails a fence a gone rank never
//! joins.
use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{LauncherError, Result};
use crate::ranks::RankEvent;

mod coordinator;
pub use coordinator::{exit_status, Action, Coordinator};

/// Which wire protocol a fence, an abort or a report belongs to: krund may serve both at
/// once (MPICH speaks PMI-1, Open MPI PMIx); their fences are counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Wire {
    Pmi1,
    Pmix,
}

impl Wire {
    pub fn name(self) -> &'static str {
        match self {
            Wire::Pmi1 => "PMI",
            Wire::Pmix => "PMIx",
        }
    }
}

/// What a node contributes to a fence, and what krun hands back: PMI-1's key-value puts,
/// or PMIx's opaque per-node blobs (the PMIx server library packs its local ranks' data
/// and unpacks every node's; krun only gathers them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceData {
    Puts(Vec<(String, String)>),
    Blobs(Vec<Vec<u8>>),
}

impl FenceData {
    pub fn wire(&self) -> Wire {
        match self {
            FenceData::Puts(_) => Wire::Pmi1,
            FenceData::Blobs(_) => Wire::Pmix,
        }
    }

    /// Adds another node's contribution (of the same wire; a mismatch is dropped).
    fn extend(&mut self, other: FenceData) {
        match (self, other) {
            (FenceData::Puts(a), FenceData::Puts(b)) => a.extend(b),
            (FenceData::Blobs(a), FenceData::Blobs(b)) => a.extend(b),
            _ => {}
        }
    }

    fn empty(wire: Wire) -> FenceData {
        match wire {
            Wire::Pmi1 => FenceData::Puts(Vec::new()),
            Wire::Pmix => FenceData::Blobs(Vec::new()),
        }
    }
}

/// A node's PMI report to `krun`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PmiToLauncher {
    /// Every local rank of the node entered fence `seq` of `data`'s wire; `data` is the
    /// node's contribution (PMI-1: its puts since the previous fence).
    Fence {
        seq: u64,
        ranks: Vec<u32>,
        data: FenceData,
    },
    /// PMIx: every local rank of the node among `group` (a part of the job's ranks,
    /// ascending) entered the node's fence `seq` over that group (numbered per group from
    /// 1); `data` is the node's blob for it. Nodes with no rank in the group take no part.
    GroupFence {
        group: Vec<u32>,
        seq: u64,
        ranks: Vec<u32>,
        data: FenceData,
    },
    /// `rank` called abort (MPI_Abort) with `code`.
    Abort { wire: Wire, rank: u32, code: i32 },
    /// `rank` exited with `code` without finalize; `initialized`: it had called init (of
    /// either wire).
    Lost {
        rank: u32,
        code: i32,
        initialized: bool,
    },
    /// PMIx direct modex: a local rank asks for `rank`'s data, which node `node` holds;
    /// `id` names the request at the asking node.
    DmodexAsk {
        node: adaptation::NodeId,
        id: u64,
        rank: u32,
    },
    /// The answer to a direct modex request from node `to` (`None`: the data is not there).
    DmodexData {
        to: adaptation::NodeId,
        id: u64,
        data: Option<Vec<u8>>,
    },
    /// `msg` from the node's MPI servers in wiring epoch `wiring` (the job's incarnation
    /// for MPI: 0 at the start, then the recovery's epoch once every rank was restarted,
    /// `runtime/mpi_recovery.rs`). krun drops what an older incarnation's ranks said.
    Wired {
        wiring: u64,
        msg: Box<PmiToLauncher>,
    },
}

/// `krun`'s answer to a fence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PmiToNode {
    /// Fence `seq` completed: every node's contribution to it.
    Fenced { seq: u64, data: FenceData },
    /// Fence `seq` of `wire` cannot complete (krun ends the job).
    FenceFailed {
        wire: Wire,
        seq: u64,
        reason: String,
    },
    /// PMIx fence `seq` over `group` completed: the contributions of the nodes that hold
    /// the group's ranks.
    GroupFenced {
        group: Vec<u32>,
        seq: u64,
        data: FenceData,
    },
    /// PMIx fence `seq` over `group` cannot complete (krun ends the job).
    GroupFenceFailed {
        group: Vec<u32>,
        seq: u64,
        reason: String,
    },
    /// PMIx direct modex: node `from` asks for `rank`'s data (request `id`).
    DmodexAsk {
        from: adaptation::NodeId,
        id: u64,
        rank: u32,
    },
    /// The answer to this node's direct modex request `id`.
    DmodexData { id: u64, data: Option<Vec<u8>> },
}

/// Which MPI wire protocols krund serves its ranks (`krun --mpi`, passed to nodes as
/// `KRUN_MPI`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpiMode {
    /// Both (the default): PMI-1 over `PMI_FD` for MPICH, PMIx (its `PMIX_*` environment
    /// and the node's PMIx server socket) for Open MPI. Each library reads only its own.
    Both,
    /// PMI over `PMI_FD`: the simple PMI-1 wire protocol (MPICH) and PMI-2's (Slurm's
    /// libpmi2, MPICH built for PMI-2), the client choosing in its first line.
    Pmi1,
    /// PMIx through OpenPMIx's server library (Open MPI).
    Pmix,
    None,
}

impl std::str::FromStr for MpiMode {
    type Err = LauncherError;
    fn from_str(s: &str) -> Result<MpiMode> {
        match s {
            "both" | "auto" => Ok(MpiMode::Both),
            // One server on PMI_FD speaks both PMI-1 and PMI-2 (the client picks).
            "pmi1" | "pmi2" | "pmi" => Ok(MpiMode::Pmi1),
            "pmix" => Ok(MpiMode::Pmix),
            "none" => Ok(MpiMode::None),
            other => Err(LauncherError::Usage(format!(
                "--mpi {other:?}: expected both, pmi (or pmi1, pmi2), pmix or none"
            ))),
        }
    }
}

impl MpiMode {
    pub fn name(self) -> &'static str {
        match self {
            MpiMode::Both => "both",
            MpiMode::Pmi1 => "pmi1",
            MpiMode::Pmix => "pmix",
            MpiMode::None => "none",
        }
    }

    pub fn pmi1(self) -> bool {
        matches!(self, MpiMode::Both | MpiMode::Pmi1)
    }

    pub fn pmix(self) -> bool {
        matches!(self, MpiMode::Both | MpiMode::Pmix)
    }

    /// `KRUN_MPI` (unset: both).
    pub fn from_env() -> Result<MpiMode> {
        match std::env::var("KRUN_MPI") {
            Ok(v) if !v.trim().is_empty() => v.trim().parse(),
            _ => Ok(MpiMode::Both),
        }
    }
}

/// What the rank runner adds to one rank's start: environment, and a descriptor the rank
/// keeps across exec (see `ranks::spawn_rank`).
pub struct RankExtras {
    pub env: Vec<(String, String)>,
    pub keep_fd: Option<OwnedFd>,
}

type SetupFn = dyn Fn(usize) -> Result<RankExtras> + Send + Sync;

/// A hook called before each rank starts (the node's PMI server).
#[derive(Clone)]
pub struct RankSetup(pub Arc<SetupFn>);

impl std::fmt::Debug for RankSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RankSetup")
    }
}

/// Sends a node's report to krun.
pub type Teller = Arc<dyn Fn(PmiToLauncher) + Send + Sync>;

/// Where a rank is with one wire's server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireState {
    /// It called init (PMI-1) or connected (PMIx).
    pub initialized: bool,
    /// It called finalize or abort: its exit is expected.
    pub done: bool,
}

/// A node's MPI server (PMI-1's, PMIx's), as krun's messages and the rank runner's events
/// reach it.
pub trait RankWatch: Send + Sync {
    /// krun's message (each server takes its own wire's).
    fn deliver(&self, _msg: PmiToNode) {}
    /// Where `rank` is with this server.
    fn state(&self, rank: u32) -> WireState;
    /// `rank` ended (after [`RankWatch::state`] was read): forget it.
    fn ended(&self, _rank: u32) {}
    /// Some rank ever used this server (in any incarnation): the node runs an MPI job, whose
    /// ranks a recovery restarts as new processes (`runtime/mpi_recovery.rs`).
    fn used(&self) -> bool {
        false
    }
    /// Every rank of the job restarts in wiring epoch `wiring`, rank `r` on node
    /// `placement[r]`: serve that incarnation from now on (new namespace, fences from 1,
    /// this node's new local ranks); the older incarnation's ranks are not served any more.
    fn reincarnate(&self, _wiring: u64, _placement: &[adaptation::NodeId]) -> Result<()> {
        Ok(())
    }
}

/// Passes every rank event to the node's MPI servers, then on to `next` (the node
/// runtime): a rank that exits without finalize (with every wire served) is reported to
/// krun once.
pub fn tee_events(
    servers: Vec<Arc<dyn RankWatch>>,
    tell: Teller,
    next: std::sync::mpsc::Sender<RankEvent>,
) -> std::sync::mpsc::Sender<RankEvent> {
    let (tx, rx) = std::sync::mpsc::channel::<RankEvent>();
    std::thread::spawn(move || {
        // The runtime reports a killed rank itself (RankKilled ends the job).
        let mut killed = BTreeSet::new();
        for e in rx {
            match e {
                RankEvent::Killed { rank, .. } => {
                    killed.insert(rank);
                }
                RankEvent::Exited { rank, code } => {
                    let states: Vec<WireState> =
                        servers.iter().map(|s| s.state(rank as u32)).collect();
                    if !killed.contains(&rank) && !states.iter().any(|s| s.done) {
                        tell(PmiToLauncher::Lost {
                            rank: rank as u32,
                            code,
                            initialized: states.iter().any(|s| s.initialized),
                        });
                    }
                    for s in &servers {
                        s.ended(rank as u32);
                    }
                }
                RankEvent::Started { .. } | RankEvent::CheckpointAsked => {}
            }
            let _ = next.send(e);
        }
    });
    tx
}

/// One hook from several: every one's environment, and the descriptor of the first that
/// gives one.
pub fn combine_setups(setups: Vec<RankSetup>) -> RankSetup {
    RankSetup(Arc::new(move |rank| {
        let mut all = RankExtras {
            env: Vec::new(),
            keep_fd: None,
        };
        for s in &setups {
            let x = (s.0)(rank)?;
            all.env.extend(x.env);
            if all.keep_fd.is_none() {
                all.keep_fd = x.keep_fd;
            }
        }
        Ok(all)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpi_modes_parse_and_unknown_ones_say_why() {
        assert_eq!("pmi1".parse::<MpiMode>().unwrap(), MpiMode::Pmi1);
        assert_eq!("none".parse::<MpiMode>().unwrap(), MpiMode::None);
        assert_eq!("pmix".parse::<MpiMode>().unwrap(), MpiMode::Pmix);
        assert_eq!("both".parse::<MpiMode>().unwrap(), MpiMode::Both);
        assert!(MpiMode::Both.pmi1() && MpiMode::Both.pmix());
        assert!(!MpiMode::Pmix.pmi1() && !MpiMode::Pmi1.pmix());
        assert_eq!("pmi2".parse::<MpiMode>().unwrap(), MpiMode::Pmi1);
        let e = "carrier".parse::<MpiMode>().unwrap_err().to_string();
        assert!(e.contains("pmi2"), "{e}");
    }

    struct Fixed(WireState);
    impl RankWatch for Fixed {
        fn state(&self, _rank: u32) -> WireState {
            self.0
        }
    }

    #[test]
    fn a_rank_done_with_either_wire_is_not_lost_and_one_lost_report_is_sent() {
        let run = |states: Vec<WireState>| {
            let told = Arc::new(std::sync::Mutex::new(Vec::new()));
            let t = told.clone();
            let (next, after) = std::sync::mpsc::channel();
            let servers: Vec<Arc<dyn RankWatch>> = states
                .into_iter()
                .map(|s| Arc::new(Fixed(s)) as Arc<dyn RankWatch>)
                .collect();
            let tx = tee_events(servers, Arc::new(move |m| t.lock().unwrap().push(m)), next);
            tx.send(RankEvent::Exited { rank: 3, code: 0 }).unwrap();
            // The event goes on to the runtime after the servers saw it.
            after
                .recv_timeout(std::time::Duration::from_secs(10))
                .unwrap();
            let told = told.lock().unwrap().clone();
            told
        };
        let used = WireState {
            initialized: true,
            done: false,
        };
        let unused = WireState::default();
        let finished = WireState {
            initialized: true,
            done: true,
        };
        // Open MPI used PMIx and finalized; PMI-1 never saw it: not lost.
        assert!(run(vec![unused, finished]).is_empty());
        // Connected, never finalized: lost once, as initialized.
        assert_eq!(
            run(vec![unused, used]),
            vec![PmiToLauncher::Lost {
                rank: 3,
                code: 0,
                initialized: true
            }]
        );
        // Neither wire used: lost (a gone rank for fences), not initialized.
        assert_eq!(
            run(vec![unused, unused]),
            vec![PmiToLauncher::Lost {
                rank: 3,
                code: 0,
                initialized: false
            }]
        );
    }
}
