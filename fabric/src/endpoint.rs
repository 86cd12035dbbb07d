//! The endpoint trait every backend implements, endpoint addresses, and two-sided messages.
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::completion::Completion;
use crate::config::Provider;
use crate::error::{FabricError, Result};
use crate::memory::{MemoryRegion, Region, RemoteRegion};

/// A peer this endpoint is connected to, numbered in connection order from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

const ADDRESS_MAGIC: &[u8; 4] = b"KRA1";

/// The bytes a peer needs to connect to an endpoint: provider, a random endpoint token
/// (identifies the sender of messages) and the provider's raw address.
#[derive(Clone, PartialEq, Eq)]
pub struct EndpointAddress {
    pub provider: Provider,
    pub token: u64,
    pub raw: Vec<u8>,
}

impl EndpointAddress {
    pub fn to_bytes(&self) -> Vec<u8> {
        let name = self.provider.name().as_bytes();
        let mut out = Vec::with_capacity(4 + 1 + name.len() + 8 + 4 + self.raw.len());
        out.extend_from_slice(ADDRESS_MAGIC);
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&self.token.to_le_bytes());
        out.extend_from_slice(&(self.raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.raw);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<EndpointAddress> {
        let bad =
            |what: &str| FabricError::BadAddress(format!("{what} ({} bytes given)", bytes.len()));
        if bytes.len() < 5 || &bytes[..4] != ADDRESS_MAGIC {
            return Err(bad("missing KRA1 magic"));
        }
        let name_len = bytes[4] as usize;
        let rest = &bytes[5..];
        if rest.len() < name_len + 12 {
            return Err(bad("truncated header"));
        }
        let name = std::str::from_utf8(&rest[..name_len])
            .map_err(|_| bad("provider name is not UTF-8"))?;
        let provider = Provider::all()
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| FabricError::UnknownProvider(name.to_string()))?;
        let rest = &rest[name_len..];
        let token = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let raw_len = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")) as usize;
        let raw = &rest[12..];
        if raw.len() != raw_len {
            return Err(bad("raw address length does not match"));
        }
        Ok(EndpointAddress {
            provider,
            token,
            raw: raw.to_vec(),
        })
    }

    /// Hex form, for passing through environment variables and text channels.
    pub fn to_hex(&self) -> String {
        self.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Result<EndpointAddress> {
        let bytes = crate::secret::decode_hex(s).map_err(|e| {
            FabricError::BadAddress(match e {
                crate::secret::HexError::NotHex { at } => {
                    format!("{} at byte {at}", e.reason())
                }
                crate::secret::HexError::OddLength => e.reason().to_string(),
            })
        })?;
        Self::from_bytes(&bytes)
    }
}

impl fmt::Debug for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EndpointAddress({}, token {:016x}, {} raw bytes)",
            self.provider,
            self.token,
            self.raw.len()
        )
    }
}

/// A two-sided message received by an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u64,
    /// The sender, when it is a connected peer.
    pub peer: Option<PeerId>,
    pub data: Vec<u8>,
}

/// One-sided RMA, atomics and tagged messages to connected peers.
///
/// Semantics shared by every backend:
/// - a write's completion means the data is visible at the target;
/// - every operation completes or fails within the endpoint's operation timeout;
/// - at most `max_in_flight` operations are outstanding; posting beyond blocks.
pub trait Endpoint: Send + Sync {
    fn provider(&self) -> Provider;

    /// This endpoint's address, to hand to peers over a bootstrap channel.
    fn address(&self) -> EndpointAddress;

    /// Connects to (or resolves) a peer's endpoint; connecting twice gives the same id.
    fn connect(&self, peer: &EndpointAddress) -> Result<PeerId>;

    /// Registers a region for local and remote access.
    fn register(&self, region: Region) -> Result<MemoryRegion>;

    /// The operation timeout configured for this endpoint.
    fn op_timeout(&self) -> Duration;

    /// The caller learnt elsewhere (the job's agreed membership, a peer's replacement) that
    /// `peer`'s process is gone: operations to it still in flight fail at once with
    /// [`crate::FabricError::Remote`] ("peer failed: `reason`") instead of waiting out the
    /// operation timeout, and later ones fail fast, as after a timeout. Their buffers stay
    /// reserved until the provider reports them. Returns how many operations were failed.
    fn peer_failed(&self, peer: PeerId, reason: &str) -> usize;

    /// Posts a write of `len` bytes from `local[local_offset..]` to `remote` at `remote_offset`.
    ///
    /// # Safety
    /// Until the completion resolves, the local range must not be written by anyone, and the
    /// remote range must not be accessed by others in a way that needs ordering with this
    /// write. Bounds and keys are checked; memory lifetime is handled by the endpoint.
    unsafe fn post_write(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion>;

    /// Posts a read of `len` bytes from `remote` at `remote_offset` into `local[local_offset..]`.
    ///
    /// # Safety
    /// Until the completion resolves, the local range must not be accessed by anyone and the
    /// remote range must not be written by others.
    unsafe fn post_read(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<Completion>;

    /// Posts an atomic 64-bit fetch-and-add; the completion yields the previous value.
    fn post_fetch_add(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        add: u64,
    ) -> Result<Completion>;

    /// Posts an atomic 64-bit compare-and-swap; the completion yields the previous value
    /// (the swap happened iff it equals `compare`).
    fn post_compare_swap(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        compare: u64,
        swap: u64,
    ) -> Result<Completion>;

    /// Sends a tagged message; returns when the payload has been handed to the transport.
    fn send(&self, peer: PeerId, tag: u64, data: &[u8]) -> Result<()>;

    /// Receives the oldest message whose tag equals `tag` in every bit not set in `ignore`,
    /// waiting at most `timeout` (a library multiplexing its own fields into the tag
    /// receives all of its messages with one call).
    fn recv_masked(&self, tag: u64, ignore: u64, timeout: Duration) -> Result<Message>;

    /// Receives the oldest message with `tag`, waiting at most `timeout`.
    fn recv(&self, tag: u64, timeout: Duration) -> Result<Message> {
        self.recv_masked(tag, 0, timeout)
    }

    /// Blocking write; see [`Endpoint::post_write`] for the contract.
    ///
    /// # Safety
    /// As for [`Endpoint::post_write`], for the duration of the call.
    unsafe fn write(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<()> {
        self.post_write(peer, local, local_offset, len, remote, remote_offset)?
            .wait()
            .map(drop)
    }

    /// Blocking read; see [`Endpoint::post_read`] for the contract.
    ///
    /// # Safety
    /// As for [`Endpoint::post_read`], for the duration of the call.
    unsafe fn read(
        &self,
        peer: PeerId,
        local: &MemoryRegion,
        local_offset: usize,
        len: usize,
        remote: &RemoteRegion,
        remote_offset: u64,
    ) -> Result<()> {
        self.post_read(peer, local, local_offset, len, remote, remote_offset)?
            .wait()
            .map(drop)
    }

    /// Blocking fetch-and-add; returns the previous value.
    fn fetch_add(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        add: u64,
    ) -> Result<u64> {
        self.post_fetch_add(peer, remote, remote_offset, add)?
            .wait()
    }

    /// Blocking compare-and-swap; returns the previous value.
    fn compare_swap(
        &self,
        peer: PeerId,
        remote: &RemoteRegion,
        remote_offset: u64,
        compare: u64,
        swap: u64,
    ) -> Result<u64> {
        self.post_compare_swap(peer, remote, remote_offset, compare, swap)?
            .wait()
    }
}

/// Received messages waiting for a matching `recv`, shared by the backends.
#[derive(Default)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Message>>,
    arrived: Condvar,
}

impl Inbox {
    pub(crate) fn push(&self, msg: Message) {
        self.queue.lock().expect("inbox lock").push_back(msg);
        self.arrived.notify_all();
    }

    /// Takes the oldest message whose tag matches `tag` outside the `ignore` bits; `drive`
    /// runs the backend's progress between checks.
    pub(crate) fn take(
        &self,
        tag: u64,
        ignore: u64,
        timeout: Duration,
        drive: impl Fn() -> usize,
    ) -> Result<Message> {
        let start = Instant::now();
        let matches = |m: &Message| (m.tag ^ tag) & !ignore == 0;
        loop {
            {
                let mut q = self.queue.lock().expect("inbox lock");
                if let Some(i) = q.iter().position(matches) {
                    return Ok(q.remove(i).expect("index from position"));
                }
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(FabricError::RecvTimeout { tag, timeout });
            }
            // Progress may push into the queue: never run it with the queue locked.
            if drive() == 0 {
                let q = self.queue.lock().expect("inbox lock");
                if !q.iter().any(matches) {
                    let nap = (timeout - waited).min(Duration::from_micros(200));
                    let _ = self.arrived.wait_timeout(q, nap).expect("inbox wait");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_receive_matches_only_the_unmasked_bits() {
        use crate::{open, FabricConfig};
        let a = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
        let b = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
        let peer = a.connect(&b.address()).unwrap();
        a.send(peer, 0xA1, b"first").unwrap();
        a.send(peer, 0xB2, b"second").unwrap();
        let short = Duration::from_millis(50);
        let m = b.recv_masked(0xB0, 0x0F, short).unwrap();
        assert_eq!((m.tag, m.data.as_slice()), (0xB2, &b"second"[..]));
        assert!(b.recv_masked(0xB0, 0x0F, short).is_err());
        assert_eq!(b.recv(0xA1, short).unwrap().data, b"first");
    }

    #[test]
    fn address_round_trips_through_hex() {
        let a = EndpointAddress {
            provider: Provider::Tcp,
            token: 0xdead_beef,
            raw: vec![1, 2, 3, 250],
        };
        assert_eq!(EndpointAddress::from_hex(&a.to_hex()).unwrap(), a);
    }

    #[test]
    fn malformed_addresses_are_rejected_with_a_reason() {
        assert!(EndpointAddress::from_bytes(b"nope")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut good = EndpointAddress {
            provider: Provider::Shm,
            token: 1,
            raw: vec![9; 16],
        }
        .to_bytes();
        good.truncate(good.len() - 1);
        assert!(EndpointAddress::from_bytes(&good)
            .unwrap_err()
            .to_string()
            .contains("length"));
        assert!(EndpointAddress::from_hex("abc").is_err());
        assert!(EndpointAddress::from_hex("zz").is_err());
        // Multi-byte characters are errors, not panics on a char boundary.
        for bad in ["a\u{e9}1", "\u{e9}\u{e9}", "0\u{e9}0"] {
            let e = EndpointAddress::from_hex(bad).unwrap_err().to_string();
            assert!(e.contains("malformed endpoint address"), "{e}");
        }
        let mut unknown = b"KRA1".to_vec();
        unknown.push(3);
        unknown.extend_from_slice(b"xyz");
        unknown.extend_from_slice(&[0; 12]);
        assert!(
            matches!(EndpointAddress::from_bytes(&unknown), Err(FabricError::UnknownProvider(p)) if p == "xyz")
        );
    }
}
