//! The Slurm lane from Rust: a real slurmctld + 3 slurmd in network namespaces (~6 s to
//! start; apt-get installs slurm on a fresh machine). Needs root. One test function, because
//! there is one Slurm cluster per machine.

use cluster_tests::workspace_bin;
use cluster_tests::SlurmCluster;

#[test]
fn srun_and_krun_run_on_three_slurm_nodes() {
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

    // sbatch -N 3 of a script that runs krun: one krund per node through srun, ranks by
    // Slurm's layout (2 per node), with the right variables, and the job's output.
    let krun = workspace_bin("krun");
    let selftest = workspace_bin("krun-selftest");
    let dir = std::path::Path::new("/var/tmp/krun-slurm/jobs");
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join(format!("krun-{}.sbatch", std::process::id()));
    let output = dir.join(format!("krun-{}.out", std::process::id()));
    // A running job's status from inside the allocation (the third krun of the script).
    let stop = dir.join(format!("krun-{}.stop", std::process::id()));
    let status = dir.join(format!("krun-{}.status", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    // MPI programs under krun inside the allocation: krund serves PMI-1 (MPICH), PMI-2 and
    // PMIx (Open MPI) on every Slurm node; built on the host (the filesystem is shared).
    let hello_src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/mpi/hello.c");
    let mut hellos = Vec::new();
    for (mpicc, name) in [("mpicc.mpich", "mpich"), ("mpicc.openmpi", "ompi")] {
        let exe = dir.join(format!("hello-{name}-{}", std::process::id()));
        let o = std::process::Command::new(mpicc)
            .arg("-o")
            .arg(&exe)
            .arg(&hello_src)
            .output()
            .expect("mpicc (scripts/install-deps.sh installs mpich and openmpi)");
        assert!(
            o.status.success(),
            "{mpicc}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        hellos.push(exe);
    }
    // A PMI-2 client (Slurm's own libpmi2) under krun, not srun: krund serves PMI-2.
    let pmi2 = dir.join(format!("pmi2-client-{}", std::process::id()));
    let o = std::process::Command::new("cc")
        .arg("-O2")
        .arg("-o")
        .arg(&pmi2)
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../rank/examples/mpi/pmi2_client.c"),
        )
        .arg("-lpmi2")
        .output()
        .expect("cc (build-essential)");
    assert!(
        o.status.success(),
        "building pmi2_client (scripts/install-deps.sh installs libpmi2-0-dev): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    hellos.push(pmi2);
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             export KRUN_FABRIC_PROVIDER=tcp\n\
             {krun} --tag-output sh -c 'echo vars $KRUN_RANK $KRUN_SIZE $KRUN_LOCAL_RANK $KRUN_LOCAL_SIZE $KRUN_NODE_ID $KRUN_NNODES $(hostname)'\n\
             echo krun-exit-1 $?\n\
             {krun} {selftest}\n\
             echo krun-exit-2 $?\n\
             {krun} --tag-output {hello_mpich} | sed 's/^/mpich /'\n\
             echo krun-exit-mpich ${{PIPESTATUS[0]}}\n\
             {krun} --tag-output {hello_ompi} | sed 's/^/ompi /'\n\
             echo krun-exit-ompi ${{PIPESTATUS[0]}}\n\
             {krun} --mpi pmi2 {pmi2} | sed 's/^/pmi2 /'\n\
             echo krun-exit-pmi2 ${{PIPESTATUS[0]}}\n\
             {krun} sh -c 'n=0; while [ ! -e {stop} ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done; echo stopped $KRUN_RANK' &\n\
             job=$!\n\
             for i in $(seq 300); do\n\
               if {krun} status --job $job --json > {status}.tmp 2>/dev/null && [ $(grep -c '\"state\": \"running\"' {status}.tmp) = 6 ]; then mv {status}.tmp {status}; break; fi\n\
               sleep 0.1\n\
             done\n\
             touch {stop}\n\
             wait $job\n\
             echo krun-exit-3 $?\n",
            krun = krun.display(),
            selftest = selftest.display(),
            stop = stop.display(),
            status = status.display(),
            hello_mpich = hellos[0].display(),
            hello_ompi = hellos[1].display(),
            pmi2 = hellos[2].display(),
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
    let status_text = std::fs::read_to_string(&status).unwrap_or_default();
    for f in [&script, &output, &stop, &status] {
        let _ = std::fs::remove_file(f);
    }
    for f in &hellos {
        let _ = std::fs::remove_file(f);
    }
    assert!(
        out.status.success(),
        "sbatch failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("krun-exit-1 0") && text.contains("krun-exit-2 0"),
        "{text}"
    );
    let mut vars: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_once("] vars ").map(|(_, v)| v.to_string()))
        .collect();
    vars.sort();
    assert_eq!(
        vars,
        [
            "0 6 0 2 0 3 node1",
            "1 6 1 2 0 3 node1",
            "2 6 0 2 1 3 node2",
            "3 6 1 2 1 3 node2",
            "4 6 0 2 2 3 node3",
            "5 6 1 2 2 3 node3"
        ],
        "{text}"
    );
    assert_eq!(text.matches(": ok: verified 64 KiB").count(), 6, "{text}");
    // MPICH (PMI-1) and Open MPI (PMIx) hello worlds: every rank once, 2 per Slurm node.
    for mpi in ["mpich", "ompi"] {
        assert!(text.contains(&format!("krun-exit-{mpi} 0")), "{text}");
        for r in 0..6 {
            let want = format!("hello from rank {r} of 6 on node{}", r / 2 + 1);
            assert_eq!(
                text.lines()
                    .filter(|l| l.starts_with(&format!("{mpi} ")) && l.contains(&want))
                    .count(),
                1,
                "{mpi} rank {r}: {text}"
            );
        }
    }
    // PMI-2 (Slurm's libpmi2 as the client, krund as the server): 2 ranks per node.
    assert!(text.contains("krun-exit-pmi2 0"), "{text}");
    for r in 0..6 {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("pmi2 pmi2: rank {r} of 6 ok "))
                    && l.contains("mapping=(vector,(0,3,2)) keys=6 local=2")),
            "pmi2 rank {r}: {text}"
        );
    }
    // krun status of the running Slurm job: one member per node, every rank's row.
    assert!(text.contains("krun-exit-3 0"), "{text}");
    assert_eq!(text.matches("stopped ").count(), 6, "{text}");
    let v: serde_json::Value = serde_json::from_str(&status_text)
        .unwrap_or_else(|e| panic!("status --json: {e}:\n{status_text}\n{text}"));
    assert_eq!(v["mode"], "slurm");
    assert_eq!(v["status"]["members"], serde_json::json!([0, 1, 2]), "{v}");
    let rows = v["status"]["ranks"].as_array().unwrap();
    assert_eq!(rows.len(), 6, "{v}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["node"], (i / 2) as u64, "{r}");
        assert_eq!(r["state"], "running", "{r}");
    }
    let hosts: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["control_tcp"].as_str().unwrap())
        .collect();
    for (i, h) in hosts.iter().enumerate() {
        assert!(h.starts_with(&format!("10.201.0.{}:", 11 + i)), "{hosts:?}");
    }
    c.down().expect("cluster.sh down");
}
