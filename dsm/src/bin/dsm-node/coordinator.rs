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
use std::io::Write;
use std::time::Duration;

use dsm::Dsm;

use super::{wait_file, Args, Res};

const WORDS: usize = 512;
const VICTIM: usize = 0;

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

pub fn coordinator_killed(d: &Dsm, a: &Args) -> Res<()> {
    let e = |e: dsm::DsmError| e.to_string();
    if a.size != 4 {
        return Err("coordinator-killed needs --size 4".into());
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
    if m0.len() < 6 || m1.len() < 4 || m2.len() < 3 || m3.len() < 3 {
        return Err(format!("pages by manager {by_manager:?}: too few"));
    }
    let class_b = vec![m0[0], m0[1], m1[0], m2[0]];
    let class_c = vec![m0[2], m0[3], m1[1], m3[0]];
    let class_e = vec![m0[4], m0[5], m1[2], m1[3], m2[1], m2[2], m3[1], m3[2]];
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
    if r == VICTIM {
        write(&class_b, 0xb0);
        write(&class_c, 0xc0);
    }
    bar()?;
    if r != VICTIM {
        check(&class_b, 0xb0, "B before the kill")?;
    }
    bar()?;
    if r == VICTIM {
        println!("krun-result victim=ready");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(120));
        return Err("rank 0 was not killed within 120 s".into());
    }
    let go = a
        .go_file
        .as_ref()
        .ok_or("coordinator-killed needs --go-file")?;
    let mut iterations = 0u64;
    if r == 1 || r == 2 {
        // Faulting across the kill: each rank its own word of every E page (ownership
        // moves between ranks 1 and 2 every time; node 0 managed two of them).
        let other_rank = 3 - r;
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
                let other = unsafe { word(i, other_rank).read_volatile() };
                if other < last[k] {
                    return Err(format!("E page {i}: word {other_rank} went back"));
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
    }
    // Node 0 is dead: the barrier goes on with the next coordinator.
    bar()?;
    check(&class_b, 0xb0, "B after the kill")?;
    bar()?;
    if r == 1 {
        write(&class_b, 0xb1);
    }
    bar()?;
    check(&class_b, 0xb1, "B rewritten after the kill")?;
    if r == 1 || r == 2 {
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
    let mut expected: Vec<u64> = class_c.iter().map(|&i| first + i as u64).collect();
    expected.sort_unstable();
    let lost = d.lost_pages();
    let s = d.protocol_stats();
    println!(
        "krun-result survivor=ok iterations={iterations} resent={} promoted={} \
         coordinator={} failures={}",
        s.requests_resent,
        s.pages_promoted,
        d.coordinator(),
        list(
            &d.failures_handled()
                .iter()
                .map(|&n| n as u64)
                .collect::<Vec<_>>()
        )
    );
    if r == 1 {
        println!(
            "krun-result lost={} expected_lost={}",
            list(&lost),
            list(&expected)
        );
        if lost != expected {
            return Err(format!(
                "the new coordinator reports pages {lost:?} lost, {expected:?} lost every copy"
            ));
        }
    }
    let _ = std::io::stdout().flush();
    bar()?;
    if r == 3 {
        // A page node 0 managed and only node 0 wrote: its deputy witness reported it.
        let i = class_c[0];
        println!("krun-result lost_access={}", first + i as u64);
        let _ = std::io::stdout().flush();
        // SAFETY: see `word`; its only copy died: the driver must end this process.
        let v = unsafe { word(i, 0).read_volatile() };
        return Err(format!("lost page {i} read {v:#x}"));
    }
    wait_file(a.stop_file.as_ref(), "stop-file")
}
