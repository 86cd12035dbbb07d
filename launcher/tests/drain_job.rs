//! `krun node drain` and `krun node add` while the C heat stencil runs (rank-library ranks
//! that use the fabric), with real processes in local mode: the drain takes a coordinated
//! checkpoint through the policy, the drained node's ranks restart on another node from it
//! in the next wiring epoch, the other ranks continue from it, the node leaves, and the
//! result equals the serial reference.
//!
//! MPI jobs (the heat stencil with MPI, rank/examples/mpi/heat_mpi.c, with Open MPI's
//! PMIx and MPICH's PMI-1): the drain restarts every rank from the drain's checkpoint in a
//! new MPI incarnation, the drained node's ranks on the remaining nodes; a plain MPI
//! program (no rank library: no coordinated checkpoint of it) has its drain refused with
//! the reason and runs on untouched (`runtime/drain.rs`, "MPI jobs").
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod job_common;
use job_common::*;

fn temp(tag: &str) -> TempDir {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "krun-drain-{tag}-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    )));
    std::fs::create_dir_all(dir.0.join("xdg")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.0.join("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// The job's krun and its output, read as it comes. Dropping it ends the job (SIGTERM to
/// the krun we started; SIGKILL if it has not ended in 30 s).
struct Job {
    child: Child,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Job {
    fn start(mut cmd: Command) -> Job {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let read = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let out = read(Box::new(child.stdout.take().unwrap()));
        let err = read(Box::new(child.stderr.take().unwrap()));
        Job {
            child,
            out: Some(out),
            err: Some(err),
        }
    }

    /// Waits for the job's end (at most `limit`: then the test fails); exit code, stdout,
    /// stderr.
    fn finish(&mut self, limit: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if status.is_none() {
            // SAFETY: SIGKILL to the krun this test started and has not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
            let _ = self.child.wait();
        }
        let out = self.out.take().unwrap().join().unwrap();
        let err = self.err.take().unwrap().join().unwrap();
        assert!(
            status.is_some(),
            "the job did not end within {limit:?}\n{out}{err}"
        );
        (status.and_then(|s| s.code()), out, err)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `krun node ARGS...` against the running job: exit status and stdout + stderr.
fn node_cmd(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = krun(dir).arg("node").args(args).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Waits until every one of `n` ranks runs (the job is up), at most 120 s.
fn wait_running(dir: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(s) = status(dir) {
            let ranks = s["status"]["ranks"].as_array().cloned().unwrap_or_default();
            if ranks.len() == n && ranks.iter().all(|r| r["state"] == "running") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node each rank runs on, per `krun status`.
fn rank_nodes(dir: &Path) -> Option<Vec<u64>> {
    let s = status(dir)?;
    Some(
        s["status"]["ranks"]
            .as_array()?
            .iter()
            .filter_map(|r| r["node"].as_u64())
            .collect(),
    )
}

const GRID: [&str; 3] = ["48", "40", "400"];

/// A heat job on 4 nodes with one rank each (nodes 0-2 are the membership's supervisors;
/// node 3 is not), `extra` krun arguments first.
fn heat_job(dir: &Path, heat: &Path, extra: &[&str]) -> Job {
    let mut cmd = krun(dir);
    cmd.args(extra)
        .args(["--local", "4", "-n", "4"])
        .arg(heat)
        .args(GRID)
        .arg("0")
        // 400 steps of >= 50 ms: the job still runs when the drain comes, also on a loaded
        // machine (at 20 ms, a CI run's job had ended before its drain: "the job's
        // checkpoint policy has ended").
        .env("HEAT_STEP_DELAY_US", "50000");
    Job::start(cmd)
}

/// Drains node 3, checks what krun and the job directory say, and returns the drain's time
/// as measured by `krun node drain` (request to the node's leave).
fn drain_node_3(dir: &Path, to: u64) -> Duration {
    let started = Instant::now();
    let (ok, said) = node_cmd(dir, &["drain", "3"]);
    let took = started.elapsed();
    assert!(ok, "{said}");
    assert!(
        said.contains("node 3 left the job (1 rank(s) moved)"),
        "{said}"
    );
    // The rank runs on the target now; the decisions are recorded.
    assert_eq!(rank_nodes(dir), Some(vec![0, 1, 2, to]));
    let log = decisions(dir).expect("decisions.log in the job directory");
    assert!(log.contains("DrainStarted { node: 3 }"), "{log}");
    assert!(log.contains("Drained { node: 3, version: "), "{log}");
    assert!(
        log.contains(&format!("Restart {{ rank: 3, incarnation: 1, node: {to}")),
        "{log}"
    );
    took
}

/// Checks the job's end after the drain of node 3; the drain's line and krun's stderr.
fn check_end(job: &mut Job, heat: &Path, want: &str, to: u64, role: &str) -> (String, String) {
    let (code, out, err) = job.finish(Duration::from_secs(240));
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(checksum(&out).as_deref(), Some(want), "{out}{err}");
    let line = err
        .lines()
        .find(|l| l.contains("node 3 drained: "))
        .unwrap_or_else(|| panic!("no drain line in {err}"));
    assert!(
        line.contains(&format!("rank 3 moved to {role} {to} from checkpoint ")),
        "{line}"
    );
    assert!(
        line.contains("ranks 0-2 continue from checkpoint "),
        "{line}"
    );
    // A drain is not a failure.
    assert!(!err.contains("failed at epoch"), "{err}");
    assert_eq!(heat_left(heat), Vec::<u32>::new(), "{err}");
    (line.to_string(), err)
}

#[test]
fn draining_a_node_moves_its_heat_rank_to_the_spare_and_the_result_equals_the_serial_reference() {
    let dir = temp("spare");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &GRID);
    // Checkpoints on an interval too: they go on after the drain, with node 3 gone.
    let mut job = heat_job(
        &dir.0,
        &heat,
        // Every 2 s. A checkpoint right after the drain's rollback in place once gave rank 2
        // `Continue` while the others were told to checkpoint (it asked its node just
        // outside the barrier; CI under load): the rank library now resolves that mix to
        // the checkpoint (`rank::checkpoint::agree`).
        &["--spares", "1", "--checkpoint-interval", "2"],
    );
    wait_running(&dir.0, 4);
    let took = drain_node_3(&dir.0, 4);
    let (line, err) = check_end(&mut job, &heat, &want, 4, "spare node");
    let after = &err[err.find("node 3 drained: ").unwrap()..];
    assert!(
        after
            .lines()
            .any(|l| l.starts_with("krun: checkpoint ") && l.contains(" committed: 4 ranks")),
        "no checkpoint after the drain: {err}"
    );
    eprintln!("drain to a spare: {took:?} for `krun node drain`; {line}");
}

#[test]
fn a_node_added_while_heat_runs_takes_the_drained_nodes_rank_and_the_result_equals_the_serial_reference(
) {
    let dir = temp("add");
    let heat = build_heat(&dir.0);
    let want = serial(&dir.0, &GRID);
    let mut job = heat_job(&dir.0, &heat, &[]);
    wait_running(&dir.0, 4);
    let (ok, said) = node_cmd(&dir.0, &["add"]);
    assert!(ok, "{said}");
    assert!(said.contains("node 4 joined the job at epoch"), "{said}");
    let took = drain_node_3(&dir.0, 4);
    let (line, _) = check_end(&mut job, &heat, &want, 4, "spare node");
    eprintln!("drain to an added node: {took:?} for `krun node drain`; {line}");
}

#[test]
fn drains_of_an_unknown_node_of_the_last_node_and_during_another_drain_are_refused_with_a_reason() {
    let dir = temp("bad");
    let heat = build_heat(&dir.0);
    {
        // One node: nowhere to move its ranks.
        let mut cmd = krun(&dir.0);
        cmd.args(["--local", "1", "-n", "2"])
            .arg(&heat)
            .args(["48", "40", "100000", "0"])
            .env("HEAT_STEP_DELAY_US", "20000");
        let _job = Job::start(cmd);
        wait_running(&dir.0, 2);
        let (ok, said) = node_cmd(&dir.0, &["drain", "0"]);
        assert!(!ok, "{said}");
        assert!(
            said.contains("node 0 is the last node of the job"),
            "{said}"
        );
        let (ok, said) = node_cmd(&dir.0, &["drain", "7"]);
        assert!(!ok, "{said}");
        assert!(said.contains("node 7 is not a node of this job"), "{said}");
    }
    // Two drains at once: the second is refused while the first runs (or, if the first
    // was over already, because node 3 has left); either way it says why and moves nothing.
    let mut job = heat_job(&dir.0, &heat, &["--spares", "1"]);
    wait_running(&dir.0, 4);
    let first = {
        let d = dir.0.clone();
        std::thread::spawn(move || node_cmd(&d, &["drain", "3"]))
    };
    std::thread::sleep(Duration::from_millis(200));
    let (ok, said) = node_cmd(&dir.0, &["drain", "3"]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("node 3 is being drained") || said.contains("node 3 is not a member"),
        "{said}"
    );
    let (ok, said) = first.join().unwrap();
    assert!(ok, "{said}");
    let want = serial(&dir.0, &GRID);
    check_end(&mut job, &heat, &want, 4, "spare node");
}

/// A plain program (no rank library, no libghost): counts to its second argument, one line
/// per count appended to the file named first, 20 ms apart.
const COUNTER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *f = fopen(argv[1], "a");
    if (!f) return 1;
    long n = atol(argv[2]);
    for (long i = 1; i <= n; i++) {
        fprintf(f, "%ld\n", i);
        fflush(f);
        usleep(20000);
    }
    printf("rank %s counted to %ld\n", getenv("KRUN_RANK"), n);
    return fclose(f) == 0 ? 0 : 1;
}
"#;

#[test]
fn a_plain_program_moves_with_criu_and_its_count_continues_on_the_adopting_node() {
    let dir = temp("criu");
    let src = dir.0.join("counter.c");
    std::fs::write(&src, COUNTER_C).unwrap();
    let counter = dir.0.join("counter");
    let ok = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&counter)
        .arg(&src)
        .status()
        .expect("cc")
        .success();
    assert!(ok, "compiling the counter");
    let total = 300;
    let count = |rank: usize| dir.0.join(format!("count.{rank}"));
    let script = format!(
        "exec {} {}/count.$KRUN_RANK {total}",
        counter.display(),
        dir.0.display()
    );
    let mut cmd = krun(&dir.0);
    // --mpi none: a rank holding its node's PMI socket (an external unix socket to CRIU)
    // cannot be moved with CRIU; plain programs are run without PMI (README).
    cmd.args([
        "--local",
        "4",
        "-n",
        "4",
        "--mpi",
        "none",
        "--bind-to",
        "none",
        "sh",
        "-c",
        &script,
    ]);
    let mut job = Job::start(cmd);
    wait_running(&dir.0, 4);
    let lines = |rank: usize| {
        std::fs::read_to_string(count(rank))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines(3) < 20 {
        assert!(Instant::now() < deadline, "rank 3 never counted to 20");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let (ok, said) = node_cmd(&dir.0, &["drain", "3"]);
    let took = started.elapsed();
    assert!(ok, "{said}");
    assert!(
        said.contains("node 3 left the job (1 rank(s) moved)"),
        "{said}"
    );
    eprintln!("CRIU drain of a plain program: {took:?} for `krun node drain`");
    let moved_at = lines(3);
    assert!(
        moved_at < total,
        "rank 3 was done before it moved ({moved_at})"
    );
    // It runs on another node now, as a process that node did not spawn.
    let nodes = rank_nodes(&dir.0).expect("status after the drain");
    assert!(nodes[3] != 3, "{nodes:?}");
    let (code, out, err) = job.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}{err}");
    // What the moved rank prints reaches krun: the adopting node's pipes replaced the old
    // node's (CRIU inherit-fd), and it forwards them like its own ranks' output.
    for r in 0..4 {
        assert!(
            out.contains(&format!("rank {r} counted to {total}")),
            "{out}{err}"
        );
    }
    // Every rank counted once from 1 to the end: the moved one went on where it was.
    let want: String = (1..=total).map(|i| format!("{i}\n")).collect();
    for r in 0..4 {
        assert_eq!(
            std::fs::read_to_string(count(r)).unwrap(),
            want,
            "rank {r}\n{err}"
        );
    }
    assert_eq!(heat_left(&counter), Vec::<u32>::new(), "{err}");
}

/// Builds rank/examples/mpi/heat_mpi with `mpicc` against libkrun.so into `out`, and the
/// serial reference (`heat_serial`).
fn build_heat_mpi(mpicc: &str, out: &Path) -> PathBuf {
    let lib = target_dir();
    assert!(
        lib.join("libkrun.so").exists(),
        "libkrun.so not found in {} (cargo build --workspace first)",
        lib.display()
    );
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(examples.join("mpi"))
        .arg(format!("MPICC={mpicc}"))
        .arg(format!("LIBDIR={}", lib.display()))
        .arg(format!("OUT={}", out.display()))
        .arg(out.join("heat_mpi"))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building heat_mpi with {mpicc} (scripts/install-deps.sh installs openmpi and mpich) \
         failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new("gcc")
        .args(["-O2", "-ffp-contract=off", "-o"])
        .arg(out.join("heat_serial"))
        .arg(examples.join("c/heat_serial.c"))
        .output()
        .expect("gcc");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.join("heat_mpi")
}

/// Waits until the job committed a checkpoint (every rank is wired and linked), at most
/// 120 s.
fn wait_committed(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !decisions(dir).is_some_and(|l| l.contains("Committed { version: ")) {
        assert!(Instant::now() < deadline, "no checkpoint was committed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// heat_mpi with `mpicc` under `--mpi MPI` on 4 nodes of 2 ranks (nodes 0-2 are the
/// supervisors; node 3, ranks 6-7, can leave), checkpointing every 4 s: node 3 is drained
/// while it runs. Every rank restarts from the drain's checkpoint as a new process in a new
/// MPI incarnation, ranks 6-7 on the remaining nodes, and the result equals the serial
/// reference.
fn an_mpi_drain_restarts_the_job_without_the_node(mpicc: &str, mpi: &str) {
    let dir = temp(&format!("mpi-{mpi}"));
    let heat = build_heat_mpi(mpicc, &dir.0);
    let want = serial(&dir.0, &GRID);
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "4", "-n", "8", "--mpi", mpi])
        // Every 4 s, not 2: each checkpoint holds 8 ranks at a barrier, and under load the
        // job then outlived krun's 120 s node bootstrap read timeout (a job longer than
        // that ends with "the peer closed the bootstrap connection", see the report).
        .args(["--checkpoint-interval", "4"])
        .arg(&heat)
        .args(GRID)
        // 400 steps of >= 40 ms: the job still runs when the drain comes.
        .env("HEAT_STEP_DELAY_US", "40000")
        // Open MPI's TCP transport between local nodes stays on loopback.
        .env("OMPI_MCA_btl_tcp_if_include", "lo");
    let mut job = Job::start(cmd);
    wait_running(&dir.0, 8);
    wait_committed(&dir.0);
    let (ok, said) = node_cmd(&dir.0, &["drain", "3"]);
    assert!(ok, "{said}");
    assert!(
        said.contains("node 3 left the job (2 rank(s) moved)"),
        "{said}"
    );
    // Ranks 6-7 run elsewhere now; the others where they were.
    let nodes = rank_nodes(&dir.0).expect("status after the drain");
    assert_eq!(nodes.len(), 8, "{nodes:?}");
    assert_eq!(&nodes[..6], &[0, 0, 1, 1, 2, 2], "{nodes:?}");
    assert!(nodes[6] != 3 && nodes[7] != 3, "{nodes:?}");
    let log = decisions(&dir.0).expect("decisions.log");
    assert!(log.contains("DrainStarted { node: 3 }"), "{log}");
    assert!(log.contains("Drained { node: 3, version: "), "{log}");
    let (code, out, err) = job.finish(Duration::from_secs(300));
    let all = format!("exit code {code:?}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, Some(0), "{all}");
    assert_eq!(checksum(&out).as_deref(), Some(want.as_str()), "{all}");
    let line = err
        .lines()
        .find(|l| l.contains("node 3 drained: "))
        .unwrap_or_else(|| panic!("no drain line: {all}"));
    // Both to one node, or one each ("rank 6 moved to node 0 ...; rank 7 moved to ...").
    assert!(
        line.contains("ranks 6-7 moved to node ")
            || (line.contains("rank 6 moved to node ") && line.contains("rank 7 moved to node ")),
        "{line}"
    );
    assert!(
        line.contains("ranks 0-5 continue from checkpoint "),
        "{line}"
    );
    let version: u64 = line
        .split("from checkpoint ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint in {line}"));
    // Every rank restarted from the drain's checkpoint as a new process and wired up again
    // through MPI (the new incarnation's namespace / KVS).
    for r in 0..8 {
        assert!(
            out.contains(&format!(
                "heat_mpi: rank {r} restored version {version} at step "
            )),
            "rank {r}: {all}"
        );
    }
    assert!(
        err.contains("restarted with the job (MPI: every rank restarts as a new process"),
        "{all}"
    );
    // A drain is not a failure, and nothing of the old incarnation ended the job.
    assert!(!err.contains("failed at epoch"), "{all}");
    assert!(!err.contains("MPI_Abort"), "{all}");
    assert_eq!(heat_left(&heat), Vec::<u32>::new(), "{all}");
    eprintln!("{line}");
}

#[test]
fn draining_a_node_of_an_open_mpi_job_restarts_every_rank_through_pmix_and_the_result_equals_the_serial_reference(
) {
    an_mpi_drain_restarts_the_job_without_the_node("mpicc.openmpi", "pmix");
}

#[test]
fn draining_a_node_of_an_mpich_job_restarts_every_rank_through_pmi1_and_the_result_equals_the_serial_reference(
) {
    an_mpi_drain_restarts_the_job_without_the_node("mpicc.mpich", "pmi1");
}

/// A plain MPI program (no rank library): marks `DIR/ready.R` once wired, then barriers
/// every 50 ms for the number of rounds given, and says it is done.
const PLAIN_MPI_C: &str = r#"
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (argc != 3) MPI_Abort(MPI_COMM_WORLD, 2);
    char path[4096];
    snprintf(path, sizeof path, "%s/ready.%d", argv[1], rank);
    FILE *f = fopen(path, "w");
    if (f) fclose(f);
    long rounds = atol(argv[2]);
    for (long i = 0; i < rounds; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        usleep(50000);
    }
    printf("plain_mpi: rank %d of %d done\n", rank, size);
    MPI_Finalize();
    return 0;
}
"#;

#[test]
fn draining_a_node_of_an_mpi_job_that_cannot_checkpoint_is_refused_and_the_job_runs_on() {
    let dir = temp("mpi-refused");
    let src = dir.0.join("plain_mpi.c");
    std::fs::write(&src, PLAIN_MPI_C).unwrap();
    let prog = dir.0.join("plain_mpi");
    let o = Command::new("mpicc.openmpi")
        .args(["-O2", "-o"])
        .arg(&prog)
        .arg(&src)
        .output()
        .expect("mpicc.openmpi (scripts/install-deps.sh installs openmpi)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut cmd = krun(&dir.0);
    cmd.args(["--local", "4", "-n", "4", "--mpi", "pmix"])
        .arg(&prog)
        .arg(&dir.0)
        // 300 rounds of >= 50 ms: still running when the drain comes.
        .arg("300")
        .env("OMPI_MCA_btl_tcp_if_include", "lo");
    let mut job = Job::start(cmd);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(0..4).all(|r| dir.0.join(format!("ready.{r}")).exists()) {
        assert!(Instant::now() < deadline, "the MPI ranks never wired up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let (ok, said) = node_cmd(&dir.0, &["drain", "3"]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("node 3 runs MPI rank 3 that do(es) not use krun's rank library")
            && said.contains("nothing was moved"),
        "{said}"
    );
    eprintln!(
        "refused in {:?}: {}",
        started.elapsed(),
        said.lines().last().unwrap_or("")
    );
    // Nothing moved, and the job goes on to its end.
    assert_eq!(rank_nodes(&dir.0), Some(vec![0, 1, 2, 3]));
    let (code, out, err) = job.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{out}{err}");
    for r in 0..4 {
        assert!(
            out.contains(&format!("plain_mpi: rank {r} of 4 done")),
            "{out}{err}"
        );
    }
    assert!(!err.contains("drained"), "{err}");
}
