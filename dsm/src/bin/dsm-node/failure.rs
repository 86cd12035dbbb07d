//! The `manager-killed` scenario: a node that manages directory entries and owns pages is
//! SIGKILLed while the others keep faulting (see the module doc of `dsm-node`).
//!
//! 4 ranks; rank 3 is the victim. Pages of one region, by their manager (`page % 4`):
//! - A (managed by 3, written by rank 1): rank 2 reads them only after the kill, so its
//!   request goes to the dead manager and must be asked again of the new one;
//! - B (2 managed by 3, 2 by 1; written by 3, read by ranks 0-2): the owner died, read
//!   copies survive: one is promoted, every value is still read, then rewritten;
//! - C (managed by 0 and 2; written by 3, read by ranks 1 and 2, then rewritten by 3, which
//!   invalidated their copies): lost;
//! - D (managed by 3, only ever written by 3): lost (node 0 witnessed that 3 wrote them);
//! - E (2 per manager): ranks 0 and 1 each add 1 to their own word of every E page, in a
//!   loop that goes on across the kill (their requests meet the dead manager too).
use std::time::Duration;

use dsm::Dsm;

use super::killed::{check_lost, list, say, survivor_line, value, victim, Pages, WORDS};
use super::{wait_file, Args, Res};

const VICTIM: usize = 3;

pub fn manager_killed(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 4 {
        return Err("manager-killed needs --size 4".into());
    }
    let p = Pages::alloc(d, 32, 4)?;
    p.need(&[4, 4, 3, 8])?;
    let [m0, m1, m2, m3] = [0, 1, 2, 3].map(|n| &p.by_manager[n]);
    let class_a = vec![m3[0], m3[1]];
    let class_d = vec![m3[2], m3[3]];
    let class_b = vec![m3[4], m3[5], m1[0], m1[1]];
    let class_c = vec![m0[0], m0[1], m2[0]];
    let class_e = vec![m3[6], m3[7], m0[2], m0[3], m1[2], m1[3], m2[1], m2[2]];
    let bar = || d.barrier().map_err(|e| e.to_string());
    let r = a.rank;
    bar()?;
    match r {
        VICTIM => {
            p.write(&class_b, 3);
            p.write(&class_c, 3);
            p.write(&class_d, 3);
        }
        1 => p.write(&class_a, 0xa1),
        _ => {}
    }
    bar()?;
    if r != VICTIM {
        p.check(&class_b, 3, "B before the kill")?;
    }
    if r == 1 || r == 2 {
        p.check(&class_c, 3, "C before the kill")?;
    }
    bar()?;
    if r == VICTIM {
        p.write(&class_c, 0x33);
    }
    bar()?;
    if r == VICTIM {
        return victim(r);
    }
    let go = a.go_file.as_ref().ok_or("manager-killed needs --go-file")?;
    let mut iterations = 0u64;
    if r == 0 || r == 1 {
        // Faulting across the kill: each rank its own word of every E page (ownership
        // moves between ranks 0 and 1 every time).
        iterations = p.fault_across_kill(&class_e, r, 1 - r, go, a.rounds)?;
    } else {
        wait_file(Some(go), "go-file")?;
        // A pages were never touched here: the read asks their manager, rank 3, dead now.
        let before = d.protocol_stats().manager_requests;
        let reader = {
            let class_a = class_a.clone();
            let base = p.word(0, 0) as usize;
            std::thread::spawn(move || -> Res<()> {
                for &i in &class_a {
                    for w in 0..WORDS {
                        // SAFETY: inside the region (see `word`).
                        let got =
                            unsafe { (base as *const u64).add(i * WORDS + w).read_volatile() };
                        if got != value(0xa1, i, w) {
                            return Err(format!("A page {i} word {w}: {got:#x}"));
                        }
                    }
                }
                Ok(())
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while d.protocol_stats().manager_requests == before && !reader.is_finished() {
            if std::time::Instant::now() > deadline {
                return Err("the read of A pages asked nobody within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        say("asked=1");
        reader.join().map_err(|_| "the A reader panicked")??;
    }
    bar()?;
    // The promoted copies hold what rank 3 wrote.
    p.check(&class_b, 3, "B after the kill")?;
    p.check(&class_a, 0xa1, "A after the kill")?;
    bar()?;
    if r == 1 {
        p.write(&class_b, 0xb1);
    }
    bar()?;
    p.check(&class_b, 0xb1, "B rewritten after the kill")?;
    if r == 0 || r == 1 {
        p.check_counts(&class_e, r, iterations)?;
    }
    bar()?;
    let mut expected: Vec<u64> = class_c
        .iter()
        .chain(&class_d)
        .map(|&i| p.first + i as u64)
        .collect();
    expected.sort_unstable();
    let lost = d.lost_pages();
    survivor_line(d, iterations, &format!(" lost_here={}", list(&lost)));
    if r == 0 {
        check_lost(&lost, &expected, "node 0")?;
    }
    bar()?;
    if r == 2 {
        return p.read_lost(class_c[0]);
    }
    // Rank 2's access to a lost page is answered by its manager (rank 0 or 2).
    wait_file(a.stop_file.as_ref(), "stop-file")
}
