//! The uncoordinated policy with real processes in local mode: the C heat stencil under
//! `krun --local 3 --spares 1 --policy FILE` with `policy = "uncoordinated"`: each rank
//! checkpoints on its own (no barrier); with message logging a node killed mid-run costs only
//! its own ranks, which restart alone on the spare and rejoin the running ranks, and the
//! result equals the serial reference. Needs `cargo build -p rank` first (libkrun.so).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod uncoordinated_common;
use uncoordinated_common::*;

/// The heat stencil under `krun --local 3 --spares 1 -n 6 --policy FILE`.
fn heat_job(dir: &Path, heat: &Path, policy: &Path, inject: &[&str], steps: &str) -> Command {
    let mut cmd = krun(dir);
    cmd.args(["--local", "3", "--spares", "1", "-n", "6", "--policy"])
        .arg(policy)
        // Each image holds the rank's message-log snapshot region: small for a small grid.
        .env("KRUN_LOG_REGION_BYTES", "262144");
    for i in inject {
        cmd.args(["--inject-failure", i]);
    }
    cmd.arg(heat)
        .args(["48", "40", steps, "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    cmd
}

#[test]
fn with_message_logging_only_the_killed_nodes_ranks_restart_the_survivors_keep_running_and_the_result_is_the_serial_one(
) {
    let dir = temp("logging");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "2000"]);
    let policy = policy_file(
        &dir.0,
        "uncoordinated.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 2000\n\n[logging]\nmessages = true\n",
    );
    // Node 1 (ranks 2 and 3) dies 1 s after every rank made 2 of its own checkpoints safe:
    // right at that moment the last rank to checkpoint has delivered nothing since, and the
    // next checkpoints are 2 s apart, so by the kill each of node 1's ranks has delivered the
    // halos of about 50 steps since its newest checkpoint (unless that one came in the last
    // step before the kill, one chance in about 40 for each rank). 2000 steps of 20 ms leave
    // the job running well after the recovery, even under load (with 1000 steps a loaded
    // run ended before the test could read the restarted ranks in `krun status`).
    let run = Running::start(
        &dir.0,
        heat_job(&dir.0, &heat, &policy, &["node=1@2ckpt+1s"], "2000"),
    );
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
    let line = run.wait_line("(message logging)", Duration::from_secs(120));
    assert!(
        line.contains("rank 2 restarts on node 3")
            && line.contains("rank 3 restarts on node 3")
            && line.contains("ranks 0-1,4-5 keep running, not rolled back")
            && line.contains("rollback depth 0"),
        "{line}"
    );
    run.wait_line("recovered from the failure", Duration::from_secs(120));
    // While the job runs on: the survivors are the same processes, never restarted (same
    // pid, incarnation 0); the lost ranks run on the spare as incarnation 1.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        if let Some(r) = rows(&dir.0) {
            let done = r.len() == 6
                && r.iter().all(|r| r.4 == "running")
                && r.iter().filter(|r| r.1 == 3 && r.3 == 1).count() == 2;
            if done {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the table never showed the restarted ranks: {:?}",
            rows(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in [0usize, 1, 4, 5] {
        assert_eq!(
            (after[r].1, after[r].2, after[r].3),
            (before[r].1, before[r].2, 0),
            "rank {r} must keep its node, pid and incarnation: before {before:?}, after {after:?}"
        );
    }
    for r in [2usize, 3] {
        assert_eq!((after[r].1, after[r].3), (3, 1), "{after:?}");
        assert_ne!(after[r].2, before[r].2, "{after:?}");
    }
    let (ok, out, err, log) = run.finish(Duration::from_secs(240));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let lines = decision_lines(&log);
    // Own checkpoints, no global one; the recovery line names the lost ranks only.
    assert!(
        lines.iter().any(|l| l.starts_with("RankCheckpointed {")),
        "{log}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("Committed {")), "{log}");
    let recovery: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("RecoveryLine {"))
        .collect();
    assert_eq!(recovery.len(), 1, "{log}");
    assert!(
        recovery[0].contains("line: [(2, Some(") && recovery[0].contains("), (3, Some("),
        "{}",
        recovery[0]
    );
    assert!(recovery[0].contains("depth: 0"), "{}", recovery[0]);
    let restarted: Vec<u64> = lines
        .iter()
        .filter(|l| l.starts_with("Restart {"))
        .map(|l| field(l, "rank").unwrap())
        .collect();
    assert_eq!(restarted, vec![2, 3], "{log}");
    // Only the lost ranks restored an image; the survivors never did.
    for r in [2, 3] {
        assert!(
            out.contains(&format!("heat: rank {r} restored version ")),
            "rank {r}: {out}"
        );
    }
    for r in [0, 1, 4, 5] {
        assert!(
            !out.contains(&format!("heat: rank {r} restored")),
            "rank {r} was rolled back: {out}"
        );
    }
    assert!(
        err.contains("rank 2 restarts alone on node 3") && err.contains("no other rank rolls back"),
        "{err}"
    );
    // Each restarted rank read its determinants back from its buddy and replayed them: the
    // failure came about 50 steps after the ranks' newest checkpoints, so they had delivered
    // messages since (both of node 1's ranks checkpointing in the very step before the kill
    // would leave nothing to replay: about one chance in 1,600).
    let mut replayed = Vec::new();
    for r in [2, 3] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("krun: rank {r} rejoined the running ranks")))
            .unwrap_or_else(|| panic!("rank {r} never rejoined: {err}"));
        let n: u64 = line
            .split("): ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        replayed.push(n);
    }
    assert!(replayed.iter().any(|&n| n > 0), "{replayed:?}\n{err}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// A node killed before its ranks took their first own checkpoint (the interval is a
/// minute): its ranks restart alone on the spare from their start, not from an image; they
/// ask the survivors where the logging started, replay every delivery since, and the result
/// is the serial one. (Before, such a failure ended the job: "no own checkpoint yet".)
#[test]
fn with_message_logging_a_rank_lost_before_its_first_checkpoint_rejoins_from_its_start() {
    let dir = temp("fromstart");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "500"]);
    let policy = policy_file(
        &dir.0,
        "uncoordinated.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 60000\n\n[logging]\nmessages = true\n",
    );
    let run = Running::start(&dir.0, heat_job(&dir.0, &heat, &policy, &[], "500"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(r) = rows(&dir.0) {
            if r.len() == 6 && r.iter().all(|r| r.4 == "running" && r.2 > 0) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Tens of steps of halos delivered by every rank before the kill: 1 s after every rank
    // is past its krun_init (the policy says when; "running" in the table comes at the
    // rank's spawn: under load, ci55 at ~50, 1 s after it the ranks were still swapping
    // their first addresses, and a kill then re-wires every rank, not this test's subject:
    // `with_message_logging_a_node_killed_while_the_ranks_swap_...`).
    run.wait_line("the job's wiring finished", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    let killed = kill_node(&dir.0, 1);
    assert_eq!(killed.len(), 2, "{killed:?}");
    let line = run.wait_line("(message logging)", Duration::from_secs(120));
    assert!(
        line.contains("rank 2 restarts on node 3 from the start")
            && line.contains("rank 3 restarts on node 3 from the start")
            && line.contains("ranks 0-1,4-5 keep running, not rolled back"),
        "{line}"
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(
        !decision_lines(&log)
            .iter()
            .any(|l| l.starts_with("RankCheckpointed {")),
        "a checkpoint was taken before the kill: the test lost its subject\n{log}"
    );
    let mut replayed = 0;
    for r in [2, 3] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("krun: rank {r} rejoined the running ranks")))
            .unwrap_or_else(|| panic!("rank {r} never rejoined: {err}"));
        assert!(line.contains("from its start"), "{line}");
        replayed += line
            .split("): ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            !out.contains(&format!("heat: rank {r} restored")),
            "rank {r} restored an image: {out}"
        );
    }
    assert!(replayed > 0, "nothing replayed: {err}");
    for r in [0, 1, 4, 5] {
        assert!(
            !out.contains(&format!("heat: rank {r} restored")),
            "rank {r} was rolled back: {out}"
        );
    }
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// A message-log snapshot larger than the region may grow to (here a 4 KiB region capped at
/// 4 KiB, while the heat stencil's halos keep several KiB in flight between checkpoints)
/// skips that rank's checkpoint with a line saying why, instead of ending the program; the
/// job ends with the serial result.
#[test]
fn a_log_snapshot_too_large_for_its_capped_region_skips_the_checkpoint_and_the_job_goes_on() {
    let dir = temp("logfull");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "200"]);
    let policy = policy_file(
        &dir.0,
        "uncoordinated.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 300\n\n[logging]\nmessages = true\n",
    );
    let mut job = heat_job(&dir.0, &heat, &policy, &[], "200");
    job.env("KRUN_LOG_REGION_BYTES", "4096")
        .env("KRUN_LOG_REGION_MAX_BYTES", "4096");
    let run = Running::start(&dir.0, job);
    let skipped = run.wait_line(
        "skipped: the message log's snapshot",
        Duration::from_secs(180),
    );
    assert!(
        skipped.contains("KRUN_LOG_REGION_MAX_BYTES=4096"),
        "{skipped}"
    );
    let (ok, out, err, _) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
}

/// Each rank's `RankCheckpointed` decisions so far.
fn checkpoints_per_rank(log: &str, ranks: usize) -> Vec<usize> {
    let mut n = vec![0; ranks];
    for l in decision_lines(log)
        .iter()
        .filter(|l| l.starts_with("RankCheckpointed {"))
    {
        if let Some(r) = field(l, "rank").filter(|&r| (r as usize) < ranks) {
            n[r as usize] += 1;
        }
    }
    n
}

/// The heat stencil with 48 KiB halos (6144 columns) at `bench policies`' 2 s interval logs
/// far more between two checkpoints than the message-log region's first 1 MiB (the default, and the whole region
/// before it could grow, when a full region skipped the rank's checkpoint and the skips
/// spread to every rank): the region grows, every rank keeps checkpointing, and a node
/// killed after that still costs only its own ranks, which rejoin; the result is the serial
/// one.
#[test]
fn a_message_log_outgrowing_its_first_region_grows_it_every_rank_keeps_checkpointing_and_a_killed_nodes_ranks_recover(
) {
    let dir = temp("loggrow");
    let heat = build_heat(&dir.0);
    let args = ["48", "6144", "1500"];
    let want = serial(&dir.0, &args);
    let policy = policy_file(
        &dir.0,
        "uncoordinated.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 2000\n\n[logging]\nmessages = true\n",
    );
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "--spares", "1", "-n", "6", "--policy"])
        .arg(&policy)
        .env_remove("KRUN_LOG_REGION_BYTES")
        .env_remove("KRUN_LOG_REGION_MAX_BYTES")
        // The images hold several MiB of log each: the harness's 16 MiB store arena would
        // keep them from ever being safe (no acknowledgement, so the logs grow on: seen).
        .env("KRUN_STORE_ARENA_MIB", "256")
        .arg(&heat)
        .args(args)
        .arg("0")
        .env("HEAT_STEP_DELAY_US", "20000");
    let run = Running::start(&dir.0, cmd);
    let grown = run.wait_line("the message-log region grows to", Duration::from_secs(180));
    let bytes: u64 = grown
        .split("grows to ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{grown}"));
    assert!(bytes > 1 << 20, "{grown}");
    // Every rank's checkpoints go on after the growth (each at least 3 more).
    let at_growth = checkpoints_per_rank(&run.decisions(), 6);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = checkpoints_per_rank(&run.decisions(), 6);
        if now.iter().zip(&at_growth).all(|(n, g)| *n >= g + 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every rank kept checkpointing after the growth: {at_growth:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let killed = kill_node(&dir.0, 1);
    assert_eq!(killed.len(), 2, "{killed:?}");
    let line = run.wait_line("(message logging)", Duration::from_secs(120));
    // Only node 1's ranks restart; each from its newest checkpoint that is safe, which may
    // be one before its newest when the kill lands while that one is being flushed (seen in
    // the CI: "from its checkpoint 3 (past 1 of its checkpoints) ... rollback depth 1"); the
    // survivors never roll back either way.
    assert!(
        line.contains("rank 2 restarts on node 3")
            && line.contains("rank 3 restarts on node 3")
            && line.contains("ranks 0-1,4-5 keep running, not rolled back"),
        "{line}"
    );
    let (ok, out, err, _) = run.finish(Duration::from_secs(400));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(!err.contains("skipped: the message log"), "{err}");
    for r in [2, 3] {
        assert!(
            err.contains(&format!("krun: rank {r} rejoined the running ranks")),
            "rank {r} never rejoined: {err}"
        );
    }
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// `krun node drain 3` under the uncoordinated policy with message logging: node 3's ranks
/// (6, 7) each take a fresh own checkpoint, then restart alone on the spare from it and
/// rejoin; the other ranks keep their processes and never stop. The job ends with the
/// serial result.
#[test]
fn with_message_logging_a_drained_nodes_ranks_move_alone_to_the_spare_and_the_others_keep_running()
{
    let dir = temp("drain");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "1500"]);
    let policy = policy_file(
        &dir.0,
        "uncoordinated.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 500\n\n[logging]\nmessages = true\n",
    );
    // Nodes 0-2 are supervisors (never drained): 4 nodes, node 3 drained.
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "4", "--spares", "1", "-n", "8", "--policy"])
        .arg(&policy)
        .env("KRUN_LOG_REGION_BYTES", "262144")
        .arg(&heat)
        .args(["48", "40", "1500", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let run = Running::start(&dir.0, cmd);
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        if let Some(r) = rows(&dir.0) {
            if r.len() == 8 && r.iter().all(|r| r.4 == "running" && r.2 > 0) {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    run.wait_line("(no barrier)", Duration::from_secs(60));
    let o = krun(&dir.0).args(["node", "drain", "3"]).output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{said}");
    assert!(
        said.contains("node 3 left the job (2 rank(s) moved)"),
        "{said}"
    );
    let line = run.wait_line("node 3 drained:", Duration::from_secs(30));
    assert!(
        line.contains("ranks 6-7 moved to spare node 4 from checkpoint"),
        "{line}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        if let Some(r) = rows(&dir.0) {
            if r.len() == 8
                && r.iter().all(|r| r.4 == "running")
                && r.iter().filter(|r| r.1 == 4 && r.3 == 1).count() == 2
            {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the table never showed the moved ranks: {:?}",
            rows(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in 0..6usize {
        assert_eq!(
            (after[r].1, after[r].2, after[r].3),
            (before[r].1, before[r].2, 0),
            "rank {r} must keep its node, pid and incarnation: {before:?} -> {after:?}"
        );
    }
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let lines = decision_lines(&log);
    assert!(
        lines.iter().any(|l| l == "DrainStarted { node: 3 }"),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("Drained { node: 3")),
        "{log}"
    );
    let restarted: Vec<u64> = lines
        .iter()
        .filter(|l| l.starts_with("Restart {"))
        .map(|l| field(l, "rank").unwrap())
        .collect();
    assert_eq!(restarted, vec![6, 7], "{log}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// A node killed while the ranks swap their first addresses, with message logging: no rank
/// has logged or checkpointed anything yet, so the survivors cannot keep running (they never
/// finished their `krun_init`) and the lost ranks have nobody to rejoin. The policy, which
/// hears each rank's readiness, restarts every rank from its start in a new wiring epoch
/// (as the coordinated policy does); the result is the serial one. (Before, the lost ranks
/// restarted alone to rejoin ranks still stuck in the broken exchange: "krun_init failed".)
#[test]
fn with_message_logging_a_node_killed_while_the_ranks_swap_their_first_addresses_restarts_every_rank_from_the_start(
) {
    let (_, err, _) = killed_while_the_ranks_swap_their_first_addresses(
        "firstexchange",
        "policy = \"uncoordinated\"\ninterval_ms = 1000\n\n[logging]\nmessages = true\n",
    );
    assert!(err.contains("(message logging) before"), "{err}");
}
