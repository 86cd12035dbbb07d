//! Signals the node receives: SIGINT and SIGTERM are recorded to be forwarded to the ranks,
//! SIGUSR1 as a checkpoint request.
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Name of a signal for messages.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => return format!("signal {sig}"),
    };
    format!("signal {sig} ({name})")
}

/// Signal received by this process and not yet forwarded (0 = none).
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Checkpoint requests (SIGUSR1, e.g. Slurm's pre-timeout `--signal`) not yet handled.
static CHECKPOINT_REQUESTS: AtomicI32 = AtomicI32::new(0);
/// `RankEvent::Killed` events sent by this process (see [`killed_ranks_reported`]).
pub(super) static KILLED_SENT: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// How many `RankEvent::Killed` this process sent: a node leaving after a killed rank waits
/// until its runtime has told krun of each (the report decides whether the job ends).
pub fn killed_ranks_reported() -> usize {
    KILLED_SENT.load(Ordering::SeqCst)
}

extern "C" fn remember_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        CHECKPOINT_REQUESTS.fetch_add(1, Ordering::SeqCst);
    } else {
        PENDING_SIGNAL.store(sig, Ordering::SeqCst);
    }
}

/// Installs handlers that record SIGINT/SIGTERM for forwarding instead of dying, and
/// SIGUSR1 as a "checkpoint now" event.
pub fn catch_forwarded_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches atomics, which is async-signal-safe.
        unsafe { libc::signal(sig, remember_signal as *const () as libc::sighandler_t) };
    }
}

/// Records SIGUSR1 as a checkpoint request from now on (the runtime takes it once its ranks
/// run). A node runtime installs it first thing: Slurm's `--signal` may come up to a minute
/// early, also while the node is still starting, and SIGUSR1's default action would end it.
pub fn catch_checkpoint_requests() {
    // SAFETY: the handler only touches atomics, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            remember_signal as *const () as libc::sighandler_t,
        )
    };
}

/// Set when a node that never ran a rank (a spare) ended on SIGINT or SIGTERM.
pub(super) static SPARE_SIGNALLED: AtomicBool = AtomicBool::new(false);

/// Whether [`super::run_share`] returned because this node, running no rank, was told to end by
/// SIGINT or SIGTERM.
pub fn spare_signalled() -> bool {
    SPARE_SIGNALLED.load(Ordering::SeqCst)
}

/// Takes the checkpoint requests received since the last call.
pub fn take_checkpoint_requests() -> i32 {
    CHECKPOINT_REQUESTS.swap(0, Ordering::SeqCst)
}

/// Takes the signal received since the last call, if any.
pub fn take_signal() -> Option<i32> {
    match PENDING_SIGNAL.swap(0, Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), "signal 9 (SIGKILL)");
        assert_eq!(signal_name(64), "signal 64");
    }
}
