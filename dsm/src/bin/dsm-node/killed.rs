//! What the scenarios that SIGKILL a node while the others fault share (`manager-killed`,
//! `coordinator-killed`): a region of pages sorted by manager, classes of pages written
//! and checked with a value per page and word, the victim's wait, the loop that faults
//! across the kill, and the end (the lost pages reported, a lost page read).
use std::io::Write;
use std::time::Duration;

use dsm::{Dsm, SharedRegion};

use super::Res;

/// 8-byte words per page.
pub const WORDS: usize = 512;

/// The value of word `w` of page `page` written with `tag`.
pub fn value(tag: u64, page: usize, w: usize) -> u64 {
    (tag << 56) | ((page as u64) << 16) | w as u64
}

/// Pages as `a,b,c` (`-`: none).
pub fn list(pages: &[u64]) -> String {
    let v: Vec<String> = pages.iter().map(|p| p.to_string()).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

pub fn say(line: &str) {
    println!("krun-result {line}");
    let _ = std::io::stdout().flush();
}

/// A region's pages and their managers.
pub struct Pages {
    pub first: u64,
    base: *mut u64,
    pages: usize,
    /// The region's page indexes each node manages.
    pub by_manager: Vec<Vec<usize>>,
    _region: SharedRegion,
}

impl Pages {
    /// Allocates `pages` pages (collective) and sorts them by manager among `nodes`.
    pub fn alloc(d: &Dsm, pages: usize, nodes: usize) -> Res<Pages> {
        let region = d.alloc(pages * WORDS * 8).map_err(|e| e.to_string())?;
        Pages::attach(d, region, nodes)
    }

    /// The pages of a region this node already maps (a node that joined: the regions
    /// allocated before its join), sorted by manager among `nodes`.
    pub fn attach(d: &Dsm, region: SharedRegion, nodes: usize) -> Res<Pages> {
        let pages = region.len() / (WORDS * 8);
        let first = region.first_page();
        let mut by_manager: Vec<Vec<usize>> = vec![Vec::new(); nodes];
        for i in 0..pages {
            let m = d.manager_of(first + i as u64).map_err(|e| e.to_string())? as usize;
            by_manager
                .get_mut(m)
                .ok_or(format!("page {i} managed by node {m}"))?
                .push(i);
        }
        Ok(Pages {
            first,
            base: region.as_ptr() as *mut u64,
            pages,
            by_manager,
            _region: region,
        })
    }

    /// Fails unless node `n` manages at least `want[n]` pages.
    pub fn need(&self, want: &[usize]) -> Res<()> {
        if want.iter().zip(&self.by_manager).any(|(&w, m)| m.len() < w) {
            return Err(format!("pages by manager {:?}: too few", self.by_manager));
        }
        Ok(())
    }

    /// Word `w` of page `i` of the region.
    pub fn word(&self, i: usize, w: usize) -> *mut u64 {
        assert!(
            i < self.pages && w < WORDS,
            "page {i} word {w} outside the region"
        );
        // SAFETY: inside the region (checked above); these scenarios never free it.
        unsafe { self.base.add(i * WORDS + w) }
    }

    /// Writes every word of `class`'s pages with `tag`.
    pub fn write(&self, class: &[usize], tag: u64) {
        for &i in class {
            for w in 0..WORDS {
                // SAFETY: a word of the live region (`word`).
                unsafe { self.word(i, w).write_volatile(value(tag, i, w)) };
            }
        }
    }

    /// Checks every word of `class`'s pages against `tag`.
    pub fn check(&self, class: &[usize], tag: u64, what: &str) -> Res<()> {
        for &i in class {
            for w in 0..WORDS {
                // SAFETY: a word of the live region (`word`).
                let got = unsafe { self.word(i, w).read_volatile() };
                if got != value(tag, i, w) {
                    return Err(format!(
                        "{what}: page {i} word {w}: {got:#x} != {:#x}",
                        value(tag, i, w)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rank `r` adds 1 to its own word of every page of `class` and reads rank `other`'s
    /// (which must never go back), in a loop across the kill: it prints `faulting=1` after
    /// the first pass and ends `rounds` passes after `go` exists. Returns the passes.
    pub fn fault_across_kill(
        &self,
        class: &[usize],
        r: usize,
        other: usize,
        go: &std::path::Path,
        rounds: usize,
    ) -> Res<u64> {
        let mut iterations = 0u64;
        let mut after = 0;
        let mut last = vec![0u64; class.len()];
        loop {
            for (k, &i) in class.iter().enumerate() {
                // SAFETY: a word of the live region; word r is only written by rank r.
                unsafe {
                    let w = self.word(i, r);
                    w.write_volatile(w.read_volatile() + 1);
                }
                // SAFETY: a word of the live region.
                let seen = unsafe { self.word(i, other).read_volatile() };
                if seen < last[k] {
                    return Err(format!("E page {i}: word {other} went back"));
                }
                last[k] = seen;
            }
            iterations += 1;
            if iterations == 1 {
                say("faulting=1");
            }
            if go.exists() {
                after += 1;
                if after >= rounds {
                    return Ok(iterations);
                }
            } else if iterations > 1_000_000 {
                return Err("the go file never appeared".into());
            }
        }
    }

    /// Rank `r`'s word of every page of `class` is `iterations` (the loop's count).
    pub fn check_counts(&self, class: &[usize], r: usize, iterations: u64) -> Res<()> {
        for &i in class {
            // SAFETY: a word of the live region.
            let got = unsafe { self.word(i, r).read_volatile() };
            if got != iterations {
                return Err(format!(
                    "E page {i}: rank {r}'s word is {got}, it added 1 {iterations} times"
                ));
            }
        }
        Ok(())
    }

    /// Reads page `i`, whose every copy died: the driver must end this process (code 75);
    /// returns only with the error of a read that was answered.
    pub fn read_lost(&self, i: usize) -> Res<()> {
        say(&format!("lost_access={}", self.first + i as u64));
        // SAFETY: a word of the live region.
        let v = unsafe { self.word(i, 0).read_volatile() };
        Err(format!("lost page {i} read {v:#x}"))
    }
}

/// The victim prints `victim=ready` and sleeps until the test SIGKILLs it.
pub fn victim(rank: usize) -> Res<()> {
    say("victim=ready");
    std::thread::sleep(Duration::from_secs(120));
    Err(format!("rank {rank} was not killed within 120 s"))
}

/// The survivor's line (`survivor=ok`, the loop's count, protocol counters, failures
/// handled, then `extra`).
pub fn survivor_line(d: &Dsm, iterations: u64, extra: &str) {
    let s = d.protocol_stats();
    let failures: Vec<u64> = d.failures_handled().iter().map(|&n| n as u64).collect();
    say(&format!(
        "survivor=ok iterations={iterations} resent={} promoted={} failures={}{extra}",
        s.requests_resent,
        s.pages_promoted,
        list(&failures),
    ));
}

/// Prints the pages reported lost and those whose every copy died; fails if they differ.
pub fn check_lost(lost: &[u64], expected: &[u64], who: &str) -> Res<()> {
    say(&format!(
        "lost={} expected_lost={}",
        list(lost),
        list(expected)
    ));
    if lost != expected {
        return Err(format!(
            "{who} reports pages {lost:?} lost, {expected:?} lost every copy"
        ));
    }
    Ok(())
}
