//! PMIx for MPI programs (Open MPI): krund serves PMIx to its local ranks through
//! OpenPMIx's server library (`pmix-sys`, Debian's libpmix-dev), and fences exchange the
//! ranks' data across nodes through krun's [`Coordinator`](super::mpi::Coordinator), the
//! same path as PMI-1's (`runtime/pmi.rs`): each node's contribution travels as an opaque
//! blob, krun hands every node all of them.
//!
//! - [`PmixServer::start`] initialises the library (its rendezvous socket in a private
//!   directory), registers the job's namespace with the job's information (size, node and
//!   process maps, local peers, each rank's local and node rank, host name and node id) and
//!   every local rank as a client.
//! - [`PmixServer::rank_setup`] gives each rank the environment `PMIx_server_setup_fork`
//!   makes (`PMIX_NAMESPACE`, `PMIX_RANK`, the server's URI, ...): Open MPI's client finds
//!   the server there.
//! - The library calls back from its progress thread: a client connected or finalized, an
//!   abort (the job ends with the code), a fence (the node's blob goes to krun; krun's
//!   answer completes it), a direct modex request (routed through krun to the node that
//!   holds the rank, which asks its library with `PMIx_server_dmodex_request`). Every
//!   callback catches panics: none crosses into C.
//!
//! A process hosts one PMIx server at most (the library's state is global).
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use pmix_sys as sys;

use super::mpi::{
    FenceData, PmiToLauncher, PmiToNode, RankExtras, RankSetup, RankWatch, Teller, Wire, WireState,
};
use crate::error::{LauncherError, Result};

/// How long a registration with the library may take before krund gives up.
const REGISTER_LIMIT: Duration = Duration::from_secs(30);

/// A callback of the library's, with its argument, to call once krun answers.
struct Pending {
    cb: sys::pmix_modex_cbfunc_t,
    cbdata: *mut c_void,
}

// SAFETY: the library's callbacks and their data may be called from any thread (it shifts
// them onto its own progress thread); the pointer is only handed back to it.
unsafe impl Send for Pending {}

impl Pending {
    /// Completes the operation with `data` (kept alive until the library releases it).
    fn complete(self, status: sys::pmix_status_t, data: Vec<u8>) {
        let Some(cb) = self.cb else { return };
        let data = Box::new(data);
        let (ptr, len) = (data.as_ptr() as *const c_char, data.len());
        let keep = Box::into_raw(data) as *mut c_void;
        // SAFETY: `cb` and `cbdata` came from the library for this one operation; the data
        // stays valid until it calls `release_blob` with `keep`.
        unsafe { cb(status, ptr, len, self.cbdata, Some(release_blob), keep) };
    }
}

/// Frees a blob handed to the library by [`Pending::complete`].
///
/// # Safety
/// `keep` must be a pointer made by `Box::into_raw(Box<Vec<u8>>)` in [`Pending::complete`],
/// released once.
unsafe extern "C" fn release_blob(keep: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if !keep.is_null() {
            // SAFETY: see the function's contract.
            drop(unsafe { Box::from_raw(keep as *mut Vec<u8>) });
        }
    }));
}

#[derive(Default)]
struct State {
    ranks: BTreeMap<u32, WireState>,
    /// The next fence's number (from 1).
    next_fence: u64,
    /// Fences waiting for krun's answer.
    fences: HashMap<u64, Pending>,
    next_ask: u64,
    /// Direct modex requests waiting for another node's answer.
    asks: HashMap<u64, Pending>,
}

/// The node's PMIx server (krund).
pub struct PmixServer {
    node: usize,
    /// Ranks per node, in node order.
    counts: Vec<usize>,
    first: usize,
    nspace: String,
    tmpdir: PathBuf,
    /// The node's shared-memory directory for Open MPI's ranks (in /dev/shm).
    shm_dir: PathBuf,
    /// `KRUN_PMIX_TRACE=1`: krund prints the library's requests (fences, direct modex,
    /// aborts) on stderr.
    trace: bool,
    tell: Teller,
    state: Mutex<State>,
}

/// The process's server, for the library's callbacks.
static SERVER: OnceLock<Arc<PmixServer>> = OnceLock::new();

/// The name the job's information gives node `i` (krun's nodes may share a machine, and a
/// host name: each needs its own).
pub fn node_name(i: usize) -> String {
    format!("krun-node{i}")
}

/// The rank lists of `PMIx_generate_ppn`: nodes separated by `;`, ranks by `,` (nodes
/// without ranks, spares at the end, left out).
pub fn ppn_input(counts: &[usize]) -> String {
    let mut first = 0;
    let mut nodes = Vec::new();
    for &c in counts.iter().filter(|&&c| c > 0) {
        nodes.push(
            (first..first + c)
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        first += c;
    }
    nodes.join(";")
}

/// The node that runs `rank`.
pub fn node_of(counts: &[usize], rank: usize) -> Option<usize> {
    let mut first = 0;
    for (node, &c) in counts.iter().enumerate() {
        if rank < first + c {
            return Some(node);
        }
        first += c;
    }
    None
}

fn pmix_error(what: &str, rc: sys::pmix_status_t) -> LauncherError {
    // SAFETY: PMIx_Error_string returns a static string for any status.
    let text = unsafe {
        let p = sys::PMIx_Error_string(rc);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    LauncherError::Usage(format!("PMIx: {what} failed: {text} ({rc})"))
}

fn status(s: u32) -> sys::pmix_status_t {
    s as sys::pmix_status_t
}

const SUCCESS: sys::pmix_status_t = sys::PMIX_SUCCESS as sys::pmix_status_t;
const OPERATION_SUCCEEDED: sys::pmix_status_t = sys::PMIX_OPERATION_SUCCEEDED;
const ERROR: sys::pmix_status_t = sys::PMIX_ERROR;

/// An array of `pmix_info_t` built for the library; each value is released on drop.
struct Infos(Vec<sys::pmix_info_t>);

impl Infos {
    fn new() -> Infos {
        Infos(Vec::new())
    }

    /// Adds `key` with `data` of `ty`.
    ///
    /// # Safety
    /// `data` must point to a value of the C type `ty` names (for strings, the string
    /// itself), valid for the call; the library copies it.
    unsafe fn load(&mut self, key: &[u8], data: *const c_void, ty: u32) -> Result<()> {
        let key = CStr::from_bytes_with_nul(key)
            .map_err(|_| LauncherError::Usage("PMIx: a key without its NUL".into()))?;
        let mut info = sys::pmix_info_t::default();
        // SAFETY: `info` is zeroed (an empty value); the caller vouches for `data`.
        let rc = unsafe {
            sys::PMIx_Info_load(&mut info, key.as_ptr(), data, ty as sys::pmix_data_type_t)
        };
        if rc != SUCCESS {
            return Err(pmix_error(&format!("loading {key:?}"), rc));
        }
        self.0.push(info);
        Ok(())
    }

    fn string(&mut self, key: &[u8], v: &str) -> Result<()> {
        let c = CString::new(v)
            .map_err(|_| LauncherError::Usage(format!("PMIx: value {v:?} holds a NUL")))?;
        // SAFETY: a NUL-terminated string for PMIX_STRING.
        unsafe { self.load(key, c.as_ptr() as *const c_void, sys::PMIX_STRING) }
    }

    fn u32(&mut self, key: &[u8], v: u32) -> Result<()> {
        // SAFETY: a uint32_t for PMIX_UINT32.
        unsafe { self.load(key, &v as *const u32 as *const c_void, sys::PMIX_UINT32) }
    }

    fn u16(&mut self, key: &[u8], v: u16) -> Result<()> {
        // SAFETY: a uint16_t for PMIX_UINT16.
        unsafe { self.load(key, &v as *const u16 as *const c_void, sys::PMIX_UINT16) }
    }

    fn rank(&mut self, key: &[u8], v: u32) -> Result<()> {
        // SAFETY: a pmix_rank_t (uint32_t) for PMIX_PROC_RANK.
        unsafe { self.load(key, &v as *const u32 as *const c_void, sys::PMIX_PROC_RANK) }
    }

    fn boolean(&mut self, key: &[u8], v: bool) -> Result<()> {
        // SAFETY: a C bool for PMIX_BOOL.
        unsafe { self.load(key, &v as *const bool as *const c_void, sys::PMIX_BOOL) }
    }

    /// A regular expression made by `PMIx_generate_regex` or `PMIx_generate_ppn`.
    fn regex(&mut self, key: &[u8], input: &str, ppn: bool) -> Result<()> {
        let c = CString::new(input)
            .map_err(|_| LauncherError::Usage(format!("PMIx: {input:?} holds a NUL")))?;
        let mut out: *mut c_char = std::ptr::null_mut();
        // SAFETY: a NUL-terminated input; the library allocates `out` with malloc.
        let rc = unsafe {
            if ppn {
                sys::PMIx_generate_ppn(c.as_ptr(), &mut out)
            } else {
                sys::PMIx_generate_regex(c.as_ptr(), &mut out)
            }
        };
        if rc != SUCCESS || out.is_null() {
            return Err(pmix_error(&format!("making the map of {input:?}"), rc));
        }
        // SAFETY: PMIX_REGEX takes the library's own regex; it copies it, and `out` is
        // freed once.
        let r = unsafe { self.load(key, out as *const c_void, sys::PMIX_REGEX) };
        // SAFETY: allocated by the library with malloc, not used after.
        unsafe { libc::free(out as *mut c_void) };
        r
    }

    /// An array of infos (the library copies it deeply).
    fn array(&mut self, key: &[u8], mut inner: Infos) -> Result<()> {
        let mut darray = sys::pmix_data_array_t {
            type_: sys::PMIX_INFO as sys::pmix_data_type_t,
            size: inner.0.len(),
            array: inner.0.as_mut_ptr() as *mut c_void,
        };
        // SAFETY: a pmix_data_array_t of `size` pmix_info_t for PMIX_DATA_ARRAY.
        unsafe {
            self.load(
                key,
                &mut darray as *mut sys::pmix_data_array_t as *const c_void,
                sys::PMIX_DATA_ARRAY,
            )
        }
    }
}

impl Drop for Infos {
    fn drop(&mut self) {
        for i in &mut self.0 {
            // SAFETY: each value was loaded by PMIx_Info_load and is released once.
            unsafe { sys::PMIx_Value_destruct(&mut i.value) };
        }
    }
}

/// Waits for one of the library's operation callbacks.
struct OpWait {
    done: Mutex<Option<sys::pmix_status_t>>,
    changed: Condvar,
}

/// The library's completion of an operation started with an [`OpWait`].
///
/// # Safety
/// `cbdata` must point to an `OpWait` alive until this call (its caller waits for it).
unsafe extern "C" fn op_done(status: sys::pmix_status_t, cbdata: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see the function's contract.
        let w = unsafe { &*(cbdata as *const OpWait) };
        if let Ok(mut d) = w.done.lock() {
            *d = Some(status);
            w.changed.notify_all();
        }
    }));
}

/// Runs `start` (which passes `op_done` and the wait's address to the library) and waits
/// for its completion.
fn wait_op(
    what: &str,
    start: impl FnOnce(sys::pmix_op_cbfunc_t, *mut c_void) -> sys::pmix_status_t,
) -> Result<()> {
    // Boxed: the library may call back after a timeout here; the wait then leaks rather
    // than dangles.
    let w = Box::new(OpWait {
        done: Mutex::new(None),
        changed: Condvar::new(),
    });
    let ptr = &*w as *const OpWait as *mut c_void;
    let rc = start(Some(op_done), ptr);
    if rc == OPERATION_SUCCEEDED {
        return Ok(());
    }
    if rc != SUCCESS {
        return Err(pmix_error(what, rc));
    }
    let deadline = std::time::Instant::now() + REGISTER_LIMIT;
    let mut d = w.done.lock().expect("pmix wait lock");
    loop {
        if let Some(rc) = *d {
            return if rc == SUCCESS || rc == OPERATION_SUCCEEDED {
                Ok(())
            } else {
                Err(pmix_error(what, rc))
            };
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            drop(d);
            std::mem::forget(w);
            return Err(LauncherError::Usage(format!(
                "PMIx: {what} did not complete in {REGISTER_LIMIT:?}"
            )));
        }
        d = w
            .changed
            .wait_timeout(d, deadline - now)
            .expect("pmix wait lock")
            .0;
    }
}

fn proc_of(nspace: &str, rank: u32) -> sys::pmix_proc_t {
    let mut p = sys::pmix_proc_t {
        rank,
        ..Default::default()
    };
    for (dst, &b) in p.nspace.iter_mut().zip(nspace.as_bytes()) {
        *dst = b as c_char;
    }
    p
}

/// The namespace a proc names.
///
/// # Safety
/// `p` must point to a valid `pmix_proc_t`.
unsafe fn nspace_of(p: *const sys::pmix_proc_t) -> String {
    // SAFETY: see the function's contract; the name is NUL-terminated within its array.
    let raw = unsafe { &(*p).nspace };
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

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
        let first: usize = counts.iter().take(node).sum();
        let local = counts.get(node).copied().unwrap_or(0);
        let size: usize = counts.iter().sum();
        let tmpdir = std::env::temp_dir().join(format!("krun-pmix-{}", std::process::id()));
        let shm = std::path::Path::new("/dev/shm");
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
        let server = Arc::new(PmixServer {
            node,
            counts: counts.to_vec(),
            first,
            nspace: format!("krun.{job}"),
            tmpdir: tmpdir.clone(),
            shm_dir,
            trace: std::env::var("KRUN_PMIX_TRACE").is_ok_and(|v| v == "1"),
            tell,
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
            Box::leak(Box::new(sys::pmix_server_module_t {
                client_connected: Some(client_connected),
                client_finalized: Some(client_finalized),
                abort: Some(abort),
                fence_nb: Some(fence_nb),
                direct_modex: Some(direct_modex),
                ..Default::default()
            }));
        let dir = tmpdir.to_string_lossy().into_owned();
        let mut init = Infos::new();
        init.string(sys::PMIX_SERVER_TMPDIR, &dir)?;
        init.string(sys::PMIX_SYSTEM_TMPDIR, &dir)?;
        init.string(sys::PMIX_HOSTNAME, &node_name(node))?;
        init.u32(sys::PMIX_SERVER_RANK, node as u32)?;
        // No system-wide or tool rendezvous: only this node's ranks connect.
        init.boolean(sys::PMIX_SERVER_TOOL_SUPPORT, false)?;
        init.boolean(sys::PMIX_SERVER_SYSTEM_SUPPORT, false)?;
        // SAFETY: the module lives forever; the infos outlive the call (the library copies
        // what it keeps).
        let rc = unsafe { sys::PMIx_server_init(module, init.0.as_mut_ptr(), init.0.len()) };
        if rc != SUCCESS {
            return Err(pmix_error("PMIx_server_init", rc));
        }

        let job_info = server.job_info(size)?;
        let mut ns = proc_of(&server.nspace, 0).nspace;
        let mut job_info = job_info;
        wait_op("registering the job's namespace", |cb, data| {
            // SAFETY: the namespace and infos outlive the operation (wait_op waits for it).
            unsafe {
                sys::PMIx_server_register_nspace(
                    ns.as_mut_ptr(),
                    local as c_int,
                    job_info.0.as_mut_ptr(),
                    job_info.0.len(),
                    cb,
                    data,
                )
            }
        })?;
        drop(job_info);
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        for rank in first..first + local {
            let p = proc_of(&server.nspace, rank as u32);
            wait_op(&format!("registering rank {rank}"), |cb, data| {
                // SAFETY: `p` outlives the operation (wait_op waits for it).
                unsafe {
                    sys::PMIx_server_register_client(&p, uid, gid, std::ptr::null_mut(), cb, data)
                }
            })?;
            server
                .state
                .lock()
                .expect("pmix lock")
                .ranks
                .insert(rank as u32, WireState::default());
        }
        Ok(server)
    }

    /// The job's information for `PMIx_server_register_nspace`.
    fn job_info(&self, size: usize) -> Result<Infos> {
        let local = self.counts.get(self.node).copied().unwrap_or(0);
        let nodes: Vec<String> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, _)| node_name(i))
            .collect();
        let mut j = Infos::new();
        j.u32(sys::PMIX_UNIV_SIZE, size as u32)?;
        j.u32(sys::PMIX_JOB_SIZE, size as u32)?;
        j.u32(sys::PMIX_MAX_PROCS, size as u32)?;
        j.u32(sys::PMIX_APP_SIZE, size as u32)?;
        j.rank(sys::PMIX_APPLDR, 0)?;
        j.u32(sys::PMIX_APPNUM, 0)?;
        j.string(sys::PMIX_JOBID, &self.nspace)?;
        j.u32(sys::PMIX_NUM_NODES, nodes.len() as u32)?;
        j.regex(sys::PMIX_NODE_MAP, &nodes.join(","), false)?;
        j.regex(sys::PMIX_PROC_MAP, &ppn_input(&self.counts), true)?;
        j.string(sys::PMIX_NSDIR, &self.tmpdir.to_string_lossy())?;
        j.string(sys::PMIX_TMPDIR, &self.tmpdir.to_string_lossy())?;
        j.string(
            sys::PMIX_LOCAL_PEERS,
            &(self.first..self.first + local)
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )?;
        j.u32(sys::PMIX_LOCAL_SIZE, local as u32)?;
        j.u32(sys::PMIX_NODE_SIZE, local as u32)?;
        j.rank(sys::PMIX_LOCALLDR, self.first as u32)?;
        // Every rank's own information.
        let mut start = 0;
        for (node, &c) in self.counts.iter().enumerate() {
            for r in start..start + c {
                let mut p = Infos::new();
                p.rank(sys::PMIX_RANK, r as u32)?;
                p.rank(sys::PMIX_GLOBAL_RANK, r as u32)?;
                p.rank(sys::PMIX_APP_RANK, r as u32)?;
                p.u32(sys::PMIX_APPNUM, 0)?;
                p.u16(sys::PMIX_LOCAL_RANK, (r - start) as u16)?;
                p.u16(sys::PMIX_NODE_RANK, (r - start) as u16)?;
                p.string(sys::PMIX_HOSTNAME, &node_name(node))?;
                p.u32(sys::PMIX_NODEID, node as u32)?;
                j.array(sys::PMIX_PROC_DATA, p)?;
            }
            start += c;
        }
        Ok(j)
    }

    /// The hook for the rank runner: the PMIx environment of each rank.
    pub fn rank_setup(self: &Arc<Self>) -> RankSetup {
        let me = self.clone();
        RankSetup(Arc::new(move |rank| me.setup_fork(rank)))
    }

    /// The environment the library makes for `rank`'s process.
    pub fn setup_fork(&self, rank: usize) -> Result<RankExtras> {
        let p = proc_of(&self.nspace, rank as u32);
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
        let p = proc_of(&self.nspace, rank);
        let ask = Box::into_raw(Box::new((from, id))) as *mut c_void;
        // SAFETY: `ask` is released by `dmodex_answer`, which the library calls once.
        let rc = unsafe { sys::PMIx_server_dmodex_request(&p, Some(dmodex_answer), ask) };
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

    fn mark(&self, rank: u32, f: impl FnOnce(&mut WireState)) {
        f(self
            .state
            .lock()
            .expect("pmix lock")
            .ranks
            .entry(rank)
            .or_default());
    }

    /// The library's fence: the node's blob goes to krun.
    fn fence(
        &self,
        procs: &[sys::pmix_proc_t],
        data: &[u8],
        pending: Pending,
    ) -> sys::pmix_status_t {
        let whole = procs.iter().all(|p| {
            // SAFETY: a valid proc from the library.
            unsafe { nspace_of(p) == self.nspace }
        }) && (procs.iter().any(|p| p.rank == sys::RANK_WILDCARD)
            || procs.len() == self.counts.iter().sum::<usize>());
        if !whole {
            eprintln!(
                "krund: node {}: a PMIx fence over a part of the job ({} procs) is not served",
                self.node,
                procs.len()
            );
            return status(sys::PMIX_ERR_NOT_SUPPORTED as u32);
        }
        let local = self.counts.get(self.node).copied().unwrap_or(0);
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
            ranks: (self.first..self.first + local).map(|r| r as u32).collect(),
            data: FenceData::Blobs(vec![data.to_vec()]),
        });
        SUCCESS
    }

    /// The library asks for a remote rank's data (direct modex).
    fn direct_modex(&self, rank: u32, pending: Pending) -> sys::pmix_status_t {
        self.trace(format_args!(
            "direct modex: a local rank asks for rank {rank}'s data"
        ));
        let Some(node) = node_of(&self.counts, rank as usize) else {
            return status(sys::PMIX_ERR_NOT_FOUND as u32);
        };
        if node == self.node {
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
}

/// Runs a callback's body for the library: no panic crosses into C (one becomes
/// `PMIX_ERROR`), and without a server there is nothing to serve.
fn guarded(f: impl FnOnce(&PmixServer) -> sys::pmix_status_t) -> sys::pmix_status_t {
    catch_unwind(AssertUnwindSafe(|| match SERVER.get() {
        Some(s) => f(s),
        None => ERROR,
    }))
    .unwrap_or(ERROR)
}

/// The rank a proc names.
///
/// # Safety
/// `p` must be null or point to a valid `pmix_proc_t`.
unsafe fn rank_of(p: *const sys::pmix_proc_t) -> Option<u32> {
    // SAFETY: see the function's contract.
    unsafe { p.as_ref() }.map(|p| p.rank)
}

/// # Safety
/// Called by the library with a valid proc.
unsafe extern "C" fn client_connected(
    proc_: *const sys::pmix_proc_t,
    _object: *mut c_void,
    _cb: sys::pmix_op_cbfunc_t,
    _cbdata: *mut c_void,
) -> sys::pmix_status_t {
    guarded(|s| {
        // SAFETY: the library passes a valid proc.
        if let Some(r) = unsafe { rank_of(proc_) } {
            s.mark(r, |w| w.initialized = true);
        }
        OPERATION_SUCCEEDED
    })
}

/// # Safety
/// Called by the library with a valid proc.
unsafe extern "C" fn client_finalized(
    proc_: *const sys::pmix_proc_t,
    _object: *mut c_void,
    _cb: sys::pmix_op_cbfunc_t,
    _cbdata: *mut c_void,
) -> sys::pmix_status_t {
    guarded(|s| {
        // SAFETY: the library passes a valid proc.
        if let Some(r) = unsafe { rank_of(proc_) } {
            s.mark(r, |w| w.done = true);
        }
        OPERATION_SUCCEEDED
    })
}

/// # Safety
/// Called by the library with a valid proc.
unsafe extern "C" fn abort(
    proc_: *const sys::pmix_proc_t,
    _object: *mut c_void,
    code: c_int,
    _msg: *const c_char,
    _procs: *mut sys::pmix_proc_t,
    _nprocs: usize,
    _cb: sys::pmix_op_cbfunc_t,
    _cbdata: *mut c_void,
) -> sys::pmix_status_t {
    guarded(|s| {
        // SAFETY: the library passes a valid proc.
        let Some(rank) = (unsafe { rank_of(proc_) }) else {
            return ERROR;
        };
        s.mark(rank, |w| w.done = true);
        // Aborting part of the job aborts all of it (as mpirun does).
        (s.tell)(PmiToLauncher::Abort {
            wire: Wire::Pmix,
            rank,
            code,
        });
        OPERATION_SUCCEEDED
    })
}

/// # Safety
/// Called by the library with `nprocs` procs at `procs` and `ndata` bytes at `data`.
unsafe extern "C" fn fence_nb(
    procs: *const sys::pmix_proc_t,
    nprocs: usize,
    _info: *const sys::pmix_info_t,
    _ninfo: usize,
    data: *mut c_char,
    ndata: usize,
    cb: sys::pmix_modex_cbfunc_t,
    cbdata: *mut c_void,
) -> sys::pmix_status_t {
    guarded(|s| {
        // SAFETY: the library passes arrays of the given lengths (or null when empty).
        let (procs, data) = unsafe {
            (
                if procs.is_null() || nprocs == 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(procs, nprocs)
                },
                if data.is_null() || ndata == 0 {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(data as *const u8, ndata)
                },
            )
        };
        let procs: Vec<sys::pmix_proc_t> = if procs.is_empty() {
            vec![proc_of(&s.nspace, sys::RANK_WILDCARD)]
        } else {
            procs.to_vec()
        };
        s.fence(&procs, data, Pending { cb, cbdata })
    })
}

/// # Safety
/// Called by the library with a valid proc.
unsafe extern "C" fn direct_modex(
    proc_: *const sys::pmix_proc_t,
    _info: *const sys::pmix_info_t,
    _ninfo: usize,
    cb: sys::pmix_modex_cbfunc_t,
    cbdata: *mut c_void,
) -> sys::pmix_status_t {
    guarded(|s| {
        // SAFETY: the library passes a valid proc.
        match unsafe { rank_of(proc_) } {
            Some(rank) => s.direct_modex(rank, Pending { cb, cbdata }),
            None => ERROR,
        }
    })
}

/// The library's answer to [`PmixServer::dmodex_ask`]: the data goes back to the asking
/// node through krun.
///
/// # Safety
/// `cbdata` is the `Box<(NodeId, u64)>` made by `dmodex_ask`; `data` holds `sz` bytes.
unsafe extern "C" fn dmodex_answer(
    st: sys::pmix_status_t,
    data: *mut c_char,
    sz: usize,
    cbdata: *mut c_void,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: see the function's contract (called once per request).
        let (to, id) = *unsafe { Box::from_raw(cbdata as *mut (adaptation::NodeId, u64)) };
        let data = (st == SUCCESS).then(|| {
            if data.is_null() || sz == 0 {
                Vec::new()
            } else {
                // SAFETY: `sz` bytes at `data` (see the contract).
                unsafe { std::slice::from_raw_parts(data as *const u8, sz) }.to_vec()
            }
        });
        if let Some(s) = SERVER.get() {
            (s.tell)(PmiToLauncher::DmodexData { to, id, data });
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_maps_list_each_nodes_ranks_and_skip_spares() {
        assert_eq!(ppn_input(&[2, 2, 1, 0]), "0,1;2,3;4");
        assert_eq!(ppn_input(&[3]), "0,1,2");
        assert_eq!(node_of(&[2, 2, 1, 0], 3), Some(1));
        assert_eq!(node_of(&[2, 2, 1, 0], 4), Some(2));
        assert_eq!(node_of(&[2, 2, 1, 0], 5), None);
    }

    #[test]
    fn procs_carry_their_namespace_and_rank() {
        let p = proc_of("krun.7", 3);
        assert_eq!(p.rank, 3);
        // SAFETY: a valid proc.
        assert_eq!(unsafe { nspace_of(&p) }, "krun.7");
    }
}
