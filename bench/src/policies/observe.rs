//! What `bench policies` reads from one run's output: the compute's span, the checkpoints,
//! each injected failure (detection, restart, work lost) and the logging counters.
use cluster_tests::campaign::JobOutput;

use crate::ha::parse::{commits, computing, step_line};

/// One injected failure, timed from krun's SIGKILL.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FailureObs {
    /// Seconds after the compute started (rank 0's first `computing from step 0`).
    pub at_s: f64,
    /// Until krun printed the agreed failure.
    pub detect_s: Option<f64>,
    /// Until the last rank that restarted or rolled back printed that it computes again.
    pub restart_s: Option<f64>,
    /// Compute done again: from the moment rank 0 finished the step the ranks resumed from
    /// until the SIGKILL (0 when no rank went back: survivors kept their work).
    pub lost_s: Option<f64>,
    /// Ranks that printed that they compute again (restarted or rolled back).
    pub ranks_back: usize,
}

/// One run.
#[derive(Clone, Debug, Default)]
pub struct RunObs {
    /// Rank 0's first `computing from step 0` (Unix seconds, its clock).
    pub start: f64,
    /// From `start` until rank 0 printed its loop time (the compute's makespan).
    pub makespan_s: f64,
    /// Rank 0's loop time in its last process (failure-free runs: the whole loop).
    pub loop_s: Option<f64>,
    /// (start to commit, ranks held) per committed checkpoint, and when it committed
    /// (seconds after `start`).
    pub commits: Vec<(f64, f64, f64)>,
    pub failures: Vec<FailureObs>,
    /// Messages and bytes the policy logged, when krun reports them.
    pub logged: Option<(f64, f64)>,
    /// Rank 0's mean time per step in this run over consecutive `step S at T` lines (a
    /// restart's gap left out): the run's pace, checkpoints and the machine's load included.
    pub step_s: Option<f64>,
}

/// Reads a run; the error names what is missing. `kills`: when the bench sent each SIGKILL
/// (Unix seconds); `None`: krun's `injected failure` lines.
pub fn observe(out: &JobOutput, kills: Option<&[f64]>) -> Result<RunObs, String> {
    let start = out
        .lines
        .iter()
        .filter_map(|l| computing(&l.text))
        .find(|&(r, s, _)| r == 0 && s == 0)
        .map(|x| x.2)
        .ok_or("rank 0 never printed that it computes from step 0")?;
    let end = out
        .lines
        .iter()
        .rev()
        .find(|l| l.text.contains("heat_ha: loop "))
        .map(|l| l.at)
        .ok_or("rank 0 printed no loop time")?;
    let mut run = RunObs {
        start,
        makespan_s: end - start,
        loop_s: crate::ha::parse::loop_seconds_last(out),
        ..RunObs::default()
    };
    let committed: Vec<f64> = out
        .lines
        .iter()
        .filter(|l| l.text.contains(" committed") && l.text.contains("safe at "))
        .map(|l| l.at - start)
        .collect();
    run.commits = commits(out)
        .into_iter()
        .zip(committed)
        .map(|((c, f), at)| (c, f, at))
        .collect();
    if run.commits.is_empty() {
        run.commits = own_rounds(out, start);
    }
    let kills: Vec<f64> = match kills {
        Some(k) => k.to_vec(),
        None => out
            .lines
            .iter()
            .filter(|l| l.text.contains("injected failure"))
            .map(|l| l.at)
            .collect(),
    };
    for (j, &k) in kills.iter().enumerate() {
        let next = kills.get(j + 1).copied().unwrap_or(f64::INFINITY);
        let detect = out
            .lines
            .iter()
            .find(|l| l.at >= k && l.at < next && l.text.contains(" failed at epoch"))
            .map(|l| l.at - k);
        let mut back: Vec<(usize, u64, f64)> = Vec::new();
        for (r, s, t) in out.lines.iter().filter_map(|l| computing(&l.text)) {
            if t > k && t < next && !back.iter().any(|b| b.0 == r) {
                back.push((r, s, t));
            }
        }
        let restart = back.iter().map(|b| b.2).reduce(f64::max).map(|t| t - k);
        let lost = match back.iter().map(|b| b.1).min() {
            None => None,
            Some(0) => out
                .lines
                .iter()
                .filter_map(|l| computing(&l.text))
                .filter(|&(r, s, t)| r == 0 && s == 0 && t < k)
                .map(|x| x.2)
                .reduce(f64::max)
                .map(|t| k - t),
            Some(step) => out
                .lines
                .iter()
                .rev()
                .filter_map(|l| step_line(&l.text))
                .find(|&(s, t)| s == step && t < k)
                .map(|x| k - x.1),
        };
        run.failures.push(FailureObs {
            at_s: k - start,
            detect_s: detect,
            restart_s: restart,
            // Nobody went back (message logging: the restarted rank printed, so this is
            // only the case when no rank printed at all): no work lost, but unmeasured.
            lost_s: lost,
            ranks_back: back.len(),
        });
    }
    run.logged = logged(out);
    let steps: Vec<(u64, f64)> = out
        .lines
        .iter()
        .filter_map(|l| step_line(&l.text))
        .collect();
    let dt: Vec<f64> = steps
        .windows(2)
        .filter(|w| w[1].0 == w[0].0 + 1 && w[1].1 > w[0].1)
        .map(|w| w[1].1 - w[0].1)
        .collect();
    run.step_s = (!dt.is_empty()).then(|| dt.iter().sum::<f64>() / dt.len() as f64);
    Ok(run)
}

/// The uncoordinated policies' checkpoints (`krun: rank R: own checkpoint V safe at L in S s,
/// ... (no barrier)`), as rounds: round i is every rank's i-th own checkpoint (as many
/// rounds as the rank with the fewest has), entered as (median of the ranks' seconds to
/// safe, 0 for the hold, which these lines do not give, and when its last rank's
/// checkpoint was safe, seconds after `start`). One round costs the job what one
/// coordinated checkpoint does in the cost per checkpoint the analysis derives.
fn own_rounds(out: &JobOutput, start: f64) -> Vec<(f64, f64, f64)> {
    use std::collections::BTreeMap;
    let mut per_rank: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for l in &out.lines {
        let Some(i) = l.text.find("rank ") else {
            continue;
        };
        let text = &l.text[i..];
        if !text.contains(": own checkpoint ") || !text.contains("safe at ") {
            continue;
        }
        let rank = text["rank ".len()..]
            .split(':')
            .next()
            .and_then(|r| r.trim().parse::<u64>().ok());
        let secs = crate::ha::parse::number_after(text, " in ");
        if let (Some(r), Some(s)) = (rank, secs) {
            per_rank.entry(r).or_default().push((s, l.at - start));
        }
    }
    let rounds = per_rank.values().map(Vec::len).min().unwrap_or(0);
    (0..rounds)
        .map(|i| {
            let mut secs: Vec<f64> = per_rank.values().map(|v| v[i].0).collect();
            secs.sort_by(f64::total_cmp);
            let at = per_rank.values().map(|v| v[i].1).fold(f64::MIN, f64::max);
            (secs[secs.len() / 2], 0.0, at)
        })
        .collect()
}

/// Messages and bytes logged in the job: the sum of the ranks' `krun: rank R: message log:
/// N messages logged (B bytes)` lines (one per rank's log when it ends; a rank lost in the
/// run never printed its first process's), else `N messages` and `B bytes` on the last
/// krun line that says `logged`, if any.
fn logged(out: &JobOutput) -> Option<(f64, f64)> {
    let ranks: Vec<(f64, f64)> = out
        .lines
        .iter()
        .filter(|l| l.text.contains("krun: rank ") && l.text.contains(": message log: "))
        .filter_map(|l| counts(&l.text))
        .collect();
    if !ranks.is_empty() {
        return Some(ranks.iter().fold((0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1)));
    }
    let l = out
        .lines
        .iter()
        .rev()
        .find(|l| l.text.starts_with("krun") && l.text.contains("logged"))?;
    counts(&l.text)
}

/// `N messages` and `B bytes` (or KiB, MiB) in a line.
fn counts(text: &str) -> Option<(f64, f64)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let before = |unit: &str| {
        words
            .windows(2)
            .find(|w| w[1].trim_end_matches([',', ';', ')']) == unit)
            .and_then(|w| w[0].trim_start_matches('(').parse::<f64>().ok())
    };
    let msgs = before("messages")?;
    let bytes = before("bytes")
        .or_else(|| before("KiB").map(|k| k * 1024.0))
        .or_else(|| before("MiB").map(|m| m * 1048576.0))
        .unwrap_or(f64::NAN);
    Some((msgs, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cluster_tests::campaign::Line;

    fn out(lines: &[(f64, &str)]) -> JobOutput {
        JobOutput {
            code: Some(0),
            timed_out: false,
            lines: lines
                .iter()
                .map(|&(at, t)| Line {
                    at,
                    stderr: false,
                    text: t.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_messages_and_bytes_logged_are_the_sum_of_the_ranks_log_lines() {
        let o = out(&[
            (10.0, "heat_ha: rank 0 computing from step 0 at 10.0"),
            (11.0, "heat_ha: step 4 at 11.0"),
            (11.5, "heat_ha: loop 0..8 in 1.5 s"),
            (12.0, "krun: rank 0: message log: 30 messages logged (2400 bytes); 28 sends carried 40 determinants to other nodes; 2 waited for the buddy"),
            (12.0, "krun: rank 1: message log: 12 messages logged (960 bytes); 12 sends carried 12 determinants to other nodes; 0 waited for the buddy"),
            (12.1, "krun: 1 checkpoint; 5 messages logged (7 bytes)"),
        ]);
        let r = observe(&o, None).unwrap();
        assert_eq!(r.logged, Some((42.0, 3360.0)));
    }

    #[test]
    fn a_run_with_one_failure_and_a_rollback() {
        let o = out(&[
            (10.0, "heat_ha: rank 0 computing from step 0 at 10.0"),
            (10.0, "heat_ha: rank 1 computing from step 0 at 10.0"),
            (11.0, "heat_ha: step 4 at 11.0"),
            (11.1, "krun: checkpoint 1 committed: 2 ranks, 1.0 MiB, safe at L2 in 0.30 s (ranks held 0.10 s)"),
            (12.0, "heat_ha: step 8 at 12.0"),
            (12.5, "krun: injected failure: SIGKILL to node 1 (pids 5 6)"),
            (15.5, "krun: node 1 failed at epoch 1; ranks 1 restart on spare node 3"),
            (16.0, "heat_ha: rank 1 computing from step 4 at 16.0"),
            (16.2, "heat_ha: rank 0 computing from step 4 at 16.25"),
            (30.0, "heat_ha: loop 4..100 in 13.5 s"),
            (30.1, "krun: 1 checkpoint; 12 messages logged (4096 bytes)"),
        ]);
        let r = observe(&o, None).unwrap();
        assert_eq!(r.start, 10.0);
        assert_eq!(r.makespan_s, 20.0);
        assert_eq!(r.loop_s, Some(13.5));
        assert_eq!(r.commits.len(), 1);
        assert!((r.commits[0].2 - 1.1).abs() < 1e-9);
        assert_eq!(r.failures.len(), 1);
        let f = &r.failures[0];
        assert!((f.at_s - 2.5).abs() < 1e-9);
        assert!((f.detect_s.unwrap() - 3.0).abs() < 1e-9);
        assert!((f.restart_s.unwrap() - 3.75).abs() < 1e-9);
        assert!((f.lost_s.unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(f.ranks_back, 2);
        assert_eq!(r.logged, Some((12.0, 4096.0)));
        // Steps 4 and 8 are not consecutive: no step time.
        assert_eq!(r.step_s, None);
        let o = out(&[
            (10.0, "heat_ha: rank 0 computing from step 0 at 10.0"),
            (10.1, "heat_ha: step 1 at 10.1"),
            (10.2, "heat_ha: step 2 at 10.2"),
            (10.9, "heat_ha: step 3 at 10.9"),
            (11.0, "heat_ha: step 4 at 11.0"),
            (12.0, "heat_ha: loop 0..4 in 1.0 s"),
        ]);
        let s = observe(&o, None).unwrap().step_s.unwrap();
        // Steps 1->2, 2->3, 3->4: (0.1 + 0.7 + 0.1) / 3.
        assert!((s - 0.3).abs() < 1e-9, "{s}");
    }

    #[test]
    fn the_uncoordinated_policies_checkpoints_count_as_rounds_of_every_rank() {
        let r = observe(
            &out(&[
                (10.0, "heat_ha: rank 0 computing from step 0 at 10.000"),
                (10.1, "heat_ha: rank 1 computing from step 0 at 10.100"),
                (
                    11.0,
                    "krun: rank 0: own checkpoint 1 safe at L2 in 0.20 s, 1.0 MiB (no barrier)",
                ),
                (
                    11.5,
                    "krun: rank 1: own checkpoint 1 safe at L2 in 0.40 s, 1.0 MiB (no barrier)",
                ),
                (
                    12.0,
                    "krun: rank 0: own checkpoint 2 safe at L2 in 0.30 s, 1.0 MiB (no barrier)",
                ),
                (14.0, "heat_ha: loop 0..100 in 4.0 s"),
            ]),
            None,
        )
        .unwrap();
        // Rank 1 made one checkpoint: one round, done when rank 1's was safe.
        assert_eq!(r.commits.len(), 1, "{:?}", r.commits);
        assert!((r.commits[0].0 - 0.4).abs() < 1e-9, "{:?}", r.commits);
        assert!((r.commits[0].2 - 1.5).abs() < 1e-9, "{:?}", r.commits);
    }

    #[test]
    fn a_restart_from_the_start_loses_everything_since_the_start() {
        let o = out(&[
            (10.0, "heat_ha: rank 0 computing from step 0 at 10.0"),
            (14.0, "krun: injected failure: SIGKILL to node 2"),
            (17.0, "krun: node 2 failed at epoch 1"),
            (18.0, "heat_ha: rank 0 computing from step 0 at 18.0"),
            (30.0, "heat_ha: loop 0..100 in 12.0 s"),
        ]);
        let r = observe(&o, None).unwrap();
        assert!((r.failures[0].lost_s.unwrap() - 4.0).abs() < 1e-9);
        assert_eq!(r.logged, None);
        assert!(observe(&out(&[(1.0, "nothing")]), None).is_err());
        // Kill times given by the caller take the place of krun's lines.
        let r = observe(&o, Some(&[14.5])).unwrap();
        assert!((r.failures[0].at_s - 4.5).abs() < 1e-9);
    }
}
