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
//!    [`LauncherToNode::Restart`]`{wiring, bootstrap, version, ranks}`.
//! 3. Each node starts the ranks placed on it as new processes with
//!    `KRUN_GHOST_RESTORE=version`, `KRUN_BOOTSTRAP=bootstrap` and
//!    `KRUN_WIRING_EPOCH=wiring`, replacing the process it runs for that rank, if any
//!    ([`crate::ranks::RankCommand::Adopt`]). A rank new to the node (from the failed node)
//!    first gets its image chain from the checkpoint store (the fastest valid copy: the
//!    buddy's L2 when the rank's node is gone), written as the ghost checkpointer's files
//!    ([`super::CheckpointAgent::write_chain`]); its old files, if this host has any, are
//!    removed first, so the restart uses the store's bytes only.
//! 4. The node answers `Restarted{wiring, rank, ..}` or `RestartFailed{wiring, rank, why}`
//!    per rank; the hub turns them into the policy's `RestartDone`/`RollbackDone` (or the
//!    failed ones), and the policy's recovery ends when every rank answered.
//!
//! # Fabric re-wiring
//! A restarted rank has a new fabric endpoint address, so every rank must learn every
//! rank's current address. The mechanism is the rank library's start-up all-gather, keyed
//! by the wiring epoch: every rank of the job starts again in the new epoch and swaps its
//! address card (endpoint address and the checkpoint versions it holds) through the new
//! bootstrap service, which answers once all ranks reported; ranks of an older epoch are
//! killed before the new epoch's processes start, so no rank talks to a stale address. A
//! rank that is late in the new all-gather (its restart was retried) joins the same epoch.
//!
//! # Limits (what this is not yet)
//! Survivors "roll back" by restarting in place from their own images of the recovery
//! line (their node's files, L1), not inside their live process: a survivor blocked in a
//! receive from a lost peer never reaches a safepoint where the rank library could roll it
//! back, and the library cannot yet re-wire a live endpoint. The policy's rollback
//! primitive is carried out that way and named so in krun's output.
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use adaptation::NodeId;

use super::control::NodeToLauncher;
use super::membership::Shared;
use super::AgentSlot;
use crate::ranks::RankCommand;

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
    for &(rank, node) in ranks.iter().filter(|(_, n)| *n == me) {
        let started = Instant::now();
        let msg = match restart_one(shared, agent, wiring, bootstrap, version, rank) {
            Ok((pid, fetched)) => NodeToLauncher::Restarted {
                wiring,
                rank,
                pid,
                fetched,
                seconds: started.elapsed().as_secs_f64(),
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
        shared.tell_launcher(&msg);
    }
}

fn restart_one(
    shared: &Shared,
    agent: &AgentSlot,
    wiring: u64,
    bootstrap: &str,
    version: Option<u64>,
    rank: u32,
) -> Result<(u32, u64), String> {
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
    if let Some(v) = version {
        env.push(("KRUN_GHOST_RESTORE".to_string(), v.to_string()));
        if !here {
            // The rank comes from another node: its images come from the store.
            let (dir, owner) = rank_images(rank);
            let _ = std::fs::remove_dir_all(dir.join(&owner));
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
    }
    // The new process is not linked until it says hello: a barrier must not wake it with
    // SIGUSR1 before its library installed the handler (the signal would kill it).
    shared
        .linked_ranks
        .lock()
        .expect("linked lock")
        .remove(&u64::from(rank));
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
