//! The node runtime across hosts: 8 ranks on 4 network-namespace hosts (a `krund --listen`
//! daemon each, krun inside host 0); one node's krund is SIGKILLed while the ranks run.
//! The failure is agreed once (one epoch), `krun status --json` answered by a surviving node
//! shows it, and the process table answers for every rank. Needs root and the workspace's
//! binaries (`cargo build --workspace`).
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster_tests::hosts::{HostsSpec, KrundHosts};
use cluster_tests::{kill_process, workspace_bin, NodeProcess};
use serde_json::Value;

/// The namespace hosts with a `krund --listen` each (`cluster_tests::hosts`), and a file
/// whose creation ends the test's ranks.
struct Hosts {
    inner: KrundHosts,
    stop: PathBuf,
}

impl std::ops::Deref for Hosts {
    type Target = KrundHosts;
    fn deref(&self) -> &KrundHosts {
        &self.inner
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.stop);
    }
}

impl Hosts {
    fn start(n: usize) -> Hosts {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let stop = std::env::temp_dir().join(format!("krun-rt-stop-{tag}"));
        let _ = std::fs::remove_file(&stop);
        let spec = HostsSpec {
            secret: "the secret of the runtime multi-host test".into(),
            ..HostsSpec::new(workspace_bin("krund"), n)
        };
        let inner = KrundHosts::start(&spec).unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
        Hosts { inner, stop }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.inner.krun(&workspace_bin("krun"));
        c.args(args);
        c
    }

    /// `krun status --job ID --json` inside host 0, once `ok` holds for it (bounded).
    fn status_when(&self, job: u32, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            let p = self
                .cluster
                .node(0)
                .unwrap()
                .spawn(&mut self.command(&["status", "--job", &job.to_string(), "--json"]))
                .unwrap();
            let (code, out, err) = finish(p, Duration::from_secs(30));
            if code == Some(0) {
                let v: Value = serde_json::from_str(&out).expect("status --json is JSON");
                if ok(&v) {
                    return v;
                }
                last = out;
            } else {
                last = err;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{what}: not reached; last status:\n{last}");
    }
}

/// Waits for a process (at most `limit`) and returns (exit code, stdout, stderr).
fn finish(p: NodeProcess, limit: Duration) -> (Option<i32>, String, String) {
    cluster_tests::hosts::finish(p, limit).expect("waiting for a process")
}

fn members(v: &Value) -> Vec<u64> {
    v["status"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_u64().unwrap())
        .collect()
}

fn rows(v: &Value) -> &Vec<Value> {
    v["status"]["ranks"].as_array().unwrap()
}

#[test]
fn a_killed_krund_is_one_agreed_failure_seen_by_status_on_the_survivors() {
    let hosts = Hosts::start(4);
    let host_list = hosts
        .cluster
        .nodes()
        .map(|n| n.ip().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "n=0; while [ ! -e {} ] && [ $n -lt 1800 ]; do sleep 0.05; n=$((n+1)); done; echo rank $KRUN_RANK done on $KRUN_NODE_ID",
        hosts.stop.display()
    );
    let krun = hosts
        .cluster
        .node(0)
        .unwrap()
        .spawn(&mut hosts.command(&[
            "--hosts",
            &host_list,
            "-n",
            "8",
            "--bind-to",
            "none",
            "sh",
            "-c",
            &script,
        ]))
        .expect("starting krun");
    let job = krun.pid();
    let v = hosts.status_when(job, "8 running ranks", |v| {
        rows(v).len() == 8 && rows(v).iter().all(|r| r["state"] == "running")
    });
    assert_eq!(v["mode"], "hosts");
    assert_eq!(members(&v), [0, 1, 2, 3]);
    assert_eq!(v["status"]["epoch"], 0);
    // Each node registered from its own host.
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    for (i, host) in hosts.cluster.nodes().enumerate() {
        let tcp = nodes[i]["control_tcp"].as_str().unwrap();
        assert!(
            tcp.starts_with(&format!("{}:", host.ip())),
            "node {i}: {tcp}"
        );
    }
    let victim = nodes[3]["pid"].as_u64().unwrap() as u32;
    kill_process(victim, libc::SIGKILL).expect("killing node 3's krund");

    let v = hosts.status_when(job, "node 3 out, its ranks lost", |v| {
        members(v) == [0, 1, 2]
            && rows(v).len() == 8
            && rows(v)[6..].iter().all(|r| r["state"] == "lost")
    });
    let s = &v["status"];
    // One agreed change, to epoch 1: the failure of node 3.
    assert_eq!(s["epoch"], 1, "{v}");
    let changes = s["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{v}");
    assert_eq!(changes[0]["kind"], "fail");
    assert_eq!(changes[0]["node"], 3);
    assert_ne!(s["node"], 3, "a survivor answered");
    // The process table answers for every rank: the survivors' ranks run where they were put.
    for (i, r) in rows(&v).iter().enumerate() {
        assert_eq!(r["rank"], i as u64);
        assert_eq!(r["node"], (i / 2) as u64, "{r}");
        if i < 6 {
            assert_eq!(r["state"], "running", "{r}");
        }
    }
    assert!(s["unanswered"].as_array().unwrap().is_empty(), "{v}");

    std::fs::write(&hosts.stop, b"").unwrap();
    let (_, out, err) = finish(krun, Duration::from_secs(120));
    assert_eq!(
        err.matches("failed at epoch").count(),
        1,
        "the failure is reported once:\n{err}"
    );
    assert!(err.contains("krun: node 3 failed at epoch 1"), "{err}");
    for r in 0..6 {
        assert!(
            out.contains(&format!("rank {r} done on {}", r / 2)),
            "rank {r}:\n{out}\n{err}"
        );
    }
}

#[test]
fn a_node_added_on_another_host_joins_through_its_daemon_and_leaves_again() {
    let hosts = Hosts::start(3);
    let ip = |i: usize| hosts.cluster.node(i).unwrap().ip().to_string();
    let script = format!(
        "n=0; while [ ! -e {} ] && [ $n -lt 1800 ]; do sleep 0.05; n=$((n+1)); done; echo rank $KRUN_RANK done",
        hosts.stop.display()
    );
    let krun = hosts
        .cluster
        .node(0)
        .unwrap()
        .spawn(&mut hosts.command(&[
            "--hosts",
            &format!("{},{}", ip(0), ip(1)),
            "-n",
            "2",
            "--bind-to",
            "none",
            "sh",
            "-c",
            &script,
        ]))
        .expect("starting krun");
    let job = krun.pid().to_string();
    hosts.status_when(krun.pid(), "2 running ranks", |v| {
        rows(v).len() == 2 && rows(v).iter().all(|r| r["state"] == "running")
    });
    let in_host0 = |args: &[&str]| {
        let p = hosts
            .cluster
            .node(0)
            .unwrap()
            .spawn(&mut hosts.command(args))
            .unwrap();
        finish(p, Duration::from_secs(120))
    };
    let (code, out, err) = in_host0(&["node", "add", &ip(2), "--job", &job]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("node 2 joined the job at epoch 1"), "{out}");
    let v = hosts.status_when(krun.pid(), "3 members", |v| members(v) == [0, 1, 2]);
    // The new node runs on host 2 and registered its addresses there.
    let added = &v["nodes"].as_array().unwrap()[2];
    let tcp = added["control_tcp"].as_str().unwrap();
    assert!(tcp.starts_with(&format!("{}:", ip(2))), "{tcp}");
    assert!(added["adaptation"].as_str().unwrap().starts_with(&ip(2)));
    assert_eq!(v["status"]["epoch"], 1);
    let (code, out, err) = in_host0(&["node", "drain", "2", "--job", &job]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v = hosts.status_when(krun.pid(), "2 members", |v| members(v) == [0, 1]);
    assert_eq!(v["status"]["epoch"], 2);
    assert!(rows(&v).iter().all(|r| r["state"] == "running"), "{v}");

    std::fs::write(&hosts.stop, b"").unwrap();
    let (code, out, err) = finish(krun, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("rank 0 done") && out.contains("rank 1 done"),
        "{out}"
    );
    assert!(!err.contains("failed at epoch"), "{err}");
}
