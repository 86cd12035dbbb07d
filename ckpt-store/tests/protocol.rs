//! The store's control protocol under bad input: a store node drops garbage, forged,
//! replayed, truncated and oversized messages (logging each) and keeps serving its peers.
//! Node 2 of the job is this test, speaking the protocol by hand over the loopback provider.
use ckpt_store::store::{REPLY_TAG, STORE_TAG};
use ckpt_store::wire::{Body, Envelope};
use ckpt_store::{Level, NodeInfo, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::wire::{Protocol, Sealer};
use fabric::{open, FabricConfig, Provider};
use std::time::Duration;

#[test]
fn bad_messages_are_dropped_and_the_store_keeps_serving() {
    let secret = ClusterSecret::random().unwrap();
    let eps: Vec<_> = (0..3)
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
    let mut eps = eps.into_iter();
    let mut stores: Vec<Store> = (0..2)
        .map(|i| {
            Store::start(
                eps.next().unwrap(),
                StoreConfig {
                    node: i,
                    nodes: nodes.clone(),
                    arena_bytes: 16 << 20,
                    disk: None,
                    keep: 2,
                    parity_set: 1,
                    secret: secret.clone(),
                    request_timeout: Duration::from_secs(3),
                },
            )
            .unwrap()
        })
        .collect();
    let me = eps.next().unwrap();
    let node0 = me.connect(&nodes[0].address).unwrap();
    let mut sealer = Sealer::new(&secret, Protocol::Store).unwrap();
    let mut reply_opener = fabric::wire::Opener::new(&secret, Protocol::Store, 1 << 20);
    let lookup = |request: u64| Envelope {
        request,
        from_node: 2,
        body: Body::Lookup {
            owner: "rank0".into(),
            version: 1,
        },
    };
    // Does node 0 answer `request` (within 1 s)?
    let answered = |request: u64, opener: &mut fabric::wire::Opener| {
        me.recv(REPLY_TAG | request, Duration::from_secs(1))
            .ok()
            .map(|m| opener.open::<Envelope>(&m.data).unwrap().1)
    };

    // A legitimate request from this node is answered.
    let first = sealer.seal(&lookup(1)).unwrap();
    me.send(node0, STORE_TAG, &first).unwrap();
    let a = answered(1, &mut reply_opener).expect("an answer");
    assert_eq!((a.request, a.from_node, a.body), (1, 0, Body::NotFound));

    // The same frame again: a replay, dropped.
    me.send(node0, STORE_TAG, &first).unwrap();
    assert!(
        answered(1, &mut reply_opener).is_none(),
        "a replay was served"
    );
    // A bad tag.
    let mut f = sealer.seal(&lookup(2)).unwrap();
    let last = f.len() - 1;
    f[last] ^= 1;
    me.send(node0, STORE_TAG, &f).unwrap();
    assert!(
        answered(2, &mut reply_opener).is_none(),
        "a forgery was served"
    );
    // Truncated.
    let f = sealer.seal(&lookup(3)).unwrap();
    me.send(node0, STORE_TAG, &f[..f.len() - 5]).unwrap();
    assert!(
        answered(3, &mut reply_opener).is_none(),
        "a truncated frame was served"
    );
    // A header announcing 64 MiB.
    let mut f = sealer.seal(&lookup(4)).unwrap();
    f[24..28].copy_from_slice(&(64u32 << 20).to_le_bytes());
    me.send(node0, STORE_TAG, &f).unwrap();
    assert!(
        answered(4, &mut reply_opener).is_none(),
        "a huge frame was served"
    );
    // Garbage, and a frame sealed with another secret.
    me.send(node0, STORE_TAG, b"garbage garbage garbage garbage garbage")
        .unwrap();
    let mut stranger = Sealer::new(&ClusterSecret::random().unwrap(), Protocol::Store).unwrap();
    me.send(node0, STORE_TAG, &stranger.seal(&lookup(5)).unwrap())
        .unwrap();
    assert!(
        answered(5, &mut reply_opener).is_none(),
        "a stranger was served"
    );
    // A frame claiming to come from node 1.
    let mut claim = lookup(6);
    claim.from_node = 1;
    me.send(node0, STORE_TAG, &sealer.seal(&claim).unwrap())
        .unwrap();
    assert!(
        answered(6, &mut reply_opener).is_none(),
        "an impostor was served"
    );

    // A reservation of 2^64 - 1 bytes is refused by name (it used to overflow).
    let huge = Envelope {
        request: 8,
        from_node: 2,
        body: Body::Reserve {
            owner: "rank2".into(),
            version: 1,
            len: u64::MAX,
            kind: 0,
            set: 0,
            member: 0,
        },
    };
    me.send(node0, STORE_TAG, &sealer.seal(&huge).unwrap())
        .unwrap();
    match answered(8, &mut reply_opener).map(|e| e.body) {
        Some(Body::Error(why)) => assert!(why.contains("arena full"), "{why}"),
        other => panic!("a huge reservation answered {other:?}"),
    }

    // Node 0 still serves this node's next request, and copies to and reads from node 1.
    me.send(node0, STORE_TAG, &sealer.seal(&lookup(7)).unwrap())
        .unwrap();
    assert!(
        answered(7, &mut reply_opener).is_some(),
        "node 0 stopped serving"
    );
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    stores[0].put("rank0", 1, &image).unwrap();
    stores[0]
        .wait_safe("rank0", 1, Level::L2, Duration::from_secs(20))
        .unwrap();
    stores[0].forget_local("rank0", 1);
    let (back, _) = stores[0].get("rank0", 1).unwrap();
    assert_eq!(back, image);
    stores.clear();
}
