//! Seeded simulation of a message-passing job under the uncoordinated policy with
//! sender-based pessimistic message logging.
//!
//! The application: every step each rank sends one message to every other rank, then takes
//! as many from *any* source (per source in sequence order), folding each payload into its
//! state in the order it takes them. Delivery delays are random, so that order is
//! nondeterministic and only the determinants make a replay equal to the original run.
//!
//! The runtime model: payloads stay in the sender's log (part of its checkpointed state)
//! until the receiver's next checkpoint is safe (`TrimLog`); each delivery's determinant
//! (source, sequence number, receive order) is made durable off the receiver's node before
//! the delivery; a restarted rank takes the logged messages again in the recorded order,
//! then goes on live; its repeated sends that a receiver already has are suppressed by
//! sequence number; a restarted rank also resends from its restored log what its receivers
//! do not have. Nodes crash at random times (one or two crashes, sometimes overlapping).
//!
//! Checked for each seed: a restarted rank that repeats a delivery of the original run is
//! then in exactly the state it had after it (its state equals the uninterrupted run's);
//! survivors are never rolled back or restarted; no message is delivered twice or skipped;
//! the job completes; the same seed gives the same run. `KRUN_SIM_SCHEDULES=N` sets how many
//! seeds run (default 200).
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use policies::primitives::{
    AgreedView, DecisionKind, Event, ImageCopy, Layout, Level, LoggedEvent, Millis, NodeId, OpId,
    Rank, Reads, Version,
};
use policies::uncoordinated::{Config, IntervalChoice, Uncoordinated};
use policies::{Action, Policy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

mod run;

const STEPS: u64 = 30;

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a rank's checkpoint holds (its log included: the payloads it sent).
#[derive(Clone, Debug, PartialEq)]
struct RankState {
    state: u64,
    step: u64,
    sent: bool,
    got: u32,
    send_seq: Vec<u64>,
    delivered_from: Vec<u64>,
    order: u64,
    interval: Version,
    /// (dest, seq) -> (payload, sender's interval at the send).
    log: BTreeMap<(Rank, u64), (u64, Version)>,
}

impl RankState {
    fn fresh(rank: Rank, n: usize) -> RankState {
        RankState {
            state: mix(0x5eed, u64::from(rank)),
            step: 0,
            sent: false,
            got: 0,
            send_seq: vec![0; n],
            delivered_from: vec![0; n],
            order: 0,
            interval: 0,
            log: BTreeMap::new(),
        }
    }
}

struct Proc {
    st: RankState,
    inc: u32,
    node: NodeId,
    alive: bool,
    held: bool,
    exited: bool,
    scheduled: bool,
    /// (src, seq) -> (payload, sender interval, arrival stamp).
    inbox: BTreeMap<(Rank, u64), (u64, Version, u64)>,
    replay: VecDeque<(Rank, u64)>,
    /// Past its `krun_init`: it swapped addresses with every rank of its wiring.
    wired: bool,
    /// Waiting in the address exchange (it sent its card).
    joined: bool,
    /// Its exchange broke (a node crashed during it): it waits for a recovery's order.
    broken: bool,
}

#[derive(Clone, Debug)]
enum Ev {
    Run(Rank),
    Arrive {
        src: Rank,
        src_inc: u32,
        dst: Rank,
        dst_inc: u32,
        seq: u64,
        payload: u64,
        interval: Version,
    },
    Policy(Event),
    Capture(Rank, u32, OpId, Version),
    Restart(policies::Decision),
    Crash(NodeId),
    Agree(NodeId),
    /// A rank (of that incarnation) enters the address exchange.
    Join(Rank, u32),
}

#[derive(Default)]
struct Index(BTreeMap<(Rank, Version), Vec<ImageCopy>>);

impl Reads for Index {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        self.0.get(&(rank, version)).cloned().unwrap_or_default()
    }
}

struct Sim {
    rng: SmallRng,
    now: Millis,
    seq: u64,
    queue: BTreeMap<(Millis, u64), Ev>,
    n: usize,
    nodes: u32,
    procs: Vec<Proc>,
    policy: Uncoordinated,
    idx: Index,
    dead: BTreeSet<NodeId>,
    epoch: u64,
    determinants: Vec<BTreeMap<u64, (Rank, u64)>>,
    ckpts: BTreeMap<(Rank, Version), RankState>,
    history: BTreeMap<(Rank, u64), u64>,
    stamp: u64,
    /// Checks.
    repeated: u64,
    dups: u64,
    lost_ranks: BTreeSet<Rank>,
    restarts: Vec<Rank>,
    rollbacks: u64,
    ended: Option<Option<String>>,
    /// The recovery in progress re-wires the job (its line said `rewire`).
    rewiring: bool,
    /// A node crashed while some rank was not past its `krun_init`.
    window_hit: bool,
}

fn schedules() -> u64 {
    std::env::var("KRUN_SIM_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
fn with_logging_restarted_ranks_replay_to_the_same_state_and_survivors_never_roll_back() {
    let (mut repeated, mut restarted, mut collected) = (0, 0, 0);
    for seed in 0..schedules() {
        let mut sim = Sim::new(seed);
        sim.run_all();
        assert_eq!(
            sim.ended,
            Some(None),
            "seed {seed}: the job did not complete"
        );
        for (r, p) in sim.procs.iter().enumerate() {
            assert_eq!(p.st.step, STEPS, "seed {seed}: rank {r} stopped early");
        }
        assert_eq!(sim.rollbacks, 0, "seed {seed}: a survivor was rolled back");
        for r in &sim.restarts {
            assert!(
                sim.lost_ranks.contains(r),
                "seed {seed}: rank {r} restarted but was never lost"
            );
        }
        // Every message delivered exactly once: per source, in sequence (checked at each
        // delivery), and all of them (copies on the wire are dropped by sequence number).
        for (r, p) in sim.procs.iter().enumerate() {
            for (src, &got) in p.st.delivered_from.iter().enumerate() {
                let want = if src == r { 0 } else { STEPS };
                assert_eq!(got, want, "seed {seed}: rank {r} from {src}");
            }
        }
        repeated += sim.repeated;
        restarted += sim.restarts.len();
        collected += sim.policy.log_stats().collected_messages;
    }
    // The checks above bit: restarts happened and replays repeated original deliveries.
    eprintln!("{restarted} restarts, {repeated} deliveries repeated in replay, {collected} messages collected");
    assert!(restarted > 0 && repeated > 0, "{restarted} {repeated}");
    assert!(collected > 0);
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(seed);
        sim.run_all();
        (
            sim.procs.iter().map(|p| p.st.state).collect::<Vec<_>>(),
            sim.restarts.clone(),
            sim.now,
        )
    };
    assert_eq!(run(7), run(7));
}

/// The job's start-up window (seeded): nodes crash early, many while the ranks still swap
/// their first addresses (a crash then breaks the exchange, and the ranks left wait in it
/// for a recovery's order). A crash in that window must restart every rank from its start
/// in a new wiring (the line says `rewire`), lost ranks on a spare, others in place; a
/// crash after every rank reported ready restarts the lost ranks alone, survivors keep
/// running. Either way the job completes and every message is delivered exactly once (a
/// policy that restarted only the lost ranks in the window leaves the survivors waiting
/// for ever: the run never completes).
#[test]
fn a_crash_while_the_ranks_swap_their_first_addresses_restarts_every_rank_in_a_new_wiring() {
    let (mut hit, mut missed) = (0, 0);
    for seed in 0..schedules() {
        let mut sim = Sim::starting(seed);
        sim.run_all();
        assert_eq!(
            sim.ended,
            Some(None),
            "seed {seed}: the job did not complete (window hit: {})",
            sim.window_hit
        );
        for (r, p) in sim.procs.iter().enumerate() {
            assert_eq!(p.st.step, STEPS, "seed {seed}: rank {r} stopped early");
            for (src, &got) in p.st.delivered_from.iter().enumerate() {
                let want = if src == r { 0 } else { STEPS };
                assert_eq!(got, want, "seed {seed}: rank {r} from {src}");
            }
        }
        assert_eq!(sim.rollbacks, 0, "seed {seed}: a rank was rolled back");
        if sim.window_hit {
            hit += 1;
            let all: BTreeSet<Rank> = (0..sim.n as Rank).collect();
            let restarted: BTreeSet<Rank> = sim.restarts.iter().copied().collect();
            assert_eq!(
                restarted, all,
                "seed {seed}: a crash in the start-up window restarts every rank"
            );
        } else {
            missed += 1;
            for r in &sim.restarts {
                assert!(
                    sim.lost_ranks.contains(r),
                    "seed {seed}: rank {r} restarted but was never lost"
                );
            }
        }
    }
    // Both cases ran.
    eprintln!("{hit} runs crashed in the start-up window, {missed} after it");
    assert!(hit > 0 && missed > 0, "{hit} {missed}");
}
