//! Spares, injected failures and recovery, with real processes in local mode: the C heat
//! stencil under `krun --local 3 --spares 1` and the coordinated checkpoint policy.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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
        "krun-recovery-{tag}-{}-{:x}",
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

/// Runs krun to its end, at most `limit` (then SIGKILL: the test fails).
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
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

#[test]
fn a_spare_joins_the_membership_runs_no_rank_and_the_job_ends_with_the_serial_checksum() {
    let dir = temp("spare");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "300"]);
    let mut job = Job(krun(&dir.0)
        .args(["--local", "3", "--spares", "1", "-n", "6"])
        .args(["--checkpoint-interval", "0.5"])
        .arg(&heat)
        .args(["48", "40", "300", "0"])
        .env("HEAT_STEP_DELAY_US", "20000")
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
    // While it runs: 4 members, every rank on nodes 0-2, none on the spare (node 3).
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        if let Some(s) = status(&dir.0) {
            let ranks = s["status"]["ranks"].as_array().cloned().unwrap_or_default();
            if ranks.len() == 6 && ranks.iter().all(|r| r["state"] == "running") {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    let members: Vec<u64> = seen["status"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_u64())
        .collect();
    assert_eq!(members, vec![0, 1, 2, 3], "{seen}");
    let nodes: Vec<u64> = seen["status"]["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["node"].as_u64())
        .collect();
    assert_eq!(nodes, vec![0, 0, 1, 1, 2, 2], "{seen}");
    // The job ends by itself (the spare is stopped once the ranks are done).
    let deadline = Instant::now() + Duration::from_secs(240);
    let code = loop {
        if let Some(c) = job.0.try_wait().unwrap() {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the job with a spare never ended"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = stdout.join().unwrap();
    assert!(code.success(), "{code:?}\n{out}");
    assert_eq!(checksum(&out), Some(want), "{out}");
}

#[test]
fn an_injected_failure_without_a_spare_kills_that_node_and_its_ranks_and_ends_the_job_naming_them()
{
    let dir = temp("inject");
    let heat = build_heat(&dir.0);
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "-n", "6", "--checkpoint-interval", "0.5"])
        .args(["--inject-failure", "node=1@2ckpt"])
        .arg(&heat)
        .args(["48", "40", "100000", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let o = run_bounded(cmd, Duration::from_secs(240));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("checkpoint 2 committed"), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("injected failure: SIGKILL to node 1 (krund pid "))
        .unwrap_or_else(|| panic!("no injection line in {err}"));
    // The ranks it named (node 1 runs ranks 2 and 3) are gone, and so is every other rank.
    let pids: Vec<u32> = line
        .split('[')
        .nth(1)
        .and_then(|t| t.split(']').next())
        .unwrap()
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{line}");
    // The policy says what is lost and why.
    assert!(
        err.contains(
            "no node can host ranks 2-3 after the loss of node(s) 1: no spare node is left"
        ),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new(), "{err}");
}

/// The job directory's `decisions.log` (the job runs: its directory exists).
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

/// The heat stencil under `krun --local 3 --spares SPARES -n 6` with checkpoints every
/// 0.5 s and the given injections.
fn heat_job(dir: &Path, heat: &Path, spares: u32, inject: &[&str], steps: &str) -> Command {
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

/// No rank is restarted twice for one failure: (rank, failure epoch) is unique among the
/// `Restart` decisions. Returns them (rank, incarnation, node, failure epoch).
fn restarts_once_per_failure(log: &str) -> Vec<(u64, u64, u64, u64)> {
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

/// A process's environment variable, read from /proc.
fn proc_env(pid: u64, name: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}=")).map(str::to_string)
    })
}

#[test]
fn a_node_killed_after_five_commits_restarts_its_ranks_on_the_spare_the_survivors_roll_back_in_their_own_processes_and_the_job_ends_with_the_serial_checksum(
) {
    let dir = temp("recover");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    let run = Running::start(&dir.0, heat_job(&dir.0, &heat, 1, &["node=1@5ckpt"], "400"));
    // Every rank's pid before the failure (the table shows all six running; the node dies
    // after five commits, seconds later).
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
    run.wait_line("recovered from the failure", Duration::from_secs(240));
    let log = decisions(&dir.0).expect("decisions.log in the job directory");
    for want in [
        "RecoveryStarted",
        "Restart { rank: 2, incarnation: 1, node: 3",
        "Restart { rank: 3, incarnation: 1, node: 3",
        "Recovered",
    ] {
        assert!(log.contains(want), "{want} not in {log}");
    }
    assert_eq!(restarts_once_per_failure(&log).len(), 2, "{log}");
    // The survivors are the same processes (pids), rolled back in place: a new image (its
    // environment names the recovery's wiring epoch) and a new incarnation in the table;
    // the lost ranks run on the spare as new processes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        if let Some(r) = rows(&dir.0) {
            let done = r.len() == 6
                && r.iter().all(|r| r.4 == "running" && r.3 == 1)
                && r.iter().filter(|r| r.1 == 3).count() == 2;
            if done {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the table never showed the recovered ranks: {:?}",
            rows(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in [0usize, 1, 4, 5] {
        assert_eq!(
            (after[r].1, after[r].2),
            (before[r].1, before[r].2),
            "rank {r} must keep its node and pid: before {before:?}, after {after:?}"
        );
        assert_eq!(
            proc_env(after[r].2, "KRUN_WIRING_EPOCH").as_deref(),
            Some("1"),
            "rank {r} (pid {}) runs the re-executed image",
            after[r].2
        );
    }
    for r in [2usize, 3] {
        assert_eq!(after[r].1, 3, "{after:?}");
        assert_ne!(after[r].2, before[r].2, "{after:?}");
    }
    // The policy's decisions are in the process table, and `krun status` shows them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let decided = status(&dir.0).is_some_and(|s| {
            (0..6).all(|r| {
                let d = s["status"]["ranks"][r]["decision"].as_str().unwrap_or("");
                if r == 2 || r == 3 {
                    d.contains("restart on node 3 from checkpoint 5 as incarnation 1")
                } else {
                    d.contains("roll back in place to checkpoint 5")
                }
            })
        });
        if decided {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no decisions in the table: {:?}",
            status(&dir.0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = krun(&dir.0).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("rank 2 decision ") && text.contains("restart on node 3"),
        "{text}"
    );
    let (ok, out, err, _) = run.finish(Duration::from_secs(240));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(err.contains("krun: node 1 failed at epoch"), "{err}");
    assert!(
        err.contains("ranks 2-3 restart on spare node 3 from checkpoint 5")
            && err.contains("ranks 0-1,4-5 roll back to checkpoint 5"),
        "{err}"
    );
    assert!(
        err.contains("ranks 0-1,4-5 roll back inside their live processes"),
        "{err}"
    );
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert!(
        err.contains("rank 2 runs on node 3") && err.contains("came from the checkpoint store"),
        "{err}"
    );
    // Every rank restored the recovery line's image (the lost ones from the store's bytes:
    // the incremental chain).
    for r in 0..6 {
        assert!(
            out.contains(&format!("heat: rank {r} restored version 5 ")),
            "rank {r}: {out}"
        );
    }
    let summary = err
        .lines()
        .find(|l| l.contains(" held in them"))
        .unwrap_or_else(|| panic!("no summary in {err}"));
    assert!(
        summary.contains("1 node failure, 1 recovery: 2 ranks restarted, 4 rolled back"),
        "{summary}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// The newest `Committed` version before the line at `index` of the decisions.
fn committed_before(lines: &[String], index: usize) -> Option<u64> {
    lines[..index]
        .iter()
        .filter(|l| l.starts_with("Committed {"))
        .filter_map(|l| field(l, "version"))
        .max()
}

#[test]
fn a_node_killed_during_a_checkpoint_aborts_it_everywhere_and_the_job_recovers_from_the_previous_commit(
) {
    let dir = temp("duringckpt");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    let run = Running::start(
        &dir.0,
        heat_job(&dir.0, &heat, 1, &["node=1@ckpt3:capture"], "400"),
    );
    run.wait_line(
        "injected failure at the capture of checkpoint attempt 3: SIGKILL to node 1",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let lines = decision_lines(&log);
    // The checkpoint being captured is aborted, and the recovery goes back to the commit
    // before it.
    let (at, aborted) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.starts_with("Aborted {") && l.contains("failed while it was taken"))
        .unwrap_or_else(|| panic!("no checkpoint aborted by the failure in {log}"));
    let aborted = field(aborted, "version").unwrap();
    let line = committed_before(&lines, at).expect("a commit before the failure");
    assert!(line < aborted, "{log}");
    assert!(
        !lines[..at]
            .iter()
            .any(|l| l.starts_with("Committed {") && field(l, "version") == Some(aborted)),
        "{log}"
    );
    let recovery = lines
        .iter()
        .find(|l| l.starts_with("RecoveryStarted"))
        .unwrap_or_else(|| panic!("no recovery in {log}"));
    assert_eq!(field(recovery, "version"), Some(line), "{log}");
    assert!(
        err.contains(&format!(
            "ranks 2-3 restart on spare node 3 from checkpoint {line}"
        )),
        "{err}"
    );
    assert_eq!(restarts_once_per_failure(&log).len(), 2, "{log}");
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn the_spare_killed_while_it_restores_the_lost_ranks_is_replaced_by_the_next_spare() {
    let dir = temp("duringrestart");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    // Node 1 dies after 3 commits; spare node 3, ordered to restore its ranks, dies as soon
    // as the order went out.
    let run = Running::start(
        &dir.0,
        heat_job(
            &dir.0,
            &heat,
            2,
            &["node=1@3ckpt", "node=3@recovery1"],
            "400",
        ),
    );
    run.wait_line(
        "injected failure at recovery 1: SIGKILL to node 3",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let restarts = restarts_once_per_failure(&log);
    for rank in [2, 3] {
        let nodes: Vec<u64> = restarts
            .iter()
            .filter(|r| r.0 == rank)
            .map(|r| r.2)
            .collect();
        assert_eq!(nodes, vec![3, 4], "rank {rank}: {log}");
    }
    // The survivors rolled back once, in place, and were not rolled back again.
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert!(err.contains("2 node failures"), "{err}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn two_failures_in_a_row_use_two_spares_and_the_job_ends_with_the_serial_checksum() {
    let dir = temp("tworow");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "600"]);
    let run = Running::start(
        &dir.0,
        heat_job(&dir.0, &heat, 2, &["node=1@3ckpt", "node=2@7ckpt"], "600"),
    );
    run.wait_line(
        "injected failure: SIGKILL to node 2",
        Duration::from_secs(300),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let restarts = restarts_once_per_failure(&log);
    let placed: Vec<(u64, u64)> = restarts.iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(placed, vec![(2, 3), (3, 3), (4, 4), (5, 4)], "{log}");
    assert_eq!(log.matches("Recovered").count(), 2, "two recoveries: {log}");
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert!(
        err.contains("2 node failures, 2 recoveries: 4 ranks restarted"),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn losing_the_node_of_rank_0_and_a_supervisor_restarts_its_ranks_on_the_spare() {
    let dir = temp("node0");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "400"]);
    let run = Running::start(&dir.0, heat_job(&dir.0, &heat, 1, &["node=0@3ckpt"], "400"));
    run.wait_line(
        "injected failure: SIGKILL to node 0",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    // Rank 0 (it prints the checksum) ran on the spare at the end.
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(err.contains("ranks 0-1 restart on spare node 3"), "{err}");
    assert_eq!(restarts_once_per_failure(&log).len(), 2, "{log}");
    assert!(
        !err.contains("could not roll back inside its process"),
        "{err}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn a_node_killed_before_the_first_checkpoint_restarts_every_rank_from_the_start_with_its_ranks_on_the_spare(
) {
    let dir = temp("fromstart");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "200"]);
    let mut cmd = krun(&dir.0);
    // Checkpoints on request only: none is taken before the failure.
    cmd.args(["--local", "3", "--spares", "1", "-n", "6"])
        .args(["--inject-failure", "node=2@2s"])
        .arg(&heat)
        .args(["48", "40", "200", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let o = run_bounded(cmd, Duration::from_secs(240));
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    assert!(
        err.contains("ranks 4-5 restart on spare node 3 from the start"),
        "{err}"
    );
    assert!(
        err.contains("1 node failure, 1 recovery: 6 ranks restarted, 0 rolled back"),
        "{err}"
    );
    assert!(!out.contains("restored version"), "{out}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

/// The heat stencil on 4 nodes of one rank each plus 2 spares (`krun --local 4 --spares 2
/// -n 4`: parity on by default, sets {0, 1} and {2, 3}; buddies 0 -> 1 -> 2 -> ...), with
/// nodes 0 and 1 SIGKILLed at once when the 4th checkpoint's barrier starts: node 0's
/// image of the recovery line lost its L1 (node 0) and its L2 (node 1).
fn buddy_pair_job(dir: &Path, heat: &Path, steps: &str) -> Command {
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
fn planned_source(err: &str, rank: u32) -> Option<String> {
    let group = format!("rank {rank} restarts on ");
    err.lines()
        .filter(|l| l.starts_with("krun: "))
        .flat_map(|l| l.split("; "))
        .filter(|part| part.starts_with(&group))
        .filter_map(|part| {
            let (_, src) = part.split_once(" (")?;
            Some(src.trim_end_matches(')').to_string())
        })
        .last()
}

/// The line krund prints for the image of `rank` it fetched for a restart.
fn fetched_line(err: &str, rank: u32) -> Option<&str> {
    err.lines()
        .find(|l| l.contains(&format!("krund: rank {rank}: image v")))
}

#[test]
fn losing_a_buddy_pair_at_once_restores_the_lost_rank_from_l3_parity_on_a_spare() {
    let dir = temp("pair");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "500"]);
    let run = Running::start(&dir.0, buddy_pair_job(&dir.0, &heat, "500"));
    run.wait_line(
        "injected failure at the barrier of checkpoint attempt 4: SIGKILL to node",
        Duration::from_secs(240),
    );
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    // Both nodes were killed, and their ranks restarted on the two spares.
    assert!(err.contains("SIGKILL to node 0"), "{err}");
    assert!(err.contains("SIGKILL to node 1"), "{err}");
    let restarts = restarts_once_per_failure(&log);
    let mut placed: Vec<(u64, u64)> = restarts.iter().map(|r| (r.0, r.2)).collect();
    placed.sort_unstable();
    assert_eq!(placed.len(), 2, "{log}");
    assert_eq!((placed[0].0, placed[1].0), (0, 1), "{log}");
    assert!(placed.iter().all(|p| p.1 >= 4), "on the spares: {log}");
    // The policy knew it: its last plan for rank 0 names L3 and the parity holder (one of
    // the surviving rank nodes 2-3), its plan for rank 1 the L2 copy on node 2.
    let r0_plan = planned_source(&err, 0).unwrap_or_else(|| panic!("no plan for rank 0:\n{err}"));
    assert!(
        r0_plan.starts_with("L3 from node 2") || r0_plan.starts_with("L3 from node 3"),
        "{r0_plan}\n{err}"
    );
    let r1_plan = planned_source(&err, 1).unwrap_or_else(|| panic!("no plan for rank 1:\n{err}"));
    assert!(r1_plan.starts_with("L2 from node 2"), "{r1_plan}\n{err}");
    // Rank 0's image was in node 0's memory (L1) and node 1's (L2): it came from parity;
    // rank 1's L2 copy was on node 2.
    let r0 = fetched_line(&err, 0).unwrap_or_else(|| panic!("no fetch of rank 0:\n{err}"));
    assert!(
        r0.contains("from L3") && r0.contains("rebuilt from parity"),
        "{r0}"
    );
    let r1 = fetched_line(&err, 1).unwrap_or_else(|| panic!("no fetch of rank 1:\n{err}"));
    assert!(r1.contains("from L2 on node 2"), "{r1}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}

#[test]
fn losing_a_buddy_pair_without_parity_or_disk_ends_the_job_naming_the_lost_rank_and_checkpoint() {
    let dir = temp("pairlost");
    let heat = build_heat(&dir.0);
    let mut cmd = buddy_pair_job(&dir.0, &heat, "500");
    cmd.env("KRUN_STORE_PARITY", "off");
    let o = run_bounded(cmd, Duration::from_secs(300));
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(checksum(&out).is_none(), "{out}\n{err}");
    let why = err
        .lines()
        .find(|l| l.contains("krun: the job cannot continue"))
        .unwrap_or_else(|| panic!("no reason given:\n{err}"));
    // Rank 0 is named, and that no copy of its image survives at any level.
    assert!(why.contains("rank 0"), "{why}");
    assert!(
        why.contains("not held at any level")
            || why.contains("no valid copy")
            || why.contains("nothing can restore"),
        "{why}"
    );
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
}
