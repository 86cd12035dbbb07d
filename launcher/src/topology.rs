//! The machine's hwloc topology as krund's PMIx server hands it to OpenPMIx: with the I/O
//! devices MPI programs use (PCI devices, NICs, disks; hwloc's "important" I/O filter, as
//! OpenPMIx's own discovery), discovered once per machine boot and shared through a cache
//! file by every krund on the machine (`topology/cache.rs`).
//!
//! Discovering the I/O devices reads the PCI configuration of every device in /sys, which
//! is slow on virtual machines: with 64 krunds on one machine (namespace hosts, or
//! `--local` nodes) each doing it, it was a fifth of a wide launch's time. The topology
//! is a property of the machine and its boot: the first krund discovers it and writes it
//! as hwloc XML; the others load that (hwloc's XML import, marked as this system's).
use std::ffi::{c_char, c_int, CString};

use hwlocality_sys as hw;

pub mod cache;

pub use cache::{CacheDir, Origin};

/// A loaded hwloc topology, owned (destroyed on drop).
pub struct Topology {
    raw: hw::hwloc_topology_t,
}

// SAFETY: a loaded hwloc topology may be read from any thread; krund hands it to OpenPMIx
// once and does not change it.
unsafe impl Send for Topology {}
// SAFETY: as above: after `load`, hwloc's read functions do not modify the topology.
unsafe impl Sync for Topology {}

/// How many objects of the kinds MPI programs look at a topology holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub pus: u32,
    pub cores: u32,
    pub numa_nodes: u32,
    pub bridges: u32,
    pub pci_devices: u32,
    pub os_devices: u32,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} PUs, {} cores, {} NUMA nodes, {} bridges, {} PCI devices, {} OS devices",
            self.pus, self.cores, self.numa_nodes, self.bridges, self.pci_devices, self.os_devices
        )
    }
}

/// The API version of the hwloc library in use, as `hwloc:MAJOR.MINOR.PATCH` (the source
/// name OpenPMIx expects: it starts with "hwloc").
pub fn hwloc_source() -> String {
    // SAFETY: no preconditions.
    let v = unsafe { hw::hwloc_get_api_version() };
    format!("hwloc:{}.{}.{}", v >> 16, (v >> 8) & 0xff, v & 0xff)
}

impl Topology {
    /// A new topology context, its I/O filter as OpenPMIx's discovery sets it (bridges,
    /// PCI and OS devices: the important ones), with `flags`.
    fn init(flags: hw::hwloc_topology_flags_e) -> Result<Topology, String> {
        let mut raw: hw::hwloc_topology_t = std::ptr::null_mut();
        // SAFETY: `raw` receives a new context.
        if unsafe { hw::hwloc_topology_init(&mut raw) } != 0 || raw.is_null() {
            return Err(format!(
                "hwloc_topology_init failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        let t = Topology { raw };
        for ty in [
            hw::HWLOC_OBJ_BRIDGE,
            hw::HWLOC_OBJ_PCI_DEVICE,
            hw::HWLOC_OBJ_OS_DEVICE,
        ] {
            // SAFETY: a valid, not yet loaded context.
            let rc = unsafe {
                hw::hwloc_topology_set_type_filter(t.raw, ty, hw::HWLOC_TYPE_FILTER_KEEP_IMPORTANT)
            };
            if rc != 0 {
                return Err(format!(
                    "hwloc: setting the I/O filter of object type {ty} failed"
                ));
            }
        }
        // SAFETY: a valid, not yet loaded context.
        if unsafe { hw::hwloc_topology_set_flags(t.raw, flags) } != 0 {
            return Err(format!(
                "hwloc: setting the topology flags {flags:#x} failed"
            ));
        }
        Ok(t)
    }

    /// Discovers this machine's topology (what OpenPMIx's server would discover).
    pub fn discover() -> Result<Topology, String> {
        let t = Topology::init(0)?;
        // SAFETY: a valid, configured context, loaded once.
        if unsafe { hw::hwloc_topology_load(t.raw) } != 0 {
            return Err(format!(
                "hwloc cannot discover this machine's topology: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(t)
    }

    /// Loads a topology from hwloc XML, as this machine's (binding and locality queries
    /// apply to this system).
    pub fn from_xml(xml: &[u8]) -> Result<Topology, String> {
        let c = CString::new(xml).map_err(|_| "the XML holds a NUL byte".to_string())?;
        let len = c_int::try_from(c.as_bytes_with_nul().len())
            .map_err(|_| format!("the XML is too large ({} bytes)", xml.len()))?;
        let t = Topology::init(hw::HWLOC_TOPOLOGY_FLAG_IS_THISSYSTEM)?;
        // SAFETY: a valid, not yet loaded context; hwloc reads the buffer during the call
        // and `load` (it keeps no reference after `load`: the buffer outlives both here).
        if unsafe { hw::hwloc_topology_set_xmlbuffer(t.raw, c.as_ptr(), len) } != 0 {
            return Err("hwloc does not take the XML".to_string());
        }
        // SAFETY: as above.
        if unsafe { hw::hwloc_topology_load(t.raw) } != 0 {
            return Err(format!(
                "hwloc cannot load the XML: {}",
                std::io::Error::last_os_error()
            ));
        }
        if t.counts().pus == 0 {
            return Err("the XML's topology has no processing unit".to_string());
        }
        Ok(t)
    }

    /// The topology as hwloc v2 XML.
    pub fn to_xml(&self) -> Result<Vec<u8>, String> {
        let mut buf: *mut c_char = std::ptr::null_mut();
        let mut len: c_int = 0;
        // SAFETY: a loaded topology; hwloc allocates the buffer, freed below.
        let rc = unsafe { hw::hwloc_topology_export_xmlbuffer(self.raw, &mut buf, &mut len, 0) };
        if rc != 0 || buf.is_null() {
            return Err(format!(
                "hwloc cannot export the topology as XML: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: a NUL-terminated buffer from hwloc, freed once with hwloc's function.
        let xml = unsafe {
            let v = std::ffi::CStr::from_ptr(buf).to_bytes().to_vec();
            hw::hwloc_free_xmlbuffer(self.raw, buf);
            v
        };
        Ok(xml)
    }

    /// How many objects of each kind MPI programs look at the topology holds.
    pub fn counts(&self) -> Counts {
        let n = |ty: hw::hwloc_obj_type_t| {
            // SAFETY: a loaded topology; a type's depth (normal or special) is valid for
            // the count, which is 0 for a type the topology does not have.
            unsafe {
                let d = hw::hwloc_get_type_depth(self.raw, ty);
                if d == hw::HWLOC_TYPE_DEPTH_UNKNOWN || d == hw::HWLOC_TYPE_DEPTH_MULTIPLE {
                    0
                } else {
                    hw::hwloc_get_nbobjs_by_depth(self.raw, d)
                }
            }
        };
        Counts {
            pus: n(hw::HWLOC_OBJ_PU),
            cores: n(hw::HWLOC_OBJ_CORE),
            numa_nodes: n(hw::HWLOC_OBJ_NUMANODE),
            bridges: n(hw::HWLOC_OBJ_BRIDGE),
            pci_devices: n(hw::HWLOC_OBJ_PCI_DEVICE),
            os_devices: n(hw::HWLOC_OBJ_OS_DEVICE),
        }
    }

    /// The hwloc topology handle, for OpenPMIx (`PMIX_TOPOLOGY2`). It stays valid as long
    /// as `self`.
    pub fn as_raw(&self) -> *mut std::ffi::c_void {
        self.raw as *mut std::ffi::c_void
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // SAFETY: the context was initialised by `init` and is destroyed once.
        unsafe { hw::hwloc_topology_destroy(self.raw) };
    }
}

/// The machine's topology for krund's PMIx server: from the machine's cache in `dir` when
/// a valid one is there, else discovered (and cached, when `dir` is given and usable).
/// Problems with the cache are printed on stderr (prefixed `what`) and never fail the
/// call: the topology is discovered instead. Errs only when hwloc cannot discover it.
pub fn machine_topology(dir: Option<&CacheDir>, what: &str) -> Result<(Topology, Origin), String> {
    match dir {
        Some(d) => d.topology(what),
        None => Ok((Topology::discover()?, Origin::Discovered { cached: None })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_of_a_discovered_topology_loads_into_the_same_topology() {
        let t = Topology::discover().unwrap();
        let xml = t.to_xml().unwrap();
        let back = Topology::from_xml(&xml).unwrap();
        assert_eq!(back.counts(), t.counts());
        assert!(t.counts().pus >= 1);
        // The round trip keeps every object and attribute; of the discovery's support
        // flags, XML import drops `discovery.cpukind_efficiency` (what the discovery could
        // measure, not the topology).
        assert_eq!(
            without_support(&back.to_xml().unwrap()),
            without_support(&xml)
        );
        assert!(without_support(&xml)
            .iter()
            .any(|l| l.contains("type=\"PU\"")));
    }

    fn without_support(xml: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(xml)
            .lines()
            .filter(|l| !l.trim_start().starts_with("<support "))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn discovery_keeps_the_machines_pci_devices() {
        let t = Topology::discover().unwrap();
        let pci = std::fs::read_dir("/sys/bus/pci/devices")
            .map(|d| d.count())
            .unwrap_or(0);
        // Every machine with PCI devices has one hwloc keeps (a NIC, a disk controller).
        if pci > 0 {
            assert!(t.counts().pci_devices >= 1, "{}", t.counts());
        }
    }

    #[test]
    fn xml_that_is_not_a_topology_is_refused() {
        for bad in [
            &b"not xml at all"[..],
            b"<?xml version=\"1.0\"?><topology>",
            b"a\0b",
        ] {
            assert!(Topology::from_xml(bad).is_err());
        }
    }

    #[test]
    fn the_source_names_hwloc_and_its_version() {
        let s = hwloc_source();
        assert!(s.starts_with("hwloc:2."), "{s}");
    }
}
