//! The node's side of the uncoordinated policy (the hub's side and the contract between
//! the two are in `checkpoints/uncoordinated.rs`; the rank's in `rank::uncoordinated`).
//!
//! - `CaptureRank{rank, version}`: the node keeps the order for that rank and wakes it
//!   (its wake signal, `control::wake_signal`, to that rank only); its next `AtSafepoint` is answered `Checkpoint{version}`
//!   at once, with no barrier; its `Checkpointed` report then goes through the checkpoint
//!   agent as any capture (`Captured`, then `Safe`/`NotSafe` per level). Under this policy
//!   an `AtSafepoint` with no order waiting is answered `Continue` at once.
//! - `TrimLog{rank, version}` and `PeerMoved{rank, address, ring}` become orders for the
//!   ranks' watchers (`LogSafe`, `PeerMoved`), handed over in order by a thread per rank.
//! - A rank's `LogCard`, `PeerReplaced` and (without logging) `ChannelCounts` go to krun as
//!   they are.
//! - `Rejoin{restart, rank, node, version}` on another node that runs the rank (a drain):
//!   the old process ends at once (`drain::release_moved`).
//! - `Rejoin{restart, rank, node, version}` on `node`: the rank's image chain of `version`
//!   comes from the checkpoint store (unless this node holds the rank's files), then the
//!   rank starts as a new process with `KRUN_REJOIN=1` and `KRUN_GHOST_RESTORE=version`;
//!   answered `Restarted{wiring: restart, ..}` or `RestartFailed`. The new process's
//!   `Rejoin{address, ring}` goes to krun as `Rejoining` and is held until krun's
//!   `Rejoined{rank, cards}` (every survivor replaced its address), answered `Peers`.
//!
//! The node's mode switches while the job runs (`krun policy load`, the rank's side in
//! `rank::uncoordinated`): `Release{Switch{version}}` (the swap's coordinated checkpoint,
//! answered `CheckpointSwitch` to the held ranks) puts the node in the uncoordinated mode;
//! `Realign` asks every local rank's watcher for its safepoint index (`ReportSafepoint`,
//! answered `SafepointIndex`, passed on to krun); `RealignAt{index}` drops the capture
//! orders left, puts the node back in the coordinated mode (safepoints answered by the
//! gate, which the policy drives) and tells every local rank `CoordinateAt{index}`. A rank
//! restarted to rejoin gets `KRUN_UNCOORDINATED=1` and `KRUN_MESSAGE_LOGGING=1` whatever
//! mode the job started in.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::control::{LauncherToNode, NodeToLauncher, NodeToRank, RankToNode};
use super::membership::Shared;
use super::AgentSlot;
use crate::ranks::RankCommand;

/// How long a rejoining rank's `Rejoin` is held for krun's `Rejoined` (below the rank
/// library's own wait).
pub const REJOIN_HOLD: Duration = Duration::from_secs(110);
/// How long a capture order waits for its rank to link (say hello).
pub const LINK_WAIT: Duration = Duration::from_secs(60);
/// How long a watcher has to take one order.
const ORDER_TAKE: Duration = Duration::from_secs(10);
/// How long a `PeerMoved` (or a switch back's `ReportSafepoint`, `CoordinateAt`) keeps being
/// offered to a watcher that did not take it (busy with an earlier order): a rejoin waits
/// for every running rank to learn the new address, so dropping it fails the recovery
/// ([`REJOIN_HOLD`] bounds the whole exchange); the switch waits for every rank likewise.
const PEER_MOVED_TAKE: Duration = Duration::from_secs(100);

/// Hands `rank`'s orders to its watcher one at a time, in order. Orders not taken yet that
/// must not be lost (`PeerMoved`) are offered again, in turn with the rank's later orders,
/// until [`PEER_MOVED_TAKE`]; others are dropped after [`ORDER_TAKE`] with a line.
fn hand_over(shared: &std::sync::Arc<Shared>, rank: u32, rx: &mpsc::Receiver<NodeToRank>) {
    let mut again: std::collections::VecDeque<(NodeToRank, Instant)> = Default::default();
    loop {
        let (order, until) = if again.is_empty() {
            match rx.recv() {
                Ok(order) => (order, Instant::now() + PEER_MOVED_TAKE),
                Err(_) => return,
            }
        } else {
            match rx.try_recv() {
                Ok(order) => (order, Instant::now() + PEER_MOVED_TAKE),
                Err(mpsc::TryRecvError::Empty) => again.pop_front().expect("not empty"),
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        };
        let Some(pid) = local_pid(shared, rank) else {
            // The rank no longer runs here (it ended or moved): nothing left to hand over.
            again.clear();
            continue;
        };
        let offered = Instant::now();
        if shared.watchers.order(rank, pid, order.clone(), ORDER_TAKE) {
            continue;
        }
        if offered.elapsed() < RETRY_PAUSE {
            // Refused at once (no watcher of that process yet: a rank still starting or
            // rejoining): wait a little before offering it again instead of spinning on a
            // core the ranks need.
            std::thread::sleep(RETRY_PAUSE);
        }
        // A switch back waits for every rank's answer and target too.
        let keep = matches!(
            order,
            NodeToRank::PeerMoved { .. }
                | NodeToRank::ReportSafepoint
                | NodeToRank::CoordinateAt { .. }
        );
        if keep && Instant::now() < until {
            again.push_back((order, until));
            continue;
        }
        eprintln!(
            "krund: node {}: rank {rank}'s watcher did not take {} in {:?}",
            shared.me,
            order_name(&order),
            if keep { PEER_MOVED_TAKE } else { ORDER_TAKE }
        );
    }
}

/// How long [`hand_over`] waits before offering again an order that was refused at once.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// An order's name for a log line (its payload is an address and a ring of bytes).
fn order_name(order: &NodeToRank) -> String {
    match order {
        NodeToRank::PeerMoved { rank, .. } => format!("rank {rank}'s new address (PeerMoved)"),
        NodeToRank::LogSafe { version } => format!("the log trim at checkpoint {version}"),
        other => format!("{other:?}"),
    }
}

/// A rank's (fabric address, ring) card.
type Card = (Vec<u8>, Vec<u8>);

/// The uncoordinated policy's state on one node.
#[derive(Default)]
pub struct NodeSide {
    /// rank -> the own checkpoint version ordered, not yet asked for.
    captures: Mutex<BTreeMap<u32, u64>>,
    /// rank -> every rank's cards once krun answered the rank's rejoin.
    rejoins: Mutex<BTreeMap<u32, Option<Vec<Card>>>>,
    rejoined: Condvar,
    /// Orders for each rank's watcher, handed over in order by a thread per rank.
    orders: Mutex<BTreeMap<u32, Sender<NodeToRank>>>,
    /// 0: as the job started (`KRUN_UNCOORDINATED`); 1: coordinated; 2: uncoordinated.
    mode: AtomicU8,
    /// krun's `Rejoin` orders by restart id (their own numbering, apart from the wiring
    /// epochs of [`Shared::restarts`]): one rank at a time on this node, and an order for a
    /// rank that a newer `Rejoin` names (on any node) is dropped, as the coordinated
    /// recovery's (`recovery::RestartOrders`): its older thread must not replace the newer
    /// order's process with one of its own.
    rejoin_orders: super::recovery::RestartOrders,
}

/// Whether the job started under the uncoordinated policy (krun sets `KRUN_UNCOORDINATED`).
pub fn started_uncoordinated() -> bool {
    std::env::var("KRUN_UNCOORDINATED").is_ok_and(|v| v.trim() == "1")
}

impl NodeSide {
    /// Whether this node runs the uncoordinated policy's mode now.
    pub fn active(&self) -> bool {
        match self.mode.load(Ordering::SeqCst) {
            0 => started_uncoordinated(),
            m => m == 2,
        }
    }

    /// The mode switched (see the module doc).
    pub fn set_active(&self, on: bool) {
        self.mode.store(if on { 2 } else { 1 }, Ordering::SeqCst);
    }

    /// The mode's variables for a rank process this node starts, once the mode switched
    /// (the node's own environment holds the mode the job started in).
    pub fn mode_env(&self) -> Vec<(String, String)> {
        let v = match self.mode.load(Ordering::SeqCst) {
            0 => return Vec::new(),
            1 => "0",
            _ => "1",
        };
        ["KRUN_UNCOORDINATED", "KRUN_MESSAGE_LOGGING"]
            .into_iter()
            .map(|k| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `Realign`: every rank running here reports its safepoint index.
    pub fn realign(&self, shared: &std::sync::Arc<Shared>) {
        for r in local_ranks(shared) {
            self.order(shared, r, NodeToRank::ReportSafepoint);
        }
    }

    /// `RealignAt{index}` (see the module doc).
    pub fn realign_at(&self, shared: &std::sync::Arc<Shared>, index: u64) {
        if index > 0 {
            self.captures.lock().expect("captures lock").clear();
            self.set_active(false);
        }
        for r in local_ranks(shared) {
            self.order(shared, r, NodeToRank::CoordinateAt { index });
        }
    }

    /// A recovery restarts `ranks` (new processes, or the same ones rolled back): capture
    /// orders still waiting for them were for their old processes, whose checkpointer
    /// numbering the recovery reset; the new process must not take them (seen: an order
    /// given while the ranks were stuck in a broken start-up exchange was answered by the
    /// re-wired process, whose checkpointer then took a version krun did not order).
    pub fn drop_captures(&self, ranks: impl IntoIterator<Item = u32>) {
        let mut captures = self.captures.lock().expect("captures lock");
        for r in ranks {
            captures.remove(&r);
        }
    }

    /// A rank at a safepoint: its own checkpoint order, if one waits; `None` lets the node's
    /// gate answer (coordinated policy).
    pub fn at_safepoint(&self, rank: u32) -> Option<NodeToRank> {
        if let Some(version) = self.captures.lock().expect("captures lock").remove(&rank) {
            return Some(NodeToRank::Checkpoint { version });
        }
        self.active().then_some(NodeToRank::Continue)
    }

    /// `CaptureRank{rank, version}` for a rank of this node: keeps the order and wakes the
    /// rank once its library can take the signal (it said hello; waited for up to
    /// [`LINK_WAIT`] in a thread of its own: the job may be starting).
    pub fn capture(&self, shared: &std::sync::Arc<Shared>, rank: u32, version: u64) {
        self.captures
            .lock()
            .expect("captures lock")
            .insert(rank, version);
        let shared = shared.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + LINK_WAIT;
            loop {
                let linked = shared
                    .linked_ranks
                    .lock()
                    .expect("linked lock")
                    .contains(&u64::from(rank));
                let pid = local_pid(&shared, rank);
                if let (true, Some(pid)) = (linked, pid) {
                    // The order may have been taken meanwhile (a late signal is harmless:
                    // the rank's node answers `Continue`).
                    // SAFETY: kill sends a signal to a rank this node started, whose
                    // library installed its request handler (it said hello).
                    unsafe { libc::kill(pid as i32, super::control::wake_signal()) };
                    return;
                }
                if Instant::now() >= deadline {
                    // krun times the capture out; the policy tries again later.
                    eprintln!(
                        "krund: node {}: rank {rank} did not link in {LINK_WAIT:?}: its \
                         checkpoint v{version} is not taken",
                        shared.me
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
    }

    /// Queues an order for `rank`'s watcher (when the rank runs here). Each rank's orders
    /// are handed over in order by a thread of that rank's own: a watcher busy with an
    /// earlier order (a `PeerMoved` whose determinants it rewrites) delays only its own
    /// rank's orders, never another rank's (with one thread for the node, each order a busy
    /// watcher did not take in [`ORDER_TAKE`] delayed every later order of the node by that
    /// much: rejoins took 10-30 s).
    pub fn order(&self, shared: &std::sync::Arc<Shared>, rank: u32, order: NodeToRank) {
        if local_pid(shared, rank).is_none() {
            return;
        }
        let mut queues = self.orders.lock().expect("orders lock");
        let tx = queues.entry(rank).or_insert_with(|| {
            let (t, rx) = mpsc::channel::<NodeToRank>();
            let shared = shared.clone();
            std::thread::spawn(move || hand_over(&shared, rank, &rx));
            t
        });
        let _ = tx.send(order);
    }

    /// `PeerMoved`: every other rank running here learns `rank`'s new process.
    pub fn peer_moved(
        &self,
        shared: &std::sync::Arc<Shared>,
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    ) {
        let here: Vec<u32> = shared
            .local_ranks
            .lock()
            .expect("ranks lock")
            .keys()
            .map(|&r| r as u32)
            .filter(|&r| r != rank)
            .collect();
        for r in here {
            self.order(
                shared,
                r,
                NodeToRank::PeerMoved {
                    rank,
                    address: address.clone(),
                    ring: ring.clone(),
                },
            );
        }
    }

    /// A rejoining rank's `Rejoin`: tells krun, waits for every rank's card.
    pub fn rejoin(
        &self,
        shared: &Shared,
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    ) -> NodeToRank {
        self.rejoins
            .lock()
            .expect("rejoins lock")
            .insert(rank, None);
        shared.tell_launcher(&NodeToLauncher::Rejoining {
            rank,
            address,
            ring,
        });
        let deadline = Instant::now() + REJOIN_HOLD;
        let mut s = self.rejoins.lock().expect("rejoins lock");
        loop {
            if let Some(Some(cards)) = s.get(&rank) {
                let cards = cards.clone();
                s.remove(&rank);
                return NodeToRank::Peers { cards };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.remove(&rank);
                return NodeToRank::Refused(format!(
                    "the running ranks did not all learn rank {rank}'s new address in \
                     {REJOIN_HOLD:?}"
                ));
            }
            s = self.rejoined.wait_timeout(s, left).expect("rejoins lock").0;
        }
    }

    /// krun's `Rejoined{rank, cards}`.
    pub fn rejoined(&self, rank: u32, cards: Vec<(Vec<u8>, Vec<u8>)>) {
        let mut s = self.rejoins.lock().expect("rejoins lock");
        if let Some(slot) = s.get_mut(&rank) {
            *slot = Some(cards);
            self.rejoined.notify_all();
        }
    }
}

/// krun's orders for this policy (the node's link thread).
pub fn from_launcher(
    shared: &std::sync::Arc<Shared>,
    agent: &std::sync::Arc<AgentSlot>,
    msg: LauncherToNode,
) {
    let side = &shared.uncoordinated;
    match msg {
        LauncherToNode::CaptureRank {
            rank,
            node,
            version,
        } if node == shared.me => side.capture(shared, rank, version),
        LauncherToNode::TrimLog { rank, version } => {
            side.order(shared, rank, NodeToRank::LogSafe { version })
        }
        LauncherToNode::KeepFrom { rank, version } => {
            if let Some(agent) = agent.get() {
                agent.keep_from(rank, version);
            }
        }
        LauncherToNode::PeerMoved {
            rank,
            address,
            ring,
        } => side.peer_moved(shared, rank, address, ring),
        LauncherToNode::Rejoined { rank, cards } => side.rejoined(rank, cards),
        LauncherToNode::Realign => side.realign(shared),
        LauncherToNode::Rejoin {
            restart,
            rank,
            node,
            version,
            local_size,
        } if node == shared.me => {
            side.rejoin_orders.ordered(restart, &[(rank, node)]);
            side.drop_captures([rank]);
            let (shared, agent) = (shared.clone(), agent.clone());
            std::thread::spawn(move || {
                start(&shared, &agent, (restart, rank, version, local_size))
            });
        }
        // A rank drained away from here (`policies` uncoordinated drain): its old process
        // ends before the new one rejoins (a failed node's rank is gone already).
        LauncherToNode::Rejoin {
            restart,
            rank,
            node,
            ..
        } => {
            side.rejoin_orders.ordered(restart, &[(rank, node)]);
            super::drain::release_moved(shared, &[(rank, node)]);
        }
        _ => {}
    }
}

/// A rank's message for this policy (the rank socket).
pub fn from_rank(shared: &Shared, msg: RankToNode) -> NodeToRank {
    match msg {
        RankToNode::LogCard {
            rank,
            address,
            ring,
        } => {
            shared.tell_launcher(&NodeToLauncher::LogCard {
                rank,
                address,
                ring,
            });
            NodeToRank::Ack
        }
        RankToNode::PeerReplaced { rank, moved } => {
            shared.tell_launcher(&NodeToLauncher::PeerReplaced { rank, moved });
            NodeToRank::Ack
        }
        RankToNode::Rejoin {
            rank,
            address,
            ring,
            ..
        } => shared.uncoordinated.rejoin(shared, rank, address, ring),
        RankToNode::SafepointIndex { rank, index, next } => {
            shared.tell_launcher(&NodeToLauncher::SafepointIndex { rank, index, next });
            NodeToRank::Ack
        }
        RankToNode::ChannelCounts {
            rank,
            version,
            sent,
            delivered,
        } => {
            shared.tell_launcher(&NodeToLauncher::ChannelCounts {
                rank,
                version,
                sent,
                delivered,
            });
            NodeToRank::Ack
        }
        other => NodeToRank::Refused(format!(
            "{other:?} is not a message of the uncoordinated policy"
        )),
    }
}

fn local_ranks(shared: &Shared) -> Vec<u32> {
    shared
        .local_ranks
        .lock()
        .expect("ranks lock")
        .keys()
        .map(|&r| r as u32)
        .collect()
}

fn local_pid(shared: &Shared, rank: u32) -> Option<u32> {
    shared
        .local_ranks
        .lock()
        .expect("ranks lock")
        .get(&u64::from(rank))
        .copied()
}

/// `Rejoin{restart, rank, node, version}` on its node (in its own thread): starts the rank
/// as a new process that rejoins the running ranks; answers krun.
/// `order`: (restart, rank, version, the rank's `KRUN_LOCAL_SIZE` at start).
pub fn start(shared: &Shared, agent: &AgentSlot, order: (u64, u32, u64, u32)) {
    let (restart, rank, version, local_size) = order;
    let started = Instant::now();
    let msg = match start_one(shared, agent, restart, rank, version, local_size) {
        Ok((pid, fetched)) => NodeToLauncher::Restarted {
            wiring: restart,
            rank,
            pid,
            fetched,
            seconds: started.elapsed().as_secs_f64(),
            in_place: false,
            new_because: Some("rejoins the running ranks".into()),
        },
        Err(reason) => {
            eprintln!("krund: node {}: rejoin of rank {rank}: {reason}", shared.me);
            NodeToLauncher::RestartFailed {
                wiring: restart,
                rank,
                reason,
            }
        }
    };
    shared.tell_launcher(&msg);
}

/// Why the `Rejoin` numbered `restart` for `rank` is not carried out: a newer one names it.
fn superseded(side: &NodeSide, rank: u32, restart: u64) -> Result<(), String> {
    match side.rejoin_orders.superseded(rank, restart) {
        Some(newer) => Err(format!(
            "its restart {restart} is superseded by restart {newer} of the same rank (a \
             failure during the rejoin): dropped"
        )),
        None => Ok(()),
    }
}

fn start_one(
    shared: &Shared,
    agent: &AgentSlot,
    restart: u64,
    rank: u32,
    version: u64,
    local_size: u32,
) -> Result<(u32, u64), String> {
    let side = &shared.uncoordinated;
    // One rank at a time on this node, whatever restart ordered it.
    let _turn = side.rejoin_orders.turn();
    superseded(side, rank, restart)?;
    let runner = shared
        .rank_commands
        .lock()
        .expect("commands lock")
        .clone()
        .ok_or_else(|| format!("node {} runs no rank runner", shared.me))?;
    let here = local_pid(shared, rank).is_some();
    let mut fetched = 0;
    // Version 0: the rank was lost before its first own checkpoint and re-executes from
    // its start (no image to fetch or restore).
    if !here && version > 0 {
        // The rank comes from another node: its images come from the store.
        let (dir, owner) = super::recovery::rank_images(rank);
        let _ = std::fs::remove_dir_all(dir.join(&owner));
        fetched = match agent.wait(Duration::from_secs(30)) {
            Some(a) => a
                .write_chain(rank, version, &dir, &owner)
                .map_err(|e| format!("fetching its images of v{version}: {e}"))?,
            None => super::drain::fetch_chain_remote(shared.me, rank, version, &dir, &owner)
                .map_err(|e| format!("fetching its images of v{version}: {e}"))?,
        };
    }
    // The fetch above can take seconds: a newer order may have come meanwhile.
    superseded(side, rank, restart)?;
    // Not linked until the new process says hello (a signal before would kill it).
    shared
        .linked_ranks
        .lock()
        .expect("linked lock")
        .remove(&u64::from(rank));
    let mut env = vec![
        ("KRUN_REJOIN".to_string(), "1".to_string()),
        // The stride of its log buddy, as at its start (the spare may run other counts).
        ("KRUN_LOCAL_SIZE".to_string(), local_size.to_string()),
        // The mode it rejoins in, also when the job started coordinated and switched.
        ("KRUN_UNCOORDINATED".to_string(), "1".to_string()),
        ("KRUN_MESSAGE_LOGGING".to_string(), "1".to_string()),
    ];
    if version > 0 {
        env.push(("KRUN_GHOST_RESTORE".to_string(), version.to_string()));
    }
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
    Ok((pid, fetched))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_order_answers_the_ranks_next_safepoint_once() {
        let side = NodeSide::default();
        side.captures.lock().unwrap().insert(3, 7);
        assert_eq!(
            side.at_safepoint(3),
            Some(NodeToRank::Checkpoint { version: 7 })
        );
        // Taken: the next safepoint falls to the gate (coordinated) or continues.
        assert_ne!(
            side.at_safepoint(3),
            Some(NodeToRank::Checkpoint { version: 7 })
        );
    }

    /// A failure during a rejoin: krun's newer `Rejoin` for the same rank (on whatever
    /// node) supersedes the older one, whose thread drops it instead of replacing the
    /// newer process; a late copy of the older order changes nothing, and other ranks'
    /// orders are not touched.
    #[test]
    fn a_newer_rejoin_supersedes_an_older_one_for_its_rank_only() {
        let side = NodeSide::default();
        side.rejoin_orders.ordered(3, &[(2, 1)]);
        side.rejoin_orders.ordered(4, &[(1, 1)]);
        assert!(superseded(&side, 2, 3).is_ok());
        side.rejoin_orders.ordered(5, &[(2, 4)]);
        let e = superseded(&side, 2, 3).unwrap_err();
        assert!(e.contains("superseded by restart 5"), "{e}");
        assert!(superseded(&side, 2, 5).is_ok());
        assert!(
            superseded(&side, 1, 4).is_ok(),
            "restart 5 does not name rank 1"
        );
        side.rejoin_orders.ordered(3, &[(2, 1)]);
        assert!(superseded(&side, 2, 3).is_err());
    }

    /// The node's mode follows the swaps: uncoordinated, a safepoint without an order goes
    /// on at once; coordinated again, it goes to the gate (the policy's barrier).
    #[test]
    fn the_nodes_mode_switches_with_the_swaps() {
        let side = NodeSide::default();
        side.set_active(true);
        assert!(side.active());
        assert_eq!(side.at_safepoint(1), Some(NodeToRank::Continue));
        side.set_active(false);
        assert!(!side.active());
        assert_eq!(side.at_safepoint(1), None);
    }

    #[test]
    fn a_rejoin_is_answered_with_the_cards_krun_sends() {
        let side = std::sync::Arc::new(NodeSide::default());
        side.rejoins.lock().unwrap().insert(2, None);
        let s = side.clone();
        let waiter = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut g = s.rejoins.lock().unwrap();
            loop {
                if let Some(Some(c)) = g.get(&2) {
                    return c.clone();
                }
                assert!(Instant::now() < deadline, "no cards");
                g = s
                    .rejoined
                    .wait_timeout(g, Duration::from_millis(100))
                    .unwrap()
                    .0;
            }
        });
        let cards = vec![
            (vec![1u8], vec![2u8]),
            (vec![3], vec![4]),
            (vec![5], vec![6]),
        ];
        // Cards for a rank nobody waits for change nothing.
        side.rejoined(9, cards.clone());
        assert!(!side.rejoins.lock().unwrap().contains_key(&9));
        side.rejoined(2, cards.clone());
        assert_eq!(waiter.join().unwrap(), cards);
    }
}
