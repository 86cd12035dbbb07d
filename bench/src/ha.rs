//! `bench ha`: the coordinated checkpoint policy on the heat stencil
//! (`rank/examples/c/heat_ha.c`, 6 ranks on 3 local krund nodes, tcp), measured:
//!
//! - failure-free: no policy, the policy at a short interval, and at the Young/Daly interval
//!   (`policies::interval::daly`) for the checkpoint cost measured at the short interval and
//!   the MTBF given (`--mtbf-s`); overhead = the compute loop's time (rank 0's own clock)
//!   against the no-policy runs of the same bench run;
//! - a node SIGKILLed (`krun --inject-failure node=1@T`) between checkpoints with 1 spare:
//!   from the SIGKILL until every rank computes again (each rank prints a time stamp when it
//!   is wired and its state loaded), against the bound "detection + 0.5 s + the image fetch
//!   at 0.8x the RMA read bandwidth" (`bench fabric`'s tcp read at 16 MiB, same run);
//! - the same failure handled by relaunching the whole job from its L4 images: the job is
//!   ended once krun reports the failure, the newest version every rank has on L4 is read
//!   (`ckpt_store::disk::DiskLevel`) and written as the ranks' image files, and a new krun
//!   starts every rank from it (`KRUN_GHOST_RESTORE`); timed from the same SIGKILL;
//! - `--campaign N`: N trials of `cluster_tests::campaign` (a random node SIGKILLed at a
//!   random time); the count that finished with the serial checksum goes into the JSON.
//!
//! Every failure run's result is checked against `heat_serial`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster_tests::campaign::{run_job, JobOutput, RunningJob};
use serde_json::json;

use crate::report::{median, results_path};

pub(crate) mod campaign;
pub(crate) mod parse;
mod report;
use campaign::campaign_only;
pub(crate) use campaign::{campaign_json, campaign_setup};
use parse::{commits, failure_times, loop_seconds, FailureTimes};
use report::{report, Report};

/// The coordinated checkpoint policy on the heat stencil (6 ranks, 3 local
/// nodes): failure-free overhead, a node SIGKILLed and restarted onto a spare against a
/// relaunch from L4, optional fault campaign; writes bench/results/ha.json.
#[derive(Debug, clap::Args)]
pub struct HaArgs {
    /// Runs per configuration (at least 3).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// MiB of state per rank.
    #[arg(long, value_name = "M", default_value_t = 16.0)]
    pub state_mib: f64,
    /// Seconds of the failure-free job.
    #[arg(long, value_name = "S", default_value_t = 25.0)]
    pub job_s: f64,
    /// Checkpoint interval in seconds.
    #[arg(long, value_name = "A", default_value_t = 2.0)]
    pub interval_s: f64,
    /// MTBF in seconds (for the Young/Daly interval).
    #[arg(long, value_name = "M", default_value_t = 120.0)]
    pub mtbf_s: f64,
    /// Fault-campaign runs (0: none).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub campaign: usize,
    /// Only the fault campaign.
    #[arg(long)]
    pub campaign_only: bool,
    /// Only the failure runs (spare restart against relaunch), printed and not written to
    /// the JSON: for measuring a change to the restart path without the failure-free runs.
    #[arg(long)]
    pub failures_only: bool,
    #[arg(long, default_value_t = 20261206)]
    pub seed: u64,
    /// The tcp RMA read bandwidth in GB/s (default: measured now by bench fabric).
    #[arg(long, value_name = "X")]
    pub rma_read_gbs: Option<f64>,
    /// Where to write the JSON (default bench/results/ha.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

/// Ranks, nodes with ranks, and grid columns.
const RANKS: usize = 6;
const NODES: usize = 3;
const NY: usize = 1024;

pub(crate) struct Setup {
    pub(crate) krun: PathBuf,
    pub(crate) heat: PathBuf,
    pub(crate) nx: usize,
    pub(crate) steps: usize,
    /// Bytes of one rank's registered state.
    pub(crate) state_bytes: usize,
    /// Ranks' image files (per-run subdirectories), in memory like krun's default.
    pub(crate) ghost: PathBuf,
    /// L4 directory of the failure runs.
    pub(crate) disk: PathBuf,
    pub(crate) arena_mib: usize,
    pub(crate) limit: Duration,
    /// Runs that failed and were retried (reason, shortened), reported in the JSON.
    pub(crate) failed: std::cell::RefCell<Vec<String>>,
}

/// Up to 3 attempts of one measurement; each failure is recorded in `setup.failed`.
pub(crate) fn attempt<T>(
    setup: &Setup,
    what: &str,
    mut f: impl FnMut(usize) -> Result<T, String>,
) -> Result<T, String> {
    let mut last = String::new();
    for a in 0..3 {
        match f(a) {
            Ok(v) => return Ok(v),
            Err(e) => {
                let short: String = e.lines().take(1).collect();
                println!("  {what}: attempt {} failed: {short}", a + 1);
                setup.failed.borrow_mut().push(format!(
                    "{what} attempt {}: {}",
                    a + 1,
                    tail(&e, 6)
                ));
                last = e;
            }
        }
    }
    Err(format!("{what}: 3 attempts failed; the last: {last}"))
}

/// Removes the bench's directories at the end.
pub(crate) struct Cleanup(pub(crate) Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// What one krun run is.
#[derive(Clone, Default)]
pub(crate) struct Job {
    pub(crate) interval_s: Option<f64>,
    pub(crate) spares: usize,
    pub(crate) l4: bool,
    /// (owner, version) to restore every rank from.
    pub(crate) restore: Option<(String, u64)>,
    pub(crate) tag: String,
    /// More krun options (before the program) and environment (`bench policies`: the
    /// policy's selection, `--inject-failure`).
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
}

impl Setup {
    pub(crate) fn command(&self, job: &Job, steps: usize) -> Command {
        let mut c = Command::new(&self.krun);
        c.args(["--local", &NODES.to_string(), "-n", &RANKS.to_string()])
            .args(["--provider", "tcp"]);
        if job.spares > 0 {
            c.args(["--spares", &job.spares.to_string()]);
        }
        if let Some(i) = job.interval_s {
            c.args(["--checkpoint-interval", &format!("{i:.3}")]);
        }
        c.args(&job.args);
        c.envs(job.env.iter().map(|(k, v)| (k, v)));
        c.arg(&self.heat)
            .args([self.nx.to_string(), NY.to_string(), steps.to_string()]);
        c.env("KRUN_GHOST_DIR", self.ghost.join(&job.tag))
            .env("KRUN_STORE_ARENA_MIB", self.arena_mib.to_string())
            .env("HEAT_HA_TRACE", "1");
        if job.l4 {
            c.env("KRUN_STORE_DISK", self.disk.join(&job.tag));
        }
        if let Some((owner, v)) = &job.restore {
            c.env("KRUN_GHOST_OWNER", owner)
                .env("KRUN_GHOST_RESTORE", v.to_string());
        }
        c
    }

    pub(crate) fn run(&self, job: &Job, steps: usize) -> Result<JobOutput, String> {
        let _ = std::fs::create_dir_all(self.disk.join(&job.tag));
        let out = run_job(&mut self.command(job, steps), self.limit).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(self.ghost.join(&job.tag));
        let _ = std::fs::remove_dir_all(self.disk.join(&job.tag));
        if out.code != Some(0) || out.timed_out {
            return Err(format!(
                "{} ended with {:?}{}:\n{}",
                job.tag,
                out.code,
                if out.timed_out { " (timed out)" } else { "" },
                tail(&out.text(), 40)
            ));
        }
        Ok(out)
    }
}

pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub(crate) fn exe_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating bench: {e}"))?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Builds heat_ha and heat_serial against the release libkrun.so next to this binary.
pub(crate) fn build_heat(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    for bin in ["krun", "krund", "libkrun.so"] {
        if !dir.join(bin).exists() {
            return Err(format!(
                "{} is missing: cargo build --release -p launcher -p rank first",
                dir.join(bin).display()
            ));
        }
    }
    let out = dir.join("examples-c");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/c");
    let (heat, serial) = (out.join("heat_ha"), out.join("heat_serial"));
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", dir.display()))
        .arg(format!("OUT={}", out.display()))
        .arg(&heat)
        .arg(&serial)
        .output()
        .map_err(|e| format!("make: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "building heat_ha: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok((heat, serial))
}

pub(crate) fn serial_checksum(
    serial: &Path,
    nx: usize,
    ny: usize,
    steps: usize,
) -> Result<String, String> {
    let o = Command::new(serial)
        .args([nx.to_string(), ny.to_string(), steps.to_string()])
        .output()
        .map_err(|e| format!("heat_serial: {e}"))?;
    String::from_utf8_lossy(&o.stdout)
        .split(" checksum ")
        .nth(1)
        .map(|s| s.trim().to_string())
        .ok_or_else(|| "heat_serial printed no checksum".to_string())
}

/// tcp RMA read bandwidth at 16 MiB, GB/s, from `bench fabric` run now.
fn rma_read_gbs() -> Result<f64, String> {
    let out =
        std::env::temp_dir().join(format!("krun-bench-ha-fabric-{}.json", std::process::id()));
    let o = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["fabric", "--providers", "tcp", "--rounds", "1", "--quick"])
        .arg("--out")
        .arg(&out)
        .output()
        .map_err(|e| format!("bench fabric: {e}"))?;
    let text = std::fs::read_to_string(&out);
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(out.with_extension("png"));
    let text = text.map_err(|e| {
        format!(
            "bench fabric wrote no results ({e}): {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    v["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["provider"] == "tcp" && r["op"] == "read")
        .max_by_key(|r| r["size"].as_u64().unwrap_or(0))
        .and_then(|r| r["bw_gbs"].as_f64())
        .ok_or_else(|| "bench fabric measured no tcp read bandwidth".into())
}

pub(crate) fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One failure-free configuration's runs.
#[derive(Default)]
struct Steady {
    loops: Vec<f64>,
    ckpt: Vec<f64>,
    freeze: Vec<f64>,
    commits: Vec<f64>,
    /// Loop time over the paired run without a policy.
    ratios: Vec<f64>,
}

/// One run of `job` (tag suffix `i`) into `s`; returns its loop time.
fn one_run(setup: &Setup, job: &Job, i: usize, s: &mut Steady) -> Result<f64, String> {
    let mut j = job.clone();
    j.tag = format!("{}-{i}", job.tag);
    let out = setup.run(&j, setup.steps)?;
    let l = loop_seconds(&out).ok_or("no loop time printed")?;
    let c = commits(&out);
    println!(
        "  {} run {}: loop {l:.2} s, {} checkpoints (load {})",
        job.tag,
        i + 1,
        c.len(),
        uptime()
    );
    s.loops.push(l);
    s.commits.push(c.len() as f64);
    for (ckpt, freeze) in c {
        s.ckpt.push(ckpt);
        s.freeze.push(freeze);
    }
    Ok(l)
}

/// `runs` pairs: a run without a policy, then one of `job`, so that the machine's load
/// drifts alike for both; each pair gives a ratio of loop times (in `ratios`).
fn paired(setup: &Setup, job: &Job, runs: usize, none: &mut Steady) -> Result<Steady, String> {
    let mut s = Steady::default();
    let plain = Job {
        tag: format!("none-for-{}", job.tag),
        ..Job::default()
    };
    for i in crate::runs::bar(&format!("ha: {}", job.tag), 0..runs) {
        let base = attempt(setup, &format!("{} {i}", plain.tag), |a| {
            one_run(setup, &plain, i * 10 + a, none)
        })?;
        let l = attempt(setup, &format!("{} {i}", job.tag), |a| {
            one_run(setup, job, i * 10 + a, &mut s)
        })?;
        s.ratios.push(l / base);
    }
    Ok(s)
}

/// The newest version every rank holds on L4 with its whole incremental chain, written as
/// the ranks' image files under `dir` for ghost owner `owner`. Returns (version, bytes read).
fn l4_to_images(disk: &Path, dir: &Path, owner: &str) -> Result<(u64, u64), String> {
    let level = ckpt_store::disk::DiskLevel::open(disk).map_err(|e| e.to_string())?;
    let versions = |r: usize| level.versions(&format!("rank-{r}")).unwrap_or_default();
    let mut common = versions(0);
    for r in 1..RANKS {
        let v = versions(r);
        common.retain(|x| v.contains(x));
    }
    common.sort_unstable();
    'version: for &v in common.iter().rev() {
        let mut files = Vec::new();
        let mut bytes = 0u64;
        for r in 0..RANKS {
            let mut next = v;
            loop {
                let Ok(image) = level.read(&format!("rank-{r}"), next) else {
                    continue 'version;
                };
                let parent = ghost::image::Image::parse(&image)
                    .map(|i| i.parent_id)
                    .map_err(|e| format!("L4 image v{next} of rank {r}: {e}"))?;
                bytes += image.len() as u64;
                files.push((
                    ghost::native::image_path(dir, &format!("{owner}/rank{r}"), next),
                    image,
                ));
                if parent == 0 || parent >= next {
                    break;
                }
                next = parent;
            }
        }
        for (path, image) in files {
            ghost::native::write_atomically(&path, &image).map_err(|e| e.to_string())?;
        }
        return Ok((v, bytes));
    }
    Err(format!(
        "no version with a complete chain for every rank on L4 in {} (common: {common:?})",
        disk.display()
    ))
}

/// One failure handled by a spare, or by relaunching from L4.
struct Failure {
    times: FailureTimes,
    /// Relaunch only: from the SIGKILL to the new job's start, and the L4 read.
    relaunch: Option<(f64, f64, u64)>,
}

/// Starts `job`, and SIGKILLs node 1 (its krund and the ranks it started, by PID) half a
/// checkpoint interval after the 2nd commit: between checkpoints. Returns the job and when
/// the SIGKILL was sent (Unix seconds).
fn start_and_kill(setup: &Setup, job: &Job) -> Result<(RunningJob, f64), String> {
    let _ = std::fs::create_dir_all(setup.disk.join(&job.tag));
    let mut running =
        RunningJob::start(&mut setup.command(job, setup.steps)).map_err(|e| e.to_string())?;
    let start = std::time::Instant::now();
    while running.first("checkpoint 2 committed").is_none() {
        if running.ended().map_err(|e| e.to_string())? || start.elapsed() > setup.limit {
            let text = running
                .stop(Duration::from_secs(10))
                .map(|o| o.text())
                .unwrap_or_default();
            return Err(format!(
                "{}: no 2nd checkpoint committed:\n{}",
                job.tag,
                tail(&text, 40)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs_f64(job.interval_s.unwrap_or(1.0) / 2.0));
    let kill_at = kill_node(running.pid(), 1)?;
    Ok((running, kill_at))
}

/// SIGKILL of local node `node` of the krun `krun_pid` (its krund child started with
/// `--node-id N`) and of that krund's children (its ranks). Returns when it was sent.
pub(crate) fn kill_node(krun_pid: u32, node: usize) -> Result<f64, String> {
    let children = |pid: u32| -> Vec<u32> {
        let mut out = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                    out.extend(
                        text.split_whitespace()
                            .filter_map(|p| p.parse::<u32>().ok()),
                    );
                }
            }
        }
        out
    };
    let want = format!("\0--node-id\0{node}\0");
    let krund = children(krun_pid)
        .into_iter()
        .find(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&want))
        })
        .ok_or_else(|| format!("krun {krun_pid} has no node {node} process"))?;
    let ranks = children(krund);
    let at = cluster_tests::campaign::now_unix();
    for pid in std::iter::once(krund).chain(ranks) {
        // Processes this bench started (krun's children and theirs), by PID.
        let _ = cluster_tests::kill_process(pid, libc::SIGKILL);
    }
    Ok(at)
}

fn failure_spare(setup: &Setup, job: &Job, want: &str) -> Result<Failure, String> {
    let (running, kill_at) = start_and_kill(setup, job)?;
    let out = running.wait(setup.limit).map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(setup.disk.join(&job.tag));
    let _ = std::fs::remove_dir_all(setup.ghost.join(&job.tag));
    let out = out?;
    if out.code != Some(0) {
        return Err(format!(
            "{} ended with {:?}:\n{}",
            job.tag,
            out.code,
            tail(&out.text(), 40)
        ));
    }
    check_sum(&out, want, &job.tag)?;
    let times =
        failure_times(&out, None, RANKS, kill_at).map_err(|e| format!("{}: {e}", job.tag))?;
    Ok(Failure {
        times,
        relaunch: None,
    })
}

pub(crate) fn check_sum(out: &JobOutput, want: &str, tag: &str) -> Result<(), String> {
    match out.checksum() {
        Some(c) if c == want => Ok(()),
        other => Err(format!(
            "{tag}: checksum {other:?}, serial reference {want}:\n{}",
            tail(&out.text(), 40)
        )),
    }
}

fn failure_relaunch(setup: &Setup, job: &Job, want: &str) -> Result<Failure, String> {
    let (mut first, kill_at) = start_and_kill(setup, job)?;
    let start = std::time::Instant::now();
    while first.first("node 1 failed at epoch").is_none() {
        if first.ended().map_err(|e| e.to_string())? || start.elapsed() > setup.limit {
            return Err(format!(
                "{}: krun never reported node 1's failure:\n{}",
                job.tag,
                tail(
                    &first
                        .stop(Duration::from_secs(10))
                        .map(|o| o.text())
                        .unwrap_or_default(),
                    40
                )
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The batch system's reaction to a lost node: the job ends.
    let old = first
        .stop(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let owner = "relaunch".to_string();
    let images = setup.ghost.join(format!("{}-new", job.tag));
    let t_read = cluster_tests::campaign::now_unix();
    let (version, bytes) = l4_to_images(&setup.disk.join(&job.tag), &images, &owner)?;
    let read_s = cluster_tests::campaign::now_unix() - t_read;
    // Without the policy: a relaunched job's policy numbers its checkpoints from 1 again,
    // and ranks restored from version V refuse an order for version 1 ("the checkpointer
    // took V+1"): a bug of the relaunch path, left to the policy's owners.
    let relaunched = Job {
        interval_s: None,
        spares: 0,
        l4: true,
        restore: Some((owner, version)),
        tag: format!("{}-new", job.tag),
        ..Job::default()
    };
    let t_launch = cluster_tests::campaign::now_unix();
    let new = setup.run(&relaunched, setup.steps);
    let _ = std::fs::remove_dir_all(setup.disk.join(&job.tag));
    let _ = std::fs::remove_dir_all(setup.ghost.join(&job.tag));
    let new = new?;
    check_sum(&new, want, &relaunched.tag)?;
    let times =
        failure_times(&old, Some(&new), RANKS, kill_at).map_err(|e| format!("{}: {e}", job.tag))?;
    Ok(Failure {
        relaunch: Some((t_launch - times.kill_at, read_s, bytes)),
        times,
    })
}

pub fn run(args: HaArgs) -> Result<(), String> {
    let runs: usize = args.runs.max(3);
    let state_mib: f64 = args.state_mib;
    let job_s: f64 = args.job_s;
    let interval_a: f64 = args.interval_s;
    let mtbf_s: f64 = args.mtbf_s;
    let campaign_n: usize = args.campaign;
    let seed: u64 = args.seed;
    if !(state_mib > 0.0 && job_s > 0.0 && interval_a > 0.0 && mtbf_s > 0.0) {
        return Err("--state-mib, --job-s, --interval-s and --mtbf-s must be positive".into());
    }
    if args.campaign_only {
        let out = args.out.clone().unwrap_or_else(|| results_path("ha"));
        return campaign_only(&out, campaign_n.max(1), seed);
    }
    let load_before = uptime();
    let dir = exe_dir()?;
    let (heat, serial) = build_heat(&dir)?;
    let rows_per_rank = ((state_mib * (1 << 20) as f64) / (NY * 8) as f64).ceil() as usize;
    let nx = rows_per_rank.max(3) * RANKS;
    let state_bytes = (rows_per_rank + 2) * NY * 8 + 16;
    let tag = format!("krun-bench-ha-{}", std::process::id());
    let _cleanup = Cleanup(vec![
        PathBuf::from("/dev/shm").join(&tag),
        PathBuf::from("/var/tmp").join(&tag),
    ]);
    // Room for the buddy copies of 2 ranks x (keep = 6 versions + 1 in flight), + margin.
    let arena_mib = ((2.0 * 8.0 * state_bytes as f64) / (1 << 20) as f64).ceil() as usize + 16;
    let mut setup = Setup {
        krun: dir.join("krun"),
        heat,
        nx,
        steps: 20,
        state_bytes,
        ghost: PathBuf::from("/dev/shm").join(&tag),
        disk: PathBuf::from("/var/tmp").join(&tag),
        arena_mib,
        limit: Duration::from_secs_f64((job_s * 12.0).max(180.0)),
        failed: Default::default(),
    };
    println!(
        "bench ha: heat_ha {nx}x{NY} on {RANKS} ranks / {NODES} local nodes (tcp), {:.1} MiB \
         of state per rank; load {load_before}",
        state_bytes as f64 / (1 << 20) as f64
    );
    let rma = match args.rma_read_gbs {
        Some(v) => v,
        None => rma_read_gbs()?,
    };
    println!("reference: tcp RMA read at 16 MiB (bench fabric, now): {rma:.2} GB/s");

    // Calibration: the step time without a policy, to size the job.
    let cal = setup.run(
        &Job {
            tag: "calibrate".into(),
            ..Job::default()
        },
        setup.steps,
    )?;
    let step_s = loop_seconds(&cal).ok_or("calibration: no loop time")? / setup.steps as f64;
    setup.steps = ((job_s / step_s).ceil() as usize).max(20);
    println!(
        "calibration: {:.1} ms per step -> {} steps (~{job_s} s)",
        step_s * 1e3,
        setup.steps
    );
    let want = serial_checksum(&serial, nx, NY, setup.steps)?;

    if args.failures_only {
        let (spare, relaunch) = failure_runs(&setup, interval_a, runs, &want)?;
        let restart =
            |v: &[Failure]| median(&v.iter().map(|f| f.times.restart_s).collect::<Vec<_>>());
        println!(
            "--failures-only: SIGKILL to computing, median of {runs}: spare {:.2} s, relaunch {:.2} s (nothing written)",
            restart(&spare).unwrap_or(f64::NAN),
            restart(&relaunch).unwrap_or(f64::NAN)
        );
        return Ok(());
    }
    println!("failure-free runs ({runs} each):");
    let mut none = Steady::default();
    let short = paired(
        &setup,
        &Job {
            interval_s: Some(interval_a),
            tag: "short".into(),
            ..Job::default()
        },
        runs,
        &mut none,
    )?;
    let delta = median(&short.freeze).ok_or("no checkpoint committed at the short interval")?;
    let daly_s = policies::interval::daly(delta, mtbf_s).map_err(|e| e.to_string())?;
    println!(
        "Young/Daly: checkpoint cost (ranks held) {delta:.3} s, MTBF {mtbf_s} s -> interval {daly_s:.2} s"
    );
    let daly = paired(
        &setup,
        &Job {
            interval_s: Some(daly_s),
            tag: "daly".into(),
            ..Job::default()
        },
        runs,
        &mut none,
    )?;

    let (spare, relaunch) = failure_runs(&setup, interval_a, runs, &want)?;

    let campaign = if campaign_n > 0 {
        campaign_json(&setup, &serial, campaign_n, seed)?
    } else {
        json!(null)
    };

    report(&Report {
        setup: &setup,
        runs,
        rma,
        mtbf_s,
        interval_a,
        daly_s,
        none: &none,
        short: &short,
        daly: &daly,
        spare: &spare,
        relaunch: &relaunch,
        campaign,
        load_before,
        out: args.out.clone().unwrap_or_else(|| results_path("ha")),
    })
}

/// Failures: node 1 killed between checkpoints (half an interval after the 2nd commit),
/// `runs` times restarted onto a spare and `runs` times relaunched from L4.
fn failure_runs(
    setup: &Setup,
    interval_a: f64,
    runs: usize,
    want: &str,
) -> Result<(Vec<Failure>, Vec<Failure>), String> {
    println!("failure runs: node 1 SIGKILLed half an interval after the 2nd commit ({runs} each)");
    let mut spare = Vec::new();
    let mut relaunch = Vec::new();
    for i in crate::runs::bar("ha: failure runs", 0..runs) {
        let base = Job {
            interval_s: Some(interval_a),
            l4: true,
            ..Job::default()
        };
        let s = attempt(setup, &format!("spare {i}"), |a| {
            failure_spare(
                setup,
                &Job {
                    spares: 1,
                    tag: format!("spare-{i}-{a}"),
                    ..base.clone()
                },
                want,
            )
        })?;
        println!(
            "  spare run {}: computing again {:.2} s after the SIGKILL (detected {:.2} s, fetch {} B \
             in {:.2} s), lost work {:.2} s (load {})",
            i + 1,
            s.times.restart_s,
            s.times.detect_s,
            s.times.fetch_bytes,
            s.times.fetch_s,
            s.times.lost_work_s,
            uptime()
        );
        spare.push(s);
        let r = attempt(setup, &format!("relaunch {i}"), |a| {
            failure_relaunch(
                setup,
                &Job {
                    tag: format!("relaunch-{i}-{a}"),
                    ..base.clone()
                },
                want,
            )
        })?;
        let (launch, read, bytes) = r.relaunch.unwrap_or_default();
        println!(
            "  relaunch run {}: computing again {:.2} s after the SIGKILL (detected {:.2} s, new \
             job started at {launch:.2} s, L4 read {bytes} B in {read:.2} s), lost work {:.2} s \
             (load {})",
            i + 1,
            r.times.restart_s,
            r.times.detect_s,
            r.times.lost_work_s,
            uptime()
        );
        relaunch.push(r);
    }

    Ok((spare, relaunch))
}
