//! Ranks moved without a failure: the uncoordinated policy taking over a running job at a
//! committed coordinated checkpoint, and a node drained with logging.

use super::*;

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
