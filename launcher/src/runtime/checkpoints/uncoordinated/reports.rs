//! The nodes' messages under the uncoordinated policy as the policy's events: captures,
//! safety reports, channel counts (without logging), log cards and rejoins (with logging),
//! a switch back's safepoint indices.
use super::*;

/// The nodes' messages for this policy as its events; `Err` gives back what the common
/// translation handles (views, requests, ...).
pub(in crate::runtime::checkpoints) fn translate(
    calls: &mut HubCalls,
    copies: &mut Copies,
    input: Input,
) -> Result<Option<Event>, Input> {
    if calls.uncoord.is_none() {
        // The cards the ranks send at a switch to this policy come before it is in force.
        if let Input::FromNode(
            _,
            NodeToLauncher::LogCard {
                rank,
                address,
                ring,
            },
        ) = input
        {
            calls.early_cards.insert(rank, (address, ring));
            return Ok(None);
        }
        return Err(input);
    }
    let (node, msg) = match input {
        Input::FromNode(node, msg) => (node, msg),
        other => return Err(other),
    };
    let send = calls.send.clone();
    let placement = calls.placement.clone();
    // A node being drained is about to leave: it holds no copy of the new placement.
    let leaving = calls.drain.draining();
    let members: Vec<NodeId> = calls
        .view
        .nodes
        .iter()
        .copied()
        .filter(|&n| Some(n) != leaving)
        .collect();
    let epoch = calls.wirings;
    let u = calls.uncoord.as_mut().expect("checked above");
    if (!u.logging || u.rewire)
        && matches!(
            msg,
            NodeToLauncher::Restarted { .. } | NodeToLauncher::RestartFailed { .. }
        )
    {
        // The line's wiring epoch (with logging: a re-wiring), as the coordinated
        // recovery's (`translate.rs`).
        return Err(Input::FromNode(node, msg));
    }
    Ok(match msg {
        NodeToLauncher::ChannelCounts {
            rank,
            version,
            sent,
            delivered,
        } => {
            let n = placement.len();
            let Some(&pv) = u.versions.get(&(rank, version)) else {
                return Ok(None);
            };
            if u.logging || sent.len() != n || delivered.len() != n {
                return Ok(None);
            }
            let (bs, bd) = &u.base[rank as usize];
            let sent: Vec<u64> = sent.iter().zip(bs).map(|(a, b)| a + b).collect();
            let delivered: Vec<u64> = delivered.iter().zip(bd).map(|(a, b)| a + b).collect();
            u.counts
                .insert((rank, pv), (sent.clone(), delivered.clone()));
            Some(Event::Logged {
                events: vec![policies::primitives::LoggedEvent::Channels {
                    rank,
                    version: pv,
                    sent,
                    delivered,
                }],
            })
        }
        NodeToLauncher::Captured {
            rank,
            version,
            bytes,
            ..
        } => {
            // Without logging a capture the recovery line undid (its process was rolled
            // back meanwhile) is not counted: the restored checkpointer numbers on from the
            // version restored.
            if !u.logging && !u.versions.contains_key(&(rank, version)) {
                return Ok(None);
            }
            let slot = u.native.get_mut(rank as usize);
            if let Some(n) = slot {
                *n = (*n).max(version);
            }
            let Some(&pv) = u.versions.get(&(rank, version)) else {
                return Ok(None);
            };
            copies.add(rank, pv, Level::L1, Some(node));
            copies.set_bytes(rank, pv, bytes);
            match u.capturing.remove(&rank) {
                Some((op, want, _, started)) if want == pv => Some(Event::CaptureDone {
                    op,
                    rank,
                    version: pv,
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                }),
                Some(other) => {
                    u.capturing.insert(rank, other);
                    None
                }
                None => None,
            }
        }
        NodeToLauncher::Safe {
            rank,
            version,
            level,
            node,
            ..
        } => {
            let (Some(&pv), Some(level)) = (u.versions.get(&(rank, version)), level_of(level))
            else {
                return Ok(None);
            };
            copies.add(rank, pv, level, node);
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
            error,
            ..
        } => match (u.versions.get(&(rank, version)), level_of(level)) {
            (Some(&pv), Some(level)) => {
                crate::progress::line(&format!(
                    "krun: rank {rank}: its own checkpoint {pv} (checkpointer v{version}) is not \
                     safe at {level}: {error}"
                ));
                Some(Event::LevelLost {
                    rank,
                    version: pv,
                    level,
                })
            }
            _ => None,
        },
        NodeToLauncher::LogCard {
            rank,
            address,
            ring,
        } => {
            if let Some(c) = u.cards.get_mut(rank as usize) {
                *c = Some((address, ring));
            }
            None
        }
        NodeToLauncher::Rejoining {
            rank,
            address,
            ring,
        } => {
            if let Some(c) = u.cards.get_mut(rank as usize) {
                *c = Some((address.clone(), ring.clone()));
            }
            if !u.rejoining.contains_key(&rank) {
                eprintln!("krun: rank {rank} asks to rejoin, but no restart of it is under way");
                return Ok(None);
            }
            u.rejoining.insert(rank, Some((address, ring)));
            // Once every rank restarting for this failure has its new address, the running
            // ranks learn them all, then the restarted ones get every card together (they
            // join at the same time: each waits for the others' answers).
            if u.rejoining.values().all(Option::is_some) {
                let moved: Vec<(Rank, Card)> = u
                    .rejoining
                    .iter()
                    .map(|(&r, c)| (r, c.clone().expect("checked above")))
                    .collect();
                for (r, _) in &moved {
                    for s in (0..placement.len() as Rank).filter(|s| !u.rejoining.contains_key(s)) {
                        u.replacing.insert((s, *r));
                    }
                }
                for (r, (address, ring)) in moved {
                    send(&LauncherToNode::PeerMoved {
                        rank: r,
                        address,
                        ring,
                    });
                }
                rejoined_if_done(u, &send);
            }
            None
        }
        NodeToLauncher::SafepointIndex { rank, index, next } => {
            if let Some(m) = u.realign.as_mut() {
                m.insert(rank, (index, next));
            }
            None
        }
        NodeToLauncher::PeerReplaced { rank, moved } => {
            if u.replacing.remove(&(rank, moved)) {
                rejoined_if_done(u, &send);
            }
            None
        }
        NodeToLauncher::Restarted {
            wiring,
            rank,
            pid,
            fetched,
            seconds,
            ..
        } => {
            let Some(&(r, n, decision)) = u.restarts.get(&wiring) else {
                return Ok(None);
            };
            if r != rank {
                return Ok(None);
            }
            u.restarts.remove(&wiring);
            if u.restarts.is_empty() {
                // Every lone restart of this failure runs: the stores re-form buddies and
                // parity sets among the nodes left, as after a coordinated recovery.
                send(&LauncherToNode::Reform {
                    wiring: epoch,
                    members,
                    ranks: placement
                        .iter()
                        .enumerate()
                        .map(|(r, &n)| (r as Rank, n))
                        .collect(),
                });
            }
            if let Some(bar) = &calls.recovery_bar {
                bar.inc(1);
            }
            crate::progress::line(&format!(
                "krun: rank {rank} runs again on node {n} (pid {pid}), alone; its image chain \
                 ({fetched} bytes) came from the checkpoint store in {seconds:.2} s"
            ));
            Some(Event::RestartDone {
                decision,
                rank,
                node: n,
                seconds,
            })
        }
        NodeToLauncher::RestartFailed {
            wiring,
            rank,
            reason,
        } => {
            let Some((r, _, decision)) = u.restarts.remove(&wiring) else {
                return Ok(None);
            };
            (r == rank).then_some(Event::RestartFailed {
                decision,
                rank,
                reason,
            })
        }
        other => return Err(Input::FromNode(node, other)),
    })
}
