//! In-process backend: endpoints in one process reach each other through a registry.
//! Same semantics as the real transports (bounds, keys, timeouts, dead peers), no wire.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use crate::completion::{Completion, OpState, Progress};
use crate::config::{FabricConfig, Provider};
use crate::endpoint::{Endpoint, EndpointAddress, Inbox, Message, PeerId};
use crate::error::{FabricError, Result};
use crate::memory::{MemoryRegion, Region, RemoteRegion};

/// Registered memory of one loopback endpoint: key -> (base address, length).
type KeyTable = RwLock<HashMap<u64, (usize, usize)>>;

struct Shared {
    token: u64,
    /// Tokens of connected peers; the index is the PeerId.
    peers: RwLock<Vec<u64>>,
    keys: KeyTable,
    inbox: Inbox,
    next_key: AtomicU64,
}

fn registry() -> &'static Mutex<HashMap<u64, Weak<Shared>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u64, Weak<Shared>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Operations complete when posted; there is nothing to progress.
struct Immediate(AtomicUsize);

impl Progress for Immediate {
    fn progress(&self) -> usize {
        0
    }
    fn waiters(&self) -> &AtomicUsize {
        &self.0
    }
}

pub struct LoopbackEndpoint {
    shared: Arc<Shared>,
    timeout: Duration,
    max_message: usize,
    driver: Arc<Immediate>,
}

/// Deregisters a key when its region is dropped.
struct LoopbackRegistration {
    shared: Weak<Shared>,
    key: u64,
}

impl Drop for LoopbackRegistration {
    fn drop(&mut self) {
        if let Some(s) = self.shared.upgrade() {
            s.keys.write().expect("keys lock").remove(&self.key);
        }
    }
}

impl LoopbackEndpoint {
    pub fn open(config: &FabricConfig) -> Result<LoopbackEndpoint> {
        let token = crate::random_token()?;
        let shared = Arc::new(Shared {
            token,
            peers: RwLock::new(Vec::new()),
            keys: RwLock::new(HashMap::new()),
            inbox: Inbox::new(config.recv_poll_window()),
            next_key: AtomicU64::new(1),
        });
        registry()
            .lock()
            .expect("registry lock")
            .insert(token, Arc::downgrade(&shared));
        Ok(LoopbackEndpoint {
            shared,
            timeout: config.op_timeout,
            max_message: config.max_message,
            driver: Arc::new(Immediate(AtomicUsize::new(0))),
        })
    }

    fn target(&self, peer: PeerId, op: &'static str) -> Result<Arc<Shared>> {
        let token = *self
            .shared
            .peers
            .read()
            .expect("peers lock")
            .get(peer.0 as usize)
            .ok_or(FabricError::UnknownPeer(peer))?;
        registry()
            .lock()
            .expect("registry lock")
            .get(&token)
            .and_then(Weak::upgrade)
            .ok_or_else(|| FabricError::Remote {
                op,
                peer,
                message: "peer endpoint is closed".into(),
            })
    }

    /// Runs `access` on the target's memory at a remote access's address, after checking key
    /// and bounds, with the target's key table held for reading: a region cannot be
    /// deregistered, and so not unmapped (`MemoryRegion` drops its registration first),
    /// while the access runs. (Before, the lock was let go before the copy: a test that
    /// dropped a store while another read its memory crashed in the copy, 1 run in 15.)
    fn with_remote<R>(
        &self,
        peer: PeerId,
        op: &'static str,
        remote: &RemoteRegion,
        offset: u64,
        len: usize,
        access: impl FnOnce(*mut u8) -> R,
    ) -> Result<R> {
        let addr = remote.target(offset, len as u64)?;
        let target = self.target(peer, op)?;
        let keys = target.keys.read().expect("keys lock");
        let &(base, region_len) = keys.get(&remote.key).ok_or(FabricError::RemoteAccess {
            op,
            peer,
            key: remote.key,
        })?;
        let addr = addr as usize;
        if addr < base || addr + len > base + region_len {
            return Err(FabricError::RemoteAccess {
                op,
                peer,
                key: remote.key,
            });
        }
        let result = access(addr as *mut u8);
        drop(keys);
        Ok(result)
    }

    fn done(&self, op: &'static str, peer: PeerId, value: u64) -> Completion {
        let state = OpState::new(op, peer);
        state.finish(Ok(value));
        Completion::new(state, self.driver.clone(), self.timeout)
    }

    /// Runs `access` on the 8-byte word at a remote access's address (see
    /// [`LoopbackEndpoint::with_remote`]).
    fn atomic<R>(
        &self,
        peer: PeerId,
        op: &'static str,
        remote: &RemoteRegion,
        offset: u64,
        access: impl FnOnce(&AtomicU64) -> R,
    ) -> Result<R> {
        if !offset.is_multiple_of(8) {
            return Err(FabricError::Misaligned(offset));
        }
        self.with_remote(peer, op, remote, offset, 8, |ptr| {
            // SAFETY: key and bounds checked, 8-byte aligned; the region stays registered,
            // so mapped, while the key table is held (`with_remote`).
            access(unsafe { &*(ptr as *const AtomicU64) })
        })
    }
}

impl Drop for LoopbackEndpoint {
    fn drop(&mut self) {
        registry()
            .lock()
            .expect("registry lock")
            .remove(&self.shared.token);
    }
}

impl Endpoint for LoopbackEndpoint {
    fn provider(&self) -> Provider {
        Provider::Loopback
    }

    fn address(&self) -> EndpointAddress {
        EndpointAddress {
            provider: Provider::Loopback,
            token: self.shared.token,
            raw: Vec::new(),
        }
    }

    fn connect(&self, peer: &EndpointAddress) -> Result<PeerId> {
        if peer.provider != Provider::Loopback {
            return Err(FabricError::ProviderMismatch {
                expected: Provider::Loopback.to_string(),
                found: peer.provider.to_string(),
            });
        }
        let mut peers = self.shared.peers.write().expect("peers lock");
        if let Some(i) = peers.iter().position(|&t| t == peer.token) {
            return Ok(PeerId(i as u32));
        }
        peers.push(peer.token);
        Ok(PeerId(peers.len() as u32 - 1))
    }

    fn register(&self, region: Region) -> Result<MemoryRegion> {
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        let base = region.as_ptr() as usize;
        let len = region.len();
        self.shared
            .keys
            .write()
            .expect("keys lock")
            .insert(key, (base, len));
        let registration = LoopbackRegistration {
            shared: Arc::downgrade(&self.shared),
            key,
        };
        Ok(MemoryRegion::new(
            region,
            Box::new(registration),
            RemoteRegion {
                addr: base as u64,
                key,
                len: len as u64,
            },
        ))
    }

    fn op_timeout(&self) -> Duration {
        self.timeout
    }

    /// Loopback operations complete as they are posted: none is ever in flight to fail.
    fn peer_failed(&self, _peer: PeerId, _reason: &str) -> usize {
        0
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
        let src = local.check_local(local_offset, len)?;
        self.with_remote(peer, "write", remote, remote_offset, len, |dst| {
            std::ptr::copy(src, dst, len)
        })?;
        Ok(self.done("write", peer, 0))
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
        let dst = local.check_local(local_offset, len)?;
        self.with_remote(peer, "read", remote, remote_offset, len, |src| {
            std::ptr::copy(src, dst, len)
        })?;
        Ok(self.done("read", peer, 0))
    }

    fn post_fetch_add(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        add: u64,
    ) -> Result<Completion> {
        let old = self.atomic(peer, "fetch-add", remote, remote_offset, |w| {
            w.fetch_add(add, Ordering::SeqCst)
        })?;
        Ok(self.done("fetch-add", peer, old))
    }

    fn post_compare_swap(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        compare: u64,
        swap: u64,
    ) -> Result<Completion> {
        let old = self.atomic(peer, "compare-swap", remote, remote_offset, |w| {
            match w.compare_exchange(compare, swap, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            }
        })?;
        Ok(self.done("compare-swap", peer, old))
    }

    fn send(&self, peer: PeerId, tag: u64, data: &[u8]) -> Result<()> {
        if data.len() > self.max_message {
            return Err(FabricError::MessageTooLarge {
                len: data.len(),
                max: self.max_message,
            });
        }
        let target = self.target(peer, "send")?;
        let sender = target
            .peers
            .read()
            .expect("peers lock")
            .iter()
            .position(|&t| t == self.shared.token)
            .map(|i| PeerId(i as u32));
        target.inbox.push(Message {
            tag,
            peer: sender,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn recv_masked(&self, tag: u64, ignore: u64, timeout: Duration) -> Result<Message> {
        self.shared.inbox.take(tag, ignore, timeout, || 0)
    }
}
