//! The harness of the scripted scenarios: a hand-set store index, a job that feeds events and
//! collects records and lines, and helpers that pick actions out.
#![allow(dead_code)]
use std::collections::BTreeMap;

use policies::coordinated::{Config, Coordinated, IntervalChoice, LevelCadence};
use policies::primitives::{
    AgreedView, DecisionKind, Event, ImageCopy, Layout, Level, Millis, NodeId, OpId, Rank, Reads,
    Version,
};
use policies::{Action, Decision, Policy, PolicyError};

pub const MIB: u64 = 1 << 20;

/// The store's index as a test sets it.
#[derive(Default)]
pub struct Index(pub BTreeMap<(Rank, Version), Vec<ImageCopy>>);

impl Reads for Index {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        self.0.get(&(rank, version)).cloned().unwrap_or_default()
    }
}

pub fn copy(level: Level, node: Option<NodeId>) -> ImageCopy {
    ImageCopy {
        level,
        node,
        bytes: MIB,
    }
}

impl Index {
    /// L1 at home, L2 at the next node of `nodes` (a ring).
    pub fn usual(&mut self, version: Version, homes: &[NodeId], nodes: u32) {
        for (r, &home) in homes.iter().enumerate() {
            self.0.insert(
                (r as Rank, version),
                vec![
                    copy(Level::L1, Some(home)),
                    copy(Level::L2, Some((home + 1) % nodes)),
                ],
            );
        }
    }
}

pub fn cfg() -> Config {
    Config {
        interval: IntervalChoice::Fixed { ms: 100 },
        levels: vec![
            LevelCadence {
                level: Level::L1,
                every: 1,
            },
            LevelCadence {
                level: Level::L2,
                every: 1,
            },
        ],
        ..Config::default()
    }
}

pub struct Job {
    pub p: Coordinated,
    pub idx: Index,
    pub now: Millis,
    pub homes: Vec<NodeId>,
    pub nodes: u32,
    pub records: Vec<Decision>,
    pub lines: Vec<String>,
}

impl Job {
    /// `homes[r]` is rank r's node; nodes `0..nodes` are in the view, those without ranks
    /// are spares.
    pub fn new(cfg: Config, homes: &[NodeId], nodes: u32) -> Job {
        let spares = (0..nodes).filter(|n| !homes.contains(n)).collect();
        let layout = Layout {
            ranks: homes.to_vec(),
            spares,
        };
        let view = AgreedView::new(1, (0..nodes).collect());
        Job {
            p: Coordinated::new(cfg, 0, &layout, view, 0).unwrap(),
            idx: Index::default(),
            now: 0,
            homes: homes.to_vec(),
            nodes,
            records: Vec::new(),
            lines: Vec::new(),
        }
    }

    pub fn ev(&mut self, e: Event) -> Vec<Action> {
        let out = self.p.on_event(self.now, e, &self.idx);
        for a in &out {
            match a {
                Action::Record(d) | Action::Restart(d) => self.records.push(d.clone()),
                Action::Notify(n) => self.lines.push(n.to_string()),
                _ => {}
            }
        }
        out
    }

    pub fn n(&self) -> Rank {
        self.homes.len() as Rank
    }

    /// Runs one checkpoint to its commit; returns its version.
    pub fn checkpoint(&mut self) -> Version {
        self.now = self.p.next_deadline().expect("a checkpoint is scheduled");
        let out = self.ev(Event::Tick);
        let op = sync_op(&out);
        self.now += 2;
        let out = self.ev(Event::Synchronized { op });
        let caps = captures(&out);
        assert_eq!(caps.len(), self.n() as usize);
        let version = caps[0].1;
        for r in 0..self.n() {
            self.now += 1;
            self.ev(Event::CaptureDone {
                op,
                rank: r,
                version,
                bytes: MIB,
                seconds: 0.001,
            });
        }
        self.idx.usual(version, &self.homes.clone(), self.nodes);
        for r in 0..self.n() {
            self.now += 1;
            self.ev(Event::LevelSafe {
                rank: r,
                version,
                level: Level::L2,
            });
        }
        assert_eq!(self.p.recovery_line(), Some(version));
        version
    }
}

pub fn sync_op(out: &[Action]) -> OpId {
    out.iter()
        .find_map(|a| match a {
            Action::Synchronize { op, .. } => Some(*op),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Synchronize in {out:?}"))
}

pub fn captures(out: &[Action]) -> Vec<(Rank, Version, Vec<Level>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Capture {
                rank,
                version,
                levels,
                ..
            } => Some((*rank, *version, levels.clone())),
            _ => None,
        })
        .collect()
}

pub fn restarts(out: &[Action]) -> Vec<(Rank, NodeId, u32, Option<ImageCopy>)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Restart(Decision {
                kind:
                    DecisionKind::Restart {
                        rank,
                        node,
                        incarnation,
                        source,
                        ..
                    },
                ..
            }) => Some((*rank, *node, *incarnation, *source)),
            _ => None,
        })
        .collect()
}

pub fn rollbacks(out: &[Action]) -> Vec<(OpId, Rank, Version)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Rollback {
                op, rank, version, ..
            } => Some((*op, *rank, *version)),
            _ => None,
        })
        .collect()
}

pub fn released(out: &[Action]) -> Option<Vec<Rank>> {
    out.iter().find_map(|a| match a {
        Action::Release { ranks } => Some(ranks.clone()),
        _ => None,
    })
}

pub fn ended(out: &[Action]) -> Option<Option<PolicyError>> {
    out.iter().find_map(|a| match a {
        Action::EndJob { error } => Some(error.clone()),
        _ => None,
    })
}

pub fn fail(job: &mut Job, nodes: &[NodeId], epoch: u64) -> Vec<Action> {
    let alive: Vec<NodeId> = (0..job.nodes).filter(|n| !nodes.contains(n)).collect();
    job.now += 5;
    job.ev(Event::FailureAgreed {
        epoch,
        failed: nodes.to_vec(),
        view: AgreedView::new(epoch, alive),
    })
}

/// Completes every restart and rollback in `out`; returns the last call's actions.
pub fn complete(job: &mut Job, out: &[Action]) -> Vec<Action> {
    let mut last = Vec::new();
    for a in out {
        match a {
            Action::Restart(d) => {
                job.now += 1;
                if let DecisionKind::Restart { rank, node, .. } = d.kind {
                    last = job.ev(Event::RestartDone {
                        decision: d.id,
                        rank,
                        node,
                        seconds: 0.01,
                    });
                }
            }
            Action::Rollback {
                op, rank, version, ..
            } => {
                job.now += 1;
                last = job.ev(Event::RollbackDone {
                    op: *op,
                    rank: *rank,
                    version: *version,
                    seconds: 0.01,
                });
            }
            _ => {}
        }
    }
    last
}
