//! The rank's calls for message logging: turning it on, the snapshot of a checkpoint and
//! its acknowledgement, a peer's replacement, the start of a rejoin.
use std::sync::Arc;
use std::time::Instant;

use fabric::{Endpoint, EndpointAddress, Region, RemoteRegion};

use super::{
    buddy_of, Ctrl, Determinant, LogStats, Logger, Rejoining, SnapshotRef, DEFAULT_RING, DET_BYTES,
    T_SNAPSHOT,
};
use crate::error::{RankError, Result};
use crate::world::{Config, Rank};

impl Rank {
    /// Collective: turns on sender-based pessimistic logging (see the module doc). `ring`:
    /// determinants the buddy keeps for this rank (0: [`DEFAULT_RING`]).
    pub fn enable_logging(&self, ring: usize) -> Result<()> {
        let ring_len = if ring == 0 { DEFAULT_RING } else { ring };
        let local = self.register(ring_len * DET_BYTES)?;
        let logger = Logger::new(
            self.rank(),
            self.size(),
            local.clone(),
            ring_len,
            self.ep.as_ref(),
        )?;
        let rings = self.allgather(&local.remote().to_bytes())?;
        let buddy = buddy_of(self.rank(), self.size());
        let remote = RemoteRegion::from_bytes(&rings[buddy])?;
        *logger.buddy.write().expect("buddy lock") = (buddy, remote);
        // Nobody delivers before everyone logs.
        self.barrier()?;
        // What was delivered before is below the log's prefix.
        logger.inner.lock().expect("log lock").prefix = self.msgs.delivered_counts();
        let logger = Arc::new(logger);
        self.msgs.set_logger(Some(logger.clone()));
        self.barrier()?;
        // The counters where the logging starts (after the barrier: its messages are the
        // last of the set-up), kept by the buddy: a rank lost before its first own
        // checkpoint re-executes from its start and asks its buddy for them.
        let start: Vec<(u64, u64)> = self
            .msgs
            .send_counters()
            .into_iter()
            .zip(self.msgs.delivered_counts())
            .collect();
        logger.inner.lock().expect("log lock").start = start.clone();
        if buddy != self.rank() {
            self.msgs.control(
                buddy,
                &postcard::to_stdvec(&Ctrl::KeepStart { marks: start }).unwrap_or_default(),
            )?;
        }
        Ok(())
    }

    fn logger(&self) -> Result<Arc<Logger>> {
        self.msgs.logger().ok_or_else(|| {
            RankError::InvalidArgument(
                "message logging is not enabled (Rank::enable_logging)".into(),
            )
        })
    }

    /// This rank's checkpoint `version` is being taken: returns the log snapshot to keep
    /// with it (counters, and the payloads this rank holds as a sender). Call where the
    /// application's state is captured, with no receive or send in between.
    pub fn log_mark_checkpoint(&self, version: u64) -> Result<Vec<u8>> {
        let lg = self.logger()?;
        // The image's state follows every delivery so far: their determinants first.
        lg.flush(&self.msgs)?;
        let t0 = Instant::now();
        let send_seq = self.msgs.send_counters();
        let mut g = lg.inner.lock().expect("log lock");
        g.interval = version;
        let mark = (g.prefix.clone(), g.order);
        g.marks.insert(version, mark);
        // Encoded from the log in place (the same bytes as a [`Snapshot`]): the payloads are
        // not copied twice.
        let snap = SnapshotRef {
            send_seq,
            prefix: g.prefix.clone(),
            extra: g
                .extra
                .iter()
                .map(|s| s.iter().copied().collect())
                .collect(),
            order: g.order,
            interval: version,
            sent: g
                .sent
                .iter()
                .map(|((d, s), (t, p))| (*d as u32, *s, *t, p.as_slice()))
                .collect(),
            safepoints: crate::uncoordinated::safepoint_index(),
            start: g.start.clone(),
            ward_start: g.ward_start.clone(),
        };
        let out = postcard::to_stdvec(&snap).map_err(|e| RankError::InvalidArgument(e.to_string()));
        drop(g);
        lg.time_since(T_SNAPSHOT, t0);
        out
    }

    /// This rank's checkpoint `version` is safe (the policy's `TrimLog`): its senders drop
    /// what it delivered before it, and older determinants may be overwritten.
    pub fn log_checkpoint_safe(&self, version: u64) -> Result<()> {
        for (src, upto) in self.log_trim_local(version)? {
            self.send_log_ack(src, upto);
        }
        Ok(())
    }

    /// The local half of [`Rank::log_checkpoint_safe`]: forgets the marks and determinants
    /// below checkpoint `version` and returns the acknowledgements to send, (sender, upto).
    pub(crate) fn log_trim_local(&self, version: u64) -> Result<Vec<(usize, u64)>> {
        let lg = self.logger()?;
        let prefix = {
            let mut g = lg.inner.lock().expect("log lock");
            let Some(mark) = g.marks.get(&version).cloned() else {
                return Err(RankError::InvalidArgument(format!(
                    "message log: checkpoint {version} was never marked"
                )));
            };
            g.marks = g.marks.split_off(&(version + 1));
            g.safe_order = g.safe_order.max(mark.1);
            let drop_upto = mark.1;
            while g.recent.front().is_some_and(|d| d.order < drop_upto) {
                g.recent.pop_front();
            }
            mark.0
        };
        Ok(prefix
            .into_iter()
            .enumerate()
            .filter(|&(src, upto)| src != self.rank() && upto > 0)
            .collect())
    }

    /// Tells `src` that this rank's safe checkpoint covers its messages below `upto`. A
    /// sender that is gone keeps its checkpointed log; it is trimmed by the next
    /// acknowledgement after it rejoins.
    pub(crate) fn send_log_ack(&self, src: usize, upto: u64) {
        let ctrl = postcard::to_stdvec(&Ctrl::Ack { upto }).unwrap_or_default();
        let _ = self.msgs.control(src, &ctrl);
    }

    /// This rank's fabric address and the ring it holds for its ward: what a restarted rank
    /// needs of it to [`Rejoining::join`].
    pub fn rejoin_card(&self) -> Result<(Vec<u8>, Vec<u8>)> {
        let lg = self.logger()?;
        Ok((
            self.ep.address().to_bytes(),
            lg.ring_local.remote().to_bytes().to_vec(),
        ))
    }

    /// Deliveries still to take in the recorded order (after a rejoin; 0 otherwise).
    pub fn log_replay_pending(&self) -> usize {
        self.msgs
            .logger()
            .map_or(0, |l| l.inner.lock().expect("log lock").replay.len())
    }

    /// Test hook: while `on`, this rank's determinants are not written to its buddy until
    /// something needs them durable (a send to a rank on this node, a checkpoint, the end
    /// of logging): a buddy write that has not landed when the rank is lost.
    #[doc(hidden)]
    pub fn log_test_hold_back(&self, on: bool) -> Result<()> {
        self.logger()?.dets.lock().expect("dets lock").hold_back = on;
        Ok(())
    }

    /// Test hook: ranks per node as the log sees them (normally `KRUN_LOCAL_SIZE`), which
    /// decides which sends wait for durability (same node) and which piggyback.
    #[doc(hidden)]
    pub fn log_test_node_size(&self, ranks_per_node: usize) -> Result<()> {
        if ranks_per_node == 0 {
            return Err(RankError::InvalidArgument(
                "log_test_node_size: a node holds at least one rank".into(),
            ));
        }
        self.logger()?
            .node_size
            .store(ranks_per_node, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Lazy determinant writes: a delivery's determinant waits for a batch of them, up to
    /// `max_wait` (zero: written at each delivery, the default; `KRUN_LOG_LAZY=1` sets
    /// 500 us). Sends to other nodes carry what is not durable meanwhile; a send to this
    /// node, a checkpoint or the end of logging writes and waits at once.
    pub fn log_lazy_writes(&self, max_wait: std::time::Duration) -> Result<()> {
        self.logger()?.lazy_ns.store(
            max_wait.as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// The log's totals (`None` without logging).
    pub fn log_stats(&self) -> Option<LogStats> {
        self.msgs.any_logger().map(|l| l.stats())
    }

    /// Rank `rank` restarted as a new process with `address` and `ring` (see
    /// [`Rejoining`]): messages go there from now on; if it is this rank's buddy, the
    /// determinants since the newest safe checkpoint are written into its new ring.
    pub fn replace_peer(&self, rank: usize, address: &[u8], ring: &[u8]) -> Result<()> {
        self.msgs.check_rank(rank as i64)?;
        let peer = self.ep.connect(&EndpointAddress::from_bytes(address)?)?;
        let ring = RemoteRegion::from_bytes(ring)?;
        let old = self.msgs.peer(rank);
        let logger = self.msgs.logger();
        // The peer and, when it is this rank's buddy, its ring change together: a
        // determinant write reads both under the buddy lock ([`Logger::write_det`]), so it
        // never writes the new process with the old ring's key.
        let rewrite = match &logger {
            Some(lg) => {
                let mut b = lg.buddy.write().expect("buddy lock");
                self.msgs.replace_peer(rank, peer);
                if b.0 == rank {
                    b.1 = ring;
                }
                b.0 == rank
            }
            None => {
                self.msgs.replace_peer(rank, peer);
                false
            }
        };
        // The old process is gone: what is still in flight to it (a determinant write when
        // it was this rank's buddy, a send) fails now, and is retried towards the new one,
        // instead of waiting out the operation timeout (10 s: a delivery held the
        // determinant stage that long and the rewrite below waited for it, so rejoins took
        // 10-30 s in `bench policies`).
        if old != peer {
            self.ep
                .peer_failed(old, &format!("rank {rank} was restarted in a new process"));
        }
        if let Some(lg) = &logger {
            // Its new process holds none of this rank's piggybacked determinants. After
            // `peer_failed`: a send of this rank may hold the determinants' lock while it
            // waits for a write to the old process, which fails only now.
            lg.forget_piggybacks_to(rank);
        }
        if let (Some(lg), true) = (logger, rewrite) {
            let (recent, start): (Vec<Determinant>, Vec<(u64, u64)>) = {
                let g = lg.inner.lock().expect("log lock");
                (g.recent.iter().copied().collect(), g.start.clone())
            };
            // The new process keeps this rank's start counters again.
            if !start.is_empty() {
                self.msgs.control(
                    rank,
                    &postcard::to_stdvec(&Ctrl::KeepStart { marks: start }).unwrap_or_default(),
                )?;
            }
            for d in &recent {
                lg.write_det(&self.msgs, d)?;
            }
        }
        Ok(())
    }

    /// A lost rank's new process: opens its endpoint and the ring it will hold for its ward
    /// (`ring`: as given to [`Rank::enable_logging`]); [`Rejoining::join`] then rejoins.
    pub fn rejoin_open(config: Config, ring: usize) -> Result<Rejoining> {
        let ring_len = if ring == 0 { DEFAULT_RING } else { ring };
        let ep: Arc<dyn Endpoint> = Arc::from(fabric::open(&config.fabric)?);
        let ring = ep.register(Region::new(ring_len * DET_BYTES)?)?;
        Ok(Rejoining {
            config,
            ep,
            ring,
            ring_len,
        })
    }
}
