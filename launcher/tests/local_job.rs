//! The main job end to end: `krun --local 3` over each libfabric provider.
use std::process::Command;

fn krun(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_krun"));
    cmd.args(args)
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("krun runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn three_nodes_exchange(provider: &str) {
    let (code, out, err) = krun(&["--local", "3", "--provider", provider], &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(out.matches(" verified (fnv1a ").count(), 6, "{out}");
    assert!(
        out.contains("job counter after the barrier: 3 (expected 3)"),
        "{out}"
    );
    assert_eq!(out.matches("): identical").count(), 3, "{out}");
    // Exactly one node wins the election and all agree on it.
    assert_eq!(out.matches("compare-swap: won").count(), 1, "{out}");
    let leaders: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("leader is node ").nth(1))
        .collect();
    assert_eq!(leaders.len(), 3, "{out}");
    assert!(leaders.iter().all(|l| *l == leaders[0]), "{out}");
    assert!(out.contains(&format!("endpoint on {provider} up")), "{out}");
}

#[test]
fn three_local_nodes_over_tcp() {
    three_nodes_exchange("tcp");
}

#[test]
fn three_local_nodes_over_shm() {
    three_nodes_exchange("shm");
}

#[test]
fn bad_arguments_are_named() {
    let (code, _, err) = krun(&["--local", "zero"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("\"zero\""), "{err}");
    let (code, _, err) = krun(&["--provider", "carrier-pigeon"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("carrier-pigeon"), "{err}");
    let (code, _, err) = krun(&["--local", "0"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("'--local <NODES>'") && err.contains("not a positive number"),
        "{err}"
    );
    // A mistyped flag is refused with the closest one, not run as a program.
    let (code, _, err) = krun(&["--checkpoint-intervall", "1", "/bin/true"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("'--checkpoint-interval'"), "{err}");
}

#[test]
fn a_node_that_cannot_open_its_fabric_fails_the_job_with_its_reason() {
    let (code, _, err) = krun(&["--local", "2"], &[("KRUN_FABRIC_PROVIDER", "verbs")]);
    assert_eq!(
        code, 1,
        "the failing node's code, not that of the nodes stopped after it: {err}"
    );
    assert!(
        err.contains("] krund: error:") && err.contains("verbs"),
        "{err}"
    );
}

#[test]
fn a_job_whose_ranks_all_end_first_never_opens_its_checkpoint_store() {
    // No verbs device here: a node that opens its store's endpoint says so on stderr.
    let env = [
        ("KRUN_FABRIC_PROVIDER", "verbs"),
        ("KRUN_RUNTIME_VERBOSE", "1"),
        // The store would start anyway after this long: never, in this test.
        ("KRUN_STORE_DELAY_MS", "600000"),
    ];
    let (code, out, err) = krun(&["--local", "2", "-n", "2", "true"], &env);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(!err.contains("no checkpoint store"), "{err}");
    assert_eq!(err.matches("none started").count(), 2, "{err}");
    // Ranks still running when the delay is over: every node opens its store (and says
    // why it has none); the job itself goes on.
    let env = [
        ("KRUN_FABRIC_PROVIDER", "verbs"),
        ("KRUN_RUNTIME_VERBOSE", "1"),
        ("KRUN_STORE_DELAY_MS", "0"),
    ];
    let (code, out, err) = krun(&["--local", "2", "-n", "2", "sleep", "1"], &env);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(err.matches("no checkpoint store").count(), 2, "{err}");
    assert!(!err.contains("none started"), "{err}");
}

#[test]
fn ranks_do_not_inherit_krunds_hwloc_plugin_setting_but_keep_the_users() {
    let show = [
        "--local",
        "1",
        "-n",
        "1",
        "sh",
        "-c",
        "echo \"[${HWLOC_PLUGINS_BLACKLIST-unset}]\"",
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_krun"));
    cmd.args(show)
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .env_remove("HWLOC_PLUGINS_BLACKLIST");
    let out = cmd.output().expect("krun runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "[unset]");
    let (code, out, err) = krun(&show, &[("HWLOC_PLUGINS_BLACKLIST", "hwloc_pci")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "[hwloc_pci]");
}

#[test]
fn hostlist_subcommands() {
    let (code, out, err) = krun(&["hostlist", "expand", "n[01-03],gpu[1-2]-ib"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["n01", "n02", "n03", "gpu1-ib", "gpu2-ib"]
    );
    let (code, out, _) = krun(&["hostlist", "compress", "n01", "n02", "n03", "n05"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "n[01-03,05]");
    let (code, _, err) = krun(&["hostlist", "expand", "n[1-"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("position 1"), "{err}");
}

#[test]
fn twelve_ranks_on_four_nodes_exchange_over_the_fabric() {
    let selftest = env!("CARGO_BIN_EXE_krun-selftest");
    let (code, out, err) = krun(
        &["-n", "12", "--local", "4", selftest],
        &[("KRUN_FABRIC_PROVIDER", "shm")],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    for rank in 0..12 {
        let left = (rank + 11) % 12;
        assert!(
            out.contains(&format!(
                "rank {rank}/12: ok: verified 64 KiB from rank {left} over shm"
            )),
            "rank {rank} missing:\n{out}"
        );
    }
    assert!(out.contains("counter 12"), "{out}");
}

/// Ranks get krun's default for libfabric's per-connection receive buffers
/// (`FI_OFI_RXM_MSG_RX_SIZE`, see `launcher/src/ranks/runner.rs`), and a value the user
/// sets, in krun's environment or with `-x`, is kept.
#[test]
fn ranks_get_the_rxm_receive_default_unless_the_user_sets_it() {
    let args = [
        "-n",
        "2",
        "--local",
        "2",
        "sh",
        "-c",
        "echo rx=$FI_OFI_RXM_MSG_RX_SIZE",
    ];
    let (code, out, err) = krun(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("rx=32").count(), 2, "{out}");
    let (code, out, err) = krun(&args, &[("FI_OFI_RXM_MSG_RX_SIZE", "128")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("rx=128").count(), 2, "{out}");
    let exported: Vec<&str> = ["-x", "FI_OFI_RXM_MSG_RX_SIZE=64"]
        .into_iter()
        .chain(args)
        .collect();
    let (code, out, err) = krun(&exported, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("rx=64").count(), 2, "{out}");
}

#[test]
fn ranks_get_their_environment_and_the_exit_code_is_the_highest() {
    let script = "echo $KRUN_RANK $KRUN_SIZE $KRUN_LOCAL_RANK $KRUN_LOCAL_SIZE $KRUN_NODE_ID $KRUN_NNODES; exit $((KRUN_RANK * 2))";
    let (code, out, err) = krun(
        &[
            "-n",
            "5",
            "--local",
            "2",
            "--tag-output",
            "sh",
            "-c",
            script,
        ],
        &[],
    );
    assert_eq!(code, 8, "highest rank exit code: {err}");
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "[0] 0 5 0 3 0 2",
            "[1] 1 5 1 3 0 2",
            "[2] 2 5 2 3 0 2",
            "[3] 3 5 0 2 1 2",
            "[4] 4 5 1 2 1 2"
        ]
    );
    assert!(
        err.contains("krun: rank 4 on node 1 exited with code 8"),
        "{err}"
    );
}

#[test]
fn a_rank_killed_by_a_signal_gives_128_plus_signal_and_is_named() {
    let (code, _, err) = krun(
        &[
            "-n",
            "3",
            "--local",
            "3",
            "sh",
            "-c",
            "if [ $KRUN_RANK = 1 ]; then kill -9 $$; fi; exit 0",
        ],
        &[],
    );
    assert_eq!(code, 128 + 9);
    assert!(
        err.contains("rank 1 on node 1 was killed by signal 9 (SIGKILL)"),
        "{err}"
    );
}

#[test]
fn large_output_is_forwarded_without_loss_and_stdin_reaches_rank_zero() {
    // 4 ranks x 200,000 numbered lines each.
    let script = "if [ $KRUN_RANK = 0 ]; then read line; echo \"stdin: $line\"; fi; seq 1 200000 | sed \"s/^/r$KRUN_RANK-/\"";
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_krun"));
    cmd.args(["-n", "4", "--local", "2", "sh", "-c", script])
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello rank zero\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("stdin: hello rank zero"));
    for rank in 0..4 {
        let prefix = format!("r{rank}-");
        let mut n = 0u64;
        for l in text.lines().filter(|l| l.starts_with(&prefix)) {
            n += 1;
            assert_eq!(
                l[prefix.len()..].parse::<u64>().unwrap(),
                n,
                "rank {rank} lines out of order"
            );
        }
        assert_eq!(n, 200_000, "rank {rank} lost lines");
    }
}

#[test]
fn a_missing_program_is_reported() {
    let (code, _, err) = krun(&["-n", "2", "--local", "2", "/nonexistent/program"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot start rank 0: /nonexistent/program"),
        "{err}"
    );
}

#[test]
fn a_node_with_the_wrong_secret_is_refused() {
    use fabric::bootstrap::BootstrapServer;
    use fabric::secret::ClusterSecret;
    let job_secret = ClusterSecret::new(b"secret of the job".to_vec()).unwrap();
    let server = BootstrapServer::start_with(
        "127.0.0.1:0",
        1,
        std::time::Duration::from_secs(3),
        Some(job_secret),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_krund"))
        .args([
            "--bootstrap",
            &server.addr().to_string(),
            "--node-id",
            "0",
            "--nnodes",
            "1",
        ])
        .env(
            "KRUN_SECRET",
            ClusterSecret::new(b"not the job's one".to_vec())
                .unwrap()
                .to_hex(),
        )
        .env("KRUN_FABRIC_PROVIDER", "loopback")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong cluster secret"), "{err}");
    // The service did not count the refused node in.
    assert!(server.join().is_err());
}

#[test]
fn a_world_readable_secret_file_is_refused_by_name() {
    let path = std::env::temp_dir().join(format!("krun-open-secret-{}", std::process::id()));
    std::fs::write(&path, "a secret that is long enough").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = krun(
        &["--local", "2"],
        &[("KRUN_SECRET_FILE", path.to_str().unwrap())],
    );
    std::fs::remove_file(&path).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("chmod 600") && err.contains("krun-open-secret"),
        "{err}"
    );
}

/// PIDs of the direct children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // Field 4 (after the parenthesised command) is the parent pid.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

fn wait_for(mut what: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !what() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "condition not reached in 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn sigterm_reaches_every_rank_and_sigusr1_is_a_checkpoint_event() {
    let script = "trap 'echo rank $KRUN_RANK got TERM; exit 3' TERM; echo ready; i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; exit 0";
    let child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(["-n", "4", "--local", "2", "sh", "-c", script])
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let krun_pid = child.id();
    // Both nodes up with their ranks started.
    wait_for(|| {
        let nodes = children_of(krun_pid);
        nodes.len() == 2 && nodes.iter().all(|&n| children_of(n).len() == 2)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let node = children_of(krun_pid)[0];
    // SAFETY: signals to processes this test started.
    unsafe {
        libc::kill(node as i32, libc::SIGUSR1);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    unsafe {
        libc::kill(krun_pid as i32, libc::SIGTERM);
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    for rank in 0..4 {
        assert!(
            stdout.contains(&format!("rank {rank} got TERM")),
            "{stdout}"
        );
    }
    assert!(
        stderr.contains("checkpoint requested (SIGUSR1 from the scheduler)"),
        "{stderr}"
    );
}

#[test]
fn ranks_are_pinned_to_cores_and_bindings_are_reported() {
    let (code, out, err) = krun(
        &[
            "-n",
            "2",
            "--local",
            "1",
            "--report-bindings",
            "--tag-output",
            "sh",
            "-c",
            "grep Cpus_allowed_list /proc/self/status",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    for rank in 0..2 {
        let reported = err
            .lines()
            .find(|l| l.starts_with(&format!("krun: rank {rank} on node 0 bound to core ")))
            .unwrap_or_else(|| panic!("no binding report for rank {rank}: {err}"));
        // "(cpus [N])" in the report is what the rank sees as its allowed CPUs.
        let cpus = reported
            .split("(cpus [")
            .nth(1)
            .unwrap()
            .trim_end_matches("])")
            .replace(", ", ",");
        let seen = out
            .lines()
            .find(|l| l.starts_with(&format!("[{rank}] ")))
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .to_string();
        if !cpus.contains(',') {
            assert_eq!(seen, cpus, "rank {rank}: {out}");
        }
    }
    let (code, _, err) = krun(
        &["-n", "1", "--local", "1", "--bind-to", "socket", "true"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("socket"), "{err}");
}

#[test]
fn nodes_sharing_a_machine_pin_their_ranks_to_distinct_cores_and_never_oversubscribe_one() {
    let cores = std::thread::available_parallelism().unwrap().get();
    // One rank per node, two nodes on this machine: distinct cores (when there are two).
    let (code, _, err) = krun(
        &["-n", "2", "--local", "2", "--report-bindings", "true"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let cpus_of = |node: usize| -> Option<String> {
        err.lines()
            .find(|l| l.starts_with(&format!("krun: rank {node} on node {node} bound to core ")))
            .map(|l| l.split("(cpus ").nth(1).unwrap().to_string())
    };
    if cores >= 2 {
        let (a, b) = (cpus_of(0), cpus_of(1));
        assert!(a.is_some() && b.is_some(), "{err}");
        assert_ne!(a, b, "both nodes' ranks on one core: {err}");
    }
    // More ranks on the machine than cores: nobody is pinned, and the report says why.
    let n = (2 * cores).to_string();
    let (code, _, err) = krun(
        &["-n", &n, "--local", "2", "--report-bindings", "true"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches(" bound to core ").count(), 0, "{err}");
    assert_eq!(
        err.matches(&format!("not bound: {n} ranks on this machine"))
            .count(),
        2 * cores,
        "{err}"
    );
}

#[test]
fn a_killed_node_leaves_no_shared_memory_behind() {
    let shm_of = |pid: u32| -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{pid}:")))
            .collect()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args([
            "-n",
            "2",
            "--local",
            "2",
            "--provider",
            "shm",
            "sleep",
            "30",
        ])
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let krun_pid = child.id();
    // Both node daemons have opened their shm endpoints.
    let mut nodes = Vec::new();
    wait_for(|| {
        nodes = children_of(krun_pid);
        nodes.len() == 2 && nodes.iter().all(|&n| !shm_of(n).is_empty())
    });
    // SAFETY: a process this test started (through krun).
    unsafe { libc::kill(nodes[0] as i32, libc::SIGKILL) };
    wait_for(|| shm_of(nodes[0]).is_empty());
    // SAFETY: as above.
    unsafe { libc::kill(krun_pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        shm_of(nodes[1]).is_empty(),
        "the stopped node left {:?}",
        shm_of(nodes[1])
    );
}

/// SIGKILL of krun orphans its nodes: each krund notices its link to krun closed, ends its
/// ranks (SIGTERM, then SIGKILL after a grace period) and exits.
#[test]
fn killing_krun_ends_its_nodes_and_their_ranks() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(["--local", "2", "-n", "2", "sleep", "300"])
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let krun_pid = child.id();
    // Both nodes and both ranks (sleep) up.
    let mut nodes = Vec::new();
    let mut ranks = Vec::new();
    wait_for(|| {
        nodes = children_of(krun_pid);
        ranks = nodes.iter().flat_map(|&n| children_of(n)).collect();
        nodes.len() == 2 && ranks.len() == 2
    });
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(false)
    };
    assert!(nodes.iter().chain(&ranks).all(|&p| alive(p)));
    child.kill().unwrap();
    child.wait().unwrap();
    // The nodes were krun's children: once krun is gone they are reparented, and they end.
    wait_for(|| nodes.iter().chain(&ranks).all(|&p| !alive(p)));
}

/// A spare node (no rank) ends on SIGTERM as a node running ranks does (a scheduler ending
/// the job's processes), instead of waiting for krun; the job goes on without it. Then
/// krun's own SIGTERM, forwarded to the ranks, ends the job at once: the ranks' exits are
/// not held for a recovery (with spares a failed rank's exit waits the failure timeout +
/// 20 s, here 10 minutes, so a held exit would outlast the test's 30 s wait).
#[test]
fn a_spare_node_ends_on_sigterm_and_a_forwarded_sigterm_ends_the_job_at_once() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(["--local", "2", "--spares", "1", "-n", "2", "sleep", "300"])
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .env("KRUN_FAILURE_TIMEOUT_MS", "600000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let krun_pid = child.id();
    // Three nodes; the two with a rank (sleep) and the spare, which has none.
    let mut spare = None;
    wait_for(|| {
        let nodes = children_of(krun_pid);
        let with_rank = nodes.iter().filter(|&&n| children_of(n).len() == 1).count();
        spare = nodes.iter().copied().find(|&n| children_of(n).is_empty());
        nodes.len() == 3 && with_rank == 2 && spare.is_some()
    });
    let spare = spare.unwrap();
    // The spare catches SIGTERM (its handler is installed once its runtime is up): without
    // one the signal's default action would end it whatever the node does.
    let catches_term = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
    };
    wait_for(|| catches_term(spare));
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(false)
    };
    assert!(alive(spare));
    // SAFETY: a signal to a process this test's krun started.
    unsafe {
        libc::kill(spare as i32, libc::SIGTERM);
    }
    wait_for(|| !alive(spare));
    // The job itself is still running.
    assert!(child.try_wait().unwrap().is_none());
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let mut status = None;
    wait_for(|| {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    // The ranks (sleep) ended on the forwarded SIGTERM: 128 + 15.
    assert_eq!(status.unwrap().code(), Some(143));
}

/// Runs krun with `args` and waits for it within `wait_for`'s bound (a job that would hang
/// fails the test instead); returns its exit code and stderr.
fn krun_bounded(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(args)
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_for(|| {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.unwrap().code(), err)
}

/// A rank killed by a signal ends the job at once: the other ranks (and what they started)
/// would otherwise wait for it until their own timeouts. The job's code is the killed
/// rank's, not that of the ranks ended after it.
#[test]
fn a_killed_rank_ends_the_whole_job_and_what_its_peers_started() {
    let dir = std::env::temp_dir().join(format!("krun-killed-rank-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "if [ $KRUN_RANK = 0 ]; then for f in bg1 bg2 bg3; do \
         while [ ! -s {d}/$f ]; do sleep 0.05; done; done; kill -9 $$; fi; \
         sleep 300 & echo $! > {d}/bg$KRUN_RANK.tmp; mv {d}/bg$KRUN_RANK.tmp {d}/bg$KRUN_RANK; wait",
        d = dir.display()
    );
    let (code, err) = krun_bounded(&["-n", "4", "--local", "2", "sh", "-c", &script]);
    assert_eq!(code, Some(128 + 9), "{err}");
    assert!(
        err.contains("rank 0 on node 0 was killed by signal 9"),
        "{err}"
    );
    // The background sleeps the other ranks started are gone too.
    for rank in 1..4 {
        let pid: u32 = std::fs::read_to_string(dir.join(format!("bg{rank}")))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_for(|| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
                .unwrap_or(true)
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The killed rank was its node's only one: the node leaves at once, and its report of the
/// kill still reaches krun before it goes, so the job ends now rather than when the other
/// ranks time out waiting for it.
#[test]
fn a_killed_rank_alone_on_its_node_still_ends_the_job() {
    let (code, err) = krun_bounded(&[
        "-n",
        "2",
        "--local",
        "2",
        "sh",
        "-c",
        "if [ $KRUN_RANK = 1 ]; then sleep 0.5; kill -11 $$; fi; sleep 300",
    ]);
    assert_eq!(code, Some(128 + 11), "{err}");
    assert!(
        err.contains("rank 1 on node 1 was killed by signal 11"),
        "{err}"
    );
    assert!(err.contains("ending the job"), "{err}");
}

#[test]
fn the_summary_json_says_how_the_job_ended_and_reaches_ranks_exported_variables() {
    let dir = std::env::temp_dir().join(format!("krun-summary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("summary.json");
    let file_arg = file.to_str().unwrap();
    // -x VAR=VALUE and -x VAR (krun's own value) reach every rank; the rank fails on purpose
    // when they do, so the summary records a failed job.
    let (code, out, err) = krun(
        &[
            "--local",
            "2",
            "-n",
            "2",
            "-x",
            "KRUN_TEST_A=one",
            "-x",
            "KRUN_TEST_B",
            "--summary-json",
            file_arg,
            "sh",
            "-c",
            "echo \"rank $KRUN_RANK $KRUN_TEST_A $KRUN_TEST_B\"; exit 3",
        ],
        &[("KRUN_TEST_B", "two")],
    );
    assert_eq!(code, 3, "{out}\n{err}");
    for r in 0..2 {
        assert!(out.contains(&format!("rank {r} one two")), "{out}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(v["nodes"], 2, "{v}");
    assert_eq!(v["ranks"], 2, "{v}");
    assert!(v["error"].is_null(), "{v}");
    // The coordinated policy watched the job: nothing to checkpoint, nothing failed.
    assert_eq!(v["policy"]["checkpoints"], 0, "{v}");
    assert_eq!(v["policy"]["failures"], 0, "{v}");
    assert!(v["seconds"].as_f64().unwrap() > 0.0, "{v}");
    // A file that cannot be written is named.
    let bad = dir.join("no-such-dir").join("s.json");
    let (code, _, err) = krun(
        &[
            "--local",
            "1",
            "--summary-json",
            bad.to_str().unwrap(),
            "/bin/true",
        ],
        &[],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("writing the summary to") && err.contains("no-such-dir"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
