//! What a child process inherits: only stdin, stdout, stderr and the descriptors it is
//! meant to get, never the parent's sockets. A daemon holds descriptors opened without
//! `O_CLOEXEC` by libraries it cannot change (libfabric's endpoint sockets, for one); a
//! rank started by it would otherwise hold the daemon's listening sockets open and keep its
//! ports bound after the daemon ends.
//!
//! Call [`cloexec_above_stdio`] in a `pre_exec` closure (it is async-signal-safe: only
//! system calls, no allocation), then clear `FD_CLOEXEC` on the descriptors the child must
//! keep (see [`keep_across_exec`]). Marking instead of closing leaves the standard library's
//! own exec-error pipe working (it is close-on-exec already).
use std::io;
use std::os::fd::RawFd;

/// The descriptors the fallback scan marks when `close_range(2)` is not available (Linux
/// before 5.11): up to the soft `RLIMIT_NOFILE`, at most this many.
const FALLBACK_SCAN_LIMIT: u64 = 1 << 16;

/// Marks every descriptor from 3 up close-on-exec: `close_range(3, ~0,
/// CLOSE_RANGE_CLOEXEC)`, or where the kernel lacks it, `fcntl(F_SETFD)` on each descriptor
/// below the soft descriptor limit (bounded by 65,536). Async-signal-safe.
pub fn cloexec_above_stdio() -> io::Result<()> {
    // SAFETY: close_range only changes descriptor flags of this process; the arguments are
    // plain integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // No close_range, or no CLOSE_RANGE_CLOEXEC flag (5.9, 5.10): scan instead.
        Some(libc::ENOSYS) | Some(libc::EINVAL) => cloexec_by_scan(),
        _ => Err(e),
    }
}

fn cloexec_by_scan() -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let end = lim.rlim_cur.min(FALLBACK_SCAN_LIMIT);
    for fd in 3..end as RawFd {
        // SAFETY: fcntl on a descriptor number that may not be open: EBADF, ignored.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: as above, on an open descriptor.
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        }
    }
    Ok(())
}

/// Clears `FD_CLOEXEC` on `fds`, so the child inherits them (after
/// [`cloexec_above_stdio`]). Async-signal-safe.
pub fn keep_across_exec(fds: &[RawFd]) -> io::Result<()> {
    for &fd in fds {
        // SAFETY: fcntl changes one descriptor flag; a bad descriptor is reported.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Opens a descriptor without O_CLOEXEC, as libfabric does with its sockets.
    fn leaky_socket() -> std::os::fd::OwnedFd {
        // SAFETY: socket(2) returns a fresh descriptor (checked) that we take ownership of.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "{}", io::Error::last_os_error());
            std::os::fd::FromRawFd::from_raw_fd(fd)
        }
    }

    fn child_fds(cmd: &mut Command) -> Vec<RawFd> {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(|s| s.parse().unwrap())
            .collect()
    }

    fn list_fds() -> Command {
        let mut cmd = Command::new("sh");
        // The shell's own descriptors: ls opens /proc/self/fd itself, so list the shell's.
        cmd.args(["-c", "ls /proc/$$/fd"]);
        cmd
    }

    #[test]
    fn a_child_inherits_no_descriptor_above_stdio_unless_kept() {
        let leaked = leaky_socket();
        let kept = leaky_socket();
        let (l, k) = (leaked.as_raw_fd(), kept.as_raw_fd());
        // Without the guard the child inherits the socket (the test can fail).
        let fds = child_fds(&mut list_fds());
        assert!(fds.contains(&l), "control: {fds:?} lacks {l}");
        let mut cmd = list_fds();
        // SAFETY: both calls are async-signal-safe (system calls only).
        unsafe {
            cmd.pre_exec(move || {
                cloexec_above_stdio()?;
                keep_across_exec(&[k])
            });
        }
        let fds = child_fds(&mut cmd);
        assert!(!fds.contains(&l), "{fds:?} holds {l}");
        assert!(fds.contains(&k), "{fds:?} lacks the kept {k}");
        assert!(
            fds.iter().all(|&fd| fd <= 2 || fd == k || fd >= 255),
            "{fds:?}"
        );
    }

    #[test]
    fn the_fallback_scan_marks_descriptors_too() {
        let leaked = leaky_socket();
        let l = leaked.as_raw_fd();
        let mut cmd = list_fds();
        // SAFETY: the scan makes system calls only.
        unsafe { cmd.pre_exec(cloexec_by_scan) };
        let fds = child_fds(&mut cmd);
        assert!(!fds.contains(&l), "{fds:?} holds {l}");
    }
}
