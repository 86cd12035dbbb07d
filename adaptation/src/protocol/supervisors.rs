//! The supervisors' Raft group heals itself: when the agreed view declares a supervisor
//! failed (or gone), the group's leader removes it from the Raft configuration and adds a
//! live member, one voter per change, so that the group keeps as many voters as configured
//! (fewer when the job has fewer members: always an odd number, since an even group
//! tolerates no more failures than one less). Any live member that is not a voter may be
//! added, also one that was a supervisor before (demoted when the group shrank): a group
//! left short because no member could take a vote is refilled when a node joins. Each
//! change is committed by Raft and enters the agreed log as [`Change::Demote`] or
//! [`Change::Promote`]; a promoted node starts an empty Raft member that catches up from
//! the leader's snapshot of the agreed view (a node promoted again starts from the term and
//! vote its last member had, so that it never votes twice in a term). A job whose
//! supervisors die one after the other, more of them than the first group could lose,
//! keeps agreeing on views as long as each failure leaves a majority of the group of its
//! time.
//!
//! A planned leave of a supervisor hands its vote over first: the leader promotes a live
//! member in its place, then demotes the leaver (a leader that leaves hands its leadership
//! to another voter first, which demotes it); only then is the leave itself agreed (the
//! log takes no leave of a supervisor). With no member to take the vote the group shrinks
//! instead. A leave that would leave the group without a majority of live voters is
//! refused when it is asked ([`Node::request_leave`]).
use std::collections::BTreeSet;

use super::Node;
use crate::agreement::Agreement;
use crate::error::{AdaptError, Result};
use crate::view::{Change, Epoch, NodeId};
use crate::wire::Msg;

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
            (Some(a), false) => {
                self.ballot = a.ballot();
                self.agreement = None;
                self.note("no longer a supervisor: left the Raft group".into());
            }
            (None, true) => {
                let sups: Vec<NodeId> = self.logged.supervisors.iter().copied().collect();
                match Agreement::joining_after(
                    me,
                    &sups,
                    self.cfg.group_seed,
                    self.cfg.agreement.clone(),
                    self.ballot,
                ) {
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
        if voters != self.raft_view.supervisors {
            // Raft applied a configuration the view has not taken yet (cannot last).
            return;
        }
        // A copy: the leader acts (notes, sends) while it looks at them.
        let view_members = self.raft_view.members.clone();
        let initial: BTreeSet<NodeId> = self.cfg.supervisors.iter().copied().collect();
        let target = odd_floor(self.cfg.supervisors.len().min(view_members.len()));
        // Supervisors asked to leave, still in the group and the view.
        let leaving: Vec<NodeId> = self
            .handing_over
            .keys()
            .copied()
            .filter(|n| voters.contains(n) && view_members.contains(n))
            .collect();
        // Any live member that is not a voter and not leaving, also one that was a
        // supervisor before (demoted when the group shrank, or a rejoined node).
        let candidate = view_members
            .iter()
            .copied()
            .find(|n| !voters.contains(n) && !leaving.contains(n) && self.looks_alive(*n));
        let step = if let Some(&gone) = voters
            .iter()
            .find(|v| !view_members.contains(v) && **v != me)
        {
            Some((gone, false))
        } else if let Some(&leaver) = leaving.first() {
            // A planned leave: its vote goes to a live member first (the group keeps its
            // size), then it is removed; with no member to take it, the group shrinks.
            match candidate {
                Some(c) if voters.len() <= target => Some((c, true)),
                _ => {
                    let rest: Vec<NodeId> =
                        voters.iter().copied().filter(|&v| v != leaver).collect();
                    let live = rest
                        .iter()
                        .filter(|&&v| v == me || self.looks_alive(v))
                        .count();
                    if 2 * live > rest.len() && leaver == me {
                        // The leader leaves: it hands its leadership to a live voter first
                        // (and tells it of the leave), which then removes it.
                        let to = rest.iter().copied().find(|&v| self.looks_alive(v));
                        if let Some(to) = to {
                            self.note(format!(
                                "leaving the supervisors: leadership to node {to} first"
                            ));
                            self.regrouped_at = Some(self.now);
                            self.send(to, Msg::Propose(Change::Leave { node: me }));
                            if let Some(a) = self.agreement.as_mut() {
                                let o = a.transfer_leadership(to);
                                self.on_agreement(o);
                            }
                        }
                        None
                    } else if 2 * live > rest.len() {
                        Some((leaver, false))
                    } else {
                        self.note(format!(
                            "supervisor {leaver} asked to leave, but only {live} of the other \
                             voters {rest:?} look alive: its vote is kept for now"
                        ));
                        self.regrouped_at = Some(self.now);
                        None
                    }
                }
            }
        } else if voters.len() < target {
            candidate.map(|n| (n, true))
        } else if voters.len() > target && voters != initial {
            voters.iter().rev().find(|&&v| v != me).map(|&v| (v, false))
        } else {
            None
        };
        let members = view_members.len();
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

    /// Whether `node`, a supervisor, may leave: the Raft group without its vote (with a
    /// live member promoted in its place when there is one) must keep a majority of live
    /// voters. Down, as far as this node knows: declared failed, its process gone
    /// ([`Node::peer_closed`]), or not answering a supervisor's direct ping.
    pub(super) fn check_handover(&self, node: NodeId) -> Result<()> {
        let down = |n: &NodeId| {
            self.logged.failed.contains(n)
                || self.closed.contains(n)
                || self.confirming.contains_key(n)
        };
        let voters = &self.logged.supervisors;
        let rest: Vec<NodeId> = voters.iter().copied().filter(|&v| v != node).collect();
        let live_rest = rest.iter().filter(|v| !down(v)).count();
        let spare = self
            .logged
            .members
            .iter()
            .any(|m| !voters.contains(m) && !down(m));
        let after = rest.len() + usize::from(spare);
        let live_after = live_rest + usize::from(spare);
        if 2 * live_after <= after {
            let down: Vec<NodeId> = voters.iter().copied().filter(|v| down(v)).collect();
            return Err(AdaptError::ChangeRefused(format!(
                "node {node} is a supervisor: without its vote the Raft group {voters:?} \
                 would keep {live_after} live voter(s) of {after} (down: {down:?}{}), not a \
                 majority",
                if spare {
                    ""
                } else {
                    "; no live member to take its vote"
                }
            )));
        }
        Ok(())
    }

    /// A supervisor got a leave of `node`, a supervisor of the Raft group: it is not put
    /// to Raft (the log takes no leave of a supervisor); the leader hands its vote over
    /// first ([`Node::regroup`]). A supervisor that does not lead passes it on to the
    /// leader it knows.
    pub(super) fn hand_over(&mut self, node: NodeId, by: NodeId) {
        if self.handing_over.insert(node, by).is_none() {
            self.note(format!(
                "supervisor {node} asked to leave (by node {by}): handing its vote over first"
            ));
        }
        let me = self.cfg.me;
        match self.agreement.as_ref().and_then(|a| a.leader()) {
            Some(l) if l != me && l != by => self.send(l, Msg::Propose(Change::Leave { node })),
            Some(l) if l == me => self.regroup(),
            _ => {}
        }
    }

    /// A committed change of the Raft group: a supervisor that was handing its vote over
    /// is out of the group now, and its leave is proposed again (by this node).
    pub(super) fn handed_over(&mut self, change: &Change) {
        if let Change::Demote { node } = change {
            if self.handing_over.remove(node).is_some() {
                self.proposals.insert(Change::Leave { node: *node }, 0);
            }
        }
        let members = &self.raft_view.members;
        self.handing_over.retain(|n, _| members.contains(n));
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
