//! Where a running job is found: `krun` keeps a directory per job (mode 0700, under
//! `$XDG_RUNTIME_DIR/krun` or `/tmp/krun-UID`) with `job.json` (its nodes' control
//! addresses), `secret` (the job's cluster secret, 0600) and `krun.sock` (the running
//! `krun`'s own socket, for `krun node add|drain`). krund nodes keep their sockets in a
//! directory of their own beside it.
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fabric::secret::ClusterSecret;
use serde::{Deserialize, Serialize};

use super::control::NodeAddresses;
use crate::error::{LauncherError, Result};

/// The directory all of this user's jobs and nodes live under.
pub fn base_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("krun"),
        None => {
            // SAFETY: getuid has no preconditions and cannot fail.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/krun-{uid}"))
        }
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> LauncherError {
    move |e| LauncherError::Io { context, source: e }
}

/// Creates `dir` (and its parents) with mode 0700 and checks that it is ours and private.
pub fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    let meta = std::fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if meta.uid() != uid {
        return Err(LauncherError::Usage(format!(
            "{} belongs to uid {}, not to us (uid {uid})",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("restricting {}", dir.display())))?;
    }
    Ok(())
}

/// What `job.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub krun_pid: u32,
    /// "local", "hosts" or "slurm".
    pub mode: String,
    pub nodes: Vec<NodeAddresses>,
}

/// A job's directory, removed when the job ends.
pub struct JobDir {
    pub path: PathBuf,
    pub info: JobInfo,
}

impl JobDir {
    /// Creates the directory of this `krun`'s job and writes its secret.
    pub fn create(mode: &str, secret: &ClusterSecret) -> Result<JobDir> {
        let id = std::process::id().to_string();
        let base = base_dir();
        private_dir(&base)?;
        remove_stale_jobs(&base);
        let path = base.join(format!("job-{id}"));
        private_dir(&path)?;
        let secret_path = path.join("secret");
        let _ = std::fs::remove_file(&secret_path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_path)
            .map_err(io(format!("creating {}", secret_path.display())))?;
        std::io::Write::write_all(&mut f, secret.to_hex().as_bytes())
            .map_err(io(format!("writing {}", secret_path.display())))?;
        let dir = JobDir {
            path,
            info: JobInfo {
                id: id.clone(),
                krun_pid: std::process::id(),
                mode: mode.to_string(),
                nodes: Vec::new(),
            },
        };
        dir.save()?;
        Ok(dir)
    }

    pub fn socket(&self) -> PathBuf {
        self.path.join("krun.sock")
    }

    /// Records (or replaces) a node's addresses.
    pub fn register(&mut self, node: NodeAddresses) -> Result<()> {
        self.info.nodes.retain(|n| n.node != node.node);
        self.info.nodes.push(node);
        self.info.nodes.sort_by_key(|n| n.node);
        self.save()
    }

    fn save(&self) -> Result<()> {
        let tmp = self.path.join("job.json.tmp");
        let text = serde_json::to_string_pretty(&self.info)
            .map_err(|e| LauncherError::Usage(format!("encoding job.json: {e}")))?;
        std::fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, self.path.join("job.json"))
            .map_err(io(format!("writing {}/job.json", self.path.display())))
    }
}

impl JobDir {
    /// Removes the directory and the job's native checkpoints on this host (the job is
    /// over). The hub calls it when the job ends; a killed krun leaves it to the next one.
    pub fn remove(&self) {
        remove_job(&self.path, &self.info.id);
    }
}

fn remove_job(path: &Path, id: &str) {
    let _ = std::fs::remove_dir_all(path);
    // The native checkpoints of the job's ranks on this host (see ranks::ghost_owner).
    if std::env::var_os("KRUN_GHOST_OWNER").is_none() {
        let ghost = std::env::var_os("KRUN_GHOST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev/shm/krun-ghost"));
        let _ = std::fs::remove_dir_all(ghost.join(format!("krun-job{id}")));
    }
}

/// Removes the directories of jobs whose krun is gone.
fn remove_stale_jobs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("job-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !alive(pid) {
            remove_job(&e.path(), &pid.to_string());
        }
    }
}

/// A running job found on disk: its description and secret.
pub struct FoundJob {
    pub info: JobInfo,
    pub secret: ClusterSecret,
    pub path: PathBuf,
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

/// The running job `id`, or the only running job when `id` is `None`.
pub fn find(id: Option<&str>) -> Result<FoundJob> {
    let base = base_dir();
    // Only a directory of ours is trusted to name jobs, addresses and secrets.
    private_dir(&base)?;
    let mut running = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(job) = name.strip_prefix("job-") else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(e.path().join("job.json")) else {
                continue;
            };
            let info: JobInfo = serde_json::from_str(&text).map_err(|err| {
                LauncherError::Usage(format!("{}/job.json: {err}", e.path().display()))
            })?;
            if info.id == job && alive(info.krun_pid) {
                running.push((info, e.path()));
            }
        }
    }
    running.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let (info, path) = match id {
        Some(id) => running
            .into_iter()
            .find(|(i, _)| i.id == id)
            .ok_or_else(|| {
                LauncherError::Usage(format!(
                    "no running job {id:?} (jobs are listed under {})",
                    base.display()
                ))
            })?,
        None => match running.len() {
            0 => {
                return Err(LauncherError::Usage(format!(
                    "no running job (jobs are listed under {})",
                    base.display()
                )))
            }
            1 => running.remove(0),
            _ => {
                let ids: Vec<String> = running.iter().map(|(i, _)| i.id.clone()).collect();
                return Err(LauncherError::Usage(format!(
                    "{} jobs are running ({}): pick one with --job ID",
                    ids.len(),
                    ids.join(", ")
                )));
            }
        },
    };
    let secret_path = path.join("secret");
    let hex = std::fs::read_to_string(&secret_path)
        .map_err(io(format!("reading {}", secret_path.display())))?;
    let secret = ClusterSecret::from_hex(hex.trim())?;
    Ok(FoundJob { info, secret, path })
}
