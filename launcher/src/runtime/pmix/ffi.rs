//! The PMIx library's C types as krund builds them: info arrays, procs, waits for the
//! library's operation callbacks, its error strings.
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use pmix_sys as sys;

use crate::error::{LauncherError, Result};

/// How long a registration with the library may take before krund gives up.
pub(super) const REGISTER_LIMIT: Duration = Duration::from_secs(30);

pub(super) fn pmix_error(what: &str, rc: sys::pmix_status_t) -> LauncherError {
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

pub(super) fn status(s: u32) -> sys::pmix_status_t {
    s as sys::pmix_status_t
}

pub(super) const SUCCESS: sys::pmix_status_t = sys::PMIX_SUCCESS as sys::pmix_status_t;
pub(super) const OPERATION_SUCCEEDED: sys::pmix_status_t = sys::PMIX_OPERATION_SUCCEEDED;
pub(super) const ERROR: sys::pmix_status_t = sys::PMIX_ERROR;

/// An array of `pmix_info_t` built for the library; each value it loaded is released on
/// drop (the second field: the indices of borrowed values, not released).
pub(super) struct Infos(pub(super) Vec<sys::pmix_info_t>, Vec<usize>);

impl Infos {
    pub(super) fn new() -> Infos {
        Infos(Vec::new(), Vec::new())
    }

    /// Adds `PMIX_TOPOLOGY2` pointing at `topo` itself, not at a copy: the library's
    /// loader would duplicate the hwloc topology and its destructor destroy it, while
    /// `PMIx_server_init` keeps the pointer it is given. Nothing is released on drop.
    ///
    /// # Safety
    /// `topo` and the hwloc topology in it must stay valid for every use of these infos,
    /// and, given to `PMIx_server_init`, until `PMIx_server_finalize`.
    pub(super) unsafe fn topology(&mut self, topo: *mut sys::pmix_topology_t) {
        let mut info = sys::pmix_info_t::default();
        for (dst, &b) in info.key.iter_mut().zip(sys::PMIX_TOPOLOGY2.iter()) {
            *dst = b as c_char;
        }
        info.value.type_ = sys::PMIX_TOPO as sys::pmix_data_type_t;
        info.value.data.topo = topo;
        self.1.push(self.0.len());
        self.0.push(info);
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

    pub(super) fn string(&mut self, key: &[u8], v: &str) -> Result<()> {
        let c = CString::new(v)
            .map_err(|_| LauncherError::Usage(format!("PMIx: value {v:?} holds a NUL")))?;
        // SAFETY: a NUL-terminated string for PMIX_STRING.
        unsafe { self.load(key, c.as_ptr() as *const c_void, sys::PMIX_STRING) }
    }

    pub(super) fn u32(&mut self, key: &[u8], v: u32) -> Result<()> {
        // SAFETY: a uint32_t for PMIX_UINT32.
        unsafe { self.load(key, &v as *const u32 as *const c_void, sys::PMIX_UINT32) }
    }

    pub(super) fn u16(&mut self, key: &[u8], v: u16) -> Result<()> {
        // SAFETY: a uint16_t for PMIX_UINT16.
        unsafe { self.load(key, &v as *const u16 as *const c_void, sys::PMIX_UINT16) }
    }

    pub(super) fn rank(&mut self, key: &[u8], v: u32) -> Result<()> {
        // SAFETY: a pmix_rank_t (uint32_t) for PMIX_PROC_RANK.
        unsafe { self.load(key, &v as *const u32 as *const c_void, sys::PMIX_PROC_RANK) }
    }

    pub(super) fn boolean(&mut self, key: &[u8], v: bool) -> Result<()> {
        // SAFETY: a C bool for PMIX_BOOL.
        unsafe { self.load(key, &v as *const bool as *const c_void, sys::PMIX_BOOL) }
    }

    /// A regular expression made by `PMIx_generate_regex` or `PMIx_generate_ppn`.
    pub(super) fn regex(&mut self, key: &[u8], input: &str, ppn: bool) -> Result<()> {
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
    pub(super) fn array(&mut self, key: &[u8], mut inner: Infos) -> Result<()> {
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
        for (n, i) in self.0.iter_mut().enumerate() {
            if self.1.contains(&n) {
                continue;
            }
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
pub(super) fn wait_op(
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

pub(super) fn proc_of(nspace: &str, rank: u32) -> sys::pmix_proc_t {
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
pub(super) unsafe fn nspace_of(p: *const sys::pmix_proc_t) -> String {
    // SAFETY: see the function's contract; the name is NUL-terminated within its array.
    let raw = unsafe { &(*p).nspace };
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}
