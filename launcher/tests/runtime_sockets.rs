//! A node runtime in-process (one node): the rank socket updates the process table (the
//! checkpoint agent's hook), the control socket answers status over Unix and TCP, and a
//! client without the job's secret is refused while the node keeps serving.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::secret::ClusterSecret;
use fabric::wire::{Protocol, Session};
use launcher::ranks::RankEvent;
use launcher::runtime::control::{ControlReply, ControlRequest, NodeToRank, RankToNode};
use launcher::runtime::status::{LevelUse, SafeCheckpoint};
use launcher::runtime::{CheckpointAgent, Runtime, RuntimeConfig};

/// Says every image is safe at L1 and L2, and reports a fixed store use.
struct Agent;

impl CheckpointAgent for Agent {
    fn checkpointed(
        &self,
        _rank: u32,
        _version: u64,
        image: &Path,
        bytes: u64,
    ) -> launcher::error::Result<Vec<u8>> {
        if bytes == 0 || image.as_os_str().is_empty() {
            return Err(launcher::LauncherError::Usage("empty image".into()));
        }
        Ok(vec![2, 1])
    }

    fn store_use(&self) -> (Vec<LevelUse>, Vec<SafeCheckpoint>) {
        (
            vec![LevelUse {
                level: 1,
                bytes: 4096,
            }],
            vec![SafeCheckpoint {
                level: 1,
                version: 3,
            }],
        )
    }
}

fn start(secret: &ClusterSecret, agent: bool) -> Runtime {
    let cfg = RuntimeConfig {
        node: 0,
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        launcher: None,
        job_ranks: 2,
        secret: secret.clone(),
        agent: agent.then(|| Arc::new(Agent) as Arc<dyn CheckpointAgent>),
        verbose: false,
        failure_timeout: launcher::runtime::DEFAULT_FAILURE_TIMEOUT,
        starting: Vec::new(),
    };
    Runtime::bind(cfg)
        .unwrap()
        .start(BTreeMap::new(), false)
        .unwrap()
}

fn registered(rt: &Runtime, rank: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if rt.row(rank).is_ok_and(|a| a.record.is_some()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("rank {rank} never got a row");
}

fn rank_says(rt: &Runtime, secret: &ClusterSecret, msgs: &[RankToNode]) -> Vec<NodeToRank> {
    let mut s = UnixStream::connect(rt.rank_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut session = Session::client(&mut s, secret, Protocol::Rank).unwrap();
    msgs.iter()
        .map(|m| {
            session.tx.send(&mut s, m).unwrap();
            session.rx.recv(&mut s).unwrap()
        })
        .collect()
}

#[test]
fn a_rank_reports_a_checkpoint_and_the_table_records_where_it_is_safe() {
    let secret = ClusterSecret::random().unwrap();
    let rt = start(&secret, true);
    let events = rt.rank_events();
    events
        .send(RankEvent::Started { rank: 0, pid: 4242 })
        .unwrap();
    registered(&rt, 0);
    let answers = rank_says(
        &rt,
        &secret,
        &[
            RankToNode::Hello { rank: 0, pid: 4242 },
            RankToNode::Checkpointed {
                rank: 0,
                version: 3,
                image: "/dev/shm/x/3.kgi".into(),
                bytes: 4096,
            },
            // The agent refuses an empty image; the table keeps version 3.
            RankToNode::Checkpointed {
                rank: 0,
                version: 4,
                image: "/dev/shm/x/4.kgi".into(),
                bytes: 0,
            },
            // A rank that has no row is refused with the reason.
            RankToNode::Checkpointed {
                rank: 1,
                version: 1,
                image: "/dev/shm/y/1.kgi".into(),
                bytes: 10,
            },
        ],
    );
    assert_eq!(answers[0], NodeToRank::Ack);
    assert_eq!(answers[1], NodeToRank::Ack);
    assert!(matches!(&answers[2], NodeToRank::Refused(e) if e.contains("empty image")));
    assert!(
        matches!(&answers[3], NodeToRank::Refused(e) if e.contains("rank 1 is not registered"))
    );
    let row = rt.row(0).unwrap().record.unwrap();
    let ck = row.checkpoint.unwrap();
    assert_eq!((ck.version, ck.safe_levels), (3, vec![1, 2]));
    assert_eq!(row.pid, 4242);

    // Status over both control sockets; the store's slots come from the agent.
    let a = rt.addresses().clone();
    let mut unix = UnixStream::connect(&a.control_unix).unwrap();
    let mut tcp = TcpStream::connect(&a.control_tcp).unwrap();
    for reply in [
        ask(&mut unix, &secret, ControlRequest::Status),
        ask(&mut tcp, &secret, ControlRequest::Status),
    ] {
        let ControlReply::Status(s) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(s.members, [0]);
        assert_eq!(s.ranks.len(), 1);
        assert_eq!(s.unanswered, [1]);
        assert_eq!(s.store[0].bytes, 4096);
        assert_eq!(s.newest_safe[0].version, 3);
    }
}

fn ask<S: std::io::Read + std::io::Write>(
    s: &mut S,
    secret: &ClusterSecret,
    req: ControlRequest,
) -> ControlReply {
    let mut session = Session::client(s, secret, Protocol::Runtime).unwrap();
    session.tx.send(s, &req).unwrap();
    session.rx.recv(s).unwrap()
}

#[test]
fn a_client_without_the_secret_is_refused_and_the_node_keeps_serving() {
    let secret = ClusterSecret::random().unwrap();
    let rt = start(&secret, false);
    let a = rt.addresses().clone();
    let mut tcp = TcpStream::connect(&a.control_tcp).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let wrong = ClusterSecret::random().unwrap();
    assert!(Session::client(&mut tcp, &wrong, Protocol::Runtime).is_err());
    // Garbage instead of a handshake.
    let mut g = UnixStream::connect(&a.control_unix).unwrap();
    std::io::Write::write_all(&mut g, &[0xab; 200]).unwrap();
    drop(g);
    // A rank socket spoken to as a control socket: the protocol is named in the refusal.
    let mut r = UnixStream::connect(rt.rank_socket()).unwrap();
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let e = Session::client(&mut r, &secret, Protocol::Runtime)
        .err()
        .unwrap();
    assert!(e.to_string().contains("rank"), "{e}");
    // Without an agent a checkpoint is known but safe nowhere yet.
    rt.rank_events()
        .send(RankEvent::Started { rank: 1, pid: 7 })
        .unwrap();
    registered(&rt, 1);
    let answers = rank_says(
        &rt,
        &secret,
        &[RankToNode::Checkpointed {
            rank: 1,
            version: 9,
            image: "/dev/shm/z/9.kgi".into(),
            bytes: 1,
        }],
    );
    assert_eq!(answers[0], NodeToRank::Ack);
    let ck = rt.row(1).unwrap().record.unwrap().checkpoint.unwrap();
    assert_eq!((ck.version, ck.safe_levels.len()), (9, 0));
    let mut tcp = TcpStream::connect(&a.control_tcp).unwrap();
    let reply = ask(&mut tcp, &secret, ControlRequest::Status);
    assert!(matches!(reply, ControlReply::Status(s) if s.ranks.len() == 1 && s.ranks[0].rank == 1));
}

#[test]
fn ranks_that_use_the_fabric_are_refused_a_move_with_the_reason() {
    let secret = ClusterSecret::random().unwrap();
    let rt = start(&secret, false);
    let (runner, _commands) = std::sync::mpsc::channel();
    rt.set_rank_commands(runner);
    // Rank 0 is a process with libfabric loaded: krun's own programs load it only when they
    // open an endpoint, so a plain process gets the library krun uses preloaded.
    let mut daemon = std::process::Command::new("sleep")
        .arg("30")
        .env("LD_PRELOAD", libfabric_sys::LIBRARY)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let maps = format!("/proc/{}/maps", daemon.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&maps).is_ok_and(|m| m.contains("libfabric")) {
        assert!(Instant::now() < deadline, "krund never mapped libfabric");
        std::thread::sleep(Duration::from_millis(10));
    }
    rt.rank_events()
        .send(RankEvent::Started {
            rank: 0,
            pid: daemon.id(),
        })
        .unwrap();
    // Rank 1 is a plain process that says hello through the rank socket, as the rank
    // library does.
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    rt.rank_events()
        .send(RankEvent::Started {
            rank: 1,
            pid: sleeper.id(),
        })
        .unwrap();
    registered(&rt, 0);
    registered(&rt, 1);
    let hello = rank_says(
        &rt,
        &secret,
        &[RankToNode::Hello {
            rank: 1,
            pid: sleeper.id(),
        }],
    );
    assert_eq!(hello[0], NodeToRank::Ack);
    let a = rt.addresses().clone();
    for (rank, why) in [(0, "has libfabric loaded"), (1, "uses the rank library")] {
        let mut tcp = TcpStream::connect(&a.control_tcp).unwrap();
        let reply = ask(
            &mut tcp,
            &secret,
            ControlRequest::MigrateOut {
                rank,
                dry_run: true,
            },
        );
        let ControlReply::Refused(e) = reply else {
            panic!("rank {rank}: {reply:?}")
        };
        assert!(e.contains(why) && e.contains("cannot be re-wired"), "{e}");
    }
    for p in [&mut sleeper, &mut daemon] {
        let _ = p.kill();
        let _ = p.wait();
    }
}
