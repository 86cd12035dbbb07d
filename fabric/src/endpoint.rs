//! The endpoint trait every backend implements, endpoint addresses, and two-sided messages.
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::Thread;
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
///
/// A receive first polls for its message itself, driving the backend's progress, for at most
/// the endpoint's receive poll window ([`crate::FabricConfig::recv_poll`]): a message then
/// costs the provider's latency, not a wake-up of the receiver by the progress thread (on
/// shm, 30 us one-way instead of a few). While a receive polls, the inbox shows it
/// ([`Inbox::polled`]) and the backend's progress thread steps aside, so one thread, not
/// two, spins per endpoint. Only one receive polls at a time: others sleep at once and are
/// woken by whoever pushes their message (on a 2-core node running 4 ranks, spinning threads
/// took the cores from the work). After the window the receive sleeps and the progress
/// thread serves, as before. The window is 0 unless configured (`KRUN_FABRIC_RECV_POLL_US`):
/// busy-polling pays off with a core per rank, and makes latency bimodal on shared cores.
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Message>>,
    arrived: Condvar,
    /// How long a receive polls before it sleeps.
    poll_window: Duration,
    /// A receive is polling (at most one at a time).
    polling: AtomicBool,
    /// Times a receive went to sleep waiting for a message (for tests and diagnostics).
    naps: AtomicU64,
    /// The backend's progress thread is parked while a receive polls ([`Inbox::step_aside`]).
    aside: AtomicBool,
    aside_thread: OnceLock<Thread>,
}

/// A receive with a timeout this short polls for all of it and never sleeps.
const NEVER_NAP: Duration = Duration::from_micros(50);

/// Marks the inbox polled until dropped, on every way out of the polling phase. Unless the
/// receive ended on its own short timeout (a caller polling in a loop comes straight back),
/// a progress thread parked meanwhile is woken: it serves the endpoint (remote accesses,
/// other threads' messages) from now on, instead of after its nap.
struct Polling<'a> {
    inbox: &'a Inbox,
    wake: bool,
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        self.inbox.polling.store(false, Ordering::SeqCst);
        if self.wake && self.inbox.aside.load(Ordering::SeqCst) {
            if let Some(t) = self.inbox.aside_thread.get() {
                t.unpark();
            }
        }
    }
}

impl Inbox {
    pub(crate) fn new(poll_window: Duration) -> Inbox {
        Inbox {
            queue: Mutex::new(VecDeque::new()),
            arrived: Condvar::new(),
            poll_window,
            polling: AtomicBool::new(false),
            naps: AtomicU64::new(0),
            aside: AtomicBool::new(false),
            aside_thread: OnceLock::new(),
        }
    }

    pub(crate) fn push(&self, msg: Message) {
        self.queue.lock().expect("inbox lock").push_back(msg);
        self.arrived.notify_all();
    }

    /// True while a receive polls for its message itself: the progress thread steps aside.
    pub(crate) fn polled(&self) -> bool {
        self.polling.load(Ordering::Relaxed)
    }

    /// Called by the backend's progress thread while [`Inbox::polled`]: parks until the
    /// polling receive gets its message or gives up polling, for at most `max` (the receive
    /// drives progress meanwhile; one thread, not two, spins per endpoint).
    pub(crate) fn step_aside(&self, max: Duration) {
        self.aside_thread.get_or_init(std::thread::current);
        self.aside.store(true, Ordering::SeqCst);
        // SeqCst on both sides: either the receive sees `aside` and wakes this thread, or this
        // thread sees that it stopped polling and does not park.
        if self.polling.load(Ordering::SeqCst) {
            std::thread::park_timeout(max);
        }
        self.aside.store(false, Ordering::SeqCst);
    }

    /// How many times a receive went to sleep waiting for a message.
    pub(crate) fn naps(&self) -> u64 {
        self.naps.load(Ordering::Relaxed)
    }

    fn pop(&self, matches: impl Fn(&Message) -> bool) -> Option<Message> {
        let mut q = self.queue.lock().expect("inbox lock");
        let i = q.iter().position(matches)?;
        q.remove(i)
    }

    /// Takes the oldest message whose tag matches `tag` outside the `ignore` bits; `drive`
    /// runs the backend's progress between checks (at least once per call, however short
    /// the timeout) and returns how many completions it handled.
    pub(crate) fn take(
        &self,
        tag: u64,
        ignore: u64,
        timeout: Duration,
        drive: impl Fn() -> usize,
    ) -> Result<Message> {
        let start = Instant::now();
        let matches = |m: &Message| (m.tag ^ tag) & !ignore == 0;
        if let Some(m) = self.pop(matches) {
            return Ok(m);
        }
        // Poll: drive progress and look again, without sleeping, for the poll window. A
        // receive of at most NEVER_NAP (a caller polling in its own loop, 1 us at a time)
        // polls for its whole timeout and never sleeps: a futex wait rounds so short a
        // timeout up to the 50 us timer slack, which made every such poll cost up to 50 us.
        let short = timeout <= NEVER_NAP && !self.poll_window.is_zero();
        let limit = if short { timeout } else { self.poll_window };
        let mut polling = self
            .polling
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
            .then_some(Polling {
                inbox: self,
                wake: true,
            });
        if polling.is_some() || short {
            let mut polls = 0u32;
            loop {
                let handled = drive();
                if let Some(m) = self.pop(matches) {
                    return Ok(m);
                }
                let waited = start.elapsed();
                if waited >= timeout {
                    if let Some(p) = polling.as_mut() {
                        // The caller comes straight back: leave the progress thread parked.
                        p.wake = !short;
                    }
                    return Err(FabricError::RecvTimeout { tag, timeout });
                }
                if waited >= limit {
                    break;
                }
                if handled == 0 {
                    // Give the core away only every 64th idle poll: yielding on every poll
                    // hands it to any runnable task for its whole slice.
                    polls = polls.wrapping_add(1);
                    if polls.is_multiple_of(64) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        drop(polling);
        // Sleep until a message is pushed (by the progress thread or by the receive that
        // polls), driving progress at each wake-up.
        loop {
            if let Some(m) = self.pop(matches) {
                return Ok(m);
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
                    self.naps.fetch_add(1, Ordering::Relaxed);
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

    fn message(tag: u64) -> Message {
        Message {
            tag,
            peer: None,
            data: tag.to_le_bytes().to_vec(),
        }
    }

    #[test]
    fn a_polling_receive_gets_what_its_own_progress_delivers_without_sleeping() {
        // No progress thread: only the receive's own driving delivers (on its 500th call).
        let inbox = Inbox::new(Duration::from_secs(60));
        let drives = std::sync::atomic::AtomicUsize::new(0);
        let m = inbox
            .take(7, 0, Duration::from_secs(60), || {
                assert!(inbox.polled(), "driving while not marked as polling");
                if drives.fetch_add(1, Ordering::Relaxed) + 1 == 500 {
                    inbox.push(message(9));
                    inbox.push(message(7));
                    2
                } else {
                    0
                }
            })
            .unwrap();
        assert_eq!(m, message(7));
        assert_eq!(drives.load(Ordering::Relaxed), 500);
        assert_eq!(inbox.naps(), 0, "the receive slept instead of polling");
        assert!(!inbox.polled(), "still marked as polling after returning");
        // The other message stays for its own receive.
        assert_eq!(inbox.pop(|m| m.tag == 9), Some(message(9)));
    }

    #[test]
    fn a_receive_shorter_than_the_poll_window_drives_progress_and_never_sleeps() {
        let inbox = Inbox::new(Duration::from_millis(100));
        let drives = std::sync::atomic::AtomicUsize::new(0);
        let e = inbox
            .take(7, 0, Duration::from_micros(1), || {
                drives.fetch_add(1, Ordering::Relaxed);
                0
            })
            .unwrap_err();
        assert!(matches!(e, FabricError::RecvTimeout { tag: 7, .. }), "{e}");
        assert!(drives.load(Ordering::Relaxed) >= 1);
        assert_eq!(inbox.naps(), 0);
        assert!(!inbox.polled());
        // A zero timeout still drives progress once and takes what that delivered.
        let m = inbox
            .take(5, 0, Duration::ZERO, || {
                inbox.push(message(5));
                1
            })
            .unwrap();
        assert_eq!(m.tag, 5);
    }

    #[test]
    fn after_the_poll_window_a_receive_sleeps_and_times_out_with_its_tag() {
        let inbox = Inbox::new(Duration::ZERO);
        let e = inbox
            .take(0x33, 0, Duration::from_millis(5), || 0)
            .unwrap_err();
        assert!(
            matches!(e, FabricError::RecvTimeout { tag: 0x33, .. }),
            "{e}"
        );
        assert!(
            inbox.naps() >= 1,
            "a receive with no poll window never slept"
        );
        assert!(!inbox.polled());
    }

    #[test]
    fn only_one_receive_polls_and_the_others_are_woken_by_its_progress() {
        let inbox = std::sync::Arc::new(Inbox::new(Duration::from_secs(60)));
        let second_started = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let poller = s.spawn(|| {
                inbox.take(1, 0, Duration::from_secs(60), || {
                    if second_started.load(Ordering::Acquire) && inbox.naps() > 0 {
                        // The second receive is asleep: this one's progress delivers both.
                        inbox.push(message(2));
                        inbox.push(message(1));
                        return 2;
                    }
                    0
                })
            });
            // Wait until the first receive polls, then start a second one.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !inbox.polled() {
                assert!(Instant::now() < deadline, "the first receive never polled");
                std::thread::yield_now();
            }
            let sleeper = s.spawn(|| {
                second_started.store(true, Ordering::Release);
                inbox.take(2, 0, Duration::from_secs(60), || 0)
            });
            assert_eq!(sleeper.join().unwrap().unwrap(), message(2));
            assert_eq!(poller.join().unwrap().unwrap(), message(1));
        });
        assert!(!inbox.polled());
    }

    #[test]
    fn a_progress_thread_stepping_aside_is_woken_when_the_polling_receive_has_its_message() {
        let inbox = Inbox::new(Duration::from_secs(3600));
        std::thread::scope(|s| {
            let receiver = s.spawn(|| {
                inbox.take(3, 0, Duration::from_secs(3600), || {
                    // The progress thread is parked (or about to park): deliver now.
                    if inbox.aside.load(Ordering::SeqCst) {
                        inbox.push(message(3));
                        1
                    } else {
                        0
                    }
                })
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            while !inbox.polled() {
                assert!(Instant::now() < deadline, "the receive never polled");
                std::thread::yield_now();
            }
            // Parks for an hour unless the receive wakes it when it has its message.
            inbox.step_aside(Duration::from_secs(3600));
            assert!(!inbox.aside.load(Ordering::SeqCst));
            assert_eq!(receiver.join().unwrap().unwrap(), message(3));
        });
        assert!(!inbox.polled());
    }

    #[test]
    fn a_receive_waiting_on_a_closed_peer_ends_with_a_timeout_naming_its_tag() {
        use crate::{open, FabricConfig};
        let a = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
        let b = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
        let peer = a.connect(&b.address()).unwrap();
        a.send(peer, 0x44, b"last").unwrap();
        drop(a);
        assert_eq!(b.recv(0x44, Duration::from_secs(5)).unwrap().data, b"last");
        let e = b.recv(0x44, Duration::from_millis(20)).unwrap_err();
        assert!(
            matches!(e, FabricError::RecvTimeout { tag: 0x44, .. }),
            "{e}"
        );
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
