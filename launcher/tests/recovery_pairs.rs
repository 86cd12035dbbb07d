//! Lost buddy pairs with real processes in local mode: the C heat stencil on 4 nodes of one
//! rank each plus 2 spares under the coordinated policy, with L3 parity on (the default for
//! 4 rank nodes). A node and its buddy killed at once: the rank that lost both its copies
//! is restored from parity, and the policy plans it from L3 by name; after the recovery the
//! stores re-form buddies and parity sets, so a second pair lost later (the spares that took
//! the first pair's ranks over; 5 nodes plus 2 spares there, so that the membership keeps
//! its supervisors' quorum) is rebuilt from parity again.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod recovery_common;
use recovery_common::*;

#[test]
fn losing_a_buddy_pair_at_once_restores_the_lost_rank_from_l3_parity_on_a_spare() {
    let dir = temp("pair");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "500"]);
    let run = Running::start(&dir.0, buddy_pair_job(&dir.0, &heat, "500"));
    run.wait_line(
        "injected failure at the barrier of checkpoint attempt 4: SIGKILL to node",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    // Both nodes were killed, and their ranks restarted on the two spares.
    assert!(err.contains("SIGKILL to node 0"), "{err}");
    assert!(err.contains("SIGKILL to node 1"), "{err}");
    // Each rank's last restart (the two failures may be agreed one after the other: a
    // restart planned from a copy on the second node is planned again).
    let restarts = restarts_once_per_failure(&log);
    let last: std::collections::BTreeMap<u64, u64> = restarts.iter().map(|r| (r.0, r.2)).collect();
    let placed: Vec<(u64, u64)> = last.into_iter().collect();
    assert_eq!(placed.len(), 2, "{log}");
    assert_eq!((placed[0].0, placed[1].0), (0, 1), "{log}");
    assert!(placed.iter().all(|p| p.1 >= 4), "on the spares: {log}");
    // The policy knew it: its last plan for rank 0 names L3 and the parity holder (one of
    // the surviving rank nodes 2-3), its plan for rank 1 the L2 copy on node 2.
    let r0_plan = planned_source(&err, 0).unwrap_or_else(|| panic!("no plan for rank 0:\n{err}"));
    assert!(
        r0_plan.starts_with("L3 from node 2") || r0_plan.starts_with("L3 from node 3"),
        "{r0_plan}\n{err}"
    );
    let r1_plan = planned_source(&err, 1).unwrap_or_else(|| panic!("no plan for rank 1:\n{err}"));
    assert!(r1_plan.starts_with("L2 from node 2"), "{r1_plan}\n{err}");
    // Rank 0's image was in node 0's memory (L1) and node 1's (L2): it came from parity;
    // rank 1's L2 copy was on node 2.
    let r0 = fetched_line(&err, 0).unwrap_or_else(|| panic!("no fetch of rank 0:\n{err}"));
    assert!(
        r0.contains("from L3") && r0.contains("rebuilt from parity"),
        "{r0}"
    );
    let r1 = fetched_line(&err, 1).unwrap_or_else(|| panic!("no fetch of rank 1:\n{err}"));
    assert!(r1.contains("from L2 on node 2"), "{r1}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn losing_a_buddy_pair_without_parity_or_disk_ends_the_job_naming_the_lost_rank_and_checkpoint() {
    let dir = temp("pairlost");
    let heat = build_heat(&dir.0);
    let mut cmd = buddy_pair_job(&dir.0, &heat, "500");
    cmd.env("KRUN_STORE_PARITY", "off");
    let o = run_bounded(cmd, Duration::from_secs(300));
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(checksum(&out).is_none(), "{out}\n{err}");
    let why = err
        .lines()
        .find(|l| l.contains("krun: the job cannot continue"))
        .unwrap_or_else(|| panic!("no reason given:\n{err}"));
    // Rank 0 is named, and that no copy of its image survives at any level.
    assert!(why.contains("rank 0"), "{why}");
    assert!(
        why.contains("not held at any level")
            || why.contains("no valid copy")
            || why.contains("nothing can restore"),
        "{why}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// `krun --local 5 --spares 2 -n 5` (parity sets {0, 1} and {2, 3, 4}, buddies 0 -> 1 -> 2
/// -> 3 -> 4 -> 5 -> 6 -> 0; supervisors 0-2 and the spares 5-6) with checkpoints every
/// 0.5 s, restarts on a spare while one is left, then on the least-loaded survivors.
/// First the pair of nodes 3 and 4 (no supervisor) at the 4th checkpoint's barrier: their
/// ranks restart on the spares 5 and 6. Then, at the 10th, the pair of those two spares:
/// with the placement of the start they are in no parity set and node 5's copies sit on
/// node 6 (its buddy), so the rank on node 5 can only come back if the stores re-formed
/// their sets among the nodes left. (Two supervisors lost of five: the membership still
/// agrees the failures.)
fn two_pairs_job(dir: &Path, heat: &Path, steps: &str) -> Command {
    let policy = dir.join("shrink.toml");
    std::fs::write(
        &policy,
        "policy = \"coordinated\"\ninterval_ms = 500\nrestart = \"shrink\"\n",
    )
    .unwrap();
    let mut cmd = krun(dir);
    cmd.args(["--local", "5", "--spares", "2", "-n", "5"])
        .args(["--checkpoint-interval", "0.5", "--policy"])
        .arg(&policy);
    for inject in [
        "node=3@ckpt4:barrier",
        "node=4@ckpt4:barrier",
        "node=5@ckpt10:barrier",
        "node=6@ckpt10:barrier",
    ] {
        cmd.args(["--inject-failure", inject]);
    }
    cmd.arg(heat)
        .args(["48", "40", steps, "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .env_remove("KRUN_STORE_PARITY");
    cmd
}

#[test]
fn a_second_buddy_pair_lost_after_a_recovery_is_rebuilt_from_the_re_formed_parity_sets() {
    let dir = temp("twopairs");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "1200"]);
    let run = Running::start(&dir.0, two_pairs_job(&dir.0, &heat, "1200"));
    run.wait_line(
        "injected failure at the barrier of checkpoint attempt 10: SIGKILL to node",
        Duration::from_secs(400),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(400));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    for node in [3, 4, 5, 6] {
        assert!(err.contains(&format!("SIGKILL to node {node}")), "{err}");
    }
    assert_eq!(log.matches("Recovered").count(), 2, "two recoveries: {log}");
    // After the first recovery the stores re-formed their placement among the nodes left,
    // each spare in a parity set.
    for node in [0, 1, 2, 5, 6] {
        assert!(
            err.lines().any(|l| l.contains(&format!(
                "krun-store: node {node}: buddies and parity sets re-formed"
            )) && !l.contains("parity set none")),
            "node {node} re-formed no parity set:\n{err}"
        );
    }
    // The first pair's ranks (3 and 4) went to the spares, the second pair's (the same
    // ranks) to the survivors 0-2 (each rank's last restart of each pair counts: two nodes
    // killed at once may be agreed one after the other, and a restart planned from a copy
    // on the second is planned again).
    let restarts = restarts_once_per_failure(&log);
    let first: std::collections::BTreeMap<u64, u64> = restarts
        .iter()
        .filter(|r| r.2 >= 5)
        .map(|r| (r.0, r.2))
        .collect();
    let second: std::collections::BTreeMap<u64, u64> = restarts
        .iter()
        .filter(|r| r.2 <= 2)
        .map(|r| (r.0, r.2))
        .collect();
    assert_eq!(
        first.keys().copied().collect::<Vec<_>>(),
        vec![3, 4],
        "{log}"
    );
    assert_eq!(
        second.keys().copied().collect::<Vec<_>>(),
        vec![3, 4],
        "{log}"
    );
    // The rank the first recovery put on node 5 lost its L1 (node 5) and its L2 (node 6,
    // node 5's buddy) in the second: planned from L3 at a node of the other set (0 or 1),
    // and rebuilt from parity by the node that restarted it.
    let on_5 = first
        .iter()
        .find(|(_, &node)| node == 5)
        .map(|(&rank, _)| rank as u32)
        .unwrap_or_else(|| panic!("no rank restarted on node 5: {log}"));
    let plan = planned_source(&err, on_5).unwrap_or_else(|| panic!("no plan:\n{err}"));
    assert!(
        plan.starts_with("L3 from node 0") || plan.starts_with("L3 from node 1"),
        "rank {on_5}: {plan}\n{err}"
    );
    let fetched = fetched_lines(&err, on_5);
    let last = fetched.last().unwrap_or_else(|| panic!("no fetch:\n{err}"));
    assert!(
        last.contains("from L3") && last.contains("rebuilt from parity"),
        "{last}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// `krun --local 4 --spares 2 -n 4` (supervisors 0-2 and the spares 4-5): first the pair
/// 2+3 (a supervisor among them) at the 4th checkpoint's barrier, whose ranks restart on
/// the spares; then, at the 10th, the pair of spares 4+5 that took them over. Without a
/// change of the Raft group the second pair took a third supervisor of five and its
/// failures were never agreed (the job hung); the group's leader now removes the failed
/// supervisor and keeps an odd group (3 of the 4 members left), so one of the second pair
/// at most is a supervisor and the job ends with the serial result on nodes 0-1.
#[test]
fn four_nodes_and_two_spares_lose_a_second_pair_and_still_end_with_the_serial_result() {
    let dir = temp("fourtwo");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "1200"]);
    let policy = dir.0.join("shrink.toml");
    std::fs::write(
        &policy,
        "policy = \"coordinated\"\ninterval_ms = 500\nrestart = \"shrink\"\n",
    )
    .unwrap();
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "4", "--spares", "2", "-n", "4"])
        .args(["--checkpoint-interval", "0.5", "--policy"])
        .arg(&policy);
    for inject in [
        "node=2@ckpt4:barrier",
        "node=3@ckpt4:barrier",
        "node=4@ckpt10:barrier",
        "node=5@ckpt10:barrier",
    ] {
        cmd.args(["--inject-failure", inject]);
    }
    cmd.arg(&heat)
        .args(["48", "40", "1200", "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .env("KRUN_RUNTIME_VERBOSE", "1")
        .env_remove("KRUN_STORE_PARITY");
    let run = Running::start(&dir.0, cmd);
    run.wait_line(
        "injected failure at the barrier of checkpoint attempt 10: SIGKILL to node",
        Duration::from_secs(400),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(400));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    for node in [2, 3, 4, 5] {
        assert!(err.contains(&format!("SIGKILL to node {node}")), "{err}");
        assert!(
            err.contains(&format!("krun: node {node} failed at epoch")),
            "node {node}'s failure was not agreed:\n{err}"
        );
    }
    assert_eq!(log.matches("Recovered").count(), 2, "two recoveries: {log}");
    // The Raft group changed: the failed supervisor 2 left it.
    assert!(
        err.contains("node 2 leaves the supervisors"),
        "no change of the supervisors:\n{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}
