//! Store nodes as separate processes over libfabric tcp: a SIGKILLed node's image is read
//! from its buddy's memory; with its buddy killed too, it is rebuilt from parity; a dead
//! peer gives an error naming it in bounded time.
use fabric::bootstrap::BootstrapServer;
use fabric::secret::ClusterSecret;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Node {
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no answer to {cmd:?}"))
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(n: usize, groups: &[u32], parity: usize) -> (Vec<Node>, Dir) {
    let secret = ClusterSecret::random().unwrap();
    let server = BootstrapServer::start_with(
        "127.0.0.1:0",
        n,
        Duration::from_secs(30),
        Some(secret.clone()),
    )
    .unwrap();
    let dir = Dir(PathBuf::from(format!(
        "/var/tmp/krun-store-nodes-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let nodes = (0..n)
        .map(|rank| {
            let mut child = Command::new(env!("CARGO_BIN_EXE_krun-store"))
                .args(["--bootstrap", &server.addr().to_string()])
                .args(["--rank", &rank.to_string(), "--size", &n.to_string()])
                .args(["--provider", "tcp", "--group", &groups[rank].to_string()])
                .args([
                    "--arena-mib",
                    "64",
                    "--parity",
                    &parity.to_string(),
                    "--timeout-secs",
                    "5",
                ])
                .arg("--disk")
                .arg(dir.0.join(format!("disk{rank}")))
                .env("KRUN_SECRET", secret.to_hex())
                // Short enough to keep the dead-peer cases quick, long enough for a live peer
                // of a CI machine under load (2 s timed a live peer out once).
                .env("KRUN_FABRIC_TIMEOUT_MS", "5000")
                .env_remove("KRUN_SECRET_FILE")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdin = child.stdin.take().unwrap();
            let out = BufReader::new(child.stdout.take().unwrap());
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in out.lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
            Node {
                child,
                stdin,
                lines: rx,
            }
        })
        .collect::<Vec<_>>();
    let mut nodes = nodes;
    for (i, node) in nodes.iter_mut().enumerate() {
        let ready = node
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("node ready");
        assert!(ready.starts_with(&format!("ready node {i}")), "{ready}");
    }
    (nodes, dir)
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8 ^ seed).wrapping_add((i >> 8) as u8))
        .collect()
}

#[test]
fn killed_nodes_images_come_back_from_buddy_then_parity() {
    // Set {0,1,2} (failure group 0) and set {3,4} (group 1): node 0's buddy is node 3, the
    // parity of set 0 for version 1 lives on node 4.
    let (mut nodes, dir) = start(5, &[0, 0, 0, 1, 1], 3);
    for (i, node) in nodes.iter_mut().enumerate() {
        let file = dir.0.join(format!("in{i}"));
        std::fs::write(&file, data((3 << 20) + i * 4099, i as u8)).unwrap();
        let a = node.ask(&format!("put rank{i} 1 {}", file.display()));
        assert!(a.starts_with("ok put"), "{a}");
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        for level in ["L2", "L3", "L4"] {
            let a = node.ask(&format!("wait rank{i} 1 {level} 60"));
            assert_eq!(a, format!("ok safe {level}"), "node {i}");
        }
    }
    // Node 0 dies: node 2 reads rank0 from node 3's memory.
    nodes[0].kill();
    let out = dir.0.join("out-a");
    let a = nodes[2].ask(&format!("get rank0 1 {}", out.display()));
    assert!(a.starts_with("ok get L2 3 "), "{a}");
    assert_eq!(std::fs::read(&out).unwrap(), data(3 << 20, 0));
    // Its buddy dies too: rebuilt from node 4's parity and ranks 1 and 2.
    nodes[3].kill();
    let out = dir.0.join("out-b");
    let a = nodes[1].ask(&format!("get rank0 1 {}", out.display()));
    assert!(a.starts_with("ok get L3 4 "), "{a}");
    assert_eq!(std::fs::read(&out).unwrap(), data(3 << 20, 0));
    // An image nobody holds: the error names the dead peers (each within the 5 s timeout).
    let a = nodes[1].ask(&format!("get nobody 1 {}", dir.0.join("x").display()));
    assert!(
        a.starts_with("error") && a.contains("node 0") && a.contains("node 3"),
        "{a}"
    );
}
