//! Running a node's ranks: starting them, forwarding their output and signals, moving
//! them in and out, and reporting their exits.
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::output::OutputHub;
use super::signals::{take_checkpoint_requests, take_signal, KILLED_SENT, SPARE_SIGNALLED};
use super::spawn::{self, EnvOp, RankProcess, Spawn, Stdin};
use super::{
    exit_code, ghost_owner, remove_shm_segments, signal_name, NodeShare, RankCommand, RankEvent,
    RankPipes, TERMINATE_GRACE,
};
use crate::binding::{self, CpuMask};
use crate::error::{LauncherError, Result};

/// The default a rank gets for libfabric's `FI_OFI_RXM_MSG_RX_SIZE`: how many receive
/// buffers (16 KiB each) `tcp;ofi_rxm` preposts per message endpoint. With libfabric's own
/// default, opening a rank's endpoint took 0.22-0.42 s on this project's 2-core machines (6
/// ranks on 3 local nodes, `KRUN_TRACE_STEPS=1`: the page faults of those buffers), against
/// 0.03-0.13 s with 32; every rank pays it at start and again after a recovery (survivors
/// re-execute, new ranks start on the spare). A value in krund's environment or the job's
/// (`krun -x`) wins.
const RXM_MSG_RX_SIZE: (&str, &str) = ("FI_OFI_RXM_MSG_RX_SIZE", "32");

/// A pipe (read end, write end), both close-on-exec.
fn pipe() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned from here on.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// A rank's process the node did not spawn itself ([`RankCommand::Watch`]): reaped with
/// waitpid(2) by pid.
struct Watched {
    rank: usize,
    pid: u32,
}

impl Watched {
    /// Its exit status, once it ended (reaped).
    fn try_wait(&self) -> Option<ExitStatus> {
        let mut status = 0;
        // SAFETY: waitpid on a child of this process, with a valid status pointer.
        let r = unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) };
        if r == self.pid as i32 {
            use std::os::unix::process::ExitStatusExt;
            return Some(ExitStatus::from_raw(status));
        }
        if r < 0 {
            // Not (or no longer) our child: treat it as gone once its pid is.
            if !std::path::Path::new(&format!("/proc/{}", self.pid)).exists() {
                use std::os::unix::process::ExitStatusExt;
                return Some(ExitStatus::from_raw(0));
            }
        }
        None
    }
}

/// Starts one rank (the `local`-th process of the node: its binding slot).
fn spawn_rank(
    share: &NodeShare,
    domains: &[Vec<usize>],
    rank: usize,
    local: usize,
    extra_env: &[(String, String)],
) -> Result<RankProcess> {
    let (program, args) = share
        .program
        .split_first()
        .ok_or_else(|| LauncherError::Usage("no program to run".into()))?;
    let on_machine = share.machine.ranks.max(share.local_size);
    let oversubscribed = on_machine > domains.len();
    let slot = share.machine.offset + local;
    let mask = if oversubscribed {
        None
    } else {
        binding::cpus_for(domains, slot).map(|cpus| {
            if share.report_bindings {
                eprintln!(
                    "krun: rank {rank} on node {} bound to {} {} (cpus {cpus:?})",
                    share.node_id,
                    share.bind_to.name(),
                    slot % domains.len()
                );
            }
            CpuMask::new(cpus)
        })
    };
    if mask.is_none() && share.report_bindings {
        if oversubscribed && !domains.is_empty() {
            eprintln!(
                "krun: rank {rank} on node {} not bound: {on_machine} ranks on this machine \
                 and {} {} domains",
                share.node_id,
                domains.len(),
                share.bind_to.name()
            );
        } else {
            eprintln!("krun: rank {rank} on node {} not bound", share.node_id);
        }
    }
    let mut env: Vec<EnvOp> = Vec::with_capacity(8 + share.env.len() + extra_env.len());
    let mut set = |k: &str, v: &str| env.push(EnvOp::Set(k.into(), v.into()));
    set("KRUN_RANK", &rank.to_string());
    set("KRUN_SIZE", &share.size.to_string());
    set("KRUN_LOCAL_RANK", &local.to_string());
    set("KRUN_LOCAL_SIZE", &share.local_size.to_string());
    set("KRUN_NODE_ID", &share.node_id.to_string());
    set("KRUN_NNODES", &share.nnodes.to_string());
    let (rx_key, rx_value) = RXM_MSG_RX_SIZE;
    if std::env::var_os(rx_key).is_none() && !share.env.iter().any(|(k, _)| k == rx_key) {
        set(rx_key, rx_value);
    }
    for (k, v) in &share.env {
        set(k, v);
    }
    if let Some(var) = binding::hwloc_plugins_quieted() {
        // krund's own setting, not the user's.
        env.push(EnvOp::Remove(var.into()));
    }
    if let (Ok(job), None) = (
        std::env::var("KRUN_JOB_ID"),
        std::env::var_os("KRUN_GHOST_OWNER"),
    ) {
        env.push(EnvOp::Set(
            "KRUN_GHOST_OWNER".into(),
            ghost_owner(&job, rank).into(),
        ));
    }
    let extras = match &share.rank_setup {
        Some(setup) => Some((setup.0)(rank)?),
        None => None,
    };
    if let Some(x) = &extras {
        env.extend(x.env.iter().map(|(k, v)| EnvOp::Set(k.into(), v.into())));
    }
    let keep: Vec<std::os::fd::RawFd> = extras
        .iter()
        .filter_map(|x| x.keep_fd.as_ref())
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| EnvOp::Set(k.into(), v.into())),
    );
    let reads_terminal = rank == 0 && extra_env.is_empty();
    // SAFETY: isatty only inspects fd 0.
    let own_session = !(reads_terminal && unsafe { libc::isatty(0) } == 1);
    // Without copying the daemon (see `spawn.rs`): its own session unless it reads the
    // terminal, the death signal, none of the daemon's descriptors but the kept one
    // (libfabric's endpoint sockets are not close-on-exec), the binding mask.
    let child = spawn::spawn(&Spawn {
        program,
        args,
        env,
        stdin: if reads_terminal {
            Stdin::Inherit
        } else {
            Stdin::Null
        },
        own_session,
        keep: &keep,
        mask,
    })
    .map_err(|e| LauncherError::Node {
        node: share.node_id,
        message: format!("cannot start rank {rank}: {program}: {e}"),
    });
    // The rank holds its end now; ours closes here.
    drop(extras);
    child
}

/// Sends `sig` to a rank's process group (it leads one, see `spawn_rank`), or to the rank
/// alone when it does not (a rank left in the terminal's group).
fn signal_rank(pid: u32, sig: i32) {
    // SAFETY: kill(2) of our own child (or its group) by PID; no memory is involved.
    unsafe {
        if libc::kill(-(pid as i32), sig) != 0 {
            libc::kill(pid as i32, sig);
        }
    }
}

/// Starts the node's ranks, forwards their output and signals, and returns the highest
/// exit code. Rank 0 (when it is here) inherits stdin; the others read /dev/null. Ranks
/// moved here ([`RankCommand::Adopt`]) are run and waited for like the node's own; ranks
/// moved away ([`RankCommand::Release`]) are not.
pub fn run_share(share: &NodeShare) -> Result<i32> {
    let mut children: Vec<(usize, RankProcess)> = Vec::new();
    let mut released: Vec<(usize, RankProcess)> = Vec::new();
    let mut watched: Vec<Watched> = Vec::new();
    let output = OutputHub::start().map_err(|e| LauncherError::Io {
        context: "starting the output forwarder".into(),
        source: e,
    })?;
    let kill_all = |children: &mut Vec<(usize, RankProcess)>| {
        for (_, c) in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    let domains = binding::domains(share.bind_to)?;
    let mut started = 0usize;
    let mut start = |rank: usize,
                     env: &[(String, String)],
                     children: &mut Vec<(usize, RankProcess)>|
     -> Result<u32> {
        let mut child = spawn_rank(share, &domains, rank, started, env)?;
        started += 1;
        if let Some(fd) = child.stdout.take() {
            output.add(fd, rank, share.tag_output, false);
        }
        if let Some(fd) = child.stderr.take() {
            output.add(fd, rank, share.tag_output, true);
        }
        let pid = child.id();
        if let Some(tx) = &share.events {
            let _ = tx.send(RankEvent::Started { rank, pid });
        }
        children.push((rank, child));
        Ok(pid)
    };
    for local in 0..share.local_size {
        if let Err(e) = start(share.first_rank + local, &[], &mut children) {
            kill_all(&mut children);
            return Err(e);
        }
    }
    if let Some(tx) = &share.started {
        let _ = tx.send(());
    }
    let mut worst = 0;
    // Failed ranks held back for `exit_grace`: (rank, code, signal, when).
    let mut held_exits: Vec<(usize, i32, Option<i32>, std::time::Instant)> = Vec::new();
    let report_exit = |rank: usize, code: i32, signal: Option<i32>| {
        if let Some(sig) = signal {
            eprintln!(
                "krun: rank {rank} on node {} was killed by {}",
                share.node_id,
                signal_name(sig)
            );
        } else if code != 0 {
            eprintln!(
                "krun: rank {rank} on node {} exited with code {code}",
                share.node_id
            );
        }
        if let Some(tx) = &share.events {
            let _ = tx.send(RankEvent::Exited { rank, code });
        }
    };
    // A spare waits for ranks until it is stopped; once it ran some, it ends with them.
    let mut ran_ranks = !children.is_empty();
    let stopped = || {
        share
            .stay
            .as_ref()
            .is_none_or(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    };
    let mut terminating: Option<std::time::Instant> = None;
    // Ranks ended by a signal krun forwarded are not reported as killed.
    let mut forwarded = false;
    loop {
        if let Some(commands) = &share.commands {
            let pending: Vec<RankCommand> = commands
                .lock()
                .map(|rx| rx.try_iter().collect())
                .unwrap_or_default();
            for c in pending {
                match c {
                    RankCommand::Adopt { rank, env, reply } => {
                        held_exits.retain(|p| p.0 != rank);
                        if let Some(i) = children.iter().position(|(r, _)| *r == rank) {
                            let (r, mut c) = children.remove(i);
                            let _ = c.kill();
                            released.push((r, c));
                        }
                        let r = start(rank, &env, &mut children).map_err(|e| e.to_string());
                        let _ = reply.send(r);
                    }
                    RankCommand::Release { rank, reply } => {
                        match children.iter().position(|(r, _)| *r == rank) {
                            Some(i) => {
                                let (r, c) = children.remove(i);
                                let _ = reply.send(Ok(c.id()));
                                released.push((r, c));
                            }
                            None => {
                                let _ = reply.send(Err(format!(
                                    "rank {rank} does not run on node {}",
                                    share.node_id
                                )));
                            }
                        }
                    }
                    RankCommand::Watch { rank, start, reply } => {
                        held_exits.retain(|p| p.0 != rank);
                        let started = pipe()
                            .and_then(|o| Ok((o, pipe()?)))
                            .map_err(|e| format!("creating rank {rank}'s output pipes: {e}"));
                        let started = started.and_then(|((out_r, out_w), (err_r, err_w))| {
                            use std::os::fd::AsRawFd;
                            let pid = (start.0)(RankPipes {
                                stdout: out_w.as_raw_fd(),
                                stderr: err_w.as_raw_fd(),
                            })?;
                            // The process holds its own copies now.
                            drop((out_w, err_w));
                            output.add(out_r, rank, share.tag_output, false);
                            output.add(err_r, rank, share.tag_output, true);
                            Ok(pid)
                        });
                        if let Ok(pid) = started {
                            if let Some(tx) = &share.events {
                                let _ = tx.send(RankEvent::Started { rank, pid });
                            }
                            watched.push(Watched { rank, pid });
                        }
                        let _ = reply.send(started);
                    }
                    RankCommand::Terminate { reason } => {
                        if terminating.is_none() {
                            // A node with no rank left (a spare, a node the job did not
                            // need) ends silently: the line is for ranks being ended.
                            let running = children.len() + released.len() + watched.len();
                            if running > 0 {
                                eprintln!(
                                    "krund: node {}: ending {running} rank(s): {reason}",
                                    share.node_id,
                                );
                            }
                            for (_, c) in children.iter().chain(released.iter()) {
                                signal_rank(c.id(), libc::SIGTERM);
                            }
                            for w in &watched {
                                signal_rank(w.pid, libc::SIGTERM);
                            }
                            terminating = Some(std::time::Instant::now());
                            // A spare with no rank ends cleanly, and so does a drained node
                            // whose released ranks (moved away: their end is not this node's
                            // story) are still on their way out.
                            if !children.is_empty() || !watched.is_empty() {
                                worst = worst.max(1);
                            }
                        }
                    }
                }
            }
        }
        if terminating.is_some_and(|t| t.elapsed() >= TERMINATE_GRACE) {
            for (_, c) in children.iter_mut().chain(released.iter_mut()) {
                signal_rank(c.id(), libc::SIGKILL);
                let _ = c.kill();
            }
            for w in &watched {
                signal_rank(w.pid, libc::SIGKILL);
            }
        }
        ran_ranks |= !children.is_empty() || !watched.is_empty();
        let now = std::time::Instant::now();
        held_exits.retain(|&(rank, code, signal, at)| {
            let due = share.exit_grace.is_none_or(|g| now.duration_since(at) >= g);
            if due {
                report_exit(rank, code, signal);
                worst = worst.max(code);
            }
            !due
        });
        if children.is_empty() && released.is_empty() && held_exits.is_empty() && watched.is_empty()
        {
            if ran_ranks || stopped() || terminating.is_some() {
                break;
            }
            // A spare (no rank to forward it to) ends on SIGINT or SIGTERM, a scheduler or a
            // user stopping the job's processes ([`spare_signalled`]: krund then leaves
            // without waiting for the other nodes; its ranks, which it never ran, all ended
            // well).
            // Silent: krun itself ends a failed job's nodes this way.
            if take_signal().is_some_and(|s| s == libc::SIGINT || s == libc::SIGTERM) {
                SPARE_SIGNALLED.store(true, Ordering::SeqCst);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let requests = take_checkpoint_requests();
        if requests > 0 {
            // krun's policy takes the checkpoint (the requests of all nodes coalesce there).
            let told = share
                .events
                .as_ref()
                .is_some_and(|tx| tx.send(RankEvent::CheckpointAsked).is_ok());
            eprintln!(
                "krund: node {}: checkpoint requested (SIGUSR1 from the scheduler); {}",
                share.node_id,
                if told {
                    "krun's policy is asked"
                } else {
                    "this node runs no runtime to ask a policy"
                }
            );
        }
        if let Some(sig) = take_signal() {
            for (_, c) in children.iter() {
                signal_rank(c.id(), sig);
                forwarded = true;
            }
            for w in &watched {
                signal_rank(w.pid, sig);
                forwarded = true;
            }
        }
        // Ranks restored here by CRIU: reaped by pid, reported like the node's own.
        watched.retain(|w| match w.try_wait() {
            Some(status) => {
                remove_shm_segments(w.pid);
                let code = exit_code(status);
                if code != 0 && share.exit_grace.is_some() && terminating.is_none() && !forwarded {
                    held_exits.push((w.rank, code, status.signal(), std::time::Instant::now()));
                } else {
                    report_exit(w.rank, code, status.signal());
                    if terminating.is_none() {
                        worst = worst.max(code);
                    }
                }
                false
            }
            None => true,
        });
        // A released rank's process ends when it is captured: reap it quietly.
        released.retain_mut(|(_, c)| match c.try_wait() {
            Ok(Some(_)) => {
                remove_shm_segments(c.id());
                false
            }
            Ok(None) => true,
            Err(_) => false,
        });
        let mut ended = Vec::new();
        let mut killed = false;
        for (i, (rank, c)) in children.iter_mut().enumerate() {
            let status = c.try_wait().map_err(|e| LauncherError::Io {
                context: format!("waiting for rank {rank}"),
                source: e,
            })?;
            let Some(status) = status else { continue };
            remove_shm_segments(c.id());
            let code = exit_code(status);
            // Held for a recovery, unless the rank ended on a signal this node forwarded
            // (the job is being stopped: no failure to recover from).
            if code != 0 && share.exit_grace.is_some() && terminating.is_none() && !forwarded {
                held_exits.push((*rank, code, status.signal(), std::time::Instant::now()));
            } else {
                if let (Some(sig), None, false) = (status.signal(), terminating, forwarded) {
                    // The job cannot go on without it (its peers would wait for its messages
                    // until their timeouts): end the node's other ranks and tell krun, which
                    // ends the other nodes.
                    if let Some(tx) = &share.events {
                        if tx
                            .send(RankEvent::Killed {
                                rank: *rank,
                                signal: sig,
                            })
                            .is_ok()
                        {
                            KILLED_SENT.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    killed = true;
                }
                report_exit(*rank, code, status.signal());
                // Ranks ended by the node after a failure are not the job's story.
                if terminating.is_none() {
                    worst = worst.max(code);
                }
            }
            ended.push(i);
        }
        for i in ended.into_iter().rev() {
            children.remove(i);
        }
        if killed && terminating.is_none() && !(children.is_empty() && released.is_empty()) {
            eprintln!(
                "krund: node {}: a rank was killed; ending the node's other rank(s)",
                share.node_id
            );
            for (_, c) in children.iter().chain(released.iter()) {
                signal_rank(c.id(), libc::SIGTERM);
            }
            terminating = Some(std::time::Instant::now());
        }
        if !children.is_empty()
            || !released.is_empty()
            || !held_exits.is_empty()
            || !watched.is_empty()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // A rank's output ends when every process holding its pipes has ended; after a forced
    // end, processes it left behind (outside its group) must not hold the node here.
    output.finish(if terminating.is_some() {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(3600)
    });
    Ok(worst)
}
