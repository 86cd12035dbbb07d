//! Placement from locator cells, zero-copy puts of mapped image files, and the usage and
//! safety reports, on stores in one process over the loopback provider.
use ckpt_store::{Level, NodeInfo, Placement, Store, StoreConfig, StoreError};
use fabric::secret::ClusterSecret;
use fabric::{open, FabricConfig, Provider};
use std::path::PathBuf;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

struct Cluster {
    stores: Vec<Option<Store>>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stores.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    fn s(&self, i: usize) -> &Store {
        self.stores[i].as_ref().unwrap()
    }
}

fn cluster(tag: &str, groups: &[u32], k: usize, placement: Option<Placement>) -> Cluster {
    let n = groups.len();
    let secret = ClusterSecret::random().unwrap();
    let eps: Vec<_> = (0..n)
        .map(|_| open(&FabricConfig::with_provider(Provider::Loopback)).unwrap())
        .collect();
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .zip(groups)
        .map(|(e, &group)| NodeInfo {
            address: e.address(),
            group,
        })
        .collect();
    let dir = PathBuf::from(format!("/var/tmp/krun-placed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stores = eps
        .into_iter()
        .enumerate()
        .map(|(i, ep)| {
            let cfg = StoreConfig {
                node: i,
                nodes: nodes.clone(),
                arena_bytes: 32 << 20,
                disk: Some(dir.join(format!("disk{i}"))),
                keep: 2,
                parity_set: k,
                secret: secret.clone(),
                request_timeout: Duration::from_secs(3),
            };
            Some(match &placement {
                Some(p) => Store::start_placed(ep, cfg, p.clone()).unwrap(),
                None => Store::start(ep, cfg).unwrap(),
            })
        })
        .collect();
    Cluster { stores, dir }
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn stores_use_buddies_and_parity_sets_from_the_cells() {
    // Cells {0,1,2} and {3,4,5}; one failure group. Buddies cross cells, sets span them.
    let cells = vec![vec![0, 1, 2], vec![3, 4, 5]];
    let groups = [0u32; 6];
    let p = Placement::from_cells(&cells, &groups, 3).unwrap();
    let c = cluster("cells", &groups, 3, Some(p.clone()));
    for i in 0..6 {
        assert_eq!(Some(c.s(i).buddy()), p.buddy(i));
        assert_ne!(c.s(i).buddy() / 3, i / 3, "node {i}'s buddy is in its cell");
    }
    for i in 0..6 {
        c.s(i)
            .put(&format!("r{i}"), 1, &image(100_000 + i, i as u8))
            .unwrap();
    }
    for i in 0..6 {
        c.s(i).wait_safe(&format!("r{i}"), 1, Level::L3, T).unwrap();
    }
    // Node 0's copy at its buddy (in the other cell) is what another node reads once node 0
    // has forgotten its own; the buddy holds exactly that copy.
    let buddy = c.s(0).buddy();
    assert_eq!(c.s(buddy).usage().l2_held, 100_000);
    c.s(0).forget_local("r0", 1);
    let other = (0..6).find(|&n| n != 0 && n != buddy).unwrap();
    let (data, report) = c.s(other).get("r0", 1).unwrap();
    assert_eq!(data, image(100_000, 0));
    assert_eq!((report.level, report.node), (Level::L2, buddy));
    // The buddy's copy damaged too: rebuilt from node 0's parity set (which spans cells).
    assert!(c.s(buddy).corrupt_held_for_test("r0", 1, 77));
    let (data, report) = c.s(other).get("r0", 1).unwrap();
    assert_eq!(data, image(100_000, 0));
    assert_eq!(report.level, Level::L3, "{report:?}");
    let (set, _) = p.set_of(0);
    assert_eq!(report.node, p.parity_holder(set, 1));
}

#[test]
fn parity_among_rank_nodes_with_two_lanes_rebuilds_a_lost_buddy_pairs_images() {
    // Five nodes in one cell, each its own failure group: buddies 0->1->2->3->4->0. Nodes
    // 0-3 run two ranks each; node 4 is a spare (no rank, no parity set). Sets {0,1} and
    // {2,3}, two lanes: each rank's image goes into a parity of its own.
    let groups = [0u32, 1, 2, 3, 4];
    let p = Placement::from_cells(&[vec![0, 1, 2, 3, 4]], &groups, 2)
        .unwrap()
        .parity_among(&[true, true, true, true, false], 2, 2);
    assert_eq!(p.sets(), &[vec![0, 1], vec![2, 3]]);
    assert_eq!(p.parity_member(4), None);
    assert_eq!(p.buddy(0), Some(1));
    let mut c = cluster("lanes", &groups, 2, Some(p.clone()));
    let owner = |node: usize, lane: usize| format!("r{}", node * 2 + lane);
    let len = |node: usize, lane: usize| 60_000 + node * 1000 + lane * 17;
    for node in 0..4 {
        for lane in 0..2 {
            let seed = (node * 2 + lane) as u8;
            c.s(node)
                .put(&owner(node, lane), 1, &image(len(node, lane), seed))
                .unwrap();
        }
    }
    for node in 0..4 {
        for lane in 0..2 {
            c.s(node)
                .wait_safe(&owner(node, lane), 1, Level::L3, T)
                .unwrap();
        }
    }
    // The spare adopts a rank later: its image goes to L2, and it waits on no parity set.
    c.s(4).put("r9", 1, &image(5000, 9)).unwrap();
    c.s(4).wait_safe("r9", 1, Level::L2, T).unwrap();
    assert_eq!(c.s(4).flush_error("r9", 1), None);
    // Nodes 0 and 1 (node 0's buddy) are lost at once.
    c.stores[0] = None;
    c.stores[1] = None;
    for n in 2..5 {
        c.s(n).set_down(0, true).unwrap();
        c.s(n).set_down(1, true).unwrap();
    }
    for lane in 0..2 {
        // Node 0's images: no L1, no L2 left: rebuilt from parity.
        let (data, report) = c.s(4).get(&owner(0, lane), 1).unwrap();
        assert!(data == image(len(0, lane), lane as u8), "r{lane} differs");
        assert_eq!(report.level, Level::L3, "{report:?}");
        // Node 1's images: at its buddy, node 2.
        let (data, report) = c.s(4).get(&owner(1, lane), 1).unwrap();
        assert!(data == image(len(1, lane), (2 + lane) as u8));
        assert_eq!((report.level, report.node), (Level::L2, 2));
    }
}

#[test]
fn a_placement_for_another_node_count_is_refused() {
    let p = Placement::ring(&[0, 1], 0);
    let ep = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
    let address = ep.address();
    let e = Store::start_placed(
        ep,
        StoreConfig {
            node: 0,
            nodes: vec![NodeInfo { address, group: 0 }; 3],
            arena_bytes: 1 << 20,
            disk: None,
            keep: 1,
            parity_set: 0,
            secret: ClusterSecret::random().unwrap(),
            request_timeout: Duration::from_secs(1),
        },
        p,
    )
    .err()
    .expect("refused");
    assert!(e.to_string().contains("covers 2 nodes"), "{e}");
}

#[test]
fn a_mapped_file_is_stored_and_flushed_without_a_copy() {
    let mut c = cluster("mapped", &[0, 1, 2], 0, None);
    let data = image(3 << 20, 5);
    let file = c.dir.join("rank0.kgi");
    std::fs::write(&file, &data).unwrap();
    // SAFETY: the test never truncates or rewrites the file.
    let report = unsafe { c.s(0).put_file("rank-0", 1, &file) }.unwrap();
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!(report.copied, 0);
    assert_eq!(report.crc, crc32c::crc32c(&data));
    // The file may go away: the mapping keeps its pages.
    std::fs::remove_file(&file).unwrap();
    c.s(0).wait_safe("rank-0", 1, Level::L2, T).unwrap();
    c.s(0).wait_safe("rank-0", 1, Level::L4, T).unwrap();
    assert_eq!(c.s(0).copied_bytes(), 0, "a mapped put copies nothing");
    // A plain put copies its bytes once, for comparison.
    c.s(0).put("rank-0", 2, &data).unwrap();
    assert_eq!(c.s(0).copied_bytes(), data.len() as u64);
    // L1 here, L2 on the buddy, L4 on disk all hold the mapped file's bytes.
    let (got, r) = c.s(0).get("rank-0", 1).unwrap();
    assert_eq!((got == data, r.level), (true, Level::L1));
    let buddy = c.s(0).buddy();
    let other = 3 - buddy;
    c.stores[0] = None;
    let (got, r) = c.s(other).get("rank-0", 1).unwrap();
    assert!(got == data, "the buddy's copy differs");
    assert_eq!((r.level, r.node), (Level::L2, buddy));
}

/// A mapped L1 copy made the store's own (retention by line keeps old versions at L1 while
/// their files are recycled): later writes to the file no longer reach it; a file already
/// rewritten is refused by its crc and left as it was.
#[test]
fn a_mapped_copy_is_kept_in_store_memory_and_a_rewritten_file_is_refused() {
    use std::os::unix::fs::FileExt;
    let c = cluster("keepcopy", &[0, 1, 2], 0, None);
    let data = image(1 << 20, 9);
    let file = c.dir.join("rank0-v1.kgi");
    std::fs::write(&file, &data).unwrap();
    // SAFETY: the file is rewritten in place only after its copy was made the store's own
    // (below), or, for v2, to show that the store's crc check catches it.
    unsafe { c.s(0).put_file("rank-0", 1, &file) }.unwrap();
    assert_eq!(
        c.s(0).keep_local_copy("rank-0", 1).unwrap(),
        data.len() as u64
    );
    assert_eq!(
        c.s(0).keep_local_copy("rank-0", 1).unwrap(),
        0,
        "already its own"
    );
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&[0xAB; 4096], 0).unwrap();
    let (got, r) = c.s(0).get("rank-0", 1).unwrap();
    assert_eq!((got == data, r.level), (true, Level::L1));
    // v2: the file changes while mapped, before the copy: refused, named.
    let file2 = c.dir.join("rank0-v2.kgi");
    std::fs::write(&file2, &data).unwrap();
    unsafe { c.s(0).put_file("rank-0", 2, &file2) }.unwrap();
    let f2 = std::fs::OpenOptions::new()
        .write(true)
        .open(&file2)
        .unwrap();
    f2.write_all_at(&[0xCD; 16], 100).unwrap();
    let e = c.s(0).keep_local_copy("rank-0", 2).unwrap_err();
    assert!(e.to_string().contains("rank-0 v2"), "{e}");
    // A version not at L1 here: nothing to copy.
    assert_eq!(c.s(0).keep_local_copy("rank-0", 7).unwrap(), 0);
}

#[test]
fn bad_files_are_named() {
    let c = cluster("badfile", &[0, 1], 0, None);
    let missing = c.dir.join("nope.kgi");
    // SAFETY: no file to change.
    let e = unsafe { c.s(0).put_file("rank-1", 3, &missing) }.unwrap_err();
    assert!(matches!(e, StoreError::Io { .. }), "{e}");
    assert!(e.to_string().contains("nope.kgi"), "{e}");
    let empty = c.dir.join("empty.kgi");
    std::fs::write(&empty, b"").unwrap();
    // SAFETY: the test never changes the file.
    let e = unsafe { c.s(0).put_file("rank-1", 3, &empty) }.unwrap_err();
    assert!(matches!(e, StoreError::Truncated { actual: 0, .. }), "{e}");
    assert!(c.s(0).newest_safe("rank-1").at(Level::L1).is_none());
}

#[test]
fn usage_and_newest_safe_follow_puts_flushes_and_retention() {
    let c = cluster("usage", &[0, 1, 2], 3, None);
    let empty = c.s(0).usage();
    assert_eq!(
        (empty.l1, empty.l2_held, empty.l3_parity, empty.l4_disk),
        (0, 0, 0, 0)
    );
    assert_eq!(empty.arena, 32 << 20);
    assert_eq!(empty.arena_free, empty.arena);
    let len = |v: u64| 200_000 + v as usize * 4096;
    for v in 1..=3u64 {
        for i in 0..3 {
            c.s(i)
                .put(
                    &format!("o{i}"),
                    v,
                    &image(len(v), (v * 10 + i as u64) as u8),
                )
                .unwrap();
        }
        for i in 0..3 {
            for level in Level::ALL {
                c.s(i).wait_safe(&format!("o{i}"), v, level, T).unwrap();
            }
        }
    }
    let safe = c.s(0).newest_safe("o0");
    for level in Level::ALL {
        assert_eq!(safe.at(level), Some(3), "{level}");
    }
    assert_eq!(c.s(0).newest_safe("nobody").by_level, [None; 4]);
    // keep = 2: L1 holds v2 and v3 of o0.
    let u = c.s(0).usage();
    assert_eq!(u.l1, (len(2) + len(3)) as u64);
    assert_eq!(u.at(Level::L1), u.l1);
    assert!(u.l4_disk >= u.l1, "L4 holds v2 and v3 with headers: {u:?}");
    // Node 0 is the buddy of node 2 (ring, groups all different): it holds o2's v2 and v3.
    let buddy_of_2 = c.s(2).buddy();
    let held = c.s(buddy_of_2).usage();
    assert_eq!(held.l2_held, (len(2) + len(3)) as u64);
    // Parity: the holder rotates with the version (v mod 3 inside the one set) and keeps
    // its newest sets, so each of v1..v3 has one block as long as its longest member.
    let parity: u64 = (0..3).map(|i| c.s(i).usage().l3_parity).sum();
    assert_eq!(parity, (len(1) + len(2) + len(3)) as u64);
    assert!(held.arena_free < held.arena);
    // Forgetting L1 moves newest_safe at L1 back.
    c.s(0).forget_local("o0", 3);
    assert_eq!(c.s(0).newest_safe("o0").at(Level::L1), Some(2));
}

#[test]
fn gone_nodes_are_skipped_and_copies_for_them_fail_at_once() {
    let mut c = cluster("down", &[0, 1, 2], 0, None);
    c.s(0).put("a", 1, &image(50_000, 1)).unwrap();
    c.s(0).wait_safe("a", 1, Level::L2, T).unwrap();
    let buddy = c.s(0).buddy();
    let other = 3 - buddy;
    c.stores[0] = None;
    // Without being told, the reader asks node 0 first and records its failure.
    let (data, r) = c.s(other).get("a", 1).unwrap();
    assert!(data == image(50_000, 1));
    assert!(r.rejected.iter().any(|t| t.contains("node 0")), "{r:?}");
    // Told by the membership, it goes straight to the buddy.
    c.s(other).set_down(0, true).unwrap();
    assert_eq!(c.s(other).down_nodes(), vec![0]);
    let (data, r) = c.s(other).get("a", 1).unwrap();
    assert!(data == image(50_000, 1));
    assert_eq!((r.level, r.node), (Level::L2, buddy));
    assert!(r.rejected.is_empty(), "{r:?}");
    // Its buddy was node 0; the next candidate took over. With every other node gone, a
    // copy has nowhere to go and says so at once.
    let b = c.s(other).buddy();
    assert!(b != 0 && b != other, "{b}");
    c.s(other).set_down(b, true).unwrap();
    c.s(other).put("b", 1, &image(10_000, 2)).unwrap();
    let e = c
        .s(other)
        .wait_safe("b", 1, Level::L2, T)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no other node is up"), "{e}");
    assert!(c.s(other).set_down(7, true).is_err());
}

#[test]
fn registered_memory_is_stored_without_a_copy() {
    let c = cluster("registered", &[0, 1], 0, None);
    let data = image(70_000, 3);
    let mr = c
        .s(0)
        .register(fabric::Region::new(1 << 20).unwrap())
        .unwrap();
    mr.region().write_bytes(0, &data).unwrap();
    // SAFETY: nothing writes the region after this point.
    let r = unsafe { c.s(0).put_registered("rank-5", 1, mr.clone(), data.len()) }.unwrap();
    assert_eq!((r.bytes, r.copied), (data.len() as u64, 0));
    // SAFETY: as above.
    let too_long = unsafe { c.s(0).put_registered("rank-5", 2, mr, 2 << 20) };
    assert!(too_long.is_err());
    c.s(0).wait_safe("rank-5", 1, Level::L2, T).unwrap();
    assert_eq!(c.s(0).copied_bytes(), 0);
    c.s(0).forget_local("rank-5", 1);
    let (got, report) = c.s(0).get("rank-5", 1).unwrap();
    assert!(got == data);
    assert_eq!((report.level, report.node), (Level::L2, 1));
}

#[test]
fn a_gone_buddy_is_replaced_and_the_l1_versions_are_sent_to_the_next() {
    let mut c = cluster("rebuddy", &[0, 1, 2, 3], 0, None);
    for v in 1..=2 {
        c.s(0).put("r0", v, &image(80_000, v as u8)).unwrap();
        c.s(0).wait_safe("r0", v, Level::L2, T).unwrap();
    }
    assert_eq!(c.s(0).buddy(), 1);
    // Node 1 dies with node 0's L2 copies; the membership tells node 0.
    c.stores[1] = None;
    c.s(0).set_down(1, true).unwrap();
    assert_eq!(c.s(0).buddy(), 2, "the next candidate takes over");
    for v in 1..=2 {
        c.s(0).wait_safe("r0", v, Level::L2, T).unwrap();
    }
    assert_eq!(c.s(0).newest_safe("r0").at(Level::L2), Some(2));
    assert_eq!(c.s(2).usage().l2_held, 2 * 80_000);
    // Node 0 dies as well: node 3, told of both, reads r0 from node 2.
    c.stores[0] = None;
    c.s(3).set_down(1, true).unwrap();
    c.s(3).set_down(0, true).unwrap();
    let (data, r) = c.s(3).get("r0", 2).unwrap();
    assert!(data == image(80_000, 2));
    assert_eq!((r.level, r.node), (Level::L2, 2));
    assert!(r.rejected.is_empty(), "{r:?}");
}
