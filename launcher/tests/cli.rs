//! The krun command line as a user meets it: configuration files, `krun config`, output into
//! a closed pipe.
use std::io::Read;
use std::process::{Command, Stdio};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("krun-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(d.join("krun")).unwrap();
    d
}

fn krun(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_krun"));
    cmd.args(args).env_remove("KRUN_CONFIG");
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

#[test]
fn krun_config_shows_each_setting_and_where_it_came_from() {
    let d = temp_dir("config");
    std::fs::write(
        d.join("krun/krun.toml"),
        "[fabric]\nprovider = \"shm\"\n\n[ghost]\nfull_every = 3\n",
    )
    .unwrap();
    let xdg = d.display().to_string();
    let (code, out, err) = krun(
        &["config", "--bind-to", "none"],
        &[
            ("XDG_CONFIG_HOME", &xdg),
            ("KRUN_FABRIC_TIMEOUT_MS", "1234"),
            ("KRUN_SECRET", "00112233445566778899aabbccddeeff"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let file = format!("{xdg}/krun/krun.toml");
    assert!(
        out.contains(&format!("provider = \"shm\"    # {file}:2")),
        "{out}"
    );
    assert!(
        out.contains(&format!("full_every = \"3\"    # {file}:5")),
        "{out}"
    );
    assert!(
        out.contains("timeout_ms = \"1234\"    # environment"),
        "{out}"
    );
    assert!(
        out.contains("bind_to = \"none\"    # flag --bind-to"),
        "{out}"
    );
    assert!(out.contains("ssh = \"ssh\"    # default"), "{out}");
    assert!(
        !out.contains("00112233445566778899"),
        "the secret is never printed: {out}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_bad_configuration_file_stops_krun_naming_the_file_line_and_key() {
    let d = temp_dir("badconfig");
    let path = d.join("krun/krun.toml");
    std::fs::write(&path, "[fabric]\nprovider = \"tcp\"\nmax_in_fligth = 8\n").unwrap();
    let named = path.display().to_string();
    // Through KRUN_CONFIG, and for a job (not only for `krun config`).
    let (code, out, err) = krun(&["-n", "1", "/bin/true"], &[("KRUN_CONFIG", &named)]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&format!("{named}:3")) && err.contains("fabric.max_in_fligth"),
        "{err}"
    );
    assert!(err.contains("max_in_flight"), "names the known keys: {err}");
    let (code, _, err) = krun(&["config"], &[("KRUN_CONFIG", "/nonexistent/krun.toml")]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/krun.toml"), "{err}");
    let (code, _, err) = krun(&["config"], &[("KRUN_FABRIC_PROVIDER", "infiniband")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("KRUN_FABRIC_PROVIDER") && err.contains("infiniband"),
        "{err}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(["hostlist", "expand", "n[1-200000]"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe while krun is still writing (~1.5 MB).
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 3];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"n1\n");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
