//! Serving protocol messages: manager requests, reads and writes at the owner,
//! invalidations and their acknowledgements, grants, promotions and lost pages; and the
//! owner's side of a transfer (invalidate every copy, then hand the page over).
use std::collections::BTreeSet;

use super::{Access, Action, Fetch, Msg, Node, NodeId, PageId, PageState, ShareWords, Source};
use crate::directory::ManagerDecision;

impl<W: ShareWords> Node<W> {
    pub(super) fn handle(&mut self, from: NodeId, msg: Msg, out: &mut Vec<Action>) {
        if matches!(msg, Msg::ManagerRead { .. } | Msg::ManagerWrite { .. })
            && self.reroute(from, &msg, out)
        {
            return;
        }
        let me = self.me;
        let epoch = self.epoch();
        let page = msg.page();
        let manager = self.locator.manager(page);
        let p = self.pages.entry(page).or_default();
        match msg {
            Msg::ManagerRead { from: who, .. } | Msg::ManagerWrite { from: who, .. }
                if self.dead.contains(&who) =>
            {
                // A dead node's late request: it must not become an owner.
            }
            Msg::ManagerRead { from: who, .. } | Msg::ManagerWrite { from: who, .. } => {
                let access = if matches!(msg, Msg::ManagerWrite { .. }) {
                    Access::Write
                } else {
                    Access::Read
                };
                if self.directory.is_lost(page) {
                    out.push(Action::Send {
                        to: who,
                        msg: Msg::Lost { page },
                    });
                    return;
                }
                match self.directory.request(page, who, access) {
                    ManagerDecision::GrantZero => {
                        if who == me {
                            self.self_granted.insert(page);
                            if let Some(w) = self.witness() {
                                // Sent before the grant is handled: the witness hears of
                                // the page before anything is written to it.
                                out.push(Action::Send {
                                    to: w,
                                    msg: Msg::Touched { page },
                                });
                            }
                        }
                        out.push(Action::Send {
                            to: who,
                            msg: Msg::Grant {
                                page,
                                access,
                                owner: true,
                                zero: true,
                            },
                        })
                    }
                    ManagerDecision::Forward(owner) => out.push(Action::Send {
                        to: owner,
                        msg: match access {
                            Access::Read => Msg::Read {
                                page,
                                from: who,
                                via_manager: true,
                            },
                            Access::Write => Msg::Write {
                                page,
                                from: who,
                                gen: epoch,
                            },
                        },
                    }),
                }
            }
            Msg::Read { from: who, .. } | Msg::Write { from: who, .. }
                if self.dead.contains(&who) =>
            {
                // A dead node's request (late, or forwarded before its death was known).
            }
            Msg::Read {
                from: who,
                via_manager,
                ..
            } => {
                if p.busy.is_some() || (!p.state.is_owner() && p.fetch != Fetch::Idle) {
                    if p.busy.is_none() && !via_manager {
                        // Not the owner (maybe about to be): the manager knows better.
                        out.push(Action::Send {
                            to: manager,
                            msg: Msg::ManagerRead { page, from: who },
                        });
                    } else {
                        p.queue.push_back((from, msg));
                    }
                } else if p.state.is_owner() {
                    self.serve_read(page, who, out);
                } else {
                    out.push(Action::Send {
                        to: manager,
                        msg: Msg::ManagerRead { page, from: who },
                    });
                }
            }
            Msg::Write { gen, .. } if gen < p.floor => {
                // Forwarded under an entry since rebuilt: its requester asks again.
            }
            Msg::Write { from: who, .. } => {
                if p.busy.is_some() || !p.state.is_owner() {
                    p.queue.push_back((from, msg));
                } else {
                    self.start_invalidation(page, who, out);
                }
            }
            Msg::Invalidate { .. } => {
                if let Fetch::OneSided { invalidated, .. } = &mut p.fetch {
                    *invalidated = true;
                }
                if p.state == PageState::ReadCopy {
                    p.state = PageState::Invalid;
                    out.push(Action::Drop { page });
                }
                p.hint = Some(from);
                out.push(Action::Send {
                    to: from,
                    msg: Msg::InvalidateAck { page },
                });
            }
            Msg::InvalidateAck { .. } => {
                if let Some((waiting, to)) = &mut p.busy {
                    waiting.remove(&from);
                    if waiting.is_empty() {
                        let to = *to;
                        self.finish_transfer(page, to, out);
                    }
                }
            }
            Msg::Grant {
                access: Access::Read,
                owner: false,
                ..
            } if p.state != PageState::Invalid => {
                // A read copy again (a request asked again after a failure, answered
                // twice): what this node holds is at least as good (a valid copy, or the
                // page itself); the sender has it in its copyset, which costs one
                // invalidation at most.
            }
            Msg::Grant {
                access,
                owner,
                zero,
                ..
            } => {
                self.stats.message_grants += 1;
                if p.state != PageState::Invalid {
                    out.push(Action::Drop { page });
                }
                p.fetch = Fetch::Idle;
                let source = if zero { Source::Zero } else { Source::Message };
                p.state = match (access, owner) {
                    (Access::Write, _) => PageState::WriteOwner,
                    (Access::Read, true) => PageState::ReadOwner,
                    (Access::Read, false) => PageState::ReadCopy,
                };
                p.hint = Some(if owner { me } else { from });
                out.push(Action::Install {
                    page,
                    source,
                    writable: access == Access::Write,
                });
                p.publish = p.state == PageState::ReadOwner;
            }
            Msg::Promote { copyset, .. } => {
                if p.state == PageState::ReadCopy {
                    self.stats.pages_promoted += 1;
                    p.state = PageState::ReadOwner;
                    p.hint = Some(me);
                    p.copyset = copyset.into_iter().filter(|&n| n != me).collect();
                    p.publish = true;
                }
            }
            Msg::Lost { .. } => {
                if p.want.take().is_some() {
                    // The access is answered (it failed): a later one asks again, and is
                    // answered lost again.
                    p.fetch = Fetch::Idle;
                    out.push(Action::Lost { page });
                }
            }
            Msg::Touched { .. } => {
                self.witnessed.entry(from).or_default().insert(page);
            }
            Msg::Unqueue { epoch, .. } => {
                p.void_writes_before(epoch);
            }
            // Handled by `on_message` before any page is looked at.
            Msg::Entries { .. } | Msg::MigrationDone { .. } | Msg::Flush { .. } => {}
        }
    }

    pub(super) fn serve_read(&mut self, page: PageId, who: NodeId, out: &mut Vec<Action>) {
        let p = self.pages.get_mut(&page).expect("page exists");
        if p.state == PageState::WriteOwner {
            p.state = PageState::ReadOwner;
            p.publish = true;
            out.push(Action::Protect { page });
        }
        if who != self.me && !self.dead.contains(&who) {
            p.copyset.insert(who);
            out.push(Action::Send {
                to: who,
                msg: Msg::Grant {
                    page,
                    access: Access::Read,
                    owner: false,
                    zero: false,
                },
            });
        }
    }

    /// Closes the share word and invalidates every copy except `to`'s before `to` (maybe
    /// this node) gets the page for writing.
    pub(super) fn start_invalidation(&mut self, page: PageId, to: NodeId, out: &mut Vec<Action>) {
        let me = self.me;
        let joined = self.words.close(page);
        let p = self.pages.get_mut(&page).expect("page exists");
        p.publish = false;
        p.copyset.extend(joined);
        let all = std::mem::take(&mut p.copyset);
        let targets: BTreeSet<NodeId> = all
            .iter()
            .copied()
            .filter(|&n| n != me && n != to && !self.dead.contains(&n))
            .collect();
        self.stats.dead_copies_dropped +=
            all.iter().filter(|n| self.dead.contains(n)).count() as u64;
        if targets.is_empty() {
            self.finish_transfer(page, to, out);
            return;
        }
        self.stats.invalidations_sent += targets.len() as u64;
        for &t in &targets {
            out.push(Action::Send {
                to: t,
                msg: Msg::Invalidate { page },
            });
        }
        p.busy = Some((targets, to));
    }

    pub(super) fn finish_transfer(&mut self, page: PageId, to: NodeId, out: &mut Vec<Action>) {
        let me = self.me;
        let p = self.pages.get_mut(&page).expect("page exists");
        p.busy = None;
        if to != me && self.dead.contains(&to) {
            // The writer died while its copies were being invalidated: the page stays here
            // (handing it to a dead node would lose it). The manager still names the dead
            // node until the directory's entry is rebuilt.
            p.publish = p.state == PageState::ReadOwner;
            return;
        }
        if to == me {
            if p.state == PageState::ReadOwner {
                out.push(Action::Unprotect { page });
            }
            p.state = PageState::WriteOwner;
            p.fetch = Fetch::Idle;
        } else {
            if p.state == PageState::WriteOwner {
                // Freeze the page before its bytes are sent and dropped.
                out.push(Action::Protect { page });
            }
            // Drop before sending: once the grant is out, the new owner may write and other
            // nodes move on, so no local access may still see this copy.
            out.push(Action::Drop { page });
            out.push(Action::Send {
                to,
                msg: Msg::Grant {
                    page,
                    access: Access::Write,
                    owner: true,
                    zero: false,
                },
            });
            p.state = PageState::Invalid;
            p.hint = Some(to);
            self.note_handed(page, to);
        }
    }
}
