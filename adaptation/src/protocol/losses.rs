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
