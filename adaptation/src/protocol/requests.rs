//! Requests: executed at the entry's manager (witnesses observe the answer first), forwarded
//! elsewhere, delayed during a change; answers delivered once at the node they entered.
use std::collections::BTreeSet;

use super::{Node, Output, Witnessed};
use crate::locator::CellTreeLocator;
use crate::service::{RequestId, ServiceId};
use crate::view::{EntryId, NodeId};
use crate::wire::{Msg, Request};

impl Node {
    /// Executes a request here if this node manages its entry, else forwards it to the
    /// manager of this node's view (also from a node that is not a member yet); delays it
    /// until every agreed change is processed here.
    pub(super) fn route(&mut self, r: Request) {
        if self.stopped {
            return;
        }
        // During a change, and while a further agreed change is still to be processed (a
        // participant may have failed without sending its entries), nothing is served here.
        if self.migration.is_some() || self.epoch < self.known_epoch() {
            self.delayed.push(r);
            return;
        }
        let Some(manager) = self.manager_of(r.service, r.entry) else {
            self.note(format!(
                "request {:?} for unknown service #{}",
                r.id, r.service
            ));
            return;
        };
        if manager != self.cfg.me {
            self.send(manager, Msg::Request(r));
            return;
        }
        let lost = self.lost.get(r.service as usize).is_some_and(|l| {
            !l.is_empty()
                && l.contains(&CellTreeLocator::bucket_in(
                    &self.scopes[r.service as usize],
                    r.entry,
                ))
        });
        let Some(svc) = self.services.get_mut(r.service as usize) else {
            return;
        };
        if lost && !svc.holds(r.entry) {
            if let Some(answer) = svc.lost(r.entry, r.id, &r.payload) {
                self.respond(r, answer);
                return;
            }
        }
        let payload = svc.handle(r.entry, r.id, &r.payload);
        let want = svc.witnesses();
        let witnesses = self.witnesses_of(want);
        if witnesses.is_empty() {
            self.respond(r, payload);
            return;
        }
        for &w in &witnesses {
            self.send(
                w,
                Msg::Observe {
                    id: r.id,
                    service: r.service,
                    entry: r.entry,
                    payload: payload.clone(),
                },
            );
        }
        self.witnessed.insert(
            r.id,
            Witnessed {
                request: r,
                payload,
                waiting: witnesses.into_iter().collect(),
            },
        );
    }

    /// The `k` members following this node in the view (its witnesses).
    pub(super) fn witnesses_of(&self, k: usize) -> Vec<NodeId> {
        witnesses_in(&self.members, self.cfg.me, k)
    }

    pub(super) fn respond(&mut self, r: Request, payload: Vec<u8>) {
        if r.reply_to == self.cfg.me {
            self.deliver(r.id, r.service, r.entry, payload);
        } else {
            self.send(
                r.reply_to,
                Msg::Response {
                    id: r.id,
                    service: r.service,
                    entry: r.entry,
                    payload,
                },
            );
        }
    }

    /// An answer for a request submitted here: given to the client once.
    pub(super) fn deliver(
        &mut self,
        id: RequestId,
        service: ServiceId,
        entry: EntryId,
        payload: Vec<u8>,
    ) {
        if self.pending.remove(&id).is_none() {
            return;
        }
        if let Some(svc) = self.services.get_mut(service as usize) {
            svc.observe_response(entry, &payload);
        }
        self.out.push(Output::Response { id, payload });
    }
}

/// The `k` members following `me` in `members`, wrapping around.
pub(super) fn witnesses_in(members: &BTreeSet<NodeId>, me: NodeId, k: usize) -> Vec<NodeId> {
    let after = members.range(me + 1..).copied();
    let before = members.range(..me).copied();
    after.chain(before).take(k).collect()
}
