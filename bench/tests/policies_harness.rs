//! `bench policies` without krun: a policy krun does not accept is reported as not available
//! (never measured under a wrong name), and the results JSON with its figure (overhead
//! against interval, makespan against MTBF, recovery timeline) is written from rows.
use std::path::PathBuf;

use bench::policies::{available, figure, POLICIES};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("krun-bench-pol-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.0.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_policy_krun_does_not_accept_is_not_available() {
    let dir = TempDir::new("avail");
    let uncoord = POLICIES
        .iter()
        .find(|s| s.name == "uncoordinated with logging")
        .expect("the uncoordinated policy is listed");
    let coord = POLICIES.iter().find(|s| s.name == "coordinated").unwrap();
    // A krun that refuses the variable.
    let refuses = script(
        &dir,
        "refuses",
        "echo 'configuration environment: KRUN_POLICY_KIND: unknown variable' >&2; exit 2",
    );
    let e = available(&refuses, uncoord).unwrap_err();
    assert!(e.contains("unknown variable"), "{e}");
    // A krun that ignores it (prints its config without a policy section).
    let ignores = script(&dir, "ignores", "echo 'fabric.provider = auto (default)'");
    let e = available(&ignores, uncoord).unwrap_err();
    assert!(e.contains("policy.kind"), "{e}");
    // One that shows the selection accepts it (as `section.key` lines here; krun config's
    // TOML sections are read too: `config_shows`' unit test); the coordinated policy needs
    // no check.
    let accepts = script(
        &dir,
        "accepts",
        "echo \"policy.kind = $KRUN_POLICY_KIND (environment)\"; echo \"policy.logging = $KRUN_POLICY_LOGGING (environment)\"",
    );
    available(&accepts, uncoord).unwrap();
    let other = POLICIES
        .iter()
        .find(|s| s.name == "uncoordinated without logging")
        .unwrap();
    available(&accepts, other).unwrap();
    available(&refuses, coord).unwrap();
}

fn row(policy: &str, interval: Option<f64>, freeze: f64, makespan: f64) -> serde_json::Value {
    serde_json::json!({
        "policy": policy,
        "interval_s": interval,
        "measured": {
            "failure_free_overhead_pct": 3.0,
            "makespan_seconds": {"median": makespan, "min": makespan - 1.0, "max": makespan + 1.0, "runs": 3},
        },
        "model": {
            "inputs": {"solve_seconds": 10.0, "freeze_seconds": freeze, "commit_after_release_seconds": 0.2, "restart_seconds": 4.0},
            "makespan_seconds": {"median": makespan + 1.0, "min": makespan, "max": makespan + 2.0, "runs": 3},
        },
        "simulator": {"makespan_seconds": {"median": makespan - 0.5, "min": makespan - 1.5, "max": makespan, "runs": 3}},
        "runs": [{
            "failures": [{"at_s": 5.0, "node_slot": 1, "detect_s": 3.0, "restart_s": 4.0, "lost_s": 1.0, "ranks_back": 6}],
            "makespan_s": makespan, "commits_at_s": [2.3, 4.6], "freeze_s": [0.1, 0.1],
        }],
        "overhead_by_interval": [
            {"interval_s": 1.0, "overhead_pct": {"median": 8.0, "min": 5.0, "max": 12.0}, "model_overhead_pct": 10.0},
            {"interval_s": 2.0, "overhead_pct": {"median": 4.0, "min": 2.0, "max": 6.0}, "model_overhead_pct": 5.0},
        ],
    })
}

#[test]
fn the_results_carry_rows_and_a_multi_panel_png() {
    let dir = TempDir::new("figure");
    let out = dir.0.join("policies.json");
    let doc = serde_json::json!({
        "runs_per_point": 3,
        "policies": [row("none", None, 0.0, 19.0), row("coordinated", Some(2.0), 0.1, 16.0)],
        "not_available": [{"policy": "uncoordinated with logging", "status": "not available in this build", "why": "test"}],
    });
    figure::write(&out, doc.clone()).unwrap();
    let read: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(read["policies"], doc["policies"]);
    assert_eq!(
        read["not_available"][0]["status"],
        "not available in this build"
    );
    assert!(read["environment"]["commit"].is_string());
    let png = std::fs::read(dir.0.join("policies.png")).expect("PNG beside the JSON");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!(&png[1..4], b"PNG");
    // Four panels (overhead/interval, makespan/MTBF, timeline, makespan bars) of 440 px.
    assert!(be(20) >= 4 * 440, "height {}", be(20));
    assert!(png.len() > 20_000, "a drawn figure: {} bytes", png.len());
}
