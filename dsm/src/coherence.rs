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

use crate::directory::{Directory, ManagerDecision};

mod migration;
pub use migration::Change;

pub type NodeId = adaptation::NodeId;
pub type PageId = u64;

/// Nodes whose id is below this can join a copyset through the share word.
pub const SHARE_WORD_NODES: NodeId = 32;
/// The share word's "open" flag; bits `0..32` are the joined readers.
pub const SHARE_OPEN: u64 = 1 << 63;
/// The node told of pages a manager granted to itself as zero pages ([`Msg::Touched`]):
/// nobody else knows they were written, so without it a failure of that node would leave
/// them unknown, and a new manager would hand them out as zero pages. (Node 0 coordinates
/// the rebuild; when it dies itself, nothing is rebuilt.)
///
/// Node 0's death (dsm/README.md): the witness's own self-granted pages need a deputy (the
/// second-lowest live node gets node 0's `Touched`), and the witness role passes with the
/// coordinator's.
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

/// Protocol messages. [`Msg::Grant`] carries the page bytes (attached by the driver from the
/// sender's memory unless `zero`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// A read request, sent to the probable owner (`via_manager == false`) or forwarded by
    /// the manager to the owner it has on record.
    Read {
        page: PageId,
        from: NodeId,
        via_manager: bool,
    },
    /// To the manager: `from` wants to read / write the page.
    ManagerRead {
        page: PageId,
        from: NodeId,
    },
    ManagerWrite {
        page: PageId,
        from: NodeId,
    },
    /// From the manager to the owner: hand the page over to `from` for writing. `gen`: the
    /// manager's epoch when it forwarded the request (a rebuilt entry voids older ones,
    /// [`Msg::Unqueue`]).
    Write {
        page: PageId,
        from: NodeId,
        gen: u64,
    },
    Invalidate {
        page: PageId,
    },
    InvalidateAck {
        page: PageId,
    },
    /// Access granted; `owner`: the receiver becomes the owner.
    Grant {
        page: PageId,
        access: Access,
        owner: bool,
        zero: bool,
    },
    /// From a manager that rebuilt its entry after a failure: the receiver, which holds a
    /// read copy, is the owner now; `copyset` are the other surviving copies.
    Promote {
        page: PageId,
        copyset: Vec<NodeId>,
    },
    /// A membership change moves directory entries (step 2 of the adaptation layer's
    /// migration): the states of entries the sender managed and the receiver manages from
    /// `epoch` on ([`crate::directory::DirectoryService`]'s `send_out` form).
    Entries {
        epoch: u64,
        entries: Vec<(PageId, Vec<u8>)>,
    },
    /// The sender has sent every entry it hands over for `epoch` and forwards from now on
    /// (links are FIFO: whatever it sent before, this node has received).
    MigrationDone {
        epoch: u64,
    },
    /// A failure's flush: the sender dropped the dead node (whatever that released, such
    /// as a write grant it had held for the dead node's acknowledgement, was sent before
    /// this) and will scan once every live member's flush arrived.
    Flush {
        epoch: u64,
    },
    /// From a manager to a requester: every copy of the page died (after a failure's
    /// rebuild); the access cannot be served.
    Lost {
        page: PageId,
    },
    /// From a manager that rebuilt a broken entry (a write forwarded through a dead node)
    /// in the failure's change to `epoch`: the write requests forwarded before (`gen <
    /// epoch`) belong to the old chain; those the receiver holds are dropped, and so are
    /// those that reach it later (their requesters ask again after the failure).
    Unqueue {
        page: PageId,
        epoch: u64,
    },
    /// To [`WITNESS`]: the sender, the page's manager, granted the page to itself as a zero
    /// page (it is written from now on, and only the sender knows).
    Touched {
        page: PageId,
    },
}

impl Msg {
    /// Whether the message belongs to a membership change (no page of its own).
    pub fn is_migration(&self) -> bool {
        matches!(
            self,
            Msg::Entries { .. } | Msg::MigrationDone { .. } | Msg::Flush { .. }
        )
    }

    /// The page the message is about (a migration message: its first entry's, or 0).
    pub fn page(&self) -> PageId {
        match self {
            Msg::Entries { entries, .. } => entries.first().map(|e| e.0).unwrap_or(0),
            Msg::MigrationDone { .. } | Msg::Flush { .. } => 0,
            Msg::Read { page, .. }
            | Msg::ManagerRead { page, .. }
            | Msg::ManagerWrite { page, .. }
            | Msg::Write { page, .. }
            | Msg::Invalidate { page }
            | Msg::InvalidateAck { page }
            | Msg::Grant { page, .. }
            | Msg::Promote { page, .. }
            | Msg::Lost { page }
            | Msg::Unqueue { page, .. }
            | Msg::Touched { page } => *page,
        }
    }
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send {
        to: NodeId,
        msg: Msg,
    },
    /// Remote fetch-and-add of `1 << me` on `owner`'s share word of `page`; answer with
    /// [`Node::on_join`] (whether the old word was open).
    Join {
        owner: NodeId,
        page: PageId,
    },
    /// One-sided read of `owner`'s published copy of `page`; answer with [`Node::on_rma_read`].
    RmaRead {
        owner: NodeId,
        page: PageId,
    },
    /// Map the page's data (read-only unless `writable`); the page was not mapped before.
    Install {
        page: PageId,
        source: Source,
        writable: bool,
    },
    /// Write-protect the local (mapped) page.
    Protect {
        page: PageId,
    },
    /// Copy the (read-only) page where one-sided readers read it, then open its share word:
    /// readers may join.
    Publish {
        page: PageId,
    },
    /// Make the (mapped, read-only) page writable.
    Unprotect {
        page: PageId,
    },
    /// Discard the local copy (the next access faults). A [`Msg::Grant`] sent later in the
    /// same batch carries the bytes the page held when it was dropped.
    Drop {
        page: PageId,
    },
    /// The waiting accesses of `page` may proceed.
    Done {
        page: PageId,
        access: Access,
    },
    /// The page's every copy died: the waiting accesses cannot be served (the driver
    /// reports it; never zero-filled).
    Lost {
        page: PageId,
    },
}

/// The share words of this node's pages (in registered memory in the real driver).
pub trait ShareWords {
    /// Closes the word of `page` (atomically) and returns the readers that joined.
    fn close(&mut self, page: PageId) -> BTreeSet<NodeId>;
}

/// Share words in plain memory (simulation and tests): `remote_join` is what a remote
/// fetch-and-add does.
#[derive(Clone, Debug, Default)]
pub struct LocalShareWords {
    words: BTreeMap<PageId, u64>,
}

impl LocalShareWords {
    pub fn open(&mut self, page: PageId) {
        self.words.insert(page, SHARE_OPEN);
    }

    /// The remote fetch-and-add of a joining reader; returns whether the word was open.
    pub fn remote_join(&mut self, page: PageId, reader: NodeId) -> bool {
        let w = self.words.entry(page).or_insert(0);
        let old = *w;
        *w = w.wrapping_add(1u64 << reader);
        old & SHARE_OPEN != 0
    }
}

impl ShareWords for LocalShareWords {
    fn close(&mut self, page: PageId) -> BTreeSet<NodeId> {
        let old = self.words.insert(page, 0).unwrap_or(0);
        joined_readers(old)
    }
}

/// The readers recorded in a closed share word's old value (nothing if it was not open).
pub fn joined_readers(word: u64) -> BTreeSet<NodeId> {
    if word & SHARE_OPEN == 0 {
        return BTreeSet::new();
    }
    (0..SHARE_WORD_NODES)
        .filter(|i| word & (1u64 << i) != 0)
        .collect()
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
    /// At [`WITNESS`]: pages each manager granted to itself as zero pages.
    witnessed: BTreeMap<NodeId, BTreeSet<PageId>>,
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
        if node == self.me || !self.dead.insert(node) {
            return out;
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
                Some(h) if h != me && one_sided => {
                    p.fetch = Fetch::OneSided {
                        owner: h,
                        reading: false,
                        invalidated: false,
                    };
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

    fn handle(&mut self, from: NodeId, msg: Msg, out: &mut Vec<Action>) {
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
                        if who == me && me != WITNESS && !self.dead.contains(&WITNESS) {
                            // Sent before the grant is handled: the witness hears of the
                            // page before anything is written to it.
                            out.push(Action::Send {
                                to: WITNESS,
                                msg: Msg::Touched { page },
                            });
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

    fn serve_read(&mut self, page: PageId, who: NodeId, out: &mut Vec<Action>) {
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
    fn start_invalidation(&mut self, page: PageId, to: NodeId, out: &mut Vec<Action>) {
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

    fn finish_transfer(&mut self, page: PageId, to: NodeId, out: &mut Vec<Action>) {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::directory::LocatorKind;
    use std::collections::VecDeque;

    /// Nodes exchanging messages in FIFO order, one-sided operations done at once.
    pub(in crate::coherence) struct Net {
        pub(in crate::coherence) nodes: Vec<Node<LocalShareWords>>,
        pub(in crate::coherence) queue: VecDeque<(NodeId, NodeId, Msg)>,
        pub(in crate::coherence) log: Vec<(NodeId, Action)>,
    }

    impl Net {
        pub(in crate::coherence) fn new(n: u32, one_sided: bool) -> Net {
            let ids: Vec<NodeId> = (0..n).collect();
            Net {
                nodes: ids
                    .iter()
                    .map(|&i| {
                        Node::new(
                            i,
                            LocatorKind::Modulo.build(&ids),
                            LocalShareWords::default(),
                            one_sided,
                        )
                    })
                    .collect(),
                queue: VecDeque::new(),
                log: Vec::new(),
            }
        }

        pub(in crate::coherence) fn apply(&mut self, at: NodeId, actions: Vec<Action>) {
            for a in actions {
                self.log.push((at, a.clone()));
                match a {
                    Action::Send { to, msg } => self.queue.push_back((at, to, msg)),
                    Action::Publish { page } => self.nodes[at as usize].words.open(page),
                    Action::Join { owner, page } => {
                        let open = self.nodes[owner as usize].words.remote_join(page, at);
                        let next = self.nodes[at as usize].on_join(page, open);
                        self.apply(at, next);
                    }
                    Action::RmaRead { page, .. } => {
                        let next = self.nodes[at as usize].on_rma_read(page);
                        self.apply(at, next);
                    }
                    _ => {}
                }
            }
        }

        pub(in crate::coherence) fn access(&mut self, at: NodeId, page: PageId, access: Access) {
            let a = self.nodes[at as usize].fault(page, access);
            self.apply(at, a);
            while let Some((from, to, msg)) = self.queue.pop_front() {
                let a = self.nodes[to as usize].on_message(from, msg);
                self.apply(to, a);
            }
            assert!(self.nodes[at as usize].state(page).allows(access));
        }
    }

    #[test]
    fn a_write_is_granted_only_after_every_copy_is_invalidated() {
        let mut net = Net::new(4, false);
        net.access(0, 5, Access::Write);
        for r in 1..4 {
            net.access(r, 5, Access::Read);
        }
        assert_eq!(net.nodes[0].state(5), PageState::ReadOwner);
        net.log.clear();
        net.access(2, 5, Access::Write);
        for r in [0, 1, 3] {
            assert_eq!(net.nodes[r as usize].state(5), PageState::Invalid);
        }
        assert_eq!(net.nodes[2].state(5), PageState::WriteOwner);
        let grant = net
            .log
            .iter()
            .position(|(_, a)| {
                matches!(
                    a,
                    Action::Send {
                        to: 2,
                        msg: Msg::Grant {
                            access: Access::Write,
                            ..
                        }
                    }
                )
            })
            .expect("a write grant");
        let acks: Vec<usize> = net
            .log
            .iter()
            .enumerate()
            .filter(|(_, (_, a))| {
                matches!(
                    a,
                    Action::Send {
                        msg: Msg::InvalidateAck { .. },
                        ..
                    }
                )
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(acks.len(), 2, "nodes 1 and 3 held copies");
        assert!(acks.iter().all(|&i| i < grant));
    }

    /// Node 3 held read copies (one joined through the share word when `one_sided`) of
    /// page 6 (managed by node 2) and died: messages to it are lost. Node 2's write waits for its acknowledgement until
    /// the live nodes learn of the death; then it is granted, every other copy invalid.
    #[test]
    fn a_write_is_granted_once_a_dead_readers_copy_is_dropped() {
        for one_sided in [false, true] {
            let mut net = Net::new(4, one_sided);
            net.access(0, 6, Access::Write);
            net.access(1, 6, Access::Read);
            net.access(3, 6, Access::Read);
            net.access(0, 6, Access::Write); // 1 and 3 now hint node 0
            net.access(2, 6, Access::Read); // node 0 is a read owner and publishes
            net.access(3, 6, Access::Read); // one-sided when allowed
            net.access(1, 6, Access::Read);
            assert_eq!(net.nodes[3].state(6), PageState::ReadCopy);
            // Node 3 dies: whatever is sent to it is lost.
            let a = net.nodes[2].fault(6, Access::Write);
            net.apply(2, a);
            let drain = |net: &mut Net| {
                while let Some((from, to, msg)) = net.queue.pop_front() {
                    if to == 3 {
                        continue;
                    }
                    let a = net.nodes[to as usize].on_message(from, msg);
                    net.apply(to, a);
                }
            };
            drain(&mut net);
            assert_ne!(
                net.nodes[2].state(6),
                PageState::WriteOwner,
                "granted without node 3's acknowledgement (one_sided {one_sided})"
            );
            for n in 0..3u32 {
                let a = net.nodes[n as usize].node_failed(3);
                net.apply(n, a);
            }
            drain(&mut net);
            assert_eq!(net.nodes[2].state(6), PageState::WriteOwner, "{one_sided}");
            assert_eq!(net.nodes[0].state(6), PageState::Invalid);
            assert_eq!(net.nodes[1].state(6), PageState::Invalid);
            assert_eq!(net.nodes[0].stats.dead_copies_dropped, 1);
            // Nothing more goes to the dead node: node 1 reads, node 0 writes.
            net.log.clear();
            net.access(1, 6, Access::Read);
            net.access(0, 6, Access::Write);
            assert!(
                !net.log
                    .iter()
                    .any(|(_, a)| matches!(a, Action::Send { to: 3, .. })),
                "{:?}",
                net.log
            );
        }
    }

    #[test]
    fn a_hinted_reader_joins_an_open_word_without_messaging_the_owner() {
        let mut net = Net::new(3, true);
        net.access(0, 1, Access::Write);
        net.access(1, 1, Access::Read); // by messages; node 0 becomes a read owner
        net.access(0, 1, Access::Write); // invalidates node 1, which now hints node 0
        net.access(2, 1, Access::Read); // node 0 publishes again
        net.log.clear();
        net.access(1, 1, Access::Read);
        assert!(net
            .log
            .iter()
            .all(|(_, a)| !matches!(a, Action::Send { .. })));
        assert!(net
            .log
            .iter()
            .any(|(_, a)| matches!(a, Action::RmaRead { owner: 0, page: 1 })));
        // The owner learns of the reader when it closes the word, and invalidates it.
        net.log.clear();
        net.access(0, 1, Access::Write);
        assert_eq!(net.nodes[1].state(1), PageState::Invalid);
        assert_eq!(net.nodes[2].state(1), PageState::Invalid);
    }

    #[test]
    fn a_closed_word_sends_the_reader_to_the_owner_by_message() {
        let mut net = Net::new(2, true);
        net.access(0, 0, Access::Write);
        net.access(1, 0, Access::Read);
        net.access(0, 0, Access::Write); // node 0 writes: its word is closed
        net.log.clear();
        net.access(1, 0, Access::Read);
        assert!(net.log.iter().any(|(_, a)| matches!(
            a,
            Action::Send {
                to: 0,
                msg: Msg::Read {
                    from: 1,
                    via_manager: false,
                    ..
                }
            }
        )));
        assert_eq!(net.nodes[0].state(0), PageState::ReadOwner);
    }
}
