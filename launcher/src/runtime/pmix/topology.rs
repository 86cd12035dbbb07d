//! The machine's topology for the PMIx library (`PMIX_TOPOLOGY2`): from the machine's
//! cache or discovered (`crate::topology`), kept alive as long as the process.
use std::ffi::c_char;

use pmix_sys as sys;

/// The hwloc topology handed to the library, and the descriptor it was handed in.
pub(super) struct GivenTopology {
    pub(super) _topology: crate::topology::Topology,
    pub(super) _source: std::ffi::CString,
    pub(super) descriptor: Box<sys::pmix_topology_t>,
}

// SAFETY: the descriptor's pointers name the topology and string owned beside it; nothing
// changes them after the library got them, and a loaded hwloc topology is read-only.
unsafe impl Send for GivenTopology {}
// SAFETY: as above.
unsafe impl Sync for GivenTopology {}

/// The machine's topology for the library: from the machine's cache (`crate::topology`),
/// else discovered here. `None` (the library then discovers it itself) when hwloc cannot
/// discover it, after a message.
pub(super) fn machine_topology(node: usize, trace: bool) -> Option<GivenTopology> {
    use crate::topology::{self, CacheDir, Origin};
    let what = format!("krund: node {node}");
    let dir = CacheDir::from_env(&what);
    let (t, origin) = match topology::machine_topology(dir.as_ref(), &what) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{what}: {e}; the PMIx library discovers the topology itself");
            return None;
        }
    };
    if trace {
        let from = match &origin {
            Origin::Cache(f) => format!("loaded from the machine's cache {}", f.display()),
            Origin::Discovered { cached: Some(f) } => {
                format!("discovered, cached in {}", f.display())
            }
            Origin::Discovered { cached: None } => "discovered, not cached".to_string(),
        };
        eprintln!("{what}: PMIx topology {from} ({})", t.counts());
    }
    let source = std::ffi::CString::new(topology::hwloc_source()).ok()?;
    let descriptor = Box::new(sys::pmix_topology_t {
        source: source.as_ptr() as *mut c_char,
        topology: t.as_raw(),
    });
    Some(GivenTopology {
        _topology: t,
        _source: source,
        descriptor,
    })
}
