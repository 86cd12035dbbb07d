//! `speculation-race`: a writer changes a page between a reader's speculative read of the
//! owner's published copy and its join (forced with `KRUN_DSM_JOIN_HOLD` at rank 1): the
//! generation check must reject the older copy and read the page again (a fallback), and a
//! later join with an unchanged copy must use its speculative read (one round trip).
use std::path::PathBuf;

use dsm::Dsm;

use super::locks::until;
use super::{wait_file, Args, Res};

const PAGE: usize = 4096;

fn with_suffix(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// See `speculation-race` in the module doc of `dsm-node`.
pub fn speculation_race(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 3 {
        return Err("speculation-race needs --size 3".into());
    }
    let hold = a
        .go_file
        .clone()
        .ok_or("speculation-race needs --go-file")?;
    let held = with_suffix(&hold, ".held");
    let wrote = with_suffix(&hold, ".wrote");
    let region = d.alloc(PAGE).map_err(|e| e.to_string())?;
    let p = region.as_ptr() as *mut u64;
    // SAFETY (every access): the first word of a live region.
    let read = || unsafe { p.read_volatile() };
    let write = |v: u64| unsafe { p.write_volatile(v) };
    let bar = || d.barrier().map_err(|e| e.to_string());
    let expect = |what: &str, got: u64, want: u64| -> Res<()> {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: read {got}, expected {want}"))
        }
    };
    if a.rank == 0 {
        write(1);
    }
    bar()?;
    if a.rank == 1 {
        // By message (no hint yet): rank 1 learns rank 0 is the owner.
        expect("first read", read(), 1)?;
    }
    bar()?;
    if a.rank == 0 {
        write(2); // invalidates rank 1 (its hint stays rank 0)
    }
    bar()?;
    if a.rank == 2 {
        // By message: rank 0 becomes a read owner and publishes value 2.
        expect("rank 2's read", read(), 2)?;
    }
    bar()?;
    match a.rank {
        1 => {
            // The fault thread reads the slot (value 2), creates `<hold>.held`, and posts
            // its join only once `<hold>` exists: by then rank 0 wrote 3 and published it.
            let before = d.speculation_stats();
            let v = read();
            let after = d.speculation_stats();
            expect("the raced read", v, 3)?;
            println!(
                "krun-result race_value={v} race_speculative={} race_fallbacks={}",
                after.0 - before.0,
                after.1 - before.1
            );
        }
        0 => {
            wait_file(Some(&held), "go-file")?;
            let published = d.speculation_stats().2;
            write(3); // closes the word (rank 1 has not joined yet), invalidates rank 2
            std::fs::write(&wrote, b"wrote").map_err(|e| e.to_string())?;
            // Rank 2's read makes rank 0 publish value 3 under the next generation.
            until("rank 0 published the page again", || {
                d.speculation_stats().2 > published
            })?;
            std::fs::write(&hold, b"go").map_err(|e| e.to_string())?;
        }
        _ => {
            wait_file(Some(&wrote), "go-file")?;
            expect("rank 2's second read", read(), 3)?;
        }
    }
    bar()?;
    if a.rank == 0 {
        write(4); // invalidates ranks 1 and 2
    }
    bar()?;
    if a.rank == 2 {
        expect("rank 2's third read", read(), 4)?; // rank 0 publishes value 4
    }
    bar()?;
    if a.rank == 1 {
        // `<hold>` exists: the join goes on at once, and the slot is the current copy.
        let before = d.speculation_stats();
        let v = read();
        let after = d.speculation_stats();
        expect("the later read", v, 4)?;
        println!(
            "krun-result later_value={v} later_speculative={} later_fallbacks={}",
            after.0 - before.0,
            after.1 - before.1
        );
    }
    bar()?;
    d.free(region).map_err(|e| e.to_string())
}
