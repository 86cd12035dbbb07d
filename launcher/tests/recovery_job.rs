//! Spares, injected failures and recovery, with real processes in local mode: the C heat
//! stencil under `krun --local 3 --spares 1` and the coordinated checkpoint policy. (Lost
//! buddy pairs and parity: `recovery_pairs.rs`.)
use std::process::Stdio;
use std::time::{Duration, Instant};

mod recovery_common;
use recovery_common::*;

#[test]
fn a_spare_joins_the_membership_runs_no_rank_and_the_job_ends_with_the_serial_checksum() {
    let dir = temp("spare");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "300"]);
    let mut job = Job(krun(&dir.0)
        .args(["--local", "3", "--spares", "1", "-n", "6"])
        .args(["--checkpoint-interval", "0.5"])
        .arg(&heat)
        .args(["48", "40", "300", "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let mut out = job.0.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    // While it runs: 4 members, every rank on nodes 0-2, none on the spare (node 3).
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        if let Some(s) = status(&dir.0) {
            let ranks = s["status"]["ranks"].as_array().cloned().unwrap_or_default();
            if ranks.len() == 6 && ranks.iter().all(|r| r["state"] == "running") {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    let members: Vec<u64> = seen["status"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_u64())
        .collect();
    assert_eq!(members, vec![0, 1, 2, 3], "{seen}");
    let nodes: Vec<u64> = seen["status"]["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["node"].as_u64())
        .collect();
    assert_eq!(nodes, vec![0, 0, 1, 1, 2, 2], "{seen}");
    // The job ends by itself (the spare is stopped once the ranks are done).
    let deadline = Instant::now() + Duration::from_secs(240);
    let code = loop {
        if let Some(c) = job.0.try_wait().unwrap() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the job with a spare never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = stdout.join().unwrap();
    assert!(code.success(), "{code:?}\n{out}");
    assert_eq!(checksum(&out), Some(want), "{out}");
}

#[test]
fn an_injected_failure_without_a_spare_kills_that_node_and_its_ranks_and_ends_the_job_naming_them()
{
    let dir = temp("inject");
    let heat = build_heat(&dir.0);
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "-n", "6", "--checkpoint-interval", "0.5"])
        .args(["--inject-failure", "node=1@2ckpt"])
        .arg(&heat)
        .args(["48", "40", "100000", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let o = run_bounded(cmd, Duration::from_secs(240));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("checkpoint 2 committed"), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("injected failure: SIGKILL to node 1 (krund pid "))
        .unwrap_or_else(|| panic!("no injection line in {err}"));
    // The ranks it named (node 1 runs ranks 2 and 3) are gone, and so is every other rank.
    let pids: Vec<u32> = line
        .split('[')
        .nth(1)
        .and_then(|t| t.split(']').next())
        .unwrap()
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{line}");
    // The policy says what is lost and why.
    assert!(
        err.contains(
            "no node can host ranks 2-3 after the loss of node(s) 1: no spare node is left"
        ),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new(), "{err}");
}

#[test]
fn a_node_killed_after_five_commits_restarts_its_ranks_on_the_spare_the_survivors_roll_back_in_their_own_processes_and_the_job_ends_with_the_serial_checksum(
) {
    let dir = temp("recover");
    let heat = build_heat(&dir.0);
    // 1000 steps (20 s of compute): five commits fit even when checkpoints take seconds
    // under load (a CI run had one commit in 400 steps, at 17 s each, and the job ended).
    let want = serial(&dir.0, &["48", "40", "1000"]);
    let run = Running::start(
        &dir.0,
        heat_job(&dir.0, &heat, 1, &["node=1@5ckpt"], "1000"),
    );
    // Every rank's pid before the failure (the table shows all six running; the node dies
    // after five commits, seconds later).
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        if let Some(r) = rows(&dir.0) {
            if r.len() == 6 && r.iter().all(|r| r.4 == "running" && r.2 > 0) {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    run.wait_line(
        "injected failure: SIGKILL to node 1",
        Duration::from_secs(240),
    );
    run.wait_line("recovered from the failure", Duration::from_secs(240));
    let log = decisions(&dir.0).expect("decisions.log in the job directory");
    for want in [
        "RecoveryStarted",
        "Restart { rank: 2, incarnation: 1, node: 3",
        "Restart { rank: 3, incarnation: 1, node: 3",
        "Recovered",
    ] {
        assert!(log.contains(want), "{want} not in {log}");
    }
    assert_eq!(restarts_once_per_failure(&log).len(), 2, "{log}");
    // The survivors are the same processes (pids), rolled back in place: a new image (its
    // environment names the recovery's wiring epoch) and a new incarnation in the table;
    // the lost ranks run on the spare as new processes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        if let Some(r) = rows(&dir.0) {
            let done = r.len() == 6
                && r.iter().all(|r| r.4 == "running" && r.3 == 1)
                && r.iter().filter(|r| r.1 == 3).count() == 2;
            if done {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the table never showed the recovered ranks: {:?}",
            rows(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in [0usize, 1, 4, 5] {
        assert_eq!(
            (after[r].1, after[r].2),
            (before[r].1, before[r].2),
            "rank {r} must keep its node and pid: before {before:?}, after {after:?}"
        );
        assert_eq!(
            proc_env(after[r].2, "KRUN_WIRING_EPOCH").as_deref(),
            Some("1"),
            "rank {r} (pid {}) runs the re-executed image",
            after[r].2
        );
    }
    for r in [2usize, 3] {
        assert_eq!(after[r].1, 3, "{after:?}");
        assert_ne!(after[r].2, before[r].2, "{after:?}");
    }
    // The policy's decisions are in the process table, and `krun status` shows them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let decided = status(&dir.0).is_some_and(|s| {
            (0..6).all(|r| {
                let d = s["status"]["ranks"][r]["decision"].as_str().unwrap_or("");
                if r == 2 || r == 3 {
                    d.contains("restart on node 3 from checkpoint 5 as incarnation 1")
                } else {
                    d.contains("roll back in place to checkpoint 5")
                }
            })
        });
        if decided {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no decisions in the table: {:?}",
            status(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = krun(&dir.0).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("rank 2 decision ") && text.contains("restart on node 3"),
        "{text}"
    );
    let (ok, out, err, _) = run.finish(Duration::from_secs(240));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(err.contains("krun: node 1 failed at epoch"), "{err}");
    assert!(
        err.contains("ranks 2-3 restart on spare node 3 from checkpoint 5")
            && err.contains("ranks 0-1,4-5 roll back to checkpoint 5"),
        "{err}"
    );
    assert!(
        err.contains("ranks 0-1,4-5 roll back inside their live processes"),
        "{err}"
    );
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert!(
        err.contains("rank 2 runs on node 3") && err.contains("came from the checkpoint store"),
        "{err}"
    );
    // Every rank restored the recovery line's image (the lost ones from the store's bytes:
    // the incremental chain).
    for r in 0..6 {
        assert!(
            out.contains(&format!("heat: rank {r} restored version 5 ")),
            "rank {r}: {out}"
        );
    }
    let summary = err
        .lines()
        .find(|l| l.contains(" held in them"))
        .unwrap_or_else(|| panic!("no summary in {err}"));
    assert!(
        summary.contains("1 node failure, 1 recovery: 2 ranks restarted, 4 rolled back"),
        "{summary}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn a_node_killed_during_a_checkpoint_aborts_it_everywhere_and_the_job_recovers_from_the_previous_commit(
) {
    let dir = temp("duringckpt");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    let run = Running::start(
        &dir.0,
        heat_job(&dir.0, &heat, 1, &["node=1@ckpt3:capture"], "400"),
    );
    run.wait_line(
        "injected failure at the capture of checkpoint attempt 3: SIGKILL to node 1",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let lines = decision_lines(&log);
    // The checkpoint being captured is aborted, and the recovery goes back to the commit
    // before it.
    let (at, aborted) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.starts_with("Aborted {") && l.contains("failed while it was taken"))
        .unwrap_or_else(|| panic!("no checkpoint aborted by the failure in {log}"));
    let aborted = field(aborted, "version").unwrap();
    let line = committed_before(&lines, at).expect("a commit before the failure");
    assert!(line < aborted, "{log}");
    assert!(
        !lines[..at]
            .iter()
            .any(|l| l.starts_with("Committed {") && field(l, "version") == Some(aborted)),
        "{log}"
    );
    let recovery = lines
        .iter()
        .find(|l| l.starts_with("RecoveryStarted"))
        .unwrap_or_else(|| panic!("no recovery in {log}"));
    assert_eq!(field(recovery, "version"), Some(line), "{log}");
    assert!(
        err.contains(&format!(
            "ranks 2-3 restart on spare node 3 from checkpoint {line}"
        )),
        "{err}"
    );
    assert_eq!(restarts_once_per_failure(&log).len(), 2, "{log}");
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn the_spare_killed_while_it_restores_the_lost_ranks_is_replaced_by_the_next_spare() {
    let dir = temp("duringrestart");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    // Node 1 dies after 3 commits; spare node 3, ordered to restore its ranks, dies as soon
    // as the order went out.
    let run = Running::start(
        &dir.0,
        heat_job(
            &dir.0,
            &heat,
            2,
            &["node=1@3ckpt", "node=3@recovery1"],
            "400",
        ),
    );
    run.wait_line(
        "injected failure at recovery 1: SIGKILL to node 3",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let restarts = restarts_once_per_failure(&log);
    for rank in [2, 3] {
        let nodes: Vec<u64> = restarts
            .iter()
            .filter(|r| r.0 == rank)
            .map(|r| r.2)
            .collect();
        assert_eq!(nodes, vec![3, 4], "rank {rank}: {log}");
    }
    // The survivors rolled back once, in place, and were not rolled back again.
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert!(err.contains("2 node failures"), "{err}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn two_failures_in_a_row_use_two_spares_and_the_job_ends_with_the_serial_checksum() {
    let dir = temp("tworow");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "600"]);
    let run = Running::start(
        &dir.0,
        heat_job(&dir.0, &heat, 2, &["node=1@3ckpt", "node=2@7ckpt"], "600"),
    );
    run.wait_line(
        "injected failure: SIGKILL to node 2",
        Duration::from_secs(300),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let restarts = restarts_once_per_failure(&log);
    let placed: Vec<(u64, u64)> = restarts.iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(placed, vec![(2, 3), (3, 3), (4, 4), (5, 4)], "{log}");
    assert_eq!(log.matches("Recovered").count(), 2, "two recoveries: {log}");
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert!(
        err.contains("2 node failures, 2 recoveries: 4 ranks restarted"),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn losing_the_node_of_rank_0_and_a_supervisor_restarts_its_ranks_on_the_spare() {
    let dir = temp("node0");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    let run = Running::start(&dir.0, heat_job(&dir.0, &heat, 1, &["node=0@3ckpt"], "400"));
    run.wait_line(
        "injected failure: SIGKILL to node 0",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    // Rank 0 (it prints the checksum) ran on the spare at the end.
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(err.contains("ranks 0-1 restart on spare node 3"), "{err}");
    assert_eq!(restarts_once_per_failure(&log).len(), 2, "{log}");
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn a_node_killed_before_the_first_checkpoint_restarts_every_rank_from_the_start_with_its_ranks_on_the_spare(
) {
    let dir = temp("fromstart");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "200"]);
    let mut cmd = krun(&dir.0);
    // Checkpoints on request only: none is taken before the failure.
    cmd.args(["--local", "3", "--spares", "1", "-n", "6"])
        .args(["--inject-failure", "node=2@2s"])
        .arg(&heat)
        .args(["48", "40", "200", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let (out, err) = ended_with_checksum(run_bounded(cmd, Duration::from_secs(240)), &want);
    assert!(
        err.contains("ranks 4-5 restart on spare node 3 from the start"),
        "{err}"
    );
    assert!(
        err.contains("1 node failure, 1 recovery: 6 ranks restarted, 0 rolled back"),
        "{err}"
    );
    assert!(!out.contains("restored version"), "{out}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// A node killed while the ranks swap their first addresses (forced: ranks 4-5, on node 2,
/// wait 8 s in the exchange with `KRUN_TEST_INIT_PAUSE`; node 2 is SIGKILLed 2 s after every
/// node is up). The exchange breaks under ranks 0-3 before any recovery: each holds
/// the error and takes the recovery's order in its own process instead of ending (before,
/// a rank that ended after its watcher took the order left the new epoch waiting for it for
/// ever). The nodes' stores do not depend on the dead node's start-up either: checkpoints
/// are committed after the recovery.
#[test]
fn a_node_killed_while_the_ranks_swap_their_first_addresses_leaves_no_rank_behind_and_the_store_up()
{
    let dir = temp("firstexchange");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "200"]);
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "--spares", "1", "-n", "6"])
        .args(["--checkpoint-interval", "1"])
        .args(["--inject-failure", "node=2@2s"])
        .arg(&heat)
        .args(["48", "40", "200", "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .env("KRUN_TEST_INIT_PAUSE", "4,5:8000");
    let (_, err) = ended_with_checksum(run_bounded(cmd, Duration::from_secs(240)), &want);
    // The forced path: the exchange broke under a waiting rank before its order came.
    assert!(
        err.contains("the address exchange broke")
            && err.contains("waiting for the recovery's order"),
        "{err}"
    );
    assert!(!err.contains("krun_init failed"), "{err}");
    assert!(!err.contains("no checkpoint store"), "{err}");
    assert!(err.contains("1 node failure, 1 recovery"), "{err}");
    let recovered = err
        .find("krun: recovered from the failure")
        .unwrap_or_else(|| panic!("no recovery line: {err}"));
    assert!(
        err[recovered..].contains(" committed: 6 ranks"),
        "no checkpoint committed after the recovery: {err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}
