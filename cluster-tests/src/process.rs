//! Processes started inside a node, and signals by PID.

use std::collections::HashSet;
use std::io;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{ClusterError, Result};

/// PIDs a cluster started and has not reaped yet. A PID stays in here until its `Child` has
/// been waited for, so the PID cannot be reused by an unrelated process while it is listed.
pub(crate) type Registry = Arc<Mutex<HashSet<u32>>>;

pub(crate) fn registry_lock(r: &Registry) -> std::sync::MutexGuard<'_, HashSet<u32>> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `signal` (e.g. [`libc::SIGKILL`]) to exactly the process `pid`.
///
/// Refuses PIDs that would address a process group or every process (`pid` 0 or above
/// `i32::MAX`). A process that is already gone yields a [`ClusterError::Signal`] with `ESRCH`.
pub fn kill_process(pid: u32, signal: i32) -> Result<()> {
    let raw = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ClusterError::Signal {
            pid,
            signal,
            source: io::Error::from_raw_os_error(libc::EINVAL),
        })?;
    // SAFETY: kill(2) has no memory-safety preconditions; raw > 0 addresses one process.
    let rc = unsafe { libc::kill(raw, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(ClusterError::Signal {
            pid,
            signal,
            source: io::Error::last_os_error(),
        })
    }
}

/// A process running inside one node's network namespace.
///
/// Dropping the handle kills the process (SIGKILL, by PID) and reaps it. The cluster also
/// kills every process it started that is still running when the cluster is dropped.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    node: usize,
    reaped: bool,
    registry: Registry,
}

impl NodeProcess {
    pub(crate) fn new(child: Child, node: usize, registry: Registry) -> Self {
        registry_lock(&registry).insert(child.id());
        NodeProcess {
            child,
            node,
            reaped: false,
            registry,
        }
    }

    /// The process id (in the host's PID namespace: nodes share the process list).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Index of the node the process runs in.
    pub fn node(&self) -> usize {
        self.node
    }

    /// Sends `signal` to this process by PID; a no-op once the process has been reaped.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if self.reaped {
            return Ok(());
        }
        kill_process(self.pid(), signal)
    }

    /// SIGKILL by PID, then reap. Returns the exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if !self.reaped {
            match self.signal(libc::SIGKILL) {
                Ok(()) => {}
                // Exited on its own but not reaped yet: the wait below collects it.
                Err(ClusterError::Signal { source, .. })
                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e),
            }
        }
        self.wait()
    }

    /// Blocks until the process exits.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        let pid = self.pid();
        let st = self
            .child
            .wait()
            .map_err(|source| ClusterError::Wait { pid, source })?;
        self.mark_reaped();
        Ok(st)
    }

    /// Non-blocking: `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let pid = self.pid();
        let st = self
            .child
            .try_wait()
            .map_err(|source| ClusterError::Wait { pid, source })?;
        if st.is_some() {
            self.mark_reaped();
        }
        Ok(st)
    }

    /// Waits at most `timeout` (polling every 10 ms); `None` if it is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The child's stdin, if it was piped and not taken yet.
    pub fn stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// The child's stdout, if it was piped and not taken yet.
    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's stderr, if it was piped and not taken yet.
    pub fn stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// The underlying [`Child`] (do not wait on it directly: use [`NodeProcess::wait`]).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    fn mark_reaped(&mut self) {
        if !self.reaped {
            self.reaped = true;
            registry_lock(&self.registry).remove(&self.child.id());
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.kill();
        }
    }
}
