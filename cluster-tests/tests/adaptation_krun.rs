//! krun starts the adaptation layer on every node of a job: `krun --local 3 krun-adapt
//! --under-krun`. The ranks find each other through krun's bootstrap service and hold the
//! job's secret; rank 0 reads the client commands krun forwards from stdin.
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster_tests::workspace_bin;

#[test]
fn krun_runs_an_adaptation_node_on_every_node_of_a_job() {
    let mut krun = Command::new(workspace_bin("krun"))
        .args(["--local", "3", "-n", "3"])
        .arg(workspace_bin("krun-adapt"))
        .arg("--under-krun")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting krun");
    let pid = krun.id() as i32;
    let stdout = krun.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut stdin = krun.stdin.take().unwrap();
    let mut seen = Vec::new();
    let wait_for = |what: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !seen.iter().any(|l| l.contains(what)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => seen.push(l),
                Err(_) => {
                    // SAFETY: signalling the krun child this test started, by its PID.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    panic!("no {what:?} in the job's output: {seen:?}");
                }
            }
        }
    };
    for id in 0..3 {
        wait_for(&format!("ready id={id} "), &mut seen);
    }
    // Each key is answered by its manager, on whichever node the locator puts it.
    for key in 0..6u64 {
        writeln!(stdin, "req 1 {} {key} add {}", key + 1, key + 10).unwrap();
    }
    stdin.flush().unwrap();
    for key in 0..6u64 {
        wait_for(&format!("ans 1 {} ok 1 {}", key + 1, key + 10), &mut seen);
    }
    writeln!(stdin, "status").unwrap();
    stdin.flush().unwrap();
    wait_for("members=0,1,2", &mut seen);
    // The job runs until it is stopped; krun passes SIGTERM to every rank.
    // SAFETY: signalling the krun child this test started, by its PID.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = krun.wait().unwrap();
    assert!(!status.success(), "a stopped job reports it: {status:?}");
}
