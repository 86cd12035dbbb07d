//! DSM locks: a queue lock per id, kept by the coordinator (node 0, then the lowest live
//! node once it died) and granted by messages (FIFO, no remote atomics: a provider's atomics
//! towards its own process are not atomic with the others' on every provider). The
//! coordinator's own requests use its table without messages.
//!
//! A holder that dies: the coordinator's lock server probes a holder that kept a lock
//! others wait for past the fault timeout (the probe declares dead only a node whose process
//! is gone, see [`crate::fault`]'s liveness check); the node's failure runs as a change, and
//! once it is committed (its pages rebuilt from the survivors' copies, or reported lost)
//! [`Locks::node_failed`] hands each lock it held to the next live waiter (or frees it)
//! and drops it from every queue. The grant then names the dead holder: the data the lock
//! protects may be half-updated, and [`Locks::inherited`] tells the new holder so (a
//! warning goes to stderr); data whose every copy died is reported lost by the fault
//! driver on its first access ([`DsmError::PageLost`]), never read as zeros.
//!
//! The coordinator dies (the lock server itself): every node keeps what it holds and what
//! it waits for ([`Locks::report`], each with the request's sequence number). A waiter
//! probes the coordinator after each fault timeout (so a waiter never waits on a dead
//! server unnoticed) and sends its request again to the next coordinator once it knows.
//! The next coordinator, once the old one's failure committed (its pages rebuilt: a lock's
//! data is the last committed state), asks every live member for its report and rebuilds
//! the table ([`LockTable::rebuild`]): locks granted to survivors stay theirs, waiters are
//! queued again (by node id: the dead server's FIFO order is not known), and a lock with
//! waiters but no live holder was the dead server's: it goes to the first waiter with a
//! grant naming the dead node. Only then does it serve requests (those that came meanwhile
//! wait in its inbox, in order). Grants carry the request's sequence number and a node
//! ignores a grant that does not answer its current request or comes from a node it knows
//! dead, so a grant the old server sent before dying is never taken twice. The locks the
//! server takes itself are known to nobody else: it notes each one it takes and releases to
//! its deputy (`TAG_LOCK_NOTE`, the lowest live member other than itself), whose report
//! carries them, so a lock the dead server held with nobody waiting stays free but its next
//! holder is told the server died holding it.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fabric::{Endpoint, PeerId};

use crate::coherence::NodeId;
use crate::error::{DsmError, Result};

const TAG_LOCK_REQUEST: u64 = 0x4b44_534d_4c00_0000;
const TAG_LOCK_GRANT: u64 = 0x4b44_534d_4700_0000;
/// The server's note to its deputy that it took or released a lock itself.
const TAG_LOCK_NOTE: u64 = 0x4b44_534d_4e00_0000;
/// A note: op (held / released), lock id, the server.
const NOTE_LEN: usize = 1 + 4 + 4;
const NOTE_HELD: u8 = 1;
const NOTE_RELEASED: u8 = 2;
const OP_LOCK: u8 = 1;
const OP_UNLOCK: u8 = 2;
/// A request: op, lock id, requester, request sequence number.
const REQUEST_LEN: usize = 1 + 4 + 4 + 8;
/// A grant: grants so far, the dead previous holder, the request's sequence number.
const GRANT_LEN: usize = 8 + 4 + 8;

/// "No dead previous holder" in a grant message.
const NO_NODE: u32 = u32::MAX;

mod table;
pub use table::{LockReport, LockTable};

/// What the lock server does with a holder that kept a lock others wait for past the
/// fault timeout: probes it and, when its process is gone, declares it failed (its
/// failure's change then releases the lock through [`Locks::node_failed`]). A waiter runs
/// the same check on the coordinator it waits for.
pub type HolderCheck = Arc<dyn Fn(NodeId) + Send + Sync>;

/// The connection to a node (None: unknown, or this node itself). The DSM's own table, so
/// that a node that joined during the run is reached like any other.
pub type PeerLookup = Arc<dyn Fn(NodeId) -> Option<PeerId> + Send + Sync>;

/// What the locks need to know of the DSM's membership: the coordinator now, and whether a
/// connection is a node known dead.
pub struct LockMembers {
    pub coordinator: Arc<dyn Fn() -> NodeId + Send + Sync>,
    pub dead_peer: Arc<dyn Fn(PeerId) -> bool + Send + Sync>,
    /// The node the server notes the locks it takes itself with (the lowest live member
    /// other than this node: the next coordinator if this one dies).
    pub deputy: Arc<dyn Fn() -> Option<NodeId> + Send + Sync>,
}

impl Default for LockMembers {
    /// Node 0 coordinates for ever, nobody dies (unit tests).
    fn default() -> Self {
        LockMembers {
            coordinator: Arc::new(|| 0),
            dead_peer: Arc::new(|_| false),
            deputy: Arc::new(|| None),
        }
    }
}

/// This node's own locks (what it reports to a new coordinator).
#[derive(Default)]
struct Mine {
    seq: u64,
    held: BTreeMap<u32, u64>,
    waiting: BTreeMap<u32, u64>,
}

/// A rank's side of the locks.
pub struct Locks {
    me: NodeId,
    ep: Arc<dyn Endpoint>,
    /// The coordinator's connection (requests), and every node's (grants, at the
    /// coordinator).
    peers: PeerLookup,
    members: LockMembers,
    table: Arc<LockTable>,
    /// This node's table is the one in use: node 0 from the start, the next coordinator
    /// once it rebuilt it.
    serving: AtomicBool,
    mine: Mutex<Mine>,
    count: usize,
    /// At this node: locks granted after their holder died, with that holder.
    inherited: Mutex<HashMap<u32, NodeId>>,
    /// At the server's deputy: the locks the server noted it holds itself (lock -> server).
    noted: Mutex<BTreeMap<u32, NodeId>>,
    /// The check of overdue holders (at the server) and of a silent coordinator (at a
    /// waiter), and after how long.
    holder_check: Option<(HolderCheck, Duration)>,
}

impl Locks {
    pub fn new(me: NodeId, ep: Arc<dyn Endpoint>, peers: PeerLookup, count: usize) -> Self {
        Locks {
            me,
            ep,
            peers,
            members: LockMembers::default(),
            table: Arc::new(LockTable::default()),
            serving: AtomicBool::new(me == 0),
            mine: Mutex::new(Mine::default()),
            count,
            inherited: Mutex::new(HashMap::new()),
            noted: Mutex::new(BTreeMap::new()),
            holder_check: None,
        }
    }

    /// The coordinator and the dead nodes as the DSM knows them (default: node 0 for ever).
    pub fn with_members(mut self, members: LockMembers) -> Self {
        self.members = members;
        self
    }

    /// `check` runs at the lock server for a holder that kept a lock others wait for
    /// longer than `after` (then at most once per `after`), and at a waiter for the
    /// coordinator it has waited for `after`.
    pub fn with_holder_check(mut self, check: HolderCheck, after: Duration) -> Self {
        self.holder_check = Some((check, after));
        self
    }

    fn coordinator(&self) -> NodeId {
        (self.members.coordinator)()
    }

    /// Whether this node serves the locks now.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// What this node holds and waits for (asked by a new coordinator).
    pub fn report(&self) -> LockReport {
        self.mine
            .lock()
            .map(|m| LockReport {
                held: m.held.iter().map(|(&i, &s)| (i, s)).collect(),
                waiting: m.waiting.iter().map(|(&i, &s)| (i, s)).collect(),
                server_held: self
                    .noted
                    .lock()
                    .map(|n| n.iter().map(|(&i, &s)| (i, s)).collect())
                    .unwrap_or_default(),
            })
            .unwrap_or_default()
    }

    /// The lock server, once `node`'s failure was handled (its entries rebuilt, the
    /// change committed): each lock it held goes to its next live waiter, with a grant
    /// that names `node`; it leaves every queue and is never granted a lock again.
    pub fn node_failed(&self, node: NodeId) -> Result<()> {
        for (id, next) in self.table.node_failed(node)? {
            eprintln!(
                "krun dsm: DSM lock {id}: rank {node} died holding it; granted to rank {next}"
            );
            self.grant(id, next)?;
        }
        Ok(())
    }

    /// The new coordinator, once the old one's (`server`) failure committed: rebuilds the
    /// table from every live member's report (this node's among them), grants the locks
    /// `server` held to their first waiters, and starts serving.
    pub fn take_over(
        &self,
        server: NodeId,
        reports: &BTreeMap<NodeId, LockReport>,
        dead: &BTreeSet<NodeId>,
    ) -> Result<()> {
        let grants = self.table.rebuild(reports, server, dead)?;
        self.serving.store(true, Ordering::SeqCst);
        eprintln!(
            "krun dsm: rank {}: serving the DSM locks after rank {server} died ({} members \
             reported)",
            self.me,
            reports.len()
        );
        for (id, next) in grants {
            eprintln!(
                "krun dsm: DSM lock {id}: rank {server} died holding it; granted to rank {next}"
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

    /// At the lock server: the nodes waiting for lock `id`, in order (diagnosis and tests).
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

    /// At the lock server: lock `id`'s holder.
    pub fn holder(&self, id: usize) -> Option<NodeId> {
        self.table.holder(id as u32)
    }

    /// Records how this node got lock `id` (`dead`: the holder before it died, or
    /// [`NO_NODE`]).
    fn got(&self, id: u32, seq: u64, dead: NodeId) {
        if let Ok(mut m) = self.mine.lock() {
            m.waiting.remove(&id);
            m.held.insert(id, seq);
        }
        if self.serving() {
            // Nobody else knows the server holds it: its deputy is told.
            self.note(NOTE_HELD, id);
        }
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
        if to == self.me {
            // The server's own waiter watches the table.
            return Ok(());
        }
        let (n, dead, seq) = self
            .table
            .entries
            .lock()
            .map_err(|_| poisoned())?
            .get(&id)
            .map_or((0, NO_NODE, 0), |e| {
                (
                    e.grants,
                    e.inherited.unwrap_or(NO_NODE),
                    e.seqs.get(&to).copied().unwrap_or(0),
                )
            });
        let mut msg = n.to_le_bytes().to_vec();
        msg.extend_from_slice(&dead.to_le_bytes());
        msg.extend_from_slice(&seq.to_le_bytes());
        self.ep
            .send(self.peer(to)?, TAG_LOCK_GRANT | u64::from(id), &msg)?;
        Ok(())
    }

    /// The server tells its deputy it took or released lock `id` itself (no answer awaited:
    /// a note lost with the server makes the next holder warned for nothing, or not warned
    /// if the server died before the note left).
    fn note(&self, op: u8, id: u32) {
        let Some(deputy) = (self.members.deputy)().filter(|&d| d != self.me) else {
            return;
        };
        let Some(peer) = (self.peers)(deputy) else {
            return;
        };
        let mut m = vec![op];
        m.extend_from_slice(&id.to_le_bytes());
        m.extend_from_slice(&self.me.to_le_bytes());
        if let Err(e) = self.ep.send(peer, TAG_LOCK_NOTE, &m) {
            eprintln!("krun dsm: noting DSM lock {id} to rank {deputy}: {e}");
        }
    }

    /// A note from the server (at its deputy).
    fn on_note(&self, m: &fabric::Message) {
        let d = &m.data;
        if d.len() != NOTE_LEN {
            return;
        }
        let id = u32::from_le_bytes(d[1..5].try_into().expect("4 bytes"));
        let server = u32::from_le_bytes(d[5..9].try_into().expect("4 bytes"));
        if let Ok(mut n) = self.noted.lock() {
            match d[0] {
                NOTE_HELD => {
                    n.insert(id, server);
                }
                NOTE_RELEASED => {
                    n.remove(&id);
                }
                _ => {}
            }
        }
    }

    fn request(&self, to: NodeId, op: u8, id: u32, seq: u64) -> Result<()> {
        let mut req = vec![op];
        req.extend_from_slice(&id.to_le_bytes());
        req.extend_from_slice(&self.me.to_le_bytes());
        req.extend_from_slice(&seq.to_le_bytes());
        self.ep.send(self.peer(to)?, TAG_LOCK_REQUEST, &req)?;
        Ok(())
    }

    /// Takes lock `id`; fails after `limit` without a grant (counted again from a change
    /// of coordinator).
    pub fn lock(&self, id: usize, limit: Duration) -> Result<()> {
        let id = self.check(id)?;
        let seq = {
            let mut m = self.mine.lock().map_err(|_| poisoned())?;
            m.seq += 1;
            let seq = m.seq;
            m.waiting.insert(id, seq);
            seq
        };
        let r = self.wait_grant(id, seq, limit);
        if r.is_err() {
            if let Ok(mut m) = self.mine.lock() {
                m.waiting.remove(&id);
            }
        }
        r
    }

    fn wait_grant(&self, id: u32, seq: u64, limit: Duration) -> Result<()> {
        let mut start = Instant::now();
        let mut probed = Instant::now();
        // The coordinator this request went to, and whether its table has it.
        let mut told: Option<NodeId> = None;
        let mut asked_here = false;
        loop {
            let c = self.coordinator();
            if told != Some(c) {
                if told.is_some() {
                    start = Instant::now();
                    probed = Instant::now();
                }
                told = Some(c);
                asked_here = false;
                if c != self.me {
                    if let Err(e) = self.request(c, OP_LOCK, id, seq) {
                        // The coordinator may be dead: the probe below finds it.
                        if std::env::var_os("KRUN_DSM_TRACE").is_some() {
                            eprintln!("lock {id}: request to rank {c}: {e}");
                        }
                    }
                }
            }
            if c == self.me {
                if self.serving() {
                    if !asked_here {
                        asked_here = true;
                        if self.table.acquire(id, self.me, seq)? {
                            self.got(id, seq, self.table.inherited(id));
                            return Ok(());
                        }
                    }
                    let t = self.table.entries.lock().map_err(|_| poisoned())?;
                    if let Some(e) = t.get(&id).filter(|e| e.holder == Some(self.me)) {
                        let dead = e.inherited.unwrap_or(NO_NODE);
                        drop(t);
                        self.got(id, seq, dead);
                        return Ok(());
                    }
                    drop(
                        self.table
                            .changed
                            .wait_timeout(t, Duration::from_millis(50))
                            .map_err(|_| poisoned())?,
                    );
                } else {
                    // Becoming the server: its table is rebuilt once the old one's failure
                    // committed.
                    std::thread::sleep(Duration::from_millis(20));
                }
            } else {
                match self
                    .ep
                    .recv(TAG_LOCK_GRANT | u64::from(id), Duration::from_millis(50))
                {
                    Ok(m) => {
                        if let Some(dead) = self.accept_grant(id, seq, &m)? {
                            self.got(id, seq, dead);
                            return Ok(());
                        }
                    }
                    Err(fabric::FabricError::RecvTimeout { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                if let Some((check, after)) = &self.holder_check {
                    if probed.elapsed() >= *after {
                        // The server itself may be dead: a dead one is declared failed and
                        // the next coordinator serves the locks.
                        probed = Instant::now();
                        check(c);
                    }
                }
            }
            if start.elapsed() > limit {
                return Err(timeout(id, start));
            }
        }
    }

    /// A grant message for lock `id`: `Some(dead previous holder or NO_NODE)` when it
    /// answers request `seq`; `None` for a stale one (an earlier request's, or from a node
    /// known dead).
    fn accept_grant(&self, id: u32, seq: u64, m: &fabric::Message) -> Result<Option<NodeId>> {
        if std::env::var_os("KRUN_DSM_TRACE").is_some() {
            eprintln!("lock {id} grant {:?} at rank {}", m.data, self.me);
        }
        if m.data.len() != GRANT_LEN {
            return Err(DsmError::BadMessage {
                from: self.coordinator(),
                reason: format!("DSM lock {id} grant of {} bytes", m.data.len()),
            });
        }
        if m.peer.is_some_and(|p| (self.members.dead_peer)(p)) {
            return Ok(None);
        }
        let dead = u32::from_le_bytes(m.data[8..12].try_into().expect("4 bytes"));
        let got = u64::from_le_bytes(m.data[12..20].try_into().expect("8 bytes"));
        Ok((got == seq).then_some(dead))
    }

    pub fn unlock(&self, id: usize) -> Result<()> {
        let id = self.check(id)?;
        if let Ok(mut m) = self.inherited.lock() {
            m.remove(&id);
        }
        let seq = self
            .mine
            .lock()
            .map_err(|_| poisoned())?
            .held
            .remove(&id)
            .unwrap_or(0);
        let c = self.coordinator();
        if c == self.me {
            // A new server whose table is being rebuilt releases once it serves (the
            // report it may have given still names this node the holder).
            let begin = Instant::now();
            while !self.serving() {
                if begin.elapsed() > self.ep.op_timeout() * 6 {
                    return Err(timeout(id, begin));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.table.holder(id) == Some(self.me) {
                let next = self.table.release(id, self.me)?;
                self.note(NOTE_RELEASED, id);
                if let Some(next) = next {
                    self.grant(id, next)?;
                }
            }
            return Ok(());
        }
        self.request(c, OP_UNLOCK, id, seq)
    }

    /// The lock server: handles requests until `stop` (every node runs it; only the one
    /// serving, the coordinator, takes requests).
    pub fn serve(&self, stop: &AtomicBool) -> Result<()> {
        while !stop.load(Ordering::SeqCst) {
            if !self.serving() {
                // The server's notes of the locks it holds itself (at its deputy).
                match self.ep.recv(TAG_LOCK_NOTE, Duration::from_millis(20)) {
                    Ok(m) => self.on_note(&m),
                    Err(fabric::FabricError::RecvTimeout { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
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
            if d.len() != REQUEST_LEN {
                continue;
            }
            let id = u32::from_le_bytes(d[1..5].try_into().expect("4 bytes"));
            let who = u32::from_le_bytes(d[5..9].try_into().expect("4 bytes"));
            let seq = u64::from_le_bytes(d[9..17].try_into().expect("8 bytes"));
            if id as usize >= self.count || (who != self.me && (self.peers)(who).is_none()) {
                continue;
            }
            match d[0] {
                OP_LOCK if self.table.acquire(id, who, seq)? => self.grant(id, who)?,
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
mod tests;
