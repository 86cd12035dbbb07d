//! MPI jobs and recovery: how a job whose ranks wire up through PMIx or PMI-1 survives a
//! lost node (the coordinated policy's restart onto a spare, `runtime/recovery.rs`).
//!
//! # The contract
//! MPI state (communicators, transports' connections, the PMI key-value space) cannot be
//! rolled back inside a live process, nor can one rank rejoin an MPI job that the others
//! keep running. So a recovery of an MPI job **restarts every rank as a new process**
//! (restart-as-new, from the recovery line), and the job starts a new **MPI incarnation**:
//!
//! - *Which ranks.* The coordinated policy already plans every rank in a recovery: the lost
//!   ones restart on a spare, the survivors "roll back". On a node whose MPI servers saw a
//!   rank initialise (PMI-1 `init` or a PMIx client connection: [`restarts_as_new`]), each
//!   rollback is carried out as a restart as a new process on the same node from the same
//!   checkpoint (its own L1 images, `KRUN_GHOST_RESTORE`): the old process is killed
//!   (`RankCommand::Adopt`), never re-executed in place. krun reports it as the rollback
//!   the policy asked for; nothing changes in the policy, and jobs that do not use MPI keep
//!   their rollback in place. Nothing needs configuring: an MPI job is detected by its use
//!   of the node's MPI servers (`--mpi none` turns them off, and with them this behaviour).
//! - *A new incarnation.* When a `Restart` order names every rank of the job (a new wiring
//!   epoch `w`), each node's MPI servers switch to incarnation `w` before any rank starts
//!   again ([`reincarnate`], called on the node link's reader thread so that it is ordered
//!   with krun's fence answers): PMIx registers a new namespace `krun.<job>.w<w>` with the
//!   new placement (the spare's node map, process map, local peers and local ranks), PMI-1
//!   a new KVS `kvs_krun_<job>_w<w>` with the new `PMI_process_mapping`; fences count from
//!   1 again. A spare's krund serves both wires from its start (with no rank of its own),
//!   so the ranks restarted there get `PMIX_*`/`PMI_FD` like any other. The older
//!   incarnation's clients get no answer any more (their processes are being killed).
//! - *krun's side.* The hub's [`super::mpi::Coordinator`] starts the same incarnation when
//!   the `Restart` order goes out (fences forgotten, no rank gone, the job not ending);
//!   every node tags its MPI reports with its incarnation
//!   ([`super::mpi::PmiToLauncher::Wired`]) and krun drops those of an older one: a
//!   survivor's MPI_Abort because its peer died, or its fence, is not the new job's.
//! - *Aborts while a recovery may come.* In a job that recovers (`--spares`,
//!   `--checkpoint-interval`), ranks that lose a peer typically abort (MPI's errors are
//!   fatal) before the membership has agreed on the failure. krun holds a job-ending MPI
//!   event (an abort, a rank lost without finalize, a fence that cannot complete) for the
//!   same grace as the nodes hold a failed rank's exit (the failure timeout + 20 s): if a
//!   new incarnation starts meanwhile the event is dropped, else it ends the job as before.
//!   An MPI_Abort in such a job therefore ends it after that grace, not at once.
//! - *The program.* It keeps its state in memory registered with the rank library
//!   (`krun_alloc` + `krun_register`) and lets the policy checkpoint at a consistent point:
//!   after an `MPI_Barrier` (no message in flight), a `krun_safepoint()`
//!   (`rank/examples/mpi/heat_mpi.c`). On restart, `krun_register` restores its state and
//!   `MPI_Init` wires the new incarnation. A checkpoint the program takes itself with
//!   `krun_checkpoint()` is not a commit of the coordinated policy (the policy numbers its
//!   own versions), so it is no recovery line.
//!
//! # Drains
//! `krun node drain N` of an MPI job follows the same contract: the policy takes a
//! coordinated checkpoint, then restarts every rank from it in a new incarnation, the
//! drained node's ranks placed on a spare or the remaining nodes; ranks are never moved
//! one by one into the same incarnation. A job that cannot do this (no checkpoint policy,
//! or ranks that do not use the rank library) has its drain refused with the reason
//! (`runtime/drain.rs`, "MPI jobs").
//!
//! # Limits
//! A retried restart of some ranks (not all) joins the current incarnation; an MPI job
//! recovers only through whole-job restarts.
use std::sync::atomic::Ordering;

use adaptation::NodeId;

use super::membership::Shared;

/// Every rank of the job restarts in wiring epoch `wiring` (`ranks`: (rank, node) of the
/// `Restart` order): the node's MPI servers serve that incarnation from now on. Orders
/// that restart only some ranks, or an epoch not newer than the current one, change
/// nothing.
pub fn reincarnate(shared: &Shared, wiring: u64, ranks: &[(u32, NodeId)]) {
    let size = shared.job_ranks.load(Ordering::SeqCst) as usize;
    let Some(placement) = placement(size, ranks) else {
        return;
    };
    if wiring <= shared.mpi_wiring.load(Ordering::SeqCst) {
        return;
    }
    let servers = shared.pmi.lock().expect("pmi lock").clone();
    for server in &servers {
        if let Err(e) = server.reincarnate(wiring, &placement) {
            eprintln!(
                "krund: node {}: the MPI incarnation of wiring epoch {wiring}: {e}",
                shared.me
            );
        }
    }
    shared.mpi_wiring.store(wiring, Ordering::SeqCst);
}

/// Rank -> node when `ranks` names every rank of a job of `size` exactly once.
pub fn placement(size: usize, ranks: &[(u32, NodeId)]) -> Option<Vec<NodeId>> {
    if size == 0 || ranks.len() != size {
        return None;
    }
    let mut placement = vec![None; size];
    for &(rank, node) in ranks {
        let slot = placement.get_mut(rank as usize)?;
        if slot.replace(node).is_some() {
            return None;
        }
    }
    placement.into_iter().collect()
}

/// True when this node's ranks use MPI (some rank ever initialised through one of its MPI
/// servers): a recovery restarts them as new processes instead of rolling them back in
/// place.
pub fn restarts_as_new(shared: &Shared) -> bool {
    shared
        .pmi
        .lock()
        .expect("pmi lock")
        .iter()
        .any(|s| s.used())
}

/// Whether `rank`'s live process `pid` may roll back in place: not on a node that runs an
/// MPI job ([`restarts_as_new`]; said on stderr).
pub fn may_roll_back_in_place(shared: &Shared, rank: u32, pid: u32) -> bool {
    if !restarts_as_new(shared) {
        return true;
    }
    eprintln!(
        "krund: node {}: rank {rank} (pid {pid}) is an MPI rank: restarted as a new process \
         instead of rolling back in place",
        shared.me
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placement_needs_every_rank_once() {
        assert_eq!(
            placement(4, &[(2, 3), (0, 0), (1, 0), (3, 3)]),
            Some(vec![0, 0, 3, 3])
        );
        // Some ranks only (a retried restart): no new incarnation.
        assert_eq!(placement(4, &[(2, 3), (3, 3)]), None);
        // A rank twice, or one out of range.
        assert_eq!(placement(2, &[(0, 0), (0, 1)]), None);
        assert_eq!(placement(2, &[(0, 0), (2, 1)]), None);
        assert_eq!(placement(0, &[]), None);
    }
}
