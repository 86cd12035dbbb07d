//! Failures before the job's wiring finished (the start-up window).

use super::*;

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
