//! The fabric layer across OS processes, on loopback only, for each libfabric provider that
//! works on a single host (`tcp` = tcp;ofi_rxm, `shm`). Each test starts a bootstrap server
//! on 127.0.0.1 and several `fabric-node` processes (src/bin/fabric-node.rs) that swap
//! addresses through it and run one scenario; the processes check what they can see and
//! print `krun-result key=value` lines that the test checks again.
//!
//! Every child is killed by PID and reaped when its guard is dropped, also when a test fails;
//! every child also has its own watchdog (`--deadline-secs`).
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;
use fabric::Provider;

const NODE: &str = env!("CARGO_BIN_EXE_fabric-node");
/// Generous upper bound for a whole scenario ("does not hang"), never a performance check.
const SCENARIO_LIMIT: Duration = Duration::from_secs(240);

/// A running `fabric-node` process. Dropping it kills (SIGKILL, by PID) and reaps it, and
/// removes the shm segments it left.
struct Node {
    name: String,
    child: Child,
    stdout: Receiver<(Instant, String)>,
    stderr: Option<JoinHandle<String>>,
    lines: Vec<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Child::kill signals only a child that has not been reaped yet, so no stray PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed shm node cannot unlink its segments itself.
        fabric::ofi::remove_shm_segments(self.child.id());
    }
}

/// What a finished process left behind.
struct Outcome {
    name: String,
    status: ExitStatus,
    results: HashMap<String, String>,
    stderr: String,
}

impl Outcome {
    fn get(&self, key: &str) -> &str {
        self.results
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no result {key:?}; results {:?}\nstderr:\n{}",
                    self.name, self.results, self.stderr
                )
            })
    }

    fn num(&self, key: &str) -> u64 {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("{}: result {key}={v:?} is not a number", self.name))
    }
}

impl Node {
    fn spawn(name: String, args: &[String], env: &[(&str, &str)]) -> Node {
        let mut child = Command::new(NODE)
            .args(args)
            .env("KRUN_FABRIC_BIND", "127.0.0.1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {NODE}: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let (tx, stdout) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = Some(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        }));
        Node {
            name,
            child,
            stdout,
            stderr,
            lines: Vec::new(),
        }
    }

    /// Waits for a `krun-event <what>` line; returns when it was read.
    fn wait_event(&mut self, what: &str, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        let want = format!("krun-event {what}");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok((at, line)) => {
                    let hit = line == want;
                    self.lines.push(line);
                    if hit {
                        return at;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let stderr = self.stderr_now();
                    panic!(
                        "{}: no {want:?} within {timeout:?}; output {:?}\nstderr:\n{stderr}",
                        self.name, self.lines
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    let stderr = self.stderr_now();
                    panic!(
                        "{}: exited ({status:?}) before {want:?}; output {:?}\nstderr:\n{stderr}",
                        self.name, self.lines
                    );
                }
            }
        }
    }

    fn stderr_now(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Kills the process now (SIGKILL) and reaps it; returns when the signal was sent.
    fn kill_now(&mut self) -> Instant {
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("{}: kill: {e}", self.name));
        let at = Instant::now();
        let _ = self.child.wait();
        at
    }

    /// Waits for the process to exit, at most `timeout` (else kills it and fails the test).
    fn finish(&mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => {
                    let stderr = self.stderr_now();
                    while let Ok((_, line)) = self.stdout.recv_timeout(Duration::from_secs(1)) {
                        self.lines.push(line);
                    }
                    panic!(
                        "{}: still running after {timeout:?} (hang?), killed\noutput {:?}\nstderr:\n{stderr}",
                        self.name, self.lines
                    );
                }
                Err(e) => panic!("{}: wait: {e}", self.name),
            }
        };
        // The process is gone: its pipes reach end of file shortly.
        while let Ok((_, line)) = self.stdout.recv_timeout(Duration::from_secs(10)) {
            self.lines.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let results = self
            .lines
            .iter()
            .filter_map(|l| l.strip_prefix("krun-result "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Outcome {
            name: self.name.clone(),
            status,
            results,
            stderr,
        }
    }
}

/// A scenario: the bootstrap server and the processes of the job.
struct Job {
    _server: BootstrapServer,
    nodes: Vec<Node>,
    started: Instant,
    label: String,
}

fn launch(
    scenario: &str,
    provider: Provider,
    size: usize,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Job {
    let server = BootstrapServer::start("127.0.0.1:0", size, Duration::from_secs(120))
        .expect("bootstrap server");
    assert!(server.addr().ip().is_loopback());
    let label = format!("{scenario}/{provider}");
    let mut nodes = Vec::with_capacity(size);
    for rank in 0..size {
        let mut args: Vec<String> = vec![
            scenario.into(),
            "--provider".into(),
            provider.name().into(),
            "--bootstrap".into(),
            server.addr().to_string(),
            "--rank".into(),
            rank.to_string(),
            "--size".into(),
            size.to_string(),
            "--deadline-secs".into(),
            SCENARIO_LIMIT.as_secs().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // If a later spawn fails, the nodes already started are killed by their guards.
        nodes.push(Node::spawn(format!("{label} rank {rank}"), &args, env));
    }
    Job {
        _server: server,
        nodes,
        started: Instant::now(),
        label,
    }
}

impl Job {
    /// Waits for every process and asserts that each exited successfully.
    fn finish_ok(mut self) -> Vec<Outcome> {
        let deadline = self.started + SCENARIO_LIMIT + Duration::from_secs(10);
        let outcomes: Vec<Outcome> = self
            .nodes
            .iter_mut()
            .map(|n| n.finish(deadline.saturating_duration_since(Instant::now())))
            .collect();
        let failed: Vec<String> = outcomes
            .iter()
            .filter(|o| !o.status.success())
            .map(|o| {
                format!(
                    "{} exited with {}; results {:?}\nstderr:\n{}",
                    o.name, o.status, o.results, o.stderr
                )
            })
            .collect();
        assert!(failed.is_empty(), "{}:\n{}", self.label, failed.join("\n"));
        println!(
            "{}: {:.2} s",
            self.label,
            self.started.elapsed().as_secs_f64()
        );
        for o in &outcomes {
            let mut r: Vec<_> = o.results.iter().map(|(k, v)| format!("{k}={v}")).collect();
            r.sort();
            println!("  {}: {}", o.name, r.join(" "));
        }
        outcomes
    }
}

// ---------------------------------------------------------------------------------------

/// 1 GiB written in 1 MiB chunks (32 in flight), verified at the target, read back and
/// verified by the writer.
fn bulk_1gib(provider: Provider) {
    let gib = (1u64 << 30).to_string();
    let out = launch(
        "bulk",
        provider,
        2,
        &["--bytes", &gib, "--chunk", "1048576", "--window", "32"],
        &[],
    )
    .finish_ok();
    assert_eq!(out[0].num("target_verified_bytes"), 1 << 30);
    assert_eq!(out[0].num("target_mismatched_words"), 0);
    assert_eq!(out[1].num("chunks"), 1024);
    assert_eq!(out[1].num("readback_mismatched_words"), 0);
}

/// 8 endpoints (4 processes x 2) fetch-add on one counter owned by rank 0.
fn fetch_add_8_endpoints(provider: Provider) {
    let iters = 400u64;
    let out = launch(
        "fetch-add",
        provider,
        4,
        &["--endpoints", "2", "--iters", "400", "--window", "8"],
        &[],
    )
    .finish_ok();
    let owner = &out[0];
    assert_eq!(owner.num("endpoints"), 8);
    assert_eq!(owner.num("total_ops"), 8 * iters);
    // Endpoint i adds i + 1 each time.
    assert_eq!(owner.num("final"), iters * (1..=8).sum::<u64>());
    assert_eq!(owner.get("chain"), "ok");
}

/// 3 processes take a compare-swap lock in rank 0's memory and increment a multi-word record.
fn cas_lock(provider: Provider) {
    let out = launch("lock", provider, 3, &["--iters", "150"], &[]).finish_ok();
    assert_eq!(out[0].num("final_counter"), 3 * 150);
    assert_eq!(out[0].num("final_lock"), 0);
    for o in &out {
        assert_eq!(o.num("iterations"), 150);
    }
}

/// Out-of-bounds accesses are rejected locally; forged keys fail remotely, in bounded time.
fn bad_accesses(provider: Provider) {
    let out = launch(
        "errors",
        provider,
        2,
        &[],
        &[("KRUN_FABRIC_TIMEOUT_MS", "2500")],
    )
    .finish_ok();
    let i = &out[1];
    for probe in [
        "oob_remote_write",
        "oob_remote_read",
        "oob_local_read",
        "oob_atomic",
    ] {
        assert_eq!(i.get(probe), "OutOfBounds", "{provider}: {probe}");
    }
    assert_eq!(i.get("misaligned_atomic"), "Misaligned");
    for probe in [
        "forged_key_write",
        "forged_key_read",
        "forged_key_fetch_add",
        "forged_key_compare_swap",
    ] {
        let kind = i.get(probe);
        assert!(
            ["RemoteAccess", "Remote", "Timeout"].contains(&kind),
            "{provider}: {probe} gave {kind}"
        );
        assert!(
            i.num(&format!("{probe}_ms")) < 20_000,
            "{provider}: {probe} took too long"
        );
    }
    assert_eq!(i.get("good_write_after_errors"), "ok");
    assert_eq!(i.get("good_read_after_errors"), "ok");
    assert_eq!(out[0].num("target_untouched_mismatches"), 0);
    assert_eq!(out[0].num("target_good_write_mismatches"), 0);
}

/// The target is SIGKILLed while the initiator streams writes into it; a third process stays
/// alive. With as many operations in flight as the endpoint allows (max_in_flight = window =
/// 16), the dead peer's operations must give their slots back for the live peer to be served.
fn killed_peer(provider: Provider) {
    let mut job = launch(
        "kill",
        provider,
        3,
        &[
            "--bytes",
            "268435456",
            "--chunk",
            "1048576",
            "--window",
            "16",
        ],
        &[
            ("KRUN_FABRIC_TIMEOUT_MS", "2500"),
            ("KRUN_FABRIC_MAX_IN_FLIGHT", "16"),
        ],
    );
    job.nodes[0].wait_event("ready", Duration::from_secs(60));
    job.nodes[2].wait_event("ready", Duration::from_secs(60));
    // shm: killed while the writer is between operations (see fabric-node's kill scenario).
    let cue = if provider == Provider::Shm {
        "quiet"
    } else {
        "transferring"
    };
    job.nodes[1].wait_event(cue, Duration::from_secs(60));
    let killed = job.nodes[0].kill_now();
    let failed = job.nodes[1].wait_event("failed", Duration::from_secs(20));
    let error_after = failed.saturating_duration_since(killed);
    // Every operation in flight at the kill ends within the same generous bound.
    let drained = job.nodes[1].wait_event("drained", Duration::from_secs(60));
    let drained_after = drained.saturating_duration_since(killed);
    let started = job.started;
    let out = job.nodes[1].finish(Duration::from_secs(60));
    if out.results.get("live_peer_send").map(String::as_str) != Some("ok") {
        // The bystander would wait for a message that never comes.
        job.nodes[2].kill_now();
    }
    let mut r: Vec<_> = out
        .results
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    r.sort();
    println!(
        "kill/{provider}: {:.2} s; first error {:.3} s and all in-flight operations ended {:.3} s after SIGKILL\n  {}: {}",
        started.elapsed().as_secs_f64(),
        error_after.as_secs_f64(),
        drained_after.as_secs_f64(),
        out.name,
        r.join(" ")
    );
    assert!(
        out.status.success(),
        "{provider}: initiator exited with {}\nstderr:\n{}",
        out.status,
        out.stderr
    );
    let kind = out.get("first_error");
    assert!(
        kind == "Remote" || kind == "Timeout",
        "{provider}: first error {kind}: {}",
        out.get("first_error_message")
    );
    assert_eq!(
        out.get("first_error_peer"),
        out.get("peer"),
        "{provider}: the error names the dead peer"
    );
    assert!(
        drained_after < Duration::from_secs(20),
        "{provider}: operations in flight at the kill took {drained_after:?} to end (op timeout 2.5 s): {}",
        out.get("drain_ms")
    );
    assert_ne!(out.get("after_kill_fetch_add"), "ok");
    assert_eq!(
        out.get("live_peer_fetch_add"),
        "ok",
        "{provider}: the live peer is still served"
    );
    let bystander = job.nodes[2].finish(Duration::from_secs(60));
    assert!(
        bystander.status.success(),
        "{provider}: bystander exited with {}\nstderr:\n{}",
        bystander.status,
        bystander.stderr
    );
    assert_eq!(bystander.num("counter"), 1);
}

/// Tagged messages among 3 processes, all to all, then a ping-pong; senders are named.
fn tagged_messages(provider: Provider) {
    let out = launch("messages", provider, 3, &["--iters", "40"], &[]).finish_ok();
    for o in &out {
        assert_eq!(o.num("received"), 2 * 40, "{}", o.name);
    }
    assert_eq!(out[0].num("ping_pong_rounds"), 40);
    assert_eq!(out[1].num("ping_pong_rounds"), 40);
}

/// Each write's completion is followed by a message; the target must already see the data.
fn write_visibility(provider: Provider) {
    let out = launch("visibility", provider, 2, &["--iters", "2000"], &[]).finish_ok();
    assert_eq!(out[0].num("iterations"), 2000);
    assert_eq!(
        out[0].num("stale"),
        0,
        "{provider}: writes completed before they were visible"
    );
}

macro_rules! per_provider {
    ($($name:ident: $p:expr;)*) => {$(
        mod $name {
            use super::*;
            #[test]
            fn bulk_1gib_written_verified_and_read_back() { bulk_1gib($p) }
            #[test]
            fn fetch_add_from_8_endpoints_is_exact() { fetch_add_8_endpoints($p) }
            #[test]
            fn compare_swap_lock_keeps_a_record_consistent() { cas_lock($p) }
            #[test]
            fn bad_accesses_fail_without_hanging() { bad_accesses($p) }
            #[test]
            fn killed_peer_gives_an_error_within_bounds() { killed_peer($p) }
            #[test]
            fn tagged_messages_name_their_sender() { tagged_messages($p) }
            #[test]
            fn write_completion_means_visible_to_a_later_message() { write_visibility($p) }
        }
    )*};
}

per_provider! {
    tcp: Provider::Tcp;
    shm: Provider::Shm;
}
