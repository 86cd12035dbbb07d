//! The results writer every bench uses: JSON with the environment, rows intact, and a PNG plot.
use std::path::PathBuf;

use bench::plot::{Bar, Figure, Group, Panel};
use bench::report::{write_results, write_skipped};

/// A private directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("krun-bench-{tag}-{}", std::process::id()));
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

const PNG_MAGIC: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Width and height from the PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], &PNG_MAGIC, "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "first chunk is IHDR");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

fn sample_figure() -> Figure {
    Figure {
        title: "test bench".into(),
        note: "median of 3 runs".into(),
        panels: vec![Panel::new(
            "latency",
            "us",
            vec![
                Group::new(
                    "shm read\n8 B",
                    [
                        Bar::from_values("krun", &[2.0, 1.5, 3.0]),
                        Bar::from_values("reference", &[1.0, 0.9, 1.2]),
                    ],
                ),
                Group::new("tcp read\n8 B", [Bar::single("krun", Some(8.0)), None]),
            ],
        )],
    }
}

#[test]
fn results_carry_environment_rows_and_a_png_plot() {
    let dir = TempDir::new("writer");
    let json_path = dir.0.join("sample.json");
    let rows = serde_json::json!([
        {"what": "a", "seconds": 1.25, "runs": [1, 2, 3]},
        {"what": "b", "seconds": null, "note": "timeout"},
    ]);
    let written = write_results(
        &json_path,
        serde_json::json!({"rows": rows.clone(), "runs": 3}),
        &sample_figure(),
    )
    .expect("writing results");

    let text = std::fs::read_to_string(&json_path).expect("JSON written");
    let read: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(read, written, "the returned value is what was written");
    assert_eq!(read["rows"], rows, "rows round-trip unchanged");
    assert_eq!(read["runs"], 3);
    let env = &read["environment"];
    let commit = env["commit"].as_str().expect("commit recorded");
    assert!(
        commit.len() >= 40 && commit[..40].chars().all(|c| c.is_ascii_hexdigit()),
        "commit is a git hash: {commit}"
    );
    let date = env["date"].as_str().expect("date recorded");
    assert!(
        date.ends_with('Z') && date.contains('T'),
        "UTC date: {date}"
    );
    let kernel = env["kernel"].as_str().expect("kernel recorded");
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .unwrap();
    assert_eq!(kernel, String::from_utf8_lossy(&uname.stdout).trim());
    assert!(env["cpus"].as_u64().expect("cpus recorded") >= 1);
    assert_eq!(read["plot"], "sample.png");

    let png = std::fs::read(dir.0.join("sample.png")).expect("PNG written beside the JSON");
    assert!(
        png.len() > 4096,
        "a drawn plot, not an empty image: {} bytes",
        png.len()
    );
    let (w, h) = png_size(&png);
    assert!(w >= 800 && h >= 300, "{w}x{h}");
}

#[test]
fn a_skipped_bench_says_why_in_json_and_png() {
    let dir = TempDir::new("skipped");
    let json_path = dir.0.join("skip.json");
    write_skipped(&json_path, "bench x", "needs a verbs device").expect("writing");
    let read: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(read["skipped"], "needs a verbs device");
    assert!(read["environment"]["commit"].is_string());
    let png = std::fs::read(dir.0.join("skip.png")).expect("PNG written");
    png_size(&png);
}

#[test]
fn a_body_that_is_not_an_object_is_refused() {
    let dir = TempDir::new("refused");
    let json_path = dir.0.join("bad.json");
    let err = write_results(&json_path, serde_json::json!([1, 2]), &sample_figure()).unwrap_err();
    assert!(err.contains("object"), "{err}");
    assert!(!json_path.exists());
}
