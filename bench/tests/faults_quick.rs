//! `bench faults` end to end on the daemon kinds: one trial each of a daemon SIGKILLed and
//! of two killed at once writes a results JSON whose totals add up, with every
//! acknowledged write read back; an unknown kind is refused by name. Wall time is not
//! judged.
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_bench");

#[test]
fn one_trial_of_a_kill_and_of_two_at_once_loses_no_acknowledged_write() {
    let dir = std::env::temp_dir().join(format!("krun-bench-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("faults.json");
    let o = Command::new(BENCH)
        .args(["faults", "--trials", "1", "--kinds", "kill,two", "--out"])
        .arg(&out)
        .output()
        .expect("run bench faults");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "bench faults failed: {}\n{stdout}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for kind in ["kill", "two"] {
        let k = &v["kinds"][kind];
        assert_eq!(k["trials"], 1, "{kind}: {k}");
        assert_eq!(k["ended_correctly"], 1, "{kind}: {k}\n{stdout}");
        assert!(k["acked_writes"].as_u64().unwrap() > 0, "{kind}: {k}");
        assert_eq!(k["acked_writes_lost"], 0, "{kind}: {k}");
    }
    let t = &v["totals"];
    assert_eq!(t["trials"], 2);
    assert_eq!(
        t["acked_writes"].as_u64(),
        Some(
            v["kinds"]["kill"]["acked_writes"].as_u64().unwrap()
                + v["kinds"]["two"]["acked_writes"].as_u64().unwrap()
        )
    );
    assert!(v["environment"]["commit"].is_string());
    assert!(out.with_extension("png").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_kind_is_refused_by_name() {
    let o = Command::new(BENCH)
        .args(["faults", "--kinds", "kill,meteor"])
        .output()
        .expect("run bench faults");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("unknown kind \"meteor\""), "{err}");
}
