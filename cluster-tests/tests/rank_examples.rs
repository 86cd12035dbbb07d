//! The rank library's C and Fortran examples (rank/examples/c, linked against libkrun.so)
//! under krun across 4 namespace hosts (a `krund --listen` on each) and inside the local
//! Slurm cluster: the heat stencil's checksum equals the serial reference, the Fortran
//! example exchanges and checkpoints. Needs root and the workspace's binaries
//! (`cargo build --workspace`). The Slurm test shares the machine's one Slurm cluster with
//! `slurm.rs`: `.config/nextest.toml` puts both in a test group of one.
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cluster_tests::workspace_bin;
use cluster_tests::{NetnsCluster, NodeProcess, SlurmCluster};

const GRID: [&str; 3] = ["48", "40", "60"];

/// Builds the examples into `out` with their Makefile.
fn build_examples(out: &Path) {
    let lib = workspace_bin("libkrun.so");
    let lib_dir = lib.parent().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/c");
    std::fs::create_dir_all(out).unwrap();
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", lib_dir.display()))
        .arg(format!("OUT={}", out.display()))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building the examples: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The serial reference's checksum line for GRID.
fn serial_checksum(dir: &Path) -> String {
    let o = Command::new(dir.join("heat_serial"))
        .args(GRID)
        .output()
        .unwrap();
    assert!(o.status.success());
    checksum_in(&String::from_utf8_lossy(&o.stdout)).expect("serial checksum")
}

fn checksum_in(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .map(|s| s.trim().to_string())
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(base: &Path, tag: &str) -> TempDir {
    let p = base.join(format!(
        "krun-rank-{tag}-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    ));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
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

#[test]
fn c_and_fortran_examples_run_on_four_namespace_hosts() {
    if let Err(e) = cluster_tests::require_root() {
        panic!("\n\n*** {e} ***\n\n");
    }
    let dir = temp_dir(&std::env::temp_dir(), "mh");
    build_examples(&dir.0);
    let want = serial_checksum(&dir.0);
    let secret = dir.0.join("secret");
    std::fs::write(&secret, "the secret of the rank example test").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let cluster = NetnsCluster::create(4, None).expect("namespace cluster");
    let mut daemons = Vec::new();
    for i in 0..4 {
        let node = cluster.node(i).unwrap();
        // Ranks inherit the daemon's environment: their checkpoints go to the test's dir.
        let mut d = node
            .spawn(
                Command::new(workspace_bin("krund"))
                    .args(["--listen", &format!("{}:7171", node.ip())])
                    .env("KRUN_SECRET_FILE", &secret)
                    .env("KRUN_GHOST_DIR", dir.0.join("ghost"))
                    .env("KRUN_GHOST_OWNER", "mh")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped()),
            )
            .expect("starting krund");
        let mut line = String::new();
        BufReader::new(d.stderr().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "daemon on host {i}: {line}");
        daemons.push(d);
    }
    let hosts = cluster
        .nodes()
        .map(|n| n.ip().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let krun = |args: &[&str]| {
        cluster
            .node(0)
            .unwrap()
            .spawn(
                Command::new(workspace_bin("krun"))
                    .args(["--hosts", &hosts])
                    .args(args)
                    .env("KRUN_SECRET_FILE", &secret)
                    .env("KRUN_FABRIC_PROVIDER", "tcp")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            )
            .expect("starting krun")
    };
    let heat = dir.0.join("heat");
    let (code, out, err) = finish(
        krun(&[
            "-n",
            "8",
            heat.to_str().unwrap(),
            GRID[0],
            GRID[1],
            GRID[2],
            "20",
        ]),
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(checksum_in(&out), Some(want), "{out}\n{err}");
    assert!(
        out.contains("step 40 checkpointed as version 2"),
        "{out}\n{err}"
    );
    let exchange = dir.0.join("exchange");
    let (code, out, err) = finish(
        krun(&["-n", "4", exchange.to_str().unwrap()]),
        Duration::from_secs(120),
    );
    assert_eq!(code, Some(0), "{out}\n{err}");
    // Same checkpoint owner as heat (the daemons' environment): its 3 checkpoints follow
    // heat's versions 1 and 2 on every rank.
    assert!(
        out.contains("exchange: ranks 4 checkpoints 5 total"),
        "{out}\n{err}"
    );
    for d in &mut daemons {
        let _ = d.kill();
    }
}

#[test]
fn c_and_fortran_examples_run_inside_slurm() {
    cluster_tests::require_root().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
    // Slurm nodes share this filesystem; /var/tmp/krun-slurm is the lane's own tree.
    let jobs = Path::new("/var/tmp/krun-slurm/jobs");
    std::fs::create_dir_all(jobs).unwrap();
    let dir = temp_dir(jobs, "slurm");
    build_examples(&dir.0);
    let want = serial_checksum(&dir.0);
    let c = SlurmCluster::up(3).expect("cluster.sh up");
    let krun = workspace_bin("krun");
    let script = dir.0.join("job.sbatch");
    let output = dir.0.join("job.out");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             export KRUN_FABRIC_PROVIDER=tcp KRUN_GHOST_DIR={ghost} KRUN_GHOST_OWNER=slurm\n\
             {krun} {d}/heat {g0} {g1} {g2} 20\n\
             echo heat-exit $?\n\
             {krun} {d}/exchange\n\
             echo exchange-exit $?\n",
            ghost = dir.0.join("ghost").display(),
            krun = krun.display(),
            d = dir.0.display(),
            g0 = GRID[0],
            g1 = GRID[1],
            g2 = GRID[2],
        ),
    )
    .unwrap();
    let out = c
        .exec([
            "sbatch",
            "-N",
            "3",
            "--ntasks-per-node=2",
            "--wait",
            "-o",
            output.to_str().unwrap(),
            script.to_str().unwrap(),
        ])
        .expect("sbatch");
    let text = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(
        out.status.success(),
        "sbatch failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("heat-exit 0") && text.contains("exchange-exit 0"),
        "{text}"
    );
    assert_eq!(checksum_in(&text), Some(want), "{text}");
    // Same checkpoint owner as heat: versions 3..5 follow heat's 1 and 2.
    assert!(
        text.contains("exchange: ranks 6 checkpoints 5 total"),
        "{text}"
    );
    c.down().expect("cluster.sh down");
}
