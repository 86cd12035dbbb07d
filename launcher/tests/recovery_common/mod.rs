//! The harness the recovery job tests share (`recovery_job.rs`, `recovery_pairs.rs`): the
//! uncoordinated job tests' harness (temporary job directories, building the heat stencil,
//! krun bounded in time with its lines as they come, the process table, the decisions log),
//! plus the lines krun and krund print about a coordinated recovery.
#![allow(dead_code)]
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

#[path = "../uncoordinated_common/mod.rs"]
mod shared;
pub use shared::*;

/// Runs krun to its end, at most `limit` (then SIGKILL: the test fails).
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let o = child.wait_with_output().unwrap();
        let _ = tx.send(());
        o
    });
    if rx.recv_timeout(limit).is_err() {
        // SAFETY: SIGKILL to the krun this test started (not reaped: the waiter holds it).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let o = waiter.join().unwrap();
        panic!(
            "krun did not end within {limit:?}\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    waiter.join().unwrap()
}

/// krun's stdout and stderr, once it is checked that krun exited 0 and the job printed the
/// checksum `want`.
pub fn ended_with_checksum(o: Output, want: &str) -> (String, String) {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(checksum(&out).as_deref(), Some(want), "{out}\n{err}");
    (out, err)
}

/// The heat stencil under `krun --local 3 --spares SPARES -n 6` with checkpoints every
/// 0.5 s and the given injections.
pub fn heat_job(dir: &Path, heat: &Path, spares: u32, inject: &[&str], steps: &str) -> Command {
    let mut cmd = krun(dir);
    cmd.args(["--local", "3", "--spares", &spares.to_string(), "-n", "6"])
        .args(["--checkpoint-interval", "0.5"]);
    for i in inject {
        cmd.args(["--inject-failure", i]);
    }
    cmd.arg(heat)
        .args(["48", "40", steps, "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    cmd
}

/// No rank is restarted twice for one failure: (rank, failure epoch) is unique among the
/// `Restart` decisions. Returns them (rank, incarnation, node, failure epoch).
pub fn restarts_once_per_failure(log: &str) -> Vec<(u64, u64, u64, u64)> {
    let restarts: Vec<(u64, u64, u64, u64)> = decision_lines(log)
        .iter()
        .filter(|l| l.starts_with("Restart {"))
        .map(|l| {
            (
                field(l, "rank").unwrap(),
                field(l, "incarnation").unwrap(),
                field(l, "node").unwrap(),
                field(l, "failure_epoch").unwrap(),
            )
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for &(rank, _, _, epoch) in &restarts {
        assert!(
            seen.insert((rank, epoch)),
            "rank {rank} restarted twice for the failure of epoch {epoch}:\n{log}"
        );
    }
    restarts
}

/// A process's environment variable, read from /proc.
pub fn proc_env(pid: u64, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}=")).map(str::to_string)
    })
}

/// The newest `Committed` version before the line at `index` of the decisions.
pub fn committed_before(lines: &[String], index: usize) -> Option<u64> {
    lines[..index]
        .iter()
        .filter(|l| l.starts_with("Committed {"))
        .filter_map(|l| field(l, "version"))
        .max()
}

/// The heat stencil on 4 nodes of one rank each plus 2 spares (`krun --local 4 --spares 2
/// -n 4`: parity on by default, sets {0, 1} and {2, 3}; buddies 0 -> 1 -> 2 -> ...), with
/// nodes 0 and 1 SIGKILLed at once when the 4th checkpoint's barrier starts: node 0's
/// image of the recovery line lost its L1 (node 0) and its L2 (node 1).
pub fn buddy_pair_job(dir: &Path, heat: &Path, steps: &str) -> Command {
    let mut cmd = krun(dir);
    cmd.args(["--local", "4", "--spares", "2", "-n", "4"])
        .args(["--checkpoint-interval", "0.5"])
        .args(["--inject-failure", "node=0@ckpt4:barrier"])
        .args(["--inject-failure", "node=1@ckpt4:barrier"])
        .arg(heat)
        .args(["48", "40", steps, "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .env_remove("KRUN_STORE_PARITY");
    cmd
}

/// The copy the policy's last recovery plan restores `rank` from, as its line shows it
/// ("L3 from node 2, 1.0 MiB" of "...; rank 0 restarts on spare node 4 from checkpoint 3
/// (L3 from node 2, 1.0 MiB); ...").
pub fn planned_source(err: &str, rank: u32) -> Option<String> {
    let group = format!("rank {rank} restarts on ");
    err.lines()
        .filter(|l| l.contains("krun: ") && l.contains(" failed at epoch "))
        .flat_map(|l| l.split("; "))
        .filter(|part| part.starts_with(&group))
        .filter_map(|part| {
            let (_, src) = part.split_once(" (")?;
            Some(src.trim_end_matches(')').to_string())
        })
        .last()
}

/// The line krund prints for the image of `rank` it fetched for a restart.
pub fn fetched_line(err: &str, rank: u32) -> Option<&str> {
    err.lines()
        .find(|l| l.contains(&format!("krund: rank {rank}: image v")))
}

/// Every line krund printed for the images of `rank` it fetched for restarts, in order.
pub fn fetched_lines(err: &str, rank: u32) -> Vec<&str> {
    err.lines()
        .filter(|l| l.contains(&format!("krund: rank {rank}: image v")))
        .collect()
}
