//! Coordinated checkpoints driven by the policy at krun's hub, on the C heat stencil under
//! `krun --local 3`: the interval, SIGUSR1 to krun and `krun checkpoint` each produce a
//! committed checkpoint that krun prints, that `krun status` shows safe at L2 on every rank
//! and that the store serves back (`krun fetch`); a job checkpointed by the interval ends
//! with the serial reference's checksum and a summary.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod job_common;
use job_common::*;

fn krun(dir: &Path) -> Command {
    let mut c = Command::new(target_dir().join("krun"));
    c.env("XDG_RUNTIME_DIR", dir.join("xdg"))
        .env("KRUN_GHOST_DIR", dir.join("ghost"))
        .env("KRUN_GHOST_OWNER", "policy-job")
        .env("KRUN_RECV_TIMEOUT_MS", "60000")
        .env("KRUN_STORE_ARENA_MIB", "16")
        .env_remove("KRUN_GHOST_RESTORE")
        .env_remove("KRUN_STORE_LEVEL")
        .env_remove("KRUN_STORE_DISK");
    c
}

fn temp() -> TempDir {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "krun-policy-job-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(dir.0.join("xdg")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.0.join("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Waits until every rank of 3 shows `version` (or newer) safe at L2 in `krun status`.
fn wait_safe_everywhere(dir: &Path, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = status(dir) {
            if (0..3).all(|r| safe_at_l2(&s, r).is_some_and(|v| v >= version)) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "version {version} never safe at L2 on every rank"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sigusr1_to_krun_and_krun_checkpoint_each_commit_a_checkpoint_visible_in_status_and_store() {
    let dir = temp();
    let heat = build_heat(&dir.0);
    let mut job = Job(krun(&dir.0)
        .args(["--local", "3", "-n", "3"])
        .arg(&heat)
        .args(["48", "40", "3000", "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let mut err = job.0.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    // Every rank registered: the job runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&dir.0).is_none_or(|s| {
        s["status"]["ranks"]
            .as_array()
            .is_none_or(|r| r.len() < 3 || r.iter().any(|r| r["state"] != "running"))
    }) {
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGUSR1 to krun: checkpoint 1.
    // SAFETY: a signal to the krun this test started.
    unsafe { libc::kill(job.0.id() as i32, libc::SIGUSR1) };
    wait_safe_everywhere(&dir.0, 1);
    // `krun checkpoint` from another shell: checkpoint 2.
    let o = krun(&dir.0).arg("checkpoint").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_safe_everywhere(&dir.0, 2);
    // The store serves it back.
    let o = krun(&dir.0).args(["fetch", "1", "2"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success() && out.contains("rank 1 v2:"), "{out}");
    drop(job);
    let stderr = stderr.join().unwrap();
    assert!(
        stderr.contains("checkpoint 1 committed (asked by SIGUSR1)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("checkpoint 2 committed (asked by krun checkpoint)"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}

/// The checksum line's value in a heat program's output.
fn heat_checksum(t: &str) -> Option<String> {
    t.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .map(str::to_string)
}

/// heat 48x40, 150 steps of 20 ms on 3 local nodes with a checkpoint every 0.5 s (and
/// `env`): its (stdout, stderr, success) and the serial reference's stdout.
fn heat_with_interval_checkpoints(
    dir: &TempDir,
    env: &[(&str, &str)],
) -> (String, String, bool, String) {
    let heat = build_heat(&dir.0);
    let serial = Command::new(dir.0.join("heat_serial"))
        .args(["48", "40", "150"])
        .output()
        .unwrap();
    let serial = String::from_utf8_lossy(&serial.stdout).into_owned();
    let o = krun(&dir.0)
        .args(["--local", "3", "-n", "3", "--checkpoint-interval", "0.5"])
        .arg(&heat)
        .args(["48", "40", "150", "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        o.status.success(),
        serial,
    )
}

#[test]
fn interval_checkpoints_commit_and_the_job_ends_with_the_serial_checksum_and_a_summary() {
    let dir = temp();
    let (out, err, ok, serial) = heat_with_interval_checkpoints(&dir, &[]);
    assert!(ok, "{out}{err}");
    let checksum = heat_checksum;
    assert_eq!(checksum(&out), checksum(&serial), "{out}{err}");
    assert!(checksum(&out).is_some(), "{out}");
    assert!(err.contains("checkpoint 1 committed: 3 ranks"), "{err}");
    assert!(out.contains("checkpointed at a safepoint"), "{out}");
    // The summary counts what was committed.
    let summary = err
        .lines()
        .find(|l| l.starts_with("krun: ") && l.contains(" held in them"))
        .unwrap_or_else(|| panic!("no summary in {err}"));
    let n: u32 = summary
        .trim_start_matches("krun: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(n >= 1, "{summary}");
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}

/// A checkpoint due before the nodes started their ranks (interval 50 ms: the first barrier
/// reaches each node while it still starts its MPI servers) waits for the ranks still
/// starting: before, a node with no rank running yet reported itself held at once, the
/// policy then waited for captures that never came, and no checkpoint was ever committed.
#[test]
fn a_checkpoint_due_before_the_ranks_started_waits_for_them_and_commits() {
    let dir = temp();
    let heat = build_heat(&dir.0);
    let o = krun(&dir.0)
        .args(["--local", "3", "-n", "3", "--checkpoint-interval", "0.05"])
        .arg(&heat)
        .args(["48", "40", "100", "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{out}{err}");
    // A barrier due before every node linked to krun waits for them: no attempt aborts,
    // and checkpoints must commit.
    let aborted: Vec<&str> = err.lines().filter(|l| l.contains(" aborted: ")).collect();
    assert!(aborted.is_empty(), "{aborted:?}\n{err}");
    let committed = err
        .lines()
        .filter(|l| l.contains(" committed: 3 ranks"))
        .count();
    assert!(committed >= 2, "{err}");
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}

/// A krund that links to krun late (as under CPU load: `KRUN_TEST_LINK_DELAY` holds node
/// 1's link 4 s, past the first barrier due at 0.5 s): the checkpoint waits for the node to
/// link and commits. Before, it aborted at once ("checkpoint 1 aborted: nodes [1] are not
/// linked to krun yet"), which failed CI tests under load.
#[test]
fn a_checkpoint_due_before_a_node_linked_to_krun_waits_for_it_and_commits() {
    let dir = temp();
    let (out, err, ok, serial) =
        heat_with_interval_checkpoints(&dir, &[("KRUN_TEST_LINK_DELAY", "1:4000")]);
    assert!(ok, "{out}{err}");
    // The late link was forced: the first barrier went out before node 1 linked.
    let waited = err
        .lines()
        .filter_map(|l| l.split("the checkpoint barrier waits for nodes [").nth(1))
        .filter_map(|l| l.split(']').next())
        .any(|nodes| nodes.split(", ").any(|n| n == "1"));
    assert!(waited, "no barrier waited for node 1 to link:\n{err}");
    assert!(
        err.contains("node 1 linked to krun; the checkpoint barrier goes out to it"),
        "{err}"
    );
    // The first checkpoint committed (an abort would have used up version 1).
    assert!(err.contains("checkpoint 1 committed: 3 ranks"), "{err}");
    assert!(!err.contains(" aborted: "), "{err}");
    let checksum = heat_checksum;
    assert!(checksum(&out).is_some(), "{out}");
    assert_eq!(checksum(&out), checksum(&serial), "{out}{err}");
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}
