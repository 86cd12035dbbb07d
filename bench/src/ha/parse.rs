//! What `bench ha` reads from a job's output: heat_ha's time stamps and krun's notices.
use cluster_tests::campaign::JobOutput;

/// The number after `key` up to the next space.
pub(crate) fn number_after(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Rank 0's compute loop time (`heat_ha: loop A..B in X s`).
pub fn loop_seconds(out: &JobOutput) -> Option<f64> {
    out.lines
        .iter()
        .find(|l| l.text.contains("heat_ha: loop "))
        .and_then(|l| number_after(&l.text, " in "))
}

/// Rank 0's loop time in its last process (after a restart, the loop it finished).
pub fn loop_seconds_last(out: &JobOutput) -> Option<f64> {
    out.lines
        .iter()
        .rev()
        .find(|l| l.text.contains("heat_ha: loop "))
        .and_then(|l| number_after(&l.text, " in "))
}

/// (start to commit, ranks held) of every committed checkpoint
/// (`checkpoint V committed: ..., safe at L2 in X s (ranks held Y s)`).
pub fn commits(out: &JobOutput) -> Vec<(f64, f64)> {
    out.lines
        .iter()
        .filter(|l| l.text.contains(" committed") && l.text.contains("safe at "))
        .filter_map(|l| {
            let after = &l.text[l.text.find("safe at ")?..];
            Some((
                number_after(after, " in ")?,
                number_after(after, "ranks held ")?,
            ))
        })
        .collect()
}

/// `heat_ha: rank R computing from step S at T`.
pub(crate) fn computing(text: &str) -> Option<(usize, u64, f64)> {
    let rest = &text[text.find("heat_ha: rank ")? + "heat_ha: rank ".len()..];
    let mut w = rest.split_whitespace();
    let rank = w.next()?.parse().ok()?;
    if (w.next()?, w.next()?, w.next()?) != ("computing", "from", "step") {
        return None;
    }
    let step = w.next()?.parse().ok()?;
    w.next().filter(|&a| a == "at")?;
    Some((rank, step, w.next()?.parse().ok()?))
}

/// `heat_ha: step S at T` (rank 0).
pub(crate) fn step_line(text: &str) -> Option<(u64, f64)> {
    let rest = &text[text.find("heat_ha: step ")? + "heat_ha: step ".len()..];
    let mut w = rest.split_whitespace();
    let step = w.next()?.parse().ok()?;
    w.next().filter(|&a| a == "at")?;
    Some((step, w.next()?.parse().ok()?))
}

/// One failure, timed from krun's SIGKILL (all in seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FailureTimes {
    /// When the SIGKILL was sent (Unix seconds).
    pub kill_at: f64,
    /// Until krun printed the agreed failure.
    pub detect_s: f64,
    /// Until the last rank printed that it computes again.
    pub restart_s: f64,
    /// From the moment rank 0 finished the step the ranks resumed from until the SIGKILL:
    /// work done again.
    pub lost_work_s: f64,
    /// Image chains the spare fetched from the store, and the time it took (summed).
    pub fetch_bytes: u64,
    pub fetch_s: f64,
    pub resumed_step: u64,
}

/// Reads a failure from the job's output; `new`: the job relaunched after it (the ranks'
/// resumption is read there).
pub fn failure_times(
    old: &JobOutput,
    new: Option<&JobOutput>,
    ranks: usize,
    kill_at: f64,
) -> Result<FailureTimes, String> {
    let detect_at = old
        .lines
        .iter()
        .find(|l| l.at >= kill_at && l.text.contains(" failed at epoch"))
        .ok_or("krun printed no agreed failure")?
        .at;
    let mut resumed: Vec<Option<(u64, f64)>> = vec![None; ranks];
    for l in &new.unwrap_or(old).lines {
        if let Some((r, s, t)) = computing(&l.text) {
            if t > kill_at && r < ranks && resumed[r].is_none() {
                resumed[r] = Some((s, t));
            }
        }
    }
    let missing: Vec<usize> = (0..ranks).filter(|&r| resumed[r].is_none()).collect();
    if !missing.is_empty() {
        return Err(format!(
            "ranks {missing:?} never printed that they compute again after the SIGKILL"
        ));
    }
    let resumed: Vec<(u64, f64)> = resumed.into_iter().flatten().collect();
    let step = resumed.iter().map(|r| r.0).min().unwrap_or(0);
    let last = resumed.iter().map(|r| r.1).fold(f64::MIN, f64::max);
    let done_at = if step == 0 {
        // From the start: everything computed before the SIGKILL (if anything) is lost.
        Some(
            old.lines
                .iter()
                .filter_map(|l| computing(&l.text))
                .find(|&(r, s, t)| r == 0 && s == 0 && t < kill_at)
                .map_or(kill_at, |x| x.2),
        )
    } else {
        old.lines
            .iter()
            .rev()
            .filter_map(|l| step_line(&l.text))
            .find(|&(s, t)| s == step && t < kill_at)
            .map(|x| x.1)
    }
    .ok_or_else(|| format!("rank 0 never printed step {step} before the SIGKILL"))?;
    let mut fetch_bytes = 0;
    let mut fetch_s = 0.0;
    for l in &old.lines {
        if l.text.contains("came from the checkpoint store") {
            fetch_bytes += number_after(&l.text, "image chain (").unwrap_or(0.0) as u64;
            fetch_s += number_after(&l.text, "checkpoint store in ").unwrap_or(0.0);
        }
    }
    Ok(FailureTimes {
        kill_at,
        detect_s: detect_at - kill_at,
        restart_s: last - kill_at,
        lost_work_s: kill_at - done_at,
        fetch_bytes,
        fetch_s,
        resumed_step: step,
    })
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
    fn a_failure_is_timed_from_the_sigkill_to_the_last_rank_computing() {
        let o = out(&[
            (10.0, "heat_ha: rank 0 computing from step 0 at 10.0"),
            (10.0, "heat_ha: rank 1 computing from step 0 at 10.0"),
            (11.0, "heat_ha: step 4 at 11.0"),
            (11.1, "krun: checkpoint 1 committed: 2 ranks, 1.0 MiB, safe at L2 in 0.30 s (ranks held 0.10 s)"),
            (12.0, "heat_ha: step 8 at 12.0"),
            (12.5, "krun: injected failure: SIGKILL to node 1 (pids 5 6)"),
            (15.5, "krun: node 1 failed at epoch 1; ranks 1 restart on spare node 3"),
            (15.7, "krun: rank 1 runs on node 3 (pid 9); its image chain (2048 bytes) came from the checkpoint store in 0.05 s"),
            (16.0, "heat_ha: rank 1 computing from step 4 at 16.0"),
            (16.2, "heat_ha: rank 0 computing from step 4 at 16.25"),
            (30.0, "heat_ha: loop 4..100 in 13.5 s"),
        ]);
        let t = failure_times(&o, None, 2, 12.5).unwrap();
        assert_eq!(t.kill_at, 12.5);
        assert!((t.detect_s - 3.0).abs() < 1e-9);
        assert!((t.restart_s - 3.75).abs() < 1e-9, "{t:?}");
        assert!((t.lost_work_s - 1.5).abs() < 1e-9, "{t:?}");
        assert_eq!((t.fetch_bytes, t.resumed_step), (2048, 4));
        assert_eq!(commits(&o), vec![(0.30, 0.10)]);
        assert_eq!(loop_seconds(&o), Some(13.5));
        // A rank that never resumes is named.
        let e = failure_times(&o, None, 3, 12.5).unwrap_err();
        assert!(e.contains("[2]"), "{e}");
    }
}
