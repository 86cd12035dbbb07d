//! Distributed shared memory from a krun job, in C and in Rust, run under `krun` in local
//! mode (ranks are separate processes: a DSM region has the same address in every rank, so
//! ranks cannot share one process).
//!
//! - `mgs_dsm` (rank/examples/c) on 2 ranks / 2 nodes (tcp, shm), 3 ranks / 3 nodes (tcp)
//!   and 4 ranks / 2 nodes (shm) gives the serial MGS's Q (weighted sum within 1e-12,
//!   ||Q^T Q - I|| < 1e-10), its lock-protected counter saw every column, and bad DSM calls
//!   from C fail with KRUN_ERR_INVALID and a message;
//! - the Rust API (`Rank::dsm`) on 3 ranks: writes seen after a barrier, false sharing
//!   within a page, a counter under the DSM lock, a message-passing litmus test (a flag
//!   seen set implies the data written before it is seen), errors of bad use.
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use krun::{ErrorCode, Rank};

mod common;
use common::*;

fn krun_job(dir: &TempDir, args: &[&str]) -> Command {
    let mut c = Command::new(krun());
    c.args(args)
        .current_dir(&dir.0)
        .env("KRUN_GHOST_DIR", dir.0.join("ghost"))
        .env("KRUN_RECV_TIMEOUT_MS", "60000")
        .env_remove("KRUN_GHOST_RESTORE");
    c
}

/// The numbers after `key` on the line starting with "mgs weighted".
fn field(o: &Output, key: &str) -> f64 {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("mgs weighted"))
        .unwrap_or_else(|| panic!("no \"mgs weighted\" line in:\n{}", text(o)));
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            if let Some(v) = words.next().and_then(|v| v.parse().ok()) {
                return v;
            }
        }
    }
    panic!("no {key} in {line:?}")
}

const MGS: [&str; 2] = ["1024", "48"];

#[test]
fn mgs_on_the_dsm_from_c_equals_the_serial_mgs() {
    mgs_runs(&[("tcp", "2", "2"), ("tcp", "3", "3")]);
}

/// Over shm a rank once died of SIGSEGV under CI load: its service thread still published a
/// page it had served when the collective free unmapped the region (fixed in `Dsm::free`;
/// `dsm::multiprocess freeing_a_region_while_its_pages_are_still_being_published_is_safe`
/// forces that order).
#[test]
fn mgs_on_the_dsm_from_c_over_shm_equals_the_serial_mgs() {
    mgs_runs(&[("shm", "2", "2"), ("shm", "4", "2")]);
}

fn mgs_runs(setups: &[(&str, &str, &str)]) {
    let dir = TempDir::new("mgs");
    build_examples(&dir.0);
    let serial = Command::new(dir.0.join("mgs_serial"))
        .args(MGS)
        .output()
        .unwrap();
    assert!(serial.status.success(), "{}", text(&serial));
    let want = field(&serial, "weighted");
    for &(provider, ranks, nodes) in setups {
        let o = krun_job(&dir, &["-n", ranks, "--local", nodes])
            .env("KRUN_FABRIC_PROVIDER", provider)
            .arg(dir.0.join("mgs_dsm"))
            .args(MGS)
            .output()
            .expect("spawning krun");
        let what = format!("{provider}, {ranks} ranks on {nodes} nodes");
        assert!(o.status.success(), "{what}: {}", text(&o));
        let got = field(&o, "weighted");
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{what}: weighted sum {got} != serial {want}\n{}",
            text(&o)
        );
        let ortho = field(&o, "orthogonality");
        assert!(ortho < 1e-10, "{what}: ||Q^T Q - I|| = {ortho}");
        assert_eq!(field(&o, "columns"), 48.0, "{what}: {}", text(&o));
        // Every rank but the one owning everything faulted pages in.
        let out = String::from_utf8_lossy(&o.stdout);
        let faults: Vec<u64> = out
            .lines()
            .filter_map(|l| l.split(" faults ").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(faults.len(), ranks.parse::<usize>().unwrap(), "{what}");
        assert!(faults.iter().all(|&f| f > 0), "{what}: {faults:?}");
        // The C API refuses bad calls with KRUN_ERR_INVALID and says why.
        assert_eq!(
            out.matches("refused bad calls: ").count(),
            faults.len(),
            "{what}: {}",
            text(&o)
        );
        assert!(
            out.contains("is not the start of a DSM region"),
            "{what}: {}",
            text(&o)
        );
    }
}

/// MGS on the DSM checkpoints after step 20 (krun_checkpoint: the DSM's pages go into the
/// ranks' images), every rank exits after step 30, and the job started again with
/// `KRUN_GHOST_RESTORE=latest` goes on from step 21 with the matrix as it was at the
/// checkpoint: the same Q as the serial MGS. Columns 21 to 30 were overwritten after the
/// checkpoint and every column of Q lives only in the DSM, so a DSM that came back empty or
/// as it was at the failure would give another result.
#[test]
fn mgs_on_the_dsm_restored_from_a_checkpoint_equals_the_serial_mgs() {
    let dir = TempDir::new("mgs-restore");
    build_examples(&dir.0);
    let serial = Command::new(dir.0.join("mgs_serial"))
        .args(MGS)
        .output()
        .unwrap();
    assert!(serial.status.success(), "{}", text(&serial));
    let want = field(&serial, "weighted");
    for (provider, ranks, nodes) in [("tcp", "3", "3"), ("shm", "2", "1")] {
        let what = format!("{provider}, {ranks} ranks on {nodes} nodes");
        let owner = format!("mgs-{provider}");
        let stopped = krun_job(&dir, &["-n", ranks, "--local", nodes])
            .env("KRUN_FABRIC_PROVIDER", provider)
            .env("KRUN_GHOST_OWNER", &owner)
            .env("MGS_CHECKPOINT_AT", "20")
            .env("MGS_STOP_AT", "30")
            .arg(dir.0.join("mgs_dsm"))
            .args(MGS)
            .output()
            .expect("spawning krun");
        assert!(!stopped.status.success(), "{what}: {}", text(&stopped));
        let out = String::from_utf8_lossy(&stopped.stdout);
        assert!(
            out.contains("step 20 checkpointed as version 1") && !out.contains("mgs weighted"),
            "{what}: {}",
            text(&stopped)
        );
        let resumed = krun_job(&dir, &["-n", ranks, "--local", nodes])
            .env("KRUN_FABRIC_PROVIDER", provider)
            .env("KRUN_GHOST_OWNER", &owner)
            .env("KRUN_GHOST_RESTORE", "latest")
            .arg(dir.0.join("mgs_dsm"))
            .args(MGS)
            .output()
            .expect("spawning krun");
        assert!(resumed.status.success(), "{what}: {}", text(&resumed));
        let out = String::from_utf8_lossy(&resumed.stdout);
        for r in 0..ranks.parse().unwrap() {
            assert!(
                out.contains(&format!("rank {r} restored version 1 at step 21")),
                "{what}: {}",
                text(&resumed)
            );
        }
        let got = field(&resumed, "weighted");
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{what}: weighted sum {got} != serial {want}\n{}",
            text(&resumed)
        );
        assert!(field(&resumed, "orthogonality") < 1e-10, "{what}");
        // The counter in the DSM counted the 21 columns before the checkpoint too.
        assert_eq!(
            field(&resumed, "columns"),
            48.0,
            "{what}: {}",
            text(&resumed)
        );
    }
}

/// Set by [`rust_api_on_three_ranks`] for the ranks it starts.
const CHILD: &str = "KRUN_DSM_TEST_CHILD";

#[test]
fn rust_api_on_three_ranks() {
    let dir = TempDir::new("rust");
    let exe = std::env::current_exe().unwrap();
    let o = krun_job(&dir, &["-n", "3", "--local", "2"])
        .env(CHILD, "1")
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "rust_api_rank",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("spawning krun");
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for r in 0..3 {
        assert!(
            out.contains(&format!("dsm_api: rank {r} ok")),
            "{}",
            text(&o)
        );
    }
}

/// One rank of [`rust_api_on_three_ranks`] (run by it under krun; ignored otherwise).
#[test]
#[ignore = "a rank of rust_api_on_three_ranks, started by krun"]
fn rust_api_rank() {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "run by rust_api_on_three_ranks under krun"
    );
    let rank = Rank::init().unwrap();
    let (me, n) = (rank.rank(), rank.size());
    let shm = rank.dsm().unwrap();
    let region = shm.alloc(5 * 4096 + 1).unwrap();
    assert_eq!(region.len(), 6 * 4096, "rounded up to pages");
    let words = region.as_ptr() as *mut u64;

    // Writes before a barrier are seen after it (rank r fills page r + 1).
    // SAFETY (every access below): inside the region's 6 pages of u64; ranks write
    // disjoint words, or words under the lock, or words read only after a barrier.
    for i in 0..512 {
        unsafe { words.add((me + 1) * 512 + i).write((me * 1000 + i) as u64) };
    }
    // False sharing: every rank's word on page 0, written many times.
    for k in 1..=40u64 {
        unsafe { words.add(me).write_volatile(k) };
    }
    shm.barrier().unwrap();
    for r in 0..n {
        for i in 0..512 {
            let v = unsafe { words.add((r + 1) * 512 + i).read() };
            assert_eq!(
                v,
                (r * 1000 + i) as u64,
                "rank {me}: page {} word {i}",
                r + 1
            );
        }
        assert_eq!(
            unsafe { words.add(r).read_volatile() },
            40,
            "rank {me}: word {r}"
        );
    }

    // A counter under the DSM lock (page 5, word 0).
    let counter = unsafe { words.add(5 * 512) };
    for _ in 0..30 {
        shm.lock(3).unwrap();
        unsafe { counter.write_volatile(counter.read_volatile() + 1) };
        shm.unlock(3).unwrap();
    }
    shm.barrier().unwrap();
    assert_eq!(unsafe { counter.read_volatile() }, 30 * n as u64);

    // Message passing (sequential consistency): rank 0 writes the data (page 4, word 1),
    // then the flag (page 5, word 1); rank 1 waits for the flag and must see the data.
    let (data, flag) = unsafe { (words.add(4 * 512 + 1), words.add(5 * 512 + 1)) };
    shm.barrier().unwrap();
    if me == 0 {
        unsafe { data.write_volatile(0xDA7A) };
        unsafe { flag.write_volatile(1) };
    } else if me == 1 {
        let start = Instant::now();
        while unsafe { flag.read_volatile() } != 1 {
            assert!(start.elapsed() < Duration::from_secs(60), "flag never set");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            unsafe { data.read_volatile() },
            0xDA7A,
            "flag seen before data"
        );
    }
    shm.barrier().unwrap();

    // Bad use gives errors that name it.
    let e = shm.lock(64).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Invalid, "{e}");
    assert!(e.to_string().contains("lock id"), "{e}");
    let stats = shm.stats();
    assert!(stats.faults > 0, "{stats:?}");
    shm.free(region).unwrap();
    let e = shm.free(region).unwrap_err();
    assert!(e.to_string().contains("freed"), "{e}");
    assert!(shm.region_at(region.as_ptr()).is_err());
    shm.close().unwrap();
    println!("dsm_api: rank {me} ok");
    rank.finalize().unwrap();
}
