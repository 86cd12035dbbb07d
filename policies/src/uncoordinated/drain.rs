//! Draining a node under the uncoordinated policy with message logging (`krun node drain N`):
//! each rank of the node takes a fresh own checkpoint (no barrier, the others keep
//! running); once all of them are safe, the node counts as leaving and its ranks restart
//! alone elsewhere from those checkpoints, as after a failure of the node: they rejoin the
//! running ranks and replay what they received since (the old processes are ended by their
//! node when the restart is ordered). No other rank stops or rolls back. When every moved
//! rank runs again the policy records `Drained` and tells the user; the node may leave.
//!
//! Refused with the reason, and nothing moves: without message logging (a rank cannot
//! move alone: the recovery line would roll others back), during a recovery or another
//! drain, or when no spare node is left to take the ranks.
use super::Uncoordinated;
use crate::primitives::{AgreedView, DecisionKind, Millis, NodeId, Rank, Reads, Version};
use crate::report::{NoticeKind, RestartGroup};
use crate::Action;
use std::collections::BTreeSet;

/// A drain in progress.
#[derive(Debug)]
pub(super) struct Drain {
    node: NodeId,
    asked_at: Millis,
    ranks: BTreeSet<Rank>,
    /// The version of the fresh own checkpoint every rank of the node takes (the same for
    /// all of them: the ranks' numberings are their own, so they can be aligned).
    version: Version,
    /// Ranks whose fresh own checkpoint is not safe yet.
    waiting: BTreeSet<Rank>,
    /// The ranks were planned to move (a recovery carries them out).
    moving: bool,
}

impl Uncoordinated {
    fn refuse_drain(now: Millis, node: NodeId, reason: String) -> Vec<Action> {
        vec![Action::notice(
            now,
            NoticeKind::DrainRefused { node, reason },
        )]
    }

    /// `Event::DrainRequested`.
    pub(super) fn on_drain(&mut self, now: Millis, node: NodeId, view: AgreedView) -> Vec<Action> {
        if view.epoch >= self.view.epoch {
            self.view = view;
        }
        if !self.cfg.logging {
            return Self::refuse_drain(
                now,
                node,
                "the uncoordinated policy without message logging cannot move a rank alone \
                 (its recovery line would roll other ranks back)"
                    .into(),
            );
        }
        if self.recovery.is_some() || self.drain.is_some() || self.end.is_some() {
            return Self::refuse_drain(
                now,
                node,
                "a recovery or another drain is in progress".into(),
            );
        }
        let ranks: BTreeSet<Rank> = (0..self.slots.len() as Rank)
            .filter(|r| self.slots[*r as usize].node == node && !self.exited.contains(r))
            .collect();
        if ranks.is_empty() {
            return vec![Action::notice(
                now,
                NoticeKind::Drained {
                    node,
                    version: None,
                    moved: Vec::new(),
                    continuing: (0..self.slots.len() as Rank).collect(),
                    seconds: 0.0,
                },
            )];
        }
        if !self
            .spares
            .iter()
            .any(|&s| s != node && self.view.contains(s))
        {
            return Self::refuse_drain(
                now,
                node,
                "no spare node is left to take its ranks (add one with `krun node add`)".into(),
            );
        }
        let d = self
            .ids
            .decision(self.view.epoch, DecisionKind::DrainStarted { node });
        let version = ranks
            .iter()
            .map(|&r| self.ranks[r as usize].next_version)
            .max()
            .unwrap_or(1);
        for &r in &ranks {
            let c = &mut self.ranks[r as usize];
            c.next_version = version;
            if c.inflight.is_none() {
                c.next_at = Some(now);
            }
        }
        self.drain = Some(Drain {
            node,
            asked_at: now,
            version,
            waiting: ranks.clone(),
            ranks,
            moving: false,
        });
        vec![Action::Record(d)]
    }

    /// `rank`'s own checkpoint `version` became safe (`safe`), or its capture failed.
    pub(super) fn drain_checkpoint(
        &mut self,
        now: Millis,
        rank: Rank,
        version: Version,
        safe: bool,
    ) {
        let Some(d) = self.drain.as_mut() else {
            return;
        };
        if d.moving || !d.ranks.contains(&rank) {
            return;
        }
        if safe && version == d.version {
            d.waiting.remove(&rank);
        } else {
            // A capture ordered before the drain, or a failed one: the drain's is asked
            // for at once.
            self.ranks[rank as usize].next_at = Some(now);
        }
    }

    /// Moves the ranks once their checkpoints are safe; ends the drain once they run
    /// again.
    pub(super) fn drain_progress(&mut self, now: Millis, reads: &dyn Reads) -> Vec<Action> {
        let Some(d) = self.drain.as_ref() else {
            return Vec::new();
        };
        if self.end.is_some() {
            self.drain = None;
            return Vec::new();
        }
        if !d.moving {
            if !d.waiting.is_empty() || self.recovery.is_some() {
                return Vec::new();
            }
            let (node, ranks) = (d.node, d.ranks.clone());
            // The node counts as leaving: its ranks restart as after its failure.
            self.view.nodes.retain(|&n| n != node);
            self.spares.remove(&node);
            let epoch = self.view.epoch;
            let out = self.plan(now, epoch, Vec::new(), ranks, reads);
            if let Some(d) = self.drain.as_mut() {
                d.moving = true;
            }
            return out;
        }
        if self.recovery.is_some() {
            return Vec::new();
        }
        let d = self.drain.take().expect("checked above");
        let version = Some(d.version);
        let mut groups: Vec<RestartGroup> = Vec::new();
        for &r in &d.ranks {
            let node = self.slots[r as usize].node;
            match groups.iter_mut().find(|g| g.node == node) {
                Some(g) => g.ranks.push(r),
                None => groups.push(RestartGroup {
                    ranks: vec![r],
                    node,
                    spare: true,
                    source: None,
                }),
            }
        }
        let rec = self.ids.decision(
            self.view.epoch,
            DecisionKind::Drained {
                node: d.node,
                version: d.version,
            },
        );
        vec![
            Action::Record(rec),
            Action::notice(
                now,
                NoticeKind::Drained {
                    node: d.node,
                    version,
                    moved: groups,
                    // The others never stopped (nothing to "continue from").
                    continuing: Vec::new(),
                    seconds: (now - d.asked_at) as f64 / 1000.0,
                },
            ),
        ]
    }
}
