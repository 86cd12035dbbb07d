//! The DSM locks' server (node 0) is SIGKILLed: real `dsm-node` processes (3 ranks).
//! - `server-holding-killed`: node 0 holds lock 0 (it wrote the counter, rank 1 has a read
//!   copy) while ranks 1 and 2 wait for it, and granted lock 1 to rank 1. A waiter's probe
//!   finds node 0 dead; rank 1, the next coordinator, runs its failure and rebuilds the lock
//!   table from the survivors' reports: lock 0 goes to rank 1 with a grant naming node 0
//!   (the counter is the last committed state, 7, from the promoted copy), then to rank 2
//!   (named by nobody); lock 1 stays rank 1's until it releases it (rank 2 reads the word
//!   rank 1 wrote just before). The survivors pass two barriers and agree on the counter.
//! - `server-killed`: node 0 only serves lock 0 (rank 1 holds it, rank 2 waits): rank 2
//!   gets it once rank 1 releases it, with no dead holder named, and reads rank 1's value.
//!
//! Needs root (userfaultfd). The test bounds waits (150 s) to tell progress from a hang; it
//! never judges time.
mod common;

use std::time::{Duration, Instant};

use common::{is_root, pairs, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

const LIMIT: Duration = Duration::from_secs(150);

fn start(scenario: &str, provider: &str) -> (BootstrapServer, Vec<Proc>) {
    let server = BootstrapServer::start_with("127.0.0.1:0", 3, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let env = [
        ("KRUN_DSM_FAULT_TIMEOUT_MS", "1000"),
        ("KRUN_DSM_PREFETCH", "0"),
    ];
    let procs = (0..3)
        .map(|r| spawn(&rank_args(scenario, provider, &addr, r, 3, &[]), &env))
        .collect();
    (server, procs)
}

/// Kills rank 0 (by PID) and checks it ended by the signal.
fn kill_server(p: &mut Proc) {
    p.child.kill().unwrap();
    assert!(!p.child.wait().unwrap().success());
}

/// Both survivors end normally with `end=<want>`, coordinated by rank 1, knowing rank 0
/// dead.
fn survivors_end(procs: &mut [Proc], want: &str, deadline: Instant, what: &str) {
    for r in [1usize, 2] {
        let end = pairs(&procs[r].line_with("survivor=ok", deadline, &format!("rank {r}")));
        assert_eq!(end["end"], want, "rank {r} {what}: the counter at the end");
        assert_eq!(end["coordinator"], "1", "rank {r} {what}");
        assert_eq!(end["dead"], "[0]", "rank {r} {what}");
    }
    for r in [1usize, 2] {
        let (status, err) = procs[r].wait_exit(deadline, &format!("rank {r}"));
        assert!(status.success(), "rank {r} {what}: {status}\n{err}");
        if r == 1 {
            assert!(
                err.contains("serving the DSM locks after rank 0 died"),
                "rank 1 {what} did not take the lock table over:\n{err}"
            );
        }
    }
}

fn server_holding_killed(provider: &str) {
    let (server, mut procs) = start("server-holding-killed", provider);
    let deadline = Instant::now() + LIMIT;
    procs[1].line_with("waiting=1", deadline, "rank 1");
    procs[2].line_with("waiting=1", deadline, "rank 2");
    procs[0].line_with("queued=1,2", deadline, "rank 0");
    kill_server(&mut procs[0]);
    let what = format!("over {provider}");
    let first = pairs(&procs[1].line_with("rank=1 inherited=", deadline, "rank 1"));
    assert_eq!(
        first["inherited"], "0",
        "{what}: rank 1 (the first waiter) must be told node 0 held lock 0"
    );
    assert_eq!(
        first["counter"], "7",
        "{what}: lock 0's data is node 0's last committed value"
    );
    let second = pairs(&procs[2].line_with("rank=2 inherited=", deadline, "rank 2"));
    assert_eq!(
        second["inherited"], "-",
        "{what}: rank 2 got lock 0 from rank 1, a live holder"
    );
    assert_eq!(second["counter"], "8", "{what}: rank 1's increment");
    let w = pairs(&procs[2].line_with("rank=2 word1=", deadline, "rank 2"));
    assert_eq!(
        w["word1"], "3",
        "{what}: rank 2 got lock 1 while rank 1 still held it (granted by node 0)"
    );
    let free = pairs(&procs[2].line_with("rank=2 inherited2=", deadline, "rank 2"));
    assert_eq!(
        free["inherited2"], "0",
        "{what}: lock 2, held by node 0 with nobody waiting, must be named released by its death"
    );
    survivors_end(&mut procs, "9", deadline, &what);
    drop(procs);
    let _ = server.join();
}

fn server_killed(provider: &str) {
    let (server, mut procs) = start("server-killed", provider);
    let deadline = Instant::now() + LIMIT;
    procs[1].line_with("holding=1", deadline, "rank 1");
    procs[2].line_with("waiting=1", deadline, "rank 2");
    procs[0].line_with("queued=2", deadline, "rank 0");
    kill_server(&mut procs[0]);
    let what = format!("over {provider}");
    let got = pairs(&procs[2].line_with("rank=2 inherited=", deadline, "rank 2"));
    assert_eq!(
        got["inherited"], "-",
        "{what}: node 0 only served lock 0; rank 1 held it"
    );
    assert_eq!(
        got["counter"], "8",
        "{what}: rank 2 got lock 0 before rank 1 released it"
    );
    survivors_end(&mut procs, "9", deadline, &what);
    drop(procs);
    let _ = server.join();
}

#[test]
fn a_lock_the_dead_server_held_goes_to_its_waiters_in_turn_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    server_holding_killed("tcp");
}

#[test]
fn a_lock_the_dead_server_held_goes_to_its_waiters_in_turn_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    server_holding_killed("shm");
}

#[test]
fn a_lock_the_dead_server_only_served_stays_with_its_holder_over_tcp() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    server_killed("tcp");
}

#[test]
fn a_lock_the_dead_server_only_served_stays_with_its_holder_over_shm() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    server_killed("shm");
}
