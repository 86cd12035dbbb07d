//! Rust handle on the local Slurm lane (`cluster-tests/slurm/cluster.sh`).
//!
//! There is one Slurm cluster per machine (state in /var/tmp/krun-slurm, subnet
//! 10.201.0.0/24): [`SlurmCluster::up`] serializes users inside one process; tests in
//! different processes that use it must not run at the same time.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

use crate::error::{ClusterError, Result};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A running local Slurm cluster; dropping it runs `cluster.sh down`.
#[derive(Debug)]
pub struct SlurmCluster {
    nodes: usize,
    is_down: bool,
    _guard: MutexGuard<'static, ()>,
}

impl SlurmCluster {
    /// Path of `cluster.sh` in this crate.
    pub fn script() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/cluster.sh"))
    }

    /// `cluster.sh up` with `KRUN_SLURM_NODES=nodes` (installs Debian's slurm packages if
    /// missing). Blocks while another `SlurmCluster` of this process is alive.
    pub fn up(nodes: usize) -> Result<Self> {
        crate::netns::require_root()?;
        let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let c = SlurmCluster {
            nodes,
            is_down: false,
            _guard: guard,
        };
        c.run(Command::new(Self::script()).arg("up"))?;
        Ok(c)
    }

    /// Number of compute nodes (`node1..nodeN`).
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// A `cluster.sh exec ARGS...` command, ready to be adjusted (env, stdio) and run: a Slurm
    /// client (srun, sbatch, ...) on the cluster's login node. Pass absolute paths for
    /// binaries built on the host (the filesystem is shared).
    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(Self::script());
        cmd.env("KRUN_SLURM_NODES", self.nodes.to_string())
            .arg("exec")
            .args(args);
        cmd
    }

    /// Runs `cluster.sh exec ARGS...` to completion; a non-zero exit is an error carrying stderr.
    pub fn exec<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run(&mut self.command(args))
    }

    /// `cluster.sh down` now (also done on drop).
    pub fn down(mut self) -> Result<()> {
        self.is_down = true;
        self.run(Command::new(Self::script()).arg("down"))
            .map(|_| ())
    }

    fn run(&self, cmd: &mut Command) -> Result<Output> {
        cmd.env("KRUN_SLURM_NODES", self.nodes.to_string());
        let line = format!("{cmd:?}");
        let out = cmd.output().map_err(|source| ClusterError::CommandStart {
            cmd: line.clone(),
            source,
        })?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ClusterError::CommandFailed {
                cmd: line,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        if self.is_down {
            return;
        }
        let _ = self.run(Command::new(Self::script()).arg("down"));
    }
}
