//! The node runtime in local mode: `krun status` of a running job, `krun node add|drain`,
//! an agreed failure, and the errors bad requests get.
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A job running in the background; its ranks wait for a stop file.
struct Job {
    child: Option<Child>,
    stop: PathBuf,
}

impl Job {
    fn start(nodes: usize, ranks: usize) -> Job {
        let stop = std::env::temp_dir().join(format!(
            "krun-runtime-stop-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_file(&stop);
        let script = format!(
            "n=0; while [ ! -e {} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done; echo rank $KRUN_RANK done",
            stop.display()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_krun"))
            .args(["--local", &nodes.to_string(), "-n", &ranks.to_string()])
            .args(["--bind-to", "none", "sh", "-c", &script])
            .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
            .env_remove("KRUN_SECRET_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("krun runs");
        Job {
            child: Some(child),
            stop,
        }
    }

    fn id(&self) -> String {
        self.child.as_ref().unwrap().id().to_string()
    }

    /// `krun ARGS --job ID`: (exit code, stdout, stderr).
    fn krun(&self, args: &[&str]) -> (i32, String, String) {
        krun(&[args, &["--job", &self.id()]].concat())
    }

    /// The status, once `ok` holds for it (bounded).
    fn status_when(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            let (code, out, err) = self.krun(&["status", "--json"]);
            if code == 0 {
                let v: Value = serde_json::from_str(&out).expect("status --json is JSON");
                if ok(&v) {
                    return v;
                }
                last = out;
            } else {
                last = err;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what}: not reached; last status:\n{last}");
    }

    /// Lets the ranks end and waits for krun: (exit code, stdout, stderr).
    fn finish(mut self) -> (i32, String, String) {
        std::fs::write(&self.stop, b"").unwrap();
        let mut child = self.child.take().unwrap();
        let mut out = String::new();
        let mut err = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let code = child.wait().unwrap().code().unwrap_or(-1);
        (code, out, err)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.stop);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

mod job_common;
use job_common::run_krun as krun;

fn numbers(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn rows(v: &Value) -> &Vec<Value> {
    v["status"]["ranks"].as_array().unwrap()
}

fn all_running(v: &Value, n: usize) -> bool {
    rows(v).len() == n && rows(v).iter().all(|r| r["state"] == "running")
}

#[test]
fn status_json_shows_the_epoch_members_and_every_rank_of_a_running_job() {
    let job = Job::start(2, 4);
    let v = job.status_when("4 running ranks", |v| all_running(v, 4));
    assert_eq!(v["job"], job.id());
    assert_eq!(v["mode"], "local");
    let s = &v["status"];
    assert_eq!(s["epoch"], 0);
    assert_eq!(numbers(&s["members"]), [0, 1]);
    assert_eq!(numbers(&s["supervisors"]), [0, 1]);
    assert_eq!(s["cells"].as_array().unwrap().len(), 1);
    for (i, r) in rows(&v).iter().enumerate() {
        assert_eq!(r["rank"], i as u64);
        // Block placement: ranks 0-1 on node 0, 2-3 on node 1.
        assert_eq!(r["node"], (i / 2) as u64, "{r}");
        assert_eq!(r["incarnation"], 0);
        // The pid is the rank's process: its environment names the rank and the node socket.
        let pid = r["pid"].as_u64().unwrap();
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("the rank's process");
        let env = String::from_utf8_lossy(&env);
        assert!(
            env.contains(&format!("KRUN_RANK={i}\0")),
            "pid {pid}: {env}"
        );
        assert!(env.contains("KRUN_NODE_SOCKET=/"), "pid {pid}: {env}");
    }
    // The nodes' addresses are in the job directory, and the text form names every rank.
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let (code, text, err) = job.krun(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("epoch 0: members 0,1"), "{text}");
    assert_eq!(text.matches(" running ").count(), 4, "{text}");
    let (code, out, err) = job.finish();
    assert_eq!(code, 0, "{out}\n{err}");
    for r in 0..4 {
        assert!(out.contains(&format!("rank {r} done")), "{out}");
    }
    // Exits reach the table too, but the job directory is gone with the job.
    let (code, _, err) = krun(&["status", "--job", v["job"].as_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("no running job"), "{err}");
}

#[test]
fn node_add_grows_the_members_and_advances_the_epoch_and_a_rankless_node_drains() {
    let job = Job::start(2, 2);
    job.status_when("2 running ranks", |v| all_running(v, 2));
    let (code, out, err) = job.krun(&["node", "add"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("node 2 joined the job at epoch 1"), "{out}");
    let v = job.status_when("3 members", |v| {
        numbers(&v["status"]["members"]) == [0, 1, 2]
    });
    let s = &v["status"];
    assert_eq!(s["epoch"], 1);
    assert_eq!(s["changes"][0]["kind"], "join");
    assert_eq!(s["changes"][0]["node"], 2);
    // The table's rows survived the migration to the new member.
    assert!(all_running(&v, 2), "{v}");
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3);
    // The new node runs no ranks: it drains by leaving the membership cleanly.
    let (code, out, err) = job.krun(&["node", "drain", "2"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("node 2 left the job"), "{out}");
    let v = job.status_when("2 members", |v| numbers(&v["status"]["members"]) == [0, 1]);
    assert_eq!(v["status"]["epoch"], 2);
    assert_eq!(v["status"]["changes"][1]["kind"], "leave");
    assert!(all_running(&v, 2), "{v}");
    let (code, out, err) = job.finish();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("rank 0 done") && out.contains("rank 1 done"),
        "{out}"
    );
    assert!(
        !err.contains("failed at epoch"),
        "a planned leave is no failure: {err}"
    );
}

#[test]
fn a_killed_node_is_one_agreed_failure_and_its_ranks_are_lost() {
    let job = Job::start(4, 8);
    let v = job.status_when("8 running ranks", |v| all_running(v, 8));
    let pid = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == 3)
        .unwrap()["pid"]
        .as_u64()
        .unwrap();
    // SAFETY: kill(2) of a krund of the job this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let v = job.status_when("node 3 out and its ranks lost", |v| {
        numbers(&v["status"]["members"]) == [0, 1, 2]
            && rows(v).len() == 8
            && rows(v)[6]["state"] == "lost"
            && rows(v)[7]["state"] == "lost"
    });
    let s = &v["status"];
    assert_eq!(s["epoch"], 1, "one change: {v}");
    assert_eq!(s["changes"].as_array().unwrap().len(), 1);
    assert_eq!(s["changes"][0]["kind"], "fail");
    assert_eq!(s["changes"][0]["node"], 3);
    for r in &rows(&v)[..6] {
        assert_eq!(r["state"], "running", "{r}");
    }
    let (_, out, err) = job.finish();
    assert_eq!(err.matches("failed at epoch").count(), 1, "{err}");
    assert!(err.contains("krun: node 3 failed at epoch 1"), "{err}");
    for r in 0..6 {
        assert!(out.contains(&format!("rank {r} done")), "{out}");
    }
}

#[test]
fn bad_requests_get_clear_errors() {
    let (code, _, err) = krun(&["status", "--job", "999999999"]);
    assert_eq!(code, 2);
    assert!(err.contains("no running job \"999999999\""), "{err}");
    let (code, _, err) = krun(&["node", "frobnicate"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'"),
        "{err}"
    );
    let (code, _, err) = krun(&["node", "drain", "x"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value 'x' for '<NODE>'"), "{err}");

    let job = Job::start(4, 4);
    job.status_when("4 running ranks", |v| all_running(v, 4));
    let (code, _, err) = job.krun(&["node", "drain", "7"]);
    assert_eq!(code, 2);
    assert!(err.contains("node 7 is not a node of this job"), "{err}");
    // (A plain program moves with CRIU now: launcher/tests/drain_job.rs; a supervisor's
    // drain: cluster-tests/tests/runtime_drain.rs.)
    let v = job.status_when("rank 3 still running on node 3", |v| all_running(v, 4));
    assert_eq!(rows(&v)[3]["node"], 3);
    assert_eq!(numbers(&v["status"]["members"]), [0, 1, 2, 3]);
    assert_eq!(v["status"]["epoch"], 0);
    let (code, out, err) = job.finish();
    assert_eq!(code, 0, "{out}\n{err}");

    let job = Job::start(1, 1);
    job.status_when("1 running rank", |v| all_running(v, 1));
    let (code, _, err) = job.krun(&["node", "drain", "0"]);
    assert_eq!(code, 2);
    assert!(err.contains("node 0 is the last node of the job"), "{err}");
    let (code, out, err) = job.finish();
    assert_eq!(code, 0, "{out}\n{err}");
}
