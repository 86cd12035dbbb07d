//! Failure repair's two questions about a failed node: were its entries rebuilt from a
//! copy that is surely the newest (else the entries are marked lost, never served empty),
//! and, when it was only cut off, how it learns that it is out.
use std::collections::BTreeSet;

use super::{witnesses_in, Migration, Node};
use crate::locator::CellTreeLocator;
use crate::service::ServiceId;
use crate::view::{Change, Epoch, NodeId};
use crate::wire::Msg;

impl Node {
    /// Ticks within which two failures count as simultaneous for [`Node::mark_losses`]:
    /// twice what detecting and agreeing on one failure takes (suspicion, the direct ping,
    /// a retry), so that a view the failed node may not have left yet is still looked at.
    pub(super) fn loss_window(&self) -> u64 {
        let m = &self.cfg.membership;
        2 * (m.suspect_to_down + m.probe_period + self.cfg.confirm_ticks + self.cfg.retry_ticks)
    }

    /// Failure repair, at the end of the change that removes a failed node: were its
    /// entries rebuilt from a copy that is surely the newest? Every write it acknowledged
    /// was observed by its witnesses (the `k` members after it) of the view it served in,
    /// and after a change it sends its entries to its new witnesses while the old ones keep
    /// theirs. So the rebuild is whole when, in each view the failed node may still have
    /// served in (the one before its failure, and older ones whose change is younger than
    /// [`Node::loss_window`]), at least one of its witnesses sent its scan here (or is this
    /// node). Otherwise its manager and every witness failed together: the buckets it
    /// managed in those views are marked lost at this node, and what this node holds of
    /// them (maybe stale) is forgotten ([`Service::forget_lost`]). A request for an entry
    /// there that nobody holds then gets [`Service::lost`]'s answer, never an empty entry.
    ///
    /// [`Service::forget_lost`]: crate::service::Service::forget_lost
    /// [`Service::lost`]: crate::service::Service::lost
    pub(super) fn mark_losses(&mut self, m: &Migration, epoch: Epoch) {
        let Change::Fail { node: failed } = m.change else {
            return;
        };
        let me = self.cfg.me;
        let mut scanned: BTreeSet<NodeId> = self
            .acks
            .get(&epoch)
            .map(|a| a.sent.keys().copied().collect())
            .unwrap_or_default();
        scanned.insert(me);
        let newly = self.judge_losses(failed, epoch, &scanned);
        for (s, buckets, views_lost) in newly {
            let scope = self.scopes[s].clone();
            let svc = &mut self.services[s];
            svc.forget_lost(&|e| buckets.contains(&CellTreeLocator::bucket_in(&scope, e)));
            let name = svc.name().to_string();
            self.note(format!(
                "epoch {epoch}: node {failed} failed together with every witness of its \
                 entries in {views_lost} recent view(s): {} bucket(s) of service {name} \
                 marked lost",
                buckets.len()
            ));
            // Every member keeps the marks (whichever node manages the buckets later).
            let list: Vec<u32> = buckets.iter().map(|&b| b as u32).collect();
            for &to in m.members.iter().filter(|&&n| n != me) {
                self.send(
                    to,
                    Msg::Lost {
                        service: s as ServiceId,
                        buckets: list.clone(),
                    },
                );
            }
            self.lost[s].extend(buckets);
        }
    }

    /// Step 2 of the repair of a failure, before this node's `Sent`: the marks this node
    /// expects (as [`Node::mark_losses`] will judge, counting every participant still
    /// awaited as one that scans), to every participant. Links are FIFO, so each one has
    /// them before it can finish the change and serve: above all a joiner, which cannot
    /// judge the views from before its join (it does not know when their changes were
    /// agreed, nor which leaves were seen through) and would otherwise serve an old copy
    /// it received in the repair. The final marks follow at the end of the change.
    pub(super) fn announce_losses(&mut self) {
        let me = self.cfg.me;
        let Some(m) = self.migration.as_ref() else {
            return;
        };
        let Change::Fail { node: failed } = m.change else {
            return;
        };
        let participants: Vec<NodeId> = m
            .participants
            .iter()
            .copied()
            .filter(|&n| n != me)
            .collect();
        let mut scanned: BTreeSet<NodeId> = self.awaited(m).into_iter().collect();
        scanned.insert(me);
        let expected = self.judge_losses(failed, m.epoch, &scanned);
        for (s, buckets, _) in expected {
            let list: Vec<u32> = buckets.iter().map(|&b| b as u32).collect();
            for &to in &participants {
                self.send(
                    to,
                    Msg::Lost {
                        service: s as ServiceId,
                        buckets: list.clone(),
                    },
                );
            }
        }
    }

    /// The buckets lost with `failed` at `epoch`, per service, when the nodes in `scanned`
    /// sent their scans here: (service, buckets, views whose copies were all lost).
    fn judge_losses(
        &self,
        failed: NodeId,
        epoch: Epoch,
        scanned: &BTreeSet<NodeId>,
    ) -> Vec<(usize, BTreeSet<usize>, usize)> {
        let window = self.loss_window();
        let failed_at = self
            .learned_at
            .get((epoch - 1) as usize)
            .copied()
            .flatten()
            .unwrap_or(self.now);
        let mut views: Vec<&CellTreeLocator> = Vec::new();
        for (i, l) in self.locators.iter().enumerate() {
            // `locators[i]` is the view of epoch `epoch - 1 - i`.
            if i > 0 {
                let recent = (epoch as usize)
                    .checked_sub(i + 1)
                    .and_then(|j| self.learned_at.get(j).copied().flatten())
                    .is_some_and(|t| t + window >= failed_at);
                if !recent {
                    break;
                }
            }
            views.push(l);
        }
        let mut newly: Vec<(usize, BTreeSet<usize>, usize)> = Vec::new();
        for (s, svc) in self.services.iter().enumerate() {
            let k = svc.witnesses();
            if k == 0 {
                // No copies kept: nothing to tell apart.
                continue;
            }
            let scope = &self.scopes[s];
            let mut uncovered = Vec::new();
            for l in &views {
                let members: BTreeSet<NodeId> = l.nodes().into_iter().collect();
                if !members.contains(&failed) {
                    continue;
                }
                let w = witnesses_in(&members, failed, k);
                // A witness that left in a planned way handed its copies to members that
                // stay (and scanned them here), also when a detector declared it failed
                // after it had gone; one that failed before its leave was through took them
                // along.
                let kept = |w: &NodeId| {
                    scanned.contains(w)
                        || self.handed_over.contains(w)
                        || (self.logged.ever.contains(w)
                            && !self.logged.members.contains(w)
                            && !self.logged.failed.contains(w))
                };
                if !w.iter().any(kept) {
                    uncovered.push(*l);
                }
            }
            if uncovered.is_empty() {
                continue;
            }
            let range = scope.first_bucket..scope.first_bucket + scope.buckets;
            let buckets: BTreeSet<usize> = views
                .iter()
                .flat_map(|l| range.clone().filter(move |&b| l.table()[b] == failed))
                .collect();
            newly.push((s, buckets, uncovered.len()));
        }
        newly
    }

    /// At the end of a change: forgets again what this node holds in the buckets it
    /// adopted from other members' marks while the change was under way (an old copy of
    /// a failed node's entry may have arrived in the repair after the marks); the record
    /// ends with the change (keeping it longer forgot entries written anew since).
    pub(super) fn forget_adopted(&mut self) {
        for s in 0..self.services.len() {
            let buckets = &self.adopted[s];
            if buckets.is_empty() {
                continue;
            }
            let scope = self.scopes[s].clone();
            self.services[s]
                .forget_lost(&|e| buckets.contains(&CellTreeLocator::bucket_in(&scope, e)));
        }
        self.adopted.iter_mut().for_each(BTreeSet::clear);
    }

    /// Another member's marks ([`Msg::Lost`]) from the repair of a failure: the buckets
    /// are lost here too, and what this node holds of the ones it had not marked yet is
    /// forgotten, as the sender did.
    /// A node that could not judge the views itself (a joiner, for views from before its
    /// join) may hold an old copy there: served, or sent on by a later repair, it would
    /// be a stale value. The sender marks at the end of its change, before it serves a
    /// write that recreates an entry there, and links are FIFO: what this node receives
    /// of such a write from the sender comes after the marks and is kept (marks already
    /// held are not applied again).
    pub(super) fn adopt_losses(&mut self, from: NodeId, service: ServiceId, buckets: Vec<u32>) {
        let s = service as usize;
        let (Some(scope), Some(lost)) = (self.scopes.get(s).cloned(), self.lost.get_mut(s)) else {
            self.note(format!(
                "lost buckets from {from} for unknown service #{service}"
            ));
            return;
        };
        let range = scope.first_bucket..scope.first_bucket + scope.buckets;
        let newly: BTreeSet<usize> = buckets
            .into_iter()
            .map(|b| b as usize)
            .filter(|b| range.contains(b) && !lost.contains(b))
            .collect();
        if newly.is_empty() {
            return;
        }
        lost.extend(newly.iter().copied());
        if !self.members.contains(&self.cfg.me) {
            // A joiner before its join is through: the marks every member holds, from
            // changes before its join (sent with the join's entries). Entries written
            // since in those buckets (recreated) are sound: marked, nothing forgotten.
            return;
        }
        if self.migration.is_some() || self.epoch < self.known_epoch() {
            self.adopted[s].extend(newly.iter().copied());
        }
        self.services[s].forget_lost(&|e| newly.contains(&CellTreeLocator::bucket_in(&scope, e)));
    }

    /// Sends a node the log declared failed the change that says so (at most every few
    /// ticks per node).
    pub(super) fn tell_evicted(&mut self, node: NodeId) {
        let gap = (self.cfg.status_ticks / 5).max(1);
        if self
            .told_evicted
            .get(&node)
            .is_some_and(|&t| self.now < t + gap)
        {
            return;
        }
        self.told_evicted.insert(node, self.now);
        let change = Change::Fail { node };
        if let Some(i) = self.log.iter().position(|c| *c == change) {
            let epoch = i as Epoch + 1;
            self.send(node, Msg::ViewChange { epoch, change });
        }
    }
}
