//! The Slurm lane from Rust. Ignored by default (it brings up slurmctld + 3 slurmd, ~6 s, and
//! may apt-get install slurm on a fresh machine); run with
//! `cargo test -p cluster-tests --test slurm -- --ignored`. Needs root.

use cluster_tests::SlurmCluster;

#[test]
#[ignore = "starts a real Slurm cluster; run with --ignored"]
fn srun_runs_a_host_built_binary_on_three_nodes() {
    cluster_tests::require_root().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
    let c = SlurmCluster::up(3).expect("cluster.sh up");
    // A binary built on the host runs unchanged inside the cluster (shared filesystem); each
    // task is in its node's network namespace, so the probe binds the node's own address.
    let probe = env!("CARGO_BIN_EXE_krun-netns-probe");
    let out = c
        .exec([
            "srun",
            "-N",
            "3",
            "--ntasks-per-node=1",
            "bash",
            "-c",
            &format!("echo $(hostname) $SLURM_STEP_NODELIST; {probe} serve $(hostname -i):0 0 0"),
        ])
        .expect("srun");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut hosts: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("node"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["node1", "node2", "node3"], "{text}");
    assert!(text.contains("node[1-3]"), "{text}");
    for i in 1..=3 {
        assert!(
            text.contains(&format!("listening 10.201.0.{}:", 10 + i)),
            "{text}"
        );
    }
    c.down().expect("cluster.sh down");
}
