//! Share words: the per-page word a one-sided reader joins a copyset with (a remote
//! fetch-and-add), closed by the owner before it invalidates.
use std::collections::{BTreeMap, BTreeSet};

use super::{NodeId, PageId, SHARE_OPEN, SHARE_WORD_NODES};

/// The share words of this node's pages (in registered memory in the real driver).
pub trait ShareWords {
    /// Closes the word of `page` (atomically) and returns the readers that joined.
    fn close(&mut self, page: PageId) -> BTreeSet<NodeId>;
}

/// Share words in plain memory (simulation and tests): `remote_join` is what a remote
/// fetch-and-add does.
#[derive(Clone, Debug, Default)]
pub struct LocalShareWords {
    words: BTreeMap<PageId, u64>,
}

impl LocalShareWords {
    pub fn open(&mut self, page: PageId) {
        self.words.insert(page, SHARE_OPEN);
    }

    /// The remote fetch-and-add of a joining reader; returns whether the word was open.
    pub fn remote_join(&mut self, page: PageId, reader: NodeId) -> bool {
        let w = self.words.entry(page).or_insert(0);
        let old = *w;
        *w = w.wrapping_add(1u64 << reader);
        old & SHARE_OPEN != 0
    }
}

impl ShareWords for LocalShareWords {
    fn close(&mut self, page: PageId) -> BTreeSet<NodeId> {
        let old = self.words.insert(page, 0).unwrap_or(0);
        joined_readers(old)
    }
}

/// The readers recorded in a closed share word's old value (nothing if it was not open).
pub fn joined_readers(word: u64) -> BTreeSet<NodeId> {
    if word & SHARE_OPEN == 0 {
        return BTreeSet::new();
    }
    (0..SHARE_WORD_NODES)
        .filter(|i| word & (1u64 << i) != 0)
        .collect()
}
