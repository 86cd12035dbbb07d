//! The node's link to krun: it registers, reports its views, and follows what krun says
//! (`LauncherToNode`: the policy's barrier and its release, restarts, the uncoordinated
//! policy's orders, MPI fence answers, stop). The policy's barrier on this node is
//! [`barrier`]; the ranks' side of it is the rank library's safepoint (`rank::node_link`).
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric::secret::ClusterSecret;
use fabric::wire::{Protocol, Session};

use super::control::{LauncherToNode, NodeAddresses, NodeToLauncher};
use super::membership::{Shared, TableClient};
use super::{drain, io, mpi_recovery, recovery, safepoint, uncoordinated, AgentSlot};
use crate::error::{LauncherError, Result};

/// Registers with krun and follows what krun says (a `Stop`, or the link closing).
pub(super) fn connect_launcher(
    addr: SocketAddr,
    secret: &ClusterSecret,
    me: &NodeAddresses,
    shared: Arc<Shared>,
    safepoints: Arc<safepoint::SafepointGate>,
    agent: Arc<AgentSlot>,
    decisions: TableClient,
) -> Result<()> {
    if let Some(delay) = link_delay(me.node, std::env::var("KRUN_TEST_LINK_DELAY").ok())? {
        std::thread::sleep(delay);
    }
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(io(format!("connecting to krun at {addr}")))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io("configuring the krun link".into()))?;
    let mut session =
        Session::client(&mut s, secret, Protocol::Runtime).map_err(|e| LauncherError::Node {
            node: me.node as usize,
            message: format!("krun at {addr}: {e}"),
        })?;
    session
        .tx
        .send(&mut s, &NodeToLauncher::Register(me.clone()))
        .map_err(|e| LauncherError::Node {
            node: me.node as usize,
            message: format!("registering with krun: {e}"),
        })?;
    s.set_read_timeout(None)
        .map_err(io("configuring the krun link".into()))?;
    let mut reader = s.try_clone().map_err(io("cloning the krun link".into()))?;
    shared.set_launcher(s, session.tx);
    // Ranks that said hello before this link (a node slow to link): krun hears their
    // readiness now.
    let linked: Vec<u64> = shared
        .linked_ranks
        .lock()
        .expect("linked lock")
        .iter()
        .copied()
        .collect();
    for rank in linked {
        let wiring = shared
            .rank_wiring
            .lock()
            .expect("rank wiring lock")
            .get(&(rank as u32))
            .copied()
            .unwrap_or_else(|| shared.wiring.load(Ordering::SeqCst));
        shared.tell_launcher(&NodeToLauncher::RankReady {
            rank: rank as u32,
            wiring,
        });
    }
    let mut rx = session.rx;
    std::thread::spawn(move || {
        let why = loop {
            match rx.recv::<LauncherToNode>(&mut reader) {
                Ok(LauncherToNode::Stop) => break "krun stopped the node".to_string(),
                Ok(LauncherToNode::Pmi(msg)) => {
                    let servers = shared.pmi.lock().expect("pmi lock").clone();
                    for server in servers {
                        server.deliver(msg.clone());
                    }
                }
                Ok(LauncherToNode::Barrier { op }) => {
                    safepoints.open_barrier();
                    shared.tell_launcher(&NodeToLauncher::Opened { op });
                }
                Ok(LauncherToNode::Wake { op }) => {
                    let (shared, safepoints) = (shared.clone(), safepoints.clone());
                    std::thread::spawn(move || barrier(&shared, &safepoints, op));
                }
                Ok(LauncherToNode::Release { order }) => {
                    if matches!(order, super::safepoint::SafepointOrder::Switch { .. }) {
                        // The swap's cut: the ranks run uncoordinated from it.
                        shared.uncoordinated.set_active(true);
                    }
                    safepoints.release(order);
                }
                Ok(LauncherToNode::RealignAt { index }) => {
                    if index > 0 {
                        // The ranks ask as in a coordinated job from safepoint `index`: the
                        // policy's barrier answers them (never "act on your own").
                        safepoints.mark_driven();
                    }
                    shared.uncoordinated.realign_at(&shared, index);
                }
                Ok(LauncherToNode::Reform {
                    wiring: _,
                    members,
                    ranks,
                }) => {
                    // Before this node answers the recovery (its restarts run in threads
                    // of their own): the next checkpoint already uses the new placement.
                    agent.reform(members, ranks);
                }
                Ok(LauncherToNode::Restart {
                    wiring,
                    bootstrap,
                    version,
                    ranks,
                }) => {
                    // The ranks this order starts say hello in this epoch (their reports
                    // carry it: `runtime/sockets.rs`).
                    shared.wiring.fetch_max(wiring, Ordering::SeqCst);
                    // Before this order's thread starts: an older order's thread still at
                    // work (a second failure during a recovery) drops the ranks this one
                    // names instead of restarting them in its older epoch.
                    shared.restarts.ordered(wiring, &ranks);
                    // Capture orders of the old processes are not the new ones'.
                    shared
                        .uncoordinated
                        .drop_captures(ranks.iter().map(|&(r, _)| r));
                    // Ranks moved away by a drain end before the new epoch's start.
                    drain::release_moved(&shared, &ranks);
                    // An MPI job's servers start the new incarnation before any rank does
                    // (here: ordered with krun's fence answers on this link).
                    mpi_recovery::reincarnate(&shared, wiring, &ranks);
                    let (shared, agent) = (shared.clone(), agent.clone());
                    std::thread::spawn(move || {
                        recovery::restart(&shared, &agent, wiring, &bootstrap, version, &ranks)
                    });
                }
                Ok(
                    msg @ (LauncherToNode::CaptureRank { .. }
                    | LauncherToNode::TrimLog { .. }
                    | LauncherToNode::KeepFrom { .. }
                    | LauncherToNode::PeerMoved { .. }
                    | LauncherToNode::Rejoined { .. }
                    | LauncherToNode::Realign
                    | LauncherToNode::Rejoin { .. }),
                ) => uncoordinated::from_launcher(&shared, &agent, msg),
                Ok(LauncherToNode::Decided {
                    rank,
                    node,
                    decision,
                }) => {
                    if node == shared.me {
                        recovery::decided(&decisions, rank, decision);
                    }
                }
                Err(e) => break format!("the link to krun ended: {e}"),
            }
        };
        shared.request_stop(why);
    });
    Ok(())
}

/// For tests: `KRUN_TEST_LINK_DELAY=NODE:MS` delays node NODE's link to krun by MS
/// milliseconds (as a krund slow to start under CPU load links late, after krun's first
/// checkpoint barrier went out). A malformed value is an error naming it.
fn link_delay(me: u32, value: Option<String>) -> Result<Option<Duration>> {
    let Some(v) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let parsed = v
        .trim()
        .split_once(':')
        .and_then(|(n, ms)| Some((n.parse::<u32>().ok()?, ms.parse::<u64>().ok()?)));
    let Some((node, ms)) = parsed else {
        return Err(LauncherError::Node {
            node: me as usize,
            message: format!("KRUN_TEST_LINK_DELAY={v:?}: expected NODE:MILLISECONDS, e.g. 1:3000"),
        });
    };
    Ok((node == me).then(|| Duration::from_millis(ms)))
}

/// The policy's barrier on this node: holds the ranks at their safepoints from now on,
/// wakes them ([`super::control::wake_signal`], which the rank library's safepoint treats
/// as "ask"), and tells krun
/// once every rank of this node is held: those running and those still starting (a
/// barrier can come before the node started its ranks, e.g. while its MPI servers start
/// under load; counting only the running ones reported an empty node as held, the policy
/// then waited for captures that never came and no checkpoint was ever taken).
pub(super) fn barrier(shared: &Shared, safepoints: &safepoint::SafepointGate, op: u64) {
    safepoints.open_barrier();
    // Only ranks that said hello have the library's request handler installed (a signal
    // before would kill them), so ranks are woken as they link, each once per barrier; one
    // woken rank is enough, the ranks agree collectively.
    let signalled = Mutex::new(std::collections::BTreeSet::<u64>::new());
    let local = || -> Vec<u32> {
        let linked = shared.linked_ranks.lock().expect("linked lock").clone();
        // Both read under the ranks lock, which a rank's start takes to move it from one
        // to the other.
        let (local, starting) = {
            let local = shared.local_ranks.lock().expect("ranks lock");
            let starting = shared.starting.lock().expect("starting lock").clone();
            (local.clone(), starting)
        };
        let held = safepoints.held();
        let mut done = signalled.lock().expect("signalled lock");
        for (rank, &pid) in &local {
            if linked.contains(rank) && !held.contains(&(*rank as u32)) && done.insert(*rank) {
                // SAFETY: kill sends a signal to a rank this node started; no memory is
                // involved.
                unsafe { libc::kill(pid as i32, super::control::wake_signal()) };
            }
        }
        local.keys().chain(&starting).map(|&r| r as u32).collect()
    };
    let msg = match safepoints.wait_all_held(&local, Duration::from_secs(60)) {
        Some(ranks) => NodeToLauncher::Held { op, ranks },
        None => NodeToLauncher::SyncFailed {
            op,
            reason: format!(
                "node {}: ranks {:?} did not reach a safepoint in 60 s",
                shared.me,
                local()
                    .into_iter()
                    .filter(|r| !safepoints.held().contains(r))
                    .collect::<Vec<_>>()
            ),
        },
    };
    shared.tell_launcher(&msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_link_delay_applies_to_the_node_it_names_and_a_bad_value_is_named() {
        assert_eq!(link_delay(1, None).unwrap(), None);
        assert_eq!(
            link_delay(1, Some("1:2500".into())).unwrap(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(link_delay(0, Some("1:2500".into())).unwrap(), None);
        let err = link_delay(1, Some("soon".into())).unwrap_err().to_string();
        assert!(
            err.contains("KRUN_TEST_LINK_DELAY") && err.contains("soon"),
            "{err}"
        );
    }
}
