//! Requests by signal: SIGUSR1 asks for a checkpoint and SIGUSR2 for a rollback; the
//! program acts on them at its next [`NativeRuntime::safepoint`].
use super::{NativeRuntime, SafepointAction, CAPTURE_FAILED, ROLLED_BACK};
use crate::error::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static CHECKPOINT_REQUESTED: AtomicBool = AtomicBool::new(false);
static ROLLBACK_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_request_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        CHECKPOINT_REQUESTED.store(true, Ordering::SeqCst);
    } else if sig == libc::SIGUSR2 {
        ROLLBACK_REQUESTED.store(true, Ordering::SeqCst);
    }
}

/// Makes SIGUSR1 (checkpoint) and SIGUSR2 (rollback to the latest image) requests that the
/// next `safepoint` acts on, unless the program already handles those signals.
pub(super) fn install_request_handlers() {
    for sig in [libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: the handler does one atomic store (async-signal-safe).
        unsafe { install_handler_if_default(sig, on_request_signal) };
    }
}

/// Installs `handler` for `sig` (with `SA_RESTART`) unless the program already set a
/// disposition of its own for it; returns whether it was installed. Shared by the ghost
/// runtime's requests and the rank library's (which adds krund's wake signal).
///
/// # Safety
/// `handler` must be async-signal-safe: it runs on whatever thread the signal lands on, in
/// the middle of any code (atomic stores are fine; locks and allocation are not).
pub unsafe fn install_handler_if_default(
    sig: libc::c_int,
    handler: extern "C" fn(libc::c_int),
) -> bool {
    // SAFETY: the first sigaction only reads the current disposition into a zeroed struct;
    // the second installs a handler the caller vouches for.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
            || old.sa_sigaction != libc::SIG_DFL
        {
            return false;
        }
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler as *const () as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(sig, &act, std::ptr::null_mut()) == 0
    }
}

impl NativeRuntime {
    /// Acts on a pending SIGUSR1 (checkpoint) or SIGUSR2 (rollback to the newest image).
    pub fn safepoint(self: &Arc<Self>) -> Result<SafepointAction> {
        if ROLLBACK_REQUESTED.swap(false, Ordering::SeqCst) {
            let version = self.rollback(self.requested_rollback_version())?;
            let marker = self.config.dir.join(&self.config.owner).join(ROLLED_BACK);
            // Atomically: the checkpointer polls for it and must never read it half written.
            let _ = super::write_atomically(
                &marker,
                format!("{version} {}\n", std::process::id()).as_bytes(),
            );
            return Ok(SafepointAction::RolledBack(version));
        }
        if CHECKPOINT_REQUESTED.swap(false, Ordering::SeqCst) {
            let owner_dir = self.config.dir.join(&self.config.owner);
            let _ = std::fs::remove_file(owner_dir.join(CAPTURE_FAILED));
            return match self.checkpoint() {
                Ok(v) => Ok(SafepointAction::CheckpointStarted(v)),
                Err(e) => {
                    // Best effort: on a full disk even this may fail, and the waiter times out.
                    let _ = std::fs::write(
                        owner_dir.join(CAPTURE_FAILED),
                        format!("{} {e}\n", std::process::id()),
                    );
                    Err(e)
                }
            };
        }
        Ok(SafepointAction::Nothing)
    }
}
