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

mod openmpi;
mod pmi;
mod topology;
