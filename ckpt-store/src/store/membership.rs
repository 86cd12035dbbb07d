//! What the store is told about membership: nodes the agreed view reports gone are not
//! asked for copies (a request to them would only time out), and copies bound for them fail
//! at once instead of after the request timeout.
use super::{Inner, Store};
use crate::error::StoreError;

impl Store {
    /// Marks `node` gone (`down`) or back. `get` skips gone nodes (their copies are read from
    /// their buddies, parity or disk); flushes to a gone buddy or parity holder fail at once.
    pub fn set_down(&self, node: usize, down: bool) -> crate::Result<()> {
        let mut d = self.inner.down.lock().expect("lock");
        let n = d.len();
        let slot = d.get_mut(node).ok_or_else(|| {
            StoreError::Invalid(format!(
                "node {node} is not a node of this store ({n} nodes)"
            ))
        })?;
        *slot = down;
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
}
