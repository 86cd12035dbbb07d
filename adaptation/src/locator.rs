//! The locator: which node manages a directory entry.
//!
//! API CONTRACT (the protocol is written against these signatures; keep them):
//! - `CellTreeLocator` is deterministic: every node that applies the same sequence of
//!   `add_node` / `remove_node` calls from the same `new` gets an identical locator
//!   (no HashMap iteration order, no randomness).
//! - `manager` is O(1): a bucket from the entry id, then an array lookup.
use crate::view::{EntryId, NodeId};

/// Sizes of the cell tree.
#[derive(Clone, Debug)]
pub struct LocatorConfig {
    /// Number of buckets entries are spread over (a power of two).
    pub buckets: usize,
    /// A cell with more members than this is split in two.
    pub max_cell: usize,
}

impl Default for LocatorConfig {
    fn default() -> Self {
        LocatorConfig {
            buckets: 1 << 16,
            max_cell: 16,
        }
    }
}

/// Where a service's entries live: the whole tree or one sub-tree of cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    /// First bucket of the sub-tree's contiguous bucket range.
    pub first_bucket: usize,
    /// Number of buckets of the range.
    pub buckets: usize,
}

/// What one membership change did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSummary {
    /// The cell the change touched.
    pub cell: usize,
    /// Buckets that changed manager.
    pub buckets_moved: usize,
    /// Nodes that gave or received buckets.
    pub nodes_touched: Vec<NodeId>,
}

/// One cell, for status displays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellInfo {
    pub cell: usize,
    pub members: Vec<NodeId>,
    pub first_bucket: usize,
    pub buckets: usize,
}

/// The tree-of-cells locator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellTreeLocator {}

impl CellTreeLocator {
    /// A balanced locator over `nodes` (at least one).
    pub fn new(config: LocatorConfig, nodes: &[NodeId]) -> Self {
        let _ = (config, nodes);
        todo!()
    }
    /// The manager of `entry` (O(1)).
    pub fn manager(&self, entry: EntryId) -> NodeId {
        let _ = entry;
        todo!()
    }
    /// The manager of `entry` for a service placed on `scope` (O(1)).
    pub fn manager_in(&self, scope: &Scope, entry: EntryId) -> NodeId {
        let _ = (scope, entry);
        todo!()
    }
    /// The whole tree.
    pub fn root_scope(&self) -> Scope {
        todo!()
    }
    /// The smallest sub-tree able to hold `entries` entries.
    pub fn scope_for(&self, entries: u64) -> Scope {
        let _ = entries;
        todo!()
    }
    /// Adds a node to the cell that best restores balance.
    pub fn add_node(&mut self, node: NodeId) -> ChangeSummary {
        let _ = node;
        todo!()
    }
    /// Removes a node; only its cell's members take its buckets.
    pub fn remove_node(&mut self, node: NodeId) -> ChangeSummary {
        let _ = node;
        todo!()
    }
    /// Members, ascending.
    pub fn nodes(&self) -> Vec<NodeId> {
        todo!()
    }
    pub fn cells(&self) -> Vec<CellInfo> {
        todo!()
    }
}
