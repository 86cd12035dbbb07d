//! Recovery from a lost node, as krund carries it out (the decisions are the coordinated
//! policy's, taken at krun's hub: `runtime/checkpoints.rs`).
//!
//! # What happens after a node with ranks fails
//! 1. The membership agrees on the failure; krun's hub feeds `Event::FailureAgreed` to the
//!    policy, which decides per rank: the lost ranks restart on a spare (a `Restart`
//!    decision, recorded in `decisions.log` first), the surviving ranks roll back to the
//!    recovery line (the newest committed checkpoint every rank has a copy of).
//! 2. krun opens a new address all-gather for the ranks (a bootstrap service for the job's
//!    size: the next **wiring epoch**) and sends every node
//!    [`LauncherToNode::Restart`]`{wiring, bootstrap, version, ranks}` (unchanged).
//! 3. Each node carries out the order for the ranks placed on it:
//!    - **A rank whose live process runs here rolls back inside it** (the policy's rollback
//!      primitive; also a rank restarted from the program's start when no checkpoint was
//!      committed): the node hands
//!      `RollbackInPlace{wiring, bootstrap, version}` to the rank library's watcher
//!      ([`Watchers`]; the rank side is `rank/src/rollback.rs`), which re-executes the
//!      program in its own process: `execve("/proc/self/exe")` with its original argv and
//!      environment plus `KRUN_GHOST_RESTORE=version`, `KRUN_BOOTSTRAP=bootstrap` and
//!      `KRUN_WIRING_EPOCH=wiring`. The kernel keeps the pid, the parent (this krund: it
//!      waits for the same child, no kill, no new spawn), the process group, the CPU
//!      pinning and stdio (output forwarding goes on); the library restores the registered
//!      memory from the rank's own images of `version` on this node (libghost's
//!      restore-on-start, L1) and swaps its new fabric address in the new epoch. The
//!      process table keeps the pid; the rank's hello in the new epoch registers a new
//!      incarnation ([`hello`]).
//!    - Any other rank starts here as a new process with those three variables
//!      ([`crate::ranks::RankCommand::Adopt`], which kills a process of that rank still
//!      here): a rank new to the node (from the failed node) first gets its image chain from
//!      the checkpoint store (the fastest valid copy: the buddy's L2 when the rank's node is
//!      gone), written as the ghost checkpointer's files
//!      ([`super::CheckpointAgent::write_chain`]); its old files, if this host has any, are
//!      removed first, so the restart uses the store's bytes only. A live rank whose
//!      watcher does not take the order within [`ORDER_TIMEOUT`] (it has no node link, or
//!      its process is ending) is restarted this way too.
//!
//!    The node carries out the ranks of an order side by side (one thread per rank: the
//!    lost ranks' fetches and process starts overlap, and a survivor's rollback does not
//!    wait for them), and one order at a time per rank, whatever order names it; an order
//!    for a rank that a newer wiring epoch's order names (a failure during the recovery) is
//!    dropped, answered `RestartFailed` in its old epoch (which krun ignores): it must not
//!    replace the rank's process of the newer epoch with one of its own ([`RestartOrders`]).
//! 4. The node answers `Restarted{wiring, rank, pid, in_place, ..}` or
//!    `RestartFailed{wiring, rank, why}` per rank; the hub turns them into the policy's
//!    `RestartDone`/`RollbackDone` (or the failed ones), and the policy's recovery ends
//!    when every rank answered.
//!
//! # Decisions in the process table
//! Before the `Restart` order, krun sends `LauncherToNode::Decided{rank, node, decision}`
//! for each restart decision (to the rank's new node) and each rollback (to the rank's
//! node); that node writes it into the rank's row (`TableOp::Decided`, [`decided`]), where
//! it stays across incarnations and `krun status` shows it. `decisions.log` keeps the whole
//! sequence (commits, aborts, recoveries).
//!
//! # Interface changes (additive)
//! `LauncherToNode::Restart` is unchanged. New: `LauncherToNode::Decided`;
//! `NodeToLauncher::Restarted` gained `in_place`; the rank socket gained
//! `RankToNode::Watch` and `NodeToRank::RollbackInPlace` (appended to both mirrors).
//!
//! # The watcher's protocol (rank socket, additive)
//! `RankToNode::Watch{rank, pid}` on the watcher's own connection, held by the node up to
//! [`WATCH_HOLD`] and answered `NodeToRank::Continue` (ask again) or
//! `NodeToRank::RollbackInPlace{wiring, bootstrap, version}` (see `rank::node_link`). The
//! watcher starts first thing in the library's init, so a rank still in an older epoch's
//! all-gather (a failure during a recovery) is reached too. In a recovering job the library
//! holds a communication error or a failed safepoint up to 30 s before returning it, so a
//! survivor whose peer died is rolled back rather than exiting on the error.
//!
//! # Fabric re-wiring
//! A restarted or rolled-back rank has a new fabric endpoint address, so every rank must
//! learn every rank's current address. The mechanism is the rank library's start-up
//! all-gather, keyed by the wiring epoch: every rank of the job starts again in the new
//! epoch (a new image: in place or a new process) and swaps its address card (endpoint
//! address and the checkpoint versions it holds) through the new bootstrap service, which
//! answers once all ranks reported; no image of an older epoch survives the order, so no
//! rank talks to a stale address. A rank that is late in the new all-gather (its restart
//! was retried) joins the same epoch.
//!
//! # Limits
//! The rollback is in the process, not in the program's control flow: the process image is
//! replaced and the program starts again from `main`, resuming from its registered memory
//! as a restarted rank does; what lives outside registered memory and stdio (other open
//! files, threads) starts afresh. A rank whose process is gone (it exited on an error before
//! the order came) is restarted as a new process with a new pid.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use adaptation::NodeId;

use super::control::{NodeToLauncher, NodeToRank};
use super::membership::{Shared, TableClient};
use super::table::TableOp;
use super::AgentSlot;
use crate::ranks::RankCommand;

/// Longest the node holds a watcher's `Watch` before answering `Continue` (the rank
/// library's `WATCH_HOLD` allows this plus 10 s).
pub const WATCH_HOLD: Duration = Duration::from_secs(20);

/// The process-table client id of a rollback's new incarnation (after the runtime's own,
/// `runtime/mod.rs`).
const TABLE_CLIENT_ROLLBACK: u32 = 6;

/// Longest a rollback order waits for the rank's watcher to take it.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(5);

/// One rank's watcher as the node sees it.
#[derive(Default)]
struct Watcher {
    pid: u32,
    /// The order waiting for the watcher's next `Watch`.
    order: Option<NodeToRank>,
    /// Orders the watcher took.
    taken: u64,
    /// The process re-executed on an order and has not said hello since.
    reincarnating: bool,
}

/// The node's rank watchers: rank -> the process watching and the order waiting for it.
#[derive(Default)]
pub struct Watchers {
    state: Mutex<BTreeMap<u32, Watcher>>,
    changed: Condvar,
}

impl Watchers {
    /// A `Watch` from `rank`'s process `pid`: waits up to `hold` for an order.
    pub fn watch(&self, rank: u32, pid: u32, hold: Duration) -> NodeToRank {
        let deadline = Instant::now() + hold;
        let mut s = self.state.lock().expect("watchers lock");
        let w = s.entry(rank).or_default();
        if w.pid != pid {
            *w = Watcher {
                pid,
                ..Watcher::default()
            };
        }
        loop {
            let w = s.entry(rank).or_default();
            if w.pid != pid {
                // Another process of this rank took over.
                return NodeToRank::Continue;
            }
            if let Some(order) = w.order.take() {
                w.taken += 1;
                w.reincarnating = true;
                self.changed.notify_all();
                return order;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return NodeToRank::Continue;
            }
            s = self.changed.wait_timeout(s, left).expect("watchers lock").0;
        }
    }

    /// Hands `order` to the watcher of `rank`'s process `pid`; true once the watcher took
    /// it (within `timeout`), false if it has none or did not take it (withdrawn).
    pub fn order(&self, rank: u32, pid: u32, order: NodeToRank, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().expect("watchers lock");
        let Some(w) = s.get_mut(&rank).filter(|w| w.pid == pid) else {
            return false;
        };
        let before = w.taken;
        w.order = Some(order);
        self.changed.notify_all();
        loop {
            let w = s.get_mut(&rank).expect("a watcher is never removed");
            if w.pid != pid {
                return false;
            }
            if w.taken > before {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                w.order = None;
                return false;
            }
            s = self.changed.wait_timeout(s, left).expect("watchers lock").0;
        }
    }

    /// `rank`'s process `pid` said hello: true if it is a rollback in place's new image
    /// (once).
    pub fn hello(&self, rank: u32, pid: u32) -> bool {
        let mut s = self.state.lock().expect("watchers lock");
        match s.get_mut(&rank) {
            Some(w) if w.pid == pid && w.reincarnating => {
                w.reincarnating = false;
                true
            }
            _ => false,
        }
    }
}

/// The restart orders of the recoveries krun ordered on this node, one thread per order.
///
/// A second failure during a recovery brings a newer wiring epoch's order while the older
/// order's thread is still at work (fetching a lost rank's images from the store can take
/// seconds when the store first asks the node that just died). Found by the second-failure
/// test without message logging: the older thread went on after the newer one had started
/// the rank in the new epoch, killed that process (`Adopt` replaces a rank's process) and
/// started the rank in the old epoch, whose address all-gather never completes: the rank
/// never linked, its peers timed out on it and the job never ended. So each rank's
/// restart is carried out under that rank's lock (different ranks go side by side: a
/// spare that takes two lost ranks fetches both images at once), and an order for a rank
/// that a newer epoch's order names is dropped (checked before it starts and again before
/// anything irreversible: the rollback order, the new process).
#[derive(Default)]
pub struct RestartOrders {
    /// rank -> the newest wiring epoch whose `Restart` order names it (on any node).
    newest: Mutex<BTreeMap<u32, u64>>,
    /// rank -> held while that rank is restarted or rolled back.
    turns: Mutex<BTreeMap<u32, Arc<Mutex<()>>>>,
    /// Held for a whole order, one at a time on the node (the uncoordinated policy's
    /// rejoins: `runtime/uncoordinated.rs`).
    turn: Mutex<()>,
}

impl RestartOrders {
    /// krun's `Restart{wiring, ranks}` arrived (before its thread starts).
    pub fn ordered(&self, wiring: u64, ranks: &[(u32, NodeId)]) {
        let mut newest = self.newest.lock().expect("orders lock");
        for &(rank, _) in ranks {
            let w = newest.entry(rank).or_insert(wiring);
            *w = (*w).max(wiring);
        }
    }

    /// Held for one order at a time on this node (the rejoin orders of the uncoordinated
    /// policy; the coordinated recovery's restarts hold [`Self::rank_turn`]).
    pub fn turn(&self) -> std::sync::MutexGuard<'_, ()> {
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `rank`'s lock: held while the rank is restarted (one order at a time per rank;
    /// lock it with [`Turn::hold`]).
    pub fn rank_turn(&self, rank: u32) -> Turn {
        Turn(
            self.turns
                .lock()
                .expect("turns lock")
                .entry(rank)
                .or_default()
                .clone(),
        )
    }

    /// The newer wiring epoch whose order names `rank`, if the order of `wiring` is
    /// superseded.
    pub fn superseded(&self, rank: u32, wiring: u64) -> Option<u64> {
        self.newest
            .lock()
            .expect("orders lock")
            .get(&rank)
            .copied()
            .filter(|&w| w > wiring)
    }
}

/// One rank's restart lock ([`RestartOrders::rank_turn`]).
pub struct Turn(Arc<Mutex<()>>);

impl Turn {
    /// Waits for the rank's other orders, then holds the rank until the guard drops.
    pub fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lock if no other order holds the rank now.
    pub fn try_hold(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.0.try_lock().ok()
    }
}

/// Why an order of `wiring` for `rank` is not carried out: a newer epoch's order names it.
fn superseded(shared: &Shared, rank: u32, wiring: u64) -> Result<(), String> {
    match shared.restarts.superseded(rank, wiring) {
        Some(newer) => Err(format!(
            "the order of wiring epoch {wiring} is superseded by the recovery of wiring \
             epoch {newer} (a failure during the recovery): dropped"
        )),
        None => Ok(()),
    }
}

/// The rank socket's `Watch{rank, pid}`.
pub fn watch(shared: &Shared, rank: u32, pid: u32) -> NodeToRank {
    shared.watchers.watch(rank, pid, WATCH_HOLD)
}

/// A rank said hello: a process rolled back in place is a new incarnation of the rank in
/// the process table, with the same pid.
pub fn hello(table: &TableClient, rank: u32, pid: u32) {
    if !table.shared.watchers.hello(rank, pid) {
        return;
    }
    // A client of its own: the rank-socket client may write this row at the same time.
    let table = table.as_client(TABLE_CLIENT_ROLLBACK);
    std::thread::spawn(move || {
        let op = TableOp::Register {
            node: table.shared.me,
            pid,
        };
        if let Err(e) = table.request(u64::from(rank), &op, Duration::from_secs(30)) {
            eprintln!("krund: node {}: process table: {e}", table.shared.me);
        }
    });
}

/// `LauncherToNode::Decided` for a rank this node runs or takes on: the policy's decision
/// goes into the rank's process-table row (replicated like the row; `krun status` shows it).
pub fn decided(table: &TableClient, rank: u32, decision: String) {
    let table = table.clone();
    std::thread::spawn(move || {
        let op = TableOp::Decided { decision };
        match table.request(u64::from(rank), &op, Duration::from_secs(30)) {
            Ok(a) if a.error.is_none() => {}
            Ok(a) => eprintln!(
                "krund: node {}: recording a decision about rank {rank}: {}",
                table.shared.me,
                a.error.unwrap_or_default()
            ),
            Err(e) => eprintln!("krund: node {}: process table: {e}", table.shared.me),
        }
    });
}

/// True while `pid` runs (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// The ghost checkpoint owner and directory a rank of this job writes its images under (as
/// the rank library computes them: `<KRUN_GHOST_OWNER or krun's per-rank owner>/rank<N>` in
/// `KRUN_GHOST_DIR`).
pub fn rank_images(rank: u32) -> (PathBuf, String) {
    let dir = std::env::var_os("KRUN_GHOST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm/krun-ghost"));
    let base = match (
        std::env::var("KRUN_GHOST_OWNER"),
        std::env::var("KRUN_JOB_ID"),
    ) {
        (Ok(owner), _) => owner,
        (Err(_), Ok(job)) => crate::ranks::ghost_owner(&job, rank as usize),
        (Err(_), Err(_)) => "krun-job".to_string(),
    };
    (dir, format!("{base}/rank{rank}"))
}

/// Carries out a `Restart` order on this node (in its own thread: fetches may take time),
/// answering krun once per rank placed here.
pub fn restart(
    shared: &Shared,
    agent: &AgentSlot,
    wiring: u64,
    bootstrap: &str,
    version: Option<u64>,
    ranks: &[(u32, NodeId)],
) {
    let me = shared.me;
    // One thread per rank placed here: the lost ranks' image fetches and process starts
    // overlap (each rank still waits for its own older orders: `RestartOrders`).
    std::thread::scope(|scope| {
        for &(rank, _) in ranks.iter().filter(|(_, n)| *n == me) {
            scope.spawn(move || {
                restart_and_answer(shared, agent, (wiring, bootstrap), version, rank)
            });
        }
    });
}

/// Restarts or rolls back one rank and answers krun.
fn restart_and_answer(
    shared: &Shared,
    agent: &AgentSlot,
    (wiring, bootstrap): (u64, &str),
    version: Option<u64>,
    rank: u32,
) {
    let node = shared.me;
    trace_step(node, rank, "restart order");
    let started = Instant::now();
    let msg = match restart_one(shared, agent, wiring, bootstrap, version, rank) {
        Ok((pid, fetched, new_because)) => NodeToLauncher::Restarted {
            wiring,
            rank,
            pid,
            fetched,
            seconds: started.elapsed().as_secs_f64(),
            in_place: new_because.is_none(),
            new_because,
        },
        Err(reason) => {
            eprintln!("krund: node {node}: restart of rank {rank}: {reason}");
            NodeToLauncher::RestartFailed {
                wiring,
                rank,
                reason,
            }
        }
    };
    trace_step(node, rank, "answered");
    shared.tell_launcher(&msg);
}

/// `KRUN_TRACE_STEPS=1`: time stamps of the node's restart steps on stderr
/// (`krun-trace: node N rank R STEP at UNIX_SECONDS`), beside the rank library's.
pub(crate) fn trace_step(node: NodeId, rank: u32, step: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| {
        std::env::var("KRUN_TRACE_STEPS").is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0")
    });
    if on {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        eprintln!("krun-trace: node {node} rank {rank} {step} at {at:.6}");
    }
}

/// What a rank that could have rolled back in place was restarted as a new process for
/// (the node's reason, carried by `Restarted::new_because` to krun's line).
pub const NEW_WITH_MPI_JOB: &str =
    "restarted with the job (MPI: every rank restarts as a new process in a new MPI incarnation)";

/// Restarts or rolls back `rank`: its pid, the bytes fetched, and why it is a new process
/// (`None`: rolled back inside its live process).
fn restart_one(
    shared: &Shared,
    agent: &AgentSlot,
    wiring: u64,
    bootstrap: &str,
    version: Option<u64>,
    rank: u32,
) -> Result<(u32, u64, Option<String>), String> {
    // One order at a time for this rank, whatever epoch ordered it (see `RestartOrders`).
    let turn = shared.restarts.rank_turn(rank);
    let _held = turn.hold();
    superseded(shared, rank, wiring)?;
    let alive_pid = shared
        .local_ranks
        .lock()
        .expect("ranks lock")
        .get(&u64::from(rank))
        .copied()
        .filter(|&pid| alive(pid));
    // An MPI rank restarts as a new process (`runtime/mpi_recovery.rs`).
    let live =
        alive_pid.filter(|&pid| super::mpi_recovery::may_roll_back_in_place(shared, rank, pid));
    let mut new_because = if super::mpi_recovery::restarts_as_new(shared) {
        NEW_WITH_MPI_JOB.to_string()
    } else if alive_pid.is_none() {
        "could not roll back inside its process (it was gone)".to_string()
    } else {
        String::new()
    };
    if let (Some(_), Some(v)) = (live, version) {
        // An own checkpoint older than the newest full image (the checkpointer keeps its
        // files from there on, as under the uncoordinated policy's recovery lines): its
        // chain comes from the store first.
        let (dir, owner) = rank_images(rank);
        if !ghost::native::image_path(&dir, &owner, v).exists() {
            let why = |e: &dyn std::fmt::Display| {
                format!("fetching its images of v{v} for a rollback in place: {e}")
            };
            match agent.wait(Duration::from_secs(30)) {
                Some(a) => a.write_chain(rank, v, &dir, &owner).map_err(|e| why(&e))?,
                None => super::drain::fetch_chain_remote(shared.me, rank, v, &dir, &owner)
                    .map_err(|e| why(&e))?,
            };
        }
    }
    // The fetch above can take seconds: a newer order may have come meanwhile.
    superseded(shared, rank, wiring)?;
    if let Some(pid) = live {
        // Rolled back inside its process. Not linked until its new image says hello: a
        // barrier must not wake it with SIGUSR1 before the library installed its handler.
        shared
            .linked_ranks
            .lock()
            .expect("linked lock")
            .remove(&u64::from(rank));
        let order = NodeToRank::RollbackInPlace {
            wiring,
            bootstrap: bootstrap.to_string(),
            version,
        };
        trace_step(shared.me, rank, "rollback ordered");
        if shared.watchers.order(rank, pid, order, ORDER_TIMEOUT) {
            trace_step(shared.me, rank, "rollback taken");
            return Ok((pid, 0, None));
        }
        new_because = format!(
            "could not roll back inside its process (it did not take the order within \
             {ORDER_TIMEOUT:?}: not watching)"
        );
        eprintln!(
            "krund: node {}: rank {rank} (pid {pid}) did not take its rollback order in \
             {ORDER_TIMEOUT:?}: restarting it as a new process",
            shared.me
        );
    }
    let runner = shared
        .rank_commands
        .lock()
        .expect("commands lock")
        .clone()
        .ok_or_else(|| format!("node {} runs no rank runner", shared.me))?;
    let here = shared
        .local_ranks
        .lock()
        .expect("ranks lock")
        .contains_key(&u64::from(rank));
    let mut fetched = 0;
    let mut env = vec![
        ("KRUN_BOOTSTRAP".to_string(), bootstrap.to_string()),
        ("KRUN_WIRING_EPOCH".to_string(), wiring.to_string()),
    ];
    // A job whose policy was swapped runs in the mode of the policy in force now.
    env.extend(shared.uncoordinated.mode_env());
    if let Some(v) = version {
        env.push(("KRUN_GHOST_RESTORE".to_string(), v.to_string()));
        if !here {
            // The rank comes from another node: its images come from the store.
            let (dir, owner) = rank_images(rank);
            let _ = std::fs::remove_dir_all(dir.join(&owner));
            trace_step(shared.me, rank, "fetch");
            fetched = match agent.wait(Duration::from_secs(30)) {
                Some(a) => a
                    .write_chain(rank, v, &dir, &owner)
                    .map_err(|e| format!("fetching its images of v{v}: {e}"))?,
                // A node added while the job runs has no store: it reads the chain from a
                // member's (runtime/drain.rs).
                None => super::drain::fetch_chain_remote(shared.me, rank, v, &dir, &owner)
                    .map_err(|e| format!("fetching its images of v{v}: {e}"))?,
            };
        }
    } else {
        // From the program's start: images this rank left (a checkpoint that was never
        // committed) must not count, or its checkpointer would number on after them while
        // the policy numbers from 1 again.
        let (dir, owner) = rank_images(rank);
        let _ = std::fs::remove_dir_all(dir.join(&owner));
    }
    superseded(shared, rank, wiring)?;
    // The new process is not linked until it says hello: a barrier must not wake it with
    // SIGUSR1 before its library installed the handler (the signal would kill it).
    shared
        .linked_ranks
        .lock()
        .expect("linked lock")
        .remove(&u64::from(rank));
    trace_step(shared.me, rank, "spawn");
    let (reply, rx) = mpsc::channel();
    runner
        .send(RankCommand::Adopt {
            rank: rank as usize,
            env,
            reply,
        })
        .map_err(|_| "the node's ranks have ended".to_string())?;
    let pid = rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| "the rank runner did not answer".to_string())??;
    trace_step(shared.me, rank, "spawned");
    Ok((pid, fetched, Some(new_because)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(wiring: u64) -> NodeToRank {
        NodeToRank::RollbackInPlace {
            wiring,
            bootstrap: "127.0.0.1:4242".into(),
            version: Some(3),
        }
    }

    #[test]
    fn a_rollback_order_reaches_the_watching_process_once_and_its_hello_is_a_new_incarnation() {
        let w = Arc::new(Watchers::default());
        // Nobody watches rank 2 yet: the order is not taken (the node restarts it instead).
        assert!(!w.order(2, 77, order(1), Duration::from_millis(10)));
        // Rank 2's process 77 watches; a quiet round ends with Continue.
        assert_eq!(
            w.watch(2, 77, Duration::from_millis(10)),
            NodeToRank::Continue
        );
        let watcher = {
            let w = w.clone();
            std::thread::spawn(move || w.watch(2, 77, Duration::from_secs(60)))
        };
        // An order for another process of rank 2 is refused; the watching one takes it.
        assert!(!w.order(2, 78, order(1), Duration::from_millis(10)));
        assert!(w.order(2, 77, order(1), Duration::from_secs(60)));
        assert_eq!(watcher.join().unwrap(), order(1));
        // Its new image says hello with the same pid: a new incarnation, once.
        assert!(!w.hello(2, 78));
        assert!(w.hello(2, 77));
        assert!(!w.hello(2, 77));
        // An order nobody takes is withdrawn: a later watch does not get it.
        assert!(!w.order(2, 77, order(2), Duration::from_millis(10)));
        assert_eq!(
            w.watch(2, 77, Duration::from_millis(10)),
            NodeToRank::Continue
        );
    }

    /// A second failure during a recovery: the newer epoch's order supersedes the older one
    /// for every rank it names (on whatever node), never the other way round.
    #[test]
    fn a_newer_epochs_restart_order_supersedes_an_older_one_for_the_ranks_it_names() {
        let orders = RestartOrders::default();
        orders.ordered(1, &[(0, 0), (1, 0), (2, 3), (3, 3)]);
        assert_eq!(orders.superseded(2, 1), None);
        orders.ordered(2, &[(2, 3), (3, 4)]);
        assert_eq!(orders.superseded(2, 1), Some(2));
        assert_eq!(orders.superseded(3, 1), Some(2));
        assert_eq!(
            orders.superseded(0, 1),
            None,
            "epoch 2 does not name rank 0"
        );
        assert_eq!(orders.superseded(2, 2), None);
        // A late copy of the older order changes nothing.
        orders.ordered(1, &[(2, 3)]);
        assert_eq!(orders.superseded(2, 1), Some(2));
        assert_eq!(orders.superseded(2, 2), None);
    }

    /// The ranks of one order go side by side; two orders for the same rank never do.
    #[test]
    fn a_ranks_restart_waits_only_for_orders_of_the_same_rank() {
        let orders = RestartOrders::default();
        let two = orders.rank_turn(2);
        let held = two.hold();
        assert!(
            orders.rank_turn(3).try_hold().is_some(),
            "rank 3 waited for rank 2's restart"
        );
        assert!(
            orders.rank_turn(2).try_hold().is_none(),
            "a second order for rank 2 ran while the first held it"
        );
        drop(held);
        assert!(orders.rank_turn(2).try_hold().is_some());
    }

    #[test]
    fn a_process_that_is_gone_or_a_zombie_is_not_alive() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Until reaped, the ended child is a zombie.
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(pid) {
            assert!(Instant::now() < deadline, "pid {pid} never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
