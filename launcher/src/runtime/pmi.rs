//! PMI for MPI programs: krund serves the simple PMI-1 wire protocol (the one MPICH's
//! client speaks over `PMI_FD`; Debian bookworm's MPICH 4.0.2 speaks only this one) and
//! PMI-2's (Slurm's `libpmi2`, MPICH built for PMI-2: [`pmi2`]) to its local ranks on the
//! same link, the client choosing in its first line; fences exchange the key-value space
//! across nodes through `krun`.
//!
//! bookworm's `libmpich.so.12` (4.0.2, `--with-pm=hydra`, no `--with-pmi`) links no PMI
//! library and carries only the simple PMI-1 client (started with `PMI_VERSION=2` it still
//! sends `cmd=init pmi_version=1 pmi_subversion=1`); PMI-2 is tested with Slurm's
//! `libpmi2` (package libpmi2-0-dev), a real PMI-2 client.
//!
//! - [`NodeServer`] (krund): one socket pair per rank; the rank keeps its end across exec
//!   and finds it in `PMI_FD` (with `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALNRANKS`,
//!   `MPI_LOCALRANKID`). It answers `init`, `get_maxes`, `get_appnum`, `get_my_kvsname`,
//!   `get_universe_size`, `put`, `get`, `barrier_in`, `finalize` and `abort`. A barrier on
//!   the node completes once every local rank entered it: the node's puts since the last
//!   fence go to krun ([`PmiToLauncher::Fence`]), and the ranks get `barrier_out` when
//!   krun sends back every node's puts ([`PmiToNode::Fenced`]).
//! - [`Coordinator`] (krun, in the hub, `runtime/mpi.rs`, shared with PMIx): gathers each
//!   fence from the nodes, answers once every rank joined; a rank that is gone (exited, or
//!   its node's link ended) fails the fence at once naming it; `abort` ends the job with
//!   the rank's code; a rank that exits after `init` and without `finalize` ends the job
//!   (as Hydra does: its peers would wait for it).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{LauncherError, Result};

mod pmi2;

/// Longest key, value and KVS name the server accepts (told to clients in `maxes`; the
/// same as MPICH's Hydra).
pub const KVSNAME_MAX: usize = 256;
pub const KEYLEN_MAX: usize = 64;
pub const VALLEN_MAX: usize = 1024;

/// Why a put was refused.
#[derive(Debug, PartialEq, Eq)]
enum PutRefused {
    /// The key or the value is longer than [`KEYLEN_MAX`] / [`VALLEN_MAX`].
    TooLong,
    /// The command lacks its key or its value.
    Missing,
}

/// Longest command line a client may send (a put of the longest key and value fits).
const LINE_MAX: usize = 4096;

pub use super::mpi::{
    exit_status, Action, Coordinator, FenceData, MpiMode, PmiToLauncher, PmiToNode, RankExtras,
    RankSetup, RankWatch, Teller, Wire, WireState,
};

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
    process_mapping_placed(&placement_of(counts))
}

/// Rank -> node for ranks placed in blocks, `counts[node]` on each node in node order.
pub fn placement_of(counts: &[usize]) -> Vec<adaptation::NodeId> {
    counts
        .iter()
        .enumerate()
        .flat_map(|(node, &c)| std::iter::repeat_n(node as adaptation::NodeId, c))
        .collect()
}

/// `PMI_process_mapping` for any placement (rank -> node; after a recovery a spare holds
/// the lost node's ranks): the nodes that run ranks are numbered in node order, and each
/// run of consecutive ranks on one node is a block, as MPICH reads the vector (rank by
/// rank, `ranks per node` ranks on each of `node count` nodes from `first node`).
pub fn process_mapping_placed(placement: &[adaptation::NodeId]) -> String {
    let nodes: BTreeSet<adaptation::NodeId> = placement.iter().copied().collect();
    let label = |n: adaptation::NodeId| nodes.iter().position(|&m| m == n).unwrap_or(0);
    // (node label, ranks) per run of consecutive ranks on one node.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &n in placement {
        match runs.last_mut() {
            Some((l, c)) if *l == label(n) => *c += 1,
            _ => runs.push((label(n), 1)),
        }
    }
    // Blocks: (first node, node count, ranks per node).
    let mut blocks: Vec<(usize, usize, usize)> = Vec::new();
    for (l, c) in runs {
        match blocks.last_mut() {
            Some((first, n, per)) if *per == c && l == *first + *n => *n += 1,
            _ => blocks.push((l, 1, c)),
        }
    }
    let mut s = String::from("(vector");
    for (first, n, per) in blocks {
        s.push_str(&format!(",({first},{n},{per})"));
    }
    s.push(')');
    s
}

/// Where a rank is in its PMI life.
#[derive(Debug, Clone, Copy, Default)]
struct RankPmi {
    initialized: bool,
    finalized: bool,
    aborted: bool,
}

/// One incarnation of the job as this node serves it.
#[derive(Debug, Clone, Default)]
struct Layout {
    size: usize,
    /// This node's ranks, ascending: a rank's local id is its index.
    local: Vec<u32>,
    kvsname: String,
    mapping: String,
}

impl Layout {
    fn new(node: usize, placement: &[adaptation::NodeId], job: &str, wiring: u64) -> Layout {
        let local = (0..placement.len() as u32)
            .filter(|&r| placement[r as usize] as usize == node)
            .collect();
        Layout {
            size: placement.len(),
            local,
            // Each incarnation has its own name: a client of an older one cannot reach it.
            kvsname: if wiring == 0 {
                format!("kvs_krun_{job}")
            } else {
                format!("kvs_krun_{job}_w{wiring}")
            },
            mapping: process_mapping_placed(placement),
        }
    }
}

#[derive(Default)]
struct NodeState {
    layout: Layout,
    /// The incarnation served: the wiring epoch every rank started in (0 at the start).
    generation: u64,
    /// Some rank ever called init here.
    used: bool,
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
    /// PMI-2's node attributes (`info-putnodeattr`), this node's ranks only.
    node_attrs: HashMap<String, String>,
}

/// The node's PMI server (krund).
pub struct NodeServer {
    node: usize,
    job: String,
    state: Mutex<NodeState>,
    changed: Condvar,
    tell: Teller,
}

impl RankWatch for NodeServer {
    /// krun's answer to a PMI-1 fence (other messages are not this server's).
    fn deliver(&self, msg: PmiToNode) {
        let mut st = self.state.lock().expect("pmi lock");
        match msg {
            PmiToNode::Fenced {
                seq,
                data: FenceData::Puts(puts),
            } => {
                st.kvs.extend(puts);
                st.done.insert(seq, Ok(()));
            }
            PmiToNode::FenceFailed {
                wire: Wire::Pmi1,
                seq,
                reason,
            } => {
                // krun printed the reason and ends the job.
                st.done.insert(seq, Err(reason));
            }
            _ => return,
        }
        self.changed.notify_all();
    }

    fn state(&self, rank: u32) -> WireState {
        let st = self.state.lock().expect("pmi lock");
        let r = st.ranks.get(&rank).copied().unwrap_or_default();
        WireState {
            initialized: r.initialized,
            done: r.finalized || r.aborted,
        }
    }

    fn used(&self) -> bool {
        self.state.lock().expect("pmi lock").used
    }

    /// A new incarnation: a new KVS (named after `wiring`) holding the new mapping, fences
    /// from 1, this node's new ranks; the older incarnation's connections get no answer
    /// any more (their ranks are being stopped) and their fences end.
    fn reincarnate(&self, wiring: u64, placement: &[adaptation::NodeId]) -> Result<()> {
        let mut st = self.state.lock().expect("pmi lock");
        if wiring <= st.generation {
            return Ok(());
        }
        let used = st.used;
        *st = NodeState::fresh(Layout::new(self.node, placement, &self.job, wiring));
        st.generation = wiring;
        st.used = used;
        drop(st);
        self.changed.notify_all();
        Ok(())
    }
}

impl NodeState {
    fn fresh(layout: Layout) -> NodeState {
        let mut kvs = HashMap::new();
        kvs.insert("PMI_process_mapping".to_string(), layout.mapping.clone());
        NodeState {
            layout,
            kvs,
            next_fence: 1,
            ..NodeState::default()
        }
    }
}

impl NodeServer {
    /// The server for node `node` of a job placed as `counts` (ranks per node, in node
    /// order); `job` names the KVS; `tell` reaches krun.
    pub fn new(node: usize, counts: &[usize], job: &str, tell: Teller) -> Arc<NodeServer> {
        let layout = Layout::new(node, &placement_of(counts), job, 0);
        Arc::new(NodeServer {
            node,
            job: job.to_string(),
            state: Mutex::new(NodeState::fresh(layout)),
            changed: Condvar::new(),
            tell,
        })
    }

    /// `PMI_process_mapping` as served.
    pub fn mapping(&self) -> String {
        self.state.lock().expect("pmi lock").layout.mapping.clone()
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
        let generation = {
            let mut st = self.state.lock().expect("pmi lock");
            st.ranks.insert(rank as u32, RankPmi::default());
            st.generation
        };
        let env = {
            let st = self.state.lock().expect("pmi lock");
            let l = &st.layout;
            let local_id = l
                .local
                .iter()
                .position(|&r| r as usize == rank)
                .unwrap_or(0);
            vec![
                ("PMI_FD".to_string(), fd.to_string()),
                ("PMI_RANK".to_string(), rank.to_string()),
                ("PMI_SIZE".to_string(), l.size.to_string()),
                ("PMI_SPAWNED".to_string(), "0".to_string()),
                (
                    "MPI_LOCALNRANKS".to_string(),
                    l.local.len().max(1).to_string(),
                ),
                ("MPI_LOCALRANKID".to_string(), local_id.to_string()),
            ]
        };
        let me = self.clone();
        std::thread::Builder::new()
            .name(format!("krund-pmi-{rank}"))
            .spawn(move || me.serve(rank as u32, generation, ours))
            .map_err(|e| LauncherError::Io {
                context: format!("starting rank {rank}'s PMI thread"),
                source: e,
            })?;
        Ok(RankExtras {
            env,
            keep_fd: Some(OwnedFd::from(theirs)),
        })
    }

    /// Serves one rank's connection (opened in incarnation `generation`) until it closes or
    /// a newer incarnation starts.
    fn serve(&self, rank: u32, generation: u64, stream: UnixStream) {
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
                // PMI-2's client starts with PMI-1's init asking for version 2; the link
                // then speaks PMI-2's framing.
                Ok(c) if c.cmd == "init" && c.get("pmi_version") == Some("2") => {
                    {
                        let mut st = self.state.lock().expect("pmi lock");
                        if st.generation != generation {
                            return;
                        }
                        st.used = true;
                        st.ranks.entry(rank).or_default().initialized = true;
                    }
                    let ok = "cmd=response_to_init pmi_version=2 pmi_subversion=0 rc=0\n";
                    if out.write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                    return self.serve_pmi2(rank, generation, reader, out);
                }
                Ok(c) => self.answer(rank, generation, &c),
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

    /// The answer to one command (`None`: close the link). A connection of an older
    /// incarnation gets none: its rank is being stopped by a recovery.
    fn answer(&self, rank: u32, generation: u64, c: &Command) -> Option<String> {
        let rc_fail = |cmd: &str, msg: &str| format!("cmd={cmd} rc=-1 msg={msg}\n");
        let layout = {
            let st = self.state.lock().expect("pmi lock");
            if st.generation != generation {
                return None;
            }
            st.layout.clone()
        };
        Some(match c.cmd.as_str() {
            "init" => {
                let mut st = self.state.lock().expect("pmi lock");
                st.used = true;
                st.ranks.entry(rank).or_default().initialized = true;
                drop(st);
                match c.get("pmi_version") {
                    Some("1") | None => {
                        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n".into()
                    }
                    Some(v) => format!(
                        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=-1 msg=pmi_version_{v}_is_not_served_(1_or_2)\n"
                    ),
                }
            }
            "get_maxes" => format!(
                "cmd=maxes kvsname_max={KVSNAME_MAX} keylen_max={KEYLEN_MAX} vallen_max={VALLEN_MAX}\n"
            ),
            "get_appnum" => "cmd=appnum appnum=0\n".into(),
            "get_my_kvsname" => format!("cmd=my_kvsname kvsname={}\n", layout.kvsname),
            "get_universe_size" => format!("cmd=universe_size size={}\n", layout.size),
            "put" => match self.put(c.get("key"), c.get("value")) {
                Ok(()) => "cmd=put_result rc=0 msg=success\n".into(),
                Err(PutRefused::TooLong) => rc_fail("put_result", "key_or_value_too_long"),
                Err(PutRefused::Missing) => rc_fail("put_result", "put_needs_key_and_value"),
            },
            "get" => match c.get("key") {
                Some(k) => match self.state.lock().expect("pmi lock").kvs.get(k) {
                    Some(v) => format!("cmd=get_result rc=0 msg=success value={v}\n"),
                    None => rc_fail("get_result", "key_not_found"),
                },
                None => rc_fail("get_result", "get_needs_a_key"),
            },
            "barrier_in" => match self.fence(rank, generation) {
                Ok(()) => "cmd=barrier_out\n".into(),
                // A recovery restarts every rank: this one is being stopped.
                Err(_) if self.state.lock().expect("pmi lock").generation != generation => {
                    return None
                }
                // The fence failed and krun ends the job: the rank waits here for its end
                // (an answer would let it go on to the next fence, a closed link would make
                // MPICH report a PMI error of its own).
                Err(_) => loop {
                    std::thread::park();
                },
            },
            "finalize" => {
                self.mark(rank, |r| r.finalized = true);
                "cmd=finalize_ack\n".into()
            }
            "abort" => {
                let code = c
                    .get("exitcode")
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(1);
                self.mark(rank, |r| r.aborted = true);
                (self.tell)(PmiToLauncher::Abort {
                    wire: Wire::Pmi1,
                    rank,
                    code,
                });
                return None;
            }
            other => format!("cmd={other} rc=-1 msg=command_not_served_by_krund\n"),
        })
    }

    /// A rank's put (PMI-1 `put`, PMI-2 `kvs-put`): kept for this node's gets and sent to
    /// krun at the next fence. Each protocol words the refusals its own way.
    fn put(&self, key: Option<&str>, value: Option<&str>) -> std::result::Result<(), PutRefused> {
        let (Some(k), Some(v)) = (key, value) else {
            return Err(PutRefused::Missing);
        };
        if k.len() > KEYLEN_MAX || v.len() > VALLEN_MAX {
            return Err(PutRefused::TooLong);
        }
        let mut st = self.state.lock().expect("pmi lock");
        st.kvs.insert(k.to_string(), v.to_string());
        st.pending.push((k.to_string(), v.to_string()));
        Ok(())
    }

    /// Updates `rank`'s PMI life (init, finalize, abort).
    fn mark(&self, rank: u32, f: impl FnOnce(&mut RankPmi)) {
        f(self
            .state
            .lock()
            .expect("pmi lock")
            .ranks
            .entry(rank)
            .or_default());
    }

    /// `rank` enters the node's next fence; returns once krun says it completed (a failed
    /// fence ends the job: krun stops the node, and the rank with it; a newer incarnation
    /// fails the older one's fences).
    fn fence(&self, rank: u32, generation: u64) -> std::result::Result<(), String> {
        let mut st = self.state.lock().expect("pmi lock");
        if st.generation != generation {
            return Err("a newer incarnation of the job runs".into());
        }
        let seq = st.next_fence;
        st.entered.insert(rank);
        if st.layout.local.iter().all(|r| st.entered.contains(r)) {
            let puts = std::mem::take(&mut st.pending);
            st.entered.clear();
            st.next_fence += 1;
            let ranks = st.layout.local.clone();
            drop(st);
            (self.tell)(PmiToLauncher::Fence {
                seq,
                ranks,
                data: FenceData::Puts(puts),
            });
            st = self.state.lock().expect("pmi lock");
        }
        loop {
            if st.generation != generation {
                return Err("a newer incarnation of the job runs".into());
            }
            if let Some(r) = st.done.get(&seq) {
                return r.clone();
            }
            st = self.changed.wait(st).expect("pmi lock");
        }
    }
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
    fn process_mapping_of_any_placement_numbers_nodes_and_keeps_rank_order() {
        assert_eq!(placement_of(&[2, 1, 0]), vec![0, 0, 1]);
        assert_eq!(
            process_mapping_placed(&[0, 0, 1, 1, 2, 2]),
            "(vector,(0,3,2))"
        );
        // Node 1's ranks restarted on spare node 3: ranks 2-3 are on the third node.
        assert_eq!(
            process_mapping_placed(&[0, 0, 3, 3, 2, 2]),
            "(vector,(0,1,2),(2,1,2),(1,1,2))"
        );
        assert_eq!(process_mapping_placed(&[1, 0]), "(vector,(1,1,1),(0,1,1))");
    }

    fn env_of(x: &RankExtras, k: &str) -> String {
        x.env
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_new_incarnation_serves_the_new_placement_and_closes_the_old_ones_links() {
        let told = Arc::new(Mutex::new(Vec::new()));
        let t = told.clone();
        let tell: Teller = Arc::new(move |m| t.lock().unwrap().push(m));
        // Node 0 runs ranks 0-1 of [2, 2] and a spare (node 2) none.
        let node0 = NodeServer::new(0, &[2, 2, 0], "t", tell.clone());
        let spare = NodeServer::new(2, &[2, 2, 0], "t", tell);
        let old = node0.connect(1).unwrap();
        let mut s = UnixStream::from(old.keep_fd.unwrap());
        let mut r = BufReader::new(s.try_clone().unwrap());
        s.write_all(b"cmd=init pmi_version=1 pmi_subversion=1\n")
            .unwrap();
        let mut a = String::new();
        r.read_line(&mut a).unwrap();
        assert!(a.contains("rc=0"), "{a}");
        assert!(node0.used() && !spare.used());
        // Node 1 failed; every rank restarts in wiring epoch 1, ranks 2-3 on the spare.
        let placement = [0, 0, 2, 2];
        node0.reincarnate(1, &placement).unwrap();
        spare.reincarnate(1, &placement).unwrap();
        // The old connection gets no answer: its link closes.
        s.write_all(b"cmd=get_maxes\n").unwrap();
        let mut a = String::new();
        assert_eq!(r.read_line(&mut a).unwrap(), 0, "{a}");
        // The spare serves ranks 2-3 now, in the new KVS with the new mapping.
        let x = spare.connect(3).unwrap();
        assert_eq!(env_of(&x, "MPI_LOCALRANKID"), "1");
        assert_eq!(env_of(&x, "MPI_LOCALNRANKS"), "2");
        assert_eq!(env_of(&x, "PMI_SIZE"), "4");
        let mut s = UnixStream::from(x.keep_fd.unwrap());
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut ask = |q: &str| {
            s.write_all(q.as_bytes()).unwrap();
            let mut a = String::new();
            r.read_line(&mut a).unwrap();
            a
        };
        assert_eq!(
            ask("cmd=get_my_kvsname\n"),
            "cmd=my_kvsname kvsname=kvs_krun_t_w1\n"
        );
        // Nodes 0 and 2 run ranks now (numbered 0 and 1): two nodes of 2 ranks each.
        assert!(
            ask("cmd=get kvsname=kvs_krun_t_w1 key=PMI_process_mapping\n")
                .contains("value=(vector,(0,2,2))")
        );
        // The spare's first fence names its new ranks once both entered.
        let spare2 = spare.clone();
        let other = std::thread::spawn(move || {
            let x = spare2.connect(2).unwrap();
            let mut s = UnixStream::from(x.keep_fd.unwrap());
            s.write_all(b"cmd=barrier_in\n").unwrap();
            s
        });
        let waiter = {
            let told = told.clone();
            let spare = spare.clone();
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    let fenced = told.lock().unwrap().iter().any(|m| {
                        matches!(m, PmiToLauncher::Fence { seq: 1, ranks, .. } if ranks == &vec![2, 3])
                    });
                    if fenced {
                        spare.deliver(PmiToNode::Fenced {
                            seq: 1,
                            data: FenceData::Puts(Vec::new()),
                        });
                        return true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                false
            })
        };
        assert_eq!(ask("cmd=barrier_in\n"), "cmd=barrier_out\n");
        assert!(waiter.join().unwrap());
        drop(other.join().unwrap());
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
                if let Some(PmiToLauncher::Fence {
                    seq,
                    ranks,
                    data: FenceData::Puts(puts),
                }) = seen.first()
                {
                    assert_eq!((*seq, ranks.clone()), (1, vec![0]));
                    assert_eq!(puts, &vec![("k0".to_string(), "v0".to_string())]);
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            s2.deliver(PmiToNode::Fenced {
                seq: 1,
                data: FenceData::Puts(vec![("k1".into(), "v1".into())]),
            });
        });
        assert_eq!(ask("cmd=barrier_in\n"), "cmd=barrier_out\n");
        waiter.join().unwrap();
        assert!(ask("cmd=get kvsname=kvs_krun_t key=k1\n").contains("value=v1"));
        assert_eq!(ask("cmd=finalize\n"), "cmd=finalize_ack\n");
    }
}
