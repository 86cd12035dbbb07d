//! What the launcher's job tests share: the target directory, temporary job directories,
//! a krun that is ended when the test ends, building the C heat stencil against libkrun.so,
//! krun's environment for a local job, and reading `krun status`, checksums, the serial
//! reference and the decisions log.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// `target/<profile>`: tests run from `target/<profile>/deps`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Ends the job (SIGTERM to the krun we started; SIGKILL if it has not ended in 30 s).
pub struct Job(pub Child);

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn build_heat(out: &Path) -> PathBuf {
    let lib = target_dir();
    assert!(
        lib.join("libkrun.so").exists(),
        "libkrun.so not found in {} (cargo build -p rank first)",
        lib.display()
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rank/examples/c");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", lib.display()))
        .arg(format!("OUT={}", out.display()))
        .output()
        .expect("make (build-essential)");
    assert!(
        o.status.success(),
        "building the examples: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out.join("heat")
}

pub fn krun(dir: &Path) -> Command {
    let mut c = Command::new(target_dir().join("krun"));
    c.env("XDG_RUNTIME_DIR", dir.join("xdg"))
        .env("KRUN_GHOST_DIR", dir.join("ghost"))
        .env_remove("KRUN_GHOST_OWNER")
        .env("KRUN_RECV_TIMEOUT_MS", "60000")
        .env("KRUN_STORE_ARENA_MIB", "16")
        .env_remove("KRUN_GHOST_RESTORE")
        .env_remove("KRUN_STORE_LEVEL")
        .env_remove("KRUN_STORE_DISK");
    c
}

pub fn status(dir: &Path) -> Option<serde_json::Value> {
    let o = krun(dir).args(["status", "--json"]).output().ok()?;
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// The version of `rank` the table shows safe at L2, if any.
pub fn safe_at_l2(s: &serde_json::Value, rank: u64) -> Option<u64> {
    s["status"]["ranks"].as_array()?.iter().find_map(|r| {
        let ck = &r["checkpoint"];
        let levels: Vec<u64> = ck["safe_levels"]
            .as_array()?
            .iter()
            .filter_map(|l| l.as_u64())
            .collect();
        (r["rank"].as_u64()? == rank && levels.contains(&2)).then(|| ck["version"].as_u64())?
    })
}

pub fn checksum(t: &str) -> Option<String> {
    t.lines()
        .find_map(|l| l.split("checksum ").nth(1))
        .map(str::to_string)
}

pub fn serial(dir: &Path, args: &[&str]) -> String {
    let o = Command::new(dir.join("heat_serial"))
        .args(args)
        .output()
        .unwrap();
    checksum(&String::from_utf8_lossy(&o.stdout)).expect("serial checksum")
}

/// Processes still running the test's own heat binary.
pub fn heat_left(heat: &Path) -> Vec<u32> {
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == heat) {
            left.push(pid);
        }
    }
    left
}

pub fn decisions(dir: &Path) -> Option<String> {
    for e in std::fs::read_dir(dir.join("xdg/krun")).ok()?.flatten() {
        if let Ok(t) = std::fs::read_to_string(e.path().join("decisions.log")) {
            return Some(t);
        }
    }
    None
}

/// Runs `krun ARGS` (the krun and krund of this build) to its end: exit code, stdout, stderr.
pub fn run_krun(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_krun"))
        .args(args)
        .env("KRUN_KRUND", env!("CARGO_BIN_EXE_krund"))
        .output()
        .expect("krun runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
