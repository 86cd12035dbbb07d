//! `krun policy load|unload|show`: swapping the job's policy while it runs, on the policy
//! thread.
//!
//! # How a swap runs
//! 1. The description is parsed (errors name the file, the line and the key) and
//!    [`check_change`] compares it with the policy in force and the levels that hold the
//!    recovery line: an unsafe change is refused with the reason.
//! 2. The new policy is built once as a trial (a module is loaded: a wrong ABI version or a
//!    panic while it builds its policy is refused here) and dropped.
//! 3. The consistent cut: the policy in force is asked for a coordinated checkpoint. Once it
//!    is over (committed: the new recovery line; or aborted: the previous line stands), and
//!    no recovery is running, the hub builds the new policy from a snapshot (view, ranks,
//!    every decision recorded: the recovery line and the version numbering carry over, as
//!    for a new leader) and puts it in the engine's place. The ranks run meanwhile: the only
//!    pause is that checkpoint's freeze.
//! 4. A module that fails later (an error or a panic in any call) is replaced the same way
//!    by the policy it replaced, at the recovery line, and krun says why.
//!
//! [`Plug::make`] is the one place a policy object is built (`policies::make_policy`).
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use policies::description::{check_change, Description, Kind};
use policies::plug::{make_policy, Context};
use policies::policy::Phase;
use policies::primitives::{
    AgreedView, DecisionKind, Event, Layout, Level, Millis, RankSlot, RequestSource, Snapshot,
};
use policies::report::Summary;
use policies::{Config, Policy, PolicyError};

use super::{feed, Copies, Driven, HubCalls};
use crate::runtime::control::PolicyRequest;

/// How long a swap waits for its consistent cut (the checkpoint, or a recovery to end)
/// before it swaps at the recovery line.
const CUT_TIMEOUT: Duration = Duration::from_secs(60);

/// The leader node id the hub's policy runs as.
const LEADER: u32 = 0;

struct Pending {
    desc: Description,
    reply: Sender<Result<String, String>>,
    asked: Instant,
    line_before: Option<u64>,
    checkpoint_seen: bool,
}

/// The policy in force, the one it replaced, and a swap in progress.
pub(super) struct Plug {
    current: Description,
    /// What a failed module falls back to.
    previous: Description,
    /// `krun policy unload` goes back to it.
    builtin: Description,
    defaults: Config,
    layout: Layout,
    /// The summaries of the policies replaced so far.
    carried: Summary,
    since: String,
    pending: Option<Pending>,
    /// How long the newest swap took on the policy thread (build, replace, settle).
    last_swap_ms: f64,
}

impl Plug {
    /// The job's policy at start: `desc` (`None`: the built-in coordinated policy) over the
    /// job's `defaults`.
    pub(super) fn start(
        desc: Option<Description>,
        defaults: Config,
        layout: Layout,
        view: &AgreedView,
    ) -> Result<(Plug, Box<dyn Policy + Send>), PolicyError> {
        let mut current = desc.unwrap_or_else(|| Description::builtin(Kind::Coordinated));
        // The job's spares, for `check_change` (a later description may name them).
        current.spares = Some(layout.spares.len() as u32);
        let builtin = match current.kind {
            Kind::Module(_) => Description {
                spares: current.spares,
                ..Description::builtin(Kind::Coordinated)
            },
            _ => current.clone(),
        };
        let plug = Plug {
            previous: builtin.clone(),
            builtin,
            current,
            defaults,
            layout,
            carried: Summary::default(),
            since: "the job's start".into(),
            pending: None,
            last_swap_ms: 0.0,
        };
        let policy = plug.make(&plug.current, view, 0, None)?;
        Ok((plug, policy))
    }

    /// Builds the policy `desc` names (the one place krun makes a policy object).
    fn make(
        &self,
        desc: &Description,
        view: &AgreedView,
        now: Millis,
        snapshot: Option<&Snapshot>,
    ) -> Result<Box<dyn Policy + Send>, PolicyError> {
        make_policy(
            desc,
            &Context {
                leader: LEADER,
                layout: &self.layout,
                view,
                now,
                snapshot,
                defaults: &self.defaults,
            },
        )
    }

    /// The end-of-job summary: the policies replaced and the last one.
    pub(super) fn total(&self, last: Summary) -> Summary {
        let c = &self.carried;
        Summary {
            checkpoints: c.checkpoints + last.checkpoints,
            aborted: c.aborted + last.aborted,
            checkpoint_seconds: c.checkpoint_seconds + last.checkpoint_seconds,
            checkpoint_bytes: c.checkpoint_bytes + last.checkpoint_bytes,
            failures: c.failures + last.failures,
            recoveries: c.recoveries + last.recoveries,
            restarts: c.restarts + last.restarts,
            rollbacks: c.rollbacks + last.rollbacks,
            lost_seconds: c.lost_seconds + last.lost_seconds,
        }
    }

    /// A request from `krun policy`.
    pub(super) fn request(
        &mut self,
        engine: &mut Driven,
        now: Millis,
        copies: &Copies,
        request: PolicyRequest,
        reply: Sender<Result<String, String>>,
    ) {
        let desc = match request {
            PolicyRequest::Show => {
                let _ = reply.send(Ok(self.show(engine.policy().as_ref())));
                return;
            }
            PolicyRequest::Unload => self.builtin.clone(),
            PolicyRequest::Load { source, text } => match Description::parse(&source, &text) {
                Ok(d) => d,
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                    return;
                }
            },
        };
        if let Err(why) = self.begin(engine, now, copies, desc.clone()) {
            let _ = reply.send(Err(format!(
                "{why}; the job keeps policy {}",
                engine.policy().name()
            )));
            return;
        }
        self.pending = Some(Pending {
            desc,
            reply,
            asked: Instant::now(),
            line_before: engine.policy().recovery_line(),
            checkpoint_seen: false,
        });
        // The consistent cut: a coordinated checkpoint now.
        feed(
            engine,
            now,
            Event::CheckpointRequest {
                source: RequestSource::Command,
            },
            copies,
        );
        self.poll(engine, now, copies);
    }

    /// Checks a swap to `desc` and builds its policy once (then drops it).
    fn begin(
        &self,
        engine: &Driven,
        now: Millis,
        copies: &Copies,
        desc: Description,
    ) -> Result<(), String> {
        if engine.runtime().stopped {
            return Err("the job's checkpoint policy has stopped".into());
        }
        if let Some(p) = &self.pending {
            return Err(format!("a swap to {} is in progress", p.desc.source));
        }
        if engine.runtime().uncoord.is_some() {
            // Its per-rank versions and lone restarts are not the coordinated policy's.
            return Err(
                "a job that started under the uncoordinated policy cannot swap policies yet".into(),
            );
        }
        check_change(
            &self.current,
            &desc,
            &line_levels(engine, copies),
            &self.defaults,
        )
        .map_err(|e| e.to_string())?;
        let snap = snapshot(engine.runtime());
        self.make(&desc, &engine.runtime().view, now, Some(&snap))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Called on every turn of the policy thread: falls back from a failed module, and
    /// swaps once the cut is reached.
    pub(super) fn poll(&mut self, engine: &mut Driven, now: Millis, copies: &Copies) {
        if let Some(why) = engine.policy().failure() {
            self.fall_back(engine, now, copies, why);
        }
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        match engine.policy().phase() {
            Phase::Checkpointing => {
                p.checkpoint_seen = true;
                if p.asked.elapsed() < CUT_TIMEOUT {
                    return;
                }
            }
            Phase::Recovering if p.asked.elapsed() < CUT_TIMEOUT => return,
            Phase::Completed | Phase::Ended => {
                let p = self.pending.take().expect("pending");
                let _ = p
                    .reply
                    .send(Err("the job ended before the swap; nothing changed".into()));
                return;
            }
            Phase::Running | Phase::Recovering => {}
        }
        let line = engine.policy().recovery_line();
        if line == p.line_before && !p.checkpoint_seen && p.asked.elapsed() < CUT_TIMEOUT {
            // The checkpoint has not started yet.
            return;
        }
        let p = self.pending.take().expect("pending");
        let freeze = (line != p.line_before)
            .then(|| engine.policy().costs().freeze_seconds)
            .flatten();
        let waited = p.asked.elapsed();
        let answer = self.swap(engine, now, copies, p.desc).map(|swapped| {
            let cut = match (line, line != p.line_before) {
                (Some(v), true) => format!(
                    "from checkpoint {v}, committed for the swap (ranks held {:.3} s)",
                    freeze.unwrap_or(0.0)
                ),
                (Some(v), false) => format!("at the recovery line (checkpoint {v})"),
                (None, _) => "from the program's start (nothing committed yet)".into(),
            };
            let text = format!(
                "policy {} in force {cut}; replaced in {:.1} ms with the ranks running ({:.2} s \
                 after the request)",
                swapped,
                self.last_swap_ms,
                waited.as_secs_f64()
            );
            eprintln!("krun: {text}");
            text
        });
        let _ = p.reply.send(answer);
    }

    /// Puts the policy `desc` names in the engine, resumed from the job's records.
    fn swap(
        &mut self,
        engine: &mut Driven,
        now: Millis,
        copies: &Copies,
        desc: Description,
    ) -> Result<String, String> {
        let t = Instant::now();
        let snap = snapshot(engine.runtime());
        let policy = self
            .make(&desc, &engine.runtime().view, now, Some(&snap))
            .map_err(|e| format!("{e}; the job keeps policy {}", engine.policy().name()))?;
        {
            // The new policy numbers its operations afresh: a capture of the old one must
            // not match them. A barrier still open (a module failed during a checkpoint)
            // stays, so that the new policy's release reaches the held ranks.
            let calls = engine.runtime_mut();
            calls.capturing = None;
            calls.quiet_takeover = true;
        }
        let old = engine.replace_policy(policy);
        self.carried = self.total(old.summary());
        drop(old);
        // The new policy settles what the records leave open (nothing, at a cut).
        feed(engine, now, Event::Tick, copies);
        engine.runtime_mut().quiet_takeover = false;
        self.last_swap_ms = t.elapsed().as_secs_f64() * 1000.0;
        self.since = match engine.policy().recovery_line() {
            Some(v) => format!("checkpoint {v}"),
            None => "the program's start".into(),
        };
        let named = format!("{} ({})", engine.policy().name(), desc.kind);
        self.previous = std::mem::replace(&mut self.current, desc);
        Ok(named)
    }

    /// A module failed: the policy it replaced takes over at the recovery line.
    fn fall_back(&mut self, engine: &mut Driven, now: Millis, copies: &Copies, why: String) {
        let back = self.previous.clone();
        let back = match self.swap(engine, now, copies, back.clone()) {
            Ok(name) => name,
            Err(e) => {
                eprintln!("krun: {e}; trying the built-in policy");
                let builtin = self.builtin.clone();
                match self.swap(engine, now, copies, builtin) {
                    Ok(name) => name,
                    Err(e) => {
                        eprintln!("krun: no policy can take over: {e}");
                        engine.runtime_mut().stopped = true;
                        return;
                    }
                }
            }
        };
        self.previous = self.builtin.clone();
        eprintln!(
            "krun: {why}: the job goes back to policy {back} at the recovery line ({})",
            self.since
        );
    }

    /// `krun policy show`'s text.
    fn show(&self, policy: &dyn Policy) -> String {
        let mut s = self.current.render(&self.defaults);
        s += &format!(
            "\n  in force: {} since {}; {:?}; recovery line: {}",
            policy.name(),
            self.since,
            policy.phase(),
            policy
                .recovery_line()
                .map_or("none yet".into(), |v| format!("checkpoint {v}"))
        );
        if matches!(self.current.kind, Kind::Module(_)) {
            s += &format!(
                "\n  if the module fails: back to policy {}",
                self.previous.kind
            );
        }
        if let Some(p) = &self.pending {
            s += &format!("\n  swapping to {} (waiting for the cut)", p.desc.source);
        }
        s
    }
}

/// The levels at which every rank's image of the recovery line is safe.
fn line_levels(engine: &Driven, copies: &Copies) -> Vec<Level> {
    let Some(v) = engine.policy().recovery_line() else {
        return Vec::new();
    };
    let ranks = engine.runtime().placement.len() as u32;
    Level::ALL
        .into_iter()
        .filter(|l| (0..ranks).all(|r| copies.0.get(&(r, v)).is_some_and(|ls| ls.contains_key(l))))
        .collect()
}

/// What a policy built for the running job resumes from: the view, each rank's node and
/// incarnation, the spares and every decision recorded.
fn snapshot(calls: &HubCalls) -> Snapshot {
    let mut incarnations = vec![0u32; calls.placement.len()];
    for d in &calls.decisions {
        if let DecisionKind::Restart {
            rank, incarnation, ..
        } = d.kind
        {
            if let Some(i) = incarnations.get_mut(rank as usize) {
                *i = (*i).max(incarnation);
            }
        }
    }
    let ranks = calls
        .placement
        .iter()
        .zip(incarnations)
        .map(|(&node, incarnation)| RankSlot { node, incarnation })
        .collect();
    let mut spares: Vec<u32> = calls
        .spares
        .iter()
        .copied()
        .chain(
            calls
                .view
                .nodes
                .iter()
                .copied()
                .filter(|n| !calls.placement.contains(n)),
        )
        .collect();
    spares.sort_unstable();
    spares.dedup();
    Snapshot {
        view: calls.view.clone(),
        ranks,
        spares,
        decisions: calls.decisions.clone(),
        exits: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policies::primitives::{Decision, DecisionId};

    #[test]
    fn the_snapshot_holds_each_ranks_newest_incarnation_and_the_free_nodes_as_spares() {
        let (mut calls, _) = super::super::tests::hub();
        calls.placement = vec![0, 4, 2];
        calls.spares = vec![3];
        calls.view = AgreedView::new(3, vec![0, 2, 4, 5]);
        let restart = |seq, incarnation, node| Decision {
            id: DecisionId {
                epoch: 2,
                leader: 0,
                seq,
            },
            kind: DecisionKind::Restart {
                rank: 1,
                incarnation,
                node,
                version: Some(4),
                source: None,
                failure_epoch: 2,
            },
        };
        calls.decisions = vec![restart(1, 1, 3), restart(2, 2, 4)];
        let s = snapshot(&calls);
        let slots: Vec<(u32, u32)> = s.ranks.iter().map(|r| (r.node, r.incarnation)).collect();
        assert_eq!(slots, vec![(0, 0), (4, 2), (2, 0)]);
        assert_eq!(s.spares, vec![3, 5]);
        assert_eq!(s.view.epoch, 3);
        assert_eq!(s.decisions.len(), 2);
        // A coordinated policy resumed from it keeps rank 1 on node 4 and restarts nothing.
        let desc = Description::builtin(Kind::Coordinated);
        let layout = Layout {
            ranks: vec![0, 1, 2],
            spares: vec![3],
        };
        let start_view = AgreedView::new(0, vec![0, 1, 2, 3]);
        let (plug, _) = Plug::start(Some(desc.clone()), Config::default(), layout, &start_view)
            .expect("the start policy");
        assert_eq!(plug.current.spares, Some(1));
        let p = plug.make(&desc, &s.view, 10, Some(&s)).unwrap();
        assert_eq!(p.phase(), Phase::Running);
        assert_eq!(p.recovery_line(), None);
    }
}
