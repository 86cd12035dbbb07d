//! The node's checkpoint store at krund's start: when it starts ([`StoreGate`], beside the
//! ranks) or whether it goes up front with the nodes' second bootstrap round
//! ([`store_up_front`]), and its start on the swapped addresses.
use std::time::Duration;

use fabric::bootstrap::BootstrapClient;
use fabric::secret::ClusterSecret;
use fabric::FabricConfig;
use launcher::runtime::store_node::StoreSettings;
use launcher::runtime::Runtime;
use launcher::LauncherError;
use std::sync::Arc;
use std::thread::JoinHandle;

/// When the node's checkpoint store starts. Its fabric endpoint costs libfabric's set-up
/// (here about 0.1 s of CPU per node, most of it the providers zeroing their buffer pools),
/// which a job whose ranks all end at once never needs. So the store waits until the node's
/// ranks ended, [`STORE_DELAY`] passed since they were all started, or something needs it (a checkpoint or a restart
/// waits for the agent: [`Runtime::on_agent_wanted`]); then every node says through the
/// job's bootstrap whether its ranks all ended with 0, and only when every node's did is
/// the store left out: the answer is the same on every node, and the store addresses'
/// exchange that follows is collective.
#[derive(Default)]
pub(crate) struct StoreGate {
    state: std::sync::Mutex<GateState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GateState {
    /// The node's ranks ended: all of them with 0 (and none moved away or lost a peer).
    ended_well: Option<bool>,
    /// A checkpoint or a restart waits for the store.
    wanted: bool,
    /// The node's ranks have all been started (the delay counts from then).
    ranks_started: bool,
}

/// How long a node's ranks may run, counted from when they all started, before its
/// checkpoint store starts anyway (unless `KRUN_STORE_DELAY_MS` says otherwise). Counted
/// from the node's start instead, a wide job whose ranks take longer than this to come up
/// on a loaded machine (1,024 ranks of /bin/true over 64 hosts on 2 cores) opened every
/// node's store: a fabric endpoint and its zeroed buffer pools per node, most of the
/// launch's time.
const STORE_DELAY: Duration = Duration::from_secs(1);

/// The longest the store waits for the node's ranks to be started before the delay counts
/// anyway.
const STORE_START_WAIT: Duration = Duration::from_secs(30);

/// `KRUN_STORE_DELAY_MS`; else none in a job with a checkpoint policy (`KRUN_RECOVERS`, set
/// by krun: its first checkpoint comes soon, and a buddy whose store was still starting
/// then did not answer the L2 reservation in time under load, which aborted it), else
/// [`STORE_DELAY`].
pub(crate) fn store_delay() -> Result<Duration, LauncherError> {
    let policy = std::env::var("KRUN_RECOVERS").is_ok_and(|v| v.trim() == "1");
    match std::env::var("KRUN_STORE_DELAY_MS") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
            Ok(ms) if ms <= 3_600_000 => Ok(Duration::from_millis(ms)),
            _ => Err(LauncherError::Config {
                place: "environment".into(),
                key: "KRUN_STORE_DELAY_MS".into(),
                reason: format!("{v:?} is not a number of milliseconds up to 3600000"),
            }),
        },
        _ if policy => Ok(Duration::ZERO),
        _ => Ok(STORE_DELAY),
    }
}

impl StoreGate {
    pub(crate) fn ranks_ended(&self, well: bool) {
        let mut s = self.state.lock().expect("store gate lock");
        s.ended_well.get_or_insert(well);
        self.changed.notify_all();
    }

    /// The node's ranks have all been started (`NodeShare::started`).
    pub(crate) fn ranks_started(&self) {
        self.state.lock().expect("store gate lock").ranks_started = true;
        self.changed.notify_all();
    }

    pub(crate) fn want(&self) {
        self.state.lock().expect("store gate lock").wanted = true;
        self.changed.notify_all();
    }

    /// Waits on the gate while `waiting` holds, at most `limit`.
    fn wait_while<'a>(
        &self,
        mut s: std::sync::MutexGuard<'a, GateState>,
        limit: Duration,
        waiting: impl Fn(&GateState) -> bool,
    ) -> std::sync::MutexGuard<'a, GateState> {
        let until = std::time::Instant::now() + limit;
        while waiting(&s) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .expect("store gate lock")
                .0;
        }
        s
    }

    /// Waits for the moment to decide (see [`StoreGate`]), then decides with the other
    /// nodes: true when the job needs its store.
    pub(crate) fn decide(
        &self,
        boot: &mut BootstrapClient,
        delay: Duration,
    ) -> Result<bool, LauncherError> {
        let ended_well = {
            let mut s = self.state.lock().expect("store gate lock");
            // First until the node's ranks are started (at most STORE_START_WAIT), then for
            // the delay.
            s = self.wait_while(s, STORE_START_WAIT, |g| {
                !g.wanted && g.ended_well.is_none() && !g.ranks_started
            });
            s = self.wait_while(s, delay, |g| !g.wanted && g.ended_well.is_none());
            !s.wanted && s.ended_well == Some(true)
        };
        let all = boot.allgather(&[u8::from(ended_well)])?;
        Ok(!all.iter().all(|b| b.as_slice() == [1]))
    }
}

/// How the node's store gets every node's store address.
pub(crate) enum StoreWay {
    /// Swapped up front with the nodes' second round ([`store_up_front`]).
    UpFront(Box<dyn fabric::Endpoint>, Vec<Vec<u8>>),
    /// Through the job's bootstrap once the gate decided the job needs a store
    /// ([`StoreGate`]); the store's thread gives the bootstrap back.
    Gated {
        boot: BootstrapClient,
        gate: Arc<StoreGate>,
        delay: Duration,
        config: Box<FabricConfig>,
    },
}

/// What the node's checkpoint store starts with.
pub(crate) struct StoreStart {
    pub runtime: Arc<Runtime>,
    pub node_id: usize,
    pub job_ranks: u32,
    pub counts: Vec<usize>,
    pub settings: StoreSettings,
    pub secret: ClusterSecret,
}

impl StoreStart {
    /// Starts the store in a thread of its own; the thread ends with the job's bootstrap
    /// when it had it ([`StoreWay::Gated`]). A store that cannot start is reported and the
    /// node runs without one (its agent is none).
    pub(crate) fn spawn(self, way: StoreWay) -> JoinHandle<Option<BootstrapClient>> {
        std::thread::spawn(move || {
            let (started, boot) = match way {
                StoreWay::UpFront(ep, addresses) => (self.run(ep, &addresses), None),
                StoreWay::Gated {
                    mut boot,
                    gate,
                    delay,
                    config,
                } => {
                    let started = gate.decide(&mut boot, delay).and_then(|needed| {
                        if !needed {
                            if std::env::var_os("KRUN_RUNTIME_VERBOSE").is_some() {
                                eprintln!(
                                    "krund: node {}: every rank ended before the job needed a \
                                     checkpoint store: none started",
                                    self.node_id
                                );
                            }
                            self.runtime.set_agent(None);
                            return Ok(());
                        }
                        let ep = fabric::open(&config)?;
                        let addresses = boot.allgather(&ep.address().to_bytes())?;
                        self.run(ep, &addresses)
                    });
                    (started, Some(boot))
                }
            };
            if let Err(e) = &started {
                eprintln!("krund: node {}: no checkpoint store: {e}", self.node_id);
                self.runtime.set_agent(None);
            }
            boot
        })
    }

    /// Starts the store on `ep`, every node's store address known (`addresses`, node
    /// order), placed by the view's cells; its agent goes into the runtime.
    fn run(
        &self,
        ep: Box<dyn fabric::Endpoint>,
        addresses: &[Vec<u8>],
    ) -> Result<(), LauncherError> {
        let cells = self.runtime.cells(Duration::from_secs(30))?;
        let (agent, events) = launcher::runtime::store_node::start(
            ep,
            self.node_id,
            addresses,
            &cells,
            &self.settings,
            &self.secret,
            self.job_ranks,
            &self.counts,
        )?;
        self.runtime.follow_agent(events);
        self.runtime.set_agent(Some(Arc::new(agent)));
        Ok(())
    }
}

/// Whether the store's endpoint opens at the node's start and its address goes with the
/// nodes' second bootstrap round (the machines'), instead of in rounds of its own beside
/// the ranks (see [`StoreGate`]). So in a job whose policy recovers (`KRUN_RECOVERS`, or
/// spares: `KRUN_SPARES`), unless `KRUN_STORE_DELAY_MS` is given: such a job always needs
/// its store, at once, and a node that died during the store's own rounds broke them for
/// every node (the job then ran on without any checkpoint: "no checkpoint store"). The
/// price is the endpoint's set-up before the second round, mostly hidden behind the
/// runtime's start.
pub(crate) fn store_up_front() -> Result<bool, LauncherError> {
    let recovers = std::env::var("KRUN_RECOVERS").is_ok_and(|v| v.trim() == "1")
        || std::env::var("KRUN_SPARES")
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .is_some_and(|n| n > 0);
    let delay_given = std::env::var("KRUN_STORE_DELAY_MS").is_ok_and(|v| !v.trim().is_empty());
    Ok(recovers && !delay_given)
}

/// Every node's machine id and store address, in node order.
pub(crate) type MachinesAndStores = (Vec<Vec<u8>>, Vec<Vec<u8>>);

/// The nodes' second round when the store goes up front: each node's machine id and store
/// address, as `postcard((machine_id, store_address))`.
pub(crate) fn swap_machines_and_store(
    boot: &mut BootstrapClient,
    node_id: usize,
    store_address: &[u8],
) -> Result<MachinesAndStores, LauncherError> {
    let card = postcard::to_allocvec(&(launcher::ranks::machine_id(), store_address.to_vec()))
        .map_err(|e| LauncherError::Node {
            node: node_id,
            message: format!("encoding the node's card: {e}"),
        })?;
    let cards = boot.allgather(&card)?;
    let mut machines = Vec::with_capacity(cards.len());
    let mut addresses = Vec::with_capacity(cards.len());
    for (n, c) in cards.iter().enumerate() {
        let (machine, address): (Vec<u8>, Vec<u8>) =
            postcard::from_bytes(c).map_err(|e| LauncherError::Node {
                node: node_id,
                message: format!("node {n}'s card (machine and store address): {e}"),
            })?;
        machines.push(machine);
        addresses.push(address);
    }
    Ok((machines, addresses))
}
