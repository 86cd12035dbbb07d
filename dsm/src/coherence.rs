//! The coherence protocol: sequential consistency with a single writer and multiple readers
//! (IVY's improved centralized manager, Li & Hudak 1989; Kerrighed containers), as a sans-IO
//! state machine: local faults and received messages go in, [`Action`]s come out.
//!
//! Roles, per page:
//! - the **manager** (located by the cell-tree locator or `page % N`) holds the directory
//!   entry: who owns the page ([`crate::directory::Directory`]). Writes go through it, so
//!   ownership changes are serialized there; reads go there only when the requester's
//!   probable-owner hint is missing or stale.
//! - the **owner** holds the copyset (who has read copies) and invalidates every copy, and
//!   waits for every acknowledgement, before a write is granted (to another node, or to itself).
//!
//! Page states: `Invalid`, `ReadCopy`, `ReadOwner`, `WriteOwner`; the transients are a fetch
//! in progress ([`Fetch`]) and an owner collecting invalidation acknowledgements (`busy`).
//!
//! One-sided reads: a read owner *publishes* its page (write-protected, copied into registered
//! memory) and opens a per-page **share word**. A reader with a hint joins the copyset with a
//! remote fetch-and-add on that word ([`Action::Join`]) and, if the word was open, reads the
//! page with an RMA read ([`Action::RmaRead`]): the owner's CPU is not involved. The owner
//! closes the word (an atomic swap, [`ShareWords::close`]) before it invalidates, so every
//! reader that joined is invalidated; a reader invalidated while its fetch is in flight
//! discards what it read and asks again. Nodes `>= 32` (the word holds a 32-bit copyset) and
//! closed words use messages.
//!
//! Links are assumed FIFO per (sender, receiver) pair, as the fabric's tagged messages are.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use adaptation::locator::Placement;
use serde::{Deserialize, Serialize};

use crate::directory::Directory;

mod handle;
mod migration;
mod msg;
mod share;
#[cfg(test)]
pub(crate) mod tests;

pub use migration::Change;
pub use msg::{Action, Msg};
pub use share::{joined_readers, LocalShareWords, ShareWords};

pub type NodeId = adaptation::NodeId;
pub type PageId = u64;

/// Nodes whose id is below this can join a copyset through the share word.
pub const SHARE_WORD_NODES: NodeId = 32;
/// The share word's "open" flag; bits `0..32` are the joined readers.
pub const SHARE_OPEN: u64 = 1 << 63;
/// The witness of the other managers when the member set is not known
/// ([`Node::set_members`] not called): node 0 (see [`Node::witness`]).
pub const WITNESS: NodeId = 0;

/// A kind of access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Access {
    Read,
    Write,
}

/// What a node holds of a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    Invalid,
    /// A read-only copy; the owner has this node in its copyset.
    ReadCopy,
    /// The owner, read-only (copies may exist).
    ReadOwner,
    /// The owner, writable (no other copy exists).
    WriteOwner,
}

impl PageState {
    pub fn is_owner(self) -> bool {
        matches!(self, PageState::ReadOwner | PageState::WriteOwner)
    }

    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self != PageState::Invalid,
            Access::Write => self == PageState::WriteOwner,
        }
    }
}

/// Where the data of an installed page comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The page bytes that came with the message being handled.
    Message,
    /// A zero page (the page was never written).
    Zero,
    /// The bytes the RMA read just completed brought.
    Rma,
}
/// How a local fault is being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    Idle,
    /// One-sided: joining `owner`'s copyset, then reading its page.
    OneSided {
        owner: NodeId,
        reading: bool,
        invalidated: bool,
    },
    /// A request message is out.
    Requested(Access),
}

#[derive(Clone, Debug)]
struct Page {
    state: PageState,
    hint: Option<NodeId>,
    copyset: BTreeSet<NodeId>,
    want: Option<Access>,
    fetch: Fetch,
    /// Owner collecting invalidation acks: (nodes still to ack, who gets the write).
    busy: Option<(BTreeSet<NodeId>, NodeId)>,
    queue: VecDeque<(NodeId, Msg)>,
    /// The page should be published once this batch of actions settles (the share word is
    /// closed synchronously, so it is opened only at the end of a batch, never before a
    /// close of the same batch).
    publish: bool,
    /// This node held the page or heard of an owner once (the page was written or granted
    /// once): a failure's scan reports it when the dead node managed it.
    known: bool,
    /// Write requests forwarded under an older epoch than this are void (an entry rebuilt
    /// in a failure's change, [`Msg::Unqueue`]).
    floor: u64,
    /// An [`Action::Join`] is in flight (its result has not come back), maybe for a fetch
    /// given up since (a grant came by message). No second join is posted meanwhile: the
    /// share word counts joins with a fetch-and-add, so a second one landing in the same
    /// open period would add this node's bit twice, which reads as the next node's bit,
    /// and the owner would never invalidate this node's copy (a stale read: simulation
    /// seeds 4231 and 8210). The read goes by message instead.
    joining: bool,
}

impl Page {
    /// Write requests forwarded before `epoch` are void: those queued are dropped, later
    /// ones are dropped on arrival.
    fn void_writes_before(&mut self, epoch: u64) {
        self.floor = self.floor.max(epoch);
        self.queue
            .retain(|(_, m)| !matches!(m, Msg::Write { gen, .. } if *gen < epoch));
    }
}

impl Default for Page {
    fn default() -> Self {
        Page {
            state: PageState::Invalid,
            hint: None,
            copyset: BTreeSet::new(),
            want: None,
            fetch: Fetch::Idle,
            busy: None,
            queue: VecDeque::new(),
            publish: false,
            known: false,
            floor: 0,
            joining: false,
        }
    }
}

/// What a node holds of a page, for the directory's failure scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holding {
    pub page: PageId,
    /// This node has a valid copy (`owner` or not).
    pub copy: bool,
    pub owner: bool,
}

/// Counters for benchmarks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub faults: u64,
    pub one_sided_reads: u64,
    pub one_sided_retries: u64,
    pub message_grants: u64,
    pub invalidations_sent: u64,
    pub manager_requests: u64,
    /// Copies of dead nodes dropped from copysets (and acknowledgements no longer awaited).
    pub dead_copies_dropped: u64,
    /// Manager requests this node received for entries it does not manage (any more):
    /// forwarded to the current manager.
    pub requests_forwarded: u64,
    /// Manager requests for entries in transit towards this node, held until the entries
    /// arrived (step 4 of a change), and those handled since.
    pub requests_delayed: u64,
    pub requests_released: u64,
    /// Directory entries handed over to / received from other managers.
    pub entries_sent: u64,
    pub entries_received: u64,
    /// Requests asked again after a failure's rebuild (they may have gone to, or through,
    /// the dead node).
    pub requests_resent: u64,
    /// Read copies of this node made owner after their owner died.
    pub pages_promoted: u64,
    /// Pages this node, as a manager, found lost in a failure's rebuild.
    pub pages_lost: u64,
}

/// One node's protocol state for every page, and its manager role.
pub struct Node<W: ShareWords> {
    me: NodeId,
    one_sided: bool,
    locator: Box<dyn Placement + Send>,
    pages: BTreeMap<PageId, Page>,
    /// Nodes known to have died ([`Node::node_failed`]): never waited for, sent to or
    /// granted anything again.
    dead: BTreeSet<NodeId>,
    pub directory: Directory,
    pub words: W,
    pub stats: Stats,
    /// Membership changes ([`migration`]).
    change: migration::ChangeState,
    /// At a witness ([`Node::witness`]): pages each manager granted to itself as zero pages.
    witnessed: BTreeMap<NodeId, BTreeSet<PageId>>,
    /// Pages this node, as their manager, granted to itself as zero pages (told again to a
    /// new witness when its witness dies).
    self_granted: BTreeSet<PageId>,
    /// Every node of the view (live or not; [`Node::set_members`], and each change's).
    members: BTreeSet<NodeId>,
}

impl<W: ShareWords> Node<W> {
    /// `one_sided`: readers with a hint use the share word and RMA reads.
    pub fn new(me: NodeId, locator: Box<dyn Placement + Send>, words: W, one_sided: bool) -> Self {
        Node {
            me,
            one_sided,
            locator,
            pages: BTreeMap::new(),
            dead: BTreeSet::new(),
            directory: Directory::default(),
            words,
            stats: Stats::default(),
            change: migration::ChangeState::default(),
            witnessed: BTreeMap::new(),
            self_granted: BTreeSet::new(),
            members: BTreeSet::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn manager_of(&self, page: PageId) -> NodeId {
        self.locator.manager(page)
    }

    pub fn state(&self, page: PageId) -> PageState {
        self.pages
            .get(&page)
            .map(|p| p.state)
            .unwrap_or(PageState::Invalid)
    }

    /// The nodes of the view (the driver's job size; each change adds its members).
    pub fn set_members(&mut self, members: impl IntoIterator<Item = NodeId>) {
        self.members.extend(members);
    }

    /// The node this node tells of pages it granted to itself as zero pages
    /// ([`Msg::Touched`]): nobody else knows they were written, so without it this node's
    /// failure would leave them unknown and a new manager would hand them out as zero
    /// pages. It is the lowest live member other than this node (node 0's deputy is the
    /// second-lowest), so when any single node dies, a survivor holds its records; when a
    /// witness dies, its managers tell the next one again ([`Node::node_failed`]). Without
    /// a known member set: node 0 ([`WITNESS`]), and nobody for node 0 itself.
    pub fn witness(&self) -> Option<NodeId> {
        if self.members.is_empty() {
            return (self.me != WITNESS && !self.dead.contains(&WITNESS)).then_some(WITNESS);
        }
        self.members
            .iter()
            .copied()
            .find(|&n| n != self.me && !self.dead.contains(&n))
    }

    /// Whether `node` is known to have died.
    pub fn is_dead(&self, node: NodeId) -> bool {
        self.dead.contains(&node)
    }

    /// `node` died (a failed probe, or the membership's failure): the runtime knows it will
    /// never answer. Its read copies leave every copyset; an owner that waited for its
    /// invalidation acknowledgement stops waiting, so a pending write is granted; its
    /// queued requests are dropped and no request of it is served again; hints naming it
    /// are not followed (reads go to the manager).
    ///
    /// This does not make up for a dead *owner* or *manager*: a page whose owner died, or
    /// whose manager died, stays unserved until a failure's change rebuilds the entries
    /// ([`migration`]'s `Change::failed`); a page found lost then is answered
    /// [`Msg::Lost`], never with zeros.
    pub fn node_failed(&mut self, node: NodeId) -> Vec<Action> {
        let mut out = Vec::new();
        let witness = self.witness();
        if node == self.me || !self.dead.insert(node) {
            return out;
        }
        if witness == Some(node) {
            // The witness died with the records of this node's self-granted pages: the
            // next one is told again (sent before anything else this batch sends).
            if let Some(w) = self.witness() {
                for &page in &self.self_granted {
                    out.push(Action::Send {
                        to: w,
                        msg: Msg::Touched { page },
                    });
                }
            }
        }
        let pages: Vec<PageId> = self.pages.keys().copied().collect();
        for page in pages {
            let p = self.pages.get_mut(&page).expect("listed");
            if p.copyset.remove(&node) {
                self.stats.dead_copies_dropped += 1;
            }
            // A write the dead node forwarded as the page's manager is void too: its
            // record died with it, and the rebuilt entry would not know where the page
            // went (its requester asks again after the failure).
            p.queue.retain(|(sender, m)| match m {
                Msg::Read { from, .. } => *from != node,
                Msg::Write { from, .. } => *from != node && *sender != node,
                _ => true,
            });
            let mut finish = None;
            if let Some((waiting, to)) = &mut p.busy {
                if waiting.remove(&node) {
                    self.stats.dead_copies_dropped += 1;
                }
                if waiting.is_empty() {
                    finish = Some(*to);
                }
            }
            if let Some(to) = finish {
                self.finish_transfer(page, to, &mut out);
            }
            self.after(page, &mut out);
        }
        self.migration_member_gone(node, &mut out);
        out
    }

    /// Whether a local access to `page` is waiting.
    pub fn waiting(&self, page: PageId) -> Option<Access> {
        self.pages.get(&page).and_then(|p| p.want)
    }

    /// Whether anything is in progress for any page (fetches, invalidations, queued requests).
    pub fn idle(&self) -> bool {
        self.pages.values().all(|p| {
            p.want.is_none() && p.fetch == Fetch::Idle && p.busy.is_none() && p.queue.is_empty()
        })
    }

    /// The pages this node holds or has heard of, for the failure scan.
    pub fn holdings(&self) -> Vec<Holding> {
        self.pages
            .iter()
            .filter(|(_, p)| p.state != PageState::Invalid || p.hint.is_some())
            .map(|(&page, p)| Holding {
                page,
                copy: p.state != PageState::Invalid,
                owner: p.state.is_owner(),
            })
            .collect()
    }

    /// A page of a region restored from a checkpoint, before any access: `owner` held it
    /// (this node becomes its writable owner when it is `me`; the driver maps the bytes),
    /// or nobody did (it reads as zero). The page's manager records the owner.
    pub fn restore(&mut self, page: PageId, owner: Option<NodeId>) {
        let me = self.me;
        if let Some(o) = owner {
            if self.locator.manager(page) == me {
                self.directory.set_owner(page, o);
            }
        }
        let p = self.pages.entry(page).or_default();
        p.hint = owner;
        if owner == Some(me) {
            p.state = PageState::WriteOwner;
        }
    }

    /// A local access faulted (or is about to be performed).
    pub fn fault(&mut self, page: PageId, access: Access) -> Vec<Action> {
        let mut out = Vec::new();
        let p = self.pages.entry(page).or_default();
        if !p.state.allows(access) {
            self.stats.faults += 1;
        }
        p.want = p.want.max(Some(access));
        self.after(page, &mut out);
        out
    }

    /// A message from `from`.
    pub fn on_message(&mut self, from: NodeId, msg: Msg) -> Vec<Action> {
        let mut out = Vec::new();
        if self.dead.contains(&from) && !matches!(msg, Msg::Touched { .. }) {
            // Late from a node known dead (sent before it died): dropped, so that nothing
            // changes behind a failure's scan. A request it forwarded is asked again after
            // the failure; an invalidation it sent is not needed any more (it cannot write
            // without every acknowledgement), and the copy it would drop may be promoted.
            // What it witnessed stays useful.
            return out;
        }
        if msg.is_migration() {
            self.on_migration_message(from, msg, &mut out);
            return out;
        }
        let page = msg.page();
        self.handle(from, msg, &mut out);
        self.after(page, &mut out);
        out
    }

    /// The result of an [`Action::Join`]: whether `owner`'s word was open.
    pub fn on_join(&mut self, page: PageId, open: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let me = self.me;
        let p = self.pages.entry(page).or_default();
        p.joining = false;
        if let Fetch::OneSided {
            owner,
            reading: false,
            invalidated,
        } = p.fetch
        {
            if open && !invalidated {
                p.fetch = Fetch::OneSided {
                    owner,
                    reading: true,
                    invalidated: false,
                };
                out.push(Action::RmaRead { owner, page });
            } else if open {
                // Joined, then invalidated before reading: ask the manager.
                self.stats.one_sided_retries += 1;
                p.fetch = Fetch::Requested(Access::Read);
                p.hint = None;
                self.stats.manager_requests += 1;
                let to = self.locator.manager(page);
                out.push(Action::Send {
                    to,
                    msg: Msg::ManagerRead { page, from: me },
                });
            } else if self.dead.contains(&owner) {
                // Closed, and the owner died or left meanwhile: the manager knows the new one.
                p.fetch = Fetch::Requested(Access::Read);
                p.hint = None;
                self.stats.manager_requests += 1;
                let to = self.locator.manager(page);
                out.push(Action::Send {
                    to,
                    msg: Msg::ManagerRead { page, from: me },
                });
            } else {
                // Closed: the owner is busy, writing, or no owner at all; ask by message.
                p.fetch = Fetch::Requested(Access::Read);
                out.push(Action::Send {
                    to: owner,
                    msg: Msg::Read {
                        page,
                        from: me,
                        via_manager: false,
                    },
                });
            }
        }
        self.after(page, &mut out);
        out
    }

    /// The RMA read of an [`Action::RmaRead`] completed (its bytes are at hand).
    pub fn on_rma_read(&mut self, page: PageId) -> Vec<Action> {
        let mut out = Vec::new();
        let p = self.pages.entry(page).or_default();
        if let Fetch::OneSided {
            owner,
            reading: true,
            invalidated,
        } = p.fetch
        {
            p.fetch = Fetch::Idle;
            if invalidated {
                // The copy may be torn or stale: discard it and ask again (by the manager).
                self.stats.one_sided_retries += 1;
                p.hint = None;
            } else {
                self.stats.one_sided_reads += 1;
                p.state = PageState::ReadCopy;
                p.hint = Some(owner);
                out.push(Action::Install {
                    page,
                    source: Source::Rma,
                    writable: false,
                });
            }
        }
        self.after(page, &mut out);
        out
    }

    /// A one-sided operation of a read fault failed (its owner died or cannot be reached):
    /// the read is asked of the manager instead.
    pub fn on_remote_failed(&mut self, page: PageId) -> Vec<Action> {
        let mut out = Vec::new();
        let p = self.pages.entry(page).or_default();
        p.joining = false;
        if matches!(p.fetch, Fetch::OneSided { .. }) {
            p.fetch = Fetch::Idle;
            p.hint = None;
        }
        self.after(page, &mut out);
        out
    }

    fn after(&mut self, page: PageId, out: &mut Vec<Action>) {
        self.drain_queue(page, out);
        self.retry(page, out);
        if let Some(p) = self.pages.get_mut(&page) {
            p.known |= p.hint.is_some() || p.state != PageState::Invalid;
            if p.publish && p.state == PageState::ReadOwner && p.busy.is_none() {
                out.push(Action::Publish { page });
            }
            p.publish = false;
        }
    }

    /// Grants the local access if the state allows it, else starts serving it.
    fn retry(&mut self, page: PageId, out: &mut Vec<Action>) {
        let me = self.me;
        let manager = self.locator.manager(page);
        let one_sided = self.one_sided && me < SHARE_WORD_NODES;
        let Some(p) = self.pages.get_mut(&page) else {
            return;
        };
        let Some(want) = p.want else { return };
        if p.state.allows(want) {
            p.want = None;
            out.push(Action::Done { page, access: want });
            return;
        }
        if p.fetch != Fetch::Idle || p.busy.is_some() {
            return;
        }
        match (want, p.state) {
            (Access::Read, _) => match p.hint.filter(|h| !self.dead.contains(h)) {
                Some(h) if h != me && one_sided && !p.joining => {
                    p.fetch = Fetch::OneSided {
                        owner: h,
                        reading: false,
                        invalidated: false,
                    };
                    p.joining = true;
                    out.push(Action::Join { owner: h, page });
                }
                Some(h) if h != me => {
                    p.fetch = Fetch::Requested(Access::Read);
                    out.push(Action::Send {
                        to: h,
                        msg: Msg::Read {
                            page,
                            from: me,
                            via_manager: false,
                        },
                    });
                }
                _ => {
                    p.fetch = Fetch::Requested(Access::Read);
                    self.stats.manager_requests += 1;
                    out.push(Action::Send {
                        to: manager,
                        msg: Msg::ManagerRead { page, from: me },
                    });
                }
            },
            (Access::Write, PageState::ReadOwner) => {
                // Upgrade in place: the manager already names this node.
                self.start_invalidation(page, me, out);
                let p = self.pages.get_mut(&page).expect("page exists");
                if p.state.allows(want) {
                    p.want = None;
                    out.push(Action::Done { page, access: want });
                }
            }
            (Access::Write, _) => {
                p.fetch = Fetch::Requested(Access::Write);
                self.stats.manager_requests += 1;
                out.push(Action::Send {
                    to: manager,
                    msg: Msg::ManagerWrite { page, from: me },
                });
            }
        }
    }

    fn drain_queue(&mut self, page: PageId, out: &mut Vec<Action>) {
        let Some(p) = self.pages.get_mut(&page) else {
            return;
        };
        if p.busy.is_some() || p.queue.is_empty() {
            return;
        }
        let mut queued = std::mem::take(&mut p.queue);
        while let Some((from, msg)) = queued.pop_front() {
            self.handle(from, msg, out);
            // A request that started an invalidation blocks the rest, in order.
            let p = self.pages.get_mut(&page).expect("page exists");
            if p.busy.is_some() {
                p.queue.extend(queued.drain(..));
                break;
            }
        }
    }
}
