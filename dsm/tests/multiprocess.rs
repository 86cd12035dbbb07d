//! Multi-process DSM tests: a bootstrap server in the test and several `dsm-node` processes
//! on 127.0.0.1 sharing regions through userfaultfd faults and the fabric (tcp and shm
//! providers). Needs root (userfaultfd).
mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{is_root, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

/// Generous bound for a scenario ("does not hang"), never a performance check.
const LIMIT: Duration = Duration::from_secs(120);

/// Lines of each rank's stderr in a failure report (all of them under `KRUN_DSM_TRACE`).
fn report_lines(n: usize) -> usize {
    if std::env::var_os("KRUN_DSM_TRACE").is_some() {
        usize::MAX
    } else {
        n
    }
}

/// Runs `scenario` on `size` ranks; returns each rank's `krun-result` pairs.
fn run(
    scenario: &str,
    provider: &str,
    size: usize,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Vec<HashMap<String, String>> {
    let server = BootstrapServer::start_with("127.0.0.1:0", size, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let mut procs: Vec<Proc> = (0..size)
        .map(|r| spawn(&rank_args(scenario, provider, &addr, r, size, extra), env))
        .collect();
    let start = Instant::now();
    let mut results = Vec::new();
    for r in 0..size {
        loop {
            // A rank that failed (or was killed) is reported at once, whichever it is: the
            // others then wait for it in a collective and would only be seen to hang.
            let r = procs.iter_mut().position(|q| q.failed()).unwrap_or(r);
            let p = &mut procs[r];
            if let Some(status) = p.child.try_wait().unwrap() {
                if !status.success() {
                    let out = p.rest_of_stdout().join("\n");
                    // Let the others finish or fail too, then report every rank.
                    std::thread::sleep(Duration::from_millis(300));
                    let mut report = String::new();
                    for (k, q) in procs.iter_mut().enumerate() {
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while q.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        report +=
                            &format!("--- rank {k}:\n{}\n", q.kill_and_tail(report_lines(60)));
                    }
                    panic!("rank {r} of {scenario} over {provider} failed ({status}):\n{out}\n{report}");
                }
                results.push(p.results(&format!("rank {r}")));
                break;
            }
            if start.elapsed() > LIMIT {
                let mut all = String::new();
                for (k, q) in procs.iter_mut().enumerate() {
                    if std::env::var_os("KRUN_DSM_GDB").is_some() {
                        let out = Command::new("gdb")
                            .args([
                                "-p",
                                &q.child.id().to_string(),
                                "-batch",
                                "-ex",
                                "thread apply all bt 12",
                            ])
                            .output();
                        if let Ok(o) = out {
                            all += &String::from_utf8_lossy(&o.stdout);
                        }
                    }
                    all += &format!("--- rank {k}:\n{}\n", q.kill_and_tail(report_lines(120)));
                }
                panic!("{scenario} over {provider} hangs\n{all}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(procs);
    server.join().unwrap();
    results
}

fn share_on(provider: &str) {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let results = run(
        "share",
        provider,
        3,
        &["--pages", "8", "--rounds", "9"],
        &[],
    );
    let regions: Vec<&String> = results.iter().map(|r| &r["region"]).collect();
    assert!(
        regions.iter().all(|r| *r == regions[0]),
        "addresses {regions:?}"
    );
    for (r, kv) in results.iter().enumerate() {
        assert_eq!(kv.get("share").map(String::as_str), Some("ok"), "rank {r}");
        let invalidations: u64 = kv["invalidations"].parse().unwrap();
        let faults: u64 = kv["faults"].parse().unwrap();
        assert!(faults > 0, "rank {r} never faulted");
        let _ = invalidations;
    }
    let invalidations: u64 = results
        .iter()
        .map(|kv| kv["invalidations"].parse::<u64>().unwrap())
        .sum();
    assert!(invalidations > 0, "ownership never moved away from readers");
}

/// Three processes share a region: each writes its part and reads the others' after a
/// barrier; ownership of shared pages moves round-robin; a counter under the DSM lock and
/// false sharing within one page; checked byte by byte.
#[test]
fn three_processes_share_a_region_over_tcp() {
    share_on("tcp");
}

#[test]
fn three_processes_share_a_region_over_shm() {
    share_on("shm");
}

/// Rank 1's reads of pages rank 0 published (after rank 2's reads made rank 0 a read owner
/// and rank 0's writes left rank 1 a hint) go one-sided: a fetch-and-add on the share word
/// and an RMA read posted together, no message to the owner; a sequential scan prefetches.
#[test]
fn hinted_readers_fetch_pages_one_sided_and_scans_prefetch() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let results = run("latency", "tcp", 3, &["--pages", "64"], &[]);
    let one_sided: u64 = results[1]["one_sided"].parse().unwrap();
    assert_eq!(one_sided, 64, "every hinted read should be one-sided");
    // The pages were published before the reads: every join's speculative read is the
    // current copy (one round trip), none is read again.
    assert_eq!(results[1]["speculative"], "64", "{:?}", results[1]);
    assert_eq!(results[1]["fallbacks"], "0", "{:?}", results[1]);
    let prefetched: u64 = results[1]["scan_prefetched"].parse().unwrap();
    let faults: u64 = results[1]["scan_faults"].parse().unwrap();
    assert!(prefetched > 0, "a sequential scan prefetched nothing");
    assert!(faults < 128, "{faults} faults for 128 pages with prefetch");
}

/// Rank 0 reads pages rank 1 wrote; rank 1 publishes each page it served only after its
/// grant went out, and here every publication waits 400 ms, so the ranks reach the free
/// while rank 1 still publishes. The free waits for the driver: rank 1 does not read its
/// unmapped pages (it died of SIGSEGV before), and a region allocated next works.
#[test]
fn freeing_a_region_while_its_pages_are_still_being_published_is_safe() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    for provider in ["tcp", "shm"] {
        let results = run(
            "serve-then-free",
            provider,
            2,
            &["--pages", "3"],
            &[
                ("KRUN_DSM_PUBLISH_DELAY_MS", "400"),
                ("KRUN_DSM_PREFETCH", "0"),
            ],
        );
        for (r, kv) in results.iter().enumerate() {
            assert_eq!(
                kv.get("serve_then_free").map(String::as_str),
                Some("ok"),
                "rank {r} over {provider}"
            );
        }
    }
}

fn mgs_with(locator: &str) {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    // KRUN_DSM_MGS_ROWS / _COLS / _NODES size a measurement run (defaults: a quick check).
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let (rows, cols) = (
        var("KRUN_DSM_MGS_ROWS", "512"),
        var("KRUN_DSM_MGS_COLS", "24"),
    );
    let nodes: usize = var("KRUN_DSM_MGS_NODES", "3").parse().unwrap();
    let results = run(
        "mgs",
        "tcp",
        nodes,
        &["--rows", &rows, "--cols", &cols],
        &[("KRUN_DSM_LOCATOR", locator)],
    );
    for (r, kv) in results.iter().enumerate() {
        let ortho: f64 = kv["orthogonality"].parse().unwrap();
        assert!(ortho < 1e-10, "rank {r}: ||Q^T Q - I|| = {ortho}");
        let faults: u64 = kv["page_faults"].parse().unwrap();
        assert!(faults > 0, "rank {r} computed without sharing anything");
    }
}

/// MGS on the DSM (3 ranks, columns cyclic) gives the serial MGS's Q, with the static
/// `page % N` directory and with the cell-tree locator.
#[test]
fn mgs_on_the_dsm_matches_a_serial_mgs_with_the_static_locator() {
    mgs_with("static");
}

#[test]
fn mgs_on_the_dsm_matches_a_serial_mgs_with_the_cell_tree_locator() {
    mgs_with("dynamic");
}

/// Several fault threads serve faults at once: four reader threads of rank 1 fault on four
/// hinted pages together, and every fault thread posting one-sided operations waits (test
/// injection `KRUN_DSM_FAULT_RENDEZVOUS=4`, bounded at 10 s) until four are inside them:
/// with 4 fault threads, four faults are in flight at once; with 1, never more than one.
#[test]
fn four_fault_threads_serve_four_faults_at_once_and_one_thread_serves_one() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let four = run(
        "threads",
        "tcp",
        3,
        &["--pages", "1", "--app-threads", "4"],
        &[
            ("KRUN_DSM_FAULT_THREADS", "4"),
            ("KRUN_DSM_FAULT_RENDEZVOUS", "4"),
            ("KRUN_DSM_PREFETCH", "0"),
        ],
    );
    assert_eq!(four[1].get("threads").map(String::as_str), Some("ok"));
    assert_eq!(
        four[1]["max_concurrent_remote"], "4",
        "4 fault threads should have served the 4 faults at once"
    );
    let one = run(
        "threads",
        "tcp",
        3,
        &["--pages", "2", "--app-threads", "4"],
        &[("KRUN_DSM_FAULT_THREADS", "1"), ("KRUN_DSM_PREFETCH", "0")],
    );
    assert_eq!(one[1].get("threads").map(String::as_str), Some("ok"));
    assert_eq!(one[1]["max_concurrent_remote"], "1");
}
