//! Policies swapped while a job runs (`krun policy load|unload|show`, `krun --policy FILE`),
//! on the C heat stencil under `krun --local 3`: each swap happens at a coordinated
//! checkpoint and loses no work; a node killed after a swap is recovered by the policy then
//! in force; the job ends with the serial reference's checksum. A module of another ABI
//! version, a module that panics (while it builds its policy, or later at an event), an
//! unsafe change and a wrong description all leave the job on its previous policy.
//!
//! Needs `cargo build -p rank -p policy-module-example --examples` first (libkrun.so, the
//! example module and the wrong-ABI module).
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod job_common;
use job_common::*;

fn temp(tag: &str) -> TempDir {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "krun-swap-{tag}-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(dir.0.join("xdg")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.0.join("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// The example module and the module built against another ABI version.
fn modules() -> (PathBuf, PathBuf) {
    let t = target_dir();
    let (m, w) = (
        t.join("libpolicy_module_example.so"),
        t.join("examples/libwrong_abi.so"),
    );
    for p in [&m, &w] {
        assert!(
            p.exists(),
            "{} not built (cargo build -p policy-module-example --examples)",
            p.display()
        );
    }
    (m, w)
}

/// Writes a description file.
fn description(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `krun policy ARGS` against the job (bounded by krun's own 120 s socket timeout).
fn policy(dir: &Path, args: &[&str]) -> Output {
    krun(dir).arg("policy").args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A job in the background: its stderr lines as they come, its output at the end.
struct Running {
    job: Job,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
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
        Running {
            job,
            lines,
            seen: Vec::new(),
            stdout,
            stderr,
        }
    }

    /// Waits (at most `limit`) for a stderr line containing `text`; returns it.
    fn wait_line(&mut self, text: &str, limit: Duration) -> String {
        self.try_wait_line(text, limit).unwrap_or_else(|| {
            panic!(
                "no line with {text:?} within {limit:?}:\n{}",
                self.seen.join("\n")
            )
        })
    }

    /// As `wait_line`; `None` when no such line came in time.
    fn try_wait_line(&mut self, text: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(text) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits until every one of `ranks` ranks runs.
    fn wait_running(&self, dir: &Path, ranks: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while status(dir).is_none_or(|s| {
            s["status"]["ranks"]
                .as_array()
                .is_none_or(|r| r.len() < ranks || r.iter().any(|r| r["state"] != "running"))
        }) {
            assert!(Instant::now() < deadline, "the job never ran");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (at most `limit`) for the job's end: (success, stdout, stderr).
    fn finish(mut self, limit: Duration) -> (bool, String, String) {
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
        (
            code.success(),
            self.stdout.join().unwrap(),
            self.stderr.join().unwrap(),
        )
    }
}

/// Asks for `n` checkpoints one after the other, each waited for (its commit line). A
/// request that reaches the policy while the previous checkpoint is still being released is
/// dropped by it: asked again after 10 s (at most 6 times).
fn checkpoints(dir: &Path, run: &mut Running, n: usize) {
    for i in 0..n {
        let committed = (0..6).any(|_| {
            let o = krun(dir).arg("checkpoint").output().unwrap();
            assert!(o.status.success(), "{}", text(&o));
            run.try_wait_line(
                "committed (asked by krun checkpoint)",
                Duration::from_secs(10),
            )
            .is_some()
        });
        assert!(
            committed,
            "checkpoint request {i} never committed:\n{}",
            run.seen.join("\n")
        );
    }
}

/// Swaps in `file` and returns krun's answer (asserting it succeeded).
fn load(dir: &Path, file: &Path) -> String {
    let o = policy(dir, &["load", file.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "krun policy load {}: {}",
        file.display(),
        text(&o)
    );
    text(&o)
}

/// Every `checkpoint N committed` of `err`, in order.
fn commits(err: &str) -> Vec<u64> {
    err.lines()
        .filter_map(|l| l.split("checkpoint ").nth(1))
        .filter_map(|r| r.split_once(" committed"))
        .filter_map(|(n, _)| n.parse().ok())
        .collect()
}

/// The policy a job switches to, then back from: today a policy module (the example: the
/// coordinated policy at its own cadence); once the uncoordinated policy is built in, its
/// description (`policy = "uncoordinated"` with `[logging] messages = true`) goes here.
fn middle_policy(dir: &Path) -> (PathBuf, &'static str) {
    let (module, _) = modules();
    (
        description(
            dir,
            "middle.toml",
            &format!("module = {:?}\n[params]\n", module.display().to_string()),
        ),
        "example-fixed-cadence",
    )
}

#[test]
fn a_job_switches_policy_twice_while_it_runs_and_each_policy_recovers_a_node_killed_after_its_swap()
{
    let dir = temp("twice");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &["48", "40", "4000"]);
    // Checkpoints only on request: the commits (swaps and `krun checkpoint`) are counted
    // by the test, so the injected failures fall after each swap. The start description
    // gives the spares.
    let start = description(
        &dir.0,
        "start.toml",
        "policy = \"coordinated\"\nspares = 2\n",
    );
    let (middle, middle_name) = middle_policy(&dir.0);
    let back = description(
        &dir.0,
        "back.toml",
        "policy = \"coordinated\"\nkeep_commits = 3\nmax_restarts = 5\n",
    );
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "-n", "6", "--policy"])
        .arg(&start)
        .args(["--inject-failure", "node=1@3ckpt"])
        .args(["--inject-failure", "node=2@6ckpt"])
        .arg(&heat)
        .args(["48", "40", "4000", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let mut run = Running::start(cmd);
    run.wait_running(&dir.0, 6);
    let shown = text(&policy(&dir.0, &["show"]));
    assert!(
        shown.contains("in force: coordinated since the job's start"),
        "{shown}"
    );

    // Swap 1 (commit 1 is its cut), two more commits: node 1 dies, the middle policy
    // recovers it.
    let answer = load(&dir.0, &middle);
    run.wait_line("in force from checkpoint 1", Duration::from_secs(30));
    assert!(
        answer.contains(&format!("policy {middle_name}")) && answer.contains("from checkpoint 1"),
        "{answer}"
    );
    let shown = text(&policy(&dir.0, &["show"]));
    assert!(
        shown.contains(&format!("in force: {middle_name} since checkpoint 1")),
        "{shown}"
    );
    checkpoints(&dir.0, &mut run, 2);
    run.wait_line(
        "injected failure: SIGKILL to node 1",
        Duration::from_secs(60),
    );
    run.wait_line("recovered from the failure", Duration::from_secs(120));
    let shown = text(&policy(&dir.0, &["show"]));
    assert!(
        shown.contains(&format!("in force: {middle_name}")),
        "{shown}"
    );

    // Swap 2 back to a coordinated policy (commit 4), two more: node 2 dies, the
    // coordinated policy recovers it.
    let answer = load(&dir.0, &back);
    run.wait_line("in force from checkpoint 4", Duration::from_secs(30));
    assert!(answer.contains("from checkpoint 4"), "{answer}");
    checkpoints(&dir.0, &mut run, 2);
    run.wait_line(
        "injected failure: SIGKILL to node 2",
        Duration::from_secs(60),
    );
    run.wait_line("recovered from the failure", Duration::from_secs(120));
    let shown = text(&policy(&dir.0, &["show"]));
    assert!(
        shown.contains("in force: coordinated since checkpoint 4"),
        "{shown}"
    );
    assert!(shown.contains("keep 3 commits"), "{shown}");

    let (ok, out, err) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    // Versions never reused across the swaps; both failures recovered, nothing else rolled
    // back (the swaps lost no work); the summary covers every policy.
    let c = commits(&err);
    assert!(c.windows(2).all(|w| w[0] < w[1]), "{c:?}\n{err}");
    assert_eq!(&c[..6], &[1, 2, 3, 4, 5, 6], "{err}");
    assert!(!err.contains("goes back to policy"), "{err}");
    let summary = err
        .lines()
        .find(|l| l.contains(" held in them"))
        .unwrap_or_else(|| panic!("no summary in {err}"));
    assert!(
        summary.contains("2 node failures, 2 recoveries"),
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}

#[test]
fn a_wrong_abi_a_panicking_module_an_unsafe_change_and_a_bad_file_leave_the_job_on_its_policy() {
    let dir = temp("refused");
    let heat = build_heat(&dir.0);
    let (module, wrong) = modules();
    let want = serial(&dir.0, &["48", "40", "900"]);
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "3", "-n", "3", "--checkpoint-interval", "0.5"])
        .arg(&heat)
        .args(["48", "40", "900", "0"])
        .env("HEAT_STEP_DELAY_US", "20000");
    let mut run = Running::start(cmd);
    run.wait_running(&dir.0, 3);
    run.wait_line("checkpoint 1 committed", Duration::from_secs(60));
    let refused = |file: &Path, want: &[&str]| {
        let o = policy(&dir.0, &["load", file.to_str().unwrap()]);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        for w in want {
            assert!(t.contains(w), "{w:?} not in {t}");
        }
    };
    let m = |s: &Path| format!("module = {:?}\n", s.display().to_string());
    // Another ABI version.
    let abi = policies::module::abi::ABI_VERSION;
    refused(
        &description(&dir.0, "wrong.toml", &m(&wrong)),
        &[
            &format!("ABI version {}", abi + 41),
            "the job keeps policy coordinated",
        ],
    );
    // A panic while the module builds its policy.
    refused(
        &description(
            &dir.0,
            "panic-create.toml",
            &format!("{}[params]\npanic = \"create\"\n", m(&module)),
        ),
        &[
            "panicked: example module: panic asked for at create",
            "keeps policy coordinated",
        ],
    );
    // Dropping the only levels that hold the recovery line (L1, L2).
    refused(
        &description(
            &dir.0,
            "only-l4.toml",
            "policy = \"coordinated\"\ncommit_level = \"L4\"\n[levels]\nL4 = 1\n",
        ),
        &["unsafe policy change refused", "held only at L1, L2"],
    );
    // A wrong key: the file, the line and the key.
    let bad = description(
        &dir.0,
        "bad.toml",
        "policy = \"coordinated\"\n\ninterval = 5\n",
    );
    refused(&bad, &[&format!("{}:3: interval", bad.display())]);
    let shown = text(&policy(&dir.0, &["show"]));
    assert!(
        shown.contains("in force: coordinated since the job's start"),
        "{shown}"
    );

    // A module that panics at its third event once in force: the job goes back to the
    // coordinated policy at the recovery line.
    let panics = description(
        &dir.0,
        "panic-event.toml",
        &format!(
            "{}[params]\npanic = \"after:3\"\ncadence_ms = \"300\"\n",
            m(&module)
        ),
    );
    let answer = load(&dir.0, &panics);
    assert!(answer.contains("policy example-fixed-cadence"), "{answer}");
    run.wait_line(
        "panicked: example module: panic asked for at event 3",
        Duration::from_secs(60),
    );
    let shown = text(&policy(&dir.0, &["show"]));
    assert!(shown.contains("in force: coordinated"), "{shown}");
    // Checkpoints go on under it.
    let line = run.wait_line("committed", Duration::from_secs(60));
    assert!(line.contains("checkpoint"), "{line}");
    // And `unload` keeps the built-in policy (nothing to unload: a swap to the same).
    let o = policy(&dir.0, &["unload"]);
    assert!(o.status.success(), "{}", text(&o));
    let (ok, out, err) = run.finish(Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert_eq!(checksum(&out), Some(want), "{out}\n{err}");
    let c = commits(&err);
    assert!(c.windows(2).all(|w| w[0] < w[1]), "{c:?}\n{err}");
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}
