//! The CRIU checkpointer on real processes: capture (single- and multi-threaded, with an open
//! file), restore as a new process after the original is killed or beside it, roll back,
//! and the resource conflicts (a moved file, a PID in use). Needs root and CRIU 4.x
//! (scripts/build-criu.sh); a missing CRIU fails the tests with the reason.
use ghost::checkpointer::{CaptureOptions, Checkpointer, RestoreOptions};
use ghost::criu::{spawn_capturable, CriuCheckpointer};
use ghost::GhostError;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("krun-criu-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SIGKILLs and reaps the PIDs it holds when dropped, so failing tests leave nothing behind.
#[derive(Default)]
struct Pids(Vec<i32>);
impl Drop for Pids {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: killing and reaping processes this test started, by PID.
            unsafe {
                libc::kill(p, libc::SIGKILL);
                libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
    }
}

fn build_stepper(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/criu/stepper.c");
    let bin = dir.join("stepper");
    let ok = Command::new("cc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap()
        .success();
    assert!(ok, "compiling stepper.c failed");
    bin
}

fn criu() -> CriuCheckpointer {
    CriuCheckpointer::locate().unwrap_or_else(|e| panic!("CRIU is required for these tests: {e}"))
}

fn lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn steps(lines: &[String]) -> Vec<(u64, String)> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("step "))
        .map(|r| {
            let (s, c) = r.split_once(" checksum ").unwrap();
            (s.parse().unwrap(), c.to_string())
        })
        .collect()
}

fn reference(bin: &Path, dir: &Path, mib: u32, n: u32, threads: u32) -> BTreeMap<u64, String> {
    let out = dir.join("reference.out");
    let ok = Command::new(bin)
        .arg(&out)
        .args([
            mib.to_string(),
            n.to_string(),
            threads.to_string(),
            "0".into(),
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    steps(&lines(&out)).into_iter().collect()
}

fn wait_for_step(out: &Path, step: u64) {
    let start = Instant::now();
    while !steps(&lines(out)).iter().any(|(s, _)| *s >= step) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "step {step} never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_done(out: &Path) {
    let start = Instant::now();
    while lines(out).last().map(String::as_str) != Some("done") {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the program never finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(bin: &Path, out: &Path, mib: u32, n: u32, threads: u32, pids: &mut Pids) -> i32 {
    let args = vec![
        out.display().to_string(),
        mib.to_string(),
        n.to_string(),
        threads.to_string(),
        "20".into(),
    ];
    let c = spawn_capturable(bin, &args, Path::new("/dev/null")).unwrap();
    pids.0.push(c.supervisor.id() as i32);
    pids.0.push(c.pid);
    std::mem::forget(c.supervisor);
    c.pid
}

/// Capture with the process ended, restore it: every step appears exactly once and matches
/// an uninterrupted run.
fn killed_and_restored(threads: u32) {
    let dir = TempDir::new(&format!("restore{threads}"));
    let bin = build_stepper(&dir.0);
    let (mib, n) = (64, 60);
    let reference = reference(&bin, &dir.0, mib, n, threads);
    let out = dir.0.join("run.out");
    let mut pids = Pids::default();
    let pid = start(&bin, &out, mib, n, threads, &mut pids);
    wait_for_step(&out, 5);
    let cp = criu();
    let image = dir.0.join("image.kgi");
    let opts = CaptureOptions {
        leave_running: false,
        ..CaptureOptions::default()
    };
    cp.capture(pid, &image, &opts).unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}/exe")).exists() || {
            std::thread::sleep(Duration::from_millis(300));
            !Path::new(&format!("/proc/{pid}/exe")).exists()
        }
    );
    let before = steps(&lines(&out)).len();
    let restored = cp.restore(&image, &RestoreOptions::default()).unwrap();
    pids.0.push(restored.pid);
    wait_done(&out);
    let all = steps(&lines(&out));
    assert!(all.len() > before, "the restored process printed nothing");
    let numbers: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        numbers,
        (1..=n as u64).collect::<Vec<_>>(),
        "each step exactly once"
    );
    for (s, c) in &all {
        assert_eq!(&reference[s], c, "checksum of step {s}");
    }
}

#[test]
fn single_threaded_program_is_restored_after_its_capture_ended_it() {
    killed_and_restored(1);
}

#[test]
fn multi_threaded_program_with_an_open_file_is_restored() {
    killed_and_restored(3);
}

#[test]
fn a_copy_runs_beside_the_original_and_rollback_goes_back() {
    let dir = TempDir::new("beside");
    let bin = build_stepper(&dir.0);
    let (mib, n) = (32, 80);
    let reference = reference(&bin, &dir.0, mib, n, 2);
    let out = dir.0.join("run.out");
    let mut pids = Pids::default();
    let pid = start(&bin, &out, mib, n, 2, &mut pids);
    wait_for_step(&out, 4);
    let cp = criu();
    let image = dir.0.join("image.kgi");
    cp.capture(pid, &image, &CaptureOptions::default()).unwrap();
    // The original keeps running; a copy starts beside it (own PID namespace: no conflict).
    let copy = cp.restore(&image, &RestoreOptions::default()).unwrap();
    pids.0.push(copy.pid);
    assert_ne!(copy.pid, pid);
    wait_for_step(&out, 15);
    // The copy writes steps the original already wrote; on a loaded machine the original
    // can reach step 15 before the copy wrote its first: wait (bounded) for a repeat.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let mut seen = BTreeMap::new();
        if steps(&lines(&out))
            .iter()
            .any(|(s, _)| *seen.entry(*s).and_modify(|k| *k += 1).or_insert(1) >= 2)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: ending the copy we restored.
    unsafe { libc::kill(copy.pid, libc::SIGKILL) };
    let all = steps(&lines(&out));
    let mut counts = BTreeMap::new();
    for (s, c) in &all {
        assert_eq!(&reference[s], c, "checksum of step {s}");
        *counts.entry(*s).or_insert(0) += 1;
    }
    assert!(
        counts.values().any(|&k| k >= 2),
        "the copy never ran beside the original"
    );

    // Rollback: the original goes back to the captured state and repeats steps from there.
    let captured_at = *counts.keys().next().unwrap();
    let back = cp
        .rollback(pid, &image, &RestoreOptions::default())
        .unwrap();
    pids.0.push(back.pid);
    wait_done(&out);
    let after = steps(&lines(&out));
    for (s, c) in &after {
        assert_eq!(&reference[s], c, "checksum of step {s} after the rollback");
    }
    let last_before = all.iter().map(|(s, _)| *s).max().unwrap();
    assert!(after.len() > all.len());
    let repeated = after[all.len()..]
        .iter()
        .filter(|(s, _)| *s <= last_before)
        .count();
    assert!(
        repeated > 0,
        "the rolled-back process did not repeat steps (captured near step {captured_at})"
    );
}

#[test]
fn a_moved_file_and_a_pid_in_use_are_reported() {
    let dir = TempDir::new("conflicts");
    let bin = build_stepper(&dir.0);
    let out = dir.0.join("run.out");
    let mut pids = Pids::default();
    let pid = start(&bin, &out, 8, 100000, 1, &mut pids);
    wait_for_step(&out, 2);
    let cp = criu();
    let image = dir.0.join("image.kgi");
    let opts = CaptureOptions {
        leave_running: false,
        ..CaptureOptions::default()
    };
    cp.capture(pid, &image, &opts).unwrap();
    std::fs::rename(&out, dir.0.join("moved.out")).unwrap();
    match cp.restore(&image, &RestoreOptions::default()) {
        Err(GhostError::FileMissing { path, .. }) => assert_eq!(path, out),
        other => panic!("expected FileMissing, got {other:?}"),
    }

    // A process in the host PID namespace: its copy would need its PID.
    let host_out = dir.0.join("host.out");
    let mut host_command = Command::new(&bin);
    // Its own session: CRIU dumps only trees whose session leader is inside them.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        host_command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = host_command
        .arg(&host_out)
        .args(["8", "100000", "1", "20"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    pids.0.push(child.id() as i32);
    wait_for_step(&host_out, 2);
    let host_image = dir.0.join("host.kgi");
    cp.capture(child.id() as i32, &host_image, &CaptureOptions::default())
        .unwrap();
    match cp.restore(&host_image, &RestoreOptions::default()) {
        Err(GhostError::PidInUse { pid }) => assert_eq!(pid, child.id() as i32),
        other => panic!("expected PidInUse, got {other:?}"),
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn criu_failures_carry_the_reason_from_its_log() {
    let cp = criu();
    let dir = TempDir::new("fail");
    // An established TCP connection cannot be dumped without --tcp-established.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = Command::new("python3")
        .args([
            "-c",
            &format!("import socket,time; s=socket.create_connection(('127.0.0.1',{port})); time.sleep(60)"),
        ])
        .spawn()
        .unwrap();
    let mut pids = Pids::default();
    pids.0.push(child.id() as i32);
    let (_conn, _) = listener.accept().unwrap();
    let err = cp
        .capture(
            child.id() as i32,
            &dir.0.join("x.kgi"),
            &CaptureOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("criu dump failed") && err.contains("log:") && err.contains("Error"),
        "{err}"
    );
    // The process was left running.
    assert!(child.try_wait().unwrap().is_none());
    let _ = child.kill();
    let _ = child.wait();
}

/// A unix socket whose peer is outside the dumped tree (here: this test's end of a
/// connection) stops CRIU ("External socket is used", naming no socket); the error then
/// lists the process's sockets and what they are bound or connected to.
#[test]
fn an_external_unix_socket_is_named_with_its_descriptor_and_path() {
    let cp = criu();
    let dir = TempDir::new("extsk");
    let path = dir.0.join("peer.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        &format!(
            "import socket,time; s=socket.socket(socket.AF_UNIX); s.connect({:?}); time.sleep(60)",
            path.display().to_string()
        ),
    ]);
    // Its own session, as krund's ranks have: CRIU refuses a process whose session leader
    // is outside its PID namespace (a CI runner's), before it looks at sockets.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut pids = Pids::default();
    pids.0.push(child.id() as i32);
    let (_conn, _) = listener.accept().unwrap();
    let err = cp
        .capture(
            child.id() as i32,
            &dir.0.join("x.kgi"),
            &CaptureOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("External socket"), "{err}");
    let sockets = &err[err.find("the process's sockets: ").expect("sockets listed")..];
    assert!(
        sockets.contains("fd ") && sockets.contains("unix ino "),
        "{err}"
    );
    assert!(child.try_wait().unwrap().is_none());
    let _ = child.kill();
    let _ = child.wait();
}
