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
use std::io::Write;
use std::time::Duration;

use dsm::Dsm;

use super::{wait_file, Args, Res};

const WORDS: usize = 512;
const VICTIM: usize = 3;

fn value(tag: u64, page: usize, w: usize) -> u64 {
    (tag << 56) | ((page as u64) << 16) | w as u64
}

fn list(pages: &[u64]) -> String {
    let v: Vec<String> = pages.iter().map(|p| p.to_string()).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

pub fn manager_killed(d: &Dsm, a: &Args) -> Res<()> {
    let e = |e: dsm::DsmError| e.to_string();
    if a.size != 4 {
        return Err("manager-killed needs --size 4".into());
    }
    let pages = 32;
    let region = d.alloc(pages * WORDS * 8).map_err(e)?;
    let first = region.first_page();
    let base = region.as_ptr() as *mut u64;
    // SAFETY (every use): page i < pages of the region, word w < WORDS.
    let word = |i: usize, w: usize| unsafe { base.add(i * WORDS + w) };
    let mut by_manager: Vec<Vec<usize>> = vec![Vec::new(); 4];
    for i in 0..pages {
        let m = d.manager_of(first + i as u64).map_err(e)? as usize;
        by_manager
            .get_mut(m)
            .ok_or(format!("page {i} managed by node {m}"))?
            .push(i);
    }
    let (m0, m1, m2, m3) = (
        &by_manager[0],
        &by_manager[1],
        &by_manager[2],
        &by_manager[3],
    );
    if m3.len() < 8 || m0.len() < 4 || m1.len() < 4 || m2.len() < 3 {
        return Err(format!("pages by manager {by_manager:?}: too few"));
    }
    let class_a = vec![m3[0], m3[1]];
    let class_d = vec![m3[2], m3[3]];
    let class_b = vec![m3[4], m3[5], m1[0], m1[1]];
    let class_c = vec![m0[0], m0[1], m2[0]];
    let class_e = vec![m3[6], m3[7], m0[2], m0[3], m1[2], m1[3], m2[1], m2[2]];
    let write = |class: &[usize], tag: u64| {
        for &i in class {
            for w in 0..WORDS {
                // SAFETY: see `word`.
                unsafe { word(i, w).write_volatile(value(tag, i, w)) };
            }
        }
    };
    let check = |class: &[usize], tag: u64, what: &str| -> Res<()> {
        for &i in class {
            for w in 0..WORDS {
                // SAFETY: see `word`.
                let got = unsafe { word(i, w).read_volatile() };
                if got != value(tag, i, w) {
                    return Err(format!(
                        "{what}: page {i} word {w}: {got:#x} != {:#x}",
                        value(tag, i, w)
                    ));
                }
            }
        }
        Ok(())
    };
    let bar = || d.barrier().map_err(|e| e.to_string());
    let r = a.rank;
    bar()?;
    match r {
        VICTIM => {
            write(&class_b, 3);
            write(&class_c, 3);
            write(&class_d, 3);
        }
        1 => write(&class_a, 0xa1),
        _ => {}
    }
    bar()?;
    if r != VICTIM {
        check(&class_b, 3, "B before the kill")?;
    }
    if r == 1 || r == 2 {
        check(&class_c, 3, "C before the kill")?;
    }
    bar()?;
    if r == VICTIM {
        write(&class_c, 0x33);
    }
    bar()?;
    if r == VICTIM {
        println!("krun-result victim=ready");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(120));
        return Err("rank 3 was not killed within 120 s".into());
    }
    let go = a.go_file.as_ref().ok_or("manager-killed needs --go-file")?;
    let mut iterations = 0u64;
    if r == 0 || r == 1 {
        // Faulting across the kill: each rank its own word of every E page (ownership
        // moves between ranks 0 and 1 every time).
        let mut after = 0;
        let mut last = vec![0u64; class_e.len()];
        loop {
            for (k, &i) in class_e.iter().enumerate() {
                // SAFETY: see `word`; word r is only written by rank r.
                unsafe {
                    let w = word(i, r);
                    w.write_volatile(w.read_volatile() + 1);
                }
                // SAFETY: see `word`.
                let other = unsafe { word(i, 1 - r).read_volatile() };
                if other < last[k] {
                    return Err(format!("E page {i}: word {} went back", 1 - r));
                }
                last[k] = other;
            }
            iterations += 1;
            if iterations == 1 {
                println!("krun-result faulting=1");
                let _ = std::io::stdout().flush();
            }
            if go.exists() {
                after += 1;
                if after >= a.rounds {
                    break;
                }
            } else if iterations > 1_000_000 {
                return Err("the go file never appeared".into());
            }
        }
    } else {
        wait_file(Some(go), "go-file")?;
        // A pages were never touched here: the read asks their manager, rank 3, dead now.
        let before = d.protocol_stats().manager_requests;
        let reader = {
            let class_a = class_a.clone();
            let base = base as usize;
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
        println!("krun-result asked=1");
        let _ = std::io::stdout().flush();
        reader.join().map_err(|_| "the A reader panicked")??;
    }
    bar()?;
    // The promoted copies hold what rank 3 wrote.
    check(&class_b, 3, "B after the kill")?;
    check(&class_a, 0xa1, "A after the kill")?;
    bar()?;
    if r == 1 {
        write(&class_b, 0xb1);
    }
    bar()?;
    check(&class_b, 0xb1, "B rewritten after the kill")?;
    if r == 0 || r == 1 {
        for &i in &class_e {
            // SAFETY: see `word`.
            let got = unsafe { word(i, r).read_volatile() };
            if got != iterations {
                return Err(format!(
                    "E page {i}: rank {r}'s word is {got}, it added 1 {iterations} times"
                ));
            }
        }
    }
    bar()?;
    let mut expected: Vec<u64> = class_c
        .iter()
        .chain(&class_d)
        .map(|&i| first + i as u64)
        .collect();
    expected.sort_unstable();
    let lost = d.lost_pages();
    let s = d.protocol_stats();
    println!(
        "krun-result survivor=ok iterations={iterations} resent={} promoted={} lost_here={} \
         failures={}",
        s.requests_resent,
        s.pages_promoted,
        list(&lost),
        list(
            &d.failures_handled()
                .iter()
                .map(|&n| n as u64)
                .collect::<Vec<_>>()
        )
    );
    if r == 0 {
        println!(
            "krun-result lost={} expected_lost={}",
            list(&lost),
            list(&expected)
        );
        if lost != expected {
            return Err(format!(
                "node 0 reports pages {lost:?} lost, {expected:?} lost every copy"
            ));
        }
    }
    let _ = std::io::stdout().flush();
    bar()?;
    if r == 2 {
        let i = class_c[0];
        println!("krun-result lost_access={}", first + i as u64);
        let _ = std::io::stdout().flush();
        // SAFETY: see `word`; its only copy died: the driver must end this process.
        let v = unsafe { word(i, 0).read_volatile() };
        return Err(format!("lost page {i} read {v:#x}"));
    }
    // Rank 2's access to a lost page is answered by its manager (rank 0 or 2).
    wait_file(a.stop_file.as_ref(), "stop-file")
}
