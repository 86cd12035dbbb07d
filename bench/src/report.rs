//! Shared by every subcommand: table printing, JSON results, statistics.
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::plot::{self, Figure};

/// A plain-text table with right-aligned columns (the first is left-aligned).
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.len());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = cells.get(i).map_or("", |c| c.as_str());
                if i == 0 {
                    s.push_str(&format!("{c:<w$}"));
                } else {
                    s.push_str(&format!("  {c:>w$}"));
                }
            }
            s.trim_end().to_string()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        out.push_str(&"-".repeat(width.iter().sum::<usize>() + 2 * (cols.saturating_sub(1))));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// The receive poll window `KRUN_FABRIC_RECV_POLL_US` sets (busy-polling receives), applied
/// to the benches' own endpoints alike on both sides of a comparison; `None` when unset.
pub fn recv_poll_from_env() -> Result<Option<std::time::Duration>, String> {
    match std::env::var("KRUN_FABRIC_RECV_POLL_US") {
        Err(_) => Ok(None),
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .map(|us| Some(std::time::Duration::from_micros(us)))
            .map_err(|_| {
                format!("KRUN_FABRIC_RECV_POLL_US: {v:?} is not a number of microseconds")
            }),
    }
}

/// `bench/results/<name>.json` in the source tree (where `cargo run -p bench` expects it).
pub fn results_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(format!("{name}.json"))
}

/// Where and when a result was measured: commit (`-dirty` when tracked files outside
/// `bench/results/` differ from it), date (UTC), kernel and CPU count.
pub fn environment() -> serde_json::Value {
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Results written by an earlier bench of the same session do not make the code dirty.
    let dirty = run("git", &["diff", "--name-only", "HEAD"])
        .is_some_and(|s| s.lines().any(|l| !l.starts_with("bench/results/")));
    serde_json::json!({
        "commit": run("git", &["rev-parse", "HEAD"]).map(|c| if dirty { format!("{c}-dirty") } else { c }),
        "date": run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "kernel": run("uname", &["-r"]),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
    })
}

/// Writes a bench's results: `body` (a JSON object) behind an `"environment"` entry (see
/// [`environment`]) and a `"plot"` entry naming the PNG written beside the JSON (same name,
/// `.png`). Returns the JSON written.
pub fn write_results(
    json_path: &Path,
    body: serde_json::Value,
    figure: &Figure,
) -> Result<serde_json::Value, String> {
    let serde_json::Value::Object(fields) = body else {
        return Err("results body must be a JSON object".into());
    };
    let png = json_path.with_extension("png");
    let mut out = serde_json::Map::new();
    out.insert("environment".into(), environment());
    out.insert(
        "plot".into(),
        png.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .into(),
    );
    for (k, v) in fields {
        if k != "environment" && k != "plot" {
            out.insert(k, v);
        }
    }
    let out = serde_json::Value::Object(out);
    write_json(json_path, &out)?;
    let mut figure = figure.clone();
    if figure.note.is_empty() {
        figure.note = note(&out["environment"]);
    } else {
        figure.note = format!("{} | {}", figure.note, note(&out["environment"]));
    }
    plot::write_png(&png, &figure)?;
    Ok(out)
}

/// Writes the results of a bench that could not run here: the environment and the reason, and
/// a PNG saying so.
pub fn write_skipped(json_path: &Path, title: &str, reason: &str) -> Result<(), String> {
    let figure = Figure {
        title: format!("{title}: skipped"),
        note: reason.to_string(),
        panels: Vec::new(),
    };
    write_results(json_path, serde_json::json!({"skipped": reason}), &figure).map(|_| ())
}

/// The environment as one line for a plot.
fn note(env: &serde_json::Value) -> String {
    let s = |k: &str| match &env[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "?".to_string(),
        v => v.to_string(),
    };
    let commit = s("commit");
    let short: String = commit.chars().take(12).collect();
    let dirty = if commit.ends_with("-dirty") {
        "-dirty"
    } else {
        ""
    };
    format!(
        "commit {short}{dirty} | {} | kernel {} | {} CPUs",
        s("date"),
        s("kernel"),
        s("cpus")
    )
}

/// Median, min and max of repeated measurements, for a results JSON.
pub fn spread(values: &[f64]) -> serde_json::Value {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return serde_json::json!({"median": null, "min": null, "max": null, "runs": 0});
    }
    serde_json::json!({
        "median": json_num(Some(v[v.len() / 2])),
        "min": json_num(v.first().copied()),
        "max": json_num(v.last().copied()),
        "runs": v.len(),
    })
}

/// The median of the finite values, if any.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

/// Writes `value` pretty-printed to `path`, creating the directory.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| format!("encoding JSON: {e}"))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A float for JSON, rounded to 4 significant digits; NaN/inf become null.
pub fn json_num(x: Option<f64>) -> serde_json::Value {
    match x {
        Some(v) if v.is_finite() => {
            let rounded = if v == 0.0 {
                0.0
            } else {
                let digits = 3 - v.abs().log10().floor() as i32;
                let scale = 10f64.powi(digits);
                (v * scale).round() / scale
            };
            serde_json::Number::from_f64(rounded)
                .map_or(serde_json::Value::Null, serde_json::Value::Number)
        }
        _ => serde_json::Value::Null,
    }
}

/// A number for a table cell: `-` when absent.
pub fn cell(x: Option<f64>, decimals: usize) -> String {
    x.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Bytes per second in GB/s (1e9 bytes/s).
pub fn gbs(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-12) / 1e9
}

/// A human size: 8 B, 4 KiB, 1 MiB.
pub fn size_name(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes & ((1 << 20) - 1) == 0 {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes & ((1 << 10) - 1) == 0 {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_median_min_max_of_finite_values() {
        let s = spread(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!(s["median"], 2.0);
        assert_eq!(s["min"], 1.0);
        assert_eq!(s["max"], 3.0);
        assert_eq!(s["runs"], 3);
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn quantiles_and_rounding() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(quantile(&v, 0.5), Some(Duration::from_micros(50)));
        assert_eq!(quantile(&v, 0.99), Some(Duration::from_micros(99)));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(json_num(Some(1.23456)), serde_json::json!(1.235));
        assert_eq!(json_num(Some(1234.5678)), serde_json::json!(1235.0));
        assert_eq!(json_num(Some(f64::NAN)), serde_json::Value::Null);
        assert_eq!(size_name(16 << 20), "16 MiB");
        assert_eq!(size_name(8), "8 B");
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["name", "v"]);
        t.row(vec!["tcp".into(), "1.5".into()]);
        t.row(vec!["shm-long".into(), "12.25".into()]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[2], "tcp         1.5", "{s}");
        assert_eq!(lines[2].len(), lines[3].len(), "{s}");
    }
}
