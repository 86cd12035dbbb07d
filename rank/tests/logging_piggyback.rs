//! Determinants piggybacked on messages to another node instead of a wait for the buddy's
//! write (two ranks in one process, loopback fabric: each is the other's buddy). Rank 1
//! answers every ping of rank 0; with the test hook `log_test_hold_back` its determinant
//! writes to the buddy stay back, so none is durable when its answers leave.
use std::time::Duration;

use fabric::bootstrap::BootstrapServer;
use fabric::{FabricConfig, Provider};
use krun::{Config, LogStats, Rank, Source, TagMatch};

const ROUNDS: u64 = 20;
const PING: u32 = 1;
const PONG: u32 = 2;
const LAST: u32 = 3;

fn config(rank: usize, bootstrap: Option<std::net::SocketAddr>) -> Config {
    Config {
        rank,
        size: 2,
        bootstrap,
        fabric: FabricConfig::with_provider(Provider::Loopback),
        bind_explicit: true,
        recv_timeout: Some(Duration::from_secs(15)),
        checkpoints: None,
        node_socket: None,
    }
}

fn value(r: &Rank, from: usize, tag: u32) -> u64 {
    let m = r.recv(Source::Rank(from), TagMatch::Tag(tag)).unwrap();
    u64::from_le_bytes(m.data.try_into().unwrap())
}

/// What each rank saw: rank 0's stats after the ping-pongs and after the last message,
/// rank 1's after the ping-pongs, and the values rank 0 got back.
struct Run {
    pinger_mid: LogStats,
    pinger_end: LogStats,
    ponger: LogStats,
    answers: Vec<u64>,
}

/// `node_size` ranks per node as the log sees them (1: the two ranks on two nodes).
fn ping_pong(node_size: usize) -> Run {
    ping_pong_with(node_size, true, None)
}

/// `hold_back`: rank 1's determinant writes stay back (the test hook); `lazy`: rank 1's
/// determinants wait for a batch up to this long.
fn ping_pong_with(node_size: usize, hold_back: bool, lazy: Option<Duration>) -> Run {
    let server =
        BootstrapServer::start_with(("127.0.0.1", 0), 2, Duration::from_secs(30), None).unwrap();
    let addr = server.addr();
    let ponger = std::thread::spawn(move || {
        let r = Rank::init_with(config(1, Some(addr))).unwrap();
        r.enable_logging(0).unwrap();
        r.log_test_node_size(node_size).unwrap();
        r.log_test_hold_back(hold_back).unwrap();
        if let Some(wait) = lazy {
            r.log_lazy_writes(wait).unwrap();
        }
        let before = r.log_stats().unwrap();
        for _ in 0..ROUNDS {
            let v = value(&r, 0, PING);
            r.send(0, PONG, &(v * 3).to_le_bytes()).unwrap();
        }
        let stats = since(before, r.log_stats().unwrap());
        // Everything durable now (a checkpoint waits for it); the next message says so.
        r.log_test_hold_back(false).unwrap();
        r.log_mark_checkpoint(1).unwrap();
        r.send(0, LAST, &0u64.to_le_bytes()).unwrap();
        r.finalize().unwrap();
        stats
    });
    let r = Rank::init_with(config(0, Some(addr))).unwrap();
    r.enable_logging(0).unwrap();
    r.log_test_node_size(node_size).unwrap();
    let mut answers = Vec::new();
    for i in 0..ROUNDS {
        r.send(1, PING, &(i + 1).to_le_bytes()).unwrap();
        answers.push(value(&r, 1, PONG));
    }
    let pinger_mid = r.log_stats().unwrap();
    value(&r, 1, LAST);
    let pinger_end = r.log_stats().unwrap();
    r.finalize().unwrap();
    let ponger = ponger.join().unwrap();
    server.join().unwrap();
    Run {
        pinger_mid,
        pinger_end,
        ponger,
        answers,
    }
}

#[test]
fn a_send_to_another_node_carries_undurable_determinants_and_does_not_wait() {
    let run = ping_pong(1);
    assert_eq!(answers(), run.answers);
    let p = run.ponger;
    // Every answer followed a delivery whose determinant was not durable: it went along.
    assert_eq!(p.piggybacked_messages, ROUNDS, "{p:?}");
    // Held back: none is durable, and each answer carried only the one rank 0 did not
    // hold yet.
    assert_eq!(p.piggybacked_determinants, ROUNDS, "{p:?}");
    assert_eq!((p.durable_waits, p.durable_wait_ns), (0, 0), "{p:?}");
    // Rank 0 holds rank 1's determinants until told they are durable at rank 1's buddy.
    assert_eq!(
        run.pinger_mid.held_determinants, ROUNDS,
        "{:?}",
        run.pinger_mid
    );
}

#[test]
fn held_determinants_are_dropped_once_the_sender_says_they_are_durable() {
    let run = ping_pong(1);
    assert!(run.pinger_mid.held_determinants > 0, "{:?}", run.pinger_mid);
    // The message after rank 1's checkpoint carried only the mark: nothing held any more.
    assert_eq!(run.pinger_end.held_determinants, 0, "{:?}", run.pinger_end);
}

#[test]
fn a_send_to_a_rank_on_the_same_node_waits_for_durability() {
    let run = ping_pong(2);
    assert_eq!(answers(), run.answers);
    let p = run.ponger;
    // A receiver on this node dies with this rank: no piggyback, a wait before each answer
    // (the hold-back does not stand in its way: a wait posts what is held).
    assert_eq!(
        (p.piggybacked_messages, p.piggybacked_determinants),
        (0, 0),
        "{p:?}"
    );
    assert_eq!(p.durable_waits, ROUNDS, "{p:?}");
    assert_eq!(run.pinger_mid.held_determinants, 0, "{:?}", run.pinger_mid);
}

#[test]
fn lazy_determinant_writes_go_by_batches_while_sends_to_another_node_carry_them() {
    // A wait bound far beyond the test: writes go only when a batch is full (16).
    let run = ping_pong_with(1, false, Some(Duration::from_secs(600)));
    assert_eq!(answers(), run.answers);
    let p = run.ponger;
    assert_eq!(p.determinants, ROUNDS, "{p:?}");
    assert_eq!(p.det_writes, ROUNDS / 16, "{p:?}");
    // Every answer carried the determinant it followed, and nothing waited.
    assert_eq!(p.piggybacked_messages, ROUNDS, "{p:?}");
    assert_eq!(p.durable_waits, 0, "{p:?}");
    assert_eq!(run.pinger_end.held_determinants, 0, "{:?}", run.pinger_end);
}

/// The counters of `now` since `before` (what the ping-pongs did, not the set-up).
fn since(before: LogStats, now: LogStats) -> LogStats {
    LogStats {
        determinants: now.determinants - before.determinants,
        det_writes: now.det_writes - before.det_writes,
        durable_waits: now.durable_waits - before.durable_waits,
        durable_wait_ns: now.durable_wait_ns - before.durable_wait_ns,
        piggybacked_messages: now.piggybacked_messages - before.piggybacked_messages,
        piggybacked_determinants: now.piggybacked_determinants - before.piggybacked_determinants,
        ..now
    }
}

fn answers() -> Vec<u64> {
    (1..=ROUNDS).map(|i| i * 3).collect()
}
