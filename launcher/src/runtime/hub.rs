//! The launcher's side of the runtime: krund nodes register with the running `krun` and
//! report every agreed view; `krun` prints each agreed failure once ("node 2 failed at
//! epoch 5"), keeps the job directory current, and serves `krun node add|drain` on its
//! socket there.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use adaptation::NodeId;
use fabric::secret::ClusterSecret;
use fabric::wire::{FrameWriter, Protocol, Session};

use super::control::{
    self, ControlReply, ControlRequest, ControlTarget, LauncherReply, LauncherRequest,
    LauncherToNode, NodeAddresses, NodeToLauncher,
};
use super::jobdir::JobDir;
use crate::error::{LauncherError, Result};

mod requests;
use requests::launcher_request;

/// A node `krun` should start to join the job: its id, the host (`None`: this machine) and
/// krund's arguments.
#[derive(Debug, Clone)]
pub struct NodeToStart {
    pub node: NodeId,
    pub host: Option<String>,
    pub args: Vec<String>,
}

struct Link {
    addresses: NodeAddresses,
    writer: Option<(TcpStream, FrameWriter)>,
    /// The node said its work is over.
    bye: bool,
}

#[derive(Default)]
struct State {
    links: BTreeMap<NodeId, Link>,
    /// Epochs of the failures already reported.
    reported: BTreeSet<u64>,
    /// The newest view some node reported: epoch and members.
    epoch: u64,
    members: Vec<NodeId>,
    /// Ids handed to nodes being added.
    reserved: BTreeSet<NodeId>,
    /// Why the job must end now (a rank was killed) and its exit code, once a node said so.
    abort: Option<(String, i32)>,
    /// Nodes that run ranks now (spares join when ranks restart on them; failed nodes
    /// leave): once all of them said `Bye`, the others (spares) are stopped.
    ranked: BTreeSet<NodeId>,
    /// The exit code each node reported for its ranks (`Finished`).
    finished: BTreeMap<NodeId, i32>,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    dir: Mutex<JobDir>,
    secret: ClusterSecret,
    advertised: IpAddr,
    job_ranks: u64,
    /// Nodes that run ranks (never drained without moving them).
    nodes_with_ranks: BTreeSet<NodeId>,
    to_start: Mutex<Sender<NodeToStart>>,
    /// The checkpoint policy's inputs (runtime/checkpoints.rs), once it runs.
    policy: Mutex<Option<Sender<Option<super::checkpoints::Input>>>>,
    /// PMI fences across the nodes (runtime/pmi.rs).
    pmi: Mutex<super::pmi::Coordinator>,
    /// The job recovers lost ranks: a job-ending MPI event waits this long for a new MPI
    /// incarnation before it ends the job (`runtime/mpi_recovery.rs`).
    mpi_hold: Mutex<Option<Duration>>,
}

/// The running job's hub.
pub struct Hub {
    inner: Arc<Inner>,
    addr: SocketAddr,
    starts: Option<Receiver<NodeToStart>>,
}

impl Hub {
    /// Listens for nodes on `bind` (they reach it at `advertised`), creates the job
    /// directory and its socket.
    pub fn start(
        bind: IpAddr,
        advertised: IpAddr,
        secret: ClusterSecret,
        mode: &str,
        job_ranks: u64,
        nodes_with_ranks: BTreeSet<NodeId>,
    ) -> Result<Hub> {
        let listener = TcpListener::bind((bind, 0)).map_err(|e| LauncherError::Io {
            context: format!("listening for nodes on {bind}"),
            source: e,
        })?;
        let port = listener
            .local_addr()
            .map_err(|e| LauncherError::Io {
                context: "reading the runtime listener's address".into(),
                source: e,
            })?
            .port();
        let dir = JobDir::create(mode, &secret)?;
        let socket = control::bind_unix(&dir.socket())?;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                ranked: nodes_with_ranks.clone(),
                ..State::default()
            }),
            changed: Condvar::new(),
            dir: Mutex::new(dir),
            secret: secret.clone(),
            advertised,
            job_ranks,
            nodes_with_ranks,
            to_start: Mutex::new(tx),
            policy: Mutex::new(None),
            pmi: Mutex::new(super::pmi::Coordinator::new(
                u32::try_from(job_ranks).unwrap_or(u32::MAX),
            )),
            mpi_hold: Mutex::new(None),
        });
        {
            let inner = inner.clone();
            std::thread::spawn(move || {
                for s in listener.incoming().flatten() {
                    let inner = inner.clone();
                    std::thread::spawn(move || node_link(inner, s));
                }
            });
        }
        {
            let inner = inner.clone();
            control::serve(
                Some(socket),
                None,
                secret,
                Protocol::Runtime,
                "krun: job socket",
                move |req: LauncherRequest| launcher_request(&inner, req),
            );
        }
        Ok(Hub {
            inner,
            addr: SocketAddr::new(advertised, port),
            starts: Some(rx),
        })
    }

    /// Where nodes reach the hub (krund `--runtime`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Nodes to start for `krun node add` (taken once by the job's loop).
    pub fn take_starts(&mut self) -> Option<Receiver<NodeToStart>> {
        self.starts.take()
    }

    /// Why the job must end now and its exit code, if a node reported a killed rank.
    pub fn abort_reason(&self) -> Option<(String, i32)> {
        self.inner.state.lock().expect("hub lock").abort.clone()
    }

    /// How many nodes registered with the hub so far (spares and added nodes too).
    pub fn linked(&self) -> usize {
        self.inner.state.lock().expect("hub lock").links.len()
    }

    /// The highest exit code the nodes reported for their ranks (`None`: none reported).
    pub fn ranks_code(&self) -> Option<i32> {
        let st = self.inner.state.lock().expect("hub lock");
        st.finished.values().copied().max()
    }

    /// The job is over: tells every node still linked to end.
    pub fn stop_all(&self) {
        let mut st = self.inner.state.lock().expect("hub lock");
        for link in st.links.values_mut() {
            if let Some((s, w)) = link.writer.as_mut() {
                let _ = w.send(s, &LauncherToNode::Stop);
            }
        }
    }

    /// The job recovers lost ranks (`--spares`, `--checkpoint-interval`): a job-ending MPI
    /// event (an abort, a rank lost, a fence that cannot complete) waits up to `grace` for
    /// a recovery to restart every rank, which drops it (`runtime/mpi_recovery.rs`).
    pub fn hold_mpi_ends(&self, grace: Duration) {
        *self.inner.mpi_hold.lock().expect("hold lock") = Some(grace);
    }

    /// Sends a command to every node still linked (for the checkpoint policy). A `Restart`
    /// of every rank starts a new MPI incarnation at krun first.
    pub fn broadcaster(&self) -> super::checkpoints::Broadcast {
        let inner = self.inner.clone();
        Arc::new(move |msg: &LauncherToNode| {
            if let LauncherToNode::Restart { wiring, ranks, .. } = msg {
                let size = inner.job_ranks as usize;
                if super::mpi_recovery::placement(size, ranks).is_some() {
                    inner.pmi.lock().expect("pmi lock").reincarnate(*wiring);
                }
            }
            let mut st = inner.state.lock().expect("hub lock");
            let mut sent = BTreeSet::new();
            for (&node, link) in st.links.iter_mut().filter(|(_, l)| !l.bye) {
                if let Some((s, w)) = link.writer.as_mut() {
                    if w.send(s, msg).is_ok() {
                        sent.insert(node);
                    }
                }
            }
            sent
        })
    }

    /// Node reports, failures and `krun checkpoint` requests go to the checkpoint policy.
    pub fn set_policy(&self, tx: Sender<Option<super::checkpoints::Input>>) {
        *self.inner.policy.lock().expect("policy lock") = Some(tx);
    }

    pub fn job_dir(&self) -> std::path::PathBuf {
        self.inner.dir.lock().expect("dir lock").path.clone()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Ok(dir) = self.inner.dir.lock() {
            dir.remove();
        }
    }
}

/// One node's registration link: its views, until it ends.
fn node_link(inner: Arc<Inner>, mut s: TcpStream) {
    let peer = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "unknown peer".into());
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut session = match Session::server(&mut s, &inner.secret, Protocol::Runtime) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("krun: refused a node link from {peer}: {e}");
            return;
        }
    };
    let me = match session.rx.recv::<NodeToLauncher>(&mut s) {
        Ok(NodeToLauncher::Register(a)) => a,
        Ok(other) => {
            eprintln!("krun: {peer} sent {other:?} before registering; closed");
            return;
        }
        Err(e) => {
            eprintln!("krun: node link from {peer}: {e}");
            return;
        }
    };
    let _ = s.set_read_timeout(None);
    let node = me.node;
    let writer = s.try_clone().ok().map(|c| (c, session.tx));
    {
        let mut st = inner.state.lock().expect("hub lock");
        st.links.insert(
            node,
            Link {
                addresses: me.clone(),
                writer,
                bye: false,
            },
        );
        st.reserved.remove(&node);
        // A spare that registers after every node with ranks said `Bye` (its ranks can end
        // before a slower node is up) is stopped now: no later `Bye` would.
        stop_spares_when_done(&mut st);
    }
    if let Err(e) = inner.dir.lock().expect("dir lock").register(me.clone()) {
        eprintln!("krun: job directory: {e}");
    }
    inner.changed.notify_all();
    // After the link is in: a checkpoint barrier waiting for this node goes out again.
    to_policy(
        &inner,
        super::checkpoints::Input::FromNode(node, NodeToLauncher::Register(me)),
    );
    loop {
        match session.rx.recv::<NodeToLauncher>(&mut s) {
            Ok(NodeToLauncher::View {
                epoch,
                mut members,
                failures,
            }) => {
                // A node's view can list a failure agreed after the epoch it reports (two
                // nodes killed at once: both failures in its change log, its members still
                // those of the first): the policy gets the newest epoch the message names,
                // with no failed node among the members (else it planned a rank back onto a
                // dead node, again and again).
                let epoch = failures.iter().map(|&(e, _)| e).fold(epoch, u64::max);
                members.retain(|m| !failures.iter().any(|&(_, n)| n == *m));
                let mut st = inner.state.lock().expect("hub lock");
                let mut failed = Vec::new();
                for (e, n) in failures {
                    let planned = st.links.get(&n).is_some_and(|l| l.bye);
                    if st.reported.insert(e) && !planned {
                        eprintln!("krun: node {n} failed at epoch {e}");
                        failed.push(n);
                    }
                    st.ranked.remove(&n);
                }
                if epoch >= st.epoch {
                    st.epoch = epoch;
                    st.members = members.clone();
                }
                drop(st);
                if !failed.is_empty() {
                    to_policy(
                        &inner,
                        super::checkpoints::Input::View {
                            epoch,
                            members,
                            failed,
                        },
                    );
                }
                inner.changed.notify_all();
            }
            Ok(NodeToLauncher::Bye) => {
                let mut st = inner.state.lock().expect("hub lock");
                if let Some(l) = st.links.get_mut(&node) {
                    l.bye = true;
                    l.writer = None;
                }
                stop_spares_when_done(&mut st);
            }
            Ok(NodeToLauncher::Register(_)) => {}
            Ok(NodeToLauncher::RankKilled { rank, signal }) => {
                let mut st = inner.state.lock().expect("hub lock");
                st.abort.get_or_insert((
                    format!(
                        "rank {rank} on node {node} was killed by {}",
                        crate::ranks::signal_name(signal)
                    ),
                    128 + signal,
                ));
                inner.changed.notify_all();
            }
            Ok(msg @ NodeToLauncher::Restarted { .. }) => {
                // The node runs ranks now (a spare took lost ones on).
                inner.state.lock().expect("hub lock").ranked.insert(node);
                to_policy(&inner, super::checkpoints::Input::FromNode(node, msg));
            }
            Ok(NodeToLauncher::Finished { code }) => {
                inner
                    .state
                    .lock()
                    .expect("hub lock")
                    .finished
                    .insert(node, code);
            }
            Ok(NodeToLauncher::CheckpointAsked) => to_policy(
                &inner,
                super::checkpoints::Input::Request(policies::primitives::RequestSource::Signal),
            ),
            Ok(NodeToLauncher::Pmi(msg)) => {
                let actions = inner.pmi.lock().expect("pmi lock").from_node(node, msg);
                pmi_actions(&inner, actions);
            }
            Ok(other) => to_policy(&inner, super::checkpoints::Input::FromNode(node, other)),
            Err(_) => break,
        }
    }
    let said_bye = inner
        .state
        .lock()
        .expect("hub lock")
        .links
        .get(&node)
        .is_some_and(|l| l.bye);
    if !said_bye {
        let actions = inner.pmi.lock().expect("pmi lock").node_gone(node);
        pmi_actions(&inner, actions);
    }
}

/// Carries out the PMI coordinator's actions: fence answers to every node still linked; a
/// job-ending event (abort, a rank lost) becomes the job's abort reason and exit code (in
/// a job that recovers, once no new MPI incarnation started within the hold).
fn pmi_actions(inner: &Arc<Inner>, actions: Vec<super::pmi::Action>) {
    let hold = *inner.mpi_hold.lock().expect("hold lock");
    for a in actions {
        if let (Some(grace), super::pmi::Action::End { reason, code }) = (hold, &a) {
            let wiring = inner.pmi.lock().expect("pmi lock").wiring();
            let (inner, reason, code) = (inner.clone(), reason.clone(), *code);
            std::thread::spawn(move || {
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    if inner.pmi.lock().expect("pmi lock").wiring() > wiring {
                        eprintln!(
                            "krun: {reason}: dropped, every rank was restarted since \
                             (a recovery)"
                        );
                        return;
                    }
                    if inner.state.lock().expect("hub lock").abort.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                pmi_actions_now(&inner, vec![super::pmi::Action::End { reason, code }]);
            });
            continue;
        }
        pmi_actions_now(inner, vec![a]);
    }
}

fn pmi_actions_now(inner: &Inner, actions: Vec<super::pmi::Action>) {
    for a in actions {
        let mut st = inner.state.lock().expect("hub lock");
        match a {
            super::pmi::Action::Broadcast(msg) => {
                let msg = LauncherToNode::Pmi(msg);
                for link in st.links.values_mut().filter(|l| !l.bye) {
                    if let Some((s, w)) = link.writer.as_mut() {
                        let _ = w.send(s, &msg);
                    }
                }
            }
            super::pmi::Action::Send(node, msg) => {
                let msg = LauncherToNode::Pmi(msg);
                if let Some((s, w)) = st
                    .links
                    .get_mut(&node)
                    .filter(|l| !l.bye)
                    .and_then(|l| l.writer.as_mut())
                {
                    let _ = w.send(s, &msg);
                }
            }
            super::pmi::Action::End { reason, code } => {
                // The first reason ends the job (krun prints it); later ones are printed
                // here, so that every rank lost or aborted is named.
                match &st.abort {
                    Some(_) => eprintln!("krun: {reason}"),
                    None => st.abort = Some((reason, code)),
                }
                drop(st);
                inner.changed.notify_all();
            }
        }
    }
}

/// Once every node that runs ranks said `Bye`, the nodes still waiting for ranks (spares)
/// end: they meet the others at the nodes' final barrier.
fn stop_spares_when_done(st: &mut State) {
    let State { links, ranked, .. } = st;
    if ranked.is_empty() || !ranked.iter().all(|n| links.get(n).is_some_and(|l| l.bye)) {
        return;
    }
    for link in links.values_mut().filter(|l| !l.bye) {
        if let Some((s, w)) = link.writer.as_mut() {
            let _ = w.send(s, &LauncherToNode::Stop);
        }
    }
}

fn to_policy(inner: &Inner, input: super::checkpoints::Input) {
    if let Some(tx) = inner.policy.lock().expect("policy lock").as_ref() {
        let _ = tx.send(Some(input));
    }
}
