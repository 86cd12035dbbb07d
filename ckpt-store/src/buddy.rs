//! Where a node's copies go: its L2 buddy and its L3 parity set.
//!
//! Two placements:
//! - [`Placement::ring`] (the default, kept for existing deployments): the buddy is the next
//!   node in another failure group (the next node when all share one group); parity sets are
//!   K consecutive nodes.
//! - [`Placement::from_cells`]: from the adaptation layer's locator cells (given as plain
//!   lists of store node indices, so this crate does not depend on the adaptation layer) and
//!   the nodes' failure groups. A node's buddy is chosen, in this order of preference, in
//!   another failure group and another cell, in another failure group, in another cell, or
//!   anywhere else; among equally good candidates the one that is buddy to the fewest nodes
//!   so far wins (so buddy duty is spread evenly), then the nearest in cell order. Parity
//!   sets deal the nodes out round-robin across cells (and failure groups inside a cell), so
//!   a set's members sit in different cells wherever there are enough cells: one lost cell
//!   costs each set at most one member when there are at least K cells.
//!
//! In both, the parity of set `s` for version `v` is kept by a node of the next set (member
//! `v mod size`, rotating with the version), or inside the set when there is only one.
//!
//! Each node also has a ranked list of fallback buddies (the same preferences): when the
//! membership reports its buddy gone, [`Placement::buddy_among`] names the next one up, the
//! same on every node that has the same view.
use crate::error::{Result, StoreError};

/// Buddies and parity sets of every node of a store (indices into `StoreConfig::nodes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Each node's buddy candidates, best first (the buddy is the first one not down).
    candidates: Vec<Vec<usize>>,
    sets: Vec<Vec<usize>>,
    /// node -> (set, member index in the set); `None`: the node is in no parity set
    /// ([`Placement::parity_among`]).
    member: Vec<Option<(u32, u32)>>,
    /// Parity lanes per set: each member contributes one image per lane and version (a node
    /// running `lanes` ranks puts `lanes` images per version).
    lanes: u32,
}

impl Placement {
    /// The default placement: buddy = next node in another failure group; parity sets of
    /// `k` consecutive nodes (`k < 2`: one set per node, no parity).
    pub fn ring(groups: &[u32], k: usize) -> Placement {
        let n = groups.len();
        let candidates = (0..n)
            .map(|node| {
                let mut c: Vec<usize> = (1..n).map(|d| (node + d) % n).collect();
                // Other groups first, each part in ring order (a stable sort).
                c.sort_by_key(|&m| groups[m] == groups[node]);
                c
            })
            .collect();
        let k = k.max(1);
        let sets: Vec<Vec<usize>> = (0..n)
            .collect::<Vec<_>>()
            .chunks(k)
            .map(|c| c.to_vec())
            .collect();
        Placement::with(candidates, sets, n)
    }

    /// A placement from the locator's cells (each a list of node indices; together they
    /// must name every node `0..groups.len()` exactly once) and failure groups; parity sets
    /// of `k` members (`k < 2`: no parity). A last set of one member joins the set before it.
    pub fn from_cells(cells: &[Vec<usize>], groups: &[u32], k: usize) -> Result<Placement> {
        let n = groups.len();
        let mut cell_of = vec![usize::MAX; n];
        for (c, members) in cells.iter().enumerate() {
            for &m in members {
                if m >= n {
                    return Err(StoreError::Invalid(format!(
                        "cell {c} names node {m}, but the store has {n} nodes"
                    )));
                }
                if cell_of[m] != usize::MAX {
                    return Err(StoreError::Invalid(format!(
                        "node {m} is in cell {} and cell {c}",
                        cell_of[m]
                    )));
                }
                cell_of[m] = c;
            }
        }
        if let Some(m) = cell_of.iter().position(|&c| c == usize::MAX) {
            return Err(StoreError::Invalid(format!("node {m} is in no cell")));
        }
        // Cell order: cells as given, members ascending, empty cells skipped.
        let cells: Vec<Vec<usize>> = cells
            .iter()
            .filter(|c| !c.is_empty())
            .map(|c| {
                let mut c = c.clone();
                c.sort_unstable();
                c
            })
            .collect();
        let order: Vec<usize> = cells.iter().flatten().copied().collect();
        let pos = {
            let mut p = vec![0; n];
            for (i, &m) in order.iter().enumerate() {
                p[m] = i;
            }
            p
        };
        let mut load = vec![0usize; n];
        let mut candidates = vec![Vec::new(); n];
        for &node in &order {
            let tier = |m: usize| {
                2 * (groups[m] == groups[node]) as u8 + (cell_of[m] == cell_of[node]) as u8
            };
            let distance = |m: usize| (pos[m] + n - pos[node]) % n;
            let best = order
                .iter()
                .copied()
                .filter(|&m| m != node)
                .min_by_key(|&m| (tier(m), load[m], distance(m)));
            // The balanced choice first, then the others by preference (fallbacks when
            // nodes are down).
            let mut c: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&m| m != node && Some(m) != best)
                .collect();
            c.sort_by_key(|&m| (tier(m), distance(m)));
            if let Some(b) = best {
                load[b] += 1;
                c.insert(0, b);
            }
            candidates[node] = c;
        }
        // Deal nodes round-robin across cells; inside a cell, interleave failure groups.
        let mut queues: Vec<std::collections::VecDeque<usize>> = cells
            .iter()
            .map(|c| interleave_groups(c, groups).into())
            .collect();
        let mut dealt = Vec::with_capacity(n);
        while dealt.len() < n {
            for q in queues.iter_mut() {
                if let Some(m) = q.pop_front() {
                    dealt.push(m);
                }
            }
        }
        let k = k.max(1);
        let mut sets: Vec<Vec<usize>> = dealt.chunks(k).map(|c| c.to_vec()).collect();
        if k > 1 && sets.len() > 1 && sets.last().is_some_and(|s| s.len() == 1) {
            let last = sets.pop().expect("non-empty");
            sets.last_mut().expect("non-empty").extend(last);
        }
        Ok(Placement::with(candidates, sets, n))
    }

    /// A placement re-formed after failures: [`Placement::from_cells`] over the nodes with
    /// `up[node]` set only (the cells and groups as at the start, the gone nodes left
    /// out), so that buddy duty is spread over the nodes still there and parity sets name
    /// only them. A gone node gets no buddy and no set. Every node that has the same cells,
    /// groups and `up` computes the same placement.
    pub fn among(cells: &[Vec<usize>], groups: &[u32], k: usize, up: &[bool]) -> Result<Placement> {
        let n = groups.len();
        if up.len() != n {
            return Err(StoreError::Invalid(format!(
                "{} nodes said up or gone, but the store has {n} nodes",
                up.len()
            )));
        }
        let live: Vec<usize> = (0..n).filter(|&m| up[m]).collect();
        let mut index = vec![usize::MAX; n];
        for (i, &m) in live.iter().enumerate() {
            index[m] = i;
        }
        let sub_cells: Vec<Vec<usize>> = cells
            .iter()
            .map(|c| {
                c.iter()
                    .filter(|&&m| m < n && up[m])
                    .map(|&m| index[m])
                    .collect()
            })
            .collect();
        let sub_groups: Vec<u32> = live.iter().map(|&m| groups[m]).collect();
        let sub = Placement::from_cells(&sub_cells, &sub_groups, k)?;
        let mut candidates = vec![Vec::new(); n];
        for (i, &m) in live.iter().enumerate() {
            candidates[m] = sub.candidates[i].iter().map(|&j| live[j]).collect();
        }
        let sets: Vec<Vec<usize>> = sub
            .sets
            .iter()
            .map(|s| s.iter().map(|&j| live[j]).collect())
            .collect();
        let mut member = vec![None; n];
        for (s, set) in sets.iter().enumerate() {
            for (i, &m) in set.iter().enumerate() {
                member[m] = Some((s as u32, i as u32));
            }
        }
        Ok(Placement {
            candidates,
            sets,
            member,
            lanes: 1,
        })
    }

    fn with(candidates: Vec<Vec<usize>>, sets: Vec<Vec<usize>>, n: usize) -> Placement {
        let mut member = vec![None; n];
        for (s, set) in sets.iter().enumerate() {
            for (i, &m) in set.iter().enumerate() {
                member[m] = Some((s as u32, i as u32));
            }
        }
        Placement {
            candidates,
            sets,
            member,
            lanes: 1,
        }
    }

    /// The same buddies, with parity sets of `k` members dealt (in this placement's set
    /// order) among the nodes with `members[node]` set only, `lanes` images per member and
    /// version (`k < 2` or fewer than two members: no parity). A job's store uses it so
    /// that spares, which put no image until they adopt a rank, sit in no set (a set waits
    /// for every member's image), and so that a node of `lanes` ranks puts each rank's
    /// image in a parity of its own (a set rebuilds one lost image per parity).
    pub fn parity_among(mut self, members: &[bool], k: usize, lanes: u32) -> Placement {
        let n = self.candidates.len();
        let order: Vec<usize> = self
            .sets
            .iter()
            .flatten()
            .copied()
            .filter(|&m| members.get(m).copied().unwrap_or(false))
            .collect();
        let k = if order.len() < 2 { 1 } else { k.max(1) };
        let mut sets: Vec<Vec<usize>> = order.chunks(k).map(|c| c.to_vec()).collect();
        if k > 1 && sets.len() > 1 && sets.last().is_some_and(|s| s.len() == 1) {
            let last = sets.pop().expect("non-empty");
            sets.last_mut().expect("non-empty").extend(last);
        }
        if k < 2 {
            // No parity: every node its own set, as `ring` and `from_cells` do for k < 2.
            sets = (0..n).map(|m| vec![m]).collect();
        }
        let lanes = lanes.max(1);
        let candidates = std::mem::take(&mut self.candidates);
        let mut p = Placement::with(candidates, sets, n);
        p.lanes = lanes;
        p
    }

    /// Number of nodes placed.
    pub fn nodes(&self) -> usize {
        self.candidates.len()
    }

    /// The node holding `node`'s L2 copies (None for a store of one node).
    pub fn buddy(&self, node: usize) -> Option<usize> {
        self.candidates.get(node)?.first().copied()
    }

    /// `node`'s buddy when the nodes with `down[m]` set are gone: its best candidate still
    /// up, chosen by the same preferences (None when no other node is up).
    pub fn buddy_among(&self, node: usize, down: &[bool]) -> Option<usize> {
        self.candidates
            .get(node)?
            .iter()
            .copied()
            .find(|&m| !down.get(m).copied().unwrap_or(false))
    }

    /// The parity sets, each a list of nodes (member index = position).
    pub fn sets(&self) -> &[Vec<usize>] {
        &self.sets
    }

    /// `node`'s parity set and its member index there ((0, 0) for a node in no set: see
    /// [`Placement::parity_member`]).
    pub fn set_of(&self, node: usize) -> (u32, u32) {
        self.parity_member(node).unwrap_or((0, 0))
    }

    /// `node`'s parity set and its member index there, if it is in one.
    pub fn parity_member(&self, node: usize) -> Option<(u32, u32)> {
        self.member.get(node).copied().flatten()
    }

    /// Parity lanes per set (1 unless [`Placement::parity_among`] set more).
    pub fn lanes(&self) -> u32 {
        self.lanes
    }

    /// The parity set number of lane `lane` of set `set`: the store keeps one parity per
    /// (lane set, version); lane 0's numbers are the sets' own.
    pub fn lane_set(&self, set: u32, lane: u32) -> u32 {
        lane * self.sets.len() as u32 + set
    }

    /// Every lane set number (`0..sets * lanes`).
    pub fn lane_sets(&self) -> u32 {
        self.sets.len() as u32 * self.lanes
    }

    /// The nodes of set `set` (a lane set number names its set's nodes).
    pub fn set_members(&self, set: u32) -> &[usize] {
        self.sets
            .get(set as usize % self.sets.len().max(1))
            .map_or(&[], Vec::as_slice)
    }

    /// Members of set `set` (a lane set number counts its set's members; 0 for an unknown
    /// set).
    pub fn set_size(&self, set: u32) -> usize {
        if set >= self.lane_sets() {
            return 0;
        }
        self.sets
            .get(set as usize % self.sets.len())
            .map_or(0, Vec::len)
    }

    /// The node keeping the parity of `set` (or of a lane set of it) for `version`: a node
    /// of the next set, rotating with the version (inside the set when there is only one).
    pub fn parity_holder(&self, set: u32, version: u64) -> usize {
        let n = self.sets.len();
        let next = &self.sets[(set as usize % n + 1) % n];
        next[(version % next.len() as u64) as usize]
    }
}

/// A cell's members with failure groups interleaved (round-robin over groups, in order of
/// first appearance), so consecutive members differ in group where possible.
fn interleave_groups(cell: &[usize], groups: &[u32]) -> Vec<usize> {
    let mut by_group: Vec<(u32, std::collections::VecDeque<usize>)> = Vec::new();
    for &m in cell {
        match by_group.iter_mut().find(|(g, _)| *g == groups[m]) {
            Some((_, q)) => q.push_back(m),
            None => by_group.push((groups[m], [m].into())),
        }
    }
    let mut out = Vec::with_capacity(cell.len());
    while out.len() < cell.len() {
        for (_, q) in by_group.iter_mut() {
            if let Some(m) = q.pop_front() {
                out.push(m);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the invariants every placement must keep.
    fn check(p: &Placement, cells: &[Vec<usize>], groups: &[u32]) {
        let n = groups.len();
        let cell_of = |m: usize| cells.iter().position(|c| c.contains(&m)).unwrap();
        for node in 0..n {
            let b = p.buddy(node);
            if n < 2 {
                assert_eq!(b, None);
                continue;
            }
            let b = b.unwrap_or_else(|| panic!("node {node} has no buddy"));
            assert_ne!(b, node, "node {node} is its own buddy");
            if groups.iter().any(|&g| g != groups[node]) {
                assert_ne!(
                    groups[b], groups[node],
                    "node {node}'s buddy {b} shares its group though another exists"
                );
            }
            let other_cell_other_group =
                (0..n).any(|m| groups[m] != groups[node] && cell_of(m) != cell_of(node));
            if other_cell_other_group {
                assert_ne!(
                    cell_of(b),
                    cell_of(node),
                    "node {node}: buddy {b} same cell"
                );
            }
        }
        let mut seen = vec![0; n];
        for (s, set) in p.sets().iter().enumerate() {
            for (i, &m) in set.iter().enumerate() {
                seen[m] += 1;
                assert_eq!(p.set_of(m), (s as u32, i as u32));
            }
            if p.sets().len() > 1 {
                for v in 0..5 {
                    assert!(
                        !set.contains(&p.parity_holder(s as u32, v)),
                        "set {s} keeps its own parity"
                    );
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "sets cover nodes {seen:?}");
    }

    #[test]
    fn ring_keeps_the_old_placement() {
        let p = Placement::ring(&[0, 0, 0, 1, 1], 3);
        assert_eq!(p.buddy(0), Some(3));
        assert_eq!(p.buddy(3), Some(0));
        assert_eq!(p.buddy(4), Some(0));
        assert_eq!(p.sets(), &[vec![0, 1, 2], vec![3, 4]]);
        assert_eq!(p.parity_holder(0, 1), 4);
        assert_eq!(p.parity_holder(1, 2), 2);
        let one = Placement::ring(&[0, 0, 0], 3);
        assert_eq!(one.parity_holder(0, 4), 1);
        assert_eq!(one.buddy(2), Some(0));
        assert_eq!(Placement::ring(&[0], 0).buddy(0), None);
    }

    #[test]
    fn buddies_sit_in_another_cell_and_group() {
        // Two cells of four; groups cut across cells.
        let cells = vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]];
        let groups = [0, 0, 1, 1, 0, 1, 0, 1];
        let p = Placement::from_cells(&cells, &groups, 4).unwrap();
        check(&p, &cells, &groups);
        // Buddy duty is spread: nobody holds copies for more than one node.
        let mut load = [0; 8];
        for n in 0..8 {
            load[p.buddy(n).unwrap()] += 1;
        }
        assert!(load.iter().all(|&l| l == 1), "{load:?}");
        // Each parity set spans both cells.
        for set in p.sets() {
            assert!(set.iter().any(|&m| m < 4) && set.iter().any(|&m| m >= 4));
        }
    }

    #[test]
    fn one_group_still_crosses_cells_and_one_cell_still_crosses_groups() {
        let cells = vec![vec![0, 1, 2], vec![3, 4], vec![5]];
        let groups = [7; 6];
        let p = Placement::from_cells(&cells, &groups, 3).unwrap();
        check(&p, &cells, &groups);
        for n in 0..6 {
            let b = p.buddy(n).unwrap();
            let cell = |m: usize| cells.iter().position(|c| c.contains(&m)).unwrap();
            assert_ne!(cell(b), cell(n), "node {n} buddy {b}");
        }
        let cells = vec![vec![0, 1, 2, 3]];
        let groups = [1, 1, 2, 2];
        let p = Placement::from_cells(&cells, &groups, 2).unwrap();
        check(&p, &cells, &groups);
        // One cell: sets interleave the groups.
        for set in p.sets() {
            assert_ne!(groups[set[0]], groups[set[1]], "{:?}", p.sets());
        }
    }

    #[test]
    fn many_shapes_keep_the_invariants() {
        // Every split of 1..=9 nodes into cells of at most 4 and 1..=3 groups.
        for n in 1..=9usize {
            for cell_size in 1..=4 {
                for ngroups in 1..=3u32 {
                    for k in [0, 2, 3, 4] {
                        let nodes: Vec<usize> = (0..n).collect();
                        let cells: Vec<Vec<usize>> =
                            nodes.chunks(cell_size).map(|c| c.to_vec()).collect();
                        let groups: Vec<u32> =
                            (0..n).map(|i| (i as u32 * 7 + 3) % ngroups).collect();
                        let p = Placement::from_cells(&cells, &groups, k).unwrap();
                        check(&p, &cells, &groups);
                        if k >= 2 && n >= 2 {
                            assert!(p.sets().iter().all(|s| s.len() >= 2), "{:?}", p.sets());
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_down_buddy_is_replaced_by_the_next_best_candidate() {
        let cells = vec![vec![0, 1, 2], vec![3, 4, 5]];
        let groups = [0, 1, 0, 1, 0, 1];
        let p = Placement::from_cells(&cells, &groups, 3).unwrap();
        let mut down = vec![false; 6];
        for node in 0..6 {
            assert_eq!(p.buddy_among(node, &down), p.buddy(node));
        }
        let first = p.buddy(0).unwrap();
        down[first] = true;
        let second = p.buddy_among(0, &down).unwrap();
        assert!(second != first && second != 0);
        // Still another group and cell while one is up.
        assert_ne!(groups[second], groups[0]);
        assert!(second >= 3, "{second}");
        for d in down.iter_mut().skip(1) {
            *d = true;
        }
        assert_eq!(p.buddy_among(0, &down), None);
        // The ring falls back along the ring, other groups first.
        let r = Placement::ring(&[0, 0, 1, 1], 0);
        assert_eq!(r.buddy(0), Some(2));
        assert_eq!(r.buddy_among(0, &[false, false, true, false]), Some(3));
        assert_eq!(r.buddy_among(0, &[false, false, true, true]), Some(1));
    }

    #[test]
    fn a_placement_among_the_nodes_left_spreads_buddies_and_sets_over_them_only() {
        // Six nodes in one cell; nodes 0 and 1 are gone (a buddy pair lost).
        let cells = vec![vec![0, 1, 2, 3, 4, 5]];
        let groups = [0, 1, 2, 3, 4, 5];
        let up = [false, false, true, true, true, true];
        let p = Placement::among(&cells, &groups, 2, &up).unwrap();
        assert_eq!((p.buddy(0), p.buddy(1)), (None, None));
        let mut load = [0; 6];
        for n in 2..6 {
            let b = p.buddy(n).unwrap();
            assert!(up[b] && b != n, "node {n}: buddy {b}");
            load[b] += 1;
            // Fallbacks name only nodes still there.
            assert!(p.buddy_among(n, &[false; 6]).is_some_and(|m| up[m]));
        }
        assert_eq!(&load[2..], &[1, 1, 1, 1], "buddy duty spread: {load:?}");
        assert!(p.sets().iter().flatten().all(|&m| up[m]), "{:?}", p.sets());
        assert_eq!(p.sets().iter().map(Vec::len).sum::<usize>(), 4);
        assert_eq!((p.parity_member(0), p.parity_member(1)), (None, None));
        // Parity among the nodes that run ranks: two sets of two, each kept by the other.
        let q = p.clone().parity_among(&up, 2, 1);
        assert_eq!(q.sets().len(), 2, "{:?}", q.sets());
        for s in 0..2u32 {
            assert_eq!(q.set_members(s).len(), 2);
            for v in 0..4 {
                assert!(!q.set_members(s).contains(&q.parity_holder(s, v)));
            }
        }
        // Every node computes it alone: the same inputs give the same placement.
        assert_eq!(Placement::among(&cells, &groups, 2, &up).unwrap(), p);
        // Everyone there: the placement of the start.
        assert_eq!(
            Placement::among(&cells, &groups, 2, &[true; 6]).unwrap(),
            Placement::from_cells(&cells, &groups, 2).unwrap()
        );
        let e = Placement::among(&cells, &groups, 2, &[true]).unwrap_err();
        assert!(e.to_string().contains("the store has 6 nodes"), "{e}");
    }

    #[test]
    fn bad_cells_are_named() {
        let e = Placement::from_cells(&[vec![0, 1]], &[0, 0, 0], 2).unwrap_err();
        assert!(e.to_string().contains("node 2 is in no cell"), "{e}");
        let e = Placement::from_cells(&[vec![0, 1], vec![1, 2]], &[0, 0, 0], 2).unwrap_err();
        assert!(
            e.to_string().contains("node 1 is in cell 0 and cell 1"),
            "{e}"
        );
        let e = Placement::from_cells(&[vec![0, 5]], &[0, 0], 2).unwrap_err();
        assert!(e.to_string().contains("names node 5"), "{e}");
    }
}
