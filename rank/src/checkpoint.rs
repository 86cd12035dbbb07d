//! Checkpoints of a job's ranks through the ghost native checkpointer: collective
//! checkpoint, safepoint and restore-on-start.
//!
//! - Each rank's images are `<KRUN_GHOST_DIR>/<owner>/rank<N>/<version>.kgi`, `owner` from
//!   `KRUN_GHOST_OWNER` (default `krun-job`).
//! - [`Rank::checkpoint`] is collective: every rank checks that no user message it has
//!   received is still waiting for a receive call (a message in a queue would not be in the
//!   image), captures its registered memory, waits until the image file is complete, and
//!   meets the others again; a version returned is complete on every rank (committed).
//!   Call it where no message is in flight, as in a bulk-synchronous step loop.
//! - At start the ranks swap the versions they hold. Images newer than the newest version
//!   held by every rank are uncommitted (a rank died during that checkpoint) and are
//!   removed. With `KRUN_GHOST_RESTORE=latest` every rank restores that newest common
//!   version; with `KRUN_GHOST_RESTORE=N`, version N, which every rank must hold.
//! - SIGUSR1 (checkpoint) and SIGUSR2 (roll back to the newest image) requests are acted
//!   on by [`Rank::safepoint`], collectively: if any rank saw a request, all act on it.
//!   With a node link, the ranks first ask their krund (`AtSafepoint`, see
//!   [`crate::node_link`]): a node that drives a policy holds them until its barrier is
//!   complete and orders `Checkpoint{version}`, `Continue` or `Rollback{version}`, which
//!   every rank then carries out instead; a node without a policy lets them act on the
//!   request themselves.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ghost::native::{self, NativeConfig, NativeRuntime, RestoreFrom};

use crate::error::{RankError, Result};
use crate::node_link::{RankToNode, SafepointOrder};
use crate::world::Rank;

/// Where and how a job's ranks write their images.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub dir: PathBuf,
    /// Job-level owner; rank N writes as `<owner>/rank<N>`.
    pub owner: String,
    pub full_every: u32,
    pub restore: Option<RestoreFrom>,
}

impl CheckpointConfig {
    /// From `KRUN_GHOST_DIR`, `KRUN_GHOST_OWNER`, `KRUN_GHOST_FULL_EVERY` and
    /// `KRUN_GHOST_RESTORE`.
    pub fn from_env() -> Result<CheckpointConfig> {
        let n = NativeConfig::from_env("krun-job")?;
        Ok(CheckpointConfig {
            dir: n.dir,
            owner: n.owner,
            full_every: n.full_every,
            restore: n.restore,
        })
    }
}

/// What [`Rank::safepoint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safepoint {
    Nothing,
    /// A checkpoint was requested on some rank; every rank took this version.
    Checkpointed(u64),
    /// A rollback was requested; the registered memory now holds this version: reload loop
    /// state from it.
    RolledBack(u64),
}

static CHECKPOINT_REQUESTED: AtomicBool = AtomicBool::new(false);
static ROLLBACK_REQUESTED: AtomicBool = AtomicBool::new(false);

/// A checkpoint request of the rank's own (as SIGUSR1 would make).
pub(crate) fn request_checkpoint() {
    CHECKPOINT_REQUESTED.store(true, Ordering::SeqCst);
}

/// Takes this rank's own checkpoint request (SIGUSR1 since the last call).
pub(crate) fn take_checkpoint_request() -> bool {
    CHECKPOINT_REQUESTED.swap(false, Ordering::SeqCst)
}

extern "C" fn on_request(sig: libc::c_int) {
    if sig == libc::SIGUSR1 || sig == crate::node_link::wake_signal() {
        CHECKPOINT_REQUESTED.store(true, Ordering::SeqCst);
    } else if sig == libc::SIGUSR2 {
        ROLLBACK_REQUESTED.store(true, Ordering::SeqCst);
    }
}

/// Catches SIGUSR1/SIGUSR2 (a user's or a scheduler's requests) and krund's wake signal
/// ([`crate::node_link::wake_signal`], a checkpoint request of the node's policy) as
/// requests, unless the program handles them already (MPICH's MPI_Init takes SIGUSR1: krund
/// then still reaches the rank through its own signal). Installed before the ghost runtime,
/// which then leaves them to us.
fn install_request_handlers() {
    for sig in [
        libc::SIGUSR1,
        libc::SIGUSR2,
        crate::node_link::wake_signal(),
    ] {
        // SAFETY: the handler does one atomic store (async-signal-safe).
        unsafe { native::install_handler_if_default(sig, on_request) };
    }
}

/// Work every rank does right before its registered memory is captured (the DSM copies
/// the pages it owns into its registered snapshots, see [`crate::dsm`]).
pub(crate) type CaptureHook = Box<dyn Fn() -> Result<()> + Send + Sync>;

pub(crate) struct Checkpoints {
    config: Option<NativeConfig>,
    /// Capture hooks by id, run in id order.
    hooks: std::sync::Mutex<std::collections::BTreeMap<u64, CaptureHook>>,
    local: Vec<u64>,
    /// The runtime, or why it could not start (reported when checkpoints are used).
    runtime: Option<std::result::Result<Arc<NativeRuntime>, String>>,
    restored: Option<u64>,
    /// How many safepoint calls pass between two collective rounds (`crate::pacer`).
    pacer: crate::pacer::Pacer,
}

impl Checkpoints {
    /// Lists this rank's images, before the ranks swap cards.
    pub(crate) fn prepare(config: Option<&CheckpointConfig>, rank: usize) -> Result<Checkpoints> {
        let Some(c) = config else {
            return Ok(Checkpoints {
                hooks: Default::default(),
                config: None,
                local: Vec::new(),
                runtime: None,
                restored: None,
                pacer: Default::default(),
            });
        };
        let owner = format!("{}/rank{rank}", c.owner);
        let mut local = native::list_versions(&c.dir, &owner)?;
        let keep = local.len().saturating_sub(256);
        local.drain(..keep);
        Ok(Checkpoints {
            hooks: Default::default(),
            config: Some(NativeConfig {
                owner,
                dir: c.dir.clone(),
                full_every: c.full_every,
                restore: c.restore,
            }),
            local,
            runtime: None,
            restored: None,
            pacer: Default::default(),
        })
    }

    /// The version the registered memory is restored from (None: a fresh start).
    pub(crate) fn restored(&self) -> Option<u64> {
        self.restored
    }

    pub(crate) fn local_versions(&self) -> &[u64] {
        &self.local
    }

    /// Agrees on the restart version from every rank's versions and starts the runtime.
    pub(crate) fn start(&mut self, all: &[Vec<u64>]) -> Result<()> {
        let Some(config) = self.config.as_mut() else {
            return Ok(());
        };
        if crate::uncoordinated::active() {
            return self.start_own();
        }
        let held_by_all = |v: u64| all.iter().all(|vs| vs.contains(&v));
        let common = self
            .local
            .iter()
            .rev()
            .copied()
            .find(|&v| held_by_all(v))
            .unwrap_or(0);
        for &v in self.local.iter().filter(|&&v| v > common) {
            let path = native::image_path(&config.dir, &config.owner, v);
            let _ = std::fs::remove_file(&path);
        }
        let restore = match config.restore {
            None => None,
            Some(RestoreFrom::Latest) if common == 0 => {
                return Err(RankError::Checkpoint(format!(
                    "KRUN_GHOST_RESTORE=latest: no checkpoint version is held by every rank \
                     (this rank, {}, holds {:?})",
                    config.owner, self.local
                )))
            }
            Some(RestoreFrom::Latest) => Some(common),
            Some(RestoreFrom::Version(v)) if v <= common && held_by_all(v) => Some(v),
            Some(RestoreFrom::Version(v)) => {
                return Err(RankError::Checkpoint(format!(
                    "KRUN_GHOST_RESTORE={v}: not every rank holds version {v} (newest common \
                     version: {common})"
                )))
            }
        };
        config.restore = restore.map(RestoreFrom::Version);
        install_request_handlers();
        match NativeRuntime::init(config.clone()) {
            Ok(rt) => {
                self.restored = rt.restored_version();
                self.runtime = Some(Ok(rt));
            }
            Err(e) if restore.is_some() => return Err(e.into()),
            Err(e) => self.runtime = Some(Err(e.to_string())),
        }
        Ok(())
    }

    /// Under the uncoordinated policy each rank restores its own version (no version is
    /// common): its images newer than that one (or all, from the start) are removed, so
    /// its checkpointer numbers on from the version restored, as krun expects.
    fn start_own(&mut self) -> Result<()> {
        let Some(config) = self.config.as_mut() else {
            return Ok(());
        };
        let keep = match config.restore {
            None => 0,
            Some(RestoreFrom::Latest) => self.local.last().copied().unwrap_or(0),
            Some(RestoreFrom::Version(v)) if self.local.contains(&v) => v,
            Some(RestoreFrom::Version(v)) => {
                return Err(RankError::Checkpoint(format!(
                    "KRUN_GHOST_RESTORE={v}: {} holds no own checkpoint {v} (it holds {:?})",
                    config.owner, self.local
                )))
            }
        };
        if keep == 0 && config.restore.is_some() {
            return Err(RankError::Checkpoint(format!(
                "KRUN_GHOST_RESTORE=latest: {} holds no own checkpoint",
                config.owner
            )));
        }
        for &v in self.local.iter().filter(|&&v| v > keep) {
            let _ = std::fs::remove_file(native::image_path(&config.dir, &config.owner, v));
        }
        self.local.retain(|&v| v <= keep);
        config.restore = (keep > 0).then_some(RestoreFrom::Version(keep));
        install_request_handlers();
        match NativeRuntime::init(config.clone()) {
            Ok(rt) => {
                self.restored = rt.restored_version();
                self.runtime = Some(Ok(rt));
            }
            Err(e) if keep > 0 => return Err(e.into()),
            Err(e) => self.runtime = Some(Err(e.to_string())),
        }
        Ok(())
    }

    pub(crate) fn runtime(&self) -> Result<&Arc<NativeRuntime>> {
        match &self.runtime {
            Some(Ok(rt)) => Ok(rt),
            Some(Err(why)) => Err(RankError::Checkpoint(format!(
                "the native checkpointer could not start: {why}"
            ))),
            None => Err(RankError::Checkpoint(
                "checkpoints are disabled for this rank".into(),
            )),
        }
    }

    /// Whether the native checkpointer runs for this rank.
    pub(crate) fn enabled(&self) -> bool {
        matches!(self.runtime, Some(Ok(_)))
    }

    /// Adds a hook run before every capture; returns its id for [`Self::remove_hook`].
    pub(crate) fn add_hook(&self, hook: CaptureHook) -> u64 {
        let mut hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        let id = hooks.keys().next_back().map_or(0, |k| k + 1);
        hooks.insert(id, hook);
        id
    }

    pub(crate) fn remove_hook(&self, id: u64) {
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    pub(crate) fn run_hooks(&self) -> Result<()> {
        let hooks = self.hooks.lock().unwrap_or_else(|p| p.into_inner());
        hooks.values().try_for_each(|h| h())
    }

    pub(crate) fn wait_idle(&self) {
        if let Some(Ok(rt)) = &self.runtime {
            let _ = rt.wait();
        }
    }
}

impl Rank {
    /// The version this rank's registered memory is restored from (None: fresh start).
    pub fn restored_version(&self) -> Option<u64> {
        self.ckpt.restored
    }

    /// Page-aligned memory for [`Rank::register_memory`], never freed.
    pub fn alloc(&self, len: usize) -> Result<*mut u8> {
        Ok(native::alloc_region(len)?)
    }

    /// Registers memory that holds the program's state; returns true if it was filled from
    /// the image being restored. `len` is rounded up to whole pages.
    ///
    /// # Safety
    /// `addr..addr+len`, rounded up to whole pages, is page-aligned private anonymous memory
    /// (see [`Rank::alloc`], which maps whole pages) that stays mapped for the life of the
    /// process.
    pub unsafe fn register_memory(&self, name: &str, addr: *mut u8, len: usize) -> Result<bool> {
        const PAGE: usize = 4096;
        let len = len
            .checked_next_multiple_of(PAGE)
            .ok_or_else(|| RankError::InvalidArgument(format!("region length {len}")))?;
        crate::trace::step(self.rank(), "register");
        // SAFETY: forwarded from this function's contract (whole pages).
        let restored = unsafe { self.ckpt.runtime()?.register(name, addr, len) }?;
        crate::trace::step(self.rank(), "registered");
        Ok(restored)
    }

    /// Collective checkpoint (see the module documentation); returns the version, complete
    /// on every rank when this returns.
    pub fn checkpoint(&self) -> Result<u64> {
        let rt = self.ckpt.runtime()?.clone();
        let pending = self.msgs.undelivered_user();
        if self.allreduce_or(u64::from(pending > 0))? != 0 {
            return Err(RankError::Checkpoint(format!(
                "a rank holds received messages no receive call has taken yet (here: {pending}); \
                 checkpoint where no message is in flight"
            )));
        }
        // Every rank is here (the all-reduce above): hooks see the job at rest.
        let outcome = self
            .ckpt
            .run_hooks()
            .and_then(|()| Ok(rt.checkpoint().and_then(|v| rt.wait().map(|r| (v, r)))?));
        let failed = self.allreduce_or(u64::from(outcome.is_err()))?;
        let (version, report) = outcome?;
        if failed != 0 {
            return Err(RankError::Checkpoint(format!(
                "version {version} failed on another rank"
            )));
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

    /// Collective: asks every rank's krund what to do at this safepoint; `None` when the
    /// nodes drive no policy (or the rank has no node link). Fails on every rank when the
    /// ranks did not all get the same order, except in the one mix [`agree`] resolves.
    fn ask_node(&self) -> Result<Option<SafepointOrder>> {
        let rank = self.rank() as u32;
        let answer = self.ask_at_safepoint(rank);
        let (bit, version) = order_bits(&answer);
        let kinds = self.allreduce_or(bit)?;
        // Versions must match too: or-ing each version's bits and their complements (over
        // the ranks whose order carries a version) finds any difference.
        let versioned = matches!(
            answer,
            Ok(Some(
                SafepointOrder::Checkpoint(_)
                    | SafepointOrder::Rollback(_)
                    | SafepointOrder::Switch(_)
            ))
        );
        let ors = self.allreduce_or(version)?;
        let nots = self.allreduce_or(if versioned { !version } else { 0 })?;
        let order = answer?;
        agree(kinds, ors, nots, order)
    }

    /// Carries out the order every rank got at this safepoint.
    fn carry_out(&self, rt: &Arc<NativeRuntime>, order: SafepointOrder) -> Result<Safepoint> {
        match order {
            SafepointOrder::Continue => Ok(Safepoint::Nothing),
            SafepointOrder::Switch(want) => self.switch_to_uncoordinated(want),
            SafepointOrder::Checkpoint(want) => {
                if crate::uncoordinated::take_align() {
                    // The first collective checkpoint after the uncoordinated mode: the
                    // ranks' own checkpoints were numbered apart; krun numbered this one
                    // above all of them.
                    rt.skip_to(want);
                }
                let version = self.checkpoint()?;
                if version != want {
                    return Err(RankError::Checkpoint(format!(
                        "krund ordered checkpoint version {want}, the checkpointer took {version}"
                    )));
                }
                Ok(Safepoint::Checkpointed(version))
            }
            SafepointOrder::Rollback(want) => {
                let outcome = rt.rollback(Some(want));
                let failed = self.allreduce_or(u64::from(outcome.is_err()))?;
                let version = outcome?;
                if failed != 0 {
                    return Err(RankError::Checkpoint(format!(
                        "rollback to version {version} failed on another rank"
                    )));
                }
                Ok(Safepoint::RolledBack(version))
            }
        }
    }

    /// Collective: acts on SIGUSR1/SIGUSR2 requests any rank received since the last round.
    /// Every rank must call it the same number of times; the job-wide round runs every
    /// 2^e-th call, e agreed in the round (`crate::pacer`: at most 1% of the time between
    /// calls, a request waits at most ~200 ms; `KRUN_SAFEPOINT_EVERY=1`: every call).
    /// A failed safepoint in a job that recovers waits for a rollback order first
    /// ([`crate::rollback`]): the node aborts a barrier when a node failed.
    pub fn safepoint(&self) -> Result<Safepoint> {
        self.safepoint_once().map_err(crate::rollback::hold)
    }

    fn safepoint_once(&self) -> Result<Safepoint> {
        if crate::uncoordinated::active() {
            // No barrier: this rank alone (`crate::uncoordinated`). The first collective
            // call after a switch back holds a round.
            self.ckpt.pacer.reset();
            return self.own_safepoint();
        }
        if self.ckpt.pacer.skip() {
            // Between two rounds (`crate::pacer`): requests wait for the next one.
            return Ok(Safepoint::Nothing);
        }
        let out = self.safepoint_once_coordinated();
        self.ckpt.pacer.returned();
        out
    }

    /// The collective safepoint: one round (see `crate::pacer` for when rounds happen).
    pub(crate) fn safepoint_once_coordinated(&self) -> Result<Safepoint> {
        let rt = self.ckpt.runtime()?.clone();
        let mine = u64::from(CHECKPOINT_REQUESTED.swap(false, Ordering::SeqCst))
            | u64::from(ROLLBACK_REQUESTED.swap(false, Ordering::SeqCst)) << 1;
        let started = std::time::Instant::now();
        let all = self.allreduce_or(mine | self.ckpt.pacer.proposal())?;
        self.ckpt.pacer.agreed(all, started.elapsed());
        let all = all & ((1 << crate::pacer::GAP_SHIFT) - 1);
        if all != 0 {
            if let Some(order) = self.ask_node()? {
                return self.carry_out(&rt, order);
            }
        }
        if all & 2 != 0 {
            let outcome = rt.rollback(None);
            let failed = self.allreduce_or(u64::from(outcome.is_err()))?;
            let version = outcome?;
            if failed != 0 {
                return Err(RankError::Checkpoint(format!(
                    "rollback to version {version} failed on another rank"
                )));
            }
            return Ok(Safepoint::RolledBack(version));
        }
        if all & 1 != 0 {
            return self.checkpoint().map(Safepoint::Checkpointed);
        }
        Ok(Safepoint::Nothing)
    }
}

/// A rank's answer from its node as one bit of its kind (or-ed over the job) and the
/// version it carries.
fn order_bits(answer: &Result<Option<SafepointOrder>>) -> (u64, u64) {
    match answer {
        Ok(None) => (ORDER_NONE, 0),
        Ok(Some(SafepointOrder::Checkpoint(v))) => (ORDER_CHECKPOINT, *v),
        Ok(Some(SafepointOrder::Continue)) => (ORDER_CONTINUE, 0),
        Ok(Some(SafepointOrder::Rollback(v))) => (ORDER_ROLLBACK, *v),
        Ok(Some(SafepointOrder::Switch(v))) => (ORDER_SWITCH, *v),
        Err(_) => (ORDER_ERROR, 0),
    }
}

const ORDER_NONE: u64 = 1;
const ORDER_CHECKPOINT: u64 = 2;
const ORDER_CONTINUE: u64 = 4;
const ORDER_ROLLBACK: u64 = 8;
const ORDER_ERROR: u64 = 16;
const ORDER_SWITCH: u64 = 32;

/// The order every rank carries out, from the job-wide or of the kinds (`kinds`), of the
/// versions (`ors`) and of their complements (`nots`), and this rank's own order.
///
/// One order for all: that order. `Continue` on some ranks and one versioned order
/// (`Checkpoint(v)` or `Rollback(v)`) on the others: the versioned order, on every rank. A
/// node answers `Continue` to a rank that asked while no barrier was open there (krund
/// waits a grace period for one first); when the other ranks' nodes were ordered
/// `v`, the policy's barrier did happen and every node, that one too, was told `v` (the
/// release goes to every node): the rank asked its node just outside the barrier (its
/// question overtook the barrier or came after the release) and the policy waits for its
/// part of `v` like the others'. Any other mix (no policy on some node, an error, two
/// versions, checkpoint and rollback) fails the safepoint on every rank.
pub(crate) fn agree(
    kinds: u64,
    ors: u64,
    nots: u64,
    mine: Option<SafepointOrder>,
) -> Result<Option<SafepointOrder>> {
    let differ = || {
        RankError::Checkpoint(format!(
            "the ranks' nodes gave different orders at this safepoint (here: {mine:?})"
        ))
    };
    if ors & nots != 0 {
        return Err(differ());
    }
    match kinds {
        k if k.count_ones() == 1 => Ok(mine),
        k if k == ORDER_CONTINUE | ORDER_CHECKPOINT => Ok(Some(SafepointOrder::Checkpoint(ors))),
        k if k == ORDER_CONTINUE | ORDER_ROLLBACK => Ok(Some(SafepointOrder::Rollback(ors))),
        k if k == ORDER_CONTINUE | ORDER_SWITCH => Ok(Some(SafepointOrder::Switch(ors))),
        _ => Err(differ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Or-s the ranks' answers as `ask_node` does collectively, then resolves each rank's.
    fn resolve(answers: &[Option<SafepointOrder>]) -> Vec<Result<Option<SafepointOrder>>> {
        let (mut kinds, mut ors, mut nots) = (0, 0, 0);
        for a in answers {
            let (bit, v) = order_bits(&Ok(*a));
            kinds |= bit;
            ors |= v;
            if matches!(
                a,
                Some(
                    SafepointOrder::Checkpoint(_)
                        | SafepointOrder::Rollback(_)
                        | SafepointOrder::Switch(_)
                )
            ) {
                nots |= !v;
            }
        }
        answers
            .iter()
            .map(|a| agree(kinds, ors, nots, *a))
            .collect()
    }

    fn all_ok(r: Vec<Result<Option<SafepointOrder>>>) -> Vec<Option<SafepointOrder>> {
        r.into_iter().map(|x| x.unwrap()).collect()
    }

    #[test]
    fn one_order_for_all_is_that_order() {
        use SafepointOrder::*;
        for o in [Some(Checkpoint(7)), Some(Continue), Some(Rollback(3)), None] {
            assert_eq!(all_ok(resolve(&[o, o, o])), vec![o, o, o]);
        }
    }

    /// The drain race seen in CI: rank 2 asked its node just outside the policy's barrier
    /// and was told `Continue`, the others `Checkpoint(5)`: every rank takes version 5 (its
    /// node was told 5 as well and the policy waits for rank 2's image).
    #[test]
    fn a_rank_told_continue_beside_a_versioned_order_follows_the_versioned_order() {
        use SafepointOrder::*;
        let got = all_ok(resolve(&[
            Some(Checkpoint(5)),
            Some(Checkpoint(5)),
            Some(Continue),
        ]));
        assert_eq!(got, vec![Some(Checkpoint(5)); 3]);
        let got = all_ok(resolve(&[
            Some(Continue),
            Some(Rollback(4)),
            Some(Rollback(4)),
        ]));
        assert_eq!(got, vec![Some(Rollback(4)); 3]);
    }

    /// The swap to the uncoordinated mode: a rank told `Continue` beside `Switch(5)` switches
    /// with the others; a switch beside a plain checkpoint fails everywhere.
    #[test]
    fn a_rank_told_continue_beside_a_switch_switches_too() {
        use SafepointOrder::*;
        let got = all_ok(resolve(&[Some(Switch(5)), Some(Continue), Some(Switch(5))]));
        assert_eq!(got, vec![Some(Switch(5)); 3]);
        for r in resolve(&[Some(Switch(5)), Some(Checkpoint(5))]) {
            assert!(r.unwrap_err().to_string().contains("different orders"));
        }
    }

    #[test]
    fn any_other_mix_fails_on_every_rank() {
        use SafepointOrder::*;
        let mixes: [&[Option<SafepointOrder>]; 5] = [
            &[Some(Checkpoint(5)), Some(Checkpoint(6))],
            &[Some(Checkpoint(5)), Some(Rollback(5))],
            &[Some(Checkpoint(5)), None],
            &[Some(Continue), None],
            &[Some(Continue), Some(Checkpoint(5)), Some(Checkpoint(4))],
        ];
        for mix in mixes {
            for r in resolve(mix) {
                let err = r.unwrap_err().to_string();
                assert!(err.contains("different orders"), "{mix:?}: {err}");
            }
        }
        // An error on one rank (its node refused) is a kind of its own.
        let (bit, _) = order_bits(&Err(RankError::Checkpoint("refused".into())));
        let (ok, v) = order_bits(&Ok(Some(Checkpoint(5))));
        assert!(agree(bit | ok, v, !v, Some(Checkpoint(5))).is_err());
    }
}
