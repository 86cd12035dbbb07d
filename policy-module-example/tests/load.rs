//! The example module loaded through the policies crate's C ABI: it runs a checkpoint and a
//! recovery (reading the host's copies index across the boundary), resumes from a snapshot,
//! and is unloaded when dropped; a module of another ABI version is refused naming both
//! versions; a panic at create or at an event is contained.
use policies::coordinated::Config;
use policies::description::Description;
use policies::plug::{make_policy, Context};
use policies::primitives::{
    Action, AgreedView, Decision, DecisionId, DecisionKind, Event, ImageCopy, Layout, Level, OpId,
    Rank, RankSlot, Reads, Snapshot, Version,
};
use policies::{Policy, PolicyError};
use std::path::{Path, PathBuf};

/// `target/<profile>`: tests run from `target/<profile>/deps`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn module() -> PathBuf {
    let p = target_dir().join("libpolicy_module_example.so");
    assert!(
        p.exists(),
        "{} not built (cargo build -p policy-module-example)",
        p.display()
    );
    p
}

/// Every image is at L1 on its rank's node (rank r on node r) and at L2 on the next node.
struct Index;
impl Reads for Index {
    fn copies(&self, rank: Rank, _v: Version) -> Vec<ImageCopy> {
        vec![
            ImageCopy {
                level: Level::L1,
                node: Some(rank),
                bytes: 7,
            },
            ImageCopy {
                level: Level::L2,
                node: Some((rank + 1) % 2),
                bytes: 7,
            },
        ]
    }
}

fn desc(path: &Path, params: &str) -> Description {
    Description::parse(
        "test.toml",
        &format!(
            "module = {:?}\n[params]\n{params}\n",
            path.display().to_string()
        ),
    )
    .unwrap()
}

fn build(
    d: &Description,
    snapshot: Option<&Snapshot>,
) -> Result<Box<dyn Policy + Send>, PolicyError> {
    let layout = Layout {
        ranks: vec![0, 1],
        spares: vec![2],
    };
    let view = AgreedView::new(1, vec![0, 1, 2]);
    let defaults = Config::default();
    make_policy(
        d,
        &Context {
            leader: 0,
            layout: &layout,
            view: &view,
            now: 0,
            snapshot,
            defaults: &defaults,
        },
    )
}

#[test]
fn the_module_checkpoints_at_its_cadence_and_recovers_reading_the_hosts_copies() {
    let mut p = build(&desc(&module(), "cadence_ms = \"40\""), None).unwrap();
    assert_eq!(p.name(), "example-fixed-cadence");
    assert_eq!(p.next_deadline(), Some(40));
    let acts = p.on_event(40, Event::Tick, &Index);
    let Some(Action::Synchronize { op, ranks }) = acts.last().cloned() else {
        panic!("{acts:?}")
    };
    assert_eq!(ranks, vec![0, 1]);
    let caps = p.on_event(41, Event::Synchronized { op }, &Index);
    assert_eq!(caps.len(), 2, "{caps:?}");
    for rank in 0..2 {
        p.on_event(
            42,
            Event::CaptureDone {
                op,
                rank,
                version: 1,
                bytes: 7,
                seconds: 0.01,
            },
            &Index,
        );
        p.on_event(
            43,
            Event::LevelSafe {
                rank,
                version: 1,
                level: Level::L2,
            },
            &Index,
        );
    }
    assert_eq!(p.recovery_line(), Some(1));
    assert_eq!(p.summary().checkpoints, 1);
    // Node 1 fails: rank 1 restarts on the spare from a copy the host's index names.
    let acts = p.on_event(
        50,
        Event::FailureAgreed {
            epoch: 2,
            failed: vec![1],
            view: AgreedView::new(2, vec![0, 2]),
        },
        &Index,
    );
    let restart = acts.iter().find_map(|a| match a {
        Action::Restart(Decision {
            kind:
                DecisionKind::Restart {
                    rank: 1,
                    node,
                    source,
                    ..
                },
            ..
        }) => Some((*node, *source)),
        _ => None,
    });
    assert_eq!(
        restart,
        Some((
            2,
            Some(ImageCopy {
                level: Level::L2,
                node: Some(0),
                bytes: 7
            })
        )),
        "{acts:?}"
    );
    assert!(p.failure().is_none());
}

#[test]
fn a_module_built_from_a_snapshot_keeps_the_recovery_line() {
    let id = |seq| DecisionId {
        epoch: 1,
        leader: 0,
        seq,
    };
    let snapshot = Snapshot {
        view: AgreedView::new(1, vec![0, 1, 2]),
        ranks: (0..2)
            .map(|n| RankSlot {
                node: n,
                incarnation: 0,
            })
            .collect(),
        spares: vec![2],
        decisions: vec![
            Decision {
                id: id(1),
                kind: DecisionKind::CheckpointStarted { version: 9 },
            },
            Decision {
                id: id(2),
                kind: DecisionKind::Committed {
                    version: 9,
                    level: Level::L2,
                },
            },
        ],
        exits: Vec::new(),
    };
    let mut p = build(&desc(&module(), "cadence_ms = \"10\""), Some(&snapshot)).unwrap();
    assert_eq!(p.recovery_line(), Some(9));
    // The next checkpoint is number 10: versions are never reused across a swap.
    let acts = p.on_event(10, Event::Tick, &Index);
    assert!(
        acts.iter().any(|a| matches!(
            a,
            Action::Record(Decision {
                kind: DecisionKind::CheckpointStarted { version: 10 },
                ..
            })
        )),
        "{acts:?}"
    );
}

#[test]
fn a_module_of_another_abi_version_is_refused_naming_both_versions() {
    let wrong = target_dir().join("examples/libwrong_abi.so");
    assert!(
        wrong.exists(),
        "{} not built (cargo build -p policy-module-example --examples)",
        wrong.display()
    );
    let e = build(&desc(&wrong, ""), None).err().unwrap().to_string();
    let v = policies::module::abi::ABI_VERSION;
    assert!(
        e.contains(&format!("ABI version {}", v + 41))
            && e.contains(&format!("this krun speaks version {v}")),
        "{e}"
    );
    // A library that is no module at all.
    let libc = Path::new("/lib/x86_64-linux-gnu/libm.so.6");
    if libc.exists() {
        let e = build(&desc(libc, ""), None).err().unwrap().to_string();
        assert!(e.contains("not a krun policy module"), "{e}");
    }
}

#[test]
fn a_panic_while_the_module_builds_its_policy_is_contained() {
    let e = build(&desc(&module(), "panic = \"create\""), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(
            "could not create its policy: panicked: example module: panic asked for at create"
        ),
        "{e}"
    );
    let e = build(&desc(&module(), "panic = \"sometimes\""), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("params.panic"), "{e}");
}

#[test]
fn a_panic_at_an_event_fails_the_module_and_it_answers_nothing_more() {
    let mut p = build(
        &desc(&module(), "panic = \"after:2\"\ncadence_ms = \"5\""),
        None,
    )
    .unwrap();
    let first = p.on_event(5, Event::Tick, &Index);
    assert!(!first.is_empty());
    assert!(p.failure().is_none());
    let second = p.on_event(
        6,
        Event::Synchronized {
            op: OpId { leader: 0, seq: 1 },
        },
        &Index,
    );
    assert!(second.is_empty(), "{second:?}");
    let why = p.failure().expect("the module failed");
    assert!(
        why.contains("panicked: example module: panic asked for at event 2"),
        "{why}"
    );
    assert!(p.on_event(7, Event::Tick, &Index).is_empty());
    assert_eq!(p.next_deadline(), None);
}

#[test]
fn a_panic_when_asked_for_the_next_deadline_fails_the_module() {
    let p = build(&desc(&module(), "panic = \"deadline\""), None).unwrap();
    assert!(p.failure().is_none());
    assert_eq!(p.next_deadline(), None);
    let why = p.failure().expect("the module failed");
    assert!(why.contains("panicked in next_deadline"), "{why}");
}

/// Whether this process maps `path`.
fn mapped(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains(path.to_str().unwrap())
}

#[test]
fn dropping_the_policy_unloads_the_module() {
    // A private copy: other tests keep the shared one loaded.
    let copy = std::env::temp_dir().join(format!(
        "krun-unload-{}-libpolicy_module_example.so",
        std::process::id()
    ));
    std::fs::copy(module(), &copy).unwrap();
    let mut p = build(&desc(&copy, ""), None).unwrap();
    assert!(mapped(&copy));
    p.on_event(1, Event::Tick, &Index);
    drop(p);
    let unloaded = !mapped(&copy);
    let _ = std::fs::remove_file(&copy);
    assert!(unloaded, "the module is still mapped after the drop");
}
