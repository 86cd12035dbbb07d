//! The supervisors' Raft group heals itself: when the agreed view declares a supervisor
//! failed (or gone), the group's leader removes it from the Raft configuration and adds a
//! live member that never was a supervisor, one voter per change, so that the group keeps
//! as many voters as configured (fewer when the job has fewer members: always an odd
//! number, since an even group tolerates no more failures than one less). Each change is
//! committed by Raft and enters the agreed log as [`Change::Demote`] or
//! [`Change::Promote`]; a promoted node starts an empty Raft member that catches up from
//! the leader's snapshot of the agreed view. A job whose supervisors die one after the
//! other, more of them than the first group could lose, keeps agreeing on views as long as
//! each failure leaves a majority of the group of its time.
use std::collections::BTreeSet;

use super::Node;
use crate::agreement::Agreement;
use crate::view::{Change, Epoch, NodeId};

/// `n` if it is odd, else `n - 1` (at least 1).
fn odd_floor(n: usize) -> usize {
    if n % 2 == 1 {
        n
    } else {
        n.saturating_sub(1).max(1)
    }
}

impl Node {
    /// The members of epoch 0.
    pub(super) fn genesis_set(&self) -> BTreeSet<NodeId> {
        self.cfg.genesis.iter().copied().collect()
    }

    /// Starts or drops this node's Raft member as the known log says it is a supervisor.
    pub(super) fn follow_group(&mut self) {
        if self.stopped {
            return;
        }
        let me = self.cfg.me;
        let in_group = self.logged.supervisors.contains(&me);
        match (self.agreement.as_mut(), in_group) {
            (Some(a), true) => {
                // A member waiting for its first snapshot takes any member's messages
                // (see below).
                if a.voters().is_empty() {
                    a.set_peers(&self.logged.members);
                } else {
                    a.set_peers(&self.logged.supervisors);
                }
            }
            (Some(_), false) => {
                self.agreement = None;
                self.note("no longer a supervisor: left the Raft group".into());
            }
            (None, true) => {
                let sups: Vec<NodeId> = self.logged.supervisors.iter().copied().collect();
                match Agreement::joining(me, &sups, self.cfg.group_seed, self.cfg.agreement.clone())
                {
                    Ok(mut a) => {
                        // Until its first snapshot it takes Raft messages from any member:
                        // a joiner may know the first group wrong (it is not in its
                        // genesis), and the leader is whoever leads now.
                        a.set_peers(&self.logged.members);
                        self.agreement = Some(a);
                        // Judged from the leader's snapshot on: nothing before it.
                        self.raft_epoch = 0;
                        self.note(format!(
                            "promoted to supervisor (group {sups:?}): catching up from the \
                             leader's snapshot"
                        ));
                    }
                    Err(e) => self.note(format!("could not start a Raft member: {e}")),
                }
            }
            (None, false) => {}
        }
    }

    /// A node that answered lately: it sent its status within a few periods.
    fn looks_alive(&self, node: NodeId) -> bool {
        let recent = 3 * self.cfg.status_ticks.max(1);
        !self.closed.contains(&node)
            && !self.confirming.contains_key(&node)
            && self
                .status_at
                .get(&node)
                .is_some_and(|&t| self.now.saturating_sub(t) <= recent)
    }

    /// The group's leader moves the Raft configuration one voter towards the one the
    /// agreed view calls for (see the module doc); at most one change in flight.
    pub(super) fn regroup(&mut self) {
        let me = self.cfg.me;
        let Some(a) = self.agreement.as_ref() else {
            return;
        };
        if self.stopped || a.leader() != Some(me) || a.changing_voters() {
            return;
        }
        let gap = (self.cfg.retry_ticks / 4).max(1);
        if self.regrouped_at.is_some_and(|t| self.now < t + gap) {
            return;
        }
        let voters = a.voters();
        let view = &self.raft_view;
        if voters != view.supervisors {
            // Raft applied a configuration the view has not taken yet (cannot last).
            return;
        }
        let initial: BTreeSet<NodeId> = self.cfg.supervisors.iter().copied().collect();
        let target = odd_floor(self.cfg.supervisors.len().min(view.members.len()));
        let step = if let Some(&gone) = voters
            .iter()
            .find(|v| !view.members.contains(v) && **v != me)
        {
            Some((gone, false))
        } else if voters.len() < target {
            view.members
                .iter()
                .copied()
                .find(|n| {
                    !voters.contains(n) && !view.ever_supervised.contains(n) && self.looks_alive(*n)
                })
                .map(|n| (n, true))
        } else if voters.len() > target && voters != initial {
            voters.iter().rev().find(|&&v| v != me).map(|&v| (v, false))
        } else {
            None
        };
        let members = view.members.len();
        let Some((node, add)) = step else {
            return;
        };
        self.note(format!(
            "supervisor group {voters:?}: {} node {node} (the view has {members} members)",
            if add { "adding" } else { "removing" },
        ));
        self.regrouped_at = Some(self.now);
        if let Some(a) = self.agreement.as_mut() {
            let o = a.propose_voter(node, add);
            self.on_agreement(o);
        }
    }

    /// A change of the Raft group at `epoch`: no entry moves and no member changes, so it
    /// ends at once (the locator of the epoch is the previous one).
    pub(super) fn install_group_change(&mut self, epoch: Epoch, change: &Change) {
        let members = self.members.clone();
        let locator = self.locators[0].clone();
        self.install(epoch, members, locator);
        if let Change::Promote { node } | Change::Demote { node } = change {
            if self.members.contains(&self.cfg.me) {
                self.note(format!(
                    "epoch {epoch}: node {node} {} the supervisors",
                    if matches!(change, Change::Promote { .. }) {
                        "joins"
                    } else {
                        "leaves"
                    }
                ));
            }
        }
    }
}
