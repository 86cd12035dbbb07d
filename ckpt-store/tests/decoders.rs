//! Property tests: the store's datagram decoder (a sealed frame carrying an `Envelope` and
//! its `Body`) returns an error on random and mutated input: it never panics, never accepts
//! a forged or replayed message and never allocates beyond a bound whatever a length field
//! announces.
use ckpt_store::wire::{Body, Channel, Envelope};
use fabric::fuzz::{case_count, cases, check, max_alloc, seed, MaxAlloc};
use fabric::secret::ClusterSecret;
use fabric::wire::{self, Protocol};

#[global_allocator]
static ALLOC: MaxAlloc = MaxAlloc;

const CASES: usize = 20_000;
const ALLOC_BOUND: usize = 2 << 20;

fn secret() -> ClusterSecret {
    ClusterSecret::new(b"the store's property test secret".to_vec()).unwrap()
}

fn envelopes() -> Vec<Envelope> {
    let bodies = vec![
        Body::Reserve {
            owner: "krun-job7/rank3".into(),
            version: 4,
            len: u64::MAX,
            kind: 1,
            set: 2,
            member: 0,
        },
        Body::Reserved {
            offset: 4096,
            remote: vec![1; 24],
        },
        Body::Commit {
            owner: "o".into(),
            version: 1,
            kind: 0,
            set: 0,
            member: 0,
            offset: 0,
            len: 1 << 30,
            crc: 0xdead_beef,
        },
        Body::Ack { complete: true },
        Body::Lookup {
            owner: String::new(),
            version: 0,
        },
        Body::Found {
            level: 2,
            offset: 8,
            len: 9,
            crc: 1,
            remote: vec![],
        },
        Body::NotFound,
        Body::Drop {
            owner: "x".into(),
            version: 3,
        },
        Body::Parity { set: 1, version: 2 },
        Body::ParityFound {
            offset: 1,
            len: 2,
            crc: 3,
            remote: vec![7; 24],
            members: vec![(0, 1, "a".into(), 10, 11), (1, 2, "b".into(), 12, 13)],
        },
        Body::Error("arena full".into()),
    ];
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Envelope {
            request: i as u64 * 1000,
            from_node: i as u32,
            body,
        })
        .collect()
}

#[test]
fn store_messages_never_panic_and_decode_as_they_encode() {
    let p = Protocol::Store;
    let samples: Vec<Vec<u8>> = envelopes()
        .iter()
        .map(|e| wire::encode(p, e).unwrap())
        .collect();
    let accepted = check(
        "store Envelope",
        cases(seed(21), &samples, case_count(CASES)),
        |b| match wire::decode::<Envelope>(p, b) {
            Ok(e) => {
                let again = wire::encode(p, &e).unwrap();
                assert_eq!(wire::decode::<Envelope>(p, &again).unwrap(), e);
                true
            }
            Err(e) => {
                assert!(e.to_string().contains("store"), "{e}");
                false
            }
        },
    );
    assert!(accepted < case_count(CASES));
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn store_datagrams_accept_nothing_forged_and_never_panic() {
    let sender = Channel::new(&secret()).unwrap();
    let receiver = Channel::new(&secret()).unwrap();
    let frames: Vec<Vec<u8>> = envelopes()
        .iter()
        .map(|e| sender.seal(e).unwrap())
        .collect();
    let accepted = check(
        "store Channel::open",
        cases(seed(22), &frames, case_count(CASES)),
        |f| receiver.open(f).is_ok(),
    );
    // Only genuine frames, each once.
    assert!(accepted <= frames.len(), "{accepted} accepted");
    for f in &frames {
        // Accepted now if no case was the genuine frame, never a second time.
        let _ = receiver.open(f);
        assert!(receiver.open(f).is_err(), "a replayed frame was accepted");
    }
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}
