//! The uncoordinated policy: scripted scenarios (no barrier, the domino effect and its
//! depth, logging restarts only the lost rank) and a seeded simulation of a message-passing
//! job under sender-based pessimistic logging.
//!
//! The simulated application: every step each rank sends one message to every other rank,
//! then receives as many from *any* source, folding each payload into its state in the
//! order it takes them. Delivery delays are random, so that order is nondeterministic: only
//! the determinants make a replay equal to the original run. The simulation checks, for
//! each seed: every delivery of a restarted rank that repeats one of the original run
//! leaves the rank in exactly the state it had then (the restarted rank's state equals the
//! uninterrupted run's); survivors are never rolled back or restarted; no message is
//! delivered twice or skipped; the job completes. `KRUN_SIM_SCHEDULES=N` sets how many
//! seeds run.
use std::collections::{BTreeMap, BTreeSet};

use policies::primitives::{
    AgreedView, DecisionKind, Event, ImageCopy, Layout, Level, LoggedEvent, Millis, NodeId, OpId,
    Rank, Reads, Version,
};
use policies::uncoordinated::{Config, IntervalChoice, Uncoordinated};
use policies::{Action, Policy};

#[derive(Default)]
struct Index(BTreeMap<(Rank, Version), Vec<ImageCopy>>);

impl Reads for Index {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        self.0.get(&(rank, version)).cloned().unwrap_or_default()
    }
}

fn l2() -> ImageCopy {
    ImageCopy {
        level: Level::L2,
        node: None,
        bytes: 100,
    }
}

/// A job whose ranks all finished their `krun_init` (each reported `RankReady`).
fn policy(n: u32, spares: u32, logging: bool, interval: Option<Millis>) -> Uncoordinated {
    let mut p = starting_policy(n, spares, logging, interval);
    let mut out = Vec::new();
    for r in 0..n {
        out.extend(p.on_event(0, Event::RankReady { rank: r }, &Index::default()));
    }
    assert!(p.wired());
    // The last rank's readiness finishes the wiring, which the user is told (once).
    let said: Vec<String> = out
        .iter()
        .map(|a| match a {
            Action::Notify(n) => n.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        said,
        vec![format!(
            "the job's wiring finished: all {n} ranks are past their krun_init"
        )]
    );
    p
}

/// A job that just started: no rank reported `RankReady` yet.
fn starting_policy(n: u32, spares: u32, logging: bool, interval: Option<Millis>) -> Uncoordinated {
    let cfg = Config {
        interval: interval.map_or(IntervalChoice::Never, |ms| IntervalChoice::Fixed { ms }),
        logging,
        ..Config::default()
    };
    let layout = Layout {
        ranks: (0..n).collect(),
        spares: (n..n + spares).collect(),
    };
    Uncoordinated::new(
        cfg,
        0,
        &layout,
        AgreedView::new(1, (0..n + spares).collect()),
        0,
    )
    .unwrap()
}

/// A scripted job: the test decides when each rank's capture completes (a request orders
/// every idle rank; the orders not used yet stay pending until that rank's turn).
struct Script {
    p: Uncoordinated,
    idx: Index,
    now: Millis,
    pending: BTreeMap<Rank, (OpId, Version)>,
    actions: Vec<Action>,
}

impl Script {
    fn new(n: u32, logging: bool) -> Script {
        Script {
            p: policy(n, 1, logging, None),
            idx: Index::default(),
            now: 0,
            pending: BTreeMap::new(),
            actions: Vec::new(),
        }
    }

    fn feed(&mut self, ev: Event) -> Vec<Action> {
        self.now += 1;
        let a = self.p.on_event(self.now, ev, &self.idx);
        self.actions.extend(a.clone());
        a
    }

    /// Rank `rank` takes its own next checkpoint, made safe at L2.
    fn ckpt(&mut self, rank: Rank) -> Version {
        let (op, v) = self.order(rank);
        self.feed(Event::CaptureDone {
            op,
            rank,
            version: v,
            bytes: 100,
            seconds: 0.01,
        });
        self.idx.0.insert((rank, v), vec![l2()]);
        self.feed(Event::LevelSafe {
            rank,
            version: v,
            level: Level::L2,
        });
        v
    }

    /// The pending capture order of `rank` (asking for one if it has none).
    fn order(&mut self, rank: Rank) -> (OpId, Version) {
        if !self.pending.contains_key(&rank) {
            let acts = self.feed(Event::CheckpointRequest {
                source: policies::primitives::RequestSource::Command,
            });
            for a in acts {
                if let Action::CaptureRank {
                    op,
                    rank: r,
                    version,
                    ..
                } = a
                {
                    self.pending.insert(r, (op, version));
                }
            }
        }
        self.pending
            .remove(&rank)
            .expect("the request ordered this rank's capture")
    }

    fn msg(&mut self, from: Rank, fi: Version, to: Rank, ti: Version, seq: u64, order: u64) {
        self.feed(Event::Logged {
            events: vec![
                LoggedEvent::Message {
                    from,
                    to,
                    seq,
                    bytes: 8,
                },
                LoggedEvent::Delivered {
                    from,
                    to,
                    seq,
                    order,
                    from_interval: fi,
                    to_interval: ti,
                    bytes: 8,
                },
            ],
        });
    }

    fn fail(&mut self, node: NodeId, nodes: u32) -> Vec<Action> {
        let view = AgreedView::new(2, (0..nodes).filter(|n| *n != node).collect());
        self.feed(Event::FailureAgreed {
            epoch: 2,
            failed: vec![node],
            view,
        })
    }
}

#[test]
fn ranks_checkpoint_alone_on_their_own_schedules() {
    let mut cfg = Config {
        interval: IntervalChoice::Fixed { ms: 100 },
        ..Config::default()
    };
    cfg.rank_intervals.insert(2, 40);
    let layout = Layout {
        ranks: vec![0, 1, 2],
        spares: vec![],
    };
    let mut p = Uncoordinated::new(cfg, 0, &layout, AgreedView::new(1, vec![0, 1, 2]), 0).unwrap();
    let idx = Index::default();
    for rank in 0..3 {
        p.on_event(0, Event::RankReady { rank }, &idx);
    }
    let mut orders: Vec<(Millis, Rank, Version)> = Vec::new();
    let mut now = 0;
    while now < 400 {
        now = p.next_deadline().unwrap().max(now);
        for a in p.on_event(now, Event::Tick, &idx) {
            assert!(
                !matches!(a, Action::Synchronize { .. }),
                "no barrier: {a:?}"
            );
            if let Action::CaptureRank {
                op, rank, version, ..
            } = a
            {
                orders.push((now, rank, version));
                p.on_event(
                    now,
                    Event::CaptureDone {
                        op,
                        rank,
                        version,
                        bytes: 1,
                        seconds: 0.0,
                    },
                    &idx,
                );
                p.on_event(
                    now + 1,
                    Event::LevelSafe {
                        rank,
                        version,
                        level: Level::L2,
                    },
                    &idx,
                );
            }
        }
    }
    // Staggered: the first checkpoints of ranks 0 and 1 are not at the same time.
    let first = |r: Rank| orders.iter().find(|o| o.1 == r).unwrap().0;
    assert_ne!(first(0), first(1));
    // Each rank numbers its own checkpoints; rank 2 checkpoints more often.
    let count = |r: Rank| orders.iter().filter(|o| o.1 == r).count();
    assert!(count(2) > 2 * count(0), "{orders:?}");
    let v2: Vec<Version> = orders.iter().filter(|o| o.1 == 2).map(|o| o.2).collect();
    assert_eq!(v2, (1..=v2.len() as Version).collect::<Vec<_>>());
    assert_eq!(p.rank_lines().iter().filter(|l| l.is_some()).count(), 3);
}

/// The classic domino pattern: rank 0 checkpoints then sends to rank 1, which checkpoints
/// then answers; every checkpoint of one is invalidated by the other's.
#[test]
fn a_domino_workload_rolls_back_to_the_start_and_the_policy_reports_the_depth() {
    let rounds = 5;
    let mut s = Script::new(2, false);
    let (mut seq01, mut seq10, mut o0, mut o1) = (0, 0, 0, 0);
    for k in 1..=rounds {
        s.ckpt(0);
        // 0 sends in its interval k; 1 delivers in its interval k-1.
        s.msg(0, k, 1, k - 1, seq01, o1);
        seq01 += 1;
        o1 += 1;
        s.ckpt(1);
        s.msg(1, k, 0, k, seq10, o0);
        seq10 += 1;
        o0 += 1;
    }
    assert_eq!(s.p.dependencies(), 2 * rounds as usize);
    let acts = s.fail(0, 3);
    let line = s.p.last_line().expect("a line was computed").clone();
    use policies::uncoordinated::Restore;
    assert_eq!(line.ranks, vec![Restore::At(1), Restore::At(0)]);
    assert_eq!(line.depth(), rounds as u32);
    assert_eq!(s.p.max_depth(), rounds as u32);
    let text: Vec<String> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    assert!(
        text.iter()
            .any(|t| t.contains("rollback depth 5 (domino effect)")
                && t.contains("rank 1 rolls back to the start (past 5 of its checkpoints)")),
        "{text:?}"
    );
    // Rank 0 restarts on the spare; rank 1 restarts in place from the start (no rollback
    // to a checkpoint exists for it).
    let restarts: Vec<(Rank, NodeId, Option<Version>)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Restart(d) => match d.kind {
                DecisionKind::Restart {
                    rank,
                    node,
                    version,
                    ..
                } => Some((rank, node, version)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(restarts, vec![(0, 2, Some(1)), (1, 1, None)]);
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Record(d) if matches!(&d.kind, DecisionKind::RecoveryLine { depth: 5, .. })
    )));
}

/// The same kind of traffic with each rank checkpointing right after it sends: no send is
/// ever after a rank's newest checkpoint when its delivery is kept, so only the lost rank
/// goes back, and by nothing.
#[test]
fn a_benign_workload_rolls_back_only_the_lost_rank() {
    let mut s = Script::new(3, false);
    let (mut seq, mut order) = (BTreeMap::new(), BTreeMap::new());
    let mut iv = [0u64; 3];
    for _ in 0..4 {
        for (f, t) in [(0, 1), (1, 2), (2, 0)] {
            let q = seq.entry((f, t)).or_insert(0);
            let o = order.entry(t).or_insert(0);
            s.msg(f, iv[f as usize], t, iv[t as usize], *q, *o);
            *q += 1;
            *o += 1;
            iv[f as usize] = s.ckpt(f);
        }
    }
    let acts = s.fail(1, 4);
    let line = s.p.last_line().unwrap().clone();
    use policies::uncoordinated::Restore;
    assert_eq!(
        line.ranks,
        vec![Restore::Keep, Restore::At(iv[1]), Restore::Keep]
    );
    assert_eq!(line.depth(), 0);
    assert!(!acts.iter().any(|a| matches!(a, Action::Rollback { .. })));
}

#[test]
fn with_logging_only_the_lost_rank_restarts_and_replays_and_survivors_keep_running() {
    let mut s = Script::new(3, true);
    // The domino traffic again: with logging it does not matter.
    for k in 1..=3u64 {
        s.ckpt(0);
        s.msg(0, k, 1, k - 1, k - 1, 2 * (k - 1));
        s.ckpt(1);
        s.msg(1, k, 0, k, k - 1, k - 1);
        s.msg(2, 0, 1, k, k - 1, 2 * (k - 1) + 1);
    }
    let stats = s.p.log_stats().clone();
    assert_eq!(stats.logged_messages, 9);
    // Rank 1's checkpoints 2 and 3 made the deliveries before them collectable.
    assert!(stats.collected_messages >= 3, "{stats:?}");
    let acts = s.fail(1, 4);
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Rollback { .. })),
        "{acts:?}"
    );
    let restarts: Vec<_> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Restart(d) => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(restarts.len(), 1);
    let DecisionKind::Restart {
        rank,
        node,
        version,
        incarnation,
        ..
    } = restarts[0].kind
    else {
        panic!()
    };
    assert_eq!((rank, node, version, incarnation), (1, 3, Some(3), 1));
    let done = s.feed(Event::RestartDone {
        decision: restarts[0].id,
        rank: 1,
        node: 3,
        seconds: 0.1,
    });
    assert!(done.iter().any(|a| matches!(
        a,
        Action::Replay {
            rank: 1,
            version: Some(3),
            ..
        }
    )));
    // Only rank 1 was waiting.
    assert!(done.contains(&Action::Release { ranks: vec![1] }));
    let lines: Vec<String> = done
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    // The one delivery of rank 1 after its checkpoint 3 (from rank 2) is replayed.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("rank 1 replays 1 logged message(s)")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("rank 1 restarted")),
        "{lines:?}"
    );
    assert_eq!(s.p.summary().rollbacks, 0);
    assert_eq!(s.p.summary().restarts, 1);
}

/// Random communication histories (seeded): the recovery line leaves no orphan, restores
/// every lost rank, and is maximal (no rank alone could stay later without an orphan).
#[test]
fn the_recovery_line_is_consistent_and_maximal_on_random_histories() {
    use policies::uncoordinated::{DependencyGraph, Restore};
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    let mut deepest = 0;
    for seed in 0..500u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = rng.gen_range(2..=5usize);
        let mut iv = vec![0u64; n];
        let mut taken: Vec<Vec<Version>> = vec![Vec::new(); n];
        let mut msgs = Vec::new();
        let mut g = DependencyGraph::default();
        for _ in 0..rng.gen_range(5..60) {
            let a = rng.gen_range(0..n);
            if rng.gen_bool(0.3) {
                iv[a] += 1;
                taken[a].push(iv[a]);
            } else {
                let b = (a + rng.gen_range(1..n)) % n;
                msgs.push((a as Rank, iv[a], b as Rank, iv[b]));
                g.add(a as Rank, iv[a], b as Rank, iv[b]);
            }
        }
        let lost: BTreeSet<Rank> = [rng.gen_range(0..n) as Rank].into();
        let unusable: BTreeSet<(Rank, Version)> = (0..n)
            .flat_map(|r| taken[r].iter().map(move |&v| (r as Rank, v)))
            .filter(|_| rng.gen_bool(0.1))
            .collect();
        let usable = |r: Rank, v: Version| !unusable.contains(&(r, v));
        let line = g.recovery_line(&taken, &lost, usable);
        let consistent = |l: &[Restore]| {
            let undone = |r: Rank, i: Version| matches!(l[r as usize], Restore::At(v) if i >= v);
            msgs.iter()
                .all(|&(a, ai, b, bi)| !undone(a, ai) || undone(b, bi))
        };
        assert!(consistent(&line.ranks), "seed {seed}: an orphan is left");
        for &r in &lost {
            assert!(
                matches!(line.ranks[r as usize], Restore::At(_)),
                "seed {seed}"
            );
        }
        for r in 0..n {
            let Restore::At(v) = line.ranks[r] else {
                continue;
            };
            assert!(
                v == 0 || usable(r as Rank, v),
                "seed {seed}: unusable checkpoint"
            );
            let mut later: Vec<Restore> = taken[r]
                .iter()
                .filter(|&&t| t > v && usable(r as Rank, t))
                .map(|&t| Restore::At(t))
                .collect();
            if !lost.contains(&(r as Rank)) {
                later.push(Restore::Keep);
            }
            for l in later {
                let mut raised = line.ranks.clone();
                raised[r] = l;
                assert!(
                    !consistent(&raised),
                    "seed {seed}: rank {r} could stay at {l:?}, the line is not maximal"
                );
            }
        }
        deepest = deepest.max(line.depth());
    }
    assert!(deepest >= 2, "the histories never cascaded: {deepest}");
}

/// Without logging, with the channel counts a runtime reports at each checkpoint: the line
/// is the newest set of checkpoints on which every channel agrees (nothing in transit), it
/// names every rank, the running ones roll back in place and the lost one restarts.
#[test]
fn without_logging_the_channel_counts_give_a_transitless_line_over_every_rank() {
    let mut s = Script::new(3, false);
    // A chain 0 - 1 - 2 exchanging one message each way per step; rank r checkpoints after
    // the steps listed (step 2 is the only one they share).
    let steps: [&[u64]; 3] = [&[2, 5], &[2, 4], &[2, 6]];
    let mut versions = vec![Vec::new(); 3];
    for r in 0..3u32 {
        for &step in steps[r as usize] {
            let v = s.ckpt(r);
            versions[r as usize].push(v);
            let per = |peer: u32| -> u64 {
                if peer != r && (peer as i64 - r as i64).abs() == 1 {
                    step
                } else {
                    0
                }
            };
            let counts: Vec<u64> = (0..3).map(per).collect();
            s.feed(Event::Logged {
                events: vec![LoggedEvent::Channels {
                    rank: r,
                    version: v,
                    sent: counts.clone(),
                    delivered: counts,
                }],
            });
        }
    }
    let acts = s.fail(2, 4);
    use policies::uncoordinated::Restore;
    let line = s.p.last_line().unwrap().clone();
    assert_eq!(
        line.ranks,
        (0..3)
            .map(|r| Restore::At(versions[r][0]))
            .collect::<Vec<_>>()
    );
    assert_eq!(line.rolled_past, vec![1, 1, 1]);
    let rollbacks: Vec<(Rank, Version)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Rollback { rank, version, .. } => Some((*rank, *version)),
            _ => None,
        })
        .collect();
    assert_eq!(rollbacks, vec![(0, versions[0][0]), (1, versions[1][0])]);
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Restart(d) if matches!(d.kind, DecisionKind::Restart { rank: 2, node: 3, version: Some(v), .. } if v == versions[2][0])
    )));
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::Record(d) if matches!(&d.kind, DecisionKind::RecoveryLine { depth: 1, .. })
    )));
}

/// The store may report a capture safe before the node reports it captured (the node writes
/// the process table first): the checkpoint still counts, and the rank checkpoints again.
#[test]
fn a_capture_reported_safe_before_captured_still_counts() {
    let mut s = Script::new(2, false);
    let (op, v) = s.order(0);
    s.idx.0.insert((0, v), vec![l2()]);
    let early = s.feed(Event::LevelSafe {
        rank: 0,
        version: v,
        level: Level::L2,
    });
    assert!(early.is_empty(), "{early:?}");
    let acts = s.feed(Event::CaptureDone {
        op,
        rank: 0,
        version: v,
        bytes: 100,
        seconds: 0.01,
    });
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Record(d) if matches!(d.kind, DecisionKind::RankCheckpointed { rank: 0, version, .. } if version == v)
        )),
        "{acts:?}"
    );
    assert_eq!(s.p.rank_lines()[0], Some(v));
    // Not stuck in flight: the next request orders rank 0 again.
    let (_, next) = s.order(0);
    assert!(next > v);
}

/// Without logging, the policy tells the runtime which checkpoints no future line can need
/// (`KeepFrom`): while the ranks' checkpoints never agree (staggered, the domino effect)
/// nothing may go, not even the oldest; once a set of them agrees on every channel, each
/// rank's older checkpoints may go, and the floor only rises.
#[test]
fn without_logging_the_policy_keeps_every_checkpoint_a_future_line_may_need() {
    let mut s = Script::new(2, false);
    let mut keep_from: Vec<(Rank, Version)> = Vec::new();
    let mut versions: Vec<Vec<Version>> = vec![Vec::new(); 2];
    // Ranks 0 and 1 exchange one message each way per step; `(rank, step)` checkpoints.
    let take = |s: &mut Script,
                versions: &mut Vec<Vec<Version>>,
                r: Rank,
                step: u64,
                keep_from: &mut Vec<(Rank, Version)>| {
        let v = s.ckpt(r);
        versions[r as usize].push(v);
        let counts: Vec<u64> = (0..2).map(|p| if p == r { 0 } else { step }).collect();
        let acts = s.feed(Event::Logged {
            events: vec![LoggedEvent::Channels {
                rank: r,
                version: v,
                sent: counts.clone(),
                delivered: counts,
            }],
        });
        keep_from.extend(acts.iter().filter_map(|a| match a {
            Action::KeepFrom { rank, version } => Some((*rank, *version)),
            _ => None,
        }));
        v
    };
    // Staggered: rank 0 at steps 1, 3, 5; rank 1 at steps 2, 4: no two agree.
    for (r, step) in [(0, 1), (1, 2), (0, 3), (1, 4), (0, 5)] {
        take(&mut s, &mut versions, r, step, &mut keep_from);
    }
    assert!(
        keep_from.is_empty(),
        "no set of checkpoints agrees, so the line is the start and every checkpoint stays: {keep_from:?}"
    );
    // Rank 1 checkpoints at step 5 too: rank 0's step-5 and rank 1's step-5 checkpoints agree.
    let v1 = take(&mut s, &mut versions, 1, 5, &mut keep_from);
    let v0 = versions[0][2];
    assert_eq!(keep_from, vec![(0, v0), (1, v1)]);
    // A later, staggered checkpoint moves nothing (the line stays at step 5)...
    keep_from.clear();
    take(&mut s, &mut versions, 0, 6, &mut keep_from);
    assert!(keep_from.is_empty(), "{keep_from:?}");
    // ...and the next agreeing pair raises both floors.
    let w1 = take(&mut s, &mut versions, 1, 6, &mut keep_from);
    assert_eq!(keep_from, vec![(0, versions[0][3]), (1, w1)]);
}

/// `krun policy load` from the coordinated policy: the uncoordinated policy takes over at
/// the committed checkpoint 4 (the swap's cut), which is every rank's first safe
/// checkpoint: a rank lost before its next own one restarts alone from 4, the others keep
/// running; its own checkpoints are numbered above every version recorded.
#[test]
fn taking_over_at_a_commit_makes_it_every_ranks_first_checkpoint_and_numbers_on_above_it() {
    use policies::primitives::{Decision, DecisionId, RankSlot, Snapshot};
    let id = |seq| DecisionId {
        epoch: 1,
        leader: 0,
        seq,
    };
    let snapshot = Snapshot {
        view: AgreedView::new(1, vec![0, 1, 2, 3]),
        ranks: (0..3)
            .map(|n| RankSlot {
                node: n,
                incarnation: 0,
            })
            .collect(),
        spares: vec![3],
        decisions: vec![
            Decision {
                id: id(1),
                kind: DecisionKind::CheckpointStarted { version: 4 },
            },
            Decision {
                id: id(2),
                kind: DecisionKind::Committed {
                    version: 4,
                    level: Level::L2,
                },
            },
            Decision {
                id: id(3),
                kind: DecisionKind::Aborted {
                    version: 5,
                    reason: "test".into(),
                },
            },
        ],
        exits: Vec::new(),
    };
    let cfg = Config {
        interval: IntervalChoice::Never,
        logging: true,
        ..Config::default()
    };
    let p = Uncoordinated::resume(cfg.clone(), 0, &snapshot, 100).unwrap();
    assert_eq!(p.rank_lines(), vec![Some(4); 3]);
    assert_eq!(p.recovery_line(), Some(4));
    let mut s = Script {
        p,
        idx: Index::default(),
        now: 100,
        pending: BTreeMap::new(),
        actions: Vec::new(),
    };
    for r in 0..3 {
        s.idx.0.insert((r, 4), vec![l2()]);
    }
    // Rank 0 checkpoints on its own, above every version recorded (5 was aborted).
    assert_eq!(s.ckpt(0), 6);
    // Node 1 dies before rank 1's first own checkpoint: it restarts alone from 4.
    let acts = s.fail(1, 4);
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Rollback { .. })),
        "{acts:?}"
    );
    let restarts: Vec<(Rank, NodeId, Option<Version>)> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Restart(d) => match d.kind {
                DecisionKind::Restart {
                    rank,
                    node,
                    version,
                    ..
                } => Some((rank, node, version)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(restarts, vec![(1, 3, Some(4))]);
    // Without a commit there is no line to take over at.
    let bare = Snapshot {
        decisions: Vec::new(),
        ..snapshot
    };
    let e = Uncoordinated::resume(cfg, 0, &bare, 100)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("none was committed"), "{e}");
}

/// A drain with logging: the node's rank takes a fresh own checkpoint, then restarts alone
/// on the spare from it; nobody else stops; the drain ends with `Drained` once it runs.
/// Without logging the drain is refused.
#[test]
fn with_logging_a_drained_nodes_rank_checkpoints_then_moves_alone_to_the_spare() {
    let mut s = Script::new(3, true);
    for r in 0..3 {
        assert_eq!(s.ckpt(r), 1);
    }
    let view = AgreedView::new(1, vec![0, 1, 2, 3]);
    let acts = s.feed(Event::DrainRequested {
        node: 1,
        view: view.clone(),
    });
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Record(d) if d.kind == DecisionKind::DrainStarted { node: 1 }
        )),
        "{acts:?}"
    );
    let (op, version) = acts
        .iter()
        .find_map(|a| match a {
            Action::CaptureRank {
                op,
                rank: 1,
                version,
                ..
            } => Some((*op, *version)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no capture of rank 1: {acts:?}"));
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::CaptureRank { rank, .. } if *rank != 1)),
        "{acts:?}"
    );
    s.feed(Event::CaptureDone {
        op,
        rank: 1,
        version,
        bytes: 100,
        seconds: 0.01,
    });
    s.idx.0.insert((1, version), vec![l2()]);
    let acts = s.feed(Event::LevelSafe {
        rank: 1,
        version,
        level: Level::L2,
    });
    let restarts: Vec<(
        Rank,
        NodeId,
        Option<Version>,
        policies::primitives::DecisionId,
    )> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Restart(d) => match d.kind {
                DecisionKind::Restart {
                    rank,
                    node,
                    version,
                    ..
                } => Some((rank, node, version, d.id)),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(restarts.len(), 1, "{acts:?}");
    assert_eq!(
        (restarts[0].0, restarts[0].1, restarts[0].2),
        (1, 3, Some(version))
    );
    assert!(
        !acts.iter().any(|a| matches!(a, Action::Rollback { .. })),
        "{acts:?}"
    );
    let done = s.feed(Event::RestartDone {
        decision: restarts[0].3,
        rank: 1,
        node: 3,
        seconds: 0.1,
    });
    let drained: Vec<String> = done
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.to_string()),
            _ => None,
        })
        .filter(|t| t.contains("drained"))
        .collect();
    assert_eq!(drained.len(), 1, "{done:?}");
    assert!(
        drained[0].contains(&format!(
            "node 1 drained: rank 1 moved to spare node 3 from checkpoint {version}"
        )),
        "{}",
        drained[0]
    );
    assert!(done.iter().any(|a| matches!(
        a,
        Action::Record(d) if matches!(d.kind, DecisionKind::Drained { node: 1, .. })
    )));
    // Without logging: refused, nothing moves.
    let mut s = Script::new(3, false);
    let acts = s.feed(Event::DrainRequested { node: 1, view });
    let text: Vec<String> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    assert!(
        text.iter()
            .any(|t| t.contains("drain of node 1 refused") && t.contains("message logging")),
        "{text:?}"
    );
    assert!(
        !acts
            .iter()
            .any(|a| matches!(a, Action::CaptureRank { .. } | Action::Restart(_))),
        "{acts:?}"
    );
}

/// The restarts among `acts`: (rank, node, version, decision).
fn restarts_in(
    acts: &[Action],
) -> Vec<(
    Rank,
    NodeId,
    Option<Version>,
    policies::primitives::DecisionId,
)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Restart(d) => match d.kind {
                DecisionKind::Restart {
                    rank,
                    node,
                    version,
                    ..
                } => Some((rank, node, version, d.id)),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A node lost before every rank is past its `krun_init` (ranks 0-1 reported `RankReady`,
/// ranks 2-3 not yet): nothing was logged or checkpointed and the survivors are stuck in the
/// broken exchange, so with or without logging every rank restarts from its start (the lost
/// one on the spare, the others in place), in one re-wiring (`rewire` on the line), with no
/// replay; every rank is released together once all run. Once every new process reported
/// ready, the wiring is finished: the next failure with logging restarts only the lost
/// rank, alone, and the survivors keep running.
#[test]
fn a_failure_before_the_jobs_wiring_finished_restarts_every_rank_from_its_start_in_a_new_wiring() {
    for logging in [true, false] {
        let mut p = starting_policy(4, 2, logging, Some(60_000));
        let idx = Index::default();
        for r in [0, 1] {
            p.on_event(10, Event::RankReady { rank: r }, &idx);
        }
        assert!(!p.wired());
        let acts = p.on_event(
            20,
            Event::FailureAgreed {
                epoch: 2,
                failed: vec![3],
                view: AgreedView::new(2, vec![0, 1, 2, 4, 5]),
            },
            &idx,
        );
        let line = acts
            .iter()
            .find_map(|a| match a {
                Action::Record(d) => match &d.kind {
                    DecisionKind::RecoveryLine { line, rewire, .. } => {
                        Some((line.clone(), *rewire))
                    }
                    _ => None,
                },
                _ => None,
            })
            .unwrap_or_else(|| panic!("no recovery line: {acts:?}"));
        assert_eq!(
            line,
            (vec![(0, None), (1, None), (2, None), (3, None)], true),
            "logging {logging}"
        );
        let restarts = restarts_in(&acts);
        let placed: Vec<(Rank, NodeId, Option<Version>)> =
            restarts.iter().map(|r| (r.0, r.1, r.2)).collect();
        assert_eq!(
            placed,
            vec![(0, 0, None), (1, 1, None), (2, 2, None), (3, 4, None)],
            "logging {logging}: {acts:?}"
        );
        assert!(
            !acts.iter().any(|a| matches!(a, Action::Rollback { .. })),
            "{acts:?}"
        );
        let said = acts
            .iter()
            .find_map(|a| match a {
                Action::Notify(n) if n.to_string().contains("failed at epoch 2") => {
                    Some(n.to_string())
                }
                _ => None,
            })
            .unwrap();
        assert!(
            said.contains("before the job's wiring finished") && !said.contains("keep running"),
            "{said}"
        );
        let mut done = Vec::new();
        for &(rank, node, _, decision) in &restarts {
            done.extend(p.on_event(
                30,
                Event::RestartDone {
                    decision,
                    rank,
                    node,
                    seconds: 0.1,
                },
                &idx,
            ));
        }
        assert!(
            !done.iter().any(|a| matches!(a, Action::Replay { .. })),
            "logging {logging}: a re-executed rank replays nothing: {done:?}"
        );
        let released: Vec<&Action> = done
            .iter()
            .filter(|a| matches!(a, Action::Release { .. }))
            .collect();
        assert_eq!(
            released,
            vec![&Action::Release {
                ranks: vec![0, 1, 2, 3]
            }],
            "logging {logging}"
        );
        assert!(done.iter().any(
            |a| matches!(a, Action::Record(d) if matches!(d.kind, DecisionKind::Recovered { .. }))
        ));
        // The new processes swap their addresses: the wiring is not finished before every
        // one of them reported ready again.
        assert!(!p.wired());
        let mut out = Vec::new();
        for r in 0..4 {
            out.extend(p.on_event(40, Event::RankReady { rank: r }, &idx));
        }
        assert!(p.wired());
        assert!(
            out.iter().any(
                |a| matches!(a, Action::Notify(n) if n.to_string().contains("wiring finished"))
            ),
            "{out:?}"
        );
        if !logging {
            continue;
        }
        // Wired: node 1 lost now costs rank 1 alone, restarted on the last spare.
        let acts = p.on_event(
            50,
            Event::FailureAgreed {
                epoch: 3,
                failed: vec![1],
                view: AgreedView::new(3, vec![0, 2, 4, 5]),
            },
            &idx,
        );
        let placed: Vec<(Rank, NodeId, Option<Version>)> =
            restarts_in(&acts).iter().map(|r| (r.0, r.1, r.2)).collect();
        assert_eq!(placed, vec![(1, 5, None)], "{acts:?}");
        assert!(
            acts.iter().any(|a| matches!(
                a,
                Action::Record(d) if matches!(d.kind, DecisionKind::RecoveryLine { rewire: false, .. })
            )),
            "{acts:?}"
        );
    }
}
