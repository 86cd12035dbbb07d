//! The uncoordinated policy WITHOUT message logging, with real processes in local mode: the
//! C heat stencil under `krun --local 3 --spares 1 --policy FILE` with `policy =
//! "uncoordinated"` and `[logging] messages = false`. Each rank checkpoints on its own and
//! reports its channel counts with each checkpoint; when a node is SIGKILLed the policy
//! computes the transitless recovery line (no orphan, nothing in transit) and krund rolls
//! back exactly the ranks it names to the versions it names: the running ones in place, the
//! lost ones on the spare, in one wiring epoch. The result equals the serial reference.
//! Needs `cargo build -p rank` first (libkrun.so).
//!
//! The harness helpers are shared with `uncoordinated_job.rs` (`uncoordinated_common/`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod uncoordinated_common;
use uncoordinated_common::*;

/// The heat stencil under `krun --local 3 --spares 1 -n 6 --policy FILE`.
fn heat_job(dir: &Path, heat: &Path, policy: &Path, inject: &[&str], steps: &str) -> Command {
    let mut cmd = krun(dir);
    cmd.args(["--local", "3", "--spares", "1", "-n", "6", "--policy"])
        .arg(policy);
    for i in inject {
        cmd.args(["--inject-failure", i]);
    }
    cmd.arg(heat)
        .args(["48", "40", steps, "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    cmd
}

/// One rank's place in krun's recovery-line notice: (rank, restored version or None for
/// the start, restarted on a node (Some) or rolled back in place, checkpoints rolled past).
type Place = (u64, Option<u64>, Option<u64>, u64);

/// Parses krun's "krun: node(s) .. failed at epoch E (no message logging): rank R rolls back
/// to its checkpoint V (past K of its checkpoints); rank S restarts on node N from the start;
/// ..; rollback depth D" line.
fn places(line: &str) -> (Vec<Place>, u64) {
    let body = line
        .split("(no message logging): ")
        .nth(1)
        .unwrap_or_else(|| panic!("{line}"));
    let mut out = Vec::new();
    let mut depth = None;
    for part in body.split("; ") {
        if let Some(d) = part.strip_prefix("rollback depth ") {
            depth = d
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok());
            continue;
        }
        let Some(rest) = part.strip_prefix("rank ") else {
            continue;
        };
        let num = |t: &str| -> Option<u64> {
            t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        };
        let rank = num(rest).unwrap_or_else(|| panic!("{part}"));
        let version = rest.split("its checkpoint ").nth(1).and_then(num);
        let node = rest.split("restarts on node ").nth(1).and_then(num);
        let past = rest.split("(past ").nth(1).and_then(num).unwrap_or(0);
        out.push((rank, version, node, past));
    }
    (out, depth.unwrap_or_else(|| panic!("no depth in {line}")))
}

/// The step each rank restored (`heat: rank R restored version V at step S`).
fn restored_steps(out: &str) -> Vec<(u64, u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("heat: rank ")?;
            let mut it = rest.split(' ');
            let rank = it.next()?.parse().ok()?;
            let version = rest
                .split("restored version ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            let step = rest.split("at step ").nth(1)?.trim().parse().ok()?;
            Some((rank, version, step))
        })
        .collect()
}

/// Runs the heat job with node 1 (ranks 2-3) SIGKILLed after `inject`; checks everything
/// both tests share and returns (the places on the line, the depth, stdout, the decisions).
fn killed_node_recovers_on_the_line(
    tag: &str,
    policy_text: &str,
    inject: &str,
    env: &[(&str, &str)],
) -> (Vec<Place>, u64, String, String) {
    let dir = temp(tag);
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "1000"]);
    let policy = policy_file(&dir.0, "nolog.toml", policy_text);
    let mut job = heat_job(&dir.0, &heat, &policy, &[inject], "1000");
    job.envs(env.iter().copied());
    let run = Running::start(&dir.0, job);
    run.wait_line(
        "injected failure: SIGKILL to node 1",
        Duration::from_secs(240),
    );
    let line = run.wait_line("(no message logging)", Duration::from_secs(120));
    let (places, depth) = places(&line);
    run.wait_line("recovered from the failure", Duration::from_secs(180));
    // The restarted ranks run on the spare (node 3) as their next incarnation.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = rows(&dir.0) {
            let moved = r
                .iter()
                .filter(|r| (r.0 == 2 || r.0 == 3) && r.1 == 3 && r.3 == 1);
            if r.len() == 6 && moved.count() == 2 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the table never showed ranks 2-3 on node 3: {:?}",
            rows(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    // The line names every rank (the stencil's halo exchange connects them all, and a rank
    // kept running would not resend what the line says its neighbours never received).
    let ranks: Vec<u64> = places.iter().map(|p| p.0).collect();
    assert_eq!(ranks, vec![0, 1, 2, 3, 4, 5], "{line}");
    for p in &places {
        match p.0 {
            2 | 3 => assert_eq!(
                p.2,
                Some(3),
                "rank {} must restart on the spare: {line}",
                p.0
            ),
            _ => assert_eq!(p.2, None, "rank {} must roll back in place: {line}", p.0),
        }
    }
    assert_eq!(depth, places.iter().map(|p| p.3).max().unwrap(), "{line}");
    // Sound: every rank restored the checkpoint the line names, at one common step (a
    // transitless line of the stencil), or every rank started over.
    let steps = restored_steps(&out);
    let named: Vec<&Place> = places.iter().filter(|p| p.1.is_some()).collect();
    assert!(
        named.is_empty() || named.len() == 6,
        "the stencil's line restores all ranks or none: {line}"
    );
    for p in &named {
        assert!(
            steps.iter().any(|s| s.0 == p.0),
            "rank {} never restored (line: {line}):\n{out}",
            p.0
        );
    }
    let common: std::collections::BTreeSet<u64> = steps.iter().map(|s| s.2).collect();
    assert!(
        common.len() <= 1,
        "ranks restored different steps: {steps:?}\n{line}"
    );
    if named.is_empty() {
        assert!(steps.is_empty(), "{steps:?}");
    }
    // The decisions: own checkpoints only, one recovery line with the same depth, restarts of
    // ranks 2-3 on node 3, and each rank back to the start restarted (in place: its node).
    let lines = decision_lines(&log);
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
    assert_eq!(field(recovery[0], "depth"), Some(depth), "{}", recovery[0]);
    for r in 0..6 {
        assert!(recovery[0].contains(&format!("({r}, ")), "{}", recovery[0]);
    }
    let restarts: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l.starts_with("Restart {"))
        .map(|l| (field(l, "rank").unwrap(), field(l, "node").unwrap()))
        .collect();
    assert!(
        restarts.contains(&(2, 3)) && restarts.contains(&(3, 3)),
        "{log}"
    );
    assert!(
        err.contains("krun: recovery line without message logging, wiring epoch"),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
    (places, depth, out, log)
}

#[test]
fn without_logging_a_killed_node_rolls_back_the_recovery_line_and_the_result_is_the_serial_one() {
    // Every rank is asked at the same moment: the ranks' checkpoints often fall on one step.
    let (places, depth, _, _) = killed_node_recovers_on_the_line(
        "line",
        "policy = \"uncoordinated\"\ninterval_ms = 500\nstagger = false\n\n[logging]\nmessages = false\n",
        "node=1@2ckpt",
        &[],
    );
    // Ranks 0-1 and 4-5 were running: they rolled back in place (checked above), to a
    // checkpoint of theirs or to the start.
    assert_eq!(
        places.iter().filter(|p| p.2.is_none()).count(),
        4,
        "{places:?}"
    );
    eprintln!("recovery line {places:?}, rollback depth {depth}");
}

#[test]
fn staggered_checkpoints_domino_back_and_the_policy_reports_the_rollback_depth() {
    // Staggered schedules (the default) put each rank's checkpoints on other steps than its
    // neighbours': no set of the later ones is transitless, the domino effect: the line
    // goes back past at least 2 of every rank's 3 safe checkpoints (to the start, or to a
    // set of first checkpoints taken at one step). Those old checkpoints must still be in
    // the store: without logging it keeps what a line may need (retention by line), not
    // its newest `keep` versions.
    let (places, depth, out, log) = killed_node_recovers_on_the_line(
        "domino",
        "policy = \"uncoordinated\"\ninterval_ms = 400\n\n[logging]\nmessages = false\n",
        "node=1@5ckpt",
        // Full images only: a store retaining by count keeps 3 versions (full_every + 2),
        // so a line at a rank's 1st or 2nd of 5 checkpoints is served only by retention by
        // line.
        &[("KRUN_GHOST_FULL_EVERY", "1")],
    );
    // Every rank had made 5 checkpoints safe: the line went back past at least 2 of them.
    assert!(depth >= 2, "rollback depth {depth}: {places:?}");
    assert!(places.iter().all(|p| p.3 >= 2), "{places:?}");
    let lines = decision_lines(&log);
    let line = lines
        .iter()
        .find(|l| l.starts_with("RecoveryLine {"))
        .unwrap();
    assert!(field(line, "depth").is_some_and(|d| d >= 2), "{line}");
    // A line at old checkpoints was restored from the store (the shared checks above: every
    // rank restored the version the line names, at one step, and the result is right).
    if places.iter().any(|p| p.1.is_some()) {
        assert!(out.contains("heat: rank 0 restored"), "{out}");
    }
}

/// A second failure during a recovery without logging: node 1 dies, and while the recovery
/// line is being restored (right after krun named it, before it reports the recovery done)
/// node 2 dies too. The job must not hang: it ends with the serial result (a second
/// recovery on the second spare) or with an error that names the failure.
///
/// Its first run (the CI of stop 22) found a hang: the first recovery's restart order for
/// ranks 2-3 on the spare was still fetching their images (the store first asked node 2,
/// just killed) when the second recovery's order restarted them in the new wiring epoch;
/// the older order then went on, replaced the new processes with processes of the old
/// epoch, whose address all-gather never completes, and the job never ended. A node now
/// drops an order a newer epoch's order supersedes (`runtime/recovery.rs`).
#[test]
fn a_second_node_killed_while_the_recovery_line_is_restored_ends_with_the_serial_result_or_a_clear_error(
) {
    let dir = temp("second");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "1000"]);
    let policy = policy_file(
        &dir.0,
        "nolog.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 500\nstagger = false\n\n[logging]\nmessages = false\n",
    );
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "--spares", "2", "-n", "6", "--policy"])
        .arg(&policy)
        .args(["--inject-failure", "node=1@2ckpt"])
        .arg(&heat)
        .args(["48", "40", "1000", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let run = Running::start(&dir.0, cmd);
    // Node 2's processes, found while they run (a rollback in place keeps its pids).
    let (krund2, pids2) = node_processes(&dir.0, 2);
    run.wait_line(
        "injected failure: SIGKILL to node 1",
        Duration::from_secs(240),
    );
    run.wait_line("(no message logging)", Duration::from_secs(120));
    kill_processes(krund2, &pids2);
    let (_, before) = run.wait_line_after("krun: node 2 failed at epoch", Duration::from_secs(120));
    assert!(
        !before
            .iter()
            .any(|l| l.contains("recovered from the failure")),
        "the first recovery ended before node 2 was killed: the test did not force a \
         failure during it:\n{}",
        before.join("\n")
    );
    // Bounded: `finish` fails the test if the job is still running after the limit.
    let (ok, out, err, _) = run.finish(Duration::from_secs(400));
    if ok {
        assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
        // The second failure was recovered from as a failure of its own, in a newer
        // wiring epoch than the first recovery's, after which the job ended.
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("krun: recovery line without message logging, wiring epoch"))
            .collect();
        assert!(lines.len() >= 2, "one recovery line only:\n{err}");
        assert!(
            err.lines()
                .any(|l| l.contains("krun: node 2 failed at epoch")
                    && l.contains("(no message logging)")),
            "no recovery line for node 2's failure:\n{err}"
        );
    } else {
        let last = err
            .lines()
            .rev()
            .find(|l| l.starts_with("krun:"))
            .unwrap_or("");
        assert!(
            last.contains("fail") || last.contains("lost") || last.contains("recover"),
            "the job failed without a clear reason:\n{err}"
        );
    }
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// As with logging (`uncoordinated_job.rs`): a node killed while the ranks swap their first
/// addresses restarts every rank from its start in a new wiring epoch; the result is the
/// serial one.
#[test]
fn without_logging_a_node_killed_while_the_ranks_swap_their_first_addresses_restarts_every_rank_from_the_start(
) {
    let (_, err, _) = killed_while_the_ranks_swap_their_first_addresses(
        "firstexchange",
        "policy = \"uncoordinated\"\ninterval_ms = 1000\n\n[logging]\nmessages = false\n",
    );
    assert!(err.contains("(no message logging) before"), "{err}");
}

/// Node 1 killed 1 s after the job's wiring finished, before any rank's first own checkpoint
/// (the interval is a minute): no channel counts yet (they come with checkpoints), so nothing
/// says which ranks depend on which; the line restores every rank to its start in one wiring
/// epoch, and the result is the serial one. (Before, the line kept ranks 0-1 and 4-5 running
/// and restarted ranks 2-3 alone in a new epoch: the survivors' sends to them timed out and
/// the job failed.)
#[test]
fn without_logging_a_node_killed_before_any_checkpoint_restarts_every_rank_from_the_start() {
    let dir = temp("nockpt");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    let policy = policy_file(
        &dir.0,
        "nolog.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 60000\n\n[logging]\nmessages = false\n",
    );
    let run = Running::start(&dir.0, heat_job(&dir.0, &heat, &policy, &[], "400"));
    run.wait_line("the job's wiring finished", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    let killed = kill_node(&dir.0, 1);
    assert_eq!(killed.len(), 2, "{killed:?}");
    let line = run.wait_line("(no message logging)", Duration::from_secs(120));
    let (places, depth) = places(&line);
    assert_eq!(depth, 0, "{line}");
    let want_places: Vec<Place> = (0..6u64)
        .map(|r| (r, None, (r == 2 || r == 3).then_some(3), 0))
        .collect();
    assert_eq!(places, want_places, "{line}");
    assert!(!line.contains("before the job's wiring finished"), "{line}");
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(
        !decision_lines(&log)
            .iter()
            .any(|l| l.starts_with("RankCheckpointed {")),
        "a checkpoint was taken before the kill: the test lost its subject\n{log}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}
