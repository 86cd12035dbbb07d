//! `bench ckpt`: checkpoint and restore of 1 GiB and 4 GiB processes, against plain
//! `criu dump`/`criu restore` to disk, `dd oflag=direct`, memcpy and the fabric's RMA write
//! bandwidth, all measured in the same run.
//!
//! Every row is measured in 3 rounds (the first one on fresh memory, the next ones reusing
//! it, as a long job does) and reported as median, min and max. Native captures of the
//! same program are 1 s apart, as a job's checkpoints are (the runtime readies the next
//! image file in between).
//!
//! Rows (seconds for the whole operation, GB/s = image bytes / seconds):
//! - `criu-dump-disk`, `criu-restore-disk`: the CRIU command line, images in a disk
//!   directory; dump includes `sync`, restore starts after dropping the page cache.
//! - `criu-l1l2`, `criu-l4`: our CRIU backend (RPC), then the store's L2 (buddy memory in a
//!   second process over libfabric tcp) or L4 (io_uring O_DIRECT).
//! - `native-l1l2`: from the checkpoint request (SIGUSR1) until the image is safe at L1 and
//!   L2: native capture (copy-on-write into the L1 image file, complete under its final
//!   name) overlapped with the streamed put of that file (`put_file_streamed`: the store maps
//!   the file while it is filled and RMA-writes each range the capture's progress record
//!   reports final; the header and checksums follow at the end) until the buddy verified
//!   its copy; `native-l1`: request to complete L1 file; `native-l2`: what L2 adds after
//!   L1 is complete (the rest of the transfer and the buddy's check), not a bandwidth;
//!   `native-l4`: native capture plus L4.
//! - `native-freeze`: how long the program was stopped by each capture (the runtime's own
//!   measure from its `captured` report file: the safepoint's freeze, L1 file set-up and
//!   write-protection included; the copy runs after the program resumed).
//! - `restore-l2`, `restore-l4`: fetch the image from L2 (RMA read from the buddy straight
//!   into the restore's image file) or L4, and start the program from it until it reports it
//!   resumed.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_store::disk::DiskLevel;
use ckpt_store::{Level, NodeInfo, Store, StoreConfig};
use fabric::bootstrap::{BootstrapClient, BootstrapServer};
use fabric::secret::ClusterSecret;
use fabric::{open, EndpointAddress, FabricConfig, Provider};
use ghost::checkpointer::{CaptureOptions, Checkpointer};
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{json_num, median, results_path, write_results, Table};

mod holder;
mod native;
mod references;
use holder::{start_and_wait, start_holder, Holder};
use native::{map_file, native_capture, native_capture_streamed, overwrite};
use references::{dd_direct_gbs, memcpy_gbs, rma_gbs, RmaShape};

const WORK: &str = "/var/tmp/krun-bench-ckpt";
const SHM: &str = "/dev/shm/krun-bench-ckpt";
/// Rounds per measurement, at every size (median, min and max are reported).
const ROUNDS: usize = 3;
/// Between two native captures of the same program (a job's checkpoint interval is seconds
/// or more; the time is not part of any row).
const GAP: Duration = Duration::from_secs(1);

fn sh(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn target_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("locating bench: {e}"))?;
    Ok(exe.parent().ok_or("bench has no directory")?.to_path_buf())
}

fn compile(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = target_dir()?;
    if !lib.join("libghost.so").exists() {
        return Err(format!(
            "{} missing: cargo build --release -p ghost",
            lib.join("libghost.so").display()
        ));
    }
    let holder = dir.join("holder");
    sh(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&holder)
            .arg(root.join("c/holder.c")),
        "compiling holder.c",
    )?;
    let native = dir.join("native_holder");
    sh(
        Command::new("cc")
            .args(["-O2", "-o"])
            .arg(&native)
            .arg(root.join("c/native_holder.c"))
            .arg(format!("-I{}", root.join("../ghost/include").display()))
            .arg(format!("-L{}", lib.display()))
            .arg("-lghost")
            .arg(format!("-Wl,-rpath,{}", lib.display())),
        "compiling native_holder.c",
    )?;
    Ok((holder, native))
}

/// MiB of memory available (`MemAvailable`), for the log of each phase.
fn available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| kib >> 10)
        .unwrap_or(0)
}

/// Node 0 of a two-node store in this process; node 1 is a `krun-store` child process.
struct Stores {
    local: Store,
    _remote: Holder,
}

fn start_stores(arena: usize) -> Result<Stores, String> {
    let secret = ClusterSecret::random().map_err(|e| e.to_string())?;
    let server = BootstrapServer::start_with(
        "127.0.0.1:0",
        2,
        Duration::from_secs(30),
        Some(secret.clone()),
    )
    .map_err(|e| e.to_string())?;
    let bin = target_dir()?.join("krun-store");
    let remote = Command::new(&bin)
        .args([
            "--bootstrap",
            &server.addr().to_string(),
            "--rank",
            "1",
            "--size",
            "2",
        ])
        .args([
            "--provider",
            "tcp",
            "--arena-mib",
            &(arena >> 20).to_string(),
        ])
        .env("KRUN_SECRET", secret.to_hex())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let remote = Holder::of(remote);
    let ep = open(&FabricConfig::with_provider(Provider::Tcp)).map_err(|e| e.to_string())?;
    let mut boot =
        BootstrapClient::connect_with(server.addr(), 0, 2, Duration::from_secs(30), Some(&secret))
            .map_err(|e| e.to_string())?;
    let mut blob = 0u32.to_le_bytes().to_vec();
    blob.extend_from_slice(&ep.address().to_bytes());
    let all = boot.allgather(&blob).map_err(|e| e.to_string())?;
    let nodes = all
        .iter()
        .map(|b| {
            Ok(NodeInfo {
                group: u32::from_le_bytes(b[..4].try_into().map_err(|_| "short blob")?),
                address: EndpointAddress::from_bytes(&b[4..]).map_err(|e| e.to_string())?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let local = Store::start(
        ep,
        StoreConfig {
            node: 0,
            nodes,
            arena_bytes: 1 << 20,
            disk: None,
            keep: 1,
            parity_set: 0,
            secret,
            request_timeout: Duration::from_secs(60),
        },
    )
    .map_err(|e| e.to_string())?;
    boot.barrier().map_err(|e| e.to_string())?;
    Ok(Stores {
        local,
        _remote: remote,
    })
}

/// One measurement at one size: the seconds of every round.
struct Row {
    what: &'static str,
    gib: u64,
    runs: Vec<f64>,
    bytes: u64,
}

impl Row {
    fn median(&self) -> f64 {
        median(&self.runs).unwrap_or(f64::NAN)
    }
    fn min(&self) -> f64 {
        self.runs.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.runs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Records one round's `seconds` of `what`.
fn row(rows: &mut Vec<Row>, what: &'static str, gib: u64, round: usize, seconds: f64, bytes: u64) {
    println!(
        "  {what:<18} {gib} GiB  round {round}  {seconds:>8.4} s  {:>6.2} GB/s",
        bytes as f64 / seconds / 1e9,
    );
    match rows.iter_mut().find(|r| r.what == what && r.gib == gib) {
        Some(r) => {
            r.runs.push(seconds);
            r.bytes = bytes;
        }
        None => rows.push(Row {
            what,
            gib,
            runs: vec![seconds],
            bytes,
        }),
    }
}

fn measure_size(gib: u64, holder: &Path, native: &Path, rows: &mut Vec<Row>) -> Result<(), String> {
    // The buddy's arena holds two copies: a version is sent while the previous one is kept.
    let arena = ((gib << 30) * 2 + (256 << 20)) as usize;
    let mib = (gib << 10).to_string();
    let disk_dir = PathBuf::from(WORK).join("disk");
    let _ = std::fs::remove_dir_all(&disk_dir);
    let disk = DiskLevel::open(&disk_dir).map_err(|e| e.to_string())?;

    // --- CRIU reference: the command line to disk (the tool a user would pick otherwise).
    let criu = ghost::criu::Criu::locate().map_err(|e| e.to_string())?;
    for round in 1..=ROUNDS {
        let (p, pid) = start_holder(holder, &mib)?;
        let img = PathBuf::from(WORK).join(format!("criu-{gib}"));
        let _ = std::fs::remove_dir_all(&img);
        std::fs::create_dir_all(&img).map_err(|e| e.to_string())?;
        let start = Instant::now();
        sh(
            Command::new(&criu.binary)
                .args(["dump", "-t", &pid.to_string(), "-D"])
                .arg(&img)
                .args(["-o", "dump.log"]),
            "criu dump",
        )?;
        sh(&mut Command::new("sync"), "sync")?;
        let dump = start.elapsed().as_secs_f64();
        let bytes = dir_bytes(&img);
        drop(p);
        drop_caches();
        let pidfile = PathBuf::from(WORK).join("criu.pid");
        let _ = std::fs::remove_file(&pidfile);
        let start = Instant::now();
        let restored = sh(
            Command::new(&criu.binary)
                .args(["restore", "-d", "-D"])
                .arg(&img)
                .args(["-o", "restore.log", "--pidfile"])
                .arg(&pidfile),
            "criu restore",
        );
        let restore = start.elapsed().as_secs_f64();
        // The restored copy of our subject is ended with the guard, whatever happens next.
        let mut copy = Holder::none();
        if let Some(rpid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            copy.adopt(rpid)?;
        }
        restored?;
        row(rows, "criu-dump-disk", gib, round, dump, bytes);
        row(rows, "criu-restore-disk", gib, round, restore, bytes);
        drop(copy);
        let _ = std::fs::remove_dir_all(&img);
    }

    println!(
        "  ({} MiB available after the CRIU reference)",
        available_mib()
    );
    // --- Our CRIU backend to L1+L2 and to L4.
    {
        let (p, pid) = start_holder(holder, &mib)?;
        let cp = ghost::criu::CriuCheckpointer::locate().map_err(|e| e.to_string())?;
        let stores = start_stores(arena)?;
        let image = PathBuf::from(SHM).join("criu.kgi");
        for round in 1..=ROUNDS {
            // The previous round's version is safe at L2: its L1 copy (the mapped file that
            // the capture below renames over) goes now, so its memory is not held beside
            // the new image (at 4 GiB: 4 GiB less at the peak of the round).
            if round > 1 {
                stores.local.forget_local("bench/criu", round as u64 - 1);
            }
            let start = Instant::now();
            cp.capture(pid as i32, &image, &CaptureOptions::default())
                .map_err(|e| e.to_string())?;
            // SAFETY: each capture writes a new file and renames it over `image`: the file
            // the store maps is never rewritten or truncated.
            let put = unsafe { stores.local.put_file("bench/criu", round as u64, &image) }
                .map_err(|e| e.to_string())?;
            stores
                .local
                .wait_safe(
                    "bench/criu",
                    round as u64,
                    Level::L2,
                    Duration::from_secs(300),
                )
                .map_err(|e| e.to_string())?;
            row(
                rows,
                "criu-l1l2",
                gib,
                round,
                start.elapsed().as_secs_f64(),
                put.bytes,
            );
        }
        drop(stores);
        for round in 1..=ROUNDS {
            let start = Instant::now();
            cp.capture(pid as i32, &image, &CaptureOptions::default())
                .map_err(|e| e.to_string())?;
            let data = map_file(&image)?;
            disk.write("bench/criu", round as u64, &data)
                .map_err(|e| e.to_string())?;
            row(
                rows,
                "criu-l4",
                gib,
                round,
                start.elapsed().as_secs_f64(),
                data.len() as u64,
            );
        }
        let _ = std::fs::remove_file(&image);
        for round in 1..=ROUNDS {
            let _ = disk.remove("bench/criu", round as u64);
        }
        // The guard ends the subject (PID 1 of its own namespace) and `unshare`.
        drop(p);
    }

    println!(
        "  ({} MiB available after the CRIU backend)",
        available_mib()
    );
    // --- Native backend.
    let l1 = PathBuf::from(SHM).join("l1");
    let _ = std::fs::remove_dir_all(&l1);
    let owner = "bench/native";
    let (p, _out) = start_and_wait(
        Command::new(native)
            .arg(&mib)
            .env("KRUN_GHOST_DIR", &l1)
            .env("KRUN_GHOST_OWNER", owner)
            .env("KRUN_GHOST_FULL_EVERY", "1")
            // One spare image file: the capture after next rewrites it in place. By then
            // the store no longer maps it (it keeps one version at L1), as put_file needs.
            .env("KRUN_GHOST_SPARES", "1")
            .env_remove("KRUN_GHOST_RESTORE"),
        "ready",
    )?;
    let stores = start_stores(arena)?;
    // Buffers, arena space and image files are reused from the second round on, as in a
    // long job (fresh memory costs ~5x reused memory on these machines; see DESIGN.md).
    let mut version = 0;
    for round in 1..=ROUNDS {
        if round > 1 {
            // Checkpoints of a job are apart: the program computes in between while the
            // runtime readies the next image file (not during the next freeze).
            std::thread::sleep(GAP);
        }
        // Capture to L1 (into the mapped image file, copy-on-write) and L2 from the file's
        // own pages as they become final (the capture's progress record): L2 overlaps L1.
        let c = native_capture_streamed(p.id(), &l1, owner, &stores.local)?;
        version = c.report.version;
        let bytes = c.put.bytes;
        row(rows, "native-l1l2", gib, round, c.l1l2, bytes);
        // What L2 adds after L1 is complete (the rest of the transfer, the buddy's check).
        row(rows, "native-l2", gib, round, c.l1l2 - c.l1, bytes);
        row(rows, "native-l1", gib, round, c.l1, bytes);
        row(
            rows,
            "native-freeze",
            gib,
            round,
            c.report.freeze.as_secs_f64(),
            bytes,
        );
        println!(
            "  (capture v{}: freeze {:.2} ms, {} chunks copied on write, capture {:.3} s inside the program, {:.0} MiB available)",
            c.report.version,
            c.report.freeze.as_secs_f64() * 1e3,
            c.report.cow_chunks,
            c.report.total.as_secs_f64(),
            available_mib()
        );
    }
    for round in 1..=ROUNDS {
        let (capture4, path4, _) = native_capture(p.id(), &l1, owner)?;
        let data = map_file(&path4)?;
        let start = Instant::now();
        disk.write(owner, version, &data)
            .map_err(|e| e.to_string())?;
        row(
            rows,
            "native-l4",
            gib,
            round,
            capture4 + start.elapsed().as_secs_f64(),
            data.len() as u64,
        );
    }
    drop(p);
    // The holder's L1 files are not needed any more (the store maps the one it keeps): their
    // memory goes back before the restores.
    let _ = std::fs::remove_dir_all(&l1);

    // Restores: from the buddy's memory (RMA read) and from disk, until the program resumed.
    let restore_dir = PathBuf::from(SHM).join("restore");
    let _ = std::fs::remove_dir_all(&restore_dir);
    // Without the local L1 copy, the image comes from node 1's memory.
    stores.local.forget_local(owner, version);
    println!("  ({} MiB available before the restores)", available_mib());
    for (what, from_l2) in [("restore-l2", true), ("restore-l4", false)] {
        for round in 1..=ROUNDS {
            if !from_l2 {
                drop_caches();
            }
            let start = Instant::now();
            let (v, bytes) = if from_l2 {
                let tmp = restore_dir.join(owner).join(".fetch");
                std::fs::create_dir_all(restore_dir.join(owner)).map_err(|e| e.to_string())?;
                let report = stores
                    .local
                    .get_to_file(owner, version, &tmp)
                    .map_err(|e| e.to_string())?;
                if report.level != Level::L2 {
                    return Err(format!("expected an L2 copy, got {}", report.level));
                }
                let (v, _) = ghost::native::read_header(&tmp).map_err(|e| e.to_string())?;
                let dest = ghost::native::image_path(&restore_dir, owner, v);
                std::fs::rename(&tmp, &dest).map_err(|e| e.to_string())?;
                let len = std::fs::metadata(&dest).map_err(|e| e.to_string())?.len();
                (v, len)
            } else {
                let d = disk.read(owner, version).map_err(|e| e.to_string())?;
                let v = ghost::image::Image::parse(&d)
                    .map_err(|e| e.to_string())?
                    .image_id;
                overwrite(&ghost::native::image_path(&restore_dir, owner, v), &d)?;
                (v, d.len() as u64)
            };
            let (r, _out) = start_and_wait(
                Command::new(native)
                    .arg(&mib)
                    .env("KRUN_GHOST_DIR", &restore_dir)
                    .env("KRUN_GHOST_OWNER", owner)
                    .env("KRUN_GHOST_RESTORE", v.to_string()),
                "resumed",
            )?;
            row(rows, what, gib, round, start.elapsed().as_secs_f64(), bytes);
            drop(r);
        }
    }
    let _ = std::fs::remove_dir_all(&restore_dir);
    let _ = std::fs::remove_dir_all(&disk_dir);
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Checkpoint/restore of 1 and 4 GiB, criu dump/restore against our CRIU and
/// native captures to L1+L2 and L4, restores from L2 and L4, with dd, memcpy and RMA write
/// references; writes bench/results/ckpt.json (root; needs CRIU from scripts/build-criu.sh).
#[derive(Debug, clap::Args)]
pub struct CkptArgs {
    /// Sizes in GiB, comma-separated.
    #[arg(long, default_value = "1,4")]
    pub sizes: String,
    /// Where to write the JSON (default bench/results/ckpt.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
}

pub fn run(args: CkptArgs) -> Result<(), String> {
    let sizes: Vec<u64> = args
        .sizes
        .split(',')
        .map(|s| {
            s.parse()
                .map_err(|_| format!("--sizes: '{s}' is not a number of GiB"))
        })
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(WORK).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(SHM).map_err(|e| e.to_string())?;
    let (holder, native) = compile(Path::new(WORK))?;
    println!("references (1 GiB):");
    let dd = dd_direct_gbs(1)?;
    let memcpy = memcpy_gbs(1);
    // The fabric to another process, at the streamed put's shape and at the store's
    // earlier one (8 MiB, 8 in flight); the best write is the L2 reference.
    let shapes = rma_gbs(
        1,
        &[
            (ckpt_store::PIPE_CHUNK, ckpt_store::PIPE_WINDOW),
            (8 << 20, 8),
            (1 << 20, 16),
        ],
    )?;
    println!("  dd oflag=direct {dd:.2} GB/s, memcpy {memcpy:.2} GB/s");
    for s in &shapes {
        println!(
            "  RMA over tcp to another process, {} MiB x {} in flight: write {:.2} GB/s, read {:.2} GB/s",
            s.chunk >> 20,
            s.window,
            s.write_gbs,
            s.read_gbs
        );
    }
    let rma = shapes.iter().map(|s| s.write_gbs).fold(0.0, f64::max);
    let out = args.out.clone().unwrap_or_else(|| results_path("ckpt"));
    let refs = References {
        dd,
        memcpy,
        rma,
        shapes,
    };
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    // Written after every size: a size the machine cannot hold (the kernel's OOM killer ends
    // the bench) stays listed under "unfinished_gib" beside the sizes that finished.
    for (i, &gib) in sizes.iter().enumerate() {
        println!("{gib} GiB:");
        if let Err(e) = measure_size(gib, &holder, &native, &mut rows) {
            println!("  {gib} GiB failed: {e}");
            failed.push(json!({"size_gib": gib, "error": e}));
        }
        save(&out, &sizes[i + 1..], &sizes, &rows, &failed, &refs)?;
    }
    // The images (several GiB) go too: the next run recompiles the holders.
    let _ = std::fs::remove_dir_all(SHM);
    let _ = std::fs::remove_dir_all(WORK);
    let mut table = Table::new(&["what", "GiB", "median s", "min s", "max s", "GB/s"]);
    for r in &rows {
        table.row(vec![
            r.what.to_string(),
            r.gib.to_string(),
            format!("{:.4}", r.median()),
            format!("{:.4}", r.min()),
            format!("{:.4}", r.max()),
            format!("{:.2}", r.bytes as f64 / r.median() / 1e9),
        ]);
    }
    println!("\n{}", table.render());
    let find = |what: &str, gib: u64| rows.iter().find(|r| r.what == what && r.gib == gib);
    for &gib in &sizes {
        let ratio = |a: &str, b: &str| Some(find(b, gib)?.median() / find(a, gib)?.median());
        let bw = |a: &str| find(a, gib).map(|r| r.bytes as f64 / r.median() / 1e9);
        println!(
            "{gib} GiB targets (medians): L4 write {:.2}x dd (>= 0.9) | L1+L2 end to end {:.2}x RMA (L2 overlaps L1; >= 0.8) | native L1+L2 {:.2}x faster than criu dump (>= 3) | restore L2 {:.2}x faster than criu restore (>= 3) | freeze {:.2} ms per GiB (<= 10)",
            bw("native-l4").unwrap_or(0.0) / dd,
            bw("native-l1l2").unwrap_or(0.0) / rma,
            ratio("native-l1l2", "criu-dump-disk").unwrap_or(0.0),
            ratio("restore-l2", "criu-restore-disk").unwrap_or(0.0),
            find("native-freeze", gib).map(|r| r.median() * 1e3 / gib as f64).unwrap_or(f64::NAN),
        );
    }
    println!("wrote {} and its .png", out.display());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} size(s) failed (see {})",
            failed.len(),
            out.display()
        ))
    }
}

/// The references measured at the start of the run.
struct References {
    dd: f64,
    memcpy: f64,
    /// The best RMA write bandwidth of `shapes`.
    rma: f64,
    shapes: Vec<RmaShape>,
}

/// Writes `ckpt.json` and `ckpt.png` for the rows measured so far.
fn save(
    out: &Path,
    unfinished: &[u64],
    sizes: &[u64],
    rows: &[Row],
    failed: &[serde_json::Value],
    refs: &References,
) -> Result<(), String> {
    let find = |what: &str, gib: u64| rows.iter().find(|r| r.what == what && r.gib == gib);
    let json_rows: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({"what": r.what, "size_gib": r.gib, "seconds": json_num(Some(r.median())),
                   "min_seconds": json_num(Some(r.min())), "max_seconds": json_num(Some(r.max())),
                   "runs_seconds": r.runs.iter().map(|&x| json_num(Some(x))).collect::<Vec<_>>(),
                   "gbs": json_num(Some(r.bytes as f64 / r.median() / 1e9)), "bytes": r.bytes})
        })
        .collect();
    let mut capture = Vec::new();
    let mut restore = Vec::new();
    let mut freeze = Vec::new();
    for &gib in sizes {
        freeze.push(Group::new(
            format!("{gib} GiB"),
            [find("native-freeze", gib).and_then(|r| {
                let ms: Vec<f64> = r.runs.iter().map(|s| s * 1e3).collect();
                Bar::from_values("native freeze (program stopped)", &ms)
            })],
        ));
        let bar = |what: &str, series: &str| {
            find(what, gib).and_then(|r| Bar::from_values(series, &r.runs))
        };
        capture.push(Group::new(
            format!("{gib} GiB"),
            [
                bar("criu-dump-disk", "criu dump to disk (reference)"),
                bar("native-l1l2", "native L1+L2"),
                bar("native-l1", "native L1"),
                bar("native-l2", "native L2"),
                bar("native-l4", "native L4"),
                bar("criu-l1l2", "criu backend L1+L2"),
                bar("criu-l4", "criu backend L4"),
            ],
        ));
        restore.push(Group::new(
            format!("{gib} GiB"),
            [
                bar("criu-restore-disk", "criu restore from disk (reference)"),
                bar("restore-l2", "restore from L2"),
                bar("restore-l4", "restore from L4"),
            ],
        ));
    }
    let figure = Figure {
        title: "bench ckpt: native checkpoint/restore against CRIU (same run)".into(),
        note: format!(
            "median of {ROUNDS} rounds (the first on fresh memory), whiskers min and max; \
             native L1+L2 = request until safe at L1 and L2"
        ),
        panels: vec![
            Panel::new("capture (lower is better)", "seconds", capture),
            Panel::new("restore (lower is better)", "seconds", restore),
            Panel::new("freeze (target <= 10 ms per GiB)", "milliseconds", freeze),
        ],
    };
    let value = json!({
        "sizes_gib": sizes,
        "unfinished_gib": unfinished,
        "failed": failed,
        "rows": json_rows,
        "reference": {"dd_direct_gbs": json_num(Some(refs.dd)), "memcpy_gbs": json_num(Some(refs.memcpy)),
                      "rma_write_gbs": json_num(Some(refs.rma)),
                      "rma_tcp_to_another_process": refs.shapes.iter().map(|s| json!({
                          "chunk_bytes": s.chunk, "in_flight": s.window,
                          "write_gbs": json_num(Some(s.write_gbs)), "read_gbs": json_num(Some(s.read_gbs))
                      })).collect::<Vec<_>>()}
    });
    write_results(out, value, &figure)?;
    Ok(())
}
