//! Open MPI over PMIx: jobs, direct modex, aborts, fences over part of the job, spawn.

use super::*;

#[test]
fn openmpi_hello_runs_on_three_local_nodes_without_mpirun() {
    let dir = temp_dir("ompi-hello");
    let hello = build_ompi("hello", &dir.0);
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
fn openmpi_ring_passes_the_token_across_nodes() {
    let dir = temp_dir("ompi-ring");
    let ring = build_ompi("ring", &dir.0);
    // Only PMIx served: Open MPI needs nothing else.
    let (code, out, err) = krun(&[
        "--mpi",
        "pmix",
        "--local",
        "3",
        "-n",
        "6",
        ring.to_str().unwrap(),
        "5",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    // 5 rounds * (0 + 1 + ... + 5).
    assert!(
        out.contains("ring: token 75 after 5 rounds of 6 ranks"),
        "{out}\n{err}"
    );
}

#[test]
fn openmpi_allreduce_is_exact_on_every_rank() {
    let dir = temp_dir("ompi-allreduce");
    let prog = build_ompi("allreduce", &dir.0);
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

/// Open MPI asks for each peer's data on first use instead of collecting it all in
/// MPI_Init's fence (async modex): krund routes the requests through krun to the node that
/// holds the rank (KRUN_PMIX_TRACE shows them).
#[test]
fn openmpi_direct_modex_is_routed_between_nodes() {
    let dir = temp_dir("ompi-dmodex");
    let prog = build_ompi("allreduce", &dir.0);
    let (code, out, err) = krun(&[
        "--local",
        "3",
        "-n",
        "6",
        "-x",
        "OMPI_MCA_pmix_base_async_modex=1",
        "-x",
        "OMPI_MCA_pmix_base_collect_data=0",
        "-x",
        "KRUN_PMIX_TRACE=1",
        prog.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for r in 0..6 {
        assert!(
            out.contains(&format!(
                "allreduce: rank {r} of 6: 0 of 4096 elements wrong"
            )),
            "rank {r}:\n{out}\n{err}"
        );
    }
    assert!(
        err.contains("PMIx direct modex: a local rank asks for rank")
            && err.contains("PMIx direct modex: node "),
        "{err}"
    );
}

#[test]
fn openmpi_abort_ends_the_job_with_its_code() {
    let dir = temp_dir("ompi-abort");
    let prog = build_ompi("abort", &dir.0);
    let (code, out, err) = krun(&["--local", "3", "-n", "6", prog.to_str().unwrap(), "4", "7"]);
    assert_eq!(code, 7, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("krun: rank 4 on node 2 called MPI_Abort (PMIx abort) with exit code 7"),
        "{err}"
    );
}

#[test]
fn an_openmpi_rank_exiting_without_finalize_ends_the_job_naming_it() {
    let dir = temp_dir("ompi-nofin");
    let prog = build_ompi("no_finalize", &dir.0);
    let (code, out, err) = krun(&["--local", "3", "-n", "6", prog.to_str().unwrap(), "4", "3"]);
    assert_ne!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("krun: rank 4 on node 2 exited with code 3 without MPI_Finalize"),
        "{err}"
    );
    let (code, out, err) = krun(&["--local", "3", "-n", "6", prog.to_str().unwrap(), "1", "0"]);
    assert_ne!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        err.contains("krun: rank 1 on node 0 exited with code 0 without MPI_Finalize"),
        "{err}"
    );
}

#[test]
fn a_pmix_fence_a_gone_rank_never_joins_fails_naming_it() {
    let dir = temp_dir("ompi-fence");
    let prog = build_ompi("no_finalize", &dir.0);
    // Rank 1 leaves before MPI_Init: the others' PMIx fence in MPI_Init cannot complete.
    let (code, out, err) = krun(&[
        "--mpi",
        "pmix",
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
            "PMIx fence 1 cannot complete: rank 1 on node 0 exited with code 0 without joining it"
        ),
        "{err}"
    );
    // Named once: the failures that follow as the job ends are not news.
    assert_eq!(err.matches("cannot complete").count(), 1, "{err}");
}

#[test]
fn a_rank_inherits_only_its_pmi_socket() {
    let (code, out, err) = krun(&[
        "--local",
        "2",
        "-n",
        "4",
        "--tag-output",
        "sh",
        "-c",
        "echo pmi_fd=$PMI_FD; exec ls -l /proc/self/fd",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    for r in 0..4 {
        let tag = format!("[{r}] ");
        let lines: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix(&tag)).collect();
        let pmi = lines
            .iter()
            .find_map(|l| l.strip_prefix("pmi_fd="))
            .unwrap_or_else(|| panic!("rank {r} printed no PMI_FD:\n{out}"));
        // Descriptors above stderr, other than the /proc directory ls reads.
        let extra: Vec<(&str, &str)> = lines
            .iter()
            .filter_map(|l| l.split_once(" -> "))
            .filter_map(|(left, target)| {
                let fd = left.split_whitespace().last()?;
                (fd.parse::<u32>().ok()? > 2 && !target.starts_with("/proc/"))
                    .then_some((fd, target))
            })
            .collect();
        assert_eq!(extra.len(), 1, "rank {r}: {extra:?}\n{out}");
        assert_eq!(extra[0].0, pmi, "rank {r}: {extra:?}");
        assert!(extra[0].1.starts_with("socket:"), "rank {r}: {extra:?}");
    }
}

#[test]
fn a_pmix_fence_over_part_of_the_job_collects_its_ranks_data_across_nodes() {
    let dir = temp_dir("pmix-group");
    // OpenPMIx's client library directly (rank/examples/mpi/pmix_client.c).
    let prog = build_with("mpicc.openmpi", "pmix_client", &dir.0);
    // Ranks 0-1 on node 0, 2-3 on node 1, 4-5 on node 2: the group {0, 1, 4} spans nodes 0
    // and 2; node 1 takes no part.
    let (code, out, err) = krun_with(
        &[
            "--mpi",
            "pmix",
            "--local",
            "3",
            "-n",
            "6",
            prog.to_str().unwrap(),
            "group",
        ],
        &[("KRUN_PMIX_TRACE", "1")],
    );
    let all = format!("exit code {code}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, 0, "{all}");
    for r in [0, 1, 4] {
        assert!(
            out.contains(&format!(
                "pmix_client: rank {r} got the group's keys after a fence over ranks 0,1,4"
            )),
            "{all}"
        );
    }
    for r in 0..6 {
        assert!(
            out.contains(&format!("pmix_client: rank {r} of 6 done")),
            "{all}"
        );
    }
    // The group's nodes took part in its fence (once each), the other node did not.
    for node in [0, 2] {
        assert_eq!(
            err.matches(&format!(
                "krund: node {node}: PMIx fence 1 over ranks [0, 1, 4]"
            ))
            .count(),
            1,
            "{all}"
        );
    }
    assert!(
        !err.contains("krund: node 1: PMIx fence 1 over ranks"),
        "{all}"
    );
    assert!(!err.contains("not supported"), "{all}");
}

#[test]
fn pmix_spawn_fails_at_once_with_not_supported_and_krund_says_so() {
    let dir = temp_dir("pmix-spawn");
    let prog = build_with("mpicc.openmpi", "pmix_client", &dir.0);
    let (code, out, err) = krun(&[
        "--mpi",
        "pmix",
        "--local",
        "2",
        "-n",
        "4",
        prog.to_str().unwrap(),
        "spawn",
    ]);
    let all = format!("exit code {code}\nstdout:\n{out}\nstderr:\n{err}");
    // The spawn failed (the job went on: every rank fenced and finished).
    assert_eq!(code, 0, "{all}");
    let line = out
        .lines()
        .find(|l| l.starts_with("pmix_client: rank 0: PMIx_Spawn returned "))
        .unwrap_or_else(|| panic!("no spawn status: {all}"));
    assert!(line.contains("NOT-SUPPORTED"), "{line}");
    for r in 0..4 {
        assert!(
            out.contains(&format!("pmix_client: rank {r} of 4 done")),
            "{all}"
        );
    }
    assert!(
        err.contains(
            "krund: node 0: rank 0 asked PMIx to spawn processes (1 app(s), /bin/true): \
             PMIx_Spawn / MPI_Comm_spawn is not supported by krun"
        ),
        "{all}"
    );
}
