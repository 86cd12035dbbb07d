//! Scripted leader changes: a new leader resumes the coordinated policy from the recorded
//! decisions and the process table, and settles only what the previous one left open.
mod common;

use common::*;
use policies::coordinated::Coordinated;
use policies::primitives::{AgreedView, DecisionKind, Event, Layout, Level, OpId, Snapshot};
use policies::{Action, Decision, Phase, Policy};

#[test]
fn a_new_leader_resumes_from_the_recorded_decisions() {
    let mut job = Job::new(cfg(), &[0, 1, 2], 4);
    let v = job.checkpoint();
    let out = fail(&mut job, &[1], 2);
    assert_eq!(restarts(&out).len(), 1);
    // The leader (node 0) fails before rank 1's restart registered.
    let snapshot = Snapshot {
        view: AgreedView::new(3, vec![2, 3]),
        ranks: vec![
            policies::primitives::RankSlot {
                node: 0,
                incarnation: 0,
            },
            policies::primitives::RankSlot {
                node: 1,
                incarnation: 0,
            },
            policies::primitives::RankSlot {
                node: 2,
                incarnation: 0,
            },
        ],
        spares: vec![3],
        decisions: job.records.clone(),
        exits: vec![],
    };
    // Rank 0's copies were on nodes 0 and 1; its disk image remains.
    job.idx
        .0
        .get_mut(&(0, v))
        .unwrap()
        .push(copy(Level::L4, None));
    let mut p = Coordinated::resume(cfg(), 2, &snapshot, 500).unwrap();
    assert_eq!(p.recovery_line(), Some(v));
    let out = p.on_event(
        500,
        Event::FailureAgreed {
            epoch: 3,
            failed: vec![0],
            view: AgreedView::new(3, vec![2, 3]),
        },
        &job.idx,
    );
    assert!(matches!(
        &out[0],
        Action::Notify(n) if n.to_string() == "node 2 runs the policy from epoch 3 (the previous leader is gone)"
    ));
    let rs = restarts(&out);
    // Rank 0 lost with node 0; rank 1 was decided for node 3 but never registered: both are
    // decided again with new incarnations; rank 0 has no room on a spare and goes to node 2.
    assert_eq!(
        rs.iter().map(|r| (r.0, r.1, r.2)).collect::<Vec<_>>(),
        vec![(0, 2, 1), (1, 3, 2)]
    );
    assert_eq!(
        rollbacks(&out).iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![2]
    );
    assert!(out.iter().all(|a| match a {
        Action::Restart(d) | Action::Record(d) => d.id.leader == 2,
        _ => true,
    }));
}

#[test]
fn losing_a_leader_that_hosts_no_rank_aborts_its_checkpoint_and_rolls_nothing_back() {
    // Ranks on nodes 1 and 2; node 0 leads and hosts none; node 3 is a spare.
    let layout = Layout {
        ranks: vec![1, 2],
        spares: vec![3],
    };
    let mut p =
        Coordinated::new(cfg(), 0, &layout, AgreedView::new(1, vec![0, 1, 2, 3]), 0).unwrap();
    let mut idx = Index::default();
    let mut records = Vec::new();
    let mut feed = |p: &mut Coordinated, now, e, idx: &Index| {
        let out = p.on_event(now, e, idx);
        for a in &out {
            if let Action::Record(d) = a {
                records.push(d.clone());
            }
        }
        out
    };
    // Checkpoint 1 commits; checkpoint 2 is held at the barrier when the leader dies.
    let op = sync_op(&feed(&mut p, 100, Event::Tick, &idx));
    feed(&mut p, 101, Event::Synchronized { op }, &idx);
    idx.usual(1, &[1, 2], 4);
    for rank in 0..2 {
        feed(
            &mut p,
            102,
            Event::CaptureDone {
                op,
                rank,
                version: 1,
                bytes: MIB,
                seconds: 0.0,
            },
            &idx,
        );
        feed(
            &mut p,
            103,
            Event::LevelSafe {
                rank,
                version: 1,
                level: Level::L2,
            },
            &idx,
        );
    }
    let t = p.next_deadline().unwrap();
    sync_op(&feed(&mut p, t, Event::Tick, &idx));
    let snapshot = Snapshot {
        view: AgreedView::new(2, vec![1, 2, 3]),
        ranks: p.slots().to_vec(),
        spares: vec![3],
        decisions: records.clone(),
        exits: vec![],
    };
    let mut q = Coordinated::resume(cfg(), 1, &snapshot, t + 50).unwrap();
    let out = q.on_event(
        t + 50,
        Event::FailureAgreed {
            epoch: 2,
            failed: vec![0],
            view: AgreedView::new(2, vec![1, 2, 3]),
        },
        &idx,
    );
    assert!(
        rollbacks(&out).is_empty() && restarts(&out).is_empty(),
        "{out:?}"
    );
    assert_eq!(released(&out), Some(vec![0, 1]), "the held ranks go on");
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Record(Decision {
            kind: DecisionKind::Aborted { version: 2, .. },
            ..
        })
    )));
    assert_eq!(q.recovery_line(), Some(1));
    // The aborted checkpoint is taken again at once, under the new leader.
    assert_eq!(q.phase(), Phase::Checkpointing);
    assert!(matches!(sync_op(&out), OpId { leader: 1, .. }));
}

#[test]
fn a_new_leader_finds_the_job_finished_from_the_process_table() {
    let mut job = Job::new(cfg(), &[0, 1], 3);
    job.checkpoint();
    let snapshot = Snapshot {
        view: AgreedView::new(2, vec![0, 1]),
        ranks: job.p.slots().to_vec(),
        spares: vec![],
        decisions: job.records.clone(),
        exits: vec![(0, 0), (1, 0)],
    };
    let mut q = Coordinated::resume(cfg(), 1, &snapshot, 900).unwrap();
    let out = q.on_event(
        900,
        Event::FailureAgreed {
            epoch: 2,
            failed: vec![2],
            view: AgreedView::new(2, vec![0, 1]),
        },
        &job.idx,
    );
    assert_eq!(ended(&out), Some(None));
    assert_eq!(q.phase(), Phase::Completed);
}
