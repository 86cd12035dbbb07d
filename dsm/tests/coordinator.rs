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

use common::killed::{Killed, LIMIT};
use common::{is_root, pairs, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

fn coordinator_killed_on(provider: &str) {
    let mut run = Killed::start("coordinator-killed", provider, false);
    run.kill(0, [1, 2]);
    for (k, s) in run.survivors(&[1, 2, 3], 0).iter().enumerate() {
        assert_eq!(
            s["coordinator"],
            "1",
            "rank {} over {provider}: rank 1 should coordinate after node 0",
            k + 1
        );
    }
    // The new coordinator reports them; rank 3 reads one (only node 0 managed and wrote
    // it).
    let lost = run.lost(1);
    run.lost_access(3, &lost);
    run.finish(&[1, 2]);
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

/// A membership change node 0 runs, left half-done: node 0 stops after `phase` of it
/// (`KRUN_DSM_CHANGE_PAUSE`), the test SIGKILLs it and creates the go-file for the others.
struct HalfDone {
    dir: std::path::PathBuf,
    go: std::path::PathBuf,
    paused: std::path::PathBuf,
    server: BootstrapServer,
    pause: String,
    phase: String,
    what: String,
}

impl HalfDone {
    fn new(change: &str, provider: &str, phase: &str, ranks: usize) -> HalfDone {
        let dir = std::env::temp_dir().join(format!(
            "krun-dsm-{change}-half-done-{}-{provider}-{phase}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (go, paused) = (dir.join("go"), dir.join("paused"));
        let pause = format!("{phase}:{}", paused.to_str().unwrap());
        HalfDone {
            server: BootstrapServer::start_with("127.0.0.1:0", ranks, LIMIT, None).unwrap(),
            what: format!("over {provider}, node 0 killed after the {change}'s {phase} phase"),
            dir,
            go,
            paused,
            pause,
            phase: phase.to_string(),
        }
    }

    /// The environment of the ranks (and, without the pause, of a joining node).
    fn env(&self) -> [(&str, &str); 3] {
        [
            ("KRUN_DSM_FAULT_TIMEOUT_MS", "1000"),
            ("KRUN_DSM_PREFETCH", "0"),
            ("KRUN_DSM_CHANGE_PAUSE", self.pause.as_str()),
        ]
    }

    /// Waits for node 0 to pause the change, SIGKILLs it, and lets the others go on.
    fn kill_node_0_when_paused(&self, node0: &mut Proc, deadline: Instant) {
        while !self.paused.exists() {
            assert!(
                Instant::now() < deadline,
                "node 0 never paused the change after its {} phase:\n{}",
                self.phase,
                node0.kill_and_tail(30)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        node0.child.kill().unwrap();
        assert!(!node0.child.wait().unwrap().success());
        std::fs::write(&self.go, b"go").unwrap();
    }

    /// The end: the bootstrap server's thread joined, the files removed.
    fn finish(self) {
        let _ = self.server.join();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The new coordinator's stderr says it finished `change` (after logical) or dropped
    /// it (after setting).
    fn check_told(&self, err: &str, change: &str, also: &str) {
        let told = if self.phase == "logical" {
            format!("finishing the change {change}")
        } else {
            format!(
                "the change {change} (epoch 1) the dead coordinator left before any member \
                 switched is dropped"
            )
        };
        assert!(
            err.contains(&told),
            "rank 1 {} never said {told:?}:\n{err}{also}",
            self.what
        );
    }
}

/// Node 0 runs rank 2's leave and is SIGKILLed between two of its steps (after `phase`,
/// forced by `KRUN_DSM_CHANGE_PAUSE`): rank 1 takes over and finishes the leave (after
/// logical: every member switched) or drops it (after setting: nobody switched; rank 2
/// asks again and rank 1 runs it); either way rank 2 is told it may go, and rank 1 ends
/// as the only member with both pages intact.
fn leave_half_done(provider: &str, phase: &str) {
    let h = HalfDone::new("leave", provider, phase, 3);
    let addr = h.server.addr().to_string();
    let extra = ["--go-file", h.go.to_str().unwrap()];
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| {
            spawn(
                &rank_args("leave-coordinator-killed", provider, &addr, r, 3, &extra),
                &h.env(),
            )
        })
        .collect();
    let deadline = Instant::now() + LIMIT;
    procs[0].line_with("victim=ready", deadline, "rank 0");
    procs[1].line_with("waiting=1", deadline, "rank 1");
    procs[2].line_with("leaving=1", deadline, "rank 2");
    h.kill_node_0_when_paused(&mut procs[0], deadline);
    let what = &h.what;
    procs[2].line_with("left=1", deadline, "rank 2");
    let (status, err) = procs[2].wait_exit(deadline, "rank 2");
    assert!(status.success(), "rank 2 {what}: {status}\n{err}");
    let end = pairs(&procs[1].line_with("survivor=ok", deadline, "rank 1"));
    assert_eq!(end["members"], "1", "rank 1 {what}");
    assert_eq!(
        end["dead"], "0",
        "rank 1 {what}: node 0 died (rank 2 left, it is not dead)"
    );
    assert_eq!(end["coordinator"], "1", "rank 1 {what}");
    assert_eq!(
        end["lost"], "-",
        "rank 1 {what}: page 0 had a copy at rank 1"
    );
    let (status, err) = procs[1].wait_exit(deadline, "rank 1");
    assert!(status.success(), "rank 1 {what}: {status}\n{err}");
    h.check_told(&err, "Leave(2)", "");
    drop(procs);
    h.finish();
}

#[test]
fn a_leave_node_0_left_after_its_logical_phase_is_finished_by_the_next_coordinator_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    leave_half_done("tcp", "logical");
}

#[test]
fn a_leave_node_0_left_after_its_logical_phase_is_finished_by_the_next_coordinator_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    leave_half_done("shm", "logical");
}

#[test]
fn a_leave_node_0_left_after_its_setting_phase_is_dropped_then_run_again_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    leave_half_done("tcp", "setting");
}

#[test]
fn a_leave_node_0_left_after_its_setting_phase_is_dropped_then_run_again_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    leave_half_done("shm", "setting");
}

/// Node 0 runs a node's join and is SIGKILLed between two of its steps (after `phase`,
/// forced by `KRUN_DSM_CHANGE_PAUSE`): rank 1 takes over and finishes the join (after
/// logical: every member switched) or drops it (after setting: nobody switched; the
/// joiner asks again and rank 1 runs it); either way the joiner ends a member, reads both
/// pages (node 0's through rank 1's surviving copy), and both see members 1 and 2 with
/// rank 1 coordinating.
fn join_half_done(provider: &str, phase: &str) {
    let h = HalfDone::new("join", provider, phase, 2);
    let addr = h.server.addr().to_string();
    let (stop, contact) = (h.dir.join("stop"), h.dir.join("contact"));
    let files = [
        "--go-file",
        h.go.to_str().unwrap(),
        "--stop-file",
        stop.to_str().unwrap(),
        "--contact-file",
        contact.to_str().unwrap(),
    ];
    let mut procs: Vec<Proc> = (0..2)
        .map(|r| {
            spawn(
                &rank_args("join-coordinator-killed", provider, &addr, r, 2, &files),
                &h.env(),
            )
        })
        .collect();
    let joiner_args: Vec<String> = ["late-joiner", "--provider", provider]
        .iter()
        .chain(files.iter())
        .map(|s| s.to_string())
        .collect();
    let mut joiner = spawn(&joiner_args, &h.env()[..2]);
    let deadline = Instant::now() + LIMIT;
    procs[0].line_with("victim=ready", deadline, "rank 0");
    procs[1].line_with("waiting=1", deadline, "rank 1");
    h.kill_node_0_when_paused(&mut procs[0], deadline);
    let what = &h.what;
    let end = pairs(&procs[1].line_with("survivor=ok", deadline, "rank 1"));
    assert_eq!(end["members"], "1,2", "rank 1 {what}");
    assert_eq!(end["dead"], "0", "rank 1 {what}");
    assert_eq!(end["coordinator"], "1", "rank 1 {what}");
    assert_eq!(
        end["lost"], "-",
        "rank 1 {what}: page 0 had a copy at rank 1"
    );
    let joined = pairs(&joiner.line_with("joiner=ok", deadline, "the joiner"));
    assert_eq!(joined["members"], "1,2", "the joiner {what}");
    assert_eq!(joined["coordinator"], "1", "the joiner {what}");
    std::fs::write(&stop, b"stop").unwrap();
    let (status, jerr) = joiner.wait_exit(deadline, "the joiner");
    assert!(status.success(), "the joiner {what}: {status}\n{jerr}");
    let (status, err) = procs[1].wait_exit(deadline, "rank 1");
    assert!(status.success(), "rank 1 {what}: {status}\n{err}");
    h.check_told(&err, "Join(2)", &format!("\n-- the joiner:\n{jerr}"));
    drop(procs);
    h.finish();
}

#[test]
fn a_join_node_0_left_after_its_logical_phase_is_finished_by_the_next_coordinator_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    join_half_done("tcp", "logical");
}

#[test]
fn a_join_node_0_left_after_its_logical_phase_is_finished_by_the_next_coordinator_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    join_half_done("shm", "logical");
}

#[test]
fn a_join_node_0_left_after_its_setting_phase_is_dropped_then_run_again_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    join_half_done("tcp", "setting");
}

#[test]
fn a_join_node_0_left_after_its_setting_phase_is_dropped_then_run_again_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    join_half_done("shm", "setting");
}
