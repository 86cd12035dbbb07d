//! The job as the node's PMIx server registers it (`PMIx_server_register_nspace`), and the
//! node's own ranks in it.
//!
//! The library learns where every rank runs from two maps in the job's information: the
//! node map (the node names, `PMIx_generate_regex`) and the process map (each node's ranks,
//! `PMIx_generate_ppn`). From them OpenPMIx 4.2 derives every rank's host name, local rank
//! and node rank (`gds/hash`'s `store_map`), with no per-rank entry, but only when the
//! registration holds no `PMIX_PROC_DATA` at all: one such entry, for any rank, and it
//! derives nothing for any rank (its `PMIX_HASH_PROC_DATA` flag).
//!
//! So the registration carries no per-rank entry, and the node's own ranks' data
//! (`PMIX_RANK`, `PMIX_GLOBAL_RANK`, `PMIX_APP_RANK`, `PMIX_APPNUM`, `PMIX_LOCAL_RANK`,
//! `PMIX_NODE_RANK`, `PMIX_HOSTNAME`, and krun's node id as `PMIX_NODEID`) is stored right
//! after it with `PMIx_Store_internal`, one `PMIX_PROC_DATA` array per local rank, before
//! any rank can connect. The derived node id is the node's index in the node map (nodes
//! without ranks left out), which after a recovery onto a spare is not krun's node id: the
//! stored one replaces it for the node's own ranks, so they see krun's node id, the spare's
//! own after a recovery onto it.
//!
//! What a rank learns (OpenPMIx 4.2's client, Open MPI's ranks): every rank's host name,
//! local rank and node rank, as before; its own node's ranks' node id (krun's), as before;
//! another node's rank's node id is NOT-FOUND, as before (the client looks a node id up as
//! node-level data by host name, where 4.2 keeps none). No longer given: another node's
//! ranks' `PMIX_GLOBAL_RANK`, `PMIX_APP_RANK` and `PMIX_APPNUM`: krun runs one application,
//! so they are the rank, the rank and 0; Open MPI 4.1 reads them for its own rank only.
//!
//! Before, every node registered `PMIX_PROC_DATA` with those 8 keys for every rank of the
//! job: for 1,024 ranks, 8,192 values stored by every node's library and 1,024 arrays built
//! and copied by every krund.
use std::collections::BTreeMap;
use std::ffi::{c_int, CStr};
use std::path::Path;

use pmix_sys as sys;

use super::ffi::{pmix_error, proc_of, wait_op, Infos, SUCCESS};
use super::{Layout, PmixServer};
use crate::error::{LauncherError, Result};
use adaptation::NodeId;

/// The name the job's information gives node `i` (krun's nodes may share a machine, and a
/// host name: each needs its own).
pub fn node_name(i: usize) -> String {
    format!("krun-node{i}")
}

/// The nodes that run ranks (node order) and each one's ranks (ascending).
fn nodes_of(placement: &[NodeId]) -> BTreeMap<NodeId, Vec<u32>> {
    let mut nodes: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
    for (r, &n) in placement.iter().enumerate() {
        nodes.entry(n).or_default().push(r as u32);
    }
    nodes
}

/// The rank lists of `PMIx_generate_ppn`: nodes separated by `;` (node order, nodes without
/// ranks left out), ranks by `,`.
pub fn ppn_input(placement: &[NodeId]) -> String {
    nodes_of(placement)
        .values()
        .map(|rs| {
            rs.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// The node map's input for `PMIx_generate_regex`: the names of the nodes that run ranks,
/// in the process map's order.
fn node_map_input(placement: &[NodeId]) -> String {
    nodes_of(placement)
        .keys()
        .map(|&n| node_name(n as usize))
        .collect::<Vec<_>>()
        .join(",")
}

/// The data of `node`'s own ranks in `layout`: for each (ascending), its rank and one
/// `PMIX_PROC_DATA` array (the rank first, as the library requires).
fn own_rank_data(node: usize, layout: &Layout) -> Result<Vec<(u32, Infos)>> {
    layout
        .local
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let local = u16::try_from(i).map_err(|_| {
                LauncherError::Usage(format!(
                    "PMIx: node {node} holds {} ranks, more than a local rank can number",
                    layout.local.len()
                ))
            })?;
            let mut p = Infos::new();
            p.rank(sys::PMIX_RANK, r)?;
            p.rank(sys::PMIX_GLOBAL_RANK, r)?;
            p.rank(sys::PMIX_APP_RANK, r)?;
            p.u32(sys::PMIX_APPNUM, 0)?;
            p.u16(sys::PMIX_LOCAL_RANK, local)?;
            p.u16(sys::PMIX_NODE_RANK, local)?;
            p.string(sys::PMIX_HOSTNAME, &node_name(node))?;
            p.u32(sys::PMIX_NODEID, node as u32)?;
            let mut data = Infos::new();
            data.array(sys::PMIX_PROC_DATA, p)?;
            Ok((r, data))
        })
        .collect()
}

impl PmixServer {
    /// Registers `layout`'s namespace, stores this node's ranks' own data, and registers
    /// them as clients.
    pub(super) fn register(&self, layout: &Layout) -> Result<()> {
        let mut job_info = job_info(layout, &self.tmpdir)?;
        let mut ns = proc_of(&layout.nspace, 0).nspace;
        wait_op("registering the job's namespace", |cb, data| {
            // SAFETY: the namespace and infos outlive the operation (wait_op waits for it).
            unsafe {
                sys::PMIx_server_register_nspace(
                    ns.as_mut_ptr(),
                    layout.local.len() as c_int,
                    job_info.0.as_mut_ptr(),
                    job_info.0.len(),
                    cb,
                    data,
                )
            }
        })?;
        drop(job_info);
        self.store_own_ranks(layout)?;
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        for &rank in &layout.local {
            let p = proc_of(&layout.nspace, rank);
            wait_op(&format!("registering rank {rank}"), |cb, data| {
                // SAFETY: `p` outlives the operation (wait_op waits for it).
                unsafe {
                    sys::PMIx_server_register_client(&p, uid, gid, std::ptr::null_mut(), cb, data)
                }
            })?;
        }
        Ok(())
    }

    /// Stores this node's ranks' own data in the registered namespace (replacing what the
    /// library derived from the maps: krun's node id instead of the map's index).
    fn store_own_ranks(&self, layout: &Layout) -> Result<()> {
        let key = CStr::from_bytes_with_nul(sys::PMIX_PROC_DATA)
            .map_err(|_| LauncherError::Usage("PMIx: a key without its NUL".into()))?;
        for (rank, mut data) in own_rank_data(self.node, layout)? {
            let p = proc_of(&layout.nspace, rank);
            // SAFETY: `p`, the key and the value are valid for the call, which copies the
            // value and returns once it is stored.
            let rc = unsafe { sys::PMIx_Store_internal(&p, key.as_ptr(), &mut data.0[0].value) };
            if rc != SUCCESS {
                return Err(pmix_error(&format!("storing rank {rank}'s data"), rc));
            }
        }
        Ok(())
    }
}

/// The job's information for `PMIx_server_register_nspace`: the job's sizes, the node
/// and process maps, this node's peers; no per-rank entry (see the module's doc).
fn job_info(layout: &Layout, tmpdir: &Path) -> Result<Infos> {
    let size = layout.placement.len();
    let local = &layout.local;
    let mut j = Infos::new();
    j.u32(sys::PMIX_UNIV_SIZE, size as u32)?;
    j.u32(sys::PMIX_JOB_SIZE, size as u32)?;
    j.u32(sys::PMIX_MAX_PROCS, size as u32)?;
    j.u32(sys::PMIX_APP_SIZE, size as u32)?;
    j.rank(sys::PMIX_APPLDR, 0)?;
    j.u32(sys::PMIX_APPNUM, 0)?;
    j.string(sys::PMIX_JOBID, &layout.nspace)?;
    j.u32(
        sys::PMIX_NUM_NODES,
        nodes_of(&layout.placement).len() as u32,
    )?;
    j.regex(
        sys::PMIX_NODE_MAP,
        &node_map_input(&layout.placement),
        false,
    )?;
    j.regex(sys::PMIX_PROC_MAP, &ppn_input(&layout.placement), true)?;
    j.string(sys::PMIX_NSDIR, &tmpdir.to_string_lossy())?;
    j.string(sys::PMIX_TMPDIR, &tmpdir.to_string_lossy())?;
    j.string(
        sys::PMIX_LOCAL_PEERS,
        &local
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(","),
    )?;
    j.u32(sys::PMIX_LOCAL_SIZE, local.len() as u32)?;
    j.u32(sys::PMIX_NODE_SIZE, local.len() as u32)?;
    j.rank(
        sys::PMIX_LOCALLDR,
        local.first().copied().unwrap_or(size as u32),
    )?;
    Ok(j)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::mpi::{RankWatch, Teller};
    use std::ffi::c_void;
    use std::sync::Arc;

    /// An info's key.
    fn key_of(i: &sys::pmix_info_t) -> String {
        // SAFETY: the library's keys are NUL-terminated within their array.
        unsafe { CStr::from_ptr(i.key.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// A value as text (the types krund registers), or its type.
    ///
    /// # Safety
    /// `v` must be a valid value.
    unsafe fn text_of(v: &sys::pmix_value_t) -> String {
        // SAFETY: the union's member is the one the type names.
        unsafe {
            match v.type_ as u32 {
                sys::PMIX_STRING => CStr::from_ptr(v.data.string).to_string_lossy().into_owned(),
                sys::PMIX_UINT16 => v.data.uint16.to_string(),
                sys::PMIX_UINT32 => v.data.uint32.to_string(),
                sys::PMIX_PROC_RANK => v.data.rank.to_string(),
                t => format!("(type {t})"),
            }
        }
    }

    fn key(k: &[u8]) -> String {
        CStr::from_bytes_with_nul(k)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// What this process's library answers for `k` of `rank` in `nspace`, as a rank on
    /// this node would be answered: the value as text, or `NOT-FOUND`. Optional: the
    /// library does not ask krun for it.
    fn get(nspace: &str, rank: u32, k: &[u8]) -> String {
        let k = CStr::from_bytes_with_nul(k).unwrap();
        let p = proc_of(nspace, rank);
        let mut opt = Infos::new();
        opt.boolean(sys::PMIX_OPTIONAL, true).unwrap();
        let mut v: *mut sys::pmix_value_t = std::ptr::null_mut();
        // SAFETY: valid proc, key and infos; the library allocates `v`.
        let rc = unsafe { sys::PMIx_Get(&p, k.as_ptr(), opt.0.as_ptr(), opt.0.len(), &mut v) };
        if rc == sys::PMIX_ERR_NOT_FOUND {
            return "NOT-FOUND".into();
        }
        assert_eq!(rc, SUCCESS, "PMIx_Get {k:?} of rank {rank}");
        // SAFETY: a value the library allocated for us (released once, here).
        unsafe {
            let t = text_of(&*v);
            sys::PMIx_Value_destruct(v);
            libc::free(v as *mut c_void);
            t
        }
    }

    #[test]
    fn the_nodes_own_ranks_get_their_whole_data_and_no_other_rank_does() {
        // After a recovery: node 1's ranks 2-3 on spare node 3.
        let layout = Layout::new(3, &[0, 0, 3, 3, 2], "7", 1);
        let data = own_rank_data(3, &layout).unwrap();
        assert_eq!(data.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [2, 3]);
        for (local, (rank, d)) in data.iter().enumerate() {
            assert_eq!(d.0.len(), 1);
            assert_eq!(key_of(&d.0[0]), key(sys::PMIX_PROC_DATA));
            // SAFETY: a data array of infos, as `Infos::array` loads it.
            let got: Vec<(String, String)> = unsafe {
                let a = &*d.0[0].value.data.darray;
                assert_eq!(a.type_ as u32, sys::PMIX_INFO);
                std::slice::from_raw_parts(a.array as *const sys::pmix_info_t, a.size)
                    .iter()
                    .map(|i| (key_of(i), text_of(&i.value)))
                    .collect()
            };
            let want: Vec<(String, String)> = [
                (&sys::PMIX_RANK[..], rank.to_string()),
                (sys::PMIX_GLOBAL_RANK, rank.to_string()),
                (sys::PMIX_APP_RANK, rank.to_string()),
                (sys::PMIX_APPNUM, "0".into()),
                (sys::PMIX_LOCAL_RANK, local.to_string()),
                (sys::PMIX_NODE_RANK, local.to_string()),
                (sys::PMIX_HOSTNAME, "krun-node3".into()),
                (sys::PMIX_NODEID, "3".into()),
            ]
            .into_iter()
            .map(|(k, v)| (key(k), v))
            .collect();
            assert_eq!(got, want);
        }
        assert!(own_rank_data(1, &Layout::new(1, &[0, 0, 3, 3, 2], "7", 1))
            .unwrap()
            .is_empty());
    }

    /// The keys of the job's information for `layout` (the library must be initialised).
    fn job_keys(layout: &Layout) -> Vec<String> {
        job_info(layout, Path::new("/tmp/krun-pmix-test"))
            .unwrap()
            .0
            .iter()
            .map(key_of)
            .collect()
    }

    /// One test starts the process's one PMIx server (the library's state is global).
    #[test]
    fn ranks_learn_every_peer_from_the_maps_and_a_spare_keeps_krun_node_id_after_a_recovery() {
        use crate::runtime::pmi::placement_of;
        // Node 3: the spare of a job of 5 ranks over nodes 0-2 (none of its own yet).
        let teller: Teller = Arc::new(|_| {});
        let server = PmixServer::start(3, &[2, 2, 1, 0], "regtest", teller).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The registration holds no per-rank entry: the same keys for 5 ranks as for
            // 1,024 over 64 nodes.
            let small = job_keys(&Layout::new(1, &placement_of(&[2, 2, 1]), "7", 0));
            let wide = job_keys(&Layout::new(1, &placement_of(&[16; 64]), "7", 0));
            assert_eq!(small, wide);
            assert!(!wide.contains(&key(sys::PMIX_PROC_DATA)), "{wide:?}");
            for k in [
                &sys::PMIX_NODE_MAP[..],
                sys::PMIX_PROC_MAP,
                sys::PMIX_JOB_SIZE,
            ] {
                assert!(wide.contains(&key(k)), "{wide:?}");
            }
            let ns = "krun.regtest";
            let place = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)];
            for (r, &(node, local)) in place.iter().enumerate() {
                let r = r as u32;
                assert_eq!(get(ns, r, sys::PMIX_HOSTNAME), format!("krun-node{node}"));
                assert_eq!(get(ns, r, sys::PMIX_LOCAL_RANK), local.to_string());
                assert_eq!(get(ns, r, sys::PMIX_NODE_RANK), local.to_string());
            }
            assert_eq!(get(ns, sys::RANK_WILDCARD, sys::PMIX_JOB_SIZE), "5");
            // A recovery: node 1's ranks 2-3 restart on the spare, node 3.
            server.reincarnate(1, &[0, 0, 3, 3, 2]).unwrap();
            let ns = "krun.regtest.w1";
            // The spare's ranks: krun's node id 3 (the maps would make it 2: the spare is
            // the third node holding ranks) and the rest of their own data.
            for (r, local) in [(2u32, 0), (3, 1)] {
                assert_eq!(get(ns, r, sys::PMIX_NODEID), "3");
                assert_eq!(get(ns, r, sys::PMIX_HOSTNAME), "krun-node3");
                assert_eq!(get(ns, r, sys::PMIX_LOCAL_RANK), local.to_string());
                assert_eq!(get(ns, r, sys::PMIX_NODE_RANK), local.to_string());
                assert_eq!(get(ns, r, sys::PMIX_GLOBAL_RANK), r.to_string());
                assert_eq!(get(ns, r, sys::PMIX_APP_RANK), r.to_string());
                assert_eq!(get(ns, r, sys::PMIX_APPNUM), "0");
            }
            // The other nodes' ranks, from the new maps.
            for (r, node, local) in [(0u32, 0, 0), (1, 0, 1), (4, 2, 0)] {
                assert_eq!(get(ns, r, sys::PMIX_HOSTNAME), format!("krun-node{node}"));
                assert_eq!(get(ns, r, sys::PMIX_LOCAL_RANK), local.to_string());
                assert_eq!(get(ns, r, sys::PMIX_NODE_RANK), local.to_string());
            }
            assert_eq!(get(ns, sys::RANK_WILDCARD, sys::PMIX_LOCAL_PEERS), "2,3");
        }));
        server.finish();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    }
}
