//! The C ABI (`rank/include/krun.h`; Fortran: `rank/include/krun.f90`). Every function
//! returns a negative `KRUN_ERR_*` code on failure (or NULL for pointers);
//! `krun_last_error()` gives this thread's last message and `krun_strerror(code)` the
//! code's fixed description. No panic crosses this boundary: each function catches them
//! and returns `KRUN_ERR_PANIC`.
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_long, c_void, CStr, CString};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, RwLock};

use crate::dsm::SharedMemory;
use crate::error::{ErrorCode, RankError, Result};
use crate::messages::{Source, TagMatch, MAX_TAG};
use crate::window::Window;
use crate::world::Rank;
use crate::Safepoint;

/// `krun_recv`'s source wildcard.
pub const KRUN_ANY_SOURCE: c_int = -1;
/// `krun_recv`'s tag wildcard.
pub const KRUN_ANY_TAG: c_int = -1;

static WORLD: RwLock<Option<Arc<Rank>>> = RwLock::new(None);
static WINDOWS: Mutex<Option<HashMap<i64, Arc<Window>>>> = Mutex::new(None);
/// The rank's DSM, started by the first `krun_dsm_alloc` (a collective call, so every rank
/// starts it at the same point).
static DSM: RwLock<Option<Arc<SharedMemory>>> = RwLock::new(None);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn record(e: &RankError) -> i64 {
    let text = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = text);
    e.code() as i64
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning errors and panics into negative codes.
fn guard(call: &'static str, f: impl FnOnce() -> Result<i64>) -> i64 {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => record(&e),
        Err(p) => record(&RankError::Panic {
            call,
            message: panic_message(p),
        }),
    }
}

fn world() -> Result<Arc<Rank>> {
    WORLD
        .read()
        .map_err(|_| RankError::InvalidArgument("library state poisoned".into()))?
        .clone()
        .ok_or(RankError::NotInitialized)
}

fn window(win: i64) -> Result<Arc<Window>> {
    WINDOWS
        .lock()
        .map_err(|_| RankError::InvalidArgument("window table poisoned".into()))?
        .as_ref()
        .and_then(|w| w.get(&win).cloned())
        .ok_or(RankError::UnknownWindow(win))
}

fn rank_arg(w: &Rank, r: c_int) -> Result<usize> {
    w.msgs.check_rank(r as i64)
}

fn tag_arg(tag: c_int) -> Result<u32> {
    if tag < 0 || tag as u32 > MAX_TAG {
        return Err(RankError::BadTag {
            tag: tag as i64,
            max: MAX_TAG,
        });
    }
    Ok(tag as u32)
}

fn non_null<T>(p: *const T, what: &str) -> Result<()> {
    if p.is_null() {
        return Err(RankError::InvalidArgument(format!("{what} is NULL")));
    }
    Ok(())
}

/// # Safety
/// `p..p+len` must be readable (or `len` zero).
unsafe fn bytes<'a>(p: *const c_void, len: usize, what: &str) -> Result<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    non_null(p, what)?;
    // SAFETY: non-NULL and readable for len bytes per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts(p.cast(), len) })
}

/// # Safety
/// `p..p+len` must be writable (or `len` zero).
unsafe fn bytes_mut<'a>(p: *mut c_void, len: usize, what: &str) -> Result<&'a mut [u8]> {
    if len == 0 {
        return Ok(&mut []);
    }
    non_null(p, what)?;
    // SAFETY: non-NULL and writable for len bytes per this function's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(p.cast(), len) })
}

/// The receive status (`krun_status` in krun.h).
#[repr(C)]
pub struct KrunStatus {
    pub source: c_int,
    pub tag: c_int,
    pub len: usize,
}

/// Starts the rank (collective). Returns 0, or a negative code.
#[no_mangle]
pub extern "C" fn krun_init() -> c_int {
    guard("krun_init", || {
        let mut w = WORLD
            .write()
            .map_err(|_| RankError::InvalidArgument("library state poisoned".into()))?;
        if w.is_some() {
            return Err(RankError::AlreadyInitialized);
        }
        *w = Some(Rank::init()?);
        Ok(0)
    }) as c_int
}

/// Ends the rank (collective: a barrier). Returns 0 or a negative code.
#[no_mangle]
pub extern "C" fn krun_finalize() -> c_int {
    guard("krun_finalize", || {
        let w = world()?;
        // The DSM goes first, after every rank is done with its pages.
        let shm = DSM
            .write()
            .map_err(|_| RankError::InvalidArgument("DSM state poisoned".into()))?
            .take();
        if let Some(shm) = shm {
            match Arc::try_unwrap(shm) {
                Ok(shm) => shm.close()?,
                // Another thread is inside a DSM call: end after the barrier anyway.
                Err(shm) => shm.barrier()?,
            }
        }
        w.finalize()?;
        if let Ok(mut t) = WINDOWS.lock() {
            t.take();
        }
        WORLD
            .write()
            .map_err(|_| RankError::InvalidArgument("library state poisoned".into()))?
            .take();
        Ok(0)
    }) as c_int
}

/// This rank's number, or a negative code.
#[no_mangle]
pub extern "C" fn krun_rank() -> c_int {
    guard("krun_rank", || Ok(world()?.rank() as i64)) as c_int
}

/// The number of ranks, or a negative code.
#[no_mangle]
pub extern "C" fn krun_size() -> c_int {
    guard("krun_size", || Ok(world()?.size() as i64)) as c_int
}

/// Waits until every rank has entered the barrier.
#[no_mangle]
pub extern "C" fn krun_barrier() -> c_int {
    guard("krun_barrier", || world()?.barrier().map(|_| 0)) as c_int
}

/// Sends `len` bytes to `dest` with `tag`; returns when `buf` may be reused.
///
/// # Safety
/// `buf..buf+len` must be readable.
#[no_mangle]
pub unsafe extern "C" fn krun_send(
    dest: c_int,
    tag: c_int,
    buf: *const c_void,
    len: usize,
) -> c_int {
    guard("krun_send", || {
        let w = world()?;
        let dest = rank_arg(&w, dest)?;
        let tag = tag_arg(tag)?;
        // SAFETY: forwarded from this function's contract.
        let data = unsafe { bytes(buf, len, "buf") }?;
        w.send(dest, tag, data).map(|_| 0)
    }) as c_int
}

/// Receives a message from `src` (or `KRUN_ANY_SOURCE`) with `tag` (or `KRUN_ANY_TAG`) into
/// `buf` (capacity `cap`). Returns its length; fills `status` when not NULL. A message
/// longer than `cap` fails with `KRUN_ERR_TRUNCATED` and stays queued.
///
/// # Safety
/// `buf..buf+cap` must be writable; `status` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn krun_recv(
    src: c_int,
    tag: c_int,
    buf: *mut c_void,
    cap: usize,
    status: *mut KrunStatus,
) -> c_long {
    guard("krun_recv", || {
        let w = world()?;
        let from = if src == KRUN_ANY_SOURCE {
            Source::Any
        } else {
            Source::Rank(rank_arg(&w, src)?)
        };
        let tag = if tag == KRUN_ANY_TAG {
            TagMatch::Any
        } else {
            TagMatch::Tag(tag_arg(tag)?)
        };
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { bytes_mut(buf, cap, "buf") }?;
        let (s, t, n) = w.recv_into(from, tag, out)?;
        if !status.is_null() {
            // SAFETY: non-NULL status points to a krun_status per the contract.
            unsafe {
                *status = KrunStatus {
                    source: s as c_int,
                    tag: t as c_int,
                    len: n,
                }
            };
        }
        Ok(n as i64)
    }) as c_long
}

/// Collective: allocates a window of `len` bytes on this rank; stores its local memory in
/// `*base` and its handle in `*win`.
///
/// # Safety
/// `base` and `win` must be valid pointers.
#[no_mangle]
pub unsafe extern "C" fn krun_win_allocate(
    len: usize,
    base: *mut *mut c_void,
    win: *mut i64,
) -> c_int {
    guard("krun_win_allocate", || {
        non_null(base, "base")?;
        non_null(win, "win")?;
        let w = world()?;
        let window = w.window(len)?;
        let id = window.id() as i64;
        let ptr = window.local().as_ptr();
        WINDOWS
            .lock()
            .map_err(|_| RankError::InvalidArgument("window table poisoned".into()))?
            .get_or_insert_with(HashMap::new)
            .insert(id, Arc::new(window));
        // SAFETY: both pointers checked non-NULL; valid per the contract.
        unsafe {
            *base = ptr.cast();
            *win = id;
        }
        Ok(0)
    }) as c_int
}

/// Collective: frees a window after every rank is done with it.
#[no_mangle]
pub extern "C" fn krun_win_free(win: i64) -> c_int {
    guard("krun_win_free", || {
        let w = world()?;
        let removed = WINDOWS
            .lock()
            .map_err(|_| RankError::InvalidArgument("window table poisoned".into()))?
            .as_mut()
            .and_then(|t| t.remove(&win))
            .ok_or(RankError::UnknownWindow(win))?;
        drop(removed);
        w.barrier().map(|_| 0)
    }) as c_int
}

/// Writes `len` bytes of `buf` to `target`'s part of `win` at `offset`.
///
/// # Safety
/// `buf..buf+len` must be readable.
#[no_mangle]
pub unsafe extern "C" fn krun_put(
    win: i64,
    target: c_int,
    offset: usize,
    buf: *const c_void,
    len: usize,
) -> c_int {
    guard("krun_put", || {
        let w = window(win)?;
        // SAFETY: forwarded from this function's contract.
        let data = unsafe { bytes(buf, len, "buf") }?;
        let target = usize::try_from(target).unwrap_or(usize::MAX);
        w.put(target, offset as u64, data).map(|_| 0)
    }) as c_int
}

/// Reads `len` bytes at `offset` of `target`'s part of `win` into `buf`.
///
/// # Safety
/// `buf..buf+len` must be writable.
#[no_mangle]
pub unsafe extern "C" fn krun_get(
    win: i64,
    target: c_int,
    offset: usize,
    buf: *mut c_void,
    len: usize,
) -> c_int {
    guard("krun_get", || {
        let w = window(win)?;
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { bytes_mut(buf, len, "buf") }?;
        let target = usize::try_from(target).unwrap_or(usize::MAX);
        w.get(target, offset as u64, out).map(|_| 0)
    }) as c_int
}

/// Atomically adds `add` to the 64-bit word at `offset` of `target`'s part; the previous
/// value goes to `*old` (when not NULL).
///
/// # Safety
/// `old` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn krun_fetch_add(
    win: i64,
    target: c_int,
    offset: usize,
    add: u64,
    old: *mut u64,
) -> c_int {
    guard("krun_fetch_add", || {
        let w = window(win)?;
        let target = usize::try_from(target).unwrap_or(usize::MAX);
        let prev = w.fetch_add(target, offset as u64, add)?;
        if !old.is_null() {
            // SAFETY: non-NULL and valid per the contract.
            unsafe { *old = prev };
        }
        Ok(0)
    }) as c_int
}

/// Atomically swaps in `swap` if the word equals `compare`; the previous value goes to
/// `*old` (when not NULL).
///
/// # Safety
/// `old` must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn krun_compare_swap(
    win: i64,
    target: c_int,
    offset: usize,
    compare: u64,
    swap: u64,
    old: *mut u64,
) -> c_int {
    guard("krun_compare_swap", || {
        let w = window(win)?;
        let target = usize::try_from(target).unwrap_or(usize::MAX);
        let prev = w.compare_swap(target, offset as u64, compare, swap)?;
        if !old.is_null() {
            // SAFETY: non-NULL and valid per the contract.
            unsafe { *old = prev };
        }
        Ok(0)
    }) as c_int
}

/// Page-aligned memory for `krun_register`; NULL on failure. Never freed.
#[no_mangle]
pub extern "C" fn krun_alloc(len: usize) -> *mut c_void {
    let r = guard("krun_alloc", || Ok(world()?.alloc(len)? as usize as i64));
    if r < 0 {
        std::ptr::null_mut()
    } else {
        r as usize as *mut c_void
    }
}

/// Registers memory holding the program's state for checkpoints. Returns 1 if it was
/// filled from the image being restored, 0 if not, or a negative code.
///
/// # Safety
/// `name` is a NUL-terminated string; `addr..addr+len` comes from `krun_alloc` (or is other
/// page-aligned private anonymous memory that stays mapped).
#[no_mangle]
pub unsafe extern "C" fn krun_register(
    name: *const c_char,
    addr: *mut c_void,
    len: usize,
) -> c_int {
    guard("krun_register", || {
        non_null(name, "name")?;
        non_null(addr, "addr")?;
        // SAFETY: non-NULL, NUL-terminated per the contract.
        let name = unsafe { CStr::from_ptr(name) }
            .to_str()
            .map_err(|_| RankError::InvalidArgument("name is not UTF-8".into()))?;
        let w = world()?;
        // SAFETY: forwarded from this function's contract.
        unsafe { w.register_memory(name, addr.cast(), len) }.map(i64::from)
    }) as c_int
}

/// Collective checkpoint; returns the version (complete on every rank) or a negative code.
#[no_mangle]
pub extern "C" fn krun_checkpoint() -> c_long {
    guard("krun_checkpoint", || Ok(world()?.checkpoint()? as i64)) as c_long
}

/// Collective: acts on SIGUSR1 (checkpoint) / SIGUSR2 (roll back) requests any rank got.
/// Returns 0 (nothing), 1 (checkpointed), 2 (rolled back: reload loop state), or a
/// negative code.
#[no_mangle]
pub extern "C" fn krun_safepoint() -> c_int {
    guard("krun_safepoint", || {
        Ok(match world()?.safepoint()? {
            Safepoint::Nothing => 0,
            Safepoint::Checkpointed(_) => 1,
            Safepoint::RolledBack(_) => 2,
        })
    }) as c_int
}

/// The version restored at start, 0 for a fresh start, or a negative code.
#[no_mangle]
pub extern "C" fn krun_restored_version() -> c_long {
    guard("krun_restored_version", || {
        Ok(world()?.restored_version().unwrap_or(0) as i64)
    }) as c_long
}

fn dsm() -> Result<Arc<SharedMemory>> {
    DSM.read()
        .map_err(|_| RankError::InvalidArgument("DSM state poisoned".into()))?
        .clone()
        .ok_or_else(|| {
            RankError::InvalidArgument("the DSM is not started: call krun_dsm_alloc first".into())
        })
}

/// Collective: allocates `len` bytes (rounded up to pages) of distributed shared memory at
/// the same address on every rank; stores it in `*base`. The first call starts the DSM.
///
/// # Safety
/// `base` must be a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn krun_dsm_alloc(len: usize, base: *mut *mut c_void) -> c_int {
    guard("krun_dsm_alloc", || {
        non_null(base, "base")?;
        let w = world()?;
        let shm = {
            let mut slot = DSM
                .write()
                .map_err(|_| RankError::InvalidArgument("DSM state poisoned".into()))?;
            match slot.as_ref() {
                Some(s) => s.clone(),
                None => slot.insert(Arc::new(w.dsm()?)).clone(),
            }
        };
        let region = shm.alloc(len)?;
        // SAFETY: checked non-NULL; valid per the contract.
        unsafe { *base = region.as_ptr().cast() };
        Ok(0)
    }) as c_int
}

/// Collective: frees the region `krun_dsm_alloc` returned at `base`.
#[no_mangle]
pub extern "C" fn krun_dsm_free(base: *mut c_void) -> c_int {
    guard("krun_dsm_free", || {
        let shm = dsm()?;
        let region = shm.region_at(base.cast())?;
        shm.free(region).map(|_| 0)
    }) as c_int
}

fn lock_id(id: c_int) -> Result<usize> {
    usize::try_from(id).map_err(|_| RankError::InvalidArgument(format!("DSM lock id {id} < 0")))
}

/// Takes DSM lock `id` (0..KRUN_DSM_LOCKS), queued FIFO.
#[no_mangle]
pub extern "C" fn krun_dsm_lock(id: c_int) -> c_int {
    guard("krun_dsm_lock", || dsm()?.lock(lock_id(id)?).map(|_| 0)) as c_int
}

/// Releases DSM lock `id`.
#[no_mangle]
pub extern "C" fn krun_dsm_unlock(id: c_int) -> c_int {
    guard("krun_dsm_unlock", || dsm()?.unlock(lock_id(id)?).map(|_| 0)) as c_int
}

/// Collective: returns when every rank has reached it (a plain barrier before the first
/// `krun_dsm_alloc`).
#[no_mangle]
pub extern "C" fn krun_dsm_barrier() -> c_int {
    guard("krun_dsm_barrier", || {
        let shm = DSM
            .read()
            .map_err(|_| RankError::InvalidArgument("DSM state poisoned".into()))?
            .clone();
        match shm {
            Some(s) => s.barrier(),
            None => world()?.barrier(),
        }
        .map(|_| 0)
    }) as c_int
}

/// This rank's DSM counters: page faults served, pages read one-sided, pages prefetched.
/// Each pointer may be NULL.
///
/// # Safety
/// Each pointer must be NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn krun_dsm_stats(
    faults: *mut u64,
    remote_fetches: *mut u64,
    prefetched: *mut u64,
) -> c_int {
    guard("krun_dsm_stats", || {
        let s = dsm()?.stats();
        for (p, v) in [
            (faults, s.faults),
            (remote_fetches, s.remote_fetches),
            (prefetched, s.prefetched),
        ] {
            if !p.is_null() {
                // SAFETY: non-NULL and valid per the contract.
                unsafe { *p = v };
            }
        }
        Ok(0)
    }) as c_int
}

/// The fixed description of an error code.
#[no_mangle]
pub extern "C" fn krun_strerror(code: c_int) -> *const c_char {
    match ErrorCode::from_code(code) {
        Some(c) => c.describe().as_ptr(),
        None if code >= 0 => c"success".as_ptr(),
        None => c"unknown error code".as_ptr(),
    }
}

/// This thread's last error message (valid until its next failing call).
#[no_mangle]
pub extern "C" fn krun_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_code_and_a_message() {
        let code = guard("krun_test", || panic!("boom at {}", 7));
        assert_eq!(code, ErrorCode::Panic as i64);
        // SAFETY: krun_last_error returns this thread's NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(krun_last_error()) }.to_string_lossy();
        assert!(msg.contains("panic inside krun_test: boom at 7"), "{msg}");
    }

    #[test]
    fn calls_before_init_fail_with_not_initialized() {
        assert_eq!(krun_rank(), ErrorCode::NotInitialized as c_int);
        assert_eq!(krun_barrier(), ErrorCode::NotInitialized as c_int);
        // SAFETY: a NULL buffer of length 0 is valid.
        let rc = unsafe { krun_send(0, 0, std::ptr::null(), 0) };
        assert_eq!(rc, ErrorCode::NotInitialized as c_int);
        // SAFETY: krun_strerror returns a static NUL-terminated string.
        let text = unsafe { CStr::from_ptr(krun_strerror(rc)) };
        assert_eq!(
            text.to_str().unwrap(),
            "the rank library is not initialized"
        );
        let mut base = std::ptr::null_mut();
        // SAFETY: base is a valid pointer.
        let rc = unsafe { krun_dsm_alloc(4096, &mut base) };
        assert_eq!(rc, ErrorCode::NotInitialized as c_int);
        assert!(base.is_null());
    }

    #[test]
    fn dsm_calls_before_any_region_name_the_missing_alloc() {
        assert_eq!(krun_dsm_lock(0), ErrorCode::Invalid as c_int);
        // SAFETY: krun_last_error returns this thread's NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(krun_last_error()) }.to_string_lossy();
        assert!(msg.contains("call krun_dsm_alloc first"), "{msg}");
        assert_eq!(
            krun_dsm_free(std::ptr::null_mut()),
            ErrorCode::Invalid as c_int
        );
        // SAFETY: a NULL base is rejected before any write.
        let rc = unsafe { krun_dsm_alloc(4096, std::ptr::null_mut()) };
        assert_eq!(rc, ErrorCode::Invalid as c_int);
    }
}
