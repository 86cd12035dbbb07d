//! The machine's topology cache: one file per machine boot and machine state, written by
//! the first krund that needs it, read by the others.
//!
//! - Where: `KRUN_TOPOLOGY_CACHE` (a directory, or `off`), else `$XDG_RUNTIME_DIR/krun`,
//!   else `/run/krun` for root, else `$TMPDIR/krun-UID`. The directory is created private
//!   (0700) and used only when it is a real directory owned by the user, closed to others.
//! - Key: the file is `topology-BOOTID-HASH.xml`, BOOTID from
//!   /proc/sys/kernel/random/boot_id, HASH over what else hwloc's discovery depends on:
//!   the hwloc version, the online CPUs and NUMA nodes, the process's cgroup cpuset, the PCI
//!   devices present, the I/O class devices with a hardware device behind them (network
//!   interfaces as this network namespace shows them, InfiniBand, disks, GPUs, ...), and
//!   the `HWLOC_*` environment variables. A change of any gives another file.
//! - Format: a header (`krun-topology-cache 1`, the boot id, every fingerprint line, the
//!   XML's length and FNV-1a 64 hash), an empty line, the XML. A file is used only when
//!   it is a regular file (not a link) owned by the user and writable by nobody else, its
//!   header matches this machine exactly and the XML is whole and loads; otherwise it is
//!   ignored with a message and replaced.
//! - Writes: to a temporary file in the directory, renamed over the cache file; under an
//!   exclusive `flock` on `topology.lock`, so concurrent krunds wait for one discovery and
//!   load its result (a wait is bounded: past [`LOCK_LIMIT`] a krund discovers alone).
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Topology;

/// Longest wait for another krund's discovery before discovering without the cache.
pub const LOCK_LIMIT: Duration = Duration::from_secs(60);
const MAGIC: &str = "krun-topology-cache 1";
/// The environment variable that places (or turns off) the cache.
pub const CACHE_VAR: &str = "KRUN_TOPOLOGY_CACHE";

/// Where the topology came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Read from the cache file.
    Cache(PathBuf),
    /// Discovered by this process; written to the cache file when `cached` is set.
    Discovered { cached: Option<PathBuf> },
}

/// A usable cache directory (private, the user's).
#[derive(Debug, Clone)]
pub struct CacheDir(PathBuf);

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// FNV-1a, 64 bits: the cache file's integrity check (not a defence against an attacker:
/// only the user can write to the directory).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl CacheDir {
    /// The directory the environment chooses (see the module's documentation); `None`
    /// when `KRUN_TOPOLOGY_CACHE=off`.
    pub fn default_path() -> Option<PathBuf> {
        match std::env::var_os(CACHE_VAR) {
            Some(v) if v == "off" => return None,
            Some(v) if !v.is_empty() => return Some(PathBuf::from(v)),
            _ => {}
        }
        if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            if x.is_absolute() && x.is_dir() {
                return Some(x.join("krun"));
            }
        }
        if uid() == 0 && Path::new("/run").is_dir() {
            return Some(PathBuf::from("/run/krun"));
        }
        Some(std::env::temp_dir().join(format!("krun-{}", uid())))
    }

    /// Creates `path` (0700) if missing and checks it is a directory, not a link, owned by
    /// the user and closed to group and others.
    pub fn open(path: &Path) -> Result<CacheDir, String> {
        if let Err(e) = std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(path)
        {
            return Err(format!("cannot create {}: {e}", path.display()));
        }
        let m = std::fs::symlink_metadata(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if !m.file_type().is_dir() {
            return Err(format!("{} is not a directory", path.display()));
        }
        if m.uid() != uid() {
            return Err(format!(
                "{} belongs to uid {}, not to this user ({})",
                path.display(),
                m.uid(),
                uid()
            ));
        }
        if m.mode() & 0o077 != 0 {
            return Err(format!(
                "{} is open to other users (mode {:o}); the cache needs 0700",
                path.display(),
                m.mode() & 0o777
            ));
        }
        Ok(CacheDir(path.to_path_buf()))
    }

    /// The directory the environment chooses, usable; `None` (after a message on stderr,
    /// prefixed `what`) when it is turned off or not usable.
    pub fn from_env(what: &str) -> Option<CacheDir> {
        let path = CacheDir::default_path()?;
        match CacheDir::open(&path) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("{what}: not caching the machine's topology: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The cache file for this machine's boot and state.
    pub fn file(&self, key: &Key) -> PathBuf {
        self.0.join(key.file_name())
    }

    /// The topology from the cache, else discovered and cached (see [`super::machine_topology`]).
    pub fn topology(&self, what: &str) -> Result<(Topology, Origin), String> {
        let key = match Key::of_this_machine() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("{what}: not caching the machine's topology: {e}");
                return Ok((Topology::discover()?, Origin::Discovered { cached: None }));
            }
        };
        let file = self.file(&key);
        // Most krunds find it there: no lock.
        if let Ok(Some(t)) = read(&file, &key) {
            return Ok((t, Origin::Cache(file)));
        }
        let lock = match self.lock() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{what}: not caching the machine's topology: {e}");
                return Ok((Topology::discover()?, Origin::Discovered { cached: None }));
            }
        };
        // Another krund may have written it while this one waited.
        match read(&file, &key) {
            Ok(Some(t)) => return Ok((t, Origin::Cache(file))),
            Ok(None) => {}
            Err(reason) => eprintln!(
                "{what}: ignoring the topology cache {}: {reason}; discovering the topology again",
                file.display()
            ),
        }
        let t = Topology::discover()?;
        let cached = match t.to_xml().and_then(|xml| self.write(&file, &key, &xml)) {
            Ok(()) => Some(file),
            Err(e) => {
                eprintln!("{what}: cannot cache the machine's topology: {e}");
                None
            }
        };
        self.remove_stale(&key);
        drop(lock);
        Ok((t, Origin::Discovered { cached }))
    }

    /// An exclusive lock on the directory's `topology.lock`, held until dropped; waits at
    /// most [`LOCK_LIMIT`].
    fn lock(&self) -> Result<std::fs::File, String> {
        let path = self.0.join("topology.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let deadline = Instant::now() + LOCK_LIMIT;
        loop {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor; a non-blocking lock attempt.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(f);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK)
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                return Err(format!("cannot lock {}: {e}", path.display()));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} stayed locked for {LOCK_LIMIT:?} (another krund discovering)",
                    path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes the cache file atomically (a private temporary file renamed over it).
    fn write(&self, file: &Path, key: &Key, xml: &[u8]) -> Result<(), String> {
        let tmp = self.0.join(format!(
            ".{}.tmp{}",
            file.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let r = (|| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(key.header(xml).as_bytes())?;
            f.write_all(xml)?;
            f.sync_data()?;
            std::fs::rename(&tmp, file)
        })();
        r.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("writing {}: {e}", file.display())
        })
    }

    /// Removes the cache files of other boots and the temporary files of writers that are
    /// gone.
    fn remove_stale(&self, key: &Key) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        let ours = format!("topology-{}-", key.boot);
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = if let Some(pid) = name.rsplit_once(".tmp").map(|(_, p)| p) {
                name.starts_with(".topology-")
                    && pid.parse::<i32>().is_ok_and(|p| {
                        // SAFETY: signal 0 only checks that the process exists.
                        p > 0 && unsafe { libc::kill(p, 0) } != 0
                    })
            } else {
                name.starts_with("topology-") && name.ends_with(".xml") && !name.starts_with(&ours)
            };
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// What the cache file is keyed by: the machine's boot and what discovery depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub boot: String,
    /// One `name=value` line each (no newline inside).
    pub fingerprint: Vec<String>,
}

/// A file's content on one line, `-` when it cannot be read.
fn one_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().replace('\n', ","))
        .unwrap_or_else(|_| "-".into())
}

/// The entries of a directory, sorted, `-` when it cannot be read.
fn listing(path: &Path, keep: impl Fn(&std::fs::DirEntry) -> Option<String>) -> String {
    let Ok(d) = std::fs::read_dir(path) else {
        return "-".into();
    };
    let mut v: Vec<String> = d.flatten().filter_map(|e| keep(&e)).collect();
    v.sort();
    v.join(",")
}

impl Key {
    pub fn of_this_machine() -> Result<Key, String> {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map_err(|e| format!("cannot read /proc/sys/kernel/random/boot_id: {e}"))?
            .trim()
            .to_string();
        if boot.len() != 36 || !boot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(format!("unexpected boot id {boot:?}"));
        }
        let mut fp = vec![
            format!("hwloc={}", super::hwloc_source()),
            format!("cpus={}", one_line("/sys/devices/system/cpu/online")),
            format!("nodes={}", one_line("/sys/devices/system/node/online")),
        ];
        // The cpuset hwloc restricts the topology to (cgroup v1's cpuset controller or
        // v2's unified hierarchy).
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        for line in cgroups.lines() {
            let mut f = line.splitn(3, ':');
            let (_, ctl, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
            let files = if ctl.split(',').any(|c| c == "cpuset") {
                [
                    format!("/sys/fs/cgroup/cpuset{path}/cpuset.effective_cpus"),
                    format!("/sys/fs/cgroup/cpuset{path}/cpuset.effective_mems"),
                ]
            } else if ctl.is_empty() {
                [
                    format!("/sys/fs/cgroup{path}/cpuset.cpus.effective"),
                    format!("/sys/fs/cgroup{path}/cpuset.mems.effective"),
                ]
            } else {
                continue;
            };
            fp.push(format!(
                "cgroup={line};{};{}",
                one_line(&files[0]),
                one_line(&files[1])
            ));
        }
        fp.push(format!(
            "pci={}",
            listing(Path::new("/sys/bus/pci/devices"), |e| Some(
                e.file_name().to_string_lossy().into_owned()
            ))
        ));
        // OS devices hwloc attaches to hardware: class devices with a device behind them
        // (virtual ones, like lo or veth interfaces, have none).
        for class in [
            "net",
            "infiniband",
            "block",
            "drm",
            "dma",
            "dax",
            "mic",
            "bxi",
        ] {
            let dir = Path::new("/sys/class").join(class);
            fp.push(format!(
                "{class}={}",
                listing(&dir, |e| {
                    let dev = std::fs::read_link(e.path().join("device")).ok()?;
                    Some(format!(
                        "{}>{}",
                        e.file_name().to_string_lossy(),
                        dev.file_name()?.to_string_lossy()
                    ))
                })
            ));
        }
        let mut env: Vec<String> = std::env::vars_os()
            .filter_map(|(k, v)| {
                let k = k.to_str()?;
                k.starts_with("HWLOC_")
                    .then(|| format!("env {k}={}", v.to_string_lossy()))
            })
            .collect();
        env.sort();
        fp.extend(env);
        for l in &mut fp {
            *l = l.replace(['\n', '\r'], ",");
        }
        Ok(Key {
            boot,
            fingerprint: fp,
        })
    }

    pub fn file_name(&self) -> String {
        format!(
            "topology-{}-{:016x}.xml",
            self.boot,
            fnv64(self.fingerprint.join("\n").as_bytes())
        )
    }

    /// The cache file's header for `xml` (it ends with an empty line).
    fn header(&self, xml: &[u8]) -> String {
        let mut h = format!("{MAGIC}\nboot {}\n", self.boot);
        for l in &self.fingerprint {
            h.push_str(&format!("fp {l}\n"));
        }
        h.push_str(&format!("xml {} {:016x}\n\n", xml.len(), fnv64(xml)));
        h
    }
}

/// Largest cache file read (a topology of a large machine is a few MB).
const MAX_FILE: u64 = 256 << 20;

/// The topology in cache file `file` for `key`: `Ok(None)` when there is no file, `Err`
/// (why) when there is one that is not this machine's valid cache.
pub fn read(file: &Path, key: &Key) -> Result<Option<Topology>, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err("it is a symbolic link".into())
        }
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let m = f.metadata().map_err(|e| format!("cannot read it: {e}"))?;
    if !m.file_type().is_file() {
        return Err("it is not a regular file".into());
    }
    if m.uid() != uid() {
        return Err(format!("it belongs to uid {}, not to this user", m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "others may write to it (mode {:o})",
            m.mode() & 0o777
        ));
    }
    if m.len() > MAX_FILE {
        return Err(format!("it is too large ({} bytes)", m.len()));
    }
    let mut data = Vec::with_capacity(m.len() as usize);
    f.read_to_end(&mut data)
        .map_err(|e| format!("cannot read it: {e}"))?;
    let xml = check(&data, key)?;
    Topology::from_xml(xml).map(Some)
}

/// The XML of cache file content `data` when its header matches `key` and the XML is whole.
fn check<'a>(data: &'a [u8], key: &Key) -> Result<&'a [u8], String> {
    let end = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or("it has no header (not a krun topology cache)")?;
    let header = std::str::from_utf8(&data[..end]).map_err(|_| "its header is not text")?;
    let xml = &data[end + 2..];
    let mut lines = header.lines();
    if lines.next() != Some(MAGIC) {
        return Err(format!("it does not start with {MAGIC:?}"));
    }
    if lines.next() != Some(&format!("boot {}", key.boot)) {
        return Err(format!("it is not of this boot ({})", key.boot));
    }
    let mut fp = Vec::new();
    let mut sum = None;
    for l in lines {
        if let Some(f) = l.strip_prefix("fp ") {
            fp.push(f);
        } else if let Some(s) = l.strip_prefix("xml ") {
            sum = Some(s);
        } else {
            return Err(format!("unexpected header line {l:?}"));
        }
    }
    if fp
        != key
            .fingerprint
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    {
        let differ = fp
            .iter()
            .zip(&key.fingerprint)
            .find(|(a, b)| **a != b.as_str())
            .map(|(a, b)| format!("{a:?} where this machine has {b:?}"))
            .unwrap_or_else(|| "a different number of lines".into());
        return Err(format!("it was made for another machine state: {differ}"));
    }
    let sum = sum.ok_or("its header has no xml line")?;
    let want = format!("{} {:016x}", xml.len(), fnv64(xml));
    if sum != want {
        return Err(format!(
            "its XML is damaged (header says {sum}, the file holds {want})"
        ));
    }
    Ok(xml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp(name: &str) -> (TempDir, CacheDir) {
        let p = std::env::temp_dir().join(format!("krun-topo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        let d = CacheDir::open(&p.join("cache")).unwrap();
        (TempDir(p), d)
    }

    fn file_of(d: &CacheDir) -> PathBuf {
        d.file(&Key::of_this_machine().unwrap())
    }

    #[test]
    fn the_second_krund_loads_the_cache_instead_of_discovering() {
        let (_t, d) = temp("second");
        let file = file_of(&d);
        let (first, o1) = d.topology("test").unwrap();
        assert_eq!(
            o1,
            Origin::Discovered {
                cached: Some(file.clone())
            }
        );
        let (second, o2) = d.topology("test").unwrap();
        assert_eq!(o2, Origin::Cache(file.clone()));
        // The same topology, I/O devices included.
        assert_eq!(second.counts(), first.counts());
        let lines = |t: &Topology| -> Vec<String> {
            String::from_utf8(t.to_xml().unwrap())
                .unwrap()
                .lines()
                .filter(|l| !l.contains("<support "))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(lines(&second), lines(&first));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_cache_file_is_detected_and_replaced() {
        let (_t, d) = temp("damaged");
        let file = file_of(&d);
        d.topology("test").unwrap();
        let good = std::fs::read(&file).unwrap();
        let xml_at = good.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let mut flipped = good.clone();
        flipped[xml_at + (good.len() - xml_at) / 2] ^= 0x20;
        let truncated = good[..good.len() - 10].to_vec();
        let mut bad_xml = good[..xml_at].to_vec();
        bad_xml.extend(std::iter::repeat_n(b'x', good.len() - xml_at));
        for (what, bytes) in [
            ("a flipped byte", flipped),
            ("a truncated file", truncated),
            ("XML overwritten", bad_xml),
            ("garbage", b"garbage".to_vec()),
            ("an empty file", Vec::new()),
        ] {
            std::fs::write(&file, &bytes).unwrap();
            let key = Key::of_this_machine().unwrap();
            assert!(read(&file, &key).is_err(), "{what} was taken");
            let (_, o) = d.topology("test").unwrap();
            assert_eq!(
                o,
                Origin::Discovered {
                    cached: Some(file.clone())
                },
                "{what}"
            );
            assert_eq!(
                std::fs::read(&file).unwrap(),
                good,
                "{what} was not replaced"
            );
        }
        // XML whose header sums match but that hwloc cannot load.
        let key = Key::of_this_machine().unwrap();
        let junk = b"<?xml version=\"1.0\"?><nothing/>".to_vec();
        let mut f = key.header(&junk).into_bytes();
        f.extend(&junk);
        std::fs::write(&file, f).unwrap();
        assert!(read(&file, &key).is_err());
        let (_, o) = d.topology("test").unwrap();
        assert_eq!(o, Origin::Discovered { cached: Some(file) });
    }

    #[test]
    fn a_cache_of_another_boot_or_machine_state_is_refused() {
        let key = Key::of_this_machine().unwrap();
        let xml = b"<x/>".to_vec();
        let mut other_boot = key.clone();
        other_boot.boot = "00000000-0000-0000-0000-000000000000".into();
        let mut other_state = key.clone();
        other_state.fingerprint[1] = "cpus=0-999".into();
        for (other, want) in [
            (other_boot, "not of this boot"),
            (other_state, "cpus=0-999"),
        ] {
            let mut f = other.header(&xml).into_bytes();
            f.extend(&xml);
            let e = check(&f, &key).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        let mut f = key.header(&xml).into_bytes();
        f.extend(&xml);
        assert_eq!(check(&f, &key).unwrap(), &xml[..]);
        // Another state gives another file.
        let mut moved = key.clone();
        moved
            .fingerprint
            .push("env HWLOC_COMPONENTS=-linuxio".into());
        assert_ne!(moved.file_name(), key.file_name());
        assert!(key.file_name().contains(&key.boot));
    }

    #[test]
    fn cache_files_others_may_write_or_links_are_refused() {
        let (t, d) = temp("foreign");
        let file = file_of(&d);
        d.topology("test").unwrap();
        let key = Key::of_this_machine().unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = read(&file, &key).map(|_| ()).unwrap_err();
        assert!(e.contains("others may write"), "{e}");
        let real = t.0.join("real.xml");
        std::fs::rename(&file, &real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&real, &file).unwrap();
        let e = read(&file, &key).map(|_| ()).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // Replaced by a discovery: a regular file again.
        let (_, o) = d.topology("test").unwrap();
        assert_eq!(
            o,
            Origin::Discovered {
                cached: Some(file.clone())
            }
        );
        assert!(std::fs::symlink_metadata(&file)
            .unwrap()
            .file_type()
            .is_file());
    }

    #[test]
    fn a_cache_directory_open_to_others_is_not_used() {
        let (t, _) = temp("opendir");
        let open = t.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = CacheDir::open(&open).unwrap_err();
        assert!(e.contains("open to other users"), "{e}");
        let link = t.0.join("link");
        std::os::unix::fs::symlink(t.0.join("cache"), &link).unwrap();
        let e = CacheDir::open(&link).unwrap_err();
        assert!(e.contains("not a directory"), "{e}");
    }

    #[test]
    fn concurrent_krunds_wait_for_one_discovery() {
        let (_t, d) = temp("concurrent");
        let origins: Vec<Origin> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|_| s.spawn(|| d.topology("test").unwrap().1))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let discovered = origins
            .iter()
            .filter(|o| matches!(o, Origin::Discovered { .. }))
            .count();
        assert_eq!(discovered, 1, "{origins:?}");
    }

    #[test]
    fn files_of_other_boots_and_dead_writers_are_removed() {
        let (_t, d) = temp("stale");
        let old = d
            .path()
            .join("topology-00000000-0000-0000-0000-000000000000-0.xml");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let tmp = d.path().join(format!(".topology-x.xml.tmp{gone}"));
        let live = d
            .path()
            .join(format!(".topology-x.xml.tmp{}", std::process::id()));
        for f in [&old, &tmp, &live] {
            std::fs::write(f, b"x").unwrap();
        }
        d.topology("test").unwrap();
        assert!(!old.exists() && !tmp.exists());
        assert!(live.exists());
        assert!(file_of(&d).exists());
    }

    #[test]
    fn the_environment_places_or_turns_off_the_cache() {
        // Only this test changes the variable (nextest runs each test in its own process).
        std::env::set_var(CACHE_VAR, "off");
        assert_eq!(CacheDir::default_path(), None);
        std::env::set_var(CACHE_VAR, "/some/where");
        assert_eq!(CacheDir::default_path(), Some(PathBuf::from("/some/where")));
        std::env::remove_var(CACHE_VAR);
        assert!(CacheDir::default_path().is_some());
    }

    #[test]
    fn fnv64_matches_its_reference_values() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
