//! `krun node drain` while a job runs: 8 ranks of a program linked with ghost's native
//! checkpointer on 4 local krund nodes; node 3 (not a supervisor) is drained. Its two ranks are captured and
//! ended there and continue on the other nodes from their images, node 2 leaves the
//! membership cleanly, and the job completes with every rank's output equal to an
//! uninterrupted run. Needs `cc` and the workspace's libghost.so (`cargo build --workspace`).
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
    let (mib, total, every, sleep_ms) = ("1", 300u64, "10", "20");

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

    // A supervisor cannot leave: refused before anything moves.
    let (code, _, err) = krun(&["node", "drain", "2", "--job", &id]);
    assert_eq!(code, 2);
    assert!(err.contains("node 2 is a supervisor"), "{err}");
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
            r >= 6,
            "only the moved ranks resume:\n{text}"
        );
    }
}
