//! A benchmark's runs with a progress bar: `for i in runs::bar("launch: krun", 0..=n)`
//! draws `bench: launch: krun [====>   ] 3/6` on stderr when it is a terminal (the shared
//! `krun-progress` crate, as krun's own bars); otherwise nothing is drawn and the
//! benchmark's own lines and table say what happened.
use krun_progress::{Mode, Progress};

/// The runs of `it`, each counted on the bar once the loop comes back for the next one.
pub struct Runs<I> {
    inner: I,
    bar: Option<Progress>,
    /// Items handed out so far.
    started: u64,
}

/// `it` with a bar labelled `what` on stderr (a terminal; plain mode draws nothing).
pub fn bar<I: Iterator>(what: &str, it: I) -> Runs<I> {
    bar_in(Mode::for_stderr(), what, it)
}

/// `it` with a bar labelled `what` drawn as `mode` says.
pub fn bar_in<I: Iterator>(mode: Mode, what: &str, it: I) -> Runs<I> {
    let (low, high) = it.size_hint();
    let len = high.unwrap_or(low) as u64;
    Runs {
        inner: it,
        bar: Some(Progress::bar_for("bench", mode, len, what)),
        started: 0,
    }
}

impl<I> Runs<I> {
    /// Runs done as the bar counts them (0 in plain mode, which counts nothing).
    pub fn done(&self) -> u64 {
        self.bar.as_ref().map_or(0, Progress::position)
    }
}

impl<I: Iterator> Iterator for Runs<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        // Asked for the next run: the one before is done.
        if self.started > 0 {
            if let Some(b) = &self.bar {
                b.inc(1);
            }
        }
        match self.inner.next() {
            Some(item) => {
                self.started += 1;
                Some(item)
            }
            None => {
                if let Some(b) = self.bar.take() {
                    b.finish(None);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_advances_as_each_run_ends_and_goes_away_after_the_last() {
        // 0..=3 has no exact size: the bar still knows its 4 runs.
        let mut runs = bar_in(Mode::Hidden, "launch: true", 0..=3usize);
        assert_eq!(runs.next(), Some(0));
        assert_eq!(runs.done(), 0, "the first run is not over yet");
        assert_eq!(runs.next(), Some(1));
        assert_eq!(runs.done(), 1);
        assert_eq!(runs.next(), Some(2));
        assert_eq!(runs.next(), Some(3));
        assert_eq!(runs.done(), 3);
        assert_eq!(runs.next(), None);
        assert_eq!(runs.done(), 0, "finished: no bar any more");
        // A loop left early (an error) drops its bar without a line.
        let mut runs = bar_in(Mode::Hidden, "dsm: tcp", 0..5);
        runs.next();
        runs.next();
        assert_eq!(runs.done(), 1);
        drop(runs);
    }
}
