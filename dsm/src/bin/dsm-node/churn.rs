//! The `churn` and `joiner` scenarios: counters under the DSM lock while a node joins or
//! leaves (see the module doc of `dsm-node`).
use std::time::{Duration, Instant};

use dsm::{Dsm, DsmConfig};
use fabric::FabricConfig;

use super::{Args, Res};

/// Words per page.
const WORDS: usize = 512;
/// The word of page 0 the joiner sets to 1 once its locked iterations are over.
const JOINER_DONE: usize = 2;
/// Bound on a scenario's wait for a membership change ("does not hang").
const CHANGE_LIMIT: Duration = Duration::from_secs(90);

#[derive(PartialEq, Eq)]
pub enum Outcome {
    Stayed,
    Left,
}

fn migration_counters(d: &Dsm) -> String {
    let s = d.protocol_stats();
    format!(
        "forwarded={} delayed={} released={} entries_sent={} entries_received={}",
        s.requests_forwarded,
        s.requests_delayed,
        s.requests_released,
        s.entries_sent,
        s.entries_received
    )
}

pub fn churn(d: &Dsm, a: &Args) -> Res<Outcome> {
    let e = |e: dsm::DsmError| e.to_string();
    let pages = a.pages.max(1);
    let region = d.alloc(pages * WORDS * 8).map_err(e)?;
    let mem = region.as_ptr() as *mut u64;
    if a.rank == 0 {
        if let Some(f) = &a.contact_file {
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, d.contact().map_err(e)?).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, f).map_err(|e| e.to_string())?;
        }
    }
    d.barrier().map_err(e)?;
    let leaving = a.leave == Some(a.rank);
    let start = Instant::now();
    let (mut done, mut after) = (0u64, 0usize);
    let epoch0 = d.epoch();
    loop {
        d.lock(0).map_err(e)?;
        for p in 0..pages {
            // SAFETY: inside the region; counters are written under lock 0 only.
            unsafe {
                let w = mem.add(p * WORDS);
                w.write_volatile(w.read_volatile() + 1);
            }
        }
        d.unlock(0).map_err(e)?;
        for p in 0..pages {
            // SAFETY: inside the region; a racy read of a counter (sequentially consistent).
            let _ = unsafe { mem.add(p * WORDS + 1).read_volatile() };
        }
        done += 1;
        if leaving {
            if done >= a.rounds as u64 {
                break;
            }
        } else if d.epoch() > epoch0 {
            after += 1;
            if after >= a.rounds {
                break;
            }
        } else if start.elapsed() > CHANGE_LIMIT {
            return Err(format!(
                "no membership change committed within {CHANGE_LIMIT:?} ({done} iterations)"
            ));
        }
    }
    println!(
        "krun-result iterations={done} epoch={} {}",
        d.epoch(),
        migration_counters(d)
    );
    if leaving {
        d.leave(CHANGE_LIMIT).map_err(e)?;
        println!("krun-result left=1 {}", migration_counters(d));
        return Ok(Outcome::Left);
    }
    if a.rank == 0 && a.joiner_locks > 0 {
        // The joiner's increments under the lock count too: wait for its flag.
        let deadline = Instant::now() + CHANGE_LIMIT;
        // SAFETY: word 2 of page 0, inside the region; written by the joiner once.
        while unsafe { mem.add(JOINER_DONE).read_volatile() } != 1 {
            if Instant::now() > deadline {
                return Err(format!(
                    "the joiner did not end its {} locked iterations within {CHANGE_LIMIT:?}",
                    a.joiner_locks
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    d.barrier().map_err(e)?;
    if a.rank == 0 {
        let counters: Vec<String> = (0..pages)
            // SAFETY: inside the region; nobody writes after the barrier.
            .map(|p| unsafe { mem.add(p * WORDS).read_volatile() }.to_string())
            .collect();
        let members: Vec<String> = d.members().iter().map(|m| m.to_string()).collect();
        println!(
            "krun-result counters={} members={} changes={}",
            counters.join(","),
            members.join(","),
            d.changes().len()
        );
    }
    d.barrier().map_err(e)?;
    println!("krun-result final {}", migration_counters(d));
    Ok(Outcome::Stayed)
}

/// Waits for the contact file and joins the DSM it names (within [`CHANGE_LIMIT`]).
pub fn join_through(a: &Args) -> Res<Dsm> {
    let path = a
        .contact_file
        .as_ref()
        .ok_or("a joiner needs --contact-file")?;
    let deadline = Instant::now() + CHANGE_LIMIT;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let contact = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let fabric = FabricConfig::with_provider(a.provider)
        .with_env()
        .map_err(|e| e.to_string())?;
    let config = DsmConfig::default().with_env().map_err(|e| e.to_string())?;
    Dsm::join(&contact, &fabric, config, CHANGE_LIMIT).map_err(|e| format!("join: {e}"))
}

pub fn joiner(a: &Args) -> Res<()> {
    let d = join_through(a)?;
    println!(
        "krun-result joined={} epoch={} {}",
        d.rank(),
        d.epoch(),
        migration_counters(&d)
    );
    let region = *d.regions().first().ok_or("the DSM has no region")?;
    let mem = region.as_ptr() as *const u64;
    let pages = region.len() / (WORDS * 8);
    let mut last = vec![0u64; pages];
    for _ in 0..20 {
        for (p, l) in last.iter_mut().enumerate() {
            // SAFETY: inside the region; a racy read of a counter (sequentially consistent).
            let v = unsafe { mem.add(p * WORDS).read_volatile() };
            if v < *l {
                return Err(format!("counter {p} went back from {l} to {v}"));
            }
            *l = v;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("krun-result read={}", last.iter().sum::<u64>());
    if a.joiner_locks > 0 {
        let mem = region.as_ptr() as *mut u64;
        for _ in 0..a.joiner_locks {
            d.lock(0).map_err(|e| e.to_string())?;
            for p in 0..pages {
                // SAFETY: inside the region; counters are written under lock 0 only.
                unsafe {
                    let w = mem.add(p * WORDS);
                    w.write_volatile(w.read_volatile() + 1);
                }
            }
            d.unlock(0).map_err(|e| e.to_string())?;
        }
        // SAFETY: inside the region; only the joiner writes this word.
        unsafe { mem.add(JOINER_DONE).write_volatile(1) };
        println!("krun-result joiner_iterations={}", a.joiner_locks);
    }
    if !d.wait_dismissed(Duration::from_secs(120)) {
        return Err("node 0 did not end the job within 120 s".into());
    }
    println!("krun-result dismissed=1 {}", migration_counters(&d));
    Ok(())
}
