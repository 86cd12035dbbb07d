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
use std::time::Duration;

use dsm::Dsm;

use super::killed::{check_lost, list, say, survivor_line, victim, Pages};
use super::locks::until;
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

/// See `leave-coordinator-killed` in the module doc of `dsm-node`.
pub fn leave_coordinator_killed(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 3 {
        return Err("leave-coordinator-killed needs --size 3".into());
    }
    let p = Pages::alloc(d, 3, 3)?;
    let bar = || d.barrier().map_err(|e| e.to_string());
    let r = a.rank;
    let mine = [0usize];
    let theirs = [1usize];
    bar()?;
    match r {
        0 => p.write(&mine, 0xd0),
        1 => p.write(&theirs, 0xd1),
        _ => {}
    }
    bar()?;
    // Every rank reads both pages: rank 1's copy of page 0 survives node 0.
    p.check(&mine, 0xd0, "page 0 before the leave")?;
    p.check(&theirs, 0xd1, "page 1 before the leave")?;
    bar()?;
    match r {
        0 => victim(r),
        2 => {
            say("leaving=1");
            d.leave(Duration::from_secs(120))
                .map_err(|e| format!("leave across node 0's death: {e}"))?;
            say("left=1");
            Ok(())
        }
        _ => {
            say("waiting=1");
            wait_file(a.go_file.as_ref(), "go-file")?;
            // Node 0 is dead: this barrier's probe finds it, and rank 1 takes over.
            bar()?;
            p.check(&mine, 0xd0, "page 0 after node 0 died")?;
            p.check(&theirs, 0xd1, "page 1 after node 0 died")?;
            // The barrier may pass once the leave committed, before node 0's failure did.
            until("node 0's failure never committed", || {
                !d.members().contains(&0)
            })?;
            say_view(d, "survivor=ok");
            Ok(())
        }
    }
}

/// See `join-coordinator-killed` in the module doc of `dsm-node`: ranks 0 and 1 (the
/// job), node 0 SIGKILLed in the middle of the join it runs for a `late-joiner`.
pub fn join_coordinator_killed(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 2 {
        return Err("join-coordinator-killed needs --size 2".into());
    }
    let contact = a
        .contact_file
        .as_ref()
        .ok_or("join-coordinator-killed needs --contact-file")?;
    let p = Pages::alloc(d, 2, 2)?;
    let bar = || d.barrier().map_err(|e| e.to_string());
    let r = a.rank;
    bar()?;
    p.write(&[r], 0xd0 + r as u64);
    bar()?;
    // Both ranks read both pages: rank 1's copy of page 0 survives node 0.
    p.check(&[0], 0xd0, "page 0 before the join")?;
    p.check(&[1], 0xd1, "page 1 before the join")?;
    bar()?;
    if r == 0 {
        // Written whole, then renamed: the joiner never reads half a contact.
        let tmp = contact.with_extension("tmp");
        std::fs::write(&tmp, d.contact().map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, contact).map_err(|e| format!("{}: {e}", contact.display()))?;
        return victim(r);
    }
    say("waiting=1");
    wait_file(a.go_file.as_ref(), "go-file")?;
    // Node 0 is dead: this barrier's probe finds it, and rank 1 takes over.
    bar()?;
    p.check(&[0], 0xd0, "page 0 after node 0 died")?;
    p.check(&[1], 0xd1, "page 1 after node 0 died")?;
    until("node 0's failure never committed", || {
        !d.members().contains(&0)
    })?;
    // The joiner is a member once its join committed (finished by this node, or run
    // again when it asked again after a dropped one).
    until("the joiner never became a member", || {
        d.members().contains(&2)
    })?;
    say_view(d, "survivor=ok");
    wait_file(a.stop_file.as_ref(), "stop-file")
}

/// The joiner of `join-coordinator-killed` (no bootstrap): joins through the contact
/// file, then reads both pages of the job's region and prints its view.
pub fn late_joiner(a: &Args) -> Res<()> {
    let d = super::churn::join_through(a)?;
    say(&format!("joined={} epoch={}", d.rank(), d.epoch()));
    let region = *d.regions().first().ok_or("the DSM has no region")?;
    let p = Pages::attach(&d, region, 3)?;
    p.check(&[0], 0xd0, "page 0 read by the joiner")?;
    p.check(&[1], 0xd1, "page 1 read by the joiner")?;
    // The join may commit here before node 0's failure does (the next change).
    until("node 0's failure never reached the joiner", || {
        !d.members().contains(&0)
    })?;
    say_view(&d, "joiner=ok");
    wait_file(a.stop_file.as_ref(), "stop-file")
}

/// Prints `head` with this node's members, coordinator, dead nodes and lost pages.
fn say_view(d: &Dsm, head: &str) {
    let ids = |v: Vec<u32>| list(&v.into_iter().map(u64::from).collect::<Vec<_>>());
    say(&format!(
        "{head} members={} coordinator={} dead={} lost={}",
        ids(d.members()),
        d.coordinator(),
        ids(d.dead_nodes()),
        list(&d.lost_pages())
    ));
}
