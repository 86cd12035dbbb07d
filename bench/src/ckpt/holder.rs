//! The processes `bench ckpt` starts, each ended by PID on every path ([`Holder`]), and
//! starting them.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WORK;

/// Processes this bench started, ended by PID on every path (errors included) when this
/// value is dropped: the direct child (`unshare`, a program, `krun-store`) and the programs
/// found inside it or restored for it ([`Holder::adopt`]: the CRIU subject is PID 1 of its
/// own PID namespace, a grandchild that outlives `unshare`, and a restored copy has no
/// parent here). Adopted processes are held by pidfd (a reused PID is never signalled) and
/// waited for until they are gone, so their memory is back before the next measurement.
pub(super) struct Holder {
    child: Option<Child>,
    adopted: Vec<(i32, std::os::fd::OwnedFd)>,
}

impl Holder {
    pub(super) fn of(child: Child) -> Holder {
        Holder {
            child: Some(child),
            adopted: Vec::new(),
        }
    }

    pub(super) fn none() -> Holder {
        Holder {
            child: None,
            adopted: Vec::new(),
        }
    }

    /// The direct child's PID.
    pub(super) fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Ends `pid` too when dropped.
    pub(super) fn adopt(&mut self, pid: i32) -> Result<(), String> {
        use std::os::fd::FromRawFd;
        if pid <= 1 {
            return Err(format!("refusing to adopt PID {pid}"));
        }
        // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(format!(
                "pidfd_open({pid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a descriptor just returned to us, owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        self.adopted.push((pid, fd));
        Ok(())
    }

    /// PIDs this value ends (the direct child first).
    #[cfg(test)]
    pub(super) fn pids(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.child.iter().map(|c| c.id() as i32).collect();
        v.extend(self.adopted.iter().map(|a| a.0));
        v
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        for (_, fd) in &self.adopted {
            // SAFETY: signalling through a pidfd we own; no memory is passed.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
        if let Some(child) = &mut self.child {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        // A pidfd becomes readable when its process ended: wait (bounded) for each.
        for (pid, fd) in &self.adopted {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, 10_000) } != 1 {
                eprintln!("bench ckpt: PID {pid} still running 10 s after SIGKILL");
            }
        }
    }
}

/// Starts a program and waits for its first stdout line.
pub(super) fn start_and_wait(
    cmd: &mut Command,
    expect: &str,
) -> Result<(Holder, BufReader<std::process::ChildStdout>), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let guard = Holder::of(child);
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with(expect) {
        return Err(format!("{cmd:?} said {line:?}, expected {expect}"));
    }
    Ok((guard, out))
}

/// Starts the CRIU subject in its own PID namespace, its output in a file (CRIU restores
/// regular files; a pipe to this process would not survive a restore), and waits for "ready".
/// Returns the guard (which ends `unshare` and the subject) and the subject's PID.
pub(super) fn start_holder(holder: &Path, mib: &str) -> Result<(Holder, u32), String> {
    let out = PathBuf::from(WORK).join("holder.out");
    let file = std::fs::File::create(&out).map_err(|e| e.to_string())?;
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--", "setsid"])
        .arg(holder)
        .arg(mib)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("unshare {}: {e}", holder.display()))?;
    let mut guard = Holder::of(child);
    let pid = find_child(guard.id())?;
    guard.adopt(pid as i32)?;
    let start = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .starts_with("ready")
    {
        if start.elapsed() > Duration::from_secs(120) {
            return Err("the CRIU subject did not start".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((guard, pid))
}

pub(super) fn find_child(pid: u32) -> Result<u32, String> {
    let start = Instant::now();
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
        {
            let exe = std::fs::read_link(format!("/proc/{c}/exe")).unwrap_or_default();
            if !exe.to_string_lossy().ends_with("setsid") {
                return Ok(c);
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("no child of {pid}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` is gone (or a zombie left for its new parent to reap).
    fn gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    /// Starts a tree shaped like the CRIU subject's (a child whose own child outlives it),
    /// adopts the grandchild, then fails as a measurement would.
    fn start_then_fail(pids: &mut Vec<i32>) -> Result<(), String> {
        let (mut h, _out) = start_and_wait(
            Command::new("sh").args(["-c", "sleep 300 & echo ready; exec sleep 300"]),
            "ready",
        )?;
        let grandchild = find_child(h.id())?;
        h.adopt(grandchild as i32)?;
        pids.extend(h.pids());
        Err("forced error after starting the holders".to_string())
    }

    #[test]
    fn an_error_path_ends_every_holder_it_started() {
        let mut pids = Vec::new();
        let err = start_then_fail(&mut pids).unwrap_err();
        assert_eq!(err, "forced error after starting the holders");
        assert_eq!(pids.len(), 2, "the child and the adopted grandchild");
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in pids {
            while !gone(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(gone(pid), "PID {pid} still runs after the error");
        }
    }

    #[test]
    fn adopting_pid_1_or_a_missing_process_is_refused() {
        let mut h = Holder::none();
        assert!(h.adopt(1).unwrap_err().contains("refusing"));
        assert!(h.adopt(i32::MAX).unwrap_err().contains("pidfd_open"));
    }
}
