//! Membership changes of a running DSM: a node joins or leaves, the locator changes, and the
//! directory entries whose manager changes migrate in the adaptation layer's four steps
//! ([`adaptation::service::Service`], implemented by [`DirectoryService`]) while the
//! application keeps faulting.
//!
//! 1. [`Node::prepare_change`]: the new view is known (the node connected to a newcomer).
//! 2. The switch ([`Node::start_change`], or the first sign that another node switched: a
//!    migration message of the epoch, or a manager request for an entry this node manages
//!    in the new view only): the new locator takes over; every entry this node hands over
//!    is `send_out` and sent to its new manager ([`Msg::Entries`]), then
//!    [`Msg::MigrationDone`] to every member.
//! 3. Entries that arrive are `receive`d.
//! 4. Once every other member of the old view said [`Msg::MigrationDone`],
//!    `after_migration` resolves the received entries into the directory.
//!
//! A **failure** is a change too (`Change::failed`): the dead node's entries cannot be
//! sent, so at its switch every survivor
//! - forgets the entries it manages that name the dead node as the owner, or whose last
//!   write was forwarded to it ([`crate::directory::Directory::forget_failed`]);
//! - scans what it holds ([`crate::directory::scan_state`]): every page it owns (a claim),
//!   every valid copy whose owner or old manager was the dead node, every page it knows the
//!   dead node had; and, at its witness ([`super::Node::witness`]), the pages the dead
//!   node granted to itself;
//!   each goes to the page's new manager like a migrated entry.
//!
//! At step 4 each new manager resolves the entries it received: a live manager's record
//! wins, else a node's claim; else a surviving copy is promoted ([`Msg::Promote`]); else a page known written is
//! **lost**: requests for it are answered [`Msg::Lost`], never with a zero page. After the
//! change is committed, every request still outstanding is asked again
//! ([`Node::resend_outstanding`]): it may have gone to, or through, the dead node.
//!
//! Requests are never lost: a manager request for an entry this node does not manage in
//! its current view is forwarded to the entry's current manager (after the entries it
//! handed over, on the same FIFO link); one for an entry in transit towards this node (it
//! manages it in the new view, another node did in the old one) is held until step 4 and
//! handled then ([`Stats::requests_delayed`], [`Stats::requests_released`]). Once step 4
//! ran at every node, every request sent under the old view has been received: each old
//! manager's marker follows them on its link.
use std::collections::{BTreeMap, BTreeSet};

use adaptation::locator::Placement;
use adaptation::service::Service;

use super::{Action, Fetch, Msg, Node, NodeId, PageId, PageState, ShareWords};
use crate::directory::{scan_state, DirectoryService, Holdings};

/// Entries per [`Msg::Entries`] message.
const ENTRIES_PER_MESSAGE: usize = 256;

/// A change of the node set, as the driver gives it to the state machine.
pub struct Change {
    pub epoch: u64,
    /// The locator of the new view (built the same way on every node).
    pub locator: Box<dyn Placement + Send>,
    /// Live members before and after the change.
    pub old_members: BTreeSet<NodeId>,
    pub new_members: BTreeSet<NodeId>,
    /// A failure: the node that died (its entries are rebuilt from the survivors' scans).
    pub failed: Option<NodeId>,
}

/// A change in progress at this node (between its switch and its step 4).
struct Migration {
    epoch: u64,
    /// The locator of the old view: who managed an entry before.
    old: Box<dyn Placement + Send>,
    /// Members of the old view whose [`Msg::MigrationDone`] has not arrived yet.
    waiting: BTreeSet<NodeId>,
    service: DirectoryService,
    delayed: Vec<(NodeId, Msg)>,
    /// Entries this node managed and rebuilds (a failure): requests wait for step 4 too.
    rebuilding: BTreeSet<PageId>,
    /// The change is a failure.
    failure: bool,
    /// The other live members (a rebuilt entry's old write requests are voided at each).
    others: BTreeSet<NodeId>,
}

/// A failure's flush in progress: the live members whose [`Msg::Flush`] has not arrived.
struct Flush {
    epoch: u64,
    waiting: BTreeSet<NodeId>,
    /// Pages this node was handing over when it flushed, with their receivers: the
    /// receiver is the owner even if the grant goes out after this node's flush (and so
    /// may reach the receiver after it scanned).
    handing: Vec<(PageId, NodeId)>,
}

#[derive(Default)]
pub(super) struct ChangeState {
    /// The epoch of the view in use.
    epoch: u64,
    pending: Option<Change>,
    migration: Option<Migration>,
    /// Epochs whose step 4 ran here since the driver last asked.
    finished: Vec<u64>,
    flush: Option<Flush>,
    /// The last flush's `handing`, for the scan.
    handing: Vec<(PageId, NodeId)>,
    /// Manager requests and migration messages that came while a failure was prepared and
    /// not switched to yet (handled after the switch).
    held: Vec<(NodeId, Msg)>,
}

impl<W: ShareWords> Node<W> {
    /// The epoch of the view this node uses (0 before any change).
    pub fn epoch(&self) -> u64 {
        self.change.epoch
    }

    /// Whether a change is under way here (switched, step 4 not run yet).
    pub fn migrating(&self) -> bool {
        self.change.migration.is_some()
    }

    /// The next view is known (step 1 will follow at [`Node::start_change`]).
    pub fn prepare_change(&mut self, change: Change) {
        self.members.extend(change.old_members.iter().copied());
        self.members.extend(change.new_members.iter().copied());
        self.change.pending = Some(change);
    }

    /// Switches to the prepared view of `epoch` (nothing if it did already). A failure
    /// first flushes ([`Msg::Flush`]): the scan waits until every live member's flush
    /// arrived, so whatever the members released when they dropped the dead node (a write
    /// grant held for its acknowledgement) is received before anyone scans, and a page in
    /// transit between live nodes is claimed by its receiver.
    pub fn start_change(&mut self, epoch: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match self.change.pending.as_ref() {
            Some(c) if c.epoch == epoch && c.failed.is_some() => self.begin_flush(&mut out),
            Some(c) if c.epoch == epoch => self.switch(&mut out),
            _ => {}
        }
        out
    }

    fn begin_flush(&mut self, out: &mut Vec<Action>) {
        if self.change.flush.is_some() {
            return;
        }
        let Some(c) = self.change.pending.as_ref() else {
            return;
        };
        let me = self.me;
        let epoch = c.epoch;
        let waiting: BTreeSet<NodeId> = c
            .old_members
            .iter()
            .copied()
            .filter(|&n| n != me && !self.dead.contains(&n))
            .collect();
        for &n in &waiting {
            out.push(Action::Send {
                to: n,
                msg: Msg::Flush { epoch },
            });
        }
        let handing = self
            .pages
            .iter()
            .filter_map(|(&page, p)| p.busy.as_ref().map(|(_, to)| (page, *to)))
            .collect();
        self.change.flush = Some(Flush {
            epoch,
            waiting,
            handing,
        });
        self.maybe_end_flush(out);
    }

    /// Every live member flushed: the switch (with the failure scan), then what was held.
    fn maybe_end_flush(&mut self, out: &mut Vec<Action>) {
        if !self
            .change
            .flush
            .as_ref()
            .is_some_and(|f| f.waiting.is_empty())
        {
            return;
        }
        if let Some(f) = self.change.flush.take() {
            self.change.handing = f.handing;
        }
        self.switch(out);
        for (from, msg) in std::mem::take(&mut self.change.held) {
            if msg.is_migration() {
                self.on_migration_message(from, msg, out);
            } else {
                let page = msg.page();
                self.handle(from, msg, out);
                self.after(page, out);
            }
        }
    }

    /// This node handed `page` over to `to`: during a failure's flush the grant follows the
    /// flush on the link, and may reach `to` after it scanned, so the scan names `to`.
    pub(super) fn note_handed(&mut self, page: PageId, to: NodeId) {
        if let Some(f) = self.change.flush.as_mut() {
            f.handing.push((page, to));
        }
    }

    /// Whether a failure is prepared here and not switched to yet (requests and migration
    /// messages wait).
    fn failure_ahead(&self) -> bool {
        self.change.flush.is_some()
            || self
                .change
                .pending
                .as_ref()
                .is_some_and(|c| c.failed.is_some())
    }

    /// Epochs whose migration finished here (step 4) since the last call.
    pub fn take_finished(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.change.finished)
    }

    /// Steps 1 and 2: the new locator takes over; entries that leave are sent to their new
    /// managers, then a marker to every other member.
    fn switch(&mut self, out: &mut Vec<Action>) {
        let Some(change) = self.change.pending.take() else {
            return;
        };
        let me = self.me;
        let old = std::mem::replace(&mut self.locator, change.locator);
        // A failure: records naming the dead node are void (before any entry leaves).
        let forgotten = change
            .failed
            .map(|x| self.directory.forget_failed(x))
            .unwrap_or_default();
        let leaving: Vec<PageId> = self
            .directory
            .pages()
            .map(|(p, _)| p)
            .filter(|&p| self.locator.manager(p) != me)
            .collect();
        let mut service = DirectoryService::new(me, Holdings::default());
        service.set_dead(self.dead.iter().copied());
        for &p in &leaving {
            let chain = self.directory.chain(p);
            if let Some(owner) = self.directory.remove(p) {
                service.directory.set_entry(p, owner, chain);
            }
        }
        service.before_migration(change.epoch, &leaving);
        let mut by_manager: BTreeMap<NodeId, Vec<(PageId, Vec<u8>)>> = BTreeMap::new();
        for p in leaving {
            if let Some(state) = service.send_out(p) {
                by_manager
                    .entry(self.locator.manager(p))
                    .or_default()
                    .push((p, state));
            }
        }
        let mut rebuilding = BTreeSet::new();
        if let Some(x) = change.failed {
            for (page, state) in self.failure_scan(x, &*old, forgotten) {
                let to = self.locator.manager(page);
                if to == me {
                    rebuilding.insert(page);
                    service.receive(page, state);
                } else {
                    by_manager.entry(to).or_default().push((page, state));
                }
            }
        }
        let epoch = change.epoch;
        for (to, entries) in by_manager {
            self.stats.entries_sent += entries.len() as u64;
            for chunk in entries.chunks(ENTRIES_PER_MESSAGE) {
                out.push(Action::Send {
                    to,
                    msg: Msg::Entries {
                        epoch,
                        entries: chunk.to_vec(),
                    },
                });
            }
        }
        for &n in change.old_members.union(&change.new_members) {
            if n != me && !self.dead.contains(&n) {
                out.push(Action::Send {
                    to: n,
                    msg: Msg::MigrationDone { epoch },
                });
            }
        }
        let waiting: BTreeSet<NodeId> = change
            .old_members
            .iter()
            .copied()
            .filter(|&n| n != me && !self.dead.contains(&n))
            .collect();
        let others: BTreeSet<NodeId> = change
            .old_members
            .union(&change.new_members)
            .copied()
            .filter(|&n| n != me && !self.dead.contains(&n))
            .collect();
        self.change.epoch = epoch;
        self.change.migration = Some(Migration {
            epoch,
            old,
            waiting,
            service,
            delayed: Vec::new(),
            rebuilding,
            failure: change.failed.is_some(),
            others,
        });
        self.maybe_finish(out);
    }

    /// What this node reports of `x`'s pages after `x` died (`old`: the locator before).
    /// `forgotten`: the entries this node managed that named `x`.
    fn failure_scan(
        &mut self,
        x: NodeId,
        old: &dyn Placement,
        forgotten: Vec<PageId>,
    ) -> Vec<(PageId, Vec<u8>)> {
        let me = self.me;
        let mut states = Vec::new();
        for page in forgotten {
            states.push((page, scan_state(me, None, false)));
        }
        for (page, to) in std::mem::take(&mut self.change.handing) {
            if !self.dead.contains(&to) {
                states.push((page, scan_state(me, Some(to), false)));
            }
        }
        for (&page, p) in &self.pages {
            // An owner handing the page over names the receiver.
            let claim = p
                .state
                .is_owner()
                .then(|| p.busy.as_ref().map_or(me, |(_, to)| *to));
            let copy = p.state != PageState::Invalid;
            let hint_dead = p.hint.is_some_and(|h| h == x || self.dead.contains(&h));
            // The dead node's own entries are gone: whoever knew the page was written says so.
            let known_orphan = p.known && old.manager(page) == x;
            if claim.is_some() || copy && old.manager(page) == x || hint_dead || known_orphan {
                states.push((page, scan_state(me, claim, copy)));
            }
        }
        for page in self.witnessed.remove(&x).unwrap_or_default() {
            states.push((page, scan_state(me, None, false)));
        }
        states
    }

    /// After a failure's change is committed: every local access still waiting for an
    /// answer asks again (its request may have gone to, or through, the dead node, or been
    /// dropped as addressed to it). An answer that comes twice is harmless: a second read
    /// copy is ignored, a second write request finds this node named already.
    pub fn resend_outstanding(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        let waiting: Vec<PageId> = self
            .pages
            .iter()
            .filter(|(_, p)| p.want.is_some() && matches!(p.fetch, Fetch::Requested(_)))
            .map(|(&page, _)| page)
            .collect();
        for page in waiting {
            let p = self.pages.get_mut(&page).expect("listed");
            p.fetch = Fetch::Idle;
            if p.hint.is_some_and(|h| self.dead.contains(&h)) {
                p.hint = None;
            }
            self.stats.requests_resent += 1;
            self.after(page, &mut out);
        }
        out
    }

    pub(super) fn on_migration_message(&mut self, from: NodeId, msg: Msg, out: &mut Vec<Action>) {
        let epoch = match &msg {
            Msg::Entries { epoch, .. } | Msg::MigrationDone { epoch } | Msg::Flush { epoch } => {
                *epoch
            }
            _ => return,
        };
        if let Msg::Flush { .. } = msg {
            // A flush comes only once every member prepared the failure (node 0 starts
            // it after every `Installed`): one for no pending change is a past one.
            if self
                .change
                .pending
                .as_ref()
                .is_some_and(|c| c.epoch == epoch && c.failed.is_some())
            {
                self.begin_flush(out);
            }
            if let Some(f) = self.change.flush.as_mut().filter(|f| f.epoch == epoch) {
                f.waiting.remove(&from);
                self.maybe_end_flush(out);
            }
            return;
        }
        if self.failure_ahead() {
            self.change.held.push((from, msg));
            return;
        }
        if self
            .change
            .pending
            .as_ref()
            .is_some_and(|c| c.epoch == epoch)
        {
            // Another node switched first: so does this one (its entries and marker go
            // out before anything this node forwards).
            self.switch(out);
        }
        let Some(m) = self.change.migration.as_mut().filter(|m| m.epoch == epoch) else {
            // Nothing is in transit for a past epoch: entries arrive before their sender's
            // marker, and step 4 waits for every marker.
            return;
        };
        match msg {
            Msg::Entries { entries, .. } => {
                self.stats.entries_received += entries.len() as u64;
                for (page, state) in entries {
                    m.service.receive(page, state);
                }
            }
            Msg::MigrationDone { .. } => {
                m.waiting.remove(&from);
                self.maybe_finish(out);
            }
            _ => {}
        }
    }

    /// A member died or left during a change: its marker will not come.
    pub(super) fn migration_member_gone(&mut self, node: NodeId, out: &mut Vec<Action>) {
        if let Some(m) = self.change.migration.as_mut() {
            m.waiting.remove(&node);
        }
        if let Some(f) = self.change.flush.as_mut() {
            f.waiting.remove(&node);
        }
        self.maybe_end_flush(out);
        self.maybe_finish(out);
    }

    /// Step 4 once every marker is in: the received entries join the directory and the
    /// held requests are handled.
    fn maybe_finish(&mut self, out: &mut Vec<Action>) {
        if !self
            .change
            .migration
            .as_ref()
            .is_some_and(|m| m.waiting.is_empty())
        {
            return;
        }
        let Some(mut m) = self.change.migration.take() else {
            return;
        };
        m.service.after_migration(m.epoch);
        // Rebuilt entries only fill what this node has no record of (a record of a live
        // owner is kept: a transfer to it may be in flight).
        let promotions: Vec<_> = m
            .service
            .take_promotions()
            .into_iter()
            .filter(|pr| self.directory.owner(pr.page).is_none())
            .collect();
        for page in m.service.take_lost() {
            if self.directory.owner(page).is_none() && !self.directory.is_lost(page) {
                self.stats.pages_lost += 1;
                self.directory.mark_lost(page);
            }
        }
        for (page, owner) in m.service.directory.pages() {
            if self.directory.owner(page).is_none() {
                self.directory
                    .set_entry(page, owner, m.service.directory.chain(page));
            }
        }
        let mut promotions = promotions;
        if m.failure {
            // A record whose owner will never get the page (a write forwarded through the
            // dead node) is rebuilt like the dead node's own entries.
            let pages: Vec<PageId> = self.directory.pages().map(|(p, _)| p).collect();
            for page in pages {
                let (claims, holders) = m.service.seen(page);
                if !self.directory.broken(page, &claims, &self.dead) {
                    continue;
                }
                // Every write forwarded under the old record is void, wherever it waits or
                // travels (queued at a node of the chain, or still on its way, even to this
                // node): each member drops those stamped before this epoch. Requests are held
                // during a failure's change until this step, so none was forwarded under
                // the new epoch yet; their requesters ask again at the commit.
                self.pages
                    .entry(page)
                    .or_default()
                    .void_writes_before(m.epoch);
                for &n in &m.others {
                    out.push(Action::Send {
                        to: n,
                        msg: Msg::Unqueue {
                            page,
                            epoch: m.epoch,
                        },
                    });
                }
                self.directory.remove(page);
                if let Some(&owner) = claims.iter().next() {
                    self.directory.set_owner(page, owner);
                } else if let Some(&owner) = holders.iter().next() {
                    self.directory.set_owner(page, owner);
                    promotions.push(crate::directory::Promotion {
                        owner,
                        page,
                        copyset: holders.iter().copied().filter(|&h| h != owner).collect(),
                    });
                } else {
                    self.stats.pages_lost += 1;
                    self.directory.mark_lost(page);
                }
            }
        }
        // Sent before the held requests are forwarded: the new owner is an owner first.
        for pr in promotions {
            if pr.owner == self.me {
                let actions = self.on_message(
                    self.me,
                    Msg::Promote {
                        page: pr.page,
                        copyset: pr.copyset,
                    },
                );
                out.extend(actions);
            } else {
                out.push(Action::Send {
                    to: pr.owner,
                    msg: Msg::Promote {
                        page: pr.page,
                        copyset: pr.copyset,
                    },
                });
            }
        }
        self.change.finished.push(m.epoch);
        for (from, msg) in m.delayed {
            self.stats.requests_released += 1;
            let page = msg.page();
            self.handle(from, msg, out);
            self.after(page, out);
        }
    }

    /// A manager request: forwarded when another node manages the entry in this node's
    /// view, held when the entry is still in transit towards this node; `false`: handle it.
    pub(super) fn reroute(&mut self, from: NodeId, msg: &Msg, out: &mut Vec<Action>) -> bool {
        let me = self.me;
        let page = msg.page();
        if self.failure_ahead() {
            // Handled once this node switched (after the flush).
            self.change.held.push((from, msg.clone()));
            return true;
        }
        if self.locator.manager(page) != me
            && self
                .change
                .pending
                .as_ref()
                .is_some_and(|c| c.locator.manager(page) == me)
        {
            // The requester switched to the next view already (it names this node): switch
            // too, so the entry's old manager hands it over.
            self.switch(out);
        }
        let current = self.locator.manager(page);
        if current != me {
            self.stats.requests_forwarded += 1;
            out.push(Action::Send {
                to: current,
                msg: msg.clone(),
            });
            return true;
        }
        if let Some(m) = self.change.migration.as_mut() {
            // A failure may find any entry broken at step 4 (a write forwarded through the
            // dead node): every request waits for it, so writes forwarded under the new
            // epoch follow the rebuilt records ([`Msg::Write`]'s `gen`).
            if m.old.manager(page) != me || m.rebuilding.contains(&page) || m.failure {
                self.stats.requests_delayed += 1;
                m.delayed.push((from, msg.clone()));
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests;
