//! The memory levels in one process over the loopback provider: safety progression,
//! retention, fallbacks past corrupt copies, and a lost node's image from its buddy or parity.
use ckpt_store::{Level, NodeInfo, ParityState, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::{open, FabricConfig, Provider};
use std::path::PathBuf;
use std::time::Duration;

struct Cluster {
    stores: Vec<Option<Store>>,
    dirs: Vec<PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stores.clear();
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn cluster(tag: &str, n: usize, k: usize, groups: &[u32]) -> Cluster {
    let secret = ClusterSecret::random().unwrap();
    let eps: Vec<_> = (0..n)
        .map(|_| open(&FabricConfig::with_provider(Provider::Loopback)).unwrap())
        .collect();
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| NodeInfo {
            address: e.address(),
            group: groups[i],
        })
        .collect();
    let dirs: Vec<PathBuf> = (0..n)
        .map(|i| {
            PathBuf::from(format!(
                "/var/tmp/krun-levels-{tag}-{}-{i}",
                std::process::id()
            ))
        })
        .collect();
    let stores = eps
        .into_iter()
        .enumerate()
        .map(|(i, ep)| {
            Some(
                Store::start(
                    ep,
                    StoreConfig {
                        node: i,
                        nodes: nodes.clone(),
                        arena_bytes: 64 << 20,
                        disk: Some(dirs[i].clone()),
                        keep: 2,
                        parity_set: k,
                        secret: secret.clone(),
                        request_timeout: Duration::from_secs(3),
                    },
                )
                .unwrap(),
            )
        })
        .collect();
    Cluster { stores, dirs }
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

const T: Duration = Duration::from_secs(20);

fn s(c: &Cluster, i: usize) -> &Store {
    c.stores[i].as_ref().unwrap()
}

#[test]
fn versions_become_safe_level_by_level_and_old_ones_are_dropped() {
    let c = cluster("safe", 3, 3, &[0, 1, 2]);
    for v in 1..=4u64 {
        for i in 0..3 {
            s(&c, i)
                .put(&format!("job/r{i}"), v, &image(300_000 + i * 1000, v as u8))
                .unwrap();
        }
        for i in 0..3 {
            for level in Level::ALL {
                s(&c, i)
                    .wait_safe(&format!("job/r{i}"), v, level, T)
                    .unwrap();
            }
        }
    }
    // keep = 2: v1 and v2 are gone from L1 and L4, v3 and v4 remain. A level drops the old
    // versions after it marks the new one safe (the same flush thread), so `wait_safe` on
    // v4 can return just before the drop: wait for it, bounded by T.
    let st = s(&c, 0);
    let until = std::time::Instant::now() + T;
    let settled = |done: &dyn Fn() -> bool| {
        while !done() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        done()
    };
    assert!(
        settled(&|| !st.is_safe("job/r0", 1, Level::L1)),
        "v1 still safe at L1"
    );
    assert!(
        settled(&|| !st.is_safe("job/r0", 2, Level::L4)),
        "v2 still safe at L4"
    );
    assert!(st.is_safe("job/r0", 3, Level::L4));
    let (data, report) = st.get("job/r0", 4).unwrap();
    assert_eq!(data, image(300_000, 4));
    assert_eq!(report.level, Level::L1);
    assert!(
        settled(&|| st.get("job/r0", 1).is_err()),
        "v1 still readable from some level"
    );
}

/// Retention by line (the uncoordinated policy without logging): versions past the newest
/// `keep` stay until the policy raises the owner's floor, then only those below it go; a
/// lower floor later changes nothing.
#[test]
fn retained_by_line_old_versions_stay_until_the_floor_passes_them() {
    let c = cluster("line", 3, 1, &[0, 1, 2]);
    let st = s(&c, 0);
    st.retain_by_line();
    assert_eq!(st.floor("r0"), Some(0));
    let put = |v: u64| {
        st.put("r0", v, &image(100_000, v as u8)).unwrap();
        for level in [Level::L1, Level::L2, Level::L4] {
            st.wait_safe("r0", v, level, T).unwrap();
        }
    };
    for v in 1..=5 {
        put(v);
    }
    // keep = 2, but no floor yet: every version stays at every level.
    for v in 1..=5 {
        for level in [Level::L1, Level::L2, Level::L4] {
            assert!(st.is_safe("r0", v, level), "v{v} at {level}");
        }
        assert_eq!(st.get("r0", v).unwrap().0, image(100_000, v as u8));
    }
    // The line moved to v3: v1 and v2 go at the next safe version; v3 and newer stay.
    st.keep_from("r0", 3);
    st.keep_from("r0", 2);
    assert_eq!(st.floor("r0"), Some(3), "a floor never goes down");
    put(6);
    // The drop follows the level's safety flag (same flush thread): wait for it, bounded.
    let gone = |v: u64, level: Level| {
        let until = std::time::Instant::now() + T;
        while st.is_safe("r0", v, level) && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        !st.is_safe("r0", v, level)
    };
    for level in [Level::L1, Level::L2, Level::L4] {
        assert!(gone(1, level), "v1 at {level}");
        assert!(gone(2, level), "v2 at {level}");
        assert!(st.is_safe("r0", 3, level), "v3 at {level}");
    }
    assert!(st.get("r0", 2).is_err());
    assert_eq!(st.get("r0", 3).unwrap().0, image(100_000, 3));
    // Another owner of the same store has no floor: it keeps everything.
    st.put("r9", 1, &image(1000, 1)).unwrap();
    assert_eq!(st.floor("r9"), Some(0));
    // A store retaining by count has no floor.
    assert_eq!(s(&c, 1).floor("r0"), None);
}

#[test]
fn corrupt_copies_are_reported_and_the_next_level_is_used() {
    let c = cluster("fallback", 3, 3, &[0, 1, 2]);
    for i in 0..3 {
        s(&c, i)
            .put(&format!("r{i}"), 7, &image(200_000, i as u8))
            .unwrap();
    }
    for i in 0..3 {
        s(&c, i)
            .wait_safe(&format!("r{i}"), 7, Level::L3, T)
            .unwrap();
    }
    // L1 flipped: L2 from the buddy.
    assert!(s(&c, 0).corrupt_l1_for_test("r0", 7, 1234));
    let (data, report) = s(&c, 0).get("r0", 7).unwrap();
    assert_eq!(data, image(200_000, 0));
    assert_eq!(report.level, Level::L2);
    assert_eq!(report.node, s(&c, 0).buddy());
    assert!(report.rejected[0].contains("L1"), "{:?}", report.rejected);
    // L2 flipped as well: rebuilt from parity (L3).
    let buddy = s(&c, 0).buddy();
    assert!(s(&c, buddy).corrupt_held_for_test("r0", 7, 99));
    let (data, report) = s(&c, 0).get("r0", 7).unwrap();
    assert_eq!(data, image(200_000, 0));
    assert_eq!(report.level, Level::L3, "{report:?}");
    assert!(
        report.rejected.iter().any(|r| r.contains("checksum")),
        "{:?}",
        report.rejected
    );
}

#[test]
fn a_lost_node_image_comes_back_from_its_buddy_or_from_parity() {
    let mut c = cluster("lost", 4, 3, &[0, 1, 2, 3]);
    // Nodes 0..2 form the parity set; node 3 holds its parity.
    for i in 0..4 {
        s(&c, i)
            .put(&format!("n{i}"), 1, &image(150_000 + 7 * i, 10 + i as u8))
            .unwrap();
    }
    for i in 0..3 {
        s(&c, i)
            .wait_safe(&format!("n{i}"), 1, Level::L3, T)
            .unwrap();
    }
    let buddy = s(&c, 0).buddy();
    assert_eq!(buddy, 1);
    // Node 0 dies: its image is read from its buddy's memory by another node.
    c.stores[0] = None;
    let (data, report) = s(&c, 2).get("n0", 1).unwrap();
    assert_eq!(data, image(150_000, 10));
    assert_eq!((report.level, report.node), (Level::L2, 1));
    // The buddy's copy is damaged too: node 3 rebuilds it from parity and the others.
    assert!(s(&c, 1).corrupt_held_for_test("n0", 1, 5));
    let (data, report) = s(&c, 3).get("n0", 1).unwrap();
    assert_eq!(data, image(150_000, 10));
    assert_eq!(report.level, Level::L3, "{report:?}");
}

/// Waits (bounded) until `owner`'s `version` on store `i` has a parity verdict.
fn parity_settled(c: &Cluster, i: usize, owner: &str, version: u64) -> ParityState {
    let deadline = std::time::Instant::now() + T;
    loop {
        let state = s(c, i).parity_state(owner, version);
        if state != ParityState::Waiting || std::time::Instant::now() >= deadline {
            return state;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn each_copy_names_the_node_holding_it_and_a_version_put_again_starts_afresh() {
    // Ring placement: nodes 0..2 form the parity set, node 3 (the next set) keeps its parity.
    let c = cluster("holders", 4, 3, &[0, 1, 2, 3]);
    for i in 0..3 {
        s(&c, i)
            .put(&format!("h{i}"), 1, &image(120_000, 40 + i as u8))
            .unwrap();
    }
    for i in 0..3 {
        let owner = format!("h{i}");
        s(&c, i).wait_safe(&owner, 1, Level::L2, T).unwrap();
        assert_eq!(
            parity_settled(&c, i, &owner, 1),
            ParityState::Safe { holder: 3 }
        );
        assert_eq!(s(&c, i).copy_holder(&owner, 1, Level::L1), Some(i));
        assert_eq!(
            s(&c, i).copy_holder(&owner, 1, Level::L2),
            Some(s(&c, i).buddy())
        );
        assert_eq!(s(&c, i).copy_holder(&owner, 1, Level::L3), Some(3));
        // L4 is a disk directory, not a node; unknown versions are held nowhere.
        s(&c, i).wait_safe(&owner, 1, Level::L4, T).unwrap();
        assert_eq!(s(&c, i).copy_holder(&owner, 1, Level::L4), None);
        assert_eq!(s(&c, i).copy_holder(&owner, 9, Level::L1), None);
        assert_eq!(s(&c, i).parity_state(&owner, 9), ParityState::Waiting);
    }
    // Version 1 taken again with other bytes (a recovery rolled the job back): the parity
    // of the first images does not count for the new ones, a new one is computed, and a
    // rebuild gives the new bytes.
    for i in 0..3 {
        s(&c, i)
            .put(&format!("h{i}"), 1, &image(130_000, 90 + i as u8))
            .unwrap();
    }
    for i in 0..3 {
        let owner = format!("h{i}");
        assert_eq!(
            parity_settled(&c, i, &owner, 1),
            ParityState::Safe { holder: 3 }
        );
        s(&c, i).wait_safe(&owner, 1, Level::L2, T).unwrap();
    }
    let buddy = s(&c, 0).buddy();
    assert!(s(&c, 0).corrupt_l1_for_test("h0", 1, 77));
    assert!(s(&c, buddy).corrupt_held_for_test("h0", 1, 78));
    let (data, report) = s(&c, 0).get("h0", 1).unwrap();
    assert_eq!(report.level, Level::L3, "{report:?}");
    assert_eq!((report.node, data), (3, image(130_000, 90)));
    // A set with a member gone cannot complete: no parity is planned for it.
    s(&c, 0).set_down(2, true).unwrap();
    s(&c, 0).put("h0", 2, &image(1000, 1)).unwrap();
    assert_eq!(parity_settled(&c, 0, "h0", 2), ParityState::Skipped);
    assert_eq!(s(&c, 0).copy_holder("h0", 2, Level::L3), None);
}
