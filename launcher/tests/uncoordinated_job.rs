//! The uncoordinated policy with real processes in local mode: the C heat stencil under
//! `krun --local 3 --spares 1 --policy FILE` with `policy = "uncoordinated"`: each rank
//! checkpoints on its own (no barrier); with message logging a node killed mid-run costs only
//! its own ranks, which restart alone on the spare and rejoin the running ranks, and the
//! result equals the serial reference. Needs `cargo build -p rank` first (libkrun.so).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`: tests run from `target/<profile>/deps`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp(tag: &str) -> TempDir {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "krun-uncoord-{tag}-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(dir.0.join("xdg")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.0.join("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Ends the job (SIGTERM to the krun we started; SIGKILL if it has not ended in 30 s).
struct Job(Child);
impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build_heat(out: &Path) -> PathBuf {
    let lib = target_dir();
    assert!(
        lib.join("libkrun.so").exists(),
        "libkrun.so not found in {} (cargo build -p rank first)",
        lib.display()
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/c");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", lib.display()))
        .arg(format!("OUT={}", out.display()))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building the examples: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out.join("heat")
}

fn krun(dir: &Path) -> Command {
    let mut c = Command::new(target_dir().join("krun"));
    c.env("XDG_RUNTIME_DIR", dir.join("xdg"))
        .env("KRUN_GHOST_DIR", dir.join("ghost"))
        .env_remove("KRUN_GHOST_OWNER")
        .env("KRUN_RECV_TIMEOUT_MS", "60000")
        .env("KRUN_STORE_ARENA_MIB", "16")
        .env_remove("KRUN_GHOST_RESTORE")
        .env_remove("KRUN_STORE_LEVEL")
        .env_remove("KRUN_STORE_DISK");
    c
}

fn checksum(t: &str) -> Option<String> {
    t.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .map(str::to_string)
}

fn serial(dir: &Path, args: &[&str]) -> String {
    let o = Command::new(dir.join("heat_serial"))
        .args(args)
        .output()
        .unwrap();
    checksum(&String::from_utf8_lossy(&o.stdout)).expect("serial checksum")
}

/// Processes still running the test's own heat binary.
fn heat_left(heat: &Path) -> Vec<u32> {
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == heat) {
            left.push(pid);
        }
    }
    left
}

fn status(dir: &Path) -> Option<serde_json::Value> {
    let o = krun(dir).args(["status", "--json"]).output().ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

fn decisions(dir: &Path) -> Option<String> {
    for e in std::fs::read_dir(dir.join("xdg/krun")).ok()?.flatten() {
        if let Ok(t) = std::fs::read_to_string(e.path().join("decisions.log")) {
            return Some(t);
        }
    }
    None
}

/// A job running in the background: its stderr lines as they come, its output at the end.
struct Running {
    job: Job,
    /// The job's `decisions.log` as last read (the job directory goes with the job).
    decisions: std::sync::Arc<std::sync::Mutex<String>>,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn start(dir: &Path, mut cmd: Command) -> Running {
        let mut job = Job(cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap());
        let mut out = job.0.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        let err = job.0.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for l in std::io::BufRead::lines(std::io::BufReader::new(err)).map_while(Result::ok) {
                let _ = tx.send(l.clone());
                all.push_str(&l);
                all.push('\n');
            }
            all
        });
        let decisions = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        {
            let (decisions, dir) = (decisions.clone(), dir.to_path_buf());
            let pid = job.0.id();
            std::thread::spawn(move || {
                // Until krun (not reaped while this runs: `finish` waits for it) is gone.
                while Path::new(&format!("/proc/{pid}")).exists() {
                    if let Some(t) = self::decisions(&dir) {
                        *decisions.lock().unwrap() = t;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        Running {
            job,
            decisions,
            lines,
            stdout,
            stderr,
        }
    }

    /// Waits (at most `limit`) for a stderr line containing `text`.
    fn wait_line(&self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(text) => return l,
                Ok(l) => {
                    seen.push_str(&l);
                    seen.push('\n');
                }
                Err(e) => panic!("no line with {text:?} within {limit:?} ({e}):\n{seen}"),
            }
        }
    }

    /// The decisions logged so far.
    fn decisions(&self) -> String {
        self.decisions.lock().unwrap().clone()
    }

    /// Waits (at most `limit`) for the job to end: (success, stdout, stderr, the decisions
    /// it logged).
    fn finish(mut self, limit: Duration) -> (bool, String, String, String) {
        let deadline = Instant::now() + limit;
        let code = loop {
            if let Some(c) = self.job.0.try_wait().unwrap() {
                break c;
            }
            if Instant::now() >= deadline {
                // SAFETY: SIGKILL to the krun this test started (not reaped yet).
                unsafe { libc::kill(self.job.0.id() as i32, libc::SIGKILL) };
                let _ = self.job.0.wait();
                panic!(
                    "the job did not end within {limit:?}\n{}",
                    self.stderr.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = self.decisions();
        let (out, err) = (self.stdout.join().unwrap(), self.stderr.join().unwrap());
        (code.success(), out, err, log)
    }
}

/// The decisions of `decisions.log` (`DecisionId { .. } Kind { .. }` per line): each
/// line's kind and fields, after the id.
fn decision_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(|l| l.split_once("} ").map_or(l, |(_, k)| k).to_string())
        .collect()
}

/// `name { field: N` -> N (the first such field of a decision line).
fn field(line: &str, name: &str) -> Option<u64> {
    let rest = line.split(&format!("{name}: ")).nth(1)?;
    let rest = rest.strip_prefix("Some(").unwrap_or(rest);
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// One status row: (rank, node, pid, incarnation, state).
type Row = (u64, u64, u64, u64, String);

/// The status rows while the job runs.
fn rows(dir: &Path) -> Option<Vec<Row>> {
    let s = status(dir)?;
    Some(
        s["status"]["ranks"]
            .as_array()?
            .iter()
            .map(|r| {
                (
                    r["rank"].as_u64().unwrap_or(u64::MAX),
                    r["node"].as_u64().unwrap_or(u64::MAX),
                    r["pid"].as_u64().unwrap_or(0),
                    r["incarnation"].as_u64().unwrap_or(u64::MAX),
                    r["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect(),
    )
}

/// A policy file in `dir`.
fn policy_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The heat stencil under `krun --local 3 --spares 1 -n 6 --policy FILE`.
fn heat_job(dir: &Path, heat: &Path, policy: &Path, inject: &[&str], steps: &str) -> Command {
    let mut cmd = krun(dir);
    cmd.args(["--local", "3", "--spares", "1", "-n", "6", "--policy"])
        .arg(policy)
        // Each image holds the rank's message-log snapshot region: small for a small grid.
        .env("KRUN_LOG_REGION_BYTES", "262144");
    for i in inject {
        cmd.args(["--inject-failure", i]);
    }
    cmd.arg(heat)
        .args(["48", "40", steps, "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    cmd
}

#[test]
fn with_message_logging_only_the_killed_nodes_ranks_restart_the_survivors_keep_running_and_the_result_is_the_serial_one(
) {
    let dir = temp("logging");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "1000"]);
    let policy = policy_file(
        &dir.0,
        "uncoordinated.toml",
        "policy = \"uncoordinated\"\ninterval_ms = 500\n\n[logging]\nmessages = true\n",
    );
    // Node 1 (ranks 2 and 3) dies once every rank made 2 of its own checkpoints safe.
    let run = Running::start(
        &dir.0,
        heat_job(&dir.0, &heat, &policy, &["node=1@2ckpt"], "1000"),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let before = loop {
        if let Some(r) = rows(&dir.0) {
            if r.len() == 6 && r.iter().all(|r| r.4 == "running" && r.2 > 0) {
                break r;
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    run.wait_line(
        "injected failure: SIGKILL to node 1",
        Duration::from_secs(240),
    );
    let line = run.wait_line("(message logging)", Duration::from_secs(120));
    assert!(
        line.contains("rank 2 restarts on node 3")
            && line.contains("rank 3 restarts on node 3")
            && line.contains("ranks 0-1,4-5 keep running, not rolled back")
            && line.contains("rollback depth 0"),
        "{line}"
    );
    run.wait_line("recovered from the failure", Duration::from_secs(120));
    // While the job runs on: the survivors are the same processes, never restarted (same
    // pid, incarnation 0); the lost ranks run on the spare as incarnation 1.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        if let Some(r) = rows(&dir.0) {
            let done = r.len() == 6
                && r.iter().all(|r| r.4 == "running")
                && r.iter().filter(|r| r.1 == 3 && r.3 == 1).count() == 2;
            if done {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the table never showed the restarted ranks: {:?}",
            rows(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in [0usize, 1, 4, 5] {
        assert_eq!(
            (after[r].1, after[r].2, after[r].3),
            (before[r].1, before[r].2, 0),
            "rank {r} must keep its node, pid and incarnation: before {before:?}, after {after:?}"
        );
    }
    for r in [2usize, 3] {
        assert_eq!((after[r].1, after[r].3), (3, 1), "{after:?}");
        assert_ne!(after[r].2, before[r].2, "{after:?}");
    }
    let (ok, out, err, log) = run.finish(Duration::from_secs(240));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let lines = decision_lines(&log);
    // Own checkpoints, no global one; the recovery line names the lost ranks only.
    assert!(
        lines.iter().any(|l| l.starts_with("RankCheckpointed {")),
        "{log}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("Committed {")), "{log}");
    let recovery: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("RecoveryLine {"))
        .collect();
    assert_eq!(recovery.len(), 1, "{log}");
    assert!(
        recovery[0].contains("line: [(2, Some(") && recovery[0].contains("), (3, Some("),
        "{}",
        recovery[0]
    );
    assert!(recovery[0].contains("depth: 0"), "{}", recovery[0]);
    let restarted: Vec<u64> = lines
        .iter()
        .filter(|l| l.starts_with("Restart {"))
        .map(|l| field(l, "rank").unwrap())
        .collect();
    assert_eq!(restarted, vec![2, 3], "{log}");
    // Only the lost ranks restored an image; the survivors never did.
    for r in [2, 3] {
        assert!(
            out.contains(&format!("heat: rank {r} restored version ")),
            "rank {r}: {out}"
        );
    }
    for r in [0, 1, 4, 5] {
        assert!(
            !out.contains(&format!("heat: rank {r} restored")),
            "rank {r} was rolled back: {out}"
        );
    }
    assert!(
        err.contains("rank 2 restarts alone on node 3") && err.contains("no other rank rolls back"),
        "{err}"
    );
    // Each restarted rank read its determinants back from its buddy and replayed: the
    // failure came after its checkpoint, so it had delivered messages since.
    for r in [2, 3] {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("krun: rank {r} rejoined the running ranks")))
            .unwrap_or_else(|| panic!("rank {r} never rejoined: {err}"));
        let n: u64 = line
            .split("): ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(n > 0, "{line}");
    }
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}
