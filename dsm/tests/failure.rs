//! A node dies while the DSM runs: the node that manages a quarter of the directory and
//! owns pages is SIGKILLed (by PID) while the others keep faulting. Node 0 runs the failure
//! in the five phases; the survivors' scans rebuild the dead manager's entries, promote
//! read copies of the pages it owned, and report the pages whose every copy died. Needs
//! root (userfaultfd).
//!
//! Four `dsm-node manager-killed` processes (see the scenario's doc). The test forces:
//! - the kill lands while ranks 0 and 1 fault (they printed `faulting=1`, and they loop
//!   until the go file exists, which the test creates only after the kill);
//! - a request in flight to the dead manager: `KRUN_DSM_FAIL_HOLD` holds node 0's failure
//!   change until rank 2 has sent its read of pages only rank 3 managed (`asked=1`), so
//!   that request went to the dead node and must be asked again of the new manager
//!   (rank 2's `resent` > 0, and it read the values rank 1 wrote);
//! - copies promoted (`promoted` > 0 somewhere) and read back, then rewritten;
//! - the lost pages reported: node 0's list equals the pages whose every copy died, and
//!   rank 2's access to one ends it with code 75 and an error naming the page (never a
//!   zero page).
//!
//! The test only bounds waits (150 s) to tell progress from a hang; it never judges time.
mod common;

use common::is_root;
use common::killed::Killed;

fn manager_killed_on(provider: &str) {
    let mut run = Killed::start("manager-killed", provider, true);
    run.kill(3, [0, 1]);
    // Node 0's failure change waits until rank 2's read went to the dead manager.
    let deadline = run.deadline;
    run.procs[2].line_with("asked=1", deadline, "rank 2");
    std::fs::write(&run.hold, b"go").unwrap();
    let survivors = run.survivors(&[0, 1, 2], 3);
    let lost = run.lost(0);
    let resent: u64 = survivors[2]["resent"].parse().unwrap();
    assert!(
        resent > 0,
        "over {provider}: rank 2's request to the dead manager was not asked again"
    );
    run.lost_access(2, &lost);
    run.finish(&[0, 1]);
}

#[test]
fn a_sigkilled_manager_and_owner_is_rebuilt_from_copies_and_lost_pages_are_reported_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    manager_killed_on("tcp");
}

#[test]
fn a_sigkilled_manager_and_owner_is_rebuilt_from_copies_and_lost_pages_are_reported_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    manager_killed_on("shm");
}
