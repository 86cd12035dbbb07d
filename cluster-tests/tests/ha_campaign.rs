//! Fault campaign (#10): the heat stencil (`rank/examples/c/heat_ha.c`) on 3 local krund
//! nodes + 1 spare under the coordinated policy (a checkpoint every second); in each trial
//! krun SIGKILLs a random node (any node with ranks, node 0 included) at a random time.
//! Every trial must finish with the serial reference's checksum and krun's summary must count
//! the failure and its recovery. Trials: `KRUN_HA_TRIALS` (default 2); seed:
//! `KRUN_HA_SEED` (default: from the clock, printed so a failure can be replayed).
//! `cargo run --release -p bench -- ha --campaign 20` runs the same campaign at length.
use std::path::{Path, PathBuf};
use std::process::Command;

use cluster_tests::campaign::{judge, trials, Campaign};
use cluster_tests::workspace_bin;

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

#[test]
fn heat_survives_a_random_node_sigkilled_at_a_random_time_in_every_trial() {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "krun-ha-campaign-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    build_examples(&dir.0);
    let grid = ["96", "64", "500"];
    let serial = Command::new(dir.0.join("heat_serial"))
        .args(grid)
        .output()
        .unwrap();
    let want = String::from_utf8_lossy(&serial.stdout)
        .split(" checksum ")
        .nth(1)
        .expect("serial checksum")
        .trim()
        .to_string();
    let n: usize = std::env::var("KRUN_HA_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("KRUN_HA_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| cluster_tests::campaign::now_unix().to_bits());
    eprintln!("ha campaign: {n} trials, KRUN_HA_SEED={seed}");
    // The ranks' images in memory, as krun's default (/dev/shm), removed at the end.
    let ghost = TempDir(PathBuf::from(format!(
        "/dev/shm/krun-ha-campaign-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    let heat = dir.0.join("heat_ha");
    let mut c = Campaign::local(
        workspace_bin("krun"),
        &[heat.to_str().unwrap(), grid[0], grid[1], grid[2]],
        3,
        6,
    );
    c.env = vec![
        ("HEAT_STEP_DELAY_US".into(), "8000".into()),
        ("HEAT_HA_TRACE".into(), "0".into()),
        ("KRUN_GHOST_DIR".into(), ghost.0.display().to_string()),
    ];
    let mut failed = Vec::new();
    for t in trials(seed, n, c.ranked_nodes, 300..3500) {
        let out = c.run(&t).expect("running krun");
        match judge(&t, &out, &want) {
            Ok(()) => eprintln!(
                "trial {}: node {} killed at {} ms: recovered, checksum equal",
                t.index, t.node, t.at_ms
            ),
            Err(why) => failed.push(format!(
                "trial {} (node {} at {} ms): {why}\n{}",
                t.index,
                t.node,
                t.at_ms,
                out.text()
            )),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} trials failed (KRUN_HA_SEED={seed}):\n{}",
        failed.len(),
        failed.join("\n")
    );
}
