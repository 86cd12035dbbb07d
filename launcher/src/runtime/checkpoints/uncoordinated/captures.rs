//! The uncoordinated policy's per-rank captures at the hub: each capture the policy
//! schedules becomes `CaptureRank` to the rank's node; a capture never answered in
//! [`CAPTURE_TIMEOUT`] fails; each rank's safe checkpoints are counted (the job's count is
//! the fewest among the ranks).
use super::*;

pub(in crate::runtime::checkpoints) fn capture_rank(
    calls: &mut HubCalls,
    op: OpId,
    rank: Rank,
    version: Version,
) -> Result<(), String> {
    let node = *calls
        .placement
        .get(rank as usize)
        .ok_or_else(|| format!("rank {rank} is not a rank of this job"))?;
    let u = state(calls)?;
    let native = u.native[rank as usize] + 1;
    u.versions.insert((rank, native), version);
    u.capturing
        .insert(rank, (op, version, native, Instant::now()));
    let sent = (calls.send)(&LauncherToNode::CaptureRank {
        rank,
        node,
        version: native,
    });
    if !sent.contains(&node) {
        state(calls)?.capturing.remove(&rank);
        return Err(format!("node {node} (rank {rank}) is not linked to krun"));
    }
    Ok(())
}

pub(in crate::runtime::checkpoints) fn fetch(
    calls: &mut HubCalls,
    rank: Rank,
    version: Version,
) -> Result<(), String> {
    state(calls)?
        .native_of(rank, version)
        .map(drop)
        .ok_or_else(|| format!("rank {rank}: its checkpoint {version} was never taken here"))
}

/// Counts `rank`'s safe checkpoint; the job's count is the fewest among the ranks.
pub(in crate::runtime::checkpoints) fn checkpointed(calls: &mut HubCalls, rank: Rank) {
    let Some(u) = calls.uncoord.as_mut() else {
        return;
    };
    if let Some(n) = u.safe.get_mut(rank as usize) {
        *n += 1;
    }
    let least = u.safe.iter().copied().min().unwrap_or(0);
    calls.commits.store(least, Ordering::SeqCst);
}

/// Captures that were never answered.
pub(in crate::runtime::checkpoints) fn poll(calls: &mut HubCalls) -> Vec<Event> {
    let Some(u) = calls.uncoord.as_mut() else {
        return Vec::new();
    };
    let late: Vec<Rank> = u
        .capturing
        .iter()
        .filter(|(_, c)| c.3.elapsed() > CAPTURE_TIMEOUT)
        .map(|(&r, _)| r)
        .collect();
    late.into_iter()
        .filter_map(|r| u.capturing.remove(&r).map(|c| (r, c)))
        .map(|(rank, (op, version, _, _))| Event::CaptureFailed {
            op,
            rank,
            version,
            reason: format!("rank {rank} took no checkpoint in {CAPTURE_TIMEOUT:?}"),
        })
        .collect()
}
