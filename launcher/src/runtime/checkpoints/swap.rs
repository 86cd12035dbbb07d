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
//! # To and from the uncoordinated policy (message logging only)
//! The rank library's mode switches with the policy (`rank::uncoordinated`, the node's
//! side in `runtime/uncoordinated.rs`):
//! - **To it**: the cut is a coordinated checkpoint whose capture is released as
//!   `Switch{version}` (`HubCalls::switch_cut`); a checkpoint already under way when the
//!   request came is not the cut, the request is made again after it. Once the cut's
//!   checkpoint is over, the uncoordinated policy resumes from the records
//!   (`Uncoordinated::resume`: that checkpoint is every rank's first safe own checkpoint)
//!   and the hub's per-rank state starts there ([`Uncoord::at_cut`], with the log cards the
//!   ranks sent at the cut). The pause is that checkpoint's freeze plus the logs' set-up
//!   (an all-gather and two barriers).
//! - **From it**: `Realign` asks every rank for its safepoint index; once all answered,
//!   `RealignAt{T}` (`T` = the highest index + `REALIGN_AHEAD`) and the coordinated policy
//!   takes over at once (resumed from the records: its line is the last coordinated commit
//!   until its first checkpoint commits), numbering its checkpointer versions above every
//!   rank's (the ranks' checkpointers skip forward to it), and is asked for a checkpoint:
//!   its barrier holds every rank at safepoint T, which is the cut. krun answers once it
//!   committed. No rank waits unless it runs `REALIGN_AHEAD` safepoints ahead of the answer.
//!   A recovery during the collection cancels it (`RealignAt{0}`) and it starts again
//!   after; no answer in [`CUT_TIMEOUT`] cancels the swap.
//!
//! Not covered: a failure between `RealignAt` and the cut's commit is recovered by the
//! coordinated policy from its last commit (the cut of the swap to the uncoordinated
//! policy), whose images the store may have dropped by then; a cut to the uncoordinated
//! policy that was released but not committed leaves the ranks' first own checkpoint
//! unsafe (krun says so).
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

use super::uncoordinated::Uncoord;
use super::{feed, Copies, Driven, HubCalls};
use crate::runtime::control::PolicyRequest;

mod mode;

/// How long a swap waits for its consistent cut (the checkpoint, or a recovery to end)
/// before it swaps at the recovery line.
const CUT_TIMEOUT: Duration = Duration::from_secs(60);

/// The leader node id the hub's policy runs as.
const LEADER: u32 = 0;

/// How far past the highest safepoint index reported the ranks switch back to the
/// coordinated mode (the rank library's `rank::uncoordinated::REALIGN_AHEAD`).
const REALIGN_AHEAD: u64 = 64;

/// How often a cut to the uncoordinated policy is asked for again (a checkpoint under way
/// when it was asked was not the cut).
const CUT_AGAIN: Duration = Duration::from_secs(1);

struct Pending {
    desc: Description,
    reply: Sender<Result<String, String>>,
    asked: Instant,
    line_before: Option<u64>,
    checkpoint_seen: bool,
    stage: Stage,
}

/// What a swap waits for.
enum Stage {
    /// The policy in force's coordinated checkpoint (between coordinated policies).
    Cut,
    /// To the uncoordinated policy: a checkpoint released as `Switch` (asked last at).
    SwitchCut(Instant),
    /// From the uncoordinated policy: every rank's safepoint index (`Realign` sent at).
    Indices(Option<Instant>),
    /// The coordinated policy took over; its checkpoint at safepoint `at` is the cut.
    Realigned { at: u64, named: String },
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
        copies: &mut Copies,
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
        let stage = if engine.runtime().uncoord.is_some() {
            Stage::Indices(None)
        } else if desc.kind == Kind::Uncoordinated {
            engine.runtime_mut().switch_cut = Some(None);
            Stage::SwitchCut(Instant::now())
        } else {
            Stage::Cut
        };
        let ask = !matches!(stage, Stage::Indices(_));
        self.pending = Some(Pending {
            desc,
            reply,
            asked: Instant::now(),
            line_before: engine.policy().recovery_line(),
            checkpoint_seen: false,
            stage,
        });
        if ask {
            // The consistent cut: a coordinated checkpoint now.
            feed(engine, now, checkpoint_request(), copies);
        }
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
        if let Some(u) = &engine.runtime().uncoord {
            // Only back to the built-in coordinated policy, at a cut the ranks agree on.
            if desc.kind != Kind::Coordinated {
                return Err(format!(
                    "the job runs the uncoordinated policy: it swaps only to the built-in \
                     coordinated policy ({} is {})",
                    desc.source, desc.kind
                ));
            }
            if !u.logging {
                return Err(
                    "the uncoordinated policy without message logging cannot hand the \
                            job over yet (the ranks' safepoint indices are kept in the log)"
                        .into(),
                );
            }
        } else if desc.kind == Kind::Uncoordinated && !desc.logging.messages {
            return Err(format!(
                "{}: a running job swaps to the uncoordinated policy only with message logging \
                 ([logging] messages = true)",
                desc.source
            ));
        }
        check_change(
            &self.current,
            &desc,
            &line_levels(engine, copies),
            &self.defaults,
        )
        .map_err(|e| e.to_string())?;
        let snap = snapshot(engine.runtime());
        // The uncoordinated policy resumes at a commit: before the job's first, it is
        // tried as at the job's start.
        let committed = snap
            .decisions
            .iter()
            .any(|d| matches!(d.kind, DecisionKind::Committed { .. }));
        let snap = (desc.kind != Kind::Uncoordinated || committed).then_some(&snap);
        self.make(&desc, &engine.runtime().view, now, snap)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Called on every turn of the policy thread: falls back from a failed module, and
    /// swaps once the cut is reached.
    pub(super) fn poll(&mut self, engine: &mut Driven, now: Millis, copies: &mut Copies) {
        if let Some(why) = engine.policy().failure() {
            self.fall_back(engine, now, copies, why);
        }
        let Some(p) = self.pending.as_mut() else {
            return;
        };
        match p.stage {
            Stage::Cut => {}
            Stage::SwitchCut(_) => return self.poll_switch(engine, now, copies),
            Stage::Indices(_) => return self.poll_indices(engine, now, copies),
            Stage::Realigned { .. } => return self.poll_realigned(engine),
        }
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
            let start = self.layout.ranks.clone();
            let calls = engine.runtime_mut();
            calls.capturing = None;
            calls.quiet_takeover = true;
            match (&desc.kind, calls.uncoord.is_some()) {
                (Kind::Uncoordinated, false) => {
                    // Every rank's image of the cut is its first own checkpoint.
                    let v = calls
                        .switch_cut
                        .flatten()
                        .or(policy.recovery_line())
                        .unwrap_or(0);
                    let native = calls.native_of(v).unwrap_or(0);
                    let commits = calls.commits.load(std::sync::atomic::Ordering::SeqCst);
                    calls.uncoord = Some(Uncoord::at_cut(
                        &start,
                        native,
                        v,
                        &calls.early_cards,
                        commits,
                    ));
                    calls.switch_cut = None;
                }
                (Kind::Uncoordinated, true) => {}
                (_, true) => calls.uncoord = None,
                (_, false) => {}
            }
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

fn checkpoint_request() -> Event {
    Event::CheckpointRequest {
        source: RequestSource::Command,
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
    // A spare that took ranks in a recovery is no longer one.
    let mut spares: Vec<u32> = calls
        .spares
        .iter()
        .copied()
        .chain(calls.view.nodes.iter().copied())
        .filter(|n| !calls.placement.contains(n))
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
