//! Dead nodes: a node the runtime knows dead (the watchdog's probe, a failed send confirmed
//! by a probe, another node's announcement, or the job's membership) leaves every copyset
//! ([`crate::coherence::Node::node_failed`]), so writes that waited for its invalidation
//! acknowledgements are granted; nothing is sent to it again. The node that finds a death
//! announces it to every live node (tag [`TAG_DSM_FAILED`]).
use std::collections::BTreeSet;
use std::sync::Arc;

use fabric::PeerId;

use super::{now_ns, poisoned, Data, Engine, TAG_DSM_FAILED, WIRE_VERSION};
use crate::coherence::NodeId;
use crate::error::{DsmError, Result};

impl Engine {
    /// Nodes known to have died.
    pub fn dead_nodes(&self) -> BTreeSet<NodeId> {
        self.dead.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// Whether the connection `peer` is a node known dead.
    pub fn peer_is_dead(&self, peer: PeerId) -> bool {
        self.rank_of(peer)
            .is_some_and(|n| self.dead.lock().map(|d| d.contains(&n)).unwrap_or(false))
    }

    /// `nodes` died (the watchdog's probe found them silent, another node announced it, or
    /// the job's membership reports the failure): their read copies leave every copyset, so
    /// writes waiting for their invalidation acknowledgements are granted, and nothing is
    /// sent to them again. With `announce`, every other live node is told (in the
    /// background: a send may be slow), so owners waiting for the dead nodes move on
    /// without waiting for their own fault timeouts.
    pub fn node_failed(self: &Arc<Self>, nodes: &[NodeId], announce: bool) -> Result<()> {
        let fresh = self.drop_dead(nodes)?;
        if announce && !fresh.is_empty() {
            let e = self.clone();
            std::thread::Builder::new()
                .name("dsm-announce".into())
                .spawn(move || e.announce(&fresh))
                .map_err(|e| DsmError::Os {
                    what: "spawning the failure announcement".into(),
                    source: e,
                })?;
        }
        Ok(())
    }

    /// Records `nodes` as dead and drops them from the state machine; returns those that
    /// were not known dead before.
    pub(super) fn drop_dead(&self, nodes: &[NodeId]) -> Result<Vec<NodeId>> {
        let fresh: Vec<NodeId> = {
            let mut dead = self.dead.lock().map_err(|_| poisoned())?;
            nodes
                .iter()
                .copied()
                .filter(|&n| n != self.me && (n as usize) < self.peer_count() && dead.insert(n))
                .collect()
        };
        if fresh.is_empty() {
            return Ok(fresh);
        }
        if self.trace {
            eprintln!("{} dsm {}: nodes {fresh:?} died", now_ns(), self.me);
        }
        let gone = self
            .members
            .view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().map(|v| v.gone.clone()))
            .unwrap_or_default();
        for &n in fresh.iter().filter(|n| !gone.contains(n)) {
            // Sends and one-sided operations to it fail at once instead of waiting out the
            // fabric's operation timeout (a node that left is still told `Left`).
            if let Ok(peer) = self.peer(n) {
                self.ep.peer_failed(peer, "the DSM found it dead");
            }
        }
        if self.me == self.coordinator() {
            // Their entries are rebuilt from the survivors' copies (a failure's change).
            // A node that just became the coordinator (the ones before died) also queues
            // the deaths its predecessor had not handled, its predecessor's among them.
            let dead = self.dead_nodes();
            for &n in &dead {
                self.members.queue_failure(n);
            }
        }
        let mut remote = Vec::new();
        let finished = {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            for &n in &fresh {
                let actions = node.node_failed(n);
                self.execute(&mut node, actions, Data::None, &mut remote)?;
            }
            node.take_finished()
        };
        if !remote.is_empty() {
            self.run_remote(remote)?;
        }
        for epoch in finished {
            self.migration_finished(epoch)?;
        }
        // A barrier no longer waits for them.
        self.barrier_recheck()?;
        Ok(fresh)
    }

    /// Tells every other live node that `nodes` died.
    fn announce(&self, nodes: &[NodeId]) {
        let mut wire = vec![WIRE_VERSION];
        match postcard::to_allocvec(&(self.me, nodes)) {
            Ok(b) => wire.extend(b),
            Err(e) => return self.fail(format!("encoding a failure announcement: {e}")),
        }
        let crc = crc32c::crc32c(&wire);
        wire.extend_from_slice(&crc.to_le_bytes());
        let dead = self.dead_nodes();
        for (n, peer) in self.peers().into_iter().enumerate() {
            let n = n as NodeId;
            let Some(peer) = peer else { continue };
            if n == self.me || dead.contains(&n) {
                continue;
            }
            if let Err(e) = self.ep.send(peer, TAG_DSM_FAILED, &wire) {
                self.suspect(n, format!("announcing failed nodes {nodes:?}: {e}"));
            }
        }
    }

    /// A failure announcement off the fabric.
    pub(super) fn on_failed_wire(&self, peer: Option<PeerId>, data: &[u8]) -> Result<()> {
        let from_peer = peer.and_then(|p| self.rank_of(p));
        let bad = |reason: String| DsmError::BadMessage {
            from: from_peer.unwrap_or(u32::MAX),
            reason: format!("failure announcement: {reason}"),
        };
        let (body, crc) = data
            .split_last_chunk::<4>()
            .ok_or_else(|| bad(format!("{} bytes", data.len())))?;
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err(bad("checksum mismatch (corrupted in transit)".into()));
        }
        let (&version, rest) = body.split_first().ok_or_else(|| bad("empty".into()))?;
        if version != WIRE_VERSION {
            return Err(bad(format!(
                "wire version {version}, expected {WIRE_VERSION}"
            )));
        }
        let (from, nodes): (NodeId, Vec<NodeId>) =
            postcard::from_bytes(rest).map_err(|e| bad(e.to_string()))?;
        let count = self.peer_count();
        if from_peer.is_some_and(|p| p != from) || from as usize >= count {
            return Err(bad(format!("claims to be node {from}")));
        }
        if let Some(&n) = nodes.iter().find(|&&n| n as usize >= count) {
            return Err(bad(format!("names node {n}, the job has {count}")));
        }
        if self.trace {
            eprintln!(
                "{} dsm {}: node {from} says {nodes:?} died",
                now_ns(),
                self.me
            );
        }
        // A node believed dead by another but alive here (this one) is not dropped.
        let others: Vec<NodeId> = nodes.into_iter().filter(|&n| n != self.me).collect();
        self.drop_dead(&others).map(drop)
    }

    /// A send to `node` failed: the watchdog probes it.
    pub(super) fn suspect(&self, node: NodeId, error: String) {
        if let Ok(mut s) = self.suspects.lock() {
            s.entry(node).or_insert(error);
        }
    }
}
