//! What a node's store holds: bytes per level, and the newest version of an owner that is
//! safe at each level (for `krun status` and the process table).
use super::{Level, Store};
use std::path::Path;

/// Bytes one node's store holds, per level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// This node's own copies in memory (L1), mapped image files included.
    pub l1: u64,
    /// Copies this node holds in its arena as the buddy of other nodes (L2).
    pub l2_held: u64,
    /// Parity blocks this node keeps, and member images waiting for their set (L3).
    pub l3_parity: u64,
    /// Image files under this node's L4 directory (0 without L4).
    pub l4_disk: u64,
    /// The arena this node lends to others (L2 copies and L3 parity), and its free part.
    pub arena: u64,
    pub arena_free: u64,
}

impl Usage {
    /// Bytes at `level` (L2 and L3: what this node holds for others).
    pub fn at(&self, level: Level) -> u64 {
        match level {
            Level::L1 => self.l1,
            Level::L2 => self.l2_held,
            Level::L3 => self.l3_parity,
            Level::L4 => self.l4_disk,
        }
    }
}

/// The newest version of one owner safe at each level, as far as this node knows (its own
/// puts and their acknowledgements, and its L4 directory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewestSafe {
    pub by_level: [Option<u64>; 4],
}

impl NewestSafe {
    pub fn at(&self, level: Level) -> Option<u64> {
        self.by_level[level as usize]
    }
}

impl Store {
    /// Bytes held per level on this node.
    pub fn usage(&self) -> Usage {
        let inner = &self.inner;
        let l1 = inner
            .l1
            .lock()
            .expect("lock")
            .values()
            .map(|c| c.len as u64)
            .sum();
        let l2_held = inner
            .held
            .lock()
            .expect("lock")
            .values()
            .map(|h| h.len)
            .sum();
        let l3_parity = inner
            .parity
            .lock()
            .expect("lock")
            .values()
            .map(|p| {
                p.parity.map_or(0, |(_, len, _)| len)
                    + p.contributions.values().map(|c| c.len).sum::<u64>()
            })
            .sum();
        let l4_disk = inner.disk.as_ref().map_or(0, |d| tree_bytes(d.dir()));
        let arena = inner.arena_mr.len() as u64;
        let arena_free = inner
            .arena
            .lock()
            .expect("lock")
            .free
            .iter()
            .map(|&(_, l)| l)
            .sum();
        Usage {
            l1,
            l2_held,
            l3_parity,
            l4_disk,
            arena,
            arena_free,
        }
    }

    /// The levels this store writes: L1 always, L2 with more than one node, L3 with a parity
    /// set of at least two nodes, L4 with a disk directory.
    pub fn levels(&self) -> Vec<Level> {
        let cfg = &self.inner.cfg;
        let n = cfg.nodes.len();
        Level::ALL
            .into_iter()
            .filter(|l| match l {
                Level::L1 => true,
                Level::L2 => n > 1,
                Level::L3 => n > 1 && cfg.parity_set > 1,
                Level::L4 => cfg.disk.is_some(),
            })
            .collect()
    }

    /// Why the flush of a version to a slower level failed, if it did (then
    /// [`Store::wait_safe`] fails at once for the levels it did not reach).
    pub fn flush_error(&self, owner: &str, version: u64) -> Option<String> {
        self.inner
            .errors
            .lock()
            .expect("lock")
            .get(&(owner.to_string(), version))
            .cloned()
    }

    /// The versions of `owner` this node holds at L1, ascending.
    pub fn l1_versions(&self, owner: &str) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .inner
            .l1
            .lock()
            .expect("lock")
            .keys()
            .filter(|k| k.0 == owner)
            .map(|k| k.1)
            .collect();
        v.sort_unstable();
        v
    }

    /// The newest version of `owner` safe at each level. L4 also counts images found in the
    /// L4 directory (written before a restart of this node).
    pub fn newest_safe(&self, owner: &str) -> NewestSafe {
        let mut out = NewestSafe::default();
        for level in Level::ALL {
            out.by_level[level as usize] = self.inner.safe_versions(owner, level).last().copied();
        }
        if let Some(d) = &self.inner.disk {
            let on_disk = d.versions(owner).ok().and_then(|v| v.last().copied());
            out.by_level[Level::L4 as usize] = out.by_level[Level::L4 as usize].max(on_disk);
        }
        out
    }
}

/// Bytes of the regular files under `dir` (0 when it cannot be read; a status display).
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
