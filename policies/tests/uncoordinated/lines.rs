//! The uncoordinated policy's recovery lines: consistent and maximal on random histories,
//! transitless over every rank without logging, and the checkpoints a future line may need.

use super::*;

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
