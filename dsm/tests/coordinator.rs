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

use common::is_root;
use common::killed::Killed;

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
