//! `dsm-node`: one process of a multi-process DSM scenario (a test and diagnostic tool).
//!
//! ```text
//! dsm-node <scenario> --provider <tcp|shm> --bootstrap <ip:port> --rank <r> --size <n>
//!          [--pages <per rank>] [--rounds <n>]
//! ```
//!
//! | scenario  | what happens |
//! |-----------|--------------|
//! | `share`   | each rank writes its part of a region, reads every other part after a barrier (byte by byte); then ownership of shared pages moves round-robin between the ranks, checked after every barrier; a counter incremented under the DSM lock; false sharing (each rank its own word of one page) |
//! | `mgs`     | Modified Gram-Schmidt on an `--rows` x `--cols` matrix in a shared region (column-major, column j computed by rank j % size), checked against a serial MGS: the same Q within 1e-9 and ||Q^T Q - I|| < 1e-10; prints seconds, faults and one-sided fetches (`KRUN_DSM_LOCATOR=static|dynamic` picks the directory's locator) |
//! | `serve-then-free` | rank 1 writes the pages of a region; rank 0 reads them (rank 1 serves and publishes them), then every rank frees the region at once and allocates and checks a new one (run with `KRUN_DSM_PUBLISH_DELAY_MS` to make the publications outlast the free) |
//! | `unreachable` | rank 1 writes pages 0 and 1 (3 ranks), prints `owner=ready` and sleeps (the test SIGKILLs it); ranks 0 and 2 wait for `--go-file` to exist, then rank 0 reads page 1 (its manager is rank 1) and rank 2 reads page 0 (its manager, rank 0, forwards to rank 1): the fault timeout (`KRUN_DSM_FAULT_TIMEOUT_MS`) must end them with exit code 75 and an error naming the page and node 1 |
//! | `reader-killed` | 3 ranks: rank 0 writes `--pages` data pages and two flag pages (all managed by rank 0 or 1), ranks 1 and 2 read them (rank 0 is their read owner, rank 2 in every copyset); rank 2 prints `reader=ready` and sleeps (the test SIGKILLs it); once `--go-file` exists rank 1 rewrites the data pages (each write must invalidate the dead rank 2's copy) and raises a flag, rank 0 waits for it, checks every word and acknowledges on the other flag page; they print `writer=ok` / `checker=ok` with the dead nodes they know, wait for `--stop-file`, then pass two DSM barriers among themselves (exit 0) |
//! | `threads` | rank 0 writes `--pages` pages, rank 1 reads them (hint), rank 0 rewrites them and rank 2 reads them (rank 0 publishes); then `--app-threads` threads of rank 1 read disjoint pages at once, one-sided (run with `KRUN_DSM_FAULT_THREADS`); prints the most fault threads seen inside one-sided operations at once |
//! | `latency` | rank 0 writes pages; timed: rank 1's read faults through messages (owner downgrade), then rank 2's one-sided read faults and sequential scan with prefetch (3 ranks) |
//! | `churn` | counters on `--pages` pages, each rank adding 1 to every counter under the DSM lock and reading them without it, while the node set changes: rank 0 writes its contact to `--contact-file` (for a `joiner`); a rank named by `--leave` leaves after `--rounds` iterations; the others go on until they see the change committed, then `--rounds` more; rank 0 prints every counter, every rank its iterations and the migration counters |
//! | `manager-killed` | 4 ranks; rank 3 manages entries and owns pages, prints `victim=ready` and sleeps (the test SIGKILLs it, then creates `--go-file`); ranks 0 and 1 fault in a loop across the kill (`faulting=1`), rank 2 then reads pages whose manager was rank 3 (`asked=1`: its request went to the dead manager); the survivors check every page that had a surviving copy (promoted copies, rewritten after), rank 0 checks the pages reported lost against those whose every copy died (`lost=`, `expected_lost=`), rank 2 finally reads a lost page (the driver must end it with code 75 naming the page) and ranks 0 and 1 wait for `--stop-file` (run with `KRUN_DSM_FAIL_HOLD` to hold the failure's change until rank 2 asked) |
//! | `coordinator-killed` | 4 ranks; rank 0 (the coordinator of changes and barriers) writes pages, ranks 1-3 read some of them, then rank 0 prints `victim=ready` and sleeps (the test SIGKILLs it, then creates `--go-file`); ranks 1 and 2 fault in a loop across the kill (`faulting=1`); every survivor then passes barriers coordinated by rank 1 and checks the pages with a surviving copy (promoted, rewritten after), rank 1 checks the pages reported lost against those whose every copy died (`lost=`, `expected_lost=`), rank 3 finally reads a lost page (the driver must end it with code 75 naming the page) and ranks 1 and 2 wait for `--stop-file` |
//! | `leave-coordinator-killed` | 3 ranks; ranks 0 and 1 write a page each, every rank reads both; rank 2 leaves (`leaving=1`) while rank 0, the coordinator, runs with `KRUN_DSM_CHANGE_PAUSE=<phase>:<file>` (it stops after the leave's setting or logical phase and creates the file; the test SIGKILLs it, then creates `--go-file`); rank 1 (`waiting=1`) then enters a barrier, whose probe finds node 0 dead: rank 1 becomes the coordinator, finishes the leave (every member had switched) or drops it (nobody had; rank 2 asks again), and runs node 0's failure; rank 2 prints `left=1` and ends; rank 1 checks both pages and prints its members, coordinator, dead nodes and lost pages |
//! | `join-coordinator-killed` | 2 ranks; each writes a page, both read both; rank 0, the coordinator, writes its contact to `--contact-file` for a `late-joiner` and runs the join with `KRUN_DSM_CHANGE_PAUSE=<phase>:<file>` (it stops after the join's setting or logical phase and creates the file; the test SIGKILLs it, then creates `--go-file`); rank 1 (`waiting=1`) enters a barrier whose probe finds node 0 dead: it becomes the coordinator, finishes the join (every member had switched) or drops it (nobody had; the joiner asks again), runs node 0's failure, waits until the joiner is a member and prints `survivor=ok` with its members, coordinator, dead nodes and lost pages, then waits for `--stop-file` |
//! | `late-joiner` | no bootstrap: joins through `--contact-file` (the join of `join-coordinator-killed`), checks both pages of the first region, prints `joined=` and `joiner=ok` with its members and coordinator, and waits for `--stop-file` |
//! | `lock-holder-killed` | 3 ranks; rank 1 takes DSM lock 0 and writes the counter (the first word of a region: rank 1 owns its page), with `--keep-copy 1` rank 0 then reads it (a read copy); rank 1 prints `holding=1` and sleeps (the test SIGKILLs it); rank 2 prints `waiting=1` and waits for lock 0; rank 0 prints `queued=2` once rank 2 is in the lock's queue. Rank 0's lock server probes the overdue holder, its failure's change runs, and lock 0 goes to rank 2 naming rank 1 (`inherited=1`): with the copy, rank 2 reads 7 (the copy was promoted), writes 8, and rank 0 reads 8 under the lock (`survivor=ok`; rank 2 ends only after a second barrier, once rank 0 has read: it holds the page's only copy); without it, rank 2's read ends it with code 75 (the page is lost) and rank 0 prints `lost=` and waits for `--stop-file` |
//! | `server-holding-killed` | 3 ranks; rank 0 (the DSM locks' server) takes lock 0 and writes the counter 7 (rank 1 then reads it: a read copy), rank 0 also takes lock 2 (nobody waits for it), rank 1 takes lock 1 (granted by rank 0) and writes a word; ranks 1 and 2 print `waiting=1` and wait for lock 0; rank 0 prints `queued=1,2` once both are in its queue and sleeps (the test SIGKILLs it). A waiter's probe finds rank 0 dead, rank 1 runs its failure and rebuilds the lock table from the survivors' reports: lock 0 goes to rank 1 naming rank 0 (`inherited=0`, counter 7 from the promoted copy, written 8), then to rank 2 (`inherited=-`, writes 9); rank 2 then takes lock 1, which rank 1 kept across the takeover, and must read the word rank 1 wrote just before releasing it (`word1=3`), then takes lock 2 and must be told rank 0 died holding it (`inherited2=0`); both pass two barriers and print `end=9` |
//! | `server-killed` | 3 ranks; rank 1 takes lock 0 and writes the counter 7, rank 2 waits for it (`waiting=1`), rank 0 prints `queued=2` once rank 2 is queued behind rank 1 and sleeps (the test SIGKILLs it: it only served the lock); rank 1 keeps the lock until it is the coordinator, writes 8 and releases; rank 2 gets it with no dead holder named (`inherited=-`, `counter=8`), writes 9; both pass two barriers (`end=9`) |
//! | `stalled` | 3 ranks write their pages and meet at a barrier; rank 2 prints `stall=ready` and waits for `--go-file` (the test SIGSTOPs it, creates the file, and SIGCONTs it once rank 0 printed `stalled=2`: a probe past the fault timeout found rank 2 silent but its process alive); every rank passes the next barrier, reads every page, and prints `stalled_ok=1` with the dead nodes it knows (none) |
//! | `speculation-race` | 3 ranks; rank 0 owns a page rank 1 has a hint for; rank 1 (run with `KRUN_DSM_JOIN_HOLD=<--go-file>`) reads it: its fault thread reads rank 0's published copy (value 2), creates `<go-file>.held` and waits for `<go-file>` before joining; meanwhile rank 0 writes 3, rank 2 reads it (rank 0 publishes it again) and rank 0 creates `<go-file>`: rank 1's join sees the new generation, rejects the copy it read and reads again (`race_value=3 race_fallbacks=1`); later, with the copy unchanged, rank 1's speculative read is used (`later_value=4 later_speculative=1 later_fallbacks=0`) |
//! | `joiner` | no bootstrap: joins the DSM of `--contact-file` while it runs, reads the counters of its first region (never decreasing), with `--joiner-locks N` adds 1 to every counter under the DSM lock N times (then raises a flag word that rank 0 of `churn` waits for before its final count), prints its migration counters, and waits until node 0 ends the job |
//!
//! Results go to stdout as `krun-result key=value`; the exit code is 0 when every check
//! passed, 1 when one failed, 2 on bad arguments.
#[path = "dsm-node/churn.rs"]
mod churn;
#[path = "dsm-node/coordinator.rs"]
mod coordinator;
#[path = "dsm-node/failure.rs"]
mod failure;
#[path = "dsm-node/killed.rs"]
mod killed;
#[path = "dsm-node/lock_server.rs"]
mod lock_server;
#[path = "dsm-node/locks.rs"]
mod locks;
#[path = "dsm-node/speculation.rs"]
mod speculation;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use dsm::{Dsm, DsmConfig};
use fabric::bootstrap::BootstrapClient;
use fabric::{FabricConfig, Provider};

type Res<T> = std::result::Result<T, String>;

struct Args {
    scenario: String,
    provider: Provider,
    bootstrap: SocketAddr,
    rank: usize,
    size: usize,
    pages: usize,
    rounds: usize,
    rows: usize,
    cols: usize,
    go_file: Option<std::path::PathBuf>,
    stop_file: Option<std::path::PathBuf>,
    app_threads: usize,
    contact_file: Option<std::path::PathBuf>,
    leave: Option<usize>,
    /// `joiner`: iterations under the DSM lock after joining (0: none); `churn`: rank 0
    /// waits for the joiner's to end before its final count.
    joiner_locks: usize,
    /// `lock-holder-killed`: rank 0 keeps a read copy of the counter.
    keep_copy: bool,
}

fn parse() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let scenario = it.next().ok_or("missing scenario")?;
    let mut a = Args {
        scenario,
        provider: Provider::Tcp,
        bootstrap: "127.0.0.1:0".parse().expect("literal"),
        rank: 0,
        size: 1,
        pages: 16,
        rounds: 12,
        rows: 512,
        cols: 32,
        go_file: None,
        stop_file: None,
        app_threads: 4,
        contact_file: None,
        leave: None,
        joiner_locks: 0,
        keep_copy: false,
    };
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{k} {v}: {e}");
        match k.as_str() {
            "--provider" => {
                a.provider = Provider::all()
                    .into_iter()
                    .find(|p| p.name() == v)
                    .ok_or_else(|| bad(&"unknown provider"))?
            }
            "--bootstrap" => a.bootstrap = v.parse().map_err(|e| bad(&e))?,
            "--rank" => a.rank = v.parse().map_err(|e| bad(&e))?,
            "--size" => a.size = v.parse().map_err(|e| bad(&e))?,
            "--pages" => a.pages = v.parse().map_err(|e| bad(&e))?,
            "--rounds" => a.rounds = v.parse().map_err(|e| bad(&e))?,
            "--rows" => a.rows = v.parse().map_err(|e| bad(&e))?,
            "--cols" => a.cols = v.parse().map_err(|e| bad(&e))?,
            "--go-file" => a.go_file = Some(v.into()),
            "--stop-file" => a.stop_file = Some(v.into()),
            "--app-threads" => a.app_threads = v.parse().map_err(|e| bad(&e))?,
            "--contact-file" => a.contact_file = Some(v.into()),
            "--leave" => a.leave = Some(v.parse().map_err(|e| bad(&e))?),
            "--joiner-locks" => a.joiner_locks = v.parse().map_err(|e| bad(&e))?,
            "--keep-copy" => a.keep_copy = v.parse::<u8>().map_err(|e| bad(&e))? != 0,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(a)
}

fn byte(rank: usize, round: usize, i: usize) -> u8 {
    (rank.wrapping_mul(131) ^ round.wrapping_mul(31) ^ i.wrapping_mul(7) ^ (i >> 9)) as u8
}

fn share(d: &Dsm, a: &Args) -> Res<()> {
    let page = 4096;
    let part = a.pages * page;
    let region = d.alloc(part * a.size).map_err(|e| e.to_string())?;
    let mem = region.as_ptr();
    println!("krun-result region={:#x}", mem as u64);
    let r = a.rank;
    // 1. Each rank writes its part, then reads everyone's.
    for i in 0..part {
        // SAFETY: inside the region; each rank writes only its own part here.
        unsafe { mem.add(r * part + i).write_volatile(byte(r, 0, i)) };
    }
    d.barrier().map_err(|e| e.to_string())?;
    for owner in 0..a.size {
        for i in 0..part {
            // SAFETY: inside the region; no rank writes between these barriers.
            let got = unsafe { mem.add(owner * part + i).read_volatile() };
            if got != byte(owner, 0, i) {
                return Err(format!(
                    "part of rank {owner} byte {i}: {got} != {}",
                    byte(owner, 0, i)
                ));
            }
        }
    }
    d.barrier().map_err(|e| e.to_string())?;
    // 2. Ownership moves back and forth: in round k, rank k % size rewrites the first page
    //    of every part and one word of every page; everybody checks after the barrier.
    for round in 1..=a.rounds {
        let writer = round % a.size;
        if r == writer {
            for owner in 0..a.size {
                for i in 0..page {
                    // SAFETY: inside the region; only `writer` writes in this round.
                    unsafe {
                        mem.add(owner * part + i)
                            .write_volatile(byte(owner, round, i))
                    };
                }
                for p in 1..a.pages {
                    // SAFETY: as above.
                    unsafe { mem.add(owner * part + p * page).write_volatile(round as u8) };
                }
            }
        }
        d.barrier().map_err(|e| e.to_string())?;
        for owner in 0..a.size {
            for i in 0..part {
                let expected = if i < page {
                    byte(owner, round, i)
                } else if i % page == 0 {
                    round as u8
                } else {
                    byte(owner, 0, i)
                };
                // SAFETY: inside the region; nobody writes until the next barrier.
                let got = unsafe { mem.add(owner * part + i).read_volatile() };
                if got != expected {
                    return Err(format!(
                        "round {round} (writer {writer}): part {owner} byte {i}: {got} != {expected}"
                    ));
                }
            }
        }
        d.barrier().map_err(|e| e.to_string())?;
    }
    // 3. A counter under the DSM lock, and false sharing: each rank bumps its own word of
    //    one page.
    let counters = d.alloc(page).map_err(|e| e.to_string())?;
    let c = counters.as_ptr() as *mut u64;
    let iters = 50u64;
    for _ in 0..iters {
        d.lock(0).map_err(|e| e.to_string())?;
        // SAFETY: words 0 and 100 of the counters page, only touched under lock 0.
        unsafe {
            let holder = c.add(100);
            let h = holder.read_volatile();
            if h != 0 {
                return Err(format!("lock 0 taken while rank {} holds it", h - 1));
            }
            holder.write_volatile(r as u64 + 1);
            c.write_volatile(c.read_volatile() + 1);
            holder.write_volatile(0);
        }
        d.unlock(0).map_err(|e| e.to_string())?;
        // SAFETY: word 1 + rank is this rank's own word.
        unsafe {
            let w = c.add(1 + r);
            w.write_volatile(w.read_volatile() + 1)
        };
    }
    d.barrier().map_err(|e| e.to_string())?;
    // SAFETY: nobody writes after the barrier.
    let total = unsafe { c.read_volatile() };
    if total != iters * a.size as u64 {
        // SAFETY: as above.
        let words: Vec<u64> = (0..8)
            .map(|k| unsafe { c.add(k).read_volatile() })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: as above.
        let again = unsafe { c.read_volatile() };
        return Err(format!(
            "locked counter {total} != {} (words {words:?}, {again} read again 200 ms later)",
            iters * a.size as u64
        ));
    }
    for k in 0..a.size {
        // SAFETY: as above.
        let v = unsafe { c.add(1 + k).read_volatile() };
        if v != iters {
            return Err(format!("rank {k}'s word {v} != {iters} (false sharing)"));
        }
    }
    d.barrier().map_err(|e| e.to_string())?;
    d.free(counters).map_err(|e| e.to_string())?;
    d.free(region).map_err(|e| e.to_string())?;
    let (faults, fetches, prefetched, messages) = d.stats();
    let p = d.protocol_stats();
    println!(
        "krun-result share=ok faults={faults} one_sided_reads={fetches} prefetched={prefetched} messages={messages} invalidations={}",
        p.invalidations_sent
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Timed faults (3 ranks): rank 0 writes `pages` pages; rank 1 reads them one by one (each a
/// message round trip and an owner downgrade); rank 0 rewrites them (invalidating rank 1, whose
/// hint now names rank 0) and rank 2 reads them (downgrade again); rank 1 then reads them
/// one-sided (join + RMA read), one by one, and finally scans them with prefetch.
fn serve_then_free(d: &Dsm, a: &Args) -> Res<()> {
    let page = 4096;
    let n = a.pages;
    let region = d.alloc(n * page).map_err(|e| e.to_string())?;
    let mem = region.as_ptr();
    if d.rank() == 1 {
        for i in 0..n {
            // SAFETY: inside the region.
            unsafe { mem.add(i * page).write_volatile(i as u8 + 1) };
        }
    }
    d.barrier().map_err(|e| e.to_string())?;
    if d.rank() == 0 {
        for i in 0..n {
            // SAFETY: inside the region.
            let v = unsafe { mem.add(i * page).read_volatile() };
            if v != i as u8 + 1 {
                return Err(format!("page {i} reads {v}, rank 1 wrote {}", i + 1));
            }
        }
    }
    // Rank 1 may still be publishing the pages it served when the free starts.
    d.free(region).map_err(|e| e.to_string())?;
    let again = d.alloc(page).map_err(|e| e.to_string())?;
    if d.rank() == 0 {
        // SAFETY: inside the new region.
        unsafe { again.as_ptr().write_volatile(7) };
    }
    d.barrier().map_err(|e| e.to_string())?;
    // SAFETY: inside the new region.
    let v = unsafe { again.as_ptr().read_volatile() };
    if v != 7 {
        return Err(format!(
            "a region allocated after the free reads {v}, not 7"
        ));
    }
    println!("krun-result serve_then_free=ok");
    d.barrier().map_err(|e| e.to_string())?;
    d.free(again).map_err(|e| e.to_string())
}

fn latency(d: &Dsm, a: &Args) -> Res<()> {
    let page = 4096;
    let n = a.pages;
    let stride_pages = 2; // every other page: no prefetch while timing single faults
    let region = d
        .alloc(n * page * stride_pages * 2)
        .map_err(|e| e.to_string())?;
    let mem = region.as_ptr();
    let at = |i: usize| i * page * stride_pages;
    let scan_base = n * page * stride_pages;
    let fill = |round: u8| {
        for i in 0..n {
            // SAFETY: inside the region.
            unsafe { mem.add(at(i)).write_volatile(round) };
        }
        for i in 0..n * stride_pages {
            // SAFETY: inside the region.
            unsafe { mem.add(scan_base + i * page).write_volatile(round) };
        }
    };
    let read_each = |expect: u8| -> Res<Vec<f64>> {
        let mut times = Vec::new();
        for i in 0..n {
            let t = Instant::now();
            // SAFETY: inside the region.
            let v = unsafe { mem.add(at(i)).read_volatile() };
            times.push(t.elapsed().as_secs_f64() * 1e6);
            if v != expect {
                return Err(format!("page {i}: {v} != {expect}"));
            }
        }
        Ok(times)
    };
    if a.rank == 0 {
        fill(1);
    }
    d.barrier().map_err(|e| e.to_string())?;
    if a.rank == 1 {
        let t = read_each(1)?;
        println!("krun-result read_fault_message_us={:.1}", median(t));
        let local = dsm::uffd::local_fault_latency(n).map_err(|e| e.to_string())?;
        println!("krun-result local_uffd_fault_us={:.1}", median(local));
    }
    d.barrier().map_err(|e| e.to_string())?;
    if a.rank == 0 {
        fill(2);
    }
    d.barrier().map_err(|e| e.to_string())?;
    if a.rank == 2 {
        read_each(2)?;
        // Scan part too, so that rank 0 is a read owner of it.
        for i in 0..n * stride_pages {
            // SAFETY: inside the region.
            let v = unsafe { mem.add(scan_base + i * page).read_volatile() };
            if v != 2 {
                return Err(format!("scan page {i}: {v} != 2"));
            }
        }
    }
    d.barrier().map_err(|e| e.to_string())?;
    if a.rank == 1 {
        let before = d.stats().1;
        let spec_before = d.speculation_stats();
        let t = read_each(2)?;
        let one_sided = d.stats().1 - before;
        let spec_after = d.speculation_stats();
        println!(
            "krun-result read_fault_one_sided_us={:.1} one_sided={one_sided} speculative={} \
             fallbacks={}",
            median(t),
            spec_after.0 - spec_before.0,
            spec_after.1 - spec_before.1
        );
        let (reads, atomics) = d.reference_rma(&region, 0, n).map_err(|e| e.to_string())?;
        println!(
            "krun-result rma_read_4k_us={:.1} fetch_add_us={:.1}",
            median(reads),
            median(atomics)
        );
        let before = d.stats();
        let t = Instant::now();
        for i in 0..n * stride_pages {
            // SAFETY: inside the region.
            let v = unsafe { mem.add(scan_base + i * page).read_volatile() };
            if v != 2 {
                return Err(format!("scan page {i}: {v} != 2"));
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let after = d.stats();
        println!(
            "krun-result scan_mb_s={:.1} scan_faults={} scan_prefetched={}",
            (n * stride_pages * page) as f64 / secs / 1e6,
            after.0 - before.0,
            after.2 - before.2
        );
    }
    d.barrier().map_err(|e| e.to_string())?;
    d.free(region).map_err(|e| e.to_string())
}

fn mgs(d: &Dsm, a: &Args) -> Res<()> {
    let m = dsm::mgs::Mgs::new(d, a.rows, a.cols).map_err(|e| e.to_string())?;
    let run = m.run(|_| Ok(())).map_err(|e| e.to_string())?;
    let max_diff = m.max_diff_from_serial();
    let ortho = m.orthogonality();
    println!(
        "krun-result mgs_seconds={:.4} page_faults={} remote_fetches={} max_diff={max_diff:.2e} orthogonality={ortho:.2e}",
        run.seconds, run.page_faults, run.remote_fetches
    );
    if max_diff > 1e-9 || ortho > 1e-10 {
        return Err(format!(
            "MGS on the DSM differs from the serial MGS: max diff {max_diff:e}, ||Q^T Q - I|| {ortho:e}"
        ));
    }
    m.free().map_err(|e| e.to_string())
}

/// See the `unreachable` scenario in the module doc. Returns only on a failed check.
fn unreachable(d: &Dsm, a: &Args) -> Res<()> {
    use std::io::Write;
    let page = 4096;
    if a.size != 3 {
        return Err("unreachable needs --size 3".into());
    }
    let region = d.alloc(4 * page).map_err(|e| e.to_string())?;
    let mem = region.as_ptr();
    if a.rank == 1 {
        for p in 0..2 {
            // SAFETY: inside the region.
            unsafe { mem.add(p * page).write_volatile(0x5a) };
        }
    }
    d.barrier().map_err(|e| e.to_string())?;
    if a.rank == 1 {
        println!("krun-result owner=ready");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(120));
        return Err("rank 1 was not killed within 120 s".into());
    }
    let go = a.go_file.as_ref().ok_or("unreachable needs --go-file")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !go.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", go.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let p = if a.rank == 0 { 1 } else { 0 };
    // SAFETY: inside the region; its only copy died with rank 1: the driver must end this
    // process instead of returning.
    let v = unsafe { mem.add(p * page).read_volatile() };
    Err(format!(
        "page {p} read {v} although its only copy died with rank 1"
    ))
}

/// Waits (at most 120 s) for `path` to exist.
fn wait_file(path: Option<&std::path::PathBuf>, what: &str) -> Res<()> {
    let path = path.ok_or(format!("needs --{what}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} never appeared", path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Reads the word at `p` until it is `want` (at most 120 s).
fn spin_until(p: *const u64, want: u64, what: &str) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    // SAFETY (caller): p is a word of a live shared region.
    while unsafe { p.read_volatile() } != want {
        if Instant::now() > deadline {
            return Err(format!("{what} never became {want}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// See the `reader-killed` scenario in the module doc. The survivors end with two
/// barriers among themselves (rank 2 is dead).
fn reader_killed(d: &Dsm, a: &Args) -> Res<()> {
    use std::io::Write;
    const WORDS: usize = 4096 / 8;
    if a.size != 3 {
        return Err("reader-killed needs --size 3".into());
    }
    let total = 3 * (a.pages + 2);
    let region = d.alloc(total * 4096).map_err(|e| e.to_string())?;
    let mut usable = Vec::new();
    for i in 0..total {
        // Pages rank 2 manages are left alone: a dead manager's entries are not rebuilt.
        if d.manager_of(region.first_page() + i as u64)
            .map_err(|e| e.to_string())?
            != 2
        {
            usable.push(i);
        }
    }
    if usable.len() < a.pages + 2 {
        return Err(format!(
            "{} pages not managed by rank 2, {} needed",
            usable.len(),
            a.pages + 2
        ));
    }
    let (data, flag, ack) = (&usable[..a.pages], usable[a.pages], usable[a.pages + 1]);
    let base = region.as_ptr() as *mut u64;
    // SAFETY (every use): page i < total of the region, word w < WORDS.
    let word = |i: usize, w: usize| unsafe { base.add(i * WORDS + w) };
    let value = |round: u64, i: usize, w: usize| (round << 56) | ((i as u64) << 16) | w as u64;
    let check = |round: u64| -> Res<()> {
        for &i in data {
            for w in 0..WORDS {
                // SAFETY: see `word`.
                let got = unsafe { word(i, w).read_volatile() };
                if got != value(round, i, w) {
                    return Err(format!(
                        "page {i} word {w}: {got:#x} != {:#x} (round {round})",
                        value(round, i, w)
                    ));
                }
            }
        }
        Ok(())
    };
    let bar = || d.barrier().map_err(|e| e.to_string());
    if a.rank == 0 {
        for &i in data {
            for w in 0..WORDS {
                // SAFETY: see `word`; only rank 0 writes before the barrier.
                unsafe { word(i, w).write_volatile(value(0xa, i, w)) };
            }
        }
        // SAFETY: see `word`.
        unsafe {
            word(flag, 0).write_volatile(0);
            word(ack, 0).write_volatile(0);
        }
    }
    bar()?;
    if a.rank != 0 {
        check(0xa)?;
        // SAFETY: see `word`.
        let flags = unsafe { (word(flag, 0).read_volatile(), word(ack, 0).read_volatile()) };
        if flags != (0, 0) {
            return Err(format!("flags {flags:?} before anyone raised them"));
        }
    }
    bar()?;
    if a.rank == 2 {
        println!("krun-result reader=ready");
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(120));
        return Err("rank 2 was not killed within 120 s".into());
    }
    wait_file(a.go_file.as_ref(), "go-file")?;
    let role = if a.rank == 1 {
        // Every first write to a data page waits for rank 0 to invalidate rank 2's copy.
        for &i in data {
            for w in 0..WORDS {
                // SAFETY: see `word`; only rank 1 writes the data pages now.
                unsafe { word(i, w).write_volatile(value(0xb, i, w)) };
            }
        }
        check(0xb)?;
        // SAFETY: see `word`.
        unsafe { word(flag, 0).write_volatile(1) };
        spin_until(word(ack, 0), 1, "rank 0's acknowledgement")?;
        "writer"
    } else {
        spin_until(word(flag, 0), 1, "rank 1's flag")?;
        check(0xb)?;
        // SAFETY: see `word`.
        unsafe { word(ack, 0).write_volatile(1) };
        "checker"
    };
    let dead: Vec<String> = d.dead_nodes().iter().map(|n| n.to_string()).collect();
    println!(
        "krun-result {role}=ok dead={} dead_copies_dropped={}",
        dead.join(","),
        d.protocol_stats().dead_copies_dropped
    );
    let _ = std::io::stdout().flush();
    // The other survivor may still read pages this rank owns.
    wait_file(a.stop_file.as_ref(), "stop-file")?;
    // The DSM barrier goes on among the survivors (rank 2 is known dead).
    bar()?;
    bar()
}

/// See the `threads` scenario in the module doc.
fn threads(d: &Dsm, a: &Args) -> Res<()> {
    let page = 4096;
    let n = a.pages * a.app_threads.max(1);
    let region = d.alloc(n * 2 * page).map_err(|e| e.to_string())?;
    let base = region.as_ptr() as usize;
    let at = |i: usize| (base + i * 2 * page) as *mut u8;
    let fill = |v: u8| {
        for i in 0..n {
            // SAFETY: inside the region.
            unsafe { at(i).write_volatile(v) };
        }
    };
    let check = |v: u8| -> Res<()> {
        for i in 0..n {
            // SAFETY: inside the region.
            let got = unsafe { at(i).read_volatile() };
            if got != v {
                return Err(format!("page {}: {got} != {v}", i * 2));
            }
        }
        Ok(())
    };
    let bar = || d.barrier().map_err(|e| e.to_string());
    if a.rank == 0 {
        fill(1);
    }
    bar()?;
    if a.rank == 1 {
        check(1)?;
    }
    bar()?;
    if a.rank == 0 {
        fill(2);
    }
    bar()?;
    if a.rank == 2 {
        check(2)?;
    }
    bar()?;
    if a.rank == 1 {
        let per = a.pages;
        let t = Instant::now();
        let workers: Vec<_> = (0..a.app_threads.max(1))
            .map(|k| {
                std::thread::spawn(move || -> Res<()> {
                    for i in k * per..(k + 1) * per {
                        let p = (base + i * 2 * page) as *const u8;
                        // SAFETY: inside the region; nobody writes it in this phase.
                        let got = unsafe { p.read_volatile() };
                        if got != 2 {
                            return Err(format!("thread {k}: page {}: {got} != 2", i * 2));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a reader thread panicked")??;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "krun-result threads=ok faults_per_s={:.0} max_concurrent_remote={}",
            n as f64 / secs,
            d.max_concurrent_remote_faults()
        );
    }
    bar()?;
    d.free(region).map_err(|e| e.to_string())
}

fn run(a: &Args) -> Res<()> {
    if a.scenario == "joiner" {
        return churn::joiner(a);
    }
    if a.scenario == "late-joiner" {
        return coordinator::late_joiner(a);
    }
    let boot = BootstrapClient::connect(a.bootstrap, a.rank, a.size, Duration::from_secs(20))
        .map_err(|e| e.to_string())?;
    let fabric = FabricConfig::with_provider(a.provider)
        .with_env()
        .map_err(|e| e.to_string())?;
    let config = DsmConfig::default().with_env().map_err(|e| e.to_string())?;
    let d = Dsm::init(boot, &fabric, config).map_err(|e| format!("init: {e}"))?;
    match a.scenario.as_str() {
        "share" => share(&d, a),
        "latency" => latency(&d, a),
        "serve-then-free" => serve_then_free(&d, a),
        "mgs" => mgs(&d, a),
        "unreachable" => return unreachable(&d, a),
        "reader-killed" => return reader_killed(&d, a),
        "manager-killed" => return failure::manager_killed(&d, a),
        "coordinator-killed" => return coordinator::coordinator_killed(&d, a),
        "leave-coordinator-killed" => return coordinator::leave_coordinator_killed(&d, a),
        "join-coordinator-killed" => return coordinator::join_coordinator_killed(&d, a),
        "lock-holder-killed" => return locks::lock_holder_killed(&d, a),
        "stalled" => return locks::stalled(&d, a),
        "server-holding-killed" => return lock_server::server_holding_killed(&d, a),
        "server-killed" => return lock_server::server_killed(&d, a),
        "threads" => threads(&d, a),
        "speculation-race" => speculation::speculation_race(&d, a),
        "churn" => {
            if churn::churn(&d, a)? == churn::Outcome::Left {
                return Ok(());
            }
            Ok(())
        }
        s => Err(format!("unknown scenario {s}")),
    }?;
    d.barrier().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dsm-node: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dsm-node rank {}: {e}", a.rank);
            ExitCode::from(1)
        }
    }
}
