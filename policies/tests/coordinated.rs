//! Scripted scenarios of the coordinated policy: each feeds events by hand and checks the
//! primitive calls, records and lines that come out.
mod common;

use common::*;
use policies::coordinated::{Coordinated, IntervalChoice, NoSpare};
use policies::primitives::{
    AgreedView, DecisionKind, Event, Layout, Level, Millis, NodeId, Rank, RequestSource, Version,
};
use policies::{interval, Action, Decision, Phase, Policy, PolicyError};

#[test]
fn checkpoint_commits_only_when_every_image_is_safe_at_l2() {
    let mut job = Job::new(cfg(), &[0, 0, 1, 1], 3);
    assert_eq!(job.p.next_deadline(), Some(100));
    job.now = 100;
    let out = job.ev(Event::Tick);
    assert!(matches!(
        &out[0],
        Action::Record(Decision {
            kind: DecisionKind::CheckpointStarted { version: 1 },
            ..
        })
    ));
    let op = sync_op(&out);
    assert_eq!(job.p.phase(), Phase::Checkpointing);
    let out = job.ev(Event::Synchronized { op });
    let caps = captures(&out);
    assert_eq!(caps.len(), 4);
    assert!(caps
        .iter()
        .all(|c| c.1 == 1 && c.2 == vec![Level::L1, Level::L2]));
    for r in 0..4 {
        let out = job.ev(Event::CaptureDone {
            op,
            rank: r,
            version: 1,
            bytes: MIB,
            seconds: 0.01,
        });
        // The ranks stay held until every one is captured.
        assert_eq!(released(&out).is_some(), r == 3, "rank {r}: {out:?}");
    }
    for r in 0..4 {
        job.ev(Event::LevelSafe {
            rank: r,
            version: 1,
            level: Level::L1,
        });
    }
    for r in 0..3 {
        job.ev(Event::LevelSafe {
            rank: r,
            version: 1,
            level: Level::L2,
        });
    }
    assert_eq!(
        job.p.recovery_line(),
        None,
        "committed before rank 3 is safe"
    );
    job.now = 130;
    let out = job.ev(Event::LevelSafe {
        rank: 3,
        version: 1,
        level: Level::L2,
    });
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Record(Decision {
            kind: DecisionKind::Committed {
                version: 1,
                level: Level::L2
            },
            ..
        })
    )));
    assert_eq!(job.p.recovery_line(), Some(1));
    assert_eq!(job.p.phase(), Phase::Running);
    assert!(job.lines[0].starts_with("checkpoint 1 committed: 4 ranks, 4.0 MiB, safe at L2"));
    assert_eq!(job.p.summary().checkpoints, 1);
    assert!(job.p.costs().level_seconds[Level::L2 as usize].is_some());
}

#[test]
fn capture_failure_aborts_everywhere_and_keeps_the_previous_line() {
    let mut job = Job::new(cfg(), &[0, 1], 2);
    job.checkpoint();
    job.now = job.p.next_deadline().unwrap();
    let op = sync_op(&job.ev(Event::Tick));
    let out = job.ev(Event::Synchronized { op });
    let v = captures(&out)[0].1;
    let out = job.ev(Event::CaptureFailed {
        op,
        rank: 1,
        version: v,
        reason: "disk full".into(),
    });
    assert_eq!(released(&out), Some(vec![0, 1]), "held ranks go on");
    assert!(job.records.iter().any(|d| d.kind
        == DecisionKind::Aborted {
            version: v,
            reason: "capture of rank 1 failed: disk full".into()
        }));
    assert_eq!(job.p.recovery_line(), Some(1));
    assert_eq!(job.p.phase(), Phase::Running);
    assert!(job
        .lines
        .last()
        .unwrap()
        .ends_with("checkpoint 1 stays the recovery line"));
    // Late news of the aborted checkpoint changes nothing.
    job.ev(Event::LevelSafe {
        rank: 0,
        version: v,
        level: Level::L2,
    });
    assert_eq!(job.p.recovery_line(), Some(1));
    assert_eq!(job.p.summary().aborted, 1);
}

#[test]
fn failure_restarts_lost_ranks_on_a_spare_and_rolls_back_survivors() {
    let mut job = Job::new(cfg(), &[0, 0, 1, 1], 3);
    let v = job.checkpoint();
    let out = fail(&mut job, &[1], 2);
    assert_eq!(job.p.phase(), Phase::Recovering);
    let rs = restarts(&out);
    assert_eq!(
        rs,
        vec![
            (2, 2, 1, Some(copy(Level::L2, Some(2)))),
            (3, 2, 1, Some(copy(Level::L2, Some(2))))
        ],
        "lost ranks go to the spare, from their buddy's copy"
    );
    let rb: Vec<(Rank, Version)> = rollbacks(&out).iter().map(|r| (r.1, r.2)).collect();
    assert_eq!(rb, vec![(0, v), (1, v)]);
    assert_eq!(
        job.lines.last().unwrap(),
        "node 1 failed at epoch 2; ranks 2-3 restart on spare node 2 from checkpoint 1 \
         (L2 from node 2, 2.0 MiB); ranks 0-1 roll back to checkpoint 1"
    );
    // Decisions are recorded with the failure's epoch.
    assert!(out.iter().all(|a| match a {
        Action::Restart(d) => d.id.epoch == 2,
        _ => true,
    }));
    let last = complete(&mut job, &out);
    assert_eq!(released(&last), Some(vec![0, 1, 2, 3]));
    assert_eq!(job.p.phase(), Phase::Running);
    assert!(job.lines.last().unwrap().starts_with(
        "recovered from the failure at epoch 2: ranks 2-3 restarted, ranks 0-1 rolled back"
    ));
    let s = job.p.summary();
    assert_eq!(
        (s.failures, s.recoveries, s.restarts, s.rollbacks),
        (1, 1, 2, 2)
    );
    // Released after the capture at 106 ms; computing again at 119 ms.
    assert_eq!(s.lost_seconds, 0.013);
    assert_eq!(job.p.slots()[2].node, 2);
    assert_eq!(job.p.slots()[2].incarnation, 1);
}

#[test]
fn with_no_spare_lost_ranks_go_to_the_least_loaded_survivors() {
    let mut job = Job::new(cfg(), &[0, 0, 1, 2], 3);
    job.checkpoint();
    let out = fail(&mut job, &[0], 2);
    let placed: Vec<(Rank, NodeId)> = restarts(&out).iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(placed, vec![(0, 1), (1, 2)]);
    assert!(job
        .lines
        .last()
        .unwrap()
        .contains("rank 0 restarts on node 1"));
}

#[test]
fn with_no_spare_and_no_room_the_job_ends_naming_the_ranks() {
    let mut c = cfg();
    c.no_spare = NoSpare::Survivors {
        max_ranks_per_node: Some(2),
    };
    let mut job = Job::new(c, &[0, 0, 1, 1], 2);
    job.checkpoint();
    let out = fail(&mut job, &[1], 2);
    let err = ended(&out).expect("the job ends").expect("with an error");
    assert_eq!(
        err.to_string(),
        "no node can host rank 2 after the loss of node(s) 1: no spare node is left and every \
         surviving node holds 2 ranks (the maximum)"
    );
    assert_eq!(job.p.phase(), Phase::Ended);
    assert!(job.records.iter().any(|d| matches!(
        &d.kind,
        DecisionKind::JobEnded { error: Some(e) } if e.contains("rank 2")
    )));
    // Nothing more happens.
    assert!(job.ev(Event::Tick).is_empty());
}

#[test]
fn failure_during_a_checkpoint_aborts_it_and_recovers_to_the_previous_commit() {
    let mut job = Job::new(cfg(), &[0, 1, 2], 4);
    let v = job.checkpoint();
    job.now = job.p.next_deadline().unwrap();
    let op = sync_op(&job.ev(Event::Tick));
    let out = job.ev(Event::Synchronized { op });
    let v2 = captures(&out)[0].1;
    job.ev(Event::CaptureDone {
        op,
        rank: 0,
        version: v2,
        bytes: MIB,
        seconds: 0.0,
    });
    let out = fail(&mut job, &[2], 2);
    assert!(job
        .records
        .iter()
        .any(|d| matches!(d.kind, DecisionKind::Aborted { version, .. } if version == v2)));
    assert_eq!(restarts(&out)[0].0, 2);
    assert!(rollbacks(&out).iter().all(|r| r.2 == v));
    // The aborted checkpoint's late captures are ignored; recovery completes.
    job.ev(Event::CaptureDone {
        op,
        rank: 1,
        version: v2,
        bytes: MIB,
        seconds: 0.0,
    });
    let last = complete(&mut job, &out);
    assert!(released(&last).is_some());
    assert_eq!(job.p.recovery_line(), Some(v));
}

#[test]
fn a_lost_buddy_pair_restores_from_parity_or_disk() {
    let mut job = Job::new(cfg(), &[0, 1, 2, 3], 5);
    let v = job.checkpoint();
    // Nodes 1 and 2 (rank 1's buddy) fail: rank 1 keeps only its L4 image, rank 2 its L2.
    job.idx.0.insert((1, v), vec![copy(Level::L4, None)]);
    job.idx.0.insert((2, v), vec![copy(Level::L2, Some(3))]);
    let out = fail(&mut job, &[1, 2], 2);
    let rs = restarts(&out);
    assert_eq!(rs[0], (1, 4, 1, Some(copy(Level::L4, None))));
    // One spare for two failed nodes: the second node's rank goes to a survivor.
    assert_eq!(rs[1].0, 2);
    assert_ne!(rs[1].1, 4);
    assert!(job
        .lines
        .last()
        .unwrap()
        .contains("from checkpoint 1 (L4, 1.0 MiB)"));
}

#[test]
fn when_no_kept_commit_survives_the_job_ends_naming_what_was_lost() {
    let mut job = Job::new(cfg(), &[0, 1], 3);
    let v = job.checkpoint();
    job.idx.0.insert((1, v), vec![]);
    let out = fail(&mut job, &[1, 2], 2);
    let err = ended(&out).unwrap().unwrap();
    assert_eq!(
        err.to_string(),
        "nothing can restore rank 1: no valid copy of checkpoint(s) 1 survives the loss of \
         node(s) 1, 2 (levels kept: L1, L2)"
    );
    assert!(job
        .lines
        .last()
        .unwrap()
        .starts_with("job ended: nothing can restore rank 1"));
}

#[test]
fn a_failure_before_any_commit_restarts_every_rank_from_the_start() {
    let mut job = Job::new(cfg(), &[0, 1, 2], 4);
    let out = fail(&mut job, &[1], 2);
    let rs = restarts(&out);
    assert_eq!(
        rs.iter().map(|r| (r.0, r.1, r.3)).collect::<Vec<_>>(),
        vec![(0, 0, None), (1, 3, None), (2, 2, None)]
    );
    assert!(rollbacks(&out).is_empty());
    assert!(job
        .lines
        .last()
        .unwrap()
        .contains("rank 1 restarts on spare node 3 from the start"));
}

#[test]
fn a_second_failure_during_recovery_keeps_finished_work_and_decides_once_per_failure() {
    let mut job = Job::new(cfg(), &[0, 1, 2, 3], 6);
    job.checkpoint();
    let first = fail(&mut job, &[1], 2);
    let r1 = restarts(&first);
    assert_eq!(r1.len(), 1);
    // Rank 0's rollback finishes; then node 4 (rank 1's new home) fails before rank 1 is up.
    let rb0 = rollbacks(&first).into_iter().find(|r| r.1 == 0).unwrap();
    job.ev(Event::RollbackDone {
        op: rb0.0,
        rank: 0,
        version: rb0.2,
        seconds: 0.0,
    });
    let second = fail(&mut job, &[1, 4], 3);
    let r2 = restarts(&second);
    assert_eq!(r2.len(), 1, "only rank 1 is decided again");
    assert_eq!(
        (r2[0].0, r2[0].1, r2[0].2),
        (1, 5, 2),
        "on the next spare, incarnation 2"
    );
    let rb2: Vec<Rank> = rollbacks(&second).iter().map(|r| r.1).collect();
    assert!(
        rb2.is_empty(),
        "ranks 2-3's rollbacks and rank 0's result are kept: {rb2:?}"
    );
    // The first decision's late completion is fenced out; the second one completes it.
    let stale = match &first
        .iter()
        .find(|a| matches!(a, Action::Restart(_)))
        .unwrap()
    {
        Action::Restart(d) => d.id,
        _ => unreachable!(),
    };
    let out = job.ev(Event::RestartDone {
        decision: stale,
        rank: 1,
        node: 4,
        seconds: 0.0,
    });
    assert!(out.is_empty());
    complete(
        &mut job,
        &first
            .into_iter()
            .filter(|a| matches!(a, Action::Rollback { rank, .. } if *rank != 0))
            .collect::<Vec<_>>(),
    );
    let last = complete(&mut job, &second);
    assert_eq!(released(&last), Some(vec![0, 1, 2, 3]));
    let decided: Vec<(Rank, u64)> = job
        .records
        .iter()
        .filter_map(|d| match d.kind {
            DecisionKind::Restart {
                rank,
                failure_epoch,
                ..
            } => Some((rank, failure_epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(decided, vec![(1, 2), (1, 3)]);
}

#[test]
fn a_checkpoint_request_starts_one_now() {
    let mut c = cfg();
    c.interval = IntervalChoice::Never;
    let mut job = Job::new(c, &[0, 1], 2);
    assert_eq!(job.p.next_deadline(), None);
    job.now = 42;
    let out = job.ev(Event::CheckpointRequest {
        source: RequestSource::Signal,
    });
    let op = sync_op(&out);
    assert_eq!(job.p.phase(), Phase::Checkpointing);
    let out = job.ev(Event::Synchronized { op });
    for (rank, version, _) in captures(&out) {
        job.ev(Event::CaptureDone {
            op,
            rank,
            version,
            bytes: MIB,
            seconds: 0.0,
        });
        job.ev(Event::LevelSafe {
            rank,
            version,
            level: Level::L2,
        });
    }
    assert!(
        job.lines[0].starts_with("checkpoint 1 committed (asked by SIGUSR1): 2 ranks"),
        "{}",
        job.lines[0]
    );
}

#[test]
fn daly_interval_follows_the_measured_freeze() {
    let mut c = cfg();
    c.interval = IntervalChoice::Daly {
        mtbf_s: 60.0,
        initial_ms: 1000,
    };
    let mut job = Job::new(c, &[0, 1], 2);
    assert_eq!(job.p.next_deadline(), Some(1000));
    job.checkpoint();
    let freeze = job.p.costs().freeze_seconds.unwrap();
    assert!(freeze > 0.0);
    let tau = interval::daly(freeze, 60.0).unwrap();
    // The next checkpoint is tau after the ranks were released (1000 + freeze).
    let released_at = 1000 + (freeze * 1000.0).round() as Millis;
    assert_eq!(
        job.p.next_deadline(),
        Some(released_at + (tau * 1000.0).round() as Millis)
    );
}

#[test]
fn every_rank_exiting_completes_the_job() {
    let mut job = Job::new(cfg(), &[0, 1], 2);
    job.checkpoint();
    job.ev(Event::RankExited {
        rank: 0,
        node: 0,
        code: 0,
    });
    assert_eq!(
        job.p.next_deadline(),
        None,
        "no checkpoint once ranks finish"
    );
    let out = job.ev(Event::RankExited {
        rank: 1,
        node: 1,
        code: 0,
    });
    assert_eq!(ended(&out), Some(None));
    assert_eq!(job.p.phase(), Phase::Completed);
    assert_eq!(job.lines.last().unwrap(), "job completed");
}

#[test]
fn a_rank_exiting_with_an_error_ends_the_job() {
    let mut job = Job::new(cfg(), &[0, 1], 2);
    let out = job.ev(Event::RankExited {
        rank: 1,
        node: 1,
        code: 3,
    });
    assert_eq!(
        ended(&out),
        Some(Some(PolicyError::RankFailed { rank: 1, code: 3 }))
    );
}

#[test]
fn invalid_configurations_are_refused_with_the_reason() {
    let mut c = cfg();
    c.levels.retain(|l| l.level == Level::L1);
    let e = Coordinated::new(
        c,
        0,
        &Layout {
            ranks: vec![0],
            spares: vec![],
        },
        AgreedView::new(1, vec![0]),
        0,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid policy configuration: commit level L2 is not written at every checkpoint (levels: L1)"
    );
    let e = Coordinated::new(
        cfg(),
        0,
        &Layout {
            ranks: vec![5],
            spares: vec![],
        },
        AgreedView::new(1, vec![0]),
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("rank 0 is placed on node 5"), "{e}");
}

#[test]
fn events_actions_and_decisions_round_trip_through_postcard() {
    let mut job = Job::new(cfg(), &[0, 0, 1, 1], 3);
    job.checkpoint();
    let out = fail(&mut job, &[1], 2);
    let bytes = postcard::to_allocvec(&out).unwrap();
    let back: Vec<Action> = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, out);
    let ev = Event::FailureAgreed {
        epoch: 2,
        failed: vec![1],
        view: AgreedView::new(2, vec![0, 2]),
    };
    let back: Event = postcard::from_bytes(&postcard::to_allocvec(&ev).unwrap()).unwrap();
    assert_eq!(back, ev);
}
