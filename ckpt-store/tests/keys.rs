//! A buddy's remote key reaches the range it reserved and nothing else of the lender's
//! arena: not the copies of other owners, not the rest of the arena, and not its own range
//! once it committed. Node 2 of the job is this test, speaking the store protocol by hand
//! over the loopback provider (which checks keys and ranges as the real providers do).
use ckpt_store::store::{REPLY_TAG, STORE_TAG};
use ckpt_store::wire::{Body, Envelope};
use ckpt_store::{Level, NodeInfo, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::wire::{Opener, Protocol, Sealer};
use fabric::{open, FabricConfig, FabricError, Provider, Region, RemoteRegion};
use std::time::Duration;

#[test]
fn a_buddy_key_reaches_its_reserved_range_alone_and_dies_with_the_commit() {
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
    // Another owner's copy lands in the arena of its buddy.
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    stores[0].put("rank0", 1, &image).unwrap();
    stores[0]
        .wait_safe("rank0", 1, Level::L2, Duration::from_secs(20))
        .unwrap();
    let lender = stores[0].buddy();
    assert!(lender < 2, "the buddy of node 0 is a store node");

    let me = eps.next().unwrap();
    let peer = me.connect(&nodes[lender].address).unwrap();
    let mut sealer = Sealer::new(&secret, Protocol::Store).unwrap();
    let mut opener = Opener::new(&secret, Protocol::Store, 1 << 20);
    let mut ask = |request: u64, body: Body| {
        let env = Envelope {
            request,
            from_node: 2,
            body,
        };
        me.send(peer, STORE_TAG, &sealer.seal(&env).unwrap())
            .unwrap();
        let m = me
            .recv(REPLY_TAG | request, Duration::from_secs(5))
            .expect("an answer");
        opener.open::<Envelope>(&m.data).unwrap().1.body
    };

    const LEN: u64 = 8192;
    let reserve = Body::Reserve {
        owner: "rank2".into(),
        version: 1,
        len: LEN,
        kind: 0,
        set: 0,
        member: 0,
    };
    let (offset, remote) = match ask(1, reserve) {
        Body::Reserved { offset, remote } => (offset, RemoteRegion::from_bytes(&remote).unwrap()),
        other => panic!("Reserve answered {other:?}"),
    };
    assert_eq!(
        remote.len, LEN,
        "the key covers the reservation, not the arena"
    );

    let data = me.register(Region::new(1 << 20).unwrap()).unwrap();
    let payload: Vec<u8> = (0..LEN).map(|i| (i * 7 % 256) as u8).collect();
    data.write_bytes(0, &payload).unwrap();
    let write = |len: usize, at: u64| -> Result<u64, FabricError> {
        // SAFETY: `data` outlives the completion, which is waited for here.
        unsafe { me.post_write(peer, &data, 0, len, &remote, at) }.and_then(|c| c.wait())
    };
    // The reserved range itself.
    write(LEN as usize, 0).expect("a write into the reserved range");
    // One byte past it, and a megabyte in (where the arena's other copies live): refused.
    for at in [LEN, 1 << 20, 64 << 10] {
        match write(1, at) {
            Err(FabricError::RemoteAccess { .. }) | Err(FabricError::OutOfBounds { .. }) => {}
            other => panic!("a write at {at} past the reserved range gave {other:?}"),
        }
    }
    match write(2 * LEN as usize, 0) {
        Err(FabricError::RemoteAccess { .. }) | Err(FabricError::OutOfBounds { .. }) => {}
        other => panic!("a write longer than the reservation gave {other:?}"),
    }

    // The commit takes the copy; the writer's key dies with the reservation.
    let commit = Body::Commit {
        owner: "rank2".into(),
        version: 1,
        kind: 0,
        set: 0,
        member: 0,
        offset,
        len: LEN,
        crc: crc32c::crc32c(&payload),
    };
    assert_eq!(ask(2, commit), Body::Ack { complete: true });
    match write(8, 0) {
        Err(FabricError::RemoteAccess { .. }) => {}
        other => panic!("a write with a committed reservation's key gave {other:?}"),
    }

    // A reader is lent the copy it asked for, alone, and reads it back.
    let found = ask(
        3,
        Body::Lookup {
            owner: "rank2".into(),
            version: 1,
        },
    );
    let Body::Found {
        level: 2,
        offset: 0,
        len: LEN,
        remote: copy,
        ..
    } = found
    else {
        panic!("Lookup answered {found:?}");
    };
    let copy = RemoteRegion::from_bytes(&copy).unwrap();
    assert_eq!(copy.len, LEN);
    let back = me.register(Region::new(LEN as usize).unwrap()).unwrap();
    // SAFETY: `back` outlives the completion, which is waited for here.
    unsafe { me.post_read(peer, &back, 0, LEN as usize, &copy, 0) }
        .and_then(|c| c.wait())
        .unwrap();
    let mut got = vec![0u8; LEN as usize];
    back.read_bytes(0, &mut got).unwrap();
    assert_eq!(got, payload);

    // The other owner's copy was never reachable and is intact.
    stores[0].forget_local("rank0", 1);
    let (again, _) = stores[0].get("rank0", 1).unwrap();
    assert_eq!(again, image);
    stores.clear();
}
