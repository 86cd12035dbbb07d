//! What the store is told about membership. Nodes the agreed view reports gone are not
//! asked for copies (a request to them would only time out), and copies bound for them fail
//! at once instead of after the request timeout. When this node's buddy goes, its L2 copies
//! went with it: those versions are no longer safe at L2, a new buddy is chosen (the
//! placement's next candidate still up, the same on every node with the same view), and
//! the versions this node still holds at L1 are sent to it again.
use super::{Inner, Key, Level, Store};
use crate::error::StoreError;

impl Store {
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
