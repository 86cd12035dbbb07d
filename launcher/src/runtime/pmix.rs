//! PMIx for MPI programs (Open MPI): krund serves PMIx to its local ranks through
//! OpenPMIx's server library (`pmix-sys`, Debian's libpmix-dev), and fences exchange the
//! ranks' data across nodes through krun's [`Coordinator`](super::mpi::Coordinator), the
//! same path as PMI-1's (`runtime/pmi.rs`): each node's contribution travels as an opaque
//! blob, krun hands every node all of them.
//!
//! - [`PmixServer::start`] initialises the library (its rendezvous socket in a private
//!   directory) with the machine's topology (`crate::topology`: loaded from the machine's
//!   cache, or discovered by the first krund on the machine and cached; I/O devices
//!   included), which the library shares with the ranks (hwloc shared memory and XML:
//!   Open MPI's ranks adopt it instead of each discovering the machine), registers the
//!   job's namespace with the job's information (sizes, node and process maps, local
//!   peers: the library derives every rank's host name, local and node rank from the maps),
//!   stores the node's own ranks' data (krun's node id among it) and registers them as
//!   clients (`pmix/register.rs`).
//! - [`PmixServer::rank_setup`] gives each rank the environment `PMIx_server_setup_fork`
//!   makes (`PMIX_NAMESPACE`, `PMIX_RANK`, the server's URI, ...): Open MPI's client finds
//!   the server there.
//! - The library calls back from its progress thread (`pmix/callbacks.rs`): a client
//!   connected or finalized, an abort (the job ends with the code), a fence (the node's
//!   blob goes to krun; krun's answer completes it), a direct modex request (routed through
//!   krun to the node that holds the rank, which asks its library with
//!   `PMIx_server_dmodex_request`). Every callback catches panics: none crosses into C.
//! - A fence over a part of the job (`PMIx_Fence` with some of the job's procs) is
//!   gathered like a whole-job one, keyed by its group and numbered per group: only the
//!   nodes that hold the group's ranks take part, and krun completes it once all of them
//!   did ([`PmiToLauncher::GroupFence`]). A fence with another namespace's procs is
//!   answered `PMIX_ERR_NOT_SUPPORTED` at once, with a line on stderr.
//! - `PMIx_Spawn` (`MPI_Comm_spawn`) is not supported: the spawn upcall answers
//!   `PMIX_ERR_NOT_SUPPORTED` at once and says so on stderr, so the caller gets an error
//!   instead of waiting.
//! - A recovery that restarts every rank ([`RankWatch::reincarnate`],
//!   `runtime/mpi_recovery.rs`) registers a new namespace, `krun.<job>.w<wiring>`, with the
//!   new placement (a spare's ranks included) and this node's new ranks as clients; the
//!   older namespace's clients (being stopped) get no service any more. Older namespaces
//!   stay registered until the server ends (one per recovery).
//!
//! A process hosts one PMIx server at most (the library's state is global).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use pmix_sys as sys;

mod callbacks;
mod ffi;
mod register;
mod topology;

pub use register::{node_name, ppn_input};

use super::mpi::{
    FenceData, PmiToLauncher, PmiToNode, RankExtras, RankSetup, RankWatch, Teller, Wire, WireState,
};
use crate::error::{LauncherError, Result};
use adaptation::NodeId;
use callbacks::Pending;
use ffi::{pmix_error, proc_of, status, Infos, SUCCESS};
use topology::{machine_topology, GivenTopology};

/// One incarnation of the job as the node serves it.
#[derive(Default, Clone)]
struct Layout {
    /// The wiring epoch every rank started in (0: the job's start).
    wiring: u64,
    nspace: String,
    /// Rank -> node.
    placement: Vec<NodeId>,
    /// This node's ranks, ascending.
    local: Vec<u32>,
}

impl Layout {
    fn new(node: usize, placement: &[NodeId], job: &str, wiring: u64) -> Layout {
        Layout {
            wiring,
            nspace: if wiring == 0 {
                format!("krun.{job}")
            } else {
                format!("krun.{job}.w{wiring}")
            },
            placement: placement.to_vec(),
            local: (0..placement.len() as u32)
                .filter(|&r| placement[r as usize] as usize == node)
                .collect(),
        }
    }
}

#[derive(Default)]
struct State {
    layout: Layout,
    ranks: BTreeMap<u32, WireState>,
    /// Some rank ever connected (in any incarnation).
    used: bool,
    /// The next fence's number (from 1).
    next_fence: u64,
    /// Fences waiting for krun's answer.
    fences: HashMap<u64, Pending>,
    /// Fences over a part of the job: the next number per group (from 1), and those
    /// waiting for krun's answer.
    next_group_fence: HashMap<Vec<u32>, u64>,
    group_fences: HashMap<(Vec<u32>, u64), Pending>,
    next_ask: u64,
    /// Direct modex requests waiting for another node's answer.
    asks: HashMap<u64, Pending>,
}

/// The node's PMIx server (krund).
pub struct PmixServer {
    node: usize,
    job: String,
    tmpdir: PathBuf,
    /// The node's shared-memory directory for Open MPI's ranks (in /dev/shm).
    shm_dir: PathBuf,
    /// `KRUN_PMIX_TRACE=1`: krund prints the library's requests (fences, direct modex,
    /// aborts) on stderr.
    trace: bool,
    tell: Teller,
    state: Mutex<State>,
    /// The machine's topology the library was given (`PMIX_TOPOLOGY2`): it keeps using it
    /// until the process ends. `None`: the library discovered its own.
    topology: Option<GivenTopology>,
}

/// The process's server, for the library's callbacks.
static SERVER: OnceLock<Arc<PmixServer>> = OnceLock::new();

impl PmixServer {
    /// Starts the library and registers the job for node `node` of a job placed as
    /// `counts` (ranks per node, in node order); `job` names the namespace; `tell` reaches
    /// krun.
    pub fn start(
        node: usize,
        counts: &[usize],
        job: &str,
        tell: Teller,
    ) -> Result<Arc<PmixServer>> {
        if SERVER.get().is_some() {
            return Err(LauncherError::Usage(
                "PMIx: this process serves PMIx already".into(),
            ));
        }
        let shm = std::path::Path::new("/dev/shm");
        // A SIGKILLed node cannot remove its directories: the next server does.
        remove_stale_dirs(&[std::env::temp_dir().as_path(), shm]);
        let tmpdir = std::env::temp_dir().join(format!("krun-pmix-{}", std::process::id()));
        let shm_dir = if shm.is_dir() {
            shm.join(format!("krun-pmix-{}", std::process::id()))
        } else {
            tmpdir.join("shm")
        };
        for dir in [&tmpdir, &shm_dir] {
            use std::os::unix::fs::DirBuilderExt;
            let _ = std::fs::remove_dir_all(dir);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(dir)
                .map_err(|e| LauncherError::Io {
                    context: format!("creating the PMIx directory {}", dir.display()),
                    source: e,
                })?;
        }
        let trace = std::env::var("KRUN_PMIX_TRACE").is_ok_and(|v| v == "1");
        let topology = machine_topology(node, trace);
        let server = Arc::new(PmixServer {
            node,
            job: job.to_string(),
            tmpdir: tmpdir.clone(),
            shm_dir,
            trace,
            tell,
            topology,
            state: Mutex::new(State {
                next_fence: 1,
                ..State::default()
            }),
        });
        SERVER
            .set(server.clone())
            .map_err(|_| LauncherError::Usage("PMIx: this process serves PMIx already".into()))?;

        // The library keeps the module's address: it lives as long as the process.
        let module: &'static mut sys::pmix_server_module_t =
            Box::leak(Box::new(callbacks::module()));
        let dir = tmpdir.to_string_lossy().into_owned();
        let mut init = Infos::new();
        init.string(sys::PMIX_SERVER_TMPDIR, &dir)?;
        init.string(sys::PMIX_SYSTEM_TMPDIR, &dir)?;
        init.string(sys::PMIX_HOSTNAME, &node_name(node))?;
        init.u32(sys::PMIX_SERVER_RANK, node as u32)?;
        // No system-wide or tool rendezvous: only this node's ranks connect.
        init.boolean(sys::PMIX_SERVER_TOOL_SUPPORT, false)?;
        init.boolean(sys::PMIX_SERVER_SYSTEM_SUPPORT, false)?;
        // The topology goes to the ranks too (hwloc shared memory in the server's directory,
        // and XML): Open MPI adopts it instead of discovering the machine in every rank.
        init.boolean(sys::PMIX_SERVER_SHARE_TOPOLOGY, true)?;
        if let Some(t) = &server.topology {
            // SAFETY: the descriptor and its topology live in the server, which lives as
            // long as the process (SERVER).
            unsafe {
                init.topology(
                    &*t.descriptor as *const sys::pmix_topology_t as *mut sys::pmix_topology_t,
                )
            };
        }
        // SAFETY: the module lives forever; the infos outlive the call (the library copies
        // what it keeps).
        let rc = unsafe { sys::PMIx_server_init(module, init.0.as_mut_ptr(), init.0.len()) };
        if rc != SUCCESS {
            return Err(pmix_error("PMIx_server_init", rc));
        }
        let layout = Layout::new(node, &crate::runtime::pmi::placement_of(counts), job, 0);
        server.register(&layout)?;
        server.install(layout);
        Ok(server)
    }

    /// Serves `layout` from now on: fences from 1, its ranks not yet connected; what the
    /// older incarnation waited for is dropped (its ranks are being stopped).
    fn install(&self, layout: Layout) {
        let mut st = self.state.lock().expect("pmix lock");
        st.ranks = layout
            .local
            .iter()
            .map(|&r| (r, WireState::default()))
            .collect();
        st.layout = layout;
        st.next_fence = 1;
        st.fences.clear();
        st.next_group_fence.clear();
        st.group_fences.clear();
        st.asks.clear();
    }

    /// The current incarnation's namespace.
    fn nspace(&self) -> String {
        self.state.lock().expect("pmix lock").layout.nspace.clone()
    }

    /// The hook for the rank runner: the PMIx environment of each rank.
    pub fn rank_setup(self: &Arc<Self>) -> RankSetup {
        let me = self.clone();
        RankSetup(Arc::new(move |rank| me.setup_fork(rank)))
    }

    /// The environment the library makes for `rank`'s process.
    pub fn setup_fork(&self, rank: usize) -> Result<RankExtras> {
        let p = proc_of(&self.nspace(), rank as u32);
        let mut env: *mut *mut c_char = std::ptr::null_mut();
        // SAFETY: the library appends malloc'd "KEY=VALUE" strings to a NULL-terminated,
        // malloc'd array it creates; both are freed below.
        let rc = unsafe { sys::PMIx_server_setup_fork(&p, &mut env) };
        let mut out = Vec::new();
        if !env.is_null() {
            // SAFETY: a NULL-terminated array of NUL-terminated strings (see above).
            unsafe {
                let mut i = 0;
                loop {
                    let s = *env.add(i);
                    if s.is_null() {
                        break;
                    }
                    let kv = CStr::from_ptr(s).to_string_lossy().into_owned();
                    if let Some((k, v)) = kv.split_once('=') {
                        out.push((k.to_string(), v.to_string()));
                    }
                    libc::free(s as *mut c_void);
                    i += 1;
                }
                libc::free(env as *mut c_void);
            }
        }
        if rc != SUCCESS {
            return Err(pmix_error(
                &format!("setting up rank {rank}'s environment"),
                rc,
            ));
        }
        out.extend(self.open_mpi_env());
        Ok(RankExtras {
            env: out,
            keep_fd: None,
        })
    }

    /// What Open MPI 4.1 needs besides PMIx's own environment, unless the job sets it:
    /// - `OMPI_MCA_schizo=^orte`: without a daemon of its own, Slurm, Flux or JSM, Open
    ///   MPI's "orte" personality declares a directly started process a singleton (and
    ///   starts one alone); without it, Open MPI selects its PMIx client (`ess pmi`).
    /// - `OMPI_MCA_btl_vader_backing_directory`: the shared-memory transport names its
    ///   segments after the host name and local rank; krun's nodes sharing a machine would
    ///   collide in /dev/shm, so each node's ranks get the node's own directory.
    fn open_mpi_env(&self) -> Vec<(String, String)> {
        [
            ("OMPI_MCA_schizo", "^orte".to_string()),
            (
                "OMPI_MCA_btl_vader_backing_directory",
                self.shm_dir.to_string_lossy().into_owned(),
            ),
        ]
        .into_iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Another node asks for local `rank`'s data: the library gives it once the rank
    /// committed it.
    fn dmodex_ask(&self, from: adaptation::NodeId, id: u64, rank: u32) {
        self.trace(format_args!(
            "direct modex: node {from} asks for rank {rank}'s data"
        ));
        let p = proc_of(&self.nspace(), rank);
        let ask = Box::into_raw(Box::new((from, id))) as *mut c_void;
        // SAFETY: `ask` is released by `dmodex_answer`, which the library calls once.
        let rc =
            unsafe { sys::PMIx_server_dmodex_request(&p, Some(callbacks::dmodex_answer), ask) };
        if rc != SUCCESS {
            // SAFETY: not handed to the library after all.
            drop(unsafe { Box::from_raw(ask as *mut (adaptation::NodeId, u64)) });
            (self.tell)(PmiToLauncher::DmodexData {
                to: from,
                id,
                data: None,
            });
        }
    }

    fn trace(&self, what: std::fmt::Arguments) {
        if self.trace {
            eprintln!("krund: node {}: PMIx {what}", self.node);
        }
    }

    /// Marks `rank` of namespace `nspace`; false (nothing done) when that is not the
    /// current incarnation's.
    fn mark(&self, nspace: &str, rank: u32, f: impl FnOnce(&mut WireState)) -> bool {
        let mut st = self.state.lock().expect("pmix lock");
        if st.layout.nspace != nspace {
            return false;
        }
        st.used = true;
        f(st.ranks.entry(rank).or_default());
        true
    }

    /// The library's fence: the node's blob goes to krun.
    fn fence(
        &self,
        procs: &[sys::pmix_proc_t],
        data: &[u8],
        pending: Pending,
    ) -> sys::pmix_status_t {
        let layout = self.state.lock().expect("pmix lock").layout.clone();
        let spaces: BTreeSet<String> = procs
            .iter()
            // SAFETY: valid procs from the library.
            .map(|p| unsafe { ffi::nspace_of(p) })
            .collect();
        if spaces
            .iter()
            .any(|s| *s != layout.nspace && s.starts_with("krun."))
        {
            // An older incarnation's ranks (being stopped by a recovery).
            return status(sys::PMIX_ERR_NOT_SUPPORTED as u32);
        }
        if spaces.iter().any(|s| *s != layout.nspace) {
            eprintln!(
                "krund: node {}: a PMIx fence with processes of another namespace ({}) is \
                 not supported: krun serves one job (namespace {}); answered \
                 PMIX_ERR_NOT_SUPPORTED",
                self.node,
                spaces
                    .iter()
                    .filter(|s| **s != layout.nspace)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                layout.nspace
            );
            return status(sys::PMIX_ERR_NOT_SUPPORTED as u32);
        }
        let mut group: Vec<u32> = procs.iter().map(|p| p.rank).collect();
        group.sort_unstable();
        group.dedup();
        let whole = group.contains(&sys::RANK_WILDCARD)
            || (group.len() == layout.placement.len()
                && group.iter().all(|&r| (r as usize) < layout.placement.len()));
        if !whole {
            return self.group_fence(&layout, group, data, pending);
        }
        let seq = {
            let mut st = self.state.lock().expect("pmix lock");
            let seq = st.next_fence;
            st.next_fence += 1;
            st.fences.insert(seq, pending);
            seq
        };
        self.trace(format_args!(
            "fence {seq}: {} bytes of the node's data",
            data.len()
        ));
        (self.tell)(PmiToLauncher::Fence {
            seq,
            ranks: layout.local.clone(),
            data: FenceData::Blobs(vec![data.to_vec()]),
        });
        SUCCESS
    }

    /// A fence over `group`, a part of the job's ranks: the node's blob (the library
    /// packs only the group's local ranks) goes to krun, which completes it once every
    /// node holding a rank of the group took part.
    fn group_fence(
        &self,
        layout: &Layout,
        group: Vec<u32>,
        data: &[u8],
        pending: Pending,
    ) -> sys::pmix_status_t {
        if let Some(bad) = group
            .iter()
            .find(|&&r| r as usize >= layout.placement.len())
        {
            eprintln!(
                "krund: node {}: a PMIx fence names rank {bad}, not a rank of the job ({} \
                 ranks); answered PMIX_ERR_BAD_PARAM",
                self.node,
                layout.placement.len()
            );
            return status(sys::PMIX_ERR_BAD_PARAM as u32);
        }
        let ranks: Vec<u32> = layout
            .local
            .iter()
            .copied()
            .filter(|r| group.contains(r))
            .collect();
        let seq = {
            let mut st = self.state.lock().expect("pmix lock");
            let next = st.next_group_fence.entry(group.clone()).or_insert(1);
            let seq = *next;
            *next += 1;
            st.group_fences.insert((group.clone(), seq), pending);
            seq
        };
        self.trace(format_args!(
            "fence {seq} over ranks {group:?}: {} bytes of the node's data",
            data.len()
        ));
        (self.tell)(PmiToLauncher::GroupFence {
            group,
            seq,
            ranks,
            data: FenceData::Blobs(vec![data.to_vec()]),
        });
        SUCCESS
    }

    /// The library asks for a remote rank's data (direct modex).
    fn direct_modex(&self, nspace: &str, rank: u32, pending: Pending) -> sys::pmix_status_t {
        self.trace(format_args!(
            "direct modex: a local rank asks for rank {rank}'s data"
        ));
        let node = {
            let st = self.state.lock().expect("pmix lock");
            if st.layout.nspace != nspace {
                return status(sys::PMIX_ERR_NOT_FOUND as u32);
            }
            st.layout.placement.get(rank as usize).copied()
        };
        let Some(node) = node else {
            return status(sys::PMIX_ERR_NOT_FOUND as u32);
        };
        if node as usize == self.node {
            return status(sys::PMIX_ERR_NOT_FOUND as u32);
        }
        let id = {
            let mut st = self.state.lock().expect("pmix lock");
            st.next_ask += 1;
            let id = st.next_ask;
            st.asks.insert(id, pending);
            id
        };
        (self.tell)(PmiToLauncher::DmodexAsk {
            node: node as adaptation::NodeId,
            id,
            rank,
        });
        SUCCESS
    }

    /// Stops the library and removes its directory (at the node's end).
    pub fn finish(&self) {
        // SAFETY: no client is served after the node's ranks ended.
        unsafe { sys::PMIx_server_finalize() };
        let _ = std::fs::remove_dir_all(&self.tmpdir);
        let _ = std::fs::remove_dir_all(&self.shm_dir);
    }
}

impl RankWatch for PmixServer {
    /// krun's message for the node's PMIx server (PMI-1's are not its).
    fn deliver(&self, msg: PmiToNode) {
        match msg {
            PmiToNode::Fenced {
                seq,
                data: FenceData::Blobs(blobs),
            } => {
                let pending = self.state.lock().expect("pmix lock").fences.remove(&seq);
                if let Some(p) = pending {
                    p.complete(SUCCESS, blobs.concat());
                }
            }
            // The job ends (krun printed why, naming the rank): the ranks wait in the
            // fence until they are stopped, as with PMI-1; an error here would make Open
            // MPI abort with a message and a code of its own first.
            PmiToNode::FenceFailed {
                wire: Wire::Pmix,
                seq,
                ..
            } => {
                let _ = self.state.lock().expect("pmix lock").fences.remove(&seq);
            }
            PmiToNode::GroupFenced {
                group,
                seq,
                data: FenceData::Blobs(blobs),
            } => {
                let pending = self
                    .state
                    .lock()
                    .expect("pmix lock")
                    .group_fences
                    .remove(&(group, seq));
                if let Some(p) = pending {
                    p.complete(SUCCESS, blobs.concat());
                }
            }
            // As a whole-job fence that fails: the job ends.
            PmiToNode::GroupFenceFailed { group, seq, .. } => {
                let _ = self
                    .state
                    .lock()
                    .expect("pmix lock")
                    .group_fences
                    .remove(&(group, seq));
            }
            PmiToNode::DmodexAsk { from, id, rank } => self.dmodex_ask(from, id, rank),
            PmiToNode::DmodexData { id, data } => {
                let pending = self.state.lock().expect("pmix lock").asks.remove(&id);
                if let Some(p) = pending {
                    match data {
                        Some(d) => p.complete(SUCCESS, d),
                        None => p.complete(status(sys::PMIX_ERR_NOT_FOUND as u32), Vec::new()),
                    }
                }
            }
            _ => {}
        }
    }

    fn state(&self, rank: u32) -> WireState {
        self.state
            .lock()
            .expect("pmix lock")
            .ranks
            .get(&rank)
            .copied()
            .unwrap_or_default()
    }

    fn used(&self) -> bool {
        self.state.lock().expect("pmix lock").used
    }

    /// Registers the new incarnation's namespace (the new placement, this node's new ranks
    /// as clients), then serves it.
    fn reincarnate(&self, wiring: u64, placement: &[NodeId]) -> Result<()> {
        if wiring <= self.state.lock().expect("pmix lock").layout.wiring {
            return Ok(());
        }
        let layout = Layout::new(self.node, placement, &self.job, wiring);
        self.trace(format_args!(
            "incarnation of wiring epoch {wiring}: namespace {}, local ranks {:?}",
            layout.nspace, layout.local
        ));
        self.register(&layout)?;
        self.install(layout);
        Ok(())
    }
}

/// Removes the `krun-pmix-PID` directories under `bases` that belong to this user and
/// whose process is gone.
fn remove_stale_dirs(bases: &[&std::path::Path]) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    for base in bases {
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("krun-pmix-")
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let ours = e.metadata().is_ok_and(|m| m.uid() == uid && m.is_dir());
            // SAFETY: kill with signal 0 only checks that the process exists.
            let alive = pid > 0 && unsafe { libc::kill(pid, 0) } == 0;
            if ours && !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_of_gone_servers_are_removed_and_a_live_ones_kept() {
        let base = std::env::temp_dir().join(format!("krun-pmix-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let dead = base.join(format!("krun-pmix-{gone}"));
        let live = base.join(format!("krun-pmix-{}", std::process::id()));
        let other = base.join("krun-pmix-notapid");
        for d in [&dead, &live, &other] {
            std::fs::create_dir_all(d.join("shm")).unwrap();
        }
        remove_stale_dirs(&[base.as_path()]);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn proc_maps_list_each_nodes_ranks_and_skip_spares() {
        use crate::runtime::pmi::placement_of;
        assert_eq!(ppn_input(&placement_of(&[2, 2, 1, 0])), "0,1;2,3;4");
        assert_eq!(ppn_input(&placement_of(&[3])), "0,1,2");
        // After a recovery: node 1's ranks on spare node 3.
        assert_eq!(ppn_input(&[0, 0, 3, 3, 2]), "0,1;4;2,3");
    }

    #[test]
    fn an_incarnation_names_its_namespace_and_this_nodes_ranks() {
        let l = Layout::new(3, &[0, 0, 3, 3, 2], "9", 2);
        assert_eq!(l.nspace, "krun.9.w2");
        assert_eq!(l.local, vec![2, 3]);
        let l = Layout::new(0, &[0, 0, 1], "9", 0);
        assert_eq!((l.nspace.as_str(), l.local), ("krun.9", vec![0, 1]));
    }

    #[test]
    fn procs_carry_their_namespace_and_rank() {
        let p = proc_of("krun.7", 3);
        assert_eq!(p.rank, 3);
        // SAFETY: a valid proc.
        assert_eq!(unsafe { ffi::nspace_of(&p) }, "krun.7");
    }
}
