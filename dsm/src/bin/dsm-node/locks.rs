//! Scenarios of a node that stops answering while others wait for it: `lock-holder-killed`
//! (the holder of a DSM lock dies while another rank waits for the lock) and `stalled`
//! (a rank is stopped past the fault timeout while the others wait at a barrier).
use std::time::{Duration, Instant};

use dsm::Dsm;

use super::killed::say;
use super::{wait_file, Args, Res};

const PAGE: usize = 4096;

/// Waits (at most 120 s) until `ready` holds.
pub(super) fn until(what: &str, mut ready: impl FnMut() -> bool) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        if Instant::now() > deadline {
            return Err(format!("{what} within 120 s"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// See `lock-holder-killed` in the module doc of `dsm-node`. Returns only on a failed check
/// (or, for the survivors, once done; rank 0 without `--keep-copy` waits for
/// `--stop-file`).
pub fn lock_holder_killed(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 3 {
        return Err("lock-holder-killed needs --size 3".into());
    }
    let region = d.alloc(2 * PAGE).map_err(|e| e.to_string())?;
    let counter = region.as_ptr() as *mut u64;
    let bar = || d.barrier().map_err(|e| e.to_string());
    bar()?;
    if a.rank == 1 {
        d.lock(0).map_err(|e| e.to_string())?;
        // SAFETY: the first word of the region; rank 1 becomes the page's only owner.
        unsafe { counter.write_volatile(7) };
    }
    bar()?;
    if a.rank == 0 && a.keep_copy {
        // SAFETY: inside the region. Rank 0 keeps a read copy of the counter's page.
        let v = unsafe { counter.read_volatile() };
        if v != 7 {
            return Err(format!("rank 0 read the counter as {v}, rank 1 wrote 7"));
        }
    }
    bar()?;
    match a.rank {
        1 => {
            say("holding=1");
            std::thread::sleep(Duration::from_secs(120));
            Err("rank 1 was not killed within 120 s".into())
        }
        2 => {
            say("waiting=1");
            d.lock(0)
                .map_err(|e| format!("lock after the holder died: {e}"))?;
            let inherited = d.lock_inherited(0);
            // SAFETY: inside the region. Without a surviving copy the driver ends this
            // process here (the page is lost), never returning a zero.
            let v = unsafe { counter.read_volatile() };
            say(&format!(
                "inherited={} counter={v}",
                inherited.map_or("-".into(), |n| n.to_string())
            ));
            if inherited != Some(1) {
                return Err(format!(
                    "the grant named {inherited:?} as the dead holder, not rank 1"
                ));
            }
            if v != 7 {
                return Err(format!("rank 2 read the counter as {v}, rank 1 wrote 7"));
            }
            // SAFETY: inside the region, under the lock.
            unsafe { counter.write_volatile(v + 1) };
            d.unlock(0).map_err(|e| e.to_string())?;
            bar()?;
            // Not gone before rank 0 has read the counter: this process holds its page's
            // only copy now (an exit here made rank 0's read find the page lost, under load).
            bar()?;
            say("survivor=ok");
            Ok(())
        }
        _ => {
            until("rank 2 never queued for lock 0", || {
                d.lock_waiters(0) == vec![2]
            })?;
            say("queued=2");
            if a.keep_copy {
                bar()?;
                d.lock(0).map_err(|e| e.to_string())?;
                // SAFETY: inside the region, under the lock.
                let v = unsafe { counter.read_volatile() };
                d.unlock(0).map_err(|e| e.to_string())?;
                // Rank 2 may end once this read is done.
                bar()?;
                say(&format!(
                    "counter={v} dead={:?} survivor=ok",
                    d.dead_nodes()
                ));
                if v != 8 {
                    return Err(format!(
                        "rank 0 read the counter as {v} after rank 2 made it 8"
                    ));
                }
                Ok(())
            } else {
                until("no page was reported lost", || !d.lost_pages().is_empty())?;
                say(&format!(
                    "lost={}",
                    d.lost_pages()
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ));
                wait_file(a.stop_file.as_ref(), "stop-file")?;
                Ok(())
            }
        }
    }
}

/// See `stalled` in the module doc of `dsm-node`.
pub fn stalled(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 3 {
        return Err("stalled needs --size 3".into());
    }
    let region = d.alloc(3 * PAGE).map_err(|e| e.to_string())?;
    let base = region.as_ptr();
    let word = |r: usize| (base as usize + r * PAGE) as *mut u64;
    // SAFETY: each rank's own page of the region.
    unsafe { word(a.rank).write_volatile(a.rank as u64 + 1) };
    d.barrier().map_err(|e| e.to_string())?;
    if a.rank == 2 {
        say("stall=ready");
        wait_file(a.go_file.as_ref(), "go-file")?;
    }
    let arrived = std::thread::scope(|s| {
        // Rank 0 says when a probe found rank 2 silent but alive (the test then resumes it).
        let watcher = (a.rank == 0).then(|| {
            s.spawn(|| {
                let seen = until("no probe found rank 2 stalled", || {
                    d.stalled_nodes().contains(&2)
                });
                if seen.is_ok() {
                    say("stalled=2");
                }
                seen
            })
        });
        let r = d.barrier().map_err(|e| e.to_string());
        let seen = watcher.map(|w| w.join().unwrap_or(Err("watcher panicked".into())));
        r.and(seen.unwrap_or(Ok(())))
    });
    arrived?;
    // Every rank still serves and reads: each reads every page.
    for r in 0..3 {
        // SAFETY: inside the region.
        let v = unsafe { word(r).read_volatile() };
        if v != r as u64 + 1 {
            return Err(format!("page of rank {r} read {v}, expected {}", r + 1));
        }
    }
    d.barrier().map_err(|e| e.to_string())?;
    say(&format!(
        "stalled_ok=1 dead={} stalled={:?}",
        d.dead_nodes()
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(","),
        d.stalled_nodes()
    ));
    Ok(())
}
