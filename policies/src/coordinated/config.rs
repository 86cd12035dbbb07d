//! The coordinated policy's configuration.
use crate::primitives::{Level, Millis};
use crate::PolicyError;
use serde::{Deserialize, Serialize};

/// How often to checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum IntervalChoice {
    /// Compute time between checkpoints.
    Fixed { ms: Millis },
    /// Daly's interval from the measured freeze and the job's MTBF; `initial_ms` until a
    /// checkpoint has been measured.
    Daly { mtbf_s: f64, initial_ms: Millis },
    /// Only on request.
    Never,
}

/// A level and how often a checkpoint goes there (every `every`-th checkpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelCadence {
    pub level: Level,
    pub every: u32,
}

/// Where lost ranks go when no spare is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoSpare {
    /// On the least-loaded surviving node, up to `max_ranks_per_node` ranks per node
    /// (`None`: no limit): the job continues on fewer nodes.
    Survivors { max_ranks_per_node: Option<u32> },
    /// End the job.
    Fail,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub interval: IntervalChoice,
    pub levels: Vec<LevelCadence>,
    /// A checkpoint commits when every image is safe at this level (or a more durable one).
    pub commit_level: Level,
    /// Commits kept as possible recovery lines (the store may drop older versions).
    pub keep_commits: usize,
    pub no_spare: NoSpare,
    /// Attempts to restart one rank within one recovery before the job ends.
    pub max_restart_attempts: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            interval: IntervalChoice::Fixed { ms: 600_000 },
            levels: vec![
                LevelCadence {
                    level: Level::L1,
                    every: 1,
                },
                LevelCadence {
                    level: Level::L2,
                    every: 1,
                },
                LevelCadence {
                    level: Level::L4,
                    every: 10,
                },
            ],
            commit_level: Level::L2,
            keep_commits: 2,
            no_spare: NoSpare::Survivors {
                max_ranks_per_node: None,
            },
            max_restart_attempts: 3,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |s: String| Err(PolicyError::Config(s));
        match self.interval {
            IntervalChoice::Fixed { ms: 0 } => return bad("interval must be > 0 ms".into()),
            IntervalChoice::Daly { mtbf_s, initial_ms } => {
                if !(mtbf_s.is_finite() && mtbf_s > 0.0) {
                    return bad(format!("daly: mtbf must be > 0 s, not {mtbf_s}"));
                }
                if initial_ms == 0 {
                    return bad("daly: initial interval must be > 0 ms".into());
                }
            }
            _ => {}
        }
        if let Some(c) = self.levels.iter().find(|c| c.every == 0) {
            return bad(format!("level {}: every must be >= 1", c.level));
        }
        if !self
            .levels
            .iter()
            .any(|c| c.every == 1 && c.level.covers(self.commit_level))
        {
            return bad(format!(
                "commit level {} is not written at every checkpoint (levels: {})",
                self.commit_level,
                self.levels_text()
            ));
        }
        if self.keep_commits == 0 {
            return bad("keep_commits must be >= 1".into());
        }
        if self.max_restart_attempts == 0 {
            return bad("max_restart_attempts must be >= 1".into());
        }
        Ok(())
    }

    pub(crate) fn levels_text(&self) -> String {
        self.levels
            .iter()
            .map(|c| {
                if c.every == 1 {
                    c.level.to_string()
                } else {
                    format!("{} every {}", c.level, c.every)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}
