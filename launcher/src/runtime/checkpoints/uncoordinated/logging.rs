//! What the uncoordinated policy does only with message logging: log trims (`TrimLog`), a
//! lost rank's lone restart that rejoins the running ranks (`Rejoin`, then `Rejoined` with
//! every rank's card once every running rank replaced its address), and replay (the
//! rejoin is the replay).
use super::*;

pub(in crate::runtime::checkpoints) fn trim_log(
    calls: &mut HubCalls,
    rank: Rank,
    version: Version,
) {
    let Some(native) = calls
        .uncoord
        .as_ref()
        .and_then(|u| u.native_of(rank, version))
    else {
        return;
    };
    (calls.send)(&LauncherToNode::TrimLog {
        rank,
        version: native,
    });
}

pub(in crate::runtime::checkpoints) fn replay(
    calls: &mut HubCalls,
    rank: Rank,
) -> Result<(), String> {
    if state(calls)?.logging {
        Ok(())
    } else {
        Err(format!(
            "rank {rank}: the job runs without message logging: nothing to replay"
        ))
    }
}

pub(in crate::runtime::checkpoints) fn restart(
    calls: &mut HubCalls,
    decision: &Decision,
) -> Result<(), String> {
    let policies::primitives::DecisionKind::Restart {
        rank,
        node,
        version,
        ..
    } = decision.kind
    else {
        return Err("not a restart decision".into());
    };
    if state(calls)?.rewire {
        // Every rank from its start, in one new wiring epoch (`execute_line`).
        calls
            .plan
            .push((rank, node, Planned::Restart(decision.id), version));
        return Ok(());
    }
    calls.rejoin_ids += 1;
    let id = calls.rejoin_ids;
    let u = state(calls)?;
    if !u.logging {
        return Err(format!(
            "rank {rank}: krund restarts a rank alone only with message logging"
        ));
    }
    // No own checkpoint yet: the rank re-executes from its start (checkpointer version
    // 0: no image) and replays every delivery since the logging started; its senders
    // still hold every payload (none of its checkpoints acknowledged any).
    let native = match version {
        None => 0,
        Some(v) => u.native_of(rank, v).ok_or_else(|| {
            format!("rank {rank}: its checkpoint {v} is not one of its own checkpoints")
        })?,
    };
    let local_size = u.local_size.get(rank as usize).copied().unwrap_or(1);
    u.restarts.insert(id, (rank, node, decision.id));
    u.native[rank as usize] = native;
    u.versions.retain(|&(r, n), _| r != rank || n <= native);
    u.capturing.remove(&rank);
    u.cards[rank as usize] = None;
    u.rejoining.insert(rank, None);
    if let Some(slot) = calls.placement.get_mut(rank as usize) {
        *slot = node;
    }
    calls.nodes = calls.placement.iter().copied().collect();
    let from = match version {
        Some(v) => format!("its own checkpoint {v} (checkpointer v{native})"),
        None => "its start (lost before its first own checkpoint)".to_string(),
    };
    eprintln!(
        "krun: rank {rank} restarts alone on node {node} from {from} and rejoins the \
         running ranks; no other rank rolls back"
    );
    let sent = (calls.send)(&LauncherToNode::Rejoin {
        restart: id,
        rank,
        node,
        version: native,
        local_size,
    });
    calls.phases.reached(Phase::Recovery);
    if !sent.contains(&node) {
        return Err(format!("node {node} is not linked to krun"));
    }
    Ok(())
}

/// Once every running rank replaced the restarted ranks' addresses, each restarted rank's
/// new process gets every rank's card.
pub(super) fn rejoined_if_done(u: &mut Uncoord, send: &Broadcast) {
    if !u.replacing.is_empty()
        || u.rejoining.is_empty()
        || !u.rejoining.values().all(Option::is_some)
    {
        return;
    }
    let ranks: Vec<Rank> = std::mem::take(&mut u.rejoining).into_keys().collect();
    let missing: Vec<usize> = (0..u.cards.len())
        .filter(|&r| u.cards[r].is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "krun: ranks {ranks:?} rejoin, but ranks {missing:?} never reported their \
             message-log card: they cannot reach them"
        );
    }
    let cards: Vec<Card> = u
        .cards
        .iter()
        .map(|c| c.clone().unwrap_or_default())
        .collect();
    for rank in ranks {
        send(&LauncherToNode::Rejoined {
            rank,
            cards: cards.clone(),
        });
    }
}
