//! Nodes added to a running job (`krun node add [HOST]`): the job's runtime hub asks for
//! them, the job's wait loop starts them (a child here, or through a host's `krund --listen`
//! daemon) and waits for them like the job's own nodes. An added node of a program job runs
//! a rank runner with no rank ([`JoinedShare`]): a drain may move ranks to it, whose images
//! it reads from the members' stores (it has none of its own).
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use fabric::secret::ClusterSecret;

use crate::daemon::{DaemonClient, RunRequest};
use crate::error::{LauncherError, Result};
use crate::job::{Job, NodeSource};
use crate::node_proc::{forward, forward_remote, NodeProc};
use crate::ranks::Placement;
use crate::runtime::hub::{Hub, NodeToStart};

/// Starts the job's runtime hub: nodes register there, `krun status` and `krun node` find
/// the job through its directory.
pub(crate) fn start_hub(
    job: &Job,
    placement: Option<&Placement>,
    bind: IpAddr,
    advertised: IpAddr,
    secret: &ClusterSecret,
) -> Result<Hub> {
    let mode = match &job.nodes {
        NodeSource::Local(_) => "local",
        NodeSource::Slurm(_) => "slurm",
        NodeSource::Hosts { .. } => "hosts",
    };
    let with_ranks = placement
        .map(|p| {
            (0..p.count.len())
                .filter(|&n| p.count[n] > 0)
                .map(|n| n as u32)
                .collect()
        })
        .unwrap_or_default();
    let ranks = placement.map_or(0, |p| p.total()) as u64;
    Hub::start(bind, advertised, secret.clone(), mode, ranks, with_ranks)
}

/// How `krun node add` nodes are started while the job runs.
pub(crate) struct AddedNodes {
    pub(crate) starts: Option<mpsc::Receiver<NodeToStart>>,
    pub(crate) secret: ClusterSecret,
    /// The secret came from KRUN_SECRET_FILE (nodes read it themselves).
    pub(crate) configured: bool,
    pub(crate) hub_addr: SocketAddr,
    pub(crate) wake: mpsc::Sender<()>,
}

impl AddedNodes {
    /// Starts a joining krund: a child here, or through `n.host`'s `krund --listen` daemon.
    pub(crate) fn start(
        &self,
        job: &Job,
        n: NodeToStart,
        forwarders: &mut Vec<std::thread::JoinHandle<()>>,
    ) -> Result<NodeProc> {
        let mut cmd = Command::new(&job.krund);
        cmd.args(&n.args)
            .arg("--runtime")
            .arg(self.hub_addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !self.configured {
            cmd.env("KRUN_SECRET", self.secret.to_hex());
        }
        cmd.env("KRUN_JOB_ID", std::process::id().to_string());
        for (key, v) in &job.env {
            cmd.env(key, v);
        }
        if let Some(p) = &job.program {
            // Ranks moved here hold failed exits back as the job's other nodes do.
            cmd.env("KRUN_RECOVERS", "1");
            if p.tag_output {
                cmd.arg("--tag-output");
            }
            cmd.arg("--").args(&p.argv);
        }
        let prefix = job.program.is_none().then(|| format!("[node {}] ", n.node));
        let Some(host) = n.host else {
            let mut child = cmd.spawn().map_err(|e| LauncherError::Spawn {
                program: job.krund.display().to_string(),
                source: e,
            })?;
            forwarders.push(forward(
                child.stdout.take().expect("piped"),
                prefix.clone(),
                false,
                self.wake.clone(),
            ));
            forwarders.push(forward(
                child.stderr.take().expect("piped"),
                prefix,
                true,
                self.wake.clone(),
            ));
            return Ok(NodeProc::Child(child));
        };
        let configured = ClusterSecret::from_env()?;
        let d = DaemonClient::connect(&host, Duration::from_secs(10), configured.as_ref())?;
        let request = RunRequest {
            args: cmd
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            env: cmd
                .get_envs()
                .filter_map(|(k, v)| {
                    Some((
                        k.to_string_lossy().into_owned(),
                        v?.to_string_lossy().into_owned(),
                    ))
                })
                .collect(),
        };
        let (control, output) = d.start(request).map_err(|e| LauncherError::Node {
            node: n.node as usize,
            message: format!("host {host}: sending the node: {e}"),
        })?;
        let exit = Arc::new(Mutex::new(None));
        forwarders.push(forward_remote(
            output,
            host.clone(),
            format!("node {}", n.node),
            prefix,
            exit.clone(),
            self.wake.clone(),
        ));
        Ok(NodeProc::Remote {
            host,
            control: Arc::new(Mutex::new(control)),
            exit,
        })
    }
}

/// The rank runner of a node added to a running program job (`krund --join ... -- PROGRAM`):
/// no rank at first; ranks a drain moves here run the job's program, and the node ends when
/// krun stops it or once the ranks it ran have ended.
pub struct JoinedShare {
    pub node_id: usize,
    pub job_ranks: usize,
    /// The node's address (the ranks' fabric binds there).
    pub bind: IpAddr,
    pub tag_output: bool,
    pub program: Vec<String>,
    pub exit_grace: Option<Duration>,
}

impl JoinedShare {
    /// Runs until stopped or until the ranks moved here have ended; their highest exit code.
    pub fn run(self, runtime: &Arc<crate::runtime::Runtime>) -> Result<i32> {
        crate::ranks::catch_forwarded_signals();
        let stay = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (rt, set) = (runtime.clone(), stay.clone());
            std::thread::spawn(move || {
                rt.wait_stop();
                set.store(true, std::sync::atomic::Ordering::SeqCst);
            });
        }
        let (commands_tx, commands) = mpsc::channel();
        runtime.set_rank_commands(commands_tx.clone());
        {
            let rt = runtime.clone();
            std::thread::spawn(move || {
                let why = rt.wait_stop();
                let _ = commands_tx.send(crate::ranks::RankCommand::Terminate { reason: why });
            });
        }
        let share = crate::ranks::NodeShare {
            node_id: self.node_id,
            nnodes: self.node_id + 1,
            first_rank: 0,
            local_size: 0,
            size: self.job_ranks,
            tag_output: self.tag_output,
            program: self.program,
            env: vec![
                (
                    "KRUN_NODE_SOCKET".to_string(),
                    runtime.rank_socket().to_string_lossy().into_owned(),
                ),
                ("KRUN_FABRIC_BIND".to_string(), self.bind.to_string()),
            ],
            // It shares its machine with nodes it knows nothing of: no pinning.
            bind_to: crate::binding::BindTo::None,
            report_bindings: false,
            machine: crate::ranks::MachineShare {
                offset: 0,
                ranks: 0,
            },
            events: Some(runtime.rank_events()),
            // Ranks moved here by a drain are rank-library or CRIU ranks: MPI ranks (PMI)
            // are not moved, so an added node serves no PMI.
            rank_setup: None,
            stay: Some(stay),
            exit_grace: self.exit_grace,
            commands: Some(Arc::new(Mutex::new(commands))),
            started: None,
        };
        crate::ranks::run_share(&share)
    }
}
