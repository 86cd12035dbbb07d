//! Rollback in place: a live rank process rolls back to a committed checkpoint when its node
//! orders it, at any moment, not only at a safepoint.
//!
//! # The watcher
//! With a node link (`KRUN_NODE_SOCKET`), [`crate::Rank::init`] starts a watcher thread
//! first thing, on its own connection to krund ([`NodeLink::watch`]): it asks for orders in
//! a loop and krund answers within [`crate::node_link::WATCH_HOLD`]. The thread blocks every
//! signal (the program's threads take them). A rank blocked in a receive from a lost peer,
//! or in a wiring-epoch all-gather that a second failure broke, is reached through it.
//!
//! # What "in place" is, exactly
//! On `RollbackInPlace{wiring, bootstrap, version}` the watcher re-executes the process's
//! own program: `execve("/proc/self/exe")` with the argv and environment the process was
//! started with (read from `/proc/self/cmdline` and `/proc/self/environ` when the watcher
//! started), with `KRUN_GHOST_RESTORE=version` (removed for a restart from the program's
//! start), `KRUN_BOOTSTRAP=bootstrap` and `KRUN_WIRING_EPOCH=wiring` set. Before that it
//! flushes C stdio and Rust's stdout/stderr (for at most [`FLUSH_LIMIT`]: a thread may hold a
//! stream's lock), removes this process's libfabric shm segments (`/dev/shm/PID:*`; the new
//! image reuses the PID) and marks every descriptor above 2 close-on-exec.
//!
//! Kept by the kernel: the PID, the parent (krund still waits for the same child), the
//! process group and session, CPU affinity (pinning), resource limits, the parent-death
//! signal, and stdio (descriptors 0-2: krund's output forwarding goes on). Replaced: every
//! thread, all memory, every other descriptor (the fabric endpoint, the node links), signal
//! handlers (reset to default; the library installs its own again at init). The new image
//! starts as any restarted rank does: the library restores its registered memory from this
//! rank's own images of `version` on this node (libghost's restore-on-start from L1) and
//! swaps its new fabric address with every rank in the new wiring epoch; the program
//! resumes from the state in its registered memory. What a program keeps outside
//! registered memory and stdio (files it opened, threads) starts afresh, exactly as after a
//! restart; what it computed since the checkpoint is recomputed.
//!
//! # Errors while a recovery is coming
//! In a job whose policy recovers (`KRUN_RECOVERS` or `KRUN_SPARES` set by krun), a
//! communication error (the fabric failed a send or a receive: a peer's node died) or a
//! failed safepoint (the node aborted the barrier because a node failed) is held for up to
//! [`HOLD_ON_ERROR`] before it is returned: the rollback order normally arrives meanwhile
//! and replaces the process, so the program never sees the error and keeps its PID.
use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{RankError, Result};
use crate::node_link::{InPlaceOrder, NodeLink};

/// How long a communication error waits for a rollback order in a job that recovers.
pub const HOLD_ON_ERROR: Duration = Duration::from_secs(30);

/// How long the watcher tries to flush the program's buffered output before re-executing.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(1);

/// The watcher runs: orders can reach this process.
static WATCHING: AtomicBool = AtomicBool::new(false);

/// The job's policy recovers failed ranks (krun sets these in every rank's environment).
fn recovers() -> bool {
    std::env::var_os("KRUN_RECOVERS").is_some()
        || std::env::var("KRUN_SPARES")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 0)
}

/// Whether [`hold`] waits for an order (a watcher runs and the job recovers).
pub(crate) fn may_hold() -> bool {
    WATCHING.load(Ordering::SeqCst) && recovers()
}

/// Returns `e` after waiting up to [`HOLD_ON_ERROR`] for a rollback order, when one may
/// come (a watcher runs and the job recovers); the order replaces the process meanwhile.
pub(crate) fn hold(e: RankError) -> RankError {
    if !may_hold() {
        return e;
    }
    let deadline = Instant::now() + HOLD_ON_ERROR;
    while WATCHING.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    e
}

/// Splits a NUL-separated `/proc` list.
fn nul_list(bytes: &[u8]) -> Vec<Vec<u8>> {
    bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// The environment of the re-executed image: `env` with the recovery's variables replaced.
pub fn reexec_env(env: &[Vec<u8>], order: &InPlaceOrder) -> Vec<Vec<u8>> {
    reexec_env_in(env, order, crate::uncoordinated::reexec_mode())
}

/// As [`reexec_env`], for a process in `mode` (`None`: the mode it started with).
fn reexec_env_in(
    env: &[Vec<u8>],
    order: &InPlaceOrder,
    mode: Option<[(&str, &str); 2]>,
) -> Vec<Vec<u8>> {
    const REPLACED: [&[u8]; 3] = [
        b"KRUN_GHOST_RESTORE=",
        b"KRUN_BOOTSTRAP=",
        b"KRUN_WIRING_EPOCH=",
    ];
    // A process whose mode was switched while the job ran keeps the mode it runs in now,
    // and a rollback in place is never a rejoin (`crate::uncoordinated`).
    const MODE: [&[u8]; 3] = [
        b"KRUN_REJOIN=",
        b"KRUN_UNCOORDINATED=",
        b"KRUN_MESSAGE_LOGGING=",
    ];
    let mut out: Vec<Vec<u8>> = env
        .iter()
        .filter(|kv| !REPLACED.iter().any(|p| kv.starts_with(p)))
        .filter(|kv| mode.is_none() || !MODE.iter().any(|p| kv.starts_with(p)))
        .cloned()
        .collect();
    if let Some(v) = order.version {
        out.push(format!("KRUN_GHOST_RESTORE={v}").into_bytes());
    }
    for (k, v) in mode.into_iter().flatten() {
        out.push(format!("{k}={v}").into_bytes());
    }
    out.push(format!("KRUN_BOOTSTRAP={}", order.bootstrap).into_bytes());
    out.push(format!("KRUN_WIRING_EPOCH={}", order.wiring).into_bytes());
    out
}

/// Starts the watcher on its own connection to krund's rank socket.
pub(crate) fn start_watcher(socket: &Path, rank: u32) -> Result<()> {
    let read = |path: &str| {
        std::fs::read(path).map_err(|e| RankError::NodeLink {
            socket: socket.to_path_buf(),
            reason: format!("reading {path} for a later rollback in place: {e}"),
        })
    };
    let argv = nul_list(&read("/proc/self/cmdline")?);
    let env = nul_list(&read("/proc/self/environ")?);
    if argv.is_empty() {
        return Err(RankError::NodeLink {
            socket: socket.to_path_buf(),
            reason: "/proc/self/cmdline is empty: this process cannot re-execute itself".into(),
        });
    }
    let mut link = NodeLink::connect_env(socket)?;
    std::thread::Builder::new()
        .name("krun-rollback".into())
        .spawn(move || {
            block_signals();
            WATCHING.store(true, Ordering::SeqCst);
            loop {
                match link.watch_order(rank) {
                    Ok(None) => {}
                    Ok(Some(crate::node_link::WatchOrder::InPlace(order))) => {
                        crate::trace::step(rank as usize, "rollback order taken");
                        let e = reexec(&argv, &env, &order, rank);
                        eprintln!(
                            "krun: rank {rank}: rollback in place to {:?} failed: {e}",
                            order.version
                        );
                        // The job rolls back without this process's state: it cannot go on.
                        // SAFETY: _exit ends the process without running anything else.
                        unsafe { libc::_exit(1) };
                    }
                    // The uncoordinated policy's orders (`crate::uncoordinated`).
                    Ok(Some(other)) => crate::uncoordinated::on_order(&mut link, rank, other),
                    // The node is gone (it ends its ranks) or does not give orders.
                    Err(_) => break,
                }
            }
            WATCHING.store(false, Ordering::SeqCst);
        })
        .map_err(|e| RankError::NodeLink {
            socket: socket.to_path_buf(),
            reason: format!("starting the rollback watcher: {e}"),
        })?;
    Ok(())
}

/// Blocks every signal in the calling thread.
fn block_signals() {
    // SAFETY: sigfillset initialises the set; pthread_sigmask changes this thread's mask only.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// Flushes the program's buffered output, giving up after [`FLUSH_LIMIT`].
fn flush_output() {
    let (tx, rx) = std::sync::mpsc::channel();
    let flusher = std::thread::spawn(move || {
        use std::io::Write;
        // SAFETY: fflush(NULL) flushes every C stdio stream; it takes each stream's lock.
        unsafe { libc::fflush(std::ptr::null_mut()) };
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let _ = tx.send(());
    });
    if rx.recv_timeout(FLUSH_LIMIT).is_ok() {
        let _ = flusher.join();
    }
}

/// Replaces this process's image (see the module documentation); returns only on failure.
fn reexec(argv: &[Vec<u8>], env: &[Vec<u8>], order: &InPlaceOrder, rank: u32) -> RankError {
    let fail = |reason: String| RankError::Checkpoint(reason);
    let to_c = |v: &[Vec<u8>]| -> std::result::Result<Vec<CString>, RankError> {
        v.iter()
            .map(|s| CString::new(s.clone()).map_err(|e| fail(format!("argument: {e}"))))
            .collect()
    };
    let argv = match to_c(argv) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let env = match to_c(&reexec_env(env, order)) {
        Ok(e) => e,
        Err(e) => return e,
    };
    flush_output();
    crate::trace::step(rank as usize, "output flushed");
    fabric::ofi::remove_shm_segments(std::process::id());
    if let Err(e) = ghost::descriptors::cloexec_above_stdio() {
        return fail(format!("marking descriptors close-on-exec: {e}"));
    }
    crate::trace::step(rank as usize, "execve");
    let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let exe = c"/proc/self/exe";
    // SAFETY: the mask is set for this thread only (the new image inherits it: empty, as a
    // program expects); argp and envp are NUL-terminated arrays of pointers to CStrings that
    // live until execve returns (it returns only on failure).
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(exe.as_ptr(), argp.as_ptr(), envp.as_ptr());
    }
    let e = std::io::Error::last_os_error();
    block_signals();
    fail(format!("execve /proc/self/exe: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reexecuted_environment_replaces_the_recovery_variables_and_keeps_the_rest() {
        let env = nul_list(
            b"PATH=/bin\0KRUN_RANK=3\0KRUN_BOOTSTRAP=127.0.0.1:1\0KRUN_GHOST_RESTORE=2\0\
              KRUN_WIRING_EPOCH=1\0HOME=/root\0",
        );
        let order = InPlaceOrder {
            wiring: 2,
            bootstrap: "127.0.0.1:4242".into(),
            version: Some(7),
        };
        let text = |v: Vec<Vec<u8>>| {
            v.into_iter()
                .map(|b| String::from_utf8(b).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            text(reexec_env(&env, &order)),
            [
                "PATH=/bin",
                "KRUN_RANK=3",
                "HOME=/root",
                "KRUN_GHOST_RESTORE=7",
                "KRUN_BOOTSTRAP=127.0.0.1:4242",
                "KRUN_WIRING_EPOCH=2"
            ]
        );
        // A process switched to the coordinated mode after it rejoined: not a rejoin any
        // more, and coordinated.
        let rejoined =
            nul_list(b"KRUN_RANK=3\0KRUN_REJOIN=1\0KRUN_UNCOORDINATED=1\0KRUN_MESSAGE_LOGGING=1\0");
        let mode = Some([("KRUN_UNCOORDINATED", "0"), ("KRUN_MESSAGE_LOGGING", "0")]);
        assert_eq!(
            text(reexec_env_in(&rejoined, &order, mode)),
            [
                "KRUN_RANK=3",
                "KRUN_GHOST_RESTORE=7",
                "KRUN_UNCOORDINATED=0",
                "KRUN_MESSAGE_LOGGING=0",
                "KRUN_BOOTSTRAP=127.0.0.1:4242",
                "KRUN_WIRING_EPOCH=2"
            ]
        );
        // Never switched: its variables stand.
        assert_eq!(
            text(reexec_env_in(&rejoined, &order, None))[..4],
            [
                "KRUN_RANK=3",
                "KRUN_REJOIN=1",
                "KRUN_UNCOORDINATED=1",
                "KRUN_MESSAGE_LOGGING=1"
            ]
        );
        // From the program's start: no restore at all.
        let fresh = InPlaceOrder {
            version: None,
            ..order
        };
        let out = text(reexec_env(&env, &fresh));
        assert!(!out.iter().any(|kv| kv.starts_with("KRUN_GHOST_RESTORE")));
        assert!(out.contains(&"KRUN_WIRING_EPOCH=2".to_string()));
    }
}
