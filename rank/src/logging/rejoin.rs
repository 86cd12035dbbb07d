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
        self.join_with(peers, snapshot, None, None)
    }

    /// As [`Rejoining::join`], for a restarted rank of a krun job: the rank keeps the
    /// checkpointer that restored it (`ckpt`) and its node link (`crate::uncoordinated`).
    pub(crate) fn join_with(
        self,
        peers: &[(Vec<u8>, Vec<u8>)],
        snapshot: &[u8],
        ckpt: Option<crate::checkpoint::Checkpoints>,
        node: Option<crate::node_link::NodeLink>,
    ) -> Result<Arc<Rank>> {
        let (rank, size) = (self.config.rank, self.config.size);
        if peers.len() != size {
            return Err(RankError::InvalidArgument(format!(
                "rejoin: {} peer addresses for a job of {size}",
                peers.len()
            )));
        }
        let snap: Snapshot = postcard::from_bytes(snapshot).map_err(|e| {
            RankError::InvalidArgument(format!("rejoin: the log snapshot does not decode: {e}"))
        })?;
        if snap.send_seq.len() != size || snap.prefix.len() != size || snap.extra.len() != size {
            return Err(RankError::InvalidArgument(format!(
                "rejoin: the log snapshot is for a job of {} ranks, not {size}",
                snap.send_seq.len()
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
        msgs.restore_counters(&snap.send_seq, &snap.prefix, &snap.extra);
        crate::uncoordinated::set_safepoint_index(snap.safepoints);
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
            g.sent = snap
                .sent
                .iter()
                .map(|(d, s, t, p)| ((*d as usize, *s), (*t, p.clone())))
                .collect();
        }
        // The determinants after the checkpoint, from the buddy's ring.
        if buddy != rank {
            let len = self.ring_len * DET_BYTES;
            let buf = self.ep.register(Region::new(len)?)?;
            // SAFETY: `buf` is this call's own registered memory; the ring is written only
            // by this rank, which is not running.
            unsafe {
                self.ep
                    .read(ids_peer(&msgs, buddy), &buf, 0, len, &remote, 0)?
            };
            let mut bytes = vec![0u8; len];
            buf.read_bytes(0, &mut bytes)?;
            let mut g = logger.inner.lock().expect("log lock");
            let mut order = snap.order;
            loop {
                let at = (order % self.ring_len as u64) as usize * DET_BYTES;
                match Determinant::decode(&bytes[at..at + DET_BYTES]) {
                    Some(d) if d.order == order => {
                        g.replay.push_back((d.src as usize, d.seq));
                        g.recent.push_back(d);
                        order += 1;
                    }
                    _ => break,
                }
                if order - snap.order >= self.ring_len as u64 {
                    break;
                }
            }
        }
        let logger = Arc::new(logger);
        msgs.set_logger(Some(logger.clone()));
        let this = Rank::assemble(self.config, self.ep, msgs, ckpt, node)?;
        // Every survivor resends what this rank had not delivered, and says what it holds.
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
        Ok(this)
    }
}

fn ids_peer(msgs: &Messages, r: usize) -> fabric::PeerId {
    msgs.peer(r)
}
