//! Namespace hosts that each run a `krund --listen` daemon on their own address, for krun's
//! host-list mode (`krun --hosts A,B,...`): the multi-host tests and `bench launch --hosts`.
//!
//! The secret is written to a 0600 file the daemons and krun read (`KRUN_SECRET_FILE`);
//! every daemon is killed by PID when the hosts drop, and the file removed.
//!
//! ```no_run
//! use cluster_tests::hosts::{KrundHosts, HostsSpec};
//! let hosts = KrundHosts::start(&HostsSpec::new("target/debug/krund".into(), 4))?;
//! let mut krun = hosts.krun("target/debug/krun".as_ref());
//! krun.args(["--hosts", &hosts.host_list(), "-n", "8", "/bin/true"]);
//! let mut p = hosts.spawn_on(0, &mut krun)?;
//! assert!(p.wait()?.success());
//! # Ok::<(), cluster_tests::ClusterError>(())
//! ```
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{ClusterError, Result};
use crate::netns::NetnsCluster;
use crate::process::NodeProcess;

/// The port every daemon listens on (each host has its own address).
pub const KRUND_PORT: u16 = 7171;

/// How the hosts are started.
#[derive(Clone, Debug)]
pub struct HostsSpec {
    /// The `krund` binary.
    pub krund: PathBuf,
    /// How many hosts.
    pub hosts: usize,
    /// The cluster secret's text.
    pub secret: String,
    /// This host's daemon gets another secret (a host that must be refused).
    pub wrong_secret_on: Option<usize>,
    /// More environment for every daemon (its ranks inherit it).
    pub env: Vec<(String, String)>,
}

impl HostsSpec {
    /// `hosts` hosts sharing one test secret.
    pub fn new(krund: PathBuf, hosts: usize) -> HostsSpec {
        HostsSpec {
            krund,
            hosts,
            secret: "the secret of a krun multi-host cluster".into(),
            wrong_secret_on: None,
            env: Vec::new(),
        }
    }
}

/// The hosts and their daemons.
pub struct KrundHosts {
    pub cluster: NetnsCluster,
    /// Daemon `i` runs on host `i`.
    pub daemons: Vec<NodeProcess>,
    /// The secret file krun is given.
    pub secret: PathBuf,
    other_secret: Option<PathBuf>,
}

impl Drop for KrundHosts {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
        }
        let _ = std::fs::remove_file(&self.secret);
        if let Some(o) = &self.other_secret {
            let _ = std::fs::remove_file(o);
        }
    }
}

fn secret_file(text: &str) -> Result<PathBuf> {
    static MADE: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "krun-hosts-secret-{}-{}",
        std::process::id(),
        MADE.fetch_add(1, Ordering::SeqCst)
    ));
    let err = |source| ClusterError::Path {
        what: "writing the secret file",
        path: path.clone(),
        source,
    };
    std::fs::write(&path, text).map_err(err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(path)
}

impl KrundHosts {
    /// Creates the namespace hosts and starts a daemon on each; returns once every daemon
    /// said it listens (its first stderr line, which is consumed; the rest stays readable
    /// from [`NodeProcess::stderr`]).
    pub fn start(spec: &HostsSpec) -> Result<KrundHosts> {
        crate::require_root()?;
        let cluster = NetnsCluster::create(spec.hosts, None)?;
        let secret = secret_file(&spec.secret)?;
        let other_secret = match spec.wrong_secret_on {
            Some(_) => Some(secret_file("a different secret, not the cluster's")?),
            None => None,
        };
        let mut hosts = KrundHosts {
            cluster,
            daemons: Vec::new(),
            secret,
            other_secret,
        };
        for i in 0..spec.hosts {
            let node = hosts.cluster.node(i)?;
            let file = match (&hosts.other_secret, spec.wrong_secret_on) {
                (Some(o), Some(w)) if w == i => o,
                _ => &hosts.secret,
            };
            let mut cmd = Command::new(&spec.krund);
            cmd.args(["--listen", &format!("{}:{KRUND_PORT}", node.ip())])
                .env("KRUN_SECRET_FILE", file)
                .envs(spec.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let mut d = node.spawn(&mut cmd)?;
            let mut line = String::new();
            if let Some(err) = d.stderr() {
                let mut r = BufReader::new(err);
                let _ = r.read_line(&mut line);
                // Keep draining the daemon's stderr so it never blocks on a full pipe.
                std::thread::spawn(move || {
                    let mut sink = String::new();
                    while r.read_line(&mut sink).is_ok_and(|n| n > 0) {
                        sink.clear();
                    }
                });
            }
            if !line.contains("listening on") {
                return Err(ClusterError::Job {
                    cmd: format!("krund on host {i}"),
                    reason: format!("did not say it listens: {:?}", line.trim()),
                });
            }
            hosts.daemons.push(d);
        }
        // The daemons read their secret at start; the other one can go.
        if let Some(o) = hosts.other_secret.take() {
            let _ = std::fs::remove_file(o);
        }
        Ok(hosts)
    }

    /// The hosts' addresses, comma-separated (`krun --hosts`).
    pub fn host_list(&self) -> String {
        self.cluster
            .nodes()
            .map(|n| n.ip().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A `krun` command with the cluster's secret and the tcp provider, stdout and stderr
    /// piped; start it on a host with [`KrundHosts::spawn_on`].
    pub fn krun(&self, krun: &Path) -> Command {
        let mut c = Command::new(krun);
        c.env("KRUN_SECRET_FILE", &self.secret)
            .env("KRUN_FABRIC_PROVIDER", "tcp")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Starts `cmd` inside host `host`'s network namespace.
    pub fn spawn_on(&self, host: usize, cmd: &mut Command) -> Result<NodeProcess> {
        self.cluster.node(host)?.spawn(cmd)
    }
}

/// Waits for `p` at most `limit` (killing it by PID then) and returns its exit code (`None`
/// when killed), stdout and stderr (both must be piped).
pub fn finish(
    mut p: NodeProcess,
    limit: std::time::Duration,
) -> Result<(Option<i32>, String, String)> {
    use std::io::Read;
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read_all(p.stdout().map(|o| Box::new(o) as Box<dyn Read + Send>));
    let err = read_all(p.stderr().map(|e| Box::new(e) as Box<dyn Read + Send>));
    let status = p.wait_timeout(limit)?;
    if status.is_none() {
        p.kill()?;
    }
    Ok((
        status.and_then(|s| s.code()),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    ))
}
