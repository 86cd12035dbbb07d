//! A rank under krun's uncoordinated policy (`KRUN_UNCOORDINATED=1`, set by krun in every
//! rank's environment when the job's policy is `uncoordinated`): each rank checkpoints on
//! its own, with no barrier, and with message logging (`KRUN_MESSAGE_LOGGING=1`) a lost rank
//! restarts alone and rejoins the running ranks ([`crate::logging`]).
//!
//! # Safepoints without a barrier
//! [`crate::Rank::safepoint`] does no collective: a rank whose node signalled it (SIGUSR1:
//! the node holds a capture for this rank only) asks its krund (`AtSafepoint`) and gets
//! `Checkpoint{version}` (or `Continue`); it then takes its own native checkpoint: the log
//! snapshot ([`crate::Rank::log_mark_checkpoint`]) goes into the registered region
//! [`LOG_REGION`] first (it grows with the log: [`crate::log_region`]), so the image holds
//! the application's state and the log's together, and the checkpoint store carries both to
//! the buddy. No check for messages in flight:
//! with logging, a message received but not yet delivered is below nobody's prefix and is
//! resent on a rejoin.
//!
//! Without logging (`KRUN_MESSAGE_LOGGING=0`), each own checkpoint is preceded by
//! `ChannelCounts{version, sent, delivered}` to the node: the messages this process sent to
//! and delivered from each rank since its set-up (the wire-up's left out). The policy's
//! recovery line is the newest set of checkpoints on which these agree on every channel;
//! every rank of it restarts in a new wiring epoch ([`crate::checkpoint`] keeps only its own
//! images up to the version restored, so the checkpointer numbers on from it).
//!
//! # Orders through the watcher
//! The rank library's watcher (`crate::rollback`) also takes `LogSafe{version}` (the
//! policy's `TrimLog`: [`crate::Rank::log_checkpoint_safe`]) and `PeerMoved{rank, address,
//! ring}` (a restarted rank's new process: [`crate::Rank::replace_peer`], then
//! `PeerReplaced` to the node).
//!
//! # Rejoin
//! A rank restarted by the policy starts with `KRUN_REJOIN=1` and `KRUN_GHOST_RESTORE=V`:
//! it restores its registered memory from its own image V (the application's state and
//! the log region), opens a new endpoint, sends `Rejoin{address, ring}` to its node and
//! waits for every rank's card (krund answers once every survivor replaced its address),
//! then [`crate::logging::Rejoining::join`]s: determinants from the buddy, `Resume` to every
//! survivor, then the program re-executes from its checkpoint, its receives in the recorded
//! order. No address all-gather: the survivors keep their endpoints and never roll back.
//!
//! # Switching modes while the job runs (`krun policy load` between the two policies)
//! The mode is not fixed at launch: krund switches it at a consistent cut.
//! - **Coordinated -> uncoordinated with logging.** The swap's coordinated checkpoint is
//!   released to the ranks as [`SafepointOrder::Switch`]`(v)` instead of `Checkpoint(v)`
//!   (every rank of the barrier gets it; `checkpoint::agree` resolves a `Continue` beside it
//!   to it). At that safepoint every rank, together: turns logging on with empty logs
//!   ([`Rank::enable_logging`]: rings registered and swapped, the per-source prefixes set to
//!   what was delivered so far), registers [`LOG_REGION`], writes the log's snapshot at the
//!   cut into it (send counters, prefixes, no payload, safepoint index 0), then takes the
//!   collective checkpoint `v`. From the next safepoint on it runs without a barrier, and
//!   its card goes to its node ([`RankToNode::LogCard`]). So checkpoint `v` is every rank's
//!   first own checkpoint: a rank lost before its next one rejoins from `v` and replays
//!   what its peers logged since the cut.
//! - **Uncoordinated -> coordinated** needs every rank at the same safepoint again, and no
//!   rank may be held while a peer waits for its messages. Each rank counts its safepoints
//!   since the cut (restored with its own checkpoints: the index is in the log snapshot).
//!   krund asks every rank's watcher for its index ([`WatchOrder::ReportSafepoint`]); the
//!   rank answers `SafepointIndex{index, next}` (`next`: the version its checkpointer takes
//!   next) and from then on ignores capture requests; it keeps computing, up to
//!   [`REALIGN_AHEAD`] safepoints past the index reported, where it waits for the target.
//!   krun picks `T = max(index) + REALIGN_AHEAD` (no rank can be past it) and tells every
//!   rank ([`WatchOrder::CoordinateAt`]). At safepoint `T` each rank leaves the
//!   uncoordinated mode and asks its node as in a coordinated job (a checkpoint request of
//!   its own): the coordinated policy's barrier holds every rank there and its checkpoint,
//!   numbered `max(next) + 1` (each checkpointer skips forward to it,
//!   `NativeRuntime::skip_to`), is the cut. Logging stops once that checkpoint is taken and
//!   the logs are dropped. `CoordinateAt(0)` cancels (krun gave up collecting the indices).
//!   This assumes what a coordinated job assumes already: every rank calls the safepoint
//!   the same number of times, with no message in flight across it.
//! - A process re-executed in place (a rollback) starts in the mode its process was in at
//!   the order (`KRUN_UNCOORDINATED`/`KRUN_MESSAGE_LOGGING` replaced: [`reexec_mode`]), and
//!   never as a rejoin.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::checkpoint::Safepoint;
use crate::error::{RankError, Result};
use crate::node_link::{NodeLink, RankToNode, SafepointOrder, WatchOrder};
use crate::world::Rank;

pub use crate::log_region::{DEFAULT_LOG_REGION, DEFAULT_LOG_REGION_MAX, LOG_REGION};
/// How long a rejoining rank waits for the survivors to learn its address.
pub const REJOIN_WAIT: Duration = Duration::from_secs(120);

/// How far past the safepoint index it reported a rank computes before it waits for the
/// target of a switch back to the coordinated mode.
pub const REALIGN_AHEAD: u64 = 64;
/// How long a rank waits there for the target (longer than krun collects the indices, 60
/// s: krun cancels first).
pub const REALIGN_WAIT: Duration = Duration::from_secs(120);

/// 0: not read yet; 1: coordinated; 2: uncoordinated.
static MODE: AtomicU8 = AtomicU8::new(0);
/// Safepoints since the start of the uncoordinated mode.
static INDEX: AtomicU64 = AtomicU64::new(0);
/// A switch back under way: (the index reported, the target once known).
static REALIGN: Mutex<Option<(u64, Option<u64>)>> = Mutex::new(None);
static REALIGN_SET: Condvar = Condvar::new();
/// The next collective checkpoint may number itself as ordered (after a switch back).
static ALIGN_NEXT: AtomicBool = AtomicBool::new(false);
/// The mode was switched in this process (or it rejoined a job whose mode was).
static SWITCHED: AtomicBool = AtomicBool::new(false);
static CURRENT: OnceLock<Weak<Rank>> = OnceLock::new();
/// Without logging: the counters (sent to, delivered from each rank) when the rank was set
/// up: what its start-up (wire-up) exchanged, left out of the channel counts it reports.
static BASELINE: OnceLock<(Vec<u64>, Vec<u64>)> = OnceLock::new();

pub(crate) fn env_flag(name: &'static str) -> Result<bool> {
    match std::env::var(name) {
        Ok(v) => match v.trim() {
            "1" | "true" | "on" => Ok(true),
            "0" | "false" | "off" | "" => Ok(false),
            _ => Err(RankError::BadEnv {
                name,
                value: v,
                reason: "expected 1 or 0".into(),
            }),
        },
        Err(_) => Ok(false),
    }
}

/// Whether this rank runs under the uncoordinated policy (at start: `KRUN_UNCOORDINATED`;
/// later as switched, see the module doc).
pub fn active() -> bool {
    match MODE.load(Ordering::SeqCst) {
        0 => {
            let on = env_flag("KRUN_UNCOORDINATED").unwrap_or(false);
            let _ = MODE.compare_exchange(
                0,
                if on { 2 } else { 1 },
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            MODE.load(Ordering::SeqCst) == 2
        }
        m => m == 2,
    }
}

fn set_active(on: bool) {
    MODE.store(if on { 2 } else { 1 }, Ordering::SeqCst);
    SWITCHED.store(true, Ordering::SeqCst);
}

/// This rank's safepoints since the uncoordinated mode started (kept in the log snapshot).
pub(crate) fn safepoint_index() -> u64 {
    INDEX.load(Ordering::SeqCst)
}

/// A restored log snapshot's index.
pub(crate) fn set_safepoint_index(i: u64) {
    INDEX.store(i, Ordering::SeqCst);
}

/// For a process whose mode was switched while the job ran: the environment variables a
/// re-executed image gets for the mode it is in now (a rollback in place is never a
/// rejoin); `None`: the mode it started with stands.
pub fn reexec_mode() -> Option<[(&'static str, &'static str); 2]> {
    if !SWITCHED.load(Ordering::SeqCst) {
        return None;
    }
    let (u, l) = if active() { ("1", "1") } else { ("0", "0") };
    Some([("KRUN_UNCOORDINATED", u), ("KRUN_MESSAGE_LOGGING", l)])
}

/// Whether the next ordered collective checkpoint may number itself as ordered (once).
pub(crate) fn take_align() -> bool {
    ALIGN_NEXT.swap(false, Ordering::SeqCst)
}

/// The rank as its watcher reaches it.
pub(crate) fn set_current(rank: &Arc<Rank>) {
    let _ = CURRENT.set(Arc::downgrade(rank));
}

/// Whether this process is a restarted rank rejoining a running job.
pub fn rejoining() -> Result<bool> {
    env_flag("KRUN_REJOIN")
}

impl Rank {
    /// After init (or a rejoin): the watcher may reach this rank; with logging, the log
    /// region is registered (and read back when restored) and the rank's card goes to its
    /// node. Returns the log snapshot the region held (restored image), if any.
    pub(crate) fn setup_uncoordinated(self: &Arc<Rank>, logging: bool) -> Result<Option<Vec<u8>>> {
        set_current(self);
        if !logging {
            let _ = BASELINE.set((self.msgs.send_counters(), self.msgs.delivered_counts()));
            return Ok(None);
        }
        let snapshot = self.register_log_region()?;
        let (address, ring) = self.rejoin_card()?;
        self.report(&RankToNode::LogCard {
            rank: self.rank() as u32,
            address,
            ring,
        })?;
        Ok(snapshot)
    }

    /// Registers [`LOG_REGION`] (once); returns the snapshot it was restored with.
    pub(crate) fn register_log_region(&self) -> Result<Option<Vec<u8>>> {
        log_region(&self.ckpt)
    }

    fn write_log_snapshot(&self, snap: &[u8]) -> Result<()> {
        crate::log_region::write(&self.ckpt, self.rank(), snap)
    }

    /// The safepoint without a barrier (see the module doc).
    pub(crate) fn own_safepoint(&self) -> Result<Safepoint> {
        let index = INDEX.fetch_add(1, Ordering::SeqCst) + 1;
        let pending = *REALIGN.lock().expect("realign lock");
        if let Some((base, _)) = pending {
            // A switch back is under way: no own checkpoint any more.
            let _ = crate::checkpoint::take_checkpoint_request();
            return self.realign_at(index, base);
        }
        if !crate::checkpoint::take_checkpoint_request() {
            return Ok(Safepoint::Nothing);
        }
        match self.ask_at_safepoint(self.rank() as u32)? {
            Some(SafepointOrder::Checkpoint(version)) => self.own_checkpoint_or_skip(version),
            Some(SafepointOrder::Continue) | None => Ok(Safepoint::Nothing),
            Some(SafepointOrder::Switch(v)) => Err(RankError::Checkpoint(format!(
                "krund ordered a switch to the uncoordinated mode at checkpoint {v}, but this \
                 rank runs it already"
            ))),
            Some(SafepointOrder::Rollback(v)) => Err(RankError::Checkpoint(format!(
                "krund ordered a collective rollback to {v} under the uncoordinated policy"
            ))),
        }
    }

    /// At safepoint `index` during a switch back (`base`: the index reported): at the target,
    /// the coordinated safepoint; past `base +` [`REALIGN_AHEAD`], wait for the target.
    fn realign_at(&self, index: u64, base: u64) -> Result<Safepoint> {
        let deadline = Instant::now() + REALIGN_WAIT;
        let mut g = REALIGN.lock().expect("realign lock");
        loop {
            match *g {
                None => return Ok(Safepoint::Nothing), // cancelled
                Some((_, Some(t))) if index == t => break,
                Some((_, Some(t))) if index > t => {
                    *g = None;
                    return Err(RankError::Checkpoint(format!(
                        "rank {}: the switch to the coordinated mode names safepoint {t}, \
                         this rank is at {index} already",
                        self.rank()
                    )));
                }
                Some((_, Some(_))) => return Ok(Safepoint::Nothing),
                Some((_, None)) if index < base + REALIGN_AHEAD => return Ok(Safepoint::Nothing),
                Some((_, None)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        *g = None;
                        return Err(RankError::Checkpoint(format!(
                            "rank {}: the switch to the coordinated mode named no safepoint \
                             in {REALIGN_WAIT:?}",
                            self.rank()
                        )));
                    }
                    g = REALIGN_SET.wait_timeout(g, left).expect("realign lock").0;
                }
            }
        }
        *g = None;
        drop(g);
        // Every rank is at safepoint T: the coordinated mode from here, and this safepoint
        // is the policy's barrier (its checkpoint is the cut).
        set_active(false);
        ALIGN_NEXT.store(true, Ordering::SeqCst);
        crate::checkpoint::request_checkpoint();
        let out = self.safepoint_once_coordinated();
        if matches!(out, Ok(Safepoint::Checkpointed(_))) {
            // The coordinated checkpoint holds the job's state: the logs are not needed.
            self.msgs.retire_logger();
        }
        out
    }

    /// The coordinated checkpoint `want` that switches every rank to the uncoordinated mode
    /// with logging (see the module doc). The collective part (no message left to take,
    /// the logs' set-up) comes first; from the log's snapshot to the image no message moves,
    /// and none after it in this call: a rank restarted alone from this image resumes with
    /// exactly the counters its peers hold for it.
    pub(crate) fn switch_to_uncoordinated(&self, want: u64) -> Result<Safepoint> {
        let rt = self.ckpt.runtime()?.clone();
        let pending = self.msgs.undelivered_user();
        if self.allreduce_or(u64::from(pending > 0))? != 0 {
            return Err(RankError::Checkpoint(format!(
                "a rank holds received messages no receive call has taken yet (here: \
                 {pending}): the switch to the uncoordinated mode needs a safepoint where no \
                 message is in flight"
            )));
        }
        if self.msgs.logger().is_none() {
            self.enable_logging(0)?;
        }
        self.register_log_region()?;
        INDEX.store(0, Ordering::SeqCst);
        let snap = self.log_mark_checkpoint(want)?;
        self.write_log_snapshot(&snap)?;
        self.ckpt.run_hooks()?;
        let version = rt.checkpoint()?;
        let report = rt.wait()?;
        if version != want {
            return Err(RankError::Checkpoint(format!(
                "krund ordered checkpoint version {want} (the switch to the uncoordinated \
                 mode), the checkpointer took {version}"
            )));
        }
        set_active(true);
        if let Some(r) = report {
            self.report(&RankToNode::Checkpointed {
                rank: self.rank() as u32,
                version,
                image: r.path,
                bytes: r.image_bytes,
            })?;
        }
        let (address, ring) = self.rejoin_card()?;
        self.report(&RankToNode::LogCard {
            rank: self.rank() as u32,
            address,
            ring,
        })?;
        Ok(Safepoint::Checkpointed(version))
    }

    /// This rank alone takes native checkpoint `want` (with the log's snapshot).
    pub(crate) fn own_checkpoint(&self, want: u64) -> Result<u64> {
        let rt = self.ckpt.runtime()?.clone();
        if self.msgs.logger().is_some() {
            let snap = self.log_mark_checkpoint(want)?;
            self.write_log_snapshot(&snap)?;
        }
        self.own_checkpoint_taken(&rt, want)
    }

    /// The safepoint's checkpoint order, where a log snapshot too large for the region even
    /// grown to its cap ([`crate::log_region`]) skips this checkpoint (said on stderr; krun
    /// hears nothing, times the capture out and the policy orders the next one) instead of
    /// ending the program: the log shrinks as receivers checkpoint.
    fn own_checkpoint_or_skip(&self, want: u64) -> Result<Safepoint> {
        match self.own_checkpoint(want) {
            Ok(v) => Ok(Safepoint::Checkpointed(v)),
            Err(RankError::Checkpoint(why)) if why.contains("does not fit the") => {
                eprintln!(
                    "krun: rank {}: own checkpoint {want} skipped: {why}",
                    self.rank()
                );
                Ok(Safepoint::Nothing)
            }
            Err(e) => Err(e),
        }
    }

    fn own_checkpoint_taken(
        &self,
        rt: &Arc<ghost::native::NativeRuntime>,
        want: u64,
    ) -> Result<u64> {
        // Without logging: this checkpoint's channel counts, for the policy's recovery line
        // (read here: only this thread sends and receives while it is at the safepoint).
        let counts = match (self.msgs.logger(), BASELINE.get()) {
            (None, Some((s0, d0))) => Some((
                minus(&self.msgs.send_counters(), s0),
                minus(&self.msgs.delivered_counts(), d0),
            )),
            _ => None,
        };
        self.ckpt.run_hooks()?;
        // A rank restarted from an older checkpoint than its newest (the newest was not safe
        // yet when its node was drained or died) numbers on from the version it restored,
        // while krund numbers on from the newest this rank ever took: skip ahead to krund's
        // number (never back), so a version is never taken twice. Seen in the CI: "krund
        // ordered checkpoint version 4 of rank 6, the checkpointer took 3" after a drain.
        if want > rt.next_version() {
            rt.skip_to(want);
        }
        let version = rt.checkpoint()?;
        let report = rt.wait()?;
        if version != want {
            return Err(RankError::Checkpoint(format!(
                "krund ordered checkpoint version {want} of rank {}, the checkpointer took \
                 {version}",
                self.rank()
            )));
        }
        if let (Some((sent, delivered)), Some(_)) = (counts, &report) {
            self.report(&RankToNode::ChannelCounts {
                rank: self.rank() as u32,
                version,
                sent,
                delivered,
            })?;
        }
        if let Some(r) = report {
            self.report(&RankToNode::Checkpointed {
                rank: self.rank() as u32,
                version,
                image: r.path,
                bytes: r.image_bytes,
            })?;
        }
        Ok(version)
    }
}

/// `a - b`, per entry.
fn minus(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter()
        .enumerate()
        .map(|(i, x)| x.saturating_sub(b.get(i).copied().unwrap_or(0)))
        .collect()
}

/// Registers [`LOG_REGION`] with `ckpt`'s checkpointer (once per process; it grows as
/// [`crate::log_region`] says); returns the snapshot it was restored with.
pub(crate) fn log_region(ckpt: &crate::checkpoint::Checkpoints) -> Result<Option<Vec<u8>>> {
    crate::log_region::register(ckpt)
}

/// An order the watcher got for the uncoordinated policy; `PeerReplaced` is told on `link`.
/// Message-log acknowledgements: (sender, upto).
type Acks = Vec<(usize, u64)>;

/// Queues message-log acknowledgements (sender, upto) for this process's ack thread, which
/// sends them to the current process of each sender (the newest `upto` per sender when
/// several wait).
fn send_acks(acks: Acks) {
    static ACKS: OnceLock<Mutex<mpsc::Sender<Acks>>> = OnceLock::new();
    let tx = ACKS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Acks>();
        let spawned = std::thread::Builder::new()
            .name("krun-log-acks".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut newest = std::collections::BTreeMap::new();
                    for (src, upto) in first.into_iter().chain(rx.try_iter().flatten()) {
                        let e = newest.entry(src).or_insert(upto);
                        *e = (*e).max(upto);
                    }
                    let Some(rank) = CURRENT.get().and_then(Weak::upgrade) else {
                        continue;
                    };
                    for (src, upto) in newest {
                        rank.send_log_ack(src, upto);
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("krun: no thread for message-log acknowledgements ({e}): none are sent");
        }
        Mutex::new(tx)
    });
    let _ = tx.lock().expect("acks lock").send(acks);
}

pub(crate) fn on_order(link: &mut NodeLink, me: u32, order: WatchOrder) {
    let mut rank = CURRENT.get().and_then(Weak::upgrade);
    if rank.is_none() && matches!(order, WatchOrder::ReportSafepoint) {
        // A restarted rank still rejoining: its index is known once it has joined (it comes
        // with the log snapshot); the switch waits for it.
        let deadline = Instant::now() + REJOIN_WAIT;
        while rank.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            rank = CURRENT.get().and_then(Weak::upgrade);
        }
    }
    let Some(rank) = rank else {
        // A rank restarting alongside `moved` learns its address from krund's `Peers`.
        if let WatchOrder::LogSafe(v) = order {
            eprintln!("krun: rank {me}: log trim at {v} before the rank was ready: ignored");
        }
        return;
    };
    match order {
        // The trim here, its acknowledgements from another thread: a send to a sender whose
        // process just died waits out the fabric's operation timeout (10 s), and the
        // watcher must stay free for the `PeerMoved` that follows (two or three such sends
        // before it held rejoins back 10-30 s in `bench policies`).
        WatchOrder::LogSafe(version) => match rank.log_trim_local(version) {
            Ok(acks) => send_acks(acks),
            Err(e) => eprintln!("krun: rank {me}: trimming the message log at {version}: {e}"),
        },
        WatchOrder::PeerMoved {
            rank: moved,
            address,
            ring,
        } => match rank.replace_peer(moved as usize, &address, &ring) {
            Ok(()) => {
                if let Err(e) = link.report(&RankToNode::PeerReplaced { rank: me, moved }) {
                    eprintln!("krun: rank {me}: telling the node about rank {moved}: {e}");
                }
            }
            Err(e) => eprintln!("krun: rank {me}: rank {moved}'s new address: {e}"),
        },
        WatchOrder::ReportSafepoint => {
            let index = {
                let mut g = REALIGN.lock().expect("realign lock");
                let index = INDEX.load(Ordering::SeqCst);
                *g = Some((index, None));
                index
            };
            let next = rank.ckpt.runtime().map(|rt| rt.next_version()).unwrap_or(0);
            if let Err(e) = link.report(&RankToNode::SafepointIndex {
                rank: me,
                index,
                next,
            }) {
                eprintln!("krun: rank {me}: telling the node its safepoint index: {e}");
            }
        }
        WatchOrder::CoordinateAt(t) => {
            let mut g = REALIGN.lock().expect("realign lock");
            match (t, g.as_mut()) {
                (0, _) => *g = None,
                (t, Some(slot)) => slot.1 = Some(t),
                (t, None) => eprintln!(
                    "krun: rank {me}: told to switch to the coordinated mode at safepoint {t}, \
                     but no switch is under way here: ignored"
                ),
            }
            REALIGN_SET.notify_all();
        }
        WatchOrder::InPlace(_) => {}
    }
}
