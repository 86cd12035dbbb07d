//! MPI programs under `krun` with no mpiexec or mpirun: krund serves PMI-1 and PMI-2 to its
//! ranks (MPICH's simple PMI client and Slurm's libpmi2 over `PMI_FD`) and PMIx (Open MPI's client, through
//! OpenPMIx's server library); fences go across nodes through krun. Debian's MPICH
//! (`mpich libmpich-dev`) and Open MPI 4.1 (`openmpi-bin libopenmpi-dev`), installed by
//! scripts/install-deps.sh, build the programs in rank/examples/mpi; each job runs on 3
//! local nodes and is bounded in time.
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A whole job may take this long before it is killed (they take about a second).
const JOB_LIMIT: Duration = Duration::from_secs(120);

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("krun-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    TempDir(dir)
}

/// Builds one MPI example with MPICH's compiler wrapper.
fn build(program: &str, out: &Path) -> PathBuf {
    build_with("mpicc.mpich", program, out)
}

/// Builds one MPI example with Open MPI's compiler wrapper.
fn build_ompi(program: &str, out: &Path) -> PathBuf {
    build_with("mpicc.openmpi", program, out)
}

fn build_with(mpicc: &str, program: &str, out: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/mpi");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("MPICC={mpicc}"))
        .arg(format!("OUT={}", out.display()))
        .arg(out.join(program))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building {program} with {mpicc} (scripts/install-deps.sh installs mpich, \
         libmpich-dev, openmpi-bin and libopenmpi-dev) failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    out.join(program)
}

/// Runs krun with `args`; kills it after [`JOB_LIMIT`]. Returns (exit code, stdout, stderr).
fn krun(args: &[&str]) -> (i32, String, String) {
    krun_with(args, &[])
}

/// [`krun`] with extra environment variables.
fn krun_with(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(args)
        .envs(env.iter().copied())
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        // Open MPI's TCP transport between local nodes stays on loopback (its default
        // excludes it and takes the host's interfaces).
        .env("OMPI_MCA_btl_tcp_if_include", "lo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("krun starts");
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + JOB_LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for krun") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            // SAFETY: SIGTERM to the krun we started (it stops its nodes and ranks).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(10));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let status = status.unwrap_or_else(|| {
        panic!("krun {args:?} did not end within {JOB_LIMIT:?}\nstdout:\n{out}\nstderr:\n{err}")
    });
    (status.code().unwrap_or(-1), out, err)
}

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
