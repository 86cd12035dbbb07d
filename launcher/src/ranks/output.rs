//! Ranks' output: copied line by line (prefixed `[rank] ` when tagged) to the node's stdout
//! and stderr, by one thread polling every rank's pipes ([`OutputHub`]), so that a node
//! with a thousand ranks runs one forwarding thread, not two thousand.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Calls `sink` with each whole line of `stream` (prefixed; a last line without a newline
/// gets one), so that each line can be written with a single call and concurrent writers
/// never split a line.
pub fn for_each_line(stream: impl Read, prefix: Option<&str>, mut sink: impl FnMut(&[u8]) -> bool) {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        line.extend_from_slice(prefix.unwrap_or("").as_bytes());
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                if !sink(&line) {
                    break;
                }
            }
        }
    }
}

/// Copies `stream` to our stdout or stderr in whole lines.
pub fn copy_lines(stream: impl Read, prefix: Option<&str>, to_err: bool) {
    for_each_line(stream, prefix, |line| {
        let _ = if to_err {
            std::io::stderr().lock().write_all(line)
        } else {
            std::io::stdout().lock().write_all(line)
        };
        true
    });
}

/// Where the hub writes: the node's stdout and stderr, or buffers in tests.
pub type Sink = Box<dyn Write + Send>;

/// Bytes read from one pipe per turn, so that a flooding rank does not starve the others.
const READ_CHUNK: usize = 64 * 1024;

/// One rank's stdout or stderr being forwarded.
struct Stream {
    fd: OwnedFd,
    prefix: Vec<u8>,
    to_err: bool,
    /// Read and not yet written: the start of a line whose end has not come.
    pending: Vec<u8>,
}

enum Msg {
    Add(Stream),
    /// Forward until every stream has ended, or until the instant (then drop the rest).
    Finish(Instant),
}

/// The node's output forwarder: one thread polls every rank's pipes and writes whole lines,
/// one `write` per batch of lines of a pipe (lines of different ranks never mix), and
/// reads a pipe until its end (everything a rank, or a process it left behind, wrote
/// before closing it is forwarded, also after the rank exited).
pub struct OutputHub {
    tx: mpsc::Sender<Msg>,
    /// Write end of the pipe that wakes the thread's poll(2).
    wake: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OutputHub {
    /// A hub writing to this process's stdout and stderr.
    pub fn start() -> std::io::Result<OutputHub> {
        OutputHub::with_sinks(Box::new(std::io::stdout()), Box::new(std::io::stderr()))
    }

    /// A hub writing to `out` and `err`.
    pub fn with_sinks(out: Sink, err: Sink) -> std::io::Result<OutputHub> {
        let (wake_r, wake_w) = wake_pipe()?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("krun-output".into())
            .spawn(move || forward(rx, wake_r, out, err))?;
        Ok(OutputHub {
            tx,
            wake: wake_w,
            thread: Some(thread),
        })
    }

    /// Forwards the read end of a rank's stdout (`to_err` false) or stderr pipe.
    pub fn add(&self, fd: OwnedFd, rank: usize, tag: bool, to_err: bool) {
        let prefix = if tag {
            format!("[{rank}] ").into_bytes()
        } else {
            Vec::new()
        };
        set_nonblocking(&fd);
        let _ = self.tx.send(Msg::Add(Stream {
            fd,
            prefix,
            to_err,
            pending: Vec::new(),
        }));
        self.poke();
    }

    fn poke(&self) {
        // SAFETY: one byte written to our own pipe; a full pipe (EAGAIN) already wakes.
        unsafe { libc::write(self.wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    /// Forwards until every pipe has ended, or for at most `limit` (a process a rank left
    /// behind may hold its pipe open), then stops the thread.
    pub fn finish(mut self, limit: Duration) {
        self.stop(limit);
    }

    fn stop(&mut self, limit: Duration) {
        let _ = self.tx.send(Msg::Finish(Instant::now() + limit));
        self.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for OutputHub {
    fn drop(&mut self) {
        // Dropped without `finish` (an early error): forward what is there, briefly.
        self.stop(Duration::from_millis(200));
    }
}

fn set_nonblocking(fd: &OwnedFd) {
    // SAFETY: fcntl flag changes on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
}

/// A non-blocking close-on-exec pipe (read end, write end).
fn wake_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors into fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned from here on.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes the whole lines in `s.pending` (all of it, with a newline added, at the end).
fn flush_lines(s: &mut Stream, at_end: bool, out: &mut Sink, err: &mut Sink, batch: &mut Vec<u8>) {
    let upto = if at_end {
        s.pending.len()
    } else {
        match s.pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None => return,
        }
    };
    if upto == 0 {
        return;
    }
    batch.clear();
    for line in s.pending[..upto].split_inclusive(|&b| b == b'\n') {
        batch.extend_from_slice(&s.prefix);
        batch.extend_from_slice(line);
    }
    if !batch.ends_with(b"\n") {
        batch.push(b'\n');
    }
    s.pending.drain(..upto);
    let sink = if s.to_err { err } else { out };
    // A node whose own output is gone keeps draining its ranks' pipes (they must not block).
    let _ = sink.write_all(batch).and_then(|()| sink.flush());
}

/// Reads what `s` has now; false once it ended (end of file or an error).
fn read_some(s: &mut Stream, buf: &mut [u8]) -> bool {
    loop {
        // SAFETY: read(2) into our buffer of its length.
        let n = unsafe { libc::read(s.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            s.pending.extend_from_slice(&buf[..n as usize]);
            return true;
        }
        if n == 0 {
            return false;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return true,
            _ => return false,
        }
    }
}

/// The hub's thread.
fn forward(rx: mpsc::Receiver<Msg>, wake: OwnedFd, mut out: Sink, mut err: Sink) {
    let mut streams: Vec<Stream> = Vec::new();
    let mut until: Option<Instant> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut batch = Vec::new();
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    loop {
        for m in rx.try_iter() {
            match m {
                Msg::Add(s) => streams.push(s),
                Msg::Finish(t) => until = Some(t),
            }
        }
        if let Some(t) = until {
            if streams.is_empty() || Instant::now() >= t {
                break;
            }
        }
        pfds.clear();
        pfds.push(libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        pfds.extend(streams.iter().map(|s| libc::pollfd {
            fd: s.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        let timeout = match until {
            Some(t) => t
                .saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, i32::MAX as u128) as i32,
            None => -1,
        };
        // SAFETY: poll(2) over our vector of pollfds.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // Cannot poll (never expected): forward nothing more rather than spin.
            break;
        }
        if pfds[0].revents != 0 {
            let mut sink = [0u8; 64];
            // SAFETY: read(2) of the non-blocking wake pipe into a local buffer.
            while unsafe { libc::read(wake.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) } > 0
            {
            }
        }
        let mut ended = Vec::new();
        for (i, s) in streams.iter_mut().enumerate() {
            if pfds[i + 1].revents == 0 {
                continue;
            }
            let open = read_some(s, &mut buf);
            flush_lines(s, !open, &mut out, &mut err, &mut batch);
            if !open {
                ended.push(i);
            }
        }
        for i in ended.into_iter().rev() {
            streams.swap_remove(i);
        }
    }
    // Past the limit: what the remaining pipes gave so far is written, with its last line
    // completed.
    for s in &mut streams {
        flush_lines(s, true, &mut out, &mut err, &mut batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink tests read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            // One write of a batch: record it as a unit to check that lines never split.
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn pipe() -> (OwnedFd, std::fs::File) {
        let (r, w) = wake_pipe().unwrap();
        // The writer blocks (as a rank's stdout does).
        // SAFETY: fcntl on our descriptor.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, 0) };
        (r, std::fs::File::from(w))
    }

    #[test]
    fn output_written_before_the_writer_ended_is_all_forwarded() {
        let (out, err) = (Shared::default(), Shared::default());
        let hub = OutputHub::with_sinks(Box::new(out.clone()), Box::new(err.clone())).unwrap();
        let (r, mut w) = pipe();
        let (er, mut ew) = pipe();
        // Everything is written and the writers are gone before the hub sees the pipes,
        // as for a rank that printed and exited at once; the last line has no newline.
        for i in 0..1000 {
            writeln!(w, "line {i}").unwrap();
        }
        write!(w, "last").unwrap();
        write!(ew, "an error").unwrap();
        drop((w, ew));
        hub.add(r, 7, true, false);
        hub.add(er, 7, false, true);
        hub.finish(Duration::from_secs(30));
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1001, "{text}");
        for (i, l) in lines[..1000].iter().enumerate() {
            assert_eq!(*l, format!("[7] line {i}"));
        }
        assert_eq!(lines[1000], "[7] last");
        assert!(text.ends_with('\n'));
        assert_eq!(err.text(), "an error\n");
    }

    #[test]
    fn lines_of_many_ranks_written_in_pieces_never_mix() {
        let out = Shared::default();
        let hub =
            OutputHub::with_sinks(Box::new(out.clone()), Box::new(Shared::default())).unwrap();
        let ranks = 40;
        let lines_per_rank = 300;
        let mut writers = Vec::new();
        for rank in 0..ranks {
            let (r, mut w) = pipe();
            hub.add(r, rank, true, false);
            writers.push(std::thread::spawn(move || {
                for i in 0..lines_per_rank {
                    // Each line in three writes, so a reader sees partial lines.
                    let line = format!("rank {rank} line {i} {}\n", "x".repeat(i % 50));
                    let (a, rest) = line.as_bytes().split_at(line.len() / 3);
                    let (b, c) = rest.split_at(rest.len() / 2);
                    for piece in [a, b, c] {
                        w.write_all(piece).unwrap();
                        if i % 7 == 0 {
                            std::thread::yield_now();
                        }
                    }
                }
            }));
        }
        for t in writers {
            t.join().unwrap();
        }
        hub.finish(Duration::from_secs(60));
        let text = out.text();
        let mut next = vec![0usize; ranks];
        for l in text.lines() {
            // `[r] rank r line i xxx`: the prefix and the content agree, in order, whole.
            let (tag, rest) = l.split_once(' ').unwrap();
            let r: usize = tag.trim_matches(['[', ']']).parse().unwrap();
            let i = next[r];
            assert_eq!(
                rest,
                format!("rank {r} line {i} {}", "x".repeat(i % 50)),
                "{l}"
            );
            next[r] += 1;
        }
        assert_eq!(next, vec![lines_per_rank; ranks]);
    }

    #[test]
    fn a_pipe_held_open_past_the_limit_does_not_hold_the_hub() {
        let out = Shared::default();
        let hub =
            OutputHub::with_sinks(Box::new(out.clone()), Box::new(Shared::default())).unwrap();
        let (r, mut w) = pipe();
        write!(w, "partial").unwrap();
        hub.add(r, 0, false, false);
        // The writer stays open (a process left behind); finish returns at its limit with
        // what was read.
        hub.finish(Duration::from_millis(300));
        assert_eq!(out.text(), "partial\n");
        drop(w);
    }
}
