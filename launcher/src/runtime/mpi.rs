//! What krund's MPI servers share (PMI-1 in `pmi.rs`, PMIx in `pmix.rs`): their reports
//! to krun and its answers, `--mpi`, the hook that sets up each rank, and krun's
//! [`Coordinator`] (in the hub) that gathers fences across nodes for both wires, ends the
//! job on an abort or a rank lost, and fails a fence a gone rank never joins.
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{LauncherError, Result};
use crate::ranks::RankEvent;

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
    /// The simple PMI-1 wire protocol over `PMI_FD` (MPICH).
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
            "pmi1" | "pmi" => Ok(MpiMode::Pmi1),
            "pmix" => Ok(MpiMode::Pmix),
            "none" => Ok(MpiMode::None),
            "pmi2" => Err(LauncherError::Usage(
                "--mpi pmi2: not served; krund serves PMI-1 (--mpi pmi1), which MPICH's \
                 simple PMI client speaks (Debian bookworm's MPICH 4.0.2), and PMIx (--mpi \
                 pmix, Open MPI); the default serves both"
                    .into(),
            )),
            other => Err(LauncherError::Usage(format!(
                "--mpi {other:?}: expected both, pmi1, pmix or none"
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

/// What the hub does for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send to every node still linked.
    Broadcast(PmiToNode),
    /// Send to one node.
    Send(adaptation::NodeId, PmiToNode),
    /// End the job: the reason (printed by krun) and its exit code.
    End { reason: String, code: i32 },
}

/// One fence being gathered.
struct Gathering {
    joined: BTreeSet<u32>,
    data: FenceData,
}

/// Marks a job-ending reason that only follows from an earlier one (a fence failing as
/// the job's ranks are stopped): "PMI fence 3 cannot complete: ...".
const FENCE_FAILED: &str = " cannot complete: ";

/// krun's side: gathers fences across nodes, for both wires (sans-IO: the hub sends what
/// it returns).
pub struct Coordinator {
    size: u32,
    fences: BTreeMap<(Wire, u64), Gathering>,
    /// Ranks that will never join a fence, and why.
    gone: BTreeMap<u32, String>,
    /// Ranks each node reported (from its fences).
    nodes: BTreeMap<adaptation::NodeId, BTreeSet<u32>>,
    /// The job is ending (an End was returned): fences failing as its ranks are stopped
    /// are not news.
    ended: bool,
    /// The job's MPI incarnation: the wiring epoch of the recovery that restarted every
    /// rank (0: the start). Reports of an older one are dropped.
    wiring: u64,
}

impl Coordinator {
    pub fn new(size: u32) -> Coordinator {
        Coordinator {
            size,
            fences: BTreeMap::new(),
            gone: BTreeMap::new(),
            nodes: BTreeMap::new(),
            ended: false,
            wiring: 0,
        }
    }

    /// The job's current MPI incarnation (the wiring epoch every rank started in).
    pub fn wiring(&self) -> u64 {
        self.wiring
    }

    /// Every rank restarts in wiring epoch `wiring` (a recovery that restarts the whole job
    /// as new processes): the ranks wire up afresh, so fences count from 1 again, no rank
    /// is gone and the job is not ending. An older or the current epoch changes nothing.
    pub fn reincarnate(&mut self, wiring: u64) {
        if wiring <= self.wiring {
            return;
        }
        self.wiring = wiring;
        self.fences.clear();
        self.gone.clear();
        self.nodes.clear();
        self.ended = false;
    }

    /// A node's report.
    pub fn from_node(&mut self, node: adaptation::NodeId, msg: PmiToLauncher) -> Vec<Action> {
        let msg = match msg {
            PmiToLauncher::Wired { wiring, msg } => {
                if wiring < self.wiring {
                    // From ranks of an older incarnation (stopped by the recovery).
                    return Vec::new();
                }
                // A node cannot be ahead of krun, which starts each incarnation; if one
                // is, it is the truth.
                self.reincarnate(wiring);
                *msg
            }
            other => other,
        };
        let actions = self.step(node, msg);
        let ending = actions.iter().any(|a| matches!(a, Action::End { .. }));
        let actions = if self.ended {
            // Only what is news: an abort, a rank that left on its own without finalize.
            actions
                .into_iter()
                .filter(|a| match a {
                    Action::End { reason, .. } => !reason.contains(FENCE_FAILED),
                    _ => true,
                })
                .collect()
        } else {
            actions
        };
        self.ended |= ending;
        actions
    }

    fn step(&mut self, node: adaptation::NodeId, msg: PmiToLauncher) -> Vec<Action> {
        match msg {
            PmiToLauncher::Fence { seq, ranks, data } => {
                let wire = data.wire();
                self.nodes.entry(node).or_default().extend(&ranks);
                let g = self.fences.entry((wire, seq)).or_insert_with(|| Gathering {
                    joined: BTreeSet::new(),
                    data: FenceData::empty(wire),
                });
                g.joined.extend(ranks);
                g.data.extend(data);
                let mut actions = self.check_gone();
                if let Some(g) = self.fences.get(&(wire, seq)) {
                    if g.joined.len() as u32 >= self.size {
                        if let Some(g) = self.fences.remove(&(wire, seq)) {
                            actions
                                .push(Action::Broadcast(PmiToNode::Fenced { seq, data: g.data }));
                        }
                    }
                }
                actions
            }
            PmiToLauncher::Abort { wire, rank, code } => vec![Action::End {
                reason: format!(
                    "rank {rank} on node {node} called MPI_Abort ({} abort) with exit code {code}",
                    wire.name()
                ),
                code: exit_status(code),
            }],
            PmiToLauncher::Lost {
                rank,
                code,
                initialized,
            } => {
                self.gone.insert(
                    rank,
                    format!("rank {rank} on node {node} exited with code {code}"),
                );
                let mut actions = Vec::new();
                // Above 128: ended by a signal (a killed rank is reported as such; ranks
                // stopped with the job are not news).
                if initialized && code <= 128 {
                    actions.push(Action::End {
                        reason: format!(
                            "rank {rank} on node {node} exited with code {code} without MPI_Finalize (no PMI finalize)"
                        ),
                        code: if code == 0 { 1 } else { code },
                    });
                }
                actions.extend(self.check_gone());
                actions
            }
            PmiToLauncher::DmodexAsk {
                node: holder,
                id,
                rank,
            } => vec![Action::Send(
                holder,
                PmiToNode::DmodexAsk {
                    from: node,
                    id,
                    rank,
                },
            )],
            PmiToLauncher::DmodexData { to, id, data } => {
                vec![Action::Send(to, PmiToNode::DmodexData { id, data })]
            }
            PmiToLauncher::Wired { msg, .. } => self.step(node, *msg),
        }
    }

    /// `node`'s link to krun ended before it said goodbye: its ranks never join a fence.
    pub fn node_gone(&mut self, node: adaptation::NodeId) -> Vec<Action> {
        let ranks = self.nodes.get(&node).cloned().unwrap_or_default();
        if self.fences.is_empty() || self.ended {
            for r in ranks {
                self.gone
                    .insert(r, format!("rank {r}'s node {node} is gone"));
            }
            return Vec::new();
        }
        let mut actions = Vec::new();
        for (&(wire, seq), g) in &self.fences {
            let missing: Vec<u32> = (0..self.size).filter(|r| !g.joined.contains(r)).collect();
            let reason = format!(
                "{} fence {seq} cannot complete: node {node} is gone (its link to krun ended); ranks that never joined: {missing:?}",
                wire.name()
            );
            actions.push(Action::Broadcast(PmiToNode::FenceFailed {
                wire,
                seq,
                reason: reason.clone(),
            }));
            actions.push(Action::End { reason, code: 1 });
        }
        self.fences.clear();
        self.ended = true;
        actions
    }

    /// Fails every open fence that a gone rank has not joined.
    fn check_gone(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut failed = Vec::new();
        for (&(wire, seq), g) in &self.fences {
            let missing: Vec<&String> = self
                .gone
                .iter()
                .filter(|(r, _)| !g.joined.contains(r))
                .map(|(_, why)| why)
                .collect();
            if let Some(first) = missing.first() {
                let reason = format!(
                    "{} fence {seq} cannot complete: {first} without joining it{}",
                    wire.name(),
                    if missing.len() > 1 {
                        format!(" (and {} more rank(s))", missing.len() - 1)
                    } else {
                        String::new()
                    }
                );
                actions.push(Action::Broadcast(PmiToNode::FenceFailed {
                    wire,
                    seq,
                    reason: reason.clone(),
                }));
                actions.push(Action::End { reason, code: 1 });
                failed.push((wire, seq));
            }
        }
        for key in failed {
            self.fences.remove(&key);
        }
        actions
    }
}

/// The status a process exiting with `code` reports (its low 8 bits; MPICH passes MPI
/// error codes to abort), never 0 for a non-zero code.
pub fn exit_status(code: i32) -> i32 {
    match code & 0xff {
        0 if code != 0 => 1,
        c => c,
    }
}

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
    fn mpi_modes_parse_and_unserved_ones_say_why() {
        assert_eq!("pmi1".parse::<MpiMode>().unwrap(), MpiMode::Pmi1);
        assert_eq!("none".parse::<MpiMode>().unwrap(), MpiMode::None);
        assert_eq!("pmix".parse::<MpiMode>().unwrap(), MpiMode::Pmix);
        assert_eq!("both".parse::<MpiMode>().unwrap(), MpiMode::Both);
        assert!(MpiMode::Both.pmi1() && MpiMode::Both.pmix());
        assert!(!MpiMode::Pmix.pmi1() && !MpiMode::Pmi1.pmix());
        let e = "pmi2".parse::<MpiMode>().unwrap_err().to_string();
        assert!(e.contains("PMI-1"), "{e}");
        assert!("carrier".parse::<MpiMode>().is_err());
    }

    fn fence(seq: u64, ranks: &[u32], puts: &[(&str, &str)]) -> PmiToLauncher {
        PmiToLauncher::Fence {
            seq,
            ranks: ranks.to_vec(),
            data: FenceData::Puts(
                puts.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn a_fence_completes_once_every_rank_joined_with_every_nodes_puts() {
        let mut c = Coordinator::new(4);
        assert!(c.from_node(0, fence(1, &[0, 1], &[("a", "1")])).is_empty());
        let a = c.from_node(1, fence(1, &[2, 3], &[("b", "2")]));
        assert_eq!(
            a,
            vec![Action::Broadcast(PmiToNode::Fenced {
                seq: 1,
                data: FenceData::Puts(vec![("a".into(), "1".into()), ("b".into(), "2".into())])
            })]
        );
        // The next fence starts empty.
        assert!(c.from_node(1, fence(2, &[2, 3], &[])).is_empty());
    }

    #[test]
    fn a_fence_a_gone_rank_never_joins_fails_naming_it() {
        let mut c = Coordinator::new(3);
        assert!(c.from_node(0, fence(1, &[0], &[])).is_empty());
        // Rank 2 exits before it ever used PMI: not an error by itself, but the open fence
        // fails naming it.
        let a = c.from_node(
            1,
            PmiToLauncher::Lost {
                rank: 2,
                code: 0,
                initialized: false,
            },
        );
        assert_eq!(a.len(), 2, "{a:?}");
        match &a[1] {
            Action::End { reason, code } => {
                assert_eq!(*code, 1);
                assert!(
                    reason.contains("fence 1") && reason.contains("rank 2"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A later fence fails at once too (the job is ending already: no second End).
        let a = c.from_node(0, fence(2, &[0], &[]));
        assert!(
            a.iter().any(|x| matches!(
                x,
                Action::Broadcast(PmiToNode::FenceFailed { seq: 2, reason, .. }) if reason.contains("rank 2")
            )),
            "{a:?}"
        );
        assert!(!a.iter().any(|x| matches!(x, Action::End { .. })), "{a:?}");
    }

    #[test]
    fn exit_without_finalize_and_abort_end_the_job_with_codes() {
        let mut c = Coordinator::new(2);
        let a = c.from_node(
            0,
            PmiToLauncher::Lost {
                rank: 1,
                code: 0,
                initialized: true,
            },
        );
        assert!(
            matches!(&a[0], Action::End { reason, code: 1 } if reason.contains("without MPI_Finalize")),
            "{a:?}"
        );
        let a = c.from_node(
            0,
            PmiToLauncher::Abort {
                wire: Wire::Pmi1,
                rank: 0,
                code: 7,
            },
        );
        assert!(matches!(&a[0], Action::End { code: 7, .. }), "{a:?}");
        // MPICH aborts with MPI error codes: the job reports what the process would.
        let a = c.from_node(
            0,
            PmiToLauncher::Abort {
                wire: Wire::Pmi1,
                rank: 0,
                code: 607768079,
            },
        );
        assert!(matches!(&a[0], Action::End { code: 15, .. }), "{a:?}");
        assert_eq!(exit_status(256), 1);
    }

    #[test]
    fn a_node_gone_fails_open_fences() {
        let mut c = Coordinator::new(4);
        c.from_node(0, fence(1, &[0, 1], &[]));
        let a = c.node_gone(1);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::End { reason, .. } if reason.contains("[2, 3]"))),
            "{a:?}"
        );
    }

    fn blobs(seq: u64, ranks: &[u32], blob: &[u8]) -> PmiToLauncher {
        PmiToLauncher::Fence {
            seq,
            ranks: ranks.to_vec(),
            data: FenceData::Blobs(vec![blob.to_vec()]),
        }
    }

    #[test]
    fn pmix_and_pmi1_fences_of_one_number_are_gathered_apart() {
        let mut c = Coordinator::new(2);
        assert!(c.from_node(0, blobs(1, &[0], b"zero")).is_empty());
        // A PMI-1 fence 1 does not complete PMIx's.
        assert!(c.from_node(1, fence(1, &[1], &[("k", "v")])).is_empty());
        let a = c.from_node(1, blobs(1, &[1], b"one"));
        assert_eq!(
            a,
            vec![Action::Broadcast(PmiToNode::Fenced {
                seq: 1,
                data: FenceData::Blobs(vec![b"zero".to_vec(), b"one".to_vec()])
            })]
        );
        let a = c.from_node(0, fence(1, &[0], &[]));
        assert!(
            matches!(&a[..], [Action::Broadcast(PmiToNode::Fenced { seq: 1, data: FenceData::Puts(p) })] if p.len() == 1),
            "{a:?}"
        );
        // A gone rank fails a PMIx fence naming the wire and the rank.
        c.from_node(0, blobs(2, &[0], b""));
        let a = c.from_node(
            1,
            PmiToLauncher::Lost {
                rank: 1,
                code: 0,
                initialized: false,
            },
        );
        assert!(
            a.iter().any(|x| matches!(x, Action::End { reason, code: 1 }
                if reason.starts_with("PMIx fence 2 cannot complete: rank 1 on node 1"))),
            "{a:?}"
        );
    }

    #[test]
    fn direct_modex_requests_and_answers_are_routed_between_nodes() {
        let mut c = Coordinator::new(4);
        let a = c.from_node(
            0,
            PmiToLauncher::DmodexAsk {
                node: 2,
                id: 5,
                rank: 3,
            },
        );
        assert_eq!(
            a,
            vec![Action::Send(
                2,
                PmiToNode::DmodexAsk {
                    from: 0,
                    id: 5,
                    rank: 3
                }
            )]
        );
        let a = c.from_node(
            2,
            PmiToLauncher::DmodexData {
                to: 0,
                id: 5,
                data: Some(vec![1, 2]),
            },
        );
        assert_eq!(
            a,
            vec![Action::Send(
                0,
                PmiToNode::DmodexData {
                    id: 5,
                    data: Some(vec![1, 2])
                }
            )]
        );
    }

    fn wired(wiring: u64, msg: PmiToLauncher) -> PmiToLauncher {
        PmiToLauncher::Wired {
            wiring,
            msg: Box::new(msg),
        }
    }

    #[test]
    fn a_new_incarnation_forgets_gone_ranks_and_open_fences_and_drops_the_old_ones_reports() {
        let mut c = Coordinator::new(2);
        assert!(c.from_node(0, wired(0, fence(1, &[0], &[]))).is_empty());
        // Node 1 died with rank 1: no End yet (a recovery may restart the job) but the
        // open fence fails.
        let a = c.node_gone(1);
        assert!(a.iter().any(|x| matches!(x, Action::End { .. })), "{a:?}");
        // Every rank restarts in wiring epoch 3: fences count from 1 again, rank 1 is not
        // gone any more, and the job is not ending.
        c.reincarnate(3);
        assert_eq!(c.wiring(), 3);
        // A late abort from the old incarnation's survivor is not news.
        let a = c.from_node(
            0,
            wired(
                0,
                PmiToLauncher::Abort {
                    wire: Wire::Pmix,
                    rank: 0,
                    code: 1,
                },
            ),
        );
        assert!(a.is_empty(), "{a:?}");
        assert!(c
            .from_node(0, wired(3, fence(1, &[0], &[("a", "0")])))
            .is_empty());
        let a = c.from_node(2, wired(3, fence(1, &[1], &[("b", "1")])));
        assert!(
            matches!(&a[..], [Action::Broadcast(PmiToNode::Fenced { seq: 1, data: FenceData::Puts(p) })] if p.len() == 2),
            "{a:?}"
        );
        // An abort of the new incarnation ends the job.
        let a = c.from_node(
            2,
            wired(
                3,
                PmiToLauncher::Abort {
                    wire: Wire::Pmi1,
                    rank: 1,
                    code: 4,
                },
            ),
        );
        assert!(matches!(&a[..], [Action::End { code: 4, .. }]), "{a:?}");
        // An older epoch does not go back.
        c.reincarnate(2);
        assert_eq!(c.wiring(), 3);
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
