//! Building the policy a [`Description`] names: the one place where a policy object is made
//! (`krun --policy FILE` at start, `krun policy load|unload` while the job runs).
//!
//! A policy built for a running job resumes from a [`Snapshot`] (the view, the process
//! table's rows and every decision so far): it starts with the job's recovery line and its
//! version numbering, as a new leader would, so a swap loses no work and never reuses a
//! version.
use crate::coordinated::{Config, Coordinated};
use crate::description::{Description, Kind};
use crate::module::{abi::Init, ModulePolicy};
use crate::policy::Policy;
use crate::primitives::{AgreedView, Layout, Millis, NodeId, Snapshot};
use crate::uncoordinated::{Config as UncoordinatedConfig, Uncoordinated};
use crate::PolicyError;

/// What a policy is built for.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    /// The node that runs the policy.
    pub leader: NodeId,
    /// The job's start layout (used when there is no snapshot).
    pub layout: &'a Layout,
    pub view: &'a AgreedView,
    pub now: Millis,
    /// A running job's state: the new policy resumes from it.
    pub snapshot: Option<&'a Snapshot>,
    /// The job's defaults (interval, levels, commit level) for what the description leaves
    /// out.
    pub defaults: &'a Config,
}

/// The policy `desc` names, built for `ctx`.
pub fn make_policy(
    desc: &Description,
    ctx: &Context<'_>,
) -> Result<Box<dyn Policy + Send>, PolicyError> {
    // Failure groups name nodes of the job (failed ones included).
    let known = |n: &NodeId| {
        ctx.layout.ranks.contains(n)
            || ctx.layout.spares.contains(n)
            || ctx.view.contains(*n)
            || ctx
                .snapshot
                .is_some_and(|s| s.ranks.iter().any(|r| r.node == *n) || s.spares.contains(n))
    };
    for (i, g) in desc.failure_groups.iter().enumerate() {
        if let Some(n) = g.iter().find(|n| !known(n)) {
            return Err(PolicyError::Description {
                place: desc.source.clone(),
                key: format!("failure_groups[{i}]"),
                reason: format!("node {n} is not a node of the job"),
            });
        }
    }
    match &desc.kind {
        Kind::Coordinated => {
            let cfg = desc.coordinated_config(ctx.defaults)?;
            Ok(Box::new(match ctx.snapshot {
                Some(s) => Coordinated::resume(cfg, ctx.leader, s, ctx.now)?,
                None => Coordinated::new(cfg, ctx.leader, ctx.layout, ctx.view.clone(), ctx.now)?,
            }))
        }
        Kind::Uncoordinated => {
            if ctx.snapshot.is_some() && !desc.logging.messages {
                return Err(PolicyError::Description {
                    place: desc.source.clone(),
                    key: "logging.messages".into(),
                    reason: "a running job swaps to the uncoordinated policy only with message \
                             logging (without it the recovery line needs every rank's channel \
                             counts since the program's start)"
                        .into(),
                });
            }
            let c = desc.merged_config(ctx.defaults)?;
            let cfg = UncoordinatedConfig {
                interval: c.interval,
                // Each rank's own checkpoint goes to every level written at every checkpoint.
                levels: c
                    .levels
                    .iter()
                    .filter(|l| l.every == 1)
                    .map(|l| l.level)
                    .collect(),
                safe_level: c.commit_level,
                logging: desc.logging.messages,
                stagger: desc.stagger,
                no_spare: c.no_spare,
                max_restart_attempts: c.max_restart_attempts,
                ..UncoordinatedConfig::default()
            };
            Ok(Box::new(match ctx.snapshot {
                Some(s) => Uncoordinated::resume(cfg, ctx.leader, s, ctx.now)?,
                None => Uncoordinated::new(cfg, ctx.leader, ctx.layout, ctx.view.clone(), ctx.now)?,
            }))
        }
        Kind::Module(path) => {
            let init = Init {
                leader: ctx.leader,
                layout: ctx.layout.clone(),
                view: ctx.view.clone(),
                now: ctx.now,
                snapshot: ctx.snapshot.cloned(),
                config: desc.merged_config(ctx.defaults)?,
                params: desc.params.clone(),
            };
            Ok(Box::new(ModulePolicy::load(path, &init)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primitives::{Decision, DecisionId, DecisionKind, Level, RankSlot};

    #[test]
    fn a_coordinated_policy_built_from_a_snapshot_keeps_the_recovery_line_and_numbering() {
        let layout = Layout {
            ranks: vec![0, 1],
            spares: vec![2],
        };
        let view = AgreedView::new(1, vec![0, 1, 2]);
        let id = |seq| DecisionId {
            epoch: 1,
            leader: 0,
            seq,
        };
        let snapshot = Snapshot {
            view: view.clone(),
            ranks: vec![
                RankSlot {
                    node: 0,
                    incarnation: 0,
                },
                RankSlot {
                    node: 1,
                    incarnation: 0,
                },
            ],
            spares: vec![2],
            decisions: vec![
                Decision {
                    id: id(1),
                    kind: DecisionKind::CheckpointStarted { version: 4 },
                },
                Decision {
                    id: id(2),
                    kind: DecisionKind::Committed {
                        version: 4,
                        level: Level::L2,
                    },
                },
            ],
            exits: Vec::new(),
        };
        let desc =
            Description::parse("t.toml", "policy = \"coordinated\"\ninterval_ms = 50\n").unwrap();
        let defaults = Config::default();
        let ctx = Context {
            leader: 0,
            layout: &layout,
            view: &view,
            now: 1000,
            snapshot: Some(&snapshot),
            defaults: &defaults,
        };
        let p = make_policy(&desc, &ctx).unwrap();
        assert_eq!(p.name(), "coordinated");
        assert_eq!(p.recovery_line(), Some(4));
        assert_eq!(p.next_deadline(), Some(1050));
        let fresh = make_policy(
            &desc,
            &Context {
                snapshot: None,
                ..ctx.clone()
            },
        )
        .unwrap();
        assert_eq!(fresh.recovery_line(), None);
        let groups = Description::parse(
            "g.toml",
            "policy = \"coordinated\"\nfailure_groups = [[0, 2], [7]]\n",
        )
        .unwrap();
        let e = make_policy(&groups, &ctx).err().unwrap().to_string();
        assert!(
            e.contains("failure_groups[1]") && e.contains("node 7 is not a node of the job"),
            "{e}"
        );
        let unc = Description::parse(
            "u.toml",
            "policy = \"uncoordinated\"\n[logging]\nmessages = true\n",
        )
        .unwrap();
        // It takes over a running job at its commit: every rank's first checkpoint is 4.
        let p = make_policy(&unc, &ctx).unwrap();
        assert_eq!(p.name(), "uncoordinated");
        assert_eq!(p.recovery_line(), Some(4));
        // Not without message logging.
        let nolog = Description::parse("n.toml", "policy = \"uncoordinated\"\n").unwrap();
        let e = make_policy(&nolog, &ctx).err().unwrap().to_string();
        assert!(
            e.contains("logging.messages") && e.contains("only with message logging"),
            "{e}"
        );
        let p = make_policy(
            &unc,
            &Context {
                snapshot: None,
                ..ctx.clone()
            },
        )
        .unwrap();
        assert_eq!(p.name(), "uncoordinated");
        // A job that starts: no rank checkpoints before it is past its `krun_init`.
        assert_eq!(p.next_deadline(), None);
        let mut p = p;
        struct Nothing;
        impl crate::primitives::Reads for Nothing {
            fn copies(
                &self,
                _: crate::primitives::Rank,
                _: crate::primitives::Version,
            ) -> Vec<crate::primitives::ImageCopy> {
                Vec::new()
            }
        }
        for rank in 0..layout.ranks.len() as u32 {
            p.on_event(1000, crate::primitives::Event::RankReady { rank }, &Nothing);
        }
        assert!(p.next_deadline().is_some());
        // Back from the uncoordinated policy: the coordinated one numbers above the ranks'
        // own checkpoints (their copies are indexed by the same numbers).
        let mut after = snapshot.clone();
        after.decisions.push(Decision {
            id: id(9),
            kind: DecisionKind::RankCheckpointed {
                rank: 1,
                version: 9,
                level: Level::L2,
            },
        });
        let mut p = make_policy(
            &desc,
            &Context {
                snapshot: Some(&after),
                ..ctx.clone()
            },
        )
        .unwrap();
        struct NoCopies;
        impl crate::primitives::Reads for NoCopies {
            fn copies(
                &self,
                _: crate::primitives::Rank,
                _: crate::primitives::Version,
            ) -> Vec<crate::primitives::ImageCopy> {
                Vec::new()
            }
        }
        let mut started = Vec::new();
        for ev in [
            crate::primitives::Event::Tick,
            crate::primitives::Event::CheckpointRequest {
                source: crate::primitives::RequestSource::Command,
            },
        ] {
            for a in p.on_event(1100, ev, &NoCopies) {
                if let crate::Action::Record(Decision {
                    kind: DecisionKind::CheckpointStarted { version },
                    ..
                }) = a
                {
                    started.push(version);
                }
            }
        }
        assert_eq!(
            started,
            vec![10],
            "the first checkpoint after the swap back"
        );
        let missing = Description::parse("m.toml", "module = \"/nonexistent/libp.so\"\n").unwrap();
        let e = make_policy(&missing, &ctx).err().unwrap().to_string();
        assert!(e.contains("/nonexistent/libp.so: no such file"), "{e}");
    }
}
