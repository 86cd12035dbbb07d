//! `krun node drain` while a job runs.
//! - 8 ranks of a program linked with ghost's native checkpointer (no fabric) on 4 local
//!   krund nodes; node 3 (not a supervisor) is drained, then node 2 (a supervisor: its Raft
//!   vote goes before it leaves). Their ranks are captured and ended there and continue on
//!   the other nodes from their images, each node leaves the membership cleanly, and the job
//!   completes with every rank's output equal to an uninterrupted run.
//! - The C heat stencil (rank-library ranks on the fabric) on 4 namespace hosts: a 5th host
//!   is added with `krun node add HOST` and node 3 is drained onto it through the checkpoint
//!   policy (runtime/drain.rs); the result equals the serial reference. Needs root.
//!
//! Needs `cc`, make and the workspace's libghost.so and libkrun.so (`cargo build --workspace`).
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_tests::workspace_bin;
use serde_json::Value;

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build_workload(dir: &Path) -> PathBuf {
    let ghost = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ghost");
    let lib = workspace_bin("libghost.so");
    let libdir = lib.parent().unwrap();
    let bin = dir.join("workload");
    let ok = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(ghost.join("tests/native/workload.c"))
        .arg(format!("-I{}", ghost.join("include").display()))
        .arg(format!("-L{}", libdir.display()))
        .arg("-lghost")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .status()
        .unwrap()
        .success();
    assert!(ok, "compiling workload.c");
    bin
}

/// `step N checksum X` lines: the last checksum written for each step.
fn steps(text: &str) -> BTreeMap<u64, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .map(|r| {
            let (s, c) = r.split_once(" checksum ").unwrap();
            (s.parse().unwrap(), c.to_string())
        })
        .collect()
}

fn krun(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(workspace_bin("krun"))
        .args(args)
        .output()
        .expect("krun runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(job: &str) -> Option<Value> {
    let (code, out, _) = krun(&["status", "--job", job, "--json"]);
    (code == 0).then(|| serde_json::from_str(&out).expect("status --json is JSON"))
}

fn rows(v: &Value) -> &Vec<Value> {
    v["status"]["ranks"].as_array().unwrap()
}

fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not reached in 60 s");
}

#[test]
fn draining_a_node_moves_its_native_ranks_and_the_job_completes() {
    let dir = Dir(PathBuf::from(format!(
        "/var/tmp/krun-drain-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let workload = build_workload(&dir.0);
    let (mib, total, every, sleep_ms) = ("1", 600u64, "10", "20");

    let reference_out = dir.0.join("reference.out");
    let ok = Command::new(&workload)
        .arg(&reference_out)
        .args([mib, &total.to_string(), "0", "0"])
        .env("KRUN_GHOST_DIR", dir.0.join("ref-images"))
        .env("KRUN_GHOST_OWNER", "reference")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let reference = steps(&std::fs::read_to_string(&reference_out).unwrap());
    assert_eq!(reference.len() as u64, total);

    let out = |rank: usize| dir.0.join(format!("out.{rank}"));
    let script = format!(
        "exec {} {}/out.$KRUN_RANK {mib} {total} {every} {sleep_ms}",
        workload.display(),
        dir.0.display()
    );
    let mut job = Command::new(workspace_bin("krun"))
        .args([
            "--local",
            "4",
            "-n",
            "8",
            "--bind-to",
            "none",
            "sh",
            "-c",
            &script,
        ])
        .env("KRUN_GHOST_DIR", dir.0.join("images"))
        .env_remove("KRUN_GHOST_OWNER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("krun runs");
    let id = job.id().to_string();
    // Every rank runs and has checkpointed at least once.
    wait_for("8 running ranks past their first checkpoint", || {
        status(&id).is_some_and(|v| {
            rows(&v).len() == 8 && rows(&v).iter().all(|r| r["state"] == "running")
        }) && (0..8).all(|r| std::fs::read_to_string(out(r)).is_ok_and(|t| steps(&t).len() >= 15))
    });

    let (code, said, err) = krun(&["node", "drain", "3", "--job", &id]);
    assert_eq!(code, 0, "{said}\n{err}");
    assert!(
        said.contains("node 3 left the job (2 rank(s) moved)"),
        "{said}"
    );
    let v = status(&id).expect("status after the drain");
    let s = &v["status"];
    assert_eq!(s["members"], serde_json::json!([0, 1, 2]), "{v}");
    assert_eq!(s["epoch"], 1, "{v}");
    assert_eq!(s["changes"][0]["kind"], "leave", "{v}");
    for r in &rows(&v)[6..] {
        // A new incarnation on a node that stays.
        assert_eq!(r["incarnation"], 1, "{r}");
        assert_ne!(r["node"], 3, "{r}");
        assert_eq!(r["state"], "running", "{r}");
    }
    // A supervisor leaves too: its vote goes (here the group shrinks to nodes 0 and 1, no
    // other member being left to take it), then the leave is committed.
    assert_eq!(s["supervisors"], serde_json::json!([0, 1, 2]), "{v}");
    let (code, said, err) = krun(&["node", "drain", "2", "--job", &id]);
    assert_eq!(code, 0, "{said}\n{err}");
    assert!(
        said.contains("node 2 left the job (2 rank(s) moved)"),
        "{said}"
    );
    let v = status(&id).expect("status after the second drain");
    let s = &v["status"];
    assert_eq!(s["members"], serde_json::json!([0, 1]), "{v}");
    assert_eq!(s["supervisors"], serde_json::json!([0, 1]), "{v}");
    // Two agreed changes: its vote goes (demote), then it leaves.
    assert_eq!(s["epoch"], 3, "{v}");
    assert_eq!(
        (&s["changes"][1]["kind"], &s["changes"][1]["node"]),
        (&serde_json::json!("demote"), &serde_json::json!(2)),
        "{v}"
    );
    assert_eq!(
        (&s["changes"][2]["kind"], &s["changes"][2]["node"]),
        (&serde_json::json!("leave"), &serde_json::json!(2)),
        "{v}"
    );
    for r in &rows(&v)[4..6] {
        assert_eq!(r["incarnation"], 1, "{r}");
        assert_ne!(r["node"], 2, "{r}");
        assert_eq!(r["state"], "running", "{r}");
    }

    let mut stdout = String::new();
    let mut stderr = String::new();
    job.stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    job.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let code = job.wait().unwrap().code();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        !stderr.contains("failed at epoch"),
        "a drain is no failure: {stderr}"
    );
    for r in 0..8 {
        let text = std::fs::read_to_string(out(r)).unwrap();
        assert!(text.ends_with("done\n"), "rank {r}:\n{text}");
        assert_eq!(
            steps(&text),
            reference,
            "rank {r} differs from the reference"
        );
        assert_eq!(
            text.contains("resumed version"),
            r >= 4,
            "only the moved ranks resume:\n{text}"
        );
    }
}

/// Builds the rank library's C examples (heat and its serial reference) into `out`.
fn build_heat(out: &Path) -> PathBuf {
    let lib = workspace_bin("libkrun.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/c");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", lib.parent().unwrap().display()))
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

fn checksum_in(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .map(|s| s.trim().to_string())
}

/// The C heat stencil (rank-library ranks exchanging halos over the fabric) on 4 namespace
/// hosts, one rank each; `krun node add` joins a 5th host while it runs and `krun node drain
/// 3` moves rank 3 there: a checkpoint through the policy, rank 3 restarts on the added node
/// from it (its images read from the members' stores), ranks 0-2 continue from it, node 3
/// leaves, and the result equals the serial reference.
#[test]
fn heat_ranks_move_to_a_host_added_while_the_job_runs_and_the_result_equals_the_serial_reference() {
    use std::io::BufRead;
    cluster_tests::require_root().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
    let dir = Dir(PathBuf::from(format!(
        "/var/tmp/krun-drain-heat-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let heat = build_heat(&dir.0);
    let grid = ["48", "40", "400"];
    let o = Command::new(dir.0.join("heat_serial"))
        .args(grid)
        .output()
        .unwrap();
    let want = checksum_in(&String::from_utf8_lossy(&o.stdout)).expect("serial checksum");
    let secret = dir.0.join("secret");
    std::fs::write(&secret, "the secret of the drain test").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let xdg = dir.0.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let cluster = cluster_tests::NetnsCluster::create(5, None).expect("namespace cluster");
    let mut daemons = Vec::new();
    for i in 0..5 {
        let node = cluster.node(i).unwrap();
        // Ranks inherit the daemon's environment: their checkpoints go to the test's dir.
        let mut d = node
            .spawn(
                Command::new(workspace_bin("krund"))
                    .args(["--listen", &format!("{}:7171", node.ip())])
                    .env("KRUN_SECRET_FILE", &secret)
                    .env("KRUN_GHOST_DIR", dir.0.join("ghost"))
                    .env_remove("KRUN_GHOST_OWNER")
                    .env("KRUN_RECV_TIMEOUT_MS", "60000")
                    .env("HEAT_STEP_DELAY_US", "20000")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            )
            .expect("starting krund");
        let mut line = String::new();
        std::io::BufReader::new(d.stderr().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "daemon on host {i}: {line}");
        daemons.push(d);
    }
    let ip = |i: usize| cluster.node(i).unwrap().ip().to_string();
    let hosts = (0..4).map(ip).collect::<Vec<_>>().join(",");
    let krun_in_node0 = |args: &[&str]| {
        let mut c = Command::new(workspace_bin("krun"));
        c.args(args)
            .env("KRUN_SECRET_FILE", &secret)
            .env("KRUN_FABRIC_PROVIDER", "tcp")
            .env("XDG_RUNTIME_DIR", &xdg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut job = cluster
        .node(0)
        .unwrap()
        .spawn(
            krun_in_node0(&["--hosts", &hosts, "-n", "4"])
                .arg(&heat)
                .args(grid)
                .arg("0"),
        )
        .expect("starting krun");
    let mut out = job.stdout().unwrap();
    let mut err = job.stderr().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let node_cmd = |args: &[&str]| -> (Option<i32>, String) {
        let mut p = cluster
            .node(0)
            .unwrap()
            .spawn(krun_in_node0(&["node"]).args(args))
            .expect("krun node");
        let mut o = String::new();
        let mut e = String::new();
        let _ = p.stdout().unwrap().read_to_string(&mut o);
        let _ = p.stderr().unwrap().read_to_string(&mut e);
        let code = p.wait_timeout(Duration::from_secs(150)).unwrap();
        (code.and_then(|c| c.code()), format!("{o}{e}"))
    };
    let running = || {
        let mut p = cluster
            .node(0)
            .unwrap()
            .spawn(&mut krun_in_node0(&["status", "--json"]))
            .ok()?;
        let mut o = String::new();
        let _ = p.stdout().unwrap().read_to_string(&mut o);
        p.wait_timeout(Duration::from_secs(30)).ok()??;
        serde_json::from_str::<Value>(&o).ok()
    };
    wait_for("4 running heat ranks", || {
        running().is_some_and(|v| {
            rows(&v).len() == 4 && rows(&v).iter().all(|r| r["state"] == "running")
        })
    });
    let (code, said) = node_cmd(&["add", &ip(4)]);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("node 4 joined the job at epoch"), "{said}");
    let (code, said) = node_cmd(&["drain", "3"]);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("node 3 left the job (1 rank(s) moved)"),
        "{said}"
    );
    let v = running().expect("status after the drain");
    let nodes: Vec<u64> = rows(&v).iter().filter_map(|r| r["node"].as_u64()).collect();
    assert_eq!(nodes, vec![0, 1, 2, 4], "{v}");
    let status = job.wait_timeout(Duration::from_secs(240)).unwrap();
    if status.is_none() {
        let _ = job.kill();
    }
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{out}\n{err}");
    assert_eq!(checksum_in(&out), Some(want), "{out}\n{err}");
    assert!(
        err.contains("node 3 drained: rank 3 moved to spare node 4 from checkpoint "),
        "{err}"
    );
    assert!(
        err.contains("krun: rank 3 runs on node 4 (pid ")
            && err.contains("came from the checkpoint store"),
        "{err}"
    );
    assert!(
        !err.contains("failed at epoch"),
        "a drain is no failure: {err}"
    );
    for d in &mut daemons {
        let _ = d.kill();
    }
}

/// A plain program that counts to its second argument, one line per count appended to the
/// file named first, 20 ms apart.
const COUNTER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *f = fopen(argv[1], "a");
    if (!f) return 1;
    long n = atol(argv[2]);
    for (long i = 1; i <= n; i++) {
        fprintf(f, "%ld\n", i);
        fflush(f);
        usleep(20000);
    }
    const char *rank = getenv("KRUN_RANK");
    printf("rank %s counted to %ld\n", rank ? rank : "-", n);
    return fclose(f) == 0 ? 0 : 1;
}
"#;

/// `krun ghost migrate PID --to HOST` between two namespace hosts: a counter started with
/// `krun ghost run` on host 0 is captured (CRIU) and ended there, travels to host 1's
/// `krund --listen` daemon over the authenticated link, runs on there in host 1's network
/// namespace under a krund that reaps it, and counts on to its end without a gap.
#[test]
fn krun_ghost_migrate_moves_a_counter_to_another_host_through_its_krund() {
    use std::io::BufRead;
    cluster_tests::require_root().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
    let dir = Dir(PathBuf::from(format!(
        "/var/tmp/krun-ghost-migrate-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let src = dir.0.join("counter.c");
    std::fs::write(&src, COUNTER_C).unwrap();
    let counter = dir.0.join("counter");
    assert!(Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&counter)
        .arg(&src)
        .status()
        .unwrap()
        .success());
    let secret = dir.0.join("secret");
    std::fs::write(&secret, "the secret of the migrate test").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let cluster = cluster_tests::NetnsCluster::create(2, None).expect("namespace cluster");
    let mut daemons = Vec::new();
    for i in 0..2 {
        let node = cluster.node(i).unwrap();
        let mut d = node
            .spawn(
                Command::new(workspace_bin("krund"))
                    .args(["--listen", &format!("{}:7171", node.ip())])
                    .env("KRUN_SECRET_FILE", &secret)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            )
            .expect("starting krund");
        let mut line = String::new();
        std::io::BufReader::new(d.stderr().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "daemon on host {i}: {line}");
        daemons.push(d);
    }
    let total = 250;
    let count = dir.0.join("count");
    let krun = |args: &[&str]| {
        let mut c = Command::new(workspace_bin("krun"));
        c.args(args)
            .env("KRUN_SECRET_FILE", &secret)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut run = cluster
        .node(0)
        .unwrap()
        .spawn(
            krun(&["ghost", "run", "--output"])
                .arg(dir.0.join("out"))
                .arg(&counter)
                .arg(&count)
                .arg(total.to_string()),
        )
        .unwrap();
    let mut said = String::new();
    let _ = run.stdout().unwrap().read_to_string(&mut said);
    assert_eq!(run.wait().unwrap().code(), Some(0), "{said}");
    let pid: u32 = said
        .rsplit("as pid ")
        .next()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in {said:?}"));
    let lines = || {
        std::fs::read_to_string(&count)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_for("the counter at 20", || lines() >= 20);
    let host1 = cluster.node(1).unwrap().ip().to_string();
    let mut mig = cluster
        .node(0)
        .unwrap()
        .spawn(
            krun(&["ghost", "migrate", &pid.to_string(), "-o"])
                .arg(dir.0.join("image.kgi"))
                .args(["--to", &host1]),
        )
        .unwrap();
    let err = mig.stderr().unwrap();
    let netns1 = std::fs::metadata(cluster.node(1).unwrap().netns_path())
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    // While it runs there: the new process lives in host 1's network namespace.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(p) = l
                .split("now pid ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse::<u32>().ok())
            {
                let _ = tx.send(p);
            }
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let moved_at = lines();
    let new_pid = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the migrate line");
    let ns = std::fs::metadata(format!("/proc/{new_pid}/ns/net"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("the moved process runs");
    assert_eq!(ns, netns1, "pid {new_pid} is not in host 1's namespace");
    assert!(moved_at < total, "the counter was done before it moved");
    let status = mig.wait_timeout(Duration::from_secs(60)).unwrap();
    let err = reader.join().unwrap();
    let mut out = String::new();
    let _ = mig.stdout().unwrap().read_to_string(&mut out);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{out}{err}");
    assert!(out.contains("ended with code 0"), "{out}{err}");
    if let Some(l) = err.lines().find(|l| l.contains("migrated pid")) {
        eprintln!("{l}");
    }
    let want: String = (1..=total).map(|i| format!("{i}\n")).collect();
    assert_eq!(std::fs::read_to_string(&count).unwrap(), want, "{err}");
    for d in &mut daemons {
        let _ = d.kill();
    }
}

/// A plain program (no rank library, no libghost) on 4 namespace hosts whose daemons keep
/// their images apart (no shared `KRUN_GHOST_DIR`): `krun node drain 3` dumps rank 3 with
/// CRIU on host 3, host 0 reads the image from host 3's krund and restores it as its own
/// rank; it counts on to the end and what it prints still reaches krun.
#[test]
fn a_plain_program_moves_with_criu_between_hosts_without_a_shared_image_directory() {
    use std::io::BufRead;
    cluster_tests::require_root().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
    let dir = Dir(PathBuf::from(format!(
        "/var/tmp/krun-drain-criu-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let src = dir.0.join("counter.c");
    std::fs::write(&src, COUNTER_C).unwrap();
    let counter = dir.0.join("counter");
    assert!(Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&counter)
        .arg(&src)
        .status()
        .unwrap()
        .success());
    let secret = dir.0.join("secret");
    std::fs::write(&secret, "the secret of the CRIU drain test").unwrap();
    let xdg = dir.0.join("xdg");
    std::fs::create_dir_all(&xdg).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let cluster = cluster_tests::NetnsCluster::create(4, None).expect("namespace cluster");
    let mut daemons = Vec::new();
    for i in 0..4 {
        let node = cluster.node(i).unwrap();
        let mut d = node
            .spawn(
                Command::new(workspace_bin("krund"))
                    .args(["--listen", &format!("{}:7171", node.ip())])
                    .env("KRUN_SECRET_FILE", &secret)
                    .env("KRUN_GHOST_DIR", dir.0.join(format!("ghost{i}")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            )
            .expect("starting krund");
        let mut line = String::new();
        std::io::BufReader::new(d.stderr().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "daemon on host {i}: {line}");
        daemons.push(d);
    }
    let hosts = cluster
        .nodes()
        .map(|n| n.ip().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let total = 300;
    let script = format!(
        "exec {} {}/count.$KRUN_RANK {total}",
        counter.display(),
        dir.0.display()
    );
    let krun = |args: &[&str]| {
        let mut c = Command::new(workspace_bin("krun"));
        c.args(args)
            .env("KRUN_SECRET_FILE", &secret)
            .env("XDG_RUNTIME_DIR", &xdg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let mut job = cluster
        .node(0)
        .unwrap()
        .spawn(&mut krun(&[
            "--hosts",
            &hosts,
            "-n",
            "4",
            // No PMI socket: CRIU cannot move a rank holding one (external unix socket).
            "--mpi",
            "none",
            "--bind-to",
            "none",
            "sh",
            "-c",
            &script,
        ]))
        .expect("starting krun");
    let mut out = job.stdout().unwrap();
    let mut err = job.stderr().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let lines = |rank: usize| {
        std::fs::read_to_string(dir.0.join(format!("count.{rank}")))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_for("rank 3 at 20", || lines(3) >= 20);
    let mut p = cluster
        .node(0)
        .unwrap()
        .spawn(&mut krun(&["node", "drain", "3"]))
        .unwrap();
    let mut said = String::new();
    let _ = p.stdout().unwrap().read_to_string(&mut said);
    let _ = p.stderr().unwrap().read_to_string(&mut said);
    let code = p.wait_timeout(Duration::from_secs(150)).unwrap();
    assert_eq!(code.and_then(|c| c.code()), Some(0), "{said}");
    assert!(
        said.contains("node 3 left the job (1 rank(s) moved)"),
        "{said}"
    );
    assert!(lines(3) < total, "rank 3 was done before it moved");
    let status = job.wait_timeout(Duration::from_secs(120)).unwrap();
    if status.is_none() {
        let _ = job.kill();
    }
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{out}\n{err}");
    let want: String = (1..=total).map(|i| format!("{i}\n")).collect();
    for r in 0..4 {
        assert_eq!(
            std::fs::read_to_string(dir.0.join(format!("count.{r}"))).unwrap(),
            want,
            "rank {r}\n{err}"
        );
        assert!(
            out.contains(&format!("rank {r} counted to {total}")),
            "{out}\n{err}"
        );
    }
    // The image went from host 3's directory to host 0's; neither keeps it.
    fn images(d: &Path, found: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                images(&p, found);
            } else if p.file_name().is_some_and(|n| n == "criu-move.kgi") {
                found.push(p);
            }
        }
    }
    let mut left = Vec::new();
    images(&dir.0, &mut left);
    assert!(left.is_empty(), "move images left: {left:?}");
    for d in &mut daemons {
        let _ = d.kill();
    }
}
