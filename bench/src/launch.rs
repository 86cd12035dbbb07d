//! `bench launch`: time for `krun` to start and finish 1, 16 and 64 ranks of `/bin/true`
//! over 4 local nodes, against Open MPI's `mpirun` doing the same in the same run; and an MPI
//! hello world (MPI_Init's wire-up included, `rank/examples/mpi/hello.c`): krun serving PMIx
//! to Open MPI's build against `mpirun`, krun serving PMI-1 to MPICH's build against
//! `mpiexec.mpich` (Hydra). Every run is bounded. Debian's mpirun 4.1 hangs from about 32 ranks when its stdin or stdout is not
//! a terminal, so it runs under a pseudo-terminal: `script -qec "mpirun ..." /dev/null`.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{json_num, median, results_path, spread, write_results, Table};

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

/// Wall times in seconds of `runs` runs of a command (after one warm-up run), and how many
/// attempts hung. A run not done within `limit` is killed with its whole process group (a
/// launcher's daemons and ranks too: each attempt runs in a group of its own), counted as
/// hung and tried again, up to `runs` hung attempts in all; then the times are `None`. An
/// error on a bad exit. (Debian's mpirun 4.1 hangs now and then at 32 or more ranks even
/// under a pseudo-terminal while the next attempt ends in 0.2 s: the hangs are reported
/// beside the times, not hidden in them.)
fn time_command(
    what: &str,
    mut make: impl FnMut() -> Command,
    runs: usize,
    limit: Duration,
) -> Result<(Option<Vec<f64>>, usize), String> {
    use std::os::unix::process::CommandExt;
    let mut times = Vec::with_capacity(runs);
    let mut hung = 0;
    // Run 0 is the warm-up; each run is tried again while it hangs.
    for run in crate::runs::bar(&format!("launch: {what}"), 0..=runs) {
        let took = loop {
            let mut cmd = make();
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0);
            let start = Instant::now();
            let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
            let status = loop {
                if let Some(s) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
                    break Some(s);
                }
                if start.elapsed() > limit {
                    // The group this bench made for the attempt (its leader is our child).
                    // SAFETY: kill(2) with a negative pid signals that process group only.
                    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                    let _ = child.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            let took = start.elapsed();
            let Some(status) = status else {
                hung += 1;
                eprintln!(
                    "bench launch: {what} did not finish within {limit:?}; killed its process \
                     group ({hung} hung so far)"
                );
                if hung >= runs {
                    return Ok((None, hung));
                }
                continue;
            };
            if !status.success() {
                return Err(format!("{what} failed ({status})"));
            }
            break took;
        };
        if run > 0 {
            times.push(took.as_secs_f64());
        }
    }
    Ok((Some(times), hung))
}

/// Launch time: krun starting 1, 16, 64 ranks of /bin/true over 4 local nodes, against
/// Open MPI's mpirun in the same run; writes bench/results/launch.json.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Runs per rank count (at least 3).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Rank counts, comma-separated.
    #[arg(long, default_value = "1,16,64")]
    pub ranks: String,
    /// Ranks of the MPI program run beside (at least 1).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub mpi_ranks: usize,
    /// Seconds one launch may take.
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub limit_secs: u64,
    /// The wide row: RANKS ranks of /bin/true over HOSTS network-namespace hosts, a
    /// `krund --listen` on each, krun in host 0 (`krun --hosts`); root; `0` skips it.
    #[arg(long, value_name = "HOSTS:RANKS", default_value = "64:1024")]
    pub wide: String,
    /// Where to write the JSON (default bench/results/launch.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// The wide launch's target: all ranks started and ended within this many seconds.
const WIDE_TARGET_S: f64 = 2.0;

/// `--wide HOSTS:RANKS` parsed; `None` for `0`.
fn parse_wide(s: &str) -> Result<Option<(usize, usize)>, String> {
    if s.trim() == "0" {
        return Ok(None);
    }
    let bad = || format!("--wide: {s:?} is not HOSTS:RANKS (for example 64:1024) or 0");
    let (h, r) = s.split_once(':').ok_or_else(bad)?;
    let h: usize = h.trim().parse().map_err(|_| bad())?;
    let r: usize = r.trim().parse().map_err(|_| bad())?;
    if h == 0 || h > 253 || r == 0 {
        return Err(format!(
            "--wide: {h} hosts (1-253) and {r} ranks (at least 1)"
        ));
    }
    Ok(Some((h, r)))
}

/// The wide row: `ranks` ranks of /bin/true over `hosts` namespace hosts with a krund each,
/// krun started in host 0 through `ip netns exec`. Its times, hung attempts, and the
/// seconds the hosts took to come up; or why it did not run.
fn wide_launch(
    krun: &std::path::Path,
    hosts: usize,
    ranks: usize,
    runs: usize,
    limit: Duration,
) -> Result<(Option<Vec<f64>>, usize, f64), String> {
    use cluster_tests::hosts::{HostsSpec, KrundHosts};
    let krund = krun.with_file_name("krund");
    let up = Instant::now();
    let h = KrundHosts::start(&HostsSpec::new(krund, hosts)).map_err(|e| e.to_string())?;
    let up_s = up.elapsed().as_secs_f64();
    let list = h.host_list();
    let ns = h
        .cluster
        .node(0)
        .map_err(|e| e.to_string())?
        .netns()
        .to_string();
    let secret = h.secret.clone();
    let (times, hung) = time_command(
        &format!("krun --hosts ({hosts} hosts) -n {ranks}"),
        || {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns])
                .arg(krun)
                .args(["--hosts", &list, "-n", &ranks.to_string()])
                .args(["--bind-to", "none", "/bin/true"])
                .env("KRUN_SECRET_FILE", &secret)
                .env("KRUN_FABRIC_PROVIDER", "tcp");
            c
        },
        runs,
        limit,
    )?;
    Ok((times, hung, up_s))
}

pub fn run(args: LaunchArgs) -> Result<(), String> {
    let runs: usize = args.runs.max(3);
    let limit = Duration::from_secs(args.limit_secs);
    let ranks: Vec<usize> = args
        .ranks
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .map_err(|_| format!("--ranks: {r:?} is not a number"))
        })
        .collect::<Result<_, _>>()?;
    let mpi_ranks: usize = args.mpi_ranks.max(1);
    let krun = krun_path()?;
    ensure_mpirun()?;
    let mut rows = Vec::new();
    let mut groups = Vec::new();
    let mut verdicts = Vec::new();
    let mut table = Table::new(&["ranks", "krun s", "mpirun s", "krun/mpirun"]);
    let mut hangs: Vec<(String, usize)> = Vec::new();
    for &n in &ranks {
        let (krun_s, krun_hung) = time_command(
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
        let (mpirun_s, mpirun_hung) = time_command(
            &format!("mpirun -np {n}"),
            || {
                // A pseudo-terminal for mpirun (see the module comment).
                let mut c = Command::new("script");
                c.args([
                    "-qec",
                    &format!("mpirun --oversubscribe --allow-run-as-root -np {n} /bin/true"),
                    "/dev/null",
                ]);
                c
            },
            runs,
            limit,
        )?;
        let k = krun_s.as_deref().and_then(median);
        let m = mpirun_s.as_deref().and_then(median);
        let secs = |x: Option<f64>| x.map_or("timeout".to_string(), |x| format!("{x:.3}"));
        let ratio = k.zip(m).map(|(k, m)| k / m);
        table.row(vec![
            n.to_string(),
            secs(k),
            secs(m),
            ratio.map_or("-".into(), |r| format!("{r:.2}")),
        ]);
        verdicts.push(format!(
            "  {n:>3} ranks: krun/mpirun = {} (target <= 1.00x): {}",
            ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            match ratio {
                Some(r) if r <= 1.0 => "met",
                Some(_) => "NOT MET",
                None => "not measured",
            }
        ));
        groups.push(Group::new(
            format!("{n} ranks"),
            [
                krun_s.as_deref().and_then(|v| Bar::from_values("krun", v)),
                mpirun_s
                    .as_deref()
                    .and_then(|v| Bar::from_values("mpirun (same run)", v)),
            ],
        ));
        let spread_of = |x: &Option<Vec<f64>>| x.as_deref().map_or(json!(null), spread);
        rows.push(json!({
            "ranks": n,
            "krun_s": json_num(k),
            "mpirun_s": json_num(m),
            "krun": spread_of(&krun_s),
            "mpirun": spread_of(&mpirun_s),
            "krun_hung": krun_hung,
            "mpirun_hung": mpirun_hung,
        }));
        hangs.push((format!("krun -n {n}"), krun_hung));
        hangs.push((format!("mpirun -np {n}"), mpirun_hung));
    }
    let wide = parse_wide(&args.wide)?;
    let mpi = mpi_hello(&krun, mpi_ranks, runs, limit)?;
    let secs = |x: Option<f64>| x.map_or("timeout".to_string(), |x| format!("{x:.3}"));
    let spread_of = |x: &Option<Vec<f64>>| x.as_deref().map_or(json!(null), spread);
    let mut mpi_rows: Vec<serde_json::Value> = Vec::new();
    for r in &mpi {
        let (k, m) = (
            r.krun.as_deref().and_then(median),
            r.other_s.as_deref().and_then(median),
        );
        table.row(vec![
            format!("{mpi_ranks} ({} hello, vs {})", r.label, r.other),
            secs(k),
            secs(m),
            k.zip(m)
                .map_or("-".into(), |(k, m)| format!("{:.2}", k / m)),
        ]);
        hangs.push((format!("krun {} hello", r.label), r.krun_hung));
        hangs.push((format!("{} hello", r.other), r.other_hung));
        mpi_rows.push(json!({
            "mpi": r.label,
            "ranks": mpi_ranks,
            "against": r.other,
            "krun_s": json_num(k),
            "other_s": json_num(m),
            "krun": spread_of(&r.krun),
            "other": spread_of(&r.other_s),
            "krun_hung": r.krun_hung,
            "other_hung": r.other_hung,
        }));
        groups.push(Group::new(
            format!("{mpi_ranks} ranks, MPI hello ({})", r.label),
            [
                r.krun.as_deref().and_then(|v| Bar::from_values("krun", v)),
                r.other_s
                    .as_deref()
                    .and_then(|v| Bar::from_values(&format!("{} (same run)", r.other), v)),
            ],
        ));
    }
    let wide_row = match wide {
        None => json!({"skipped": "--wide 0"}),
        Some((hosts, n)) => match wide_launch(&krun, hosts, n, runs, limit) {
            Ok((times, hung, up_s)) => {
                let k = times.as_deref().and_then(median);
                table.row(vec![
                    format!("{n} over {hosts} namespace hosts (target <= {WIDE_TARGET_S} s)"),
                    secs(k),
                    "-".into(),
                    "-".into(),
                ]);
                verdicts.push(format!(
                    "  {n} ranks over {hosts} hosts: {} (target <= {WIDE_TARGET_S} s): {}",
                    secs(k),
                    match k {
                        Some(k) if k <= WIDE_TARGET_S => "met",
                        Some(_) => "NOT MET",
                        None => "not measured",
                    }
                ));
                hangs.push((format!("krun --hosts -n {n}"), hung));
                groups.push(Group::new(
                    format!("{n} ranks over\n{hosts} hosts"),
                    [times.as_deref().and_then(|v| Bar::from_values("krun", v))],
                ));
                json!({
                    "hosts": hosts,
                    "ranks": n,
                    "krun_s": json_num(k),
                    "krun": spread_of(&times),
                    "krun_hung": hung,
                    "target_s": WIDE_TARGET_S,
                    "hosts_up_s": up_s,
                    "how": "a krund --listen in each network namespace host; `ip netns exec HOST0 krun --hosts ... -n RANKS --bind-to none /bin/true`",
                })
            }
            Err(e) => {
                println!("wide row not run: {e}");
                json!({"skipped": e})
            }
        },
    };
    print!("{}", table.render());
    println!(
        "median of {runs} runs after a warm-up; 4 local krund nodes; mpirun under `script` (a \
         pseudo-terminal); an attempt not done within {limit:?} is killed and tried again \
         (timeout / null when {runs} attempts hung)"
    );
    for (what, hung) in hangs.iter().filter(|h| h.1 > 0) {
        println!("hung attempts (killed, not in the times): {what}: {hung}");
    }
    println!("targets:");
    for v in &verdicts {
        println!("{v}");
    }
    let path = args.out.clone().unwrap_or_else(|| results_path("launch"));
    let figure = Figure {
        title: "bench launch: krun against mpirun, /bin/true and an MPI hello world on one machine"
            .into(),
        note: format!("median of {runs} runs, whiskers min/max; a missing bar timed out"),
        panels: vec![Panel::new(
            "time to run all ranks (lower is better)",
            "seconds",
            groups,
        )],
    };
    write_results(
        &path,
        json!({
            "runs_per_point": runs,
            "mpirun_via": "script -qec 'mpirun ...' /dev/null (pseudo-terminal)",
            "rows": rows,
            "mpi_hello": mpi_rows,
            "wide": wide_row,
        }),
        &figure,
    )?;
    println!("wrote {} and its .png", path.display());
    Ok(())
}

/// One MPI hello-world comparison: (MPI library, krun's times, the other launcher's times,
/// the other launcher's name).
/// One MPI hello-world row: krun's times and the other launcher's, with their hung attempts.
struct MpiRow {
    label: String,
    krun: Option<Vec<f64>>,
    krun_hung: usize,
    other_s: Option<Vec<f64>>,
    other_hung: usize,
    other: String,
}

/// Builds `rank/examples/mpi/hello.c` with `mpicc` into `out`.
fn build_hello(mpicc: &str, out: &std::path::Path) -> Result<PathBuf, String> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/mpi");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("MPICC={mpicc}"))
        .arg(format!("OUT={}", out.display()))
        .arg(out.join("hello"))
        .output()
        .map_err(|e| format!("make: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "building hello with {mpicc} (scripts/install-deps.sh installs it): {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(out.join("hello"))
}

/// `n` ranks of an MPI hello world over 4 local krund nodes: krun serving PMIx to Open
/// MPI's build against Open MPI's mpirun (one machine, a pseudo-terminal as above), and
/// krun serving PMI-1 to MPICH's build against MPICH's mpiexec (Hydra).
fn mpi_hello(
    krun: &std::path::Path,
    n: usize,
    runs: usize,
    limit: Duration,
) -> Result<Vec<MpiRow>, String> {
    let dir = std::env::temp_dir().join(format!("krun-bench-mpi-{}", std::process::id()));
    let mut rows = Vec::new();
    for (label, mpicc, mode, other, other_cmd) in [
        (
            "Open MPI",
            "mpicc.openmpi",
            "pmix",
            "mpirun",
            "mpirun.openmpi --oversubscribe --allow-run-as-root --bind-to none -np",
        ),
        (
            "MPICH",
            "mpicc.mpich",
            "pmi1",
            "mpiexec.mpich",
            "mpiexec.mpich -n",
        ),
    ] {
        let out = dir.join(mpicc);
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let hello = build_hello(mpicc, &out)?;
        let (k, k_hung) = time_command(
            &format!("krun --mpi {mode} -n {n} hello"),
            || {
                let mut c = Command::new(krun);
                c.args(["--mpi", mode, "-n", &n.to_string(), "--local", "4"])
                    .args(["--bind-to", "none"])
                    .arg(&hello);
                c
            },
            runs,
            limit,
        )?;
        let (m, m_hung) = time_command(
            &format!("{other} {n} hello"),
            || {
                let mut c = Command::new("script");
                c.args([
                    "-qec",
                    &format!("{other_cmd} {n} {}", hello.display()),
                    "/dev/null",
                ]);
                c
            },
            runs,
            limit,
        )?;
        rows.push(MpiRow {
            label: label.to_string(),
            krun: k,
            krun_hung: k_hung,
            other_s: m,
            other_hung: m_hung,
            other: other.to_string(),
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}
