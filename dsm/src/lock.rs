//! DSM locks: a queue lock per id, kept by rank 0 and granted by messages (FIFO, no remote
//! atomics: a provider's atomics towards its own process are not atomic with the others'
//! on every provider). Rank 0's own requests use the same table without messages.
use std::collections::{HashMap, VecDeque};
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

#[derive(Default)]
struct Entry {
    /// Grants so far (carried by grant messages, for diagnosis).
    grants: u64,
    holder: Option<NodeId>,
    waiting: VecDeque<NodeId>,
}

/// The lock table at rank 0.
#[derive(Default)]
pub struct LockTable {
    entries: Mutex<HashMap<u32, Entry>>,
    changed: Condvar,
}

impl LockTable {
    /// `who` asks for `id`; returns true when it holds it now.
    fn acquire(&self, id: u32, who: NodeId) -> Result<bool> {
        let mut t = self.entries.lock().map_err(|_| poisoned())?;
        let e = t.entry(id).or_default();
        if e.holder.is_none() {
            e.holder = Some(who);
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
        e.holder = e.waiting.pop_front();
        if e.holder.is_some() {
            e.grants += 1;
        }
        let next = e.holder;
        drop(t);
        self.changed.notify_all();
        Ok(next)
    }

    fn holder(&self, id: u32) -> Option<NodeId> {
        self.entries
            .lock()
            .ok()
            .and_then(|t| t.get(&id).and_then(|e| e.holder))
    }
}

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
}

impl Locks {
    pub fn new(me: NodeId, ep: Arc<dyn Endpoint>, peers: PeerLookup, count: usize) -> Self {
        Locks {
            me,
            ep,
            peers,
            table: Arc::new(LockTable::default()),
            count,
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
        let n = self
            .table
            .entries
            .lock()
            .map_err(|_| poisoned())?
            .get(&id)
            .map_or(0, |e| e.grants);
        self.ep.send(
            self.peer(to)?,
            TAG_LOCK_GRANT | u64::from(id),
            &n.to_le_bytes(),
        )?;
        Ok(())
    }

    pub fn lock(&self, id: usize, limit: Duration) -> Result<()> {
        let id = self.check(id)?;
        let start = Instant::now();
        if self.me == 0 {
            if self.table.acquire(id, 0)? {
                return Ok(());
            }
            let mut t = self.table.entries.lock().map_err(|_| poisoned())?;
            loop {
                if t.get(&id).and_then(|e| e.holder) == Some(0) {
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
        Ok(())
    }

    pub fn unlock(&self, id: usize) -> Result<()> {
        let id = self.check(id)?;
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
    pub fn serve(&self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::SeqCst) {
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
