//! One checkpointer API over several checkpointers: callers capture, restore, roll back and
//! migrate processes without knowing whether CRIU or the native runtime did the work.
//!
//! A capture always produces one self-contained, verifiable ghost image file: the native
//! backend consolidates an incremental chain into a full image; the CRIU backend packs its
//! image directory into sections.
use crate::error::{GhostError, Result};
use crate::image::{self, Image, ImageBuilder, SectionKind};
use crate::native::{self, unhex};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which checkpointer made an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Transparent capture of unmodified programs through CRIU.
    Criu,
    /// Programs linked with libghost that register their memory.
    Native,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Criu => "criu",
            Backend::Native => "native",
        }
    }

    pub fn parse(text: &str) -> Result<Backend> {
        match text {
            "criu" => Ok(Backend::Criu),
            "native" => Ok(Backend::Native),
            other => Err(GhostError::Invalid(format!(
                "unknown checkpointer '{other}' (expected criu or native)"
            ))),
        }
    }
}

/// How to capture.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// Keep the process running after the capture (false: it is ended, as for migration).
    pub leave_running: bool,
    /// Compress bulky sections with zstd (slower; smaller images).
    pub compress: bool,
    /// Upper bound on the whole capture.
    pub timeout: Duration,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            leave_running: true,
            compress: false,
            timeout: Duration::from_secs(300),
        }
    }
}

/// How to restore.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Scratch directory (unpacked CRIU images, native image chains). Default: a fresh
    /// directory under /dev/shm/krun-ghost-restore.
    pub workdir: Option<PathBuf>,
    /// Native: the checkpoint owner of the new process (default: the image's owner).
    pub owner: Option<String>,
    /// Where the new process's stdout and stderr go (default: /dev/null).
    pub output: Option<PathBuf>,
}

/// What a capture produced.
#[derive(Clone, Debug)]
pub struct Captured {
    pub backend: Backend,
    pub image: PathBuf,
    pub image_bytes: u64,
    pub seconds: f64,
}

/// A process brought back.
#[derive(Clone, Debug)]
pub struct Restored {
    pub backend: Backend,
    pub pid: i32,
}

/// The uniform checkpointer interface.
pub trait Checkpointer {
    fn backend(&self) -> Backend;
    /// Captures process `pid` (and its descendants, where the backend supports trees) into
    /// the image file `out`.
    fn capture(&self, pid: i32, out: &Path, opts: &CaptureOptions) -> Result<Captured>;
    /// Starts a new process from an image.
    fn restore(&self, image: &Path, opts: &RestoreOptions) -> Result<Restored>;
    /// Brings the live process `pid` back to the state in `image`.
    fn rollback(&self, pid: i32, image: &Path, opts: &RestoreOptions) -> Result<Restored>;
}

/// The checkpointer for a live process: native when it runs libghost, CRIU otherwise.
pub fn for_process(pid: i32) -> Result<Box<dyn Checkpointer>> {
    if native_settings(pid)?.is_some() {
        Ok(Box::new(NativeCheckpointer))
    } else {
        criu_checkpointer()
    }
}

/// The checkpointer that made `image`.
pub fn for_image(image: &Path) -> Result<Box<dyn Checkpointer>> {
    let bytes = read(image)?;
    let parsed = Image::parse(&bytes)?;
    match parsed.meta_value("backend").as_deref() {
        Some("native") => Ok(Box::new(NativeCheckpointer)),
        Some("criu") => criu_checkpointer(),
        other => Err(GhostError::Invalid(format!(
            "{}: image names no known checkpointer (backend={other:?})",
            image.display()
        ))),
    }
}

/// Migrates `pid`: captures it into `image` and ends it, then calls `restore_elsewhere` with
/// the image (e.g. restore on another node). If that fails the process is restored here, so
/// it is never lost.
pub fn migrate(
    pid: i32,
    image: &Path,
    restore_elsewhere: impl FnOnce(&Path) -> Result<Restored>,
) -> Result<Restored> {
    let checkpointer = for_process(pid)?;
    let opts = CaptureOptions {
        leave_running: false,
        ..CaptureOptions::default()
    };
    checkpointer.capture(pid, image, &opts)?;
    match restore_elsewhere(image) {
        Ok(r) => Ok(r),
        Err(e) => {
            let back = checkpointer.restore(image, &RestoreOptions::default())?;
            Err(GhostError::Invalid(format!(
                "migration of pid {pid} failed at the destination ({e}); restored here as pid {}",
                back.pid
            )))
        }
    }
}

fn criu_checkpointer() -> Result<Box<dyn Checkpointer>> {
    Ok(Box::new(crate::criu::CriuCheckpointer::locate()?))
}

pub(crate) fn read(path: &Path) -> Result<native::MappedFile> {
    native::MappedFile::open(path)
}

/// `(KRUN_GHOST_DIR, KRUN_GHOST_OWNER)` of a process that runs the native runtime (it has
/// libghost mapped), or None.
pub fn native_settings(pid: i32) -> Result<Option<(PathBuf, String)>> {
    let maps =
        std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| GhostError::Io {
            path: PathBuf::from(format!("/proc/{pid}/maps")),
            what: format!("process {pid} is not readable (gone?)"),
            source: e,
        })?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let linked = maps.contains("libghost") || exe.to_string_lossy().contains("ghost");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let mut dir = PathBuf::from("/dev/shm/krun-ghost");
    let mut owner = None;
    for var in environ.split(|&b| b == 0) {
        let var = String::from_utf8_lossy(var);
        if let Some(v) = var.strip_prefix("KRUN_GHOST_DIR=") {
            dir = PathBuf::from(v);
        } else if let Some(v) = var.strip_prefix("KRUN_GHOST_OWNER=") {
            owner = Some(v.to_string());
        }
    }
    Ok(match (linked, owner) {
        (true, Some(owner)) => Some((dir, owner)),
        _ => None,
    })
}

/// Rewrites an image chain (newest first) as one full image with the newest meta.
pub fn consolidate<B: AsRef<[u8]>>(chain: &[B]) -> Result<Vec<u8>> {
    let images = chain
        .iter()
        .map(|b| Image::parse(b.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let newest = images
        .first()
        .ok_or_else(|| GhostError::Invalid("an empty image chain".into()))?;
    let mut out = ImageBuilder::new(newest.image_id, 0, Vec::new());
    for s in &newest.sections {
        match s.kind {
            SectionKind::Region | SectionKind::RegionDelta | SectionKind::RegionSparse => {
                let dest = out.reserve(SectionKind::Region, s.name, s.raw_len as usize)?;
                image::materialize_region(&images, s.name, dest)?;
            }
            kind => out.add(kind, s.name, &s.data()?, false)?,
        }
    }
    Ok(out.finish())
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Ends `pid` with SIGKILL and waits (bounded) until it is gone or a zombie.
pub(crate) fn end_process(pid: i32, limit: Duration) -> Result<()> {
    // SAFETY: plain kill(2) of a PID the caller named.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let start = Instant::now();
    while alive(pid) {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'))
        {
            // Reap it if it is ours; otherwise its parent will.
            // SAFETY: non-blocking waitpid on a PID; harmless if not our child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(GhostError::Invalid(format!(
                "pid {pid} survived SIGKILL for {limit:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The native backend seen from outside the process: requests go by signal (SIGUSR1
/// capture, SIGUSR2 rollback), served at the program's next safepoint.
pub struct NativeCheckpointer;

impl NativeCheckpointer {
    fn settings(pid: i32) -> Result<(PathBuf, String)> {
        native_settings(pid)?.ok_or_else(|| {
            GhostError::Invalid(format!(
                "pid {pid} does not run krun's native checkpointer (no libghost with KRUN_GHOST_OWNER)"
            ))
        })
    }
}

fn signal(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill(2) to a PID named by the caller.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(GhostError::Io {
            path: PathBuf::from(format!("/proc/{pid}")),
            what: format!("signalling pid {pid}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl Checkpointer for NativeCheckpointer {
    fn backend(&self) -> Backend {
        Backend::Native
    }

    fn capture(&self, pid: i32, out: &Path, opts: &CaptureOptions) -> Result<Captured> {
        let start = Instant::now();
        let (dir, owner) = Self::settings(pid)?;
        let before = native::list_versions(&dir, &owner)?
            .last()
            .copied()
            .unwrap_or(0);
        // A reason left by an earlier failed capture is not this one's.
        let _ = std::fs::remove_file(dir.join(&owner).join(native::CAPTURE_FAILED));
        signal(pid, libc::SIGUSR1)?;
        // The image is complete when its file appears (written atomically).
        let version = loop {
            if let Some(&v) = native::list_versions(&dir, &owner)?
                .iter()
                .rev()
                .find(|&&v| v > before)
            {
                break v;
            }
            if let Some(reason) = native::capture_failure(&dir, &owner, pid) {
                return Err(GhostError::Invalid(format!(
                    "pid {pid} could not write its image: {reason}"
                )));
            }
            if !alive(pid) {
                return Err(GhostError::Invalid(format!(
                    "pid {pid} ended before its capture completed"
                )));
            }
            if start.elapsed() > opts.timeout {
                return Err(GhostError::Invalid(format!(
                    "pid {pid} produced no image within {:?} (does it call krun_ghost_safepoint?)",
                    opts.timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if !opts.leave_running {
            end_process(pid, Duration::from_secs(10))?;
        }
        let full = consolidate(&native::load_chain(&dir, &owner, version)?)?;
        native::write_atomically(out, &full)?;
        Ok(Captured {
            backend: Backend::Native,
            image: out.to_path_buf(),
            image_bytes: full.len() as u64,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    fn restore(&self, image_path: &Path, opts: &RestoreOptions) -> Result<Restored> {
        let bytes = read(image_path)?;
        let image = Image::parse(&bytes)?;
        if image.is_incremental() {
            return Err(GhostError::Invalid(format!(
                "{}: an incremental image cannot be restored alone (use the consolidated image)",
                image_path.display()
            )));
        }
        let meta = |k: &str| {
            image.meta_value(k).ok_or_else(|| {
                GhostError::Invalid(format!("{}: meta has no '{k}'", image_path.display()))
            })
        };
        let owner = match &opts.owner {
            Some(o) => o.clone(),
            None => meta("owner")?,
        };
        let cmdline = unhex(&meta("cmdline")?).ok_or_else(|| {
            GhostError::Invalid(format!("{}: cmdline is not hex", image_path.display()))
        })?;
        let mut args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let program = meta("program")?;
        if !Path::new(&program).exists() {
            return Err(GhostError::Invalid(format!(
                "{}: its program {program} is missing on this node",
                image_path.display()
            )));
        }
        let workdir = match &opts.workdir {
            Some(w) => w.clone(),
            None => PathBuf::from(format!(
                "/dev/shm/krun-ghost-restore/{}",
                std::process::id()
            )),
        };
        native::write_atomically(
            &native::image_path(&workdir, &owner, image.image_id),
            &bytes,
        )?;
        if !args.is_empty() {
            args.remove(0);
        }
        let output = match &opts.output {
            Some(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p),
            None => std::fs::OpenOptions::new().write(true).open("/dev/null"),
        }
        .map_err(|e| GhostError::Io {
            path: opts.output.clone().unwrap_or_else(|| "/dev/null".into()),
            what: "opening the output of the restored process".into(),
            source: e,
        })?;
        let err = output.try_clone().map_err(|e| GhostError::Io {
            path: "output".into(),
            what: "dup".into(),
            source: e,
        })?;
        let cwd = meta("cwd")
            .ok()
            .filter(|c| Path::new(c).is_dir())
            .unwrap_or_else(|| "/".into());
        let mut cmd = std::process::Command::new(&program);
        cmd.args(&args)
            .current_dir(cwd)
            .env("KRUN_GHOST_DIR", &workdir)
            .env("KRUN_GHOST_OWNER", &owner)
            .env("KRUN_GHOST_RESTORE", image.image_id.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(output)
            .stderr(err);
        // SAFETY: close_range(2) is async-signal-safe; the restored program inherits none
        // of the caller's descriptors above stderr (a daemon's sockets among them).
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(crate::descriptors::cloexec_above_stdio);
        }
        let child = cmd.spawn().map_err(|e| GhostError::Io {
            path: PathBuf::from(&program),
            what: "starting the restored program".into(),
            source: e,
        })?;
        Ok(Restored {
            backend: Backend::Native,
            pid: child.id() as i32,
        })
    }

    fn rollback(&self, pid: i32, image_path: &Path, _opts: &RestoreOptions) -> Result<Restored> {
        let (dir, owner) = Self::settings(pid)?;
        let bytes = read(image_path)?;
        let image = Image::parse(&bytes)?;
        if image.meta_value("owner").as_deref() != Some(owner.as_str()) {
            return Err(GhostError::Invalid(format!(
                "{} belongs to {:?}, pid {pid} is {owner}",
                image_path.display(),
                image.meta_value("owner")
            )));
        }
        // Make the image available under the process's own directory, then ask for it.
        let own = native::image_path(&dir, &owner, image.image_id);
        if !own.exists() {
            native::write_atomically(&own, &bytes)?;
        }
        let marker = dir.join(&owner).join(native::ROLLED_BACK);
        let _ = std::fs::remove_file(&marker);
        native::write_atomically(
            &dir.join(&owner).join(native::ROLLBACK_REQUEST),
            image.image_id.to_string().as_bytes(),
        )?;
        signal(pid, libc::SIGUSR2)?;
        let start = Instant::now();
        loop {
            // (An empty marker is one a runtime of an older build is still writing.)
            if let Some(text) = std::fs::read_to_string(&marker)
                .ok()
                .filter(|t| !t.trim().is_empty())
            {
                let version: u64 = text
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if version != image.image_id {
                    return Err(GhostError::Invalid(format!(
                        "pid {pid} rolled back to v{version}, not v{}",
                        image.image_id
                    )));
                }
                return Ok(Restored {
                    backend: Backend::Native,
                    pid,
                });
            }
            if !alive(pid) {
                return Err(GhostError::Invalid(format!(
                    "pid {pid} ended before rolling back"
                )));
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err(GhostError::Invalid(format!(
                    "pid {pid} did not roll back within 60 s (does it call krun_ghost_safepoint?)"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A human-readable account of an image, after verifying it; incremental images are also
/// checked against their parents when those sit beside them (`<dir>/<parent>.kgi`).
pub fn inspect(path: &Path) -> Result<String> {
    use std::fmt::Write;
    let bytes = read(path)?;
    let image = Image::parse(&bytes)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: ghost image format v{}, {} bytes, checksums OK",
        path.display(),
        image.version,
        image.total_len
    );
    let _ = writeln!(
        out,
        "  image id {}  parent {}",
        image.image_id,
        if image.is_incremental() {
            image.parent_id.to_string()
        } else {
            "none (full image)".into()
        }
    );
    for (k, v) in image.meta() {
        let shown = if k == "cmdline" {
            unhex(&v)
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace('\0', " ")
                        .trim()
                        .to_string()
                })
                .unwrap_or(v)
        } else {
            v
        };
        let _ = writeln!(out, "  {k:<13} {shown}");
    }
    let _ = writeln!(
        out,
        "  {:>3}  {:<12} {:>14} {:>14}  {:<5} {:>12}  name",
        "#", "kind", "bytes", "stored", "zstd", "offset"
    );
    for s in &image.sections {
        let _ = writeln!(
            out,
            "  {:>3}  {:<12} {:>14} {:>14}  {:<5} {:>12}  {}",
            s.index,
            s.kind.label(),
            s.raw_len,
            s.stored().len(),
            if s.compressed { "yes" } else { "no" },
            s.offset,
            s.name
        );
    }
    if image.is_incremental() {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut chain = vec![read(path)?];
        let mut parent = image.parent_id;
        while parent != 0 {
            let p = dir.join(format!("{parent:010}.kgi"));
            let Ok(b) = read(&p) else {
                let _ = writeln!(
                    out,
                    "  parent {} not found beside it: chain not verified",
                    p.display()
                );
                return Ok(out);
            };
            let parsed = Image::parse(&b)
                .map_err(|e| GhostError::Invalid(format!("parent {}: {e}", p.display())))?;
            parent = parsed.parent_id;
            chain.push(b);
        }
        consolidate(&chain)?;
        let _ = writeln!(
            out,
            "  chain of {} image(s) down to a full image: verified",
            chain.len()
        );
    }
    Ok(out)
}
