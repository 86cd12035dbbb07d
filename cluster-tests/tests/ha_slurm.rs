//! HA under Slurm (#10), in the local Slurm lane (`cluster-tests/slurm/cluster.sh`, 5 nodes):
//! - `sbatch -N 5 --no-kill` of a script running `krun --spares 1 --checkpoint-interval 2`
//!   with the heat stencil (`rank/examples/c/heat_ha.c`, 4 ranks on nodes 1-4, node 5 the
//!   spare); once two checkpoints are committed, node 2's krund and its ranks are SIGKILLed
//!   from outside (`cluster.sh node-exec 2`: `--inject-failure` is refused under Slurm). The
//!   job must finish with the serial checksum, its lost ranks restarted on the spare.
//! - `sbatch --signal=USR1@T` (Slurm signals every krund of the step T seconds before the
//!   time limit): krun's policy takes a checkpoint "asked by" the signal, visible in
//!   `krun status` and in the store (the ranks' newest safe version).
//!
//! Needs root; one Slurm cluster per machine, so `.config/nextest.toml` puts this binary in
//! the `slurm` test group. One test function brings the cluster up once.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cluster_tests::workspace_bin;
use cluster_tests::SlurmCluster;

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

/// Submits `script` (no `--wait`) and returns the job id.
fn submit(c: &SlurmCluster, args: &[&str], script: &Path) -> String {
    let mut all: Vec<&str> = vec!["sbatch", "--parsable"];
    all.extend_from_slice(args);
    all.push(script.to_str().unwrap());
    let out = c.exec(all).expect("sbatch");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// Waits (bounded) until `file` contains `pattern`; returns the text.
fn wait_for(file: &Path, pattern: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(pattern) || start.elapsed() > limit {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGKILL of every krund and heat_ha process in node `i`'s network namespace: the
/// namespace comes from `cluster.sh node-exec I readlink /proc/self/ns/net`; the Slurm nodes
/// share the PID namespace with the host, so the processes are found in /proc and killed by
/// PID. Tries for up to 10 s until something was killed; returns what it did.
fn kill_node(c: &SlurmCluster, i: usize) -> String {
    let o = Command::new(SlurmCluster::script())
        .env("KRUN_SLURM_NODES", c.nodes().to_string())
        .args(["node-exec", &i.to_string(), "readlink", "/proc/self/ns/net"])
        .output()
        .expect("cluster.sh node-exec");
    let ns = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let mut log = format!("node {i} is {ns:?}: ");
    if !o.status.success() || ns.is_empty() {
        log.push_str(&String::from_utf8_lossy(&o.stderr));
        return log;
    }
    for _ in 0..20 {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let net = std::fs::read_link(e.path().join("ns/net")).unwrap_or_default();
            if ["krund", "heat_ha"].contains(&comm.trim())
                && net.to_string_lossy() == ns
                && cluster_tests::kill_process(pid, libc::SIGKILL).is_ok()
            {
                log.push_str(&format!("killed {} {pid}; ", comm.trim()));
            }
        }
        if log.contains("killed") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    log
}

#[test]
fn heat_under_slurm_survives_a_killed_node_on_its_spare_and_usr1_checkpoints() {
    cluster_tests::require_root().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
    let jobs = Path::new("/var/tmp/krun-slurm/jobs");
    std::fs::create_dir_all(jobs).unwrap();
    let dir = TempDir(jobs.join(format!(
        "krun-ha-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    build_examples(&dir.0);
    let grid = ["96", "64", "150"];
    let serial = Command::new(dir.0.join("heat_serial"))
        .args(grid)
        .output()
        .unwrap();
    let want = checksum_in(&String::from_utf8_lossy(&serial.stdout)).expect("serial checksum");
    let krun = workspace_bin("krun");
    let heat = dir.0.join("heat_ha");
    let c = SlurmCluster::up(5).expect("cluster.sh up");

    // (1) A node's krund SIGKILLed from outside; the spare takes its ranks. 150 ms per step:
    // the job computes >= 22 s, so that it is still running after its 2nd checkpoint even
    // on a loaded machine (a CI run's job ended after its 1st checkpoint, which took 6 s).
    let script = dir.0.join("kill.sbatch");
    let output = dir.0.join("kill.out");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             export KRUN_FABRIC_PROVIDER=tcp KRUN_GHOST_DIR={ghost} HEAT_HA_TRACE=0 HEAT_STEP_DELAY_US=150000\n\
             {krun} --spares 1 -n 4 --checkpoint-interval 2 {heat} {g0} {g1} {g2}\n\
             echo heat-exit $?\n",
            ghost = dir.0.join("ghost").display(),
            krun = krun.display(),
            heat = heat.display(),
            g0 = grid[0],
            g1 = grid[1],
            g2 = grid[2],
        ),
    )
    .unwrap();
    let id = submit(
        &c,
        &[
            "-N",
            "5",
            "--ntasks-per-node=1",
            "--no-kill",
            "-t",
            "10",
            "-o",
            output.to_str().unwrap(),
        ],
        &script,
    );
    let text = wait_for(&output, "checkpoint 2 committed", Duration::from_secs(120));
    assert!(text.contains("checkpoint 2 committed"), "job {id}:\n{text}");
    let killed = kill_node(&c, 2);
    assert!(
        killed.contains("killed"),
        "nothing killed on node 2: {killed}\n{text}"
    );
    let text = wait_for(&output, "heat-exit", Duration::from_secs(420));
    assert!(text.contains("heat-exit 0"), "job {id} ({killed}):\n{text}");
    // Node 2 of Slurm is krun's node 1 (rank 1); the spare is krun's node 4 (Slurm's 5).
    assert!(text.contains("rank 1 restarts on spare node 4"), "{text}");
    assert!(text.contains("1 node failure, 1 recovery"), "{text}");
    assert_eq!(checksum_in(&text), Some(want.clone()), "{text}");

    // (2) Slurm's --signal=USR1@T: a checkpoint before the time limit (1 minute, T = 40 s:
    // the signal comes ~20 s into the job, which is running by then and runs until killed).
    let script = dir.0.join("usr1.sbatch");
    let output = dir.0.join("usr1.out");
    let status = dir.0.join("usr1.status");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             export KRUN_FABRIC_PROVIDER=tcp KRUN_GHOST_DIR={ghost} HEAT_STEP_DELAY_US=20000 HEAT_HA_TRACE=0\n\
             {krun} -n 4 --checkpoint-interval 600 {heat} 96 64 100000 &\n\
             job=$!\n\
             for i in $(seq 150); do\n\
               if grep -q 'asked by' {out} && timeout 10 {krun} status --job $job --json > {status}.tmp 2> {status}.err && [ $(grep -c '\"version\": 1' {status}.tmp) -ge 4 ]; then mv {status}.tmp {status}; break; fi\n\
               sleep 0.2\n\
             done\n\
             echo status-err $(tail -c 300 {status}.err 2>/dev/null) $(grep -c '\"version\"' {status}.tmp 2>/dev/null)\n\
             kill -TERM $job; wait $job\n\
             echo usr1-exit $?\n",
            ghost = dir.0.join("ghost").display(),
            krun = krun.display(),
            heat = heat.display(),
            out = output.display(),
            status = status.display(),
        ),
    )
    .unwrap();
    let id = submit(
        &c,
        &[
            "-N",
            "4",
            "--ntasks-per-node=1",
            "-t",
            "1",
            "--signal=USR1@40",
            "-o",
            output.to_str().unwrap(),
        ],
        &script,
    );
    let text = wait_for(&output, "usr1-exit", Duration::from_secs(120));
    let status_text = std::fs::read_to_string(&status).unwrap_or_default();
    c.down().expect("cluster.sh down");
    assert!(text.contains("usr1-exit"), "job {id}:\n{text}");
    assert!(
        text.contains("checkpoint 1 committed (asked by"),
        "no checkpoint asked by the signal:\n{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&status_text)
        .unwrap_or_else(|e| panic!("status --json: {e}:\n{status_text}\n{text}"));
    let rows = v["status"]["ranks"].as_array().expect("ranks").clone();
    assert_eq!(rows.len(), 4, "{v}");
    for r in &rows {
        // Every rank's newest checkpoint is version 1, safe in the store (L1 and L2).
        assert_eq!(r["checkpoint"]["version"], 1, "{r}\n{v}");
        let levels = r["checkpoint"]["safe_levels"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(levels.contains(&serde_json::json!(2)), "{r}\n{v}");
    }
}
