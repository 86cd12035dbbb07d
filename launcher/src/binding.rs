//! Pinning ranks by the node's topology (hwloc, through the `hwlocality` crate; the `hwloc2`
//! crate crashes on our machines): each local rank gets one core, or one NUMA node, round
//! robin when there are more ranks than domains.
use hwlocality::object::types::ObjectType;
use hwlocality::Topology;

use crate::error::{LauncherError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindTo {
    Core,
    Numa,
    None,
}

impl std::str::FromStr for BindTo {
    type Err = LauncherError;
    fn from_str(s: &str) -> Result<BindTo> {
        match s {
            "core" => Ok(BindTo::Core),
            "numa" => Ok(BindTo::Numa),
            "none" => Ok(BindTo::None),
            other => Err(LauncherError::Usage(format!(
                "--bind-to {other:?}: expected core, numa or none"
            ))),
        }
    }
}

impl BindTo {
    pub fn name(self) -> &'static str {
        match self {
            BindTo::Core => "core",
            BindTo::Numa => "numa",
            BindTo::None => "none",
        }
    }
}

/// hwloc plugins that krund's topologies (its ranks' binding, its PMIx server's) have no
/// use for: X displays (`gl`: it probes ten X servers), OpenCL devices, and libxml2's XML
/// (hwloc has its own reader and writer). Loading them costs each topology a few
/// milliseconds of CPU (libX11's, libOpenCL's and ICU's relocations).
const QUIET_PLUGINS: &str = "hwloc_gl,hwloc_opencl,hwloc_xml_libxml";
const PLUGINS_VAR: &str = "HWLOC_PLUGINS_BLACKLIST";
static QUIETED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Leaves [`QUIET_PLUGINS`] out of this process's hwloc, unless `HWLOC_PLUGINS_BLACKLIST` is
/// set already (the user's choice stands). It changes the environment: call it before any
/// thread starts. Ranks do not inherit the setting ([`hwloc_plugins_quieted`]).
pub fn quiet_hwloc_plugins() {
    if std::env::var_os(PLUGINS_VAR).is_none() {
        std::env::set_var(PLUGINS_VAR, QUIET_PLUGINS);
        QUIETED.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The variable [`quiet_hwloc_plugins`] set, if it did: a rank's start removes it.
pub fn hwloc_plugins_quieted() -> Option<&'static str> {
    QUIETED
        .load(std::sync::atomic::Ordering::SeqCst)
        .then_some(PLUGINS_VAR)
}

/// The CPUs of each binding domain (core or NUMA node) of this node, in logical order.
pub fn domains(kind: BindTo) -> Result<Vec<Vec<usize>>> {
    let object = match kind {
        BindTo::Core => ObjectType::Core,
        BindTo::Numa => ObjectType::NUMANode,
        BindTo::None => return Ok(Vec::new()),
    };
    let topology = Topology::new()
        .map_err(|e| LauncherError::Usage(format!("reading the node topology with hwloc: {e}")))?;
    let mut out = Vec::new();
    for obj in topology.objects_with_type(object) {
        let Some(set) = obj.cpuset() else { continue };
        let cpus: Vec<usize> = set.iter_set().map(usize::from).collect();
        if !cpus.is_empty() {
            out.push(cpus);
        }
    }
    if out.is_empty() {
        return Err(LauncherError::Usage(format!(
            "hwloc found no {} with CPUs on this node",
            kind.name()
        )));
    }
    Ok(out)
}

/// The CPUs local rank `local_rank` is bound to (round robin over the domains).
pub fn cpus_for(domains: &[Vec<usize>], local_rank: usize) -> Option<&[usize]> {
    (!domains.is_empty()).then(|| domains[local_rank % domains.len()].as_slice())
}

/// A CPU mask ready to hand to `sched_setaffinity` in a child between fork and exec.
#[derive(Clone, Copy)]
pub struct CpuMask(libc::cpu_set_t);

impl CpuMask {
    pub fn new(cpus: &[usize]) -> CpuMask {
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            for &c in cpus {
                if c < libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(c, &mut set);
                }
            }
            CpuMask(set)
        }
    }

    /// Binds the calling process. Async-signal-safe (one system call).
    pub fn apply(&self) -> std::io::Result<()> {
        // SAFETY: the mask is a valid cpu_set_t of the size we pass.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// CPUs the calling process may run on.
pub fn current_affinity() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_found_and_cover_distinct_cpus() {
        let cores = domains(BindTo::Core).unwrap();
        assert!(!cores.is_empty());
        let mut all: Vec<usize> = cores.iter().flatten().copied().collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a CPU belongs to one core");
        assert!(!domains(BindTo::Numa).unwrap().is_empty());
        assert!(domains(BindTo::None).unwrap().is_empty());
    }

    #[test]
    fn round_robin_over_domains() {
        let d = vec![vec![0, 1], vec![2, 3]];
        assert_eq!(cpus_for(&d, 0), Some(&[0, 1][..]));
        assert_eq!(cpus_for(&d, 3), Some(&[2, 3][..]));
        assert_eq!(cpus_for(&[], 3), None);
        assert!("socket".parse::<BindTo>().is_err());
    }

    #[test]
    fn a_mask_binds_a_child_to_exactly_its_cpus() {
        use std::os::unix::process::CommandExt;
        let cpus = current_affinity();
        assert!(!cpus.is_empty());
        let last = *cpus.last().unwrap();
        let mask = CpuMask::new(&[last]);
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        // SAFETY: apply() is a single system call, async-signal-safe.
        unsafe { cmd.pre_exec(move || mask.apply()) };
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text.split_whitespace().nth(1),
            Some(last.to_string().as_str()),
            "{text}"
        );
    }
}
