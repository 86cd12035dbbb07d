//! The fault timeout: a local access the driver cannot serve is reported, never left to
//! hang and never zero-filled.
//!
//! Every page a local access waits for is tracked from the moment a thread faulted on it,
//! with the nodes its request went to (the manager, the probable owner, the owner it joined
//! or read one-sided, the readers it invalidates). A watchdog thread of its own (the service
//! and fault threads may be held by a send to a dead node) checks the waits every
//! [`CHECK_EVERY`]; a wait longer than the fault timeout
//! (`KRUN_DSM_FAULT_TIMEOUT_MS`) probes every other node with a one-sided fetch-and-add of 0
//! (the same timeout bounds it). When a node does not answer, the page cannot be served: the
//! driver reports [`DsmError::PageUnreachable`] naming the page, its region and offset, and
//! the dead nodes, and calls the unreachable handler (by default: the message on stderr and
//! `_exit(EXIT_PAGE_UNREACHABLE)`, since the faulting thread is blocked inside a memory
//! access and can be given no error; a job's HA policy sees the rank exit with that code).
//! When every node answers, the wait goes on (a slow owner is not a dead one) and a warning
//! names the page and the nodes asked.
//!
//! A node found dead is first declared failed ([`Engine::node_failed`], announced to the
//! other nodes): its read copies leave the copysets, so a write that waited only for its
//! invalidation acknowledgement is granted, here or at the owner, and the access goes on.
//! The access is reported unreachable only if it still waits: at once when it asked a dead
//! node itself (the manager or the owner it sent to), else after a grace of one fault
//! timeout plus the fabric's operation timeout (the longest a live node can be held by a
//! send to the dead one before it handles the announcement), since the dead node may be
//! further down the chain (an owner the manager forwarded to).
//!
//! A node that does not answer a probe is declared dead only if its process is gone
//! ([`super::liveness`]): one stalled past the fault timeout (stopped, swapped out) stays
//! a member and the wait goes on.
//!
//! A send that failed makes its target a suspect: the next check probes it; dead, it is
//! declared failed; alive, the lost message becomes the driver's error.
//!
//! While node 0 lives, a dead node's failure is handled by a change ([`super::members`]):
//! its entries are rebuilt from the survivors' copies and every waiting access is asked
//! again. A wait that depends on a dead node is therefore not reported while that change
//! is to come (at most [`FAIL_GRACE`]); once it is committed, the wait goes on like any
//! other. A page found lost by the rebuild is reported as soon as its manager answers so
//! ([`DsmError::PageLost`]), through the same handler.
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{region_of, Engine};
use crate::coherence::{Access, Action, Msg, NodeId, PageId};
use crate::error::DsmError;

/// How often the service thread looks at the waits.
pub const CHECK_EVERY: Duration = Duration::from_millis(50);

/// Exit code of a rank whose access could not be served (the default handler's).
pub const EXIT_PAGE_UNREACHABLE: i32 = 75;

/// How long a wait on a dead node waits for the failure's change (node 0 bounds a change
/// at 120 s) before it is reported unreachable.
pub const FAIL_GRACE: Duration = Duration::from_secs(150);

/// What is called when a page cannot be served (after the error is recorded).
pub type UnreachableHandler = Arc<dyn Fn(&DsmError) + Send + Sync>;

/// A page a local access waits for.
pub(super) struct Pending {
    pub since: Instant,
    /// A thread faulted on it (not only a prefetch).
    pub demanded: bool,
    pub access: Access,
    /// The nodes asked so far (requests, joins, reads, invalidations).
    pub asked: BTreeSet<NodeId>,
    pub reported: bool,
    /// When a probe for this wait first found a dead node that it did not ask itself.
    pub dead_since: Option<Instant>,
    /// Its manager answered that the page is lost (reported once a thread waits for it).
    pub lost: bool,
}

impl Pending {
    fn new(access: Access, demanded: bool) -> Pending {
        Pending {
            since: Instant::now(),
            demanded,
            access,
            asked: BTreeSet::new(),
            reported: false,
            dead_since: None,
            lost: false,
        }
    }
}

/// The default handler: the message on stderr, then the process ends with
/// [`EXIT_PAGE_UNREACHABLE`] (its blocked thread cannot be resumed without the page).
pub fn exit_handler(me: NodeId) -> UnreachableHandler {
    Arc::new(move |e: &DsmError| {
        eprintln!("krun dsm: rank {me}: {e}; exiting with code {EXIT_PAGE_UNREACHABLE}");
        // SAFETY: _exit ends the process at once; nothing of ours is used after.
        unsafe { libc::_exit(EXIT_PAGE_UNREACHABLE) };
    })
}

impl Engine {
    /// A thread faulted on `page` (or a prefetch asked for it).
    pub(super) fn track_fault(&self, page: PageId, access: Access, demanded: bool) {
        if let Ok(mut p) = self.pending.lock() {
            let e = p
                .entry(page)
                .or_insert_with(|| Pending::new(access, demanded));
            if demanded && !e.demanded {
                e.demanded = true;
                e.since = Instant::now();
                if e.lost {
                    if let Ok(mut l) = self.lost_reports.lock() {
                        l.push(page);
                    }
                }
            }
            e.access = e.access.max(access);
        }
    }

    /// Follows an action: who was asked for a waited page, and when the wait ended.
    pub(super) fn track_action(&self, a: &Action) {
        let me = self.me;
        let (page, asked) = match a {
            Action::Send { to, msg } => match msg {
                Msg::Read { from, .. } | Msg::ManagerRead { from, .. } if *from == me => {
                    (msg.page(), *to)
                }
                Msg::ManagerWrite { from, .. } if *from == me => (msg.page(), *to),
                Msg::Invalidate { page } => (*page, *to),
                _ => return,
            },
            Action::Join { owner, page } | Action::RmaRead { owner, page } => (*page, *owner),
            Action::Done { page, .. } => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(page);
                }
                return;
            }
            _ => return,
        };
        if let Ok(mut p) = self.pending.lock() {
            if let Some(e) = p.get_mut(&page) {
                e.asked.insert(asked);
            }
        }
    }

    /// Probes the nodes sends failed to: dead ones are declared failed; a live one's lost
    /// message is the driver's error.
    fn check_suspects(self: &Arc<Self>) {
        let suspects = match self.suspects.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => return,
        };
        if suspects.is_empty() {
            return;
        }
        let nodes: Vec<NodeId> = suspects.keys().copied().collect();
        let Some(dead) = self.probe_nodes(&nodes) else {
            // No region left: the lost messages were about freed pages.
            return;
        };
        if !dead.is_empty() {
            eprintln!(
                "krun dsm: rank {}: nodes {dead:?} do not answer (a send failed): dropped \
                 from copysets",
                self.me
            );
            if let Err(e) = self.node_failed(&dead, true) {
                self.fail(e.to_string());
            }
        }
        for (n, e) in suspects {
            if !dead.contains(&n) {
                self.fail(format!(
                    "node {n} answers, but a message to it was lost: {e}"
                ));
            }
        }
    }

    /// Called by the watchdog thread: handles failed sends, and reports waits past the
    /// fault timeout.
    pub(super) fn check_waits(self: &Arc<Self>) {
        self.check_suspects();
        self.report_lost();
        let now = Instant::now();
        let expired: Vec<(PageId, Access, BTreeSet<NodeId>, Duration)> = {
            let Ok(mut p) = self.pending.lock() else {
                return;
            };
            p.retain(|&page, _| region_of(&self.regions, page).is_some());
            p.iter()
                .filter(|(_, e)| {
                    e.demanded && !e.reported && now.duration_since(e.since) >= self.fault_timeout
                })
                .map(|(&page, e)| (page, e.access, e.asked.clone(), now - e.since))
                .collect()
        };
        let Some(&(page, access, ref asked, waited)) = expired.first() else {
            return;
        };
        let known = self.dead_nodes();
        let dead = self.probe(page);
        let fresh: Vec<NodeId> = dead
            .iter()
            .copied()
            .filter(|n| !known.contains(n))
            .collect();
        if !fresh.is_empty() {
            eprintln!(
                "krun dsm: rank {}: nodes {fresh:?} do not answer: dropped from copysets \
                 (page {page} waited {:.1} s)",
                self.me,
                waited.as_secs_f64()
            );
            if let Err(e) = self.node_failed(&fresh, true) {
                self.fail(e.to_string());
            }
        }
        // Still waiting? Dropping the dead nodes may have granted it.
        let dead_since = {
            let Ok(mut p) = self.pending.lock() else {
                return;
            };
            match p.get_mut(&page) {
                None => return,
                Some(e) if e.reported => return,
                Some(e) => *e.dead_since.get_or_insert(Instant::now()),
            }
        };
        if dead.is_empty() {
            eprintln!(
                "krun dsm: rank {}: page {page} ({access:?}) waited {:.1} s for nodes {:?}, \
                 which answer: still waiting",
                self.me,
                waited.as_secs_f64(),
                asked
            );
            if let Ok(mut p) = self.pending.lock() {
                if let Some(e) = p.get_mut(&page) {
                    e.since = Instant::now();
                    e.dead_since = None;
                }
            }
            return;
        }
        {
            if dead.iter().all(|&n| self.members.settled(n)) {
                // The failures were handled: the entries were rebuilt and this access asked
                // again (its request may still be on its way); it waits like any other.
                eprintln!(
                    "krun dsm: rank {}: page {page} ({access:?}) waited {:.1} s; nodes {dead:?} \
                     died and their failure was handled: still waiting",
                    self.me,
                    waited.as_secs_f64()
                );
                if let Ok(mut p) = self.pending.lock() {
                    if let Some(e) = p.get_mut(&page) {
                        e.since = Instant::now();
                        e.dead_since = None;
                        e.asked.retain(|n| !dead.contains(n));
                    }
                }
                return;
            }
            if dead_since.elapsed() < FAIL_GRACE {
                // The coordinator (the next live node if node 0 died) runs the failure's
                // change: the access is asked again after it.
                return;
            }
        }
        let asked_dead = asked.iter().any(|n| dead.contains(n));
        let grace = self.fault_timeout + self.ep.op_timeout();
        if !asked_dead && dead_since.elapsed() < grace {
            // A node further down the chain may wait for the dead one: it drops it when the
            // announcement arrives.
            return;
        }
        let Some(region) = region_of(&self.regions, page) else {
            return;
        };
        let e = DsmError::PageUnreachable {
            page,
            region: region.base,
            offset: region.index(page) as u64 * crate::uffd::PAGE as u64,
            access: format!("{access:?}").to_lowercase(),
            asked: asked.iter().copied().collect(),
            dead,
            seconds: waited.as_secs_f64(),
        };
        if let Ok(mut p) = self.pending.lock() {
            for e in p.values_mut() {
                e.reported = true;
            }
        }
        self.stats.unreachable.fetch_add(1, Ordering::Relaxed);
        self.fail(e.to_string());
        let handler = self.unreachable.lock().ok().and_then(|h| h.clone());
        if let Some(h) = handler {
            h(&e);
        }
    }

    /// Reports the pages managers answered lost while a local access waited for them.
    fn report_lost(&self) {
        let pages = match self.lost_reports.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(_) => return,
        };
        for page in pages {
            let access = {
                let Ok(mut p) = self.pending.lock() else {
                    return;
                };
                match p.get_mut(&page) {
                    Some(e) if !e.demanded => {
                        // A prefetch: reported when a thread faults on it.
                        e.lost = true;
                        continue;
                    }
                    Some(e) if !e.reported => {
                        e.reported = true;
                        e.access
                    }
                    // A prefetch nobody waits for, or reported already.
                    _ => continue,
                }
            };
            let Some(region) = region_of(&self.regions, page) else {
                continue;
            };
            let gone: BTreeSet<NodeId> = self
                .members
                .view
                .lock()
                .ok()
                .and_then(|v| v.as_ref().map(|v| v.gone.clone()))
                .unwrap_or_default();
            let e = DsmError::PageLost {
                page,
                region: region.base,
                offset: region.index(page) as u64 * crate::uffd::PAGE as u64,
                access: format!("{access:?}").to_lowercase(),
                dead: self
                    .dead_nodes()
                    .into_iter()
                    .filter(|n| !gone.contains(n))
                    .collect(),
            };
            self.stats.unreachable.fetch_add(1, Ordering::Relaxed);
            self.fail(e.to_string());
            let handler = self.unreachable.lock().ok().and_then(|h| h.clone());
            if let Some(h) = handler {
                h(&e);
            }
        }
    }

    /// The nodes that do not answer a one-sided fetch-and-add of 0 on their share words of
    /// `page`'s region within the fault timeout (nodes known dead are not asked again).
    fn probe(&self, page: PageId) -> Vec<NodeId> {
        let all: Vec<NodeId> = (0..self.peer_count() as NodeId).collect();
        self.probe_in(region_of(&self.regions, page), &all)
    }

    /// [`Engine::probe`] of `nodes` on any live region's share words (None: no region).
    pub(super) fn probe_nodes(&self, nodes: &[NodeId]) -> Option<Vec<NodeId>> {
        let region = self
            .regions
            .read()
            .ok()
            .and_then(|m| m.values().next().cloned())?;
        Some(self.probe_in(Some(region), nodes))
    }

    fn probe_in(&self, region: Option<Arc<super::RegionInfo>>, nodes: &[NodeId]) -> Vec<NodeId> {
        let Some(region) = region else {
            return Vec::new();
        };
        let known = self.dead_nodes();
        let mut posted = Vec::new();
        let mut dead = Vec::new();
        let mut failed = Vec::new();
        for &n in nodes {
            if n == self.me {
                continue;
            }
            if known.contains(&n) {
                dead.push(n);
                continue;
            }
            let Ok(peer) = self.peer(n) else {
                continue;
            };
            let Some(words) = region.remote_words.get(n as usize) else {
                continue;
            };
            match self.ep.post_fetch_add(peer, words, 0, 0) {
                Ok(c) => posted.push((n, c)),
                Err(_) => failed.push(n),
            }
        }
        // Watched without a waiter's timeout: a timed-out wait would make the fabric fail
        // every later operation to the node, and a stalled node must come back.
        let deadline = Instant::now() + self.fault_timeout;
        let mut silent = failed;
        let mut unanswered = Vec::new();
        for (n, c) in posted {
            while !c.is_done() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if !c.is_done() {
                silent.push(n);
                unanswered.push((n, c));
            } else if c.wait_timeout(Duration::from_millis(1)).is_err() {
                silent.push(n);
            }
        }
        // A silent node may be stalled, not dead: only a gone process is declared dead.
        let confirmed = self.confirm_dead(silent);
        for (n, c) in unanswered {
            if confirmed.contains(&n) {
                // Give its in-flight slot back (the node is dead).
                let _ = c.wait_timeout(Duration::from_millis(1));
            }
            // A stalled node's probe stays in flight until it answers.
        }
        dead.extend(confirmed);
        dead.sort_unstable();
        dead
    }
}
