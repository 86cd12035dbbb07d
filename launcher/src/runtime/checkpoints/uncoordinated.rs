//! The uncoordinated policy's calls carried out against the krund nodes (`[policy] kind =
//! "uncoordinated"`, `KRUN_POLICY_KIND=uncoordinated`, or `krun --policy FILE` naming it).
//!
//! krun exports `KRUN_UNCOORDINATED=1` and `KRUN_MESSAGE_LOGGING=1|0` to the nodes, which
//! pass them to every rank: the rank library then takes safepoints without a barrier and,
//! with logging, keeps the sender-based log (`rank/src/logging/`,
//! `rank/src/uncoordinated.rs`). The nodes' side is `runtime/uncoordinated.rs`.
//!
//! # Contract between the hub and krund
//!
//! | policy call / event | krun → krund | krund → krun |
//! |---|---|---|
//! | `capture_rank(op, rank, v)` | `CaptureRank{rank, version: n}` (n: the rank's next native version): the rank's node signals that rank only; its next safepoint is answered `Checkpoint{n}` at once, no barrier; the rank writes its log snapshot into its registered log region and takes its own native checkpoint | `Captured{rank, n}` → `CaptureDone`; `Safe`/`NotSafe{rank, n, level}` → `LevelSafe`/`LevelLost`; no `Captured` in [`CAPTURE_TIMEOUT`] → `CaptureFailed` |
//! | `trim_log(rank, v)` | `TrimLog{rank, version: n}` → the rank's watcher: `LogSafe{n}` (the library acknowledges to its senders, which drop the payloads) | |
//! | `keep_from(rank, v)` (no logging) | `KeepFrom{rank, version: n}` to every node → its store, retaining by line, may drop the rank's versions older than n's chain (`Store::keep_from`) | |
//! | `restart(d)` (logging) | `Rejoin{restart, rank, node, version: n}`: on `node`, the image chain of n from the store, then a new process with `KRUN_REJOIN=1`, `KRUN_GHOST_RESTORE=n`; no wiring epoch, the survivors keep running | `Restarted{wiring: restart, ..}` → `RestartDone`; `RestartFailed` → `RestartFailed` |
//! | (each new process) | | `Rejoining{rank, address, ring}` |
//! | | once every rank restarting for the failure said `Rejoining`: `PeerMoved{rank, address, ring}` per restarted rank to every node → each running rank's watcher replaces the address (and, as the buddy's ward, rewrites its determinants into the new ring) | `PeerReplaced{rank, moved}` per (running rank, restarted rank) |
//! | | once every pair is replaced: `Rejoined{rank, cards}` per restarted rank, together → each new process gets every rank's (address, ring), reads its determinants back and asks the others to resend (ranks restarted together answer each other) | |
//! | `replay(rank, v)` | nothing more: the rejoin above is the replay (the library's `Resume`/`Info`); refused without logging | |
//! | `Logged` events | none: the policy's log index is fed by checkpoints only (per-message reports would cost a message per message); the ranks' own counters are in their `log_stats` | |
//! | (each own checkpoint, no logging) | | `ChannelCounts{rank, version: n, sent, delivered}` (the rank's messages sent to and delivered from each rank since its process started, sent by the rank before its `Checkpointed`) → the hub adds the counts of the checkpoint the process was restored from → `Logged{Channels{rank, v, ..}}` |
//! | `restart(d)` / `rollback(op, r, v)` (no logging) | collected; then one wiring epoch for the whole line: `Restart{wiring, bootstrap, version: n, ranks}` once per distinct native version n (same wiring and bootstrap), so every rank restores its own version: running ranks in place (watcher, same pid), lost ones on their new node from the store, a rank back to the start without `KRUN_GHOST_RESTORE`; each rank's library drops its images newer than n and numbers on from n + 1 | `Restarted{wiring, rank}` → `RestartDone`/`RollbackDone`; `RestartFailed` → `RestartFailed`/`RollbackFailed` |
//! | (the last lone restart of a failure runs) | `Reform{wiring, members, ranks}` as after a coordinated recovery: the stores re-form buddies and parity sets among the nodes left, with the restarted ranks where they run now | |
//! | swap to this policy (`swap.rs`) | the cut's capture released as `Release{Switch{version}}`: the node runs the uncoordinated mode from it and answers the held ranks `CheckpointSwitch` | each rank's `LogCard` (kept in `HubCalls::early_cards` until the policy is in force) |
//! | swap back to the coordinated policy | `Realign` → each rank's watcher (`ReportSafepoint`); then `RealignAt{T}` (0: cancelled) → the node drops its capture orders, answers safepoints through its gate, tells each rank `CoordinateAt{T}` | `SafepointIndex{rank, index, next}` per rank |
//!
//! Without logging the policy's line is transitless (every channel's counts agree, so no
//! message is in flight across it) and names every rank, so all of them re-wire in the new
//! epoch: no rank can receive a message from an older incarnation, and every message the
//! line says was not sent yet is sent again by its re-executing sender.
//!
//! Versions: the policy numbers each rank's checkpoints itself (never reused, even after a
//! failed capture); each rank's native checkpointer numbers its own images one by one, and
//! a rank restarted from native n numbers on from n + 1. The hub maps (rank, native) to the
//! policy's version both ways.
//!
//! `--inject-failure node=N@Kckpt` counts, under this policy, the checkpoints every rank
//! has made safe (the fewest among the ranks).
use super::*;

/// How long a rank has to answer its own capture before the policy hears it failed.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(90);

/// The environment krun gives the nodes (and through them the ranks) for `policy`.
pub fn node_env(policy: Option<&Description>) -> Result<Vec<(String, String)>, PolicyError> {
    let desc = match policy {
        Some(d) => Some(d.clone()),
        None => PolicySettings::from_env()?.description(),
    };
    Ok(match desc {
        Some(d) if d.kind == policies::description::Kind::Uncoordinated => vec![
            ("KRUN_UNCOORDINATED".into(), "1".into()),
            (
                "KRUN_MESSAGE_LOGGING".into(),
                if d.logging.messages { "1" } else { "0" }.into(),
            ),
        ],
        _ => Vec::new(),
    })
}

/// A rank's message-log card: its fabric address and the ring it holds for its ward.
pub type Card = (Vec<u8>, Vec<u8>);

/// The uncoordinated policy's state at the hub.
pub(in crate::runtime) struct Uncoord {
    pub(super) logging: bool,
    /// rank -> its checkpointer's newest version.
    native: Vec<u64>,
    /// (rank, native) -> the policy's version.
    versions: BTreeMap<(Rank, u64), Version>,
    /// rank -> the capture ordered: op, policy version, native version, when.
    capturing: BTreeMap<Rank, (OpId, Version, u64, Instant)>,
    /// rank -> its (address, ring), as it reported them.
    cards: Vec<Option<Card>>,
    /// restart id -> (rank, node, decision).
    restarts: BTreeMap<u64, (Rank, NodeId, policies::primitives::DecisionId)>,
    next_restart: u64,
    /// The ranks restarting together (one failure): rank -> its new card once its process
    /// said `Rejoining`.
    rejoining: BTreeMap<Rank, Option<Card>>,
    /// (survivor, restarted rank) pairs whose `PeerReplaced` is awaited.
    replacing: BTreeSet<(Rank, Rank)>,
    /// rank -> own checkpoints made safe.
    safe: Vec<u64>,
    /// rank -> ranks on its node at the job's start (`KRUN_LOCAL_SIZE`).
    local_size: Vec<u32>,
    /// Without logging: (rank, policy version) -> its channel counts since the program's
    /// start (sent to, delivered from each rank).
    counts: BTreeMap<(Rank, Version), Counts>,
    /// rank -> the counts its running process started from (those of the checkpoint it was
    /// restored from; zero at the start): its reports count from its own start.
    base: Vec<Counts>,
    /// A switch back to the coordinated policy (`swap.rs`): rank -> (safepoint index, the
    /// version its checkpointer takes next), as the ranks answered `Realign`.
    pub(super) realign: Option<BTreeMap<Rank, (u64, u64)>>,
}

/// A rank's channel counts: messages sent to each rank, delivered from each rank.
type Counts = (Vec<u64>, Vec<u64>);

impl Uncoord {
    /// For ranks placed on `placement` (rank -> node) at the job's start.
    pub(in crate::runtime) fn new(placement: &[NodeId], logging: bool) -> Uncoord {
        let ranks = placement.len();
        let local_size = placement
            .iter()
            .map(|n| placement.iter().filter(|m| *m == n).count() as u32)
            .collect();
        Uncoord {
            local_size,
            logging,
            native: vec![0; ranks],
            versions: BTreeMap::new(),
            capturing: BTreeMap::new(),
            cards: vec![None; ranks],
            restarts: BTreeMap::new(),
            next_restart: 0,
            rejoining: BTreeMap::new(),
            replacing: BTreeSet::new(),
            safe: vec![0; ranks],
            counts: BTreeMap::new(),
            base: vec![(vec![0; ranks], vec![0; ranks]); ranks],
            realign: None,
        }
    }

    /// The state of a running job that switched to this policy (with logging) at the
    /// coordinated checkpoint `version` (checkpointer version `native` on every rank):
    /// that checkpoint is every rank's first own one; `start`: the ranks' nodes at the
    /// job's start (their buddies' stride); `cards`: the log cards the ranks sent at the
    /// cut; `commits`: the job's commit count so far (`--inject-failure node=N@Kckpt`
    /// counts on from it).
    pub(in crate::runtime) fn at_cut(
        start: &[NodeId],
        native: u64,
        version: Version,
        cards: &BTreeMap<Rank, Card>,
        commits: u64,
    ) -> Uncoord {
        let mut u = Uncoord::new(start, true);
        for r in 0..start.len() {
            u.native[r] = native;
            u.versions.insert((r as Rank, native), version);
            u.safe[r] = commits;
            u.cards[r] = cards.get(&(r as Rank)).cloned();
        }
        u
    }

    /// The newest version the ranks' checkpointers took or were ordered to.
    pub(in crate::runtime) fn newest_native(&self) -> u64 {
        let captures = self.capturing.values().map(|c| c.2);
        self.native
            .iter()
            .copied()
            .chain(captures)
            .max()
            .unwrap_or(0)
    }

    /// The highest policy version used for any rank.
    pub(in crate::runtime) fn newest_version(&self) -> Version {
        let captures = self.capturing.values().map(|c| c.1);
        self.versions
            .values()
            .copied()
            .chain(captures)
            .max()
            .unwrap_or(0)
    }

    fn native_of(&self, rank: Rank, version: Version) -> Option<u64> {
        self.versions
            .iter()
            .find(|(&(r, _), &v)| r == rank && v == version)
            .map(|(&(_, n), _)| n)
    }
}

fn state(calls: &mut HubCalls) -> Result<&mut Uncoord, String> {
    calls
        .uncoord
        .as_mut()
        .ok_or_else(|| "the job did not start under the uncoordinated policy".to_string())
}

pub(super) fn capture_rank(
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

pub(super) fn trim_log(calls: &mut HubCalls, rank: Rank, version: Version) {
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

/// `KeepFrom{rank, version: n}` to every node (whichever stored the rank's images).
pub(super) fn keep_from(calls: &mut HubCalls, rank: Rank, version: Version) {
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

pub(super) fn replay(calls: &mut HubCalls, rank: Rank) -> Result<(), String> {
    if state(calls)?.logging {
        Ok(())
    } else {
        Err(format!(
            "rank {rank}: the job runs without message logging: nothing to replay"
        ))
    }
}

pub(super) fn fetch(calls: &mut HubCalls, rank: Rank, version: Version) -> Result<(), String> {
    state(calls)?
        .native_of(rank, version)
        .map(drop)
        .ok_or_else(|| format!("rank {rank}: its checkpoint {version} was never taken here"))
}

pub(super) fn restart(calls: &mut HubCalls, decision: &Decision) -> Result<(), String> {
    let policies::primitives::DecisionKind::Restart {
        rank,
        node,
        version,
        ..
    } = decision.kind
    else {
        return Err("not a restart decision".into());
    };
    let u = state(calls)?;
    if !u.logging {
        return Err(format!(
            "rank {rank}: krund restarts a rank alone only with message logging"
        ));
    }
    let native = version.and_then(|v| u.native_of(rank, v)).ok_or_else(|| {
        format!(
            "rank {rank} has no own checkpoint yet: a rank restarted alone under message \
             logging needs one (its log snapshot is in the image)"
        )
    })?;
    u.next_restart += 1;
    let id = u.next_restart;
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
    eprintln!(
        "krun: rank {rank} restarts alone on node {node} from its own checkpoint {} \
         (checkpointer v{native}) and rejoins the running ranks; no other rank rolls back",
        version.unwrap_or(0)
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

/// Counts `rank`'s safe checkpoint; the job's count is the fewest among the ranks.
pub(super) fn checkpointed(calls: &mut HubCalls, rank: Rank) {
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
pub(super) fn poll(calls: &mut HubCalls) -> Vec<Event> {
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

/// The nodes' messages for this policy as its events; `Err` gives back what the common
/// translation handles (views, requests, ...).
pub(super) fn translate(
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
    if !u.logging
        && matches!(
            msg,
            NodeToLauncher::Restarted { .. } | NodeToLauncher::RestartFailed { .. }
        )
    {
        // The line's wiring epoch, as the coordinated recovery's (`translate.rs`).
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

/// Carries out the restarts and rollbacks of a recovery line without logging (the policy
/// names every rank, each at its own version): one wiring epoch (a new one unless ranks of
/// the current recovery are retried), one `Restart` order per distinct native version.
/// Returns the policy's answers to calls that could not be sent.
pub(super) fn execute_line(calls: &mut HubCalls) -> Vec<Event> {
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
    eprintln!(
        "krun: recovery line without message logging, wiring epoch {}: {}; every rank of \
         the line swaps its new address through {}",
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

/// Once every running rank replaced the restarted ranks' addresses, each restarted rank's
/// new process gets every rank's card.
fn rejoined_if_done(u: &mut Uncoord, send: &Broadcast) {
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

#[cfg(test)]
mod tests {
    use super::super::tests::hub;
    use super::*;

    /// The event of a message this policy handles (panics on one it hands back).
    fn handled(r: Result<Option<Event>, Input>) -> Option<Event> {
        match r {
            Ok(e) => e,
            Err(_) => panic!("a message of this policy was handed back"),
        }
    }

    #[test]
    fn a_rank_captures_alone_and_the_versions_map_per_rank() {
        let (mut calls, sent) = hub();
        calls.uncoord = Some(Uncoord::new(&[0, 1, 2], true));
        let mut copies = Copies::default();
        let op = OpId { leader: 0, seq: 4 };
        capture_rank(&mut calls, op, 1, 9).unwrap();
        assert!(matches!(
            sent.lock().unwrap().last(),
            Some(LauncherToNode::CaptureRank {
                rank: 1,
                node: 1,
                version: 1
            })
        ));
        // Another rank's native v1 is not rank 1's.
        let other = Input::FromNode(
            0,
            NodeToLauncher::Captured {
                rank: 0,
                version: 1,
                bytes: 10,
                wiring: 0,
            },
        );
        assert!(handled(translate(&mut calls, &mut copies, other)).is_none());
        let done = Input::FromNode(
            1,
            NodeToLauncher::Captured {
                rank: 1,
                version: 1,
                bytes: 10,
                wiring: 0,
            },
        );
        assert!(matches!(
            translate(&mut calls, &mut copies, done),
            Ok(Some(Event::CaptureDone {
                rank: 1,
                version: 9,
                ..
            }))
        ));
        let safe = Input::FromNode(
            1,
            NodeToLauncher::Safe {
                rank: 1,
                version: 1,
                level: 2,
                node: Some(0),
                wiring: 0,
            },
        );
        assert!(matches!(
            translate(&mut calls, &mut copies, safe),
            Ok(Some(Event::LevelSafe {
                rank: 1,
                version: 9,
                level: Level::L2
            }))
        ));
        trim_log(&mut calls, 1, 9);
        assert!(matches!(
            sent.lock().unwrap().last(),
            Some(LauncherToNode::TrimLog {
                rank: 1,
                version: 1
            })
        ));
        // A view is not this policy's business.
        let view = Input::View {
            epoch: 2,
            members: vec![0, 2],
            failed: vec![1],
        };
        assert!(translate(&mut calls, &mut copies, view).is_err());
    }

    #[test]
    fn a_restart_rejoins_once_every_survivor_replaced_the_address() {
        let (mut calls, sent) = hub();
        calls.uncoord = Some(Uncoord::new(&[0, 1, 2], true));
        let mut copies = Copies::default();
        for r in 0..3u32 {
            let card = Input::FromNode(
                r,
                NodeToLauncher::LogCard {
                    rank: r,
                    address: vec![r as u8],
                    ring: vec![10 + r as u8],
                },
            );
            assert!(handled(translate(&mut calls, &mut copies, card)).is_none());
        }
        capture_rank(&mut calls, OpId { leader: 0, seq: 1 }, 2, 5).unwrap();
        let d = Decision {
            id: policies::primitives::DecisionId {
                epoch: 3,
                leader: 0,
                seq: 8,
            },
            kind: policies::primitives::DecisionKind::Restart {
                rank: 2,
                incarnation: 1,
                node: 1,
                version: Some(5),
                source: None,
                failure_epoch: 3,
            },
        };
        // Checkpoint 5 was ordered but never captured... it maps to native 1 all the same.
        restart(&mut calls, &d).unwrap();
        assert!(matches!(
            sent.lock().unwrap().last(),
            Some(LauncherToNode::Rejoin {
                restart: 1,
                rank: 2,
                node: 1,
                version: 1,
                local_size: 1
            })
        ));
        assert_eq!(calls.placement[2], 1);
        let rejoining = Input::FromNode(
            1,
            NodeToLauncher::Rejoining {
                rank: 2,
                address: vec![42],
                ring: vec![43],
            },
        );
        assert!(handled(translate(&mut calls, &mut copies, rejoining)).is_none());
        let rejoined = |sent: &Arc<std::sync::Mutex<Vec<LauncherToNode>>>| {
            sent.lock()
                .unwrap()
                .iter()
                .filter(|m| matches!(m, LauncherToNode::Rejoined { .. }))
                .count()
        };
        let replaced = |r| Input::FromNode(r, NodeToLauncher::PeerReplaced { rank: r, moved: 2 });
        handled(translate(&mut calls, &mut copies, replaced(0)));
        assert_eq!(rejoined(&sent), 0, "rank 1 has not replaced it yet");
        handled(translate(&mut calls, &mut copies, replaced(1)));
        assert_eq!(rejoined(&sent), 1);
        match sent.lock().unwrap().last() {
            Some(LauncherToNode::Rejoined { rank: 2, cards }) => {
                assert_eq!(cards[2], (vec![42], vec![43]));
                assert_eq!(cards[0], (vec![0], vec![10]));
            }
            other => panic!("{other:?}"),
        }
        let done = Input::FromNode(
            1,
            NodeToLauncher::Restarted {
                wiring: 1,
                rank: 2,
                pid: 99,
                fetched: 0,
                seconds: 0.5,
                in_place: false,
                new_because: None,
            },
        );
        assert!(matches!(
            translate(&mut calls, &mut copies, done),
            Ok(Some(Event::RestartDone {
                rank: 2,
                node: 1,
                ..
            }))
        ));
    }

    /// A swap to this policy: the cut's capture goes out as `Switch`, the cards the ranks
    /// send then wait for the policy, and a rank lost before its first own checkpoint
    /// rejoins from the cut (native version of that checkpoint). A swap back collects the
    /// ranks' safepoint indices.
    #[test]
    fn the_cut_of_a_swap_switches_the_ranks_and_is_every_ranks_first_checkpoint() {
        use policies::engine::Runtime as _;
        let (mut calls, sent) = hub();
        let mut copies = Copies::default();
        calls.switch_cut = Some(None);
        calls
            .capture(OpId { leader: 0, seq: 3 }, 0, 5, &[])
            .unwrap();
        assert!(matches!(
            sent.lock().unwrap().last(),
            Some(LauncherToNode::Release {
                order: SafepointOrder::Switch { version: 1 }
            })
        ));
        assert_eq!(calls.switch_cut, Some(Some(5)));
        // The next capture is a plain one.
        calls.switch_cut = None;
        for r in 0..3u32 {
            let card = Input::FromNode(
                r,
                NodeToLauncher::LogCard {
                    rank: r,
                    address: vec![r as u8],
                    ring: vec![20 + r as u8],
                },
            );
            assert!(handled(translate(&mut calls, &mut copies, card)).is_none());
        }
        assert_eq!(calls.early_cards.len(), 3);
        calls.uncoord = Some(Uncoord::at_cut(&[0, 1, 2], 1, 5, &calls.early_cards, 1));
        let d = Decision {
            id: policies::primitives::DecisionId {
                epoch: 2,
                leader: 0,
                seq: 4,
            },
            kind: policies::primitives::DecisionKind::Restart {
                rank: 1,
                incarnation: 1,
                node: 2,
                version: Some(5),
                source: None,
                failure_epoch: 2,
            },
        };
        restart(&mut calls, &d).unwrap();
        assert!(matches!(
            sent.lock().unwrap().last(),
            Some(LauncherToNode::Rejoin {
                rank: 1,
                node: 2,
                version: 1,
                ..
            })
        ));
        // Its next own checkpoint is the checkpointer's v2.
        capture_rank(&mut calls, OpId { leader: 0, seq: 5 }, 0, 6).unwrap();
        assert!(matches!(
            sent.lock().unwrap().last(),
            Some(LauncherToNode::CaptureRank {
                rank: 0,
                version: 2,
                ..
            })
        ));
        let u = calls.uncoord.as_mut().unwrap();
        assert_eq!((u.newest_native(), u.newest_version()), (2, 6));
        u.realign = Some(BTreeMap::new());
        let index = Input::FromNode(
            0,
            NodeToLauncher::SafepointIndex {
                rank: 0,
                index: 40,
                next: 3,
            },
        );
        assert!(handled(translate(&mut calls, &mut copies, index)).is_none());
        let u = calls.uncoord.as_ref().unwrap();
        assert_eq!(u.realign.as_ref().unwrap().get(&0), Some(&(40, 3)));
    }

    #[test]
    fn without_logging_a_lone_restart_is_refused() {
        let (mut calls, _) = hub();
        calls.uncoord = Some(Uncoord::new(&[0, 1, 2], false));
        assert!(replay(&mut calls, 1).is_err());
        let d = Decision {
            id: policies::primitives::DecisionId {
                epoch: 1,
                leader: 0,
                seq: 1,
            },
            kind: policies::primitives::DecisionKind::Restart {
                rank: 1,
                incarnation: 1,
                node: 2,
                version: None,
                source: None,
                failure_epoch: 1,
            },
        };
        let err = restart(&mut calls, &d).unwrap_err();
        assert!(err.contains("message logging"), "{err}");
    }
}
