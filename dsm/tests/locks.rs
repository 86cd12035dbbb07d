//! A DSM lock whose holder dies is released by the holder's failure: real `dsm-node
//! lock-holder-killed` processes (3 ranks). Rank 1 takes lock 0 and writes the counter it
//! protects; rank 2 queues for the lock (rank 0's table shows it waiting: `queued=2`); then
//! rank 1 is SIGKILLed (by PID). Rank 0's lock server probes the overdue holder, finds its
//! process gone, and runs its failure; once the change committed, lock 0 goes to rank 2 with
//! a grant naming rank 1 (the data may be half-updated).
//! - With a surviving copy of the counter (rank 0 read it): rank 2 reads rank 1's value
//!   (the promoted copy), adds 1 and unlocks; rank 0 reads the sum under the lock, and the
//!   survivors end normally.
//! - Without one: rank 2's read of the counter ends it with code 75 and an error naming the
//!   page as lost (never a zero), and node 0 reports the page lost.
//!
//! Needs root (userfaultfd). The test bounds waits (150 s) to tell progress from a hang; it
//! never judges time.
mod common;

use std::time::{Duration, Instant};

use common::{is_root, pairs, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

const LIMIT: Duration = Duration::from_secs(150);

fn holder_killed(provider: &str, keep_copy: bool) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-lock-holder-{}-{provider}-{keep_copy}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stop = dir.join("stop");
    let server = BootstrapServer::start_with("127.0.0.1:0", 3, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let env = [
        ("KRUN_DSM_FAULT_TIMEOUT_MS", "1000"),
        ("KRUN_DSM_PREFETCH", "0"),
    ];
    let extra = [
        "--keep-copy",
        if keep_copy { "1" } else { "0" },
        "--stop-file",
        stop.to_str().unwrap(),
    ];
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| {
            spawn(
                &rank_args("lock-holder-killed", provider, &addr, r, 3, &extra),
                &env,
            )
        })
        .collect();
    let deadline = Instant::now() + LIMIT;
    procs[1].line_with("holding=1", deadline, "rank 1");
    procs[2].line_with("waiting=1", deadline, "rank 2");
    procs[0].line_with("queued=2", deadline, "rank 0");
    procs[1].child.kill().unwrap();
    assert!(!procs[1].child.wait().unwrap().success());
    let what = format!("over {provider} (keep_copy {keep_copy})");
    if keep_copy {
        let got = pairs(&procs[2].line_with("inherited=", deadline, "rank 2"));
        assert_eq!(got["inherited"], "1", "{what}: the grant must name rank 1");
        assert_eq!(
            got["counter"], "7",
            "{what}: rank 2 must read rank 1's value"
        );
        let end = pairs(&procs[0].line_with("survivor=ok", deadline, "rank 0"));
        assert_eq!(end["counter"], "8", "{what}: rank 2's increment was lost");
        assert_eq!(end["dead"], "[1]", "{what}");
        for r in [0usize, 2] {
            let (status, err) = procs[r].wait_exit(deadline, &format!("rank {r}"));
            assert!(status.success(), "rank {r} {what}: {status}\n{err}");
            if r == 2 {
                assert!(
                    err.contains("granted after rank 1, which held it, died"),
                    "rank 2 {what} was not warned:\n{err}"
                );
            }
        }
    } else {
        let lost = pairs(&procs[0].line_with("lost=", deadline, "rank 0"));
        let (status, err) = procs[2].wait_exit(deadline, "rank 2");
        assert_eq!(
            status.code(),
            Some(dsm::fault::EXIT_PAGE_UNREACHABLE),
            "rank 2 {what}: {status}\n{err}"
        );
        assert!(
            err.contains("granted after rank 1, which held it, died"),
            "rank 2 {what} got the lock without being told its holder died:\n{err}"
        );
        let page = lost["lost"].split(',').next().unwrap().to_string();
        assert!(
            err.contains(&format!("page {page} (region at")) && err.contains("is lost"),
            "rank 2 {what}: the error must name page {page} as lost:\n{err}"
        );
        assert!(err.contains("not zero-filled"), "{err}");
        std::fs::write(&stop, b"stop").unwrap();
        let (status, err) = procs[0].wait_exit(deadline, "rank 0");
        assert!(status.success(), "rank 0 {what}: {status}\n{err}");
    }
    drop(procs);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lock_whose_holder_is_sigkilled_goes_to_its_waiter_with_the_data_promoted_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    holder_killed("tcp", true);
}

#[test]
fn a_lock_whose_holder_is_sigkilled_goes_to_its_waiter_with_the_data_promoted_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    holder_killed("shm", true);
}

#[test]
fn a_lock_whose_holder_is_sigkilled_with_the_only_copy_reports_the_data_lost_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    holder_killed("tcp", false);
}
