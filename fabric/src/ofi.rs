//! libfabric backend: RDM endpoints on `tcp;ofi_rxm`, `shm` or `verbs;ofi_rxm`.
//!
//! One endpoint, one completion queue and one address vector per [`OfiEndpoint`]. Operation
//! contexts are ids into a table of pending operations; completions resolve them. Progress is
//! driven by waiters (lowest latency) and by a background thread, so a target whose owner
//! is busy computing still serves one-sided operations.
use std::ffi::{c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libfabric_sys as sys;

use crate::completion::{Completion, OpState, Progress};
use crate::config::{FabricConfig, Provider};
use crate::endpoint::{Endpoint, EndpointAddress, Inbox, Message, PeerId};
use crate::error::{FabricError, Result};
use crate::memory::{MemoryRegion, Region, RemoteRegion};
use crate::ops::{FailedOp, OpTable};

/// Receive buffers kept posted for two-sided messages.
const RECV_BUFFERS: usize = 32;
/// Context ids with this bit set are receive buffers, not operations.
const RECV_CONTEXT: u64 = 1 << 63;
/// Sender token prepended to every message so the receiver can name the sender.
const MSG_HEADER: usize = 8;
/// Longest sleep in poll(2) on the CQ wait fd (bounds a missed wake-up).
const PROGRESS_POLL_MS: libc::c_int = 2;
/// Idle polling period of the progress thread when the CQ has no wait fd (shm), right after
/// the endpoint was last used; each idle poll doubles it up to [`SHM_IDLE_POLL_MAX`].
const SHM_IDLE_POLL: Duration = Duration::from_micros(10);
/// The longest idle polling period (shm). A fixed 10 us period made every idle endpoint
/// wake 100,000 times a second: with 4 ranks of 2 endpoints each on 2 cores those wake-ups
/// took the cores from the threads doing the work (MGS on the DSM over shm, 4 ranks on 2
/// local nodes: 4-37 s per run, with stalls of up to 0.99 s in which every other thread
/// waited runnable; `perf sched latency`).
const SHM_IDLE_POLL_MAX: Duration = Duration::from_micros(500);
/// After any sign of use the progress thread polls without sleeping this long, so a target
/// serving a stream of one-sided operations answers at the provider's speed. It was 20 ms:
/// every operation a rank posted kept its progress threads spinning that long, and on a
/// 2-core node with 4 ranks those spinners took the cores from the work (MGS on the DSM,
/// debug build, 4 ranks on 2 local nodes: shm 1.4-2.7 s -> 0.4-0.8 s, tcp 3.4-5.5 s ->
/// 1.7-1.9 s; 3 ranks on 3 nodes, tcp: 1.9-2.9 s -> 0.9-1.0 s).
const HOT_WINDOW: Duration = Duration::from_millis(2);
/// With libfabric 2.x, a shm peer's liveness is re-checked at most this often per post.
const LIVENESS_PERIOD: Duration = Duration::from_millis(1);

fn provider_string(p: Provider) -> Option<&'static str> {
    match p {
        Provider::Tcp => Some("tcp;ofi_rxm"),
        Provider::Shm => Some("shm"),
        Provider::VerbsOfi => Some("verbs;ofi_rxm"),
        _ => None,
    }
}

/// The wait fd of a CQ opened with `FI_WAIT_FD` (`fi_control(FI_GETWAIT)`).
///
/// # Safety
/// `cq` must be an open CQ.
unsafe fn cq_wait_fd(cq: *mut sys::fid_cq) -> Option<libc::c_int> {
    let ops = (*cq).fid.ops;
    let control = if ops.is_null() { None } else { (*ops).control }?;
    let mut fd: libc::c_int = -1;
    let rc = control(
        &mut (*cq).fid,
        sys::FI_GETWAIT as i32,
        (&mut fd as *mut libc::c_int).cast(),
    );
    (rc == 0 && fd >= 0).then_some(fd)
}

fn fi_error_string(code: i64) -> String {
    match sys::Lib::loaded() {
        Some(lib) => lib.strerror((-code) as i32),
        None => format!("libfabric error {}", -code),
    }
}

/// Raw libfabric objects. Closed in reverse order of opening on drop.
struct Objects {
    lib: &'static sys::Lib,
    info: *mut sys::fi_info,
    fabric: *mut sys::fid_fabric,
    domain: *mut sys::fid_domain,
    cq: *mut sys::fid_cq,
    av: *mut sys::fid_av,
    ep: *mut sys::fid_ep,
    /// Counts remote reads and writes served by this endpoint (shm, when it offers
    /// FI_RMA_EVENT): the progress thread's only sign that a peer is using it.
    cntr: *mut sys::fid_cntr,
}

impl Drop for Objects {
    fn drop(&mut self) {
        // SAFETY: each pointer is either null or an object we opened and still own.
        unsafe {
            if !self.ep.is_null() {
                sys::krun_fi_close_ep(self.ep);
            }
            if !self.cntr.is_null() {
                sys::krun_fi_close_cntr(self.cntr);
            }
            if !self.av.is_null() {
                sys::krun_fi_close_av(self.av);
            }
            if !self.cq.is_null() {
                sys::krun_fi_close_cq(self.cq);
            }
            if !self.domain.is_null() {
                sys::krun_fi_close_domain(self.domain);
            }
            if !self.fabric.is_null() {
                sys::krun_fi_close_fabric(self.fabric);
            }
            if !self.info.is_null() {
                (self.lib.fi_freeinfo)(self.info);
            }
        }
    }
}

/// A registration: closes the libfabric MR on drop.
struct OfiRegistration {
    mr: *mut sys::fid_mr,
    desc: *mut c_void,
    // Keeps the domain open while this registration lives.
    _objects: Arc<ObjectsHandle>,
}

// SAFETY: libfabric MR handles may be used and closed from any thread (FI_THREAD_SAFE).
unsafe impl Send for OfiRegistration {}
unsafe impl Sync for OfiRegistration {}

impl Drop for OfiRegistration {
    fn drop(&mut self) {
        // SAFETY: mr was opened by fi_mr_reg and is closed once, here.
        unsafe { sys::krun_fi_close_mr(self.mr) };
    }
}

struct ObjectsHandle(Objects);
// SAFETY: the domain is opened with FI_THREAD_SAFE; libfabric serializes internally.
unsafe impl Send for ObjectsHandle {}
unsafe impl Sync for ObjectsHandle {}

struct Inner {
    provider: Provider,
    provider_name: String,
    objects: Arc<ObjectsHandle>,
    /// The provider chooses keys; otherwise we request unique ones.
    prov_key: bool,
    next_key: AtomicU64,
    token: u64,
    /// Connected peers: token, libfabric address, and for shm the peer's process.
    peers: RwLock<Vec<(u64, sys::fi_addr_t, Option<PeerProcess>)>>,
    /// libfabric before 2.0: a post towards a shm peer that died holding its lock spins
    /// forever, so liveness is checked before every post (2.x returns EAGAIN instead).
    check_every_post: bool,
    /// Origin of the microsecond clocks below.
    epoch: Instant,
    /// Until when (us since `epoch`) the progress thread keeps polling without sleeping:
    /// pushed forward by every sign of use (posts, completions, served remote accesses,
    /// a caller waiting in `recv`).
    hot_until_us: AtomicU64,
    /// Peers an operation timed out on. Later operations to them fail at once: a provider
    /// call towards a dead shm peer can block forever on the lock the peer died holding.
    ops: OpTable,

    cq_lock: Mutex<()>,
    waiters: AtomicUsize,
    inbox: Inbox,
    timeout: Duration,
    max_message: usize,
    /// 24 bytes per slot: operand, compare, result.
    atomic_scratch: MemoryRegion,

    send_pool: MemoryRegion,

    recv_pool: MemoryRegion,
    shutdown: AtomicBool,
    /// The CQ's wait fd (an epoll fd over the provider's sockets), when it has one.
    wait_fd: Option<libc::c_int>,
}

pub struct OfiEndpoint {
    inner: Arc<Inner>,
    progress_thread: Option<JoinHandle<()>>,
}

fn check(provider: &str, call: &'static str, rc: i64) -> Result<()> {
    if rc < 0 {
        return Err(FabricError::Call {
            provider: provider.to_string(),
            call,
            code: rc,
            message: fi_error_string(rc),
        });
    }
    Ok(())
}

impl OfiEndpoint {
    pub fn open(provider: Provider, config: &FabricConfig) -> Result<OfiEndpoint> {
        let prov = provider_string(provider).ok_or_else(|| FabricError::ProviderUnavailable {
            provider: provider.to_string(),
            reason: "not a libfabric provider".into(),
        })?;
        // libfabric is loaded here, the first time an endpoint is opened, not at start-up.
        let lib = sys::Lib::load().map_err(|reason| FabricError::ProviderUnavailable {
            provider: prov.into(),
            reason,
        })?;
        let mut objects = Objects {
            lib,
            info: ptr::null_mut(),
            fabric: ptr::null_mut(),
            domain: ptr::null_mut(),
            cq: ptr::null_mut(),
            av: ptr::null_mut(),
            ep: ptr::null_mut(),
            cntr: ptr::null_mut(),
        };
        let mut wait_fd = None;
        if provider == Provider::Shm {
            // A process that held this PID before and was killed left its segments behind;
            // shm then refuses to create ours (EBUSY). None of ours exist before the first open.
            static STALE_SEGMENTS_SWEPT: std::sync::Once = std::sync::Once::new();
            STALE_SEGMENTS_SWEPT.call_once(|| remove_shm_segments(std::process::id()));
        }
        // SAFETY: standard libfabric set-up sequence; every out-pointer is checked before use
        // and owned by `objects`, whose Drop closes what was opened.
        unsafe {
            let hints = lib.allocinfo();
            if hints.is_null() {
                return Err(FabricError::ProviderUnavailable {
                    provider: prov.into(),
                    reason: "fi_allocinfo returned null".into(),
                });
            }
            (*hints).caps = (sys::FI_RMA
                | sys::FI_ATOMIC
                | sys::FI_TAGGED
                | sys::FI_READ
                | sys::FI_WRITE
                | sys::FI_REMOTE_READ
                | sys::FI_REMOTE_WRITE
                | sys::FI_SEND
                | sys::FI_RECV) as u64;
            (*(*hints).ep_attr).type_ = sys::fi_ep_type_FI_EP_RDM;
            (*(*hints).domain_attr).threading = sys::fi_threading_FI_THREAD_SAFE;
            (*(*hints).domain_attr).mr_mode = (sys::FI_MR_LOCAL
                | sys::FI_MR_VIRT_ADDR
                | sys::FI_MR_ALLOCATED
                | sys::FI_MR_PROV_KEY) as i32;
            (*(*hints).domain_attr).av_type = sys::fi_av_type_FI_AV_TABLE;
            let name = CString::new(prov).expect("no NUL in provider names");
            // fi_freeinfo frees prov_name with free(): give it a malloc'd copy.
            (*(*hints).fabric_attr).prov_name = libc::strdup(name.as_ptr());
            let node =
                CString::new(config.bind_address.as_str()).map_err(|_| FabricError::BadConfig {
                    key: "bind_address".into(),
                    value: config.bind_address.clone(),
                    reason: "contains NUL".into(),
                })?;
            let (node_ptr, flags) = if provider == Provider::Shm {
                (ptr::null(), 0)
            } else {
                (node.as_ptr(), sys::FI_SOURCE)
            };
            let base_caps = (*hints).caps;
            let mut rc = -1;
            // shm: ask for remote-access counters first (see `Objects::cntr`).
            if provider == Provider::Shm {
                (*hints).caps = base_caps | sys::FI_RMA_EVENT;
                rc = (lib.fi_getinfo)(
                    sys::KRUN_FI_VERSION,
                    node_ptr,
                    ptr::null(),
                    flags,
                    hints,
                    &mut objects.info,
                );
            }
            if rc != 0 || objects.info.is_null() {
                (*hints).caps = base_caps;
                objects.info = ptr::null_mut();
                rc = (lib.fi_getinfo)(
                    sys::KRUN_FI_VERSION,
                    node_ptr,
                    ptr::null(),
                    flags,
                    hints,
                    &mut objects.info,
                );
            }
            (lib.fi_freeinfo)(hints);
            if rc != 0 || objects.info.is_null() {
                return Err(FabricError::ProviderUnavailable {
                    provider: prov.into(),
                    reason: format!("fi_getinfo: {}", fi_error_string(rc as i64)),
                });
            }
            let info = objects.info;
            check(
                prov,
                "fi_fabric",
                (lib.fi_fabric)((*info).fabric_attr, &mut objects.fabric, ptr::null_mut()) as i64,
            )?;
            check(
                prov,
                "fi_domain",
                sys::krun_fi_domain(objects.fabric, info, &mut objects.domain, ptr::null_mut())
                    as i64,
            )?;
            let cq_size = (config.max_in_flight + RECV_BUFFERS + 64).next_power_of_two();
            // A CQ with a wait fd lets the idle progress thread sleep in poll(2) until data
            // arrives on a connection, instead of polling on a timer (shm has no fd to wait on).
            if provider != Provider::Shm {
                let mut cq_attr = sys::fi_cq_attr {
                    size: cq_size,
                    format: sys::fi_cq_format_FI_CQ_FORMAT_TAGGED,
                    wait_obj: sys::fi_wait_obj_FI_WAIT_FD,
                    ..Default::default()
                };
                if sys::krun_fi_cq_open(
                    objects.domain,
                    &mut cq_attr,
                    &mut objects.cq,
                    ptr::null_mut(),
                ) == 0
                {
                    wait_fd = cq_wait_fd(objects.cq);
                    if wait_fd.is_none() {
                        sys::krun_fi_close_cq(objects.cq);
                        objects.cq = ptr::null_mut();
                    }
                } else {
                    objects.cq = ptr::null_mut();
                }
            }
            if objects.cq.is_null() {
                let mut cq_attr = sys::fi_cq_attr {
                    size: cq_size,
                    format: sys::fi_cq_format_FI_CQ_FORMAT_TAGGED,
                    wait_obj: sys::fi_wait_obj_FI_WAIT_NONE,
                    ..Default::default()
                };
                check(
                    prov,
                    "fi_cq_open",
                    sys::krun_fi_cq_open(
                        objects.domain,
                        &mut cq_attr,
                        &mut objects.cq,
                        ptr::null_mut(),
                    ) as i64,
                )?;
            }
            let mut av_attr = sys::fi_av_attr {
                type_: sys::fi_av_type_FI_AV_TABLE,
                ..Default::default()
            };
            check(
                prov,
                "fi_av_open",
                sys::krun_fi_av_open(
                    objects.domain,
                    &mut av_attr,
                    &mut objects.av,
                    ptr::null_mut(),
                ) as i64,
            )?;
            check(
                prov,
                "fi_endpoint",
                sys::krun_fi_endpoint(objects.domain, info, &mut objects.ep, ptr::null_mut())
                    as i64,
            )?;
            check(
                prov,
                "fi_ep_bind(cq)",
                sys::krun_fi_ep_bind(
                    objects.ep,
                    &mut (*objects.cq).fid,
                    (sys::FI_TRANSMIT | sys::FI_RECV) as u64,
                ) as i64,
            )?;
            check(
                prov,
                "fi_ep_bind(av)",
                sys::krun_fi_ep_bind(objects.ep, &mut (*objects.av).fid, 0) as i64,
            )?;
            if (*objects.info).caps & sys::FI_RMA_EVENT != 0 {
                let mut cntr_attr = sys::fi_cntr_attr {
                    events: sys::fi_cntr_events_FI_CNTR_EVENTS_COMP,
                    wait_obj: sys::fi_wait_obj_FI_WAIT_NONE,
                    ..Default::default()
                };
                if sys::krun_fi_cntr_open(
                    objects.domain,
                    &mut cntr_attr,
                    &mut objects.cntr,
                    ptr::null_mut(),
                ) != 0
                {
                    objects.cntr = ptr::null_mut();
                } else if sys::krun_fi_ep_bind(
                    objects.ep,
                    &mut (*objects.cntr).fid,
                    (sys::FI_REMOTE_READ | sys::FI_REMOTE_WRITE) as u64,
                ) != 0
                {
                    sys::krun_fi_close_cntr(objects.cntr);
                    objects.cntr = ptr::null_mut();
                }
            }
            check(prov, "fi_enable", sys::krun_fi_enable(objects.ep) as i64)?;
        }
        // SAFETY: info is valid until objects is dropped.
        let mr_mode = unsafe { (*(*objects.info).domain_attr).mr_mode } as u32;
        let objects = Arc::new(ObjectsHandle(objects));
        let token = crate::random_token()?;
        let slots = config.max_in_flight;
        let send_slots = 64usize;
        let slot_bytes = config.max_message + MSG_HEADER;
        let atomic_scratch = register_with(&objects, prov, mr_mode, 1, Region::new(slots * 24)?)?;
        let send_pool = register_with(
            &objects,
            prov,
            mr_mode,
            2,
            Region::new(send_slots * slot_bytes)?,
        )?;
        let recv_pool = register_with(
            &objects,
            prov,
            mr_mode,
            3,
            Region::new(RECV_BUFFERS * slot_bytes)?,
        )?;
        let inner = Arc::new(Inner {
            provider,
            provider_name: prov.to_string(),
            objects,
            prov_key: mr_mode & sys::FI_MR_PROV_KEY != 0,
            next_key: AtomicU64::new(16),
            token,
            peers: RwLock::new(Vec::new()),
            check_every_post: lib.version().0 < 2,
            epoch: Instant::now(),
            hot_until_us: AtomicU64::new(0),

            ops: OpTable::new(config.max_in_flight, send_slots),

            cq_lock: Mutex::new(()),
            waiters: AtomicUsize::new(0),
            inbox: Inbox::new(config.recv_poll_window()),
            timeout: config.op_timeout,
            max_message: config.max_message,
            atomic_scratch,

            send_pool,

            recv_pool,
            shutdown: AtomicBool::new(false),
            wait_fd,
        });
        for i in 0..RECV_BUFFERS {
            inner.post_recv(i)?;
        }
        let thread_inner = inner.clone();
        let progress_thread = std::thread::Builder::new()
            .name(format!("krun-fabric-{}", provider.name()))
            .spawn(move || thread_inner.progress_loop())
            .map_err(|e| FabricError::io("spawning the fabric progress thread", e))?;
        Ok(OfiEndpoint {
            inner,
            progress_thread: Some(progress_thread),
        })
    }

    /// Operations currently in flight (for tests and diagnostics).
    pub fn in_flight(&self) -> usize {
        self.inner.ops.in_flight.current()
    }

    /// How many times a receive on this endpoint went to sleep waiting for its message,
    /// after polling for it (for tests and diagnostics).
    pub fn receive_naps(&self) -> u64 {
        self.inner.inbox.naps()
    }
}

impl Drop for OfiEndpoint {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        if let Some(t) = self.progress_thread.take() {
            let _ = t.join();
        }
        // Fail whatever is still pending so no waiter hangs. An operation the provider never
        // reported (a wrong key on shm with delivery-complete never completes) still sits in
        // its queues: closing the endpoint under it crashes libfabric 2.1's shm, so the
        // provider's objects are left open (leaked) in that case.
        if self.inner.ops.fail_all() {
            std::mem::forget(self.inner.objects.clone());
        }
    }
}

fn register_with(
    objects: &Arc<ObjectsHandle>,
    prov: &str,
    mr_mode: u32,
    requested_key: u64,
    region: Region,
) -> Result<MemoryRegion> {
    let access = (sys::FI_READ
        | sys::FI_WRITE
        | sys::FI_REMOTE_READ
        | sys::FI_REMOTE_WRITE
        | sys::FI_SEND
        | sys::FI_RECV) as u64;
    let mut mr: *mut sys::fid_mr = ptr::null_mut();
    let len = region.len();
    // SAFETY: the region is valid for len bytes and outlives the registration (MemoryRegion
    // drops the registration first).
    let rc = unsafe {
        sys::krun_fi_mr_reg(
            objects.0.domain,
            region.as_ptr() as *const c_void,
            len,
            access,
            0,
            requested_key,
            0,
            &mut mr,
            ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(FabricError::Registration {
            len,
            reason: format!("fi_mr_reg on {prov}: {}", fi_error_string(rc as i64)),
        });
    }
    // SAFETY: mr is a valid registration.
    let (key, desc) = unsafe { (sys::krun_fi_mr_key(mr), sys::krun_fi_mr_desc(mr)) };
    let addr = if mr_mode & sys::FI_MR_VIRT_ADDR != 0 {
        region.as_ptr() as u64
    } else {
        0
    };
    let registration = OfiRegistration {
        mr,
        desc,
        _objects: objects.clone(),
    };
    Ok(MemoryRegion::new(
        region,
        Box::new(registration),
        RemoteRegion {
            addr,
            key,
            len: len as u64,
        },
    ))
}

/// Removes the shared-memory segments the shm provider made for process `pid`
/// (`/dev/shm/PID:...`): a process killed before closing its endpoint leaves them behind.
pub fn remove_shm_segments(pid: u32) {
    let prefix = format!("{pid}:");
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in dir.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The process id in a shm address (`fi_shm://PID:...`).
fn shm_pid(raw: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(raw).ok()?.trim_end_matches('\0');
    let rest = text.strip_prefix("fi_shm://")?;
    rest.split(':').next()?.parse().ok()
}

/// Between two polls of a hot progress loop: spin, and give the core away (sched_yield) only
/// every 64th time. Yielding on every poll hands the core to any other runnable task for its
/// whole slice, which on a loaded node turned 1.5 us operations into 60-70 us ones.
fn hot_pause(spins: u32) {
    if spins.is_multiple_of(64) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// A shm peer's process, watched through a pidfd (readable once the process has exited).
/// Checking it is one poll(2), not a read of /proc.
struct PeerProcess {
    pid: u32,
    pidfd: Option<std::os::fd::OwnedFd>,
    /// When it was last seen alive (us since the endpoint's epoch).
    checked_us: AtomicU64,
    dead: AtomicBool,
}

impl PeerProcess {
    fn watch(pid: u32) -> PeerProcess {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: fd is a fresh descriptor we own.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
        });
        PeerProcess {
            pid,
            pidfd,
            checked_us: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }
    }

    /// Whether the process still runs; checked at most once per `every_us` unless `always`.
    fn alive(&self, now_us: u64, every_us: u64) -> bool {
        if self.dead.load(Ordering::Relaxed) {
            return false;
        }
        if every_us > 0 && now_us.saturating_sub(self.checked_us.load(Ordering::Relaxed)) < every_us
        {
            return true;
        }
        let alive = match &self.pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: pfd is a valid pollfd array of length 1; zero timeout.
                let n = unsafe { libc::poll(&mut pfd, 1, 0) };
                !(n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0)
            }
            None => process_alive(self.pid),
        };
        if alive {
            self.checked_us.store(now_us, Ordering::Relaxed);
        } else {
            self.dead.store(true, Ordering::Relaxed);
        }
        alive
    }
}

/// True while `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn desc_of(mr: &MemoryRegion) -> *mut c_void {
    mr.registration::<OfiRegistration>()
        .map_or(ptr::null_mut(), |r| r.desc)
}

impl Inner {
    fn ep(&self) -> *mut sys::fid_ep {
        self.objects.0.ep
    }

    fn slot_bytes(&self) -> usize {
        self.max_message + MSG_HEADER
    }

    fn post_recv(&self, index: usize) -> Result<()> {
        let len = self.slot_bytes();
        let buf = self.recv_pool.check_local(index * len, len)?;
        loop {
            // SAFETY: the buffer lies in the registered receive pool, reserved for slot `index`
            // until its completion is processed.
            let rc = unsafe {
                sys::krun_fi_trecv(
                    self.ep(),
                    buf as *mut c_void,
                    len,
                    desc_of(&self.recv_pool),
                    sys::FI_ADDR_UNSPEC,
                    0,
                    !0u64,
                    (RECV_CONTEXT | index as u64) as *mut c_void,
                )
            };
            if rc == -(sys::FI_EAGAIN as isize) {
                self.progress();
                continue;
            }
            return check(&self.provider_name, "fi_trecv", rc as i64);
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Keeps the progress thread polling for `HOT_WINDOW` from now.
    fn heat(&self) {
        let until = self.now_us() + HOT_WINDOW.as_micros() as u64;
        if self.hot_until_us.load(Ordering::Relaxed) < until {
            self.hot_until_us.store(until, Ordering::Relaxed);
        }
    }

    fn peer_addr(&self, peer: PeerId, op: &'static str) -> Result<sys::fi_addr_t> {
        self.ops.check_reachable(peer, op)?;
        self.heat();
        let peers = self.peers.read().expect("peers lock");
        let (_, addr, process) = peers
            .get(peer.0 as usize)
            .ok_or(FabricError::UnknownPeer(peer))?;
        // With libfabric 1.x, a shm peer that died holding its region's lock makes the
        // provider spin forever on the next post: check before every post (a poll on the
        // peer's pidfd). 2.x never hangs there: check at most every LIVENESS_PERIOD, and on
        // every retry of a post the provider refused (see `post`).
        if let Some(p) = process {
            let every = if self.check_every_post {
                0
            } else {
                LIVENESS_PERIOD.as_micros() as u64
            };
            if !p.alive(self.now_us(), every) {
                self.ops.mark_unreachable(peer);
                return Err(FabricError::Remote {
                    op,
                    peer,
                    message: format!("the peer's process {} has exited", p.pid),
                });
            }
        }
        Ok(*addr)
    }

    /// Fails `peer` at once when its process is known to have exited (shm).
    fn peer_gone(&self, peer: PeerId) -> Option<u32> {
        let peers = self.peers.read().expect("peers lock");
        let p = peers.get(peer.0 as usize)?.2.as_ref()?;
        (!p.alive(self.now_us(), 0)).then_some(p.pid)
    }

    /// Retries a post while the provider's queue is full, driving progress, up to the timeout.
    fn post(
        &self,
        op: &'static str,
        peer: PeerId,
        id: u64,
        mut f: impl FnMut() -> isize,
    ) -> Result<()> {
        let start = Instant::now();
        let mut backoff = crate::completion::Backoff::new();
        loop {
            let rc = f();
            if rc == 0 {
                return Ok(());
            }
            if rc == -(sys::FI_EAGAIN as isize) && start.elapsed() < self.timeout {
                // The caller learnt meanwhile that the peer failed (`Endpoint::peer_failed`):
                // tcp;ofi_rxm answers EAGAIN while it cannot connect to a dead peer.
                if let Err(e) = self.ops.check_reachable(peer, op) {
                    self.ops.cancel(id);
                    return Err(e);
                }
                // libfabric 2.x's shm refuses posts towards a dead peer with EAGAIN forever.
                if let Some(pid) = self.peer_gone(peer) {
                    self.ops.cancel(id);
                    self.ops.mark_unreachable(peer);
                    return Err(FabricError::Remote {
                        op,
                        peer,
                        message: format!("the peer's process {pid} has exited"),
                    });
                }
                self.progress();
                backoff.pause();
                continue;
            }
            self.ops.cancel(id);
            if rc == -(sys::FI_EAGAIN as isize) {
                return Err(FabricError::Timeout {
                    op,
                    peer,
                    timeout: self.timeout,
                });
            }
            return Err(FabricError::Remote {
                op,
                peer,
                message: format!("posting failed: {}", fi_error_string(rc as i64)),
            });
        }
    }

    fn complete(&self, id: u64, result: Result<u64>) {
        self.ops.complete(id, result, |slot| {
            self.atomic_scratch
                .atomic_u64(slot * 24 + 16)
                .map(|w| w.load(Ordering::Acquire))
        });
    }

    fn on_message(&self, index: usize, len: usize, tag: u64) {
        let slot = self.slot_bytes();
        if len >= MSG_HEADER {
            let mut data = vec![0u8; len];
            if self.recv_pool.read_bytes(index * slot, &mut data).is_ok() {
                let token = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                let peer = self
                    .peers
                    .read()
                    .expect("peers lock")
                    .iter()
                    .position(|p| p.0 == token)
                    .map(|i| PeerId(i as u32));
                data.drain(..MSG_HEADER);
                self.inbox.push(Message { tag, peer, data });
            }
        } else {
            eprintln!(
                "krun fabric: dropping a {len}-byte message without a sender header (tag {tag:#x})"
            );
        }
        if let Err(e) = self.post_recv(index) {
            eprintln!("krun fabric: could not repost receive buffer {index}: {e}");
        }
    }

    /// `fi_trywait` on the CQ: true when nothing is pending and the wait fd is armed.
    fn try_wait(&self) -> bool {
        let Ok(_guard) = self.cq_lock.try_lock() else {
            return false;
        };
        let fabric = self.objects.0.fabric;
        // SAFETY: fabric and cq are open for the endpoint's lifetime; trywait takes an array
        // of one fid.
        unsafe {
            let ops = (*fabric).ops;
            let Some(trywait) = (if ops.is_null() { None } else { (*ops).trywait }) else {
                return false;
            };
            let mut fid: *mut sys::fid = &mut (*self.objects.0.cq).fid;
            trywait(fabric, &mut fid, 1) == 0
        }
    }

    /// Remote reads and writes served so far (0 without a counter).
    fn remote_events(&self) -> u64 {
        let cntr = self.objects.0.cntr;
        if cntr.is_null() {
            return 0;
        }
        // SAFETY: the counter is open for the endpoint's lifetime; reading it also drives
        // the provider's progress.
        unsafe { sys::krun_fi_cntr_read(cntr) }
    }

    fn progress_loop(&self) {
        // Sleeps in this thread are short; ask the kernel not to stretch them by its default
        // 50 us timer slack.
        // SAFETY: PR_SET_TIMERSLACK takes a value and touches no memory; it affects this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        let mut remote_seen = 0u64;
        let mut spins = 0u32;
        let mut idle_nap = SHM_IDLE_POLL;
        while !self.shutdown.load(Ordering::Relaxed) {
            if self.waiters.load(Ordering::Relaxed) > 0 {
                // A waiter drives progress itself; stay out of its way (it parks after a few
                // ms and then relies on this thread, so keep the nap short).
                std::thread::sleep(Duration::from_micros(50));
                self.heat();
                continue;
            }
            if self.inbox.polled() {
                // A receive polls the CQ itself: step aside until it has its message or
                // gives up polling (it wakes this thread then), without heating, so a rank
                // that keeps polling for messages does not keep this thread spinning after it.
                // Not a blind sleep: on tcp this thread otherwise wakes on data at once, and
                // 50 us naps here slowed MGS on the DSM (4 ranks, 2 cores) by 20-40%.
                self.inbox.step_aside(Duration::from_micros(50));
                continue;
            }
            let handled = self.progress();
            let remote = self.remote_events();
            // Operations merely in flight are not activity: posting one heats the loop
            // (`peer_addr`), and one waiting on a slow or stopped peer must not keep this
            // thread spinning on a core that the node's ranks and daemons share.
            if handled > 0 || remote != remote_seen {
                remote_seen = remote;
                idle_nap = SHM_IDLE_POLL;
                self.heat();
                spins = spins.wrapping_add(1);
                hot_pause(spins);
                continue;
            }
            if self.now_us() < self.hot_until_us.load(Ordering::Relaxed) {
                // Requests come in bursts (a peer's ping-pong, a pipeline, a caller waiting
                // in recv): keep serving at the provider's speed.
                idle_nap = SHM_IDLE_POLL;
                spins = spins.wrapping_add(1);
                hot_pause(spins);
                continue;
            }
            match self.wait_fd {
                Some(fd) => {
                    // The provider may hold data it already took off the sockets: sleeping is
                    // only safe once fi_trywait agrees.
                    if !self.try_wait() {
                        std::thread::yield_now();
                        continue;
                    }
                    // Sleep until a connection has data; serving remote reads and writes
                    // produces no local completion, so data arriving counts as activity.
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: pfd is a valid pollfd array of length 1.
                    let n = unsafe { libc::poll(&mut pfd, 1, PROGRESS_POLL_MS) };
                    if n > 0 {
                        self.heat();
                    }
                }
                None => {
                    // shm: nothing to sleep on. Served remote accesses show in the counter
                    // (checked above), so idle polling on a short timer is enough.
                    std::thread::sleep(idle_nap);
                    idle_nap = (idle_nap * 2).min(SHM_IDLE_POLL_MAX);
                }
            }
        }
    }
}

impl Progress for Inner {
    fn progress(&self) -> usize {
        let Ok(_guard) = self.cq_lock.try_lock() else {
            return 0;
        };
        let mut handled = 0;
        let mut entries: [sys::fi_cq_tagged_entry; 16] = Default::default();
        loop {
            // SAFETY: entries has room for 16 tagged entries, the format the CQ was opened with.
            let n = unsafe {
                sys::krun_fi_cq_read(
                    self.objects.0.cq,
                    entries.as_mut_ptr().cast(),
                    entries.len(),
                )
            };
            if n > 0 {
                for e in &entries[..n as usize] {
                    let id = e.op_context as u64;
                    if id & RECV_CONTEXT != 0 {
                        self.on_message((id & !RECV_CONTEXT) as usize, e.len, e.tag);
                    } else {
                        self.complete(id, Ok(0));
                    }
                }
                handled += n as usize;
                continue;
            }
            if n == -(sys::FI_EAVAIL as isize) {
                let mut err = sys::fi_cq_err_entry::default();
                // SAFETY: err is a valid error entry buffer.
                let rc = unsafe { sys::krun_fi_cq_readerr(self.objects.0.cq, &mut err, 0) };
                if rc > 0 {
                    handled += 1;
                    self.on_error(&err);
                    continue;
                }
            }
            return handled;
        }
    }

    fn waiters(&self) -> &AtomicUsize {
        &self.waiters
    }

    fn abandon(&self, op: &OpState) {
        self.ops.abandon(op);
    }
}

impl Inner {
    fn on_error(&self, err: &sys::fi_cq_err_entry) {
        let id = err.op_context as u64;
        if id & RECV_CONTEXT != 0 {
            let index = (id & !RECV_CONTEXT) as usize;
            if err.err != sys::FI_ECANCELED as i32 {
                eprintln!(
                    "krun fabric: receive error {}; reposting buffer {index}",
                    fi_error_string(err.err as i64)
                );
                let _ = self.post_recv(index);
            }
            return;
        }
        let mut buf = [0 as libc::c_char; 256];
        // SAFETY: buf is writable for its length; the provider writes a C string into it or
        // returns a static one.
        let detail = unsafe {
            let s = sys::krun_fi_cq_strerror(
                self.objects.0.cq,
                err.prov_errno,
                err.err_data,
                buf.as_mut_ptr(),
                buf.len(),
            );
            if s.is_null() {
                String::new()
            } else {
                CStr::from_ptr(s).to_string_lossy().into_owned()
            }
        };
        let Some(FailedOp { op, peer, key }) = self.ops.failed_op(id) else {
            return;
        };
        let code = err.err as u32;
        let e = if code == sys::FI_EACCES || code == sys::FI_EKEYREJECTED || code == sys::FI_EINVAL
        {
            FabricError::RemoteAccess { op, peer, key }
        } else {
            FabricError::Remote {
                op,
                peer,
                message: format!("{} ({detail})", fi_error_string(err.err as i64)),
            }
        };
        self.complete(id, Err(e));
    }
}

impl Endpoint for OfiEndpoint {
    fn provider(&self) -> Provider {
        self.inner.provider
    }

    fn address(&self) -> EndpointAddress {
        let mut raw = vec![0u8; 256];
        let mut len = raw.len();
        // SAFETY: raw has room for len bytes; the ep is enabled.
        let rc =
            unsafe { sys::krun_fi_getname(self.inner.ep(), raw.as_mut_ptr().cast(), &mut len) };
        if rc != 0 {
            raw.resize(len.max(256), 0);
            // SAFETY: as above, with the size the provider asked for.
            unsafe { sys::krun_fi_getname(self.inner.ep(), raw.as_mut_ptr().cast(), &mut len) };
        }
        raw.truncate(len);
        EndpointAddress {
            provider: self.inner.provider,
            token: self.inner.token,
            raw,
        }
    }

    fn connect(&self, peer: &EndpointAddress) -> Result<PeerId> {
        if peer.provider != self.inner.provider {
            return Err(FabricError::ProviderMismatch {
                expected: self.inner.provider.to_string(),
                found: peer.provider.to_string(),
            });
        }
        let mut peers = self.inner.peers.write().expect("peers lock");
        if let Some(i) = peers.iter().position(|p| p.0 == peer.token) {
            return Ok(PeerId(i as u32));
        }
        let mut fi_addr: sys::fi_addr_t = sys::FI_ADDR_UNSPEC;
        // SAFETY: raw holds a provider address of the same provider (checked above).
        let n = unsafe {
            sys::krun_fi_av_insert(
                self.inner.objects.0.av,
                peer.raw.as_ptr().cast(),
                1,
                &mut fi_addr,
                0,
                ptr::null_mut(),
            )
        };
        if n != 1 {
            return Err(FabricError::BadAddress(format!(
                "{} rejected the peer address ({} bytes): {}",
                self.inner.provider_name,
                peer.raw.len(),
                if n < 0 {
                    fi_error_string(n as i64)
                } else {
                    "not inserted".into()
                }
            )));
        }
        let process = (self.inner.provider == Provider::Shm)
            .then(|| shm_pid(&peer.raw))
            .flatten()
            .map(PeerProcess::watch);
        peers.push((peer.token, fi_addr, process));
        Ok(PeerId(peers.len() as u32 - 1))
    }

    fn register(&self, region: Region) -> Result<MemoryRegion> {
        // SAFETY: info is valid for the endpoint's lifetime.
        let mr_mode = unsafe { (*(*self.inner.objects.0.info).domain_attr).mr_mode } as u32;
        let key = if self.inner.prov_key {
            0
        } else {
            self.inner.next_key.fetch_add(1, Ordering::Relaxed)
        };
        register_with(
            &self.inner.objects,
            &self.inner.provider_name,
            mr_mode,
            key,
            region,
        )
    }

    fn op_timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn peer_failed(&self, peer: PeerId, reason: &str) -> usize {
        self.inner.ops.fail_peer(peer, reason)
    }

    unsafe fn post_write(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion> {
        self.rma(
            RmaKind::Write,
            peer,
            local,
            local_offset,
            len,
            remote,
            remote_offset,
        )
    }

    unsafe fn post_read(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion> {
        self.rma(
            RmaKind::Read,
            peer,
            local,
            local_offset,
            len,
            remote,
            remote_offset,
        )
    }

    fn post_fetch_add(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        add: u64,
    ) -> Result<Completion> {
        self.atomic("fetch-add", peer, remote, remote_offset, add, None)
    }

    fn post_compare_swap(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        compare: u64,
        swap: u64,
    ) -> Result<Completion> {
        self.atomic(
            "compare-swap",
            peer,
            remote,
            remote_offset,
            swap,
            Some(compare),
        )
    }

    fn send(&self, peer: PeerId, tag: u64, data: &[u8]) -> Result<()> {
        let inner = &self.inner;
        if data.len() > inner.max_message {
            return Err(FabricError::MessageTooLarge {
                len: data.len(),
                max: inner.max_message,
            });
        }
        let addr = inner.peer_addr(peer, "send")?;
        inner
            .ops
            .acquire(inner.as_ref(), "send", peer, inner.timeout)?;
        let slot = inner.ops.send_slot(inner.as_ref(), peer, inner.timeout)?;
        let slot_bytes = inner.slot_bytes();
        let base = slot * slot_bytes;
        inner
            .send_pool
            .write_bytes(base, &inner.token.to_le_bytes())?;
        inner.send_pool.write_bytes(base + MSG_HEADER, data)?;
        let buf = inner.send_pool.check_local(base, MSG_HEADER + data.len())?;
        let state = OpState::new("send", peer);
        let id = inner.ops.track(&state, None, Some(slot), 0);
        inner.post("send", peer, id, || {
            // SAFETY: the send slot is reserved until this operation completes.
            unsafe {
                sys::krun_fi_tsend(
                    inner.ep(),
                    buf as *const c_void,
                    MSG_HEADER + data.len(),
                    desc_of(&inner.send_pool),
                    addr,
                    tag,
                    id as *mut c_void,
                )
            }
        })?;
        Completion::new(state, inner.clone(), inner.timeout)
            .wait()
            .map(drop)
    }

    fn recv_masked(&self, tag: u64, ignore: u64, timeout: Duration) -> Result<Message> {
        let inner = &self.inner;
        // The caller polls the CQ itself for the endpoint's receive poll window (the
        // progress thread steps aside meanwhile: see `progress_loop`), then sleeps while the
        // progress thread fills the inbox. A receive does not heat the progress thread: a
        // rank that polls for messages would keep it spinning for as long as it waits, and
        // with several ranks per core (or daemons beside them) that spinning starves the very
        // peers being waited for.
        inner.inbox.take(tag, ignore, timeout, || inner.progress())
    }
}

#[derive(Clone, Copy)]
enum RmaKind {
    Write,
    Read,
}

impl OfiEndpoint {
    #[allow(clippy::too_many_arguments)]
    fn rma(
        &self,
        kind: RmaKind,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion> {
        let inner = &self.inner;
        let op = match kind {
            RmaKind::Write => "write",
            RmaKind::Read => "read",
        };
        let buf = local.check_local(local_offset, len)?;
        let target = remote.target(remote_offset, len as u64)?;
        let addr = inner.peer_addr(peer, op)?;
        inner.ops.acquire(inner.as_ref(), op, peer, inner.timeout)?;
        let state = OpState::new(op, peer);
        state.keep(local.clone());
        let id = inner.ops.track(&state, None, None, remote.key);
        let read_flags = if inner.provider == Provider::Shm {
            (sys::FI_COMPLETION | sys::FI_DELIVERY_COMPLETE) as u64
        } else {
            sys::FI_COMPLETION as u64
        };
        let iov = libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        };
        let mut desc = desc_of(local);
        let rma_iov = sys::fi_rma_iov {
            addr: target,
            len,
            key: remote.key,
        };
        let msg = sys::fi_msg_rma {
            msg_iov: &iov as *const libc::iovec as *const _,
            desc: &mut desc,
            iov_count: 1,
            addr,
            rma_iov: &rma_iov,
            rma_iov_count: 1,
            context: id as *mut c_void,
            data: 0,
        };
        inner.post(op, peer, id, || {
            // SAFETY: the local range was bounds-checked and its region is kept alive by the
            // operation state; the caller upholds the access contract of post_write/post_read.
            unsafe {
                match kind {
                    // Completion only once the data is visible at the target. (Not dropped on
                    // shm either: its "fast RMA" path, taken without this flag, writes through
                    // process_vm_writev without checking the target's key.)
                    RmaKind::Write => sys::krun_fi_writemsg(
                        inner.ep(),
                        &msg,
                        (sys::FI_COMPLETION | sys::FI_DELIVERY_COMPLETE) as u64,
                    ),
                    // shm's fast read path copies out of the target without checking the
                    // key; delivery-complete forces the path that checks it.
                    RmaKind::Read => sys::krun_fi_readmsg(inner.ep(), &msg, read_flags),
                }
            }
        })?;
        Ok(Completion::new(state, inner.clone(), inner.timeout))
    }

    fn atomic(
        &self,
        op: &'static str,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        operand: u64,
        compare: Option<u64>,
    ) -> Result<Completion> {
        let inner = &self.inner;
        if remote_offset & 7 != 0 {
            return Err(FabricError::Misaligned(remote_offset));
        }
        let target = remote.target(remote_offset, 8)?;
        let addr = inner.peer_addr(peer, op)?;
        inner.ops.acquire(inner.as_ref(), op, peer, inner.timeout)?;
        let slot = inner.ops.atomic_slot();
        let scratch = &inner.atomic_scratch;
        let base = slot * 24;
        scratch.atomic_u64(base)?.store(operand, Ordering::Relaxed);
        scratch
            .atomic_u64(base + 8)?
            .store(compare.unwrap_or(0), Ordering::Relaxed);
        scratch.atomic_u64(base + 16)?.store(0, Ordering::Release);
        let ptr_at = |off: usize| scratch.check_local(base + off, 8).map(|p| p as *mut c_void);
        let (operand_ptr, compare_ptr, result_ptr) = (ptr_at(0)?, ptr_at(8)?, ptr_at(16)?);
        let state = OpState::new(op, peer);
        let id = inner.ops.track(&state, Some(slot), None, remote.key);
        let mut desc = desc_of(scratch);
        let mut compare_desc = desc;
        let mut result_desc = desc;
        let operand_ioc = sys::fi_ioc {
            addr: operand_ptr,
            count: 1,
        };
        let compare_ioc = sys::fi_ioc {
            addr: compare_ptr,
            count: 1,
        };
        let mut result_ioc = sys::fi_ioc {
            addr: result_ptr,
            count: 1,
        };
        let rma_ioc = sys::fi_rma_ioc {
            addr: target,
            count: 1,
            key: remote.key,
        };
        let msg = sys::fi_msg_atomic {
            msg_iov: &operand_ioc,
            desc: &mut desc,
            iov_count: 1,
            addr,
            rma_iov: &rma_ioc,
            rma_iov_count: 1,
            datatype: sys::fi_datatype_FI_UINT64,
            op: if compare.is_some() {
                sys::fi_op_FI_CSWAP
            } else {
                sys::fi_op_FI_SUM
            },
            context: id as *mut c_void,
            data: 0,
        };
        inner.post(op, peer, id, || {
            // SAFETY: operand, compare and result live in this operation's scratch slot,
            // reserved until its completion is processed.
            unsafe {
                if compare.is_some() {
                    sys::krun_fi_compare_atomicmsg(
                        inner.ep(),
                        &msg,
                        &compare_ioc,
                        &mut compare_desc,
                        1,
                        &mut result_ioc,
                        &mut result_desc,
                        1,
                        (sys::FI_COMPLETION | sys::FI_DELIVERY_COMPLETE) as u64,
                    )
                } else {
                    sys::krun_fi_fetch_atomicmsg(
                        inner.ep(),
                        &msg,
                        &mut result_ioc,
                        &mut result_desc,
                        1,
                        (sys::FI_COMPLETION | sys::FI_DELIVERY_COMPLETE) as u64,
                    )
                }
            }
        })?;
        Ok(Completion::new(state, inner.clone(), inner.timeout))
    }
}
