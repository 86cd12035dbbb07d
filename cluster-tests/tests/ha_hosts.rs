//! Spares and failure injection across namespace hosts (#10): the heat stencil
//! (`rank/examples/c/heat_ha.c`) on 4 hosts + 1 spare (`krun --hosts ... --spares 1`, a
//! `krund --listen` daemon on each host) under the coordinated policy; the node of host 1 is
//! SIGKILLed (a) between checkpoints (`--inject-failure node=1@2ckpt`: right after the 2nd
//! commit), (b) during a checkpoint (`node=2@ckpt3:capture`: every rank held, the capture
//! ordered), (c) during a restart (`node=3@recovery1`: the first failure's restart orders
//! out). The lost ranks must restart (on the spare host while there is one) and the result
//! must equal the serial reference each time. Needs root and the workspace's binaries
//! (`cargo build --workspace`).
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cluster_tests::workspace_bin;
use cluster_tests::{NetnsCluster, NodeProcess};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn build_examples(out: &Path) {
    let lib = workspace_bin("libkrun.so");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/c");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", lib.parent().unwrap().display()))
        .arg(format!("OUT={}", out.display()))
        .arg(out.join("heat_ha"))
        .arg(out.join("heat_serial"))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building the examples: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn checksum_in(text: &str) -> Option<String> {
    text.lines()
        .rev()
        .find_map(|l| l.split(" checksum ").nth(1))
        .map(|s| s.trim().to_string())
}

/// Waits for a process (at most `limit`) and returns (exit code, stdout, stderr).
fn finish(mut p: NodeProcess, limit: Duration) -> (Option<i32>, String, String) {
    let mut out = p.stdout().unwrap();
    let mut err = p.stderr().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = p.wait_timeout(limit).unwrap();
    if status.is_none() {
        let _ = p.kill();
    }
    (
        status.and_then(|s| s.code()),
        reader.join().unwrap(),
        err_reader.join().unwrap(),
    )
}

/// What one job on the hosts left: krun's exit code, its stdout, stdout and stderr, and
/// all of it with the daemons' logs (for failure messages).
struct HostsRun {
    code: Option<i32>,
    out: String,
    both: String,
    all: String,
    want: String,
}

/// The heat stencil on 4 namespace hosts + 1 spare (`krun --hosts ... --spares 1 -n 8`,
/// checkpoints every second) with `injections`, and `policy` as `krun --policy FILE`.
fn heat_on_hosts(tag: &str, injections: &[&str], policy: Option<&str>) -> HostsRun {
    if let Err(e) = cluster_tests::require_root() {
        panic!("\n\n*** {e} ***\n\n");
    }
    let dir = TempDir(std::env::temp_dir().join(format!(
        "krun-ha-hosts-{tag}-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    build_examples(&dir.0);
    let grid = ["96", "64", "400"];
    let serial = Command::new(dir.0.join("heat_serial"))
        .args(grid)
        .output()
        .unwrap();
    let want = checksum_in(&String::from_utf8_lossy(&serial.stdout)).expect("serial checksum");
    let secret = dir.0.join("secret");
    std::fs::write(&secret, "the secret of the HA hosts test").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // Ranks' images in memory (removed at the end); the hosts share this filesystem, and each
    // rank's owner is distinct, so one directory serves all of them.
    let ghost = TempDir(PathBuf::from(format!(
        "/dev/shm/krun-ha-hosts-{tag}-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    let cluster = NetnsCluster::create(5, None).expect("namespace cluster");
    let mut daemons = Vec::new();
    let mut drains = Vec::new();
    for i in 0..5 {
        let node = cluster.node(i).unwrap();
        // Ranks inherit the daemon's environment.
        let mut d = node
            .spawn(
                Command::new(workspace_bin("krund"))
                    .args(["--listen", &format!("{}:7171", node.ip())])
                    .env("KRUN_SECRET_FILE", &secret)
                    .env("KRUN_GHOST_DIR", &ghost.0)
                    .env("HEAT_STEP_DELAY_US", "10000")
                    .env("HEAT_HA_TRACE", "0")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            )
            .expect("starting krund");
        let mut lines = BufReader::new(d.stderr().unwrap()).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        assert!(
            first.contains("listening on"),
            "daemon on host {i}: {first}"
        );
        // Keep reading the daemon's log, so that it never blocks on a full pipe.
        drains.push(std::thread::spawn(move || {
            lines.map_while(|l| l.ok()).collect::<Vec<_>>().join("\n")
        }));
        daemons.push(d);
    }
    let hosts = cluster
        .nodes()
        .map(|n| n.ip().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let heat = dir.0.join("heat_ha");
    let mut cmd = Command::new(workspace_bin("krun"));
    cmd.args(["--hosts", &hosts, "--spares", "1", "-n", "8"])
        .args(["--checkpoint-interval", "1"]);
    for i in injections {
        cmd.args(["--inject-failure", i]);
    }
    if let Some(text) = policy {
        let file = dir.0.join("policy.toml");
        std::fs::write(&file, text).unwrap();
        cmd.arg("--policy").arg(&file);
    }
    let krun = cluster
        .node(0)
        .unwrap()
        .spawn(
            cmd.arg(&heat)
                .args(grid)
                .env("KRUN_SECRET_FILE", &secret)
                .env("KRUN_FABRIC_PROVIDER", "tcp")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("starting krun");
    let (code, out, err) = finish(krun, Duration::from_secs(300));
    for d in &mut daemons {
        let _ = d.kill();
    }
    let logs: Vec<String> = drains.into_iter().map(|t| t.join().unwrap()).collect();
    let all = format!("{out}\n{err}\n--- daemons ---\n{}", logs.join("\n---\n"));
    let both = format!("{out}\n{err}");
    HostsRun {
        code,
        out,
        both,
        all,
        want,
    }
}

/// Whether krun's recovery plan restarts `ranks` on spare node `spare`: as one group
/// ("ranks 2-3 restart on spare node 4 from ...") or one by one when their images come from
/// different copies ("rank 2 restarts on spare node 4 from checkpoint 2 (L2 from node 2,
/// ...); rank 3 restarts on spare node 4 from checkpoint 2 (L3 from node 2, ...)").
fn restart_on_spare(text: &str, ranks: &[u32], spare: u32) -> bool {
    let group = format!(
        "ranks {}-{} restart on spare node {spare}",
        ranks[0],
        ranks[ranks.len() - 1]
    );
    text.contains(&group)
        || ranks
            .iter()
            .all(|r| text.contains(&format!("rank {r} restarts on spare node {spare}")))
}

#[test]
fn heat_on_four_hosts_survives_a_node_sigkilled_between_checkpoints_by_restarting_on_the_spare() {
    let r = heat_on_hosts("between", &["node=1@2ckpt"], None);
    let (both, all) = (&r.both, &r.all);
    assert_eq!(r.code, Some(0), "{all}");
    assert!(
        both.contains("injected failure: SIGKILL to node 1"),
        "{all}"
    );
    // Node 1's ranks (2 of 8 on 4 nodes: ranks 2-3) restart on the spare, node 4.
    assert!(restart_on_spare(both, &[2, 3], 4), "{all}");
    assert!(both.contains("1 node failure, 1 recovery"), "{all}");
    assert_eq!(checksum_in(&r.out), Some(r.want.clone()), "{all}");
}

#[test]
fn heat_on_four_hosts_survives_a_node_sigkilled_during_a_checkpoint() {
    // Node 2 dies once every rank is held for checkpoint 3's capture: checkpoint 3 is
    // aborted everywhere, the job recovers from checkpoint 2 onto the spare.
    let r = heat_on_hosts("duringckpt", &["node=2@ckpt3:capture"], None);
    let (both, all) = (&r.both, &r.all);
    assert_eq!(r.code, Some(0), "{all}");
    assert!(
        both.contains("injected failure at the capture of checkpoint attempt 3: SIGKILL to node 2"),
        "{all}"
    );
    assert!(restart_on_spare(both, &[4, 5], 4), "{all}");
    assert!(both.contains("1 node failure, 1 recovery"), "{all}");
    assert_eq!(checksum_in(&r.out), Some(r.want.clone()), "{all}");
}

#[test]
fn heat_on_four_hosts_survives_a_node_sigkilled_during_a_restart() {
    // Node 1 dies after the 2nd commit; while its ranks restart on the spare (the recovery's
    // Restart orders are out), node 3 dies too. The only spare is taken: the policy allows
    // running on fewer nodes (`restart = "shrink"`), so node 3's ranks go to the
    // least-loaded survivor, and the job still ends with the serial checksum.
    let policy = "policy = \"coordinated\"\nrestart = \"shrink\"\n";
    let r = heat_on_hosts(
        "duringrestart",
        &["node=1@2ckpt", "node=3@recovery1"],
        Some(policy),
    );
    let (both, all) = (&r.both, &r.all);
    assert_eq!(r.code, Some(0), "{all}");
    assert!(
        both.contains("injected failure: SIGKILL to node 1"),
        "{all}"
    );
    assert!(
        both.contains("injected failure at recovery 1: SIGKILL to node 3"),
        "{all}"
    );
    assert!(restart_on_spare(both, &[2, 3], 4), "{all}");
    assert!(both.contains("2 node failures"), "{all}");
    assert_eq!(checksum_in(&r.out), Some(r.want.clone()), "{all}");
}
