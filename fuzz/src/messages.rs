//! Each protocol's payload decoders (serde + postcard through `fabric::wire::decode`, and the
//! adaptation layer's hand-written ones): an input is decoded as every message type of the
//! protocol. Whatever decodes must re-encode to bytes that decode to the same encoding;
//! every error names the protocol.
use adaptation::kv::{self, KvOp};
use adaptation::service::{ClientTable, RequestId};
use adaptation::view::Change;
use adaptation::wire::{LinkHello, Msg, Writer};
use ckpt_store::wire::{Body, Envelope};
use fabric::bootstrap::{Reply, Request};
use fabric::wire::{self, Protocol};
use launcher::daemon::{FromDaemon, RunRequest, ToDaemon};
use launcher::runtime::control::{
    ControlReply, ControlRequest, FetchInfo, LauncherReply, LauncherRequest, LauncherToNode,
    NodeAddresses, NodeToLauncher, NodeToRank, RankToNode,
};
use launcher::runtime::safepoint::SafepointOrder;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Target;

/// Decodes `bytes` as an `M` of protocol `p` and checks the contract.
fn message<M: Serialize + DeserializeOwned>(p: Protocol, bytes: &[u8]) {
    let ty = std::any::type_name::<M>();
    match wire::decode::<M>(p, bytes) {
        Ok(m) => {
            let again = wire::encode(p, &m).expect("a decoded message encodes");
            let back: M = wire::decode(p, &again)
                .unwrap_or_else(|e| panic!("{ty}: a re-encoded message does not decode: {e}"));
            assert_eq!(
                wire::encode(p, &back).expect("a decoded message encodes"),
                again,
                "{ty}: decoding is not a function of the encoding"
            );
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains(p.name()), "{ty}: {text}");
        }
    }
}

/// Runs the decoders of protocol `p`'s payloads (the frame targets' second stage).
pub fn payload(p: Protocol, bytes: &[u8]) {
    match p {
        Protocol::Control => control(bytes),
        Protocol::Runtime => runtime(bytes),
        Protocol::Rank => rank(bytes),
        Protocol::Store => store(bytes),
        Protocol::Adaptation => adaptation(bytes),
        Protocol::Bootstrap => bootstrap(bytes),
        // Not targets of this crate (DSM, HA policy engine, verbs side channel).
        Protocol::Policy | Protocol::Dsm | Protocol::Verbs => {}
    }
}

fn encode_all<M: Serialize>(p: Protocol, msgs: &[M]) -> Vec<Vec<u8>> {
    msgs.iter()
        .map(|m| wire::encode(p, m).expect("a sample encodes"))
        .collect()
}

/// Every protocol's sample payloads (the seeds of the frame targets).
pub fn sample_payloads() -> Vec<(Protocol, Vec<Vec<u8>>)> {
    vec![
        (Protocol::Control, control_seeds()),
        (Protocol::Runtime, runtime_seeds()),
        (Protocol::Rank, rank_seeds()),
        (Protocol::Store, store_seeds()),
        (Protocol::Adaptation, adaptation_seeds()),
        (Protocol::Bootstrap, bootstrap_seeds()),
    ]
}

pub const CONTROL: Target = Target {
    name: "control",
    what: "krun <-> krund messages (ToDaemon, FromDaemon)",
    run: control,
    seeds: control_seeds,
};

fn control(bytes: &[u8]) {
    message::<ToDaemon>(Protocol::Control, bytes);
    message::<FromDaemon>(Protocol::Control, bytes);
}

fn control_seeds() -> Vec<Vec<u8>> {
    let p = Protocol::Control;
    let run = RunRequest {
        args: vec!["--node".into(), "3".into(), String::new()],
        env: vec![
            ("KRUN_SECRET".into(), "00ff".into()),
            ("A".into(), "é".into()),
        ],
    };
    let mut out = encode_all(
        p,
        &[
            ToDaemon::Run(run),
            ToDaemon::Status,
            ToDaemon::Stdin(b"input line\n".to_vec()),
            ToDaemon::Signal(-9),
        ],
    );
    out.extend(encode_all(
        p,
        &[
            FromDaemon::Status("2 running".into()),
            FromDaemon::Stdout(vec![b'x'; 80]),
            FromDaemon::Exit(137),
            FromDaemon::Refused("wrong cluster secret".into()),
        ],
    ));
    out
}

pub const RUNTIME: Target = Target {
    name: "runtime",
    what: "the launcher runtime's control messages (krund <-> krund, krun <-> krund) and process table answers",
    run: runtime,
    seeds: runtime_seeds,
};

fn runtime(bytes: &[u8]) {
    let p = Protocol::Runtime;
    message::<ControlRequest>(p, bytes);
    message::<ControlReply>(p, bytes);
    message::<LauncherRequest>(p, bytes);
    message::<LauncherReply>(p, bytes);
    message::<NodeToLauncher>(p, bytes);
    message::<LauncherToNode>(p, bytes);
    let _ = launcher::runtime::table::parse_answer(bytes);
}

fn runtime_seeds() -> Vec<Vec<u8>> {
    let p = Protocol::Runtime;
    let mut out = encode_all(
        p,
        &[
            ControlRequest::Status,
            ControlRequest::MigrateOut {
                rank: u64::MAX,
                dry_run: true,
            },
            ControlRequest::Fetch {
                rank: 2,
                version: 9,
            },
        ],
    );
    out.extend(encode_all(
        p,
        &[
            ControlReply::Fetched(FetchInfo {
                rank: 1,
                version: 2,
                level: 3,
                node: 4,
                bytes: 1 << 40,
            }),
            ControlReply::Refused("no such rank".into()),
        ],
    ));
    out.extend(encode_all(
        p,
        &[
            LauncherRequest::AddNode {
                host: Some("10.0.0.2:7171".into()),
            },
            LauncherRequest::DrainNode { node: 1 },
        ],
    ));
    out.extend(encode_all(
        p,
        &[LauncherReply::Drained {
            node: 1,
            moved: vec![0, 5, u64::MAX],
        }],
    ));
    out.extend(encode_all(
        p,
        &[
            NodeToLauncher::Register(NodeAddresses {
                node: 1,
                pid: 4242,
                host: "node1".into(),
                control_tcp: "127.0.0.1:5000".into(),
                control_unix: "/tmp/krun/control".into(),
                adaptation: "127.0.0.1:5001".into(),
            }),
            NodeToLauncher::View {
                epoch: 3,
                members: vec![0, 1, 2],
                failures: vec![(2, 3)],
            },
            NodeToLauncher::NotSafe {
                rank: 1,
                version: 1,
                level: 3,
                error: "buddy lost".into(),
                wiring: 1,
            },
            NodeToLauncher::Safe {
                rank: 1,
                version: 1,
                level: 3,
                node: Some(2),
                wiring: 1,
            },
        ],
    ));
    out.extend(encode_all(
        p,
        &[
            LauncherToNode::Barrier { op: 9 },
            LauncherToNode::Release {
                order: SafepointOrder::Checkpoint { version: 3 },
            },
        ],
    ));
    out
}

pub const RANK: Target = Target {
    name: "rank",
    what: "a rank <-> its node's krund (RankToNode, NodeToRank)",
    run: rank,
    seeds: rank_seeds,
};

fn rank(bytes: &[u8]) {
    message::<RankToNode>(Protocol::Rank, bytes);
    message::<NodeToRank>(Protocol::Rank, bytes);
}

fn rank_seeds() -> Vec<Vec<u8>> {
    let p = Protocol::Rank;
    let mut out = encode_all(
        p,
        &[
            RankToNode::Hello { rank: 3, pid: 99 },
            RankToNode::Checkpointed {
                rank: 1,
                version: 2,
                image: "/dev/shm/krun-image".into(),
                bytes: 1 << 20,
            },
            RankToNode::Exiting { rank: 0, code: -1 },
        ],
    );
    out.extend(encode_all(
        p,
        &[
            NodeToRank::Refused("no".into()),
            NodeToRank::Checkpoint { version: 4 },
            NodeToRank::Rollback { version: 3 },
        ],
    ));
    out
}

pub const STORE: Target = Target {
    name: "store",
    what: "the checkpoint store's messages (Envelope and its Body)",
    run: store,
    seeds: store_seeds,
};

fn store(bytes: &[u8]) {
    message::<Envelope>(Protocol::Store, bytes);
}

fn store_seeds() -> Vec<Vec<u8>> {
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
        Body::Found {
            level: 2,
            offset: 8,
            len: 9,
            crc: 1,
            remote: vec![],
        },
        Body::ParityFound {
            offset: 1,
            len: 2,
            crc: 3,
            remote: vec![7; 24],
            members: vec![(0, 1, "a".into(), 10, 11), (1, 2, "b".into(), 12, 13)],
        },
        Body::Error("arena full".into()),
    ];
    let envelopes: Vec<Envelope> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Envelope {
            request: i as u64 * 1000,
            from_node: i as u32,
            body,
        })
        .collect();
    encode_all(Protocol::Store, &envelopes)
}

pub const ADAPTATION: Target = Target {
    name: "adaptation",
    what: "the adaptation layer's link messages, view changes, key-value operations and answers, client tables",
    run: adaptation,
    seeds: adaptation_seeds,
};

fn adaptation(bytes: &[u8]) {
    match Msg::decode(bytes) {
        Ok(m) => assert_eq!(
            Msg::decode(&m.encode()).expect("a re-encoded Msg decodes"),
            m,
            "Msg: decoding is not a function of the encoding"
        ),
        Err(e) => assert!(e.contains("adaptation"), "Msg: {e}"),
    }
    message::<LinkHello>(Protocol::Adaptation, bytes);
    if let Some(c) = Change::decode(bytes) {
        assert_eq!(
            c.encode(),
            bytes,
            "a view change decodes only from its encoding"
        );
    }
    if let Some(op) = KvOp::decode(bytes) {
        assert_eq!(KvOp::decode(&op.encode()), Some(op), "KvOp round trip");
    }
    let _ = ClientTable::decode(bytes);
    let _ = kv::parse_answer(bytes);
}

fn adaptation_seeds() -> Vec<Vec<u8>> {
    let id = |seq| RequestId {
        origin: 3,
        client: 9,
        seq,
    };
    let msgs = [
        Msg::Swim(vec![1, 2, 3]),
        Msg::Propose(Change::Fail { node: 4 }),
        Msg::ViewChange {
            epoch: 5,
            change: Change::Join {
                node: 9,
                addr: "127.0.0.1:1".into(),
            },
        },
        Msg::EntryData {
            epoch: 2,
            service: 1,
            entries: vec![(u64::MAX, vec![7; 100]), (3, vec![])],
        },
        Msg::Request(adaptation::wire::Request {
            id: id(1),
            reply_to: 2,
            service: 1,
            entry: 99,
            payload: vec![5; 10],
        }),
        Msg::Ping { nonce: u64::MAX },
    ];
    let mut out: Vec<Vec<u8>> = msgs.iter().map(Msg::encode).collect();
    out.push(wire::encode(Protocol::Adaptation, &LinkHello { node: 7 }).expect("encodes"));
    out.push(
        Change::Join {
            node: 1,
            addr: "10.0.0.1:7171".into(),
        }
        .encode(),
    );
    out.push(KvOp::Put(vec![1; 30]).encode());
    out.push(KvOp::Add(-5).encode());
    let mut table = ClientTable::default();
    table.record(id(5), b"answer");
    let mut t = Vec::new();
    table.encode(&mut t);
    out.push(t.clone());
    // A key-value response: the answer (ok, version, value), then the key's state
    // (version, value, client table).
    let mut answer = Writer::default();
    answer.u8(1).u64(4).bytes(b"value");
    let mut state = Writer::default();
    state.u64(4).bytes(b"value");
    state.0.extend_from_slice(&t);
    let mut response = Writer::default();
    response.bytes(&answer.0).bytes(&state.0);
    out.push(response.0);
    out
}

pub const BOOTSTRAP: Target = Target {
    name: "bootstrap",
    what: "the job bootstrap's messages (Request, Reply)",
    run: bootstrap,
    seeds: bootstrap_seeds,
};

fn bootstrap(bytes: &[u8]) {
    message::<Request>(Protocol::Bootstrap, bytes);
    message::<Reply>(Protocol::Bootstrap, bytes);
}

fn bootstrap_seeds() -> Vec<Vec<u8>> {
    let p = Protocol::Bootstrap;
    let mut out = encode_all(
        p,
        &[
            Request::Join { rank: 3, size: 8 },
            Request::Blob(vec![1, 2, 3, 4]),
        ],
    );
    out.extend(encode_all(
        p,
        &[
            Reply::Welcome,
            Reply::Refused("wrong cluster secret".into()),
            Reply::Gather(vec![vec![1; 40], vec![], vec![9, 9]]),
        ],
    ));
    out
}
