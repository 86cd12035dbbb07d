//! The four steps of a change (before migration, send out, receive, after migration),
//! with the failure repair's scan of orphan entries.
use std::collections::{BTreeMap, BTreeSet};

use super::{witnesses_in, Migration, Node, Output, Step, Witnessed, LOCATOR_HISTORY};
use crate::locator::CellTreeLocator;
use crate::service::ServiceId;
use crate::view::{Change, EntryId, Epoch, NodeId};
use crate::wire::{Msg, Request};

impl Node {
    /// Starts and finishes changes for as long as their acknowledgements are in.
    pub(super) fn advance(&mut self) {
        loop {
            if self.stopped {
                return;
            }
            if self.migration.is_some() {
                if !self.try_finish() {
                    return;
                }
                continue;
            }
            if self.epoch >= self.known_epoch() {
                return;
            }
            self.start(self.epoch + 1);
        }
    }

    pub(super) fn start(&mut self, epoch: Epoch) {
        let change = self.log[(epoch - 1) as usize].clone();
        if change.is_supervision() {
            self.install_group_change(epoch, &change);
            if self.members.contains(&self.cfg.me) {
                self.out.push(Output::Stable { epoch });
                // Requests delayed while the change was pending go on (or wait for the
                // next one).
                for r in std::mem::take(&mut self.delayed) {
                    self.route(r);
                }
            }
            return;
        }
        let me = self.cfg.me;
        let mut members = self.members.clone();
        let mut locator = self.locators[0].clone();
        let mut participants = self.members.clone();
        match &change {
            Change::Join { node, .. } => {
                members.insert(*node);
                participants.insert(*node);
                locator.add_node(*node);
            }
            Change::Leave { node } => {
                members.remove(node);
                locator.remove_node(*node);
            }
            Change::Fail { node } => {
                members.remove(node);
                participants.remove(node);
                locator.remove_node(*node);
            }
            // Installed at once above.
            Change::Promote { .. } | Change::Demote { .. } => {}
        }
        // Failure detection follows the view.
        let now = self.now;
        match &change {
            Change::Join { node, .. } if *node == me => {
                for &n in members.iter().filter(|&&n| n != me) {
                    let o = self.membership.add_member(n, now);
                    self.on_membership(o);
                }
            }
            Change::Join { node, .. } if participants.contains(&me) => {
                let o = self.membership.add_member(*node, now);
                self.on_membership(o);
            }
            // A leaving node stays watched until its change is over: if it crashes meanwhile,
            // its failure must be detected.
            Change::Fail { node } if *node != me => {
                let o = self.membership.remove_member(*node, now);
                self.on_membership(o);
            }
            _ => {}
        }
        if let Change::Fail { node } = &change {
            if *node == me {
                self.stop(format!(
                    "the agreed view of epoch {epoch} says this node failed"
                ));
                return;
            }
        }
        if !participants.contains(&me) {
            // A change from before this node joined: replayed to get the same locator.
            self.install(epoch, members, locator);
            return;
        }
        // Step 1: before migration.
        for (s, svc) in self.services.iter_mut().enumerate() {
            let scope = &self.scopes[s];
            let leaving: Vec<EntryId> = svc
                .managed()
                .into_iter()
                .filter(|&e| locator.manager_in(scope, e) != me)
                .collect();
            svc.before_migration(epoch, &leaving);
        }
        for &p in participants.iter().filter(|&&p| p != me) {
            self.send(p, Msg::Prepared { epoch });
        }
        self.migration = Some(Migration {
            epoch,
            change,
            participants,
            members,
            locator,
            step: Step::Prepared,
        });
    }

    /// The participants this node still waits for in `m`: not itself, not failed.
    pub(super) fn awaited(&self, m: &Migration) -> Vec<NodeId> {
        m.participants
            .iter()
            .copied()
            .filter(|p| *p != self.cfg.me && !self.logged.failed.contains(p))
            .collect()
    }

    /// Moves the current change on; true when it finished.
    pub(super) fn try_finish(&mut self) -> bool {
        let Some(m) = self.migration.as_ref() else {
            return true;
        };
        let epoch = m.epoch;
        let awaited = self.awaited(m);
        let acks = self.acks.entry(epoch).or_default();
        if m.step == Step::Prepared {
            if !awaited.iter().all(|p| acks.prepared.contains(p)) {
                return false;
            }
            self.out.push(Output::Phase {
                epoch,
                phase: "prepared",
            });
            self.send_out();
            self.out.push(Output::Phase {
                epoch,
                phase: "sent",
            });
        }
        let Some(m) = self.migration.as_ref() else {
            return true;
        };
        let acks = self.acks.entry(epoch).or_default();
        if !awaited.iter().all(|p| acks.sent.contains_key(p)) {
            return false;
        }
        let n = self.services.len();
        let mut problems = Vec::new();
        for p in &awaited {
            let want = acks.sent.get(p).cloned().unwrap_or_default();
            let mut got = vec![0u32; n];
            for (s, _) in acks.received.get(p).into_iter().flatten() {
                if let Some(c) = got.get_mut(*s as usize) {
                    *c += 1;
                }
            }
            if want != got {
                problems.push(format!(
                    "epoch {epoch}: node {p} sent {want:?} entries per service, {got:?} arrived"
                ));
            }
        }
        let _ = m;
        for p in problems {
            self.note(p);
        }
        self.out.push(Output::Phase {
            epoch,
            phase: "received",
        });
        // Step 4: after migration.
        let Some(m) = self.migration.take() else {
            return true;
        };
        for svc in self.services.iter_mut() {
            svc.after_migration(epoch);
        }
        let leaving = matches!(m.change, Change::Leave { node } if node == self.cfg.me);
        if let Change::Leave { node } = m.change {
            if node != self.cfg.me {
                // Its copies reached the members that stay only if it went through its send
                // out (its `Sent` follows its copies on every link): a leaver that failed
                // before, and was not waited for, took them along.
                let sent = self
                    .acks
                    .get(&epoch)
                    .is_some_and(|a| a.sent.contains_key(&node));
                if sent {
                    self.handed_over.insert(node);
                }
                let o = self.membership.remove_member(node, self.now);
                self.on_membership(o);
            }
        }
        self.mark_losses(&m, epoch);
        let old_members = std::mem::replace(&mut self.members, m.members.clone());
        self.install(epoch, m.members, m.locator);
        self.forget_adopted();
        if !leaving {
            self.refresh_witnesses(&old_members);
        }
        self.acks.retain(|&e, _| e > epoch);
        self.out.push(Output::Stable { epoch });
        // Responses held for witnesses are not sent blindly (an `Observe` may have been
        // lost, or its witness failed): the requests go again, with the delayed ones, to
        // their managers in the new view, which answer them from the entry's client table
        // once its witnesses there have observed the answer.
        let held: Vec<Witnessed> = std::mem::take(&mut self.witnessed).into_values().collect();
        self.delayed
            .splice(0..0, held.into_iter().map(|w| w.request));
        for r in std::mem::take(&mut self.delayed) {
            if leaving {
                // Not a member any more: hand the request to its manager in the new view.
                if let Some(m) = self.manager_of(r.service, r.entry) {
                    self.send(m, Msg::Request(r));
                }
            } else {
                self.route(r);
            }
        }
        if leaving {
            self.stop(format!("left the configuration at epoch {epoch}"));
        } else {
            // Requests submitted here go again to their (possibly new) managers.
            let again: Vec<Request> = self
                .pending
                .values_mut()
                .map(|p| {
                    p.sent_at = self.now;
                    p.request.clone()
                })
                .collect();
            for r in again {
                self.route(r);
            }
        }
        true
    }

    /// Sends witness copies of the entries managed here that arrived in the change just
    /// finished, or whose witnesses changed with the view.
    pub(super) fn refresh_witnesses(&mut self, old_members: &BTreeSet<NodeId>) {
        let arrived = std::mem::take(&mut self.arrived);
        let me = self.cfg.me;
        let mut sends = Vec::new();
        for (s, svc) in self.services.iter().enumerate() {
            let k = svc.witnesses();
            if k == 0 {
                continue;
            }
            let now = witnesses_in(&self.members, me, k);
            let before = witnesses_in(old_members, me, k);
            for entry in svc.managed() {
                let moved = arrived.contains(&(s as ServiceId, entry));
                let targets: Vec<NodeId> = if moved {
                    now.clone()
                } else {
                    now.iter()
                        .copied()
                        .filter(|w| !before.contains(w))
                        .collect()
                };
                if targets.is_empty() {
                    continue;
                }
                if let Some(copy) = svc.witness_copy(entry) {
                    for &w in &targets {
                        sends.push((w, s as ServiceId, entry, copy.clone()));
                    }
                }
            }
        }
        for (to, service, entries) in batches(sends) {
            self.send(to, Msg::Copies { service, entries });
        }
    }

    /// Steps 2 and 3: entries and orphans out to their new managers, then `Sent` to all.
    pub(super) fn send_out(&mut self) {
        let Some(m) = self.migration.as_mut() else {
            return;
        };
        m.step = Step::Sent;
        let me = self.cfg.me;
        let epoch = m.epoch;
        let n = self.services.len();
        let failed = match m.change {
            Change::Fail { node } => Some(node),
            _ => None,
        };
        let mut counts: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        // Counted once per (receiver, entry): the receiver counts distinct entries.
        let mut counted: BTreeSet<(NodeId, ServiceId, EntryId)> = BTreeSet::new();
        let mut sends = Vec::new();
        // An entry for a node that is failing stays here until the next change places it;
        // a node that is leaving hands such entries to a member that stays.
        let leaving = matches!(m.change, Change::Leave { node } if node == me);
        let keeper = if leaving {
            m.members
                .iter()
                .copied()
                .find(|n| *n != me && !self.logged.failed.contains(n))
        } else {
            Some(me)
        };
        for (s, svc) in self.services.iter_mut().enumerate() {
            let scope = &self.scopes[s];
            for entry in svc.managed() {
                let mut to = m.locator.manager_in(scope, entry);
                if self.logged.failed.contains(&to) {
                    to = keeper.unwrap_or(me);
                }
                if to == me {
                    continue;
                }
                // The previous manager keeps a copy: if the new one fails before its witness
                // has one, the failure scan still finds the entry (here, or at the member a
                // leaving node hands its copies to).
                let copy = (svc.witnesses() > 0)
                    .then(|| svc.witness_copy(entry))
                    .flatten();
                if let Some(state) = svc.send_out(entry) {
                    if counted.insert((to, s as ServiceId, entry)) {
                        counts.entry(to).or_insert_with(|| vec![0; n])[s] += 1;
                    }
                    sends.push((to, s as ServiceId, entry, state));
                    if let Some(copy) = copy {
                        svc.observe_response(entry, &copy);
                    }
                }
            }
            if let Some(failed) = failed {
                // Failure repair: the failed node managed these under one of the recent views
                // (it may have stopped before sending them on). Copies of entries it had
                // already handed over are merged away by version at their managers.
                let previous: Vec<&CellTreeLocator> = self.locators.iter().collect();
                let orphan = |e: EntryId| previous.iter().any(|l| l.manager_in(scope, e) == failed);
                for (entry, state) in svc.scan(&orphan) {
                    let to = m.locator.manager_in(scope, entry);
                    if to == me || self.logged.failed.contains(&to) {
                        svc.receive(entry, state);
                        self.arrived.insert((s as ServiceId, entry));
                    } else {
                        if counted.insert((to, s as ServiceId, entry)) {
                            counts.entry(to).or_insert_with(|| vec![0; n])[s] += 1;
                        }
                        sends.push((to, s as ServiceId, entry, state));
                    }
                }
            }
        }
        // A leaving node's copies (for failure repair, including those of the entries it
        // just handed over) go to the entry's next two witnesses in the new view, never its
        // new manager: the leave removes one copy, so one failure during it must not take
        // the others.
        let mut copies = Vec::new();
        if let (true, Some(keeper)) = (leaving, keeper) {
            for (s, svc) in self.services.iter_mut().enumerate() {
                let scope = &self.scopes[s];
                for (entry, payload) in svc.handover_copies() {
                    let manager = m.locator.manager_in(scope, entry);
                    let mut targets: Vec<NodeId> =
                        witnesses_in(&m.members, manager, m.members.len())
                            .into_iter()
                            .filter(|w| *w != me && !self.logged.failed.contains(w))
                            .take(2)
                            .collect();
                    if targets.is_empty() {
                        targets.push(keeper);
                    }
                    for to in targets {
                        copies.push((to, s as ServiceId, entry, payload.clone()));
                    }
                }
            }
        }
        let joiner = match m.change {
            Change::Join { node, .. } if node != me => Some(node),
            _ => None,
        };
        let participants: Vec<NodeId> = m
            .participants
            .iter()
            .copied()
            .filter(|&p| p != me)
            .collect();
        for (to, service, entries) in batches(sends) {
            self.send(
                to,
                Msg::EntryData {
                    epoch,
                    service,
                    entries,
                },
            );
        }
        for (to, service, entries) in batches(copies) {
            self.send(to, Msg::Copies { service, entries });
        }
        // A joiner learns which buckets were lost, as every member knows.
        if let Some(node) = joiner {
            let lost: Vec<(ServiceId, Vec<u32>)> = self
                .lost
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(s, l)| (s as ServiceId, l.iter().map(|&b| b as u32).collect()))
                .collect();
            for (service, buckets) in lost {
                self.send(node, Msg::Lost { service, buckets });
            }
        }
        // After a failure, the marks expected here go before `Sent` (see `losses.rs`).
        self.announce_losses();
        for p in participants {
            let c = counts.remove(&p).unwrap_or_else(|| vec![0; n]);
            self.send(p, Msg::Sent { epoch, counts: c });
        }
    }

    pub(super) fn install(
        &mut self,
        epoch: Epoch,
        members: BTreeSet<NodeId>,
        locator: CellTreeLocator,
    ) {
        self.epoch = epoch;
        self.members = members;
        self.locators.push_front(locator);
        self.locators.truncate(LOCATOR_HISTORY);
    }
}

/// Entries with their states, as one message carries them.
pub(super) type EntryBatch = Vec<(EntryId, Vec<u8>)>;

/// Largest batch of entries in one message, in bytes of state.
pub(super) const BATCH_BYTES: usize = 1 << 20;

/// Groups `(to, service, entry, state)` into messages per destination and service, in the
/// order given, each holding at most [`BATCH_BYTES`] of state (and at least one entry).
pub(super) fn batches(
    items: Vec<(NodeId, ServiceId, EntryId, Vec<u8>)>,
) -> Vec<(NodeId, ServiceId, EntryBatch)> {
    let mut open: BTreeMap<(NodeId, ServiceId), (EntryBatch, usize)> = BTreeMap::new();
    let mut out = Vec::new();
    for (to, service, entry, state) in items {
        let (batch, bytes) = open.entry((to, service)).or_default();
        if !batch.is_empty() && *bytes + state.len() > BATCH_BYTES {
            out.push((to, service, std::mem::take(batch)));
            *bytes = 0;
        }
        *bytes += state.len() + 12;
        batch.push((entry, state));
    }
    for ((to, service), (batch, _)) in open {
        if !batch.is_empty() {
            out.push((to, service, batch));
        }
    }
    out
}
