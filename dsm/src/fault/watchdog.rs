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
}

impl Pending {
    fn new(access: Access, demanded: bool) -> Pending {
        Pending {
            since: Instant::now(),
            demanded,
            access,
            asked: BTreeSet::new(),
            reported: false,
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

    /// Called by the watchdog thread: reports waits past the fault timeout.
    pub(super) fn check_waits(&self) {
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
        let dead = self.probe(page);
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
                }
            }
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

    /// The nodes that do not answer a one-sided fetch-and-add of 0 on their share words
    /// within the fault timeout.
    fn probe(&self, page: PageId) -> Vec<NodeId> {
        let Some(region) = region_of(&self.regions, page) else {
            return Vec::new();
        };
        let mut posted = Vec::new();
        let mut dead = Vec::new();
        for (n, peer) in self.peers.iter().enumerate() {
            let n = n as NodeId;
            if n == self.me {
                continue;
            }
            let Some(peer) = *peer else { continue };
            match self
                .ep
                .post_fetch_add(peer, &region.remote_words[n as usize], 0, 0)
            {
                Ok(c) => posted.push((n, c)),
                Err(_) => dead.push(n),
            }
        }
        let deadline = Instant::now() + self.fault_timeout;
        for (n, c) in posted {
            let left = deadline.saturating_duration_since(Instant::now());
            if c.wait_timeout(left.max(Duration::from_millis(1))).is_err() {
                dead.push(n);
            }
        }
        dead.sort_unstable();
        dead
    }
}
