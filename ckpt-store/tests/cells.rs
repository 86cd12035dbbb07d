//! Store nodes as separate processes over libfabric tcp, placed from locator cells: a node's
//! image put without a copy (its L1 is the mapped file) is read from its buddy in the other
//! cell after the node is SIGKILLed, and the reports show where the bytes are.
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

fn start(n: usize, groups: &[u32], parity: usize, cells: &str) -> (Vec<Node>, Dir) {
    let secret = ClusterSecret::random().unwrap();
    let server = BootstrapServer::start_with(
        "127.0.0.1:0",
        n,
        Duration::from_secs(30),
        Some(secret.clone()),
    )
    .unwrap();
    let dir = Dir(PathBuf::from(format!(
        "/var/tmp/krun-store-cells-{}",
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
                    "10",
                ])
                .args(["--cells", cells])
                .arg("--disk")
                .arg(dir.0.join(format!("disk{rank}")))
                .env("KRUN_SECRET", secret.to_hex())
                .env("KRUN_FABRIC_TIMEOUT_MS", "2000")
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
fn a_killed_nodes_mapped_image_comes_back_from_its_buddy_in_another_cell() {
    // Cells {0,1} and {2,3}, one failure group: node 0's buddy is node 2 (the other cell).
    let (mut nodes, dir) = start(4, &[0, 0, 0, 0], 0, "0,1/2,3");
    let image = data((5 << 20) + 123, 9);
    let file = dir.0.join("rank-0.kgi");
    std::fs::write(&file, &image).unwrap();
    let a = nodes[0].ask(&format!("putfile rank-0 4 {}", file.display()));
    assert_eq!(a, format!("ok put {} bytes, 0 copied", image.len()));
    let a = nodes[0].ask("wait rank-0 4 L2 60");
    assert_eq!(a, "ok safe L2");
    // No parity here (L3 "-"); L4 follows L2 in the background (bounded poll).
    let mut safe = String::new();
    for _ in 0..600 {
        safe = nodes[0].ask("safe rank-0");
        if safe.ends_with(" 4") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(safe, "ok safe 4 4 - 4");
    assert_eq!(
        nodes[2].ask("usage"),
        format!("ok usage 0 {} 0 0", image.len()),
        "node 2 holds node 0's copy"
    );
    nodes[0].kill();
    // The membership tells node 1 that node 0 is gone; node 1 reads from node 2.
    assert_eq!(nodes[1].ask("down 0"), "ok down 0");
    let out = dir.0.join("out");
    let a = nodes[1].ask(&format!("get rank-0 4 {}", out.display()));
    assert_eq!(a, format!("ok get L2 2 {}", image.len()));
    assert!(std::fs::read(&out).unwrap() == image, "the copy differs");
    // An unknown node is refused by name.
    let a = nodes[1].ask("down 9");
    assert!(a.starts_with("error") && a.contains("node 9"), "{a}");
}
