//! What the uncoordinated policy does only without message logging: the store's retention
//! by line (`KeepFrom`) and the recovery line's rollbacks and restarts, every rank at its
//! own version, in one wiring epoch. A re-wiring (a failure before the job's wiring
//! finished: every rank from its start) goes the same way with logging too.
use super::*;

/// `KeepFrom{rank, version: n}` to every node (whichever stored the rank's images).
pub(in crate::runtime::checkpoints) fn keep_from(
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
    (calls.send)(&LauncherToNode::KeepFrom {
        rank,
        version: native,
    });
}

/// Carries out the restarts and rollbacks of a recovery line without logging (the policy
/// names every rank, each at its own version): one wiring epoch (a new one unless ranks of
/// the current recovery are retried), one `Restart` order per distinct native version.
/// Returns the policy's answers to calls that could not be sent.
pub(in crate::runtime::checkpoints) fn execute_line(calls: &mut HubCalls) -> Vec<Event> {
    let plan = std::mem::take(&mut calls.plan);
    let mut out = Vec::new();
    let fail = |planned: Planned, rank: Rank, reason: String| match planned {
        Planned::Restart(decision) => Event::RestartFailed {
            decision,
            rank,
            reason,
        },
        Planned::Rollback(op, _) => Event::RollbackFailed { op, rank, reason },
    };
    let Some(u) = calls.uncoord.as_ref() else {
        return Vec::new();
    };
    // (rank, node, planned, native version) of each rank that can be carried out.
    let mut ranks = Vec::new();
    for (rank, node, planned, version) in plan {
        match version.map(|v| (v, u.native_of(rank, v))) {
            Some((v, None)) => out.push(fail(
                planned,
                rank,
                format!("rank {rank}: its checkpoint {v} was never taken here"),
            )),
            Some((_, Some(n))) => ranks.push((rank, node, planned, Some(n), version)),
            None => ranks.push((rank, node, planned, None, None)),
        }
    }
    if ranks.is_empty() {
        return out;
    }
    let everyone = ranks.len() == calls.placement.len();
    let new_epoch = everyone || calls.wiring.is_none();
    if new_epoch {
        let bootstrap = match (calls.new_wiring)() {
            Ok(b) => b,
            Err(e) => {
                out.extend(ranks.into_iter().map(|(rank, _, planned, ..)| {
                    fail(
                        planned,
                        rank,
                        format!("no address all-gather for the ranks: {e}"),
                    )
                }));
                return out;
            }
        };
        calls.wirings += 1;
        calls.wiring = Some(Wiring {
            epoch: calls.wirings,
            bootstrap,
            native: None,
            ranks: BTreeMap::new(),
        });
    }
    let u = calls.uncoord.as_mut().expect("checked above");
    let w = calls.wiring.as_mut().expect("wiring set above");
    let size = calls.placement.len();
    let mut groups: BTreeMap<Option<u64>, Vec<(u32, NodeId)>> = BTreeMap::new();
    let mut parts = Vec::new();
    for &(rank, node, planned, native, version) in &ranks {
        w.ranks.insert(rank, (node, planned));
        if let Some(slot) = calls.placement.get_mut(rank as usize) {
            *slot = node;
        }
        let r = rank as usize;
        // The checkpointer numbers on from the version restored (its newer images go).
        u.native[r] = native.unwrap_or(0);
        u.versions
            .retain(|&(x, n), _| x != rank || native.is_some_and(|m| n <= m));
        u.counts
            .retain(|&(x, v), _| x != rank || version.is_some_and(|m| v <= m));
        u.capturing.remove(&rank);
        u.base[r] = version
            .and_then(|v| u.counts.get(&(rank, v)).cloned())
            .unwrap_or_else(|| (vec![0; size], vec![0; size]));
        groups.entry(native).or_default().push((rank, node));
        let from = match (version, native) {
            (Some(v), Some(n)) => format!("its checkpoint {v} (checkpointer v{n})"),
            _ => "the start".to_string(),
        };
        parts.push(match planned {
            Planned::Rollback(..) => format!("rank {rank} rolls back in place to {from}"),
            Planned::Restart(_) => format!("rank {rank} restarts on node {node} from {from}"),
        });
    }
    calls.nodes = calls.placement.iter().copied().collect();
    let what = if u.rewire {
        "re-wiring (the job's wiring had not finished)"
    } else {
        "recovery line without message logging"
    };
    eprintln!(
        "krun: {what}, wiring epoch {}: {}; every rank of the line swaps its new address \
         through {}",
        w.epoch,
        parts.join("; "),
        w.bootstrap
    );
    let mut sent = BTreeSet::new();
    for (native, group) in groups {
        sent.extend((calls.send)(&LauncherToNode::Restart {
            wiring: w.epoch,
            bootstrap: w.bootstrap.clone(),
            version: native,
            ranks: group,
        }));
    }
    if new_epoch {
        calls.phases.reached(Phase::Recovery);
    }
    out.extend(ranks.into_iter().filter(|r| !sent.contains(&r.1)).map(
        |(rank, node, planned, ..)| {
            fail(planned, rank, format!("node {node} is not linked to krun"))
        },
    ));
    out
}
