//! The native checkpointer's side of `bench ckpt`: asking the holder program for a capture
//! and waiting for the runtime's report, the capture streamed to the store while it is
//! still being written (L2 overlapping L1), and the image files themselves.
use super::*;

/// Reads a native image file (written by the program into its L1 directory).
pub(super) fn newest_image(dir: &Path, owner: &str) -> Result<(u64, PathBuf), String> {
    let v = *ghost::native::list_versions(dir, owner)
        .map_err(|e| e.to_string())?
        .last()
        .ok_or("no image")?;
    Ok((v, ghost::native::image_path(dir, owner, v)))
}

/// Asks the native holder `pid` for a checkpoint and waits for the runtime's report of it:
/// (seconds from the request until the image file is complete, its path, the report).
pub(super) fn native_capture(
    pid: u32,
    dir: &Path,
    owner: &str,
) -> Result<(f64, PathBuf, ghost::native::CapturedFile), String> {
    let before = newest_image(dir, owner).map(|(v, _)| v).unwrap_or(0);
    let start = Instant::now();
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    loop {
        if let Some(report) = ghost::native::last_capture(dir, owner, pid as i32) {
            if report.version > before {
                let path = ghost::native::image_path(dir, owner, report.version);
                return Ok((start.elapsed().as_secs_f64(), path, report));
            }
        }
        if let Some(why) = ghost::native::capture_failure(dir, owner, pid as i32) {
            return Err(format!("native capture failed: {why}"));
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err("native capture did not finish within 300 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// One capture sent to L2 while it is copied (see [`native_capture_streamed`]).
pub(super) struct Streamed {
    /// Seconds from the request until the L1 file was complete.
    pub l1: f64,
    /// Seconds from the request until the buddy verified its copy (safe at L1 and L2).
    pub l1l2: f64,
    pub put: ckpt_store::PutReport,
    pub report: ghost::native::CapturedFile,
}

/// Asks the native holder `pid` for a checkpoint and puts its image into `store` while the
/// program's runtime copies it: the ranges its progress record reports final go to the
/// buddy at once, the rest once the file is complete.
pub(super) fn native_capture_streamed(
    pid: u32,
    dir: &Path,
    owner: &str,
    store: &Store,
) -> Result<Streamed, String> {
    use ckpt_store::Ready;
    use ghost::native::{CaptureState, ProgressView};
    let before = newest_image(dir, owner).map(|(v, _)| v).unwrap_or(0);
    let start = Instant::now();
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    let failed = || ghost::native::capture_failure(dir, owner, pid as i32);
    let (view, first) = loop {
        if let Ok(view) = ProgressView::open(dir, owner) {
            if let Some(p) = view.read(before) {
                break (view, p);
            }
        }
        if let Some(why) = failed() {
            return Err(format!("native capture failed: {why}"));
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err("native capture did not start within 300 s".into());
        }
        std::thread::sleep(Duration::from_micros(100));
    };
    let version = first.version;
    // The file under its temporary name; if the capture already renamed it, its final name.
    let path = if first.path.exists() {
        first.path.clone()
    } else {
        ghost::native::image_path(dir, owner, version)
    };
    let mut cursor = 0u64;
    let mut l1 = None;
    let mut next = || -> ckpt_store::Result<Ready> {
        let p = view
            .read(before)
            .filter(|p| p.version == version)
            .ok_or_else(|| {
                ckpt_store::StoreError::Invalid(format!("v{version}: the progress record moved on"))
            })?;
        match p.state {
            CaptureState::Failed => Err(ckpt_store::StoreError::Invalid(format!(
                "capture of v{version} failed"
            ))),
            CaptureState::Complete => {
                l1.get_or_insert(start.elapsed().as_secs_f64());
                Ok(Ready::Complete)
            }
            CaptureState::Copying => {
                for &(s, e) in &p.ranges {
                    let (a, b) = (s.max(cursor), e.min(p.watermark));
                    if a < b {
                        cursor = b;
                        return Ok(Ready::Range(a, b));
                    }
                }
                Ok(Ready::Pending)
            }
        }
    };
    // SAFETY: the runtime writes each reported range once and keeps the file's length; it
    // only renames a committed image, and rewrites a spare file only after the store let go
    // of it (one version kept at L1, see KRUN_GHOST_SPARES in `measure_size`).
    let put = unsafe {
        store.put_file_streamed(owner, version, &path, &mut next, Duration::from_secs(300))
    }
    .map_err(|e| e.to_string())?;
    let l1l2 = start.elapsed().as_secs_f64();
    let l1 = l1.unwrap_or(l1l2);
    loop {
        if let Some(report) = ghost::native::last_capture(dir, owner, pid as i32) {
            if report.version == version {
                return Ok(Streamed {
                    l1,
                    l1l2,
                    put,
                    report,
                });
            }
        }
        if let Some(why) = failed() {
            return Err(format!("native capture failed: {why}"));
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err("no capture report within 300 s".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub(super) fn map_file(path: &Path) -> Result<ghost::native::MappedFile, String> {
    ghost::native::MappedFile::open(path).map_err(|e| e.to_string())
}

/// Writes `data` over `path` in place (then cut to its length), so a file kept from an
/// earlier round reuses its pages.
pub(super) fn overwrite(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all_at(data, 0)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(data.len() as u64).map_err(|e| e.to_string())
}
