//! Real `krun-adapt` daemons in network namespaces: a node whose link is cut is evicted
//! within the detection bound, no acknowledged write is lost, and once the link is back
//! the node learns its eviction at its first exchange with a member and rejoins as a new
//! member. Needs root (CI runs as root). Every wait is bounded.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_tests::{workspace_bin, NetnsCluster, NodeProcess};

const SECRET: &str = "6b72756e2d616461707461746f6e2d746573742d736563726574";
const NODES: usize = 5;
/// The detector's failure timeout given to every daemon.
const FAILURE_TIMEOUT_MS: u64 = 1000;
/// A node evicted while alive comes back as its id plus this (adaptation's REJOIN_STRIDE).
const REJOIN_STRIDE: u32 = 1 << 20;

struct Daemon {
    _process: NodeProcess,
    stdin: ChildStdin,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Daemon {
    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("writing to a daemon");
        self.stdin.flush().expect("flushing a daemon's stdin");
    }

    /// The first line after `from` (an index into the lines) that `ok` accepts.
    fn find(&self, ok: &dyn Fn(&str) -> bool) -> Option<(Instant, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| ok(l))
            .cloned()
    }
}

fn wait_for(
    daemons: &BTreeMap<usize, Daemon>,
    node: usize,
    what: &str,
    bound: Duration,
    ok: &dyn Fn(&str) -> bool,
) -> (Instant, String) {
    let start = Instant::now();
    loop {
        if let Some(found) = daemons[&node].find(ok) {
            return found;
        }
        if start.elapsed() > bound {
            let tail: Vec<String> = daemons
                .iter()
                .map(|(n, d)| {
                    let l = d.lines.lock().unwrap();
                    let last: Vec<&str> = l.iter().rev().take(4).map(|(_, s)| s.as_str()).collect();
                    format!("node {n}: {last:?}")
                })
                .collect();
            panic!(
                "node {node}: no {what} within {bound:?}\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_cut_off_daemon_is_evicted_loses_nothing_and_rejoins_as_a_new_member_once_healed() {
    if let Err(e) = cluster_tests::require_root() {
        panic!("\n\n*** {e} ***\n\n");
    }
    let c = NetnsCluster::create(NODES, None).expect("creating the namespace cluster");
    let addrs: Vec<String> = (0..NODES)
        .map(|i| format!("{}:{}", c.node(i).unwrap().ip(), 47300 + i))
        .collect();
    let mut daemons = BTreeMap::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut cmd = Command::new(workspace_bin("krun-adapt"));
        cmd.args(["--id", &i.to_string(), "--listen", addr])
            .args(["--supervisors", "0,1,2"])
            .args(["--failure-timeout-ms", &FAILURE_TIMEOUT_MS.to_string()]);
        for (j, a) in addrs.iter().enumerate().filter(|(j, _)| *j != i) {
            cmd.args(["--peer", &format!("{j}={a}")]);
        }
        cmd.env("KRUN_SECRET", SECRET)
            .env_remove("KRUN_SECRET_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut p = c
            .node(i)
            .unwrap()
            .spawn(&mut cmd)
            .expect("spawning krun-adapt");
        let stdout = p.stdout().unwrap();
        let stdin = p.stdin().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    lines.lock().unwrap().push((Instant::now(), l));
                }
            });
        }
        daemons.insert(
            i,
            Daemon {
                _process: p,
                stdin,
                lines,
            },
        );
    }
    for i in 0..NODES {
        wait_for(&daemons, i, "ready line", Duration::from_secs(30), &|l| {
            l.starts_with("ready ")
        });
    }
    // Acknowledged writes, each through the node after the key's number.
    let keys = 60u64;
    for key in 0..keys {
        let via = (key as usize) % NODES;
        daemons
            .get_mut(&via)
            .unwrap()
            .send(&format!("req {key} 1 {key} put v{key}"));
        let want = format!("ans {key} 1 ok ");
        wait_for(&daemons, via, "put answer", Duration::from_secs(30), &|l| {
            l.starts_with(&want)
        });
    }

    // Node 4's link is cut: the others evict it within the detection bound.
    let cut_at = Instant::now();
    c.cut_link(4).unwrap();
    let without4 = "members=0,1,2,3";
    let (evicted_at, _) = wait_for(
        &daemons,
        0,
        "eviction of node 4",
        Duration::from_secs(30),
        &|l| l.starts_with("stable ") && l.ends_with(without4),
    );
    let detection = evicted_at.duration_since(cut_at);
    println!(
        "node 4 cut off: evicted after {:.2} s",
        detection.as_secs_f64()
    );
    assert!(
        daemons[&4].find(&|l| l.starts_with("rejoined ")).is_none(),
        "node 4 learned its eviction while cut off"
    );

    // Healed: node 4 learns it at its first exchange with a member and rejoins.
    std::thread::sleep(Duration::from_millis(500));
    let healed_at = Instant::now();
    c.restore_link(4).unwrap();
    let (rejoined_at, line) = wait_for(
        &daemons,
        4,
        "rejoined line",
        Duration::from_secs(30),
        &|l| l.starts_with("rejoined "),
    );
    let noticed = rejoined_at.duration_since(healed_at);
    println!(
        "link restored: node 4 noticed its eviction after {:.2} s ({line})",
        noticed.as_secs_f64()
    );
    let new = 4 + REJOIN_STRIDE;
    let with_new = format!("members=0,1,2,3,{new}");
    let (member_at, _) = wait_for(
        &daemons,
        0,
        "the rejoined node in the view",
        Duration::from_secs(60),
        &|l| l.starts_with("stable ") && l.ends_with(&with_new),
    );
    println!(
        "node {new} a member {:.2} s after the link came back",
        member_at.duration_since(healed_at).as_secs_f64()
    );
    // Its first exchange: within a few probe periods of the detector (timeout / 6), not
    // the 18 s measured before.
    assert!(
        noticed < Duration::from_secs(3),
        "node 4 noticed its eviction {noticed:?} after the link came back"
    );

    // Every acknowledged write reads back, through every live node, the rejoined one too.
    for key in 0..keys {
        let via = [0usize, 1, 2, 3, 4][(key as usize) % NODES];
        let client = 1000 + key;
        daemons
            .get_mut(&via)
            .unwrap()
            .send(&format!("req {client} 1 {key} get"));
        let prefix = format!("ans {client} 1 ");
        let (_, answer) = wait_for(
            &daemons,
            via,
            "read answer",
            Duration::from_secs(30),
            &|l| l.starts_with(&prefix),
        );
        assert!(
            answer.starts_with(&format!("ans {client} 1 ok "))
                && answer.ends_with(&format!(" v{key}")),
            "key {key}: {answer}"
        );
    }
}
