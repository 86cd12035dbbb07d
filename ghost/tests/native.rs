//! The native checkpointer end to end: a C program links libghost, registers its memory, and
//! is captured (copy-on-write), restored as a new process and rolled back in place. Its
//! per-step checksums must equal those of an uninterrupted reference run.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn target_dir() -> PathBuf {
    // tests run from <target>/<profile>/deps/
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn build_workload(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/native/workload.c");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let lib = target_dir();
    assert!(
        lib.join("libghost.so").exists(),
        "libghost.so not found in {} (run `cargo build -p ghost` first; scripts/test-all.sh does)",
        lib.display()
    );
    let bin = dir.join("workload");
    let status = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg(format!("-I{}", include.display()))
        .arg(format!("-L{}", lib.display()))
        .arg("-lghost")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .expect("cc");
    assert!(status.success(), "compiling workload.c failed");
    bin
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("krun-ghost-{tag}-{}", std::process::id()));
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

/// Kills the child on drop (by its PID) so that a failing test leaves nothing behind.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    bin: &Path,
    images: &Path,
    out: &Path,
    mib: u32,
    steps: u32,
    every: u32,
    sleep_ms: u32,
    restore: Option<&str>,
) -> Child {
    let mut cmd = Command::new(bin);
    cmd.arg(out)
        .arg(mib.to_string())
        .arg(steps.to_string())
        .arg(every.to_string())
        .arg(sleep_ms.to_string())
        .env("KRUN_GHOST_DIR", images)
        .env("KRUN_GHOST_OWNER", "test/rank0")
        .env_remove("KRUN_GHOST_RESTORE");
    if let Some(r) = restore {
        cmd.env("KRUN_GHOST_RESTORE", r);
    }
    cmd.spawn().expect("start workload")
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "workload did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// step -> checksum, asserting no step appears twice.
fn checksums(lines: &[String]) -> BTreeMap<u64, String> {
    let mut m = BTreeMap::new();
    for l in lines {
        if let Some(rest) = l.strip_prefix("step ") {
            let (s, c) = rest.split_once(" checksum ").unwrap();
            let s: u64 = s.parse().unwrap();
            assert!(
                m.insert(s, c.to_string()).is_none(),
                "step {s} printed twice"
            );
        }
    }
    m
}

fn reference(bin: &Path, dir: &Path, mib: u32, steps: u32) -> BTreeMap<u64, String> {
    let out = dir.join("reference.out");
    let images = dir.join("ref-images");
    let mut c = run(bin, &images, &out, mib, steps, 0, 0, None);
    assert!(wait_exit(&mut c, Duration::from_secs(120)).success());
    let m = checksums(&lines(&out));
    assert_eq!(m.len(), steps as usize);
    m
}

fn wait_for_line(out: &Path, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    loop {
        if let Some(l) = lines(out).into_iter().find(|l| pred(l)) {
            return l;
        }
        assert!(
            start.elapsed() < limit,
            "no matching line in {} within {limit:?}",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks a restored/rolled-back continuation: it starts right after `from_step` and every
/// checksum equals the reference.
fn assert_continues(
    reference: &BTreeMap<u64, String>,
    after: &[String],
    from_step: u64,
    last: u64,
) {
    let got = checksums(after);
    let expected: Vec<u64> = (from_step + 1..=last).collect();
    assert_eq!(
        got.keys().copied().collect::<Vec<_>>(),
        expected,
        "steps after {from_step}"
    );
    for (s, c) in &got {
        assert_eq!(
            &reference[s], c,
            "checksum of step {s} differs from the reference run"
        );
    }
}

#[test]
fn killed_process_is_restored_as_a_new_process_from_incremental_images() {
    let dir = TempDir::new("native-restore");
    let bin = build_workload(&dir.0);
    let (mib, steps) = (64, 40);
    let reference = reference(&bin, &dir.0, mib, steps);
    let images = dir.0.join("images");
    let out = dir.0.join("run.out");
    let mut first = Guard(run(&bin, &images, &out, mib, steps, 2, 30, None));
    // Wait for several images (a full one and deltas), then SIGKILL mid-run.
    wait_for_line(&out, Duration::from_secs(60), |l| l == "saved version 5");
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(first);

    let versions: Vec<String> = std::fs::read_dir(images.join("test/rank0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(versions.iter().any(|v| v.ends_with(".kgi")), "{versions:?}");

    let out2 = dir.0.join("restored.out");
    let mut second = Guard(run(&bin, &images, &out2, mib, steps, 2, 0, Some("latest")));
    assert!(wait_exit(&mut second.0, Duration::from_secs(120)).success());
    let after = lines(&out2);
    let resumed = after[0].clone();
    let parts: Vec<&str> = resumed.split(' ').collect();
    assert_eq!(parts[0], "resumed", "{resumed}");
    let version: u64 = parts[2].parse().unwrap();
    let step: u64 = parts[4].parse().unwrap();
    assert!(version >= 5, "restored from v{version}");
    assert_eq!(
        step,
        version * 2,
        "version {version} was taken at step {}",
        version * 2
    );
    assert_continues(&reference, &after, step, steps as u64);
    // The restored image was incremental (every 4th is full) at least once in this run.
    let delta_restored = !(version - 1).is_multiple_of(4);
    let first_lines = lines(&out);
    assert!(first_lines.iter().any(|l| l.starts_with("step 10 ")));
    eprintln!("restored from v{version} (incremental: {delta_restored}) at step {step}");
}

#[test]
fn sigusr2_rolls_the_live_process_back_in_place() {
    let dir = TempDir::new("native-rollback");
    let bin = build_workload(&dir.0);
    let (mib, steps) = (32, 30);
    let reference = reference(&bin, &dir.0, mib, steps);
    let images = dir.0.join("images");
    let out = dir.0.join("run.out");
    let mut child = Guard(run(&bin, &images, &out, mib, steps, 4, 40, None));
    // v3 is taken at step 12; signal a couple of steps later so the rollback goes back.
    wait_for_line(&out, Duration::from_secs(60), |l| l.starts_with("step 14 "));
    // SAFETY: signalling our own child by PID.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGUSR2) }, 0);
    assert!(wait_exit(&mut child.0, Duration::from_secs(120)).success());
    let all = lines(&out);
    let at = all
        .iter()
        .position(|l| l.starts_with("rolled back to step "))
        .expect("no rollback line");
    let back_to: u64 = all[at].rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        back_to % 4,
        0,
        "rolled back to step {back_to}, not a checkpoint step"
    );
    // Steps before the rollback line went beyond back_to; after it the run resumes at
    // back_to + 1 with the reference checksums.
    let before = checksums(&all[..at]);
    assert!(*before.keys().last().unwrap() > back_to);
    assert_continues(&reference, &all[at + 1..], back_to, steps as u64);
    assert_eq!(all.last().map(String::as_str), Some("done"));
}

#[test]
fn a_gibibyte_is_captured_while_the_program_keeps_writing() {
    let dir = TempDir::new("native-1g");
    let bin = build_workload(&dir.0);
    let (mib, steps) = (1024, 6);
    let reference = reference(&bin, &dir.0, mib, steps);
    let images = dir.0.join("images");
    let out = dir.0.join("run.out");
    let mut child = Guard(run(&bin, &images, &out, mib, 3, 3, 0, None));
    assert!(wait_exit(&mut child.0, Duration::from_secs(120)).success());
    let out2 = dir.0.join("restored.out");
    let mut restored = Guard(run(&bin, &images, &out2, mib, steps, 0, 0, Some("latest")));
    assert!(wait_exit(&mut restored.0, Duration::from_secs(120)).success());
    let after = lines(&out2);
    assert_eq!(after[0], "resumed version 1 step 3");
    assert_continues(&reference, &after, 3, steps as u64);
}

#[test]
fn restore_from_a_corrupt_image_fails_with_the_reason() {
    let dir = TempDir::new("native-corrupt");
    let bin = build_workload(&dir.0);
    let images = dir.0.join("images");
    let out = dir.0.join("run.out");
    let mut child = Guard(run(&bin, &images, &out, 4, 2, 2, 0, None));
    assert!(wait_exit(&mut child.0, Duration::from_secs(60)).success());
    let image = images.join("test/rank0/0000000001.kgi");
    let mut bytes = std::fs::read(&image).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x04;
    std::fs::write(&image, &bytes).unwrap();
    let err = Command::new(&bin)
        .args([dir.0.join("r.out").to_str().unwrap(), "4", "4", "0"])
        .env("KRUN_GHOST_DIR", &images)
        .env("KRUN_GHOST_OWNER", "test/rank0")
        .env("KRUN_GHOST_RESTORE", "1")
        .output()
        .unwrap();
    assert_eq!(err.status.code(), Some(2));
    let text = String::from_utf8_lossy(&err.stderr);
    assert!(
        text.contains("checksum mismatch") && text.contains("region 'data'"),
        "{text}"
    );
}

#[test]
fn a_fortran_program_resumes_through_the_c_abi() {
    let dir = TempDir::new("native-fortran");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = target_dir();
    let bin = dir.0.join("counter");
    // gfortran writes the module file into the current directory.
    let status = Command::new("gfortran")
        .current_dir(&dir.0)
        .arg("-O1")
        .arg(root.join("include/krun_ghost.f90"))
        .arg(root.join("tests/native/counter.f90"))
        .arg("-o")
        .arg(&bin)
        .arg(format!("-L{}", lib.display()))
        .arg("-lghost")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .expect("gfortran is required (scripts/install-deps.sh installs it)");
    assert!(status.success(), "compiling counter.f90 failed");
    let images = dir.0.join("images");
    let run = |steps: &str, restore: Option<&str>| {
        let mut cmd = Command::new(&bin);
        cmd.args([steps, "5"])
            .env("KRUN_GHOST_DIR", &images)
            .env_remove("KRUN_GHOST_OWNER");
        match restore {
            Some(r) => cmd.env("KRUN_GHOST_RESTORE", r),
            None => cmd.env_remove("KRUN_GHOST_RESTORE"),
        };
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run("8", None);
    let restored = run("8", Some("latest"));
    let lines: Vec<&str> = restored.lines().map(str::trim).collect();
    assert_eq!(lines[0], "resumed version 1 step 5");
    let expected: Vec<&str> = first.lines().map(str::trim).skip(5).collect();
    assert_eq!(&lines[1..], &expected[..], "steps 6..8 after the restore");
}

/// A capture whose image cannot be written (its directory is on a full filesystem) fails at
/// once with the process's own reason, instead of waiting out the capture timeout.
#[test]
fn a_capture_on_a_full_disk_reports_the_reason_at_once() {
    use ghost::checkpointer::{self, CaptureOptions};
    let dir = TempDir::new("native-full");
    let bin = build_workload(&dir.0);
    let images = dir.0.join("images");
    std::fs::create_dir_all(&images).unwrap();
    // A 2 MiB tmpfs for images of a 16 MiB state.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&images)
        .status()
        .unwrap()
        .success();
    assert!(
        mounted,
        "mounting a tmpfs at {} needs root",
        images.display()
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(images.clone());
    let out = dir.0.join("run.out");
    let mut child = Guard(run(&bin, &images, &out, 16, 100_000, 0, 20, None));
    let pid = child.0.id() as i32;
    wait_for_line(&out, Duration::from_secs(30), |l| l.starts_with("step 3 "));
    let cp = checkpointer::for_process(pid).unwrap();
    let Err(e) = cp.capture(pid, &dir.0.join("never.kgi"), &CaptureOptions::default()) else {
        panic!("a capture succeeded with no room for the image");
    };
    let text = e.to_string();
    assert!(text.contains("could not write its image"), "{text}");
    assert!(text.contains("No space left on device"), "{text}");
    let _ = child.0.kill();
    let _ = child.0.wait();
}

/// The uniform API from outside the process: capture a live native process into one image,
/// restore it as a new process under another owner, and roll the original back in place.
#[test]
fn uniform_api_captures_restores_and_rolls_back_a_live_native_process() {
    use ghost::checkpointer::{self, CaptureOptions, RestoreOptions};
    let dir = TempDir::new("native-uniform");
    let bin = build_workload(&dir.0);
    let (mib, steps) = (16, 300);
    let reference = reference(&bin, &dir.0, mib, steps);
    let images = dir.0.join("images");
    let out = dir.0.join("run.out");
    let mut child = Guard(run(&bin, &images, &out, mib, steps, 0, 20, None));
    let pid = child.0.id() as i32;
    wait_for_line(&out, Duration::from_secs(30), |l| l.starts_with("step 3 "));

    let cp = checkpointer::for_process(pid).unwrap();
    assert_eq!(cp.backend(), ghost::Backend::Native);
    let image = dir.0.join("captured.kgi");
    let captured = cp.capture(pid, &image, &CaptureOptions::default()).unwrap();
    assert!(captured.image_bytes > (mib as u64) << 20);
    let report = checkpointer::inspect(&image).unwrap();
    assert!(
        report.contains("checksums OK") && report.contains("backend       native"),
        "{report}"
    );
    let parsed_bytes = std::fs::read(&image).unwrap();
    let parsed = ghost::image::Image::parse(&parsed_bytes).unwrap();
    let captured_step: u64 = {
        let state = parsed.region("state").unwrap().data().unwrap();
        u64::from_le_bytes(state[..8].try_into().unwrap())
    };
    assert!(captured_step >= 3);

    // Restore as a new process (another owner, so it does not share the original's images);
    // it appends to the same output file, after a "resumed" line.
    let restore_dir = dir.0.join("restore");
    let restored = checkpointer::for_image(&image)
        .unwrap()
        .restore(
            &image,
            &RestoreOptions {
                workdir: Some(restore_dir.clone()),
                owner: Some("test/copy".into()),
                output: Some(dir.0.join("restored.stderr")),
            },
        )
        .unwrap();
    assert_ne!(restored.pid, pid);
    let resumed = format!("resumed version 1 step {captured_step}");
    wait_for_line(&out, Duration::from_secs(30), |l| l == resumed);
    // SAFETY: ending the restored process we started, by PID.
    unsafe { libc::kill(restored.pid, libc::SIGKILL) };

    // Roll the original back to the captured image; its next steps follow the image.
    let later = wait_for_line(&out, Duration::from_secs(30), |l| l.starts_with("step 20 "));
    assert!(!later.is_empty());
    cp.rollback(pid, &image, &RestoreOptions::default())
        .unwrap();
    assert!(wait_exit(&mut child.0, Duration::from_secs(60)).success());
    let all = lines(&out);
    let at = all
        .iter()
        .position(|l| l.starts_with("rolled back to step "))
        .unwrap();
    assert_eq!(all[at], format!("rolled back to step {captured_step}"));
    let after: Vec<String> = all[at + 1..]
        .iter()
        .filter(|l| !l.starts_with("resumed"))
        .cloned()
        .collect();
    // Lines of the restored copy may interleave before it was killed; keep the original's
    // continuation: the first run of consecutive steps from captured_step + 1.
    let mut expect = captured_step + 1;
    for l in after.iter().filter(|l| l.starts_with("step ")) {
        let (s, c) = l["step ".len()..].split_once(" checksum ").unwrap();
        let s: u64 = s.parse().unwrap();
        if s == expect {
            assert_eq!(reference[&s], c, "step {s} after the rollback");
            expect += 1;
        }
    }
    assert_eq!(
        expect,
        steps as u64 + 1,
        "the rolled-back run reached the last step"
    );
}

/// Old image files are recycled as spares (rewritten in place for their memory) only when no
/// krund maps them: under a krund (`KRUN_NODE_SOCKET` set) the checkpoint agent maps committed
/// images as the store's L1 copy, so they are unlinked instead.
#[test]
fn image_files_are_never_recycled_under_a_krund() {
    let dir = TempDir::new("native-spares");
    let bin = build_workload(&dir.0);
    let spares_after = |tag: &str, under_krund: bool| -> (usize, usize) {
        let images = dir.0.join(format!("images-{tag}"));
        let out = dir.0.join(format!("{tag}.out"));
        let mut cmd = Command::new(&bin);
        cmd.arg(&out)
            .args(["4", "12", "2", "0"])
            .env("KRUN_GHOST_DIR", &images)
            .env("KRUN_GHOST_OWNER", "test/rank0")
            .env("KRUN_GHOST_FULL_EVERY", "1")
            .env_remove("KRUN_GHOST_RESTORE")
            .env_remove("KRUN_GHOST_SPARES")
            .env_remove("KRUN_NODE_SOCKET");
        if under_krund {
            cmd.env("KRUN_NODE_SOCKET", dir.0.join("no-such-socket"));
        }
        let mut child = Guard(cmd.spawn().expect("start workload"));
        assert!(wait_exit(&mut child.0, Duration::from_secs(120)).success());
        let names: Vec<String> = std::fs::read_dir(images.join("test/rank0"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        // A spare is kept as `.spare-V`, or already readied for the next capture as
        // `.tmp-PID-next`.
        let spares = names
            .iter()
            .filter(|n| {
                n.starts_with(".spare-") || (n.starts_with(".tmp-") && n.ends_with("-next"))
            })
            .count();
        let kept = names.iter().filter(|n| n.ends_with(".kgi")).count();
        (spares, kept)
    };
    let (spares, kept) = spares_after("plain", false);
    assert!(spares > 0, "without a krund old images become spares");
    assert!(kept >= 1);
    let (spares, kept) = spares_after("krund", true);
    assert_eq!(spares, 0, "under a krund no image file is recycled");
    assert!(kept >= 1);
}

#[test]
fn a_full_image_on_tmpfs_is_restored_by_mapping_its_pages_and_the_program_goes_on_exactly() {
    let dir = TempDir::new("native-mapped");
    let bin = build_workload(&dir.0);
    let (mib, steps) = (16, 30);
    let reference = reference(&bin, &dir.0, mib, steps);
    // Images on tmpfs, every one full: the restore maps the region pages from the file.
    let images = PathBuf::from(format!("/dev/shm/krun-ghost-mapped-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&images);
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(images.clone());
    let start = |out: &Path, sleep_ms: u32, restore: Option<&str>| {
        let mut cmd = Command::new(&bin);
        cmd.arg(out)
            .arg(mib.to_string())
            .arg(steps.to_string())
            .arg("2")
            .arg(sleep_ms.to_string())
            .env("KRUN_GHOST_DIR", &images)
            .env("KRUN_GHOST_OWNER", "test/rank0")
            .env("KRUN_GHOST_FULL_EVERY", "1")
            .env_remove("KRUN_GHOST_RESTORE");
        if let Some(r) = restore {
            cmd.env("KRUN_GHOST_RESTORE", r);
        }
        Guard(cmd.spawn().expect("start workload"))
    };
    let out = dir.0.join("run.out");
    let mut first = start(&out, 30, None);
    wait_for_line(&out, Duration::from_secs(60), |l| l == "saved version 4");
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    drop(first);

    let out2 = dir.0.join("restored.out");
    let mut second = start(&out2, 40, Some("latest"));
    let resumed = wait_for_line(&out2, Duration::from_secs(60), |l| l.starts_with("resumed"));
    let version: u64 = resumed.split(' ').nth(2).unwrap().parse().unwrap();
    let step: u64 = resumed.split(' ').nth(4).unwrap().parse().unwrap();
    // The restored regions are mappings of the image file, not copies.
    let image = images.join(format!("test/rank0/{version:010}.kgi"));
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", second.0.id())).unwrap();
    let mapped: Vec<&str> = maps
        .lines()
        .filter(|l| l.contains(image.to_str().unwrap()))
        .collect();
    assert!(
        mapped.len() >= 2,
        "the 'state' and 'data' regions are not mapped from {}:\n{maps}",
        image.display()
    );
    // It goes on writing them (copy-on-write), is captured from them (write-protect faults
    // on the mapping) and prunes old images (the mapped one is never rewritten as a spare):
    // every checksum equals the uninterrupted run's.
    assert!(wait_exit(&mut second.0, Duration::from_secs(120)).success());
    let after = lines(&out2);
    assert_continues(&reference, &after, step, steps as u64);
    assert!(
        after
            .iter()
            .filter_map(|l| l.strip_prefix("saved version "))
            .any(|v| v.parse::<u64>().unwrap() > version + 1),
        "no capture of the restored program completed: {after:?}"
    );
}
