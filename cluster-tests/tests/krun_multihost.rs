//! krun across hosts: 4 network namespaces stand in for 4 hosts, each running a
//! `krund --listen` daemon on its own IP; krun runs inside host 0. Needs root and the
//! workspace's binaries (`cargo build --workspace`, which `cargo nextest run --workspace`
//! does first).
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_tests::workspace_bin;
use cluster_tests::{NetnsCluster, NodeProcess};

fn secret_file(tag: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("krun-mh-{tag}-{}", std::process::id()));
    std::fs::write(&path, secret).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

struct Hosts {
    cluster: NetnsCluster,
    daemons: Vec<NodeProcess>,
    secret: PathBuf,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
        }
        let _ = std::fs::remove_file(&self.secret);
    }
}

impl Hosts {
    /// `n` hosts with a daemon each; `wrong_secret_on` gets a different secret.
    fn start(n: usize, tag: &str, wrong_secret_on: Option<usize>) -> Hosts {
        if let Err(e) = cluster_tests::require_root() {
            panic!("\n\n*** {e} ***\n\n");
        }
        let cluster = NetnsCluster::create(n, None).expect("namespace cluster");
        let secret = secret_file(tag, "the secret of this multi-host test");
        let other = secret_file(
            &format!("{tag}-other"),
            "a different secret, not the cluster's",
        );
        let mut daemons = Vec::new();
        for i in 0..n {
            let node = cluster.node(i).unwrap();
            let file = if Some(i) == wrong_secret_on {
                &other
            } else {
                &secret
            };
            let mut d = node
                .spawn(
                    Command::new(workspace_bin("krund"))
                        .args(["--listen", &format!("{}:7171", node.ip())])
                        .env("KRUN_SECRET_FILE", file)
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped()),
                )
                .expect("starting krund");
            let mut line = String::new();
            BufReader::new(d.stderr().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(line.contains("listening on"), "daemon on host {i}: {line}");
            daemons.push(d);
        }
        // The daemons read their secret at start; the file can go.
        std::fs::remove_file(&other).unwrap();
        Hosts {
            cluster,
            daemons,
            secret,
        }
    }

    fn host_list(&self) -> String {
        self.cluster
            .nodes()
            .map(|n| n.ip().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts krun on host 0.
    fn krun(&self, args: &[&str]) -> NodeProcess {
        self.cluster
            .node(0)
            .unwrap()
            .spawn(
                Command::new(workspace_bin("krun"))
                    .args(args)
                    .env("KRUN_SECRET_FILE", &self.secret)
                    .env("KRUN_FABRIC_PROVIDER", "tcp")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            )
            .expect("starting krun")
    }
}

/// Waits for krun (at most `limit`) and returns (exit code, stdout, stderr).
fn finish(mut p: NodeProcess, limit: Duration) -> (Option<i32>, String, String) {
    let mut out = p.stdout().unwrap();
    let mut err = p.stderr().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = p.wait_timeout(limit).unwrap();
    if status.is_none() {
        let _ = p.kill();
    }
    (
        status.and_then(|s| s.code()),
        reader.join().unwrap(),
        err_reader.join().unwrap(),
    )
}

#[test]
fn twelve_ranks_on_four_hosts_exchange_over_the_fabric() {
    let hosts = Hosts::start(4, "ok", None);
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
    let mut hosts = Hosts::start(4, "kill", None);
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
    let hosts = Hosts::start(3, "secret", Some(1));
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
    let hosts = Hosts::start(2, "ssh", None);
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
    let hosts = Hosts::start(3, "cut", None);
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
fn mpich_ring_and_allreduce_run_across_three_hosts() {
    let hosts = Hosts::start(3, "mpi", None);
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
    let _ = std::fs::remove_dir_all(&dir);
}
