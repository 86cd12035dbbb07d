//! Ranks inherit none of their daemon's descriptors: krund holds libfabric endpoint sockets
//! opened without close-on-exec, listeners and client connections; a rank started by it
//! must see only its stdin, stdout and stderr (and what it opens itself).
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KRUN: &str = env!("CARGO_BIN_EXE_krun");
const KRUND: &str = env!("CARGO_BIN_EXE_krund");

/// Each rank lists its descriptors; `ls` is the rank itself (exec), so its only own
/// descriptor above stderr is the directory it reads.
const LIST: [&str; 3] = ["sh", "-c", "echo rank $KRUN_RANK; exec ls -l /proc/self/fd"];

/// The descriptors above stderr each rank reported, as `(fd, target)`, other than the
/// /proc directory `ls` opened itself.
fn inherited(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.split_once(" -> "))
        .filter_map(|(left, target)| {
            let fd = left.split_whitespace().last()?.to_string();
            let n: u32 = fd.parse().ok()?;
            (n > 2 && !target.starts_with("/proc/")).then(|| (fd, target.to_string()))
        })
        .collect()
}

fn check(out: &str, err: &str, ranks: usize) {
    assert_eq!(
        out.matches("rank ").count(),
        ranks,
        "every rank listed its descriptors\nstdout:\n{out}\nstderr:\n{err}"
    );
    // Each rank's listing has its stdout (the pipe to its node).
    assert!(out.matches(" 1 -> ").count() >= ranks, "{out}");
    let extra = inherited(out);
    assert!(
        extra.is_empty(),
        "ranks inherited descriptors: {extra:?}\n{out}"
    );
}

#[test]
fn ranks_of_a_local_job_inherit_no_descriptor_of_their_node() {
    // Without PMI (a rank's PMI socket is meant for it: see mpi_job.rs).
    let mut args = vec![
        "--mpi",
        "none",
        "--local",
        "2",
        "--provider",
        "tcp",
        "-n",
        "4",
    ];
    args.extend(LIST);
    let out = Command::new(KRUN)
        .args(&args)
        .env("KRUN_KRUND", KRUND)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    check(&stdout, &stderr, 4);
}

struct Daemon {
    child: Child,
    secret_file: std::path::PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.secret_file);
    }
}

#[test]
fn ranks_started_through_a_listening_krund_inherit_none_of_its_connections() {
    use std::os::unix::fs::PermissionsExt;
    let secret_file = std::env::temp_dir().join(format!("krun-fds-{}", std::process::id()));
    std::fs::write(&secret_file, "the cluster secret of the fd test").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(KRUND)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("KRUN_SECRET_FILE", &secret_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let d = Daemon { child, secret_file };
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "krund on {port} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let hosts = format!("127.0.0.1:{port}");
    let mut args = vec!["--mpi", "none", "--hosts", hosts.as_str(), "-n", "2"];
    args.extend(LIST);
    let out = Command::new(KRUN)
        .args(&args)
        .env("KRUN_SECRET_FILE", &d.secret_file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    check(&stdout, &stderr, 2);
}

#[test]
fn the_listing_parser_finds_inherited_sockets() {
    let listing = "rank 0\n\
        lr-x------ 1 u u 64 Dec  6 05:00 0 -> /dev/null\n\
        l-wx------ 1 u u 64 Dec  6 05:00 1 -> pipe:[1]\n\
        lr-x------ 1 u u 64 Dec  6 05:00 3 -> /proc/77/fd\n\
        lrwx------ 1 u u 64 Dec  6 05:00 17 -> socket:[9]\n";
    assert_eq!(
        inherited(listing),
        vec![("17".to_string(), "socket:[9]".to_string())]
    );
}
