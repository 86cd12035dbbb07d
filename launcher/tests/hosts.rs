//! Host mode on loopback: `krund --listen` daemons on distinct ports stand in for hosts.
//! (Hosts in network namespaces are exercised by cluster-tests.)
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KRUN: &str = env!("CARGO_BIN_EXE_krun");
const KRUND: &str = env!("CARGO_BIN_EXE_krund");
const SELFTEST: &str = env!("CARGO_BIN_EXE_krun-selftest");

/// Daemons started by a test; killed by PID and reaped on drop.
struct Daemons {
    children: Vec<Child>,
    ports: Vec<u16>,
    secret_file: std::path::PathBuf,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.secret_file);
    }
}

/// A free port below the kernel's ephemeral range (32768-60999 here), so that no outgoing
/// connection of a concurrent test takes it before krund binds it; each test process
/// walks its own stretch of 20000-31999.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = (std::process::id() % 400) * 30;
    for _ in 0..12_000 {
        let port = 20_000 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port in 20000-31999");
}

fn secret_file(name: &str, secret: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("krun-hosts-{name}-{}", std::process::id()));
    std::fs::write(&path, secret).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn daemons(n: usize, name: &str) -> Daemons {
    let secret_file = secret_file(name, "the cluster secret of this test");
    let mut d = Daemons {
        children: Vec::new(),
        ports: Vec::new(),
        secret_file,
    };
    for _ in 0..n {
        let port = free_port();
        let child = Command::new(KRUND)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("KRUN_SECRET_FILE", &d.secret_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        d.children.push(child);
        d.ports.push(port);
    }
    // Ready when every port accepts.
    let start = Instant::now();
    for &p in &d.ports {
        while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon on {p} never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    d
}

impl Daemons {
    fn hosts(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn krun(args: &[&str], secret_file: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(KRUN)
        .args(args)
        .env("KRUN_SECRET_FILE", secret_file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ranks_on_three_hosts_exchange_over_the_fabric() {
    let d = daemons(3, "ok");
    let (code, out, err) = krun(
        &["--hosts", &d.hosts(), "-n", "6", SELFTEST],
        &d.secret_file,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches(": ok: verified 64 KiB").count(), 6, "{out}");
    assert!(out.contains("counter 6"), "{out}");
    let (code, out, _) = krun(&["status", "--hosts", &d.hosts()], &d.secret_file);
    assert_eq!(code, 0);
    assert_eq!(out.matches("state up jobs 0").count(), 3, "{out}");
}

#[test]
fn a_hostfile_works_like_a_host_list() {
    let d = daemons(2, "file");
    let file = std::env::temp_dir().join(format!("krun-hostfile-{}", std::process::id()));
    let body: String = d
        .ports
        .iter()
        .map(|p| format!("127.0.0.1:{p} slots=2  # a comment\n"))
        .collect();
    std::fs::write(&file, format!("# hosts of the test\n{body}\n")).unwrap();
    let (code, out, err) = krun(
        &["--hostfile", file.to_str().unwrap(), "-n", "4", SELFTEST],
        &d.secret_file,
    );
    std::fs::remove_file(&file).unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches(": ok: verified").count(), 4, "{out}");
}

#[test]
fn a_wrong_secret_and_a_silent_host_are_named() {
    let d = daemons(1, "secret");
    let wrong = secret_file("wrong", "not the secret of this cluster");
    let (code, _, err) = krun(&["--hosts", &d.hosts(), "true"], &wrong);
    std::fs::remove_file(&wrong).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("refused us: wrong cluster secret"), "{err}");
    let silent = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = krun(&["--hosts", &silent, "true"], &d.secret_file);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("host {silent}: does not answer")),
        "{err}"
    );
    let (code, out, _) = krun(
        &["status", "--hosts", &format!("{},{silent}", d.hosts())],
        &d.secret_file,
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("state up") && out.contains(&format!("{silent}: down")),
        "{out}"
    );
}

#[test]
fn a_killed_host_is_reported_with_its_ranks_and_the_job_ends() {
    let mut d = daemons(3, "kill");
    let child = Command::new(KRUN)
        .args(["--hosts", &d.hosts(), "-n", "6", "sh", "-c", "sleep 60"])
        .env("KRUN_SECRET_FILE", &d.secret_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until host 1 runs its node process (status shows a job).
    let start = Instant::now();
    loop {
        let (_, out, _) = krun(
            &["status", "--hosts", &format!("127.0.0.1:{}", d.ports[1])],
            &d.secret_file,
        );
        if out.contains("jobs 1") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the job never started: {out}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed_at = Instant::now();
    d.children[1].kill().unwrap();
    d.children[1].wait().unwrap();
    let out = child.wait_with_output().unwrap();
    let ended_after = killed_at.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains(&format!(
            "lost node 1 (ranks 2..3) on host 127.0.0.1:{}",
            d.ports[1]
        )),
        "{err}"
    );
    assert!(
        ended_after < Duration::from_secs(30),
        "the job took {ended_after:?} to end"
    );
}

#[test]
fn stdin_reaches_rank_zero_on_its_host() {
    let d = daemons(2, "stdin");
    let mut child = Command::new(KRUN)
        .args([
            "--hosts",
            &d.hosts(),
            "-n",
            "2",
            "--tag-output",
            "sh",
            "-c",
            "if [ $KRUN_RANK = 0 ]; then wc -l; else echo idle; fi",
        ])
        .env("KRUN_SECRET_FILE", &d.secret_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        for i in 0..50_000 {
            writeln!(input, "line {i}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("[0] 50000"), "{text}");
    assert!(text.contains("[1] idle"), "{text}");
}

// ---- security: fail closed, every frame authenticated ----

/// Runs `krund ARGS` without any cluster secret in its environment (plus `env`); returns
/// its exit code and stderr, or kills it after 20 s (a daemon that started) and says so.
fn krund_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(KRUND);
    cmd.args(args)
        .env_remove("KRUN_SECRET")
        .env_remove("KRUN_SECRET_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            return (None, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn krund_listen_without_a_secret_refuses_to_start_and_insecure_needs_loopback() {
    let port = free_port().to_string();
    // The secret is checked before anything binds: the default port is safe to name here.
    for args in [
        vec!["--listen", "127.0.0.1"],
        vec!["--listen"],
        vec!["--listen", &format!("127.0.0.1:{port}")],
    ] {
        let (code, err) = krund_exit(&args, &[]);
        assert!(
            code.is_some_and(|c| c != 0),
            "{args:?}: krund started: {err}"
        );
        assert!(
            err.contains("refuses to start without a cluster secret")
                && err.contains("KRUN_SECRET_FILE")
                && err.contains("KRUN_SECRET"),
            "{args:?}: {err}"
        );
    }
    let (code, err) = krund_exit(&["--listen", &format!("0.0.0.0:{port}"), "--insecure"], &[]);
    assert!(code.is_some_and(|c| c != 0), "krund started: {err}");
    assert!(err.contains("loopback"), "{err}");
    // On loopback --insecure starts, warns, and serves clients without a secret.
    let mut daemon = Command::new(KRUND)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--insecure"])
        .env_remove("KRUN_SECRET")
        .env_remove("KRUN_SECRET_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(daemon.stderr.take().unwrap());
    let mut banner = String::new();
    for _ in 0..2 {
        std::io::BufRead::read_line(&mut stderr, &mut banner).unwrap();
    }
    let out = Command::new(KRUN)
        .args(["status", "--hosts", &format!("127.0.0.1:{port}")])
        .env_remove("KRUN_SECRET")
        .env_remove("KRUN_SECRET_FILE")
        .output()
        .unwrap();
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(
        banner.contains("INSECURE") && banner.contains("WARNING"),
        "{banner}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state up"), "{text}");
}

#[test]
fn a_non_ascii_secret_is_a_clear_error_for_krun_and_krund_and_is_never_printed() {
    let secret = "a\u{e9}1";
    let port = free_port().to_string();
    let (code, err) = krund_exit(
        &["--listen", &format!("127.0.0.1:{port}")],
        &[("KRUN_SECRET", secret)],
    );
    assert!(code.is_some_and(|c| c != 0 && c != 101), "{code:?}: {err}");
    assert!(
        err.contains("KRUN_SECRET") && err.contains("not hex"),
        "{err}"
    );
    assert!(!err.contains(secret) && !err.contains("panicked"), "{err}");
    let out = Command::new(KRUN)
        .args(["--local", "1", "true"])
        .env_remove("KRUN_SECRET_FILE")
        .env("KRUN_SECRET", secret)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c != 0 && c != 101),
        "{err}"
    );
    assert!(
        err.contains("KRUN_SECRET") && err.contains("not hex"),
        "{err}"
    );
    assert!(!err.contains(secret) && !err.contains("panicked"), "{err}");
}

/// A man in the middle on 127.0.0.1: forwards every connection to `upstream`, replacing
/// `from` by `to` (same length) in what the client sends; counts the replacements.
struct Relay {
    port: u16,
    rewritten: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn relay(upstream: u16, from: &'static [u8], to: &'static [u8]) -> Relay {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    assert_eq!(from.len(), to.len());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let rewritten = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = rewritten.clone();
    std::thread::spawn(move || {
        // Bounded: a test makes a handful of connections.
        for client in listener.incoming().take(16).flatten() {
            let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_in, mut c_out) = (server, client);
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = c_in.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let chunk = &mut buf[..n];
                    let mut i = 0;
                    while i + from.len() <= chunk.len() {
                        if &chunk[i..i + from.len()] == from {
                            chunk[i..i + from.len()].copy_from_slice(to);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        i += 1;
                    }
                    if s_out.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Relay { port, rewritten }
}

#[test]
fn a_relay_that_rewrites_the_run_request_is_refused_and_nothing_runs() {
    use std::sync::atomic::Ordering;
    let mut d = daemons(1, "mitm");
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let marker = |tag: &str| dir.join(format!("krun-mitm-{tag}-{pid}"));
    for tag in ["A", "B", "C"] {
        let _ = std::fs::remove_file(marker(tag));
    }
    // The relay is transparent while it changes nothing: the job runs through it.
    let honest = relay(d.ports[0], b"krun-mitm-Z", b"krun-mitm-Z");
    let (code, out, err) = krun(
        &[
            "--hosts",
            &format!("127.0.0.1:{}", honest.port),
            "-n",
            "1",
            "touch",
            marker("C").to_str().unwrap(),
        ],
        &d.secret_file,
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        marker("C").exists(),
        "the job did not run through the relay"
    );
    // Now it swaps the program's argument after the login.
    let evil = relay(d.ports[0], b"krun-mitm-A", b"krun-mitm-B");
    let (code, _, err) = krun(
        &[
            "--hosts",
            &format!("127.0.0.1:{}", evil.port),
            "-n",
            "1",
            "touch",
            marker("A").to_str().unwrap(),
        ],
        &d.secret_file,
    );
    assert!(
        evil.rewritten.load(Ordering::SeqCst) > 0,
        "the relay saw no request"
    );
    assert_ne!(code, 0, "{err}");
    assert!(!marker("B").exists(), "the injected command ran");
    assert!(!marker("A").exists(), "the altered request ran");
    assert!(d.children[0].try_wait().unwrap().is_none(), "krund died");
    let (code, out, _) = krun(&["status", "--hosts", &d.hosts()], &d.secret_file);
    assert_eq!(code, 0);
    assert!(out.contains("state up jobs 0"), "{out}");
    let _ = std::fs::remove_file(marker("C"));
    assert_eq!(honest.rewritten.load(Ordering::SeqCst), 0);
}

/// The daemon's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn the_daemon_rejects_bad_frames_and_keeps_serving() {
    use fabric::secret::ClusterSecret;
    use fabric::wire::{Protocol, Session};
    use launcher::daemon::ToDaemon;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let mut d = daemons(1, "bad");
    let port = d.ports[0];
    let secret = ClusterSecret::new(b"the cluster secret of this test".to_vec()).unwrap();
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    let session = || {
        let mut s = connect();
        let session = Session::client(&mut s, &secret, Protocol::Control).unwrap();
        (s, session)
    };
    // The daemon closes the connection without answering.
    let closed_without_answer = |mut s: TcpStream, what: &str| {
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(
            rest.is_empty() && r.is_ok(),
            "{what}: the daemon answered {} bytes ({r:?})",
            rest.len()
        );
    };

    // Garbage instead of the handshake proof.
    let mut s = connect();
    let mut hello = [0u8; 39];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&[0x55; 71]).unwrap();
    closed_without_answer(s, "garbage");

    // Huge lengths before authentication: 8 connections announce 64 MiB frames and stall.
    let before = rss_kib(d.children[0].id());
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut s = connect();
        s.read_exact(&mut hello).unwrap();
        let mut header = b"KRW1\x01\x01\0\0".to_vec();
        header.extend_from_slice(&[0; 16]);
        header.extend_from_slice(&(64u32 << 20).to_le_bytes());
        s.write_all(&header).unwrap();
        stalled.push(s);
    }
    // While they stall, others are served.
    let (code, out, _) = krun(&["status", "--hosts", &d.hosts()], &d.secret_file);
    assert_eq!(code, 0);
    assert!(out.contains("state up"), "{out}");
    let grown = rss_kib(d.children[0].id()).saturating_sub(before);
    println!("8 stalled 64 MiB headers: krund resident memory grew by {grown} KiB");
    assert!(
        grown < 32 * 1024,
        "8 stalled headers grew the daemon by {grown} KiB"
    );
    drop(stalled);

    // A huge length after authentication is refused before anything is allocated for it.
    let (mut s, mut sess) = session();
    let mut f = sess.tx.seal(&ToDaemon::Status).unwrap();
    f[24..28].copy_from_slice(&(64u32 << 20).to_le_bytes());
    s.write_all(&f[..28]).unwrap();
    closed_without_answer(s, "huge length");

    // A bad tag.
    let (mut s, mut sess) = session();
    let mut f = sess.tx.seal(&ToDaemon::Status).unwrap();
    let last = f.len() - 1;
    f[last] ^= 1;
    s.write_all(&f).unwrap();
    closed_without_answer(s, "bad tag");

    // A frame replayed from an earlier connection, and a frame out of order.
    let (mut s, mut sess) = session();
    let recorded = sess.tx.seal(&ToDaemon::Status).unwrap();
    s.write_all(&recorded).unwrap();
    let status: launcher::daemon::FromDaemon = sess.rx.recv(&mut s).unwrap();
    assert!(matches!(status, launcher::daemon::FromDaemon::Status(_)));
    let (mut s, _sess) = session();
    s.write_all(&recorded).unwrap();
    closed_without_answer(s, "replayed frame");
    let (mut s, mut sess) = session();
    let _first = sess.tx.seal(&ToDaemon::Status).unwrap();
    let second = sess.tx.seal(&ToDaemon::Status).unwrap();
    s.write_all(&second).unwrap();
    closed_without_answer(s, "frame out of order");

    // A truncated frame.
    let (mut s, mut sess) = session();
    let f = sess.tx.seal(&ToDaemon::Status).unwrap();
    s.write_all(&f[..f.len() / 2]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    closed_without_answer(s, "truncated frame");

    // The daemon is up and serves a legitimate client and a job.
    assert!(d.children[0].try_wait().unwrap().is_none(), "krund died");
    let (code, out, err) = krun(&["--hosts", &d.hosts(), "-n", "1", "true"], &d.secret_file);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, _) = krun(&["status", "--hosts", &d.hosts()], &d.secret_file);
    assert_eq!(code, 0);
    assert!(out.contains("state up jobs 0"), "{out}");
}
