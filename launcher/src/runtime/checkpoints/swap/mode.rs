//! The swaps to and from the uncoordinated policy (see the parent module's doc): the stages
//! of [`Plug`] that switch the rank library's mode.
use std::collections::BTreeMap;
use std::time::Instant;

use policies::policy::Phase;
use policies::primitives::{DecisionKind, Millis, Rank};

use super::{
    checkpoint_request, feed, Copies, Driven, Pending, Plug, Stage, CUT_AGAIN, CUT_TIMEOUT,
    REALIGN_AHEAD,
};
use crate::runtime::control::LauncherToNode;

impl Plug {
    /// A swap to the uncoordinated policy: waits for a checkpoint released as `Switch`.
    pub(super) fn poll_switch(&mut self, engine: &mut Driven, now: Millis, copies: &mut Copies) {
        let p = self.pending.as_mut().expect("pending");
        let phase = engine.policy().phase();
        if matches!(phase, Phase::Completed | Phase::Ended) {
            engine.runtime_mut().switch_cut = None;
            let p = self.pending.take().expect("pending");
            let _ = p
                .reply
                .send(Err("the job ended before the swap; nothing changed".into()));
            return;
        }
        let Some(cut) = engine.runtime().switch_cut else {
            return;
        };
        match cut {
            None => {
                // Not released yet: asked again while no checkpoint runs, for a while.
                if p.asked.elapsed() >= CUT_TIMEOUT {
                    engine.runtime_mut().switch_cut = None;
                    let p = self.pending.take().expect("pending");
                    let _ = p.reply.send(Err(format!(
                        "no coordinated checkpoint could be taken for the cut in \
                         {CUT_TIMEOUT:?}; the job keeps policy {}",
                        engine.policy().name()
                    )));
                    return;
                }
                if let Stage::SwitchCut(last) = &mut p.stage {
                    if phase == Phase::Running && last.elapsed() >= CUT_AGAIN {
                        *last = Instant::now();
                        feed(engine, now, checkpoint_request(), copies);
                    }
                }
            }
            Some(v) => {
                let over = engine.runtime().decisions.iter().any(|d| {
                    matches!(d.kind, DecisionKind::Committed { version, .. }
                        | DecisionKind::Aborted { version, .. } if version == v)
                });
                if !over && p.asked.elapsed() < CUT_TIMEOUT {
                    return;
                }
                let p = self.pending.take().expect("pending");
                let line = engine.policy().recovery_line();
                let freeze = engine.policy().costs().freeze_seconds.unwrap_or(0.0);
                let waited = p.asked.elapsed();
                let answer = self.swap(engine, now, copies, p.desc).map(|swapped| {
                    let cut = if line == Some(v) {
                        format!(
                            "from checkpoint {v}, committed for the swap: every rank's first own \
                             checkpoint, message logging on from it (ranks held {freeze:.3} s)"
                        )
                    } else {
                        format!(
                            "from checkpoint {v}, where the ranks switched, but it did not \
                             commit (recovery line: {line:?}): a rank lost before its first own \
                             checkpoint cannot be restarted"
                        )
                    };
                    let text = format!(
                        "policy {swapped} in force {cut}; replaced in {:.1} ms with the ranks \
                         running ({:.2} s after the request)",
                        self.last_swap_ms,
                        waited.as_secs_f64()
                    );
                    eprintln!("krun: {text}");
                    text
                });
                let _ = p.reply.send(answer);
            }
        }
    }

    /// A swap from the uncoordinated policy: collects the ranks' safepoint indices, then
    /// names the safepoint of the cut and puts the coordinated policy in force.
    pub(super) fn poll_indices(&mut self, engine: &mut Driven, now: Millis, copies: &mut Copies) {
        let p = self.pending.as_mut().expect("pending");
        let phase = engine.policy().phase();
        let Stage::Indices(sent) = p.stage else {
            return;
        };
        let fail = |engine: &mut Driven, p: Pending, why: String| {
            let _ = p.reply.send(Err(format!(
                "{why}; the job keeps policy {}",
                engine.policy().name()
            )));
        };
        if matches!(phase, Phase::Completed | Phase::Ended) {
            let p = self.pending.take().expect("pending");
            return fail(engine, p, "the job ended before the swap".into());
        }
        let calls = engine.runtime_mut();
        let Some(u) = calls.uncoord.as_mut() else {
            let p = self.pending.take().expect("pending");
            return fail(
                engine,
                p,
                "the uncoordinated policy is no longer in force".into(),
            );
        };
        if phase == Phase::Recovering {
            if sent.is_some() {
                // A restarted rank never heard `Realign`: asked again after the recovery.
                u.realign = None;
                (calls.send)(&LauncherToNode::RealignAt { index: 0 });
                p.stage = Stage::Indices(None);
            }
            if p.asked.elapsed() >= CUT_TIMEOUT {
                let p = self.pending.take().expect("pending");
                return fail(engine, p, "a recovery outlasted the swap's wait".into());
            }
            return;
        }
        let Some(sent) = sent else {
            u.realign = Some(BTreeMap::new());
            (calls.send)(&LauncherToNode::Realign);
            p.stage = Stage::Indices(Some(Instant::now()));
            return;
        };
        let ranks = calls.placement.len() as Rank;
        let got = u.realign.as_ref().map_or(0, |m| m.len() as Rank);
        if got < ranks {
            if sent.elapsed() >= CUT_TIMEOUT {
                let missing: Vec<Rank> = (0..ranks)
                    .filter(|r| !u.realign.as_ref().is_some_and(|m| m.contains_key(r)))
                    .collect();
                u.realign = None;
                (calls.send)(&LauncherToNode::RealignAt { index: 0 });
                let p = self.pending.take().expect("pending");
                return fail(
                    engine,
                    p,
                    format!("ranks {missing:?} did not say their safepoint in {CUT_TIMEOUT:?}"),
                );
            }
            return;
        }
        let answers = u.realign.take().unwrap_or_default();
        let at = answers.values().map(|a| a.0).max().unwrap_or(0) + REALIGN_AHEAD;
        // The coordinated checkpoints number above every rank's own ones.
        let native = answers
            .values()
            .map(|a| a.1)
            .chain([u.newest_native() + 1])
            .max()
            .unwrap_or(1);
        let newest = u.newest_version();
        (calls.send)(&LauncherToNode::RealignAt { index: at });
        calls.native_newest = native;
        calls.versions.retain(|&n, _| n < native);
        calls.barrier = None;
        // Copies of own checkpoints never recorded (captures in flight) must not be taken
        // for the coordinated checkpoints of the same numbers.
        let recorded = calls
            .decisions
            .iter()
            .filter_map(|d| match d.kind {
                DecisionKind::RankCheckpointed { version, .. } => Some(version),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        copies.0.retain(|&(_, v), _| v <= recorded || v > newest);
        let p = self.pending.take().expect("pending");
        match self.swap(engine, now, copies, p.desc.clone()) {
            Ok(named) => {
                // Its line: the last coordinated commit (none for a job started
                // uncoordinated) until the cut's checkpoint commits.
                let line_before = engine.policy().recovery_line();
                feed(engine, now, checkpoint_request(), copies);
                self.pending = Some(Pending {
                    line_before,
                    stage: Stage::Realigned { at, named },
                    asked: Instant::now(),
                    checkpoint_seen: false,
                    ..p
                });
            }
            Err(e) => {
                // The ranks switch at T anyway and ask as in a coordinated job: there is no
                // going back to the uncoordinated policy from here.
                eprintln!("krun: the swap back to the coordinated policy failed: {e}");
                let _ = p.reply.send(Err(e));
            }
        }
    }

    /// The coordinated policy is in force: answers once its checkpoint at the cut is over.
    pub(super) fn poll_realigned(&mut self, engine: &mut Driven) {
        let p = self.pending.as_mut().expect("pending");
        let phase = engine.policy().phase();
        if phase == Phase::Checkpointing {
            p.checkpoint_seen = true;
        }
        let line = engine.policy().recovery_line();
        let committed = line != p.line_before;
        let over = committed
            || matches!(phase, Phase::Completed | Phase::Ended)
            || (p.checkpoint_seen && phase != Phase::Checkpointing)
            || p.asked.elapsed() >= CUT_TIMEOUT;
        if !over {
            return;
        }
        let p = self.pending.take().expect("pending");
        let Stage::Realigned { at, named } = p.stage else {
            return;
        };
        let freeze = engine.policy().costs().freeze_seconds.unwrap_or(0.0);
        let cut = match line {
            Some(v) if committed => format!(
                "from checkpoint {v}, committed for the swap at every rank's safepoint {at} \
                 (ranks held {freeze:.3} s); message logging stopped"
            ),
            _ => format!(
                "since the ranks' safepoint {at}, but its checkpoint did not commit (recovery \
                 line: {line:?})"
            ),
        };
        let text = format!(
            "policy {named} in force {cut}; {:.2} s after the request",
            p.asked.elapsed().as_secs_f64()
        );
        eprintln!("krun: {text}");
        self.since = match line {
            Some(v) => format!("checkpoint {v}"),
            None => self.since.clone(),
        };
        let _ = p.reply.send(Ok(text));
    }
}
