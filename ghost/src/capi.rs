//! The C ABI of the native checkpointer (header: `ghost/include/krun_ghost.h`; Fortran
//! interface: `ghost/include/krun_ghost.f90`). Calls return a negative value on error and
//! `krun_ghost_last_error()` says why.
use crate::native::{alloc_region, NativeConfig, NativeRuntime, SafepointAction};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_long, CStr, CString};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn fail(e: impl std::fmt::Display) -> c_long {
    let text = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = text);
    -1
}

fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str, String> {
    if p.is_null() {
        return Err(format!("{what} is NULL"));
    }
    // SAFETY: the caller passes a NUL-terminated string (checked non-NULL above).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| format!("{what} is not UTF-8"))
}

/// Starts the runtime for checkpoint owner `owner` (settings from the `KRUN_GHOST_*`
/// environment). Returns the version the process was restored from, 0 for a fresh start,
/// or -1.
///
/// # Safety
/// `owner` must be NULL (use `KRUN_GHOST_OWNER`) or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn krun_ghost_init(owner: *const c_char) -> c_long {
    let default_owner = if owner.is_null() {
        match std::env::var("KRUN_GHOST_OWNER") {
            Ok(o) => o,
            Err(_) => {
                return fail("krun_ghost_init: owner is NULL and KRUN_GHOST_OWNER is not set")
            }
        }
    } else {
        match c_str(owner, "owner") {
            Ok(s) => s.to_string(),
            Err(e) => return fail(e),
        }
    };
    match NativeConfig::from_env(&default_owner).and_then(NativeRuntime::init) {
        Ok(rt) => rt.restored_version().unwrap_or(0) as c_long,
        Err(e) => fail(e),
    }
}

/// Allocates page-aligned memory for `krun_ghost_register`; NULL on failure.
#[no_mangle]
pub extern "C" fn krun_ghost_alloc(len: usize) -> *mut u8 {
    match alloc_region(len) {
        Ok(p) => p,
        Err(e) => {
            fail(e);
            std::ptr::null_mut()
        }
    }
}

/// Registers a region; returns 1 if it was filled from the image being restored, 0 if not,
/// -1 on error.
///
/// # Safety
/// `name` is a NUL-terminated string; `addr..addr+len` is page-aligned private anonymous
/// memory (see `krun_ghost_alloc`) that stays mapped for the life of the process.
#[no_mangle]
pub unsafe extern "C" fn krun_ghost_register(
    name: *const c_char,
    addr: *mut u8,
    len: usize,
) -> c_int {
    let Some(rt) = NativeRuntime::get() else {
        return fail("krun_ghost_register before krun_ghost_init") as c_int;
    };
    let name = match c_str(name, "region name") {
        Ok(n) => n,
        Err(e) => return fail(e) as c_int,
    };
    // SAFETY: forwarded from this function's contract.
    match unsafe { rt.register(name, addr, len) } {
        Ok(restored) => restored as c_int,
        Err(e) => fail(e) as c_int,
    }
}

/// Freezes the registered memory and captures it in the background; returns the version.
#[no_mangle]
pub extern "C" fn krun_ghost_checkpoint() -> c_long {
    let Some(rt) = NativeRuntime::get() else {
        return fail("krun_ghost_checkpoint before krun_ghost_init");
    };
    match rt.checkpoint() {
        Ok(v) => v as c_long,
        Err(e) => fail(e),
    }
}

/// Waits for the capture in flight; returns its version, 0 if none, -1 if it failed.
#[no_mangle]
pub extern "C" fn krun_ghost_wait() -> c_long {
    let Some(rt) = NativeRuntime::get() else {
        return fail("krun_ghost_wait before krun_ghost_init");
    };
    match rt.wait() {
        Ok(Some(r)) => r.version as c_long,
        Ok(None) => 0,
        Err(e) => fail(e),
    }
}

/// Rewrites the registered regions from `version` (0: the newest image); returns the version.
#[no_mangle]
pub extern "C" fn krun_ghost_rollback(version: c_long) -> c_long {
    let Some(rt) = NativeRuntime::get() else {
        return fail("krun_ghost_rollback before krun_ghost_init");
    };
    let which = if version <= 0 {
        None
    } else {
        Some(version as u64)
    };
    match rt.rollback(which) {
        Ok(v) => v as c_long,
        Err(e) => fail(e),
    }
}

/// Acts on pending requests: returns 0 (nothing), 1 (a checkpoint was started on SIGUSR1),
/// 2 (the regions were rolled back on SIGUSR2: reload loop state from them), -1 on error.
#[no_mangle]
pub extern "C" fn krun_ghost_safepoint() -> c_int {
    let Some(rt) = NativeRuntime::get() else {
        return fail("krun_ghost_safepoint before krun_ghost_init") as c_int;
    };
    match rt.safepoint() {
        Ok(SafepointAction::Nothing) => 0,
        Ok(SafepointAction::CheckpointStarted(_)) => 1,
        Ok(SafepointAction::RolledBack(_)) => 2,
        Err(e) => fail(e) as c_int,
    }
}

/// The message of this thread's last error (valid until the next failing call).
#[no_mangle]
pub extern "C" fn krun_ghost_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}
