//! `bench l4`: the L4 disk level alone (`ckpt_store::disk::DiskLevel::write`: io_uring,
//! O_DIRECT, preallocated file, fsync, atomic rename) writing 1 GiB from page-aligned memory
//! (zero-copy) and from memory one byte off (through the aligned bounce buffers), against
//! `dd oflag=direct` of the same size in the same directory, interleaved round by round.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use ckpt_store::disk::DiskLevel;
use fabric::Region;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{gbs, json_num, median, results_path, spread, write_results, Table};

fn dd_gbs(dir: &std::path::Path, bytes: u64) -> Result<f64, String> {
    let file = dir.join("dd.bin");
    let start = Instant::now();
    let ok = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=16M", &format!("count={}", bytes >> 24), "oflag=direct"])
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("running dd: {e}"))?
        .success();
    let t = start.elapsed();
    let _ = std::fs::remove_file(&file);
    if !ok {
        return Err("dd failed".into());
    }
    Ok(gbs(bytes, t))
}

/// The L4 disk level alone writing 1 GiB (page-aligned: zero-copy; one byte off:
/// through bounce buffers) against dd oflag=direct, round by round; writes
/// bench/results/l4.json.
#[derive(Debug, clap::Args)]
pub struct L4Args {
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
    /// The directory written to.
    #[arg(long, default_value = "/var/tmp/krun-bench-l4")]
    pub dir: PathBuf,
    /// Where to write the JSON (default bench/results/l4.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

pub fn run(args: L4Args) -> Result<(), String> {
    let rounds: u64 = args.rounds;
    let dir = args.dir.clone();
    let out = args.out.clone().unwrap_or_else(|| results_path("l4"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let disk = DiskLevel::open(&dir).map_err(|e| e.to_string())?;
    let bytes: u64 = 1 << 30;
    // Page-aligned memory, as the store's L1 regions are.
    let memory = Region::new(bytes as usize + 4096).map_err(|e| e.to_string())?;
    // SAFETY: the region is this function's alone; nothing else touches it while the slice
    // lives.
    let all = unsafe { memory.as_mut_slice() };
    for (i, b) in all.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31);
    }
    let mut table = Table::new(&["round", "L4 aligned GB/s", "L4 copied GB/s", "dd GB/s"]);
    let mut rows = Vec::new();
    let (mut ratio_aligned, mut ratio_copied) = (Vec::new(), Vec::new());
    let (mut all_aligned, mut all_copied, mut all_dd) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds.max(1) {
        let dd = dd_gbs(&dir, bytes)?;
        let start = Instant::now();
        let r = disk
            .write("bench", round, &all[..bytes as usize])
            .map_err(|e| e.to_string())?;
        let aligned = gbs(bytes, start.elapsed());
        if r.copied != 0 {
            return Err(format!("{} bytes went through bounce buffers", r.copied));
        }
        let start = Instant::now();
        disk.write("bench", round + 1000, &all[1..bytes as usize + 1])
            .map_err(|e| e.to_string())?;
        let copied = gbs(bytes, start.elapsed());
        let _ = disk.remove("bench", round);
        let _ = disk.remove("bench", round + 1000);
        all_aligned.push(aligned);
        all_copied.push(copied);
        all_dd.push(dd);
        ratio_aligned.push(aligned / dd);
        ratio_copied.push(copied / dd);
        table.row(vec![
            round.to_string(),
            format!("{aligned:.2}"),
            format!("{copied:.2}"),
            format!("{dd:.2}"),
        ]);
        rows.push(serde_json::json!({
            "round": round,
            "l4_aligned_gbs": json_num(Some(aligned)),
            "l4_copied_gbs": json_num(Some(copied)),
            "dd_gbs": json_num(Some(dd)),
        }));
    }
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    let (a, c) = (med(&ratio_aligned), med(&ratio_copied));
    println!("1 GiB per write into {}", dir.display());
    print!("{}", table.render());
    println!("median L4 / dd: aligned {a:.2}x, copied {c:.2}x (target >= 0.9x)");
    let figure = Figure {
        title: "bench l4: the L4 disk level writing 1 GiB against dd oflag=direct".into(),
        note: format!("median of {} rounds, whiskers min/max", rows.len()),
        panels: vec![Panel::new(
            "write bandwidth (higher is better)",
            "GB/s",
            vec![Group::new(
                "1 GiB",
                [
                    Bar::from_values("L4 page-aligned (zero-copy)", &all_aligned),
                    Bar::from_values("L4 one byte off (bounce buffers)", &all_copied),
                    Bar::from_values("dd oflag=direct (same run)", &all_dd),
                ],
            )],
        )],
    };
    write_results(
        &out,
        serde_json::json!({
            "bytes": bytes,
            "rounds": rows,
            "l4_aligned_gbs": spread(&all_aligned),
            "l4_copied_gbs": spread(&all_copied),
            "dd_gbs": spread(&all_dd),
            "median_ratio_aligned": json_num(Some(a)),
            "median_ratio_copied": json_num(Some(c)),
        }),
        &figure,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
