//! The agreed log: changes wanted here go to the supervisors (a failure only once a
//! direct ping went unanswered), Raft commits them, and each committed change that still
//! makes sense at its place in the log becomes the next epoch.
use std::collections::BTreeSet;

use super::{Node, Output};
use crate::agreement::AgreementOutput;
use crate::membership::{MembershipEvent, MembershipOutput};
use crate::view::{Change, Epoch, NodeId, Proposal};
use crate::wire::Msg;

impl Node {
    pub(super) fn on_membership(&mut self, o: MembershipOutput) {
        for (to, bytes) in o.messages {
            self.send(to, Msg::Swim(bytes));
        }
        for e in o.events {
            if let MembershipEvent::Down(node) = e {
                if self.logged.ever.contains(&node) && !self.logged.failed.contains(&node) {
                    self.note(format!("node {node} is down: proposing its failure"));
                    self.want(Change::Fail { node });
                }
            }
        }
    }

    pub(super) fn on_agreement(&mut self, o: AgreementOutput) {
        for (to, bytes) in o.messages {
            self.send(to, Msg::Raft(bytes));
        }
        let mut moved = false;
        if let Some(changes) = o.restored {
            self.restore(changes);
            self.follow_group();
            moved = true;
        }
        for ((_, change), (by, asked_at)) in o.committed.into_iter().zip(o.requested_by) {
            if self.stopped {
                return;
            }
            moved = true;
            // Only changes that still make sense at their place in the log become epochs;
            // every supervisor judges the same log the same way (changes of the group are
            // Raft's own configuration: always taken).
            if !change.is_supervision() {
                if !self.raft_view.takes(&change) {
                    continue;
                }
                // Fenced: asked for by a node that is out of the configuration at this
                // point of the log (declared failed, or gone), in an epoch before it went
                // out.
                if self.raft_view.ever.contains(&by) && !self.raft_view.members.contains(&by) {
                    let known = (self.raft_epoch.min(self.known_epoch())) as usize;
                    let out_at = self.log[..known]
                        .iter()
                        .position(|c| c.node() == by && !matches!(c, Change::Join { .. }))
                        .map_or(0, |i| i as Epoch + 1);
                    self.note(format!(
                        "refused {change:?}: asked by node {by} at epoch {asked_at}, which is \
                         out of the configuration since epoch {out_at}"
                    ));
                    continue;
                }
            }
            self.raft_view.apply(&change);
            self.raft_epoch += 1;
            if change.is_supervision() {
                self.handed_over(&change);
            }
            let epoch = self.raft_epoch;
            if epoch <= self.known_epoch() {
                // Learned from another supervisor first.
                if self.log[(epoch - 1) as usize] != change {
                    self.note(format!(
                        "DIVERGENCE: epoch {epoch} is {:?} here but Raft committed {change:?}",
                        self.log[(epoch - 1) as usize]
                    ));
                }
                continue;
            }
            self.learn(epoch, change.clone());
            if self.stopped {
                return;
            }
            let mut to: BTreeSet<NodeId> = self.logged.members.clone();
            to.insert(change.node());
            to.remove(&self.cfg.me);
            for n in to {
                self.send(
                    n,
                    Msg::ViewChange {
                        epoch,
                        change: change.clone(),
                    },
                );
            }
        }
        if moved && !self.stopped {
            // The view after what Raft applied: what a member catching up gets.
            let known = self.raft_epoch.min(self.known_epoch()) as usize;
            if let Some(a) = self.agreement.as_mut() {
                if let Err(e) = a.set_view(&self.log[..known]) {
                    let line = format!("could not keep the agreed view's snapshot: {e}");
                    self.note(line);
                }
            }
            self.regroup();
        }
    }

    /// This node's Raft member caught up from the leader's snapshot: `changes` are the
    /// changes agreed up to it.
    fn restore(&mut self, changes: Vec<Change>) {
        let len = changes.len() as Epoch;
        let known = self.known_epoch();
        let common = len.min(known) as usize;
        if changes[..common] != self.log[..common] {
            self.note(format!(
                "DIVERGENCE: the leader's snapshot of {len} changes differs from the {known} \
                 known here"
            ));
        }
        self.raft_view = ViewState::replay(&self.genesis_set(), &self.cfg.supervisors, &changes);
        self.raft_epoch = len;
        self.note(format!(
            "caught up from the leader's snapshot ({len} agreed changes)"
        ));
        for (i, change) in changes.into_iter().enumerate().skip(known as usize) {
            self.learn(i as Epoch + 1, change);
            if self.stopped {
                return;
            }
        }
    }

    pub(super) fn want(&mut self, change: Change) {
        if !self.proposals.contains_key(&change) {
            self.proposals.insert(change.clone(), self.now);
            self.propose_now(change);
        }
    }

    pub(super) fn propose_now(&mut self, change: Change) {
        if self.agreement.is_some() {
            self.supervise(change, self.cfg.me);
        } else if let Some(s) = self.pick_supervisor() {
            self.send(s, Msg::Propose(change));
        }
    }

    /// A supervisor puts a change to Raft; a failure only once the node failed to answer a
    /// direct ping (a false suspicion must not evict a node that can still answer).
    pub(super) fn supervise(&mut self, change: Change, by: NodeId) {
        if let Change::Fail { node } = change {
            if node == self.cfg.me {
                return;
            }
            // A node that left is gone, not failed, once every member reports its leave
            // complete. Until then it may have stopped before every member had its last
            // messages, and its failure must be agreed for them to move on.
            let left_at = self
                .log
                .iter()
                .position(|c| *c == Change::Leave { node })
                .map(|i| i as Epoch + 1);
            if let Some(e) = left_at {
                let me = self.cfg.me;
                let all_done = self.logged.members.iter().all(|m| {
                    let done = if *m == me {
                        self.epoch
                    } else {
                        self.done_by.get(m).copied().unwrap_or(0)
                    };
                    done >= e
                });
                if all_done {
                    return;
                }
            }
            if self.closed.contains(&node) {
                // Its process is gone (see `peer_closed`): no ping can be answered.
                self.confirming.remove(&node);
                self.put_to_raft(change, by);
                return;
            }
            let recently = self
                .answered_at
                .get(&node)
                .is_some_and(|&t| self.now.saturating_sub(t) < self.cfg.retry_ticks);
            if recently || self.confirming.contains_key(&node) {
                return;
            }
            let nonce = self.next_nonce;
            self.next_nonce += 1;
            self.confirming
                .insert(node, (nonce, self.now + self.cfg.confirm_ticks));
            self.send(node, Msg::Ping { nonce });
            return;
        }
        self.put_to_raft(change, by);
    }

    /// Proposes `change` to Raft, asked by `by` in this node's known epoch; a leave of a
    /// supervisor waits for its vote to be handed over ([`Node::hand_over`]).
    pub(super) fn put_to_raft(&mut self, change: Change, by: NodeId) {
        if let Change::Leave { node } = change {
            if self.raft_view.supervisors.contains(&node) && self.raft_view.members.contains(&node)
            {
                self.hand_over(node, by);
                return;
            }
        }
        let proposal = Proposal {
            change,
            by,
            epoch: self.known_epoch(),
        };
        if let Some(a) = self.agreement.as_mut() {
            let o = a.propose_by(&proposal);
            self.on_agreement(o);
        }
    }

    /// Suspected nodes that did not answer in time: their failure goes to Raft.
    pub(super) fn confirm_failures(&mut self) {
        let now = self.now;
        // The ping goes again a few times before the deadline: one lost message must not
        // evict a node that answers.
        let step = (self.cfg.confirm_ticks / 3).max(1);
        let again: Vec<(NodeId, u64)> = self
            .confirming
            .iter()
            .filter(|(_, (_, deadline))| now < *deadline && (*deadline - now).is_multiple_of(step))
            .map(|(n, (nonce, _))| (*n, *nonce))
            .collect();
        for (node, nonce) in again {
            self.send(node, Msg::Ping { nonce });
        }
        let silent: Vec<NodeId> = self
            .confirming
            .iter()
            .filter(|(_, (_, deadline))| now >= *deadline)
            .map(|(n, _)| *n)
            .collect();
        for node in silent {
            self.confirming.remove(&node);
            let change = Change::Fail { node };
            if is_done(
                &change,
                &self.logged.members,
                &self.logged.ever,
                &self.logged.failed,
            ) {
                continue;
            }
            self.note(format!(
                "node {node} did not answer a direct ping: proposing its failure"
            ));
            self.put_to_raft(change, self.cfg.me);
        }
    }

    pub(super) fn retry_proposals(&mut self) {
        let (members, ever, failed) =
            (&self.logged.members, &self.logged.ever, &self.logged.failed);
        self.proposals
            .retain(|c, _| !is_done(c, members, ever, failed));
        // A new leader: what was proposed to the old one may be lost with it (a follower
        // forwards proposals to the leader it knows, raft-rs drops them while it knows
        // none); proposed again now rather than after `retry_ticks / 2`.
        let leader = self.agreement.as_ref().and_then(|a| a.leader());
        if leader != self.leader_seen {
            self.leader_seen = leader;
            if leader.is_some() {
                for at in self.proposals.values_mut() {
                    *at = 0;
                }
            }
        }
        let due: Vec<Change> = self
            .proposals
            .iter_mut()
            // `at == 0`: a join announced at creation, not sent yet.
            .filter(|(_, at)| {
                **at == 0 || self.now.saturating_sub(**at) >= self.cfg.retry_ticks / 2
            })
            .map(|(c, at)| {
                *at = self.now;
                c.clone()
            })
            .collect();
        for c in due {
            self.propose_now(c);
        }
    }

    /// `node` closed its links and refuses connections (`peer_closed`): if it is the Raft
    /// leader this supervisor follows, the group elects another one at once instead of
    /// waiting out the dead leader's lease (the election timeout, up to 2 x
    /// `election_ticks`). One voter campaigns, the lowest-numbered voter that is not known
    /// to be gone, so that the live voters do not split their votes; the others grant it
    /// (see [`crate::agreement::Agreement::campaign_now`]). A live leader is never the
    /// subject: its listener would accept the connection.
    pub(super) fn campaign_if_leader_closed(&mut self, node: NodeId) {
        let Some(a) = self.agreement.as_ref() else {
            return;
        };
        if a.leader() != Some(node) {
            return;
        }
        let first_live = a
            .voters()
            .into_iter()
            .find(|v| !self.closed.contains(v) && !self.logged.failed.contains(v));
        if first_live != Some(self.cfg.me) {
            return;
        }
        self.note(format!(
            "the Raft leader, node {node}, is gone: campaigning at once"
        ));
        let o = self
            .agreement
            .as_mut()
            .expect("checked above")
            .campaign_now();
        self.on_agreement(o);
    }

    /// A supervisor that is not known to have failed, rotating.
    pub(super) fn pick_supervisor(&mut self) -> Option<NodeId> {
        let alive: Vec<NodeId> = self
            .contacts()
            .into_iter()
            .filter(|s| !self.logged.failed.contains(s) && *s != self.cfg.me)
            .collect();
        if alive.is_empty() {
            return None;
        }
        self.next_supervisor = self.next_supervisor.wrapping_add(1);
        Some(alive[self.next_supervisor % alive.len()])
    }

    /// The nodes proposals and status reports go to: the supervisors of the known log;
    /// for a joiner that has not caught up to its own join yet, every initial member (the
    /// first supervisors may all be gone: any member forwards a proposal and answers a
    /// status).
    pub(super) fn contacts(&self) -> Vec<NodeId> {
        if self.cfg.joining.is_some() && !self.logged.ever.contains(&self.cfg.me) {
            self.cfg.genesis.clone()
        } else {
            self.logged.supervisors.iter().copied().collect()
        }
    }

    /// Records the agreed change of `epoch` and processes what can be processed.
    pub(super) fn learn(&mut self, epoch: Epoch, change: Change) {
        let known = self.known_epoch();
        if epoch <= known {
            return;
        }
        if change == (Change::Fail { node: self.cfg.me }) {
            // Evicted (cut off, or too slow): out at once, without replaying the changes
            // before it (their participants moved on and would never answer).
            self.evicted = Some(epoch);
            self.stop(format!(
                "evicted: the agreed view of epoch {epoch} says this node failed"
            ));
            return;
        }
        self.early_log.insert(epoch, change);
        while let Some(change) = self.early_log.remove(&(self.known_epoch() + 1)) {
            // A joiner does not know when the changes before its own join were agreed; its
            // join it learns now, as the members do (the view that join ends is one a node
            // failing soon after may still have served in: see `Node::mark_losses`).
            self.logged.apply(&change);
            let replayed = self.cfg.joining.is_some() && !self.logged.ever.contains(&self.cfg.me);
            self.log.push(change);
            self.learned_at.push((!replayed).then_some(self.now));
            self.out.push(Output::Phase {
                epoch: self.log.len() as Epoch,
                phase: "agreed",
            });
        }
        // The Raft group follows the log: a node promoted starts its member (empty, it
        // catches up from the leader's snapshot); one demoted drops it.
        self.follow_group();
        self.advance();
    }
}

/// The configuration after a prefix of the agreed log.
#[derive(Clone, Debug, Default)]
pub(super) struct ViewState {
    pub(super) members: BTreeSet<NodeId>,
    pub(super) ever: BTreeSet<NodeId>,
    pub(super) failed: BTreeSet<NodeId>,
    /// The supervisors (voters of the Raft group).
    pub(super) supervisors: BTreeSet<NodeId>,
}

impl ViewState {
    pub(super) fn genesis(members: &BTreeSet<NodeId>, supervisors: &[NodeId]) -> ViewState {
        let supervisors: BTreeSet<NodeId> = supervisors.iter().copied().collect();
        ViewState {
            members: members.clone(),
            ever: members.clone(),
            failed: BTreeSet::new(),
            supervisors,
        }
    }

    /// The configuration after `genesis` and `changes`.
    pub(super) fn replay(
        members: &BTreeSet<NodeId>,
        supervisors: &[NodeId],
        changes: &[Change],
    ) -> ViewState {
        let mut v = ViewState::genesis(members, supervisors);
        for c in changes {
            v.apply(c);
        }
        v
    }

    pub(super) fn apply(&mut self, change: &Change) {
        match change {
            Change::Join { node, .. } => {
                self.members.insert(*node);
                self.ever.insert(*node);
            }
            Change::Leave { node } => {
                self.members.remove(node);
            }
            Change::Fail { node } => {
                self.members.remove(node);
                self.failed.insert(*node);
            }
            Change::Promote { node } => {
                self.supervisors.insert(*node);
            }
            Change::Demote { node } => {
                self.supervisors.remove(node);
            }
        }
    }

    /// Whether the log may take a requested `change` now, at this point: it is not done
    /// already, and a supervisor does not leave (it hands its vote over first: the leave
    /// is taken once it is out of the group, see `supervisors.rs`).
    pub(super) fn takes(&self, change: &Change) -> bool {
        if is_done(change, &self.members, &self.ever, &self.failed) {
            return false;
        }
        match change {
            Change::Join { .. } => true,
            Change::Leave { node } => self.members.len() > 1 && !self.supervisors.contains(node),
            Change::Fail { .. } => self.members.len() > 1,
            // Never requested: committed as Raft configuration changes.
            Change::Promote { .. } | Change::Demote { .. } => false,
        }
    }
}

/// Whether `change` is already reflected by the log (a retried or duplicate proposal).
/// A node that crashes while it leaves still gets its failure agreed (else the change it
/// was leaving in would wait for it forever).
pub(super) fn is_done(
    change: &Change,
    members: &BTreeSet<NodeId>,
    ever: &BTreeSet<NodeId>,
    failed: &BTreeSet<NodeId>,
) -> bool {
    match change {
        Change::Join { node, .. } => ever.contains(node),
        Change::Leave { node } => !members.contains(node),
        Change::Fail { node } => failed.contains(node) || !ever.contains(node),
        // Only the Raft group's leader makes these, never a request.
        Change::Promote { .. } | Change::Demote { .. } => true,
    }
}
