//! The supervisors' Raft log in memory, compacted behind a snapshot of the agreed view.
//!
//! raft-rs's own `MemStorage` builds the snapshot it sends from the commit index with no
//! data, and forgets the term of the last compacted entry when the log is compacted past
//! its last snapshot: a follower just behind the compaction point would then get a
//! snapshot without the view. This storage keeps two things apart:
//! - the **base** of the log, the last compacted entry (index and term): entries up to it
//!   are gone, and a follower that needs them gets the latest snapshot instead;
//! - the **latest snapshot**, set by the caller after each batch it applied: the index of
//!   the last applied entry, its term, the Raft configuration then, and the agreed view
//!   (the changes agreed so far, see [`crate::view::encode_changes`]). A new supervisor
//!   starts empty and catches up from it.
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

#[derive(Default)]
pub struct ViewStorage {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last compacted entry (0, 0 before anything is).
    base: (u64, u64),
    /// Entries `base.0 + 1 ..`, contiguous.
    entries: Vec<Entry>,
    /// What a follower that needs compacted entries gets (empty until first set).
    latest: Snapshot,
}

fn unavailable() -> raft::Error {
    raft::Error::Store(StorageError::Unavailable)
}

impl ViewStorage {
    /// The storage of a supervisor of the initial group: the configuration `voters` and an
    /// empty view are the snapshot at index 1, term 1 (so that a member that starts empty
    /// later can only catch up from a snapshot: entry 1 is never in any log).
    pub fn genesis(voters: Vec<u64>, empty_view: Vec<u8>) -> ViewStorage {
        let conf_state = ConfState::from((voters, vec![]));
        let mut latest = Snapshot::default();
        latest.set_data(empty_view.into());
        let meta = latest.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(conf_state.clone());
        let hard_state = HardState {
            term: 1,
            commit: 1,
            ..Default::default()
        };
        ViewStorage {
            hard_state,
            conf_state,
            base: (1, 1),
            entries: Vec::new(),
            latest,
        }
    }

    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn first(&self) -> u64 {
        self.base.0 + 1
    }

    fn last(&self) -> u64 {
        self.base.0 + self.entries.len() as u64
    }

    /// Entries held (not compacted).
    pub fn held(&self) -> usize {
        self.entries.len()
    }

    /// The index of the last compacted entry.
    pub fn compacted(&self) -> u64 {
        self.base.0
    }

    /// The index of the latest snapshot.
    pub fn snapshot_index(&self) -> u64 {
        self.latest.get_metadata().index
    }

    /// Appends entries persisted by raft (they may overwrite an uncommitted tail).
    pub fn append(&mut self, ents: &[Entry]) -> raft::Result<()> {
        let Some(first) = ents.first() else {
            return Ok(());
        };
        if first.index < self.first() || first.index > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Other(
                format!(
                    "append at {} to a log holding {}..={}",
                    first.index,
                    self.first(),
                    self.last()
                )
                .into(),
            )));
        }
        self.entries.truncate((first.index - self.first()) as usize);
        self.entries.extend_from_slice(ents);
        Ok(())
    }

    /// A snapshot received from the leader replaces the whole log.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> raft::Result<()> {
        let meta = snap.get_metadata();
        if meta.index < self.base.0 {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        self.base = (meta.index, meta.term);
        self.entries.clear();
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        self.latest = snap.clone();
        Ok(())
    }

    /// The agreed view at `index` (the last applied entry): the snapshot a follower that
    /// needs compacted entries gets from now on.
    pub fn set_latest(&mut self, index: u64, view: Vec<u8>) -> raft::Result<()> {
        let term = self.term(index)?;
        let mut snap = Snapshot::default();
        snap.set_data(view.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.latest = snap;
        Ok(())
    }

    /// Drops the entries up to `index` (at most up to the latest snapshot, which covers
    /// them).
    pub fn compact(&mut self, index: u64) -> raft::Result<()> {
        let index = index.min(self.snapshot_index()).min(self.last());
        if index <= self.base.0 {
            return Ok(());
        }
        let term = self.term(index)?;
        self.entries.drain(..(index - self.base.0) as usize);
        self.base = (index, term);
        Ok(())
    }
}

impl Storage for ViewStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(unavailable());
        }
        let from = (low - self.first()) as usize;
        let to = (high - self.first()) as usize;
        let mut ents = self.entries[from..to].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.base.0 {
            return Ok(self.base.1);
        }
        if idx < self.base.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(unavailable());
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.latest.get_metadata().index == 0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.latest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn compaction_keeps_the_base_term_and_refuses_compacted_reads() {
        let mut s = ViewStorage::genesis(vec![1, 2, 3], b"view0".to_vec());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (2, 1));
        assert_eq!(s.term(1).unwrap(), 1);
        s.append(&(2..=10).map(|i| entry(i, 2)).collect::<Vec<_>>())
            .unwrap();
        // An overwrite of the tail, and a gap refused.
        s.append(&[entry(9, 3)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 9);
        assert!(s.append(&[entry(11, 3)]).is_err());
        s.set_latest(8, b"view8".to_vec()).unwrap();
        s.compact(100).unwrap();
        // Compacted up to the latest snapshot, not further.
        assert_eq!(s.compacted(), 8);
        assert_eq!(s.term(8).unwrap(), 2);
        assert_eq!(s.term(9).unwrap(), 3);
        assert!(matches!(
            s.term(7),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(s
            .entries(5, 9, None, GetEntriesContext::empty(false))
            .is_err());
        assert_eq!(
            s.entries(9, 10, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
        let snap = s.snapshot(0, 0).unwrap();
        assert_eq!(snap.get_metadata().index, 8);
        assert_eq!(&snap.data[..], b"view8");
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        // A follower restored from it holds nothing before it.
        let mut f = ViewStorage::default();
        assert!(f.snapshot(0, 0).is_err());
        f.apply_snapshot(&snap).unwrap();
        assert_eq!((f.first_index().unwrap(), f.last_index().unwrap()), (9, 8));
        assert_eq!(f.term(8).unwrap(), 2);
        assert_eq!(f.conf_state().voters, vec![1, 2, 3]);
    }
}
