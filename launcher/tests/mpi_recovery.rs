//! MPI jobs recovering from a lost node (`runtime/mpi_recovery.rs`): the MPI heat stencil
//! (rank/examples/mpi/heat_mpi.c: MPI halo exchange, then MPI_Barrier and a krun safepoint
//! where the coordinated policy checkpoints every second) on 3 local nodes and a spare,
//! built with Debian's Open MPI and with MPICH. Node 1 is SIGKILLed 5 s into the job; every
//! rank restarts as a new process from the recovery line (the newest committed checkpoint,
//! or the program's start when none was committed yet), node 1's ranks on the spare, MPI
//! wires up again through the nodes' new PMIx namespace / PMI-1 KVS, and the job's checksum
//! equals the serial program's.
//!
//! The failure comes at a time, not after K commits, so the recovery is tested from a
//! checkpoint or from the program's start alike. (An MPICH job's checkpoints used to stall
//! for the barrier's 60 s: MPICH's MPI_Init takes SIGUSR1, the signal krund woke ranks with;
//! krund now wakes them with a signal of their own, `control::wake_signal`.)
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A whole job may take this long before it is killed (they take well under a minute).
const JOB_LIMIT: Duration = Duration::from_secs(300);

/// `target/<profile>`: tests run from `target/<profile>/deps`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "krun-mpi-recovery-{name}-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    ));
    std::fs::create_dir_all(dir.join("xdg")).expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("xdg"), std::fs::Permissions::from_mode(0o700)).unwrap();
    TempDir(dir)
}

/// Builds heat_mpi with `mpicc` against libkrun.so, and the serial reference.
fn build(mpicc: &str, out: &Path) -> (PathBuf, PathBuf) {
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
        "building heat_mpi with {mpicc} (scripts/install-deps.sh installs mpich, \
         libmpich-dev, openmpi-bin and libopenmpi-dev) failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let serial = out.join("heat_serial");
    let o = Command::new("gcc")
        .args(["-O2", "-ffp-contract=off", "-o"])
        .arg(&serial)
        .arg(examples.join("c/heat_serial.c"))
        .output()
        .expect("gcc");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (out.join("heat_mpi"), serial)
}

fn checksum(t: &str) -> Option<String> {
    t.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .map(str::to_string)
}

/// Runs krun with `args` in `dir`; kills it after [`JOB_LIMIT`]. Returns (exit code,
/// stdout, stderr).
fn krun(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(args)
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .env("XDG_RUNTIME_DIR", dir.join("xdg"))
        .env("KRUN_GHOST_DIR", dir.join("ghost"))
        .env_remove("KRUN_GHOST_OWNER")
        .env_remove("KRUN_GHOST_RESTORE")
        .env_remove("KRUN_STORE_LEVEL")
        .env_remove("KRUN_STORE_DISK")
        .env("KRUN_RECV_TIMEOUT_MS", "60000")
        .env("KRUN_STORE_ARENA_MIB", "16")
        .env("HEAT_STEP_DELAY_US", "20000")
        // Open MPI's TCP transport between local nodes stays on loopback.
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
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let status = status.unwrap_or_else(|| {
        panic!("krun {args:?} did not end within {JOB_LIMIT:?}\nstdout:\n{out}\nstderr:\n{err}")
    });
    (status.code().unwrap_or(-1), out, err)
}

/// The heat stencil built with `mpicc` on 3 local nodes and a spare, node 1 killed 5 s in:
/// the job ends with the serial checksum, every rank restarted from the recovery line as
/// a new process and wired up again through MPI.
fn recovers_onto_the_spare(mpicc: &str, tag: &str, mpi: &str) {
    let dir = temp_dir(tag);
    let (heat, serial) = build(mpicc, &dir.0);
    let args = ["48", "40", "400"];
    let want = Command::new(&serial).args(args).output().unwrap();
    let want = checksum(&String::from_utf8_lossy(&want.stdout)).expect("serial checksum");
    let (code, out, err) = krun(
        &dir.0,
        &[
            "--local",
            "3",
            "--spares",
            "1",
            "-n",
            "6",
            "--mpi",
            mpi,
            "--checkpoint-interval",
            "1",
            // At a time, not after K commits (see the module doc).
            "--inject-failure",
            "node=1@5s",
            heat.to_str().unwrap(),
            args[0],
            args[1],
            args[2],
        ],
    );
    let all = format!("exit code {code}\nstdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, 0, "{all}");
    assert_eq!(checksum(&out), Some(want), "{all}");
    assert!(err.contains("SIGKILL to node 1"), "{all}");
    assert!(err.contains("recovered from the failure"), "{all}");
    // Ranks 2-3 (node 1's) restart on the spare, node 3, from the recovery line.
    let line = err
        .split("ranks 2-3 restart on spare node 3 from ")
        .nth(1)
        .unwrap_or_else(|| panic!("no restart onto the spare: {all}"));
    // "checkpoint K (L2, ...)" or "the program's start".
    let version: Option<u64> = line
        .strip_prefix("checkpoint ")
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|k| k.parse().ok());
    // Every rank computed, the restarted ones from the recovery line's state. (A rank may
    // not have computed in its first incarnation: under load the kill can come while ranks
    // are still in MPI_Init.)
    for r in 0..6 {
        assert!(
            out.contains(&format!("heat_mpi: rank {r} of 6 computing from step ")),
            "rank {r}: {all}"
        );
        if let Some(v) = version {
            assert!(
                out.contains(&format!("heat_mpi: rank {r} restored version {v} at step ")),
                "rank {r}: {all}"
            );
        }
    }
    // The survivors are restarted as new processes, never rolled back in place (krund says
    // so for each one still alive when the order came; one that had already exited, e.g.
    // on an MPI error after its peer died, is started anew anyway).
    // (With no checkpoint committed, every rank restarts from the start: nothing to roll
    // back.)
    if version.is_some() {
        assert!(
            err.contains("is an MPI rank: restarted as a new process instead of rolling back"),
            "{all}"
        );
        // krun's line for each survivor says why, as its node did: restarted on purpose
        // with the job, not "could not roll back inside its process (gone or ...)".
        assert!(
            err.contains(
                "restarted with the job (MPI: every rank restarts as a new process in a new \
                 MPI incarnation): restarted on node "
            ),
            "{all}"
        );
        assert!(
            !err.contains("could not roll back inside its process"),
            "{all}"
        );
    }
}

#[test]
fn an_open_mpi_job_restarts_every_rank_onto_the_spare_through_pmix_and_ends_with_the_serial_checksum(
) {
    recovers_onto_the_spare("mpicc.openmpi", "ompi", "pmix");
}

#[test]
fn an_mpich_job_restarts_every_rank_onto_the_spare_through_pmi1_and_ends_with_the_serial_checksum()
{
    recovers_onto_the_spare("mpicc.mpich", "mpich", "pmi1");
}
