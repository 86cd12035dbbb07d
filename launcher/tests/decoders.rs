//! Property tests: the launcher's decoders of what peers send (krun <-> krund `ToDaemon` /
//! `FromDaemon`, the node runtime's control protocol, krund <-> krun, a rank <-> its node,
//! the process table's answers) return an error on random and mutated input: they never
//! panic and never allocate beyond a bound whatever a length field announces.
use fabric::fuzz::{case_count, cases, check, max_alloc, seed, MaxAlloc};
use fabric::wire::{self, Protocol};
use launcher::daemon::{FromDaemon, RunRequest, ToDaemon};
use launcher::runtime::control::{
    ControlReply, ControlRequest, FetchInfo, LauncherReply, LauncherRequest, LauncherToNode,
    NodeAddresses, NodeToLauncher, NodeToRank, RankToNode,
};
use launcher::runtime::safepoint::SafepointOrder;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[global_allocator]
static ALLOC: MaxAlloc = MaxAlloc;

const CASES: usize = 20_000;
const ALLOC_BOUND: usize = 2 << 20;

/// Feeds mutants of `samples`' encodings to the decoder of `M`; whatever decodes must
/// re-encode to bytes that decode to the same encoding, and every error names the protocol.
fn fuzz<M: Serialize + DeserializeOwned>(name: &str, p: Protocol, samples: &[M], base: u64) {
    let encoded: Vec<Vec<u8>> = samples
        .iter()
        .map(|m| wire::encode(p, m).unwrap())
        .collect();
    for e in &encoded {
        assert!(
            wire::decode::<M>(p, e).is_ok(),
            "{name}: a sample does not decode"
        );
    }
    let n = case_count(CASES);
    let accepted = check(
        name,
        cases(seed(base), &encoded, n),
        |b| match wire::decode::<M>(p, b) {
            Ok(m) => {
                let again = wire::encode(p, &m).unwrap();
                let back: M = wire::decode(p, &again).unwrap();
                assert_eq!(wire::encode(p, &back).unwrap(), again, "{name}");
                true
            }
            Err(e) => {
                assert!(e.to_string().contains(p.name()), "{name}: {e}");
                false
            }
        },
    );
    assert!(accepted < n, "{name}: every case decoded");
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "{name}: allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn daemon_messages_never_panic() {
    let run = RunRequest {
        args: vec!["--node".into(), "3".into(), String::new()],
        env: vec![
            ("KRUN_SECRET".into(), "00ff".into()),
            ("A".into(), "é".into()),
        ],
    };
    fuzz(
        "ToDaemon",
        Protocol::Control,
        &[
            ToDaemon::Run(run),
            ToDaemon::Status,
            ToDaemon::Stdin(b"input line\n".to_vec()),
            ToDaemon::Stdin(vec![]),
            ToDaemon::Signal(-9),
        ],
        31,
    );
    fuzz(
        "FromDaemon",
        Protocol::Control,
        &[
            FromDaemon::Status("2 running".into()),
            FromDaemon::Stdout(vec![b'x'; 80]),
            FromDaemon::Stderr(vec![]),
            FromDaemon::Heartbeat,
            FromDaemon::Exit(137),
            FromDaemon::Refused("wrong cluster secret".into()),
        ],
        32,
    );
}

#[test]
fn node_control_messages_never_panic() {
    fuzz(
        "ControlRequest",
        Protocol::Runtime,
        &[
            ControlRequest::Status,
            ControlRequest::Leave { node: 3 },
            ControlRequest::MigrateOut {
                rank: u64::MAX,
                dry_run: true,
            },
            ControlRequest::Adopt { rank: 1 },
            ControlRequest::Fetch {
                rank: 2,
                version: 9,
            },
        ],
        33,
    );
    fuzz(
        "ControlReply",
        Protocol::Runtime,
        &[
            ControlReply::Fetched(FetchInfo {
                rank: 1,
                version: 2,
                level: 3,
                node: 4,
                bytes: 1 << 40,
            }),
            ControlReply::Done("moved".into()),
            ControlReply::Refused("no such rank".into()),
        ],
        34,
    );
    fuzz(
        "LauncherRequest",
        Protocol::Runtime,
        &[
            LauncherRequest::AddNode {
                host: Some("10.0.0.2:7171".into()),
            },
            LauncherRequest::AddNode { host: None },
            LauncherRequest::DrainNode { node: 1 },
            LauncherRequest::Checkpoint,
        ],
        35,
    );
    fuzz(
        "LauncherReply",
        Protocol::Runtime,
        &[
            LauncherReply::Added { node: 4, epoch: 7 },
            LauncherReply::Drained {
                node: 1,
                moved: vec![0, 5, u64::MAX],
            },
            LauncherReply::Requested,
            LauncherReply::Refused("draining the last node".into()),
        ],
        36,
    );
}

#[test]
fn node_and_launcher_messages_never_panic() {
    fuzz(
        "NodeToLauncher",
        Protocol::Runtime,
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
            NodeToLauncher::Bye,
            NodeToLauncher::Held {
                op: 5,
                ranks: vec![0, 1],
            },
            NodeToLauncher::SyncFailed {
                op: 6,
                reason: "rank 1 exited".into(),
            },
            NodeToLauncher::Captured {
                rank: 0,
                version: 1,
                bytes: 4096,
                wiring: 1,
            },
            NodeToLauncher::Safe {
                rank: 0,
                version: 1,
                level: 2,
                node: Some(1),
                wiring: 1,
            },
            NodeToLauncher::NotSafe {
                rank: 1,
                version: 1,
                level: 3,
                error: "buddy lost".into(),
                wiring: 1,
            },
            NodeToLauncher::CheckpointAsked,
            NodeToLauncher::Finished { code: 137 },
        ],
        37,
    );
    fuzz(
        "LauncherToNode",
        Protocol::Runtime,
        &[
            LauncherToNode::Stop,
            LauncherToNode::Barrier { op: 9 },
            LauncherToNode::Release {
                order: SafepointOrder::Checkpoint { version: 3 },
            },
            LauncherToNode::Release {
                order: SafepointOrder::Continue,
            },
            LauncherToNode::Release {
                order: SafepointOrder::Rollback { version: 2 },
            },
            LauncherToNode::Reform {
                wiring: 2,
                members: vec![2, 3, 4, 5],
                ranks: vec![(0, 4), (1, 5), (2, 2), (3, 3)],
            },
        ],
        38,
    );
}

#[test]
fn rank_messages_never_panic() {
    fuzz(
        "RankToNode",
        Protocol::Rank,
        &[
            RankToNode::Hello { rank: 3, pid: 99 },
            RankToNode::Checkpointed {
                rank: 1,
                version: 2,
                image: "/dev/shm/krun-image".into(),
                bytes: 1 << 20,
            },
            RankToNode::Exiting { rank: 0, code: -1 },
            RankToNode::AtSafepoint { rank: 7 },
        ],
        39,
    );
    fuzz(
        "NodeToRank",
        Protocol::Rank,
        &[
            NodeToRank::Ack,
            NodeToRank::Refused("no".into()),
            NodeToRank::Checkpoint { version: 4 },
            NodeToRank::Continue,
            NodeToRank::Rollback { version: 3 },
        ],
        40,
    );
}

#[test]
fn process_table_answers_never_panic() {
    let samples: Vec<Vec<u8>> = vec![vec![0], vec![1, 0, 0], vec![1, 2, 3, 4, 5, 6, 7, 8]];
    check(
        "table::parse_answer",
        cases(seed(41), &samples, case_count(CASES)),
        |b| launcher::runtime::table::parse_answer(b).is_some(),
    );
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}
