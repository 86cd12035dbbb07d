//! One rank of a job: its fabric endpoint, its peers, collectives (barrier, all-gather) and
//! the entry points of the Rust API.
//!
//! Start-up: the rank opens its own fabric endpoint, swaps an address card (endpoint address
//! and the checkpoint versions it holds) with every rank through the job's bootstrap
//! all-gather (`KRUN_BOOTSTRAP`), connects to every rank, and wires the connections up one
//! direction at a time (libfabric 1.17's rxm can fail a connection both sides open at once).
//! From then on ranks talk directly; the bootstrap is used for nothing else.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fabric::bootstrap::BootstrapClient;
use fabric::{Endpoint, EndpointAddress, FabricConfig, MemoryRegion, Region};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointConfig, Checkpoints};
use crate::error::{RankError, Result};
use crate::messages::{Messages, Observer, Received, Source, TagMatch, INTERNAL_TAG_BASE, MAX_TAG};
use crate::node_link::{NodeLink, RankToNode};

/// Internal tags (see [`INTERNAL_TAG_BASE`]).
pub(crate) const TAG_WIREUP: u32 = INTERNAL_TAG_BASE + 1;
pub(crate) const TAG_ALLGATHER: u32 = INTERNAL_TAG_BASE + 2;
/// Dissemination rounds use `TAG_ROUND + k`.
pub(crate) const TAG_ROUND: u32 = INTERNAL_TAG_BASE + 0x100;

/// How a rank starts.
#[derive(Debug, Clone)]
pub struct Config {
    pub rank: usize,
    pub size: usize,
    /// The job's bootstrap service; required when `size > 1`.
    pub bootstrap: Option<SocketAddr>,
    pub fabric: FabricConfig,
    /// Whether `fabric.bind_address` was chosen explicitly (else the address this host
    /// reaches the bootstrap from is used).
    pub bind_explicit: bool,
    /// Longest a receive waits (`None`: forever).
    pub recv_timeout: Option<Duration>,
    /// The native checkpointer's settings; `None` runs without checkpoints.
    pub checkpoints: Option<CheckpointConfig>,
    /// The local krund's socket (`KRUN_NODE_SOCKET`).
    pub node_socket: Option<PathBuf>,
}

fn env_usize(name: &'static str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map(Some).map_err(|_| RankError::BadEnv {
            name,
            value: v,
            reason: "expected a non-negative integer".into(),
        }),
        Err(_) => Ok(None),
    }
}

impl Config {
    /// From the environment krun gives a rank (`KRUN_RANK`, `KRUN_SIZE`, `KRUN_BOOTSTRAP`),
    /// `KRUN_FABRIC_*`, `KRUN_GHOST_*`, `KRUN_RECV_TIMEOUT_MS` (default 300000; 0 waits
    /// forever) and `KRUN_NODE_SOCKET`. Without `KRUN_RANK` the program runs as the single
    /// rank of a job of one.
    pub fn from_env() -> Result<Config> {
        let rank = env_usize("KRUN_RANK")?;
        let size = env_usize("KRUN_SIZE")?;
        let (rank, size) = match (rank, size) {
            (None, _) => (0, 1),
            (Some(_), None) => {
                return Err(RankError::MissingEnv {
                    name: "KRUN_SIZE",
                    hint: "KRUN_RANK is set, so the job size must be too (run under krun)",
                })
            }
            (Some(r), Some(s)) => (r, s),
        };
        if size == 0 || rank >= size {
            return Err(RankError::BadEnv {
                name: "KRUN_RANK",
                value: rank.to_string(),
                reason: format!("must be below KRUN_SIZE={size}"),
            });
        }
        let rejoin = crate::uncoordinated::rejoining()?;
        let bootstrap = match std::env::var("KRUN_BOOTSTRAP") {
            Ok(v) => Some(v.trim().parse().map_err(|_| RankError::BadEnv {
                name: "KRUN_BOOTSTRAP",
                value: v.clone(),
                reason: "expected HOST:PORT".into(),
            })?),
            // A rejoining rank swaps no addresses (`crate::uncoordinated`).
            Err(_) if size > 1 && !rejoin => {
                return Err(RankError::MissingEnv {
                    name: "KRUN_BOOTSTRAP",
                    hint: "a job of several ranks swaps addresses through it: run under krun",
                })
            }
            Err(_) => None,
        };
        let recv_timeout = match env_usize("KRUN_RECV_TIMEOUT_MS")? {
            None => Some(Duration::from_secs(300)),
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms as u64)),
        };
        Ok(Config {
            rank,
            size,
            bootstrap,
            fabric: FabricConfig::default().with_env()?,
            bind_explicit: std::env::var_os("KRUN_FABRIC_BIND").is_some(),
            recv_timeout,
            checkpoints: Some(CheckpointConfig::from_env()?),
            node_socket: std::env::var_os("KRUN_NODE_SOCKET").map(PathBuf::from),
        })
    }
}

/// What a rank tells every other rank at start.
#[derive(Serialize, Deserialize)]
struct Card {
    address: Vec<u8>,
    /// Checkpoint versions this rank holds (newest last).
    versions: Vec<u64>,
}

/// One rank of a job. Cheap to share (`Arc<Rank>`); every method may be called from any
/// thread.
pub struct Rank {
    rank: usize,
    size: usize,
    pub(crate) ep: Arc<dyn Endpoint>,
    pub(crate) msgs: Messages,
    boot: Mutex<Option<BootstrapClient>>,
    pub(crate) recv_timeout: Option<Duration>,
    pub(crate) windows: crate::window::WindowTable,
    pub(crate) ckpt: Checkpoints,
    /// The fabric settings the rank's endpoint was opened with (the DSM opens its own).
    pub(crate) fabric: FabricConfig,
    node: Mutex<Option<NodeLink>>,
    finalized: AtomicBool,
}

impl Rank {
    /// Starts this rank from the environment krun provides ([`Config::from_env`]).
    /// `KRUN_MESSAGE_LOGGING=1` turns on sender-based message logging for the job
    /// ([`Rank::enable_logging`]; every rank must have the same setting).
    ///
    /// Under krun's uncoordinated policy (`KRUN_UNCOORDINATED=1`) safepoints take no
    /// barrier, and a restarted rank (`KRUN_REJOIN=1`) rejoins the running ranks instead of
    /// wiring up with them ([`crate::uncoordinated`]).
    pub fn init() -> Result<Arc<Rank>> {
        let logging = crate::uncoordinated::env_flag("KRUN_MESSAGE_LOGGING")?;
        if crate::uncoordinated::rejoining()? {
            return Self::rejoin_init(Config::from_env()?);
        }
        let rank = Self::init_with(Config::from_env()?)?;
        // Reached by its watcher: the mode may switch while the job runs.
        crate::uncoordinated::set_current(&rank);
        if logging {
            rank.enable_logging(0)?;
        }
        if crate::uncoordinated::active() {
            rank.setup_uncoordinated(logging)?;
        }
        Ok(rank)
    }

    /// A restarted rank rejoining a running job under message logging (see
    /// [`crate::uncoordinated`]).
    fn rejoin_init(config: Config) -> Result<Arc<Rank>> {
        let rank = config.rank;
        let Some(path) = config.node_socket.clone() else {
            return Err(RankError::MissingEnv {
                name: "KRUN_NODE_SOCKET",
                hint: "KRUN_REJOIN is set: a rejoining rank learns its peers from its krund",
            });
        };
        crate::rollback::start_watcher(&path, rank as u32)?;
        let mut ckpt = Checkpoints::prepare(config.checkpoints.as_ref(), rank)?;
        let mine = ckpt.local_versions().to_vec();
        ckpt.start(&[mine])?;
        // No image restored: the rank was lost before its first own checkpoint and
        // re-executes from its start (its peers say where the logging started).
        let restored = ckpt.restored().is_some();
        let snapshot = crate::uncoordinated::log_region(&ckpt)?;
        if restored && snapshot.is_none() {
            return Err(RankError::Checkpoint(format!(
                "rank {rank} rejoins, but its restored image ({:?}) holds no message-log \
                 snapshot (KRUN_GHOST_RESTORE must name an own checkpoint taken with logging)",
                ckpt.restored()
            )));
        }
        let rejoin = Rank::rejoin_open(config, 0)?;
        let mut link = NodeLink::connect_env(&path)?;
        let peers = link.rejoin(
            rank as u32,
            rejoin.address(),
            rejoin.ring(),
            crate::uncoordinated::REJOIN_WAIT,
        )?;
        link.report(&RankToNode::Hello {
            rank: rank as u32,
            pid: std::process::id(),
        })?;
        let this = rejoin.join_with(&peers, snapshot.as_deref(), Some(ckpt), Some(link))?;
        this.setup_uncoordinated(false)?;
        let replay = this.log_replay_pending();
        let from = match this.restored_version() {
            Some(v) => format!("its checkpoint (v{v})"),
            None => "its start (lost before its first checkpoint)".to_string(),
        };
        eprintln!(
            "krun: rank {rank} rejoined the running ranks from {from}: {replay} deliveries \
             to take again in the recorded order (determinants from its buddy)"
        );
        Ok(this)
    }

    /// Starts a rank; every rank of the job calls this at about the same time.
    pub fn init_with(mut config: Config) -> Result<Arc<Rank>> {
        let (rank, size) = (config.rank, config.size);
        crate::trace::step(rank, "init");
        // First of all, so that a recovery's order reaches this process even while it waits
        // in the address all-gather below.
        if let Some(path) = &config.node_socket {
            crate::rollback::start_watcher(path, rank as u32)?;
        }
        // A broken address exchange (a node died while the job started, or a recovery's
        // order came first) is held like any communication error in a job that recovers
        // ([`crate::rollback::hold`]): the recovery's order replaces this process meanwhile.
        // Returned at once, the error ended the process while its watcher had taken the
        // order, and the new wiring epoch waited for it for ever.
        let held = |e: fabric::FabricError| {
            let e = RankError::from(e);
            if crate::rollback::may_hold() {
                eprintln!(
                    "krun: rank {rank}: the address exchange broke ({e}); waiting for the \
                     recovery's order"
                );
            }
            crate::rollback::hold(e)
        };
        let mut boot = match config.bootstrap {
            Some(addr) => Some(
                BootstrapClient::connect(addr, rank, size, Duration::from_secs(120))
                    .map_err(held)?,
            ),
            None => None,
        };
        crate::trace::step(rank, "bootstrap connected");
        test_pause_before_the_exchange(rank);
        if let (Some(b), false) = (&boot, config.bind_explicit) {
            config.fabric.bind_address = b.local_addr()?.ip().to_string();
        }
        let ep: Arc<dyn Endpoint> = Arc::from(fabric::open(&config.fabric)?);
        crate::trace::step(rank, "fabric opened");
        let mut ckpt = Checkpoints::prepare(config.checkpoints.as_ref(), rank)?;
        crate::trace::step(rank, "checkpointer prepared");
        let card = Card {
            address: ep.address().to_bytes(),
            versions: ckpt.local_versions().to_vec(),
        };
        let card =
            postcard::to_stdvec(&card).map_err(|e| RankError::InvalidArgument(e.to_string()))?;
        let cards = match boot.as_mut() {
            Some(b) => b.allgather(&card).map_err(held)?,
            None => vec![card],
        };
        crate::trace::step(rank, "allgather done");
        if cards.len() != size {
            return Err(RankError::Protocol {
                rank,
                reason: format!("bootstrap returned {} cards for {size} ranks", cards.len()),
            });
        }
        let mut peers = Vec::with_capacity(size);
        let mut versions = Vec::with_capacity(size);
        for (r, c) in cards.iter().enumerate() {
            let card: Card = postcard::from_bytes(c).map_err(|e| RankError::Protocol {
                rank: r,
                reason: format!("address card: {e}"),
            })?;
            peers.push(ep.connect(&EndpointAddress::from_bytes(&card.address)?)?);
            versions.push(card.versions);
        }
        crate::trace::step(rank, "peers connected");
        ckpt.start(&versions)?;
        crate::trace::step(rank, "checkpointer started");
        let msgs = Messages::new(ep.clone(), rank, peers, config.fabric.max_message);
        let this = Rank {
            rank,
            size,
            ep,
            msgs,
            boot: Mutex::new(None),
            recv_timeout: config.recv_timeout,
            windows: Default::default(),
            ckpt,
            fabric: config.fabric.clone(),
            node: Mutex::new(None),
            finalized: AtomicBool::new(false),
        };
        // Every rank knows every endpoint before the first message (the fabric names a
        // message's sender only if the receiver has connected to it).
        if let Some(b) = boot.as_mut() {
            b.barrier().map_err(held)?;
        }
        crate::trace::step(rank, "barrier 1 done");
        // Wire-up: lower ranks open the connections to higher ones, one direction at a time.
        for dest in rank + 1..size {
            this.msgs.send(dest, TAG_WIREUP, &[])?;
        }
        crate::trace::step(rank, "wire-up sent");
        if let Some(b) = boot.as_mut() {
            b.barrier().map_err(held)?;
        }
        crate::trace::step(rank, "barrier 2 done");
        for src in 0..rank {
            this.msgs.recv(
                Source::Rank(src),
                TagMatch::Tag(TAG_WIREUP),
                Some(Duration::from_secs(120)),
            )?;
        }
        crate::trace::step(rank, "wired up");
        let node = match &config.node_socket {
            Some(path) => {
                let mut link = NodeLink::connect_env(path)?;
                link.report(&RankToNode::Hello {
                    rank: rank as u32,
                    pid: std::process::id(),
                })?;
                Some(link)
            }
            None => None,
        };
        *this.boot.lock().expect("boot lock") = boot;
        *this.node.lock().expect("node lock") = node;
        crate::trace::step(rank, "init done");
        Ok(Arc::new(this))
    }

    /// A rank rejoining a running job (a restarted rank under message logging, see
    /// [`crate::logging::Rejoining`]): no address all-gather, no checkpointer of its own (the
    /// application restores its state), no node link.
    pub(crate) fn assemble(
        config: Config,
        ep: Arc<dyn Endpoint>,
        msgs: Messages,
        ckpt: Option<Checkpoints>,
        node: Option<NodeLink>,
    ) -> Result<Arc<Rank>> {
        let ckpt = match ckpt {
            Some(c) => c,
            None => Checkpoints::prepare(None, config.rank)?,
        };
        Ok(Arc::new(Rank {
            rank: config.rank,
            size: config.size,
            ep,
            msgs,
            boot: Mutex::new(None),
            recv_timeout: config.recv_timeout,
            windows: Default::default(),
            ckpt,
            fabric: config.fabric,
            node: Mutex::new(node),
            finalized: AtomicBool::new(false),
        }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The fabric provider ranks talk over.
    pub fn provider(&self) -> fabric::Provider {
        self.ep.provider()
    }

    /// Installs (or with `None` removes) the observer every message passes.
    pub fn set_observer(&self, observer: Option<Arc<dyn Observer>>) {
        self.msgs.set_observer(observer);
    }

    fn user_tag(tag: u32) -> Result<u32> {
        if tag > MAX_TAG {
            return Err(RankError::BadTag {
                tag: tag as i64,
                max: MAX_TAG,
            });
        }
        Ok(tag)
    }

    /// Sends `data` to rank `dest` with `tag` (0..=[`MAX_TAG`]); returns when the data has
    /// been handed to the fabric (the buffer may be reused). Returns the per-pair sequence
    /// number.
    pub fn send(&self, dest: usize, tag: u32, data: &[u8]) -> Result<u64> {
        self.msgs.send(dest, Self::user_tag(tag)?, data)
    }

    /// Receives the oldest message from `from` with a matching tag, as an owned buffer.
    pub fn recv(&self, from: Source, tag: TagMatch) -> Result<Received> {
        self.check_match(from, tag)?;
        self.msgs.recv(from, tag, self.recv_timeout)
    }

    /// As [`Rank::recv`], waiting at most `timeout`.
    pub fn recv_timeout(&self, from: Source, tag: TagMatch, timeout: Duration) -> Result<Received> {
        self.check_match(from, tag)?;
        self.msgs.recv(from, tag, Some(timeout))
    }

    /// Receives into `out`; returns (source, tag, length). A message longer than `out`
    /// fails with [`RankError::Truncated`] and stays queued.
    pub fn recv_into(
        &self,
        from: Source,
        tag: TagMatch,
        out: &mut [u8],
    ) -> Result<(usize, u32, usize)> {
        self.check_match(from, tag)?;
        self.msgs.recv_into(from, tag, out, self.recv_timeout)
    }

    fn check_match(&self, from: Source, tag: TagMatch) -> Result<()> {
        if let Source::Rank(r) = from {
            self.msgs.check_rank(r as i64)?;
        }
        if let TagMatch::Tag(t) = tag {
            Self::user_tag(t)?;
        }
        Ok(())
    }

    /// Dissemination all-reduce with bitwise OR over the fabric: ceil(log2 size) rounds,
    /// in round k rank r sends to r + 2^k and receives from r - 2^k.
    pub fn allreduce_or(&self, value: u64) -> Result<u64> {
        let mut acc = value;
        let mut k = 0u32;
        while (1usize << k) < self.size {
            let step = 1usize << k;
            let to = (self.rank + step) % self.size;
            let from = (self.rank + self.size - step) % self.size;
            self.msgs.send(to, TAG_ROUND + k, &acc.to_le_bytes())?;
            let m = self.msgs.recv(
                Source::Rank(from),
                TagMatch::Tag(TAG_ROUND + k),
                self.recv_timeout,
            )?;
            let bytes: [u8; 8] = m
                .data
                .as_slice()
                .try_into()
                .map_err(|_| RankError::Protocol {
                    rank: from,
                    reason: format!("barrier round of {} bytes, expected 8", m.data.len()),
                })?;
            acc |= u64::from_le_bytes(bytes);
            k += 1;
        }
        Ok(acc)
    }

    /// Waits until every rank has entered the barrier (through the fabric).
    pub fn barrier(&self) -> Result<()> {
        self.allreduce_or(0).map(drop)
    }

    /// Every rank's `blob`, in rank order (through the fabric).
    pub fn allgather(&self, blob: &[u8]) -> Result<Vec<Vec<u8>>> {
        for dest in (0..self.size).filter(|&d| d != self.rank) {
            self.msgs.send(dest, TAG_ALLGATHER, blob)?;
        }
        (0..self.size)
            .map(|src| {
                if src == self.rank {
                    Ok(blob.to_vec())
                } else {
                    self.msgs
                        .recv(
                            Source::Rank(src),
                            TagMatch::Tag(TAG_ALLGATHER),
                            self.recv_timeout,
                        )
                        .map(|m| m.data)
                }
            })
            .collect()
    }

    /// Registered local memory (e.g. to put from or get into without a copy).
    pub fn register(&self, len: usize) -> Result<MemoryRegion> {
        Ok(self.ep.register(Region::new(len.max(1))?)?)
    }

    /// Tells the local krund this rank is at an agreed safepoint and waits for its order
    /// (None: no node link, or the node drives no policy).
    pub(crate) fn ask_at_safepoint(
        &self,
        rank: u32,
    ) -> Result<Option<crate::node_link::SafepointOrder>> {
        match self.node.lock().expect("node lock").as_mut() {
            Some(link) => link.at_safepoint(rank),
            None => Ok(None),
        }
    }

    /// Sends a message to the local krund, if the rank has a node link.
    pub(crate) fn report(&self, msg: &RankToNode) -> Result<()> {
        match self.node.lock().expect("node lock").as_mut() {
            Some(link) => link.report(msg),
            None => Ok(()),
        }
    }

    /// Ends the rank: a barrier, then `Exiting` to the local krund. Later calls do nothing.
    pub fn finalize(&self) -> Result<()> {
        if self.finalized.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Message logging ends here (a buddy through the barrier may be gone); this rank's
        // ring stays registered, for a ward still delivering its last messages.
        self.msgs.retire_logger();
        self.barrier()?;
        self.ckpt.wait_idle();
        self.report(&RankToNode::Exiting {
            rank: self.rank as u32,
            code: 0,
        })?;
        self.boot.lock().expect("boot lock").take();
        Ok(())
    }
}

/// For tests: `KRUN_TEST_INIT_PAUSE=R1,R2,...:MS` makes those ranks wait MS milliseconds
/// between joining the job's first address exchange and sending their card (not in a
/// recovery's wiring epoch), so that a node killed meanwhile breaks the exchange for the
/// others while they wait in it.
fn test_pause_before_the_exchange(rank: usize) {
    let Ok(spec) = std::env::var("KRUN_TEST_INIT_PAUSE") else {
        return;
    };
    if std::env::var("KRUN_WIRING_EPOCH").is_ok_and(|w| w.trim() != "0") {
        return;
    }
    let Some((ranks, ms)) = spec.split_once(':') else {
        return;
    };
    let here = ranks.split(',').any(|r| r.trim().parse() == Ok(rank));
    if let (true, Ok(ms)) = (here, ms.trim().parse::<u64>()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}
