//! Starting a rank's process without copying the node daemon's address space.
//!
//! `std::process::Command` with a `pre_exec` closure must `fork`: the whole address space of
//! krund (which grows with the job) is copied page table by page table, and each page the
//! daemon writes afterwards takes a copy-on-write fault, once per rank. Here the child is
//! made with `clone(CLONE_VM | CLONE_VFORK)`: it runs on its own small stack in the parent's
//! memory, the calling thread waits until it has called `execve` (or given up), and nothing
//! is copied. Everything the child needs is prepared before (argv, envp and the executable
//! candidates as C strings, the descriptors, the CPU mask), and the child makes only
//! async-signal-safe system calls. A failure in the child (a missing program, a descriptor
//! that cannot be kept) is written into the shared memory and reported by the parent.
use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::binding::CpuMask;

/// Stack of the cloned child, which runs until `execve` (a few system calls).
const CHILD_STACK: usize = 128 * 1024;

/// Where a rank's standard input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// The daemon's own (rank 0 reads the user's input).
    Inherit,
    /// /dev/null.
    Null,
}

/// One change to the environment the process inherits, applied in order.
#[derive(Debug, Clone)]
pub enum EnvOp {
    Set(OsString, OsString),
    Remove(OsString),
}

/// What to start and how.
pub struct Spawn<'a> {
    /// Run as `execvp` would: searched in the child's `PATH` unless it contains a slash.
    pub program: &'a str,
    pub args: &'a [String],
    /// Changes to this process's environment.
    pub env: Vec<EnvOp>,
    pub stdin: Stdin,
    /// Lead a new session (and process group).
    pub own_session: bool,
    /// Descriptors the process keeps; every other one above stdio is closed at exec.
    pub keep: &'a [RawFd],
    pub mask: Option<CpuMask>,
}

/// A started process with the read ends of its stdout and stderr pipes (non-blocking).
#[derive(Debug)]
pub struct RankProcess {
    pid: u32,
    status: Option<ExitStatus>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl RankProcess {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Its exit status once it ended (reaped then; later calls repeat it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        self.wait_with(libc::WNOHANG)
    }

    /// Waits for it to end.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        self.wait_with(0)?
            .ok_or_else(|| io::Error::other("waitpid returned without a status"))
    }

    fn wait_with(&mut self, flags: i32) -> io::Result<Option<ExitStatus>> {
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child with a valid status pointer.
            let r = unsafe { libc::waitpid(self.pid as i32, &mut status, flags) };
            if r == self.pid as i32 {
                let s = ExitStatus::from_raw(status);
                self.status = Some(s);
                return Ok(Some(s));
            }
            if r == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// SIGKILL, unless it was reaped already (as `std::process::Child::kill`).
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the process has been reaped already",
            ));
        }
        // SAFETY: kill(2) of our own unreaped child: its pid cannot have been reused.
        if unsafe { libc::kill(self.pid as i32, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The step of the child that failed (reported with the error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Step {
    None = 0,
    Session = 1,
    DeathSignal = 2,
    Stdio = 3,
    Descriptors = 4,
    Binding = 5,
    Exec = 6,
}

impl Step {
    fn from_code(c: i32) -> Step {
        match c {
            1 => Step::Session,
            2 => Step::DeathSignal,
            3 => Step::Stdio,
            4 => Step::Descriptors,
            5 => Step::Binding,
            6 => Step::Exec,
            _ => Step::None,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Step::None | Step::Exec => "",
            Step::Session => "creating its session",
            Step::DeathSignal => "setting its parent-death signal",
            Step::Stdio => "redirecting its standard input and output",
            Step::Descriptors => "closing the daemon's descriptors",
            Step::Binding => "binding it to its CPUs",
        }
    }
}

/// Everything the child reads, prepared by the parent, and where it writes its failure.
/// Lives on the parent's stack, which the child shares and the parent does not touch until
/// the child has exec'd or exited (`CLONE_VFORK`).
struct ChildPlan {
    /// Paths to try in order (null-terminated C strings).
    candidates: Vec<*const libc::c_char>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// `/bin/sh`, a slot for the file, then the arguments (a file without a `#!` line that
    /// the kernel refuses with ENOEXEC is run by the shell, as `execvp` does).
    sh_argv: std::cell::UnsafeCell<Vec<*const libc::c_char>>,
    sh: CString,
    /// -1: inherit the daemon's.
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    own_session: bool,
    keep: Vec<RawFd>,
    mask: Option<CpuMask>,
    failed_step: AtomicI32,
    errno: AtomicI32,
}

/// Starts `spec` with new pipes for its stdout and stderr.
pub fn spawn(spec: &Spawn) -> io::Result<RankProcess> {
    let (out_r, out_w) = output_pipe()?;
    let (err_r, err_w) = output_pipe()?;
    let pid = spawn_with(spec, out_w.as_raw_fd(), err_w.as_raw_fd())?;
    Ok(RankProcess {
        pid,
        status: None,
        stdout: Some(out_r),
        stderr: Some(err_r),
    })
}

/// Starts `spec` with `stdout` and `stderr` as its output (descriptors of this process,
/// duplicated into the child); returns its pid.
pub fn spawn_with(spec: &Spawn, stdout: RawFd, stderr: RawFd) -> io::Result<u32> {
    let nul = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    };
    let cstring = |b: &[u8], what: &str| CString::new(b).map_err(|_| nul(what));
    if spec.program.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program name is empty",
        ));
    }
    // The environment: ours with the changes, in key order (as std builds it).
    let mut env: std::collections::BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for op in &spec.env {
        match op {
            EnvOp::Set(k, v) => {
                env.insert(k.clone(), v.clone());
            }
            EnvOp::Remove(k) => {
                env.remove(k);
            }
        }
    }
    let mut env_c = Vec::with_capacity(env.len());
    for (k, v) in &env {
        if k.is_empty() || k.as_bytes().contains(&b'=') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("environment variable name {k:?} is empty or contains '='"),
            ));
        }
        let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
        kv.extend_from_slice(k.as_bytes());
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env_c.push(cstring(&kv, &format!("environment variable {k:?}"))?);
    }
    let candidates_c = candidates(spec.program, env.get(OsStr::new("PATH")).map(|p| &**p))?;
    let mut argv_c = Vec::with_capacity(spec.args.len() + 1);
    argv_c.push(cstring(spec.program.as_bytes(), "the program name")?);
    for a in spec.args {
        argv_c.push(cstring(a.as_bytes(), &format!("argument {a:?}"))?);
    }
    let with_null = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    let sh = CString::new("/bin/sh").expect("no NUL");
    let mut sh_argv = vec![sh.as_ptr(), std::ptr::null()];
    sh_argv.extend(argv_c[1..].iter().map(|c| c.as_ptr()));
    sh_argv.push(std::ptr::null());
    let null_in = match spec.stdin {
        Stdin::Null => Some(above_stdio(open_dev_null()?)?),
        Stdin::Inherit => None,
    };
    // Descriptors 0-2 of the parent may be closed, and a pipe may have got one of their
    // numbers: the child's redirections need sources above them.
    let out = above_stdio_dup(stdout)?;
    let err = above_stdio_dup(stderr)?;
    let plan = ChildPlan {
        candidates: candidates_c.iter().map(|c| c.as_ptr()).collect(),
        argv: with_null(&argv_c),
        envp: with_null(&env_c),
        sh_argv: std::cell::UnsafeCell::new(sh_argv),
        sh,
        stdin: null_in.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        stdout: out.as_ref().map_or(stdout, AsRawFd::as_raw_fd),
        stderr: err.as_ref().map_or(stderr, AsRawFd::as_raw_fd),
        own_session: spec.own_session,
        keep: spec.keep.to_vec(),
        mask: spec.mask,
        failed_step: AtomicI32::new(Step::None as i32),
        errno: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // SAFETY: the plan and the stack outlive the child's use of them: CLONE_VFORK suspends
    // this thread until the child has exec'd or exited. Signals are blocked around clone
    // so that no handler of the daemon runs in the child before it reset them.
    let pid = unsafe { clone_child(&plan, &mut stack) }?;
    let step = Step::from_code(plan.failed_step.load(Ordering::SeqCst));
    if step != Step::None {
        let errno = plan.errno.load(Ordering::SeqCst);
        reap(pid);
        let e = io::Error::from_raw_os_error(errno);
        return Err(if step == Step::Exec {
            e
        } else {
            io::Error::new(e.kind(), format!("{}: {e}", step.what()))
        });
    }
    drop(argv_c);
    drop(env_c);
    drop(candidates_c);
    Ok(pid as u32)
}

/// Where `execvp` would look for `program`: itself when it contains a slash, else each
/// directory of `path` (`/bin:/usr/bin` without one; an empty entry is the current
/// directory).
fn candidates(program: &str, path: Option<&OsStr>) -> io::Result<Vec<CString>> {
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the program name contains a NUL byte",
        )
    };
    if program.contains('/') {
        return Ok(vec![CString::new(program).map_err(|_| bad())?]);
    }
    let path = path.map_or(&b"/bin:/usr/bin"[..], |p| p.as_bytes());
    let mut out = Vec::new();
    for dir in path.split(|&b| b == b':') {
        let mut full = Vec::with_capacity(dir.len() + program.len() + 1);
        if !dir.is_empty() {
            full.extend_from_slice(dir);
            if !dir.ends_with(b"/") {
                full.push(b'/');
            }
        }
        full.extend_from_slice(program.as_bytes());
        if let Ok(c) = CString::new(full) {
            out.push(c);
        }
    }
    Ok(out)
}

/// A pipe for a rank's output: the read end (ours) non-blocking, both close-on-exec; the
/// write end is duplicated into the child.
fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned from here on.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(r.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((r, w))
}

fn open_dev_null() -> io::Result<OwnedFd> {
    // SAFETY: open(2) of a constant path; the descriptor is checked and owned.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fd` itself when it is above 2, else a close-on-exec copy above 2.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    Ok(above_stdio_dup(fd.as_raw_fd())?.unwrap_or(fd))
}

/// A close-on-exec copy of `fd` above 2 when `fd` is 0, 1 or 2.
fn above_stdio_dup(fd: RawFd) -> io::Result<Option<OwnedFd>> {
    if fd > 2 {
        return Ok(None);
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, checked and owned.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if d < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(d) }))
}

/// Reaps a child that gave up before exec (it has exited or is about to).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on our own child; EINTR is retried.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

/// Clones the child that runs [`child_main`] with `plan` on `stack`; returns its pid once
/// it has exec'd or exited.
///
/// # Safety
/// `plan`'s pointers must point into memory alive for the call (its own vectors and the
/// C strings they were made from), and its descriptors must be open.
unsafe fn clone_child(plan: &ChildPlan, stack: &mut [u8]) -> io::Result<i32> {
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    let mut all: libc::sigset_t = std::mem::zeroed();
    let mut old: libc::sigset_t = std::mem::zeroed();
    libc::sigfillset(&mut all);
    libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    let pid = libc::clone(
        child_main,
        top as *mut libc::c_void,
        libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
        plan as *const ChildPlan as *mut libc::c_void,
    );
    let e = io::Error::last_os_error();
    libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    if pid < 0 {
        return Err(e);
    }
    Ok(pid)
}

/// The child: runs in the parent's memory until execve. Only async-signal-safe system
/// calls, no allocation, no lock.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildPlan`, alive and untouched while we run.
    let plan = unsafe { &*(arg as *const ChildPlan) };
    // SAFETY: as above; the steps only make system calls on the plan's data.
    let (step, errno) = unsafe { child_steps(plan) };
    plan.errno.store(errno, Ordering::SeqCst);
    plan.failed_step.store(step as i32, Ordering::SeqCst);
    // SAFETY: _exit ends the child without running anything of the parent's.
    unsafe { libc::_exit(127) }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Prepares the child and execs; returns only on failure (the step and its errno).
///
/// # Safety
/// Only for the cloned child, with the plan [`spawn_with`] built.
unsafe fn child_steps(plan: &ChildPlan) -> (Step, i32) {
    // The daemon's handlers must not run here (they would write the daemon's memory): set
    // them back to the default, keep ignored signals ignored except SIGPIPE (std ignores
    // it in its processes and restores it for children, as here).
    for sig in 1..65 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut sa) != 0 {
            continue;
        }
        if sa.sa_sigaction == libc::SIG_DFL
            || (sa.sa_sigaction == libc::SIG_IGN && sig != libc::SIGPIPE)
        {
            continue;
        }
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
    }
    // Each rank leads its own session and process group, so that signals and a forced end
    // reach the processes it starts too (a shell script's children), except a rank reading
    // a terminal, which must stay in the terminal's foreground group. Its own session also
    // lets CRIU move it: CRIU refuses a process whose session leader it cannot see (the
    // launcher's session leader may sit outside the PID namespace the job runs in, as
    // under a CI runner or a container).
    if plan.own_session && libc::setsid() == -1 && libc::setpgid(0, 0) != 0 {
        return (Step::Session, errno());
    }
    // Ranks die with their node daemon instead of lingering as orphans.
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
        return (Step::DeathSignal, errno());
    }
    let redirect = |src: RawFd, dst: RawFd| -> bool {
        if src == dst {
            libc::fcntl(dst, libc::F_SETFD, 0) == 0
        } else {
            libc::dup2(src, dst) == dst
        }
    };
    if (plan.stdin >= 0 && !redirect(plan.stdin, 0))
        || !redirect(plan.stdout, 1)
        || !redirect(plan.stderr, 2)
    {
        return (Step::Stdio, errno());
    }
    // Ranks inherit none of the daemon's descriptors (libfabric's endpoint sockets are not
    // close-on-exec) but the kept ones.
    if let Err(e) = ghost::descriptors::cloexec_above_stdio()
        .and_then(|()| ghost::descriptors::keep_across_exec(&plan.keep))
    {
        return (Step::Descriptors, e.raw_os_error().unwrap_or(libc::EIO));
    }
    if let Some(m) = &plan.mask {
        if let Err(e) = m.apply() {
            return (Step::Binding, e.raw_os_error().unwrap_or(libc::EIO));
        }
    }
    let empty: libc::sigset_t = std::mem::zeroed();
    libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    // As execvp: the first candidate that runs; a missing one is skipped, a refused one
    // (EACCES) remembered; a file the kernel cannot run is run by /bin/sh.
    let mut last = libc::ENOENT;
    let mut denied = false;
    for &c in &plan.candidates {
        libc::execve(c, plan.argv.as_ptr(), plan.envp.as_ptr());
        let e = errno();
        match e {
            libc::ENOEXEC => {
                let sh_argv = &mut *plan.sh_argv.get();
                sh_argv[1] = c;
                libc::execve(plan.sh.as_ptr(), sh_argv.as_ptr(), plan.envp.as_ptr());
                return (Step::Exec, errno());
            }
            libc::EACCES => {
                denied = true;
                last = e;
            }
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {
                last = e
            }
            _ => return (Step::Exec, e),
        }
    }
    (Step::Exec, if denied { libc::EACCES } else { last })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn spec<'a>(program: &'a str, args: &'a [String]) -> Spawn<'a> {
        Spawn {
            program,
            args,
            env: Vec::new(),
            stdin: Stdin::Null,
            own_session: true,
            keep: &[],
            mask: None,
        }
    }

    /// Runs `s` to its end: (status, stdout, stderr).
    fn run(s: &Spawn) -> (ExitStatus, String, String) {
        let mut p = spawn(s).unwrap();
        let read = |fd: OwnedFd| {
            // Blocking reads for the test.
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, 0) };
            let mut s = String::new();
            std::fs::File::from(fd).read_to_string(&mut s).unwrap();
            s
        };
        let out = read(p.stdout.take().unwrap());
        let err = read(p.stderr.take().unwrap());
        (p.wait().unwrap(), out, err)
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_missing_program_is_the_exec_error_and_the_child_is_reaped() {
        let e = spawn(&spec("/nonexistent/krun-rank", &[])).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        // Searched in PATH too.
        let mut s = spec("no-such-program-for-krun", &[]);
        s.env
            .push(EnvOp::Set("PATH".into(), "/usr/bin:/bin".into()));
        let e = spawn(&s).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        // No child of ours is left behind (zombie or not).
        // SAFETY: waitpid with WNOHANG on any child; no memory involved beyond the status.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        assert!(r <= 0, "an unreaped child {r}");
    }

    #[test]
    fn a_file_that_is_not_executable_is_refused_with_eacces() {
        let dir = std::env::temp_dir().join(format!("krun-spawn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("not-executable");
        std::fs::write(&f, "echo no\n").unwrap();
        let e = spawn(&spec(f.to_str().unwrap(), &[])).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        // A script without `#!` that may run is run by /bin/sh, with its arguments.
        let g = dir.join("no-shebang");
        std::fs::write(&g, "echo \"sh ran $1\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&g, std::fs::Permissions::from_mode(0o755)).unwrap();
        let a = args(&["it"]);
        let (st, out, _) = run(&spec(g.to_str().unwrap(), &a));
        assert!(st.success(), "{st:?}");
        assert_eq!(out, "sh ran it\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn arguments_environment_stdio_and_session_reach_the_process() {
        let a = args(&[
            "-c",
            "echo \"$0 $1 A=$KRUN_T_A B=${KRUN_T_B-unset}\"; echo err >&2; \
             read x || echo eof; ps -o sid= -p $$; echo $$",
            "zero",
            "one",
        ]);
        let mut s = spec("sh", &a);
        s.env = vec![
            EnvOp::Set("KRUN_T_A".into(), "a".into()),
            EnvOp::Set("KRUN_T_B".into(), "b".into()),
            EnvOp::Remove("KRUN_T_B".into()),
        ];
        let (st, out, err) = run(&s);
        assert!(st.success(), "{st:?} {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "zero one A=a B=unset");
        assert_eq!(err, "err\n");
        assert_eq!(lines[1], "eof", "stdin is /dev/null");
        // Its own session: its session id is its pid.
        assert_eq!(lines[2].trim(), lines[3].trim(), "{out}");
    }

    #[test]
    fn only_kept_descriptors_are_inherited_and_the_mask_applies() {
        // SAFETY: socket(2) without CLOEXEC, as libfabric opens its endpoints.
        let leaky =
            unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)) };
        // SAFETY: as above.
        let kept =
            unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)) };
        let cpus = crate::binding::current_affinity();
        let last = *cpus.last().unwrap();
        let a = args(&[
            "-c",
            "ls /proc/$$/fd; grep Cpus_allowed_list /proc/$$/status",
        ]);
        let keep = [kept.as_raw_fd()];
        let mut s = spec("sh", &a);
        s.keep = &keep;
        s.mask = Some(CpuMask::new(&[last]));
        let (st, out, err) = run(&s);
        assert!(st.success(), "{err}");
        let fds: Vec<i32> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
        assert!(fds.contains(&kept.as_raw_fd()), "{out}");
        assert!(!fds.contains(&leaky.as_raw_fd()), "{out}");
        let allowed = out
            .lines()
            .find(|l| l.starts_with("Cpus_allowed_list"))
            .unwrap();
        assert_eq!(
            allowed.split_whitespace().nth(1),
            Some(last.to_string().as_str())
        );
    }

    #[test]
    fn handlers_of_the_daemon_are_not_inherited() {
        // A handled SIGTERM in this process: the child must die of SIGTERM, not run it.
        extern "C" fn noop(_: libc::c_int) {}
        // SAFETY: installs a handler that does nothing (async-signal-safe) for SIGUSR2.
        unsafe { libc::signal(libc::SIGUSR2, noop as *const () as libc::sighandler_t) };
        let a = args(&["-c", "kill -USR2 $$; sleep 5"]);
        let (st, _, _) = run(&spec("sh", &a));
        assert_eq!(st.signal(), Some(libc::SIGUSR2), "{st:?}");
    }
}
