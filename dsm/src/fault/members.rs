//! The DSM's node set while it runs: a node joins, a node leaves, and the barrier among the
//! job's ranks, with membership messages (tag [`TAG_DSM_MEMBER`]) coordinated by the
//! coordinator ([`Engine::coordinator`]: node 0, then the lowest live node once it died;
//! "node 0" below).
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
//! node 0 itself dies, the next live node becomes the coordinator: it asks every survivor
//! for its state (`StateQuery`), finishes or drops the change node 0 left half-done
//! (`finish_half_done` in `change.rs`), then runs node 0's failure like any other.
//!
//! One change at a time; the coordinator cannot leave (it coordinates changes and
//! barriers). Regions must be allocated before the first change.
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

mod barrier;
mod change;
mod phases;
mod view;
mod wire;

use barrier::Barrier;
pub use view::View;
pub use wire::{decode, send_raw, Ctl};

use super::{now_ns, poisoned, region_of, Data, Engine, RegionInfo, TAG_DSM_MEMBER, WIRE_VERSION};
use crate::coherence::{Access, Change, NodeId, PageId};
use crate::directory::LocatorKind;
use crate::error::{DsmError, Result};

/// The first coordinator of membership changes and barriers (and the DSM locks' server).
/// The coordinator now is [`Engine::coordinator`]: the lowest live member, node 0 until it
/// dies.
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
    /// At a joining node: the join the dead coordinator left before any member switched
    /// was dropped; ask again at this address (the new coordinator's, [`Ctl::JoinDropped`]).
    rejoin: Mutex<Option<Vec<u8>>>,
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
    /// This node's DSM locks, for a new coordinator's [`Ctl::LockQuery`].
    lock_report: Mutex<Option<LockReporter>>,
}

/// What DSM locks this node holds and waits for.
pub type LockReporter = Arc<dyn Fn() -> crate::lock::LockReport + Send + Sync>;

/// Called at node 0 with the dead node once its failure's change committed.
pub type FailureHook = Arc<dyn Fn(NodeId) + Send + Sync>;

impl Members {
    /// At a joining node: the address to ask again at, once a new coordinator dropped the
    /// join the dead one left half-done (taken: asked once).
    pub(crate) fn take_rejoin(&self) -> Option<Vec<u8>> {
        self.rejoin.lock().ok().and_then(|mut r| r.take())
    }

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
            rejoin: Mutex::new(None),
            changing: Mutex::new(()),
            reports: Mutex::new(Vec::new()),
            hold: std::env::var_os("KRUN_DSM_MIGRATION_HOLD").is_some(),
            failures: Mutex::new(BTreeSet::new()),
            lost: Mutex::new(BTreeSet::new()),
            fail_hold: std::env::var_os("KRUN_DSM_FAIL_HOLD").map(Into::into),
            failure_hooks: Mutex::new(Vec::new()),
            lock_report: Mutex::new(None),
        }
    }

    /// At node 0: `hook` runs with each dead node once its failure's change committed.
    pub fn on_failure(&self, hook: FailureHook) {
        if let Ok(mut h) = self.failure_hooks.lock() {
            h.push(hook);
        }
    }

    /// What answers a new coordinator's [`Ctl::LockQuery`] here.
    pub fn set_lock_reporter(&self, r: LockReporter) {
        if let Ok(mut l) = self.lock_report.lock() {
            *l = Some(r);
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

    /// At the coordinator: queues the failure of `node` (once), unless it left already.
    pub(crate) fn queue_failure(&self, node: NodeId) {
        if self.settled(node) {
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

fn timeout(what: String, start: Instant) -> DsmError {
    DsmError::Timeout {
        what,
        seconds: start.elapsed().as_secs_f64(),
    }
}

impl Engine {
    /// The node that coordinates changes and barriers now: the lowest member of the view
    /// not known dead (node 0 while it lives). Every node computes it from its view and its
    /// dead set; the failure announcements make the survivors agree.
    pub fn coordinator(&self) -> NodeId {
        let dead = self.dead_nodes();
        self.members
            .view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().map(|v| v.members()))
            .unwrap_or_default()
            .into_iter()
            .find(|n| !dead.contains(n))
            .unwrap_or(self.me)
    }

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
            // Requests and answers are kept even at a node that does not know yet that it
            // coordinates (the sender learnt of the old coordinator's death first); only
            // the coordinator runs them.
            Ctl::Join { .. } | Ctl::Leave { .. } => {
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
            | Ctl::State { .. }
            | Ctl::Locks(_) => {
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
                self.ctl_to(from, Ctl::Installed { epoch })
            }
            Ctl::Migrate { epoch } => self.on_migrate(epoch),
            Ctl::Commit { epoch } => {
                self.on_commit(epoch)?;
                self.ctl_to(from, Ctl::Committed { epoch })
            }
            Ctl::StateQuery => {
                let state = self.change_state()?;
                self.ctl_to(from, state)
            }
            Ctl::LockQuery => {
                let report = self
                    .members
                    .lock_report
                    .lock()
                    .ok()
                    .and_then(|r| r.clone())
                    .map(|r| r())
                    .unwrap_or_default();
                self.ctl_to(from, Ctl::Locks(report))
            }
            Ctl::Arrive { gen } => self.on_arrive(from, gen),
            Ctl::Release { gen } => {
                self.members.release(gen);
                Ok(())
            }
            Ctl::Left => {
                self.members.left.store(true, Ordering::SeqCst);
                Ok(())
            }
            Ctl::JoinDropped { contact } => {
                if let Ok(mut r) = self.members.rejoin.lock() {
                    *r = Some(contact);
                }
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

    /// The coordinator, once the old one's failure committed: every live member's DSM
    /// locks (held and awaited), this node's among them.
    pub fn lock_reports(
        &self,
        within: Duration,
    ) -> Result<BTreeMap<NodeId, crate::lock::LockReport>> {
        let dead = self.dead_nodes();
        let live: BTreeSet<NodeId> = {
            let v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_ref().ok_or_else(|| no_view(self.me))?;
            v.members().difference(&dead).copied().collect()
        };
        for &m in &live {
            self.ctl_to(m, Ctl::LockQuery)?;
        }
        let got = self.wait_replies(
            "DSM locks takeover",
            &live,
            |c| matches!(c, Ctl::Locks(_)),
            Instant::now() + within,
        )?;
        Ok(got
            .into_iter()
            .filter_map(|(n, c)| match c {
                Ctl::Locks(r) => Some((n, r)),
                _ => None,
            })
            .collect())
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
