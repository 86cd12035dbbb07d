//! Nodes added to a running job (`krun node add [HOST]`): the job's runtime hub asks for
//! them, the job's wait loop starts them (a child here, or through a host's `krund --listen`
//! daemon) and waits for them like the job's own nodes.
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
