//! The checkpoint and communication dependency graph of uncoordinated checkpoints, and the
//! recovery line computed from it.
//!
//! Each rank's own checkpoints cut its execution into intervals: interval `v` runs from its
//! checkpoint `v` to its next one (interval 0 from the start). A delivered message is an
//! edge from the sender's interval at the send to the receiver's interval at the delivery.
//! Restoring a rank to its checkpoint `v` undoes its intervals `v` and later; a message whose
//! send is undone while its delivery is kept is an *orphan*, and the receiver must roll back
//! to before the delivery too. Propagating this to a fixed point is reachability in Wang's
//! rollback-dependency graph (an edge from `C(i, x)` to `C(j, y)` when a message is sent in
//! `i`'s interval `x` and delivered in `j`'s interval `y`; `C(i, x) -> C(i, x + 1)`): the result
//! is the maximal consistent set of checkpoints that excludes the lost volatile states,
//! each rank at the newest checkpoint it can keep. Ranks the propagation never reaches keep
//! running. With unlucky checkpoint placement the propagation cascades back to the start:
//! the domino effect, measured as the rollback depth.
//!
//! Without message logging the orphan-free line is not enough: a message sent before its
//! sender's restored checkpoint and delivered after its receiver's (in transit across the
//! line) is never sent again, since nobody kept it. [`transitless_line`] computes the
//! newest set of checkpoints on which, for every pair of ranks, the messages one had sent
//! equal the messages the other had delivered (per-channel counts each rank reports with
//! its checkpoint): no orphan and nothing in transit. Counts only grow, so rolling a rank
//! back to the newest checkpoint that fixes one channel and repeating reaches the greatest
//! such set (the sets are closed under taking, per rank, the older of two checkpoints).
use std::collections::{BTreeMap, BTreeSet};

use crate::primitives::{Rank, Version};

/// Delivered messages as dependencies between checkpoint intervals.
#[derive(Clone, Debug, Default)]
pub struct DependencyGraph {
    /// (from, from_interval, to, to_interval), deduplicated: many messages between the same
    /// two intervals are one dependency.
    edges: BTreeSet<(Rank, Version, Rank, Version)>,
}

/// Where a rank ends up on a recovery line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// It keeps its live state (not rolled back).
    Keep,
    /// It is restored to its own checkpoint (0: the program's start).
    At(Version),
}

/// A recovery line: per rank, where it is restored to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub ranks: Vec<Restore>,
    /// Per rank, own checkpoints rolled back past (taken and newer than the one restored).
    pub rolled_past: Vec<u32>,
}

impl Line {
    /// The rollback depth: the most own checkpoints one rank rolled back past.
    pub fn depth(&self) -> u32 {
        self.rolled_past.iter().copied().max().unwrap_or(0)
    }
}

impl DependencyGraph {
    /// Adds the dependency of a message sent in `from`'s interval `from_interval` and
    /// delivered in `to`'s interval `to_interval`. A rank's messages to itself order nothing.
    pub fn add(&mut self, from: Rank, from_interval: Version, to: Rank, to_interval: Version) {
        if from != to {
            self.edges.insert((from, from_interval, to, to_interval));
        }
    }

    /// Dependencies held.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// `rank` was restored to its checkpoint `version`: what it did in intervals `version`
    /// and later is undone, and so are the dependencies from and to those intervals.
    pub fn undo(&mut self, rank: Rank, version: Version) {
        self.edges
            .retain(|&(f, fi, t, ti)| !(f == rank && fi >= version || t == rank && ti >= version));
    }

    /// Computes the recovery line when the ranks in `lost` lose their live state.
    ///
    /// `taken[r]`: rank r's own checkpoints, oldest first (every one cuts an interval, even
    /// one that never became safe); `usable(r, v)`: whether checkpoint `v` of rank r can be
    /// restored (safe, and a copy survives). Each lost rank starts at its newest usable
    /// checkpoint; orphans are then rolled back until none is left.
    pub fn recovery_line(
        &self,
        taken: &[Vec<Version>],
        lost: &BTreeSet<Rank>,
        usable: impl Fn(Rank, Version) -> bool,
    ) -> Line {
        let n = taken.len();
        // The newest usable checkpoint at or before `at` (0: the start).
        let best = |r: Rank, at: Version| -> Version {
            taken[r as usize]
                .iter()
                .rev()
                .copied()
                .find(|&v| v <= at && usable(r, v))
                .unwrap_or(0)
        };
        let mut line: Vec<Restore> = (0..n as Rank)
            .map(|r| {
                if lost.contains(&r) {
                    Restore::At(best(r, Version::MAX))
                } else {
                    Restore::Keep
                }
            })
            .collect();
        let undone = |l: Restore, interval: Version| matches!(l, Restore::At(v) if interval >= v);
        loop {
            let mut changed = false;
            for &(f, fi, t, ti) in &self.edges {
                let (Some(&lf), Some(&lt)) = (line.get(f as usize), line.get(t as usize)) else {
                    continue;
                };
                if undone(lf, fi) && !undone(lt, ti) {
                    // An orphan: `t` must roll back to before the delivery.
                    line[t as usize] = Restore::At(best(t, ti));
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let rolled_past = (0..n)
            .map(|r| match line[r] {
                Restore::Keep => 0,
                Restore::At(v) => taken[r].iter().filter(|&&t| t > v).count() as u32,
            })
            .collect();
        Line {
            ranks: line,
            rolled_past,
        }
    }
}

/// A rank's per-channel counts at one own checkpoint: messages sent to each rank,
/// messages delivered from each rank.
pub type Counts = (Vec<u64>, Vec<u64>);

/// The newest consistent set of checkpoints with no message in transit (see the module
/// doc); every rank is restored (none keeps its live state: its channels' counts now are
/// not known). `counts[r]`: rank r's counts per own checkpoint; `taken[r]`: its checkpoints
/// (for the depth); `usable(r, v)`: whether checkpoint `v` can be restored. Checkpoint 0
/// (the program's start, all counts 0) is always usable.
pub fn transitless_line(
    counts: &[BTreeMap<Version, Counts>],
    taken: &[Vec<Version>],
    usable: impl Fn(Rank, Version) -> bool,
) -> Line {
    let n = counts.len();
    // Per rank, the candidates, newest first (0 last).
    let candidates: Vec<Vec<Version>> = (0..n)
        .map(|r| {
            let mut c: Vec<Version> = counts[r]
                .keys()
                .rev()
                .copied()
                .filter(|&v| v > 0 && usable(r as Rank, v))
                .collect();
            c.push(0);
            c
        })
        .collect();
    let count = |r: usize, v: Version, sent: bool, peer: usize| -> u64 {
        if v == 0 {
            return 0;
        }
        counts[r]
            .get(&v)
            .and_then(|(s, d)| if sent { s } else { d }.get(peer).copied())
            .unwrap_or(0)
    };
    // Index into `candidates[r]`.
    let mut at = vec![0usize; n];
    loop {
        let mut changed = false;
        for i in 0..n {
            for j in 0..n {
                if i == j {
                    continue;
                }
                let sent = count(i, candidates[i][at[i]], true, j);
                let got = count(j, candidates[j][at[j]], false, i);
                if got > sent {
                    // An orphan: j goes back to before the deliveries i has not sent.
                    while count(j, candidates[j][at[j]], false, i) > sent {
                        at[j] += 1;
                    }
                    changed = true;
                } else if sent > got {
                    // In transit: i goes back to before the sends j has not delivered.
                    while count(i, candidates[i][at[i]], true, j) > got {
                        at[i] += 1;
                    }
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    let ranks: Vec<Restore> = (0..n).map(|r| Restore::At(candidates[r][at[r]])).collect();
    let rolled_past = (0..n)
        .map(|r| {
            let v = candidates[r][at[r]];
            taken
                .get(r)
                .map_or(0, |t| t.iter().filter(|&&t| t > v).count() as u32)
        })
        .collect();
    Line { ranks, rolled_past }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(list: &[(Version, &[u64], &[u64])]) -> BTreeMap<Version, Counts> {
        list.iter()
            .map(|(v, s, d)| (*v, (s.to_vec(), d.to_vec())))
            .collect()
    }

    #[test]
    fn the_transitless_line_takes_the_newest_checkpoints_whose_channels_agree() {
        // Two ranks exchanging one message each per step: rank 0 checkpointed after steps
        // 2 and 4, rank 1 after steps 2 and 5. Only step 2 is common.
        let c = vec![
            counts(&[(1, &[0, 2], &[0, 2]), (2, &[0, 4], &[0, 4])]),
            counts(&[(1, &[2, 0], &[2, 0]), (2, &[5, 0], &[5, 0])]),
        ];
        let taken = vec![vec![1, 2], vec![1, 2]];
        let line = transitless_line(&c, &taken, |_, _| true);
        assert_eq!(line.ranks, vec![Restore::At(1), Restore::At(1)]);
        assert_eq!(line.depth(), 1);
        // Without the common step 2 (rank 1's checkpoint 1 is lost): the domino effect takes
        // both ranks back to the start.
        let line = transitless_line(&c, &taken, |r, v| !(r == 1 && v == 1));
        assert_eq!(line.ranks, vec![Restore::At(0), Restore::At(0)]);
        assert_eq!(line.rolled_past, vec![2, 2]);
    }

    #[test]
    fn a_message_in_transit_rolls_its_sender_back_and_an_orphan_its_receiver() {
        // Rank 0 sent 3 messages to rank 1 by its checkpoint 2; rank 1 had delivered 2 at
        // its newest (in transit: rank 0 must go back to its checkpoint 1, which sent 2).
        let c = vec![
            counts(&[(1, &[0, 2], &[0, 0]), (2, &[0, 3], &[0, 0])]),
            counts(&[(1, &[0, 0], &[1, 0]), (2, &[0, 0], &[2, 0])]),
        ];
        let taken = vec![vec![1, 2], vec![1, 2]];
        let line = transitless_line(&c, &taken, |_, _| true);
        assert_eq!(line.ranks, vec![Restore::At(1), Restore::At(2)]);
        assert_eq!(line.rolled_past, vec![1, 0]);
        // Rank 0's checkpoint 1 is unusable: rank 0 starts over, and rank 1's deliveries
        // become orphans: it starts over too.
        let line = transitless_line(&c, &taken, |r, v| !(r == 0 && v == 1));
        assert_eq!(line.ranks, vec![Restore::At(0), Restore::At(0)]);
    }

    #[test]
    fn ranks_that_never_talk_keep_their_newest_checkpoints() {
        let c = vec![
            counts(&[(3, &[0, 0, 0], &[0, 0, 0])]),
            counts(&[(1, &[0, 0, 4], &[0, 0, 4])]),
            counts(&[(2, &[0, 4, 0], &[0, 4, 0])]),
        ];
        let taken = vec![vec![3], vec![1], vec![2]];
        let line = transitless_line(&c, &taken, |_, _| true);
        assert_eq!(
            line.ranks,
            vec![Restore::At(3), Restore::At(1), Restore::At(2)]
        );
        assert_eq!(line.depth(), 0);
    }

    fn all(_: Rank, _: Version) -> bool {
        true
    }

    #[test]
    fn a_lost_rank_with_no_orphans_restarts_alone_from_its_newest_checkpoint() {
        let mut g = DependencyGraph::default();
        // 1 -> 0 sent before 1's checkpoint 1, delivered in 0's interval 2.
        g.add(1, 0, 0, 2);
        let taken = vec![vec![1, 2], vec![1]];
        let line = g.recovery_line(&taken, &[0].into(), all);
        assert_eq!(line.ranks, vec![Restore::At(2), Restore::Keep]);
        assert_eq!(line.depth(), 0);
    }

    #[test]
    fn an_orphan_rolls_its_receiver_back_to_before_the_delivery() {
        let mut g = DependencyGraph::default();
        // 0 sent in interval 2 (after its checkpoint 2), 1 delivered it in interval 1.
        g.add(0, 2, 1, 1);
        let taken = vec![vec![1, 2], vec![1, 2]];
        let line = g.recovery_line(&taken, &[0].into(), all);
        assert_eq!(line.ranks, vec![Restore::At(2), Restore::At(1)]);
        assert_eq!(line.rolled_past, vec![0, 1]);
    }

    #[test]
    fn an_unusable_checkpoint_is_skipped_and_undone_edges_are_forgotten() {
        let mut g = DependencyGraph::default();
        g.add(0, 1, 1, 1);
        let taken = vec![vec![1, 2], vec![1, 2]];
        // Rank 0's checkpoint 2 is lost: it goes back to 1, which undoes the send.
        let line = g.recovery_line(&taken, &[0].into(), |r, v| !(r == 0 && v == 2));
        assert_eq!(line.ranks, vec![Restore::At(1), Restore::At(1)]);
        g.undo(1, 1);
        assert!(g.is_empty());
    }
}
