//! Policy modules: a policy whose code is not built into krun, loaded from a shared library
//! built against this crate (the analog of the HA framework's kernel modules generated from
//! a description). The C ABI is in [`abi`]; a module is written with
//! [`crate::export_policy!`] (see `policy-module-example/` in the workspace).
//!
//! [`ModulePolicy::load`] opens the library, refuses one built against another ABI version
//! (naming both versions) or one that lacks a symbol, and builds the policy. The host never
//! unwinds through the module: every exported function catches panics and returns an error
//! code. Once a call fails (an error or a panic), the policy is **failed**:
//! [`Policy::failure`] says why, it returns no more actions, and krun swaps the job back to
//! its previous policy. Dropping a [`ModulePolicy`] destroys the module's policy and
//! unloads the library (`dlclose`).
pub mod abi;

use crate::policy::{Phase, Policy};
use crate::primitives::{Action, Costs, Event, Millis, Rank, Reads, Version};
use crate::report::Summary;
use crate::PolicyError;
use abi::{Init, KrunBuf, KrunReads, State, Step};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

type AbiVersionFn = unsafe extern "C" fn() -> u32;
type CreateFn = unsafe extern "C" fn(*const u8, usize, *mut *mut c_void, *mut KrunBuf) -> i32;
type OnEventFn =
    unsafe extern "C" fn(*mut c_void, u64, *const u8, usize, KrunReads, *mut KrunBuf) -> i32;
type NextDeadlineFn = unsafe extern "C" fn(*mut c_void, *mut u64) -> i32;
type DestroyFn = unsafe extern "C" fn(*mut c_void);
type FreeFn = unsafe extern "C" fn(KrunBuf);

/// The module's functions (valid while its library stays loaded).
#[derive(Clone, Copy)]
struct Fns {
    on_event: OnEventFn,
    next_deadline: NextDeadlineFn,
    destroy: DestroyFn,
    free: FreeFn,
}

/// A policy run by a loaded module.
pub struct ModulePolicy {
    path: PathBuf,
    fns: Fns,
    handle: *mut c_void,
    name: &'static str,
    state: State,
    /// Set by the first call that failed (`next_deadline` takes `&self`: a cell).
    failed: RefCell<Option<String>>,
    /// Dropped last: unloads the module.
    lib: Option<Library>,
}

// SAFETY: the module's policy is only reached through `&mut self` (or `&self` for reads of
// cached state and `next_deadline`, which the ABI allows from any thread, one call at a
// time); the handle is owned by this value.
unsafe impl Send for ModulePolicy {}

/// Policy names live as long as krun (`Policy::name` is `&'static str`): one leak per
/// distinct name.
fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(name) {
        return n;
    }
    let n: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(n);
    n
}

/// Copies a module's buffer out and frees it in the module.
///
/// # Safety
/// `buf` was written by a function of the module whose `free` is given.
unsafe fn take(buf: KrunBuf, free: FreeFn) -> Vec<u8> {
    if buf.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: `len` bytes the module wrote, freed by the module right after.
    unsafe {
        let v = std::slice::from_raw_parts(buf.ptr, buf.len).to_vec();
        free(buf);
        v
    }
}

fn outcome(code: i32, bytes: &[u8]) -> Result<(), String> {
    let text = || String::from_utf8_lossy(bytes).into_owned();
    match code {
        abi::OK => Ok(()),
        abi::ERROR => Err(text()),
        abi::PANICKED => Err(format!("panicked: {}", text())),
        c => Err(format!("returned the unknown code {c}")),
    }
}

/// The host's side of [`KrunReads`]: `ctx` is a `*const &dyn Reads`.
unsafe extern "C" fn host_copies(
    ctx: *const c_void,
    rank: Rank,
    version: Version,
    out: *mut u8,
    cap: usize,
) -> usize {
    let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `ctx` points to the `&dyn Reads` on `on_event`'s stack, alive for the call.
        let reads: &dyn Reads = unsafe { *ctx.cast::<&dyn Reads>() };
        postcard::to_allocvec(&reads.copies(rank, version)).unwrap_or_default()
    }));
    let Ok(bytes) = answer else { return 0 };
    if bytes.len() <= cap {
        // SAFETY: the module gave `cap` writable bytes at `out`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out, bytes.len()) };
    }
    bytes.len()
}

impl ModulePolicy {
    /// Loads the module at `path` and builds its policy from `init`.
    pub fn load(path: &Path, init: &Init) -> Result<ModulePolicy, PolicyError> {
        let fail = |reason: String| PolicyError::Module {
            path: path.display().to_string(),
            reason,
        };
        if !path.exists() {
            return Err(fail("no such file".into()));
        }
        // SAFETY: loading runs the library's initialisers; a policy module is code the user
        // chose to run in krun, as a program they run.
        let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| fail(format!("cannot be loaded: {e}")))?;
        /// Reads a symbol's address as a function pointer of type `T`.
        ///
        /// # Safety
        /// `T` is the symbol's real type.
        unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
            let mut z = name.as_bytes().to_vec();
            z.push(0);
            // SAFETY: as the caller promises.
            unsafe { lib.get::<T>(&z) }.map(|s| *s).map_err(|_| {
                format!("not a krun policy module: it exports no `{name}` (write it with policies::export_policy!)")
            })
        }
        // SAFETY: the types are the ABI's (checked by the version first).
        let version: AbiVersionFn =
            unsafe { sym(&lib, "krun_policy_abi_version") }.map_err(fail)?;
        // SAFETY: a function of no argument returning u32, per the ABI of every version.
        let theirs = unsafe { version() };
        if theirs != abi::ABI_VERSION {
            return Err(fail(format!(
                "built against policy module ABI version {theirs}, this krun speaks version {}: \
                 rebuild the module against this krun's policies crate",
                abi::ABI_VERSION
            )));
        }
        // SAFETY: the symbols of ABI version ABI_VERSION have these types.
        let (create, fns) = unsafe {
            let create: CreateFn = sym(&lib, "krun_policy_create").map_err(fail)?;
            let fns = Fns {
                on_event: sym(&lib, "krun_policy_on_event").map_err(fail)?,
                next_deadline: sym(&lib, "krun_policy_next_deadline").map_err(fail)?,
                destroy: sym(&lib, "krun_policy_destroy").map_err(fail)?,
                free: sym(&lib, "krun_policy_free").map_err(fail)?,
            };
            (create, fns)
        };
        let init = postcard::to_allocvec(init).map_err(|e| fail(format!("encoding: {e}")))?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut out = KrunBuf::EMPTY;
        // SAFETY: valid pointers for the call, as the ABI asks.
        let code = unsafe { create(init.as_ptr(), init.len(), &mut handle, &mut out) };
        // SAFETY: written by the module's create.
        let bytes = unsafe { take(out, fns.free) };
        outcome(code, &bytes).map_err(|e| fail(format!("could not create its policy: {e}")))?;
        let mut p = ModulePolicy {
            path: path.to_path_buf(),
            fns,
            handle,
            name: "module",
            state: State {
                name: String::new(),
                phase: Phase::Running,
                next_deadline: None,
                recovery_line: None,
                costs: Costs::default(),
                summary: Summary::default(),
            },
            failed: RefCell::new(None),
            lib: Some(lib),
        };
        if handle.is_null() {
            return Err(fail("its create returned no policy".into()));
        }
        p.state = postcard::from_bytes(&bytes)
            .map_err(|e| fail(format!("its create returned an unreadable state: {e}")))?;
        p.name = intern(&p.state.name);
        Ok(p)
    }

    /// The library's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, reason: String) -> Vec<Action> {
        let mut failed = self.failed.borrow_mut();
        if failed.is_none() {
            *failed = Some(format!("policy module {}: {reason}", self.path.display()));
        }
        Vec::new()
    }
}

impl Policy for ModulePolicy {
    fn name(&self) -> &'static str {
        self.name
    }

    fn on_event(&mut self, now: Millis, event: Event, reads: &dyn Reads) -> Vec<Action> {
        if self.failed.borrow().is_some() {
            return Vec::new();
        }
        let ev = match postcard::to_allocvec(&event) {
            Ok(b) => b,
            Err(e) => return self.fail(format!("encoding an event: {e}")),
        };
        let ctx: *const &dyn Reads = &reads;
        let reads = KrunReads {
            ctx: ctx.cast(),
            copies: host_copies,
        };
        let mut out = KrunBuf::EMPTY;
        // SAFETY: a live handle, valid buffers; `reads` outlives the call.
        let code = unsafe {
            (self.fns.on_event)(self.handle, now, ev.as_ptr(), ev.len(), reads, &mut out)
        };
        // SAFETY: written by the module's on_event.
        let bytes = unsafe { take(out, self.fns.free) };
        if let Err(e) = outcome(code, &bytes) {
            return self.fail(e);
        }
        match postcard::from_bytes::<Step>(&bytes) {
            Ok(step) => {
                self.state = step.state;
                step.actions
            }
            Err(e) => self.fail(format!("unreadable actions: {e}")),
        }
    }

    fn next_deadline(&self) -> Option<Millis> {
        if self.failed.borrow().is_some() {
            return None;
        }
        let mut at = 0u64;
        // SAFETY: a live handle and a valid out pointer.
        match unsafe { (self.fns.next_deadline)(self.handle, &mut at) } {
            1 => Some(at),
            0 => None,
            code => {
                self.fail(if code == -abi::PANICKED {
                    "panicked in next_deadline".into()
                } else {
                    format!("next_deadline returned the unknown code {code}")
                });
                None
            }
        }
    }

    fn phase(&self) -> Phase {
        self.state.phase
    }

    fn recovery_line(&self) -> Option<Version> {
        self.state.recovery_line
    }

    fn costs(&self) -> &Costs {
        &self.state.costs
    }

    fn summary(&self) -> Summary {
        self.state.summary.clone()
    }

    fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }
}

impl Drop for ModulePolicy {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle create returned, destroyed once; the module catches panics.
            unsafe { (self.fns.destroy)(self.handle) };
            self.handle = std::ptr::null_mut();
        }
        // Unloads the library (after the policy's code is no longer needed).
        drop(self.lib.take());
    }
}
