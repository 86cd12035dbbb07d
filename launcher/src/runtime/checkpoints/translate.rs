//! The nodes' messages and the user's requests as the policy's events.

use super::*;

/// A node's message or a request as the policy's event.
pub(super) fn translate(calls: &mut HubCalls, copies: &mut Copies, input: Input) -> Option<Event> {
    match input {
        Input::Request(source) => Some(Event::CheckpointRequest { source }),
        // Handled by the swap logic before translation.
        Input::Policy { .. } => None,
        Input::Drain {
            node,
            epoch,
            members,
            reply,
        } => calls
            .drain
            .request(node, reply, calls.stopped)
            .then(|| Event::DrainRequested {
                node,
                view: AgreedView::new(epoch, members),
            }),
        Input::View {
            epoch,
            members,
            failed,
        } => {
            if epoch >= calls.view.epoch {
                calls.view = AgreedView::new(epoch, members.clone());
            }
            let lost: Vec<NodeId> = failed
                .iter()
                .copied()
                .filter(|n| calls.nodes.contains(n))
                .collect();
            if !lost.is_empty() && (calls.barrier.take().is_some() || calls.capturing.is_some()) {
                (calls.send)(&LauncherToNode::Release {
                    order: SafepointOrder::Abort(format!("node(s) {lost:?} failed")),
                });
            }
            if !calls.recover {
                if !lost.is_empty() && !calls.stopped {
                    calls.stopped = true;
                    eprintln!(
                        "krun: no more checkpoints: node(s) {lost:?} ran ranks, and the job \
                         recovers none (no --spares, no --checkpoint-interval)"
                    );
                }
                return None;
            }
            // The policy decides: roll the survivors back, restart the lost ranks on a spare
            // (carried out by `HubCalls::execute_plan`), or end the job naming what is lost.
            Some(Event::FailureAgreed {
                epoch,
                failed,
                view: AgreedView::new(epoch, members),
            })
        }
        Input::FromNode(node, msg) => match msg {
            NodeToLauncher::Register(_) => {
                calls.linked(node);
                None
            }
            NodeToLauncher::Opened { op } => {
                let (want, _) = calls.barrier.as_ref()?;
                if want.seq != op {
                    return None;
                }
                calls.opened.0.insert(node);
                if !calls.opened.1 && calls.opened.0.is_superset(&calls.nodes) {
                    // Every node holds ranks that ask now: wake them.
                    calls.opened.1 = true;
                    (calls.send)(&LauncherToNode::Wake { op });
                }
                None
            }
            NodeToLauncher::Held { op, .. } => {
                let (want, held) = calls.barrier.as_mut()?;
                if want.seq != op {
                    return None;
                }
                held.insert(node);
                (held.is_superset(&calls.nodes)).then_some(Event::Synchronized { op: *want })
            }
            NodeToLauncher::SyncFailed { op, reason } => {
                let (want, _) = calls.barrier.as_ref()?;
                (want.seq == op).then_some(Event::SyncFailed { op: *want, reason })
            }
            NodeToLauncher::Restarted {
                wiring,
                rank,
                pid,
                fetched,
                seconds,
                in_place,
                new_because,
            } => {
                let w = calls.wiring.as_ref().filter(|w| w.epoch == wiring)?;
                let (node, planned) = *w.ranks.get(&rank)?;
                if let Some(bar) = &calls.recovery_bar {
                    bar.inc(1);
                }
                if matches!(planned, Planned::Rollback(..)) && !in_place {
                    crate::progress::line(&rollback_line(rank, node, pid, new_because));
                }
                if fetched > 0 {
                    crate::progress::line(&format!(
                        "krun: rank {rank} runs on node {node} (pid {pid}); its image chain \
                         ({fetched} bytes) came from the checkpoint store in {seconds:.2} s"
                    ));
                }
                Some(match planned {
                    Planned::Restart(decision) => Event::RestartDone {
                        decision,
                        rank,
                        node,
                        seconds,
                    },
                    Planned::Rollback(op, version) => Event::RollbackDone {
                        op,
                        rank,
                        version,
                        seconds,
                    },
                })
            }
            NodeToLauncher::RestartFailed {
                wiring,
                rank,
                reason,
            } => {
                let w = calls.wiring.as_ref().filter(|w| w.epoch == wiring)?;
                let (_, planned) = *w.ranks.get(&rank)?;
                Some(match planned {
                    Planned::Restart(decision) => Event::RestartFailed {
                        decision,
                        rank,
                        reason,
                    },
                    Planned::Rollback(op, _) => Event::RollbackFailed { op, rank, reason },
                })
            }
            NodeToLauncher::Captured {
                rank,
                version,
                bytes,
                wiring,
            } => {
                // Only a capture of the checkpoint being taken counts. One of a checkpoint a
                // recovery dropped (newer than its line, reported late, e.g. after the store
                // timed out on the lost node) is stale: the ranks number on from the line
                // again, so it must neither move the numbering (the next order would name a
                // version the ranks' checkpointers do not take) nor count as a copy. It is
                // told apart by its wiring epoch, older than the recovery's, even when the
                // checkpoint being taken has the same native number.
                if stale(calls, wiring)
                    || calls
                        .capturing
                        .is_none_or(|(_, _, native, _)| native != version)
                {
                    return None;
                }
                let pv = *calls.versions.get(&version)?;
                calls.native_newest = calls.native_newest.max(version);
                copies.add(rank, pv, Level::L1, Some(node));
                copies.set_bytes(rank, pv, bytes);
                let (op, _, _, started) = calls.capturing.as_ref()?;
                Some(Event::CaptureDone {
                    op: *op,
                    rank,
                    version: pv,
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                })
            }
            NodeToLauncher::Safe {
                rank,
                version,
                level,
                node,
                wiring,
            } => {
                // A late report of a checkpoint a recovery undid names a native version
                // that may be taken again since, mapped to another checkpoint of the
                // policy's: it would be credited to that one. Its older epoch gives it away.
                if stale(calls, wiring) {
                    return None;
                }
                let pv = *calls.versions.get(&version)?;
                let level = level_of(level)?;
                copies.add(rank, pv, level, node);
                if let Some(bar) = calls.flush_bar.as_mut() {
                    bar.safe(rank, pv, level);
                }
                Some(Event::LevelSafe {
                    rank,
                    version: pv,
                    level,
                })
            }
            NodeToLauncher::NotSafe {
                rank,
                version,
                level,
                wiring,
                ..
            } if !stale(calls, wiring) => Some(Event::LevelLost {
                rank,
                version: *calls.versions.get(&version)?,
                level: level_of(level)?,
            }),
            // A rank past its `krun_init` in the newest wiring epoch (an older epoch's hello
            // is a process that recovery replaced).
            NodeToLauncher::RankReady { rank, wiring } => (wiring == calls.wirings
                && (rank as usize) < calls.placement.len())
            .then_some(Event::RankReady { rank }),
            NodeToLauncher::NotSafe { .. }
            | NodeToLauncher::View { .. }
            | NodeToLauncher::Bye
            | NodeToLauncher::RankKilled { .. }
            | NodeToLauncher::CheckpointAsked
            | NodeToLauncher::Finished { .. }
            | NodeToLauncher::Pmi(_)
            | NodeToLauncher::LogCard { .. }
            | NodeToLauncher::PeerReplaced { .. }
            | NodeToLauncher::Rejoining { .. }
            | NodeToLauncher::ChannelCounts { .. }
            | NodeToLauncher::SafepointIndex { .. } => None,
        },
    }
}

/// krun's line for a rank the policy rolled back that its node restarted as a new process,
/// with the node's reason (an MPI rank restarts with the whole job; another was gone or
/// did not take the order).
fn rollback_line(rank: u32, node: NodeId, pid: u32, why: Option<String>) -> String {
    let why = why.filter(|w| !w.is_empty()).unwrap_or_else(|| {
        "could not roll back inside its process (gone or not watching)".to_string()
    });
    format!("krun: rank {rank} {why}: restarted on node {node} as a new process (pid {pid})")
}

/// A node's report of a rank's image that ran in wiring epoch `wiring`, older than the
/// newest recovery's: its checkpoint was undone by that recovery.
fn stale(calls: &HubCalls, wiring: u64) -> bool {
    wiring < calls.wirings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rollback_line_says_what_the_node_said() {
        let mpi = rollback_line(
            2,
            1,
            77,
            Some(crate::runtime::recovery::NEW_WITH_MPI_JOB.to_string()),
        );
        assert_eq!(
            mpi,
            "krun: rank 2 restarted with the job (MPI: every rank restarts as a new process in \
             a new MPI incarnation): restarted on node 1 as a new process (pid 77)"
        );
        assert!(!mpi.contains("could not roll back"));
        // An older node says nothing: the line says what it can.
        assert!(rollback_line(2, 1, 77, None).contains("could not roll back inside its process"));
    }
}
