//! Determinants of deliveries that come in a burst share one write to the buddy, and a
//! rank lost after such a burst still replays it in the recorded order (two ranks in one
//! process, loopback fabric: each is the other's buddy).
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use fabric::bootstrap::BootstrapServer;
use fabric::{FabricConfig, Provider};
use krun::{Config, Rank, Source, TagMatch};

const BURST: usize = 4;
/// Deliveries of the burst: B, then the A's.
const EVENTS: u64 = 1 + BURST as u64;
const TAG_A: u32 = 1;
const TAG_B: u32 = 2;
const TAG_OK: u32 = 3;
const TAG_DONE: u32 = 4;

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

fn value(r: &Rank, tag: u32) -> u64 {
    let m = r.recv(Source::Rank(1), TagMatch::Tag(tag)).unwrap();
    u64::from_le_bytes(m.data.try_into().unwrap())
}

/// Rank 0's receives: B first (the A's arrive before it and wait, ready), then the A's.
fn receive_burst(r: &Rank) -> Vec<u64> {
    let mut got = vec![value(r, TAG_B)];
    for _ in 0..BURST {
        got.push(value(r, TAG_A));
    }
    got
}

#[test]
fn deliveries_in_a_burst_share_one_determinant_write_and_replay_in_the_recorded_order() {
    let server =
        BootstrapServer::start_with(("127.0.0.1", 0), 2, Duration::from_secs(30), None).unwrap();
    let addr = server.addr();
    let survivor: Arc<Mutex<Option<Arc<Rank>>>> = Arc::default();
    let (card_tx, card_rx) = mpsc::channel::<(Vec<u8>, Vec<u8>)>();
    let (peers_tx, peers_rx) = mpsc::channel::<Vec<(Vec<u8>, Vec<u8>)>>();
    let s1 = survivor.clone();
    let sender = std::thread::spawn(move || {
        let r = Rank::init_with(config(1, Some(addr))).unwrap();
        r.enable_logging(0).unwrap();
        *s1.lock().unwrap() = Some(r.clone());
        for i in 0..BURST as u64 {
            r.send(0, TAG_A, &(100 + i).to_le_bytes()).unwrap();
        }
        r.send(0, TAG_B, &7u64.to_le_bytes()).unwrap();
        // Rank 0's first process says it took everything, then its restarted process
        // (which resends nothing: this rank has its `ok` already) says it is done; while
        // waiting, this rank answers the restarted rank's `Resume`.
        let ok = r.recv(Source::Rank(0), TagMatch::Tag(TAG_OK)).unwrap();
        let done = r.recv(Source::Rank(0), TagMatch::Tag(TAG_DONE)).unwrap();
        let stats = r.log_stats().unwrap();
        r.finalize().unwrap();
        (ok.data, done.data, stats)
    });
    let lost = std::thread::spawn(move || {
        let r = Rank::init_with(config(0, Some(addr))).unwrap();
        r.enable_logging(0).unwrap();
        let snap = r.log_mark_checkpoint(1).unwrap();
        let before = r.log_stats().unwrap();
        let first = receive_burst(&r);
        let after = r.log_stats().unwrap();
        r.send(1, TAG_OK, b"ok").unwrap();
        // Lost: this endpoint is gone; a new process rejoins from checkpoint 1.
        drop(r);
        let rejoin = Rank::rejoin_open(config(0, None), 0).unwrap();
        card_tx.send((rejoin.address(), rejoin.ring())).unwrap();
        let peers = peers_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let r = rejoin.join(&peers, &snap).unwrap();
        let pending = r.log_replay_pending();
        let again = receive_burst(&r);
        r.send(1, TAG_OK, b"ok").unwrap();
        r.send(1, TAG_DONE, b"done").unwrap();
        let replayed = r.log_stats().unwrap();
        r.finalize().unwrap();
        (first, again, before, after, pending, replayed)
    });
    // krund's part: the survivor learns where rank 0 is now.
    let (address, ring) = card_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let r1 = survivor.lock().unwrap().clone().unwrap();
    r1.replace_peer(0, &address, &ring).unwrap();
    peers_tx
        .send(vec![(address, ring), r1.rejoin_card().unwrap()])
        .unwrap();
    drop(r1);
    let (first, again, before, after, pending, replayed) = lost.join().unwrap();
    let (ok, done, sender_stats) = sender.join().unwrap();
    server.join().unwrap();

    assert_eq!(first, vec![7, 100, 101, 102, 103]);
    // Five deliveries, the first four with another message ready: one write for all.
    assert_eq!(after.determinants - before.determinants, EVENTS);
    assert_eq!(
        after.det_writes - before.det_writes,
        1,
        "{before:?} {after:?}"
    );
    // The restarted rank read all five back from its buddy's ring and took them again in
    // that order, with the same values.
    assert_eq!(pending as u64, EVENTS);
    assert_eq!(again, first);
    assert!(replayed.replayed_deliveries >= EVENTS, "{replayed:?}");
    assert_eq!((ok.as_slice(), done.as_slice()), (&b"ok"[..], &b"done"[..]));
    assert!(sender_stats.resent_messages >= EVENTS, "{sender_stats:?}");
}
