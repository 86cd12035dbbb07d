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
//! [`LOG_REGION`] first, so the image holds the application's state and the log's together,
//! and the checkpoint store carries both to the buddy. No check for messages in flight:
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
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use crate::checkpoint::Safepoint;
use crate::error::{RankError, Result};
use crate::node_link::{NodeLink, RankToNode, SafepointOrder, WatchOrder};
use crate::world::Rank;

/// The registered region holding the log snapshot of each own checkpoint.
pub const LOG_REGION: &str = "krun-message-log";
/// Its default size (`KRUN_LOG_REGION_BYTES`).
pub const DEFAULT_LOG_REGION: usize = 1 << 20;
/// How long a rejoining rank waits for the survivors to learn its address.
pub const REJOIN_WAIT: Duration = Duration::from_secs(120);

static ACTIVE: OnceLock<bool> = OnceLock::new();
static CURRENT: OnceLock<Weak<Rank>> = OnceLock::new();
static REGION: OnceLock<(usize, usize)> = OnceLock::new();
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

/// Whether this rank runs under the uncoordinated policy.
pub fn active() -> bool {
    *ACTIVE.get_or_init(|| env_flag("KRUN_UNCOORDINATED").unwrap_or(false))
}

/// Whether this process is a restarted rank rejoining a running job.
pub fn rejoining() -> Result<bool> {
    env_flag("KRUN_REJOIN")
}

fn region_bytes() -> Result<usize> {
    match std::env::var("KRUN_LOG_REGION_BYTES") {
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= 4096)
            .map(|n| n.next_multiple_of(4096))
            .ok_or(RankError::BadEnv {
                name: "KRUN_LOG_REGION_BYTES",
                value: v,
                reason: "expected a byte count >= 4096".into(),
            }),
        Err(_) => Ok(DEFAULT_LOG_REGION),
    }
}

impl Rank {
    /// After init (or a rejoin): the watcher may reach this rank; with logging, the log
    /// region is registered (and read back when restored) and the rank's card goes to its
    /// node. Returns the log snapshot the region held (restored image), if any.
    pub(crate) fn setup_uncoordinated(self: &Arc<Rank>, logging: bool) -> Result<Option<Vec<u8>>> {
        let _ = CURRENT.set(Arc::downgrade(self));
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
        let Some(&(addr, len)) = REGION.get() else {
            return Err(RankError::Checkpoint(format!(
                "message logging is on but the {LOG_REGION} region is not registered"
            )));
        };
        if snap.len() + 8 > len {
            return Err(RankError::Checkpoint(format!(
                "the message log's snapshot ({} bytes: payloads held for receivers that have \
                 not checkpointed) does not fit the {LOG_REGION} region ({len} bytes): raise \
                 KRUN_LOG_REGION_BYTES or checkpoint more often",
                snap.len()
            )));
        }
        // SAFETY: as in `register_log_region`; the checkpoint is taken by this thread after
        // the write.
        let bytes = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
        bytes[..8].copy_from_slice(&(snap.len() as u64).to_le_bytes());
        bytes[8..8 + snap.len()].copy_from_slice(snap);
        Ok(())
    }

    /// The safepoint without a barrier (see the module doc).
    pub(crate) fn own_safepoint(&self) -> Result<Safepoint> {
        if !crate::checkpoint::take_checkpoint_request() {
            return Ok(Safepoint::Nothing);
        }
        match self.ask_at_safepoint(self.rank() as u32)? {
            Some(SafepointOrder::Checkpoint(version)) => self.own_checkpoint_or_skip(version),
            Some(SafepointOrder::Continue) | None => Ok(Safepoint::Nothing),
            Some(SafepointOrder::Rollback(v)) => Err(RankError::Checkpoint(format!(
                "krund ordered a collective rollback to {v} under the uncoordinated policy"
            ))),
        }
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

    /// The safepoint's checkpoint order, where a log snapshot too large for its region
    /// skips this checkpoint (said on stderr; krun hears nothing, times the capture out and
    /// the policy orders the next one) instead of ending the program: the log shrinks as
    /// receivers checkpoint.
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

/// Registers [`LOG_REGION`] with `ckpt`'s checkpointer (once per process); returns the
/// snapshot it was restored with.
pub(crate) fn log_region(ckpt: &crate::checkpoint::Checkpoints) -> Result<Option<Vec<u8>>> {
    if !ckpt.enabled() || REGION.get().is_some() {
        return Ok(None);
    }
    let len = region_bytes()?;
    let addr = ghost::native::alloc_region(len)?;
    // SAFETY: `alloc_region` maps whole private anonymous pages that are never freed.
    let restored = unsafe { ckpt.runtime()?.register(LOG_REGION, addr, len) }?;
    let _ = REGION.set((addr as usize, len));
    if !restored {
        return Ok(None);
    }
    // SAFETY: the region is `len` bytes of this process's memory, mapped for good; only this
    // rank's own checkpoint writes it.
    let bytes = unsafe { std::slice::from_raw_parts(addr, len) };
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if n == 0 {
        return Ok(None);
    }
    if n > len - 8 {
        return Err(RankError::Checkpoint(format!(
            "the restored {LOG_REGION} region says {n} bytes, more than its {len}"
        )));
    }
    Ok(Some(bytes[8..8 + n].to_vec()))
}

/// An order the watcher got for the uncoordinated policy; `PeerReplaced` is told on `link`.
pub(crate) fn on_order(link: &mut NodeLink, me: u32, order: WatchOrder) {
    let Some(rank) = CURRENT.get().and_then(Weak::upgrade) else {
        // A rank restarting alongside `moved` learns its address from krund's `Peers`.
        if let WatchOrder::LogSafe(v) = order {
            eprintln!("krun: rank {me}: log trim at {v} before the rank was ready: ignored");
        }
        return;
    };
    match order {
        WatchOrder::LogSafe(version) => {
            if let Err(e) = rank.log_checkpoint_safe(version) {
                eprintln!("krun: rank {me}: trimming the message log at {version}: {e}");
            }
        }
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
        WatchOrder::InPlace(_) => {}
    }
}
