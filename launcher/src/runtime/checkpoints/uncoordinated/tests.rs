//! The hub's side of the uncoordinated policy, message by message.
use super::super::tests::hub;
use super::*;

/// The event of a message this policy handles (panics on one it hands back).
fn handled(r: Result<Option<Event>, Input>) -> Option<Event> {
    match r {
        Ok(e) => e,
        Err(_) => panic!("a message of this policy was handed back"),
    }
}

#[test]
fn a_rank_captures_alone_and_the_versions_map_per_rank() {
    let (mut calls, sent) = hub();
    calls.uncoord = Some(Uncoord::new(&[0, 1, 2], true));
    let mut copies = Copies::default();
    let op = OpId { leader: 0, seq: 4 };
    capture_rank(&mut calls, op, 1, 9).unwrap();
    assert!(matches!(
        sent.lock().unwrap().last(),
        Some(LauncherToNode::CaptureRank {
            rank: 1,
            node: 1,
            version: 1
        })
    ));
    // Another rank's native v1 is not rank 1's.
    let other = Input::FromNode(
        0,
        NodeToLauncher::Captured {
            rank: 0,
            version: 1,
            bytes: 10,
            wiring: 0,
        },
    );
    assert!(handled(translate(&mut calls, &mut copies, other)).is_none());
    let done = Input::FromNode(
        1,
        NodeToLauncher::Captured {
            rank: 1,
            version: 1,
            bytes: 10,
            wiring: 0,
        },
    );
    assert!(matches!(
        translate(&mut calls, &mut copies, done),
        Ok(Some(Event::CaptureDone {
            rank: 1,
            version: 9,
            ..
        }))
    ));
    let safe = Input::FromNode(
        1,
        NodeToLauncher::Safe {
            rank: 1,
            version: 1,
            level: 2,
            node: Some(0),
            wiring: 0,
        },
    );
    assert!(matches!(
        translate(&mut calls, &mut copies, safe),
        Ok(Some(Event::LevelSafe {
            rank: 1,
            version: 9,
            level: Level::L2
        }))
    ));
    trim_log(&mut calls, 1, 9);
    assert!(matches!(
        sent.lock().unwrap().last(),
        Some(LauncherToNode::TrimLog {
            rank: 1,
            version: 1
        })
    ));
    // A view is not this policy's business.
    let view = Input::View {
        epoch: 2,
        members: vec![0, 2],
        failed: vec![1],
    };
    assert!(translate(&mut calls, &mut copies, view).is_err());
}

#[test]
fn a_restart_rejoins_once_every_survivor_replaced_the_address() {
    let (mut calls, sent) = hub();
    calls.uncoord = Some(Uncoord::new(&[0, 1, 2], true));
    let mut copies = Copies::default();
    for r in 0..3u32 {
        let card = Input::FromNode(
            r,
            NodeToLauncher::LogCard {
                rank: r,
                address: vec![r as u8],
                ring: vec![10 + r as u8],
            },
        );
        assert!(handled(translate(&mut calls, &mut copies, card)).is_none());
    }
    capture_rank(&mut calls, OpId { leader: 0, seq: 1 }, 2, 5).unwrap();
    let d = Decision {
        id: policies::primitives::DecisionId {
            epoch: 3,
            leader: 0,
            seq: 8,
        },
        kind: policies::primitives::DecisionKind::Restart {
            rank: 2,
            incarnation: 1,
            node: 1,
            version: Some(5),
            source: None,
            failure_epoch: 3,
        },
    };
    // Checkpoint 5 was ordered but never captured... it maps to native 1 all the same.
    restart(&mut calls, &d).unwrap();
    assert!(matches!(
        sent.lock().unwrap().last(),
        Some(LauncherToNode::Rejoin {
            restart: 1,
            rank: 2,
            node: 1,
            version: 1,
            local_size: 1
        })
    ));
    assert_eq!(calls.placement[2], 1);
    let rejoining = Input::FromNode(
        1,
        NodeToLauncher::Rejoining {
            rank: 2,
            address: vec![42],
            ring: vec![43],
        },
    );
    assert!(handled(translate(&mut calls, &mut copies, rejoining)).is_none());
    let rejoined = |sent: &Arc<std::sync::Mutex<Vec<LauncherToNode>>>| {
        sent.lock()
            .unwrap()
            .iter()
            .filter(|m| matches!(m, LauncherToNode::Rejoined { .. }))
            .count()
    };
    let replaced = |r| Input::FromNode(r, NodeToLauncher::PeerReplaced { rank: r, moved: 2 });
    handled(translate(&mut calls, &mut copies, replaced(0)));
    assert_eq!(rejoined(&sent), 0, "rank 1 has not replaced it yet");
    handled(translate(&mut calls, &mut copies, replaced(1)));
    assert_eq!(rejoined(&sent), 1);
    match sent.lock().unwrap().last() {
        Some(LauncherToNode::Rejoined { rank: 2, cards }) => {
            assert_eq!(cards[2], (vec![42], vec![43]));
            assert_eq!(cards[0], (vec![0], vec![10]));
        }
        other => panic!("{other:?}"),
    }
    let done = Input::FromNode(
        1,
        NodeToLauncher::Restarted {
            wiring: 1,
            rank: 2,
            pid: 99,
            fetched: 0,
            seconds: 0.5,
            in_place: false,
            new_because: None,
        },
    );
    assert!(matches!(
        translate(&mut calls, &mut copies, done),
        Ok(Some(Event::RestartDone {
            rank: 2,
            node: 1,
            ..
        }))
    ));
}

/// A swap to this policy: the cut's capture goes out as `Switch`, the cards the ranks
/// send then wait for the policy, and a rank lost before its first own checkpoint
/// rejoins from the cut (native version of that checkpoint). A swap back collects the
/// ranks' safepoint indices.
#[test]
fn the_cut_of_a_swap_switches_the_ranks_and_is_every_ranks_first_checkpoint() {
    use policies::engine::Runtime as _;
    let (mut calls, sent) = hub();
    let mut copies = Copies::default();
    calls.switch_cut = Some(None);
    calls
        .capture(OpId { leader: 0, seq: 3 }, 0, 5, &[])
        .unwrap();
    assert!(matches!(
        sent.lock().unwrap().last(),
        Some(LauncherToNode::Release {
            order: SafepointOrder::Switch { version: 1 }
        })
    ));
    assert_eq!(calls.switch_cut, Some(Some(5)));
    // The next capture is a plain one.
    calls.switch_cut = None;
    for r in 0..3u32 {
        let card = Input::FromNode(
            r,
            NodeToLauncher::LogCard {
                rank: r,
                address: vec![r as u8],
                ring: vec![20 + r as u8],
            },
        );
        assert!(handled(translate(&mut calls, &mut copies, card)).is_none());
    }
    assert_eq!(calls.early_cards.len(), 3);
    calls.uncoord = Some(Uncoord::at_cut(&[0, 1, 2], 1, 5, &calls.early_cards, 1));
    let d = Decision {
        id: policies::primitives::DecisionId {
            epoch: 2,
            leader: 0,
            seq: 4,
        },
        kind: policies::primitives::DecisionKind::Restart {
            rank: 1,
            incarnation: 1,
            node: 2,
            version: Some(5),
            source: None,
            failure_epoch: 2,
        },
    };
    restart(&mut calls, &d).unwrap();
    assert!(matches!(
        sent.lock().unwrap().last(),
        Some(LauncherToNode::Rejoin {
            rank: 1,
            node: 2,
            version: 1,
            ..
        })
    ));
    // Its next own checkpoint is the checkpointer's v2.
    capture_rank(&mut calls, OpId { leader: 0, seq: 5 }, 0, 6).unwrap();
    assert!(matches!(
        sent.lock().unwrap().last(),
        Some(LauncherToNode::CaptureRank {
            rank: 0,
            version: 2,
            ..
        })
    ));
    let u = calls.uncoord.as_mut().unwrap();
    assert_eq!((u.newest_native(), u.newest_version()), (2, 6));
    u.realign = Some(BTreeMap::new());
    let index = Input::FromNode(
        0,
        NodeToLauncher::SafepointIndex {
            rank: 0,
            index: 40,
            next: 3,
        },
    );
    assert!(handled(translate(&mut calls, &mut copies, index)).is_none());
    let u = calls.uncoord.as_ref().unwrap();
    assert_eq!(u.realign.as_ref().unwrap().get(&0), Some(&(40, 3)));
}

#[test]
fn without_logging_a_lone_restart_is_refused() {
    let (mut calls, _) = hub();
    calls.uncoord = Some(Uncoord::new(&[0, 1, 2], false));
    assert!(replay(&mut calls, 1).is_err());
    let d = Decision {
        id: policies::primitives::DecisionId {
            epoch: 1,
            leader: 0,
            seq: 1,
        },
        kind: policies::primitives::DecisionKind::Restart {
            rank: 1,
            incarnation: 1,
            node: 2,
            version: None,
            source: None,
            failure_epoch: 1,
        },
    };
    let err = restart(&mut calls, &d).unwrap_err();
    assert!(err.contains("message logging"), "{err}");
}

/// A lone restart after a policy swap (a new `Uncoord`) numbers on from the job's earlier
/// ones: krund drops a `Rejoin` that a newer one for the same rank supersedes, so a number
/// used again after a swap would be dropped as old.
#[test]
fn lone_restart_numbers_go_on_across_a_policy_swap() {
    let (mut calls, sent) = hub();
    let decision = |seq: u64| Decision {
        id: policies::primitives::DecisionId {
            epoch: 3,
            leader: 0,
            seq,
        },
        kind: policies::primitives::DecisionKind::Restart {
            rank: 2,
            incarnation: 1,
            node: 1,
            version: None,
            source: None,
            failure_epoch: 3,
        },
    };
    let last_restart =
        |sent: &Arc<std::sync::Mutex<Vec<LauncherToNode>>>| match sent.lock().unwrap().last() {
            Some(LauncherToNode::Rejoin { restart, .. }) => *restart,
            other => panic!("no Rejoin sent: {other:?}"),
        };
    calls.uncoord = Some(Uncoord::new(&[0, 1, 2], true));
    restart(&mut calls, &decision(1)).unwrap();
    let first = last_restart(&sent);
    // Swapped away and back: a new per-rank state.
    calls.uncoord = Some(Uncoord::new(&[0, 1, 2], true));
    restart(&mut calls, &decision(2)).unwrap();
    let second = last_restart(&sent);
    assert!(second > first, "restart {second} after restart {first}");
}
