//! InfiniBand verbs backend: RC queue pairs through `rdma-sys`, one per connected peer.
//!
//! Queue pairs are wired through a small TCP side channel of each endpoint ([`side`]: the
//! wire toolkit's handshake over the cluster secret, then one authenticated frame each way).
//! An endpoint's address carries the side channel's IP and port plus the port's LID and GID
//! (`RawAddress`). The connecting side creates a QP and sends a `QpInfo` (both endpoint
//! tokens, QPN, PSN, LID, GID, active MTU); the listener checks it is the endpoint meant,
//! creates the matching QP, brings it to RTS, registers the connecting endpoint as a peer
//! (so its messages name it) and answers with its own values, or with why it refused.
//!
//! Messages travel as SENDs into a shared receive queue, each carrying the sender's token and
//! the tag in a 16-byte header; one-sided operations are RDMA READ/WRITE and the two 64-bit
//! atomics. An RC WRITE completes at the initiator only once the target acknowledged it, so
//! the data is placed at the target when the completion arrives.
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdma_sys as ib;

use crate::completion::{Completion, OpState, Progress};
use crate::config::{FabricConfig, Provider};
use crate::endpoint::{Endpoint, EndpointAddress, Inbox, Message, PeerId};
use crate::error::{FabricError, Result};
use crate::memory::{MemoryRegion, Region, RemoteRegion};
use crate::ops::{FailedOp, OpTable};
use crate::secret::ClusterSecret;

mod side;
use side::QpInfo;

const RECV_BUFFERS: usize = 64;
const RECV_CONTEXT: u64 = 1 << 63;
/// Sender token and tag in front of every message.
const MSG_HEADER: usize = 16;
/// First bytes of a verbs raw address: format tag and version.
const RAW_MAGIC: u8 = b'V';
const RAW_VERSION: u8 = 1;
const PORT: u8 = 1;
/// A side-channel exchange (handshake and both frames) ends within this time at most.
const SIDE_LIMIT: Duration = crate::wire::HANDSHAKE_TIMEOUT;

fn unavailable(reason: impl Into<String>) -> FabricError {
    FabricError::ProviderUnavailable {
        provider: "verbs".into(),
        reason: reason.into(),
    }
}

fn call(call: &'static str, rc: i32) -> Result<()> {
    if rc != 0 {
        let errno = if rc > 0 {
            rc
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        };
        return Err(FabricError::Call {
            provider: "verbs".into(),
            call,
            code: errno as i64,
            message: std::io::Error::from_raw_os_error(errno).to_string(),
        });
    }
    Ok(())
}

/// Names of the RDMA devices on this host (empty without any: never an error for that).
pub fn device_names() -> Result<Vec<String>> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list returns an array of n devices (or null) freed below.
    unsafe {
        let list = ib::ibv_get_device_list(&mut n);
        if list.is_null() {
            return Ok(Vec::new());
        }
        let names = (0..n as usize)
            .map(|i| {
                CStr::from_ptr(ib::ibv_get_device_name(*list.add(i)))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        ib::ibv_free_device_list(list);
        Ok(names)
    }
}

/// Device-level objects; closed in reverse order.
struct Device {
    ctx: *mut ib::ibv_context,
    pd: *mut ib::ibv_pd,
    cq: *mut ib::ibv_cq,
    srq: *mut ib::ibv_srq,
    lid: u16,
    gid: [u8; 16],
    gid_index: u8,
    max_rd_atomic: u8,
    /// The port's active MTU as an `ibv_mtu` value (1 = 256 ... 5 = 4096).
    active_mtu: u8,
    name: String,
}

// SAFETY: verbs objects may be used from any thread; CQ polling is serialized by cq_lock.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: each object was created by us and is destroyed once; QPs and MRs hold an
        // Arc<Device> and are gone before this runs.
        unsafe {
            if !self.srq.is_null() {
                ib::ibv_destroy_srq(self.srq);
            }
            if !self.cq.is_null() {
                ib::ibv_destroy_cq(self.cq);
            }
            if !self.pd.is_null() {
                ib::ibv_dealloc_pd(self.pd);
            }
            if !self.ctx.is_null() {
                ib::ibv_close_device(self.ctx);
            }
        }
    }
}

/// Picks the GID: the configured index, else a RoCE v2 IPv4-mapped one, else 0.
fn choose_gid_index(dev: &str, configured: Option<u32>, table_len: i32) -> Result<u8> {
    if let Some(i) = configured {
        return u8::try_from(i)
            .ok()
            .filter(|&i| (i as i32) < table_len.max(1))
            .ok_or_else(|| FabricError::BadConfig {
                key: "KRUN_FABRIC_VERBS_GID_INDEX".into(),
                value: i.to_string(),
                reason: format!("{dev} port {PORT} has a GID table of {table_len} entries"),
            });
    }
    let base = format!("/sys/class/infiniband/{dev}/ports/{PORT}");
    let mut ipv4 = None;
    for i in 0..16u8 {
        let Ok(gid) = std::fs::read_to_string(format!("{base}/gids/{i}")) else {
            continue;
        };
        if !gid.starts_with("0000:0000:0000:0000:0000:ffff:") {
            continue;
        }
        let kind =
            std::fs::read_to_string(format!("{base}/gid_attrs/types/{i}")).unwrap_or_default();
        if kind.contains("v2") {
            return Ok(i);
        }
        ipv4.get_or_insert(i);
    }
    Ok(ipv4.unwrap_or(0))
}

impl Device {
    fn open(config: &FabricConfig) -> Result<Device> {
        let mut n = 0;
        // SAFETY: device list handling as in device_names; objects created here are owned
        // by the returned Device (or released by its Drop on an early error).
        unsafe {
            let list = ib::ibv_get_device_list(&mut n);
            if list.is_null() || n == 0 {
                if !list.is_null() {
                    ib::ibv_free_device_list(list);
                }
                return Err(unavailable(
                    "no RDMA device on this host (ibv_get_device_list found none)",
                ));
            }
            let mut chosen = None;
            for i in 0..n as usize {
                let name = CStr::from_ptr(ib::ibv_get_device_name(*list.add(i)))
                    .to_string_lossy()
                    .into_owned();
                if config
                    .verbs_device
                    .as_deref()
                    .is_none_or(|want| want == name)
                {
                    chosen = Some((*list.add(i), name));
                    break;
                }
            }
            let Some((device, name)) = chosen else {
                ib::ibv_free_device_list(list);
                return Err(unavailable(format!(
                    "RDMA device {:?} not found",
                    config.verbs_device.as_deref().unwrap_or("")
                )));
            };
            let ctx = ib::ibv_open_device(device);
            ib::ibv_free_device_list(list);
            if ctx.is_null() {
                return Err(unavailable(format!("ibv_open_device({name}) failed")));
            }
            let mut dev = Device {
                ctx,
                pd: ptr::null_mut(),
                cq: ptr::null_mut(),
                srq: ptr::null_mut(),
                lid: 0,
                gid: [0; 16],
                gid_index: 0,
                max_rd_atomic: 1,
                active_mtu: ib::ibv_mtu::IBV_MTU_1024 as u8,
                name: name.clone(),
            };
            let mut attr: ib::ibv_device_attr = std::mem::zeroed();
            call("ibv_query_device", ib::ibv_query_device(ctx, &mut attr))?;
            dev.max_rd_atomic = attr.max_qp_rd_atom.clamp(1, 16) as u8;
            let mut port: ib::ibv_port_attr = std::mem::zeroed();
            call(
                "ibv_query_port",
                ib::___ibv_query_port(ctx, PORT, &mut port),
            )?;
            if port.state != ib::ibv_port_state::IBV_PORT_ACTIVE {
                return Err(unavailable(format!(
                    "port {PORT} of {name} is not active (state {})",
                    port.state
                )));
            }
            dev.lid = port.lid;
            dev.active_mtu = (port.active_mtu as u8).clamp(1, 5);
            dev.gid_index = choose_gid_index(&name, config.verbs_gid_index, port.gid_tbl_len)?;
            let mut gid: ib::ibv_gid = std::mem::zeroed();
            call(
                "ibv_query_gid",
                ib::ibv_query_gid(ctx, PORT, dev.gid_index as i32, &mut gid),
            )?;
            dev.gid = gid.raw;
            // An InfiniBand port's GIDs are never zero; a RoCE one is until its netdev has
            // the address.
            if dev.gid == [0; 16] {
                return Err(unavailable(format!(
                    "GID index {} of {name} is empty (no IP address on its netdev yet?)",
                    dev.gid_index
                )));
            }
            dev.pd = ib::ibv_alloc_pd(ctx);
            if dev.pd.is_null() {
                return Err(unavailable(format!("ibv_alloc_pd on {name} failed")));
            }
            let cqe = (config.max_in_flight * 4 + RECV_BUFFERS * 2) as i32;
            dev.cq = ib::ibv_create_cq(ctx, cqe, ptr::null_mut(), ptr::null_mut(), 0);
            if dev.cq.is_null() {
                return Err(unavailable(format!("ibv_create_cq on {name} failed")));
            }
            let mut srq_attr: ib::ibv_srq_init_attr = std::mem::zeroed();
            srq_attr.attr.max_wr = RECV_BUFFERS as u32;
            srq_attr.attr.max_sge = 1;
            dev.srq = ib::ibv_create_srq(dev.pd, &mut srq_attr);
            if dev.srq.is_null() {
                return Err(unavailable(format!("ibv_create_srq on {name} failed")));
            }
            Ok(dev)
        }
    }
}

/// One registered region: deregistered on drop.
struct VerbsRegistration {
    mr: *mut ib::ibv_mr,
    lkey: u32,
    _device: Arc<Device>,
}

// SAFETY: an MR handle can be used and deregistered from any thread.
unsafe impl Send for VerbsRegistration {}
unsafe impl Sync for VerbsRegistration {}

impl Drop for VerbsRegistration {
    fn drop(&mut self) {
        // SAFETY: mr came from ibv_reg_mr and is deregistered once.
        unsafe { ib::ibv_dereg_mr(self.mr) };
    }
}

fn register_on(device: &Arc<Device>, region: Region) -> Result<MemoryRegion> {
    let access = ib::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
        | ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
        | ib::ibv_access_flags::IBV_ACCESS_REMOTE_READ
        | ib::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC;
    let len = region.len();
    // SAFETY: the region is valid for len bytes and outlives the registration.
    let mr = unsafe { ib::ibv_reg_mr(device.pd, region.as_ptr().cast(), len, access.0 as i32) };
    if mr.is_null() {
        return Err(FabricError::Registration {
            len,
            reason: format!(
                "ibv_reg_mr on {}: {}",
                device.name,
                std::io::Error::last_os_error()
            ),
        });
    }
    // SAFETY: mr is valid.
    let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
    let remote = RemoteRegion {
        addr: region.as_ptr() as u64,
        key: rkey as u64,
        len: len as u64,
    };
    Ok(MemoryRegion::new(
        region,
        Box::new(VerbsRegistration {
            mr,
            lkey,
            _device: device.clone(),
        }),
        remote,
    ))
}

/// The local key of `mr`, which must be registered with this endpoint's protection domain.
fn lkey_of(device: &Arc<Device>, mr: &MemoryRegion) -> Result<u32> {
    match mr.registration::<VerbsRegistration>() {
        Some(r) if Arc::ptr_eq(&r._device, device) => Ok(r.lkey),
        _ => Err(FabricError::Registration {
            len: mr.len(),
            reason: format!(
                "the local region is not registered with this verbs endpoint (device {})",
                device.name
            ),
        }),
    }
}

/// A connected RC queue pair.
struct QueuePair {
    qp: *mut ib::ibv_qp,
    _device: Arc<Device>,
}

// SAFETY: posting to a QP is thread-safe in libibverbs.
unsafe impl Send for QueuePair {}
unsafe impl Sync for QueuePair {}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created by ibv_create_qp, destroyed once.
        unsafe { ib::ibv_destroy_qp(self.qp) };
    }
}

/// A verbs endpoint's raw address: where its side channel listens, and its port's LID and
/// GID. Layout: `'V' | version 1 | family 4|6 | ip (4 or 16) | port u16 | lid u16 | gid[16]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawAddress {
    side: SocketAddr,
    lid: u16,
    gid: [u8; 16],
}

impl RawAddress {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![RAW_MAGIC, RAW_VERSION];
        match self.side.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.side.port().to_le_bytes());
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.gid);
        out
    }

    fn decode(raw: &[u8]) -> Result<RawAddress> {
        let bad = |what: &str| {
            FabricError::BadAddress(format!("verbs address: {what} ({} bytes)", raw.len()))
        };
        if raw.len() < 3 || raw[0] != RAW_MAGIC {
            return Err(bad("not a verbs address"));
        }
        if raw[1] != RAW_VERSION {
            return Err(bad(&format!("unsupported version {}", raw[1])));
        }
        let ip_len = match raw[2] {
            4 => 4,
            6 => 16,
            f => return Err(bad(&format!("unknown address family {f}"))),
        };
        if raw.len() != 3 + ip_len + 2 + 2 + 16 {
            return Err(bad("wrong length"));
        }
        let ip: IpAddr = if ip_len == 4 {
            Ipv4Addr::from(<[u8; 4]>::try_from(&raw[3..7]).expect("4 bytes")).into()
        } else {
            Ipv6Addr::from(<[u8; 16]>::try_from(&raw[3..19]).expect("16 bytes")).into()
        };
        let rest = &raw[3 + ip_len..];
        let port = u16::from_le_bytes([rest[0], rest[1]]);
        if port == 0 || ip.is_unspecified() {
            return Err(bad("side channel address is unspecified"));
        }
        Ok(RawAddress {
            side: SocketAddr::new(ip, port),
            lid: u16::from_le_bytes([rest[2], rest[3]]),
            gid: rest[4..20].try_into().expect("16 bytes"),
        })
    }
}

/// Decodes a verbs endpoint's raw address (the `raw` part of an [`crate::EndpointAddress`]
/// of provider verbs): its side channel's socket address, its port's LID and GID. What the
/// endpoint does before connecting; public for the fuzz targets.
pub fn decode_address(raw: &[u8]) -> Result<(SocketAddr, u16, [u8; 16])> {
    RawAddress::decode(raw).map(|a| (a.side, a.lid, a.gid))
}

/// The IP peers should dial: the bound one, or for a wildcard bind the GID's IPv4 address
/// (RoCE) or loopback.
fn advertised_ip(bound: IpAddr, gid: &[u8; 16]) -> IpAddr {
    if !bound.is_unspecified() {
        return bound;
    }
    if gid[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        return Ipv4Addr::new(gid[12], gid[13], gid[14], gid[15]).into();
    }
    match bound {
        IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
    }
}

struct Peer {
    token: u64,
    qp: Arc<QueuePair>,
}

struct Inner {
    device: Arc<Device>,
    token: u64,
    /// Keys the side channel (both ends of a job hold it).
    secret: ClusterSecret,
    /// Where peers reach our side channel (see [`advertised_ip`]).
    side: SocketAddr,
    /// Peers in the order this endpoint learned them (connect or accept): index = PeerId.
    peers: RwLock<Vec<Peer>>,
    /// QPs replaced by a newer connection of the same peer: kept until the endpoint closes,
    /// as operations may still be in flight on them.
    extra_qps: Mutex<Vec<Arc<QueuePair>>>,
    connect_lock: Mutex<()>,
    ops: OpTable,

    cq_lock: Mutex<()>,
    waiters: AtomicUsize,
    inbox: Inbox,
    timeout: Duration,
    max_message: usize,
    max_in_flight: usize,
    atomic_scratch: MemoryRegion,

    send_pool: MemoryRegion,

    recv_pool: MemoryRegion,

    shutdown: AtomicBool,
}

pub struct VerbsEndpoint {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl VerbsEndpoint {
    pub fn open(config: &FabricConfig) -> Result<VerbsEndpoint> {
        let device = Arc::new(Device::open(config)?);
        let listener = TcpListener::bind((config.bind_address.as_str(), 0)).map_err(|e| {
            FabricError::io(format!("verbs side channel on {}", config.bind_address), e)
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| FabricError::io("verbs side channel", e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| FabricError::io("verbs side channel", e))?;
        let side = SocketAddr::new(advertised_ip(bound.ip(), &device.gid), bound.port());
        let slot_bytes = config.max_message + MSG_HEADER;
        let send_slots = 64;
        let max_in_flight = config.max_in_flight.max(1);
        let inner = Arc::new(Inner {
            atomic_scratch: register_on(&device, Region::new(max_in_flight * 8)?)?,
            send_pool: register_on(&device, Region::new(send_slots * slot_bytes)?)?,
            recv_pool: register_on(&device, Region::new(RECV_BUFFERS * slot_bytes)?)?,
            device,
            token: crate::random_token()?,
            secret: match &config.secret {
                Some(s) => s.clone(),
                None => ClusterSecret::from_env()?.unwrap_or_else(ClusterSecret::insecure),
            },
            side,
            peers: RwLock::new(Vec::new()),
            extra_qps: Mutex::new(Vec::new()),
            connect_lock: Mutex::new(()),
            ops: OpTable::new(max_in_flight, send_slots),

            cq_lock: Mutex::new(()),
            waiters: AtomicUsize::new(0),
            inbox: Inbox::new(config.recv_poll_window()),
            timeout: config.op_timeout,
            max_message: config.max_message,
            max_in_flight,

            shutdown: AtomicBool::new(false),
        });
        for i in 0..RECV_BUFFERS {
            inner.post_recv(i)?;
        }
        let progress = inner.clone();
        let accept = inner.clone();
        let threads = vec![
            std::thread::Builder::new()
                .name("krun-verbs-progress".into())
                .spawn(move || progress.progress_loop())
                .map_err(|e| FabricError::io("spawning the verbs progress thread", e))?,
            std::thread::Builder::new()
                .name("krun-verbs-accept".into())
                .spawn(move || accept.accept_loop(listener))
                .map_err(|e| FabricError::io("spawning the verbs side channel", e))?,
        ];
        Ok(VerbsEndpoint { inner, threads })
    }
}

impl Drop for VerbsEndpoint {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.inner.ops.fail_all();
    }
}

impl Inner {
    fn slot_bytes(&self) -> usize {
        self.max_message + MSG_HEADER
    }

    fn post_recv(&self, index: usize) -> Result<()> {
        let len = self.slot_bytes();
        let addr = self.recv_pool.check_local(index * len, len)?;
        let mut sge = ib::ibv_sge {
            addr: addr as u64,
            length: len as u32,
            lkey: lkey_of(&self.device, &self.recv_pool)?,
        };
        // SAFETY: the buffer lies in the registered receive pool and is reserved for this
        // receive until its completion is processed.
        unsafe {
            let mut wr: ib::ibv_recv_wr = std::mem::zeroed();
            wr.wr_id = RECV_CONTEXT | index as u64;
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            let mut bad = ptr::null_mut();
            call(
                "ibv_post_srq_recv",
                ib::ibv_post_srq_recv(self.device.srq, &mut wr, &mut bad),
            )
        }
    }

    /// Creates a QP and moves it to INIT.
    fn create_qp(&self) -> Result<Arc<QueuePair>> {
        // SAFETY: plain verbs calls on objects we own; the QP is owned by the returned value.
        unsafe {
            let mut init: ib::ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = self.device.cq;
            init.recv_cq = self.device.cq;
            init.srq = self.device.srq;
            init.qp_type = ib::ibv_qp_type::IBV_QPT_RC;
            init.cap.max_send_wr = (self.max_in_flight + 64) as u32;
            init.cap.max_send_sge = 1;
            let qp = ib::ibv_create_qp(self.device.pd, &mut init);
            if qp.is_null() {
                return Err(FabricError::Call {
                    provider: "verbs".into(),
                    call: "ibv_create_qp",
                    code: std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64,
                    message: std::io::Error::last_os_error().to_string(),
                });
            }
            let qp = Arc::new(QueuePair {
                qp,
                _device: self.device.clone(),
            });
            let mut attr: ib::ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ib::ibv_qp_state::IBV_QPS_INIT;
            attr.pkey_index = 0;
            attr.port_num = PORT;
            attr.qp_access_flags = (ib::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                | ib::ibv_access_flags::IBV_ACCESS_REMOTE_READ
                | ib::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC)
                .0;
            let mask = ib::ibv_qp_attr_mask::IBV_QP_STATE
                | ib::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ib::ibv_qp_attr_mask::IBV_QP_PORT
                | ib::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
            call(
                "ibv_modify_qp(INIT)",
                ib::ibv_modify_qp(qp.qp, &mut attr, mask.0 as i32),
            )?;
            Ok(qp)
        }
    }

    /// INIT -> RTR -> RTS towards `remote`.
    fn connect_qp(&self, qp: &QueuePair, local_psn: u32, remote: &QpInfo) -> Result<()> {
        // SAFETY: modify_qp on a QP we own with fully initialized attributes.
        unsafe {
            let mut attr: ib::ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ib::ibv_qp_state::IBV_QPS_RTR;
            // Both ports must carry the path MTU: the smaller active MTU.
            attr.path_mtu = self.device.active_mtu.min(remote.mtu) as ib::ibv_mtu::Type;
            attr.dest_qp_num = remote.qpn;
            attr.rq_psn = remote.psn;
            attr.max_dest_rd_atomic = self.device.max_rd_atomic;
            attr.min_rnr_timer = 12;
            attr.ah_attr.is_global = 1;
            attr.ah_attr.dlid = remote.lid;
            attr.ah_attr.port_num = PORT;
            attr.ah_attr.grh.dgid.raw = remote.gid;
            attr.ah_attr.grh.sgid_index = self.device.gid_index;
            attr.ah_attr.grh.hop_limit = 64;
            let mask = ib::ibv_qp_attr_mask::IBV_QP_STATE
                | ib::ibv_qp_attr_mask::IBV_QP_AV
                | ib::ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ib::ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ib::ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ib::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ib::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
            call(
                "ibv_modify_qp(RTR)",
                ib::ibv_modify_qp(qp.qp, &mut attr, mask.0 as i32),
            )?;
            let mut attr: ib::ibv_qp_attr = std::mem::zeroed();
            attr.qp_state = ib::ibv_qp_state::IBV_QPS_RTS;
            // Local ACK timeout 4.096 us * 2^16 = 268 ms, 6 retries: a dead peer fails an
            // operation with a retry error in about 2 s, within the default op_timeout. A
            // shorter timeout makes emulated soft-RoCE retransmit while the peer is merely
            // slow. Not 7 retries: rxe treats retry_cnt 7 as "retry forever".
            attr.timeout = 16;
            attr.retry_cnt = 6;
            attr.rnr_retry = 7;
            attr.sq_psn = local_psn;
            attr.max_rd_atomic = self.device.max_rd_atomic;
            let mask = ib::ibv_qp_attr_mask::IBV_QP_STATE
                | ib::ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ib::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ib::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ib::ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ib::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
            call(
                "ibv_modify_qp(RTS)",
                ib::ibv_modify_qp(qp.qp, &mut attr, mask.0 as i32),
            )
        }
    }

    fn local_info(&self, qp: &QueuePair, psn: u32, to_token: u64) -> QpInfo {
        QpInfo {
            token: self.token,
            to_token,
            // SAFETY: qp is a valid QP.
            qpn: unsafe { (*qp.qp).qp_num },
            psn,
            lid: self.device.lid,
            gid: self.device.gid,
            mtu: self.device.active_mtu,
        }
    }

    /// Records a peer and its QP; returns its id (ids follow the order peers are learned).
    /// A peer already known keeps its id: with `replace` (the peer connected to us again,
    /// so it now uses the new QP) the new QP takes over, else the known one stays. The other
    /// QP is kept alive, as both are connected and may carry operations.
    fn add_peer(&self, token: u64, qp: Arc<QueuePair>, replace: bool) -> PeerId {
        let mut peers = self.peers.write().expect("peers lock");
        if let Some(i) = peers.iter().position(|p| p.token == token) {
            let spare = if replace {
                std::mem::replace(&mut peers[i].qp, qp)
            } else {
                qp
            };
            self.extra_qps.lock().expect("extra qps").push(spare);
            return PeerId(i as u32);
        }
        peers.push(Peer { token, qp });
        PeerId(peers.len() as u32 - 1)
    }

    fn known_peer(&self, token: u64) -> Option<PeerId> {
        self.peers
            .read()
            .expect("peers lock")
            .iter()
            .position(|p| p.token == token)
            .map(|i| PeerId(i as u32))
    }

    /// Serves the side channel until shutdown (see [`side::serve`]).
    fn accept_loop(self: &Arc<Self>, listener: TcpListener) {
        let me = self.clone();
        let within = self.timeout.min(SIDE_LIMIT);
        side::serve(
            listener,
            self.secret.clone(),
            within,
            &self.shutdown,
            move |remote| me.answer(remote),
        );
    }

    /// The passive half of a connection, given the peer's checked QP info: create and
    /// connect our QP, register the peer, return our QP info for the answer.
    fn answer(&self, remote: QpInfo) -> Result<QpInfo> {
        if remote.to_token != self.token {
            return Err(FabricError::BadAddress(format!(
                "verbs side channel: connection meant for endpoint {:016x}, this is {:016x}",
                remote.to_token, self.token
            )));
        }
        let qp = self.create_qp()?;
        let psn = (crate::random_token()? & 0xff_ffff) as u32;
        self.connect_qp(&qp, psn, &remote)?;
        // Register before answering: the peer may send as soon as it has the answer, and
        // its messages must name it.
        self.add_peer(remote.token, qp.clone(), true);
        Ok(self.local_info(&qp, psn, remote.token))
    }

    fn peer_qp(&self, peer: PeerId, op: &'static str) -> Result<Arc<QueuePair>> {
        self.ops.check_reachable(peer, op)?;
        self.peers
            .read()
            .expect("peers lock")
            .get(peer.0 as usize)
            .map(|p| p.qp.clone())
            .ok_or(FabricError::UnknownPeer(peer))
    }

    fn complete(&self, id: u64, result: Result<u64>) {
        self.ops.complete(id, result, |slot| {
            self.atomic_scratch
                .atomic_u64(slot * 8)
                .map(|w| w.load(Ordering::Acquire))
        });
    }

    /// Posts one work request on `qp`, tracked under `id`.
    fn post(
        &self,
        qp: &QueuePair,
        id: u64,
        op: &'static str,
        peer: PeerId,
        wr: &mut ib::ibv_send_wr,
    ) -> Result<()> {
        wr.wr_id = id;
        wr.send_flags = ib::ibv_send_flags::IBV_SEND_SIGNALED.0;
        let mut bad = ptr::null_mut();
        // SAFETY: the work request and its scatter list are valid for this call; buffers are
        // registered and kept alive by the operation state until completion.
        let rc = unsafe { ib::ibv_post_send(qp.qp, wr, &mut bad) };
        if rc != 0 {
            self.ops.cancel(id);
            return Err(FabricError::Remote {
                op,
                peer,
                message: format!(
                    "ibv_post_send failed: {}",
                    std::io::Error::from_raw_os_error(rc)
                ),
            });
        }
        Ok(())
    }

    fn on_message(&self, index: usize, len: usize) {
        let slot = self.slot_bytes();
        if len >= MSG_HEADER && len <= slot {
            let mut data = vec![0u8; len];
            if self.recv_pool.read_bytes(index * slot, &mut data).is_ok() {
                let token = u64::from_le_bytes(data[..8].try_into().expect("8"));
                let tag = u64::from_le_bytes(data[8..16].try_into().expect("8"));
                let peer = self.known_peer(token);
                data.drain(..MSG_HEADER);
                self.inbox.push(Message { tag, peer, data });
            }
        } else {
            eprintln!("krun fabric (verbs): dropping a malformed {len}-byte message");
        }
        if let Err(e) = self.post_recv(index) {
            eprintln!("krun fabric (verbs): could not repost receive buffer {index}: {e}");
        }
    }

    fn progress_loop(&self) {
        let mut idle_since = Instant::now();
        while !self.shutdown.load(Ordering::Relaxed) {
            if self.waiters.load(Ordering::Relaxed) > 0 {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            // One-sided traffic needs no target-side progress on verbs; this only handles
            // completions and received messages.
            if self.progress() > 0 {
                idle_since = Instant::now();
                continue;
            }
            let idle = idle_since.elapsed();
            std::thread::sleep(Duration::from_micros(if idle < Duration::from_millis(10) {
                10
            } else {
                200
            }));
        }
    }
}

impl Progress for Inner {
    fn progress(&self) -> usize {
        let Ok(_guard) = self.cq_lock.try_lock() else {
            return 0;
        };
        let mut handled = 0;
        // SAFETY: zeroed work completions are valid plain data for ibv_poll_cq to fill.
        let mut wcs: [ib::ibv_wc; 16] = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: wcs has room for 16 entries.
            let n = unsafe { ib::ibv_poll_cq(self.device.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
            if n <= 0 {
                return handled;
            }
            for wc in &wcs[..n as usize] {
                handled += 1;
                if wc.wr_id & RECV_CONTEXT != 0 {
                    let index = (wc.wr_id & !RECV_CONTEXT) as usize;
                    if wc.status == ib::ibv_wc_status::IBV_WC_SUCCESS {
                        self.on_message(index, wc.byte_len as usize);
                    } else if wc.status != ib::ibv_wc_status::IBV_WC_WR_FLUSH_ERR {
                        let _ = self.post_recv(index);
                    }
                    continue;
                }
                if wc.status == ib::ibv_wc_status::IBV_WC_SUCCESS {
                    self.complete(wc.wr_id, Ok(0));
                    continue;
                }
                let Some(FailedOp { op, peer, key }) = self.ops.failed_op(wc.wr_id) else {
                    continue;
                };
                // Any error moves an RC queue pair to the error state: fail later operations
                // to this peer at once instead of as flushed work requests.
                self.ops.mark_unreachable(peer);
                let e = if wc.status == ib::ibv_wc_status::IBV_WC_REM_ACCESS_ERR {
                    FabricError::RemoteAccess { op, peer, key }
                } else {
                    // SAFETY: ibv_wc_status_str returns a static string.
                    let what = unsafe { CStr::from_ptr(ib::ibv_wc_status_str(wc.status)) }
                        .to_string_lossy();
                    FabricError::Remote {
                        op,
                        peer,
                        message: format!("work completion status {what} ({})", wc.status),
                    }
                };
                self.complete(wc.wr_id, Err(e));
            }
        }
    }

    fn waiters(&self) -> &AtomicUsize {
        &self.waiters
    }

    fn abandon(&self, op: &OpState) {
        self.ops.abandon(op);
    }
}

impl VerbsEndpoint {
    #[allow(clippy::too_many_arguments)]
    /// Posts an RDMA WRITE or READ between `local` and `remote`.
    ///
    /// # Safety
    /// The HCA reads (WRITE) or writes (READ) the local range asynchronously: until the
    /// completion resolves, nobody else may write it (WRITE) or access it (READ). The
    /// registration is kept alive by the operation state.
    unsafe fn rma(
        &self,
        op: &'static str,
        opcode: ib::ibv_wr_opcode::Type,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion> {
        let inner = &self.inner;
        let buf = local.check_local(local_offset, len)?;
        let lkey = lkey_of(&inner.device, local)?;
        let target = remote.target(remote_offset, len as u64)?;
        if len > u32::MAX as usize {
            return Err(FabricError::OutOfBounds {
                what: "local",
                offset: local_offset as u64,
                len: len as u64,
                region_len: u32::MAX as u64,
            });
        }
        let qp = inner.peer_qp(peer, op)?;
        inner.ops.acquire(inner.as_ref(), op, peer, inner.timeout)?;
        let state = OpState::new(op, peer);
        state.keep(local.clone());
        let id = inner.ops.track(&state, None, None, remote.key);
        let mut sge = ib::ibv_sge {
            addr: buf as u64,
            length: len as u32,
            lkey,
        };
        // SAFETY: zeroed is a valid empty work request; fields set below.
        let mut wr: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = opcode;
        wr.wr.rdma = ib::rdma_t {
            remote_addr: target,
            rkey: remote.key as u32,
        };
        inner.post(&qp, id, op, peer, &mut wr)?;
        Ok(Completion::new(state, inner.clone(), inner.timeout))
    }

    fn atomic(
        &self,
        op: &'static str,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        add_or_compare: u64,
        swap: Option<u64>,
    ) -> Result<Completion> {
        let inner = &self.inner;
        if remote_offset & 7 != 0 {
            return Err(FabricError::Misaligned(remote_offset));
        }
        let target = remote.target(remote_offset, 8)?;
        let lkey = lkey_of(&inner.device, &inner.atomic_scratch)?;
        let qp = inner.peer_qp(peer, op)?;
        inner.ops.acquire(inner.as_ref(), op, peer, inner.timeout)?;
        let slot = inner.ops.atomic_slot();
        let result = inner.atomic_scratch.check_local(slot * 8, 8)?;
        let state = OpState::new(op, peer);
        let id = inner.ops.track(&state, Some(slot), None, remote.key);
        let mut sge = ib::ibv_sge {
            addr: result as u64,
            length: 8,
            lkey,
        };
        // SAFETY: zeroed is a valid empty work request; fields set below.
        let mut wr: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = if swap.is_some() {
            ib::ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP
        } else {
            ib::ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD
        };
        wr.wr.atomic = ib::atomic_t {
            remote_addr: target,
            compare_add: add_or_compare,
            swap: swap.unwrap_or(0),
            rkey: remote.key as u32,
        };
        inner.post(&qp, id, op, peer, &mut wr)?;
        Ok(Completion::new(state, inner.clone(), inner.timeout))
    }
}

impl Endpoint for VerbsEndpoint {
    fn provider(&self) -> Provider {
        Provider::Verbs
    }

    fn address(&self) -> EndpointAddress {
        EndpointAddress {
            provider: Provider::Verbs,
            token: self.inner.token,
            raw: RawAddress {
                side: self.inner.side,
                lid: self.inner.device.lid,
                gid: self.inner.device.gid,
            }
            .encode(),
        }
    }

    fn connect(&self, peer: &EndpointAddress) -> Result<PeerId> {
        if peer.provider != Provider::Verbs {
            return Err(FabricError::ProviderMismatch {
                expected: Provider::Verbs.to_string(),
                found: peer.provider.to_string(),
            });
        }
        let inner = &self.inner;
        let _one_at_a_time = inner.connect_lock.lock().expect("connect lock");
        // Known already: we connected before, or the peer connected to us.
        if let Some(id) = inner.known_peer(peer.token) {
            return Ok(id);
        }
        let raw = RawAddress::decode(&peer.raw)?;
        let side = raw.side;
        let qp = inner.create_qp()?;
        let psn = (crate::random_token()? & 0xff_ffff) as u32;
        let remote = side::exchange(
            side,
            &inner.secret,
            &inner.local_info(&qp, psn, peer.token),
            inner.timeout,
        )?;
        if remote.token != peer.token || remote.to_token != inner.token {
            return Err(FabricError::BadAddress(format!(
                "the endpoint at {side} is {:016x}, not the {:016x} the address names",
                remote.token, peer.token
            )));
        }
        if remote.gid != raw.gid || remote.lid != raw.lid {
            return Err(FabricError::BadAddress(format!(
                "the endpoint at {side} answers with another port (LID/GID) than its address names"
            )));
        }
        inner.connect_qp(&qp, psn, &remote)?;
        Ok(inner.add_peer(remote.token, qp, false))
    }

    fn register(&self, region: Region) -> Result<MemoryRegion> {
        register_on(&self.inner.device, region)
    }

    fn op_timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn peer_failed(&self, peer: PeerId, reason: &str) -> usize {
        self.inner.ops.fail_peer(peer, reason)
    }

    /// # Safety
    /// As for [`Endpoint::post_write`]: the local range stays untouched until completion.
    unsafe fn post_write(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion> {
        // SAFETY: our caller upholds post_write's contract, which is rma's.
        self.rma(
            "write",
            ib::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            peer,
            local,
            local_offset,
            len,
            remote,
            remote_offset,
        )
    }

    /// # Safety
    /// As for [`Endpoint::post_read`]: the local range stays untouched until completion.
    unsafe fn post_read(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion> {
        // SAFETY: our caller upholds post_read's contract, which is rma's.
        self.rma(
            "read",
            ib::ibv_wr_opcode::IBV_WR_RDMA_READ,
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
            compare,
            Some(swap),
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
        let lkey = lkey_of(&inner.device, &inner.send_pool)?;
        let qp = inner.peer_qp(peer, "send")?;
        inner
            .ops
            .acquire(inner.as_ref(), "send", peer, inner.timeout)?;
        let slot = inner.ops.send_slot(inner.as_ref(), peer, inner.timeout)?;
        let base = slot * inner.slot_bytes();
        inner
            .send_pool
            .write_bytes(base, &inner.token.to_le_bytes())?;
        inner.send_pool.write_bytes(base + 8, &tag.to_le_bytes())?;
        inner.send_pool.write_bytes(base + MSG_HEADER, data)?;
        let buf = inner.send_pool.check_local(base, MSG_HEADER + data.len())?;
        let state = OpState::new("send", peer);
        let id = inner.ops.track(&state, None, Some(slot), 0);
        let mut sge = ib::ibv_sge {
            addr: buf as u64,
            length: (MSG_HEADER + data.len()) as u32,
            lkey,
        };
        // SAFETY: zeroed is a valid empty work request; fields set below.
        let mut wr: ib::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.opcode = ib::ibv_wr_opcode::IBV_WR_SEND;
        inner.post(&qp, id, "send", peer, &mut wr)?;
        Completion::new(state, inner.clone(), inner.timeout)
            .wait()
            .map(drop)
    }

    fn recv_masked(&self, tag: u64, ignore: u64, timeout: Duration) -> Result<Message> {
        let inner = &self.inner;
        inner.waiters.fetch_add(1, Ordering::SeqCst);
        let r = inner.inbox.take(tag, ignore, timeout, || inner.progress());
        inner.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_devices_here_is_not_an_error() {
        let names = device_names().expect("device_names never fails for lack of devices");
        if !names.is_empty() {
            eprintln!("RDMA devices present ({names:?}): the unavailability path is not testable");
            return;
        }
        let e = VerbsEndpoint::open(&FabricConfig::with_provider(Provider::Verbs))
            .err()
            .expect("no device, no endpoint");
        match &e {
            FabricError::ProviderUnavailable { provider, reason } => {
                assert_eq!(provider, "verbs");
                assert!(reason.contains("no RDMA device"), "{reason}");
            }
            other => panic!("expected ProviderUnavailable, got {other}"),
        }
        assert!(e.to_string().contains("verbs"), "{e}");
        // A named device that does not exist is refused the same way.
        let mut config = FabricConfig::with_provider(Provider::Verbs);
        config.verbs_device = Some("rxe-none".into());
        assert!(matches!(
            VerbsEndpoint::open(&config),
            Err(FabricError::ProviderUnavailable { .. })
        ));
        // `auto` falls back to tcp here rather than failing on verbs.
        assert!(crate::open(&FabricConfig::default())
            .map(|ep| ep.provider() != Provider::Verbs)
            .unwrap_or(true));
    }

    #[test]
    fn addresses_round_trip() {
        for side in ["10.77.0.1:4567", "[fd00::7]:80", "127.0.0.1:1"] {
            let raw = RawAddress {
                side: side.parse().unwrap(),
                lid: 0x1234,
                gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 0, 1],
            };
            assert_eq!(RawAddress::decode(&raw.encode()).unwrap(), raw);
            // Through the generic endpoint address and its hex form too.
            let addr = EndpointAddress {
                provider: Provider::Verbs,
                token: 42,
                raw: raw.encode(),
            };
            let back = EndpointAddress::from_hex(&addr.to_hex()).unwrap();
            assert_eq!(RawAddress::decode(&back.raw).unwrap(), raw);
        }
    }

    #[test]
    fn malformed_addresses_are_rejected() {
        let good = RawAddress {
            side: "10.0.0.1:99".parse().unwrap(),
            lid: 0,
            gid: [1; 16],
        }
        .encode();
        assert!(RawAddress::decode(&[]).is_err());
        assert!(RawAddress::decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(RawAddress::decode(&long).is_err());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(RawAddress::decode(&bad).is_err());
        let mut bad = good.clone();
        bad[1] = 9;
        assert!(RawAddress::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("version"));
        let mut bad = good.clone();
        bad[2] = 5;
        assert!(RawAddress::decode(&bad).is_err());
        let unspecified = RawAddress {
            side: "0.0.0.0:99".parse().unwrap(),
            lid: 0,
            gid: [1; 16],
        }
        .encode();
        assert!(RawAddress::decode(&unspecified).is_err());
    }

    #[test]
    fn wildcard_binds_advertise_a_reachable_ip() {
        let mapped = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 77, 0, 2];
        let any: IpAddr = Ipv4Addr::UNSPECIFIED.into();
        assert_eq!(
            advertised_ip(any, &mapped),
            "10.77.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            advertised_ip(any, &[0xfe; 16]),
            IpAddr::from(Ipv4Addr::LOCALHOST)
        );
        let bound: IpAddr = "10.1.1.1".parse().unwrap();
        assert_eq!(advertised_ip(bound, &mapped), bound);
    }
}
