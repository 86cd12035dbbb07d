//! The uncoordinated policy, scripted: ranks checkpoint on their own schedules (no
//! barrier), the domino effect and its depth, a benign workload, logging restarts only the
//! lost rank, a capture reported safe before captured (here); recovery lines (`lines.rs`);
//! a takeover at a coordinated commit and a drain (`moves.rs`); failures before the job's
//! wiring finished (`wiring.rs`). The seeded simulation of a message-passing job under
//! sender-based pessimistic logging is `tests/uncoordinated_sim.rs`.
use std::collections::{BTreeMap, BTreeSet};

use policies::primitives::{
    AgreedView, DecisionKind, Event, ImageCopy, Layout, Level, LoggedEvent, Millis, NodeId, OpId,
    Rank, Reads, Version,
};
use policies::uncoordinated::{Config, IntervalChoice, Uncoordinated};
use policies::{Action, Policy};

mod lines;
mod moves;
mod wiring;

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
