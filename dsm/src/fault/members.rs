//! The DSM's node set while it runs: a node joins, a node leaves, and the barrier among the
//! job's ranks, with membership messages (tag [`TAG_DSM_MEMBER`]) coordinated by node 0.
//!
//! A change runs in the seed's phases, timed at node 0 ([`ChangeReport`]):
//! - **start**: a join request is accepted, the newcomer gets an id and the view (members'
//!   addresses, regions and their descriptors) in a `Welcome`; a leave request is accepted;
//! - **physical**: the newcomer connects to every member, maps the regions at their
//!   addresses and registers its memory (`Ready`); a leaving node's pages are pulled to
//!   node 0 (write requests through the protocol: its copies invalidated, its bytes moved);
//! - **setting**: every member connects to the newcomer and learns its descriptors, and
//!   prepares the next view (`Install` / `Installed`);
//! - **logical**: every member switches to the next view and the directory's entries
//!   migrate in the adaptation layer's four steps (`Migrate` / `Migrated`,
//!   [`crate::coherence::Change`]) while the application keeps faulting;
//! - **end**: the view is committed everywhere (`Commit` / `Committed`); a node that left
//!   is dropped like a dead one (nothing is sent to it again) and told it may go (`Left`).
//!
//! A **failure** runs in the same phases (`ViewChange::Fail`): node 0 learns that a node
//! died (a probe, a failed send confirmed by a probe, another node's announcement) and
//! starts it; physical is empty (nothing can be pulled from a dead node); at setting every
//! member drops the dead node; at logical each survivor's scan of the copies it holds
//! replaces the dead node's `send_out` ([`crate::coherence::Change::failed`]): its entries
//! are rebuilt, read copies promoted, and pages whose every copy died are reported lost
//! (each member's `Migrated` names the pages it found lost, node 0's [`ChangeReport::lost`]
//! gathers them); at end every survivor asks again what it was still waiting for. When
//! node 0 itself dies nothing is rebuilt (the fault watchdog reports the accesses that wait
//! for the dead node).
//!
//! One change at a time; node 0 cannot leave (it coordinates changes and barriers). Regions
//! must be allocated before the first change.
//!
//! The barrier ([`Engine::barrier`]): each of the job's ranks that is still a member tells
//! node 0 it arrived; node 0 releases a generation once every live rank arrived. A rank that
//! left or died is not waited for.
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use adaptation::locator::Placement;
use fabric::{EndpointAddress, PeerId, RemoteRegion};
use serde::{Deserialize, Serialize};

mod change;

use super::{now_ns, poisoned, region_of, Data, Engine, RegionInfo, TAG_DSM_MEMBER, WIRE_VERSION};
use crate::coherence::{Access, Change, NodeId, PageId};
use crate::directory::LocatorKind;
use crate::error::{DsmError, Result};

/// The node that coordinates membership changes and barriers.
///
/// Node 0's death is not handled yet. Design (dsm/README.md, "Node 0's death"): this
/// becomes `Engine::coordinator()`, the lowest live member of the view; the new coordinator
/// starts `members_loop` and the lock server, collects every survivor's state (a change
/// half-done, locks held and waited for, barrier generation), finishes or drops the
/// half-done change, then runs `Fail(0)` like any failure.
pub const COORDINATOR: NodeId = 0;
/// The seed's phases of a node addition, in order ([`ChangeReport::phases`]).
pub const PHASES: [&str; 5] = ["start", "physical", "setting", "logical", "end"];
/// How long a leaving node keeps serving after its leave committed: one-sided operations
/// other nodes posted just before they learnt of it complete.
const LEAVE_GRACE: Duration = Duration::from_millis(200);

/// A change of the node set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ViewChange {
    Join(NodeId),
    Leave(NodeId),
    /// The node died.
    Fail(NodeId),
}

/// A shared region as a newcomer needs it: where it is, and every member's descriptors of
/// its export and words regions (empty for nodes gone).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegionDesc {
    pub first_page: PageId,
    pub pages: u64,
    pub base: u64,
    pub export: Vec<Vec<u8>>,
    pub words: Vec<Vec<u8>>,
}

/// What node 0 tells a newcomer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub id: NodeId,
    pub epoch: u64,
    pub dynamic: bool,
    pub initial: u32,
    pub history: Vec<ViewChange>,
    pub addrs: Vec<(NodeId, Vec<u8>)>,
    /// Nodes that left or died.
    pub gone: Vec<NodeId>,
    pub regions: Vec<RegionDesc>,
}

/// A region's descriptors of one node: (first page, export, words).
pub type Descriptors = Vec<(PageId, Vec<u8>, Vec<u8>)>;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Ctl {
    Join {
        addr: Vec<u8>,
    },
    Welcome(Box<Welcome>),
    Ready {
        regions: Descriptors,
    },
    Install {
        epoch: u64,
        change: ViewChange,
        addr: Vec<u8>,
        regions: Descriptors,
    },
    Installed {
        epoch: u64,
    },
    Migrate {
        epoch: u64,
    },
    Migrated {
        epoch: u64,
        /// The pages this member, as a manager, knows lost.
        lost: Vec<PageId>,
    },
    Commit {
        epoch: u64,
    },
    Committed {
        epoch: u64,
    },
    Leave {
        owned: Vec<PageId>,
    },
    Left,
    Arrive {
        gen: u64,
    },
    Release {
        gen: u64,
    },
    Dismiss,
    /// Node 0's own queue only (never sent): `node` died, run its failure.
    Failed {
        node: NodeId,
    },
}

/// One change as node 0 ran it: seconds spent in each of [`PHASES`].
#[derive(Clone, Debug, PartialEq)]
pub struct ChangeReport {
    pub change: ViewChange,
    pub epoch: u64,
    pub phases: [f64; 5],
    /// Pages the members found lost (every copy died), for the HA policy: restore them
    /// from a checkpoint. Empty for joins and leaves.
    pub lost: Vec<PageId>,
}

impl ChangeReport {
    pub fn total(&self) -> f64 {
        self.phases.iter().sum()
    }
}

/// The node set as every node keeps it (node 0's is the reference).
#[derive(Clone, Debug)]
pub struct View {
    pub kind: LocatorKind,
    pub initial: u32,
    pub history: Vec<ViewChange>,
    pub epoch: u64,
    pub addrs: BTreeMap<NodeId, Vec<u8>>,
    /// Nodes that left.
    pub gone: BTreeSet<NodeId>,
    /// Nodes whose failure was handled (a `Fail` change committed).
    pub failed: BTreeSet<NodeId>,
    pub next_id: NodeId,
    /// The change installed and not committed yet.
    pub pending: Option<(u64, ViewChange)>,
}

impl View {
    pub fn new(kind: LocatorKind, initial: u32, addrs: BTreeMap<NodeId, Vec<u8>>) -> View {
        View {
            kind,
            initial,
            history: Vec::new(),
            epoch: 0,
            addrs,
            gone: BTreeSet::new(),
            failed: BTreeSet::new(),
            next_id: initial,
            pending: None,
        }
    }

    /// Members now (nodes that joined and did not leave).
    pub fn members(&self) -> BTreeSet<NodeId> {
        (0..self.next_id)
            .filter(|n| !self.gone.contains(n) && !self.failed.contains(n))
            .collect()
    }

    pub fn members_after(&self, change: ViewChange) -> BTreeSet<NodeId> {
        let mut m = self.members();
        match change {
            ViewChange::Join(n) => m.insert(n),
            ViewChange::Leave(n) | ViewChange::Fail(n) => m.remove(&n),
        };
        m
    }

    /// The locator of this view, or of the next one with `next`: every node applies the
    /// same changes in the same order to the same start, so all get the same locator.
    pub fn locator(&self, next: Option<ViewChange>) -> Box<dyn Placement + Send> {
        let initial: Vec<NodeId> = (0..self.initial).collect();
        let mut l = self.kind.build(&initial);
        for c in self.history.iter().chain(next.iter()) {
            match *c {
                ViewChange::Join(n) => l.add_node(n),
                ViewChange::Leave(n) | ViewChange::Fail(n) => l.remove_node(n),
            }
        }
        l
    }
}

#[derive(Default)]
struct Barrier {
    /// This rank's next generation.
    next: u64,
    /// Generations below this are released.
    released: u64,
    /// At node 0: who arrived at each generation.
    arrivals: BTreeMap<u64, BTreeSet<NodeId>>,
}

/// Membership state of a node's driver.
pub struct Members {
    pub(crate) view: Mutex<Option<View>>,
    /// The job's ranks still taking part in barriers.
    participants: Mutex<BTreeSet<NodeId>>,
    /// At node 0: answers of the members to the change being run.
    replies: Mutex<Vec<(NodeId, Ctl)>>,
    replied: Condvar,
    /// At node 0: join and leave requests (with the requester's connection for a join).
    requests: Mutex<VecDeque<(NodeId, Ctl)>>,
    requested: Condvar,
    barrier: Mutex<Barrier>,
    released: Condvar,
    /// At node 0: joins are run as soon as they are asked for (else by [`Engine::admit`]).
    pub auto_admit: AtomicBool,
    pub dismissed: AtomicBool,
    left: AtomicBool,
    changing: Mutex<()>,
    reports: Mutex<Vec<ChangeReport>>,
    /// Test injection (`KRUN_DSM_MIGRATION_HOLD`): node 0 switches first and waits (at
    /// most 10 s) until it forwarded or held a request before the others switch.
    hold: bool,
    /// At node 0: failures queued or run (each is run once).
    failures: Mutex<BTreeSet<NodeId>>,
    /// At node 0: the pages the members reported lost (recorded before the commit).
    lost: Mutex<BTreeSet<PageId>>,
    /// Test injection (`KRUN_DSM_FAIL_HOLD`, a path): node 0 starts a failure's change
    /// only once that file exists (at most 60 s), so requests meet the dead node first.
    fail_hold: Option<std::path::PathBuf>,
    /// At node 0: what runs once a failure's change committed (the lock table releases
    /// the dead node's locks).
    failure_hooks: Mutex<Vec<FailureHook>>,
}

/// Called at node 0 with the dead node once its failure's change committed.
pub type FailureHook = Arc<dyn Fn(NodeId) + Send + Sync>;

impl Members {
    pub fn new(initial: u32) -> Members {
        Members {
            view: Mutex::new(None),
            participants: Mutex::new((0..initial).collect()),
            replies: Mutex::new(Vec::new()),
            replied: Condvar::new(),
            requests: Mutex::new(VecDeque::new()),
            requested: Condvar::new(),
            barrier: Mutex::new(Barrier::default()),
            released: Condvar::new(),
            auto_admit: AtomicBool::new(true),
            dismissed: AtomicBool::new(false),
            left: AtomicBool::new(false),
            changing: Mutex::new(()),
            reports: Mutex::new(Vec::new()),
            hold: std::env::var_os("KRUN_DSM_MIGRATION_HOLD").is_some(),
            failures: Mutex::new(BTreeSet::new()),
            lost: Mutex::new(BTreeSet::new()),
            fail_hold: std::env::var_os("KRUN_DSM_FAIL_HOLD").map(Into::into),
            failure_hooks: Mutex::new(Vec::new()),
        }
    }

    /// At node 0: `hook` runs with each dead node once its failure's change committed.
    pub fn on_failure(&self, hook: FailureHook) {
        if let Ok(mut h) = self.failure_hooks.lock() {
            h.push(hook);
        }
    }

    fn failure_handled(&self, node: NodeId) {
        let hooks = self
            .failure_hooks
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        for h in hooks {
            h(node);
        }
    }

    pub fn set_view(&self, view: View) {
        if let Ok(mut v) = self.view.lock() {
            *v = Some(view);
        }
    }

    pub fn set_participants(&self, p: BTreeSet<NodeId>) {
        if let Ok(mut s) = self.participants.lock() {
            *s = p;
        }
    }

    pub fn participants(&self) -> BTreeSet<NodeId> {
        self.participants
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    pub fn reports(&self) -> Vec<ChangeReport> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Whether `node` left or its failure was handled here (its entries were rebuilt).
    pub fn settled(&self, node: NodeId) -> bool {
        self.view
            .lock()
            .ok()
            .and_then(|v| {
                v.as_ref()
                    .map(|v| v.gone.contains(&node) || v.failed.contains(&node))
            })
            .unwrap_or(false)
    }

    /// At node 0: queues the failure of `node` (once), unless it left already.
    pub(crate) fn queue_failure(&self, node: NodeId) {
        // Node 0's own failure would be queued by the next coordinator (the lowest live
        // node) after its takeover (dsm/README.md, "Node 0's death"); not implemented.
        if node == COORDINATOR || self.settled(node) {
            return;
        }
        let fresh = self
            .failures
            .lock()
            .map(|mut f| f.insert(node))
            .unwrap_or(false);
        if fresh {
            if let Ok(mut r) = self.requests.lock() {
                r.push_back((node, Ctl::Failed { node }));
            }
            self.requested.notify_all();
        }
    }

    /// At node 0: the pages every member reported lost so far.
    pub fn lost(&self) -> Vec<PageId> {
        self.lost
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn epoch(&self) -> u64 {
        self.view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().map(|v| v.epoch))
            .unwrap_or(0)
    }

    fn reply(&self, from: NodeId, ctl: Ctl) {
        if let Ok(mut r) = self.replies.lock() {
            r.push((from, ctl));
        }
        self.replied.notify_all();
    }

    fn release(&self, gen: u64) {
        if let Ok(mut b) = self.barrier.lock() {
            b.released = b.released.max(gen + 1);
        }
        self.released.notify_all();
    }
}

fn encode(from: NodeId, ctl: &Ctl) -> Result<Vec<u8>> {
    let mut wire = vec![WIRE_VERSION];
    wire.extend(
        postcard::to_allocvec(&(from, ctl)).map_err(|e| DsmError::Config {
            what: "membership message".into(),
            reason: e.to_string(),
        })?,
    );
    let crc = crc32c::crc32c(&wire);
    wire.extend_from_slice(&crc.to_le_bytes());
    Ok(wire)
}

/// Parses [`encode`]'s output.
pub fn decode(data: &[u8]) -> std::result::Result<(NodeId, Ctl), String> {
    let (body, crc) = data
        .split_last_chunk::<4>()
        .ok_or_else(|| format!("{} bytes", data.len()))?;
    if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
        return Err("checksum mismatch (corrupted in transit)".into());
    }
    let (&version, rest) = body.split_first().ok_or("empty")?;
    if version != WIRE_VERSION {
        return Err(format!("wire version {version}, expected {WIRE_VERSION}"));
    }
    postcard::from_bytes(rest).map_err(|e| e.to_string())
}

/// Sends `ctl` from `from` to `peer` (also before the driver runs: a newcomer's request).
pub fn send_raw(ep: &dyn fabric::Endpoint, peer: PeerId, from: NodeId, ctl: &Ctl) -> Result<()> {
    ep.send(peer, TAG_DSM_MEMBER, &encode(from, ctl)?)?;
    Ok(())
}

fn timeout(what: String, start: Instant) -> DsmError {
    DsmError::Timeout {
        what,
        seconds: start.elapsed().as_secs_f64(),
    }
}

impl Engine {
    /// Sends `ctl` to `to` (handled here at once when `to` is this node).
    fn ctl_to(&self, to: NodeId, ctl: Ctl) -> Result<()> {
        if to == self.me {
            return self.handle_ctl(self.me, ctl);
        }
        send_raw(&*self.ep, self.peer(to)?, self.me, &ctl)
    }

    /// A membership message off the fabric.
    pub(super) fn on_member_wire(&self, peer: Option<PeerId>, data: &[u8]) -> Result<()> {
        let from_peer = peer.and_then(|p| self.rank_of(p));
        let (from, ctl) = decode(data).map_err(|reason| DsmError::BadMessage {
            from: from_peer.unwrap_or(u32::MAX),
            reason: format!("membership message: {reason}"),
        })?;
        if !matches!(ctl, Ctl::Join { .. }) && from_peer.is_some_and(|p| p != from) {
            return Err(DsmError::BadMessage {
                from: from_peer.unwrap_or(u32::MAX),
                reason: format!("membership message claims to be from node {from}"),
            });
        }
        if self.trace {
            eprintln!("{} dsm {}: from {from}: {ctl:?}", now_ns(), self.me);
        }
        self.handle_ctl(from, ctl)
    }

    fn handle_ctl(&self, from: NodeId, ctl: Ctl) -> Result<()> {
        let me = self.me;
        match ctl {
            Ctl::Join { .. } | Ctl::Leave { .. } if me == COORDINATOR => {
                if let Ok(mut r) = self.members.requests.lock() {
                    r.push_back((from, ctl));
                }
                self.members.requested.notify_all();
                Ok(())
            }
            Ctl::Ready { .. }
            | Ctl::Installed { .. }
            | Ctl::Migrated { .. }
            | Ctl::Committed { .. }
                if me == COORDINATOR =>
            {
                self.members.reply(from, ctl);
                Ok(())
            }
            Ctl::Install {
                epoch,
                change,
                addr,
                regions,
            } => {
                self.on_install(epoch, change, &addr, &regions)?;
                self.ctl_to(COORDINATOR, Ctl::Installed { epoch })
            }
            Ctl::Migrate { epoch } => self.on_migrate(epoch),
            Ctl::Commit { epoch } => {
                self.on_commit(epoch)?;
                self.ctl_to(COORDINATOR, Ctl::Committed { epoch })
            }
            Ctl::Arrive { gen } if me == COORDINATOR => {
                if let Ok(mut b) = self.members.barrier.lock() {
                    b.arrivals.entry(gen).or_default().insert(from);
                }
                self.barrier_recheck()
            }
            Ctl::Release { gen } => {
                self.members.release(gen);
                Ok(())
            }
            Ctl::Left => {
                self.members.left.store(true, Ordering::SeqCst);
                Ok(())
            }
            Ctl::Dismiss => {
                self.members.dismissed.store(true, Ordering::SeqCst);
                Ok(())
            }
            other => Err(DsmError::BadMessage {
                from,
                reason: format!("unexpected membership message at node {me}: {other:?}"),
            }),
        }
    }

    /// Adds node `id`'s descriptors of the regions (a join's setting phase).
    pub(crate) fn extend_regions(&self, id: NodeId, regions: &Descriptors) -> Result<()> {
        let mut map = self.regions.write().map_err(|_| poisoned())?;
        for (first, export, words) in regions {
            let Some(r) = map.get(first) else {
                continue; // freed since
            };
            let e = RemoteRegion::from_bytes(export)?;
            let w = RemoteRegion::from_bytes(words)?;
            let mut remote_export = r.remote_export.clone();
            let mut remote_words = r.remote_words.clone();
            let n = id as usize + 1;
            if remote_export.len() < n {
                remote_export.resize(n, e);
                remote_words.resize(n, w);
            }
            remote_export[id as usize] = e;
            remote_words[id as usize] = w;
            let info = RegionInfo {
                first_page: r.first_page,
                pages: r.pages,
                base: r.base,
                export: r.export.clone(),
                words: r.words.clone(),
                remote_export,
                remote_words,
            };
            map.insert(*first, Arc::new(info));
        }
        Ok(())
    }

    /// Setting phase at a member: connect to a newcomer, prepare the next view.
    fn on_install(
        &self,
        epoch: u64,
        change: ViewChange,
        addr: &[u8],
        regions: &Descriptors,
    ) -> Result<()> {
        if let ViewChange::Join(id) = change {
            let peer = self.ep.connect(&EndpointAddress::from_bytes(addr)?)?;
            self.add_peer(id, peer)?;
            self.extend_regions(id, regions)?;
        }
        if let ViewChange::Fail(id) = change {
            // Node 0 knows it died; this member may not have heard yet.
            self.drop_dead(&[id])?;
        }
        let dead = self.dead_nodes();
        let c = {
            let mut v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_mut().ok_or_else(|| no_view(self.me))?;
            v.pending = Some((epoch, change));
            if let ViewChange::Join(id) = change {
                v.addrs.insert(id, addr.to_vec());
            }
            Change {
                epoch,
                locator: v.locator(Some(change)),
                old_members: v.members().difference(&dead).copied().collect(),
                new_members: v.members_after(change).difference(&dead).copied().collect(),
                failed: match change {
                    ViewChange::Fail(n) => Some(n),
                    _ => None,
                },
            }
        };
        self.node.lock().map_err(|_| poisoned())?.prepare_change(c);
        Ok(())
    }

    /// Logical phase at a member: switch to the next view (entries migrate).
    fn on_migrate(&self, epoch: u64) -> Result<()> {
        let mut remote = Vec::new();
        let finished = {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            let actions = node.start_change(epoch);
            self.execute(&mut node, actions, Data::None, &mut remote)?;
            node.take_finished()
        };
        self.after_actions(remote, finished)
    }

    /// Test injection ([`Members::hold`]): node 0 switches, but its entries and markers
    /// wait until it forwarded or held a request (at most 10 s); the others have not
    /// switched yet, so their requests reach node 0's old entries (forwarded) and node 0's
    /// requests reach entries still at their old managers (held).
    fn migrate_held(&self, epoch: u64) -> Result<()> {
        let moved = |n: &crate::coherence::Node<super::RegisteredWords>| {
            n.stats.requests_forwarded + n.stats.requests_delayed
        };
        let mut remote = Vec::new();
        let (before, held) = {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            let before = moved(&node);
            let (held, rest): (Vec<_>, Vec<_>) = node.start_change(epoch).into_iter().partition(
                |a| matches!(a, crate::coherence::Action::Send { msg, .. } if msg.is_migration()),
            );
            self.execute(&mut node, rest, Data::None, &mut remote)?;
            (before, held)
        };
        if !remote.is_empty() {
            self.run_remote(std::mem::take(&mut remote))?;
        }
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until && moved(&*self.node.lock().map_err(|_| poisoned())?) == before
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let finished = {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            self.execute(&mut node, held, Data::None, &mut remote)?;
            node.take_finished()
        };
        self.after_actions(remote, finished)
    }

    /// Step 4 of the change to `epoch` ran here.
    pub(super) fn migration_finished(&self, epoch: u64) -> Result<()> {
        let lost = self
            .node
            .lock()
            .map_err(|_| poisoned())?
            .directory
            .lost_pages()
            .into_iter()
            .filter(|&p| region_of(&self.regions, p).is_some())
            .collect();
        self.ctl_to(COORDINATOR, Ctl::Migrated { epoch, lost })
    }

    /// End phase at a member: the view of `epoch` is the current one.
    fn on_commit(&self, epoch: u64) -> Result<()> {
        let change = {
            let mut v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_mut().ok_or_else(|| no_view(self.me))?;
            let (e, c) = v.pending.take().ok_or_else(|| DsmError::Config {
                what: "membership".into(),
                reason: format!("commit of epoch {epoch} without a prepared change"),
            })?;
            if e != epoch {
                return Err(DsmError::Config {
                    what: "membership".into(),
                    reason: format!("commit of epoch {epoch}, epoch {e} was prepared"),
                });
            }
            v.history.push(c);
            v.epoch = epoch;
            match c {
                ViewChange::Join(n) => v.next_id = v.next_id.max(n + 1),
                ViewChange::Leave(n) => {
                    v.gone.insert(n);
                }
                ViewChange::Fail(n) => {
                    v.failed.insert(n);
                }
            }
            c
        };
        if let ViewChange::Fail(n) = change {
            if let Ok(mut p) = self.members.participants.lock() {
                p.remove(&n);
            }
            // Every manager rebuilt its entries: what still waits is asked again.
            let mut remote = Vec::new();
            {
                let mut node = self.node.lock().map_err(|_| poisoned())?;
                let actions = node.resend_outstanding();
                self.execute(&mut node, actions, Data::None, &mut remote)?;
            }
            if !remote.is_empty() {
                self.run_remote(remote)?;
            }
            self.barrier_recheck()?;
        }
        if let ViewChange::Leave(n) = change {
            if let Ok(mut p) = self.members.participants.lock() {
                p.remove(&n);
            }
            if n != self.me {
                // Like a dead node: out of every copyset, never sent to again.
                self.drop_dead(&[n])?;
            }
            self.barrier_recheck()?;
        }
        Ok(())
    }

    /// Waits until every node of `from` answered with a message `is` accepts.
    fn wait_replies(
        &self,
        what: &str,
        from: &BTreeSet<NodeId>,
        is: impl Fn(&Ctl) -> bool,
        deadline: Instant,
    ) -> Result<BTreeMap<NodeId, Ctl>> {
        let start = Instant::now();
        let mut got = BTreeMap::new();
        let mut r = self.members.replies.lock().map_err(|_| poisoned())?;
        loop {
            let mut i = 0;
            while i < r.len() {
                if from.contains(&r[i].0) && is(&r[i].1) {
                    let (n, c) = r.remove(i);
                    got.insert(n, c);
                } else {
                    i += 1;
                }
            }
            let missing: Vec<NodeId> = from
                .iter()
                .copied()
                .filter(|n| !got.contains_key(n))
                .collect();
            if missing.is_empty() {
                return Ok(got);
            }
            let dead = self.dead_nodes();
            if let Some(n) = missing.iter().find(|n| dead.contains(n)) {
                return Err(DsmError::Collective {
                    what: "membership change".into(),
                    reason: format!("node {n} died during the {what} phase"),
                });
            }
            if Instant::now() >= deadline || self.stopped() {
                return Err(timeout(
                    format!("membership change ({what}: no answer from nodes {missing:?})"),
                    start,
                ));
            }
            r = self
                .members
                .replied
                .wait_timeout(r, Duration::from_millis(50))
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// Node 0's membership thread: runs leave requests, and join requests when joins are
    /// admitted automatically.
    pub(super) fn members_loop(&self) {
        const CHANGE_LIMIT: Duration = Duration::from_secs(120);
        while !self.stopped() {
            let next = {
                let Ok(mut r) = self.members.requests.lock() else {
                    return;
                };
                let auto = self.members.auto_admit.load(Ordering::SeqCst);
                match r
                    .iter()
                    .position(|(_, c)| matches!(c, Ctl::Failed { .. }))
                    .or_else(|| {
                        r.iter()
                            .position(|(_, c)| auto || matches!(c, Ctl::Leave { .. }))
                    }) {
                    Some(i) => r.remove(i),
                    None => {
                        let _ = self
                            .members
                            .requested
                            .wait_timeout(r, Duration::from_millis(50));
                        None
                    }
                }
            };
            if let Some((from, ctl)) = next {
                if let Err(e) = self.run_request(from, ctl, CHANGE_LIMIT) {
                    self.fail(format!("membership change: {e}"));
                }
            }
        }
    }

    /// Returns when every live rank of the job reached it.
    pub fn barrier(&self) -> Result<()> {
        let me = self.me;
        if !self.members.participants().contains(&me) {
            return Err(DsmError::Collective {
                what: "barrier".into(),
                reason: format!(
                    "node {me} joined during the run or left: barriers are among the job's ranks"
                ),
            });
        }
        let gen = {
            let mut b = self.members.barrier.lock().map_err(|_| poisoned())?;
            b.next += 1;
            b.next - 1
        };
        self.ctl_to(COORDINATOR, Ctl::Arrive { gen })?;
        let mut probed = Instant::now();
        let mut b = self.members.barrier.lock().map_err(|_| poisoned())?;
        loop {
            if b.released > gen {
                return Ok(());
            }
            let missing: Vec<NodeId> = match b.arrivals.get(&gen) {
                Some(arrived) if me == COORDINATOR => self
                    .members
                    .participants()
                    .into_iter()
                    .filter(|p| !arrived.contains(p))
                    .collect(),
                _ => Vec::new(),
            };
            drop(b);
            if !missing.is_empty() && probed.elapsed() > self.fault_timeout {
                // Node 0 waited a fault timeout: ranks that do not answer a probe are dead,
                // and the barrier goes on without them.
                probed = Instant::now();
                if let Some(dead) = self.probe_nodes(&missing) {
                    if !dead.is_empty() {
                        self.drop_dead(&dead)?;
                    }
                }
            }
            if let Some(e) = self.error() {
                return Err(DsmError::Collective {
                    what: "barrier".into(),
                    reason: e,
                });
            }
            if self.dead_nodes().contains(&COORDINATOR) {
                return Err(DsmError::Collective {
                    what: "barrier".into(),
                    reason: "node 0, which coordinates barriers, died".into(),
                });
            }
            b = self.members.barrier.lock().map_err(|_| poisoned())?;
            b = self
                .members
                .released
                .wait_timeout(b, Duration::from_millis(100))
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// Node 0: releases every generation every live rank arrived at.
    pub(super) fn barrier_recheck(&self) -> Result<()> {
        if self.me != COORDINATOR {
            return Ok(());
        }
        let dead = self.dead_nodes();
        let waiting_for: BTreeSet<NodeId> = self
            .members
            .participants()
            .difference(&dead)
            .copied()
            .collect();
        let mut release = Vec::new();
        {
            let mut b = self.members.barrier.lock().map_err(|_| poisoned())?;
            let gens: Vec<u64> = b.arrivals.keys().copied().collect();
            for g in gens {
                if waiting_for.is_subset(&b.arrivals[&g]) {
                    b.arrivals.remove(&g);
                    release.push(g);
                }
            }
        }
        for g in release {
            // The others first, node 0 itself last: a program may end right after the
            // barrier (mgs_dsm's MGS_STOP_AT exits at once), and node 0 released first
            // could end before its releases were sent, leaving the others waiting.
            for &p in waiting_for.iter().filter(|&&p| p != self.me) {
                if let Err(e) = self.ctl_to(p, Ctl::Release { gen: g }) {
                    self.suspect(p, format!("releasing barrier {g}: {e}"));
                }
            }
            if waiting_for.contains(&self.me) {
                self.members.release(g);
            }
        }
        Ok(())
    }

    /// Node 0 tells the nodes that joined during the run that the job is over.
    pub fn dismiss_joined(&self) {
        let participants = self.members.participants();
        let members = match self.members.view.lock() {
            Ok(v) => v.as_ref().map(|v| v.members()).unwrap_or_default(),
            Err(_) => return,
        };
        let dead = self.dead_nodes();
        for n in members {
            if n != self.me && !participants.contains(&n) && !dead.contains(&n) {
                let _ = self.ctl_to(n, Ctl::Dismiss);
            }
        }
    }
}

impl Engine {
    /// After a migration step's actions ran under the node lock: the requests they send to
    /// other nodes, then the migrations they finished.
    fn after_actions(&self, remote: Vec<super::Remote>, finished: Vec<u64>) -> Result<()> {
        if !remote.is_empty() {
            self.run_remote(remote)?;
        }
        for e in finished {
            self.migration_finished(e)?;
        }
        Ok(())
    }
}

fn no_view(me: NodeId) -> DsmError {
    DsmError::Config {
        what: "membership".into(),
        reason: format!("node {me} has no view yet"),
    }
}
