//! A node dies while the DSM runs: the node that manages a quarter of the directory and
//! owns pages is SIGKILLed (by PID) while the others keep faulting. Node 0 runs the failure
//! in the five phases; the survivors' scans rebuild the dead manager's entries, promote
//! read copies of the pages it owned, and report the pages whose every copy died. Needs
//! root (userfaultfd).
//!
//! Four `dsm-node manager-killed` processes (see the scenario's doc). The test forces:
//! - the kill lands while ranks 0 and 1 fault (they printed `faulting=1`, and they loop
//!   until the go file exists, which the test creates only after the kill);
//! - a request in flight to the dead manager: `KRUN_DSM_FAIL_HOLD` holds node 0's failure
//!   change until rank 2 has sent its read of pages only rank 3 managed (`asked=1`), so
//!   that request went to the dead node and must be asked again of the new manager
//!   (rank 2's `resent` > 0, and it read the values rank 1 wrote);
//! - copies promoted (`promoted` > 0 somewhere) and read back, then rewritten;
//! - the lost pages reported: node 0's list equals the pages whose every copy died, and
//!   rank 2's access to one ends it with code 75 and an error naming the page (never a
//!   zero page).
//!
//! The test only bounds waits (150 s) to tell progress from a hang; it never judges time.
mod common;

use std::time::{Duration, Instant};

use common::{is_root, pairs, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

const LIMIT: Duration = Duration::from_secs(150);

fn manager_killed_on(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-manager-killed-{}-{provider}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (go, stop, hold) = (dir.join("go"), dir.join("stop"), dir.join("hold"));
    let server = BootstrapServer::start_with("127.0.0.1:0", 4, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let env = [
        ("KRUN_DSM_FAULT_TIMEOUT_MS", "1000"),
        ("KRUN_DSM_PREFETCH", "0"),
        ("KRUN_DSM_FAIL_HOLD", hold.to_str().unwrap()),
    ];
    let extra = [
        "--rounds",
        "20",
        "--go-file",
        go.to_str().unwrap(),
        "--stop-file",
        stop.to_str().unwrap(),
    ];
    let mut procs: Vec<Proc> = (0..4)
        .map(|r| {
            spawn(
                &rank_args("manager-killed", provider, &addr, r, 4, &extra),
                &env,
            )
        })
        .collect();
    let deadline = Instant::now() + LIMIT;
    procs[3].line_with("victim=ready", deadline, "rank 3");
    procs[0].line_with("faulting=1", deadline, "rank 0");
    procs[1].line_with("faulting=1", deadline, "rank 1");
    procs[3].child.kill().unwrap();
    assert!(!procs[3].child.wait().unwrap().success());
    std::fs::write(&go, b"go").unwrap();
    procs[2].line_with("asked=1", deadline, "rank 2");
    std::fs::write(&hold, b"go").unwrap();
    let mut survivors = Vec::new();
    for (r, p) in procs.iter_mut().take(3).enumerate() {
        let line = p.line_with("survivor=ok", deadline, &format!("rank {r}"));
        eprintln!("rank {r} over {provider}: {line}");
        survivors.push(pairs(&line));
    }
    let lost_line = procs[0].line_with("expected_lost=", deadline, "rank 0");
    let lost = pairs(&lost_line);
    eprintln!("over {provider}: {lost_line}");
    assert_eq!(
        lost["lost"], lost["expected_lost"],
        "over {provider}: node 0's lost pages differ from those whose every copy died"
    );
    assert_ne!(lost["lost"], "-", "over {provider}: no page reported lost");
    for (r, s) in survivors.iter().enumerate() {
        assert_eq!(
            s["failures"], "3",
            "rank {r} over {provider}: rank 3's failure was not handled"
        );
    }
    let resent: u64 = survivors[2]["resent"].parse().unwrap();
    assert!(
        resent > 0,
        "over {provider}: rank 2's request to the dead manager was not asked again"
    );
    let promoted: u64 = survivors
        .iter()
        .map(|s| s["promoted"].parse::<u64>().unwrap())
        .sum();
    assert!(promoted > 0, "over {provider}: no read copy was promoted");
    // Rank 2 reads a lost page: a clear error naming it, exit code 75.
    let access = procs[2].line_with("lost_access=", deadline, "rank 2");
    let page = pairs(&access)["lost_access"].clone();
    assert!(
        lost["lost"].split(',').any(|p| p == page),
        "rank 2 reads page {page}, which is not among the lost {}",
        lost["lost"]
    );
    let (status, err) = procs[2].wait_exit(deadline, "rank 2");
    assert_eq!(
        status.code(),
        Some(dsm::fault::EXIT_PAGE_UNREACHABLE),
        "rank 2 over {provider}: {status}\n{err}"
    );
    assert!(
        err.contains(&format!("page {page} (region at")) && err.contains("is lost"),
        "rank 2 over {provider}: the error must name page {page} as lost:\n{err}"
    );
    assert!(err.contains("not zero-filled"), "{err}");
    std::fs::write(&stop, b"stop").unwrap();
    for r in [0usize, 1] {
        let (status, err) = procs[r].wait_exit(deadline, &format!("rank {r}"));
        assert!(
            status.success(),
            "rank {r} over {provider}: {status}\n{err}"
        );
    }
    drop(procs);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_sigkilled_manager_and_owner_is_rebuilt_from_copies_and_lost_pages_are_reported_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    manager_killed_on("tcp");
}

#[test]
fn a_sigkilled_manager_and_owner_is_rebuilt_from_copies_and_lost_pages_are_reported_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    manager_killed_on("shm");
}
