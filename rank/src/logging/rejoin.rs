//! A lost rank's new process rejoining the running ranks (the protocol's **Restart**, see
//! the parent module).
use std::sync::Arc;
use std::time::Instant;

use fabric::{Endpoint, EndpointAddress, MemoryRegion, Region, RemoteRegion};

use super::{buddy_of, Ctrl, Determinant, Logger, Snapshot, DET_BYTES, INFO_TIMEOUT};
use crate::error::{RankError, Result};
use crate::messages::Messages;
use crate::world::{Config, Rank};

/// A restarted rank between opening its endpoint and rejoining the job.
pub struct Rejoining {
    pub(super) config: Config,
    pub(super) ep: Arc<dyn Endpoint>,
    pub(super) ring: MemoryRegion,
    pub(super) ring_len: usize,
}

impl Rejoining {
    /// This process's fabric address: every survivor passes it to [`Rank::replace_peer`].
    pub fn address(&self) -> Vec<u8> {
        self.ep.address().to_bytes()
    }

    /// The ring this process holds for its ward, for [`Rank::replace_peer`].
    pub fn ring(&self) -> Vec<u8> {
        self.ring.remote().to_bytes().to_vec()
    }

    /// Rejoins the job once every survivor replaced this rank's address: `peers[r]` is rank
    /// r's (address, ring) (this rank's own entry is ignored); `snapshot` is what
    /// [`Rank::log_mark_checkpoint`] returned at the checkpoint the application restored.
    /// Reads the determinants back from the buddy, asks every survivor to resend, and returns
    /// once every survivor said what it holds: the rank then re-executes from the
    /// checkpoint, its receives following the recorded order.
    pub fn join(self, peers: &[(Vec<u8>, Vec<u8>)], snapshot: &[u8]) -> Result<Arc<Rank>> {
        self.join_with(peers, Some(snapshot), None, None)
    }

    /// As [`Rejoining::join`], for a restarted rank of a krun job: the rank keeps the
    /// checkpointer that restored it (`ckpt`) and its node link (`crate::uncoordinated`).
    /// `snapshot: None`: the rank was lost before its first own checkpoint and re-executes
    /// from its start; its counters where the logging started come from its peers
    /// ([`Ctrl::StartQuery`]) and every delivery since is replayed.
    pub(crate) fn join_with(
        self,
        peers: &[(Vec<u8>, Vec<u8>)],
        snapshot: Option<&[u8]>,
        ckpt: Option<crate::checkpoint::Checkpoints>,
        node: Option<crate::node_link::NodeLink>,
    ) -> Result<Arc<Rank>> {
        let (rank, size) = (self.config.rank, self.config.size);
        let ring_len = self.ring_len;
        if peers.len() != size {
            return Err(RankError::InvalidArgument(format!(
                "rejoin: {} peer addresses for a job of {size}",
                peers.len()
            )));
        }
        let mut ids = Vec::with_capacity(size);
        for (r, (addr, _)) in peers.iter().enumerate() {
            let a = if r == rank {
                self.ep.address()
            } else {
                EndpointAddress::from_bytes(addr)?
            };
            ids.push(self.ep.connect(&a)?);
        }
        let msgs = Messages::new(self.ep.clone(), rank, ids, self.config.fabric.max_message);
        let logger = Logger::new(
            rank,
            size,
            self.ring.clone(),
            self.ring_len,
            self.ep.as_ref(),
        )?;
        let buddy = buddy_of(rank, size);
        let remote = RemoteRegion::from_bytes(&peers[buddy].1)?;
        *logger.buddy.write().expect("buddy lock") = (buddy, remote);
        let logger = Arc::new(logger);
        let from_start = snapshot.is_none();
        let snap: Snapshot = match snapshot {
            Some(bytes) => postcard::from_bytes(bytes).map_err(|e| {
                RankError::InvalidArgument(format!("rejoin: the log snapshot does not decode: {e}"))
            })?,
            None => start_snapshot(&msgs, &logger, rank, size)?,
        };
        if snap.send_seq.len() != size || snap.prefix.len() != size || snap.extra.len() != size {
            return Err(RankError::InvalidArgument(format!(
                "rejoin: the log snapshot is for a job of {} ranks, not {size}",
                snap.send_seq.len()
            )));
        }
        msgs.restore_counters(&snap.send_seq, &snap.prefix, &snap.extra);
        // Data that came while the counters were asked for, read against the right ones.
        msgs.place_held();
        crate::uncoordinated::set_safepoint_index(snap.safepoints);
        {
            let mut g = logger.inner.lock().expect("log lock");
            g.prefix = snap.prefix.clone();
            g.extra = snap
                .extra
                .iter()
                .map(|v| v.iter().copied().collect())
                .collect();
            g.order = snap.order;
            g.safe_order = snap.order;
            g.interval = snap.interval;
            g.start = snap.start.clone();
            g.ward_start = snap.ward_start.clone();
            g.sent = snap
                .sent
                .iter()
                .map(|(d, s, t, p)| ((*d as usize, *s), (*t, p.clone())))
                .collect();
        }
        // The determinants after the checkpoint, from the buddy's ring (merged below with
        // those the survivors held for this rank).
        let mut ring_dets = std::collections::BTreeMap::new();
        if buddy != rank {
            let len = ring_len * DET_BYTES;
            let buf = self.ep.register(Region::new(len)?)?;
            // SAFETY: `buf` is this call's own registered memory; the ring is written only
            // by this rank, which is not running.
            unsafe {
                self.ep
                    .read(ids_peer(&msgs, buddy), &buf, 0, len, &remote, 0)?
            };
            let mut bytes = vec![0u8; len];
            buf.read_bytes(0, &mut bytes)?;
            let ring = ring_len as u64;
            for order in snap.order..snap.order + ring {
                let at = (order % ring) as usize * DET_BYTES;
                match Determinant::decode(&bytes[at..at + DET_BYTES]) {
                    Some(d) if d.order == order => {
                        ring_dets.insert(order, d);
                    }
                    _ => {}
                }
            }
        }
        msgs.set_logger(Some(logger.clone()));
        let this = Rank::assemble(self.config, self.ep, msgs, ckpt, node)?;
        // Every survivor resends what this rank had not delivered, and says what it holds
        // (with this rank's determinants that came to it piggybacked).
        for r in (0..size).filter(|&r| r != rank) {
            let ctrl = Ctrl::Resume {
                prefix: snap.prefix[r],
                extra: snap.extra[r].clone(),
            };
            this.msgs
                .control(r, &postcard::to_stdvec(&ctrl).unwrap_or_default())?;
        }
        let deadline = Instant::now() + INFO_TIMEOUT;
        loop {
            {
                let g = logger.inner.lock().expect("log lock");
                let missing: Vec<usize> = (0..size)
                    .filter(|&r| r != rank && g.info[r].is_none())
                    .collect();
                if missing.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(RankError::Protocol {
                        rank: missing[0],
                        reason: format!(
                            "rejoin: ranks {missing:?} did not answer within {INFO_TIMEOUT:?}"
                        ),
                    });
                }
            }
            this.msgs.poll()?;
        }
        // The recorded order: the gap-free run of orders from the checkpoint's, from the
        // ring or the survivors (a survivor's copy wins: the ring may hold an older
        // process's entry where this process's write never landed).
        let mut rewrite = Vec::new();
        {
            let mut g = logger.inner.lock().expect("log lock");
            let from_peers = std::mem::take(&mut g.from_peers);
            let mut order = snap.order;
            loop {
                let d = match (from_peers.get(&order), ring_dets.get(&order)) {
                    (Some(p), r) => {
                        if r != Some(p) {
                            rewrite.push(*p);
                            g.from_peers_used += 1;
                        }
                        *p
                    }
                    (None, Some(r)) => *r,
                    (None, None) => break,
                };
                if from_start
                    && g.replay.is_empty()
                    && d.seq < snap.prefix.get(d.src as usize).copied().unwrap_or(0)
                {
                    // From the start: the set-up's own deliveries (the barrier that turned
                    // logging on) come first and are not the application's to take again.
                    g.recent.push_back(d);
                    order += 1;
                    g.order = order;
                    g.safe_order = order;
                } else {
                    g.replay.push_back((d.src as usize, d.seq));
                    g.recent.push_back(d);
                    order += 1;
                }
                if order - snap.order >= ring_len as u64 {
                    break;
                }
            }
        }
        // What only the survivors had goes to the buddy's ring: durable for a next loss.
        for d in &rewrite {
            logger.write_det_retrying(&this.msgs, d)?;
        }
        Ok(this)
    }
}

/// The log snapshot of a rank rejoining from its start: its counters where the logging
/// started, as its buddy kept them (`KeepStart`, asked back with `StartQuery`), no payload,
/// determinant order 0. Data from the peers is held unplaced meanwhile
/// ([`Messages::hold_data`]).
fn start_snapshot(
    msgs: &Messages,
    logger: &Arc<Logger>,
    rank: usize,
    size: usize,
) -> Result<Snapshot> {
    let buddy = buddy_of(rank, size);
    if buddy == rank {
        return Err(RankError::InvalidArgument(
            "rejoin from the start: a job of one rank has nobody to rejoin".into(),
        ));
    }
    msgs.hold_data();
    msgs.set_logger(Some(logger.clone()));
    msgs.control(
        buddy,
        &postcard::to_stdvec(&Ctrl::StartQuery).unwrap_or_default(),
    )?;
    let deadline = Instant::now() + INFO_TIMEOUT;
    let marks = loop {
        if let Some(m) = logger.inner.lock().expect("log lock").start_marks.clone() {
            break m;
        }
        if Instant::now() >= deadline {
            return Err(RankError::Protocol {
                rank: buddy,
                reason: format!(
                    "rejoin from the start: the buddy did not say where the logging started \
                     within {INFO_TIMEOUT:?}"
                ),
            });
        }
        msgs.poll()?;
    };
    let Some(start) = marks.filter(|m| m.len() == size) else {
        return Err(RankError::Protocol {
            rank: buddy,
            reason: format!(
                "rejoin from the start: the buddy kept no counters of rank {rank}'s logging \
                 start for a job of {size}"
            ),
        });
    };
    Ok(Snapshot {
        send_seq: start.iter().map(|m| m.0).collect(),
        prefix: start.iter().map(|m| m.1).collect(),
        extra: vec![Vec::new(); size],
        order: 0,
        interval: 0,
        sent: Vec::new(),
        safepoints: 0,
        start,
        ward_start: None,
    })
}

fn ids_peer(msgs: &Messages, r: usize) -> fabric::PeerId {
    msgs.peer(r)
}
