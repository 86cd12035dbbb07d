//! The checkpoint agent of a node runtime: it moves native ranks' checkpoint images into the
//! node's checkpoint store and tells the runtime when each version is safe.
//!
//! ```text
//! rank ──RankToNode::Checkpointed{rank,version,image,bytes}──► krund runtime
//!        krund runtime ──Agent::on_checkpointed(rank, version, image, bytes)──► agent
//!        agent: verify the ghost image, map the file, Store::put_file (L1 = the file's own
//!               pages, no copy), queue the wait
//!        agent worker: Store::wait_safe L2.. ──AgentEvent::Safe{rank,version,level,holder}──► runtime
//!                                               (or AgentEvent::Failed{..,error})
//!        parity watcher: Store::parity_state ──AgentEvent::Safe{..,level: L3, holder}──► runtime
//! restart: Agent::fetch(rank, version) ──► the fastest valid copy (L1 here, L1/L2 on other
//!          nodes, L3 rebuild, L4 disk), checked against the store's crc32c and parsed as a
//!          ghost image
//! ```
//!
//! API (stable; the runtime builds on it):
//! - [`Agent::new`]`(store, config) -> Result<(Agent, Receiver<AgentEvent>)>`, or
//!   [`Agent::with_callback`]`(store, config, Fn(AgentEvent)) -> Result<Agent>` (refused when
//!   the store does not write [`AgentConfig::level`]).
//! - [`Agent::on_checkpointed`]`(rank, version, image_path, bytes) -> Result<PutReport>`
//!   (or [`Agent::on_checkpointed_in`] with the recovery's wiring epoch the rank's image
//!   runs in, carried by every event of that version so that krun drops the reports of a
//!   checkpoint a later recovery undid):
//!   returns once L1 holds the image (the rank may go on); the L1 event is sent before it
//!   returns, the slower levels up to [`AgentConfig::level`] are reported in order from a
//!   background thread, one [`AgentEvent::Safe`] each, or one [`AgentEvent::Failed`]. Each
//!   `Safe` names the node holding that copy (L1 this node, L2 the buddy it landed on, L3
//!   the parity holder). When the store writes parity and the agent waits for a faster
//!   level, L3 is reported too, once a complete parity set covers the version (a thread of
//!   its own: L3 waits for the other members of the set, and never holds up the levels a
//!   checkpoint waits for); a version no parity covers is not reported at L3.
//! - [`Agent::fetch`]`(rank, version) -> Result<Fetched>`; [`Agent::fetch_chain`] (an
//!   incremental image and its ancestors) and [`Agent::write_chain`] (as files a rank
//!   started with `KRUN_GHOST_RESTORE` resumes from).
//! - [`Agent::usage`], [`Agent::newest_safe`]`(rank)`: for `krun status`.
//! - [`Agent::node_down`]`(node, down)`: the agreed view lost (or got back) a store node.
//! - [`Agent::owner`]`(rank)`: the store owner name of a rank's images, `rank-<r>`.
//!
//! The image file stays where the rank wrote it: the store maps it and keeps the mapping
//! while the version is at L1 (unlinking or renaming the file is fine; rewriting it in place
//! is detected by the crc check and the next level is used; truncating it would fault the
//! reader). The native checkpointer recycles the files of versions older than its newest
//! full image (as spares it rewrites in place), so when a full image arrives the agent drops
//! the older versions of that rank from L1 (they stay at L2-L4). Errors name the rank and
//! the version.
use crate::error::{LauncherError, Result};
use ckpt_store::{GetReport, ImageBytes, Level, NewestSafe, ParityState, PutReport, Store, Usage};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How the agent waits.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The slowest level each checkpoint is waited for and reported at (default L2). Every
    /// level from L1 up to it is reported.
    pub level: Level,
    /// Bound on the wait for each level (default 120 s).
    pub timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            level: Level::L2,
            timeout: Duration::from_secs(120),
        }
    }
}

/// What the agent reports to the runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// `version` of `rank` (an image of `bytes` bytes) is safe at `level`, on node
    /// `holder` (L1: this node; L2: the buddy holding the copy; L3: the parity holder;
    /// `None` for L4, a disk directory).
    Safe {
        rank: u32,
        version: u64,
        level: Level,
        bytes: u64,
        holder: Option<usize>,
        /// The wiring epoch the rank's image ran in when it took the version.
        wiring: u64,
    },
    /// `version` of `rank` did not reach `level`; `error` says why (it is safe at the
    /// levels reported before).
    Failed {
        rank: u32,
        version: u64,
        level: Level,
        error: String,
        wiring: u64,
    },
}

impl std::fmt::Display for AgentEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEvent::Safe {
                rank,
                version,
                level,
                bytes,
                holder,
                ..
            } => {
                write!(
                    f,
                    "version {version} of rank {rank} safe at {level} ({bytes} bytes"
                )?;
                match holder {
                    Some(n) => write!(f, " on node {n})"),
                    None => write!(f, ")"),
                }
            }
            AgentEvent::Failed {
                rank,
                version,
                level,
                error,
                ..
            } => write!(
                f,
                "version {version} of rank {rank} not safe at {level}: {error}"
            ),
        }
    }
}

/// An image read back from the store.
pub struct Fetched {
    /// The image bytes (left in store memory where possible).
    pub image: ImageBytes,
    /// Where it was found.
    pub report: GetReport,
}

type Sink = Arc<dyn Fn(AgentEvent) + Send + Sync>;

struct Job {
    rank: u32,
    version: u64,
    bytes: u64,
    wiring: u64,
}

/// The node's checkpoint agent; owns the node's [`Store`].
pub struct Agent {
    store: Arc<Store>,
    config: AgentConfig,
    sink: Sink,
    jobs: Option<mpsc::Sender<Job>>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// Versions waiting for a complete parity set (`None`: L3 is not reported apart).
    parity_jobs: Option<mpsc::Sender<Job>>,
    parity_worker: Option<std::thread::JoinHandle<()>>,
    /// Set on drop: waits still queued end at once with a `Failed` event.
    stopping: Arc<AtomicBool>,
    /// Ranks whose images this agent stored.
    ranks: std::sync::Mutex<std::collections::BTreeSet<u32>>,
    /// (rank, version) -> the version its image is a delta of (0: a full image), for the
    /// images this agent stored: where a version's chain starts ([`Agent::keep_from`]).
    parents: std::sync::Mutex<std::collections::BTreeMap<(u32, u64), u64>>,
    /// (rank, version) -> the wiring epoch it was taken in, for the versions at L1 (their
    /// L2 is reported again when the buddy changes).
    wirings: std::sync::Mutex<std::collections::BTreeMap<(u32, u64), u64>>,
}

impl Agent {
    /// An agent whose events arrive on the returned channel.
    pub fn new(store: Store, config: AgentConfig) -> Result<(Agent, mpsc::Receiver<AgentEvent>)> {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let agent = Agent::with_callback(store, config, move |e| {
            // The runtime may have stopped listening; events are then dropped.
            let _ = tx.lock().expect("lock").send(e);
        })?;
        Ok((agent, rx))
    }

    /// An agent that calls `on_event` for every event (from the caller's thread for L1,
    /// from the agent's worker thread for the slower levels).
    pub fn with_callback(
        store: Store,
        config: AgentConfig,
        on_event: impl Fn(AgentEvent) + Send + Sync + 'static,
    ) -> Result<Agent> {
        if !store.levels().contains(&config.level) {
            return Err(LauncherError::Usage(format!(
                "the checkpoint agent waits for {}, but this store writes only {:?}",
                config.level,
                store.levels()
            )));
        }
        let store = Arc::new(store);
        let sink: Sink = Arc::new(on_event);
        let stopping = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = {
            let store = store.clone();
            let sink = sink.clone();
            let config = config.clone();
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name("krun-ckpt-agent".into())
                .spawn(move || {
                    for job in rx {
                        wait_levels(&store, &config, &sink, &stopping, &job);
                    }
                })
                .map_err(|e| LauncherError::Io {
                    context: "spawning the checkpoint agent thread".into(),
                    source: e,
                })?
        };
        // L3 on its own when the store writes parity and the agent waits for less.
        let (parity_jobs, parity_worker) =
            if store.levels().contains(&Level::L3) && config.level < Level::L3 {
                let (ptx, prx) = mpsc::channel::<Job>();
                let (store, sink, stopping) = (store.clone(), sink.clone(), stopping.clone());
                let timeout = config.timeout;
                let t = std::thread::Builder::new()
                    .name("krun-ckpt-parity".into())
                    .spawn(move || watch_parity(&store, &sink, &stopping, prx, timeout))
                    .map_err(|e| LauncherError::Io {
                        context: "spawning the checkpoint agent's parity thread".into(),
                        source: e,
                    })?;
                (Some(ptx), Some(t))
            } else {
                (None, None)
            };
        Ok(Agent {
            store,
            config,
            sink,
            jobs: Some(tx),
            worker: Some(worker),
            parity_jobs,
            parity_worker,
            stopping,
            ranks: Default::default(),
            parents: Default::default(),
            wirings: Default::default(),
        })
    }

    /// The store owner name of `rank`'s images.
    pub fn owner(rank: u32) -> String {
        format!("rank-{rank}")
    }

    /// The node's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// A rank wrote `version`'s image (`bytes` bytes) to `image`: checks it is a complete
    /// ghost image of that version, puts it into the store without copying it (L1 is the
    /// mapped file), reports L1 and queues the wait for the slower levels. Returns once L1
    /// holds it.
    pub fn on_checkpointed(
        &self,
        rank: u32,
        version: u64,
        image: &Path,
        bytes: u64,
    ) -> Result<PutReport> {
        self.on_checkpointed_in(rank, version, image, bytes, 0)
    }

    /// As [`Agent::on_checkpointed`], for a rank whose image runs in wiring epoch `wiring`
    /// (the recovery that started it; 0: the job's start): every event of this version
    /// carries it.
    pub fn on_checkpointed_in(
        &self,
        rank: u32,
        version: u64,
        image: &Path,
        bytes: u64,
        wiring: u64,
    ) -> Result<PutReport> {
        let fail = |what: String| LauncherError::Checkpoint {
            rank,
            version,
            what,
        };
        let parent = verify_image(image, version, bytes).map_err(fail)?;
        let owner = Agent::owner(rank);
        // SAFETY: the native checkpointer writes an image under a temporary name and renames
        // it into place; it rewrites a committed file only after recycling it as a spare,
        // which it does to versions older than its newest full image, and those leave L1
        // below as soon as that full image arrives here.
        let report = unsafe { self.store.put_file(&owner, version, image) }
            .map_err(|e| fail(format!("storing {}: {e}", image.display())))?;
        self.ranks.lock().expect("lock").insert(rank);
        self.parents
            .lock()
            .expect("lock")
            .insert((rank, version), parent);
        {
            let at_l1 = self.store.l1_versions(&owner);
            let mut w = self.wirings.lock().expect("lock");
            w.retain(|&(r, v), _| r != rank || at_l1.contains(&v));
            w.insert((rank, version), wiring);
        }
        if parent == 0 {
            // A full image: the native checkpointer now recycles the files of older versions
            // (rewriting them in place for their memory), so the store stops mapping them.
            // They stay at the slower levels; under retention by line, a version a recovery
            // line may still need also stays at L1, copied out of its file (its L2 copy may
            // go with a failed buddy, and the line may lie far back).
            let floor = self.store.floor(&owner);
            for old in self
                .store
                .l1_versions(&owner)
                .into_iter()
                .filter(|&v| v < version)
            {
                if floor.is_some_and(|f| old >= f) {
                    match self.store.keep_local_copy(&owner, old) {
                        Ok(_) => continue,
                        Err(e) => eprintln!("krund: rank {rank} v{old}: {e}"),
                    }
                }
                self.store.forget_local(&owner, old);
            }
        }
        (self.sink)(AgentEvent::Safe {
            rank,
            version,
            level: Level::L1,
            bytes: report.bytes,
            holder: Some(self.store.node()),
            wiring,
        });
        if let Some(parity) = &self.parity_jobs {
            // The watcher ends only with the agent: a send cannot fail before.
            let _ = parity.send(Job {
                rank,
                version,
                bytes: report.bytes,
                wiring,
            });
        }
        if self.config.level > Level::L1 {
            let job = Job {
                rank,
                version,
                bytes: report.bytes,
                wiring,
            };
            if let Some(jobs) = &self.jobs {
                jobs.send(job)
                    .map_err(|_| fail("the agent's worker thread has stopped".into()))?;
            }
        }
        Ok(report)
    }

    /// The fastest valid copy of `rank`'s `version` (for a restart): from this node's L1, any
    /// node's L1 or L2 memory, an L3 rebuild or L4 disk. The bytes match the store's crc32c
    /// and parse as a ghost image of that version.
    pub fn fetch(&self, rank: u32, version: u64) -> Result<Fetched> {
        let fail = |what: String| LauncherError::Checkpoint {
            rank,
            version,
            what,
        };
        let (image, report) = self
            .store
            .get_bytes(&Agent::owner(rank), version)
            .map_err(|e| fail(format!("fetching from the store: {e}")))?;
        let parsed = ghost::image::Image::parse(&image).map_err(|e| {
            fail(format!(
                "the {} copy on node {} is not a valid ghost image: {e}",
                report.level, report.node
            ))
        })?;
        if parsed.image_id != version {
            return Err(fail(format!(
                "the {} copy on node {} holds image v{}",
                report.level, report.node, parsed.image_id
            )));
        }
        Ok(Fetched { image, report })
    }

    /// The membership reports `node` gone (`down`) or back: fetches skip it and read its
    /// ranks' images from their buddies, parity or disk without waiting for it to time out.
    /// When it was this node's buddy, the store sends the versions it holds at L1 to the
    /// next buddy, and the agent reports them safe at L2 again as they land.
    pub fn node_down(&self, node: usize, down: bool) -> Result<()> {
        let before = self.store.buddy();
        self.store
            .set_down(node, down)
            .map_err(|e| LauncherError::Node {
                node,
                message: e.to_string(),
            })?;
        let rebuddied = down && node == before && self.store.buddy() != before;
        if rebuddied && self.config.level > Level::L1 {
            let ranks: Vec<u32> = self.ranks.lock().expect("lock").iter().copied().collect();
            for rank in ranks {
                let owner = Agent::owner(rank);
                for version in self.store.l1_versions(&owner) {
                    let bytes = self.store.stored_len(&owner, version).unwrap_or(0) as u64;
                    let wiring = self
                        .wirings
                        .lock()
                        .expect("lock")
                        .get(&(rank, version))
                        .copied()
                        .unwrap_or(0);
                    if let Some(jobs) = &self.jobs {
                        let _ = jobs.send(Job {
                            rank,
                            version,
                            bytes,
                            wiring,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// No recovery line needs `rank`'s versions older than `version` any more (the
    /// policy's `KeepFrom`): the store may drop those older than the start of `version`'s
    /// incremental chain (its oldest ancestor, a full image), which a restart of `version`
    /// still reads. Returns the floor set; `None` when this agent did not store the whole
    /// chain (another node did, before a restart): the floor then stays where it was, so
    /// nothing a line may need goes.
    pub fn keep_from(&self, rank: u32, version: u64) -> Option<u64> {
        let start = {
            let parents = self.parents.lock().expect("lock");
            let mut at = version;
            loop {
                match parents.get(&(rank, at)) {
                    Some(0) => break at,
                    Some(&p) if p < at => at = p,
                    _ => return None,
                }
            }
        };
        self.store.keep_from(&Agent::owner(rank), start);
        self.parents
            .lock()
            .expect("lock")
            .retain(|&(r, v), _| r != rank || v >= start);
        Some(start)
    }

    /// `version` of `rank` and its ancestors down to a full image, newest first: what a
    /// restart of an incremental native image needs. Each is fetched as by [`Agent::fetch`].
    pub fn fetch_chain(&self, rank: u32, version: u64) -> Result<Vec<Fetched>> {
        let mut chain: Vec<Fetched> = Vec::new();
        let mut next = version;
        loop {
            let fetched = self.fetch(rank, next).map_err(|e| match chain.last() {
                None => e,
                Some(_) => LauncherError::Checkpoint {
                    rank,
                    version,
                    what: format!("its ancestor v{next} is missing: {e}"),
                },
            })?;
            let parent = ghost::image::Image::parse(&fetched.image)
                .map(|i| i.parent_id)
                .unwrap_or(0);
            chain.push(fetched);
            if parent == 0 {
                return Ok(chain);
            }
            if parent >= next || chain.len() > 100_000 {
                return Err(LauncherError::Checkpoint {
                    rank,
                    version,
                    what: format!("image v{next} names parent v{parent}: not an older image"),
                });
            }
            next = parent;
        }
    }

    /// Writes the chain of `version` of `rank` ([`Agent::fetch_chain`]) as image files under
    /// `dir` for the ghost checkpoint owner `ghost_owner`, so a rank started with
    /// `KRUN_GHOST_DIR=dir KRUN_GHOST_OWNER=ghost_owner KRUN_GHOST_RESTORE=version` resumes
    /// from it. Returns the files written, newest first.
    pub fn write_chain(
        &self,
        rank: u32,
        version: u64,
        dir: &Path,
        ghost_owner: &str,
    ) -> Result<Vec<std::path::PathBuf>> {
        let owner = Agent::owner(rank);
        let fail = |what: String| LauncherError::Checkpoint {
            rank,
            version,
            what,
        };
        let mut written: Vec<std::path::PathBuf> = Vec::new();
        let mut next = version;
        loop {
            let path = ghost::native::image_path(dir, ghost_owner, next);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    fail(format!(
                        "creating {} for the restart: {e}",
                        parent.display()
                    ))
                })?;
            }
            // Straight into the image file (the RMA reads land in its pages, the store's
            // crc32c checked there): no copy through a buffer, and the restarted process
            // verifies every section when it loads the file.
            let report = self.store.get_to_file(&owner, next, &path).map_err(|e| {
                fail(match written.is_empty() {
                    true => format!("fetching from the store: {e}"),
                    false => format!("its ancestor v{next} is missing: {e}"),
                })
            })?;
            let header = read_header(&path).map_err(|e| {
                let _ = std::fs::remove_file(&path);
                fail(format!(
                    "the {} copy of v{next} on node {} is not a valid ghost image: {e}",
                    report.level, report.node
                ))
            })?;
            if header.image_id != next {
                let _ = std::fs::remove_file(&path);
                return Err(fail(format!(
                    "the {} copy on node {} holds image v{}",
                    report.level, report.node, header.image_id
                )));
            }
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            // Which level served the restart: L3 means rebuilt from parity (the node and
            // its buddy were both lost).
            eprintln!(
                "krund: rank {rank}: image v{next} ({bytes} bytes) from {} on node {}{}",
                report.level,
                report.node,
                if report.level == Level::L3 {
                    " (rebuilt from parity)"
                } else {
                    ""
                }
            );
            written.push(path);
            let parent = header.parent_id;
            if parent == 0 {
                return Ok(written);
            }
            if parent >= next || written.len() > 100_000 {
                return Err(fail(format!(
                    "image v{next} names parent v{parent}: not an older image"
                )));
            }
            next = parent;
        }
    }

    /// Bytes the node's store holds per level.
    pub fn usage(&self) -> Usage {
        self.store.usage()
    }

    /// The newest version of `rank` safe at each level, as this node knows it.
    pub fn newest_safe(&self, rank: u32) -> NewestSafe {
        self.store.newest_safe(&Agent::owner(rank))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Waits still pending end within a slice and report "agent stopped".
        self.stopping.store(true, Ordering::SeqCst);
        self.jobs.take();
        self.parity_jobs.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        if let Some(w) = self.parity_worker.take() {
            let _ = w.join();
        }
    }
}

/// Waits for each level above L1 up to the configured one that the store writes, reporting
/// each; gives up when the agent is dropped.
fn wait_levels(store: &Store, config: &AgentConfig, sink: &Sink, stopping: &AtomicBool, job: &Job) {
    let owner = Agent::owner(job.rank);
    let levels = store.levels();
    for level in levels
        .into_iter()
        .filter(|&l| l > Level::L1 && l <= config.level)
    {
        let start = std::time::Instant::now();
        let result = loop {
            if stopping.load(Ordering::SeqCst) {
                break Err("the checkpoint agent stopped".to_string());
            }
            let left = config.timeout.saturating_sub(start.elapsed());
            match store.wait_safe(
                &owner,
                job.version,
                level,
                left.min(Duration::from_millis(500)),
            ) {
                Ok(()) => break Ok(()),
                Err(_) if !left.is_zero() && store.flush_error(&owner, job.version).is_none() => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        match result {
            Ok(()) => sink(AgentEvent::Safe {
                rank: job.rank,
                version: job.version,
                level,
                bytes: job.bytes,
                holder: store.copy_holder(&owner, job.version, level),
                wiring: job.wiring,
            }),
            Err(error) => {
                sink(AgentEvent::Failed {
                    rank: job.rank,
                    version: job.version,
                    level,
                    error,
                    wiring: job.wiring,
                });
                return;
            }
        }
    }
}

/// Reports L3 for each version queued once a complete parity set covers it (polled, so that
/// a set that waits for a slow member holds up no other version); a version no parity covers,
/// whose parity failed, or still waiting after `timeout`, is dropped without a report (L3 is
/// not the level the checkpoints wait for; the store logs its failures). Ends with the agent.
fn watch_parity(
    store: &Store,
    sink: &Sink,
    stopping: &AtomicBool,
    jobs: mpsc::Receiver<Job>,
    timeout: Duration,
) {
    let mut pending: Vec<(Job, std::time::Instant)> = Vec::new();
    let mut open = true;
    while !stopping.load(Ordering::SeqCst) && (open || !pending.is_empty()) {
        if open {
            match jobs.recv_timeout(Duration::from_millis(50)) {
                Ok(j) => pending.push((j, std::time::Instant::now())),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
            while let Ok(j) = jobs.try_recv() {
                pending.push((j, std::time::Instant::now()));
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
        pending.retain(|(job, since)| {
            let owner = Agent::owner(job.rank);
            match store.parity_state(&owner, job.version) {
                ParityState::Waiting => since.elapsed() < timeout,
                ParityState::Skipped | ParityState::Failed(_) => false,
                ParityState::Safe { holder } => {
                    sink(AgentEvent::Safe {
                        rank: job.rank,
                        version: job.version,
                        level: Level::L3,
                        bytes: job.bytes,
                        holder: Some(holder),
                        wiring: job.wiring,
                    });
                    false
                }
            }
        });
    }
}

/// Checks that `path` holds a complete, uncorrupted ghost image of `version` of `bytes`
/// bytes and returns its parent version (0 for a full image); the error says what is wrong
/// with which file.
fn verify_image(path: &Path, version: u64, bytes: u64) -> std::result::Result<u64, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("image {}: {e}", path.display()))?
        .len();
    if size != bytes {
        return Err(format!(
            "image {} holds {size} bytes, the rank reported {bytes}",
            path.display()
        ));
    }
    let mapped = ghost::native::MappedFile::open(path)
        .map_err(|e| format!("image {}: {e}", path.display()))?;
    let image = ghost::image::Image::parse(&mapped)
        .map_err(|e| format!("image {} is corrupt: {e}", path.display()))?;
    if image.image_id != version {
        return Err(format!(
            "image {} is version {}, not {version}",
            path.display(),
            image.image_id
        ));
    }
    Ok(image.parent_id)
}

/// The header of the image file at `path` (its first bytes only).
fn read_header(path: &Path) -> std::result::Result<ghost::image::Header, String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(ghost::image::HEADER_LEN);
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(ghost::image::HEADER_LEN as u64)
                .read_to_end(&mut head)
        })
        .map_err(|e| e.to_string())?;
    ghost::image::Header::parse(&head).map_err(|e| e.to_string())
}
