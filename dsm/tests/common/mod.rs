//! The harness the multi-process DSM tests share: `dsm-node` processes on 127.0.0.1 whose
//! stdout lines are read as they come (a test waits for a line, then acts: kills a rank,
//! creates a file) and whose stderr is kept for the report. Processes are killed (by PID,
//! through `Child`) and reaped when dropped.
#![allow(dead_code)]
pub mod killed;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const NODE: &str = env!("CARGO_BIN_EXE_dsm-node");

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub err: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        fabric::ofi::remove_shm_segments(self.child.id());
    }
}

/// Starts `dsm-node` with `args` and `env` (bound to 127.0.0.1).
pub fn spawn(args: &[String], env: &[(&str, &str)]) -> Proc {
    let mut child = Command::new(NODE)
        .args(args)
        .envs(env.iter().copied())
        .env("KRUN_FABRIC_BIND", "127.0.0.1")
        .env_remove("KRUN_SECRET_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dsm-node");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    Proc {
        child,
        lines,
        err: Some(err),
    }
}

/// The arguments of rank `rank` of `size` of `scenario` (with `extra` after them).
pub fn rank_args(
    scenario: &str,
    provider: &str,
    bootstrap: &str,
    rank: usize,
    size: usize,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        scenario,
        "--provider",
        provider,
        "--bootstrap",
        bootstrap,
        "--rank",
        &rank.to_string(),
        "--size",
        &size.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

impl Proc {
    /// Waits (bounded by `deadline`) for a stdout line containing `what`; returns it. On
    /// a timeout or an early exit, panics with the process's stderr.
    pub fn line_with(&mut self, what: &str, deadline: Instant, who: &str) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    let _ = self.child.kill();
                    let err = self.take_stderr();
                    panic!("{who} never printed {what:?} ({status:?}):\n{err}");
                }
            }
        }
    }

    /// Waits (bounded by `deadline`) for the process to end; returns its status and
    /// stderr. Panics on a timeout ("hangs").
    pub fn wait_exit(&mut self, deadline: Instant, who: &str) -> (ExitStatus, String) {
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let err = self.take_stderr();
                panic!("{who} hangs:\n{err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.take_stderr())
    }

    /// The stderr read so far (once the process ended: all of it).
    pub fn take_stderr(&mut self) -> String {
        let _ = self.child.try_wait();
        self.err
            .take()
            .map(|e| e.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

/// The `key=value` pairs of a `krun-result` line.
pub fn pairs(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Proc {
    /// The stdout lines not read yet, up to the end of the output (call it once the
    /// process ended or was killed: it waits for stdout to close).
    pub fn rest_of_stdout(&mut self) -> Vec<String> {
        self.lines.iter().collect()
    }

    /// The `krun-result` pairs of the stdout lines not read yet (later keys win), each
    /// line echoed on stderr under `who`; once the process ended.
    pub fn results(&mut self, who: &str) -> HashMap<String, String> {
        let mut kv = HashMap::new();
        for line in self.rest_of_stdout() {
            if let Some(rest) = line.strip_prefix("krun-result ") {
                eprintln!("{who}: {rest}");
                kv.extend(pairs(rest));
            }
        }
        kv
    }

    /// Ends the process (by its PID, through `Child`) if it still runs; returns the last
    /// `n` lines of its stderr.
    pub fn kill_and_tail(&mut self, n: usize) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        tail(&self.take_stderr(), n)
    }

    /// Whether the process ended with a failure.
    pub fn failed(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(s)) if !s.success())
    }
}
