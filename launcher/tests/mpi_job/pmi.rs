//! MPICH over PMI-1 and Slurm's libpmi2 over PMI-2: jobs, aborts, fences, and the PMI and PMIx
//! environment each rank gets.

use super::*;

#[test]
fn mpich_hello_runs_on_three_local_nodes_without_mpiexec() {
    let dir = temp_dir("hello");
    let hello = build("hello", &dir.0);
    let (code, out, err) = krun(&["--local", "3", "-n", "6", hello.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for r in 0..6 {
        assert_eq!(
            out.matches(&format!("hello from rank {r} of 6 on "))
                .count(),
            1,
            "rank {r}:\n{out}\n{err}"
        );
    }
}

#[test]
fn mpich_ring_passes_the_token_across_nodes() {
    let dir = temp_dir("ring");
    let ring = build("ring", &dir.0);
    let (size, rounds) = (6u64, 5u64);
    let (code, out, err) = krun(&[
        "--local",
        "3",
        "-n",
        "6",
        ring.to_str().unwrap(),
        &rounds.to_string(),
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    // Every pass adds the rank: rounds * (0 + 1 + ... + size-1).
    let want = rounds * size * (size - 1) / 2;
    assert!(
        out.contains(&format!(
            "ring: token {want} after {rounds} rounds of {size} ranks"
        )),
        "{out}\n{err}"
    );
}

#[test]
fn mpich_allreduce_is_exact_on_every_rank() {
    let dir = temp_dir("allreduce");
    let prog = build("allreduce", &dir.0);
    // Uneven nodes: 3, 3 and 1 ranks.
    let (code, out, err) = krun(&["--local", "3", "-n", "7", prog.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for r in 0..7 {
        assert!(
            out.contains(&format!(
                "allreduce: rank {r} of 7: 0 of 4096 elements wrong"
            )),
            "rank {r}:\n{out}\n{err}"
        );
    }
}

/// A real PMI-2 client (Slurm's libpmi2, `rank/examples/mpi/pmi2_client.c`) on 3 local
/// nodes: PMI-1's init asking for version 2 switches the link to PMI-2's framing; puts
/// (a value with a `;` the wire escapes), a fence across nodes, every rank's key read
/// back, the process mapping, node attributes waited for, a second fence, finalize.
#[test]
fn pmi2_clients_exchange_keys_across_nodes_and_node_attributes_on_their_node() {
    let dir = temp_dir("pmi2");
    let prog = build("pmi2_client", &dir.0);
    for mode in ["pmi2", "both"] {
        let (code, out, err) = krun(&[
            "--local",
            "3",
            "-n",
            "6",
            "--mpi",
            mode,
            prog.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "--mpi {mode}: stdout:\n{out}\nstderr:\n{err}");
        for r in 0..6 {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("pmi2: rank {r} of 6 ok ")))
                .unwrap_or_else(|| panic!("--mpi {mode}: rank {r}:\n{out}\n{err}"));
            assert!(
                line.contains("mapping=(vector,(0,3,2)) keys=6 local=2")
                    && line.contains("jobid=kvs_krun_"),
                "--mpi {mode}: {line}"
            );
        }
    }
}

/// PMI-2's abort ends the job (its code is 1: PMI-2's abort carries none) and krund
/// prints the client's message.
#[test]
fn a_pmi2_abort_ends_the_job_naming_the_rank_and_its_message() {
    let dir = temp_dir("pmi2-abort");
    let prog = build("pmi2_client", &dir.0);
    let (code, out, err) = krun(&["--local", "3", "-n", "6", prog.to_str().unwrap(), "4"]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("rank 4 aborts the job: pmi2_client asked to abort")
            && err.contains("krun: rank 4 on node 2 called MPI_Abort (PMI abort)"),
        "{err}"
    );
    assert!(!out.contains(" ok "), "a rank finished: {out}");
}

#[test]
fn mpi_abort_ends_the_job_with_its_code() {
    let dir = temp_dir("abort");
    let prog = build("abort", &dir.0);
    // Rank 4 aborts with 7; the others wait for a message from it that never comes.
    let (code, out, err) = krun(&["--local", "3", "-n", "6", prog.to_str().unwrap(), "4", "7"]);
    assert_eq!(code, 7, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("krun: rank 4 on node 2 called MPI_Abort (PMI abort) with exit code 7"),
        "{err}"
    );
}

#[test]
fn a_rank_exiting_without_mpi_finalize_ends_the_job_naming_it() {
    let dir = temp_dir("nofin");
    let prog = build("no_finalize", &dir.0);
    // Rank 4 leaves with exit(3) after MPI_Init; the others would wait for it. The job
    // fails naming it (its peers' MPI may notice first and abort with a code of its own:
    // every lost or aborted rank is named, the first one ends the job).
    let (code, out, err) = krun(&["--local", "3", "-n", "6", prog.to_str().unwrap(), "4", "3"]);
    assert_ne!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("krun: rank 4 on node 2 exited with code 3 without MPI_Finalize"),
        "{err}"
    );
    // Also with exit code 0: the job still fails.
    let (code, out, err) = krun(&["--local", "3", "-n", "6", prog.to_str().unwrap(), "1", "0"]);
    assert_ne!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("krun: rank 1 on node 0 exited with code 0 without MPI_Finalize"),
        "{err}"
    );
}

#[test]
fn a_fence_a_gone_rank_never_joins_fails_naming_it() {
    let dir = temp_dir("fence");
    let prog = build("no_finalize", &dir.0);
    // Rank 1 leaves before MPI_Init: the others' MPI_Init fence cannot complete.
    let (code, out, err) = krun(&[
        "--local",
        "3",
        "-n",
        "6",
        prog.to_str().unwrap(),
        "1",
        "0",
        "early",
    ]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains(
            "PMI fence 1 cannot complete: rank 1 on node 0 exited with code 0 without joining it"
        ),
        "{err}"
    );
}

#[test]
fn ranks_get_the_pmi_environment_unless_mpi_is_none() {
    let script = "echo rank=$PMI_RANK size=$PMI_SIZE fd=${PMI_FD:-none} local=$MPI_LOCALRANKID/$MPI_LOCALNRANKS";
    let (code, out, err) = krun(&["--local", "2", "-n", "4", "sh", "-c", script]);
    assert_eq!(code, 0, "{out}\n{err}");
    for (r, local) in [(0, 0), (1, 1), (2, 0), (3, 1)] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("rank={r} ")))
            .unwrap_or_else(|| panic!("rank {r}: {out}"));
        assert!(line.contains("size=4"), "{line}");
        assert!(line.ends_with(&format!("local={local}/2")), "{line}");
        let fd: i32 = line
            .split("fd=")
            .nth(1)
            .and_then(|f| f.split(' ').next())
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("no PMI_FD number: {line}"));
        assert!(fd > 2, "{line}");
    }
    let (code, out, err) = krun(&[
        "--mpi", "none", "--local", "2", "-n", "2", "sh", "-c", script,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches("fd=none").count(), 2, "{out}");
    let (code, _, err) = krun(&["--mpi", "pmi3", "true"]);
    assert_eq!(code, 2);
    assert!(err.contains("pmi2") && err.contains("pmix"), "{err}");
}

/// A node that never runs a rank starts no PMIx server (its library reads the node's
/// topology: CPU that `krun --local 3 -n 1` paid twice for nothing); a job that may move
/// ranks onto any node (spares) starts one on every node. Each server makes its
/// `krun-pmix-<krund pid>` directory under the krunds' `TMPDIR`; the rank counts them.
#[test]
fn only_nodes_that_may_run_ranks_start_a_pmix_server() {
    let dir = temp_dir("pmix-servers");
    let tmp = dir.0.to_string_lossy().into_owned();
    let script = format!("sleep 1; ls -d {tmp}/krun-pmix-* | wc -l");
    let servers = |extra: &[&str]| {
        let mut args = vec!["--local", "3", "-n", "1", "--mpi", "pmix"];
        args.extend(extra);
        args.extend(["sh", "-c", &script]);
        let (code, out, err) = krun_with(&args, &[("TMPDIR", &tmp)]);
        assert_eq!(code, 0, "{out}\n{err}");
        out.trim()
            .parse::<usize>()
            .unwrap_or_else(|_| panic!("{out}\n{err}"))
    };
    assert_eq!(servers(&[]), 1, "only node 0 runs a rank");
    assert_eq!(
        servers(&["--spares", "1"]),
        4,
        "3 nodes and a spare may all run ranks"
    );
}

#[test]
fn ranks_get_pmix_and_pmi1_by_default_and_only_what_mpi_asks_for() {
    let script =
        "echo rank=$KRUN_RANK pmix=${PMIX_RANK:-none}@${PMIX_NAMESPACE:-none} fd=${PMI_FD:-none}";
    let lines = |mode: Option<&str>| {
        let mut args = vec!["--local", "2", "-n", "4"];
        if let Some(m) = mode {
            args.extend(["--mpi", m]);
        }
        args.extend(["sh", "-c", script]);
        let (code, out, err) = krun(&args);
        assert_eq!(code, 0, "{out}\n{err}");
        let mut l: Vec<String> = out.lines().map(String::from).collect();
        l.sort();
        assert_eq!(l.len(), 4, "{out}");
        l
    };
    for l in lines(None) {
        let rank = l.split(' ').next().unwrap().strip_prefix("rank=").unwrap();
        assert!(l.contains(&format!("pmix={rank}@krun.")), "{l}");
        assert!(!l.contains("fd=none"), "{l}");
    }
    for l in lines(Some("pmix")) {
        assert!(l.contains("fd=none") && !l.contains("pmix=none"), "{l}");
    }
    for l in lines(Some("pmi1")) {
        assert!(
            l.contains("pmix=none@none") && !l.contains("fd=none"),
            "{l}"
        );
    }
}
