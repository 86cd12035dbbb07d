//! What a node answers on its sockets: control requests (`krun status`, `node add|drain`,
//! fetches of checkpoint images, ghost moves; [`control_request`]) and its ranks' messages
//! on the rank socket (hello, safepoints, checkpoint reports, rejoins; [`rank_message`]).
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use super::control::{
    ControlReply, ControlRequest, NodeAddresses, NodeToLauncher, NodeToRank, RankToNode,
};
use super::membership::{self, TableClient};
use super::status::NodeStatus;
use super::table::TableOp;
use super::{drain, migrate, recovery, safepoint, uncoordinated, AgentSlot, CheckpointAgent};
use crate::error::Result;

pub(super) fn control_request(
    table: &TableClient,
    me: &NodeAddresses,
    agent: Option<&dyn CheckpointAgent>,
    req: ControlRequest,
) -> ControlReply {
    match req {
        ControlRequest::Status => match node_status(table, me, agent) {
            Ok(s) => ControlReply::Status(Box::new(s)),
            Err(e) => ControlReply::Refused(e.to_string()),
        },
        ControlRequest::Leave { node } => match table.handle.request_leave(node) {
            Ok(()) => ControlReply::Done(format!("node {node} asked to leave")),
            Err(e) => ControlReply::Refused(e.to_string()),
        },
        ControlRequest::MigrateOut { rank, dry_run } => {
            match migrate::out(table, me.node, rank, dry_run) {
                Ok(done) => ControlReply::Done(done),
                Err(e) => ControlReply::Refused(e),
            }
        }
        ControlRequest::AdoptFrom { rank, from } => {
            match migrate::adopt_from(table, me.node, rank, &from) {
                Ok(done) => ControlReply::Done(done),
                Err(e) => ControlReply::Refused(e),
            }
        }
        ControlRequest::ReadMoveFile {
            rank,
            pipes,
            offset,
        } => migrate::serve_move_file(rank, pipes, offset),
        ControlRequest::Adopt { rank } => match migrate::adopt(table, me.node, rank) {
            Ok(done) => ControlReply::Done(done),
            Err(e) => ControlReply::Refused(e),
        },
        ControlRequest::ReadImage {
            rank,
            version,
            offset,
        } => drain::serve_image_read(agent, me.node, rank, version, offset),
        ControlRequest::Fetch { rank, version } => match agent {
            Some(a) => match a.fetch(rank, version) {
                Ok(f) => ControlReply::Fetched(f),
                Err(e) => ControlReply::Refused(e.to_string()),
            },
            None => ControlReply::Refused(format!(
                "node {} has no checkpoint store to fetch rank {rank} v{version} from",
                me.node
            )),
        },
    }
}

/// This node's view and every rank's row.
fn node_status(
    table: &TableClient,
    me: &NodeAddresses,
    agent: Option<&dyn CheckpointAgent>,
) -> Result<NodeStatus> {
    let view = table.handle.view().map_err(membership::adapt_err)?;
    let n = table.shared.job_ranks.load(Ordering::SeqCst);
    let pending: Vec<(u64, Result<mpsc::Receiver<Vec<u8>>>)> = (0..n)
        .map(|r| (r, table.submit(r, &TableOp::Get)))
        .collect();
    let mut ranks = Vec::new();
    let mut unanswered = Vec::new();
    for (rank, rx) in pending {
        match rx
            .ok()
            .and_then(|rx| TableClient::wait(&rx, Duration::from_secs(5)))
            .and_then(|a| a.record)
        {
            Some(r) => ranks.push(r),
            None => unanswered.push(rank),
        }
    }
    let (store, newest_safe) = agent.map(|a| a.store_use()).unwrap_or_default();
    Ok(NodeStatus {
        node: me.node,
        pid: me.pid,
        host: me.host.clone(),
        epoch: view.epoch,
        stable: view.stable,
        members: view.members.clone(),
        cells: view.cells.clone(),
        supervisors: view.supervisors.clone(),
        changes: membership::changes(&view),
        ranks,
        unanswered,
        store,
        newest_safe,
        mpi: super::mpi_recovery::restarts_as_new(&table.shared),
        linked: table
            .shared
            .linked_ranks
            .lock()
            .expect("linked lock")
            .iter()
            .copied()
            .collect(),
    })
}

pub(super) fn rank_message(
    table: &TableClient,
    agent: &AgentSlot,
    safepoints: &safepoint::SafepointGate,
    msg: RankToNode,
) -> NodeToRank {
    match msg {
        // Held until the policy decides; below the rank's own limit (600 s).
        RankToNode::AtSafepoint { rank } => match table.shared.uncoordinated.at_safepoint(rank) {
            // The uncoordinated policy: this rank's own capture, no barrier.
            Some(answer) => answer,
            None => safepoints.hold(rank, Duration::from_secs(590)),
        },
        msg @ (RankToNode::LogCard { .. }
        | RankToNode::PeerReplaced { .. }
        | RankToNode::Rejoin { .. }
        | RankToNode::SafepointIndex { .. }
        | RankToNode::ChannelCounts { .. }) => uncoordinated::from_rank(&table.shared, msg),
        RankToNode::Hello { rank, pid } => {
            table
                .shared
                .linked_ranks
                .lock()
                .expect("linked lock")
                .insert(u64::from(rank));
            // This image of the rank runs in the newest wiring epoch krun ordered.
            let wiring = table.shared.wiring.load(Ordering::SeqCst);
            table
                .shared
                .rank_wiring
                .lock()
                .expect("rank wiring lock")
                .insert(rank, wiring);
            recovery::hello(table, rank, pid);
            // The policy learns that the job's wiring progresses (the uncoordinated policy
            // recovers differently before every rank is past its `krun_init`).
            table
                .shared
                .tell_launcher(&NodeToLauncher::RankReady { rank, wiring });
            NodeToRank::Ack
        }
        RankToNode::Watch { rank, pid } => recovery::watch(&table.shared, rank, pid),
        RankToNode::Exiting { .. } => NodeToRank::Ack,
        RankToNode::Checkpointed {
            rank,
            version,
            image,
            bytes,
        } => {
            // HOOK (checkpoint agent, runtime/agent.rs): the agent moves the image into the
            // store and says where it is safe; without one the version is recorded as known
            // but safe nowhere yet.
            // (Bounded below the rank's own wait for an answer, 10 s.) The reports carry the
            // wiring epoch the rank's image runs in (a rank that never said hello: the
            // node's newest).
            let wiring = table
                .shared
                .rank_wiring
                .lock()
                .expect("rank wiring lock")
                .get(&rank)
                .copied()
                .unwrap_or_else(|| table.shared.wiring.load(Ordering::SeqCst));
            let levels = match agent.wait(Duration::from_secs(8)) {
                Some(a) => {
                    match a.checkpointed_in(rank, version, Path::new(&image), bytes, wiring) {
                        Ok(l) => l,
                        Err(e) => return NodeToRank::Refused(e.to_string()),
                    }
                }
                None => Vec::new(),
            };
            match table.request(
                u64::from(rank),
                &TableOp::Checkpointed {
                    version,
                    levels: levels.clone(),
                },
                Duration::from_secs(10),
            ) {
                Ok(a) => match a.error {
                    None => {
                        if !levels.is_empty() {
                            table.shared.tell_launcher(&NodeToLauncher::Captured {
                                rank,
                                version,
                                bytes,
                                wiring,
                            });
                        }
                        NodeToRank::Ack
                    }
                    Some(e) => NodeToRank::Refused(e),
                },
                Err(e) => NodeToRank::Refused(e.to_string()),
            }
        }
    }
}
