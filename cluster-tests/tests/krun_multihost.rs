//! krun across hosts: 4 network namespaces stand in for 4 hosts, each running a
//! `krund --listen` daemon on its own IP; krun runs inside host 0. Needs root and the
//! workspace's binaries (`cargo build --workspace`, which `cargo nextest run --workspace`
//! does first).
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_tests::hosts::{HostsSpec, KrundHosts};
use cluster_tests::workspace_bin;
use cluster_tests::NodeProcess;

/// The namespace hosts with a `krund --listen` each (`cluster_tests::hosts`).
struct Hosts(KrundHosts);

impl std::ops::Deref for Hosts {
    type Target = KrundHosts;
    fn deref(&self) -> &KrundHosts {
        &self.0
    }
}

impl std::ops::DerefMut for Hosts {
    fn deref_mut(&mut self) -> &mut KrundHosts {
        &mut self.0
    }
}

impl Hosts {
    /// `n` hosts with a daemon each; `wrong_secret_on` gets a different secret.
    fn start(n: usize, wrong_secret_on: Option<usize>) -> Hosts {
        let spec = HostsSpec {
            wrong_secret_on,
            secret: "the secret of this multi-host test".into(),
            ..HostsSpec::new(workspace_bin("krund"), n)
        };
        Hosts(KrundHosts::start(&spec).unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n")))
    }

    /// Starts krun on host 0.
    fn krun(&self, args: &[&str]) -> NodeProcess {
        let mut c = self.0.krun(&workspace_bin("krun"));
        c.args(args);
        self.spawn_on(0, &mut c).expect("starting krun")
    }
}

/// Waits for a process (at most `limit`) and returns (exit code, stdout, stderr).
fn finish(p: NodeProcess, limit: Duration) -> (Option<i32>, String, String) {
    cluster_tests::hosts::finish(p, limit).expect("waiting for a process")
}

#[test]
fn twelve_ranks_on_four_hosts_exchange_over_the_fabric() {
    let hosts = Hosts::start(4, None);
    let selftest = workspace_bin("krun-selftest");
    let p = hosts.krun(&[
        "--hosts",
        &hosts.host_list(),
        "-n",
        "12",
        selftest.to_str().unwrap(),
    ]);
    let (code, out, err) = finish(p, Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}\n{err}");
    for rank in 0..12 {
        let left = (rank + 11) % 12;
        assert!(
            out.contains(&format!(
                "rank {rank}/12: ok: verified 64 KiB from rank {left} over tcp"
            )),
            "rank {rank}:\n{out}\n{err}"
        );
    }
    // Ranks ran on the hosts they were placed on: 3 per host, by block.
    let p = hosts.krun(&[
        "--hosts",
        &hosts.host_list(),
        "-n",
        "12",
        "--tag-output",
        "sh",
        "-c",
        "echo $KRUN_NODE_ID $(hostname -I)",
    ]);
    let (code, out, err) = finish(p, Duration::from_secs(60));
    assert_eq!(code, Some(0), "{err}");
    for (i, node) in hosts.cluster.nodes().enumerate() {
        let here = out
            .lines()
            .filter(|l| l.ends_with(&format!("{i} {}", node.ip())))
            .count();
        assert_eq!(here, 3, "host {i} ({}) ran {here} ranks:\n{out}", node.ip());
    }
}

#[test]
fn a_killed_host_is_named_with_its_ranks_and_the_job_ends_in_bounded_time() {
    let mut hosts = Hosts::start(4, None);
    let p = hosts.krun(&[
        "--hosts",
        &hosts.host_list(),
        "-n",
        "12",
        "sh",
        "-c",
        "sleep 60",
    ]);
    // Let every host start its ranks.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let killed = Instant::now();
    hosts.daemons[2].kill().unwrap();
    let (code, _, err) = finish(p, Duration::from_secs(60));
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "the job took {:?} to end",
        killed.elapsed()
    );
    assert_ne!(code, Some(0));
    let ip = hosts.cluster.node(2).unwrap().ip();
    assert!(
        err.contains(&format!("lost node 2 (ranks 6..8) on host {ip}")),
        "{err}"
    );
}

#[test]
fn a_host_with_another_secret_is_refused() {
    let hosts = Hosts::start(3, Some(1));
    let p = hosts.krun(&["--hosts", &hosts.host_list(), "-n", "3", "true"]);
    let (code, _, err) = finish(p, Duration::from_secs(60));
    assert_ne!(code, Some(0));
    let ip = hosts.cluster.node(1).unwrap().ip();
    assert!(
        err.contains(&format!("host {ip}: refused us: wrong cluster secret")),
        "{err}"
    );
}

#[test]
fn ssh_launch_starts_krund_on_each_host() {
    let hosts = Hosts::start(2, None);
    let dir = std::env::temp_dir().join(format!("krun-ssh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let keygen = |name: &str| {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(name))
            .status()
            .expect("ssh-keygen (openssh-client)");
        assert!(status.success());
    };
    keygen("host_key");
    keygen("user_key");
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
    let mut sshds = Vec::new();
    for node in hosts.cluster.nodes() {
        let mut d = node
            .spawn(
                Command::new("/usr/sbin/sshd")
                    .args(["-D", "-e", "-f", "/dev/null"])
                    .arg("-o")
                    .arg(format!("ListenAddress={}", node.ip()))
                    .arg("-o")
                    .arg(format!("HostKey={}", dir.join("host_key").display()))
                    .arg("-o")
                    .arg(format!(
                        "AuthorizedKeysFile={}",
                        dir.join("authorized_keys").display()
                    ))
                    .args(["-o", "PermitRootLogin=prohibit-password", "-o", "UsePAM=no"])
                    .args(["-o", "StrictModes=no", "-o", "PidFile=none"])
                    .stderr(Stdio::piped()),
            )
            .expect("starting sshd (openssh-server)");
        let mut line = String::new();
        BufReader::new(d.stderr().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.contains("Server listening"),
            "sshd on {}: {line}",
            node.ip()
        );
        sshds.push(d);
    }
    let wrapper = dir.join("ssh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ssh -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \"$@\"\n",
            dir.join("user_key").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let selftest = workspace_bin("krun-selftest");
    let p = hosts
        .cluster
        .node(0)
        .unwrap()
        .spawn(
            Command::new(workspace_bin("krun"))
                .args([
                    "--hosts",
                    &hosts.host_list(),
                    "--launch",
                    "ssh",
                    "-n",
                    "4",
                    "--tag-output",
                ])
                .arg(&selftest)
                .env("KRUN_SSH", &wrapper)
                .env("KRUN_SECRET_FILE", &hosts.secret)
                .env("KRUN_FABRIC_PROVIDER", "tcp")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .unwrap();
    let (code, out, err) = finish(p, Duration::from_secs(120));
    drop(sshds);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(
        out.matches(": ok: verified 64 KiB").count(),
        4,
        "{out}\n{err}"
    );
}

#[test]
fn a_host_whose_link_is_cut_is_named_and_the_job_ends() {
    let hosts = Hosts::start(3, None);
    let p = hosts.krun(&[
        "--hosts",
        &hosts.host_list(),
        "-n",
        "3",
        "sh",
        "-c",
        "sleep 60",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    let cut = Instant::now();
    hosts.cluster.cut_link(2).unwrap();
    let (code, _, err) = finish(p, Duration::from_secs(60));
    hosts.cluster.restore_link(2).unwrap();
    assert!(
        cut.elapsed() < Duration::from_secs(30),
        "the job took {:?} to end",
        cut.elapsed()
    );
    assert_ne!(code, Some(0));
    let ip = hosts.cluster.node(2).unwrap().ip();
    assert!(
        err.contains(&format!(
            "lost node 2 (ranks 2..2) on host {ip}: no heartbeat"
        )),
        "{err}"
    );
}

/// MPICH programs across 3 namespace hosts with no mpiexec: each host's krund serves PMI-1
/// to its ranks and the fences cross hosts through krun (launcher/src/runtime/pmi.rs).
#[test]
fn mpich_ring_and_allreduce_and_a_pmi2_client_run_across_three_hosts() {
    let hosts = Hosts::start(3, None);
    let dir = std::env::temp_dir().join(format!(
        "krun-mh-mpi-{}-{:x}",
        std::process::id(),
        fabric::random_u64().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/mpi");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("OUT={}", dir.display()))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building the MPI examples with mpicc.mpich (install-deps: mpich libmpich-dev): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let run = |args: &[&str]| {
        let mut all = vec!["--hosts".to_string(), hosts.host_list()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        finish(hosts.krun(&all), Duration::from_secs(120))
    };
    let ring = dir.join("ring");
    let (code, out, err) = run(&["-n", "6", ring.to_str().unwrap(), "4"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    // Every pass adds the rank: 4 rounds * (0 + ... + 5).
    assert!(
        out.contains("ring: token 60 after 4 rounds of 6 ranks"),
        "{out}\n{err}"
    );
    let allreduce = dir.join("allreduce");
    let (code, out, err) = run(&["-n", "6", allreduce.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for r in 0..6 {
        assert!(
            out.contains(&format!(
                "allreduce: rank {r} of 6: 0 of 4096 elements wrong"
            )),
            "rank {r}:\n{out}\n{err}"
        );
    }
    let abort = dir.join("abort");
    let (code, out, err) = run(&["-n", "6", abort.to_str().unwrap(), "3", "9"]);
    assert_eq!(code, Some(9), "{out}\n{err}");
    assert!(err.contains("rank 3 on node 1 called MPI_Abort"), "{err}");
    // A PMI-2 client (Slurm's libpmi2) across the hosts: krund serves PMI-2 too.
    let pmi2 = dir.join("pmi2_client");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("OUT={}", dir.display()))
        .arg(&pmi2)
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building pmi2_client (install-deps: libpmi2-0-dev): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (code, out, err) = run(&["-n", "6", "--mpi", "pmi2", pmi2.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for r in 0..6 {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("pmi2: rank {r} of 6 ok "))
                    && l.contains("mapping=(vector,(0,3,2)) keys=6 local=2")),
            "pmi2 rank {r}:\n{out}\n{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Open MPI 4.1 programs across 3 namespace hosts with no mpirun: each host's krund serves
/// PMIx through OpenPMIx's server library (launcher/src/runtime/pmix.rs) and the fences'
/// blobs cross hosts through krun. Open MPI needs no settings of its own here: its TCP
/// transport leaves out loopback by default and finds each host's bridge address.
#[test]
fn openmpi_ring_and_allreduce_run_across_three_hosts() {
    let hosts = Hosts::start(3, None);
    let dir = std::env::temp_dir().join(format!("krun-mh-ompi-progs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/mpi");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg("MPICC=mpicc.openmpi")
        .arg(format!("OUT={}", dir.display()))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building the MPI examples with mpicc.openmpi (install-deps: openmpi-bin libopenmpi-dev): {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let run = |args: &[&str]| {
        let mut all = vec!["--hosts".to_string(), hosts.host_list()];
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        finish(hosts.krun(&all), Duration::from_secs(120))
    };
    let ring = dir.join("ring");
    let (code, out, err) = run(&["-n", "6", ring.to_str().unwrap(), "4"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("ring: token 60 after 4 rounds of 6 ranks"),
        "{out}\n{err}"
    );
    let allreduce = dir.join("allreduce");
    let (code, out, err) = run(&["--mpi", "pmix", "-n", "6", allreduce.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for r in 0..6 {
        assert!(
            out.contains(&format!(
                "allreduce: rank {r} of 6: 0 of 4096 elements wrong"
            )),
            "rank {r}:\n{out}\n{err}"
        );
    }
    let abort = dir.join("abort");
    let (code, out, err) = run(&["-n", "6", abort.to_str().unwrap(), "3", "9"]);
    assert_eq!(code, Some(9), "{out}\n{err}");
    assert!(
        err.contains("rank 3 on node 1 called MPI_Abort (PMIx abort)"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
