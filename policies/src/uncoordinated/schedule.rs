//! Each rank's own checkpoint schedule: its interval (its own, the policy's, or Young/Daly
//! from the costs measured so far), the captures due and started, their results, and the
//! levels they become safe at (a checkpoint counts once safe at the policy's level; the log
//! is trimmed or the retention applied then).
use super::*;

impl Uncoordinated {
    pub(super) fn interval_of(&self, rank: Rank) -> Option<Millis> {
        if let Some(ms) = self.cfg.rank_intervals.get(&rank) {
            return Some(*ms);
        }
        match self.cfg.interval {
            IntervalChoice::Fixed { ms } => Some(ms),
            IntervalChoice::Never => None,
            IntervalChoice::Daly { mtbf_s, initial_ms } => Some(
                self.ranks
                    .get(rank as usize)
                    .and_then(|c| c.freeze)
                    .filter(|d| *d > 0.0)
                    .and_then(|d| interval::daly(d, mtbf_s).ok())
                    .map(|t| ((t * 1000.0).round() as Millis).max(1))
                    .unwrap_or(initial_ms),
            ),
        }
    }

    pub(super) fn end_with(&mut self, now: Millis, error: PolicyError) -> Vec<Action> {
        self.end = Some(End::Ended);
        self.ids.end_job(self.view.epoch, now, error)
    }

    /// Ranks a recovery is restoring: they take no checkpoint until it is over.
    pub(super) fn in_recovery(&self, rank: Rank) -> bool {
        self.recovery
            .as_ref()
            .is_some_and(|r| r.ranks.get(&rank).is_some_and(|p| *p != Pending::Done))
    }

    // ---- checkpoints -------------------------------------------------------------------

    pub(super) fn start_due(&mut self, now: Millis) -> Vec<Action> {
        let mut out = Vec::new();
        if self.end.is_some() {
            return out;
        }
        for r in 0..self.ranks.len() as Rank {
            let c = &self.ranks[r as usize];
            let due = c.next_at.is_some_and(|t| t <= now);
            if !due
                || c.inflight.is_some()
                || self.exited.contains(&r)
                || self.in_recovery(r)
                || !self.past_init(r)
            {
                continue;
            }
            let op = self.ids.op();
            let c = &mut self.ranks[r as usize];
            let version = c.next_version;
            c.next_version += 1;
            c.next_at = None;
            c.inflight = Some(Capture {
                op,
                version,
                ordered_at: now,
                captured: false,
                bytes: 0,
                lost: BTreeSet::new(),
                timed: BTreeSet::new(),
            });
            out.push(Action::CaptureRank {
                op,
                rank: r,
                version,
                levels: self.cfg.levels.clone(),
            });
        }
        out
    }

    pub(super) fn reschedule(&mut self, rank: Rank, from: Millis) {
        let every = self.interval_of(rank);
        self.ranks[rank as usize].next_at = every.map(|t| from + t);
    }

    /// Drops the capture in flight of `rank` (failed, or overtaken by a recovery).
    pub(super) fn drop_capture(&mut self, now: Millis, rank: Rank) {
        if self.ranks[rank as usize].inflight.take().is_some() {
            self.summary.aborted += 1;
            self.reschedule(rank, now);
            self.drain_checkpoint(now, rank, 0, false);
        }
    }

    pub(super) fn on_capture_done(
        &mut self,
        now: Millis,
        op: OpId,
        rank: Rank,
        version: Version,
        bytes: u64,
        seconds: f64,
    ) -> Vec<Action> {
        let Some(c) = self.ranks.get_mut(rank as usize) else {
            return Vec::new();
        };
        let Some(cap) = c
            .inflight
            .as_mut()
            .filter(|x| x.op == op && x.version == version)
        else {
            return Vec::new();
        };
        if cap.captured {
            return Vec::new();
        }
        cap.captured = true;
        cap.bytes = bytes;
        // The safe level may have been reported first (the node reports the capture after
        // its process-table write, the store its flushes as they end).
        let safe_already = cap.timed.iter().any(|l| l.covers(self.cfg.safe_level));
        c.taken.push(version);
        c.freeze = Some(seconds);
        self.costs.observe_freeze(seconds);
        self.summary.checkpoint_seconds += seconds;
        if safe_already {
            return self.complete_capture(now, rank, version);
        }
        Vec::new()
    }

    pub(super) fn on_level(
        &mut self,
        now: Millis,
        rank: Rank,
        version: Version,
        level: Level,
        safe: bool,
    ) -> Vec<Action> {
        let want = self.cfg.safe_level;
        let levels = self.cfg.levels.clone();
        let Some(c) = self.ranks.get_mut(rank as usize) else {
            return Vec::new();
        };
        let Some(cap) = c.inflight.as_mut().filter(|x| x.version == version) else {
            return Vec::new();
        };
        if !safe {
            cap.lost.insert(level);
            let hopeless = levels
                .iter()
                .filter(|l| l.covers(want))
                .all(|l| cap.lost.contains(l));
            if hopeless {
                self.drop_capture(now, rank);
            }
            return Vec::new();
        }
        if cap.timed.insert(level) {
            self.costs
                .observe_level(level, (now - cap.ordered_at) as f64 / 1000.0);
        }
        if !cap.captured || !level.covers(want) {
            return Vec::new();
        }
        self.complete_capture(now, rank, version)
    }

    /// `rank`'s capture of `version` is captured and safe at the safe level.
    pub(super) fn complete_capture(
        &mut self,
        now: Millis,
        rank: Rank,
        version: Version,
    ) -> Vec<Action> {
        let want = self.cfg.safe_level;
        let c = &mut self.ranks[rank as usize];
        let cap = c.inflight.take().expect("checked by the callers");
        c.safe.push((version, now));
        if self.cfg.keep_per_rank > 0 {
            let extra = c.safe.len().saturating_sub(self.cfg.keep_per_rank);
            c.safe.drain(..extra);
        }
        self.summary.checkpoints += 1;
        self.summary.checkpoint_bytes += cap.bytes;
        // A rank that checkpointed runs past its `krun_init`.
        self.mark_ready(rank);
        self.reschedule(rank, now);
        self.drain_checkpoint(now, rank, version, true);
        let d = self.ids.decision(
            self.view.epoch,
            DecisionKind::RankCheckpointed {
                rank,
                version,
                level: want,
            },
        );
        let mut out = vec![
            Action::Record(d),
            Action::notice(
                now,
                NoticeKind::RankCheckpointSafe {
                    rank,
                    version,
                    level: want,
                    bytes: cap.bytes,
                    seconds: (now - cap.ordered_at) as f64 / 1000.0,
                },
            ),
        ];
        if self.cfg.logging {
            self.log.trim(rank, version);
            out.push(Action::TrimLog { rank, version });
        } else {
            out.extend(self.retention());
        }
        out
    }
}
