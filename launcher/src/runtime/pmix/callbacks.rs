//! The PMIx server library's upcalls into krund (its `pmix_server_module_t`): a client
//! connected or finalized, an abort, a fence, a direct modex request, and the answers krund
//! hands back. They run on the library's progress thread; every one catches panics, so none
//! crosses into C, and answers only the job's current incarnation (its namespace).
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pmix_sys as sys;

use super::ffi::{nspace_of, proc_of, status, ERROR, OPERATION_SUCCEEDED, SUCCESS};
use super::{PmixServer, SERVER};
use crate::runtime::mpi::{PmiToLauncher, Wire};

/// A callback of the library's, with its argument, to call once krun answers.
pub(super) struct Pending {
    cb: sys::pmix_modex_cbfunc_t,
    cbdata: *mut c_void,
}

// SAFETY: the library's callbacks and their data may be called from any thread (it shifts
// them onto its own progress thread); the pointer is only handed back to it.
unsafe impl Send for Pending {}

impl Pending {
    /// Completes the operation with `data` (kept alive until the library releases it).
    pub(super) fn complete(self, status: sys::pmix_status_t, data: Vec<u8>) {
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

/// The module handed to `PMIx_server_init`: krund's upcalls.
pub(super) fn module() -> sys::pmix_server_module_t {
    sys::pmix_server_module_t {
        client_connected: Some(client_connected),
        client_finalized: Some(client_finalized),
        abort: Some(abort),
        fence_nb: Some(fence_nb),
        direct_modex: Some(direct_modex),
        spawn: Some(spawn),
        ..Default::default()
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

/// The namespace and rank a proc names.
///
/// # Safety
/// `p` must be null or point to a valid `pmix_proc_t`.
unsafe fn rank_of(p: *const sys::pmix_proc_t) -> Option<(String, u32)> {
    // SAFETY: see the function's contract.
    unsafe { p.as_ref() }.map(|q| (unsafe { nspace_of(q) }, q.rank))
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
        if let Some((ns, r)) = unsafe { rank_of(proc_) } {
            s.mark(&ns, r, |w| w.initialized = true);
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
        if let Some((ns, r)) = unsafe { rank_of(proc_) } {
            s.mark(&ns, r, |w| w.done = true);
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
        let Some((ns, rank)) = (unsafe { rank_of(proc_) }) else {
            return ERROR;
        };
        if !s.mark(&ns, rank, |w| w.done = true) {
            // A rank of an older incarnation, which a recovery is stopping.
            return OPERATION_SUCCEEDED;
        }
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
            vec![proc_of(&s.nspace(), sys::RANK_WILDCARD)]
        } else {
            procs.to_vec()
        };
        s.fence(&procs, data, Pending { cb, cbdata })
    })
}

/// `PMIx_Spawn` (`MPI_Comm_spawn`): krun starts no processes into a running job, so the
/// request fails at once with `PMIX_ERR_NOT_SUPPORTED` (the library answers the caller
/// with it) and krund says so, naming the rank.
///
/// # Safety
/// Called by the library with a valid proc (or null) and `napps` apps at `apps`.
unsafe extern "C" fn spawn(
    proc_: *const sys::pmix_proc_t,
    _job_info: *const sys::pmix_info_t,
    _ninfo: usize,
    apps: *const sys::pmix_app_t,
    napps: usize,
    _cb: sys::pmix_spawn_cbfunc_t,
    _cbdata: *mut c_void,
) -> sys::pmix_status_t {
    guarded(|s| {
        // SAFETY: the library passes a valid proc or null.
        let who = match unsafe { rank_of(proc_) } {
            Some((_, rank)) => format!("rank {rank}"),
            None => "a client".to_string(),
        };
        let cmd = if apps.is_null() || napps == 0 {
            std::ptr::null_mut()
        } else {
            // SAFETY: `napps` (> 0) apps at `apps`, from the library.
            unsafe { (*apps).cmd }
        };
        let cmd = if cmd.is_null() {
            String::new()
        } else {
            // SAFETY: an app's command is a C string from the library.
            unsafe { std::ffi::CStr::from_ptr(cmd) }
                .to_string_lossy()
                .into_owned()
        };
        eprintln!(
            "krund: node {}: {who} asked PMIx to spawn processes ({napps} app(s){}): \
             PMIx_Spawn / MPI_Comm_spawn is not supported by krun (a job's ranks are fixed at \
             its start); answered PMIX_ERR_NOT_SUPPORTED",
            s.node,
            if cmd.is_empty() {
                String::new()
            } else {
                format!(", {cmd}")
            }
        );
        status(sys::PMIX_ERR_NOT_SUPPORTED as u32)
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
            Some((ns, rank)) => s.direct_modex(&ns, rank, Pending { cb, cbdata }),
            None => ERROR,
        }
    })
}

/// The library's answer to [`PmixServer::dmodex_ask`]: the data goes back to the asking
/// node through krun.
///
/// # Safety
/// `cbdata` is the `Box<(NodeId, u64)>` made by `dmodex_ask`; `data` holds `sz` bytes.
pub(super) unsafe extern "C" fn dmodex_answer(
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
