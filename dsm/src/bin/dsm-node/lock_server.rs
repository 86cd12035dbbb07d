//! Scenarios of the DSM locks' server (node 0) dying: `server-holding-killed` (node 0 holds
//! lock 0 while ranks 1 and 2 wait for it, and has granted lock 1 to rank 1) and
//! `server-killed` (node 0 only serves lock 0: rank 1 holds it, rank 2 waits).
use std::time::Duration;

use dsm::Dsm;

use super::killed::say;
use super::locks::until;
use super::{Args, Res};

const PAGE: usize = 4096;

fn holder(inherited: Option<u32>) -> String {
    inherited.map_or("-".into(), |n| n.to_string())
}

/// Node 0 sleeps until the test SIGKILLs it.
fn victim() -> Res<()> {
    std::thread::sleep(Duration::from_secs(120));
    Err("rank 0 was not killed within 120 s".into())
}

/// See `server-holding-killed` in the module doc of `dsm-node`.
pub fn server_holding_killed(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 3 {
        return Err("server-holding-killed needs --size 3".into());
    }
    let region = d.alloc(2 * PAGE).map_err(|e| e.to_string())?;
    let counter = region.as_ptr() as *mut u64;
    let word1 = (region.as_ptr() as usize + PAGE) as *mut u64;
    let e = |e: dsm::DsmError| e.to_string();
    d.barrier().map_err(e)?;
    match a.rank {
        0 => {
            d.lock(0).map_err(e)?;
            // SAFETY: the region's first word; rank 0 owns its page.
            unsafe { counter.write_volatile(7) };
            // Lock 2: held by rank 0 with nobody waiting (only its deputy, rank 1, is told).
            d.lock(2).map_err(e)?;
        }
        1 => {
            d.lock(1).map_err(e)?;
            // SAFETY: the first word of the region's second page, under lock 1.
            unsafe { word1.write_volatile(1) };
        }
        _ => {}
    }
    d.barrier().map_err(e)?;
    if a.rank == 1 {
        // SAFETY: inside the region: a read copy of the counter survives rank 0.
        let v = unsafe { counter.read_volatile() };
        if v != 7 {
            return Err(format!("rank 1 read the counter as {v}, rank 0 wrote 7"));
        }
    }
    d.barrier().map_err(e)?;
    match a.rank {
        0 => {
            until("ranks 1 and 2 never queued for lock 0", || {
                let mut w = d.lock_waiters(0);
                w.sort_unstable();
                w == vec![1, 2]
            })?;
            say("queued=1,2");
            victim()
        }
        1 => {
            say("waiting=1");
            d.lock(0)
                .map_err(|e| format!("lock 0 after the server died: {e}"))?;
            let inherited = d.lock_inherited(0);
            // SAFETY: inside the region, under lock 0.
            let v = unsafe { counter.read_volatile() };
            say(&format!(
                "rank=1 inherited={} counter={v}",
                holder(inherited)
            ));
            // SAFETY: inside the region, under locks 0 and 1.
            unsafe {
                counter.write_volatile(v + 1);
                word1.write_volatile(2);
            }
            d.unlock(0).map_err(e)?;
            // Lock 1 is still held here: rank 2 must not get it before the release.
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: inside the region, under lock 1.
            unsafe { word1.write_volatile(3) };
            d.unlock(1).map_err(e)?;
            survivors_end(d, counter, "rank=1")
        }
        _ => {
            say("waiting=1");
            d.lock(0)
                .map_err(|e| format!("lock 0 after the server died: {e}"))?;
            let inherited = d.lock_inherited(0);
            // SAFETY: inside the region, under lock 0.
            let v = unsafe { counter.read_volatile() };
            say(&format!(
                "rank=2 inherited={} counter={v}",
                holder(inherited)
            ));
            // SAFETY: inside the region, under lock 0.
            unsafe { counter.write_volatile(v + 1) };
            d.unlock(0).map_err(e)?;
            d.lock(1).map_err(e)?;
            // SAFETY: inside the region, under lock 1.
            let w = unsafe { word1.read_volatile() };
            d.unlock(1).map_err(e)?;
            say(&format!("rank=2 word1={w}"));
            // Lock 2 was released by rank 0's death: its next holder is told.
            d.lock(2).map_err(e)?;
            let inherited = d.lock_inherited(2);
            d.unlock(2).map_err(e)?;
            say(&format!("rank=2 inherited2={}", holder(inherited)));
            survivors_end(d, counter, "rank=2")
        }
    }
}

/// Both survivors pass two barriers (coordinated by rank 1) and read the counter.
fn survivors_end(d: &Dsm, counter: *mut u64, who: &str) -> Res<()> {
    d.barrier().map_err(|e| e.to_string())?;
    // SAFETY: inside the region; nobody writes it after the barrier.
    let v = unsafe { counter.read_volatile() };
    d.barrier().map_err(|e| e.to_string())?;
    say(&format!(
        "{who} end={v} coordinator={} dead={:?} survivor=ok",
        d.coordinator(),
        d.dead_nodes()
    ));
    Ok(())
}

/// See `server-killed` in the module doc of `dsm-node`.
pub fn server_killed(d: &Dsm, a: &Args) -> Res<()> {
    if a.size != 3 {
        return Err("server-killed needs --size 3".into());
    }
    let region = d.alloc(2 * PAGE).map_err(|e| e.to_string())?;
    let counter = region.as_ptr() as *mut u64;
    let e = |e: dsm::DsmError| e.to_string();
    d.barrier().map_err(e)?;
    if a.rank == 1 {
        d.lock(0).map_err(e)?;
        // SAFETY: the region's first word, under lock 0.
        unsafe { counter.write_volatile(7) };
    }
    d.barrier().map_err(e)?;
    match a.rank {
        0 => {
            until("rank 2 never queued behind rank 1 for lock 0", || {
                d.lock_waiters(0) == vec![2]
            })?;
            say("queued=2");
            victim()
        }
        1 => {
            say("holding=1");
            // Holds lock 0 across the server's death and the takeover.
            until("rank 1 never became the coordinator", || {
                d.coordinator() == 1
            })?;
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: inside the region, under lock 0.
            unsafe { counter.write_volatile(8) };
            d.unlock(0).map_err(e)?;
            survivors_end(d, counter, "rank=1")
        }
        _ => {
            say("waiting=1");
            d.lock(0)
                .map_err(|e| format!("lock 0 after the server died: {e}"))?;
            let inherited = d.lock_inherited(0);
            // SAFETY: inside the region, under lock 0.
            let v = unsafe { counter.read_volatile() };
            say(&format!(
                "rank=2 inherited={} counter={v}",
                holder(inherited)
            ));
            // SAFETY: inside the region, under lock 0.
            unsafe { counter.write_volatile(v + 1) };
            d.unlock(0).map_err(e)?;
            survivors_end(d, counter, "rank=2")
        }
    }
}
