//! Sender-based pessimistic message logging with several ranks in one process (threads,
//! loopback fabric): a rank is lost mid-run and restarts as a new endpoint from its own
//! checkpoint while the others keep running; it replays the logged messages in the
//! recorded order and catches up.
//!
//! The application: every step each rank sends a value derived from its state to both
//! neighbours on a ring, then receives two messages and folds them into its state. With
//! `any` the receives take any source and any tag (the order depends on timing: only the
//! determinants make the replay equal the original run); otherwise each receive names its
//! source and tag (the final result is deterministic and is compared with a run without a
//! failure). Each rank checkpoints on its own schedule (its state + the log snapshot), and
//! the checkpoint is declared safe at once.
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric::bootstrap::BootstrapServer;
use fabric::{FabricConfig, Provider};
use krun::{Config, Rank, Source, TagMatch};

const N: usize = 3;
const STEPS: u64 = 40;
const LOST: usize = 1;
const CRASH_AFTER: u64 = 17;

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn config(rank: usize, bootstrap: Option<std::net::SocketAddr>) -> Config {
    Config {
        rank,
        size: N,
        bootstrap,
        fabric: FabricConfig::with_provider(Provider::Loopback),
        bind_explicit: true,
        recv_timeout: Some(Duration::from_secs(15)),
        checkpoints: None,
        node_socket: None,
    }
}

/// A rank's checkpoint: (state, step, log snapshot).
type Ckpt = (u64, u64, Vec<u8>);

struct Shared {
    any: bool,
    crash: bool,
    /// Rank `LOST`'s state after each step of its first run.
    history: Mutex<BTreeMap<u64, u64>>,
    ckpts: Mutex<BTreeMap<usize, Ckpt>>,
    /// Survivors' ranks, for the coordinator (krund's part: replace the lost rank's address).
    ranks: Mutex<BTreeMap<usize, Arc<Rank>>>,
    /// Checkpoint intervals per rank (own schedules).
    every: [u64; N],
    /// Logging starts after this step (0: at init), every rank at once, with a checkpoint
    /// of every rank there (the cut of a switch to the uncoordinated mode).
    log_from: u64,
    /// `LOST`'s determinant writes to its buddy stay back (the test hook) except when a
    /// checkpoint needs them durable, and it is lost after the sends of the step after
    /// `CRASH_AFTER`: its deliveries since the checkpoint are known only to the survivors
    /// its messages carried them to.
    hold_back: bool,
}

/// The cut's version (apart from the own checkpoints' `done / every`).
const CUT: u64 = 1000;

/// The sends of one step.
fn sends(r: &Rank, me: usize, state: u64, s: u64) {
    let right = (me + 1) % N;
    let left = (me + N - 1) % N;
    r.send(right, 1, &mix(state, s * 2).to_le_bytes()).unwrap();
    r.send(left, 2, &mix(state, s * 2 + 1).to_le_bytes())
        .unwrap();
}

/// One step of the application.
fn step(r: &Rank, me: usize, state: u64, s: u64, any: bool) -> u64 {
    let right = (me + 1) % N;
    let left = (me + N - 1) % N;
    sends(r, me, state, s);
    let mut st = state;
    for k in 0..2 {
        let m = if any {
            r.recv(Source::Any, TagMatch::Any).unwrap()
        } else if k == 0 {
            r.recv(Source::Rank(left), TagMatch::Tag(1)).unwrap()
        } else {
            r.recv(Source::Rank(right), TagMatch::Tag(2)).unwrap()
        };
        let v = u64::from_le_bytes(m.data.as_slice().try_into().unwrap());
        st = mix(st, mix(m.src as u64, v));
    }
    st
}

/// Runs the loop from (`state`, `from`) to the end; `LOST` crashes after `CRASH_AFTER` in
/// its first run (returns `None` then).
fn run_loop(
    r: &Arc<Rank>,
    me: usize,
    mut state: u64,
    from: u64,
    sh: &Shared,
    first: bool,
) -> Option<u64> {
    for s in from..STEPS {
        if sh.hold_back && first && me == LOST && s == CRASH_AFTER {
            // Lost after the next step's sends: they carried every determinant since the
            // checkpoint (none reached the buddy), and nothing after them was delivered.
            sends(r, me, state, s);
            return None;
        }
        state = step(r, me, state, s, sh.any);
        let done = s + 1;
        if me == LOST {
            let mut h = sh.history.lock().unwrap();
            match h.get(&done) {
                Some(&was) => assert_eq!(
                    was, state,
                    "rank {me}'s state after step {done} differs from its original run's"
                ),
                None => {
                    h.insert(done, state);
                }
            }
        }
        if first && sh.log_from > 0 && done == sh.log_from {
            // Every rank is here: logging starts with empty logs, and each rank's state
            // and log snapshot at this step is its first own checkpoint.
            r.enable_logging(0).unwrap();
            let snap = r.log_mark_checkpoint(CUT).unwrap();
            sh.ckpts.lock().unwrap().insert(me, (state, done, snap));
        }
        if done % sh.every[me] == 0 && done < STEPS && done > sh.log_from {
            let version = done / sh.every[me];
            let snap = r.log_mark_checkpoint(version).unwrap();
            sh.ckpts.lock().unwrap().insert(me, (state, done, snap));
            r.log_checkpoint_safe(version).unwrap();
        }
        if sh.crash && !sh.hold_back && first && me == LOST && done == CRASH_AFTER {
            return None;
        }
    }
    Some(state)
}

struct Outcome {
    states: Vec<u64>,
    stats: Vec<krun::LogStats>,
    replayed_steps: u64,
}

fn job(any: bool, crash: bool) -> Outcome {
    job_with(any, crash, 0)
}

fn job_with(any: bool, crash: bool, log_from: u64) -> Outcome {
    job_full(any, crash, log_from, false)
}

fn job_full(any: bool, crash: bool, log_from: u64, hold_back: bool) -> Outcome {
    let server =
        BootstrapServer::start_with(("127.0.0.1", 0), N, Duration::from_secs(30), None).unwrap();
    let addr = server.addr();
    let sh = Arc::new(Shared {
        any,
        crash,
        history: Mutex::new(BTreeMap::new()),
        ckpts: Mutex::new(BTreeMap::new()),
        ranks: Mutex::new(BTreeMap::new()),
        every: [5, 3, 7],
        log_from,
        hold_back,
    });
    // The restarted rank's card goes to the coordinator, which answers with every rank's.
    let (card_tx, card_rx) = mpsc::channel::<(Vec<u8>, Vec<u8>)>();
    let (peers_tx, peers_rx) = mpsc::channel::<Vec<(Vec<u8>, Vec<u8>)>>();
    let peers_rx = Arc::new(Mutex::new(Some(peers_rx)));
    let threads: Vec<_> = (0..N)
        .map(|me| {
            let sh = sh.clone();
            let card_tx = card_tx.clone();
            let peers_rx = peers_rx.clone();
            std::thread::spawn(move || {
                let r = Rank::init_with(config(me, Some(addr))).unwrap();
                if log_from == 0 {
                    r.enable_logging(0).unwrap();
                    if hold_back && me == LOST {
                        r.log_test_hold_back(true).unwrap();
                    }
                }
                sh.ranks.lock().unwrap().insert(me, r.clone());
                let init = mix(0x5eed, me as u64);
                match run_loop(&r, me, init, 0, &sh, true) {
                    Some(state) => {
                        r.finalize().unwrap();
                        (state, r.log_stats().unwrap(), 0)
                    }
                    None => {
                        // The node is lost: this endpoint is gone for good.
                        sh.ranks.lock().unwrap().remove(&me);
                        drop(r);
                        let (state, done, snap) = sh.ckpts.lock().unwrap()[&me].clone();
                        let rejoin = Rank::rejoin_open(config(me, None), 0).unwrap();
                        card_tx.send((rejoin.address(), rejoin.ring())).unwrap();
                        let rx = peers_rx.lock().unwrap().take().unwrap();
                        let peers = rx.recv().unwrap();
                        let r = rejoin.join(&peers, &snap).unwrap();
                        let state = run_loop(&r, me, state, done, &sh, false).unwrap();
                        r.finalize().unwrap();
                        (state, r.log_stats().unwrap(), CRASH_AFTER - done)
                    }
                }
            })
        })
        .collect();
    if crash {
        // krund's part: tell every survivor where the lost rank is now.
        let (address, ring) = card_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let survivors = sh.ranks.lock().unwrap().clone();
        let mut peers = vec![(Vec::new(), Vec::new()); N];
        for (&r, rank) in &survivors {
            rank.replace_peer(LOST, &address, &ring).unwrap();
            peers[r] = rank.rejoin_card().unwrap();
        }
        peers[LOST] = (address, ring);
        peers_tx.send(peers).unwrap();
    }
    // Every rank's outcome first, so that a failure names every rank that failed.
    let joined: Vec<_> = threads.into_iter().map(|t| t.join()).collect();
    let failed: Vec<usize> = (0..N).filter(|&r| joined[r].is_err()).collect();
    assert!(failed.is_empty(), "ranks {failed:?} failed");
    let out: Vec<(u64, krun::LogStats, u64)> = joined.into_iter().map(Result::unwrap).collect();
    server.join().unwrap();
    Outcome {
        states: out.iter().map(|o| o.0).collect(),
        stats: out.iter().map(|o| o.1).collect(),
        replayed_steps: out.iter().map(|o| o.2).sum(),
    }
}

#[test]
fn a_lost_rank_replays_any_source_receives_in_the_recorded_order_and_survivors_go_on() {
    let o = job(true, true);
    // Rank 1 checkpoints every 3 steps: its newest checkpoint before step 17 is 15.
    assert_eq!(o.replayed_steps, 2);
    let lost = o.stats[LOST];
    // The 2 steps' 4 deliveries were taken again in the recorded order (each checked
    // against the original run's state inside the loop).
    assert!(lost.replayed_deliveries >= 4, "{lost:?}");
    // Its sends of those steps were already with the survivors: suppressed.
    assert!(lost.suppressed_sends >= 4, "{lost:?}");
    let resent: u64 = o.stats.iter().map(|s| s.resent_messages).sum();
    assert!(resent >= 4, "{:?}", o.stats);
    // Checkpoints made the senders drop what their receivers had covered.
    for (r, s) in o.stats.iter().enumerate() {
        assert!(s.collected_messages > 0, "rank {r}: {s:?}");
        assert!(s.held_messages < s.logged_messages, "rank {r}: {s:?}");
    }
}

#[test]
fn with_a_failure_the_result_equals_a_run_without_one() {
    let reference = job(false, false);
    let recovered = job(false, true);
    assert_eq!(recovered.replayed_steps, 2);
    assert_eq!(recovered.states, reference.states);
}

#[test]
fn without_a_failure_logging_changes_nothing_and_collects_the_log() {
    let o = job(true, false);
    assert_eq!(o.replayed_steps, 0);
    for (r, s) in o.stats.iter().enumerate() {
        assert_eq!(s.replayed_deliveries, 0, "rank {r}");
        assert!(s.determinants >= 2 * STEPS, "rank {r}: {s:?}");
        assert!(s.collected_messages > 0, "rank {r}: {s:?}");
    }
}

/// The rank library's side of a swap to the uncoordinated policy: logging starts mid-run,
/// after messages went unlogged, at a cut where every rank keeps a checkpoint; rank 1 is
/// lost after the cut, before its next own checkpoint: it restarts from the cut, replays
/// in the recorded order (checked step by step against its first run), and the job ends
/// as a run without a failure does.
#[test]
fn logging_started_at_a_cut_mid_run_restarts_a_rank_lost_before_its_next_checkpoint_from_the_cut() {
    let recovered = job_with(true, true, 16);
    assert_eq!(recovered.replayed_steps, CRASH_AFTER - 16);
    let lost = recovered.stats[LOST];
    assert!(lost.replayed_deliveries >= 2, "{lost:?}");
    let reference = job_with(false, false, 16);
    let named = job_with(false, true, 16);
    assert_eq!(named.replayed_steps, CRASH_AFTER - 16);
    assert_eq!(named.states, reference.states);
    // Logging from the start or from the cut computes the same.
    assert_eq!(reference.states, job(false, false).states);
}

/// Piggybacked determinants: `LOST`'s writes to its buddy never land after its checkpoint
/// (step 15); its sends to the other nodes carried them instead, without waiting. Lost after
/// step 18's sends, it restarts from step 15, takes the determinants of steps 16 and 17
/// from the survivors (its buddy's ring has none of them), replays them in the recorded
/// order (with any-source receives: checked step by step against its first run), and the
/// job ends as a run without a failure does.
#[test]
fn a_rank_lost_before_its_buddy_writes_landed_replays_from_the_determinants_its_receivers_hold() {
    let o = job_full(true, true, 0, true);
    assert_eq!(o.replayed_steps, 2);
    let lost = o.stats[LOST];
    assert!(lost.replayed_deliveries >= 4, "{lost:?}");
    assert!(lost.determinants_from_peers >= 4, "{lost:?}");
    let named = job_full(false, true, 0, true);
    assert!(
        named.stats[LOST].determinants_from_peers >= 4,
        "{:?}",
        named.stats
    );
    assert_eq!(named.states, job(false, false).states);
}
