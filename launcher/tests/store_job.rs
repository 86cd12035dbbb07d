//! Every krund that runs ranks hosts a checkpoint store node: the C heat stencil (built
//! against libkrun.so) checkpoints under `krun --local 3`; `krun status --json` shows
//! versions safe at L2 and the store's use; after one node's krund and ranks are SIGKILLed,
//! a survivor's store serves that node's rank's image from the buddy (`krun fetch`).
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod job_common;
use job_common::*;

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
