//! A message from another node: what each kind does.
use super::{is_done, Node};
use crate::view::{Change, Epoch, NodeId};
use crate::wire::Msg;

impl Node {
    /// A message from `from` (already authenticated by the driver).
    pub fn receive(&mut self, from: NodeId, msg: Msg) {
        if self.stopped {
            return;
        }
        if from != self.cfg.me && self.logged.failed.contains(&from) {
            // A node the log declared failed is out: it is told so (at its first exchange
            // with a member after a cut, so that it rejoins as a new member at once), and
            // what it asks for is refused: above all a witness never observes a write it
            // still serves in its old view (that write would be acknowledged, then lost
            // with the entries rebuilt from copies elsewhere). What it sent before it was
            // cut off (entries, acknowledgements of older changes, Raft) is still taken.
            self.tell_evicted(from);
            if matches!(
                msg,
                Msg::Swim(_)
                    | Msg::Propose(_)
                    | Msg::Request(_)
                    | Msg::Observe { .. }
                    | Msg::Status { .. }
                    | Msg::Ping { .. }
            ) {
                return;
            }
        }
        match msg {
            Msg::Swim(bytes) => match self.membership.handle(from, &bytes, self.now) {
                Ok(o) => self.on_membership(o),
                Err(e) => self.note(format!("dropped failure-detector message from {from}: {e}")),
            },
            Msg::Raft(bytes) => {
                let Some(a) = self.agreement.as_mut() else {
                    self.note(format!("raft message from {from}, but not a supervisor"));
                    return;
                };
                match a.handle(from, &bytes) {
                    Ok(o) => self.on_agreement(o),
                    Err(e) => self.note(format!("dropped raft message from {from}: {e}")),
                }
            }
            Msg::Propose(change) => {
                if is_done(
                    &change,
                    &self.logged.members,
                    &self.logged.ever,
                    &self.logged.failed,
                ) {
                    return;
                }
                if self.agreement.is_some() {
                    self.supervise(change, from);
                } else if self.logged.members.contains(&self.cfg.me) {
                    // Sent to a node that is no supervisor (a joiner knows only the first
                    // group, which may be gone): on to one this node knows. Each hop goes
                    // to a node whose log says it is a supervisor, so the hops move to newer
                    // logs and end.
                    if let Some(s) = self.pick_supervisor() {
                        if s != from {
                            self.send(s, Msg::Propose(change));
                        }
                    }
                }
            }
            Msg::Lost { service, buckets } => self.adopt_losses(from, service, buckets),
            Msg::Ping { nonce } => self.send(from, Msg::Pong { nonce }),
            Msg::Pong { nonce } => {
                if self.confirming.get(&from).is_some_and(|(n, _)| *n == nonce) {
                    self.confirming.remove(&from);
                    self.answered_at.insert(from, self.now);
                    self.note(format!(
                        "node {from} is suspected but answers: its failure is not proposed"
                    ));
                }
            }
            Msg::ViewChange { epoch, change } => self.learn(epoch, change),
            Msg::Status { epoch, done } => {
                if self.agreement.is_some() {
                    self.done_by.insert(from, done);
                    self.status_at.insert(from, self.now);
                }
                // Any member answers with the agreed changes the sender lacks (a joiner
                // asks the nodes it knows, which may no longer be supervisors).
                if self.agreement.is_some() || self.logged.members.contains(&self.cfg.me) {
                    let first = epoch as usize;
                    let changes: Vec<(Epoch, Change)> = self
                        .log
                        .iter()
                        .enumerate()
                        .skip(first)
                        .take(64)
                        .map(|(i, c)| (i as Epoch + 1, c.clone()))
                        .collect();
                    for (epoch, change) in changes {
                        self.send(from, Msg::ViewChange { epoch, change });
                    }
                }
            }
            Msg::Prepared { epoch } => {
                self.acks.entry(epoch).or_default().prepared.insert(from);
                self.advance();
            }
            Msg::EntryData {
                epoch,
                service,
                entries,
            } => {
                if epoch <= self.epoch {
                    // Only a sender the change did not wait for (it was declared failed)
                    // sends after the change ended here; the repair rebuilt its entries
                    // from copies, and they may have moved on since.
                    self.note(format!(
                        "{} entries from node {from} for epoch {epoch}, which ended here: dropped",
                        entries.len()
                    ));
                    return;
                }
                let Some(svc) = self.services.get_mut(service as usize) else {
                    self.note(format!(
                        "{} entries from {from} for unknown service #{service}",
                        entries.len()
                    ));
                    return;
                };
                let received = self
                    .acks
                    .entry(epoch)
                    .or_default()
                    .received
                    .entry(from)
                    .or_default();
                for (entry, state) in entries {
                    svc.receive(entry, state);
                    self.arrived.insert((service, entry));
                    received.insert((service, entry));
                }
            }
            Msg::Copies { service, entries } => {
                if let Some(svc) = self.services.get_mut(service as usize) {
                    for (entry, payload) in entries {
                        svc.observe_response(entry, &payload);
                    }
                }
            }
            Msg::Sent { epoch, counts } => {
                self.acks
                    .entry(epoch)
                    .or_default()
                    .sent
                    .insert(from, counts);
                self.advance();
            }
            Msg::Request(r) => self.route(r),
            Msg::Response {
                id,
                service,
                entry,
                payload,
            } => self.deliver(id, service, entry, payload),
            Msg::Observe {
                id,
                service,
                entry,
                payload,
            } => {
                if let Some(svc) = self.services.get_mut(service as usize) {
                    svc.observe_response(entry, &payload);
                }
                self.send(from, Msg::Observed { id });
            }
            Msg::Observed { id } => {
                let done = match self.witnessed.get_mut(&id) {
                    Some(w) => {
                        w.waiting.remove(&from);
                        w.waiting.is_empty()
                    }
                    None => false,
                };
                if done {
                    if let Some(w) = self.witnessed.remove(&id) {
                        self.respond(w.request, w.payload);
                    }
                }
            }
        }
    }
}
