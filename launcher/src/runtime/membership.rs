//! The node's window on the adaptation membership: follows the driver's events, answers
//! waiting process-table requests, tells `krun` every agreed view, and after an agreed
//! failure marks the dead node's ranks lost (once, by the lowest surviving member).
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use adaptation::daemon::{Driver, DriverEvent, DriverHandle, ViewSnapshot};
use adaptation::service::RequestId;
use adaptation::{Change, NodeId};
use fabric::wire::FrameWriter;

use super::control::NodeToLauncher;
use super::status::ChangeInfo;
use super::table::{encode_op, parse_answer, TableAnswer, TableOp, TABLE_SERVICE};
use crate::error::{LauncherError, Result};

/// State shared by the node's threads.
pub struct Shared {
    pub me: NodeId,
    /// Killed ranks this node has told krun of (`NodeToLauncher::RankKilled`).
    pub killed_told: std::sync::atomic::AtomicUsize,
    /// Ranks of the job (rows 0..job_ranks of the process table).
    pub job_ranks: AtomicU64,
    view: Mutex<Option<ViewSnapshot>>,
    waiters: Mutex<HashMap<RequestId, Sender<Vec<u8>>>>,
    /// The link to `krun`, when there is one.
    launcher: Mutex<Option<(std::net::TcpStream, FrameWriter)>>,
    /// The node's work is over: views are no longer reported.
    finished: AtomicBool,
    stop: (Mutex<Option<String>>, Condvar),
    seq: AtomicU64,
    /// The node's rank runner, for ranks moved in or out.
    pub rank_commands: Mutex<Option<Sender<crate::ranks::RankCommand>>>,
    /// Ranks were moved away from this node: it is being drained.
    pub drained: AtomicBool,
    /// Ranks that said hello on the rank socket: they use the rank library (the fabric).
    pub linked_ranks: Mutex<BTreeSet<u64>>,
    /// Ranks running on this node: rank -> pid (started, not yet exited).
    pub local_ranks: Mutex<std::collections::BTreeMap<u64, u32>>,
    /// Ranks of the node's initial share not started yet (leave when they start or exit;
    /// lock order: `local_ranks`, then this).
    pub starting: Mutex<BTreeSet<u64>>,
    /// Called with every stable view (the store's agent follows failed nodes).
    pub view_hooks: Mutex<Vec<ViewHook>>,
    /// Ranks whose library watches for orders at any time (rollback in place).
    pub watchers: super::recovery::Watchers,
    /// The recoveries' restart orders: carried out one rank at a time, an order that a
    /// newer wiring epoch's superseded is dropped (`recovery.rs`).
    pub restarts: super::recovery::RestartOrders,
    /// The node's MPI servers (PMI-1, PMIx), if it serves any (krun's fence answers go
    /// there).
    pub pmi: Mutex<Vec<Arc<dyn super::mpi::RankWatch>>>,
    /// The MPI incarnation the node's MPI servers serve: the wiring epoch of the recovery
    /// that restarted every rank (0: the start; `runtime/mpi_recovery.rs`).
    pub mpi_wiring: AtomicU64,
    /// The newest wiring epoch of a recovery krun ordered (`LauncherToNode::Restart`; 0:
    /// the job's start).
    pub wiring: AtomicU64,
    /// rank -> the wiring epoch its running image started in (taken at its hello): the
    /// node's capture and safety reports of that rank carry it, so that krun tells a late
    /// report of a checkpoint a recovery undid from one of the same number taken since.
    pub rank_wiring: Mutex<std::collections::BTreeMap<u32, u64>>,
    /// The uncoordinated policy's per-rank captures and rejoins on this node.
    pub uncoordinated: super::uncoordinated::NodeSide,
}

/// A callback on every stable view.
pub type ViewHook = Box<dyn Fn(&ViewSnapshot) + Send>;

impl Shared {
    pub fn new(me: NodeId, job_ranks: u64) -> Arc<Shared> {
        Arc::new(Shared {
            me,
            job_ranks: AtomicU64::new(job_ranks),
            view: Mutex::new(None),
            waiters: Mutex::new(HashMap::new()),
            launcher: Mutex::new(None),
            finished: AtomicBool::new(false),
            stop: (Mutex::new(None), Condvar::new()),
            seq: AtomicU64::new(1),
            rank_commands: Mutex::new(None),
            drained: AtomicBool::new(false),
            linked_ranks: Mutex::new(BTreeSet::new()),
            killed_told: std::sync::atomic::AtomicUsize::new(0),
            view_hooks: Mutex::new(Vec::new()),
            local_ranks: Mutex::new(std::collections::BTreeMap::new()),
            starting: Mutex::new(BTreeSet::new()),
            watchers: Default::default(),
            restarts: Default::default(),
            pmi: Mutex::new(Vec::new()),
            mpi_wiring: AtomicU64::new(0),
            wiring: AtomicU64::new(0),
            rank_wiring: Mutex::new(std::collections::BTreeMap::new()),
            uncoordinated: Default::default(),
        })
    }

    pub fn set_launcher(&self, stream: std::net::TcpStream, writer: FrameWriter) {
        *self.launcher.lock().expect("launcher lock") = Some((stream, writer));
    }

    /// Sends to `krun`; a lost link is dropped quietly (krun is gone or will notice).
    pub fn tell_launcher(&self, msg: &NodeToLauncher) {
        let mut guard = self.launcher.lock().expect("launcher lock");
        if let Some((s, w)) = guard.as_mut() {
            if w.send(s, msg).is_err() {
                *guard = None;
            }
        }
    }

    /// The node's work is over: say goodbye to `krun` and stop reporting views.
    pub fn finish(&self) {
        if !self.finished.swap(true, Ordering::SeqCst) {
            self.tell_launcher(&NodeToLauncher::Bye);
        }
    }

    /// Asks the node to end (`krun` said so or went away, or the membership dropped it).
    pub fn request_stop(&self, why: String) {
        let (m, c) = &self.stop;
        let mut g = m.lock().expect("stop lock");
        if g.is_none() {
            *g = Some(why);
        }
        c.notify_all();
    }

    /// Waits until [`Shared::request_stop`]; returns why.
    pub fn wait_stop(&self) -> String {
        let (m, c) = &self.stop;
        let mut g = m.lock().expect("stop lock");
        while g.is_none() {
            g = c.wait(g).expect("stop lock");
        }
        g.clone().unwrap_or_default()
    }

    /// As [`Shared::wait_stop`], giving up after `timeout`.
    pub fn wait_stop_timeout(&self, timeout: Duration) -> Option<String> {
        let (m, c) = &self.stop;
        let g = m.lock().expect("stop lock");
        let (g, _) = c
            .wait_timeout_while(g, timeout, |g| g.is_none())
            .expect("stop lock");
        g.clone()
    }

    pub fn latest_view(&self) -> Option<ViewSnapshot> {
        self.view.lock().expect("view lock").clone()
    }
}

/// Every agreed change with the epoch it leads to.
pub fn changes(view: &ViewSnapshot) -> Vec<ChangeInfo> {
    view.changes
        .iter()
        .enumerate()
        .map(|(i, c)| ChangeInfo {
            epoch: i as u64 + 1,
            kind: match c {
                Change::Join { .. } => "join",
                Change::Leave { .. } => "leave",
                Change::Fail { .. } => "fail",
                Change::Promote { .. } => "promote",
                Change::Demote { .. } => "demote",
            }
            .into(),
            node: c.node(),
        })
        .collect()
}

/// Requests to the process table through this node's adaptation node.
#[derive(Clone)]
pub struct TableClient {
    pub handle: DriverHandle,
    pub shared: Arc<Shared>,
    /// The client id of this node's requests: the table answers each (origin, client) in
    /// sequence order and refuses an older one as stale, so threads that may write the same
    /// rank's row at the same time use clients of their own ([`TableClient::as_client`]).
    pub client: u32,
}

impl TableClient {
    /// The same table through client id `client`.
    pub fn as_client(&self, client: u32) -> TableClient {
        TableClient {
            client,
            ..self.clone()
        }
    }

    /// Submits `op` for `rank`; the answer comes through [`TableClient::wait`].
    pub fn submit(&self, rank: u64, op: &TableOp) -> Result<mpsc::Receiver<Vec<u8>>> {
        let id = RequestId {
            origin: self.shared.me,
            client: self.client,
            seq: self.shared.seq.fetch_add(1, Ordering::SeqCst),
        };
        let (tx, rx) = mpsc::channel();
        self.shared
            .waiters
            .lock()
            .expect("waiters lock")
            .insert(id, tx);
        if let Err(e) = self.handle.submit(id, TABLE_SERVICE, rank, encode_op(op)) {
            self.shared
                .waiters
                .lock()
                .expect("waiters lock")
                .remove(&id);
            return Err(adapt_err(e));
        }
        Ok(rx)
    }

    pub fn wait(rx: &mpsc::Receiver<Vec<u8>>, timeout: Duration) -> Option<TableAnswer> {
        rx.recv_timeout(timeout).ok().and_then(|p| parse_answer(&p))
    }

    /// One request, waiting up to `timeout` for its answer.
    pub fn request(&self, rank: u64, op: &TableOp, timeout: Duration) -> Result<TableAnswer> {
        let rx = self.submit(rank, op)?;
        Self::wait(&rx, timeout).ok_or_else(|| LauncherError::Node {
            node: self.shared.me as usize,
            message: format!("the process table did not answer for rank {rank} in {timeout:?}"),
        })
    }
}

pub fn adapt_err(e: adaptation::AdaptError) -> LauncherError {
    LauncherError::Usage(format!("adaptation layer: {e}"))
}

/// Follows the driver's events until it stops (runs on its own thread).
pub fn watch(driver: Driver, table: TableClient, verbose: bool) {
    let shared = table.shared.clone();
    let mut handled_failures: BTreeSet<u64> = BTreeSet::new();
    while let Ok(event) = driver.events().recv() {
        match event {
            DriverEvent::Response { id, payload } => {
                if let Some(tx) = shared.waiters.lock().expect("waiters lock").remove(&id) {
                    let _ = tx.send(payload);
                }
            }
            DriverEvent::Stable(view) => {
                let failures: Vec<(u64, NodeId)> = changes(&view)
                    .into_iter()
                    .filter(|c| c.kind == "fail")
                    .map(|c| (c.epoch, c.node))
                    .collect();
                let lowest = view.members.first().copied();
                for &(epoch, node) in &failures {
                    if handled_failures.insert(epoch) && lowest == Some(shared.me) {
                        mark_lost(table.clone(), node);
                    }
                }
                if verbose {
                    eprintln!(
                        "krund: node {}: stable at epoch {} members {:?}",
                        shared.me, view.epoch, view.members
                    );
                }
                if !shared.finished.load(Ordering::SeqCst) {
                    shared.tell_launcher(&NodeToLauncher::View {
                        epoch: view.epoch,
                        members: view.members.clone(),
                        failures,
                    });
                }
                for hook in shared.view_hooks.lock().expect("hooks lock").iter() {
                    hook(&view);
                }
                *shared.view.lock().expect("view lock") = Some(view);
            }
            DriverEvent::Phase { epoch, phase } => {
                if verbose {
                    eprintln!("krund: node {}: epoch {epoch} {phase}", shared.me);
                }
            }
            DriverEvent::Log(line) => {
                if verbose {
                    eprintln!("krund: node {}: {line}", shared.me);
                }
            }
            DriverEvent::Stopped { reason } => {
                shared.request_stop(format!("out of the membership: {reason}"));
                break;
            }
        }
    }
    let _ = driver.join();
}

/// Marks the ranks of a failed node lost (in the background: the table may be migrating).
fn mark_lost(table: TableClient, node: NodeId) {
    let table = table.as_client(super::TABLE_CLIENT_LOST);
    std::thread::spawn(move || {
        let n = table.shared.job_ranks.load(Ordering::SeqCst);
        let pending: Vec<_> = (0..n)
            .filter_map(|r| {
                table
                    .submit(r, &TableOp::MarkLost { node })
                    .ok()
                    .map(|rx| (r, rx))
            })
            .collect();
        let mut lost = Vec::new();
        for (rank, rx) in pending {
            if TableClient::wait(&rx, Duration::from_secs(30)).is_some_and(|a| a.is_lost()) {
                lost.push(rank);
            }
        }
        if !lost.is_empty() {
            // Their rows died with every copy (the row's manager and its witness failed
            // together): the ranks' restarts register them anew.
            eprintln!(
                "krund: node {}: the process table lost the rows of ranks {lost:?} with node \
                 {node}'s failure (every copy failed together)",
                table.shared.me
            );
        }
    });
}
