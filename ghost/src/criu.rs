//! The CRIU checkpointer: transparent capture of unmodified programs (single- and
//! multi-threaded, with open files), driven through CRIU's RPC interface (`criu swrk` over a
//! SOCK_SEQPACKET socket pair, messages from `rust_criu`'s protobuf definitions).
//!
//! Resource conflicts at restart (XtreemGCP):
//! - **PIDs**: CRIU restores the PIDs it dumped. A program started with [`spawn_capturable`]
//!   (`krun ghost run`) is PID 1 of its own PID namespace, so its copy is restored into a new
//!   namespace and can run beside the original. For other processes a PID still in use is
//!   reported as [`GhostError::PidInUse`] before CRIU is asked.
//! - **Files**: every open regular file of the tree is recorded at capture; a file missing at
//!   restore is reported as [`GhostError::FileMissing`] naming path, fd and process.
//!
//! CRIU 4.x is needed (bookworm's 3.17 fails on Linux 6.18): `scripts/build-criu.sh`.
use crate::checkpointer::{
    self, Backend, CaptureOptions, Captured, Checkpointer, RestoreOptions, Restored,
};
use crate::error::{GhostError, Result};
use crate::image::{Image, ImageBuilder, SectionKind};
use protobuf::Message;
use rust_criu::rust_criu_protobuf::rpc;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where `scripts/build-criu.sh` installs CRIU.
pub const BUILT_CRIU: &str = "/opt/criu/criu-4.2.1/criu/criu";
const FILES_MANIFEST: &str = "krun-files.txt";

fn io_err(path: impl Into<PathBuf>, what: &str, e: std::io::Error) -> GhostError {
    GhostError::Io {
        path: path.into(),
        what: what.to_string(),
        source: e,
    }
}

/// A located CRIU binary.
#[derive(Clone, Debug)]
pub struct Criu {
    pub binary: PathBuf,
    pub version: String,
}

impl Criu {
    /// `KRUN_CRIU`, then the binary `scripts/build-criu.sh` builds, then `criu` on PATH; it
    /// must run and be version 4 or newer.
    pub fn locate() -> Result<Criu> {
        let mut candidates = Vec::new();
        if let Some(p) = std::env::var_os("KRUN_CRIU") {
            candidates.push(PathBuf::from(p));
        }
        candidates.push(PathBuf::from(BUILT_CRIU));
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path).map(|d| d.join("criu")));
        }
        let mut seen = Vec::new();
        for c in candidates.into_iter().filter(|c| c.exists()) {
            let out = std::process::Command::new(&c).arg("--version").output();
            let text = match out {
                Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).to_string(),
                _ => {
                    seen.push(format!("{} does not run", c.display()));
                    continue;
                }
            };
            let version = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("Version:"))
                .map(|v| v.trim().to_string())
                .unwrap_or_default();
            let major: u32 = version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if major >= 4 {
                return Ok(Criu { binary: c, version });
            }
            seen.push(format!("{} is version {version:?}", c.display()));
        }
        Err(GhostError::CriuMissing {
            reason: if seen.is_empty() {
                "no criu binary found (KRUN_CRIU, /opt/criu, PATH)".into()
            } else {
                seen.join("; ")
            },
        })
    }

    /// One RPC exchange with `criu swrk`: sends `req`, answers notifications, returns the
    /// final response.
    fn call(&self, req: rpc::Criu_req, op: &'static str, images: &Path) -> Result<rpc::Criu_resp> {
        let mut sv = [0i32; 2];
        // SAFETY: socketpair fills two descriptors into sv.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        } != 0
        {
            return Err(io_err(
                "socketpair",
                "creating the CRIU RPC socket",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fresh descriptors we own.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let their_fd = theirs.as_raw_fd();
        let inherit: Vec<i32> = req
            .opts
            .images_dir_fd
            .into_iter()
            .chain(req.opts.inherit_fd.iter().filter_map(|i| i.fd))
            .chain([their_fd])
            .collect();
        let mut cmd = std::process::Command::new(&self.binary);
        cmd.arg("swrk")
            .arg(their_fd.to_string())
            .stdin(std::process::Stdio::null());
        // SAFETY: between fork and exec only fcntl and close_range (async-signal-safe) run:
        // criu inherits the descriptors it must have and none of the caller's others.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                crate::descriptors::cloexec_above_stdio()?;
                crate::descriptors::keep_across_exec(&inherit)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| io_err(&self.binary, "starting criu swrk", e))?;
        drop(theirs);
        let result = (|| {
            let bytes = req
                .write_to_bytes()
                .map_err(|e| GhostError::Invalid(format!("encoding the CRIU request: {e}")))?;
            send_packet(&ours, &bytes)?;
            loop {
                let packet = recv_packet(&ours).map_err(|e| GhostError::CriuFailed {
                    op,
                    reason: format!("criu swrk closed the RPC socket ({e})"),
                    log: log_tail(images, op),
                })?;
                let resp = rpc::Criu_resp::parse_from_bytes(&packet)
                    .map_err(|e| GhostError::Invalid(format!("decoding a CRIU response: {e}")))?;
                if resp.type_() == rpc::Criu_req_type::NOTIFY {
                    let mut ack = rpc::Criu_req::new();
                    ack.set_type(rpc::Criu_req_type::NOTIFY);
                    ack.set_notify_success(true);
                    let bytes = ack.write_to_bytes().map_err(|e| {
                        GhostError::Invalid(format!("encoding a CRIU notify ack: {e}"))
                    })?;
                    send_packet(&ours, &bytes)?;
                    continue;
                }
                if !resp.success() {
                    return Err(GhostError::CriuFailed {
                        op,
                        reason: format!("criu answered failure (errno {})", resp.cr_errno()),
                        log: log_tail(images, op),
                    });
                }
                return Ok(resp);
            }
        })();
        drop(ours);
        let _ = child.wait();
        result
    }

    fn images_fd(dir: &Path) -> Result<OwnedFd> {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| GhostError::Invalid(format!("{} contains a NUL byte", dir.display())))?;
        // SAFETY: open(2) of a path we own; the descriptor is checked and owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io_err(
                dir,
                "opening the CRIU image directory",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Dumps the process tree rooted at `pid` into `dir` (which must exist), after recording
    /// its open files. With `leave_running` false the tree is ended by the dump.
    pub fn dump(&self, pid: i32, dir: &Path, leave_running: bool) -> Result<()> {
        record_open_files(pid, &dir.join(FILES_MANIFEST))?;
        let images = Self::images_fd(dir)?;
        let mut opts = rpc::Criu_opts::new();
        opts.set_pid(pid);
        opts.set_images_dir_fd(images.as_raw_fd());
        opts.set_leave_running(leave_running);
        opts.set_shell_job(session_of(pid) != Some(pid));
        opts.set_log_level(2);
        opts.set_log_file("dump.log".into());
        let mut req = rpc::Criu_req::new();
        req.set_type(rpc::Criu_req_type::DUMP);
        req.opts = protobuf::MessageField::some(opts);
        match self.call(req, "dump", dir) {
            Ok(_) => Ok(()),
            // CRIU names no socket: say which of the process's descriptors are sockets and
            // what they are bound or connected to (the caller can then tell whose it is).
            Err(GhostError::CriuFailed { op, reason, log }) if log.contains("External socket") => {
                Err(GhostError::CriuFailed {
                    op,
                    reason: format!("{reason}; the process's sockets: {}", sockets_of(pid)),
                    log,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Restores the tree dumped in `dir` as new processes; returns the root's PID. The root
    /// becomes a child of this process (`rst_sibling`): reap it, or let it be reparented when
    /// this process exits.
    pub fn restore(&self, dir: &Path) -> Result<i32> {
        self.restore_inheriting(dir, &[])
    }

    /// As [`Criu::restore`], with descriptors of this process standing in for resources the
    /// dumped tree held outside it (CRIU's `--inherit-fd`): each `(key, fd)` gives `fd` to
    /// the restored processes wherever they held `key` (as `/proc/PID/fd` names it at dump
    /// time, e.g. `pipe:[12345]` for a pipe to a process that was not dumped).
    pub fn restore_inheriting(&self, dir: &Path, inherit: &[(String, i32)]) -> Result<i32> {
        check_open_files(&dir.join(FILES_MANIFEST))?;
        let images = Self::images_fd(dir)?;
        let mut opts = rpc::Criu_opts::new();
        for (key, fd) in inherit {
            let mut i = rpc::Inherit_fd::new();
            i.set_key(key.clone());
            i.set_fd(*fd);
            opts.inherit_fd.push(i);
        }
        opts.set_images_dir_fd(images.as_raw_fd());
        opts.set_rst_sibling(true);
        opts.set_shell_job(true);
        opts.set_log_level(2);
        opts.set_log_file("restore.log".into());
        let mut req = rpc::Criu_req::new();
        req.set_type(rpc::Criu_req_type::RESTORE);
        req.opts = protobuf::MessageField::some(opts);
        let resp = self.call(req, "restore", dir)?;
        let pid = resp.restore.pid();
        if pid <= 0 {
            return Err(GhostError::CriuFailed {
                op: "restore",
                reason: "criu reported success but no PID".into(),
                log: log_tail(dir, "restore"),
            });
        }
        Ok(pid)
    }
}

fn send_packet(fd: &OwnedFd, bytes: &[u8]) -> Result<()> {
    // SAFETY: writes `bytes` to a socket we own.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n != bytes.len() as isize {
        return Err(io_err(
            "criu swrk",
            "sending an RPC request",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn recv_packet(fd: &OwnedFd) -> std::io::Result<Vec<u8>> {
    // SAFETY: MSG_PEEK|MSG_TRUNC with no buffer returns the packet's length.
    let len = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            0,
            libc::MSG_PEEK | libc::MSG_TRUNC,
        )
    };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "end of stream",
        ));
    }
    let mut buf = vec![0u8; len as usize];
    // SAFETY: reads at most buf.len() bytes into buf.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The last error lines of CRIU's log for `op`.
fn log_tail(dir: &Path, op: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{op}.log"))).unwrap_or_default();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("Error")).collect();
    let pick = if errors.is_empty() {
        text.lines().collect::<Vec<_>>()
    } else {
        errors
    };
    pick[pick.len().saturating_sub(4)..].join(" | ")
}

/// The socket descriptors of every thread-group member of `pid`'s tree, as `fd N (pid P):
/// unix ino I path|unnamed` (paths from `/proc/net/unix`), or `none`.
fn sockets_of(pid: i32) -> String {
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path_of = |ino: &str| {
        unix.lines()
            .skip(1)
            .find(|l| l.split_whitespace().nth(6) == Some(ino))
            .map(|l| l.split_whitespace().nth(7).unwrap_or("unnamed").to_string())
    };
    let mut out = Vec::new();
    for p in tree(pid) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if let Some(ino) = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
            {
                let what = match path_of(ino) {
                    Some(path) => format!("unix ino {ino} {path}"),
                    None => format!("ino {ino} (not a unix socket of this network namespace)"),
                };
                out.push(format!(
                    "fd {} (pid {p}): {what}",
                    fd.file_name().to_string_lossy()
                ));
            }
        }
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command: state ppid pgrp session
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The PIDs of the tree rooted at `pid` (root first).
fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// Writes "krun-files v1" then one "PID FD PATH" line per open regular file of the tree.
fn record_open_files(pid: i32, manifest: &Path) -> Result<()> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(GhostError::Invalid(format!("no process {pid}")));
    }
    let mut text = String::from("krun-files v1\n");
    for p in tree(pid) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            let regular = t.starts_with('/')
                && !t.ends_with(" (deleted)")
                && !t.starts_with("/dev/")
                && !t.starts_with("/proc/")
                && std::fs::metadata(&target).is_ok_and(|m| m.is_file());
            if regular {
                text.push_str(&format!("{p} {} {t}\n", fd.file_name().to_string_lossy()));
            }
        }
    }
    std::fs::write(manifest, text)
        .map_err(|e| io_err(manifest, "writing the open-file manifest", e))
}

/// Checks that every file the tree had open still exists where it was.
fn check_open_files(manifest: &Path) -> Result<()> {
    let text = std::fs::read_to_string(manifest)
        .map_err(|e| io_err(manifest, "reading the open-file manifest", e))?;
    let mut lines = text.lines();
    if lines.next() != Some("krun-files v1") {
        return Err(GhostError::Invalid(format!(
            "{}: unknown manifest version",
            manifest.display()
        )));
    }
    for line in lines {
        let mut parts = line.splitn(3, ' ');
        let (Some(pid), Some(fd), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(GhostError::Invalid(format!(
                "{}: bad line {line:?}",
                manifest.display()
            )));
        };
        if !Path::new(path).exists() {
            return Err(GhostError::FileMissing {
                path: PathBuf::from(path),
                fd: fd.parse().unwrap_or(-1),
                pid: pid.parse().unwrap_or(0),
            });
        }
    }
    Ok(())
}

/// A program started so that CRIU can capture it and restore copies beside it.
pub struct Capturable {
    /// The program's PID as seen from here (it is PID 1 of its own namespace).
    pub pid: i32,
    /// `unshare`, the program's parent; it exits when the program does.
    pub supervisor: std::process::Child,
}

/// Starts `program` as PID 1 of a new PID namespace (util-linux `unshare --pid --fork`), in
/// its own session, stdin from /dev/null and stdout/stderr to `output`.
pub fn spawn_capturable(program: &Path, args: &[String], output: &Path) -> Result<Capturable> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .map_err(|e| io_err(output, "opening the program's output", e))?;
    let err = out.try_clone().map_err(|e| io_err(output, "dup", e))?;
    let mut cmd = std::process::Command::new("unshare");
    // The program leads its own session inside the namespace (CRIU refuses a session
    // leader outside it).
    cmd.args(["--pid", "--fork", "--", "setsid"])
        .arg(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid(2) and close_range(2) are async-signal-safe; the program inherits none
    // of the caller's descriptors above stderr.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            crate::descriptors::cloexec_above_stdio()
        });
    }
    let mut supervisor = cmd
        .spawn()
        .map_err(|e| io_err("unshare", "starting the program in a PID namespace", e))?;
    let start = Instant::now();
    loop {
        let sup = supervisor.id() as i32;
        if let Some(&pid) = tree(sup).get(1) {
            // Wait until the child has exec'd the program (no longer unshare).
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let exe = exe.to_string_lossy();
            if !exe.is_empty() && !exe.ends_with("/unshare") && !exe.ends_with("/setsid") {
                return Ok(Capturable { pid, supervisor });
            }
        }
        if let Ok(Some(status)) = supervisor.try_wait() {
            return Err(GhostError::Invalid(format!(
                "{} exited at once ({status})",
                program.display()
            )));
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = supervisor.kill();
            return Err(GhostError::Invalid(format!(
                "{} did not start within 10 s",
                program.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// True when `pid` is PID 1 of a PID namespace of its own.
fn in_own_pid_namespace(pid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|v| {
            v.split_whitespace().last() == Some("1") && v.split_whitespace().count() > 1
        })
}

/// The CRIU backend behind the uniform API.
pub struct CriuCheckpointer {
    criu: Criu,
}

impl CriuCheckpointer {
    pub fn locate() -> Result<CriuCheckpointer> {
        Ok(CriuCheckpointer {
            criu: Criu::locate()?,
        })
    }

    pub fn criu(&self) -> &Criu {
        &self.criu
    }

    /// Restores a CRIU image as [`Checkpointer::restore`] does, with `inherit` passed to
    /// [`Criu::restore_inheriting`] (descriptors standing in for pipes the tree held to
    /// processes that were not dumped).
    pub fn restore_inheriting(
        &self,
        image_path: &Path,
        opts: &RestoreOptions,
        inherit: &[(String, i32)],
    ) -> Result<Restored> {
        let bytes = checkpointer::read(image_path)?;
        let image = Image::parse(&bytes)?;
        if image.meta_value("backend").as_deref() != Some("criu") {
            return Err(GhostError::Invalid(format!(
                "{} is not a CRIU image",
                image_path.display()
            )));
        }
        let pid: i32 = image
            .meta_value("pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let own_ns = image.meta_value("pidns").as_deref() == Some("own");
        if !own_ns && pid > 0 && Path::new(&format!("/proc/{pid}")).exists() {
            return Err(GhostError::PidInUse { pid });
        }
        let dir = match &opts.workdir {
            Some(w) => w.join(format!("criu-{}", image.image_id)),
            None => scratch_dir("restore")?,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_err(&dir, "creating the restore directory", e))?;
        let _cleanup = RemoveOnDrop(dir.clone());
        for s in image
            .sections
            .iter()
            .filter(|s| s.kind == SectionKind::CriuFile)
        {
            if s.name.contains('/') || s.name.starts_with('.') {
                return Err(GhostError::Invalid(format!(
                    "CRIU image file name {:?} is not a plain name",
                    s.name
                )));
            }
            std::fs::write(dir.join(s.name), s.data()?)
                .map_err(|e| io_err(dir.join(s.name), "unpacking", e))?;
        }
        let new_pid = self.criu.restore_inheriting(&dir, inherit)?;
        Ok(Restored {
            backend: Backend::Criu,
            pid: new_pid,
        })
    }
}

fn scratch_dir(tag: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(format!(
        "/dev/shm/krun-ghost-criu/{tag}-{}-{:x}",
        std::process::id(),
        crate::native::random_u32()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "creating a scratch directory", e))?;
    Ok(dir)
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Checkpointer for CriuCheckpointer {
    fn backend(&self) -> Backend {
        Backend::Criu
    }

    fn capture(&self, pid: i32, out: &Path, opts: &CaptureOptions) -> Result<Captured> {
        let start = Instant::now();
        let own_ns = in_own_pid_namespace(pid);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let dir = scratch_dir("dump")?;
        let _cleanup = RemoveOnDrop(dir.clone());
        self.criu.dump(pid, &dir, opts.leave_running)?;
        let mut files: Vec<(String, PathBuf, usize)> = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| io_err(&dir, "listing CRIU images", e))? {
            let entry = entry.map_err(|e| io_err(&dir, "listing CRIU images", e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.ends_with(".log") {
                continue;
            }
            let len = entry
                .metadata()
                .map_err(|e| io_err(entry.path(), "reading a CRIU image size", e))?
                .len() as usize;
            files.push((name, entry.path(), len));
        }
        files.sort();
        let meta = format!(
            "backend=criu\ncriu={}\npid={pid}\npidns={}\ncmdline={}\ncreated_unix={}\n",
            self.criu.version,
            if own_ns { "own" } else { "host" },
            crate::native::hex(&cmdline),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        let image_id = crate::native::random_u32() as u64 + 1;
        let read_into = |path: &Path, slot: &mut [u8]| {
            use std::io::Read;
            std::fs::File::open(path)
                .and_then(|mut f| f.read_exact(slot))
                .map_err(|e| io_err(path, "reading a CRIU image", e))
        };
        let image_bytes = if opts.compress {
            let mut b = ImageBuilder::new(image_id, 0, Vec::new());
            b.add(SectionKind::Meta, "meta", meta.as_bytes(), false)?;
            for (name, path, _) in &files {
                let data =
                    std::fs::read(path).map_err(|e| io_err(path, "reading a CRIU image", e))?;
                b.add(
                    SectionKind::CriuFile,
                    name,
                    &data,
                    name.starts_with("pages-"),
                )?;
            }
            let bytes = b.finish();
            crate::native::write_atomically(out, &bytes)?;
            bytes.len() as u64
        } else {
            // Files go straight from CRIU's directory into the mapped image file.
            let mut sizes = vec![(4, meta.len())];
            sizes.extend(files.iter().map(|(name, _, len)| (name.len(), *len)));
            let total = ImageBuilder::planned_len(&sizes);
            let file = crate::native::L1File::create_at(out, total, None)?;
            // SAFETY: the mapping is `total` writable bytes owned by `file`, which outlives
            // the builder (dropped before commit).
            let mut b = unsafe { ImageBuilder::in_place(image_id, 0, file.base(), total)? };
            b.add(SectionKind::Meta, "meta", meta.as_bytes(), false)?;
            for (name, path, len) in &files {
                read_into(path, b.reserve(SectionKind::CriuFile, name, *len)?)?;
            }
            let n = b.seal();
            drop(b);
            file.commit()?;
            n as u64
        };
        Ok(Captured {
            backend: Backend::Criu,
            image: out.to_path_buf(),
            image_bytes,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    fn restore(&self, image_path: &Path, opts: &RestoreOptions) -> Result<Restored> {
        self.restore_inheriting(image_path, opts, &[])
    }

    fn rollback(&self, pid: i32, image_path: &Path, opts: &RestoreOptions) -> Result<Restored> {
        let bytes = checkpointer::read(image_path)?;
        let image = Image::parse(&bytes)?;
        let image_pid: i32 = image
            .meta_value("pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if image_pid != pid {
            return Err(GhostError::Invalid(format!(
                "{} holds pid {image_pid}, not {pid}",
                image_path.display()
            )));
        }
        // Check the image and its files before ending the live process.
        if let Some(s) = image.sections.iter().find(|s| s.name == FILES_MANIFEST) {
            let tmp = scratch_dir("check")?;
            let _cleanup = RemoveOnDrop(tmp.clone());
            std::fs::write(tmp.join(FILES_MANIFEST), s.data()?)
                .map_err(|e| io_err(&tmp, "writing", e))?;
            check_open_files(&tmp.join(FILES_MANIFEST))?;
        }
        checkpointer::end_process(pid, Duration::from_secs(10))?;
        // The old PID may linger as a zombie until its parent reaps it.
        let start = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists()
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.restore(image_path, opts)
    }
}
