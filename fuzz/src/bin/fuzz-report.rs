//! Writes the fuzz lane's results, bench/results/fuzz.json and fuzz.png, from AFL++'s output
//! directories: `fuzz-report OUT_DIR [BUDGET] [COMMAND]`, where
//! `OUT_DIR/<target>/default/fuzzer_stats` is each target's campaign (`scripts/fuzz.sh` lays
//! them out so), BUDGET describes the lane's bound (e.g. `10000000 execs or 600 s per
//! target`) and COMMAND is the command that ran it. A target without stats is reported as
//! not run. Each target's measured rate gives the time it would need for the bar
//! (10^7 executions) on the same machine.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bench::plot::{Bar, Figure, Group, Panel};
use serde_json::{json, Value};

/// The executions per target the issue asks of the long lane.
const BAR: u64 = 10_000_000;

fn stats(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect(),
    )
}

fn num(s: &BTreeMap<String, String>, keys: &[&str]) -> Option<f64> {
    keys.iter()
        .find_map(|k| s.get(*k))
        .and_then(|v| v.trim_end_matches('%').parse().ok())
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name() != "README.txt" && e.path().is_file())
                .count()
        })
        .unwrap_or(0)
}

/// The afl-fuzz version (its first line of `afl-fuzz -h`), if installed.
fn afl_version() -> Option<String> {
    let out = std::process::Command::new("afl-fuzz")
        .arg("-h")
        .output()
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let at = text.find("afl-fuzz++")? + "afl-fuzz++".len();
    let version: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    (!version.is_empty()).then_some(version)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(out_dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: fuzz-report OUT_DIR [BUDGET] [COMMAND]");
        std::process::exit(2);
    };
    let budget = args.next().unwrap_or_default();
    let command = args.next().unwrap_or_default();
    let mut targets = serde_json::Map::new();
    let mut exec_bars = Vec::new();
    let mut rate_bars = Vec::new();
    let mut table = Vec::new();
    for t in fuzz::TARGETS {
        let dir = out_dir.join(t.name).join("default");
        let Some(s) = stats(&dir.join("fuzzer_stats")) else {
            targets.insert(t.name.into(), json!({"what": t.what, "run": false}));
            table.push(format!("{:<12} not run", t.name));
            continue;
        };
        let execs = num(&s, &["execs_done"]).unwrap_or(0.0) as u64;
        let run_time = num(&s, &["run_time"]);
        let rate = match run_time {
            Some(rt) if rt > 0.0 => Some(execs as f64 / rt),
            _ => num(&s, &["execs_per_sec"]),
        };
        // The crash and hang directories hold one file per unique crash or hang (and a
        // README); the stats' counters say the same on AFL++ 4.
        let crashes = num(&s, &["saved_crashes", "unique_crashes"])
            .map(|c| c as usize)
            .unwrap_or_else(|| files_in(&dir.join("crashes")));
        let hangs = num(&s, &["saved_hangs", "unique_hangs"])
            .map(|c| c as usize)
            .unwrap_or_else(|| files_in(&dir.join("hangs")));
        let corpus = num(&s, &["corpus_count", "paths_total"]).unwrap_or(0.0) as u64;
        targets.insert(
            t.name.into(),
            json!({
                "what": t.what,
                "run": true,
                "executions": execs,
                "reached_bar": execs >= BAR,
                "crashes": crashes,
                "hangs": hangs,
                "corpus_size": corpus,
                "exec_per_s": rate.map(|r| (r * 10.0).round() / 10.0),
                // At the measured rate, the time the rest of the bar would take.
                "seconds_to_bar": rate
                    .filter(|&r| r > 0.0)
                    .map(|r| (BAR.saturating_sub(execs) as f64 / r).round()),
                "run_time_s": run_time,
                "edges_found": num(&s, &["edges_found"]),
                "stability_percent": num(&s, &["stability"]),
            }),
        );
        table.push(format!(
            "{:<12} {:>12} execs {:>8.0} exec/s {:>3} crashes {:>3} hangs {:>6} corpus",
            t.name,
            execs,
            rate.unwrap_or(0.0),
            crashes,
            hangs,
            corpus
        ));
        exec_bars.push(Group::new(
            t.name,
            [
                Bar::single("executions (log10)", Some((execs.max(1) as f64).log10())),
                Bar::single("bar: 10^7", Some(7.0)),
            ],
        ));
        rate_bars.push(Group::new(t.name, [Bar::single("exec/s", rate)]));
    }
    for line in &table {
        println!("{line}");
    }
    let body = json!({
        "tool": "AFL++ (Debian afl++ package) on stable rustc's SanitizerCoverage, persistent mode, shared-memory test cases (scripts/fuzz.sh; no cargo-afl, no nightly)",
        "afl_version": afl_version(),
        "command": command,
        "budget": budget,
        "bar_executions": BAR,
        "targets": Value::Object(targets),
    });
    let figure = Figure {
        title: "Fuzz lane: executions and speed per target (AFL++, nice 19)".into(),
        note: budget,
        panels: vec![
            Panel::new("executions per target", "log10(executions)", exec_bars),
            Panel::new("executions per second", "exec/s", rate_bars),
        ],
    };
    let path = bench::report::results_path("fuzz");
    if let Err(e) = bench::report::write_results(&path, body, &figure) {
        eprintln!("fuzz-report: {e}");
        std::process::exit(1);
    }
    println!("wrote {}", path.display());
}
