//! The harness the uncoordinated-policy job tests share (`uncoordinated_job.rs`,
//! `uncoordinated_nolog.rs`): temporary job directories, building the heat stencil, a
//! bounded krun with its lines, the process table and the decisions log.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../job_common/mod.rs"]
mod job;
pub use job::*;

pub fn temp(tag: &str) -> TempDir {
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

    /// As [`Running::wait_line`], also returning the lines that came before it.
    pub fn wait_line_after(&self, text: &str, limit: Duration) -> (String, Vec<String>) {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(text) => return (l, seen),
                Ok(l) => seen.push(l),
                Err(e) => panic!(
                    "no line with {text:?} within {limit:?} ({e}):\n{}",
                    seen.join("\n")
                ),
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

/// A policy file in `dir`.
pub fn policy_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `krun policy ARGS` against the job (bounded by krun's own 120 s socket timeout): its
/// success and its text (stdout and stderr).
pub fn policy(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = krun(dir).arg("policy").args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The process `pid`'s parent (from `/proc/PID/stat`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces, so from the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn exe_name(pid: u32) -> Option<String> {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    Some(p.file_name()?.to_string_lossy().into_owned())
}

/// SIGKILLs node `node` of the job: its krund (the nearest `krund` above its ranks'
/// processes, all started by the krun this test started) and then its ranks, as
/// `--inject-failure` does. Returns the ranks' pids killed.
pub fn kill_node(dir: &Path, node: u64) -> Vec<u32> {
    let (krund, pids) = node_processes(dir, node);
    kill_processes(krund, &pids);
    pids
}

/// SIGKILLs a node's krund, then its ranks (pids from [`node_processes`]).
pub fn kill_processes(krund: u32, pids: &[u32]) {
    // SAFETY: kill on processes the krun this test started runs (found by
    // `node_processes` in the job's own process table).
    unsafe {
        libc::kill(krund as i32, libc::SIGKILL);
        for &p in pids {
            libc::kill(p as i32, libc::SIGKILL);
        }
    }
}

/// Node `node`'s krund and its ranks' pids, once it runs a rank.
pub fn node_processes(dir: &Path, node: u64) -> (u32, Vec<u32>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let pids: Vec<u32> = loop {
        if let Some(r) = rows(dir) {
            let p: Vec<u32> = r
                .iter()
                .filter(|r| r.1 == node && r.4 == "running" && r.2 > 0)
                .map(|r| r.2 as u32)
                .collect();
            if !p.is_empty() {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "node {node} runs no rank");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut krund = None;
    let mut at = pids[0];
    for _ in 0..4 {
        match parent_of(at) {
            Some(p) if exe_name(p).as_deref() == Some("krund") => {
                krund = Some(p);
                break;
            }
            Some(p) if p > 1 => at = p,
            _ => break,
        }
    }
    let krund = krund.unwrap_or_else(|| panic!("no krund above rank pid {}", pids[0]));
    (krund, pids)
}

/// The heat stencil (48 x 40, 200 steps) under `krun --local 3 --spares 1 -n 6 --policy
/// FILE` (`policy_text`) with node 2 SIGKILLed while the ranks swap their first addresses
/// (forced: ranks 4-5, on node 2, wait 8 s inside the exchange with `KRUN_TEST_INIT_PAUSE`;
/// node 2 dies 2 s after every node is up, so ranks 0-3 wait in it when it breaks). No rank
/// has delivered a message or checkpointed: the policy must restart every rank from its
/// start in a new wiring epoch (ranks 4-5 on the spare, node 3), not keep ranks running that
/// never finished their `krun_init`. Checks what both modes share (the job ends with the
/// serial checksum, the forced path was taken, the recovery line names every rank from the
/// start, no rank is left behind) and returns (stdout, stderr, the decisions).
pub fn killed_while_the_ranks_swap_their_first_addresses(
    tag: &str,
    policy_text: &str,
) -> (String, String, String) {
    let dir = temp(tag);
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "200"]);
    let policy = policy_file(&dir.0, "policy.toml", policy_text);
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "--spares", "1", "-n", "6", "--policy"])
        .arg(&policy)
        .args(["--inject-failure", "node=2@2s"])
        .env("KRUN_LOG_REGION_BYTES", "262144")
        .env("KRUN_TEST_INIT_PAUSE", "4,5:8000")
        .arg(&heat)
        .args(["48", "40", "200", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let run = Running::start(&dir.0, cmd);
    let (ok, out, err, log) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    // The survivors were inside the exchange: it broke under them (each held the error
    // and took the recovery's order), or the order came first; either way none ended on it.
    if err.contains("the address exchange broke") {
        assert!(err.contains("waiting for the recovery's order"), "{err}");
    }
    assert!(!err.contains("krun_init failed"), "{err}");
    // The policy saw the wiring unfinished: every rank from its start, in a new epoch.
    let notice = err
        .lines()
        .find(|l| l.contains("krun: node 2 failed at epoch") && l.contains("logging)"))
        .unwrap_or_else(|| panic!("no recovery line: {err}"));
    assert!(
        notice.contains("before the job's wiring finished")
            && notice.contains("rank 4 restarts on node 3 from the start")
            && notice.contains("rank 5 restarts on node 3 from the start")
            && !notice.contains("keep running"),
        "{notice}"
    );
    for r in 0..4 {
        assert!(
            notice.contains(&format!("rank {r} rolls back to the start")),
            "{notice}"
        );
    }
    assert!(err.contains("recovered from the failure"), "{err}");
    let lines = decision_lines(&log);
    let recovery: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("RecoveryLine {"))
        .collect();
    assert_eq!(recovery.len(), 1, "{log}");
    // The forced window: no rank had checkpointed when the line was drawn.
    let before_line = lines
        .iter()
        .take_while(|l| !l.starts_with("RecoveryLine {"))
        .filter(|l| l.starts_with("RankCheckpointed {"))
        .count();
    assert_eq!(before_line, 0, "a rank checkpointed before the kill: {log}");
    for r in 0..6 {
        assert!(
            recovery[0].contains(&format!("({r}, None)")),
            "{}",
            recovery[0]
        );
    }
    assert!(recovery[0].contains("rewire: true"), "{}", recovery[0]);
    // Each rank restarted once, ranks 4-5 on the spare, the others on their own nodes.
    let mut restarts: Vec<(u64, u64)> = lines
        .iter()
        .filter(|l| l.starts_with("Restart {"))
        .map(|l| (field(l, "rank").unwrap(), field(l, "node").unwrap()))
        .collect();
    restarts.sort_unstable();
    assert_eq!(
        restarts,
        vec![(0, 0), (1, 0), (2, 1), (3, 1), (4, 3), (5, 3)],
        "{log}"
    );
    // Nobody restored an image (there was none) and nobody rejoined alone.
    assert!(!out.contains("restored version"), "{out}");
    assert!(!err.contains("rejoined the running ranks"), "{err}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new());
    (out, err, log)
}
