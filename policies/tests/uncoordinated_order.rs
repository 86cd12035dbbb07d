//! The uncoordinated policy takes its events in whatever order the runtime delivers them:
//! a node's store can copy a rank's image to its buddy (level safe) before the node's own
//! capture report reaches krun (capture done). Before, the policy dropped a level reported
//! safe ahead of the capture, so that rank's checkpoint stayed in flight for good and the
//! rank was never checkpointed again (seen in krun jobs as ranks stopping after 1-2 own
//! checkpoints while the others went on).
use policies::primitives::{
    AgreedView, DecisionKind, Event, ImageCopy, Layout, Level, Millis, OpId, Rank, Reads, Version,
};
use policies::uncoordinated::{Config, IntervalChoice, Uncoordinated};
use policies::{Action, Policy};

struct NoCopies;
impl Reads for NoCopies {
    fn copies(&self, _: Rank, _: Version) -> Vec<ImageCopy> {
        Vec::new()
    }
}

/// Runs the policy's timer until it orders a capture of `rank`; returns (op, version, now).
fn next_capture(p: &mut Uncoordinated, rank: Rank, now: &mut Millis) -> (OpId, Version) {
    for _ in 0..1000 {
        *now = p.next_deadline().unwrap_or(*now + 10).max(*now);
        for a in p.on_event(*now, Event::Tick, &NoCopies) {
            if let Action::CaptureRank {
                op,
                rank: r,
                version,
                ..
            } = a
            {
                if r == rank {
                    return (op, version);
                }
            }
        }
    }
    panic!("no capture of rank {rank} was ordered");
}

fn checkpointed(actions: &[Action]) -> Vec<(Rank, Version)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Record(d) => match d.kind {
                DecisionKind::RankCheckpointed { rank, version, .. } => Some((rank, version)),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn a_level_reported_safe_before_the_capture_completes_the_checkpoint_and_the_rank_goes_on() {
    let cfg = Config {
        interval: IntervalChoice::Fixed { ms: 100 },
        logging: true,
        ..Config::default()
    };
    let layout = Layout {
        ranks: vec![0],
        spares: vec![1],
    };
    let mut p = Uncoordinated::new(cfg, 0, &layout, AgreedView::new(1, vec![0, 1]), 0).unwrap();
    // Rank 0 is past its `krun_init`.
    p.on_event(0, Event::RankReady { rank: 0 }, &NoCopies);
    let mut now: Millis = 0;
    for round in 0..3 {
        let (op, version) = next_capture(&mut p, 0, &mut now);
        // L1 and L2 safe first, the capture report after them.
        let mut out = Vec::new();
        for level in [Level::L1, Level::L2] {
            out.extend(p.on_event(
                now + 1,
                Event::LevelSafe {
                    rank: 0,
                    version,
                    level,
                },
                &NoCopies,
            ));
        }
        assert!(checkpointed(&out).is_empty(), "round {round}: {out:?}");
        let out = p.on_event(
            now + 2,
            Event::CaptureDone {
                op,
                rank: 0,
                version,
                bytes: 4096,
                seconds: 0.01,
            },
            &NoCopies,
        );
        assert_eq!(
            checkpointed(&out),
            vec![(0, version)],
            "round {round}: {out:?}"
        );
        now += 2;
    }
}

#[test]
fn the_usual_order_capture_then_level_still_completes_once() {
    let cfg = Config {
        interval: IntervalChoice::Fixed { ms: 100 },
        logging: true,
        ..Config::default()
    };
    let layout = Layout {
        ranks: vec![0],
        spares: vec![1],
    };
    let mut p = Uncoordinated::new(cfg, 0, &layout, AgreedView::new(1, vec![0, 1]), 0).unwrap();
    // Rank 0 is past its `krun_init`.
    p.on_event(0, Event::RankReady { rank: 0 }, &NoCopies);
    let mut now: Millis = 0;
    let (op, version) = next_capture(&mut p, 0, &mut now);
    let out = p.on_event(
        now,
        Event::CaptureDone {
            op,
            rank: 0,
            version,
            bytes: 4096,
            seconds: 0.01,
        },
        &NoCopies,
    );
    assert!(checkpointed(&out).is_empty(), "{out:?}");
    let out = p.on_event(
        now,
        Event::LevelSafe {
            rank: 0,
            version,
            level: Level::L2,
        },
        &NoCopies,
    );
    assert_eq!(checkpointed(&out), vec![(0, version)]);
    // A second report of the same level does not count it again.
    let out = p.on_event(
        now,
        Event::LevelSafe {
            rank: 0,
            version,
            level: Level::L2,
        },
        &NoCopies,
    );
    assert!(checkpointed(&out).is_empty(), "{out:?}");
}
