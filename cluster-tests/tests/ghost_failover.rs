//! A node dies and its process comes back on another node from the buddy copy: three
//! network-namespace nodes each run a `krun-store`; node 0 runs a program linked with the
//! native checkpointer, whose captures (`krun ghost capture`) go to node 0's store (L1, then
//! L2 in node 1's memory over libfabric tcp). Node 0 is then SIGKILLed whole (program and
//! store); node 1 fetches the image from its own memory and `krun ghost restore`s it as a
//! new process, which continues from the captured step with the right checksums.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster_tests::workspace_bin;
use cluster_tests::{NetnsCluster, NodeProcess};
use fabric::bootstrap::BootstrapServer;
use fabric::secret::ClusterSecret;

struct Store {
    proc: NodeProcess,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Store {
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no answer to {cmd}"))
    }
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn steps(text: &str) -> BTreeMap<u64, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .map(|r| {
            let (s, c) = r.split_once(" checksum ").unwrap();
            (s.parse().unwrap(), c.to_string())
        })
        .collect()
}

fn build_workload(dir: &Path) -> PathBuf {
    let ghost = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ghost");
    let lib = workspace_bin("libghost.so");
    let libdir = lib.parent().unwrap();
    let bin = dir.join("workload");
    let ok = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(ghost.join("tests/native/workload.c"))
        .arg(format!("-I{}", ghost.join("include").display()))
        .arg(format!("-L{}", libdir.display()))
        .arg("-lghost")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .status()
        .unwrap()
        .success();
    assert!(ok, "compiling workload.c");
    bin
}

#[test]
fn a_process_of_a_killed_node_restarts_on_its_buddy_from_the_memory_copy() {
    let dir = Dir(PathBuf::from(format!(
        "/var/tmp/krun-failover-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let workload = build_workload(&dir.0);
    let (mib, total) = (64u32, 200u64);

    // Reference: the same program uninterrupted.
    let reference_out = dir.0.join("reference.out");
    let ok = Command::new(&workload)
        .arg(&reference_out)
        .args([mib.to_string(), total.to_string(), "0".into(), "0".into()])
        .env("KRUN_GHOST_DIR", dir.0.join("ref-images"))
        .env("KRUN_GHOST_OWNER", "reference")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let reference = steps(&std::fs::read_to_string(&reference_out).unwrap());

    let cluster = NetnsCluster::create(3, None).expect("namespace cluster (needs root)");
    let secret = ClusterSecret::random().unwrap();
    let node0 = cluster.node(0).unwrap();
    let ip0 = node0.ip();
    let boot_secret = secret.clone();
    let server = node0
        .in_thread(move || {
            BootstrapServer::start_with((ip0, 0), 3, Duration::from_secs(30), Some(boot_secret))
        })
        .join()
        .unwrap()
        .unwrap()
        .unwrap();
    let boot = server.addr().to_string();
    let mut stores: Vec<Store> = cluster
        .nodes()
        .map(|node| {
            let mut proc = node
                .spawn(
                    Command::new(workspace_bin("krun-store"))
                        .args([
                            "--bootstrap",
                            &boot,
                            "--rank",
                            &node.index().to_string(),
                            "--size",
                            "3",
                        ])
                        .args([
                            "--provider",
                            "tcp",
                            "--arena-mib",
                            "256",
                            "--timeout-secs",
                            "3",
                        ])
                        .env("KRUN_SECRET", secret.to_hex())
                        .env("KRUN_FABRIC_BIND", node.ip().to_string())
                        .env("KRUN_FABRIC_TIMEOUT_MS", "3000")
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped()),
                )
                .unwrap();
            let stdin = proc.stdin().unwrap();
            let out = BufReader::new(proc.stdout().unwrap());
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in out.lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
            Store {
                proc,
                stdin,
                lines: rx,
            }
        })
        .collect();
    for (i, s) in stores.iter_mut().enumerate() {
        let ready = s
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("store ready");
        assert!(ready.starts_with(&format!("ready node {i}")), "{ready}");
    }
    assert!(stores[0].ask("wait nothing 1 L1 0").starts_with("error"));

    // The program on node 0 (its L1 image directory is node 0's memory).
    let out = dir.0.join("run.out");
    let mut program = node0
        .spawn(
            Command::new(&workload)
                .arg(&out)
                .args([mib.to_string(), total.to_string(), "0".into(), "30".into()])
                .env("KRUN_GHOST_DIR", dir.0.join("node0-l1"))
                .env("KRUN_GHOST_OWNER", "job/rank0")
                .stdout(Stdio::null()),
        )
        .unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("step 10 ")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the program did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Node 0's checkpoint agent: capture, hand the image to the store, wait for L2.
    let krun = workspace_bin("krun");
    let image = dir.0.join("capture.kgi");
    let captured = Command::new(&krun)
        .args(["ghost", "capture", &program.pid().to_string(), "-o"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        captured.status.success(),
        "{}",
        String::from_utf8_lossy(&captured.stderr)
    );
    let a = stores[0].ask(&format!("put job/rank0 1 {}", image.display()));
    assert!(a.starts_with("ok put"), "{a}");
    assert_eq!(stores[0].ask("wait job/rank0 1 L2 60"), "ok safe L2");

    // Node 0 dies whole.
    program.kill().unwrap();
    stores[0].proc.kill().unwrap();
    std::fs::remove_dir_all(dir.0.join("node0-l1")).unwrap();
    std::fs::remove_file(&image).unwrap();
    let printed_before = steps(&std::fs::read_to_string(&out).unwrap());

    // Node 1 (node 0's buddy) restores it from its own memory.
    let fetched = dir.0.join("fetched.kgi");
    let a = stores[1].ask(&format!("get job/rank0 1 {}", fetched.display()));
    assert!(a.starts_with("ok get L2 1 "), "{a}");
    let node1 = cluster.node(1).unwrap();
    let mut restore = node1
        .spawn(
            Command::new(&krun)
                .args(["ghost", "restore"])
                .arg(&fetched)
                .arg("--workdir")
                .arg(dir.0.join("node1-restored"))
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let mut said = String::new();
    std::io::Read::read_to_string(&mut restore.stdout().unwrap(), &mut said).unwrap();
    assert!(restore.wait().unwrap().success(), "{said}");
    let pid: i32 = said.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let start = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .ends_with("done\n")
    {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the restored process did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&out).unwrap();
    let resumed = text
        .lines()
        .find(|l| l.starts_with("resumed"))
        .expect("resumed line");
    let captured_step: u64 = resumed.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(captured_step >= 10 && captured_step <= *printed_before.keys().last().unwrap());
    // After the resumed line: every step from captured_step + 1 to the end, as the reference.
    let after = steps(&text[text.find(resumed).unwrap()..]);
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        (captured_step + 1..=total).collect::<Vec<_>>()
    );
    for (s, c) in &after {
        assert_eq!(&reference[s], c, "step {s} after the restore on node 1");
    }
    assert!(
        !Path::new(&format!("/proc/{pid}/exe")).exists(),
        "restored pid {pid} finished"
    );
    for s in &mut stores[1..] {
        let _ = s.proc.kill();
    }
}
