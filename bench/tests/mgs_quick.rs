//! `bench mgs --quick` end to end (needs root: userfaultfd): two-node MGS jobs with the
//! static and the dynamic locator, three runs each, write a results JSON whose rows follow
//! the schema, with a comparison and a PNG plot. Figures are not judged (wall time
//! is not asserted); a job whose Q differs from the serial MGS's fails the bench.
use std::path::PathBuf;
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_bench");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_quick_mgs_bench_writes_rows_for_both_locators() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("krun-bench-mgs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("mgs.json");
    let o = Command::new(BENCH)
        .args(["mgs", "--quick", "--nodes", "2", "--sizes", "64", "--out"])
        .arg(&out)
        .output()
        .expect("run bench mgs");
    assert!(
        o.status.success(),
        "bench mgs --quick failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["runs"], 3);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    for locator in ["static", "dynamic"] {
        let r = rows
            .iter()
            .find(|r| r["locator"] == locator)
            .unwrap_or_else(|| panic!("no {locator} row: {rows:?}"));
        assert_eq!((r["nodes"].as_u64(), r["n"].as_u64()), (Some(2), Some(64)));
        assert_eq!(r["runs"], 3);
        let secs = r["seconds"].as_f64().expect("seconds");
        assert!(secs > 0.0 && r["seconds_min"].as_f64() <= Some(secs));
        assert!(
            r["page_faults"].as_f64().unwrap() > 0.0,
            "MGS faulted no page: {r}"
        );
        assert!(r["remote_fetches"].as_f64().is_some());
    }
    assert_eq!(v["comparison"].as_array().map(Vec::len), Some(1));
    assert!(v["comparison"][0]["dynamic_over_static"].as_f64().is_some());
    assert!(v["environment"]["commit"].is_string());
    let png = std::fs::read(dir.join("mgs.png")).expect("PNG beside the JSON");
    assert_eq!(&png[..4], b"\x89PNG");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--addition`: two nodes join each 2-rank MGS run (2 -> 3 -> 4 nodes) and rank 0 times
/// them in the seed's phases; the JSON reports the cost against the same run without them.
/// Q is still checked against the serial MGS by the bench (a wrong run fails it).
#[test]
fn a_quick_addition_run_reports_its_phases_and_cost() {
    if !is_root() {
        eprintln!("skipped: userfaultfd needs root");
        return;
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("krun-bench-mgs-add-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("mgs.json");
    let o = Command::new(BENCH)
        .args([
            "mgs",
            "--quick",
            "--nodes",
            "2",
            "--sizes",
            "64",
            "--addition",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run bench mgs --addition");
    assert!(
        o.status.success(),
        "bench mgs --addition failed: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let rows = v["addition"].as_array().expect("addition rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in rows {
        assert_eq!(r["nodes"], "2 -> 4");
        assert_eq!(r["seconds_with"]["runs"], 3);
        assert!(r["cost_fraction"].as_f64().is_some(), "{r}");
        let additions = r["additions"].as_array().expect("additions");
        assert_eq!(additions.len(), 2);
        for a in additions {
            for phase in ["start", "physical", "setting", "logical", "end"] {
                let s = a["phases_seconds"][phase]["median"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no {phase} in {a}"));
                assert!(s >= 0.0);
            }
        }
    }
    let png = std::fs::read(dir.join("mgs.png")).expect("PNG beside the JSON");
    assert_eq!(&png[..4], b"\x89PNG");
    let _ = std::fs::remove_dir_all(&dir);
}
