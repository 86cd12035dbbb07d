use super::*;
use crate::model::{self, Line, LoggingCost, Uncoordinated};

const HOUR: f64 = 3600.0;

fn coord(interval_s: f64, freeze_s: f64, commit_s: f64) -> SimPolicy {
    SimPolicy::Coordinated {
        interval_s,
        freeze_s,
        commit_s,
        l4_every: None,
        l4_commit_s: 0.0,
    }
}

/// Daly's one-segment expectation: `M e^(R/M) (e^(s/M) - 1)`.
fn segment(s: f64, r: f64, m: f64) -> f64 {
    m * (r / m).exp() * (s / m).exp_m1()
}

#[test]
fn same_seed_same_run_other_seed_other_run() {
    let job = Job {
        nodes: 64,
        solve_s: 10.0 * HOUR,
        restart_s: 120.0,
    };
    for policy in [
        SimPolicy::None,
        coord(1800.0, 60.0, 30.0),
        SimPolicy::Uncoordinated {
            interval_s: 1800.0,
            commit_s: 30.0,
            overhead: 0.03,
            stagger: 8,
            recovery: Recovery::Replay { replay_factor: 0.8 },
        },
    ] {
        let run = |seed| {
            let trace =
                Trace::new(Distribution::Weibull { shape: 0.7 }, 2.0 * HOUR, 64, seed).unwrap();
            simulate(&job, &policy, trace, 1e9).unwrap()
        };
        let (a, b, c) = (run(1), run(1), run(2));
        assert_eq!(a, b, "{}", policy.name());
        assert_ne!(a.makespan_s, c.makespan_s, "{}", policy.name());
        assert!(a.completed && a.failures > 0, "{a:?}");
        assert!(a.makespan_s > job.solve_s);
    }
}

/// Cases where the model is exact: exponential failures (also during holds and restarts),
/// a checkpoint is the line as soon as the ranks are released, no buddy pair lost (a million
/// nodes). The simulator's mean over 4000 seeds is within 1% of Daly's expectation
/// (the standard error of the mean is below 0.5% here).
#[test]
fn the_mean_makespan_matches_daly_where_daly_is_exact() {
    let (ts, r, m) = (20.0 * HOUR, 600.0, 4.0 * HOUR);
    let job = Job {
        nodes: 1_000_000,
        solve_s: ts,
        restart_s: r,
    };
    let (tau, delta) = (3600.0, 300.0);
    let stats = monte_carlo(
        &job,
        &coord(tau, delta, 0.0),
        Distribution::Exponential,
        m,
        11,
        4000,
        1e9,
    )
    .unwrap();
    // T_s / τ = 20 segments; the last ends the job without a checkpoint.
    let want = 19.0 * segment(tau + delta, r, m) + segment(tau, r, m);
    let err = (stats.mean - want).abs() / want;
    assert!(err < 0.01, "simulated {} vs Daly {want}: {err}", stats.mean);
    // Daly's eq. (20) itself counts a checkpoint after the last segment too.
    let daly = model::coordinated_makespan(ts, tau, delta, r, m).unwrap();
    assert!((daly - want - (segment(tau + delta, r, m) - segment(tau, r, m))).abs() < 1e-6);

    let none = monte_carlo(
        &job,
        &SimPolicy::None,
        Distribution::Exponential,
        12.0 * HOUR,
        5,
        4000,
        1e9,
    )
    .unwrap();
    let job12 = Job {
        solve_s: 6.0 * HOUR,
        ..job
    };
    let none6 = monte_carlo(
        &job12,
        &SimPolicy::None,
        Distribution::Exponential,
        12.0 * HOUR,
        5,
        4000,
        1e9,
    )
    .unwrap();
    let want = model::none_makespan(6.0 * HOUR, r, 12.0 * HOUR).unwrap();
    let err = (none6.mean - want).abs() / want;
    assert!(err < 0.01, "no policy: simulated {} vs {want}", none6.mean);
    assert!(none.mean > none6.mean);
}

/// Uncoordinated with logging: exponential failures much rarer than a restart, so that
/// hardly any falls inside a recovery; the model's renewal formula then holds within 1%.
#[test]
fn the_mean_makespan_matches_the_logging_model() {
    let (ts, r, m) = (50.0 * HOUR, 60.0, 3.0 * HOUR);
    let job = Job {
        nodes: 10_000,
        solve_s: ts,
        restart_s: r,
    };
    let u = Uncoordinated {
        interval_s: 1200.0,
        freeze_s: 0.0,
        commit_s: 0.0,
        stall_s: 12.0,
        logging: LoggingCost {
            per_message_s: 2e-6,
            per_byte_s: 0.0,
            messages_per_s: 5000.0,
            bytes_per_s: 0.0,
        },
        recovery: Recovery::Replay { replay_factor: 0.5 },
    };
    let policy = SimPolicy::Uncoordinated {
        interval_s: u.interval_s,
        commit_s: 0.0,
        overhead: u.overhead().unwrap(),
        stagger: 16,
        recovery: u.recovery,
    };
    let stats = monte_carlo(&job, &policy, Distribution::Exponential, m, 3, 3000, 1e9).unwrap();
    let want = model::uncoordinated_makespan(ts, &u, r, m).unwrap();
    let err = (stats.mean - want).abs() / want;
    assert!(
        err < 0.01,
        "simulated {} vs model {want}: {err}",
        stats.mean
    );
}

#[test]
fn replay_loses_less_than_rollback_and_staggered_rollback_dominoes() {
    let job = Job {
        nodes: 1000,
        solve_s: 10.0 * HOUR,
        restart_s: 60.0,
    };
    let un = |stagger, recovery| SimPolicy::Uncoordinated {
        interval_s: 1800.0,
        commit_s: 10.0,
        overhead: 0.02,
        stagger,
        recovery,
    };
    let trace = || Trace::new(Distribution::Exponential, 3.0 * HOUR, 1000, 9).unwrap();
    let replay = simulate(
        &job,
        &un(8, Recovery::Replay { replay_factor: 1.0 }),
        trace(),
        1e9,
    )
    .unwrap();
    let aligned = simulate(
        &job,
        &un(1, Recovery::RollbackTo(Line::Aligned)),
        trace(),
        1e9,
    )
    .unwrap();
    let domino = simulate(
        &job,
        &un(8, Recovery::RollbackTo(Line::Start)),
        trace(),
        1e9,
    )
    .unwrap();
    assert!(replay.failures > 0);
    // With logging a failure never costs more than one interval of one node's work.
    assert!(replay.max_rollback_s <= 1800.0 + 1e-6, "{replay:?}");
    assert!(
        aligned.max_rollback_s <= 1800.0 + 10.0 + 1e-6,
        "{aligned:?}"
    );
    // Staggered checkpoints without logging: the first failure goes back to the start.
    let first = domino
        .timeline
        .iter()
        .find_map(|(at, m)| match m {
            Mark::Failure { lost_s, .. } => Some((*at, *lost_s)),
            _ => None,
        })
        .unwrap();
    assert!((first.1 - first.0 / 1.02).abs() < 1e-6, "{first:?}");
    assert!(domino.makespan_s > aligned.makespan_s && domino.makespan_s > replay.makespan_s);
}

#[test]
fn a_lost_buddy_pair_falls_back_to_an_older_or_disk_checkpoint() {
    let job = Job {
        nodes: 4,
        solve_s: 100.0,
        restart_s: 1.0,
    };
    // Checkpoints at progress 10, 20, 30, ...; nodes 2 and 3 are buddies.
    let trace = [
        Failure {
            at_s: 35.5,
            node: 2,
        },
        Failure {
            at_s: 40.0,
            node: 3,
        },
    ];
    let o = simulate(&job, &coord(10.0, 0.0, 0.0), trace, 1e6).unwrap();
    // First failure: back to 30 (lost 5.5). Second (progress 30 + 40 - 36.5 = 33.5): the
    // buddy copies of every checkpoint taken before node 2 failed are gone: the start.
    let lost: Vec<f64> = o
        .timeline
        .iter()
        .filter_map(|(_, m)| match m {
            Mark::Failure { lost_s, .. } => Some(*lost_s),
            _ => None,
        })
        .collect();
    assert_eq!(lost.len(), 2);
    assert!(
        (lost[0] - 5.5).abs() < 1e-9 && (lost[1] - 33.5).abs() < 1e-9,
        "{lost:?}"
    );
    // With every 2nd checkpoint on disk, the second failure goes back to the disk copy at 20.
    let with_disk = SimPolicy::Coordinated {
        interval_s: 10.0,
        freeze_s: 0.0,
        commit_s: 0.0,
        l4_every: Some(2),
        l4_commit_s: 0.0,
    };
    let o = simulate(&job, &with_disk, trace, 1e6).unwrap();
    assert!((o.lost_s - (5.5 + 13.5)).abs() < 1e-9, "{o:?}");
}

#[test]
fn a_failure_before_the_commit_loses_the_previous_period_too() {
    let job = Job {
        nodes: 8,
        solve_s: 50.0,
        restart_s: 2.0,
    };
    // Checkpoint 1 at progress 10 is held 1 s (until 11) and commits at 11 + 3 = 14.
    let o = simulate(
        &job,
        &coord(10.0, 1.0, 3.0),
        [Failure {
            at_s: 12.0,
            node: 1,
        }],
        1e6,
    )
    .unwrap();
    assert!((o.lost_s - 11.0).abs() < 1e-9, "{o:?}");
    assert!(o.completed);
    // 50 s of compute, 11 redone, 2 s restart, holds: 4 before the end + 1 before the failure.
    assert!(
        (o.makespan_s - (50.0 + 11.0 + 2.0 + 5.0)).abs() < 1e-9,
        "{o:?}"
    );
}

#[test]
fn failures_faster_than_progress_hit_the_limit_and_bad_input_is_named() {
    let job = Job {
        nodes: 2,
        solve_s: 100.0,
        restart_s: 1.0,
    };
    let trace = Trace::new(Distribution::Exponential, 5.0, 2, 1).unwrap();
    let o = simulate(&job, &SimPolicy::None, trace, 10_000.0).unwrap();
    assert!(!o.completed && o.makespan_s > 10_000.0);
    let e = simulate(&job, &coord(0.0, 1.0, 1.0), [], 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("interval"), "{e}");
    let bad = Job { nodes: 0, ..job };
    assert!(simulate(&bad, &SimPolicy::None, [], 1.0).is_err());
}
