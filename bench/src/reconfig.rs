//! `bench reconfig`: 8 local adaptation daemons (this binary re-executed as
//! `bench adapt-node`) holding 1,000,000 key-value entries. Measures a node addition split
//! into the phases of the Gobelins paper and the repair after a SIGKILL, with the round trip
//! of one request through the cluster as the reference measured in the same run.
//!
//! Phases of an addition, from the processes' own timestamps:
//! - start: the new process is spawned until it is ready (listening);
//! - physical: ready until the change is agreed and known to every node (Raft commit,
//!   dissemination, the new node reached by all);
//! - setting: agreed until every participant finished step 1 (before migration, acks);
//! - logical: step 1 until every node has received all the entries sent to it;
//! - end: until every node is stable again.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{json_num, results_path, write_results, Table};

const NODES: u32 = 8;
const SECRET: &str = "62656e63682d7265636f6e6669672d736563726574";

struct Proc {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn say(&mut self, line: &str) -> Result<(), String> {
        writeln!(self.stdin, "{line}")
            .and_then(|_| self.stdin.flush())
            .map_err(|e| format!("writing to a daemon: {e}"))
    }

    /// The next line starting with `prefix`, within `limit`.
    fn expect(&self, prefix: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return Ok(l),
                Ok(_) => {}
                Err(_) => return Err(format!("no '{prefix}' line within {limit:?}")),
            }
        }
    }
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

fn free_addr() -> Result<String, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a port: {e}"))?;
    l.local_addr()
        .map(|a| a.to_string())
        .map_err(|e| e.to_string())
}

fn spawn(id: u32, addr: &str, peers: &[(u32, String)], join: bool) -> Result<Proc, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating bench: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["adapt-node", "--id", &id.to_string(), "--listen", addr]);
    cmd.args(["--supervisors", "0,1,2"]);
    for (p, a) in peers {
        cmd.args(["--peer", &format!("{p}={a}")]);
    }
    if join {
        cmd.arg("--join");
    }
    let mut child = cmd
        .env("KRUN_SECRET", SECRET)
        .env_remove("KRUN_SECRET_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting a daemon: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    Ok(Proc {
        child,
        stdin,
        lines: rx,
    })
}

/// The `t=` timestamp of a `phase`/`stable` line.
fn stamp(line: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("t="))
        .and_then(|t| t.parse().ok())
}

/// The latest time each phase of `epoch` was reached over all processes (the lines arrive
/// in order per process), and the first "agreed".
fn phases(
    procs: &BTreeMap<u32, Proc>,
    epoch: u64,
    limit: Duration,
) -> Result<BTreeMap<&'static str, f64>, String> {
    let mut latest: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut first_agreed = f64::MAX;
    for (id, p) in procs {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = p
                .lines
                .recv_timeout(left)
                .map_err(|_| format!("node {id}: epoch {epoch} did not finish within {limit:?}"))?;
            let w: Vec<&str> = l.split_whitespace().collect();
            let t = stamp(&l).unwrap_or(0.0);
            match w.as_slice() {
                ["phase", e, name, _] if e.parse::<u64>().ok() == Some(epoch) => {
                    for known in ["agreed", "prepared", "sent", "received"] {
                        if *name == known {
                            let v = latest.entry(known).or_insert(0.0);
                            *v = v.max(t);
                            if known == "agreed" {
                                first_agreed = first_agreed.min(t);
                            }
                        }
                    }
                }
                ["stable", e, ..] if e.parse::<u64>().ok() == Some(epoch) => {
                    let v = latest.entry("stable").or_insert(0.0);
                    *v = v.max(t);
                    break;
                }
                _ => {}
            }
        }
    }
    latest.insert("first-agreed", first_agreed);
    Ok(latest)
}

/// Median round trip of `count` requests through node 0 (the reference).
fn round_trip(p: &mut Proc, count: u64) -> Result<f64, String> {
    let mut samples = Vec::new();
    for seq in 1..=count {
        let start = Instant::now();
        p.say(&format!("req 77 {seq} {} add 1", 5_000_000 + seq))?;
        p.expect(&format!("ans 77 {seq} "), Duration::from_secs(10))?;
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[samples.len() / 2])
}

/// 8 local adaptation daemons holding 1,000,000 entries: a node addition
/// split into the paper's phases and the repair after a SIGKILL, against one request's
/// round trip; writes bench/results/reconfig.json.
#[derive(Debug, clap::Args)]
pub struct ReconfigArgs {
    /// Directory entries held.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
    /// Where to write the JSON (default bench/results/reconfig.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<std::path::PathBuf>,
}

/// The hidden `adapt-node`: one adaptation daemon; its arguments go to the daemon's own
/// parser unchanged.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<String>,
}

pub fn run(args: ReconfigArgs) -> Result<(), String> {
    let entries: u64 = args.entries;
    let out = args.out.clone().unwrap_or_else(|| results_path("reconfig"));
    let limit = Duration::from_secs(120);

    let addrs: Vec<(u32, String)> = (0..NODES)
        .map(|i| free_addr().map(|a| (i, a)))
        .collect::<Result<_, _>>()?;
    let mut procs: BTreeMap<u32, Proc> = BTreeMap::new();
    for (id, addr) in &addrs {
        let peers: Vec<(u32, String)> = addrs.iter().filter(|(p, _)| p != id).cloned().collect();
        procs.insert(*id, spawn(*id, addr, &peers, false)?);
    }
    for (id, p) in &procs {
        p.expect("ready", limit)
            .map_err(|e| format!("node {id}: {e}"))?;
    }
    let mut loaded = 0u64;
    for p in procs.values_mut() {
        p.say(&format!("fill {entries} 16"))?;
    }
    for (id, p) in &procs {
        let l = p
            .expect("ok fill", limit)
            .map_err(|e| format!("node {id}: {e}"))?;
        loaded += l
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    if loaded != entries {
        return Err(format!("{loaded} entries loaded, expected {entries}"));
    }
    let reference_ms = round_trip(procs.get_mut(&0).ok_or("no node 0")?, 50)?;

    // A node addition.
    let spawned = now_ms();
    let joiner_addr = free_addr()?;
    let joiner = spawn(NODES, &joiner_addr, &addrs, true)?;
    let ready = stamp_of_ready(&joiner, limit)?;
    procs.insert(NODES, joiner);
    let add = phases(&procs, 1, limit)?;
    let add_rows = [
        ("start", spawned, ready),
        ("physical", ready, add["agreed"]),
        ("setting", add["agreed"], add["prepared"]),
        ("logical", add["prepared"], add["received"]),
        ("end", add["received"], add["stable"]),
    ];
    let moved_to_new = {
        let p = procs.get_mut(&NODES).ok_or("no joiner")?;
        p.say("status")?;
        let l = p.expect("status", limit)?;
        l.rsplit("keys=")
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };

    // A SIGKILL: from the kill to every survivor stable.
    let victim = 4u32;
    let killed_at = {
        let mut p = procs.remove(&victim).ok_or("no victim")?;
        let t = now_ms();
        p.child.kill().map_err(|e| format!("kill: {e}"))?;
        let _ = p.child.wait();
        t
    };
    let fail = phases(&procs, 2, limit)?;
    let fail_rows = [
        ("detection + agreement", killed_at, fail["first-agreed"]),
        ("view known to all", fail["first-agreed"], fail["agreed"]),
        ("before migration", fail["agreed"], fail["prepared"]),
        ("scan + transfer", fail["prepared"], fail["received"]),
        ("after migration", fail["received"], fail["stable"]),
    ];

    let mut table = Table::new(&["event", "phase", "ms", "x request round trip"]);
    let mut rows = Vec::new();
    let mut panels = Vec::new();
    for (event, list, total_from) in [
        ("add", &add_rows[..], spawned),
        ("sigkill", &fail_rows[..], killed_at),
    ] {
        let mut groups = vec![Group::new(
            "request\nround trip",
            [Bar::single(
                "request round trip (same run)",
                Some(reference_ms),
            )],
        )];
        for (phase, a, b) in list {
            let ms = (b - a).max(0.0);
            groups.push(Group::new(
                phase.replace(" + ", " +\n").replace(" known", "\nknown"),
                [Bar::single("phase", Some(ms))],
            ));
            table.row(vec![
                event.into(),
                phase.to_string(),
                format!("{ms:.1}"),
                format!("{:.1}", ms / reference_ms),
            ]);
            rows.push(
                serde_json::json!({"event": event, "phase": phase, "ms": json_num(Some(ms))}),
            );
        }
        let end = list.last().map(|r| r.2).unwrap_or(total_from);
        let total = end - total_from;
        table.row(vec![
            event.into(),
            "total".into(),
            format!("{total:.1}"),
            format!("{:.1}", total / reference_ms),
        ]);
        rows.push(
            serde_json::json!({"event": event, "phase": "total", "ms": json_num(Some(total))}),
        );
        groups.push(Group::new("total", [Bar::single("total", Some(total))]));
        panels.push(Panel::new(
            match event {
                "add" => "a node addition, by phase",
                _ => "the repair after a SIGKILL, by phase",
            },
            "ms",
            groups,
        ));
    }
    println!(
        "{NODES} daemons, {entries} entries; reference: request round trip {reference_ms:.3} ms (median of 50)"
    );
    println!("the new node received {moved_to_new} entries");
    print!("{}", table.render());
    let m = adaptation::membership::MembershipConfig::default();
    println!(
        "failure detection: SWIM probe every {} ms, a suspect is declared down after {} ms",
        m.probe_period * 10,
        m.suspect_to_down * 10
    );
    let figure = Figure {
        title: format!("bench reconfig: {NODES} adaptation daemons holding {entries} entries"),
        note: "one run of each event".into(),
        panels,
    };
    write_results(
        &out,
        serde_json::json!({
            "nodes": NODES,
            "entries": entries,
            "reference_round_trip_ms": json_num(Some(reference_ms)),
            "entries_received_by_new_node": moved_to_new,
            "rows": rows,
        }),
        &figure,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}

fn stamp_of_ready(p: &Proc, limit: Duration) -> Result<f64, String> {
    p.expect("ready", limit)?;
    Ok(now_ms())
}

/// `bench adapt-node ARGS`: one adaptation daemon (the processes `bench reconfig` starts).
pub fn node(args: NodeArgs) -> Result<(), String> {
    let cfg = adaptation::daemon::DaemonConfig::from_args(&args.args).map_err(|e| e.to_string())?;
    let secret = fabric::secret::ClusterSecret::from_env()
        .map_err(|e| e.to_string())?
        .ok_or("no cluster secret in KRUN_SECRET")?;
    adaptation::daemon::run(cfg, secret)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
