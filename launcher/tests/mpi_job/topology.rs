//! What each node's PMIx server tells its ranks: the topology, every peer's placement,
//! and a refused Comm_spawn.

use super::*;

/// The machine's topology is discovered by one krund, cached (one file per boot), loaded
/// by the others, and shared by each node's PMIx server with its ranks: every rank gets
/// the whole topology, I/O devices included, from the server's shared memory.
#[test]
fn one_krund_discovers_the_topology_the_others_load_it_and_ranks_get_it_whole() {
    let dir = temp_dir("pmix-topology");
    let prog = build_with("mpicc.openmpi", "pmix_client", &dir.0);
    let cache = dir.0.join("cache");
    let run = || {
        let (code, out, err) = krun_with(
            &[
                "--mpi",
                "pmix",
                "--local",
                "3",
                "-n",
                "3",
                prog.to_str().unwrap(),
                "topology",
            ],
            &[
                ("KRUN_TOPOLOGY_CACHE", cache.to_str().unwrap()),
                ("KRUN_PMIX_TRACE", "1"),
            ],
        );
        let all = format!("exit code {code}\nstdout:\n{out}\nstderr:\n{err}");
        assert_eq!(code, 0, "{all}");
        (out, err, all)
    };
    let (out, err, all) = run();
    // What this machine's discovery finds, as the test process sees it.
    let want = launcher::topology::Topology::discover().unwrap().counts();
    assert!(want.pus >= 1, "{want}");
    assert_eq!(
        err.matches("PMIx topology discovered, cached in ").count(),
        1,
        "{all}"
    );
    assert_eq!(
        err.matches("PMIx topology loaded from the machine's cache ")
            .count(),
        2,
        "{all}"
    );
    assert_eq!(err.matches(&format!("({want})")).count(), 3, "{all}");
    for r in 0..3 {
        assert!(
            out.contains(&format!(
                "pmix_client: rank {r} topology from shared memory: {want}"
            )),
            "{all}"
        );
    }
    // The next job finds the cache: no krund discovers.
    let (_, err, all) = run();
    assert_eq!(
        err.matches("PMIx topology loaded from the machine's cache ")
            .count(),
        3,
        "{all}"
    );
    // A damaged cache is said, ignored and replaced.
    let file = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "xml"))
        .expect("the cache file");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let (out, err, all) = run();
    assert!(
        err.contains(&format!(
            "ignoring the topology cache {}: its XML is damaged",
            file.display()
        )),
        "{all}"
    );
    assert_eq!(
        err.matches("PMIx topology discovered, cached in ").count(),
        1,
        "{all}"
    );
    assert_eq!(
        out.matches(&format!("from shared memory: {want}")).count(),
        3,
        "{all}"
    );
}

/// Every rank learns each rank's host, local rank and node rank from its node's PMIx
/// server, its peers on other nodes included (what krund registers; a registration
/// without them would leave the remote ones NOT-FOUND), and its own node's id.
#[test]
fn ranks_see_every_peers_host_local_rank_and_node_rank() {
    let dir = temp_dir("pmix-peers");
    let prog = build_with("mpicc.openmpi", "pmix_client", &dir.0);
    let (code, out, err) = krun(&[
        "--mpi",
        "pmix",
        "--local",
        "3",
        "-n",
        "5",
        prog.to_str().unwrap(),
        "peers",
    ]);
    let all = format!("exit code {code}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, 0, "{all}");
    // Ranks 0,1 on node 0, 2,3 on node 1, 4 on node 2.
    let place = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)];
    for (r, &(my_node, _)) in place.iter().enumerate() {
        for (q, &(node, local)) in place.iter().enumerate() {
            let id = if node == my_node {
                format!("node id {node}")
            } else {
                "node id ".to_string()
            };
            let want = format!("pmix_client: rank {r} sees rank {q}: host krun-node{node}, {id}");
            let line = out
                .lines()
                .find(|l| l.starts_with(&want))
                .unwrap_or_else(|| panic!("no {want:?}: {all}"));
            assert!(
                line.ends_with(&format!(", local rank {local}, node rank {local}")),
                "{line}\n{all}"
            );
        }
    }
}

#[test]
fn open_mpi_comm_spawn_fails_at_once_and_krund_says_why() {
    let dir = temp_dir("ompi-spawn");
    let prog = build_ompi("spawn", &dir.0);
    let krund_line = "asked PMIx to spawn processes (1 app(s), ";
    let unsupported = "PMIx_Spawn / MPI_Comm_spawn is not supported by krun";
    // Each rank spawns over MPI_COMM_SELF with MPI_ERRORS_RETURN: every one gets the error
    // back and the job ends normally.
    let (code, out, err) = krun(&[
        "--mpi",
        "pmix",
        "--local",
        "2",
        "-n",
        "2",
        prog.to_str().unwrap(),
        "self",
    ]);
    let all = format!("exit code {code}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, 0, "{all}");
    for r in 0..2 {
        assert!(
            out.contains(&format!("spawn: rank {r}: MPI_Comm_spawn failed: ")),
            "{all}"
        );
        assert!(
            err.contains(&format!("krund: node {r}: rank {r} {krund_line}")),
            "{all}"
        );
    }
    assert!(err.contains(unsupported), "{all}");
    assert!(!out.contains("a spawned process runs"), "{all}");
    // Over MPI_COMM_WORLD with the default handler the failure is fatal: Open MPI aborts
    // the job at once (bounded: krun() fails the test after JOB_LIMIT), krund said why.
    let (code, out, err) = krun(&[
        "--mpi",
        "pmix",
        "--local",
        "2",
        "-n",
        "2",
        prog.to_str().unwrap(),
        "fatal",
    ]);
    let all = format!("exit code {code}\nstdout:\n{out}\nstderr:\n{err}");
    assert_ne!(code, 0, "{all}");
    assert!(
        err.contains(&format!("krund: node 0: rank 0 {krund_line}")) && err.contains(unsupported),
        "{all}"
    );
    assert!(err.contains("called MPI_Abort"), "{all}");
    assert!(!out.contains("MPI_Comm_spawn succeeded"), "{all}");
    assert!(!out.contains("a spawned process runs"), "{all}");
}
