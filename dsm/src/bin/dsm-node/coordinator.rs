//! The `coordinator-killed` scenario: node 0, which coordinates the DSM's changes and its
//! barrier, manages directory entries and owns pages, is SIGKILLed while the others fault
//! pages (see the module doc of `dsm-node`).
//!
//! 4 ranks; rank 0 is the victim. Pages of one region, by their manager:
//! - B (2 managed by 0, 1 by 1, 1 by 2; written by 0, read by ranks 1-3): the owner and
//!   a manager died, read copies survive: one is promoted, every value is still read, then
//!   rewritten;
//! - C (2 managed by 0, 1 by 1, 1 by 3; only ever written by 0): lost. Those node 0
//!   managed are known written only to its deputy witness (rank 1), which reports them;
//! - E (2 per manager): ranks 1 and 2 each add 1 to their own word of every E page, in a
//!   loop that goes on across the kill (their requests meet the dead manager, and the
//!   barrier after it has to go on without node 0).
use dsm::Dsm;

use super::killed::{check_lost, survivor_line, victim, Pages};
use super::{wait_file, Args, Res};

const VICTIM: usize = 0;

pub fn coordinator_killed(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 4 {
        return Err("coordinator-killed needs --size 4".into());
    }
    let p = Pages::alloc(d, 32, 4)?;
    p.need(&[6, 4, 3, 3])?;
    let [m0, m1, m2, m3] = [0, 1, 2, 3].map(|n| &p.by_manager[n]);
    let class_b = vec![m0[0], m0[1], m1[0], m2[0]];
    let class_c = vec![m0[2], m0[3], m1[1], m3[0]];
    let class_e = vec![m0[4], m0[5], m1[2], m1[3], m2[1], m2[2], m3[1], m3[2]];
    let bar = || d.barrier().map_err(|e| e.to_string());
    let r = a.rank;
    bar()?;
    if r == VICTIM {
        p.write(&class_b, 0xb0);
        p.write(&class_c, 0xc0);
    }
    bar()?;
    if r != VICTIM {
        p.check(&class_b, 0xb0, "B before the kill")?;
    }
    bar()?;
    if r == VICTIM {
        return victim(r);
    }
    let go = a
        .go_file
        .as_ref()
        .ok_or("coordinator-killed needs --go-file")?;
    let mut iterations = 0u64;
    if r == 1 || r == 2 {
        // Faulting across the kill: each rank its own word of every E page (ownership
        // moves between ranks 1 and 2 every time; node 0 managed two of them).
        iterations = p.fault_across_kill(&class_e, r, 3 - r, go, a.rounds)?;
    } else {
        wait_file(Some(go), "go-file")?;
    }
    // Node 0 is dead: the barrier goes on with the next coordinator.
    bar()?;
    p.check(&class_b, 0xb0, "B after the kill")?;
    bar()?;
    if r == 1 {
        p.write(&class_b, 0xb1);
    }
    bar()?;
    p.check(&class_b, 0xb1, "B rewritten after the kill")?;
    if r == 1 || r == 2 {
        p.check_counts(&class_e, r, iterations)?;
    }
    bar()?;
    let mut expected: Vec<u64> = class_c.iter().map(|&i| p.first + i as u64).collect();
    expected.sort_unstable();
    let lost = d.lost_pages();
    survivor_line(d, iterations, &format!(" coordinator={}", d.coordinator()));
    if r == 1 {
        check_lost(&lost, &expected, "the new coordinator")?;
    }
    bar()?;
    if r == 3 {
        // A page node 0 managed and only node 0 wrote: its deputy witness reported it.
        return p.read_lost(class_c[0]);
    }
    wait_file(a.stop_file.as_ref(), "stop-file")
}
