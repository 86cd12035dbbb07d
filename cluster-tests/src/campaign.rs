//! Fault campaigns: a job under krun's coordinated policy with spares, one node SIGKILLed at
//! a random time (`krun --inject-failure node=N@Tms`), trial after trial from one seed; and
//! runs of a job whose every output line is time-stamped on arrival (`bench ha` measures
//! recoveries from them).
//!
//! ```no_run
//! use cluster_tests::campaign::{trials, Campaign};
//! let c = Campaign::local("target/debug/krun", &["heat_ha", "96", "64", "400"], 3, 6);
//! for t in trials(42, 3, c.ranked_nodes, 500..3000) {
//!     let out = c.run(&t)?;
//!     println!("trial {}: node {} at {} ms: exit {:?}", t.index, t.node, t.at_ms, out.code);
//! }
//! # Ok::<(), cluster_tests::ClusterError>(())
//! ```
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{ClusterError, Result};
use crate::process::kill_process;

/// Seconds since the Unix epoch (the clock the ranks' own time stamps use).
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One output line of a job, stamped when it arrived.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// Arrival, seconds since the Unix epoch.
    pub at: f64,
    pub stderr: bool,
    pub text: String,
}

/// What a finished job printed and how it ended.
#[derive(Clone, Debug, Default)]
pub struct JobOutput {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Stopped because it did not end within its limit.
    pub timed_out: bool,
    pub lines: Vec<Line>,
}

impl JobOutput {
    /// Every line, stdout and stderr interleaved in arrival order.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// The first line containing `pattern`.
    pub fn first(&self, pattern: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.text.contains(pattern))
    }

    /// The last `checksum X` a rank printed (the heat examples' result line).
    pub fn checksum(&self) -> Option<String> {
        self.lines
            .iter()
            .rev()
            .find_map(|l| l.text.split(" checksum ").nth(1))
            .map(|s| s.trim().to_string())
    }
}

/// A job running with its output collected line by line.
pub struct RunningJob {
    cmd: String,
    child: Child,
    lines: Arc<Mutex<Vec<Line>>>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

fn reader(
    stream: impl Read + Send + 'static,
    stderr: bool,
    lines: Arc<Mutex<Vec<Line>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for text in BufReader::new(stream).lines() {
            let Ok(text) = text else { break };
            let at = now_unix();
            lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Line { at, stderr, text });
        }
    })
}

impl RunningJob {
    /// Starts `cmd` with stdout and stderr piped (stdin closed).
    pub fn start(cmd: &mut Command) -> Result<RunningJob> {
        let line = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ClusterError::CommandStart {
                cmd: line.clone(),
                source,
            })?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(reader(o, false, lines.clone()));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(reader(e, true, lines.clone()));
        }
        Ok(RunningJob {
            cmd: line,
            child,
            lines,
            readers,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first line so far containing `pattern`.
    pub fn first(&self, pattern: &str) -> Option<Line> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|l| l.text.contains(pattern))
            .cloned()
    }

    /// Whether the job has ended.
    pub fn ended(&mut self) -> Result<bool> {
        let pid = self.pid();
        self.child
            .try_wait()
            .map(|s| s.is_some())
            .map_err(|source| ClusterError::Wait { pid, source })
    }

    /// SIGTERM (krun stops its nodes), SIGKILL after `grace`; then collects the output.
    pub fn stop(mut self, grace: Duration) -> Result<JobOutput> {
        let _ = kill_process(self.pid(), libc::SIGTERM);
        let limit = grace;
        self.started = Instant::now();
        self.finish(limit, true)
    }

    /// Waits for the job at most `limit` from its start; past it, stops it (SIGTERM, SIGKILL
    /// 10 s later) and marks the output `timed_out`.
    pub fn wait(self, limit: Duration) -> Result<JobOutput> {
        self.finish(limit, false)
    }

    fn finish(mut self, limit: Duration, stopping: bool) -> Result<JobOutput> {
        let pid = self.pid();
        let wait_err = |source| ClusterError::Wait { pid, source };
        let mut timed_out = false;
        let mut termed = stopping;
        let status = loop {
            if let Some(s) = self.child.try_wait().map_err(wait_err)? {
                break s;
            }
            let waited = self.started.elapsed();
            if waited > limit && !termed {
                timed_out = true;
                termed = true;
                let _ = kill_process(pid, libc::SIGTERM);
                self.started = Instant::now();
                continue;
            }
            if termed && waited > limit.max(Duration::from_secs(10)) {
                let _ = kill_process(pid, libc::SIGKILL);
                break self.child.wait().map_err(wait_err)?;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()));
        if lines.is_empty() && status.code().is_none() {
            return Err(ClusterError::Job {
                cmd: self.cmd.clone(),
                reason: format!("ended by a signal ({status}) without printing anything"),
            });
        }
        Ok(JobOutput {
            code: status.code(),
            timed_out,
            lines,
        })
    }
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill_process(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to its end (at most `limit`, see [`RunningJob::wait`]).
pub fn run_job(cmd: &mut Command, limit: Duration) -> Result<JobOutput> {
    RunningJob::start(cmd)?.wait(limit)
}

/// SplitMix64: a small seeded generator (no dependency needed for a few numbers).
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `range` (empty range: its start).
    pub fn in_range(&mut self, range: Range<u64>) -> u64 {
        let span = range.end.saturating_sub(range.start);
        if span == 0 {
            return range.start;
        }
        range.start + self.next_u64() % span
    }
}

/// One trial: SIGKILL node `node` `at_ms` after the nodes started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trial {
    pub index: usize,
    pub node: usize,
    pub at_ms: u64,
}

/// `n` trials from `seed`: each kills one of the nodes `0..ranked_nodes` (the nodes that run
/// ranks; node 0 holds rank 0 and a supervisor) at a time drawn from `window_ms`.
pub fn trials(seed: u64, n: usize, ranked_nodes: usize, window_ms: Range<u64>) -> Vec<Trial> {
    let mut g = SplitMix::new(seed);
    (0..n)
        .map(|index| Trial {
            index,
            node: g.in_range(0..ranked_nodes.max(1) as u64) as usize,
            at_ms: g.in_range(window_ms.clone()),
        })
        .collect()
}

/// A local job (`krun --local N --spares S`) under the coordinated policy.
#[derive(Clone, Debug)]
pub struct Campaign {
    pub krun: PathBuf,
    /// The program and its arguments.
    pub program: Vec<String>,
    /// Nodes that run ranks (`--local`).
    pub ranked_nodes: usize,
    pub spares: usize,
    pub ranks: usize,
    /// `--checkpoint-interval`, seconds.
    pub interval_s: f64,
    /// Extra environment of krun (and so of its nodes and ranks).
    pub env: Vec<(String, String)>,
    /// Extra krun arguments (before the program).
    pub krun_args: Vec<String>,
    /// Bound on one trial.
    pub limit: Duration,
}

impl Campaign {
    /// `ranked_nodes` local nodes + 1 spare, `ranks` ranks, a checkpoint every second, tcp.
    pub fn local(
        krun: impl Into<PathBuf>,
        program: &[&str],
        ranked_nodes: usize,
        ranks: usize,
    ) -> Campaign {
        Campaign {
            krun: krun.into(),
            program: program.iter().map(|s| s.to_string()).collect(),
            ranked_nodes,
            spares: 1,
            ranks,
            interval_s: 1.0,
            env: Vec::new(),
            krun_args: vec!["--provider".into(), "tcp".into()],
            limit: Duration::from_secs(240),
        }
    }

    /// The krun command of a trial (`None`: no failure injected).
    pub fn command(&self, trial: Option<&Trial>) -> Command {
        let mut c = Command::new(&self.krun);
        c.args(["--local", &self.ranked_nodes.to_string()])
            .args(["--spares", &self.spares.to_string()])
            .args(["-n", &self.ranks.to_string()])
            .args(["--checkpoint-interval", &format!("{}", self.interval_s)])
            .args(&self.krun_args);
        if let Some(t) = trial {
            c.args([
                "--inject-failure",
                &format!("node={}@{}ms", t.node, t.at_ms),
            ]);
        }
        c.args(&self.program);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs one trial to its end.
    pub fn run(&self, trial: &Trial) -> Result<JobOutput> {
        run_job(&mut self.command(Some(trial)), self.limit)
    }
}

/// What a trial's output says about it: `Ok(())` when the job exited 0 with checksum `want`
/// after the injected SIGKILL and krun's summary counts one failure and its recovery;
/// otherwise the reason.
pub fn judge(trial: &Trial, out: &JobOutput, want: &str) -> std::result::Result<(), String> {
    let killed = format!("injected failure: SIGKILL to node {}", trial.node);
    let mut why = Vec::new();
    if out.timed_out {
        why.push("did not end in time".to_string());
    }
    if out.code != Some(0) {
        why.push(format!("exit code {:?}", out.code));
    }
    if out.first(&killed).is_none() {
        why.push(format!("krun never printed {killed:?}"));
    }
    if out.first("1 node failure, 1 recovery").is_none() {
        why.push("krun's summary does not count 1 node failure, 1 recovery".into());
    }
    match out.checksum() {
        Some(c) if c == want => {}
        Some(c) => why.push(format!("checksum {c}, the serial reference's is {want}")),
        None => why.push("no checksum printed".into()),
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trials_are_a_function_of_the_seed_and_stay_in_bounds() {
        let a = trials(7, 50, 3, 500..3000);
        assert_eq!(a, trials(7, 50, 3, 500..3000));
        assert_ne!(a, trials(8, 50, 3, 500..3000));
        assert!(a
            .iter()
            .all(|t| t.node < 3 && (500..3000).contains(&t.at_ms)));
        // Every node is drawn in 50 trials (a generator stuck on one value would fail).
        for n in 0..3 {
            assert!(a.iter().any(|t| t.node == n), "node {n} never drawn");
        }
    }

    #[test]
    fn judge_names_every_reason_a_trial_failed() {
        let t = Trial {
            index: 0,
            node: 1,
            at_ms: 900,
        };
        let line = |text: &str| Line {
            at: 0.0,
            stderr: false,
            text: text.into(),
        };
        let mut out = JobOutput {
            code: Some(0),
            timed_out: false,
            lines: vec![
                line("krun: injected failure: SIGKILL to node 1 (pids 1 2)"),
                line("heat 96x64 steps 400 checksum 00ff"),
                line("krun: 3 checkpoints, 1.0 MiB; 1 node failure, 1 recovery: 2 ranks"),
            ],
        };
        assert_eq!(judge(&t, &out, "00ff"), Ok(()));
        let e = judge(&t, &out, "00fe").unwrap_err();
        assert!(e.contains("checksum 00ff"), "{e}");
        out.code = Some(1);
        out.lines.remove(0);
        let e = judge(&t, &out, "00ff").unwrap_err();
        assert!(
            e.contains("exit code Some(1)") && e.contains("SIGKILL to node 1"),
            "{e}"
        );
    }
}
