//! `krun node drain N` for a job run by the checkpoint policy: the node's ranks (rank-library
//! ranks included) move to another node through the recovery path, then the node leaves.
//!
//! # How a drain runs
//! 1. krun's hub ([`through_policy`]) hands the request to the policy thread
//!    (`Input::Drain` in `runtime/checkpoints.rs`), which feeds the coordinated policy
//!    `Event::DrainRequested` (`policies/src/coordinated/drain.rs`). The policy refuses with
//!    a reason (a recovery or another drain in progress, the last node, ...) or records
//!    `DrainStarted` and takes a coordinated checkpoint.
//! 2. Once that checkpoint commits, the policy plans the move as a recovery towards it in
//!    which the drained node counts as lost: its ranks restart on a spare (an added node is
//!    one) or the least-loaded other node, every other rank rolls back to the same
//!    checkpoint. The hub carries it out as any recovery: a new wiring epoch and one
//!    `Restart{wiring, bootstrap, version, ranks}` order (`runtime/recovery.rs`); the target
//!    fetches the ranks' image chains from the store.
//! 3. The drained node, seeing in that order that ranks it runs are placed elsewhere, ends
//!    them at once ([`release_moved`]: the old process must not talk in the new epoch) and
//!    marks itself drained; its rank runner then ends and the node waits for its leave.
//! 4. When every rank is back the policy records `Drained` and tells the user ("node 1
//!    drained: ranks 2-3 moved to spare node 3 from checkpoint 7 ..."); the hub then asks the
//!    membership to let the node leave (`runtime/hub.rs`).
//!
//! Jobs without a policy (no program run by krun's ranks) keep the older native move
//! (`runtime/migrate.rs`).
//!
//! # MPI jobs
//! MPI cannot follow a rank moved into another process of the same incarnation (its
//! peers' connections and the PMI key-value space name the old process), so the drain of
//! a job whose ranks use MPI (its nodes' PMI-1/PMIx servers saw a rank initialise, or krun
//! saw a fence: `--mpi pmix|pmi1|both`) never takes the native move: it always goes
//! through the policy as above, and that recovery restarts **every** rank as a new process
//! from the drain's checkpoint in a new wiring epoch, which is a new MPI incarnation
//! (`runtime/mpi_recovery.rs`: a new PMIx namespace / PMI-1 KVS with the new placement,
//! the drained node's ranks on a spare or the remaining nodes). The program checkpoints as
//! for a recovery (`krun_register` + `krun_safepoint` after an `MPI_Barrier`,
//! `rank/examples/mpi/heat_mpi.c`). When that cannot be done the drain is refused before
//! anything moves ([`mpi_refusal`]): the job has no checkpoint policy, or the drained
//! node's ranks do not use the rank library (a plain MPI program: no coordinated
//! checkpoint of it can be taken).
//!
//! # Under the uncoordinated policy
//! With message logging the policy drains without a barrier
//! (`policies/src/uncoordinated/drain.rs`): each rank of the node takes a fresh own
//! checkpoint, then restarts alone on a spare from it and rejoins the running ranks (the
//! hub's `Rejoin`, `checkpoints/uncoordinated.rs`); the drained node ends the old process
//! when it sees that order ([`release_moved`]). Without logging it refuses with the reason.
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Sender};
use std::time::Duration;

use adaptation::NodeId;
use fabric::secret::ClusterSecret;
use policies::report::{Notice, NoticeKind};

use super::checkpoints::Input;
use super::control::{self, ControlReply, ControlRequest, ControlTarget, IMAGE_CHUNK};
use super::membership::Shared;
use super::CheckpointAgent;
use crate::ranks::RankCommand;

/// How long krun waits for the policy to carry a drain out (checkpoint, then the move),
/// below `krun node drain`'s own 120 s.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(100);

/// A drain carried out: the user's line and the ranks moved.
#[derive(Debug, Clone)]
pub struct Drained {
    pub line: String,
    pub moved: Vec<u64>,
}

/// The policy's answer to a drain: done, or why nothing moved.
pub type DrainAnswer = Result<Drained, String>;

/// Who waits for the drain in progress, on the policy thread.
#[derive(Default)]
pub struct DrainWaiter {
    waiting: Option<(NodeId, Sender<DrainAnswer>)>,
    over: bool,
}

impl DrainWaiter {
    /// Takes a request; false (answered already) when it cannot go to the policy.
    pub fn request(&mut self, node: NodeId, reply: Sender<DrainAnswer>, stopped: bool) -> bool {
        if stopped || self.over {
            let _ = reply.send(Err(
                "the job's checkpoint policy has stopped (the job is ending, or lost ranks it \
                 cannot recover): nothing can be moved"
                    .into(),
            ));
            return false;
        }
        if let Some((n, _)) = &self.waiting {
            let _ = reply.send(Err(format!(
                "node {n} is being drained; drain again once that is over"
            )));
            return false;
        }
        self.waiting = Some((node, reply));
        true
    }

    /// The node being drained, if a drain is in progress.
    pub fn draining(&self) -> Option<NodeId> {
        self.waiting.as_ref().map(|w| w.0)
    }

    /// The policy told the user something: the drain's end answers the request.
    pub fn notice(&mut self, notice: &Notice) {
        let answer = match &notice.kind {
            NoticeKind::Drained { node, moved, .. } => (
                *node,
                Ok(Drained {
                    line: notice.to_string(),
                    moved: moved
                        .iter()
                        .flat_map(|g| g.ranks.iter().map(|&r| u64::from(r)))
                        .collect(),
                }),
            ),
            NoticeKind::DrainRefused { node, reason } => (*node, Err(reason.clone())),
            _ => return,
        };
        if self.waiting.as_ref().is_some_and(|(n, _)| *n == answer.0) {
            if let Some((_, reply)) = self.waiting.take() {
                let _ = reply.send(answer.1);
            }
        }
    }

    /// The job is over: a drain waiting is answered, later ones are refused.
    pub fn job_over(&mut self) {
        self.over = true;
        if let Some((node, reply)) = self.waiting.take() {
            let _ = reply.send(Err(format!(
                "the job ended before node {node}'s ranks were moved"
            )));
        }
    }
}

/// Why the drain of `node` in a job whose ranks use MPI cannot be carried out, if it cannot:
/// `policy`: the job runs a checkpoint policy; `running`: the ranks running on `node`;
/// `linked`: those of them that said hello through the rank library.
pub fn mpi_refusal(node: NodeId, policy: bool, running: &[u64], linked: &[u64]) -> Option<String> {
    if running.is_empty() {
        return None;
    }
    let ranks =
        policies::primitives::ranks_phrase(&running.iter().map(|&r| r as u32).collect::<Vec<_>>());
    let why = "MPI cannot follow a rank moved into another process of the same job, so the \
               drain of an MPI job restarts every rank from a coordinated checkpoint in a new \
               MPI incarnation";
    if !policy {
        return Some(format!(
            "node {node} runs MPI {ranks}: {why}, and this job runs no checkpoint policy to \
             take one; nothing was moved"
        ));
    }
    let unlinked: Vec<u32> = running
        .iter()
        .filter(|r| !linked.contains(r))
        .map(|&r| r as u32)
        .collect();
    if !unlinked.is_empty() {
        return Some(format!(
            "node {node} runs MPI {} that do(es) not use krun's rank library (krun_register and \
             krun_safepoint, as rank/examples/mpi/heat_mpi.c): {why}, and no coordinated \
             checkpoint of them can be taken; nothing was moved",
            policies::primitives::ranks_phrase(&unlinked)
        ));
    }
    None
}

/// Asks the policy to move `node`'s ranks away and waits (at most [`DRAIN_TIMEOUT`]).
pub fn through_policy(
    policy: &Sender<Option<Input>>,
    node: NodeId,
    epoch: u64,
    members: Vec<NodeId>,
) -> Result<Drained, String> {
    let (reply, rx) = mpsc::channel();
    policy
        .send(Some(Input::Drain {
            node,
            epoch,
            members,
            reply,
        }))
        .map_err(|_| "the job's checkpoint policy has ended".to_string())?;
    rx.recv_timeout(DRAIN_TIMEOUT).map_err(|e| match e {
        mpsc::RecvTimeoutError::Timeout => format!(
            "the drain of node {node} did not finish within {DRAIN_TIMEOUT:?} (see krun's \
             output for the checkpoint or restart that is stuck)"
        ),
        mpsc::RecvTimeoutError::Disconnected => "the job's checkpoint policy has ended".into(),
    })?
}

/// On a `Restart` order: ranks this node runs that the order places on another node have
/// moved away (a drain). Ends their processes now, before the new epoch's ranks start, and
/// marks the node drained (it leaves once its rank runner is done). Returns the ranks ended.
pub fn release_moved(shared: &Shared, ranks: &[(u32, NodeId)]) -> Vec<u32> {
    let me = shared.me;
    let moved: Vec<u32> = {
        let local = shared.local_ranks.lock().expect("ranks lock");
        ranks
            .iter()
            .filter(|(r, n)| *n != me && local.contains_key(&u64::from(*r)))
            .map(|(r, _)| *r)
            .collect()
    };
    if moved.is_empty() {
        return moved;
    }
    let runner = shared.rank_commands.lock().expect("commands lock").clone();
    shared.drained.store(true, Ordering::SeqCst);
    for &rank in &moved {
        let pid = runner.as_ref().and_then(|tx| {
            let (reply, rx) = mpsc::channel();
            tx.send(RankCommand::Release {
                rank: rank as usize,
                reply,
            })
            .ok()?;
            rx.recv_timeout(Duration::from_secs(10)).ok()?.ok()
        });
        if let Some(pid) = pid {
            // SAFETY: kill(2) of a rank this node started (its process group first, see
            // `ranks::spawn_rank`); the runner reaps it as a released rank.
            unsafe {
                if libc::kill(-(pid as i32), libc::SIGKILL) != 0 {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        } else {
            eprintln!("krund: node {me}: rank {rank} moved away, but its runner did not let it go");
        }
        shared
            .local_ranks
            .lock()
            .expect("ranks lock")
            .remove(&u64::from(rank));
        shared
            .linked_ranks
            .lock()
            .expect("linked lock")
            .remove(&u64::from(rank));
    }
    moved
}

/// Members whose stores a node without one reads images from (`krund --join
/// --store-peers`): (node, control TCP address).
static STORE_PEERS: std::sync::OnceLock<Vec<(NodeId, String)>> = std::sync::OnceLock::new();

/// A node added to a running job has no checkpoint store: it reads the images of ranks
/// moved to it through these members' control sockets.
pub fn set_store_peers(peers: Vec<(NodeId, String)>) {
    let _ = STORE_PEERS.set(peers);
}

/// Serves [`ControlRequest::ReadImage`]: a chunk of an image from this node's store.
pub fn serve_image_read(
    agent: Option<&dyn CheckpointAgent>,
    me: NodeId,
    rank: u32,
    version: u64,
    offset: u64,
) -> ControlReply {
    let Some(agent) = agent else {
        return ControlReply::Refused(format!("node {me} has no checkpoint store"));
    };
    match agent.read_image(rank, version) {
        Ok(image) => {
            let from = (offset.min(image.len() as u64)) as usize;
            let to = (from + IMAGE_CHUNK).min(image.len());
            ControlReply::Image {
                total: image.len() as u64,
                bytes: image[from..to].to_vec(),
            }
        }
        Err(e) => ControlReply::Refused(e.to_string()),
    }
}

/// Reads one image from `peer`'s store, chunk by chunk.
fn read_remote(
    peer: &str,
    secret: &ClusterSecret,
    rank: u32,
    version: u64,
) -> Result<Vec<u8>, String> {
    let mut image = Vec::new();
    loop {
        let req = ControlRequest::ReadImage {
            rank,
            version,
            offset: image.len() as u64,
        };
        match control::call::<_, ControlReply>(
            &ControlTarget::Tcp(peer.to_string()),
            secret,
            &req,
            Duration::from_secs(30),
        ) {
            Ok(ControlReply::Image { total, bytes }) => {
                if bytes.is_empty() || image.len() as u64 + bytes.len() as u64 > total {
                    return Err(format!(
                        "{peer} sent {} bytes at offset {} of a {total}-byte image",
                        bytes.len(),
                        image.len()
                    ));
                }
                image.extend_from_slice(&bytes);
                if image.len() as u64 == total {
                    return Ok(image);
                }
            }
            Ok(ControlReply::Refused(why)) => return Err(why),
            Ok(other) => return Err(format!("{peer}: unexpected answer {other:?}")),
            Err(e) => return Err(format!("{peer}: {e}")),
        }
    }
}

/// For a node without a store: writes `version` of `rank` and the images it builds on, read
/// from a member's store, as ghost checkpoint files of `owner` under `dir`; returns the
/// bytes written.
pub fn fetch_chain_remote(
    me: NodeId,
    rank: u32,
    version: u64,
    dir: &Path,
    owner: &str,
) -> Result<u64, String> {
    let peers = STORE_PEERS
        .get()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("node {me} has no checkpoint store and knows none to read from"))?;
    let secret = ClusterSecret::from_env()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no cluster secret to reach the members' stores".to_string())?;
    let mut total = 0;
    let mut next = version;
    for _ in 0..100_000 {
        let mut why = Vec::new();
        let image = peers.iter().find_map(|(node, addr)| {
            read_remote(addr, &secret, rank, next)
                .map_err(|e| why.push(format!("node {node}: {e}")))
                .ok()
        });
        let image = image.ok_or_else(|| {
            format!(
                "no member's store gave rank {rank}'s image v{next}: {}",
                why.join("; ")
            )
        })?;
        let parsed = ghost::image::Image::parse(&image)
            .map_err(|e| format!("rank {rank}'s image v{next} is not a ghost image: {e}"))?;
        if parsed.image_id != next {
            return Err(format!(
                "asked for rank {rank}'s image v{next}, got v{}",
                parsed.image_id
            ));
        }
        let path = ghost::native::image_path(dir, owner, next);
        ghost::native::write_atomically(&path, &image)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        total += image.len() as u64;
        match parsed.parent_id {
            0 => return Ok(total),
            p if p < next => next = p,
            p => {
                return Err(format!(
                    "image v{next} names parent v{p}: not an older image"
                ))
            }
        }
    }
    Err(format!("rank {rank}'s chain from v{version} does not end"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::report::RestartGroup;

    fn notice(kind: NoticeKind) -> Notice {
        Notice { at: 0, kind }
    }

    #[test]
    fn an_mpi_drain_is_refused_without_a_policy_or_with_ranks_the_policy_cannot_checkpoint() {
        let no_policy = mpi_refusal(3, false, &[6, 7], &[6, 7]).unwrap();
        assert!(
            no_policy.contains("node 3 runs MPI ranks 6-7")
                && no_policy.contains("runs no checkpoint policy")
                && no_policy.contains("nothing was moved"),
            "{no_policy}"
        );
        let plain = mpi_refusal(3, true, &[6, 7], &[6]).unwrap();
        assert!(
            plain.contains("MPI rank 7 that do(es) not use krun's rank library"),
            "{plain}"
        );
        assert_eq!(mpi_refusal(3, true, &[6, 7], &[7, 6]), None);
        // A node without ranks (a spare) leaves as ever.
        assert_eq!(mpi_refusal(3, false, &[], &[]), None);
    }

    #[test]
    fn the_waiter_answers_the_drain_it_waits_for_and_refuses_others() {
        let mut w = DrainWaiter::default();
        let (tx, rx) = mpsc::channel();
        assert!(w.request(1, tx, false));
        // A second request while one waits is answered at once.
        let (tx2, rx2) = mpsc::channel();
        assert!(!w.request(2, tx2, false));
        assert!(rx2
            .try_recv()
            .unwrap()
            .unwrap_err()
            .contains("node 1 is being drained"));
        // Another node's notice does not answer it.
        w.notice(&notice(NoticeKind::DrainRefused {
            node: 2,
            reason: "x".into(),
        }));
        assert!(rx.try_recv().is_err());
        w.notice(&notice(NoticeKind::Drained {
            node: 1,
            version: Some(4),
            moved: vec![RestartGroup {
                ranks: vec![2, 3],
                node: 3,
                spare: true,
                source: None,
            }],
            continuing: vec![0, 1],
            seconds: 1.5,
        }));
        let done = rx.try_recv().unwrap().unwrap();
        assert_eq!(done.moved, vec![2, 3]);
        assert!(
            done.line
                .starts_with("node 1 drained: ranks 2-3 moved to spare node 3 from checkpoint 4"),
            "{}",
            done.line
        );
        // Once the job is over, drains are refused with a reason.
        let (tx3, rx3) = mpsc::channel();
        assert!(w.request(1, tx3, false));
        w.job_over();
        assert!(rx3
            .try_recv()
            .unwrap()
            .unwrap_err()
            .contains("the job ended"));
        let (tx4, rx4) = mpsc::channel();
        assert!(!w.request(1, tx4, false));
        assert!(rx4.try_recv().unwrap().unwrap_err().contains("has stopped"));
    }
}
