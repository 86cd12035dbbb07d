//! The harness the recovery job tests share (`recovery_job.rs`, `recovery_pairs.rs`):
//! temporary job directories, building the heat stencil, krun bounded in time with its
//! lines as they come, the process table, the decisions log and the lines krun and krund
//! print about a recovery.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`: tests run from `target/<profile>/deps`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp(tag: &str) -> TempDir {
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
pub struct Job(pub Child);
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

pub fn build_heat(out: &Path) -> PathBuf {
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

pub fn krun(dir: &Path) -> Command {
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

pub fn checksum(t: &str) -> Option<String> {
    t.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .map(str::to_string)
}

pub fn serial(dir: &Path, args: &[&str]) -> String {
    let o = Command::new(dir.join("heat_serial"))
        .args(args)
        .output()
        .unwrap();
    checksum(&String::from_utf8_lossy(&o.stdout)).expect("serial checksum")
}

/// Processes still running the test's own heat binary.
pub fn heat_left(heat: &Path) -> Vec<u32> {
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

pub fn status(dir: &Path) -> Option<serde_json::Value> {
    let o = krun(dir).args(["status", "--json"]).output().ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// The job directory's `decisions.log` (the job runs: its directory exists).
pub fn decisions(dir: &Path) -> Option<String> {
    for e in std::fs::read_dir(dir.join("xdg/krun")).ok()?.flatten() {
        if let Ok(t) = std::fs::read_to_string(e.path().join("decisions.log")) {
            return Some(t);
        }
    }
    None
}

/// A job running in the background: its stderr lines as they come, its output at the end.
pub struct Running {
    job: Job,
    /// The job's `decisions.log` as last read (the job directory goes with the job).
    decisions: std::sync::Arc<std::sync::Mutex<String>>,
    lines: std::sync::mpsc::Receiver<String>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    pub fn start(dir: &Path, mut cmd: Command) -> Running {
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
    pub fn wait_line(&self, text: &str, limit: Duration) -> String {
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
    pub fn decisions(&self) -> String {
        self.decisions.lock().unwrap().clone()
    }

    /// Waits (at most `limit`) for the job to end: (success, stdout, stderr, the decisions
    /// it logged).
    pub fn finish(mut self, limit: Duration) -> (bool, String, String, String) {
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

/// The decisions of `decisions.log` (`DecisionId { .. } Kind { .. }` per line): each
/// line's kind and fields, after the id.
pub fn decision_lines(log: &str) -> Vec<String> {
    log.lines()
        .map(|l| l.split_once("} ").map_or(l, |(_, k)| k).to_string())
        .collect()
}

/// `name { field: N` -> N (the first such field of a decision line).
pub fn field(line: &str, name: &str) -> Option<u64> {
    let rest = line.split(&format!("{name}: ")).nth(1)?;
    let rest = rest.strip_prefix("Some(").unwrap_or(rest);
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
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

/// One status row: (rank, node, pid, incarnation, state).
pub type Row = (u64, u64, u64, u64, String);

/// The status rows while the job runs.
pub fn rows(dir: &Path) -> Option<Vec<Row>> {
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
