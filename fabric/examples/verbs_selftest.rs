//! Checks the fabric's semantics between two endpoints in two processes and prints one
//! `VERBS_TEST <name> PASS|FAIL <detail>` line per check; exits non-zero if any failed.
//!
//! The parent opens endpoint 0 and re-executes itself as a child (`child` argument) that
//! opens endpoint 1, owns the target memory and answers commands on its stdin with one line
//! on its stdout; the target memory is verified by the process that owns it.
//!
//! Endpoint `i` uses `SOFTROCE_DEV<i>` (verbs device), `SOFTROCE_GID<i>` (GID index) and
//! `SOFTROCE_IP<i>` (side-channel bind address) when set, on top of `KRUN_FABRIC_*`. The
//! provider defaults to verbs; `KRUN_FABRIC_PROVIDER=tcp` runs the same checks over
//! libfabric on any host. The soft-RoCE lane (cluster-tests/softroce/run.sh) runs it in a
//! QEMU guest between rxe0 and rxe1.
use std::collections::HashSet;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::{
    Endpoint, EndpointAddress, FabricConfig, FabricError, MemoryRegion, PeerId, Provider,
    ProviderChoice, Region, RemoteRegion,
};

type Check = Result<String, String>;

const BULK: usize = 64 << 20;
const CHUNK: usize = 1 << 20;
const MSG_WAIT: Duration = Duration::from_secs(20);

fn s<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

fn endpoint(index: usize) -> Result<Box<dyn Endpoint>, String> {
    endpoint_with(index, None)
}

fn endpoint_with(index: usize, timeout: Option<Duration>) -> Result<Box<dyn Endpoint>, String> {
    let config = config_for(index, timeout)?;
    fabric::open(&config).map_err(|e| format!("opening endpoint {index}: {e}"))
}

fn config_for(index: usize, timeout: Option<Duration>) -> Result<FabricConfig, String> {
    let mut config = FabricConfig::default().with_env().map_err(s)?;
    if let Some(t) = timeout {
        config.op_timeout = t;
    }
    if config.provider == ProviderChoice::Auto {
        config.provider = ProviderChoice::Exactly(Provider::Verbs);
    }
    if let Ok(dev) = std::env::var(format!("SOFTROCE_DEV{index}")) {
        config.verbs_device = Some(dev);
    }
    if let Ok(gid) = std::env::var(format!("SOFTROCE_GID{index}")) {
        config.verbs_gid_index = Some(
            gid.trim()
                .parse()
                .map_err(|e| format!("SOFTROCE_GID{index}={gid:?}: {e}"))?,
        );
    }
    if let Ok(ip) = std::env::var(format!("SOFTROCE_IP{index}")) {
        config.bind_address = ip;
    }
    Ok(config)
}

/// The side channel refuses an endpoint keyed with another cluster secret, says why, and
/// still serves the next client.
fn wrong_secret(target: &EndpointAddress) -> Check {
    let mut config = config_for(0, None)?;
    config.secret = Some(
        fabric::secret::ClusterSecret::new(b"not the secret of this job".to_vec()).map_err(s)?,
    );
    let stranger = fabric::open(&config).map_err(s)?;
    let e = match stranger.connect(target) {
        Ok(_) => return Err("an endpoint with another secret connected".into()),
        Err(e) => e.to_string(),
    };
    if !e.contains("wrong cluster secret") {
        return Err(format!("refused, but not for the secret: {e}"));
    }
    let next = endpoint(0)?;
    next.connect(target)
        .map_err(|e| format!("after the refused client: {e}"))?;
    Ok(format!("refused ({e}); the next client connects"))
}

/// The bulk test's content: every 8-byte word differs (a multiplicative hash of its index),
/// so a misplaced, stale or torn chunk shows. Word-wise: cheap under emulation.
fn pattern() -> Vec<u8> {
    let mut data = vec![0u8; BULK];
    for (i, w) in data.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(
            &(i as u64 ^ 0x5a5a)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .to_le_bytes(),
        );
    }
    data
}

/// The first byte where `seen` differs from `want`, if any (memcmp first: fast when equal).
fn first_difference(seen: &[u8], want: &[u8]) -> Option<usize> {
    if seen == want {
        return None;
    }
    Some(
        (0..seen.len().min(want.len()))
            .find(|&i| seen[i] != want[i])
            .unwrap_or(0),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("odd hex length in {text:?}"));
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(s))
        .collect()
}

fn remote_from_hex(text: &str) -> Result<RemoteRegion, String> {
    RemoteRegion::from_bytes(&unhex(text)?).map_err(s)
}

fn word(region: &MemoryRegion, offset: usize) -> Result<u64, String> {
    Ok(region.atomic_u64(offset).map_err(s)?.load(Ordering::SeqCst))
}

// ------------------------------------------------------------------------------ child side

/// Child mode: endpoint 1 with the target memory; one answer line per command line.
fn child() -> Result<(), String> {
    let b = endpoint(1)?;
    let target = b.register(Region::new(BULK).map_err(s)?).map_err(s)?;
    let counters = b.register(Region::new(4096).map_err(s)?).map_err(s)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ready {} {} {}",
        b.address().to_hex(),
        hex(&target.remote().to_bytes()),
        hex(&counters.remote().to_bytes())
    )
    .map_err(s)?;
    out.flush().map_err(s)?;
    let mut parent: Option<EndpointAddress> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(s)?;
        let mut words = line.split_whitespace();
        let answer: Check = match (words.next(), words.next()) {
            (Some("verify-bulk"), _) => {
                let mut seen = vec![0u8; BULK];
                target.read_bytes(0, &mut seen).map_err(s)?;
                match first_difference(&seen, &pattern()) {
                    None => Ok("64 MiB verified at the target".into()),
                    Some(i) => Err(format!("target byte {i} differs from what was written")),
                }
            }
            (Some("words"), _) => Ok(format!(
                "{} {} {}",
                word(&counters, 0)?,
                word(&counters, 16)?,
                word(&counters, 24)?
            )),
            (Some("peer"), Some(addr)) => EndpointAddress::from_hex(addr)
                .map(|a| {
                    parent = Some(a);
                    "noted".to_string()
                })
                .map_err(s),
            (Some("echo"), Some(tag)) => echo(b.as_ref(), parent.as_ref(), tag),
            (Some("quit"), _) => return Ok(()),
            _ => Err(format!("unknown command {line:?}")),
        };
        let text = match answer {
            Ok(t) => format!("ok {t}"),
            Err(e) => format!("err {e}"),
        };
        writeln!(out, "{text}").map_err(s)?;
        out.flush().map_err(s)?;
    }
    Ok(())
}

/// Receives `tag` from the parent, which this endpoint has never connected to: the message
/// must still name it, and connecting to the parent must give that same id. Answers on
/// `tag + 1` with the payload reversed.
fn echo(b: &dyn Endpoint, parent: Option<&EndpointAddress>, tag: &str) -> Check {
    let tag: u64 = tag.parse().map_err(s)?;
    let parent = parent.ok_or("no parent address given")?;
    let m = b.recv(tag, MSG_WAIT).map_err(s)?;
    let id = b.connect(parent).map_err(s)?;
    // libfabric endpoints name only peers they connected to themselves.
    let learned = match m.peer {
        Some(p) => p,
        None if b.provider() != Provider::Verbs => id,
        None => return Err("the message does not name its sender".into()),
    };
    if id != learned {
        return Err(format!(
            "message named peer {learned}, but connecting to the parent gave {id}"
        ));
    }
    let reply: Vec<u8> = m.data.iter().rev().copied().collect();
    b.send(id, tag + 1, &reply).map_err(s)?;
    Ok(format!("{} bytes from peer {learned}", m.data.len()))
}

// ----------------------------------------------------------------------------- parent side

struct Target {
    child: Child,
    input: BufWriter<ChildStdin>,
    output: BufReader<ChildStdout>,
}

impl Target {
    fn spawn(mode: &str) -> Result<(Target, String), String> {
        let exe = std::env::current_exe().map_err(s)?;
        let mut child = Command::new(exe)
            .arg(mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the {mode} process: {e}"))?;
        let input = BufWriter::new(child.stdin.take().ok_or("no child stdin")?);
        let output = BufReader::new(child.stdout.take().ok_or("no child stdout")?);
        let mut t = Target {
            child,
            input,
            output,
        };
        let first = t.line()?;
        Ok((t, first))
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.output.read_line(&mut line) {
            Ok(0) => Err("the child process exited".into()),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => Err(format!("reading from the child: {e}")),
        }
    }

    /// Sends a command, returns the child's `ok` text or its error.
    fn ask(&mut self, command: &str) -> Check {
        writeln!(self.input, "{command}").map_err(s)?;
        self.input.flush().map_err(s)?;
        let answer = self.line()?;
        match answer.split_once(' ') {
            Some(("ok", rest)) => Ok(rest.to_string()),
            Some(("err", rest)) => Err(format!("child: {rest}")),
            _ => Err(format!("child answered {answer:?}")),
        }
    }

    fn stop(mut self) {
        let _ = writeln!(self.input, "quit");
        let _ = self.input.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `post(i)` for every chunk with at most `WINDOW` operations outstanding (each op's
/// timeout runs from its posting, so a deep queue of 1 MiB operations on a slow link would
/// time out while merely queued).
fn windowed(post: impl Fn(usize) -> fabric::Result<fabric::Completion>) -> Result<(), String> {
    const WINDOW: usize = 8;
    let mut pending = std::collections::VecDeque::new();
    for i in 0..BULK / CHUNK {
        if pending.len() == WINDOW {
            let c: fabric::Completion = pending.pop_front().expect("window is full");
            c.wait().map_err(s)?;
        }
        pending.push_back(post(i).map_err(s)?);
    }
    fabric::wait_all(pending).map_err(s)
}

fn bulk(a: &dyn Endpoint, peer: PeerId, target: &RemoteRegion, child: &mut Target) -> Check {
    let local = a.register(Region::new(BULK).map_err(s)?).map_err(s)?;
    let data = pattern();
    local.write_bytes(0, &data).map_err(s)?;
    let start = Instant::now();
    windowed(|i| {
        // SAFETY: distinct chunks of a private buffer, untouched until completion.
        unsafe { a.post_write(peer, &local, i * CHUNK, CHUNK, target, (i * CHUNK) as u64) }
    })?;
    let wrote = start.elapsed();
    // Completion means visible at the target: the child checks its memory right away.
    child.ask("verify-bulk")?;
    local.fill(0, BULK, 0).map_err(s)?;
    let start = Instant::now();
    windowed(|i| {
        // SAFETY: as above.
        unsafe { a.post_read(peer, &local, i * CHUNK, CHUNK, target, (i * CHUNK) as u64) }
    })?;
    let read = start.elapsed();
    let mut seen = vec![0u8; BULK];
    local.read_bytes(0, &mut seen).map_err(s)?;
    if let Some(i) = first_difference(&seen, &data) {
        return Err(format!("read back differs at byte {i}"));
    }
    Ok(format!(
        "64 MiB written in {:.0} ms (verified by the target process), read back in {:.0} ms",
        wrote.as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3
    ))
}

fn fetch_add(
    a: &Arc<dyn Endpoint>,
    peer: PeerId,
    counters: RemoteRegion,
    child: &mut Target,
) -> Check {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || {
                (0..1000)
                    .map(|_| a.fetch_add(peer, &counters, 0, 1))
                    .collect::<Result<Vec<u64>, _>>()
            })
        })
        .collect();
    let mut fetched = HashSet::new();
    for t in threads {
        let values = t.join().map_err(|_| "a thread panicked")?.map_err(s)?;
        fetched.extend(values);
    }
    let words = child.ask("words")?;
    let final_value: u64 = words.split(' ').next().unwrap_or("").parse().map_err(s)?;
    if final_value != 4000 {
        return Err(format!("counter is {final_value}, expected 4000"));
    }
    if fetched != (0..4000).collect::<HashSet<u64>>() {
        return Err(format!(
            "the 4000 fetched values are not 0..4000 once each ({} distinct)",
            fetched.len()
        ));
    }
    Ok("4 threads x 1000 fetch-adds: counter 4000, every previous value seen once".into())
}

fn cas_lock(
    a: &Arc<dyn Endpoint>,
    peer: PeerId,
    counters: RemoteRegion,
    child: &mut Target,
) -> Check {
    // Word 8 is the lock; words 16 and 24 a record whose halves must stay equal.
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || -> Result<u64, FabricError> {
                let scratch = a.register(Region::new(4096)?)?;
                let mut spins = 0;
                for _ in 0..100 {
                    while a.compare_swap(peer, &counters, 8, 0, t + 1)? != 0 {
                        spins += 1;
                    }
                    // SAFETY: the lock gives this thread the record; scratch is private.
                    unsafe { a.read(peer, &scratch, 0, 16, &counters, 16)? };
                    let x = scratch.atomic_u64(0)?.load(Ordering::SeqCst);
                    let y = scratch.atomic_u64(8)?.load(Ordering::SeqCst);
                    if x != y {
                        return Err(FabricError::Bootstrap(format!("torn record {x}/{y}")));
                    }
                    scratch.atomic_u64(0)?.store(x + 1, Ordering::SeqCst);
                    scratch.atomic_u64(8)?.store(x + 1, Ordering::SeqCst);
                    // SAFETY: as above.
                    unsafe { a.write(peer, &scratch, 0, 16, &counters, 16)? };
                    if a.compare_swap(peer, &counters, 8, t + 1, 0)? != t + 1 {
                        return Err(FabricError::Bootstrap("lost the lock".into()));
                    }
                }
                Ok(spins)
            })
        })
        .collect();
    let mut spins = 0;
    for t in threads {
        spins += t.join().map_err(|_| "a thread panicked")?.map_err(s)?;
    }
    let words = child.ask("words")?;
    let w: Vec<&str> = words.split(' ').collect();
    if w.get(1..3) == Some(&["300", "300"][..]) {
        Ok(format!(
            "3 threads x 100 locked increments: record 300/300 ({spins} contended CAS)"
        ))
    } else {
        Err(format!(
            "record is {words:?} (counter, a, b), expected 300/300"
        ))
    }
}

fn messages(a: &dyn Endpoint, peer: PeerId, child: &mut Target) -> Check {
    child.ask(&format!("peer {}", a.address().to_hex()))?;
    let mut detail = Vec::new();
    for (tag, payload) in [
        (7u64, b"ping".to_vec()),
        (9, (0..60_000).map(|i| i as u8).collect()),
    ] {
        a.send(peer, tag, &payload).map_err(s)?;
        detail.push(child.ask(&format!("echo {tag}"))?);
        let m = a.recv(tag + 1, MSG_WAIT).map_err(s)?;
        let want: Vec<u8> = payload.iter().rev().copied().collect();
        if m.data != want || m.peer != Some(peer) {
            return Err(format!(
                "reply on tag {}: {} bytes from {:?}, expected {} bytes from {peer}",
                tag + 1,
                m.data.len(),
                m.peer,
                want.len()
            ));
        }
    }
    let too_big = vec![0u8; 16 << 20];
    if !matches!(
        a.send(peer, 1, &too_big),
        Err(FabricError::MessageTooLarge { .. })
    ) {
        return Err("a 16 MiB message was not refused as too large".into());
    }
    Ok(format!(
        "tagged messages both ways, passive side names its peer ({})",
        detail.join("; ")
    ))
}

fn errors(a: &dyn Endpoint, peer: PeerId, remote: RemoteRegion) -> Check {
    let local = a.register(Region::new(4096).map_err(s)?).map_err(s)?;
    // SAFETY: refused before anything is posted.
    let oob = unsafe { a.write(peer, &local, 0, 64, &remote, remote.len - 8) };
    if !matches!(oob, Err(FabricError::OutOfBounds { .. })) {
        return Err(format!("out-of-bounds write gave {oob:?}"));
    }
    // SAFETY: as above.
    let oob = unsafe { a.read(peer, &local, 4090, 64, &remote, 0) };
    if !matches!(oob, Err(FabricError::OutOfBounds { .. })) {
        return Err(format!("read beyond the local region gave {oob:?}"));
    }
    if !matches!(
        a.fetch_add(peer, &remote, 4, 1),
        Err(FabricError::Misaligned(4))
    ) {
        return Err("a misaligned atomic was not refused".into());
    }
    let forged = RemoteRegion {
        key: remote.key ^ 0x00ab_cd00,
        ..remote
    };
    let start = Instant::now();
    let bad = a.fetch_add(peer, &forged, 0, 1);
    let took = start.elapsed();
    let verbs = a.provider() == Provider::Verbs;
    let bad_text = match bad {
        Err(FabricError::RemoteAccess { .. }) => bad.unwrap_err().to_string(),
        Err(e @ FabricError::Remote { .. }) if !verbs => e.to_string(),
        Err(e @ FabricError::Timeout { .. }) if !verbs => e.to_string(),
        other => return Err(format!("a forged key gave {other:?} after {took:?}")),
    };
    // On RC the access error moved the queue pair to the error state: later operations must
    // fail at once, naming the peer.
    let start = Instant::now();
    let after = a.fetch_add(peer, &remote, 0, 0);
    let after_took = start.elapsed();
    let after_text = match after {
        Ok(_) if !verbs => "later operations still work".to_string(),
        Err(e) if e.to_string().contains(&peer.to_string()) && after_took < a.op_timeout() => {
            format!("next operation failed in {after_took:?}: {e}")
        }
        other => {
            return Err(format!(
                "after the access error: {other:?} in {after_took:?}"
            ))
        }
    };
    Ok(format!(
        "out of bounds and misalignment refused locally; bad key refused in {took:?}: \
         {bad_text}; {after_text}"
    ))
}

/// A peer process killed with SIGKILL while writes stream into it: the writer gets an error
/// naming the peer within a bounded time.
fn killed_peer() -> Check {
    let a = endpoint_with(0, Some(Duration::from_secs(3)))?;
    let a = a.as_ref();
    let (mut target, first) = Target::spawn("child")?;
    let mut parts = first.split_whitespace();
    let (Some("ready"), Some(addr), Some(region)) = (parts.next(), parts.next(), parts.next())
    else {
        target.stop();
        return Err(format!("target said {first:?}"));
    };
    let addr = EndpointAddress::from_hex(addr).map_err(s)?;
    let remote = remote_from_hex(region)?;
    let peer = a.connect(&addr).map_err(s)?;
    let local = a.register(Region::new(CHUNK).map_err(s)?).map_err(s)?;
    let mut killed_at = None;
    let mut outcome = None;
    let mut written = 0;
    for i in 0..10_000u64 {
        if i == 8 {
            let _ = target.child.kill();
            let _ = target.child.wait();
            killed_at = Some(Instant::now());
        }
        // SAFETY: `local` is private; the target region is only ours to write.
        let r = unsafe { a.write(peer, &local, 0, CHUNK, &remote, (i % 64) * CHUNK as u64) };
        match r {
            Ok(()) => written += 1,
            Err(e) => {
                outcome = Some(e);
                break;
            }
        }
    }
    let _ = target.child.kill();
    let _ = target.child.wait();
    let limit = a.op_timeout() + Duration::from_secs(5);
    match (outcome, killed_at) {
        (Some(e), Some(t))
            if written >= 8 && e.to_string().contains(&peer.to_string()) && t.elapsed() < limit =>
        {
            Ok(format!(
                "{written} writes, then an error {:?} after the kill: {e}",
                t.elapsed()
            ))
        }
        (Some(e), _) => Err(format!("after {written} writes: {e}")),
        (None, _) => Err("writes kept succeeding after the peer was killed".into()),
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("child") {
        if let Err(e) = child() {
            println!("err {e}");
            std::process::exit(1);
        }
        return;
    }
    let started = Instant::now();
    let setup = || -> Result<_, String> {
        let (target, first) = Target::spawn("child")?;
        let w: Vec<&str> = first.split_whitespace().collect();
        if w.len() != 4 || w[0] != "ready" {
            target.stop();
            return Err(format!("the target process said {first:?}"));
        }
        let addr = EndpointAddress::from_hex(w[1]).map_err(s)?;
        let bulk_target = remote_from_hex(w[2])?;
        let counters = remote_from_hex(w[3])?;
        let a: Arc<dyn Endpoint> = Arc::from(endpoint(0)?);
        let peer = a
            .connect(&addr)
            .map_err(|e| format!("connect to the target: {e}"))?;
        if a.connect(&addr).map_err(s)? != peer {
            return Err("connecting twice gave another peer id".into());
        }
        Ok((a, peer, target, bulk_target, counters, addr))
    };
    let (a, peer, mut target, bulk_target, counters, addr) = match setup() {
        Ok(x) => x,
        Err(e) => {
            println!("VERBS_TEST setup FAIL {e}");
            println!("verbs selftest: 0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    println!(
        "provider {} (parent pid {}, target pid {}, op timeout {:?})",
        a.provider(),
        std::process::id(),
        target.child.id(),
        a.op_timeout()
    );
    let mut results: Vec<(&str, Check)> = Vec::new();
    let mut run = |name: &'static str, check: &mut dyn FnMut() -> Check| {
        let t = Instant::now();
        let r = check();
        match &r {
            Ok(detail) => println!(
                "VERBS_TEST {name} PASS {detail} [{:.1}s]",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => println!(
                "VERBS_TEST {name} FAIL {e} [{:.1}s]",
                t.elapsed().as_secs_f64()
            ),
        }
        results.push((name, r));
    };
    run("write_read_64mib", &mut || {
        bulk(a.as_ref(), peer, &bulk_target, &mut target)
    });
    run("fetch_add_4x1000", &mut || {
        fetch_add(&a, peer, counters, &mut target)
    });
    run("cas_lock", &mut || {
        cas_lock(&a, peer, counters, &mut target)
    });
    run("messages", &mut || messages(a.as_ref(), peer, &mut target));
    run("wrong_secret", &mut || wrong_secret(&addr));
    // Last on this peer: on verbs a remote access error breaks the queue pair to it.
    run("errors", &mut || errors(a.as_ref(), peer, counters));
    run("killed_peer", &mut killed_peer);
    target.stop();
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    println!(
        "verbs selftest: {} passed, {failed} failed in {:.1}s",
        results.len() - failed,
        started.elapsed().as_secs_f64()
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
