//! DSM locks: a queue lock per id, kept by rank 0 and granted by messages (FIFO, no remote
//! atomics: a provider's atomics towards its own process are not atomic with the others'
//! on every provider). Rank 0's own requests use the same table without messages.
//!
//! A holder that dies: rank 0's lock server probes a holder that kept a lock others wait
//! for past the fault timeout (the probe declares dead only a node whose process is gone,
//! see [`crate::fault`]'s liveness check); the node's failure runs as a change, and once it
//! is committed (its pages rebuilt from the survivors' copies, or reported lost)
//! [`Locks::node_failed`] hands each lock it held to the next live waiter (or frees it)
//! and drops it from every queue. The grant then names the dead holder: the data the lock
//! protects may be half-updated, and [`Locks::inherited`] tells the new holder so (a
//! warning goes to stderr); data whose every copy died is reported lost by the fault
//! driver on its first access ([`DsmError::PageLost`]), never read as zeros.
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fabric::{Endpoint, PeerId};

use crate::coherence::NodeId;
use crate::error::{DsmError, Result};

const TAG_LOCK_REQUEST: u64 = 0x4b44_534d_4c00_0000;
const TAG_LOCK_GRANT: u64 = 0x4b44_534d_4700_0000;
const OP_LOCK: u8 = 1;
const OP_UNLOCK: u8 = 2;

/// "No dead previous holder" in a grant message.
const NO_NODE: u32 = u32::MAX;

#[derive(Default)]
struct Entry {
    /// Grants so far (carried by grant messages, for diagnosis).
    grants: u64,
    holder: Option<NodeId>,
    waiting: VecDeque<NodeId>,
    /// When the holder got it, and when it was last probed (rank 0's lock server).
    since: Option<Instant>,
    probed: Option<Instant>,
    /// The holder got the lock from a holder that died (named in the grant).
    inherited: Option<NodeId>,
    /// The lock is free because its holder died: the next holder is told.
    orphan: Option<NodeId>,
}

impl Entry {
    /// Hands the lock to the next waiter (`None`: it is free now).
    fn pass(&mut self, from_dead: Option<NodeId>) -> Option<NodeId> {
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

/// The lock table at rank 0.
#[derive(Default)]
pub struct LockTable {
    entries: Mutex<HashMap<u32, Entry>>,
    changed: Condvar,
    /// Nodes whose failure was handled: never granted a lock again.
    dead: Mutex<BTreeSet<NodeId>>,
}

impl LockTable {
    fn is_dead(&self, who: NodeId) -> bool {
        self.dead.lock().map(|d| d.contains(&who)).unwrap_or(false)
    }

    /// `who` asks for `id`; returns true when it holds it now.
    fn acquire(&self, id: u32, who: NodeId) -> Result<bool> {
        if self.is_dead(who) {
            return Ok(false);
        }
        let mut t = self.entries.lock().map_err(|_| poisoned())?;
        let e = t.entry(id).or_default();
        if e.holder.is_none() {
            e.holder = Some(who);
            e.inherited = e.orphan.take();
            e.since = Some(Instant::now());
            e.probed = None;
            e.grants += 1;
            return Ok(true);
        }
        if e.holder != Some(who) && !e.waiting.contains(&who) {
            e.waiting.push_back(who);
        }
        Ok(false)
    }

    /// `who` releases `id`; returns the next holder, if any.
    fn release(&self, id: u32, who: NodeId) -> Result<Option<NodeId>> {
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
    fn node_failed(&self, node: NodeId) -> Result<Vec<(u32, NodeId)>> {
        self.dead.lock().map_err(|_| poisoned())?.insert(node);
        let mut grants = Vec::new();
        let mut t = self.entries.lock().map_err(|_| poisoned())?;
        for (&id, e) in t.iter_mut() {
            e.waiting.retain(|&w| w != node);
            if e.holder == Some(node) {
                if let Some(next) = e.pass(Some(node)) {
                    grants.push((id, next));
                }
            }
        }
        drop(t);
        self.changed.notify_all();
        Ok(grants)
    }

    /// Holders that kept a lock others wait for longer than `limit` and were not probed
    /// within `limit`; marks them probed now.
    fn overdue(&self, limit: Duration) -> Vec<NodeId> {
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
    fn inherited(&self, id: u32) -> NodeId {
        self.entries
            .lock()
            .ok()
            .and_then(|t| t.get(&id).and_then(|e| e.inherited))
            .unwrap_or(NO_NODE)
    }

    fn holder(&self, id: u32) -> Option<NodeId> {
        self.entries
            .lock()
            .ok()
            .and_then(|t| t.get(&id).and_then(|e| e.holder))
    }
}

/// What rank 0's lock server does with a holder that kept a lock others wait for past the
/// fault timeout: probes it and, when its process is gone, declares it failed (its
/// failure's change then releases the lock through [`Locks::node_failed`]).
pub type HolderCheck = Arc<dyn Fn(NodeId) + Send + Sync>;

/// The connection to a node (None: unknown, or this node itself). The DSM's own table, so
/// that a node that joined during the run is reached like any other.
pub type PeerLookup = Arc<dyn Fn(NodeId) -> Option<PeerId> + Send + Sync>;

/// A rank's side of the locks.
pub struct Locks {
    me: NodeId,
    ep: Arc<dyn Endpoint>,
    /// Rank 0's connection (requests), and every node's (grants, at rank 0).
    peers: PeerLookup,
    table: Arc<LockTable>,
    count: usize,
    /// At this node: locks granted after their holder died, with that holder.
    inherited: Mutex<HashMap<u32, NodeId>>,
    /// Rank 0: the check of overdue holders, and after how long a holder is overdue.
    holder_check: Option<(HolderCheck, Duration)>,
}

impl Locks {
    pub fn new(me: NodeId, ep: Arc<dyn Endpoint>, peers: PeerLookup, count: usize) -> Self {
        Locks {
            me,
            ep,
            peers,
            table: Arc::new(LockTable::default()),
            count,
            inherited: Mutex::new(HashMap::new()),
            holder_check: None,
        }
    }

    /// Rank 0: `check` runs for a holder that kept a lock others wait for longer than
    /// `after` (then at most once per `after`).
    pub fn with_holder_check(mut self, check: HolderCheck, after: Duration) -> Self {
        self.holder_check = Some((check, after));
        self
    }

    /// Rank 0, once `node`'s failure was handled (its entries rebuilt, the change
    /// committed): each lock it held goes to its next live waiter, with a grant that names
    /// `node`; it leaves every queue and is never granted a lock again.
    pub fn node_failed(&self, node: NodeId) -> Result<()> {
        for (id, next) in self.table.node_failed(node)? {
            eprintln!(
                "krun dsm: DSM lock {id}: rank {node} died holding it; granted to rank {next}"
            );
            self.grant(id, next)?;
        }
        Ok(())
    }

    /// Whether lock `id`, held by this node, was granted after its previous holder died
    /// (that holder): the data it protects may be half-updated.
    pub fn inherited(&self, id: usize) -> Option<NodeId> {
        self.inherited
            .lock()
            .ok()
            .and_then(|m| m.get(&(id as u32)).copied())
    }

    /// Rank 0: the nodes waiting for lock `id`, in order (diagnosis and tests).
    pub fn waiters(&self, id: usize) -> Vec<NodeId> {
        self.table
            .entries
            .lock()
            .ok()
            .and_then(|t| {
                t.get(&(id as u32))
                    .map(|e| e.waiting.iter().copied().collect())
            })
            .unwrap_or_default()
    }

    /// Records how this node got lock `id` (`dead`: the holder before it died, or
    /// [`NO_NODE`]).
    fn got(&self, id: u32, dead: NodeId) {
        if let Ok(mut m) = self.inherited.lock() {
            if dead == NO_NODE {
                m.remove(&id);
            } else {
                eprintln!(
                    "krun dsm: rank {}: DSM lock {id} granted after rank {dead}, which held it, \
                     died: the data it protects may be half-updated",
                    self.me
                );
                m.insert(id, dead);
            }
        }
    }

    fn check(&self, id: usize) -> Result<u32> {
        if id >= self.count {
            return Err(DsmError::Config {
                what: "lock id".into(),
                reason: format!("{id} >= {} locks", self.count),
            });
        }
        Ok(id as u32)
    }

    fn peer(&self, rank: NodeId) -> Result<PeerId> {
        (self.peers)(rank).ok_or_else(|| DsmError::Config {
            what: "peer".into(),
            reason: format!("rank {rank} is not connected"),
        })
    }

    fn grant(&self, id: u32, to: NodeId) -> Result<()> {
        if to == 0 {
            // Rank 0's waiter watches the table.
            return Ok(());
        }
        let (n, dead) = self
            .table
            .entries
            .lock()
            .map_err(|_| poisoned())?
            .get(&id)
            .map_or((0, NO_NODE), |e| (e.grants, e.inherited.unwrap_or(NO_NODE)));
        let mut msg = n.to_le_bytes().to_vec();
        msg.extend_from_slice(&dead.to_le_bytes());
        self.ep
            .send(self.peer(to)?, TAG_LOCK_GRANT | u64::from(id), &msg)?;
        Ok(())
    }

    pub fn lock(&self, id: usize, limit: Duration) -> Result<()> {
        let id = self.check(id)?;
        let start = Instant::now();
        if self.me == 0 {
            if self.table.acquire(id, 0)? {
                self.got(id, self.table.inherited(id));
                return Ok(());
            }
            let mut t = self.table.entries.lock().map_err(|_| poisoned())?;
            loop {
                if let Some(e) = t.get(&id).filter(|e| e.holder == Some(0)) {
                    let dead = e.inherited.unwrap_or(NO_NODE);
                    drop(t);
                    self.got(id, dead);
                    return Ok(());
                }
                if start.elapsed() > limit {
                    return Err(timeout(id, start));
                }
                t = self
                    .table
                    .changed
                    .wait_timeout(t, Duration::from_millis(50))
                    .map_err(|_| poisoned())?
                    .0;
            }
        }
        let mut req = vec![OP_LOCK];
        req.extend_from_slice(&id.to_le_bytes());
        req.extend_from_slice(&self.me.to_le_bytes());
        self.ep.send(self.peer(0)?, TAG_LOCK_REQUEST, &req)?;
        let m = self
            .ep
            .recv(TAG_LOCK_GRANT | u64::from(id), limit)
            .map_err(|_| timeout(id, start))?;
        if std::env::var_os("KRUN_DSM_TRACE").is_some() {
            eprintln!("lock {id} grant {:?} at rank {}", m.data, self.me);
        }
        let dead = match m.data.get(8..12) {
            Some(d) => u32::from_le_bytes(d.try_into().expect("4 bytes")),
            None => {
                return Err(DsmError::BadMessage {
                    from: 0,
                    reason: format!("DSM lock {id} grant of {} bytes", m.data.len()),
                })
            }
        };
        self.got(id, dead);
        Ok(())
    }

    pub fn unlock(&self, id: usize) -> Result<()> {
        let id = self.check(id)?;
        if let Ok(mut m) = self.inherited.lock() {
            m.remove(&id);
        }
        if self.me == 0 {
            if let Some(next) = self.table.release(id, 0)? {
                self.grant(id, next)?;
            }
            return Ok(());
        }
        let mut req = vec![OP_UNLOCK];
        req.extend_from_slice(&id.to_le_bytes());
        req.extend_from_slice(&self.me.to_le_bytes());
        self.ep.send(self.peer(0)?, TAG_LOCK_REQUEST, &req)?;
        Ok(())
    }

    /// Rank 0's lock server: handles requests until `stop`.
    ///
    /// Node 0's death (dsm/README.md): the next coordinator would start this server with a
    /// table rebuilt from the survivors' reports (holders kept, waiters queued again, locks
    /// node 0 held granted as inherited), and waiters would resend their requests to it.
    pub fn serve(&self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::SeqCst) {
            if let Some((check, after)) = &self.holder_check {
                for holder in self.table.overdue(*after) {
                    if holder != self.me {
                        check(holder);
                    }
                }
            }
            let m = match self.ep.recv(TAG_LOCK_REQUEST, Duration::from_millis(50)) {
                Ok(m) => m,
                Err(fabric::FabricError::RecvTimeout { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let d = &m.data;
            if d.len() != 9 {
                continue;
            }
            let id = u32::from_le_bytes(d[1..5].try_into().expect("4 bytes"));
            let who = u32::from_le_bytes(d[5..9].try_into().expect("4 bytes"));
            if id as usize >= self.count || (who != 0 && (self.peers)(who).is_none()) {
                continue;
            }
            match d[0] {
                OP_LOCK if self.table.acquire(id, who)? => self.grant(id, who)?,
                OP_UNLOCK if self.table.holder(id) == Some(who) => {
                    if let Some(next) = self.table.release(id, who)? {
                        self.grant(id, next)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn poisoned() -> DsmError {
    DsmError::Config {
        what: "DSM locks".into(),
        reason: "a thread panicked holding the lock table".into(),
    }
}

fn timeout(id: u32, start: Instant) -> DsmError {
    DsmError::Timeout {
        what: format!("DSM lock {id}"),
        seconds: start.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_holders_lock_goes_to_the_next_live_waiter_naming_it() {
        let t = LockTable::default();
        assert!(t.acquire(0, 1).unwrap());
        assert!(!t.acquire(0, 3).unwrap());
        assert!(!t.acquire(0, 2).unwrap());
        assert!(t.acquire(1, 1).unwrap());
        // Node 3 dies waiting, node 1 dies holding both locks.
        assert!(t.node_failed(3).unwrap().is_empty());
        let grants = t.node_failed(1).unwrap();
        assert_eq!(
            grants,
            vec![(0, 2)],
            "lock 0 goes to node 2, lock 1 is freed"
        );
        assert_eq!(t.holder(0), Some(2));
        assert_eq!(t.inherited(0), 1);
        assert_eq!(t.holder(1), None);
        // The next holder of the freed lock is told too; a dead node never gets one.
        assert!(!t.acquire(1, 3).unwrap());
        assert!(t.acquire(1, 0).unwrap());
        assert_eq!(t.inherited(1), 1);
        // A normal hand-over names nobody.
        assert!(!t.acquire(0, 0).unwrap());
        assert_eq!(t.release(0, 2).unwrap(), Some(0));
        assert_eq!(t.inherited(0), NO_NODE);
    }

    #[test]
    fn only_holders_past_the_limit_with_waiters_are_probed() {
        let t = LockTable::default();
        assert!(t.acquire(0, 1).unwrap());
        assert!(t.acquire(1, 2).unwrap());
        assert!(t.overdue(Duration::ZERO).is_empty(), "nobody waits");
        assert!(!t.acquire(0, 0).unwrap());
        assert_eq!(t.overdue(Duration::ZERO), vec![1]);
        assert!(t.overdue(Duration::from_secs(3600)).is_empty());
    }
}
