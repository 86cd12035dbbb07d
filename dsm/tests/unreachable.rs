//! The fault timeout: a rank waiting for a page whose only copy died with its owner gets a
//! clear error (naming the page, its region and the dead node) and ends with
//! `EXIT_PAGE_UNREACHABLE`, instead of hanging or reading zeros. Needs root (userfaultfd).
//!
//! Three `dsm-node unreachable` processes: rank 1 writes pages 0 and 1 and is SIGKILLed
//! (by PID) once it says so; then rank 0 reads page 1 (whose manager was rank 1) and rank 2
//! reads page 0 (whose manager, rank 0, forwards to rank 1). The fault
//! timeout is 400 ms; the test only bounds the wait (120 s) to tell an error from a hang,
//! it never judges the time taken.
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;

const NODE: &str = env!("CARGO_BIN_EXE_dsm-node");
const LIMIT: Duration = Duration::from_secs(120);

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        fabric::ofi::remove_shm_segments(self.child.id());
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn spawn(args: &[String], env: &[(&str, &str)]) -> Proc {
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

fn unreachable_on(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-unreachable-{}-{provider}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let go = dir.join("go");
    let server = BootstrapServer::start_with("127.0.0.1:0", 3, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let env = [
        ("KRUN_DSM_FAULT_TIMEOUT_MS", "400"),
        ("KRUN_DSM_PREFETCH", "0"),
    ];
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| {
            let args: Vec<String> = [
                "unreachable",
                "--provider",
                provider,
                "--bootstrap",
                &addr,
                "--rank",
                &r.to_string(),
                "--size",
                "3",
                "--go-file",
                go.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            spawn(&args, &env)
        })
        .collect();
    // Rank 1 owns pages 0 and 1 now; it is SIGKILLed by its PID.
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match procs[1]
            .lines
            .recv_timeout(left.max(Duration::from_millis(1)))
        {
            Ok(l) if l.contains("owner=ready") => break,
            Ok(_) => {}
            Err(_) => panic!("rank 1 never became the owner over {provider}"),
        }
    }
    procs[1].child.kill().unwrap();
    let killed = procs[1].child.wait().unwrap();
    assert!(!killed.success());
    std::fs::write(&go, b"go").unwrap();
    for r in [0usize, 2] {
        let p = &mut procs[r];
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "rank {r} over {provider} hangs on a page whose owner died"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = p.err.take().unwrap().join().unwrap();
        eprintln!("rank {r} over {provider}: {status}: {}", err.trim());
        assert_eq!(
            status.code(),
            Some(dsm::fault::EXIT_PAGE_UNREACHABLE),
            "rank {r} over {provider}: {status}\n{err}"
        );
        let page = if r == 0 { 1 } else { 0 };
        assert!(
            err.contains(&format!("page {page} (region at")),
            "rank {r} over {provider}: the error must name page {page}:\n{err}"
        );
        // Rank 0 may end before rank 2 probes it: node 1 must be among the dead.
        let dead = err
            .split("; nodes [")
            .nth(1)
            .and_then(|t| t.split_once("] do not answer"))
            .map(|(list, _)| {
                list.split(", ")
                    .map(|n| n.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_else(|| panic!("rank {r} over {provider}: no dead nodes named:\n{err}"));
        assert!(
            dead.iter().any(|n| n == "1"),
            "rank {r} over {provider}: node 1 must be named dead: {dead:?}\n{err}"
        );
        assert!(
            err.contains("not zero-filled"),
            "rank {r} over {provider}: {err}"
        );
    }
    drop(procs);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rank_reading_a_page_whose_owner_was_sigkilled_gets_an_error_naming_it_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    unreachable_on("tcp");
}

#[test]
fn a_rank_reading_a_page_whose_owner_was_sigkilled_gets_an_error_naming_it_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    unreachable_on("shm");
}
