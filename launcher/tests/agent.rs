//! The checkpoint agent over libfabric tcp: three node stores in this process, each owned by
//! an agent. A native ghost image (captured by the ghost native backend from this process's
//! registered memory) goes into node 0's store without a copy, is reported safe at L1 and
//! L2, and after node 0's store is gone another node fetches it from node 0's buddy with
//! its checksum intact. Bad images and a full buddy arena give errors naming rank and
//! version.
use ckpt_store::{Level, NodeInfo, ParityState, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::{open, FabricConfig, Provider};
use ghost::image::{Image, ImageBuilder, SectionKind};
use launcher::runtime::agent::{Agent, AgentConfig, AgentEvent};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Duration;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = PathBuf::from(format!("/var/tmp/krun-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One agent (and store) per node over tcp; `arenas[i]` is node i's lent arena.
fn agents(arenas: &[usize]) -> Vec<Option<(Agent, Receiver<AgentEvent>)>> {
    agents_with_parity(arenas, 0)
}

/// As [`agents`], with parity sets of `k` nodes (the store's ring placement).
fn agents_with_parity(arenas: &[usize], k: usize) -> Vec<Option<(Agent, Receiver<AgentEvent>)>> {
    let secret = ClusterSecret::random().unwrap();
    let config = FabricConfig {
        op_timeout: Duration::from_secs(3),
        ..FabricConfig::with_provider(Provider::Tcp)
    };
    let eps: Vec<_> = arenas.iter().map(|_| open(&config).unwrap()).collect();
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| NodeInfo {
            address: e.address(),
            group: i as u32,
        })
        .collect();
    eps.into_iter()
        .enumerate()
        .map(|(i, ep)| {
            let store = Store::start(
                ep,
                StoreConfig {
                    node: i,
                    nodes: nodes.clone(),
                    arena_bytes: arenas[i],
                    disk: None,
                    keep: 2,
                    parity_set: k,
                    secret: secret.clone(),
                    request_timeout: Duration::from_secs(3),
                },
            )
            .unwrap();
            Some(Agent::new(store, AgentConfig::default()).unwrap())
        })
        .collect()
}

fn next_event(rx: &Receiver<AgentEvent>) -> AgentEvent {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("an agent event within 60 s")
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 7 ^ seed) as u8)
        .collect()
}

/// A full ghost image of `version` written with the ghost crate's image builder.
fn built_image(dir: &Path, version: u64, len: usize) -> PathBuf {
    let mut b = ImageBuilder::new(version, 0, Vec::new());
    b.add(SectionKind::Meta, "meta", b"backend=native\n", false)
        .unwrap();
    b.add(SectionKind::Region, "state", &pattern(len, version), false)
        .unwrap();
    let path = ghost::native::image_path(dir, "rank-3", version);
    ghost::native::write_atomically(&path, &b.finish()).unwrap();
    path
}

#[test]
fn the_store_serves_a_dead_nodes_images_from_its_buddy() {
    let dir = TempDir::new("native");
    // A native rank: this process registers 2 MiB of state and captures it.
    let rt = ghost::native::NativeRuntime::init(ghost::native::NativeConfig {
        owner: "rank-0".into(),
        dir: dir.0.clone(),
        full_every: 4,
        restore: None,
    })
    .expect("the ghost native runtime (userfaultfd write-protect, Linux >= 6.4, root)");
    let len = 2 << 20;
    let state = ghost::native::alloc_region(len).unwrap();
    let expected = pattern(len, 42);
    // SAFETY: `state` is a fresh private mapping of `len` bytes that lives for the process.
    unsafe {
        std::ptr::copy_nonoverlapping(expected.as_ptr(), state, len);
        rt.register("state", state, len).unwrap();
    }
    let version = rt.checkpoint().unwrap();
    let capture = rt.wait().unwrap().expect("a capture report");
    assert_eq!(capture.version, version);
    let file_bytes = std::fs::read(&capture.path).unwrap();
    assert_eq!(file_bytes.len() as u64, capture.image_bytes);

    let mut nodes = agents(&[16 << 20; 3]);
    let (agent0, events0) = nodes[0].as_ref().unwrap();
    let put = agent0
        .on_checkpointed(0, version, &capture.path, capture.image_bytes)
        .unwrap();
    assert_eq!(put.copied, 0, "the mapped image is not copied");
    assert_eq!(agent0.store().copied_bytes(), 0);
    assert_eq!(put.crc, crc32c::crc32c(&file_bytes));
    let buddy = agent0.store().buddy();
    for (level, holder) in [(Level::L1, 0), (Level::L2, buddy)] {
        assert_eq!(
            next_event(events0),
            AgentEvent::Safe {
                rank: 0,
                version,
                level,
                bytes: capture.image_bytes,
                holder: Some(holder),
                wiring: 0,
            }
        );
    }
    let safe = agent0.newest_safe(0);
    assert_eq!(
        (safe.at(Level::L1), safe.at(Level::L2)),
        (Some(version), Some(version))
    );
    assert_eq!(agent0.usage().l1, capture.image_bytes);
    assert_ne!(buddy, 0);
    assert_eq!(
        nodes[buddy].as_ref().unwrap().0.usage().l2_held,
        capture.image_bytes
    );

    // The rank changes 100 bytes and checkpoints again: an incremental image (one chunk).
    let mut expected2 = expected.clone();
    expected2[300_000..300_100].fill(0xAB);
    // SAFETY: inside the registered region; the write-protect fault is served by ghost.
    unsafe { std::ptr::write_bytes(state.add(300_000), 0xAB, 100) };
    let v2 = rt.checkpoint().unwrap();
    let capture2 = rt.wait().unwrap().expect("a capture report");
    assert_eq!(capture2.parent, version, "an incremental image");
    assert!(capture2.image_bytes < capture.image_bytes / 4);
    agent0
        .on_checkpointed(0, v2, &capture2.path, capture2.image_bytes)
        .unwrap();
    for level in [Level::L1, Level::L2] {
        assert!(matches!(
            next_event(events0),
            AgentEvent::Safe { version, level: l, .. } if version == v2 && l == level
        ));
    }

    // Node 0 goes away with its store; the third node asks for rank 0's image.
    // The membership reports it gone, so the store does not wait for it.
    nodes[0] = None;
    let third = 3 - buddy;
    let agent = &nodes[third].as_ref().unwrap().0;
    agent.node_down(0, true).unwrap();
    let fetched = agent.fetch(0, version).unwrap();
    assert_eq!(
        (fetched.report.level, fetched.report.node),
        (Level::L2, buddy)
    );
    assert!(
        fetched.report.rejected.is_empty(),
        "{:?}",
        fetched.report.rejected
    );
    assert_eq!(crc32c::crc32c(&fetched.image), put.crc);
    assert!(
        fetched.image[..] == file_bytes[..],
        "the buddy's copy differs"
    );
    // It restores the rank's memory as it was at the checkpoint.
    let image = Image::parse(&fetched.image).unwrap();
    let mut restored = vec![0u8; len];
    ghost::image::materialize_region(&[image], "state", &mut restored).unwrap();
    assert!(restored == expected, "restored state differs");
    // A restart from v2 needs v1 too: both come from the buddy and, written as files, give
    // the native checkpointer's restore the memory as it was at v2.
    let restart = TempDir::new("restart");
    let files = agent.write_chain(0, v2, &restart.0, "job/rank0").unwrap();
    assert_eq!(files.len(), 2);
    let chain = ghost::native::load_chain(&restart.0, "job/rank0", v2).unwrap();
    let images: Vec<Image> = chain.iter().map(|b| Image::parse(b).unwrap()).collect();
    let mut restored = vec![0u8; len];
    ghost::image::materialize_region(&images, "state", &mut restored).unwrap();
    assert!(restored == expected2, "restored v2 state differs");
}

#[test]
fn a_full_image_releases_the_older_mapped_versions() {
    let dir = TempDir::new("full");
    let nodes = agents(&[16 << 20, 16 << 20]);
    let (agent, events) = nodes[0].as_ref().unwrap();
    for v in 1..=2 {
        let path = built_image(&dir.0, v, 50_000);
        let size = std::fs::metadata(&path).unwrap().len();
        agent.on_checkpointed(3, v, &path, size).unwrap();
        assert!(matches!(
            next_event(events),
            AgentEvent::Safe {
                level: Level::L1,
                ..
            }
        ));
        assert!(matches!(
            next_event(events),
            AgentEvent::Safe {
                level: Level::L2,
                ..
            }
        ));
    }
    // v2 is full: the native checkpointer may now rewrite v1's file, so L1 holds v2 only.
    assert_eq!(agent.store().l1_versions("rank-3"), vec![2]);
    let fetched = agent.fetch(3, 1).unwrap();
    assert_eq!((fetched.report.level, fetched.report.node), (Level::L2, 1));
    // An incremental image whose parent nobody holds: the chain error names the ancestor.
    let mut b = ImageBuilder::new(5, 4, Vec::new());
    b.add(SectionKind::Meta, "meta", b"backend=native\n", false)
        .unwrap();
    let path = dir.0.join("v5.kgi");
    let bytes = b.finish();
    std::fs::write(&path, &bytes).unwrap();
    agent
        .on_checkpointed(3, 5, &path, bytes.len() as u64)
        .unwrap();
    let e = agent.fetch_chain(3, 5).err().expect("missing").to_string();
    assert!(
        e.contains("rank 3 checkpoint v5") && e.contains("ancestor v4 is missing"),
        "{e}"
    );
    assert_eq!(agent.store().l1_versions("rank-3"), vec![2, 5]);
}

#[test]
fn bad_images_and_a_full_arena_name_the_rank_and_version() {
    let dir = TempDir::new("bad");
    // Node 1 (node 0's buddy) lends only 1 MiB.
    let nodes = agents(&[16 << 20, 1 << 20]);
    let (agent, events) = nodes[0].as_ref().unwrap();
    let good = built_image(&dir.0, 2, 100_000);
    let size = std::fs::metadata(&good).unwrap().len();

    // Missing file.
    let e = agent
        .on_checkpointed(3, 2, &dir.0.join("missing.kgi"), size)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 3 checkpoint v2") && e.contains("missing.kgi"),
        "{e}"
    );
    // Size differs from what the rank reported.
    let e = agent
        .on_checkpointed(3, 2, &good, size + 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 3 checkpoint v2") && e.contains("reported"),
        "{e}"
    );
    // Another version's image.
    let e = agent
        .on_checkpointed(3, 5, &good, size)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 3 checkpoint v5") && e.contains("is version 2"),
        "{e}"
    );
    // A flipped payload byte.
    let mut bytes = std::fs::read(&good).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x10;
    let corrupt = dir.0.join("corrupt.kgi");
    std::fs::write(&corrupt, &bytes).unwrap();
    let e = agent
        .on_checkpointed(3, 2, &corrupt, size)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rank 3 checkpoint v2") && e.contains("corrupt"),
        "{e}"
    );
    assert!(events.try_recv().is_err(), "no event for a refused image");
    assert_eq!(agent.newest_safe(3).at(Level::L1), None);

    // The good image is accepted and reaches L2.
    agent.on_checkpointed(3, 2, &good, size).unwrap();
    assert!(matches!(
        next_event(events),
        AgentEvent::Safe {
            level: Level::L1,
            ..
        }
    ));
    assert!(matches!(
        next_event(events),
        AgentEvent::Safe {
            level: Level::L2,
            ..
        }
    ));

    // An image larger than the buddy's arena: safe at L1, then a failure naming the arena.
    let big = built_image(&dir.0, 3, 2 << 20);
    let size = std::fs::metadata(&big).unwrap().len();
    agent.on_checkpointed(3, 3, &big, size).unwrap();
    assert!(matches!(
        next_event(events),
        AgentEvent::Safe {
            rank: 3,
            version: 3,
            level: Level::L1,
            ..
        }
    ));
    let failed = next_event(events);
    let AgentEvent::Failed {
        rank: 3,
        version: 3,
        level: Level::L2,
        error,
        ..
    } = &failed
    else {
        panic!("expected a failure at L2, got {failed:?}");
    };
    assert!(error.contains("arena full"), "{error}");
    let text = failed.to_string();
    assert!(
        text.starts_with("version 3 of rank 3 not safe at L2"),
        "{text}"
    );
    // Version 3 is still served from L1.
    let fetched = agent.fetch(3, 3).unwrap();
    assert_eq!(fetched.report.level, Level::L1);
    // A version nobody holds: the error names rank and version.
    let e = agent.fetch(3, 9).err().expect("not found").to_string();
    assert!(e.contains("rank 3 checkpoint v9"), "{e}");
}

#[test]
fn an_agent_waiting_for_a_level_the_store_lacks_is_refused() {
    let secret = ClusterSecret::random().unwrap();
    let ep = open(&FabricConfig::with_provider(Provider::Loopback)).unwrap();
    let address = ep.address();
    let store = Store::start(
        ep,
        StoreConfig {
            node: 0,
            nodes: vec![NodeInfo { address, group: 0 }],
            arena_bytes: 1 << 20,
            disk: None,
            keep: 1,
            parity_set: 0,
            secret,
            request_timeout: Duration::from_secs(1),
        },
    )
    .unwrap();
    assert_eq!(store.levels(), vec![Level::L1]);
    let e = Agent::new(store, AgentConfig::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("waits for L2") && e.contains("[L1]"), "{e}");
}

#[test]
fn a_gone_buddy_is_replaced_and_the_agent_reports_l2_again() {
    let dir = TempDir::new("rebuddy");
    let mut nodes = agents(&[16 << 20; 3]);
    let path = built_image(&dir.0, 1, 60_000);
    let size = std::fs::metadata(&path).unwrap().len();
    {
        let (agent, events) = nodes[0].as_ref().unwrap();
        agent.on_checkpointed(3, 1, &path, size).unwrap();
        assert!(matches!(
            next_event(events),
            AgentEvent::Safe {
                level: Level::L1,
                ..
            }
        ));
        assert!(matches!(
            next_event(events),
            AgentEvent::Safe {
                level: Level::L2,
                ..
            }
        ));
        assert_eq!(agent.store().buddy(), 1);
    }
    nodes[1] = None;
    let (agent, events) = nodes[0].as_ref().unwrap();
    agent.node_down(1, true).unwrap();
    assert_eq!(agent.store().buddy(), 2);
    assert_eq!(
        next_event(events),
        AgentEvent::Safe {
            rank: 3,
            version: 1,
            level: Level::L2,
            bytes: size,
            holder: Some(2),
            wiring: 0,
        }
    );
    assert_eq!(nodes[2].as_ref().unwrap().0.usage().l2_held, size);
}

#[test]
fn with_parity_l3_is_reported_once_the_set_is_complete_naming_the_parity_holder() {
    // Three nodes, one parity set of all three (ring placement): the parity of version 1
    // is kept by member 1 % 3 = node 1; each node's buddy is the next node.
    let dirs: Vec<TempDir> = (0..3)
        .map(|i| TempDir::new(&format!("parity{i}")))
        .collect();
    let nodes = agents_with_parity(&[16 << 20; 3], 3);
    let agent = |i: usize| &nodes[i].as_ref().unwrap().0;
    let events = |i: usize| &nodes[i].as_ref().unwrap().1;
    let put = |i: usize| {
        let path = built_image(&dirs[i].0, 1, 40_000 + 1000 * i);
        let size = std::fs::metadata(&path).unwrap().len();
        // Each rank's image runs in its own wiring epoch here: every report carries it.
        agent(i)
            .on_checkpointed_in(i as u32, 1, &path, size, 5 + i as u64)
            .unwrap();
    };
    // Every level reported for node i's rank, until L3 (bounded by `next_event`).
    let levels = |i: usize| {
        let mut seen = Vec::new();
        while !seen.iter().any(|(l, _)| *l == Level::L3) {
            match next_event(events(i)) {
                AgentEvent::Safe {
                    rank,
                    version: 1,
                    level,
                    holder,
                    wiring,
                    ..
                } if rank == i as u32 => {
                    assert_eq!(wiring, 5 + i as u64, "node {i} {level}");
                    seen.push((level, holder))
                }
                other => panic!("node {i}: unexpected {other:?}"),
            }
        }
        seen.sort();
        seen
    };
    put(0);
    put(1);
    for i in 0..2 {
        let owner = Agent::owner(i as u32);
        agent(i)
            .store()
            .wait_safe(&owner, 1, Level::L2, Duration::from_secs(30))
            .unwrap();
        // Node 2 has not put its image: the set is incomplete, no L3 yet.
        assert_eq!(
            agent(i).store().parity_state(&owner, 1),
            ParityState::Waiting
        );
    }
    put(2);
    for i in 0..3 {
        assert_eq!(
            levels(i),
            vec![
                (Level::L1, Some(i)),
                (Level::L2, Some((i + 1) % 3)),
                (Level::L3, Some(1)),
            ],
            "node {i}"
        );
    }
}
