//! The C and Fortran examples (rank/examples/c) built against libkrun.so and run under
//! `krun` in local mode: the heat stencil equals its serial reference, also after a restart
//! from a checkpoint; the Fortran example exchanges and checkpoints; the C API check
//! (any-source messages, put/get/atomics, errors of bad use) passes on every rank.
use std::process::{Command, Output};

mod common;
use common::*;

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawning krun")
}

/// The "checksum XXXX" of a heat or heat_serial run.
fn checksum(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .unwrap_or_else(|| panic!("no checksum line in:\n{}", text(o)))
        .trim()
        .to_string()
}

fn krun_job(dir: &TempDir, owner: &str, args: &[&str]) -> Command {
    let mut c = Command::new(krun());
    c.args(args)
        .current_dir(&dir.0)
        .env("KRUN_GHOST_DIR", dir.0.join("ghost"))
        .env("KRUN_GHOST_OWNER", owner)
        .env("KRUN_RECV_TIMEOUT_MS", "60000")
        .env_remove("KRUN_GHOST_RESTORE");
    c
}

const GRID: [&str; 3] = ["48", "40", "60"];

#[test]
fn heat_stencil_under_krun_equals_the_serial_reference() {
    let dir = TempDir::new("heat");
    build_examples(&dir.0);
    let serial = run(Command::new(dir.0.join("heat_serial")).args(GRID));
    assert!(serial.status.success(), "{}", text(&serial));
    let want = checksum(&serial);
    for provider in ["tcp", "shm"] {
        let heat = dir.0.join("heat");
        let o = run(krun_job(
            &dir,
            &format!("heat-{provider}"),
            &["-n", "4", "--local", "2"],
        )
        .env("KRUN_FABRIC_PROVIDER", provider)
        .arg(&heat)
        .args(GRID)
        .arg("15"));
        assert!(o.status.success(), "{provider}: {}", text(&o));
        assert_eq!(checksum(&o), want, "{provider}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("step 45 checkpointed as version 3"),
            "{provider}: {}",
            text(&o)
        );
    }
}

#[test]
fn heat_stencil_restarted_from_a_checkpoint_gives_the_same_checksum() {
    let dir = TempDir::new("restart");
    build_examples(&dir.0);
    let serial = run(Command::new(dir.0.join("heat_serial")).args(GRID));
    let want = checksum(&serial);
    let heat = dir.0.join("heat");
    // Every rank SIGKILLs itself after step 37: the newest checkpoint is step 30 (v3).
    let crashed = run(krun_job(&dir, "restart", &["-n", "3", "--local", "3"])
        .env("HEAT_CRASH_AT", "37")
        .arg(&heat)
        .args(GRID)
        .arg("10"));
    assert!(!crashed.status.success(), "{}", text(&crashed));
    assert!(
        !String::from_utf8_lossy(&crashed.stdout).contains("checksum"),
        "{}",
        text(&crashed)
    );
    let resumed = run(krun_job(&dir, "restart", &["-n", "3", "--local", "3"])
        .env("KRUN_GHOST_RESTORE", "latest")
        .arg(&heat)
        .args(GRID)
        .arg("10"));
    assert!(resumed.status.success(), "{}", text(&resumed));
    let out = String::from_utf8_lossy(&resumed.stdout);
    for r in 0..3 {
        assert!(
            out.contains(&format!("rank {r} restored version 3 at step 30")),
            "{}",
            text(&resumed)
        );
    }
    assert_eq!(checksum(&resumed), want, "{}", text(&resumed));
}

#[test]
fn restart_without_a_common_checkpoint_is_a_clear_error() {
    let dir = TempDir::new("norestore");
    build_examples(&dir.0);
    let o = run(
        krun_job(&dir, "never-checkpointed", &["-n", "2", "--local", "1"])
            .env("KRUN_GHOST_RESTORE", "latest")
            .arg(dir.0.join("heat"))
            .args(GRID),
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no checkpoint version is held by every rank"),
        "{}",
        text(&o)
    );
}

#[test]
fn fortran_example_exchanges_and_checkpoints_under_krun() {
    let dir = TempDir::new("fortran");
    build_examples(&dir.0);
    let o =
        run(krun_job(&dir, "fortran", &["-n", "3", "--local", "2"]).arg(dir.0.join("exchange")));
    assert!(o.status.success(), "{}", text(&o));
    // Each rank r receives from its left neighbour l the values l*1000 + i + round,
    // i = 1..1000, for rounds 1..3.
    let n = 3i64;
    let total: i64 = (0..n)
        .map(|l| {
            (1..=3)
                .map(|round| (1..=1000).map(|i| l * 1000 + i + round).sum::<i64>())
                .sum::<i64>()
        })
        .sum();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("exchange: ranks 3 checkpoints 3 total {total}")),
        "{}",
        text(&o)
    );
}

#[test]
fn c_api_messages_windows_and_errors_across_ranks() {
    let dir = TempDir::new("api");
    build_examples(&dir.0);
    let o = run(krun_job(&dir, "api", &["-n", "4", "--local", "2"]).arg(dir.0.join("api_check")));
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for r in 0..4 {
        assert!(
            out.contains(&format!("api_check: rank {r} ok")),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn safepoints_act_collectively_on_checkpoint_and_rollback_requests() {
    let dir = TempDir::new("safepoint");
    build_examples(&dir.0);
    // Rank 0 alone gets SIGUSR1 at iteration 3, rank 2 alone SIGUSR2 at iteration 6; every
    // call is a round (the pacing of rounds is the next test's subject).
    let o = run(krun_job(&dir, "safepoint", &["-n", "3", "--local", "2"])
        .env("KRUN_SAFEPOINT_EVERY", "1")
        .arg(dir.0.join("safepoint_check")));
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for r in 0..3 {
        assert!(
            out.contains(&format!(
                "rank {r} checkpointed at 3 rolled back at 6 to counter 3 final 9"
            )),
            "{}",
            text(&o)
        );
    }
}

#[test]
fn paced_safepoints_act_on_a_request_at_the_next_round_on_every_rank_at_the_same_iteration() {
    let dir = TempDir::new("safepoint-paced");
    build_examples(&dir.0);
    // 2 ms of "compute" per iteration: the ranks agree on rounds every 2^e calls (e >= 1: a
    // round over tcp costs more than 1% of 2 ms), so a request waits for the next round.
    // Rank 0 raises SIGUSR1 at iteration 3, rank 2 SIGUSR2 at iteration 100.
    let o = run(
        krun_job(&dir, "safepoint-paced", &["-n", "3", "--local", "2"])
            .args(["--provider", "tcp"])
            .env_remove("KRUN_SAFEPOINT_EVERY")
            .env("SAFEPOINT_CHECK_ITERS", "200")
            .env("SAFEPOINT_CHECK_ROLLBACK_AT", "100")
            .env("SAFEPOINT_CHECK_SLEEP_US", "2000")
            .arg(dir.0.join("safepoint_check")),
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // "safepoint_check: rank R checkpointed at C rolled back at B to counter C final 200"
    let mut seen = Vec::new();
    for r in 0..3 {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("safepoint_check: rank {r} ")))
            .unwrap_or_else(|| panic!("no line of rank {r}:\n{}", text(&o)));
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> i64 {
            words
                .get(i)
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("word {i} of {line:?} is not a number"))
        };
        let (c, b, restored, last) = (num(5), num(9), num(12), num(14));
        assert!(c > 3 && c <= 3 + 64, "rank {r}: the checkpoint requested at 3 was taken at {c} (the next round, at most 64 calls later): {line}");
        assert!(
            b > 100 && b <= 100 + 64,
            "rank {r}: the rollback requested at 100 was done at {b}: {line}"
        );
        assert_eq!(
            restored, c,
            "rank {r}: rolled back to the counter of the checkpoint: {line}"
        );
        assert_eq!(last, 200, "{line}");
        seen.push((c, b));
    }
    assert!(
        seen.iter().all(|s| *s == seen[0]),
        "the ranks acted at different iterations: {seen:?}\n{}",
        text(&o)
    );
}

#[test]
fn libkrun_exports_the_rank_api_and_libghost_functions() {
    let lib = target_dir().join("libkrun.so");
    let o = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&lib)
        .output()
        .expect("nm (binutils) is required");
    let syms = String::from_utf8_lossy(&o.stdout);
    for f in [
        "krun_init",
        "krun_finalize",
        "krun_send",
        "krun_recv",
        "krun_barrier",
        "krun_put",
        "krun_get",
        "krun_fetch_add",
        "krun_compare_swap",
        "krun_checkpoint",
        "krun_safepoint",
        "krun_strerror",
        "krun_last_error",
        "krun_ghost_init",
        "krun_ghost_checkpoint",
        "krun_ghost_safepoint",
        "krun_ghost_register",
    ] {
        assert!(
            syms.lines().any(|l| l.ends_with(&format!(" T {f}"))),
            "{f} not exported by {}",
            lib.display()
        );
    }
}
