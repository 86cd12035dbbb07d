//! PMI for MPI programs: krund serves the simple PMI-1 wire protocol (the one MPICH's
//! client speaks over `PMI_FD`; Debian bookworm's MPICH 4.0.2 speaks only this one) to its
//! local ranks, and fences exchange the key-value space across nodes through `krun`.
//!
//! - [`NodeServer`] (krund): one socket pair per rank; the rank keeps its end across exec
//!   and finds it in `PMI_FD` (with `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALNRANKS`,
//!   `MPI_LOCALRANKID`). It answers `init`, `get_maxes`, `get_appnum`, `get_my_kvsname`,
//!   `get_universe_size`, `put`, `get`, `barrier_in`, `finalize` and `abort`. A barrier on
//!   the node completes once every local rank entered it: the node's puts since the last
//!   fence go to krun ([`PmiToLauncher::Fence`]), and the ranks get `barrier_out` when
//!   krun sends back every node's puts ([`PmiToNode::Fenced`]).
//! - [`Coordinator`] (krun, in the hub): gathers each fence from the nodes, answers once
//!   every rank joined; a rank that is gone (exited, or its node's link ended) fails the
//!   fence at once naming it; `abort` ends the job with the rank's code; a rank that
//!   exits after `init` and without `finalize` ends the job (as Hydra does: its peers would
//!   wait for it).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{LauncherError, Result};
use crate::ranks::RankEvent;

/// Longest key, value and KVS name the server accepts (told to clients in `maxes`; the
/// same as MPICH's Hydra).
pub const KVSNAME_MAX: usize = 256;
pub const KEYLEN_MAX: usize = 64;
pub const VALLEN_MAX: usize = 1024;
/// Longest command line a client may send (a put of the longest key and value fits).
const LINE_MAX: usize = 4096;

/// A node's PMI report to `krun`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PmiToLauncher {
    /// Every local rank of the node entered fence `seq`; `puts` are the node's puts since
    /// the previous fence.
    Fence {
        seq: u64,
        ranks: Vec<u32>,
        puts: Vec<(String, String)>,
    },
    /// `rank` called PMI abort (MPI_Abort) with `code`.
    Abort { rank: u32, code: i32 },
    /// `rank` exited with `code` without PMI finalize; `initialized`: it had called init.
    Lost {
        rank: u32,
        code: i32,
        initialized: bool,
    },
}

/// `krun`'s answer to a fence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PmiToNode {
    /// Fence `seq` completed: every node's puts for it.
    Fenced {
        seq: u64,
        puts: Vec<(String, String)>,
    },
    /// Fence `seq` cannot complete (krun ends the job).
    FenceFailed { seq: u64, reason: String },
}

/// Whether krund serves PMI to its ranks (`krun --mpi`, passed to nodes as `KRUN_MPI`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MpiMode {
    /// The simple PMI-1 wire protocol over `PMI_FD` (the default).
    Pmi1,
    None,
}

impl std::str::FromStr for MpiMode {
    type Err = LauncherError;
    fn from_str(s: &str) -> Result<MpiMode> {
        match s {
            "pmi1" | "pmi" => Ok(MpiMode::Pmi1),
            "none" => Ok(MpiMode::None),
            "pmi2" | "pmix" => Err(LauncherError::Usage(format!(
                "--mpi {s}: not served yet; krund serves PMI-1 (--mpi pmi1, the default), \
                 which MPICH's simple PMI client speaks (Debian bookworm's MPICH 4.0.2)"
            ))),
            other => Err(LauncherError::Usage(format!(
                "--mpi {other:?}: expected pmi1 or none"
            ))),
        }
    }
}

impl MpiMode {
    pub fn name(self) -> &'static str {
        match self {
            MpiMode::Pmi1 => "pmi1",
            MpiMode::None => "none",
        }
    }

    /// `KRUN_MPI` (unset: PMI-1).
    pub fn from_env() -> Result<MpiMode> {
        match std::env::var("KRUN_MPI") {
            Ok(v) if !v.trim().is_empty() => v.trim().parse(),
            _ => Ok(MpiMode::Pmi1),
        }
    }
}

/// One parsed command line: `cmd=NAME key=value ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub cmd: String,
    pub args: Vec<(String, String)>,
}

impl Command {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one line of the wire protocol (without its newline).
pub fn parse_line(line: &str) -> std::result::Result<Command, String> {
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    let first = words.next().ok_or("an empty command line")?;
    let cmd = match first.split_once('=') {
        Some(("cmd", c)) if !c.is_empty() => c.to_string(),
        Some(("mcmd", c)) => return Err(format!("multi-line command mcmd={c} is not served")),
        _ => return Err(format!("{first:?} is not cmd=NAME")),
    };
    let mut args = Vec::new();
    for w in words {
        let (k, v) = w
            .split_once('=')
            .ok_or_else(|| format!("{w:?} is not key=value"))?;
        args.push((k.to_string(), v.to_string()));
    }
    Ok(Command { cmd, args })
}

/// Hydra's `PMI_process_mapping` for ranks placed in blocks on nodes: `(vector,(first
/// node,node count,ranks per node),...)`; nodes without ranks (spares, at the end) are
/// left out.
pub fn process_mapping(counts: &[usize]) -> String {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (node, &c) in counts.iter().filter(|&&c| c > 0).enumerate() {
        match runs.last_mut() {
            Some((_, n, per)) if *per == c => *n += 1,
            _ => runs.push((node, 1, c)),
        }
    }
    let mut s = String::from("(vector");
    for (first, n, per) in runs {
        s.push_str(&format!(",({first},{n},{per})"));
    }
    s.push(')');
    s
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

/// Where a rank is in its PMI life.
#[derive(Debug, Clone, Copy, Default)]
struct RankPmi {
    initialized: bool,
    finalized: bool,
    aborted: bool,
    killed: bool,
}

#[derive(Default)]
struct NodeState {
    /// Every value this node's ranks can read: fenced ones and the node's own puts.
    kvs: HashMap<String, String>,
    /// The node's puts since the last fence.
    pending: Vec<(String, String)>,
    /// The next fence's number (from 1).
    next_fence: u64,
    /// Local ranks inside the next fence.
    entered: BTreeSet<u32>,
    /// Completed (or failed) fences.
    done: BTreeMap<u64, std::result::Result<(), String>>,
    ranks: BTreeMap<u32, RankPmi>,
}

/// Sends a node's report to krun.
pub type Teller = Arc<dyn Fn(PmiToLauncher) + Send + Sync>;

/// The node's PMI server (krund).
pub struct NodeServer {
    node: usize,
    size: usize,
    first: usize,
    local: BTreeSet<u32>,
    kvsname: String,
    mapping: String,
    state: Mutex<NodeState>,
    changed: Condvar,
    tell: Teller,
}

impl NodeServer {
    /// The server for node `node` of a job placed as `counts` (ranks per node, in node
    /// order); `job` names the KVS; `tell` reaches krun.
    pub fn new(node: usize, counts: &[usize], job: &str, tell: Teller) -> Arc<NodeServer> {
        let first: usize = counts.iter().take(node).sum();
        let count = counts.get(node).copied().unwrap_or(0);
        let mut kvs = HashMap::new();
        let mapping = process_mapping(counts);
        kvs.insert("PMI_process_mapping".to_string(), mapping.clone());
        Arc::new(NodeServer {
            node,
            size: counts.iter().sum(),
            first,
            local: (first..first + count).map(|r| r as u32).collect(),
            kvsname: format!("kvs_krun_{job}"),
            mapping,
            state: Mutex::new(NodeState {
                kvs,
                next_fence: 1,
                ..NodeState::default()
            }),
            changed: Condvar::new(),
            tell,
        })
    }

    /// `PMI_process_mapping` as served.
    pub fn mapping(&self) -> &str {
        &self.mapping
    }

    /// The hook for the rank runner: a socket pair per rank, served here.
    pub fn rank_setup(self: &Arc<Self>) -> RankSetup {
        let me = self.clone();
        RankSetup(Arc::new(move |rank| me.connect(rank)))
    }

    /// Opens `rank`'s PMI connection: serves one end, returns the environment and the
    /// other end for the rank.
    pub fn connect(self: &Arc<Self>, rank: usize) -> Result<RankExtras> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| LauncherError::Io {
            context: format!("creating rank {rank}'s PMI socket pair"),
            source: e,
        })?;
        let fd = theirs.as_raw_fd();
        let local_id = rank.saturating_sub(self.first);
        let env = vec![
            ("PMI_FD".to_string(), fd.to_string()),
            ("PMI_RANK".to_string(), rank.to_string()),
            ("PMI_SIZE".to_string(), self.size.to_string()),
            ("PMI_SPAWNED".to_string(), "0".to_string()),
            ("MPI_LOCALNRANKS".to_string(), self.local.len().to_string()),
            ("MPI_LOCALRANKID".to_string(), local_id.to_string()),
        ];
        self.state
            .lock()
            .expect("pmi lock")
            .ranks
            .insert(rank as u32, RankPmi::default());
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("krund-pmi-{rank}"))
            .spawn(move || me.serve(rank as u32, ours))
            .map_err(|e| LauncherError::Io {
                context: format!("starting rank {rank}'s PMI thread"),
                source: e,
            })?;
        Ok(RankExtras {
            env,
            keep_fd: Some(OwnedFd::from(theirs)),
        })
    }

    /// A rank started or ended (the rank runner's events): an exit without finalize is
    /// reported to krun.
    pub fn rank_event(&self, e: &RankEvent) {
        let mut st = self.state.lock().expect("pmi lock");
        match *e {
            RankEvent::Killed { rank, .. } => {
                // The runtime reports a killed rank itself (RankKilled ends the job).
                st.ranks.entry(rank as u32).or_default().killed = true;
            }
            RankEvent::Exited { rank, code } => {
                let r = st.ranks.get(&(rank as u32)).copied().unwrap_or_default();
                if !(r.finalized || r.aborted || r.killed) {
                    drop(st);
                    (self.tell)(PmiToLauncher::Lost {
                        rank: rank as u32,
                        code,
                        initialized: r.initialized,
                    });
                }
            }
            RankEvent::Started { .. } | RankEvent::CheckpointAsked => {}
        }
    }

    /// krun's answer to a fence.
    pub fn from_launcher(&self, msg: PmiToNode) {
        let mut st = self.state.lock().expect("pmi lock");
        match msg {
            PmiToNode::Fenced { seq, puts } => {
                st.kvs.extend(puts);
                st.done.insert(seq, Ok(()));
            }
            PmiToNode::FenceFailed { seq, reason } => {
                // krun printed the reason and ends the job.
                st.done.insert(seq, Err(reason));
            }
        }
        self.changed.notify_all();
    }

    /// Serves one rank's connection until it closes.
    fn serve(&self, rank: u32, stream: UnixStream) {
        let Ok(mut out) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader)
                .take(LINE_MAX as u64 + 1)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.len() > LINE_MAX {
                eprintln!(
                    "krund: node {}: rank {rank}: PMI command longer than {LINE_MAX} bytes; link closed",
                    self.node
                );
                return;
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            let reply = match parse_line(text) {
                Ok(c) => self.answer(rank, &c),
                Err(e) => Some(format!("cmd=error rc=-1 msg={}\n", e.replace(' ', "_"))),
            };
            match reply {
                Some(r) => {
                    if out.write_all(r.as_bytes()).is_err() {
                        return;
                    }
                }
                // Abort: no answer; closing the link lets MPICH exit with the code.
                None => {
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// The answer to one command (`None`: close the link).
    fn answer(&self, rank: u32, c: &Command) -> Option<String> {
        let rc_fail = |cmd: &str, msg: &str| format!("cmd={cmd} rc=-1 msg={msg}\n");
        Some(match c.cmd.as_str() {
            "init" => {
                self.state
                    .lock()
                    .expect("pmi lock")
                    .ranks
                    .entry(rank)
                    .or_default()
                    .initialized = true;
                match c.get("pmi_version") {
                    Some("1") | None => {
                        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n".into()
                    }
                    Some(v) => format!(
                        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=-1 msg=pmi_version_{v}_is_not_served\n"
                    ),
                }
            }
            "get_maxes" => format!(
                "cmd=maxes kvsname_max={KVSNAME_MAX} keylen_max={KEYLEN_MAX} vallen_max={VALLEN_MAX}\n"
            ),
            "get_appnum" => "cmd=appnum appnum=0\n".into(),
            "get_my_kvsname" => format!("cmd=my_kvsname kvsname={}\n", self.kvsname),
            "get_universe_size" => format!("cmd=universe_size size={}\n", self.size),
            "put" => match (c.get("key"), c.get("value")) {
                (Some(k), Some(v)) if k.len() <= KEYLEN_MAX && v.len() <= VALLEN_MAX => {
                    let mut st = self.state.lock().expect("pmi lock");
                    st.kvs.insert(k.to_string(), v.to_string());
                    st.pending.push((k.to_string(), v.to_string()));
                    "cmd=put_result rc=0 msg=success\n".into()
                }
                (Some(_), Some(_)) => rc_fail("put_result", "key_or_value_too_long"),
                _ => rc_fail("put_result", "put_needs_key_and_value"),
            },
            "get" => match c.get("key") {
                Some(k) => match self.state.lock().expect("pmi lock").kvs.get(k) {
                    Some(v) => format!("cmd=get_result rc=0 msg=success value={v}\n"),
                    None => rc_fail("get_result", "key_not_found"),
                },
                None => rc_fail("get_result", "get_needs_a_key"),
            },
            "barrier_in" => match self.fence(rank) {
                Ok(()) => "cmd=barrier_out\n".into(),
                // The fence failed and krun ends the job: the rank waits here for its end
                // (an answer would let it go on to the next fence, a closed link would make
                // MPICH report a PMI error of its own).
                Err(_) => loop {
                    std::thread::park();
                },
            },
            "finalize" => {
                self.state
                    .lock()
                    .expect("pmi lock")
                    .ranks
                    .entry(rank)
                    .or_default()
                    .finalized = true;
                "cmd=finalize_ack\n".into()
            }
            "abort" => {
                let code = c
                    .get("exitcode")
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(1);
                self.state
                    .lock()
                    .expect("pmi lock")
                    .ranks
                    .entry(rank)
                    .or_default()
                    .aborted = true;
                (self.tell)(PmiToLauncher::Abort { rank, code });
                return None;
            }
            other => format!("cmd={other} rc=-1 msg=command_not_served_by_krund\n"),
        })
    }

    /// `rank` enters the node's next fence; returns once krun says it completed (a failed
    /// fence ends the job: krun stops the node, and the rank with it).
    fn fence(&self, rank: u32) -> std::result::Result<(), String> {
        let mut st = self.state.lock().expect("pmi lock");
        let seq = st.next_fence;
        st.entered.insert(rank);
        if st.entered.is_superset(&self.local) {
            let puts = std::mem::take(&mut st.pending);
            st.entered.clear();
            st.next_fence += 1;
            let ranks = self.local.iter().copied().collect();
            drop(st);
            (self.tell)(PmiToLauncher::Fence { seq, ranks, puts });
            st = self.state.lock().expect("pmi lock");
        }
        loop {
            if let Some(r) = st.done.get(&seq) {
                return r.clone();
            }
            st = self.changed.wait(st).expect("pmi lock");
        }
    }
}

/// What the hub does for the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send to every node still linked.
    Broadcast(PmiToNode),
    /// End the job: the reason (printed by krun) and its exit code.
    End { reason: String, code: i32 },
}

/// One fence being gathered.
#[derive(Default)]
struct Gathering {
    joined: BTreeSet<u32>,
    puts: Vec<(String, String)>,
}

/// krun's side: gathers fences across nodes (sans-IO: the hub sends what it returns).
pub struct Coordinator {
    size: u32,
    fences: BTreeMap<u64, Gathering>,
    /// Ranks that will never join a fence, and why.
    gone: BTreeMap<u32, String>,
    /// Ranks each node reported (from its fences).
    nodes: BTreeMap<adaptation::NodeId, BTreeSet<u32>>,
    /// The job is ending (an End was returned): fences failing as its ranks are stopped
    /// are not news.
    ended: bool,
}

impl Coordinator {
    pub fn new(size: u32) -> Coordinator {
        Coordinator {
            size,
            fences: BTreeMap::new(),
            gone: BTreeMap::new(),
            nodes: BTreeMap::new(),
            ended: false,
        }
    }

    /// A node's report.
    pub fn from_node(&mut self, node: adaptation::NodeId, msg: PmiToLauncher) -> Vec<Action> {
        let actions = self.step(node, msg);
        let ending = actions.iter().any(|a| matches!(a, Action::End { .. }));
        let actions = if self.ended {
            // Only what is news: an abort, a rank that left on its own without finalize.
            actions
                .into_iter()
                .filter(|a| match a {
                    Action::End { reason, .. } => !reason.starts_with("PMI fence"),
                    Action::Broadcast(_) => true,
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
            PmiToLauncher::Fence { seq, ranks, puts } => {
                self.nodes.entry(node).or_default().extend(&ranks);
                let g = self.fences.entry(seq).or_default();
                g.joined.extend(ranks);
                g.puts.extend(puts);
                let mut actions = self.check_gone();
                if let Some(g) = self.fences.get(&seq) {
                    if g.joined.len() as u32 >= self.size {
                        let g = self.fences.remove(&seq).unwrap_or_default();
                        actions.push(Action::Broadcast(PmiToNode::Fenced { seq, puts: g.puts }));
                    }
                }
                actions
            }
            PmiToLauncher::Abort { rank, code } => vec![Action::End {
                reason: format!(
                    "rank {rank} on node {node} called MPI_Abort (PMI abort) with exit code {code}"
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
        for (&seq, g) in &self.fences {
            let missing: Vec<u32> = (0..self.size).filter(|r| !g.joined.contains(r)).collect();
            let reason = format!(
                "PMI fence {seq} cannot complete: node {node} is gone (its link to krun ended); ranks that never joined: {missing:?}"
            );
            actions.push(Action::Broadcast(PmiToNode::FenceFailed {
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
        for (&seq, g) in &self.fences {
            let missing: Vec<&String> = self
                .gone
                .iter()
                .filter(|(r, _)| !g.joined.contains(r))
                .map(|(_, why)| why)
                .collect();
            if let Some(first) = missing.first() {
                let reason = format!(
                    "PMI fence {seq} cannot complete: {first} without joining it{}",
                    if missing.len() > 1 {
                        format!(" (and {} more rank(s))", missing.len() - 1)
                    } else {
                        String::new()
                    }
                );
                actions.push(Action::Broadcast(PmiToNode::FenceFailed {
                    seq,
                    reason: reason.clone(),
                }));
                actions.push(Action::End { reason, code: 1 });
                failed.push(seq);
            }
        }
        for seq in failed {
            self.fences.remove(&seq);
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

/// Passes every rank event to the PMI server, then on to `next` (the node runtime).
pub fn tee_events(
    server: Arc<NodeServer>,
    next: std::sync::mpsc::Sender<RankEvent>,
) -> std::sync::mpsc::Sender<RankEvent> {
    let (tx, rx) = std::sync::mpsc::channel::<RankEvent>();
    std::thread::spawn(move || {
        for e in rx {
            server.rank_event(&e);
            let _ = next.send(e);
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_command_and_arguments() {
        let c = parse_line("cmd=put kvsname=kvs_1 key=-bcast-1-0 value=2F64=3D").unwrap();
        assert_eq!(c.cmd, "put");
        assert_eq!(c.get("key"), Some("-bcast-1-0"));
        assert_eq!(c.get("value"), Some("2F64=3D"));
        assert!(parse_line("").is_err());
        assert!(parse_line("put key=x").is_err());
        assert!(parse_line("mcmd=spawn").unwrap_err().contains("not served"));
        assert!(parse_line("cmd=put novalue")
            .unwrap_err()
            .contains("novalue"));
    }

    #[test]
    fn process_mapping_groups_nodes_with_equal_counts_like_hydra() {
        assert_eq!(process_mapping(&[4]), "(vector,(0,1,4))");
        assert_eq!(process_mapping(&[2, 2, 2]), "(vector,(0,3,2))");
        assert_eq!(process_mapping(&[2, 2, 1, 0]), "(vector,(0,2,2),(2,1,1))");
    }

    #[test]
    fn mpi_modes_parse_and_unserved_ones_say_why() {
        assert_eq!("pmi1".parse::<MpiMode>().unwrap(), MpiMode::Pmi1);
        assert_eq!("none".parse::<MpiMode>().unwrap(), MpiMode::None);
        let e = "pmi2".parse::<MpiMode>().unwrap_err().to_string();
        assert!(e.contains("PMI-1"), "{e}");
        assert!("carrier".parse::<MpiMode>().is_err());
    }

    fn fence(seq: u64, ranks: &[u32], puts: &[(&str, &str)]) -> PmiToLauncher {
        PmiToLauncher::Fence {
            seq,
            ranks: ranks.to_vec(),
            puts: puts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
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
                puts: vec![("a".into(), "1".into()), ("b".into(), "2".into())]
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
                Action::Broadcast(PmiToNode::FenceFailed { seq: 2, reason }) if reason.contains("rank 2")
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
        let a = c.from_node(0, PmiToLauncher::Abort { rank: 0, code: 7 });
        assert!(matches!(&a[0], Action::End { code: 7, .. }), "{a:?}");
        // MPICH aborts with MPI error codes: the job reports what the process would.
        let a = c.from_node(
            0,
            PmiToLauncher::Abort {
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

    /// A client over a socket pair: the node answers the MPICH sequence, and a fence waits
    /// for krun.
    #[test]
    fn the_node_answers_mpichs_init_sequence_and_holds_fences_for_krun() {
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let server = NodeServer::new(
            0,
            &[1, 1],
            "t",
            Arc::new(move |m| t.lock().unwrap().push(m)),
        );
        let extras = server.connect(0).unwrap();
        let mut s = UnixStream::from(extras.keep_fd.unwrap());
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut ask = |q: &str| {
            s.write_all(q.as_bytes()).unwrap();
            let mut a = String::new();
            r.read_line(&mut a).unwrap();
            a
        };
        assert!(ask("cmd=init pmi_version=1 pmi_subversion=1\n").contains("rc=0"));
        assert!(ask("cmd=get_maxes\n").contains("vallen_max=1024"));
        let name = ask("cmd=get_my_kvsname\n");
        assert_eq!(name, "cmd=my_kvsname kvsname=kvs_krun_t\n");
        assert!(ask("cmd=get kvsname=kvs_krun_t key=PMI_process_mapping\n")
            .contains("value=(vector,(0,2,1))"));
        assert!(ask("cmd=put kvsname=kvs_krun_t key=k0 value=v0\n").contains("rc=0"));
        assert!(ask("cmd=get kvsname=kvs_krun_t key=k1\n").contains("rc=-1"));
        let s2 = server.clone();
        let waiter = std::thread::spawn(move || {
            // krun answers once it saw the node's fence.
            for _ in 0..2000 {
                let seen = told.lock().unwrap().clone();
                if let Some(PmiToLauncher::Fence { seq, ranks, puts }) = seen.first() {
                    assert_eq!((*seq, ranks.clone()), (1, vec![0]));
                    assert_eq!(puts, &vec![("k0".to_string(), "v0".to_string())]);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            s2.from_launcher(PmiToNode::Fenced {
                seq: 1,
                puts: vec![("k1".into(), "v1".into())],
            });
        });
        assert_eq!(ask("cmd=barrier_in\n"), "cmd=barrier_out\n");
        waiter.join().unwrap();
        assert!(ask("cmd=get kvsname=kvs_krun_t key=k1\n").contains("value=v1"));
        assert_eq!(ask("cmd=finalize\n"), "cmd=finalize_ack\n");
    }
}
