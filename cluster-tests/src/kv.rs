//! A cluster of real `krun-adapt` daemons (the adaptation layer with its toy key-value
//! service) driven through their stdin and stdout, on loopback or inside the nodes of a
//! [`NetnsCluster`], with key-value clients that check every answer against an
//! exactly-once execution. Shared by the adaptation layer's daemon tests, the partition
//! test and `bench faults`.
//!
//! A daemon prints `ready ...`, `stable EPOCH ... supervisors=A,B members=X,Y`,
//! `ans CLIENT SEQ ok|err ... VALUE`, `ok leave N`, `err ...` and `stopped`; it reads
//! `req CLIENT SEQ KEY put V|get|add D` and `leave NODE`. Every wait is bounded and ends
//! in a [`ClusterError::Daemons`] naming what was awaited and each daemon's last state.
//! Every daemon is killed by PID and reaped when the cluster drops, also on an error.
//!
//! ```no_run
//! use cluster_tests::kv::{Clients, KvCluster, KvSpec};
//! use std::time::Duration;
//! let spec = KvSpec::new(cluster_tests::workspace_bin("krun-adapt"));
//! let mut c = KvCluster::start(&spec, 6)?;
//! let mut clients = Clients::new();
//! clients.run_for(&c, Duration::from_secs(1))?;
//! c.kill(&[4])?;
//! clients.run_until(&c, "the repair", |c| c.settled(1, &[0, 1, 2, 3, 5]))?;
//! let back = clients.read_back(&c, &[0, 1, 2, 3, 5])?;
//! assert_eq!((back.lost, back.wrong.len()), (0, 0));
//! # Ok::<(), cluster_tests::ClusterError>(())
//! ```
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{ClusterError, Result};
use crate::netns::NetnsCluster;
use crate::process::NodeProcess;

/// The test secret every daemon of a [`KvSpec::new`] cluster shares.
pub const TEST_SECRET: &str = "6b72756e2d616461707461746f6e2d746573742d736563726574";

/// How long a wait lasts before it fails, unless a caller says otherwise.
pub const WAIT: Duration = Duration::from_secs(90);

/// A node evicted while alive comes back as its id plus this (adaptation's `REJOIN_STRIDE`).
pub const REJOIN_STRIDE: u32 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn daemons_error(reason: String) -> ClusterError {
    ClusterError::Daemons { reason }
}

/// How every daemon of a cluster is started.
#[derive(Clone, Debug)]
pub struct KvSpec {
    /// The `krun-adapt` binary.
    pub bin: PathBuf,
    /// The cluster secret (hex), given as `KRUN_SECRET`.
    pub secret: String,
    /// `--supervisors`.
    pub supervisors: String,
    /// `--failure-timeout-ms`: krund's default tolerance (3 s) suits daemons, clients and
    /// other tests sharing two cores.
    pub failure_timeout_ms: u64,
    /// More arguments (for example `--tolerate 2`).
    pub extra: Vec<String>,
}

impl KvSpec {
    /// Supervisors 0, 1 and 2, a 3 s failure timeout and [`TEST_SECRET`].
    pub fn new(bin: PathBuf) -> KvSpec {
        KvSpec {
            bin,
            secret: TEST_SECRET.to_string(),
            supervisors: "0,1,2".to_string(),
            failure_timeout_ms: 3000,
            extra: Vec::new(),
        }
    }

    fn command(&self, id: u32, addr: &str, peers: &[(u32, String)], join: bool) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.extra);
        cmd.args(["--id", &id.to_string(), "--listen", addr])
            .args(["--supervisors", &self.supervisors])
            .args(["--failure-timeout-ms", &self.failure_timeout_ms.to_string()]);
        for (p, a) in peers.iter().filter(|(p, _)| *p != id) {
            cmd.args(["--peer", &format!("{p}={a}")]);
        }
        if join {
            cmd.arg("--join");
        }
        cmd.env("KRUN_SECRET", &self.secret)
            .env_remove("KRUN_SECRET_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

/// What a daemon printed so far.
#[derive(Default, Debug)]
pub struct Seen {
    /// It printed `ready`.
    pub ready: bool,
    /// The epoch of its last `stable` line.
    pub stable: u64,
    pub members: Vec<u32>,
    pub supervisors: Vec<u32>,
    /// It printed `stopped` (it left).
    pub stopped: bool,
    /// `ans` lines by (client, sequence number).
    pub answers: BTreeMap<(u32, u64), String>,
    /// Replies to commands (`ok leave N`, `err ...`), in order.
    pub replies: Vec<String>,
    /// Every stdout line with its arrival time.
    pub lines: Vec<(Instant, String)>,
}

enum Proc {
    Local(Child),
    Netns(NodeProcess),
}

/// One `krun-adapt` process.
pub struct KvDaemon {
    pub id: u32,
    pub addr: String,
    proc: Proc,
    reaped: bool,
    stdin: Mutex<Option<ChildStdin>>,
    seen: Arc<Mutex<Seen>>,
    stderr: Arc<Mutex<String>>,
}

impl Drop for KvDaemon {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

impl KvDaemon {
    fn start(id: u32, addr: &str, mut proc: Proc) -> Result<KvDaemon> {
        let (stdin, stdout, stderr_pipe) = match &mut proc {
            Proc::Local(c) => (c.stdin.take(), c.stdout.take(), c.stderr.take()),
            Proc::Netns(p) => (p.stdin(), p.stdout(), p.stderr()),
        };
        let (Some(stdout), Some(mut stderr_pipe)) = (stdout, stderr_pipe) else {
            return Err(daemons_error(format!(
                "node {id}: stdout or stderr not piped"
            )));
        };
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    note_line(&mut lock(&seen), line);
                }
            });
        }
        {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr_pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    lock(&stderr).push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Ok(KvDaemon {
            id,
            addr: addr.to_string(),
            proc,
            reaped: false,
            stdin: Mutex::new(stdin),
            seen,
            stderr,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        match &self.proc {
            Proc::Local(c) => c.id(),
            Proc::Netns(p) => p.pid(),
        }
    }

    /// Writes one command line; false once the daemon is killed or its stdin closed.
    pub fn send(&self, line: &str) -> bool {
        let mut g = lock(&self.stdin);
        match g.as_mut() {
            Some(s) => writeln!(s, "{line}").and_then(|_| s.flush()).is_ok(),
            None => false,
        }
    }

    /// Not killed, not stopped.
    pub fn alive(&self) -> bool {
        !lock(&self.seen).stopped && lock(&self.stdin).is_some()
    }

    /// What it printed so far.
    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// The first stdout line `ok` accepts, with its arrival time.
    pub fn find(&self, ok: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        lock(&self.seen).lines.iter().find(|(_, l)| ok(l)).cloned()
    }

    /// Sends SIGKILL by PID without waiting (see [`KvDaemon::reap`]); the daemon counts as
    /// dead from here on.
    fn signal_kill(&mut self) -> Result<()> {
        *lock(&self.stdin) = None;
        if self.reaped {
            return Ok(());
        }
        match &mut self.proc {
            Proc::Local(c) => c.kill().map_err(|source| ClusterError::Signal {
                pid: c.id(),
                signal: libc::SIGKILL,
                source,
            }),
            Proc::Netns(p) => p.signal(libc::SIGKILL),
        }
    }

    fn reap(&mut self) -> Result<()> {
        if self.reaped {
            return Ok(());
        }
        match &mut self.proc {
            Proc::Local(c) => {
                let pid = c.id();
                c.wait()
                    .map_err(|source| ClusterError::Wait { pid, source })?;
            }
            Proc::Netns(p) => {
                p.wait()?;
            }
        }
        self.reaped = true;
        Ok(())
    }

    /// SIGKILL by PID, then reap.
    pub fn kill(&mut self) -> Result<()> {
        let sent = self.signal_kill();
        self.reap()?;
        match sent {
            // It had exited on its own: reaped is what counts.
            Err(_) if self.reaped => Ok(()),
            other => other,
        }
    }
}

fn note_line(s: &mut Seen, line: String) {
    let w: Vec<&str> = line.split_whitespace().collect();
    let list = |v: &str, key: &str| -> Vec<u32> {
        v.trim_start_matches(key)
            .split(',')
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    match w.as_slice() {
        ["ready", ..] => s.ready = true,
        ["stable", e, _, sups, m] => {
            if let Ok(e) = e.parse() {
                s.stable = e;
            }
            s.members = list(m, "members=");
            s.supervisors = list(sups, "supervisors=");
        }
        ["stopped", ..] => s.stopped = true,
        ["ok", "leave", ..] | ["err", ..] => s.replies.push(line.clone()),
        ["ans", c, q, ..] => {
            if let (Ok(c), Ok(q)) = (c.parse(), q.parse()) {
                s.answers.insert((c, q), line.clone());
            }
        }
        _ => {}
    }
    s.lines.push((Instant::now(), line));
}

/// A free loopback port below the kernel's ephemeral range (32768-60999 here), so that no
/// outgoing connection of a concurrent test can take it between this check and the
/// daemon's bind (seen in CI: "Address already in use" for a port picked with bind(0)).
/// Each process walks its own stretch of 20000-31999.
pub fn free_port() -> Result<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = (std::process::id() % 400) * 30;
    for _ in 0..12_000 {
        let port = 20_000 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            if let Ok(a) = l.local_addr() {
                return Ok(a.to_string());
            }
        }
    }
    Err(daemons_error("no free loopback port in 20000-31999".into()))
}

/// `n` daemons that know each other, and the clients' view of them.
pub struct KvCluster {
    pub daemons: BTreeMap<u32, KvDaemon>,
    /// The first members' addresses (a joining daemon is told these).
    pub addrs: Vec<(u32, String)>,
    spec: KvSpec,
}

impl KvCluster {
    /// `n` daemons on loopback, each knowing the others; returns once all are ready.
    pub fn start(spec: &KvSpec, n: u32) -> Result<KvCluster> {
        let addrs = (0..n)
            .map(|i| Ok((i, free_port()?)))
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = KvCluster {
            daemons: BTreeMap::new(),
            addrs: addrs.clone(),
            spec: spec.clone(),
        };
        for (id, addr) in &addrs {
            cluster.spawn_local(*id, addr, false)?;
        }
        cluster.wait(&format!("{n} daemons ready"), WAIT, |c| {
            c.daemons.values().all(|d| d.seen().ready)
        })?;
        Ok(cluster)
    }

    /// One daemon in each node of `hosts`, listening on the node's address and
    /// `base_port + i`; returns once all are ready.
    pub fn start_in(spec: &KvSpec, hosts: &NetnsCluster, base_port: u16) -> Result<KvCluster> {
        let addrs = (0..hosts.len())
            .map(|i| {
                let ip = hosts.node(i)?.ip();
                Ok((i as u32, format!("{ip}:{}", base_port as usize + i)))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = KvCluster {
            daemons: BTreeMap::new(),
            addrs: addrs.clone(),
            spec: spec.clone(),
        };
        for (id, addr) in &addrs {
            let mut cmd = spec.command(*id, addr, &addrs, false);
            let p = hosts.node(*id as usize)?.spawn(&mut cmd)?;
            let d = KvDaemon::start(*id, addr, Proc::Netns(p))?;
            cluster.daemons.insert(*id, d);
        }
        cluster.wait(&format!("{} daemons ready", addrs.len()), WAIT, |c| {
            c.daemons.values().all(|d| d.seen().ready)
        })?;
        Ok(cluster)
    }

    fn spawn_local(&mut self, id: u32, addr: &str, join: bool) -> Result<()> {
        let d = spawn_local(&self.spec, id, addr, &self.addrs, join)?;
        self.daemons.insert(id, d);
        Ok(())
    }

    /// A new daemon `id` on loopback that joins through the first members.
    pub fn join(&mut self, id: u32) -> Result<()> {
        let addr = free_port()?;
        self.spawn_local(id, &addr, true)
    }

    /// SIGKILLs every daemon of `ids` by PID (all signals first, so they die at once), then
    /// reaps them. They stay in the map, not alive.
    pub fn kill(&mut self, ids: &[u32]) -> Result<()> {
        for id in ids {
            self.daemon_mut(*id)?.signal_kill()?;
        }
        for id in ids {
            self.daemon_mut(*id)?.reap()?;
        }
        Ok(())
    }

    /// SIGKILLs `ids` (as [`KvCluster::kill`]) and forgets them.
    pub fn kill_and_remove(&mut self, ids: &[u32]) -> Result<()> {
        self.kill(ids)?;
        for id in ids {
            self.daemons.remove(id);
        }
        Ok(())
    }

    /// Daemon `id`, or an error naming it.
    pub fn daemon(&self, id: u32) -> Result<&KvDaemon> {
        self.daemons
            .get(&id)
            .ok_or_else(|| daemons_error(format!("no daemon {id}")))
    }

    fn daemon_mut(&mut self, id: u32) -> Result<&mut KvDaemon> {
        self.daemons
            .get_mut(&id)
            .ok_or_else(|| daemons_error(format!("no daemon {id}")))
    }

    /// Sends `line` to daemon `via`; an error if it is gone.
    pub fn send(&self, via: u32, line: &str) -> Result<()> {
        if self.daemon(via)?.send(line) {
            Ok(())
        } else {
            Err(daemons_error(format!(
                "node {via} is gone (sending {line:?})"
            )))
        }
    }

    /// The ids of the live daemons.
    pub fn live(&self) -> Vec<u32> {
        self.daemons
            .values()
            .filter(|d| d.alive())
            .map(|d| d.id)
            .collect()
    }

    /// The supervisors a live daemon reported last.
    pub fn group(&self) -> Vec<u32> {
        self.daemons
            .values()
            .find(|d| d.alive())
            .map(|d| d.seen().supervisors.clone())
            .unwrap_or_default()
    }

    /// One line per daemon: its last view and the tail of its stderr.
    pub fn describe(&self) -> String {
        self.daemons
            .values()
            .map(|d| {
                let s = d.seen();
                let err = d.stderr();
                let tail: String = err.lines().rev().take(6).collect::<Vec<_>>().join(" | ");
                format!(
                    "node {}: stable {} members {:?} stopped {} stderr: {tail}",
                    d.id, s.stable, s.members, s.stopped
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `ok` every 50 ms until it holds; returns the seconds it took, or an error
    /// naming `what` after `bound`.
    pub fn wait(
        &self,
        what: &str,
        bound: Duration,
        ok: impl Fn(&KvCluster) -> bool,
    ) -> Result<f64> {
        let start = Instant::now();
        while !ok(self) {
            if start.elapsed() > bound {
                return Err(daemons_error(format!(
                    "timed out after {bound:?} waiting for {what}\n{}",
                    self.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// Every live daemon is stable at `epoch` with exactly `members`.
    pub fn settled(&self, epoch: u64, members: &[u32]) -> bool {
        self.daemons.values().filter(|d| d.alive()).all(|d| {
            let s = d.seen();
            s.stable == epoch && s.members == members
        })
    }

    /// Every live daemon reports exactly `members` (at any epoch).
    pub fn members_are(&self, members: &[u32]) -> bool {
        self.daemons
            .values()
            .filter(|d| d.alive())
            .all(|d| d.seen().members == members)
    }

    /// Removes and returns the answer to (`client`, `seq`) from whichever daemon gave it.
    pub fn take_answer(&self, client: u32, seq: u64) -> Option<String> {
        self.daemons
            .values()
            .find_map(|d| d.seen().answers.remove(&(client, seq)))
    }

    /// Sends `line` (a request of `client` with sequence `seq`) to `via` and waits for its
    /// answer.
    pub fn ask(&self, client: u32, seq: u64, line: &str, via: u32) -> Result<String> {
        self.send(via, line)?;
        let start = Instant::now();
        loop {
            if let Some(a) = self.take_answer(client, seq) {
                return Ok(a);
            }
            if start.elapsed() > WAIT {
                return Err(daemons_error(format!(
                    "no answer to {line:?} through node {via}\n{}",
                    self.describe()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn spawn_local(
    spec: &KvSpec,
    id: u32,
    addr: &str,
    peers: &[(u32, String)],
    join: bool,
) -> Result<KvDaemon> {
    let mut cmd = spec.command(id, addr, peers, join);
    let child = cmd.spawn().map_err(|source| ClusterError::CommandStart {
        cmd: format!("{} --id {id}", spec.bin.display()),
        source,
    })?;
    KvDaemon::start(id, addr, Proc::Local(child))
}

/// A daemon outside any [`KvCluster`] (for example one with another secret) that knows
/// `peers`.
pub fn spawn_daemon(
    spec: &KvSpec,
    id: u32,
    peers: &[(u32, String)],
    join: bool,
) -> Result<KvDaemon> {
    let addr = free_port()?;
    spawn_local(spec, id, &addr, peers, join)
}

/// What [`Clients::read_back`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadBack {
    /// Keys read.
    pub keys: u64,
    /// Keys answered `err lost:` (every copy died).
    pub lost: u64,
    /// Keys answered with another value than the last acknowledged one (each line).
    pub wrong: Vec<String>,
}

/// Four clients adding to their own keys through the live daemons; every answer is checked
/// against an exactly-once execution.
#[derive(Default)]
pub struct Clients {
    /// The last acknowledged sum of each key.
    pub sums: BTreeMap<u64, i64>,
    /// (client) -> (seq, key, delta, through, sent at).
    pending: BTreeMap<u32, (u64, u64, i64, u32, Instant)>,
    seq: BTreeMap<u32, u64>,
    /// Answers received.
    pub answered: u64,
    round: u64,
    /// No new requests (when nodes die faster than the layer's loss window, keys would be
    /// lost with two copies: a test of the group alone issues none).
    pub quiet: bool,
    /// Answers that differ from the exactly-once execution (each line).
    pub violations: Vec<String>,
}

impl Clients {
    pub fn new() -> Clients {
        Clients::default()
    }

    /// Client rounds with new adds for `how_long`.
    pub fn run_for(&mut self, cluster: &KvCluster, how_long: Duration) -> Result<()> {
        let until = Instant::now() + how_long;
        self.run_until(cluster, "client rounds", move |_| Instant::now() >= until)
            .map(|_| ())
    }

    /// Client rounds (new adds unless [`Clients::quiet`]) until `done` holds; an error after
    /// [`WAIT`] or at the first answer that breaks exactly-once. Returns the seconds taken.
    pub fn run_until(
        &mut self,
        cluster: &KvCluster,
        what: &str,
        done: impl Fn(&KvCluster) -> bool,
    ) -> Result<f64> {
        let start = Instant::now();
        while !done(cluster) {
            if start.elapsed() > WAIT {
                return Err(daemons_error(format!(
                    "timed out waiting for {what}\n{}",
                    cluster.describe()
                )));
            }
            self.round += 1;
            let issue = !self.quiet;
            self.round(cluster, issue);
            if let Some(v) = self.violations.first() {
                return Err(daemons_error(format!("exactly-once broken: {v}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// Waits for every request's answer, then reads every key back through the daemons of
    /// `live` in turn.
    pub fn read_back(&mut self, cluster: &KvCluster, live: &[u32]) -> Result<ReadBack> {
        let start = Instant::now();
        while !self.pending.is_empty() {
            if start.elapsed() > WAIT {
                return Err(daemons_error(format!(
                    "requests without answer: {:?}\n{}",
                    self.pending,
                    cluster.describe()
                )));
            }
            self.round += 1;
            self.round(cluster, false);
            std::thread::sleep(Duration::from_millis(20));
        }
        if live.is_empty() {
            return Err(daemons_error("no live daemon to read through".into()));
        }
        let reader = 99u32;
        let mut back = ReadBack::default();
        for (i, (key, sum)) in self.sums.clone().into_iter().enumerate() {
            let seq = i as u64 + 1;
            let via = live[i % live.len()];
            let line = cluster.ask(reader, seq, &format!("req {reader} {seq} {key} get"), via)?;
            back.keys += 1;
            let w: Vec<&str> = line.split_whitespace().collect();
            match (w.get(3), w.get(5)) {
                (Some(&"ok"), Some(v)) if v.parse::<i64>().ok() == Some(sum) => {}
                (Some(&"err"), Some(&"lost:")) => back.lost += 1,
                _ => back.wrong.push(format!("key {key} (sum {sum}): {line}")),
            }
        }
        Ok(back)
    }

    /// [`Clients::read_back`] that must find every key with its last acknowledged sum.
    pub fn check_sums(&mut self, cluster: &KvCluster, live: &[u32]) -> Result<()> {
        let back = self.read_back(cluster, live)?;
        if back.lost == 0 && back.wrong.is_empty() {
            Ok(())
        } else {
            Err(daemons_error(format!(
                "{} of {} keys lost, wrong: {:?}",
                back.lost, back.keys, back.wrong
            )))
        }
    }

    /// One round: collect answers (each checked against exactly-once execution), retry
    /// through another node when a client's node is gone or silent, issue new adds.
    fn round(&mut self, cluster: &KvCluster, issue: bool) {
        let live = cluster.live();
        if live.is_empty() {
            return;
        }
        let round = self.round;
        for client in 0..4u32 {
            if let Some((seq, key, delta, through, at)) = self.pending.get(&client).cloned() {
                if let Some(line) = cluster.take_answer(client, seq) {
                    let w: Vec<&str> = line.split_whitespace().collect();
                    let want = self.sums.get(&key).copied().unwrap_or(0) + delta;
                    let got = w.get(5).and_then(|v| v.parse::<i64>().ok());
                    if w.get(3) != Some(&"ok") || got != Some(want) {
                        self.violations.push(format!(
                            "client {client} key {key}: {line} (exactly-once gives {want})"
                        ));
                    }
                    self.sums.insert(key, want);
                    self.pending.remove(&client);
                    self.answered += 1;
                } else if !live.contains(&through) || at.elapsed() > Duration::from_secs(20) {
                    let via = live[(round as usize + client as usize) % live.len()];
                    cluster
                        .daemons
                        .get(&via)
                        .map(|d| d.send(&format!("req {client} {seq} {key} add {delta}")));
                    self.pending
                        .insert(client, (seq, key, delta, via, Instant::now()));
                }
                continue;
            }
            if !issue {
                continue;
            }
            let seq = self.seq.entry(client).or_insert(0);
            *seq += 1;
            let key = u64::from(client) * 100 + (round % 8);
            let delta = (round % 7) as i64 + 1;
            let via = live[(round as usize * 3 + client as usize) % live.len()];
            if cluster.daemons[&via].send(&format!("req {client} {} {key} add {delta}", *seq)) {
                self.pending
                    .insert(client, (*seq, key, delta, via, Instant::now()));
            } else {
                *seq -= 1;
            }
        }
    }
}
