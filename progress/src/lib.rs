//! Progress of long operations for the user: an indicatif bar or spinner when stderr is a
//! terminal, plain lines otherwise (logs, pipes, CI), so scripts see the same final lines
//! either way.
//!
//! Shared by krun's tools (one crate with only indicatif, so that `bench` need not depend on
//! the launcher): `krun ghost capture|restore|migrate` (a spinner with the elapsed time: the
//! checkpointer reports no partial progress), krun's policy driver for the restart of lost
//! ranks onto a spare (a bar of ranks restored) and for a checkpoint's images being flushed
//! to the store's commit level (a bar of ranks whose image is safe there), and the
//! benchmarks (`bench`: one bar per benchmark over its runs, [`Progress::bar_for`] with
//! the prefix `bench`). Lines printed while a bar is shown go through [`line`], above the
//! bar.
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The bar shown now, if any: [`line`] prints above it.
static SHOWN: Mutex<Option<(u64, ProgressBar)>> = Mutex::new(None);
/// Numbers the bars, so that a finished bar withdraws only itself from [`SHOWN`].
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How progress is shown.
pub enum Mode {
    /// indicatif, drawn to stderr (a terminal).
    Terminal,
    /// Only the final line, to this writer (stderr when it is not a terminal).
    Plain(Box<dyn Write + Send>),
    /// indicatif into a hidden target (tests read the position).
    Hidden,
}

impl Mode {
    /// Terminal when stderr is one (and `KRUN_PROGRESS` is not `plain`), else plain lines.
    pub fn for_stderr() -> Mode {
        let plain = std::env::var("KRUN_PROGRESS").is_ok_and(|v| v == "plain");
        if !plain && std::io::stderr().is_terminal() {
            Mode::Terminal
        } else {
            Mode::Plain(Box::new(std::io::stderr()))
        }
    }
}

/// One long operation.
pub struct Progress {
    id: u64,
    bar: Option<ProgressBar>,
    plain: Option<Box<dyn Write + Send>>,
    started: Instant,
    /// What the bar and the final line start with ("krun", "bench").
    prefix: &'static str,
}

impl Progress {
    /// A spinner with `label` and the elapsed time.
    pub fn spinner(mode: Mode, label: &str) -> Progress {
        Progress::new("krun", mode, None, label)
    }

    /// A bar of `len` steps with `label`.
    pub fn bar(mode: Mode, len: u64, label: &str) -> Progress {
        Progress::new("krun", mode, Some(len), label)
    }

    /// A bar of `len` steps with `label` for another tool: its lines start with `prefix`.
    pub fn bar_for(prefix: &'static str, mode: Mode, len: u64, label: &str) -> Progress {
        Progress::new(prefix, mode, Some(len), label)
    }

    fn new(prefix: &'static str, mode: Mode, len: Option<u64>, label: &str) -> Progress {
        let (target, plain) = match mode {
            Mode::Terminal => (Some(ProgressDrawTarget::stderr()), None),
            Mode::Hidden => (Some(ProgressDrawTarget::hidden()), None),
            Mode::Plain(w) => (None, Some(w)),
        };
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bar = target.map(|t| {
            let bar = match len {
                Some(n) => ProgressBar::with_draw_target(Some(n), t).with_style(
                    ProgressStyle::with_template(&format!(
                        "{prefix}: {{msg}} [{{bar:30}}] {{pos}}/{{len}} ({{elapsed_precise}})"
                    ))
                    .expect("a valid template")
                    .progress_chars("=> "),
                ),
                None => {
                    let b = ProgressBar::with_draw_target(None, t).with_style(
                        ProgressStyle::with_template(&format!(
                            "{prefix}: {{spinner}} {{msg}} ({{elapsed_precise}})"
                        ))
                        .expect("a valid template"),
                    );
                    b.enable_steady_tick(Duration::from_millis(120));
                    b
                }
            };
            bar.set_message(label.to_string());
            *SHOWN.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, bar.clone()));
            bar
        });
        Progress {
            id,
            bar,
            plain,
            started: Instant::now(),
            prefix,
        }
    }

    /// `n` more steps are done.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Steps done so far (0 in plain mode, which counts nothing).
    pub fn position(&self) -> u64 {
        self.bar.as_ref().map_or(0, |b| b.position())
    }

    pub fn set_label(&self, label: &str) {
        if let Some(b) = &self.bar {
            b.set_message(label.to_string());
        }
    }

    /// Seconds since the operation started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Ends the operation: the bar goes away and `text` (if any) is printed as a line.
    pub fn finish(mut self, text: Option<&str>) {
        self.end(text);
    }

    fn end(&mut self, text: Option<&str>) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
            let mut shown = SHOWN.lock().unwrap_or_else(|p| p.into_inner());
            if shown.as_ref().is_some_and(|(id, _)| *id == self.id) {
                *shown = None;
            }
            drop(shown);
            if let Some(t) = text {
                eprintln!("{}: {t}", self.prefix);
            }
        } else if let (Some(w), Some(t)) = (self.plain.as_mut(), text) {
            let _ = writeln!(w, "{}: {t}", self.prefix);
        }
        self.plain = None;
    }
}

impl Drop for Progress {
    /// An operation abandoned (an error returned early) clears its bar, prints nothing.
    fn drop(&mut self) {
        self.end(None);
    }
}

/// Prints a line for the user on stderr, above the bar shown now if there is one.
pub fn line(text: &str) {
    let shown = SHOWN.lock().unwrap_or_else(|p| p.into_inner());
    match shown.as_ref() {
        Some((_, b)) if !b.is_hidden() => b.println(text),
        _ => eprintln!("{text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer tests read back.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_mode_prints_only_the_final_line_and_nothing_when_abandoned() {
        let buf = Buf::default();
        let p = Progress::bar(Mode::Plain(Box::new(buf.clone())), 4, "restoring ranks");
        p.inc(3);
        assert_eq!(p.position(), 0, "plain mode draws and counts nothing");
        p.finish(Some("4 ranks restored"));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "krun: 4 ranks restored\n");

        let buf = Buf::default();
        let p = Progress::spinner(Mode::Plain(Box::new(buf.clone())), "capturing");
        drop(p);
        assert!(buf.0.lock().unwrap().is_empty());
    }

    #[test]
    fn a_bar_counts_its_steps_and_is_withdrawn_when_finished() {
        let p = Progress::bar(Mode::Hidden, 6, "checkpoint 3: safe at L2");
        p.inc(2);
        p.inc(3);
        assert_eq!(p.position(), 5);
        assert!(SHOWN.lock().unwrap().is_some());
        p.finish(None);
        let s = Progress::spinner(Mode::Hidden, "capturing pid 7");
        assert!(s.elapsed() >= 0.0);
        drop(s);
    }

    #[test]
    fn another_tools_bar_counts_and_its_plain_line_carries_its_prefix() {
        let p = Progress::bar_for("bench", Mode::Hidden, 3, "launch: runs");
        p.inc(1);
        p.inc(1);
        assert_eq!(p.position(), 2);
        p.finish(None);
        let buf = Buf::default();
        let p = Progress::bar_for(
            "bench",
            Mode::Plain(Box::new(buf.clone())),
            3,
            "launch: runs",
        );
        p.inc(3);
        p.finish(Some("launch: 3 runs"));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "bench: launch: 3 runs\n");
    }
}
