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

/// Runs the body of a C entry point: a panic inside the library (a bug) must not unwind into
/// or abort the user's application, so it becomes an error return naming the panic.
fn guard<T>(entry: &str, on_panic: T, body: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            fail(format!(
                "{entry}: internal error in libghost (panic: {why})"
            ));
            on_panic
        }
    }
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
    guard("krun_ghost_init", -1, || {
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
    })
}

/// Allocates page-aligned memory for `krun_ghost_register`; NULL on failure.
#[no_mangle]
pub extern "C" fn krun_ghost_alloc(len: usize) -> *mut u8 {
    guard(
        "krun_ghost_alloc",
        std::ptr::null_mut(),
        || match alloc_region(len) {
            Ok(p) => p,
            Err(e) => {
                fail(e);
                std::ptr::null_mut()
            }
        },
    )
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
    guard("krun_ghost_register", -1, || {
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
    })
}

/// Freezes the registered memory and captures it in the background; returns the version.
#[no_mangle]
pub extern "C" fn krun_ghost_checkpoint() -> c_long {
    guard("krun_ghost_checkpoint", -1, || {
        let Some(rt) = NativeRuntime::get() else {
            return fail("krun_ghost_checkpoint before krun_ghost_init");
        };
        match rt.checkpoint() {
            Ok(v) => v as c_long,
            Err(e) => fail(e),
        }
    })
}

/// Waits for the capture in flight; returns its version, 0 if none, -1 if it failed.
#[no_mangle]
pub extern "C" fn krun_ghost_wait() -> c_long {
    guard("krun_ghost_wait", -1, || {
        let Some(rt) = NativeRuntime::get() else {
            return fail("krun_ghost_wait before krun_ghost_init");
        };
        match rt.wait() {
            Ok(Some(r)) => r.version as c_long,
            Ok(None) => 0,
            Err(e) => fail(e),
        }
    })
}

/// Rewrites the registered regions from `version` (0: the newest image); returns the version.
#[no_mangle]
pub extern "C" fn krun_ghost_rollback(version: c_long) -> c_long {
    guard("krun_ghost_rollback", -1, || {
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
    })
}

/// Acts on pending requests: returns 0 (nothing), 1 (a checkpoint was started on SIGUSR1),
/// 2 (the regions were rolled back on SIGUSR2: reload loop state from them), -1 on error.
#[no_mangle]
pub extern "C" fn krun_ghost_safepoint() -> c_int {
    guard("krun_ghost_safepoint", -1, || {
        let Some(rt) = NativeRuntime::get() else {
            return fail("krun_ghost_safepoint before krun_ghost_init") as c_int;
        };
        match rt.safepoint() {
            Ok(SafepointAction::Nothing) => 0,
            Ok(SafepointAction::CheckpointStarted(_)) => 1,
            Ok(SafepointAction::RolledBack(_)) => 2,
            Err(e) => fail(e) as c_int,
        }
    })
}

/// The message of this thread's last error (valid until the next failing call).
#[no_mangle]
pub extern "C" fn krun_ghost_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_an_entry_point_becomes_an_error_return_with_its_message() {
        let r: c_long = guard("krun_ghost_test", -1, || panic!("boom {}", 7));
        assert_eq!(r, -1);
        // SAFETY: krun_ghost_last_error returns this thread's NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(krun_ghost_last_error()) }
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("krun_ghost_test") && msg.contains("boom 7"),
            "{msg}"
        );
        assert_eq!(guard("x", -1, || 5), 5);
    }

    #[test]
    fn entry_points_before_init_fail_with_a_reason_instead_of_crashing() {
        // nextest runs each test in its own process: nothing has initialised the runtime.
        assert!(NativeRuntime::get().is_none());
        assert_eq!(krun_ghost_checkpoint(), -1);
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(krun_ghost_last_error()) };
        assert!(msg.to_str().unwrap().contains("before krun_ghost_init"));
    }
}
