//! Every krund that runs ranks hosts a checkpoint store node: the C heat stencil (built
//! against libkrun.so) checkpoints under `krun --local 3`; `krun status --json` shows
//! versions safe at L2 and the store's use; after one node's krund and ranks are SIGKILLed,
//! a survivor's store serves that node's rank's image from the buddy (`krun fetch`).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>`: tests run from `target/<profile>/deps`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ends the job (SIGTERM to the krun we started, which stops its nodes and ranks; SIGKILL
/// if it has not ended in 30 s).
struct Job(Child);
impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build_heat(out: &Path) -> PathBuf {
    let lib = target_dir();
    assert!(
        lib.join("libkrun.so").exists(),
        "libkrun.so not found in {} (cargo build -p rank first)",
        lib.display()
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/c");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", lib.display()))
        .arg(format!("OUT={}", out.display()))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building the examples: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out.join("heat")
}

fn krun(dir: &Path) -> Command {
    let mut c = Command::new(target_dir().join("krun"));
    c.env("XDG_RUNTIME_DIR", dir.join("xdg"))
        .env("KRUN_GHOST_DIR", dir.join("ghost"))
        .env("KRUN_GHOST_OWNER", "store-job")
        .env("KRUN_RECV_TIMEOUT_MS", "60000")
        .env("KRUN_STORE_ARENA_MIB", "16")
        // The stores start only because the first checkpoint waits for them.
        .env("KRUN_STORE_DELAY_MS", "600000")
        .env_remove("KRUN_GHOST_RESTORE")
        .env_remove("KRUN_STORE_LEVEL")
        .env_remove("KRUN_STORE_DISK");
    c
}

fn status(dir: &Path) -> Option<serde_json::Value> {
    let o = krun(dir).args(["status", "--json"]).output().ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// PIDs of the direct children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The version of `rank` the table shows safe at L2, if any.
fn safe_at_l2(s: &serde_json::Value, rank: u64) -> Option<u64> {
    s["status"]["ranks"].as_array()?.iter().find_map(|r| {
        let ck = &r["checkpoint"];
        let levels: Vec<u64> = ck["safe_levels"]
            .as_array()?
            .iter()
            .filter_map(|l| l.as_u64())
            .collect();
        (r["rank"].as_u64()? == rank && levels.contains(&2)).then(|| ck["version"].as_u64())?
    })
}

#[test]
fn krund_stores_checkpoints_safe_at_l2_and_a_survivor_serves_a_killed_nodes_images() {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "krun-store-job-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(dir.0.join("xdg")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.0.join("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let heat = build_heat(&dir.0);
    // 3 nodes, one rank each; a checkpoint every 5 steps, 20 ms a step (a run of ~40 s
    // that the test ends once it has seen what it needs).
    let job = Job(krun(&dir.0)
        .args(["--local", "3", "-n", "3"])
        .arg(&heat)
        .args(["48", "40", "2000", "5"])
        .env("HEAT_STEP_DELAY_US", "20000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap());
    // Every rank has a version safe at L2; the store shows its use and the newest safe.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (s, version) = loop {
        if let Some(s) = status(&dir.0) {
            if let Some(v) = (0..3)
                .map(|r| safe_at_l2(&s, r))
                .collect::<Option<Vec<u64>>>()
            {
                break (s, v[2]);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no version safe at L2 on every rank"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let store = s["status"]["store"].as_array().unwrap();
    let l1 = store.iter().find(|l| l["level"] == 1).unwrap();
    assert!(l1["bytes"].as_u64().unwrap() > 0, "{store:?}");
    let l2 = store.iter().find(|l| l["level"] == 2).unwrap();
    assert!(l2["bytes"].as_u64().unwrap() > 0, "{store:?}");
    let newest = s["status"]["newest_safe"].as_array().unwrap();
    assert!(
        newest
            .iter()
            .any(|c| c["level"] == 2 && c["version"].as_u64() >= Some(1)),
        "{newest:?}"
    );

    // SIGKILL node 2's krund and its rank (rank 2).
    let nodes = s["nodes"].as_array().unwrap();
    let node2 = nodes.iter().find(|n| n["node"] == 2).unwrap();
    let pid = node2["pid"].as_u64().unwrap() as u32;
    let ranks = children_of(pid);
    assert!(!ranks.is_empty(), "node 2's krund has no rank process");
    for p in std::iter::once(pid).chain(ranks) {
        // SAFETY: kill on a pid this test's job started.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    // A survivor's store serves rank 2's image from memory on another node.
    let o = krun(&dir.0)
        .args(["fetch", "2", &version.to_string(), "--node", "0"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let served_by: u64 = out
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no node in {out:?}"));
    assert_ne!(served_by, 2, "{out}");
    assert!(out.contains(&format!("rank 2 v{version}:")), "{out}");
    assert!(out.contains("from L2"), "{out}");
    // The bytes parse as the image of that version (the agent checks it); nothing else.
    drop(job);
    let _ = std::fs::remove_dir_all(dir.0.join("ghost"));
}
