//! `bench launch`: time for `krun` to start and finish 1, 16, 32 and 64 ranks of `/bin/true`
//! over 4 local nodes, against Open MPI's `mpirun` doing the same in the same run. Every run
//! is bounded: Debian's mpirun 4.1 hangs here from about 48 oversubscribed ranks on 2 cores.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::report::{json_num, results_path, write_json, Args, Table};

/// The release `krun` next to this bench binary (built by `cargo build --release -p launcher`).
fn krun_path() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating bench: {e}"))?;
    let krun = exe.with_file_name("krun");
    if krun.exists() {
        Ok(krun)
    } else {
        Err(format!(
            "{} is missing: run `cargo build --release -p launcher` first",
            krun.display()
        ))
    }
}

fn ensure_mpirun() -> Result<(), String> {
    if Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("bench launch: mpirun missing, installing Debian's openmpi-bin");
    let ok = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "openmpi-bin",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err("could not install openmpi-bin (apt-get install openmpi-bin as root)".into())
    }
}

/// Median wall time of `runs` runs of a command (after one warm-up run). `Ok(None)` when a
/// run does not finish within `limit` (it is killed by PID); an error on a bad exit.
fn time_command(
    what: &str,
    mut make: impl FnMut() -> Command,
    runs: usize,
    limit: Duration,
) -> Result<Option<f64>, String> {
    let mut times = Vec::with_capacity(runs);
    for i in 0..=runs {
        let mut cmd = make();
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
                break s;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("bench launch: {what} did not finish within {limit:?}; killed");
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = start.elapsed();
        if !status.success() {
            return Err(format!("{what} failed ({status})"));
        }
        if i > 0 {
            times.push(took);
        }
    }
    times.sort();
    Ok(Some(times[times.len() / 2].as_secs_f64()))
}

pub fn run(raw: &[String]) -> Result<(), String> {
    let args = Args::parse(raw)?;
    args.only(&["runs", "ranks", "out", "limit-secs"])?;
    let runs: usize = args.number("runs", 5)?;
    let limit = Duration::from_secs(args.number("limit-secs", 60)?);
    let ranks: Vec<usize> = args
        .get("ranks")
        .unwrap_or("1,16,32,64")
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .map_err(|_| format!("--ranks: {r:?} is not a number"))
        })
        .collect::<Result<_, _>>()?;
    let krun = krun_path()?;
    ensure_mpirun()?;
    let mut rows = Vec::new();
    let mut table = Table::new(&["ranks", "krun s", "mpirun s", "krun/mpirun"]);
    for &n in &ranks {
        let krun_s = time_command(
            &format!("krun -n {n}"),
            || {
                let mut c = Command::new(&krun);
                c.args([
                    "-n",
                    &n.to_string(),
                    "--local",
                    "4",
                    "--bind-to",
                    "none",
                    "/bin/true",
                ]);
                c
            },
            runs,
            limit,
        )?;
        let mpirun_s = time_command(
            &format!("mpirun -np {n}"),
            || {
                let mut c = Command::new("mpirun");
                c.args([
                    "--oversubscribe",
                    "--allow-run-as-root",
                    "-np",
                    &n.to_string(),
                    "/bin/true",
                ]);
                c
            },
            runs,
            limit,
        )?;
        let secs = |x: Option<f64>| x.map_or("timeout".to_string(), |x| format!("{x:.3}"));
        let ratio = match (krun_s, mpirun_s) {
            (Some(k), Some(m)) => format!("{:.2}", k / m),
            _ => "-".into(),
        };
        table.row(vec![n.to_string(), secs(krun_s), secs(mpirun_s), ratio]);
        rows.push(json!({"ranks": n, "krun_s": json_num(krun_s), "mpirun_s": json_num(mpirun_s)}));
    }
    print!("{}", table.render());
    println!(
        "target: krun <= 1.0x mpirun at 64 ranks (median of {runs} runs after a warm-up; 4 local krund \
         nodes; a command not done within {limit:?} shows as timeout / null)"
    );
    let path = args
        .get("out")
        .map(PathBuf::from)
        .unwrap_or_else(|| results_path("launch"));
    write_json(&path, &json!({ "rows": rows }))?;
    println!("wrote {}", path.display());
    Ok(())
}
