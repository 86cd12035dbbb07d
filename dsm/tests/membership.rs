//! A node joins, and a node leaves, a running DSM while the others fault: real `dsm-node`
//! processes on 127.0.0.1 (tcp and shm providers), counters incremented under the DSM lock
//! on 8 pages and read without it. Needs root (userfaultfd).
//!
//! `KRUN_DSM_MIGRATION_HOLD` makes node 0 switch to the next view first and wait until it
//! forwarded or held a manager request before the others switch, so requests do reach
//! entries in transit; the tests check that each was handled (held = released), that every
//! counter equals the iterations of every rank (no increment lost, none doubled), and that
//! entries did move.
mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{is_root, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

/// Generous bound for a scenario ("does not hang"), never a performance check.
const LIMIT: Duration = Duration::from_secs(150);
const PAGES: usize = 8;
const ENV: [(&str, &str); 1] = [("KRUN_DSM_MIGRATION_HOLD", "1")];

/// Runs `size` ranks of `churn` (with `extra` arguments) and, with `joiner`, one `joiner`
/// process; returns each process's `krun-result` pairs (later keys win), ranks first.
fn run(provider: &str, size: usize, extra: &[&str], joiner: bool) -> Vec<HashMap<String, String>> {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-membership-{}-{provider}-{}{}",
        std::process::id(),
        joiner,
        extra.join("")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let contact: PathBuf = dir.join("contact");
    let _ = std::fs::remove_file(&contact);
    let server = BootstrapServer::start_with("127.0.0.1:0", size, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let common = |scenario: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            scenario,
            "--provider",
            provider,
            "--contact-file",
            contact.to_str().unwrap(),
            "--pages",
            &PAGES.to_string(),
            "--rounds",
            "30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut procs: Vec<(String, Proc)> = (0..size)
        .map(|r| {
            let mut args = common("churn");
            args.extend(
                [
                    "--bootstrap",
                    &addr,
                    "--rank",
                    &r.to_string(),
                    "--size",
                    &size.to_string(),
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            (format!("rank {r}"), spawn(&args, &ENV))
        })
        .collect();
    if joiner {
        procs.push(("joiner".into(), spawn(&common("joiner"), &ENV)));
    }
    let start = Instant::now();
    loop {
        let failed = procs.iter_mut().position(|(_, q)| q.failed());
        let done = procs
            .iter_mut()
            .all(|(_, q)| matches!(q.child.try_wait(), Ok(Some(_))));
        if failed.is_some() || !done && start.elapsed() > LIMIT {
            let f = failed.unwrap_or(0);
            std::thread::sleep(Duration::from_millis(500));
            let mut report = String::new();
            for (name, q) in procs.iter_mut() {
                let err = q.kill_and_tail(200);
                let out = q.rest_of_stdout().join("\n");
                report += &format!("--- {name}:\n{out}\n{err}\n");
            }
            panic!(
                "{} over {provider} {}:\n{report}",
                procs[f].0,
                if failed.is_some() { "failed" } else { "hangs" }
            );
        }
        if done {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let results = procs.iter_mut().map(|(name, q)| q.results(name)).collect();
    drop(procs);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    results
}

fn num(kv: &HashMap<String, String>, key: &str) -> u64 {
    kv.get(key)
        .unwrap_or_else(|| panic!("no {key} in {kv:?}"))
        .parse()
        .unwrap()
}

/// Every counter is the sum of every rank's iterations (and the joiner's locked ones);
/// every held request was handled; some requests did meet entries in transit.
fn check_counters_and_requests(results: &[HashMap<String, String>], ranks: usize) {
    let iterations: u64 = results[..ranks]
        .iter()
        .map(|r| num(r, "iterations"))
        .sum::<u64>()
        + results[ranks..]
            .iter()
            .filter(|r| r.contains_key("joiner_iterations"))
            .map(|r| num(r, "joiner_iterations"))
            .sum::<u64>();
    let counters: Vec<u64> = results[0]["counters"]
        .split(',')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(counters.len(), PAGES);
    for (p, &c) in counters.iter().enumerate() {
        assert_eq!(
            c, iterations,
            "counter {p}: {c}, the ranks did {iterations} increments"
        );
    }
    let mut moved = 0;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            num(r, "delayed"),
            num(r, "released"),
            "process {i}: requests held for entries in transit were not all handled"
        );
        moved += num(r, "forwarded") + num(r, "delayed");
    }
    assert!(
        moved > 0,
        "no request met an entry in transit (the migration window saw no traffic)"
    );
}

fn join_on(provider: &str) {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let results = run(provider, 3, &[], true);
    check_counters_and_requests(&results, 3);
    let joiner = &results[3];
    assert_eq!(num(joiner, "joined"), 3);
    assert_eq!(num(joiner, "epoch"), 1);
    assert_eq!(num(joiner, "dismissed"), 1);
    assert!(
        num(joiner, "entries_received") > 0,
        "no directory entry migrated to the new node: {joiner:?}"
    );
    assert_eq!(results[0]["members"], "0,1,2,3");
    for r in &results[..3] {
        assert_eq!(num(r, "epoch"), 1);
    }
}

fn leave_on(provider: &str) {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let results = run(provider, 3, &["--leave", "2"], false);
    check_counters_and_requests(&results, 3);
    assert_eq!(num(&results[2], "left"), 1);
    assert!(
        num(&results[2], "entries_sent") > 0,
        "the leaving node handed over no directory entry: {:?}",
        results[2]
    );
    assert_eq!(results[0]["members"], "0,1");
}

#[test]
fn a_node_joins_while_three_ranks_fault_over_tcp() {
    join_on("tcp");
}

#[test]
fn a_node_joins_while_three_ranks_fault_over_shm() {
    join_on("shm");
}

/// A node that joined takes the DSM lock like the job's ranks: it adds 1 to every counter
/// under lock 0 twenty times while the ranks do the same, and no increment is lost or
/// doubled (the counters equal the ranks' iterations plus the joiner's twenty).
#[test]
fn a_joined_node_takes_the_dsm_lock_with_the_ranks_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let results = run("tcp", 3, &["--joiner-locks", "20"], true);
    assert_eq!(num(&results[3], "joiner_iterations"), 20);
    check_counters_and_requests(&results, 3);
}

#[test]
fn a_rank_leaves_while_the_others_fault_over_tcp() {
    leave_on("tcp");
}

#[test]
fn a_rank_leaves_while_the_others_fault_over_shm() {
    leave_on("shm");
}
