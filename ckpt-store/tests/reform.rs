//! Buddies and parity sets re-formed after a lost buddy pair, on six stores in one process
//! over the loopback provider: four nodes run one owner each, two are spares. The first
//! pair lost is rebuilt from the parity of the start; the stores then re-form their
//! placement among the nodes left ([`Placement::among`], the spares that took the owners
//! over in a set), and a second pair lost (the two spares) is rebuilt from the new sets.
use ckpt_store::{Level, NodeInfo, ParityState, Placement, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::{open, FabricConfig, Provider};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

/// Waits (bounded) until the owner's version has a parity verdict on `store`.
fn parity(store: &Store, owner: &str, version: u64) -> ParityState {
    let deadline = Instant::now() + T;
    loop {
        let state = store.parity_state(owner, version);
        if state != ParityState::Waiting || Instant::now() >= deadline {
            return state;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn s(stores: &[Option<Store>], i: usize) -> &Store {
    stores[i].as_ref().unwrap()
}

/// Drops the stores of `gone` and tells every other store.
fn lose(stores: &mut [Option<Store>], gone: &[usize]) {
    for &g in gone {
        stores[g] = None;
    }
    for s in stores.iter().flatten() {
        for &g in gone {
            s.set_down(g, true).unwrap();
        }
    }
}

#[test]
fn a_second_buddy_pair_lost_after_a_reform_is_rebuilt_from_the_new_parity_sets() {
    let n = 6;
    let secret = ClusterSecret::random().unwrap();
    let eps: Vec<_> = (0..n)
        .map(|_| open(&FabricConfig::with_provider(Provider::Loopback)).unwrap())
        .collect();
    let groups: Vec<u32> = (0..n as u32).collect();
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .zip(&groups)
        .map(|(e, &group)| NodeInfo {
            address: e.address(),
            group,
        })
        .collect();
    // One cell; nodes 0-3 run owners, 4 and 5 are spares: buddies 0 -> 1 -> 2 -> 3 -> 4 ->
    // 5 -> 0, parity sets {0, 1} and {2, 3}.
    let cells = vec![(0..n).collect::<Vec<usize>>()];
    let ranked = [true, true, true, true, false, false];
    let start = Placement::from_cells(&cells, &groups, 2)
        .unwrap()
        .parity_among(&ranked, 2, 1);
    assert_eq!(start.sets(), &[vec![0, 1], vec![2, 3]]);
    assert_eq!(start.buddy(0), Some(1));
    let mut stores: Vec<Option<Store>> = eps
        .into_iter()
        .enumerate()
        .map(|(i, ep)| {
            let cfg = StoreConfig {
                node: i,
                nodes: nodes.clone(),
                arena_bytes: 16 << 20,
                disk: None,
                keep: 3,
                parity_set: 2,
                secret: secret.clone(),
                request_timeout: Duration::from_secs(3),
            };
            Some(Store::start_placed(ep, cfg, start.clone()).unwrap())
        })
        .collect();
    let owners = ["o0", "o1", "o2", "o3"];
    // Version 1 of each owner on its node, covered by parity.
    for (i, o) in owners.iter().enumerate() {
        s(&stores, i)
            .put(o, 1, &image(90_000 + 100 * i, i as u8))
            .unwrap();
    }
    for (i, o) in owners.iter().enumerate() {
        assert!(
            matches!(parity(s(&stores, i), o, 1), ParityState::Safe { .. }),
            "{o}"
        );
    }
    // The first pair: nodes 0 and 1. o0 lost L1 and L2: rebuilt from parity; its owner
    // moves to spare 4, o1 to spare 5.
    lose(&mut stores, &[0, 1]);
    let (data, report) = s(&stores, 4).get("o0", 1).unwrap();
    assert_eq!(report.level, Level::L3, "{report:?}");
    assert_eq!(data, image(90_000, 0));
    // Every node left re-forms among nodes 2-5, with owners on all of them.
    let up = [false, false, true, true, true, true];
    let reformed = Placement::among(&cells, &groups, 2, &up)
        .unwrap()
        .parity_among(&up, 2, 1);
    for i in 2..n {
        s(&stores, i).reform(reformed.clone()).unwrap();
    }
    // The spares are in sets now, and have buddies among the nodes left.
    for i in 2..n {
        let (buddy, set) = s(&stores, i).placed();
        assert!(up[buddy] && buddy != i, "node {i}: buddy {buddy}");
        let set = set.unwrap_or_else(|| panic!("node {i} is in no parity set"));
        assert!(set.contains(&i) && set.iter().all(|&m| up[m]), "{set:?}");
    }
    // Version 2 of every owner where it runs now: node 4 runs o0, node 5 runs o1.
    let home = [4usize, 5, 2, 3];
    for (o, &node) in owners.iter().zip(&home) {
        s(&stores, node)
            .put(o, 2, &image(80_000 + node, 50 + node as u8))
            .unwrap();
    }
    for (o, &node) in owners.iter().zip(&home) {
        let store = s(&stores, node);
        let (set, _) = reformed.parity_member(node).unwrap();
        assert_eq!(
            parity(store, o, 2),
            ParityState::Safe {
                holder: reformed.parity_holder(set, 2)
            },
            "{o} on node {node}"
        );
        store.wait_safe(o, 2, Level::L2, T).unwrap();
        assert_eq!(store.copy_holder(o, 2, Level::L2), reformed.buddy(node));
    }
    // The second pair: node 4 and its buddy. o0 lost L1 and L2 again: rebuilt from the
    // re-formed sets by a node left.
    let b4 = reformed.buddy(4).unwrap();
    lose(&mut stores, &[4, b4]);
    let reader = (2..n).find(|&i| i != 4 && i != b4).unwrap();
    let (data, report) = s(&stores, reader).get("o0", 2).unwrap();
    assert_eq!(report.level, Level::L3, "{report:?}");
    assert_eq!(data, image(80_004, 54));
}
