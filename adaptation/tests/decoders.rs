//! Property tests: every decoder of the adaptation layer that reads what a peer sent (link
//! frames' `Msg` and `LinkHello`, the failure detector's and Raft's packets inside them,
//! view changes, the key-value service's operations and answers, client tables) returns an
//! error or `None` on random and mutated input: it never panics and never allocates beyond
//! a bound whatever a length field announces.
use adaptation::agreement::{Agreement, AgreementConfig};
use adaptation::kv::{parse_answer, KvOp};
use adaptation::membership::{Membership, MembershipConfig};
use adaptation::service::{ClientTable, RequestId};
use adaptation::view::Change;
use adaptation::wire::{LinkHello, Msg, Request, Writer, PROTOCOL};
use fabric::fuzz::{case_count, cases, check, max_alloc, seed, MaxAlloc};

#[global_allocator]
static ALLOC: MaxAlloc = MaxAlloc;

const CASES: usize = 20_000;
/// No single allocation may exceed this while decoding (cases are at most a few KiB).
const ALLOC_BOUND: usize = 2 << 20;

fn id(seq: u64) -> RequestId {
    RequestId {
        origin: 3,
        client: 9,
        seq,
    }
}

fn msgs() -> Vec<Msg> {
    vec![
        Msg::Swim(vec![1, 2, 3]),
        Msg::Raft(vec![]),
        Msg::Propose(Change::Fail { node: 4 }),
        Msg::ViewChange {
            epoch: 5,
            change: Change::Join {
                node: 9,
                addr: "127.0.0.1:1".into(),
            },
        },
        Msg::Status { epoch: 2, done: 1 },
        Msg::Prepared { epoch: 2 },
        Msg::EntryData {
            epoch: 2,
            service: 1,
            entries: vec![(u64::MAX, vec![7; 100]), (3, vec![])],
        },
        Msg::Copies {
            service: 7,
            entries: vec![(1, vec![1, 2])],
        },
        Msg::Sent {
            epoch: 9,
            counts: vec![1, 2, 3],
        },
        Msg::Request(Request {
            id: id(1),
            reply_to: 2,
            service: 1,
            entry: 99,
            payload: vec![5; 10],
        }),
        Msg::Response {
            id: id(2),
            service: 1,
            entry: 3,
            payload: vec![],
        },
        Msg::Observe {
            id: id(3),
            service: 2,
            entry: 4,
            payload: vec![1],
        },
        Msg::Observed { id: id(4) },
        Msg::Ping { nonce: u64::MAX },
        Msg::Pong { nonce: 0 },
    ]
}

#[test]
fn link_messages_never_panic_and_decode_as_they_encode() {
    let samples: Vec<Vec<u8>> = msgs().iter().map(Msg::encode).collect();
    for (m, e) in msgs().iter().zip(&samples) {
        assert_eq!(&Msg::decode(e).unwrap(), m);
    }
    let accepted = check(
        "Msg::decode",
        cases(seed(11), &samples, case_count(CASES)),
        |b| match Msg::decode(b) {
            Ok(m) => {
                assert_eq!(Msg::decode(&m.encode()).unwrap(), m);
                true
            }
            Err(e) => {
                assert!(e.contains("adaptation"), "{e}");
                false
            }
        },
    );
    assert!(accepted < case_count(CASES));
    let hello = vec![fabric::wire::encode(PROTOCOL, &LinkHello { node: 7 }).unwrap()];
    check(
        "LinkHello",
        cases(seed(12), &hello, case_count(CASES)),
        |b| fabric::wire::decode::<LinkHello>(PROTOCOL, b).is_ok(),
    );
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn view_changes_key_value_operations_and_client_tables_never_panic() {
    let changes = [
        Change::Join {
            node: 1,
            addr: "10.0.0.1:7171".into(),
        },
        Change::Leave { node: 2 },
        Change::Fail { node: u32::MAX },
    ];
    let samples: Vec<Vec<u8>> = changes.iter().map(Change::encode).collect();
    check(
        "Change::decode",
        cases(seed(13), &samples, case_count(CASES)),
        |b| match Change::decode(b) {
            Some(c) => {
                assert_eq!(c.encode(), b, "a change decodes only from its encoding");
                true
            }
            None => false,
        },
    );
    let ops: Vec<Vec<u8>> = [KvOp::Put(vec![1; 30]), KvOp::Get, KvOp::Add(-5)]
        .iter()
        .map(KvOp::encode)
        .collect();
    check(
        "KvOp::decode",
        cases(seed(14), &ops, case_count(CASES)),
        |b| KvOp::decode(b).is_some(),
    );

    let mut table = ClientTable::default();
    table.record(id(5), b"answer");
    table.record(
        RequestId {
            origin: 1,
            client: 2,
            seq: 3,
        },
        b"",
    );
    let mut t = Vec::new();
    table.encode(&mut t);
    check(
        "ClientTable::decode",
        cases(seed(15), &[t.clone()], case_count(CASES)),
        |b| ClientTable::decode(b).is_some(),
    );

    // A key-value response: the answer (ok, version, value), then the key's state
    // (version, value, client table).
    let mut answer = Writer::default();
    answer.u8(1).u64(4).bytes(b"value");
    let mut state = Writer::default();
    state.u64(4).bytes(b"value");
    state.0.extend_from_slice(&t);
    let mut response = Writer::default();
    response.bytes(&answer.0).bytes(&state.0);
    let mut witness = Writer::default();
    witness.bytes(&[]).bytes(&state.0);
    assert!(parse_answer(&response.0).is_some());
    check(
        "kv::parse_answer",
        cases(seed(16), &[response.0, witness.0], case_count(CASES)),
        |b| parse_answer(b).is_some(),
    );
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn failure_detector_packets_never_panic() {
    let config = MembershipConfig::default();
    let mut a = Membership::new(1, 1, config.clone());
    let mut b = Membership::new(2, 2, config.clone());
    let mut packets = Vec::new();
    packets.extend(a.add_member(2, 0).messages);
    packets.extend(a.add_member(3, 0).messages);
    packets.extend(b.add_member(1, 0).messages);
    for now in 1..200 {
        packets.extend(a.tick(now).messages);
        packets.extend(b.tick(now).messages);
    }
    let samples: Vec<Vec<u8>> = packets.into_iter().map(|(_, p)| p).take(50).collect();
    assert!(
        !samples.is_empty(),
        "the detectors sent nothing to fuzz from"
    );
    let mut target = Membership::new(2, 3, config);
    target.add_member(1, 0);
    let accepted = check(
        "Membership::handle",
        cases(seed(17), &samples, case_count(CASES)),
        |p| target.handle(1, p, 300).is_ok(),
    );
    assert!(accepted < case_count(CASES));
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn raft_packets_never_panic() {
    let sups = [1, 2, 3];
    let config = AgreementConfig::default();
    let mut leader = Agreement::new(1, &sups, 1, config.clone()).unwrap();
    let mut packets = Vec::new();
    for _ in 0..200 {
        packets.extend(leader.tick().messages);
        if !packets.is_empty() {
            break;
        }
    }
    packets.extend(leader.propose(&Change::Fail { node: 3 }).messages);
    let samples: Vec<Vec<u8>> = packets.into_iter().map(|(_, p)| p).collect();
    assert!(
        !samples.is_empty(),
        "the Raft member sent nothing to fuzz from"
    );
    let mut target = Agreement::new(2, &sups, 2, config).unwrap();
    let accepted = check(
        "Agreement::handle",
        cases(seed(18), &samples, case_count(CASES)),
        |p| target.handle(1, p).is_ok(),
    );
    assert!(accepted < case_count(CASES));
    // raft-rs panics on some well-formed but impossible messages; the member catches that
    // and stops for good, so no packet may get that far.
    assert!(!target.failed(), "a packet stopped the Raft member");
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn a_raft_field_announcing_megabytes_is_refused_without_reserving_them() {
    // Found by the test above: field 12 (`context`) announcing 6,635,818 bytes in a
    // 17-byte packet made protobuf reserve them all before finding them missing.
    let packet = [
        0x08, 0x11, 0x10, 0x34, 0xb0, 0x77, 0xcc, 0x96, 0x77, 0x62, 0xaa, 0x82, 0x95, 0x03, 0x18,
        0x02, 0x20,
    ];
    let mut target = Agreement::new(2, &[1, 2, 3], 2, AgreementConfig::default()).unwrap();
    let e = target.handle(1, &packet).unwrap_err().to_string();
    assert!(e.contains("not a raft message"), "{e}");
    assert!(!target.failed());
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}
