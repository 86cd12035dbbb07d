//! The node set as every node keeps it, and the locator of each view.
use super::*;

/// The node set as every node keeps it (node 0's is the reference).
#[derive(Clone, Debug)]
pub struct View {
    pub kind: LocatorKind,
    pub initial: u32,
    pub history: Vec<ViewChange>,
    pub epoch: u64,
    pub addrs: BTreeMap<NodeId, Vec<u8>>,
    /// Nodes that left.
    pub gone: BTreeSet<NodeId>,
    /// Nodes whose failure was handled (a `Fail` change committed).
    pub failed: BTreeSet<NodeId>,
    pub next_id: NodeId,
    /// The change installed and not committed yet.
    pub pending: Option<(u64, ViewChange)>,
}

impl View {
    pub fn new(kind: LocatorKind, initial: u32, addrs: BTreeMap<NodeId, Vec<u8>>) -> View {
        View {
            kind,
            initial,
            history: Vec::new(),
            epoch: 0,
            addrs,
            gone: BTreeSet::new(),
            failed: BTreeSet::new(),
            next_id: initial,
            pending: None,
        }
    }

    /// Members now (nodes that joined and did not leave).
    pub fn members(&self) -> BTreeSet<NodeId> {
        (0..self.next_id)
            .filter(|n| !self.gone.contains(n) && !self.failed.contains(n))
            .collect()
    }

    pub fn members_after(&self, change: ViewChange) -> BTreeSet<NodeId> {
        let mut m = self.members();
        match change {
            ViewChange::Join(n) => m.insert(n),
            ViewChange::Leave(n) | ViewChange::Fail(n) => m.remove(&n),
        };
        m
    }

    /// The locator of this view, or of the next one with `next`: every node applies the
    /// same changes in the same order to the same start, so all get the same locator.
    pub fn locator(&self, next: Option<ViewChange>) -> Box<dyn Placement + Send> {
        let initial: Vec<NodeId> = (0..self.initial).collect();
        let mut l = self.kind.build(&initial);
        for c in self.history.iter().chain(next.iter()) {
            match *c {
                ViewChange::Join(n) => l.add_node(n),
                ViewChange::Leave(n) | ViewChange::Fail(n) => l.remove_node(n),
            }
        }
        l
    }
}
