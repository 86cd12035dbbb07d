//! The few userfaultfd calls the native backend needs: write-protect tracking of anonymous
//! memory. Constants are spelled out here because Debian bookworm's kernel headers predate
//! `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4), which the running kernel has.
use crate::error::{GhostError, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn io(nr: u64) -> u64 {
    (0xAA << 8) | nr
}
const UFFDIO_API_IOCTL: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
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
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

fn os_err(what: &str) -> GhostError {
    GhostError::Userfaultfd {
        what: what.to_string(),
        source: std::io::Error::last_os_error(),
    }
}

/// A userfaultfd set up for write-protect faults, including on pages not yet populated.
pub struct WriteProtectFd {
    fd: OwnedFd,
    /// Write-protection of tmpfs (shmem) mappings is available too: a region may be a
    /// private mapping of a tmpfs image file (a restore that maps the image's pages).
    shmem: bool,
}

/// A write to a protected page: the faulting thread sleeps until the page is unprotected.
pub struct WpFault {
    pub address: u64,
}

impl WriteProtectFd {
    /// Opens a userfaultfd through /dev/userfaultfd, or the syscall when the device is absent.
    /// Both need root (or vm.unprivileged_userfaultfd=1): kernel-mode faults (a `read(2)` into
    /// registered memory) must be handled too, so UFFD_USER_MODE_ONLY is not an option.
    pub fn open() -> Result<WriteProtectFd> {
        // With tmpfs write-protection when the kernel has it (Linux >= 5.19), else without
        // (a fresh descriptor: UFFDIO_API is accepted once per descriptor).
        let base = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED;
        let fd = Self::new_fd()?;
        if Self::api(&fd, base | UFFD_FEATURE_WP_HUGETLBFS_SHMEM) {
            return Ok(WriteProtectFd { fd, shmem: true });
        }
        let fd = Self::new_fd()?;
        if !Self::api(&fd, base) {
            return Err(os_err(
                "UFFDIO_API with write-protect of unpopulated pages (needs Linux >= 6.4)",
            ));
        }
        Ok(WriteProtectFd { fd, shmem: false })
    }

    /// Whether tmpfs mappings can be write-protected (see the field).
    pub fn shmem(&self) -> bool {
        self.shmem
    }

    fn api(fd: &OwnedFd, features: u64) -> bool {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a uffdio_api struct we own.
        unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_IOCTL as _, &mut api) == 0 }
    }

    fn new_fd() -> Result<OwnedFd> {
        let flags = (libc::O_CLOEXEC) as libc::c_long;
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
                "cannot create a userfaultfd (needs root or vm.unprivileged_userfaultfd=1)",
            ));
        }
        // SAFETY: raw is a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Registers `[start, start+len)` for write-protect faults.
    pub fn register(&self, start: u64, len: u64) -> Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register struct we own; the
        // kernel validates the range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(os_err(&format!(
                "UFFDIO_REGISTER of {len} bytes at {start:#x} (must be private anonymous memory or a mapping of a tmpfs image, page-aligned)"
            )));
        }
        Ok(())
    }

    /// Write-protects (`protect`) or unprotects a range; unprotecting wakes threads that
    /// faulted on it.
    pub fn set_protection(&self, start: u64, len: u64, protect: bool) -> Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a struct we own.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut wp) } != 0 {
            return Err(os_err(&format!(
                "UFFDIO_WRITEPROTECT({protect}) of {len} bytes at {start:#x}"
            )));
        }
        Ok(())
    }

    /// Blocks until the next write-protect fault.
    pub fn next_fault(&self) -> Result<WpFault> {
        loop {
            let mut msg = [0u8; 32];
            // SAFETY: reads at most 32 bytes into msg.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(os_err("reading a fault"));
            }
            if n != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let flags = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
            let address = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
            if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                return Ok(WpFault { address });
            }
        }
    }
}
