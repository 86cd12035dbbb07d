//! `Store::get_to_file`: a copy on another node is read with RMA straight into the file
//! (the restore's image file), copies failing their checksum are skipped for the next one,
//! a holder gone before or during the transfer is reported and the next copy used, and a
//! failed fetch leaves no partial image behind. In one process over the loopback provider.
use ckpt_store::{Level, NodeInfo, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::{open, FabricConfig, Provider};
use std::path::{Path, PathBuf};
use std::time::Duration;

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

fn cluster(tag: &str, n: usize) -> Cluster {
    let secret = ClusterSecret::random().unwrap();
    let eps: Vec<_> = (0..n)
        .map(|_| open(&FabricConfig::with_provider(Provider::Loopback)).unwrap())
        .collect();
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| NodeInfo {
            address: e.address(),
            group: i as u32,
        })
        .collect();
    let dir = PathBuf::from(format!("/var/tmp/krun-tofile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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
                        arena_bytes: 256 << 20,
                        disk: None,
                        keep: 2,
                        parity_set: 0,
                        secret: secret.clone(),
                        request_timeout: Duration::from_secs(3),
                    },
                )
                .unwrap(),
            )
        })
        .collect();
    Cluster { stores, dir }
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
        .collect()
}

const T: Duration = Duration::from_secs(20);

fn s(c: &Cluster, i: usize) -> &Store {
    c.stores[i].as_ref().unwrap()
}

fn same_file(path: &Path, want: &[u8]) -> bool {
    std::fs::read(path).unwrap() == want
}

#[test]
fn a_remote_copy_lands_in_the_file_and_corrupt_copies_are_skipped() {
    let c = cluster("corrupt", 3);
    // Not a multiple of a page: the file is cut to the image's length.
    let want = image(3 * (1 << 20) + 17, 5);
    s(&c, 0).put("r0", 1, &want).unwrap();
    s(&c, 0).wait_safe("r0", 1, Level::L2, T).unwrap();
    let buddy = s(&c, 0).buddy();
    assert_ne!(buddy, 2, "node 2 must hold no copy of r0 for this test");

    // Node 2 reads node 0's L1 copy straight into a file that held something longer.
    let path = c.dir.join("r0.kgi");
    std::fs::write(&path, vec![0xEEu8; 5 << 20]).unwrap();
    let report = s(&c, 2).get_to_file("r0", 1, &path).unwrap();
    assert_eq!((report.level, report.node), (Level::L1, 0));
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert!(same_file(&path, &want), "the file is not the image");

    // Node 0's L1 copy damaged: its checksum fails, the buddy's L2 copy is used.
    assert!(s(&c, 0).corrupt_l1_for_test("r0", 1, 4321));
    let report = s(&c, 2).get_to_file("r0", 1, &path).unwrap();
    assert_eq!(
        (report.level, report.node),
        (Level::L2, buddy),
        "{report:?}"
    );
    assert!(
        report
            .rejected
            .iter()
            .any(|r| r.contains("node 0") && r.contains("checksum")),
        "{:?}",
        report.rejected
    );
    assert!(same_file(&path, &want), "the file is not the image");

    // The buddy's copy damaged too: no valid copy is left; the error names what failed and
    // no partial image stays at the path.
    assert!(s(&c, buddy).corrupt_held_for_test("r0", 1, 99));
    let err = s(&c, 2)
        .get_to_file("r0", 1, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum"), "{err}");
    assert!(!path.exists(), "a failed fetch left {}", path.display());

    // A version nobody holds: not found, no file.
    let err = s(&c, 2)
        .get_to_file("r0", 9, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("r0") && err.contains('9'), "{err}");
    assert!(!path.exists());
}

#[test]
fn a_holder_gone_before_or_during_the_transfer_is_reported_and_the_buddy_copy_used() {
    let mut c = cluster("gone", 3);
    let want = image(96 << 20, 9);
    s(&c, 0).put("r0", 1, &want).unwrap();
    s(&c, 0).wait_safe("r0", 1, Level::L2, T).unwrap();
    let buddy = s(&c, 0).buddy();
    assert_eq!(
        buddy, 1,
        "the buddy of node 0 is node 1 in a ring of 3 groups"
    );
    let path = c.dir.join("r0.kgi");

    // During: node 0 goes while node 2 reads its L1 copy. Whether the reads finish first is
    // up to the scheduler; either way the file ends up the whole image (from node 0 or, after
    // node 0 failed mid-transfer, from the buddy), never a partial one.
    let holder = c.stores[0].take().unwrap();
    let reader = c.stores[2].take().unwrap();
    let (report, reader) = std::thread::scope(|scope| {
        let p = path.clone();
        let fetch = scope.spawn(move || (reader.get_to_file("r0", 1, &p), reader));
        std::thread::sleep(Duration::from_millis(2));
        drop(holder);
        fetch.join().unwrap()
    });
    c.stores[2] = Some(reader);
    let report = report.unwrap();
    assert!(same_file(&path, &want), "the file is not the image");
    match report.node {
        0 => assert!(report.rejected.is_empty(), "{report:?}"),
        1 => assert_eq!(report.level, Level::L2, "{report:?}"),
        n => panic!("the copy came from node {n}, which holds none: {report:?}"),
    }

    // Before: node 0 is gone for good now; its copy comes from the buddy, and the attempt on
    // node 0 is reported.
    std::fs::remove_file(&path).unwrap();
    let report = s(&c, 2).get_to_file("r0", 1, &path).unwrap();
    assert_eq!((report.level, report.node), (Level::L2, 1), "{report:?}");
    assert!(
        report.rejected.iter().any(|r| r.contains("node 0")),
        "{:?}",
        report.rejected
    );
    assert!(same_file(&path, &want), "the file is not the image");
}
