//! The userfaultfd calls the DSM needs: missing faults (reads and writes of pages not held)
//! and write-protect faults (writes to read-only copies), resolved by copying a page in
//! (`UFFDIO_COPY`, optionally write-protected), write-protecting, or waking.
//!
//! Constants are spelled out (Debian bookworm's headers predate some of them).
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{DsmError, Result};

pub const PAGE: usize = 4096;

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn io(nr: u64) -> u64 {
    (0xAA << 8) | nr
}
const UFFDIO_API_IOCTL: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);
const USERFAULTFD_IOC_NEW: u64 = io(0x00);

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

fn os_err(what: String) -> DsmError {
    DsmError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// A page fault read from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub address: u64,
    /// A write (to a missing page, or to a write-protected one).
    pub write: bool,
    /// A write-protect fault (the page is mapped read-only).
    pub wp: bool,
}

/// A userfaultfd for missing and write-protect faults.
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a non-blocking userfaultfd (needs root or vm.unprivileged_userfaultfd=1).
    pub fn open() -> Result<Uffd> {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_long;
        // SAFETY: plain syscalls; the returned descriptor is checked and owned below.
        let mut raw = unsafe {
            let dev = libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if dev >= 0 {
                let fd = libc::ioctl(dev, USERFAULTFD_IOC_NEW as _, flags);
                libc::close(dev);
                fd
            } else {
                -1
            }
        };
        if raw < 0 {
            // SAFETY: userfaultfd(2) takes only flags.
            raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as i32;
        }
        if raw < 0 {
            return Err(os_err(
                "cannot create a userfaultfd (needs root or vm.unprivileged_userfaultfd=1)".into(),
            ));
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a struct we own.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_IOCTL as _, &mut api) } != 0 {
            return Err(os_err("UFFDIO_API with write-protect faults".into()));
        }
        Ok(Uffd { fd })
    }

    /// Registers `[start, start+len)` (private anonymous, page aligned) for missing and
    /// write-protect faults.
    pub fn register(&self, start: u64, len: u64) -> Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: reads and writes a struct we own; the kernel validates the range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(os_err(format!(
                "UFFDIO_REGISTER of {len} bytes at {start:#x}"
            )));
        }
        Ok(())
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        let mut range = UffdioRange { start, len };
        // SAFETY: reads a struct we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) } != 0 {
            return Err(os_err(format!("UFFDIO_UNREGISTER at {start:#x}")));
        }
        Ok(())
    }

    /// Maps a copy of `src` (one page) at `dst`, read-only (write-protected) unless
    /// `writable`; wakes the threads waiting on it.
    ///
    /// # Safety
    /// `src` must be valid for reading [`PAGE`] bytes.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, writable: bool) -> Result<()> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len: PAGE as u64,
            mode: if writable { 0 } else { UFFDIO_COPY_MODE_WP },
            copy: 0,
        };
        loop {
            if libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                c.copy = 0;
                continue;
            }
            return Err(DsmError::Os {
                what: format!("UFFDIO_COPY to {dst:#x}"),
                source: e,
            });
        }
    }

    /// Write-protects (`protect`) or unprotects one page; unprotecting wakes writers.
    pub fn protect(&self, start: u64, protect: bool) -> Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start,
                len: PAGE as u64,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: reads a struct we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) } != 0 {
            return Err(os_err(format!(
                "UFFDIO_WRITEPROTECT({protect}) at {start:#x}"
            )));
        }
        Ok(())
    }

    /// Wakes the threads waiting on one page.
    pub fn wake(&self, start: u64) -> Result<()> {
        let mut range = UffdioRange {
            start,
            len: PAGE as u64,
        };
        // SAFETY: reads a struct we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) } != 0 {
            return Err(os_err(format!("UFFDIO_WAKE at {start:#x}")));
        }
        Ok(())
    }

    /// The next fault, waiting at most `timeout_ms`; `None` on timeout or when another
    /// thread took it.
    pub fn next_fault(&self, timeout_ms: i32) -> Result<Option<Fault>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n <= 0 {
            return Ok(None);
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into msg.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                return Ok(None);
            }
            return Err(DsmError::Os {
                what: "reading a userfaultfd message".into(),
                source: e,
            });
        }
        if n != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let flags = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
        let address = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
        Ok(Some(Fault {
            address,
            write: flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP) != 0,
            wp: flags & UFFD_PAGEFAULT_FLAG_WP != 0,
        }))
    }
}

/// Times `pages` read faults on a private region of this process, each resolved by a
/// handler thread with `UFFDIO_COPY` from local memory (microseconds each): the reference
/// for a DSM fault.
pub fn local_fault_latency(pages: usize) -> Result<Vec<f64>> {
    let uffd = std::sync::Arc::new(Uffd::open()?);
    let len = pages * PAGE;
    // SAFETY: a fresh private anonymous mapping.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(os_err("mapping the reference region".into()));
    }
    let base = base as u64;
    let result = (|| {
        uffd.register(base, len as u64)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (u, s) = (uffd.clone(), stop.clone());
        let handler = std::thread::spawn(move || -> Result<()> {
            let src = vec![7u8; PAGE];
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(f) = u.next_fault(20)? {
                    // SAFETY: src holds PAGE bytes.
                    unsafe { u.copy(f.address & !(PAGE as u64 - 1), src.as_ptr(), true)? };
                }
            }
            Ok(())
        });
        let mut times = Vec::new();
        for i in 0..pages {
            let t = std::time::Instant::now();
            // SAFETY: inside the mapping; the handler resolves the fault.
            let v = unsafe { ((base + (i * PAGE) as u64) as *const u8).read_volatile() };
            times.push(t.elapsed().as_secs_f64() * 1e6);
            if v != 7 {
                stop.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(DsmError::Config {
                    what: "reference fault".into(),
                    reason: format!("read {v}, expected 7"),
                });
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        handler.join().map_err(|_| DsmError::Config {
            what: "reference fault".into(),
            reason: "handler panicked".into(),
        })??;
        Ok(times)
    })();
    // SAFETY: our own mapping, no longer used.
    unsafe { libc::munmap(base as *mut _, len) };
    result
}
