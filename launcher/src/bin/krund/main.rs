//! krund: the node runtime. Joins the job's bootstrap service, opens this node's fabric
//! endpoint, and runs the node's share of the job: its ranks of a program, or the built-in
//! RMA exchange workload.
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fabric::bootstrap::BootstrapClient;
use fabric::FabricConfig;
use launcher::cli::KrundCli;
use launcher::ranks::{NodeShare, Placement};
use launcher::runtime::store_node::StoreSettings;
use launcher::runtime::{Runtime, RuntimeConfig};
use launcher::{exchange, LauncherError};

mod store;
use store::{
    store_delay, store_up_front, swap_machines_and_store, StoreGate, StoreStart, StoreWay,
};

/// A node joining a running job (`krun node add`).
struct JoinArgs {
    node_id: usize,
    peers: std::collections::BTreeMap<u32, String>,
    job_ranks: u64,
    runtime: Option<SocketAddr>,
    bind: Option<std::net::IpAddr>,
    /// Members whose stores this node reads moved ranks' images from.
    store_peers: Vec<(u32, String)>,
    tag_output: bool,
    /// The job's program: ranks moved here run it.
    program: Vec<String>,
}

struct Args {
    bootstrap: SocketAddr,
    runtime: Option<SocketAddr>,
    node_id: usize,
    nnodes: usize,
    placement: Option<Placement>,
    tag_output: bool,
    bind_to: launcher::binding::BindTo,
    report_bindings: bool,
    program: Vec<String>,
}

/// What krund was asked to run.
enum Mode {
    Listen {
        spec: Option<String>,
        insecure: bool,
    },
    Join(JoinArgs),
    Node(Args),
    /// `--ghost-restore [--output FILE]`: an image on stdin (`krun ghost migrate --to`).
    GhostRestore(Option<std::path::PathBuf>),
}

/// Checks what clap cannot: which flags each mode needs, and that they agree.
fn mode(cli: KrundCli) -> Result<Mode, LauncherError> {
    if let Some(spec) = cli.listen {
        return Ok(Mode::Listen {
            spec: (!spec.is_empty()).then_some(spec),
            insecure: cli.insecure,
        });
    }
    if cli.ghost_restore {
        return Ok(Mode::GhostRestore(cli.output));
    }
    if let Some(peers) = cli.join {
        let missing =
            |n: &str| LauncherError::Usage(format!("{n} is required with --join (krund --help)"));
        return Ok(Mode::Join(JoinArgs {
            node_id: cli.node_id.ok_or_else(|| missing("--node-id"))?,
            peers,
            job_ranks: cli.job_ranks.ok_or_else(|| missing("--job-ranks"))?,
            runtime: cli.runtime,
            bind: cli.bind,
            store_peers: cli.store_peers.unwrap_or_default().into_iter().collect(),
            tag_output: cli.tag_output,
            program: cli.program,
        }));
    }
    let missing = |n: &str| LauncherError::Usage(format!("{n} is required (krund --help)"));
    let mut node_id = cli.node_id;
    if node_id.is_none() {
        if let Ok(v) = std::env::var("SLURM_NODEID") {
            node_id = Some(v.parse().map_err(|_| {
                LauncherError::Usage(format!("SLURM_NODEID {v:?} is not a number"))
            })?);
        }
    }
    let args = Args {
        bootstrap: cli
            .bootstrap
            .ok_or_else(|| missing("--listen, --join or --bootstrap"))?,
        runtime: cli.runtime,
        node_id: node_id.ok_or_else(|| missing("--node-id (or SLURM_NODEID)"))?,
        nnodes: cli.nnodes.ok_or_else(|| missing("--nnodes"))?,
        placement: cli
            .counts
            .as_deref()
            .map(Placement::parse_counts)
            .transpose()?,
        tag_output: cli.tag_output,
        bind_to: cli.bind_to,
        report_bindings: cli.report_bindings,
        program: cli.program,
    };
    if args.node_id >= args.nnodes {
        return Err(LauncherError::Usage(format!(
            "node id {} is not below --nnodes {}",
            args.node_id, args.nnodes
        )));
    }
    if let Some(p) = &args.placement {
        if p.count.len() != args.nnodes {
            return Err(LauncherError::Usage(format!(
                "--counts names {} nodes, --nnodes is {}",
                p.count.len(),
                args.nnodes
            )));
        }
    }
    if args.program.is_empty() != args.placement.is_none() {
        return Err(LauncherError::Usage(
            "--counts and a PROGRAM go together".into(),
        ));
    }
    Ok(Mode::Node(args))
}

/// `krund --listen [ADDR][:PORT] [--insecure]`: the host daemon. Without an address it
/// listens on loopback only; it refuses to start without a cluster secret unless
/// `--insecure` is given and the address is a loopback one.
fn listen(spec: Option<String>, insecure: bool) -> Result<i32, LauncherError> {
    let spec = spec.as_deref();
    let port = launcher::daemon::DEFAULT_PORT;
    let addr = match spec {
        None => format!("127.0.0.1:{port}"),
        Some(s) if s.starts_with(':') => format!("127.0.0.1{s}"),
        Some(s) if s.contains(':') => s.to_string(),
        Some(s) => format!("{s}:{port}"),
    };
    let addr: SocketAddr = addr.parse().map_err(|_| {
        LauncherError::Usage(format!(
            "--listen {:?} is not ADDR[:PORT]",
            spec.unwrap_or_default()
        ))
    })?;
    if spec.is_none() {
        eprintln!("krund: no address given: listening on loopback only (give --listen ADDR to serve other hosts)");
    }
    let secret = fabric::secret::ClusterSecret::from_env()?;
    let access = launcher::daemon::check_access(&addr, secret, insecure)?;
    launcher::daemon::serve(addr, access)?;
    Ok(0)
}

fn run() -> Result<i32, LauncherError> {
    // A scheduler's early SIGUSR1 is a checkpoint request, never the end of a starting node.
    launcher::ranks::catch_checkpoint_requests();
    let cli = KrundCli::parse();
    launcher::config::load()?;
    let args = match mode(cli)? {
        Mode::Listen { spec, insecure } => return listen(spec, insecure),
        Mode::Join(join_args) => return join(join_args),
        Mode::GhostRestore(output) => {
            return launcher::ghost_cli::restore_and_follow(output.as_deref())
        }
        Mode::Node(args) => args,
    };
    // Before any thread starts (it sets a variable of the environment).
    launcher::binding::quiet_hwloc_plugins();
    // The node's PMIx server starts at once, beside the bootstrap and runtime set-up (its
    // library reads the node's topology: tens of milliseconds of CPU), not after them.
    let early_mpi = match &args.placement {
        Some(p) => Some(EarlyMpi::start(args.node_id, &p.count)?),
        None => None,
    };
    let mut boot = BootstrapClient::connect(
        args.bootstrap,
        args.node_id,
        args.nnodes,
        Duration::from_secs(60),
    )?;
    let mut config = FabricConfig::default().with_env()?;
    let mut rank_env = Vec::new();
    let bind_ip = match std::env::var("KRUN_FABRIC_BIND") {
        Ok(ip) if !ip.is_empty() => ip.parse().map_err(|_| {
            LauncherError::Usage(format!("KRUN_FABRIC_BIND={ip:?} is not an IP address"))
        })?,
        _ => {
            // Bind the fabric where this host reaches the job: its address on that network.
            let ip = boot.local_addr()?.ip();
            config.bind_address = ip.to_string();
            rank_env.push(("KRUN_FABRIC_BIND".to_string(), ip.to_string()));
            ip
        }
    };
    let job_ranks = args.placement.as_ref().map_or(0, |p| p.total()) as u64;
    // In a job whose policy recovers, the store's endpoint opens now, beside the runtime's
    // start-up, and its address goes with the nodes' second round (see `store_up_front`).
    let store_ep = match (&args.placement, store_up_front()?) {
        (Some(_), true) => {
            let config = config.clone();
            Some(std::thread::spawn(move || fabric::open(&config)))
        }
        _ => None,
    };
    let mut cfg = runtime_config(args.node_id, bind_ip, args.runtime, job_ranks)?;
    if let Some(p) = &args.placement {
        let first = p.first[args.node_id] as u64;
        cfg.starting = (first..first + p.count[args.node_id] as u64).collect();
    }
    let bound = Runtime::bind(cfg)?;
    // The nodes' adaptation addresses: the initial membership.
    let cards = boot.allgather(bound.adaptation_addr().as_bytes())?;
    let peers = cards
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != args.node_id)
        .map(|(n, c)| (n as u32, String::from_utf8_lossy(c).into_owned()))
        .collect();
    // Which nodes share this machine, for pinning (see `MachineShare`); with the store's
    // addresses when they go up front.
    let (machines, early_store) = match store_ep {
        None => (boot.allgather(&launcher::ranks::machine_id())?, None),
        Some(opening) => {
            let ep = opening.join().map_err(|_| {
                LauncherError::Usage("opening the store's endpoint panicked".into())
            })??;
            let (machines, addresses) =
                swap_machines_and_store(&mut boot, args.node_id, &ep.address().to_bytes())?;
            (machines, Some((ep, addresses)))
        }
    };
    let runtime = std::sync::Arc::new(bound.start(peers, false)?);
    if let Some(placement) = &args.placement {
        // The node's endpoint and its checkpoint store come up beside the ranks, not before
        // them: opening libfabric costs ~0.3 s here (it reads /proc/kallsyms); a checkpoint
        // reported before the store is up waits for it.
        let settings = StoreSettings::from_env()?;
        runtime.expect_agent();
        let delay = store_delay()?;
        let gate = std::sync::Arc::new(StoreGate::default());
        if placement.count[args.node_id] == 0 {
            // No ranks here: nothing of this node's can still need a store.
            gate.ranks_ended(true);
        }
        {
            let gate = gate.clone();
            runtime.on_agent_wanted(move || gate.want());
        }
        // The job's bootstrap: with the store thread while it swaps the store's addresses
        // through it, else here (the nodes' last barrier).
        let mut main_boot = Some(boot);
        let store = StoreStart {
            runtime: runtime.clone(),
            node_id: args.node_id,
            job_ranks: placement.total() as u32,
            counts: placement.count.clone(),
            settings,
            secret: fabric::secret::ClusterSecret::from_env()?.ok_or_else(|| {
                LauncherError::Usage("no cluster secret for the checkpoint store".into())
            })?,
        }
        .spawn(match early_store {
            // Nothing of the store's start-up goes through the job's bootstrap any more: a
            // node that dies now costs the others nothing but its own place.
            Some((ep, addresses)) => StoreWay::UpFront(ep, addresses),
            None => StoreWay::Gated {
                boot: main_boot.take().expect("the bootstrap is still here"),
                gate: gate.clone(),
                delay,
                config: Box::new(config.clone()),
            },
        });
        launcher::ranks::catch_forwarded_signals();
        rank_env.push((
            "KRUN_NODE_SOCKET".to_string(),
            runtime.rank_socket().to_string_lossy().into_owned(),
        ));
        // A spare waits for ranks to restart until krun stops it.
        let stay = (placement.count[args.node_id] == 0).then(|| {
            let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (rt, set) = (runtime.clone(), flag.clone());
            std::thread::spawn(move || {
                rt.wait_stop();
                set.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            flag
        });
        let (commands_tx, commands) = std::sync::mpsc::channel();
        runtime.set_rank_commands(commands_tx.clone());
        {
            // An orphaned node ends its ranks: krun is gone (its link closed) or told the
            // node to stop while ranks still run.
            let runtime = runtime.clone();
            std::thread::spawn(move || {
                let why = runtime.wait_stop();
                let _ = commands_tx.send(launcher::ranks::RankCommand::Terminate { reason: why });
            });
        }
        // The node's MPI servers (`krun --mpi`, default both PMI-1 and PMIx).
        let mpi = early_mpi
            .expect("a node with a placement starts its MPI servers early")
            .finish(&runtime, args.node_id, &placement.count)?;
        // The store's delay counts from when the node's ranks run (see `StoreGate`); a
        // share that ends before starting them drops the sender, which starts it too.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _ = started_rx.recv();
                gate.ranks_started();
            });
        }
        let share = NodeShare {
            node_id: args.node_id,
            nnodes: args.nnodes,
            first_rank: placement.first[args.node_id],
            local_size: placement.count[args.node_id],
            size: placement.total(),
            tag_output: args.tag_output,
            program: args.program,
            env: rank_env,
            bind_to: args.bind_to,
            report_bindings: args.report_bindings,
            machine: launcher::ranks::MachineShare::among(
                args.node_id,
                &machines,
                &placement.count,
            ),
            events: Some(if mpi.servers.is_empty() {
                runtime.rank_events()
            } else {
                launcher::runtime::mpi::tee_events(
                    mpi.servers.clone(),
                    runtime.pmi_teller(),
                    runtime.rank_events(),
                )
            }),
            stay,
            // With spares (KRUN_SPARES, set by krun), a failed rank may be restarted by a
            // recovery (its peers on a failed node are gone): its exit counts only once the
            // failure had time to be agreed and acted on.
            exit_grace: exit_grace()?,
            commands: Some(std::sync::Arc::new(std::sync::Mutex::new(commands))),
            rank_setup: mpi.setup.clone(),
            started: Some(started_tx),
        };
        let node_id = args.node_id;
        let result = (|| {
            let code = launcher::ranks::run_share(&share)?;
            if launcher::ranks::spare_signalled() {
                // A spare told to end: nothing of the job ran here, nothing to wait for.
                return Ok(0);
            }
            // Whether the store may be left out (see `StoreGate`): the ranks all ended well
            // and none moved away or lost a peer.
            gate.ranks_ended(code == 0 && !runtime.was_drained() && !runtime.membership_shrank());
            runtime.finish_with(code);
            if runtime.was_drained() {
                // The node's ranks moved away; it leaves once the membership agreed on it.
                if runtime.wait_stop_timeout(Duration::from_secs(60)).is_none() {
                    eprintln!("krund: node {node_id}: drained, but no leave was agreed in 60 s");
                }
                launcher::runtime::migrate::remove_move_images();
                // A drain soon after the start may come while the nodes still swap their
                // stores' addresses through the job's bootstrap: leaving in the middle of
                // that round would fail it for every node (and the job).
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !store.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Ok(code);
            }
            // After a node left or failed, the initial nodes cannot all meet at the barrier
            // (nor, when one died early, at the store's address exchange). A rank killed by
            // a signal (code > 128) ends the job: leave at once so krun ends the others
            // instead of waiting here for ranks that wait for the dead one.
            if code > 128 {
                runtime.flush_killed_reports(Duration::from_secs(5));
                return Ok(code);
            }
            if !runtime.membership_shrank() {
                let boot = store
                    .join()
                    .map_err(|_| LauncherError::Usage("the store thread panicked".into()))?;
                if let Some(mut boot) = boot.or(main_boot) {
                    boot.barrier()?;
                }
            } else {
                // The store thread may wait for a dead node's address: do not wait long for
                // it, but do not leave while it may be inside libfabric opening the endpoint.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !store.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Ok(code)
        })();
        return result;
    }
    let ep = fabric::open(&config)?;
    let report = exchange::run(ep.as_ref(), &mut boot)?;
    runtime.finish();
    println!(
        "node {}/{}: done: {} blocks verified, leader is node {}",
        args.node_id,
        args.nnodes,
        report.verified_blocks,
        report.leader - 1
    );
    Ok(0)
}

/// The node's MPI servers: PMI-1 (MPICH) and PMIx (Open MPI), as `krun --mpi` asks.
struct MpiServers {
    servers: Vec<std::sync::Arc<dyn launcher::runtime::mpi::RankWatch>>,
    setup: Option<launcher::runtime::mpi::RankSetup>,
    pmix: Option<std::sync::Arc<launcher::runtime::pmix::PmixServer>>,
}

impl Drop for MpiServers {
    fn drop(&mut self) {
        if let Some(p) = &self.pmix {
            p.finish();
        }
    }
}

/// The node's MPI servers on their way: PMIx's library starts in a thread of its own from
/// krund's start (krun's reports reach it once the runtime is up, see
/// [`EarlyMpi::finish`]); PMI-1's server is made with the runtime.
struct EarlyMpi {
    mode: launcher::runtime::mpi::MpiMode,
    job: String,
    pmix: Option<
        std::thread::JoinHandle<
            Result<std::sync::Arc<launcher::runtime::pmix::PmixServer>, LauncherError>,
        >,
    >,
    /// Where the PMIx server's reports go once the runtime is up (none are made before a
    /// rank connects, which is after).
    tell: std::sync::Arc<std::sync::OnceLock<launcher::runtime::mpi::Teller>>,
}

impl EarlyMpi {
    fn start(node: usize, counts: &[usize]) -> Result<EarlyMpi, LauncherError> {
        use launcher::runtime::{mpi, pmix};
        let mode = mpi::MpiMode::from_env()?;
        let job = std::env::var("KRUN_JOB_ID").unwrap_or_else(|_| "0".into());
        let tell: std::sync::Arc<std::sync::OnceLock<mpi::Teller>> = Default::default();
        let pmix = (mode.pmix() && may_run_ranks(node, counts)).then(|| {
            let (counts, job, late) = (counts.to_vec(), job.clone(), tell.clone());
            let teller: mpi::Teller = std::sync::Arc::new(move |m| {
                if let Some(t) = late.get() {
                    t(m)
                }
            });
            std::thread::spawn(move || {
                pmix::PmixServer::start(node, &counts, &job, teller).map_err(|e| {
                    LauncherError::Node {
                        node,
                        message: format!(
                            "cannot serve PMIx (krun --mpi pmi1 or none does without): {e}"
                        ),
                    }
                })
            })
        });
        Ok(EarlyMpi {
            mode,
            job,
            pmix,
            tell,
        })
    }

    /// Waits for the PMIx server, makes PMI-1's, and plugs both into the runtime.
    fn finish(
        mut self,
        runtime: &Runtime,
        node: usize,
        counts: &[usize],
    ) -> Result<MpiServers, LauncherError> {
        use launcher::runtime::{mpi, pmi};
        let _ = self.tell.set(runtime.pmi_teller());
        let mut servers: Vec<std::sync::Arc<dyn mpi::RankWatch>> = Vec::new();
        let mut setups = Vec::new();
        if self.mode.pmi1() {
            let server = pmi::NodeServer::new(node, counts, &self.job, runtime.pmi_teller());
            setups.push(server.rank_setup());
            servers.push(server);
        }
        let mut pmix_server = None;
        if let Some(started) = self.pmix.take() {
            let server = started.join().map_err(|_| LauncherError::Node {
                node,
                message: "the PMIx start-up thread panicked".into(),
            })??;
            setups.push(server.rank_setup());
            servers.push(server.clone());
            pmix_server = Some(server);
        }
        runtime.set_pmi(servers.clone());
        Ok(MpiServers {
            setup: (!setups.is_empty()).then(|| mpi::combine_setups(setups)),
            servers,
            pmix: pmix_server,
        })
    }
}

/// Whether ranks may ever run on this node: it starts with some, or the job may move ranks
/// onto it (a recovery or a drain through the policy: `KRUN_RECOVERS`; a spare:
/// `KRUN_SPARES`). A node that never runs a rank does not start the PMIx server (its
/// library reads the node's topology: tens of milliseconds of CPU per node, what `krun
/// --local 4 -n 1` paid three times for nothing); fences are gathered over ranks, not
/// nodes, so such a node takes no part in them.
fn may_run_ranks(node: usize, counts: &[usize]) -> bool {
    let set = |key: &str| std::env::var(key).is_ok_and(|v| !v.trim().is_empty() && v.trim() != "0");
    counts.get(node).is_some_and(|&c| c > 0) || set("KRUN_RECOVERS") || set("KRUN_SPARES")
}

impl Drop for EarlyMpi {
    /// krund ends before its ranks started (an error): the server started still cleans up.
    fn drop(&mut self) {
        if let Some(Ok(Ok(server))) = self.pmix.take().map(|t| t.join()) {
            server.finish();
        }
    }
}

/// How long a failed rank's exit is held back: with spares (KRUN_SPARES) or a recovering
/// policy (KRUN_RECOVERS), until the failure had time to be agreed and acted on.
fn exit_grace() -> Result<Option<Duration>, LauncherError> {
    Ok(
        match std::env::var("KRUN_SPARES")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
        {
            Some(n) if n > 0 => Some(failure_timeout()? + Duration::from_secs(20)),
            _ if std::env::var_os("KRUN_RECOVERS").is_some() => {
                Some(failure_timeout()? + Duration::from_secs(20))
            }
            _ => None,
        },
    )
}

/// `KRUN_FAILURE_TIMEOUT_MS` (`[runtime] failure_timeout_ms`), default
/// [`launcher::runtime::DEFAULT_FAILURE_TIMEOUT`].
fn failure_timeout() -> Result<Duration, LauncherError> {
    match std::env::var("KRUN_FAILURE_TIMEOUT_MS") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
            Ok(ms) if (100..=3_600_000).contains(&ms) => Ok(Duration::from_millis(ms)),
            _ => Err(LauncherError::Config {
                place: "environment".into(),
                key: "KRUN_FAILURE_TIMEOUT_MS".into(),
                reason: format!("{v:?} is not a number of milliseconds between 100 and 3600000"),
            }),
        },
        _ => Ok(launcher::runtime::DEFAULT_FAILURE_TIMEOUT),
    }
}

fn runtime_config(
    node: usize,
    bind: std::net::IpAddr,
    launcher: Option<SocketAddr>,
    job_ranks: u64,
) -> Result<RuntimeConfig, LauncherError> {
    let secret = fabric::secret::ClusterSecret::from_env()?.ok_or_else(|| {
        LauncherError::Usage(
            "no cluster secret: krun passes one (KRUN_SECRET), or set KRUN_SECRET_FILE".into(),
        )
    })?;
    Ok(RuntimeConfig {
        node: u32::try_from(node)
            .map_err(|_| LauncherError::Usage(format!("node id {node} is too large")))?,
        bind,
        launcher,
        job_ranks,
        secret,
        agent: None,
        verbose: std::env::var_os("KRUN_RUNTIME_VERBOSE").is_some(),
        failure_timeout: failure_timeout()?,
        starting: Vec::new(),
    })
}

/// A node joining a running job: a member of the membership (its services take their share
/// of the entries) without ranks of its own, until krun stops it.
fn join(args: JoinArgs) -> Result<i32, LauncherError> {
    // Without --bind: the address this host reaches krun from (no packet is sent).
    let bind = match (args.bind, args.runtime) {
        (Some(ip), _) => ip,
        (None, Some(krun)) => std::net::UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|u| u.connect(krun).and_then(|()| u.local_addr()))
            .map(|a| a.ip())
            .map_err(|e| LauncherError::Io {
                context: format!("finding this host's address towards krun at {krun}"),
                source: e,
            })?,
        (None, None) => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
    };
    let runtime = std::sync::Arc::new(
        Runtime::bind(runtime_config(
            args.node_id,
            bind,
            args.runtime,
            args.job_ranks,
        )?)?
        .start(args.peers, true)?,
    );
    if !args.program.is_empty() {
        // Ranks may be moved here (a drain): run them like a spare's.
        launcher::runtime::drain::set_store_peers(args.store_peers);
        let share = launcher::added_nodes::JoinedShare {
            node_id: args.node_id,
            job_ranks: args.job_ranks as usize,
            bind,
            tag_output: args.tag_output,
            program: args.program,
            exit_grace: exit_grace()?,
        };
        let code = share.run(&runtime)?;
        runtime.finish();
        return Ok(code);
    }
    let why = runtime.wait_stop();
    runtime.finish();
    if std::env::var_os("KRUN_RUNTIME_VERBOSE").is_some() {
        eprintln!("krund: node {}: {why}", args.node_id);
    }
    Ok(0)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("krund: error: {e}");
            ExitCode::from(if matches!(e, LauncherError::Usage(_)) {
                2
            } else {
                1
            })
        }
    }
}
