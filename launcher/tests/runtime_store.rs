//! The node runtime with the store's checkpoint agent: two node stores over libfabric tcp
//! in this process; a rank reports a checkpoint on its node socket, the image goes into the
//! node's store, the process table shows it safe at L1 and then L2 (reported later by the
//! agent), and the node's status carries the store's use and newest safe version per level.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ckpt_store::{NodeInfo, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::wire::{Protocol, Session};
use fabric::{open, FabricConfig, Provider};
use ghost::image::{ImageBuilder, SectionKind};
use launcher::ranks::RankEvent;
use launcher::runtime::agent::{Agent, AgentConfig};
use launcher::runtime::control::{ControlReply, ControlRequest, NodeToRank, RankToNode};
use launcher::runtime::store_link::StoreAgent;
use launcher::runtime::{CheckpointAgent, Runtime, RuntimeConfig};

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_checkpoint_goes_into_the_store_and_the_table_follows_its_levels() {
    let dir = TempDir(PathBuf::from(format!(
        "/var/tmp/krun-runtime-store-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let secret = ClusterSecret::random().unwrap();
    let config = FabricConfig {
        op_timeout: Duration::from_secs(3),
        ..FabricConfig::with_provider(Provider::Tcp)
    };
    let eps: Vec<_> = (0..2).map(|_| open(&config).unwrap()).collect();
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| NodeInfo {
            address: e.address(),
            group: i as u32,
        })
        .collect();
    let mut agents: Vec<_> = eps
        .into_iter()
        .enumerate()
        .map(|(i, ep)| {
            let store = Store::start(
                ep,
                StoreConfig {
                    node: i,
                    nodes: nodes.clone(),
                    arena_bytes: 16 << 20,
                    disk: None,
                    keep: 2,
                    parity_set: 0,
                    secret: secret.clone(),
                    request_timeout: Duration::from_secs(3),
                },
            )
            .unwrap();
            Agent::new(store, AgentConfig::default()).unwrap()
        })
        .collect();
    let (agent0, events0) = agents.remove(0);
    let store_agent = Arc::new(StoreAgent::new(agent0, 1));
    let rt = Runtime::bind(RuntimeConfig {
        node: 0,
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        launcher: None,
        job_ranks: 1,
        secret: secret.clone(),
        agent: Some(store_agent.clone() as Arc<dyn CheckpointAgent>),
        verbose: false,
        failure_timeout: launcher::runtime::DEFAULT_FAILURE_TIMEOUT,
        starting: Vec::new(),
    })
    .unwrap()
    .start(BTreeMap::new(), false)
    .unwrap();
    rt.follow_agent(events0);
    rt.rank_events()
        .send(RankEvent::Started { rank: 0, pid: 1 })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.row(0).map_or(true, |a| a.record.is_none()) {
        assert!(Instant::now() < deadline, "rank 0 never got a row");
        std::thread::sleep(Duration::from_millis(20));
    }

    // The rank wrote version 1 of its image (a full ghost image).
    let version = 1;
    let state: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7) as u8).collect();
    let mut b = ImageBuilder::new(version, 0, Vec::new());
    b.add(SectionKind::Meta, "meta", b"backend=native\n", false)
        .unwrap();
    b.add(SectionKind::Region, "state", &state, false).unwrap();
    let image = ghost::native::image_path(&dir.0, "rank-0", version);
    let bytes = b.finish();
    ghost::native::write_atomically(&image, &bytes).unwrap();

    let mut s = UnixStream::connect(rt.rank_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut session = Session::client(&mut s, &secret, Protocol::Rank).unwrap();
    for (v, len, ok) in [(version, bytes.len() as u64, true), (2, 10, false)] {
        session
            .tx
            .send(
                &mut s,
                &RankToNode::Checkpointed {
                    rank: 0,
                    version: v,
                    image: image.to_string_lossy().into_owned(),
                    bytes: len,
                },
            )
            .unwrap();
        let answer: NodeToRank = session.rx.recv(&mut s).unwrap();
        // A report that does not match the image is refused with the agent's reason.
        assert_eq!(answer == NodeToRank::Ack, ok, "{answer:?}");
    }
    // L1 at once, L2 when the buddy holds it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ck = rt.row(0).unwrap().record.unwrap().checkpoint;
        if ck.as_ref().is_some_and(|c| c.safe_levels == [1, 2]) {
            assert_eq!(ck.unwrap().version, version);
            break;
        }
        assert!(Instant::now() < deadline, "never safe at L2: {ck:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = UnixStream::connect(&rt.addresses().control_unix).unwrap();
    let mut cs = Session::client(&mut c, &secret, Protocol::Runtime).unwrap();
    cs.tx.send(&mut c, &ControlRequest::Status).unwrap();
    let ControlReply::Status(status) = cs.rx.recv(&mut c).unwrap() else {
        panic!("no status")
    };
    let l1 = status.store.iter().find(|l| l.level == 1).unwrap();
    assert!(l1.bytes >= bytes.len() as u64, "{:?}", status.store);
    let safe: Vec<(u8, u64)> = status
        .newest_safe
        .iter()
        .map(|s| (s.level, s.version))
        .collect();
    assert_eq!(safe, [(1, version), (2, version)]);
}
