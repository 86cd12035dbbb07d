//! The lock table at the coordinator: a FIFO queue per lock, grants, a dead holder's locks
//! handed on ([`LockTable::node_failed`]), overdue holders, and the table rebuilt by a new
//! coordinator from the survivors' reports ([`LockTable::rebuild`]).
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{poisoned, NO_NODE};
use crate::coherence::NodeId;
use crate::error::{DsmError, Result};

#[derive(Default)]
pub(super) struct Entry {
    /// Grants so far (carried by grant messages, for diagnosis).
    pub(super) grants: u64,
    pub(super) holder: Option<NodeId>,
    pub(super) waiting: VecDeque<NodeId>,
    /// The sequence number of each waiter's and the holder's request (echoed in grants).
    pub(super) seqs: HashMap<NodeId, u64>,
    /// When the holder got it, and when it was last probed (the lock server).
    pub(super) since: Option<Instant>,
    pub(super) probed: Option<Instant>,
    /// The holder got the lock from a holder that died (named in the grant).
    pub(super) inherited: Option<NodeId>,
    /// The lock is free because its holder died: the next holder is told.
    pub(super) orphan: Option<NodeId>,
}

impl Entry {
    /// Hands the lock to the next waiter (`None`: it is free now).
    pub(super) fn pass(&mut self, from_dead: Option<NodeId>) -> Option<NodeId> {
        if let Some(old) = self.holder {
            self.seqs.remove(&old);
        }
        self.holder = self.waiting.pop_front();
        self.inherited = self.holder.and(from_dead);
        self.orphan = if self.holder.is_none() {
            from_dead
        } else {
            None
        };
        self.since = self.holder.map(|_| Instant::now());
        self.probed = None;
        if self.holder.is_some() {
            self.grants += 1;
        }
        self.holder
    }
}

/// What a node holds and waits for: `(lock, request sequence number)` each.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockReport {
    pub held: Vec<(u32, u64)>,
    pub waiting: Vec<(u32, u64)>,
    /// At the server's deputy: the locks the server noted it holds itself, with the server.
    pub server_held: Vec<(u32, NodeId)>,
}

/// The lock table at the coordinator.
#[derive(Default)]
pub struct LockTable {
    pub(super) entries: Mutex<HashMap<u32, Entry>>,
    pub(super) changed: Condvar,
    /// Nodes whose failure was handled: never granted a lock again.
    pub(super) dead: Mutex<BTreeSet<NodeId>>,
}

impl LockTable {
    pub(super) fn is_dead(&self, who: NodeId) -> bool {
        self.dead.lock().map(|d| d.contains(&who)).unwrap_or(false)
    }

    /// `who` asks for `id` (request `seq`); returns true when it holds it now.
    pub(super) fn acquire(&self, id: u32, who: NodeId, seq: u64) -> Result<bool> {
        if self.is_dead(who) {
            return Ok(false);
        }
        let mut t = self.entries.lock().map_err(|_| poisoned())?;
        let e = t.entry(id).or_default();
        if e.holder.is_none() {
            e.holder = Some(who);
            e.seqs.insert(who, seq);
            e.inherited = e.orphan.take();
            e.since = Some(Instant::now());
            e.probed = None;
            e.grants += 1;
            return Ok(true);
        }
        if e.holder != Some(who) && !e.waiting.contains(&who) {
            e.waiting.push_back(who);
            e.seqs.insert(who, seq);
        }
        Ok(false)
    }

    /// `who` releases `id`; returns the next holder, if any.
    pub(super) fn release(&self, id: u32, who: NodeId) -> Result<Option<NodeId>> {
        let mut t = self.entries.lock().map_err(|_| poisoned())?;
        let e = t.entry(id).or_default();
        if e.holder != Some(who) {
            return Err(DsmError::Config {
                what: format!("DSM lock {id}"),
                reason: format!("released by rank {who}, held by {:?}", e.holder),
            });
        }
        let next = e.pass(None);
        drop(t);
        self.changed.notify_all();
        Ok(next)
    }

    /// `node` died and its failure was handled: it leaves every queue, and each lock it
    /// held goes to its next waiter; returns those grants `(lock, new holder)`.
    pub(super) fn node_failed(&self, node: NodeId) -> Result<Vec<(u32, NodeId)>> {
        self.dead.lock().map_err(|_| poisoned())?.insert(node);
        let mut grants = Vec::new();
        let mut t = self.entries.lock().map_err(|_| poisoned())?;
        for (&id, e) in t.iter_mut() {
            e.waiting.retain(|&w| w != node);
            if e.holder == Some(node) {
                if let Some(next) = e.pass(Some(node)) {
                    grants.push((id, next));
                }
            } else {
                e.seqs.remove(&node);
            }
        }
        drop(t);
        self.changed.notify_all();
        Ok(grants)
    }

    /// A new coordinator's table, from every live member's report; `server` is the dead
    /// coordinator that kept the table before (and `dead`, every node known dead: never
    /// granted). A lock with waiters and no live holder was held by `server` (or granted by
    /// it to a waiter that never got the grant): it goes to its first waiter with a grant
    /// naming `server`. Returns those grants `(lock, new holder)`.
    pub(super) fn rebuild(
        &self,
        reports: &BTreeMap<NodeId, LockReport>,
        server: NodeId,
        dead: &BTreeSet<NodeId>,
    ) -> Result<Vec<(u32, NodeId)>> {
        let mut t = self.entries.lock().map_err(|_| poisoned())?;
        t.clear();
        {
            let mut d = self.dead.lock().map_err(|_| poisoned())?;
            d.extend(dead.iter().copied());
            d.insert(server);
        }
        for (&node, r) in reports {
            for &(id, seq) in &r.held {
                let e = t.entry(id).or_default();
                if let Some(other) = e.holder {
                    return Err(DsmError::Config {
                        what: format!("DSM lock {id}"),
                        reason: format!(
                            "nodes {other} and {node} both report holding it after node \
                             {server} died"
                        ),
                    });
                }
                e.holder = Some(node);
                e.seqs.insert(node, seq);
                e.since = Some(Instant::now());
                e.grants += 1;
            }
        }
        for (&node, r) in reports {
            for &(id, seq) in &r.waiting {
                let e = t.entry(id).or_default();
                if e.holder != Some(node) && !e.waiting.contains(&node) {
                    e.waiting.push_back(node);
                    e.seqs.insert(node, seq);
                }
            }
        }
        // A lock the dead server noted (to its deputy) it held itself: with no live holder
        // it is handed on below like the others, and with nobody waiting it stays free but
        // its next holder is told it was released by the server's death (the data it
        // protects is the last committed state, maybe half-updated).
        for r in reports.values() {
            for &(id, by) in &r.server_held {
                if by == server {
                    t.entry(id).or_default();
                }
            }
        }
        let mut grants = Vec::new();
        for (&id, e) in t.iter_mut() {
            if e.holder.is_none() {
                if let Some(next) = e.pass(Some(server)) {
                    grants.push((id, next));
                }
            }
        }
        grants.sort_unstable();
        drop(t);
        self.changed.notify_all();
        Ok(grants)
    }

    /// Holders that kept a lock others wait for longer than `limit` and were not probed
    /// within `limit`; marks them probed now.
    pub(super) fn overdue(&self, limit: Duration) -> Vec<NodeId> {
        let Ok(mut t) = self.entries.lock() else {
            return Vec::new();
        };
        let mut out = BTreeSet::new();
        for e in t.values_mut() {
            let (Some(h), Some(since)) = (e.holder, e.since) else {
                continue;
            };
            if e.waiting.is_empty() || since.elapsed() < limit {
                continue;
            }
            if e.probed.is_some_and(|p| p.elapsed() < limit) {
                continue;
            }
            e.probed = Some(Instant::now());
            out.insert(h);
        }
        out.into_iter().collect()
    }

    /// The dead holder lock `id` came from ([`NO_NODE`]: none).
    pub(super) fn inherited(&self, id: u32) -> NodeId {
        self.entries
            .lock()
            .ok()
            .and_then(|t| t.get(&id).and_then(|e| e.inherited))
            .unwrap_or(NO_NODE)
    }

    pub(super) fn holder(&self, id: u32) -> Option<NodeId> {
        self.entries
            .lock()
            .ok()
            .and_then(|t| t.get(&id).and_then(|e| e.holder))
    }
}
