//! The policy module C ABI, version [`ABI_VERSION`]: what a module exports and how events,
//! actions and reads cross the boundary (postcard bytes of this crate's serde types).
//!
//! | symbol | signature | does |
//! |---|---|---|
//! | `krun_policy_abi_version` | `() -> u32` | the ABI the module was built against |
//! | `krun_policy_create` | `(init, init_len, *mut handle, *mut KrunBuf) -> i32` | builds the policy from an [`Init`]; the buffer gets its [`State`] |
//! | `krun_policy_on_event` | `(handle, now, event, event_len, KrunReads, *mut KrunBuf) -> i32` | one [`crate::Event`] in; a [`Step`] out |
//! | `krun_policy_next_deadline` | `(handle, *mut u64) -> i32` | 1: a deadline, 0: none |
//! | `krun_policy_destroy` | `(handle)` | drops the policy |
//! | `krun_policy_free` | `(KrunBuf)` | frees a buffer the module returned |
//!
//! Return codes: [`OK`], [`ERROR`] (the buffer holds a UTF-8 message) or [`PANICKED`] (the
//! module's code panicked; the buffer holds the panic message). Every exported function
//! catches panics ([`std::panic::catch_unwind`]) so that none unwinds into krun: write a
//! module with [`crate::export_policy!`], which generates them. The host calls one function
//! at a time per handle (from any thread), and never calls `on_event` again after an error.
use crate::policy::{Phase, Policy};
use crate::primitives::{
    Action, AgreedView, Costs, Event, ImageCopy, Layout, Millis, NodeId, Rank, Reads, Snapshot,
    Version,
};
use crate::report::Summary;
use crate::Config;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Bumped on any change of the symbols, their signatures or the serde types that cross.
/// 2: the uncoordinated policy's events and actions (`CaptureRank`, `TrimLog`, `Replay`,
/// `Logged`, ...) joined the enums that cross. 3: `Action::KeepFrom` (retention by line).
/// 4: `Event::RankReady` (the job's wiring) and the recovery line's `rewire`.
pub const ABI_VERSION: u32 = 4;

pub const OK: i32 = 0;
pub const ERROR: i32 = 1;
pub const PANICKED: i32 = 2;

/// Bytes allocated by the module (a `Vec<u8>`'s parts), freed by `krun_policy_free`.
#[repr(C)]
pub struct KrunBuf {
    pub ptr: *mut u8,
    pub len: usize,
    pub cap: usize,
}

impl KrunBuf {
    pub const EMPTY: KrunBuf = KrunBuf {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    };

    /// Hands `v` over (the receiver frees it with [`KrunBuf::into_vec`] in the module).
    pub fn from_vec(v: Vec<u8>) -> KrunBuf {
        let mut v = std::mem::ManuallyDrop::new(v);
        KrunBuf {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            cap: v.capacity(),
        }
    }

    /// # Safety
    /// `self` came from [`KrunBuf::from_vec`] in this same module (same allocator) and is
    /// not used again.
    pub unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: the parts of a Vec leaked by `from_vec`, as the caller promises.
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
    }
}

/// The copies index, read through the host: `copies(ctx, rank, version, out, cap)` returns
/// the length of the postcard `Vec<ImageCopy>` and writes it to `out` if it fits in `cap`
/// (0: the host could not answer).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KrunReads {
    pub ctx: *const c_void,
    pub copies: unsafe extern "C" fn(*const c_void, Rank, Version, *mut u8, usize) -> usize,
}

/// What a module builds its policy from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Init {
    pub leader: NodeId,
    pub layout: Layout,
    pub view: AgreedView,
    pub now: Millis,
    /// Set for a swap while the job runs: the recovery line and every decision so far (as
    /// for a new leader: resume from it).
    pub snapshot: Option<Snapshot>,
    /// The description's coordinated-policy settings over the job's defaults.
    pub config: Config,
    /// The description's `[params]`.
    pub params: BTreeMap<String, String>,
}

/// What the host caches of the policy between calls.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub phase: Phase,
    pub next_deadline: Option<Millis>,
    pub recovery_line: Option<Version>,
    pub costs: Costs,
    pub summary: Summary,
}

impl State {
    pub fn of(p: &dyn Policy) -> State {
        State {
            name: p.name().to_string(),
            phase: p.phase(),
            next_deadline: p.next_deadline(),
            recovery_line: p.recovery_line(),
            costs: p.costs().clone(),
            summary: p.summary(),
        }
    }
}

/// `krun_policy_on_event`'s answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    pub actions: Vec<Action>,
    pub state: State,
}

/// A module's constructor (what [`crate::export_policy!`] is given).
pub type Create = fn(&Init) -> Result<Box<dyn Policy + Send>, String>;

type Handle = Box<dyn Policy + Send>;

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `f` with panics caught, writing its bytes or its error into `out`.
///
/// # Safety
/// `out` is null or valid for one write of a [`KrunBuf`].
unsafe fn guarded(out: *mut KrunBuf, f: impl FnOnce() -> Result<Vec<u8>, String>) -> i32 {
    let (code, bytes) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(b)) => (OK, b),
        Ok(Err(e)) => (ERROR, e.into_bytes()),
        Err(p) => (PANICKED, panic_text(p).into_bytes()),
    };
    if !out.is_null() {
        // SAFETY: valid for a write, as the caller promises.
        unsafe { out.write(KrunBuf::from_vec(bytes)) };
    }
    code
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(v).map_err(|e| format!("encoding: {e}"))
}

/// `krun_policy_create`, in the module.
///
/// # Safety
/// `init` points to `len` readable bytes; `handle` and `out` are valid for one write each.
pub unsafe fn guest_create(
    init: *const u8,
    len: usize,
    handle: *mut *mut c_void,
    out: *mut KrunBuf,
    create: Create,
) -> i32 {
    // SAFETY: the host passes valid pointers, as documented.
    unsafe {
        guarded(out, || {
            let bytes = std::slice::from_raw_parts(init, len);
            let init: Init = postcard::from_bytes(bytes).map_err(|e| format!("the init: {e}"))?;
            let p: Handle = create(&init)?;
            let state = encode(&State::of(p.as_ref()))?;
            handle.write(Box::into_raw(Box::new(p)).cast());
            Ok(state)
        })
    }
}

/// The host's copies index, as the module's policy reads it.
struct HostReads(KrunReads);

impl Reads for HostReads {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        let mut buf = vec![0u8; 256];
        for _ in 0..2 {
            // SAFETY: the host's function, with its context and a buffer of `cap` bytes.
            let n =
                unsafe { (self.0.copies)(self.0.ctx, rank, version, buf.as_mut_ptr(), buf.len()) };
            if n <= buf.len() {
                return postcard::from_bytes(&buf[..n]).unwrap_or_default();
            }
            buf.resize(n, 0);
        }
        Vec::new()
    }
}

/// `krun_policy_on_event`, in the module.
///
/// # Safety
/// `handle` came from `guest_create` and is not destroyed; `event` points to `len` readable
/// bytes; `out` is valid for one write; `reads` is valid during the call.
pub unsafe fn guest_on_event(
    handle: *mut c_void,
    now: Millis,
    event: *const u8,
    len: usize,
    reads: KrunReads,
    out: *mut KrunBuf,
) -> i32 {
    // SAFETY: as the caller promises.
    unsafe {
        guarded(out, || {
            let p = &mut *handle.cast::<Handle>();
            let ev: Event = postcard::from_bytes(std::slice::from_raw_parts(event, len))
                .map_err(|e| format!("the event: {e}"))?;
            let actions = p.on_event(now, ev, &HostReads(reads));
            encode(&Step {
                actions,
                state: State::of(p.as_ref()),
            })
        })
    }
}

/// `krun_policy_next_deadline`, in the module: 1 and `*at` set, 0 for none, else an error.
///
/// # Safety
/// `handle` came from `guest_create` and is not destroyed; `at` is valid for a write.
pub unsafe fn guest_next_deadline(handle: *mut c_void, at: *mut u64) -> i32 {
    // SAFETY: as the caller promises.
    match catch_unwind(AssertUnwindSafe(|| unsafe {
        (*handle.cast::<Handle>()).next_deadline()
    })) {
        Ok(Some(t)) => {
            // SAFETY: valid for a write.
            unsafe { at.write(t) };
            1
        }
        Ok(None) => 0,
        Err(_) => -PANICKED,
    }
}

/// `krun_policy_destroy`, in the module.
///
/// # Safety
/// `handle` came from `guest_create` and is not used again.
pub unsafe fn guest_destroy(handle: *mut c_void) {
    if handle.is_null() {
        return;
    }
    // SAFETY: the box `guest_create` leaked, as the caller promises.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
        drop(Box::from_raw(handle.cast::<Handle>()))
    }));
}

/// `krun_policy_free`, in the module.
///
/// # Safety
/// `buf` came from this module and is not used again.
pub unsafe fn guest_free(buf: KrunBuf) {
    // SAFETY: as the caller promises.
    drop(unsafe { buf.into_vec() });
}

/// Exports a policy module's C ABI for the constructor `$create`
/// (`fn(&Init) -> Result<Box<dyn Policy + Send>, String>`): every function catches panics.
///
/// ```ignore
/// fn create(init: &policies::module::abi::Init) -> Result<Box<dyn policies::Policy + Send>, String> { ... }
/// policies::export_policy!(create);
/// ```
#[macro_export]
macro_rules! export_policy {
    ($create:path) => {
        #[no_mangle]
        pub extern "C" fn krun_policy_abi_version() -> u32 {
            $crate::module::abi::ABI_VERSION
        }

        /// # Safety
        /// See `policies::module::abi`.
        #[no_mangle]
        pub unsafe extern "C" fn krun_policy_create(
            init: *const u8,
            len: usize,
            handle: *mut *mut ::std::ffi::c_void,
            out: *mut $crate::module::abi::KrunBuf,
        ) -> i32 {
            unsafe { $crate::module::abi::guest_create(init, len, handle, out, $create) }
        }

        /// # Safety
        /// See `policies::module::abi`.
        #[no_mangle]
        pub unsafe extern "C" fn krun_policy_on_event(
            handle: *mut ::std::ffi::c_void,
            now: u64,
            event: *const u8,
            len: usize,
            reads: $crate::module::abi::KrunReads,
            out: *mut $crate::module::abi::KrunBuf,
        ) -> i32 {
            unsafe { $crate::module::abi::guest_on_event(handle, now, event, len, reads, out) }
        }

        /// # Safety
        /// See `policies::module::abi`.
        #[no_mangle]
        pub unsafe extern "C" fn krun_policy_next_deadline(
            handle: *mut ::std::ffi::c_void,
            at: *mut u64,
        ) -> i32 {
            unsafe { $crate::module::abi::guest_next_deadline(handle, at) }
        }

        /// # Safety
        /// See `policies::module::abi`.
        #[no_mangle]
        pub unsafe extern "C" fn krun_policy_destroy(handle: *mut ::std::ffi::c_void) {
            unsafe { $crate::module::abi::guest_destroy(handle) }
        }

        /// # Safety
        /// See `policies::module::abi`.
        #[no_mangle]
        pub unsafe extern "C" fn krun_policy_free(buf: $crate::module::abi::KrunBuf) {
            unsafe { $crate::module::abi::guest_free(buf) }
        }
    };
}
