//! A rank stalled past the fault timeout is not declared dead: real `dsm-node stalled`
//! processes (3 ranks). Rank 2 is SIGSTOPped (by PID) before the second barrier; node 0
//! waits there, probes rank 2 after the fault timeout (400 ms), gets no answer, and checks
//! its process: alive (stopped), so it only records it as stalled (`stalled=2`, printed by
//! rank 0). The test then SIGCONTs rank 2: it arrives, every rank is released from the
//! barrier, reads every page, and knows no dead node. Before the liveness check the probe
//! declared rank 2 dead and it was never released.
//!
//! Needs root (userfaultfd). Waits are bounded (120 s) to tell progress from a hang; the
//! test never judges time.
mod common;

use std::time::{Duration, Instant};

use common::{is_root, pairs, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

const LIMIT: Duration = Duration::from_secs(120);

/// Sends `sig` to our child `p` (by its PID).
fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on the PID of a child this test spawned and has not reaped.
    let rc = unsafe { libc::kill(p.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", p.child.id());
}

fn stalled_on(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-stalled-{}-{provider}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let go = dir.join("go");
    let server = BootstrapServer::start_with("127.0.0.1:0", 3, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let env = [
        ("KRUN_DSM_FAULT_TIMEOUT_MS", "400"),
        ("KRUN_DSM_PREFETCH", "0"),
    ];
    let extra = ["--go-file", go.to_str().unwrap()];
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| spawn(&rank_args("stalled", provider, &addr, r, 3, &extra), &env))
        .collect();
    let deadline = Instant::now() + LIMIT;
    procs[2].line_with("stall=ready", deadline, "rank 2");
    signal(&procs[2], libc::SIGSTOP);
    std::fs::write(&go, b"go").unwrap();
    procs[0].line_with("stalled=2", deadline, "rank 0");
    signal(&procs[2], libc::SIGCONT);
    for (r, p) in procs.iter_mut().enumerate() {
        let line = p.line_with("stalled_ok=1", deadline, &format!("rank {r}"));
        let kv = pairs(&line);
        assert_eq!(
            kv["dead"], "",
            "rank {r} over {provider} declared a stalled rank dead"
        );
        let (status, err) = p.wait_exit(deadline, &format!("rank {r}"));
        assert!(
            status.success(),
            "rank {r} over {provider}: {status}\n{err}"
        );
        if r == 0 {
            assert!(
                err.contains("node 2 answers no probe") && err.contains("process lives"),
                "rank 0 over {provider} never probed the stalled rank:\n{err}"
            );
        }
    }
    drop(procs);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_stopped_past_the_fault_timeout_is_released_from_the_barrier_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    stalled_on("tcp");
}

#[test]
fn a_rank_stopped_past_the_fault_timeout_is_released_from_the_barrier_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    stalled_on("shm");
}
