//! The store flush the user waits for: a checkpoint commits once every rank's image is
//! safe at the commit level (L2 in the buddy's memory, L3 with parity, L4 on disk), so
//! between the capture and the commit krun shows a bar of the ranks whose image got there
//! (a terminal only; plain mode prints nothing more than the commit line it always prints).
use std::collections::BTreeSet;

use policies::primitives::{Level, Rank, Version};

use crate::progress::{Mode, Progress};

/// One checkpoint's flush to its commit level.
pub(crate) struct FlushBar {
    version: Version,
    level: Level,
    safe: BTreeSet<Rank>,
    progress: Progress,
}

impl FlushBar {
    /// A bar for `version` of `ranks` ranks being flushed to `level`; none when the commit
    /// level is L1 (nothing is flushed before the commit).
    pub(crate) fn start(mode: Mode, version: Version, level: Level, ranks: usize) -> Option<Self> {
        (level > Level::L1).then(|| FlushBar {
            version,
            level,
            safe: BTreeSet::new(),
            progress: Progress::bar(
                mode,
                ranks as u64,
                &format!("checkpoint {version}: images flushed to {level}"),
            ),
        })
    }

    /// `version` of `rank` is safe at `level`: one more rank when it is this checkpoint's
    /// image at (or beyond) the commit level, counted once.
    pub(crate) fn safe(&mut self, rank: Rank, version: Version, level: Level) {
        if version == self.version && level >= self.level && self.safe.insert(rank) {
            self.progress.inc(1);
        }
    }

    /// Ranks counted so far (0 in plain mode).
    #[cfg(test)]
    pub(crate) fn position(&self) -> u64 {
        self.progress.position()
    }

    /// The checkpoint committed or was given up: the bar goes away.
    pub(crate) fn finish(self) {
        self.progress.finish(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_counts_each_rank_once_when_its_image_reaches_the_commit_level() {
        let mut bar = FlushBar::start(Mode::Hidden, 4, Level::L4, 3).expect("a bar for L4");
        bar.safe(0, 4, Level::L2);
        assert_eq!(bar.position(), 0, "L2 is not the commit level");
        bar.safe(0, 4, Level::L4);
        bar.safe(0, 4, Level::L4);
        bar.safe(1, 3, Level::L4);
        assert_eq!(bar.position(), 1, "once per rank, this checkpoint only");
        bar.safe(1, 4, Level::L4);
        bar.safe(2, 4, Level::L4);
        assert_eq!(bar.position(), 3);
        bar.finish();
        // Committing at L1 flushes nothing first: no bar.
        assert!(FlushBar::start(Mode::Hidden, 1, Level::L1, 3).is_none());
    }
}
