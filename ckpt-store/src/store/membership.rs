//! What the store is told about membership. Nodes the agreed view reports gone are not
//! asked for copies (a request to them would only time out), and copies bound for them fail
//! at once instead of after the request timeout. When this node's buddy goes, its L2 copies
//! went with it: those versions are no longer safe at L2, a new buddy is chosen (the
//! placement's next candidate still up, the same on every node with the same view), and
//! the versions this node still holds at L1 are sent to it again.
//!
//! After a recovery the job's nodes re-form their buddies and parity sets from the new
//! agreed view ([`Store::reform`] with a [`Placement::among`] the nodes left): every node
//! is given the same placement, so buddy duty is spread again and the parity sets name the
//! nodes that run ranks now (a spare that took ranks over included), and a later loss of a
//! buddy pair is rebuilt from parity again.
use super::{Inner, Key, Level, Store};
use crate::buddy::Placement;
use crate::error::StoreError;
use std::sync::Arc;

/// Earlier placements kept for the rebuild of versions flushed under them.
const EARLIER_KEPT: usize = 8;

impl Store {
    /// Puts `placement` in force: buddies and parity sets re-formed after failures (every
    /// node of the store must be given the same). Versions flushed before keep their
    /// copies where they are: an L2 copy stays with the buddy it landed on (and is dropped
    /// there), a parity with its holder, and a rebuild looks under the earlier placements
    /// too. Parity sets still waiting for images (of a checkpoint the failure aborted) are
    /// dropped; new versions go to the new buddy and sets.
    pub fn reform(&self, placement: Placement) -> crate::Result<()> {
        let inner = &self.inner;
        if placement.nodes() != inner.cfg.nodes.len() {
            return Err(StoreError::Invalid(format!(
                "the new placement covers {} nodes, the store has {}",
                placement.nodes(),
                inner.cfg.nodes.len()
            )));
        }
        let placement = Arc::new(placement);
        let old = std::mem::replace(
            &mut *inner.placement.lock().expect("lock"),
            placement.clone(),
        );
        if *old != *placement {
            let mut earlier = inner.earlier.lock().expect("lock");
            earlier.push(old);
            if earlier.len() > EARLIER_KEPT {
                earlier.remove(0);
            }
        }
        {
            let mut sets = inner.parity.lock().expect("lock");
            let mut arena = inner.arena.lock().expect("lock");
            sets.retain(|_, p| {
                if p.parity.is_some() {
                    return true;
                }
                for c in p.contributions.values() {
                    arena.release(c.offset, c.len);
                }
                false
            });
        }
        let me = inner.cfg.node;
        let set = placement
            .parity_member(me)
            .map(|(s, _)| placement.set_members(s).to_vec());
        eprintln!(
            "krun-store: node {me}: buddies and parity sets re-formed: buddy node {}, parity \
             set {}; sets {:?}",
            inner.buddy_of(me),
            set.filter(|s| s.len() > 1)
                .map_or("none".to_string(), |s| format!("{s:?}")),
            placement.sets()
        );
        Ok(())
    }

    /// The node holding this node's L2 copies from now on, and its parity set's members
    /// (`None`: in no set of two or more), as the placement in force says.
    pub fn placed(&self) -> (usize, Option<Vec<usize>>) {
        let inner = &self.inner;
        let placement = inner.placement();
        let me = inner.cfg.node;
        let set = placement
            .parity_member(me)
            .map(|(s, _)| placement.set_members(s).to_vec())
            .filter(|s| s.len() > 1);
        (inner.buddy_of(me), set)
    }

    /// Marks `node` gone (`down`) or back. `get` skips gone nodes (their copies are read from
    /// their buddies, parity or disk); flushes to a gone node fail at once; when this node's
    /// buddy goes, its L1 versions are copied to the next buddy in the background (see the
    /// module docs; [`Store::wait_safe`] at L2 waits for it).
    pub fn set_down(&self, node: usize, down: bool) -> crate::Result<()> {
        let inner = &self.inner;
        let old_buddy = inner.buddy_of(inner.cfg.node);
        {
            let mut d = inner.down.lock().expect("lock");
            let n = d.len();
            let slot = d.get_mut(node).ok_or_else(|| {
                StoreError::Invalid(format!(
                    "node {node} is not a node of this store ({n} nodes)"
                ))
            })?;
            *slot = down;
        }
        let new_buddy = inner.buddy_of(inner.cfg.node);
        if down && node == old_buddy && new_buddy != old_buddy && new_buddy != inner.cfg.node {
            let me = inner.cfg.node;
            eprintln!(
                "krun-store: node {me}: buddy node {node} is gone; L2 copies go to node {new_buddy}"
            );
            let keys: Vec<Key> = {
                let mut safe = inner.safe.lock().expect("lock");
                for s in safe.values_mut() {
                    s[Level::L2 as usize] = false;
                }
                inner.l1.lock().expect("lock").keys().cloned().collect()
            };
            inner.safe_changed.notify_all();
            let mut errors = inner.errors.lock().expect("lock");
            for k in &keys {
                errors.remove(k);
            }
            drop(errors);
            inner.reflush.lock().expect("lock").extend(keys);
        }
        Ok(())
    }

    /// Nodes currently marked gone, ascending.
    pub fn down_nodes(&self) -> Vec<usize> {
        let d = self.inner.down.lock().expect("lock");
        (0..d.len()).filter(|&i| d[i]).collect()
    }
}

impl Inner {
    pub(super) fn is_down(&self, node: usize) -> bool {
        self.down
            .lock()
            .expect("lock")
            .get(node)
            .copied()
            .unwrap_or(false)
    }

    pub(super) fn down_error(&self, node: usize) -> StoreError {
        StoreError::Peer {
            node,
            what: "gone (the membership reports it down)".into(),
        }
    }

    /// Sends the versions queued by [`Store::set_down`] to the current buddy (on the flush
    /// thread, so it never races a flush of the same version).
    pub(super) fn reprotect(&self) {
        let keys = std::mem::take(&mut *self.reflush.lock().expect("lock"));
        for key in keys {
            if !self.l1.lock().expect("lock").contains_key(&key) {
                continue;
            }
            let buddy = self.buddy_of(self.cfg.node);
            match self.send_copy(buddy, &key, 0, 0, 0) {
                Ok(_) => {
                    // A flush that raced the buddy's departure may have recorded a failure.
                    self.errors.lock().expect("lock").remove(&key);
                    self.mark_safe_at(&key, Level::L2, buddy);
                }
                Err(e) => self.fail(&key, format!("L2 at node {buddy}: {e}")),
            }
        }
    }
}
