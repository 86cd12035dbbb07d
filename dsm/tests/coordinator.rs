//! Node 0 dies while the DSM runs: node 0 coordinates the DSM's changes and its barrier,
//! manages a quarter of the directory and owns pages; it is SIGKILLed (by PID) while ranks
//! 1 and 2 fault pages in a loop. The next live node (rank 1) becomes the coordinator:
//! it runs node 0's failure in the five phases (the survivors' scans rebuild node 0's
//! entries, promote read copies of the pages it owned, and report the pages whose every
//! copy died, including those only node 0 knew were written, known to its deputy
//! witness), and the barrier goes on without node 0. Needs root (userfaultfd).
//!
//! Four `dsm-node coordinator-killed` processes (see the scenario's doc). Checked:
//! - every survivor passes the barriers after the kill and names rank 1 the coordinator
//!   and node 0's failure handled;
//! - the pages with a surviving copy hold node 0's values (a copy promoted somewhere),
//!   then the values rank 1 rewrote; the words ranks 1 and 2 added to across the kill
//!   count every addition;
//! - the new coordinator's lost pages equal the pages whose every copy died, and rank 3's
//!   access to one ends it with code 75 and an error naming the page (never a zero page).
//!
//! The test only bounds waits (150 s) to tell progress from a hang; it never judges time.
mod common;

use std::time::{Duration, Instant};

use common::{is_root, pairs, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

const LIMIT: Duration = Duration::from_secs(150);

fn coordinator_killed_on(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-coordinator-killed-{}-{provider}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (go, stop) = (dir.join("go"), dir.join("stop"));
    let server = BootstrapServer::start_with("127.0.0.1:0", 4, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let env = [
        ("KRUN_DSM_FAULT_TIMEOUT_MS", "1000"),
        ("KRUN_DSM_PREFETCH", "0"),
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
                &rank_args("coordinator-killed", provider, &addr, r, 4, &extra),
                &env,
            )
        })
        .collect();
    let deadline = Instant::now() + LIMIT;
    procs[0].line_with("victim=ready", deadline, "rank 0");
    procs[1].line_with("faulting=1", deadline, "rank 1");
    procs[2].line_with("faulting=1", deadline, "rank 2");
    procs[0].child.kill().unwrap();
    assert!(!procs[0].child.wait().unwrap().success());
    std::fs::write(&go, b"go").unwrap();
    let mut survivors = Vec::new();
    for (r, p) in procs.iter_mut().enumerate().skip(1) {
        let line = p.line_with("survivor=ok", deadline, &format!("rank {r}"));
        eprintln!("rank {r} over {provider}: {line}");
        survivors.push(pairs(&line));
    }
    for (k, s) in survivors.iter().enumerate() {
        let r = k + 1;
        assert_eq!(
            s["failures"], "0",
            "rank {r} over {provider}: node 0's failure was not handled"
        );
        assert_eq!(
            s["coordinator"], "1",
            "rank {r} over {provider}: rank 1 should coordinate after node 0"
        );
    }
    let promoted: u64 = survivors
        .iter()
        .map(|s| s["promoted"].parse::<u64>().unwrap())
        .sum();
    assert!(promoted > 0, "over {provider}: no read copy was promoted");
    let lost_line = procs[1].line_with("expected_lost=", deadline, "rank 1");
    let lost = pairs(&lost_line);
    eprintln!("over {provider}: {lost_line}");
    assert_eq!(
        lost["lost"], lost["expected_lost"],
        "over {provider}: the new coordinator's lost pages differ from those whose every \
         copy died"
    );
    assert_ne!(lost["lost"], "-", "over {provider}: no page reported lost");
    // Rank 3 reads a lost page (one only node 0 managed and wrote): a clear error naming
    // it, exit code 75.
    let access = procs[3].line_with("lost_access=", deadline, "rank 3");
    let page = pairs(&access)["lost_access"].clone();
    assert!(
        lost["lost"].split(',').any(|p| p == page),
        "rank 3 reads page {page}, which is not among the lost {}",
        lost["lost"]
    );
    let (status, err) = procs[3].wait_exit(deadline, "rank 3");
    assert_eq!(
        status.code(),
        Some(dsm::fault::EXIT_PAGE_UNREACHABLE),
        "rank 3 over {provider}: {status}\n{err}"
    );
    assert!(
        err.contains(&format!("page {page} (region at")) && err.contains("is lost"),
        "rank 3 over {provider}: the error must name page {page} as lost:\n{err}"
    );
    assert!(err.contains("not zero-filled"), "{err}");
    std::fs::write(&stop, b"stop").unwrap();
    for r in [1usize, 2] {
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
fn a_sigkilled_node_0_is_replaced_by_the_next_coordinator_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    coordinator_killed_on("tcp");
}

#[test]
fn a_sigkilled_node_0_is_replaced_by_the_next_coordinator_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    coordinator_killed_on("shm");
}
