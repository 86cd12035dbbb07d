//! A running job switches coordinated -> uncoordinated with message logging -> coordinated
//! (`krun policy load`), on the C heat stencil under `krun --local 3 -n 6` with 2 spares.
//! Each swap happens at a consistent cut and the rank library's mode switches there
//! (`rank::uncoordinated`, `checkpoints/swap.rs`); a node killed after each swap is
//! recovered by the policy then in force: under logging only the lost ranks restart and
//! the survivors keep running (same processes), under the coordinated policy every rank
//! goes back to the swap's checkpoint. The result equals the serial reference. Needs
//! `cargo build -p rank` first (libkrun.so).

use std::path::Path;
use std::time::{Duration, Instant};

mod uncoordinated_common;
use uncoordinated_common::*;

/// The number after `from checkpoint ` in a swap's answer.
fn cut_of(answer: &str) -> u64 {
    answer
        .split("from checkpoint ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint named in {answer}"))
}

/// Waits (at most `limit`) for status rows that `ok` accepts.
fn rows_when(dir: &Path, limit: Duration, ok: impl Fn(&[Row]) -> bool) -> Vec<Row> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(r) = rows(dir) {
            if ok(&r) {
                return r;
            }
        }
        assert!(Instant::now() < deadline, "no such status within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_job_switches_to_uncoordinated_with_logging_and_back_and_each_policy_recovers_a_node_killed_after_its_swap(
) {
    let dir = temp("swap");
    let heat = build_heat(&dir.0);
    let steps = "3000";
    let want = serial(&dir.0, &["48", "40", steps]);
    // Coordinated checkpoints only on request (the swaps'); 2 spares.
    let start = policy_file(
        &dir.0,
        "start.toml",
        "policy = \"coordinated\"\nspares = 2\n",
    );
    let uncoordinated = policy_file(
        &dir.0,
        "uncoordinated.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 500\n\n[logging]\nmessages = true\n",
    );
    let back = policy_file(&dir.0, "back.toml", "policy = \"coordinated\"\n");
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "-n", "6", "--policy"])
        .arg(&start)
        // Each own image holds the rank's message-log snapshot: small for a small grid.
        .env("KRUN_LOG_REGION_BYTES", "262144")
        .arg(&heat)
        .args(["48", "40", steps, "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let run = Running::start(&dir.0, cmd);
    let before = rows_when(&dir.0, Duration::from_secs(120), |r| {
        r.len() == 6 && r.iter().all(|r| r.4 == "running" && r.2 > 0)
    });

    // Swap 1: the cut is a coordinated checkpoint, every rank's first own checkpoint.
    let (ok, answer) = policy(&dir.0, &["load", uncoordinated.to_str().unwrap()]);
    if !ok {
        let (_, _, err, _) = run.finish(Duration::from_secs(300));
        panic!("{answer}\n{err}");
    }
    assert!(
        answer.contains("policy uncoordinated")
            && answer.contains("committed for the swap")
            && answer.contains("message logging on from it"),
        "{answer}"
    );
    let cut1 = cut_of(&answer);
    let (_, shown) = policy(&dir.0, &["show"]);
    assert!(
        shown.contains(&format!("in force: uncoordinated since checkpoint {cut1}")),
        "{shown}"
    );
    // Logged traffic and own checkpoints after the cut, then node 1 (ranks 2, 3) dies.
    run.wait_line("(no barrier)", Duration::from_secs(60));
    let killed = kill_node(&dir.0, 1);
    assert_eq!(killed.len(), 2);
    let line = run.wait_line("(message logging)", Duration::from_secs(120));
    assert!(
        line.contains("rank 2 restarts on node 3")
            && line.contains("rank 3 restarts on node 3")
            && line.contains("ranks 0-1,4-5 keep running, not rolled back"),
        "{line}"
    );
    run.wait_line("recovered from the failure", Duration::from_secs(120));
    // The survivors are the same processes; the lost ranks run on the spare.
    let after = rows_when(&dir.0, Duration::from_secs(60), |r| {
        r.len() == 6
            && r.iter().all(|r| r.4 == "running")
            && r.iter().filter(|r| r.1 == 3 && r.3 == 1).count() == 2
    });
    for r in [0, 1, 4, 5] {
        let (b, a) = (&before[r], &after[r]);
        assert_eq!((a.1, a.2, a.3), (b.1, b.2, 0), "rank {r}: {b:?} -> {a:?}");
    }

    // Swap 2: back to the coordinated policy at a safepoint every rank reaches.
    let (ok, answer) = policy(&dir.0, &["load", back.to_str().unwrap()]);
    if !ok {
        let (_, _, err, _) = run.finish(Duration::from_secs(300));
        panic!("{answer}\n{err}");
    }
    assert!(
        answer.contains("policy coordinated")
            && answer.contains("committed for the swap at every rank's safepoint")
            && answer.contains("message logging stopped"),
        "{answer}"
    );
    let cut2 = cut_of(&answer);
    assert!(cut2 > cut1, "{cut1} then {cut2}");
    // Node 2 (ranks 4, 5) dies: the coordinated policy brings every rank back to cut 2.
    let killed = kill_node(&dir.0, 2);
    assert_eq!(killed.len(), 2);
    let line = run.wait_line("wiring epoch", Duration::from_secs(120));
    assert!(line.contains(&format!("checkpoint {cut2} (")), "{line}");
    run.wait_line("recovered from the failure", Duration::from_secs(120));
    let (_, shown) = policy(&dir.0, &["show"]);
    assert!(shown.contains("in force: coordinated"), "{shown}");

    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    // The decisions: the two cuts committed, own checkpoints between them, the lone
    // restarts of ranks 2-3 (incarnation 1, on node 3), then ranks 4-5 on node 4.
    let lines = decision_lines(&log);
    let committed: Vec<u64> = lines
        .iter()
        .filter(|l| l.starts_with("Committed"))
        .filter_map(|l| field(l, "version"))
        .collect();
    assert!(
        committed.contains(&cut1) && committed.contains(&cut2),
        "{committed:?}\n{log}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("RankCheckpointed")),
        "{log}"
    );
    let restarts: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l.starts_with("Restart"))
        .filter_map(|l| Some((field(l, "rank")?, field(l, "node")?)))
        .collect();
    assert!(
        restarts.contains(&(2, 3)) && restarts.contains(&(3, 3)),
        "{restarts:?}\n{log}"
    );
    assert!(
        restarts.contains(&(4, 4)) && restarts.contains(&(5, 4)),
        "{restarts:?}\n{log}"
    );
    // Ranks that were not on a killed node never restarted as new processes.
    assert!(!restarts.iter().any(|r| r.0 <= 1), "{restarts:?}\n{log}");
    assert!(!err.contains("goes back to policy"), "{err}");
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}
