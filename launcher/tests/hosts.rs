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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
