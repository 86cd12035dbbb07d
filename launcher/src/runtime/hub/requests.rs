//! krun's answers to requests on its own socket (`krun checkpoint`, `krun policy`, `krun
//! node add|drain` from another shell): handed to the policy thread, or carried out here
//! (a node's join, a drain's moves of ranks with ghost migrate).
use super::*;

pub(super) fn launcher_request(inner: &Arc<Inner>, req: LauncherRequest) -> LauncherReply {
    match req {
        LauncherRequest::Checkpoint => {
            if inner.policy.lock().expect("policy lock").is_none() {
                return LauncherReply::Refused("this job runs no checkpoint policy".into());
            }
            to_policy(
                inner,
                crate::runtime::checkpoints::Input::Request(
                    policies::primitives::RequestSource::Command,
                ),
            );
            LauncherReply::Requested
        }
        LauncherRequest::AddNode { host } => match add_node(inner, host) {
            Ok((node, epoch)) => LauncherReply::Added { node, epoch },
            Err(e) => LauncherReply::Refused(e),
        },
        LauncherRequest::DrainNode { node } => match drain_node(inner, node) {
            Ok(moved) => LauncherReply::Drained { node, moved },
            Err(e) => LauncherReply::Refused(e),
        },
        LauncherRequest::Policy(request) => policy_request(inner, request),
    }
}

/// `krun policy load|unload|show`: asks the policy thread and waits for its answer (a swap
/// waits for its checkpoint: `runtime/checkpoints/swap.rs`).
fn policy_request(inner: &Inner, request: control::PolicyRequest) -> LauncherReply {
    let (reply, rx) = mpsc::channel();
    let sent = inner
        .policy
        .lock()
        .expect("policy lock")
        .as_ref()
        .is_some_and(|tx| {
            tx.send(Some(crate::runtime::checkpoints::Input::Policy {
                request,
                reply,
            }))
            .is_ok()
        });
    if !sent {
        return LauncherReply::Refused(
            "this job runs no checkpoint policy (krun runs one for a PROGRAM's ranks)".into(),
        );
    }
    match rx.recv_timeout(Duration::from_secs(100)) {
        Ok(Ok(text)) => LauncherReply::Policy(text),
        Ok(Err(why)) => LauncherReply::Refused(why),
        Err(mpsc::RecvTimeoutError::Timeout) => LauncherReply::Refused(
            "the policy did not answer within 100 s (see krun's output)".into(),
        ),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            LauncherReply::Refused("the job's checkpoint policy has ended".into())
        }
    }
}

/// Waits until `done` holds for the newest view (or the time is up).
fn wait_view(
    inner: &Inner,
    timeout: Duration,
    done: impl Fn(&State) -> bool,
) -> std::result::Result<u64, String> {
    let deadline = Instant::now() + timeout;
    let mut st = inner.state.lock().expect("hub lock");
    while !done(&st) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the membership did not get there within {timeout:?} (epoch {}, members {:?})",
                st.epoch, st.members
            ));
        }
        st = inner.changed.wait_timeout(st, left).expect("hub lock").0;
    }
    Ok(st.epoch)
}

fn add_node(
    inner: &Arc<Inner>,
    host: Option<String>,
) -> std::result::Result<(NodeId, u64), String> {
    let (node, args) = {
        let mut st = inner.state.lock().expect("hub lock");
        let contacts: Vec<String> = st
            .links
            .values()
            .filter(|l| !l.bye && st.members.contains(&l.addresses.node))
            .map(|l| format!("{}={}", l.addresses.node, l.addresses.adaptation))
            .collect();
        if contacts.is_empty() {
            return Err("no live member to join through".into());
        }
        let node = st
            .links
            .keys()
            .chain(st.reserved.iter())
            .max()
            .map_or(0, |m| m + 1);
        st.reserved.insert(node);
        let mut args = vec![
            "--join".to_string(),
            contacts.join(","),
            "--node-id".into(),
            node.to_string(),
            "--job-ranks".into(),
            inner.job_ranks.to_string(),
        ];
        if host.is_none() {
            args.extend(["--bind".to_string(), inner.advertised.to_string()]);
        }
        // Ranks moved to the new node read their images from these members' stores.
        let stores: Vec<String> = st
            .links
            .values()
            .filter(|l| !l.bye && st.members.contains(&l.addresses.node))
            .map(|l| format!("{}={}", l.addresses.node, l.addresses.control_tcp))
            .collect();
        args.extend(["--store-peers".to_string(), stores.join(",")]);
        (node, args)
    };
    inner
        .to_start
        .lock()
        .expect("start lock")
        .send(NodeToStart {
            node,
            host: host.clone(),
            args,
        })
        .map_err(|_| "the job is ending".to_string())?;
    let epoch = wait_view(inner, Duration::from_secs(60), |st| {
        st.members.contains(&node)
    })?;
    Ok((node, epoch))
}

fn drain_node(inner: &Arc<Inner>, node: NodeId) -> std::result::Result<Vec<u64>, String> {
    let (members, via, epoch) = {
        let st = inner.state.lock().expect("hub lock");
        if !st.links.contains_key(&node) {
            return Err(format!(
                "node {node} is not a node of this job (nodes: {:?})",
                st.links.keys().collect::<Vec<_>>()
            ));
        }
        if !st.members.contains(&node) {
            return Err(format!(
                "node {node} is not a member any more (members {:?})",
                st.members
            ));
        }
        if st.members.len() == 1 {
            return Err(format!("node {node} is the last node of the job"));
        }
        let via: Vec<NodeAddresses> = st
            .links
            .values()
            .filter(|l| {
                l.addresses.node != node && !l.bye && st.members.contains(&l.addresses.node)
            })
            .map(|l| l.addresses.clone())
            .collect();
        (st.members.clone(), via, st.epoch)
    };
    // The table (which ranks run where) and the supervisors, from a member that stays.
    let status = via
        .iter()
        .find_map(|a| {
            match control::call::<_, ControlReply>(
                &ControlTarget::Tcp(a.control_tcp.clone()),
                &inner.secret,
                &ControlRequest::Status,
                Duration::from_secs(30),
            ) {
                Ok(ControlReply::Status(s)) => Some(s),
                _ => None,
            }
        })
        .ok_or_else(|| "no member that stays answered".to_string())?;
    // A supervisor leaves too: the adaptation layer hands its Raft vote to a member that
    // stays (or the group shrinks) before the leave is committed, and refuses a leave that
    // would leave the group without a live majority (`Node::request_leave`).
    let supervisor = status.supervisors.contains(&node);
    let mut moved = Vec::new();
    let policy = inner.policy.lock().expect("policy lock").clone();
    // An MPI job's ranks never move one by one: the whole job restarts from the policy's
    // checkpoint in a new MPI incarnation, or the drain is refused (runtime/drain.rs).
    let mpi = uses_mpi(inner, node, &status, policy.is_some())?;
    // Ranks of ghost's native checkpointer that do not use the fabric move one by one
    // (captured, then adopted); the others move through the policy's checkpoint and a planned
    // recovery (runtime/drain.rs).
    let native = !mpi
        && inner.nodes_with_ranks.contains(&node)
        && (policy.is_none() || natively_movable(inner, node, &status).is_ok());
    if native {
        moved = move_ranks(inner, node, &members, &via, &status)?;
    } else if let Some(policy) = policy {
        moved = crate::runtime::drain::through_policy(&policy, node, epoch, members.clone())?.moved;
        inner.state.lock().expect("hub lock").ranked.remove(&node);
    }
    let mut last = String::from("no member answered");
    for a in via {
        let target = ControlTarget::Tcp(a.control_tcp.clone());
        match control::call::<_, ControlReply>(
            &target,
            &inner.secret,
            &ControlRequest::Leave { node },
            Duration::from_secs(10),
        ) {
            Ok(ControlReply::Done(_)) => {
                wait_view(inner, Duration::from_secs(60), |st| {
                    !st.members.contains(&node)
                })?;
                return Ok(moved);
            }
            Ok(ControlReply::Refused(why)) if moved.is_empty() => return Err(why),
            Ok(ControlReply::Refused(why)) => {
                return Err(format!(
                    "node {node}'s ranks {moved:?} moved, but node {node} stays a member{}: \
                     {why}",
                    if supervisor { " (a supervisor)" } else { "" }
                ))
            }
            Ok(other) => last = format!("node {}: unexpected answer {other:?}", a.node),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Whether the job's ranks use MPI (krun saw MPI activity, or the staying member or the
/// drained node says its ranks initialised MPI); an error when such a drain cannot be
/// carried out ([`crate::runtime::drain::mpi_refusal`]).
fn uses_mpi(
    inner: &Inner,
    node: NodeId,
    status: &crate::runtime::status::NodeStatus,
    policy: bool,
) -> std::result::Result<bool, String> {
    let source = {
        let st = inner.state.lock().expect("hub lock");
        st.links
            .get(&node)
            .map(|l| l.addresses.clone())
            .ok_or_else(|| format!("node {node} is not linked"))?
    };
    let own = control::call::<_, ControlReply>(
        &ControlTarget::Tcp(source.control_tcp.clone()),
        &inner.secret,
        &ControlRequest::Status,
        Duration::from_secs(30),
    );
    let own = match own {
        Ok(ControlReply::Status(s)) => Ok(s),
        Ok(ControlReply::Refused(why)) => Err(why),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    };
    let used = inner.pmi.lock().expect("pmi lock").used()
        || status.mpi
        || own.as_ref().is_ok_and(|s| s.mpi);
    if !used {
        return Ok(false);
    }
    let own = own.map_err(|why| {
        format!(
            "node {node} runs MPI ranks and did not say which of them use the rank library \
             ({why}); nothing was moved"
        )
    })?;
    let running: Vec<u64> = status
        .ranks
        .iter()
        .filter(|r| r.node == node && r.state == crate::runtime::table::RankState::Running)
        .map(|r| r.rank)
        .collect();
    match crate::runtime::drain::mpi_refusal(node, policy, &running, &own.linked) {
        Some(why) => Err(why),
        None => Ok(true),
    }
}

/// Asks a node's control socket; its `Done` text, or why not.
fn ask_node(
    inner: &Inner,
    a: &NodeAddresses,
    req: ControlRequest,
) -> std::result::Result<String, String> {
    match control::call::<_, ControlReply>(
        &ControlTarget::Tcp(a.control_tcp.clone()),
        &inner.secret,
        &req,
        Duration::from_secs(60),
    ) {
        Ok(ControlReply::Done(s)) => Ok(s),
        Ok(ControlReply::Refused(why)) => Err(format!("node {}: {why}", a.node)),
        Ok(other) => Err(format!("node {}: unexpected answer {other:?}", a.node)),
        Err(e) => Err(format!("node {}: {e}", a.node)),
    }
}

/// Whether every rank running on `node` can move without the policy (a dry run of
/// `MigrateOut`: native ghost ranks that do not use the fabric).
fn natively_movable(
    inner: &Inner,
    node: NodeId,
    status: &crate::runtime::status::NodeStatus,
) -> std::result::Result<(), String> {
    let source = {
        let st = inner.state.lock().expect("hub lock");
        st.links
            .get(&node)
            .map(|l| l.addresses.clone())
            .ok_or_else(|| format!("node {node} is not linked"))?
    };
    for r in status
        .ranks
        .iter()
        .filter(|r| r.node == node && r.state == crate::runtime::table::RankState::Running)
    {
        ask_node(
            inner,
            &source,
            ControlRequest::MigrateOut {
                rank: r.rank,
                dry_run: true,
            },
        )?;
    }
    Ok(())
}

/// Moves every rank running on `node` to the other nodes that run ranks (round robin): the
/// node captures each and ends it, another starts it from its checkpoint.
fn move_ranks(
    inner: &Arc<Inner>,
    node: NodeId,
    members: &[NodeId],
    via: &[NodeAddresses],
    status: &crate::runtime::status::NodeStatus,
) -> std::result::Result<Vec<u64>, String> {
    let ask = |a: &NodeAddresses, req: ControlRequest| -> std::result::Result<String, String> {
        match control::call::<_, ControlReply>(
            &ControlTarget::Tcp(a.control_tcp.clone()),
            &inner.secret,
            &req,
            Duration::from_secs(60),
        ) {
            Ok(ControlReply::Done(s)) => Ok(s),
            Ok(ControlReply::Refused(why)) => Err(format!("node {}: {why}", a.node)),
            Ok(other) => Err(format!("node {}: unexpected answer {other:?}", a.node)),
            Err(e) => Err(format!("node {}: {e}", a.node)),
        }
    };
    let source = {
        let st = inner.state.lock().expect("hub lock");
        st.links
            .get(&node)
            .map(|l| l.addresses.clone())
            .ok_or_else(|| format!("node {node} is not linked"))?
    };
    let targets: Vec<&NodeAddresses> = via
        .iter()
        .filter(|a| inner.nodes_with_ranks.contains(&a.node) && members.contains(&a.node))
        .collect();
    if targets.is_empty() {
        return Err(format!(
            "node {node} runs ranks and no other node runs ranks to take them"
        ));
    }
    let ranks: Vec<u64> = status
        .ranks
        .iter()
        .filter(|r| r.node == node && r.state == crate::runtime::table::RankState::Running)
        .map(|r| r.rank)
        .collect();
    // Every rank must be movable before the first one moves.
    for &rank in &ranks {
        ask(
            &source,
            ControlRequest::MigrateOut {
                rank,
                dry_run: true,
            },
        )?;
    }
    let mut moved = Vec::new();
    for (i, &rank) in ranks.iter().enumerate() {
        ask(
            &source,
            ControlRequest::MigrateOut {
                rank,
                dry_run: false,
            },
        )?;
        ask(
            targets[i % targets.len()],
            ControlRequest::AdoptFrom {
                rank,
                from: source.control_tcp.clone(),
            },
        )?;
        moved.push(rank);
    }
    Ok(moved)
}
