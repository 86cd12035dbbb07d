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
    assert!(err.contains("at least 1"), "{err}");
}

#[test]
fn a_node_that_cannot_open_its_fabric_fails_the_job_with_its_reason() {
    let (code, _, err) = krun(&["--local", "2"], &[("KRUN_FABRIC_PROVIDER", "verbs")]);
    assert_ne!(code, 0);
    assert!(
        err.contains("[node 0] krund: error:") && err.contains("verbs"),
        "{err}"
    );
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
