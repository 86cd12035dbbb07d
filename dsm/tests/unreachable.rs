//! The fault timeout: a rank waiting for a page whose only copy died with its owner gets a
//! clear error (naming the page, its region and the dead node) and ends with
//! `EXIT_PAGE_UNREACHABLE`, instead of hanging or reading zeros. Needs root (userfaultfd).
//!
//! Three `dsm-node unreachable` processes: rank 1 writes pages 0 and 1 and is SIGKILLed
//! (by PID) once it says so; then rank 0 reads page 1 (whose manager was rank 1) and rank 2
//! reads page 0 (whose manager, rank 0, forwards to rank 1). The fault
//! timeout is 400 ms. Node 0 lives, so rank 1's failure is handled: its entries are rebuilt
//! from the survivors (who hold no copy), page 1 is known written through node 0's witness
//! record, and both pages are reported lost ([`dsm::DsmError::PageLost`]). The test only
//! bounds the wait (120 s) to tell an error from a hang, it never judges the time taken.
//!
//! The other side: a rank that held only read copies is SIGKILLed and the job goes on
//! (`reader_killed_on`): its copies are dropped, never waited for, and nothing is lost.
mod common;

use std::time::{Duration, Instant};

use common::{is_root, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

const LIMIT: Duration = Duration::from_secs(120);

fn unreachable_on(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-unreachable-{}-{provider}",
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
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| {
            let args: Vec<String> = [
                "unreachable",
                "--provider",
                provider,
                "--bootstrap",
                &addr,
                "--rank",
                &r.to_string(),
                "--size",
                "3",
                "--go-file",
                go.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            spawn(&args, &env)
        })
        .collect();
    // Rank 1 owns pages 0 and 1 now; it is SIGKILLed by its PID.
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match procs[1]
            .lines
            .recv_timeout(left.max(Duration::from_millis(1)))
        {
            Ok(l) if l.contains("owner=ready") => break,
            Ok(_) => {}
            Err(_) => panic!("rank 1 never became the owner over {provider}"),
        }
    }
    procs[1].child.kill().unwrap();
    let killed = procs[1].child.wait().unwrap();
    assert!(!killed.success());
    std::fs::write(&go, b"go").unwrap();
    for r in [0usize, 2] {
        let p = &mut procs[r];
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "rank {r} over {provider} hangs on a page whose owner died"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = p.err.take().unwrap().join().unwrap();
        eprintln!("rank {r} over {provider}: {status}: {}", err.trim());
        assert_eq!(
            status.code(),
            Some(dsm::fault::EXIT_PAGE_UNREACHABLE),
            "rank {r} over {provider}: {status}\n{err}"
        );
        let page = if r == 0 { 1 } else { 0 };
        assert!(
            err.contains(&format!("page {page} (region at")),
            "rank {r} over {provider}: the error must name page {page}:\n{err}"
        );
        // Node 0 lives: rank 1's failure is handled, its entries rebuilt, and the pages
        // found lost (their only copy died with it). Rank 0 may end before rank 2 asks it:
        // node 1 must be among the dead.
        assert!(
            err.contains(&format!("page {page} (region at")) && err.contains("is lost"),
            "rank {r} over {provider}: page {page} must be reported lost:\n{err}"
        );
        let dead = err
            .split("died with nodes [")
            .nth(1)
            .and_then(|t| t.split_once(']'))
            .map(|(list, _)| {
                list.split(", ")
                    .map(|n| n.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_else(|| panic!("rank {r} over {provider}: no dead nodes named:\n{err}"));
        assert!(
            dead.iter().any(|n| n == "1"),
            "rank {r} over {provider}: node 1 must be named dead: {dead:?}\n{err}"
        );
        assert!(
            err.contains("not zero-filled"),
            "rank {r} over {provider}: {err}"
        );
    }
    drop(procs);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_reading_a_page_whose_owner_was_sigkilled_gets_an_error_naming_it_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    unreachable_on("tcp");
}

#[test]
fn a_rank_reading_a_page_whose_owner_was_sigkilled_gets_an_error_naming_it_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    unreachable_on("shm");
}

/// A node holding only read copies is SIGKILLed: the job goes on. Rank 0 wrote pages that
/// ranks 1 and 2 read (rank 0 is their read owner, rank 2 in every copyset); rank 2 is
/// killed by its PID; rank 1 then rewrites every page, each write waiting until rank 0
/// drops the dead reader's copy (found by a probe after the 1 s fault timeout, announced
/// to the other nodes), and rank 0 reads back every word rank 1 wrote. The pages are
/// managed by ranks 0 and 1 (a dead manager's entries are not rebuilt yet). The test only
/// bounds the wait (120 s) to tell progress from a hang.
fn reader_killed_on(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-reader-killed-{}-{provider}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (go, stop) = (dir.join("go"), dir.join("stop"));
    let server = BootstrapServer::start_with("127.0.0.1:0", 3, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let env = [("KRUN_DSM_FAULT_TIMEOUT_MS", "1000")];
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| {
            let args: Vec<String> = [
                "reader-killed",
                "--provider",
                provider,
                "--bootstrap",
                &addr,
                "--rank",
                &r.to_string(),
                "--size",
                "3",
                "--pages",
                "6",
                "--go-file",
                go.to_str().unwrap(),
                "--stop-file",
                stop.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            spawn(&args, &env)
        })
        .collect();
    let deadline = Instant::now() + LIMIT;
    procs[2].line_with("reader=ready", deadline, "rank 2");
    procs[2].child.kill().unwrap();
    assert!(!procs[2].child.wait().unwrap().success());
    std::fs::write(&go, b"go").unwrap();
    let writer = procs[1].line_with("writer=ok", deadline, "rank 1 (writer)");
    let checker = procs[0].line_with("checker=ok", deadline, "rank 0 (checker)");
    eprintln!("over {provider}: {writer} / {checker}");
    std::fs::write(&stop, b"stop").unwrap();
    for (r, line) in [(0usize, &checker), (1, &writer)] {
        assert!(
            line.contains(" dead=2 "),
            "rank {r} over {provider} must know rank 2 died: {line}"
        );
        let p = &mut procs[r];
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "rank {r} over {provider} hangs");
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = p.err.take().unwrap().join().unwrap();
        // The survivors end with two DSM barriers without the dead rank: a failed barrier
        // is exit code 1.
        assert!(
            status.success(),
            "rank {r} over {provider}: {status}\n{err}"
        );
    }
    let dropped: u64 = checker
        .split("dead_copies_dropped=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("dead_copies_dropped");
    assert!(
        dropped > 0,
        "rank 0 (the owner) dropped no copy of the dead reader: {checker}"
    );
    drop(procs);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reader_only_rank_sigkilled_does_not_stop_the_writes_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    reader_killed_on("tcp");
}

#[test]
fn a_reader_only_rank_sigkilled_does_not_stop_the_writes_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    reader_killed_on("shm");
}
