//! A policy described in a TOML file (the analog of the HA framework's XML descriptions):
//! which policy, when to checkpoint, where the images go, what a failure does, and what to
//! inject for experiments. `krun --policy FILE` starts a job with it; `krun policy load FILE`
//! swaps it in while the job runs (after [`check_change`] accepted the change).
//!
//! ```toml
//! policy = "coordinated"            # built in: coordinated | uncoordinated
//! # module = "/opt/policies/libmy_policy.so"   # or a policy module (instead of `policy`)
//! interval_ms = 500                 # or: daly = { mtbf_s = 86400, initial_ms = 60000 }
//! commit_level = "L2"               # a checkpoint commits once every image is safe there
//! keep_commits = 2
//! max_restarts = 3                  # attempts to restart one rank in one recovery
//! spares = 1                        # spare nodes (krun --policy: the job's --spares)
//! restart = "spare"                 # spare | shrink | in_place
//! max_ranks_per_node = 4            # with restart = "shrink"
//! failure_groups = [[0, 1], [2, 3]] # nodes that fail together
//! stagger = true                    # uncoordinated: spread the ranks' first checkpoints
//!
//! [levels]                          # level = every N-th checkpoint
//! L1 = 1
//! L2 = 1
//! L4 = 10
//!
//! [logging]                         # event logging (uncoordinated policies)
//! messages = true
//! dsm = false
//!
//! [inject]                          # experiments: as --inject-failure
//! failures = ["node=1@3ckpt"]
//!
//! [params]                          # free `key = "value"` pairs handed to a module
//! cadence = "2"
//! ```
//!
//! Every key is optional except the choice of policy; an absent interval, level list or
//! commit level takes the job's default (`--checkpoint-interval`, the store's level). Any
//! error names the file, the line and the key.
use crate::coordinated::{Config, IntervalChoice, LevelCadence, NoSpare};
use crate::primitives::{Level, NodeId};
use crate::PolicyError;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Which policy runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Coordinated,
    Uncoordinated,
    /// A policy module: a shared library built against the primitives API
    /// ([`crate::module`]).
    Module(PathBuf),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Coordinated => f.write_str("coordinated"),
            Kind::Uncoordinated => f.write_str("uncoordinated"),
            Kind::Module(p) => write!(f, "module {}", p.display()),
        }
    }
}

/// Where lost ranks restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// On a spare node; none left: the job ends.
    Spare,
    /// On a spare, else on the least-loaded survivor: the job goes on with fewer nodes.
    Shrink,
    /// On the node they ran on, once it is back.
    InPlace,
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Spare => "spare",
            Placement::Shrink => "shrink",
            Placement::InPlace => "in_place",
        })
    }
}

/// What the event log records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Logging {
    pub messages: bool,
    pub dsm: bool,
}

/// A checked policy description.
#[derive(Clone, Debug, PartialEq)]
pub struct Description {
    /// Where it came from: a file's path, or `(built-in)`.
    pub source: String,
    pub kind: Kind,
    /// `None`: the job's default.
    pub interval: Option<IntervalChoice>,
    /// `None`: the job's default.
    pub levels: Option<Vec<LevelCadence>>,
    /// `None`: the job's default.
    pub commit_level: Option<Level>,
    pub keep_commits: usize,
    pub max_restarts: u32,
    /// `None`: the job's `--spares`.
    pub spares: Option<u32>,
    pub restart: Placement,
    pub max_ranks_per_node: Option<u32>,
    pub failure_groups: Vec<Vec<NodeId>>,
    pub logging: Logging,
    /// Uncoordinated policy: spread the ranks' first checkpoints over one interval (`stagger`,
    /// default true); false orders every rank's capture at the same moment.
    pub stagger: bool,
    /// Failure injections (`--inject-failure` syntax) with their lines; checked by krun.
    pub inject: Vec<(String, usize)>,
    /// Free parameters for a module.
    pub params: BTreeMap<String, String>,
}

impl Description {
    /// The built-in coordinated policy with the job's defaults.
    pub fn builtin(kind: Kind) -> Description {
        let d = Config::default();
        Description {
            source: "(built-in)".into(),
            kind,
            interval: None,
            levels: None,
            commit_level: None,
            keep_commits: d.keep_commits,
            max_restarts: d.max_restart_attempts,
            spares: None,
            restart: Placement::Spare,
            max_ranks_per_node: None,
            failure_groups: Vec::new(),
            logging: Logging::default(),
            stagger: true,
            inject: Vec::new(),
            params: BTreeMap::new(),
        }
    }

    /// Reads and checks a description file.
    pub fn load(path: &Path) -> Result<Description, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Description {
            place: path.display().to_string(),
            key: "(file)".into(),
            reason: e.to_string(),
        })?;
        Description::parse(&path.display().to_string(), &text)
    }

    /// Checks a description's text; `source` names it in errors (a path).
    pub fn parse(source: &str, text: &str) -> Result<Description, PolicyError> {
        let err = |offset: usize, key: &str, reason: String| PolicyError::Description {
            place: format!("{source}:{}", line_of(text, offset)),
            key: key.to_string(),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            let msg = e.message().trim().to_string();
            // serde names an unknown key in backticks: use it; else the key on that line.
            let key = match msg.strip_prefix("unknown field `") {
                Some(rest) => {
                    let k = rest.split('`').next().unwrap_or("");
                    match section_at(text, at) {
                        Some(s) => format!("{s}.{k}"),
                        None => k.to_string(),
                    }
                }
                None => key_at(text, at),
            };
            err(at, &key, msg)
        })?;
        let kind = match (&raw.policy, &raw.module) {
            (Some(p), None) => match p.get_ref().as_str() {
                "coordinated" => Kind::Coordinated,
                "uncoordinated" => Kind::Uncoordinated,
                other => {
                    return Err(err(
                        p.span().start,
                        "policy",
                        format!(
                            "unknown policy {other:?} (built in: coordinated, uncoordinated; \
                             or module = \"path/to/lib.so\")"
                        ),
                    ))
                }
            },
            (None, Some(m)) => {
                if m.get_ref().trim().is_empty() {
                    return Err(err(m.span().start, "module", "is empty".into()));
                }
                let p = PathBuf::from(m.get_ref());
                // A relative path is relative to the description's directory.
                let p = match Path::new(source).parent() {
                    Some(dir) if p.is_relative() && !dir.as_os_str().is_empty() => dir.join(p),
                    _ => p,
                };
                Kind::Module(p)
            }
            (Some(p), Some(_)) => {
                return Err(err(
                    p.span().start,
                    "policy",
                    "give either `policy` (a built-in one) or `module`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(err(
                    0,
                    "policy",
                    "missing: say which policy runs (policy = \"coordinated\" or \
                     \"uncoordinated\", or module = \"path/to/lib.so\")"
                        .into(),
                ))
            }
        };
        let mut d = Description::builtin(kind);
        d.source = source.to_string();
        let positive = |v: &Spanned<i64>, key: &str| -> Result<u64, PolicyError> {
            match u64::try_from(*v.get_ref()) {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(err(
                    v.span().start,
                    key,
                    format!("must be a positive integer, not {}", v.get_ref()),
                )),
            }
        };
        let small = |v: &Spanned<i64>, key: &str| -> Result<u32, PolicyError> {
            let n = positive(v, key)?;
            u32::try_from(n).map_err(|_| err(v.span().start, key, format!("{n} is too large")))
        };
        d.interval = match (&raw.interval_ms, &raw.daly) {
            (Some(_), Some(daly)) => {
                return Err(err(
                    daly.span().start,
                    "daly",
                    "give either interval_ms or daly, not both".into(),
                ))
            }
            (Some(ms), None) => Some(IntervalChoice::Fixed {
                ms: positive(ms, "interval_ms")?,
            }),
            (None, Some(daly)) => {
                let RawDaly { mtbf_s, initial_ms } = daly.get_ref();
                if !(mtbf_s.get_ref().is_finite() && *mtbf_s.get_ref() > 0.0) {
                    return Err(err(
                        mtbf_s.span().start,
                        "daly.mtbf_s",
                        format!("must be > 0 seconds, not {}", mtbf_s.get_ref()),
                    ));
                }
                Some(IntervalChoice::Daly {
                    mtbf_s: *mtbf_s.get_ref(),
                    initial_ms: match initial_ms {
                        Some(ms) => positive(ms, "daly.initial_ms")?,
                        None => 60_000,
                    },
                })
            }
            (None, None) => None,
        };
        if let Some(levels) = &raw.levels {
            let mut out = Vec::new();
            for (name, every) in levels.get_ref() {
                let key = format!("levels.{name}");
                let level = Level::parse(name).ok_or_else(|| {
                    err(
                        every.span().start,
                        &key,
                        format!("unknown level {name:?} (L1, L2, L3, L4)"),
                    )
                })?;
                out.push(LevelCadence {
                    level,
                    every: small(every, &key)?,
                });
            }
            if out.is_empty() {
                return Err(err(
                    levels.span().start,
                    "levels",
                    "names no level (L1 = 1, L2 = 1, ...)".into(),
                ));
            }
            out.sort_by_key(|c| c.level);
            d.levels = Some(out);
        }
        if let Some(c) = &raw.commit_level {
            d.commit_level = Some(Level::parse(c.get_ref()).ok_or_else(|| {
                err(
                    c.span().start,
                    "commit_level",
                    format!("unknown level {:?} (L1, L2, L3, L4)", c.get_ref()),
                )
            })?);
        }
        if let (Some(levels), Some(commit)) = (&d.levels, d.commit_level) {
            if !levels
                .iter()
                .any(|c| c.every == 1 && c.level.covers(commit))
            {
                let at = raw.commit_level.as_ref().map_or(0, |c| c.span().start);
                return Err(err(
                    at,
                    "commit_level",
                    format!(
                        "{commit} is not written at every checkpoint: no level at or above it \
                         has every = 1 in [levels]"
                    ),
                ));
            }
        }
        if let Some(st) = &raw.stagger {
            if d.kind != Kind::Uncoordinated {
                return Err(err(
                    st.span().start,
                    "stagger",
                    "only the uncoordinated policy checkpoints ranks on their own schedules".into(),
                ));
            }
            d.stagger = *st.get_ref();
        }
        if let Some(k) = &raw.keep_commits {
            d.keep_commits = positive(k, "keep_commits")? as usize;
        }
        if let Some(m) = &raw.max_restarts {
            d.max_restarts = small(m, "max_restarts")?;
        }
        if let Some(s) = &raw.spares {
            d.spares = Some(u32::try_from(*s.get_ref()).map_err(|_| {
                err(
                    s.span().start,
                    "spares",
                    format!("must be a count >= 0, not {}", s.get_ref()),
                )
            })?);
        }
        if let Some(r) = &raw.restart {
            d.restart = match r.get_ref().as_str() {
                "spare" => Placement::Spare,
                "shrink" => Placement::Shrink,
                "in_place" => Placement::InPlace,
                other => {
                    return Err(err(
                        r.span().start,
                        "restart",
                        format!("unknown placement {other:?} (spare, shrink, in_place)"),
                    ))
                }
            };
        }
        if let Some(m) = &raw.max_ranks_per_node {
            if d.restart != Placement::Shrink {
                return Err(err(
                    m.span().start,
                    "max_ranks_per_node",
                    format!(
                        "only means something with restart = \"shrink\" (restart is {})",
                        d.restart
                    ),
                ));
            }
            d.max_ranks_per_node = Some(small(m, "max_ranks_per_node")?);
        }
        if let Some(groups) = &raw.failure_groups {
            let mut seen = BTreeSet::new();
            for (i, g) in groups.get_ref().iter().enumerate() {
                let key = format!("failure_groups[{i}]");
                if g.get_ref().is_empty() {
                    return Err(err(g.span().start, &key, "is empty".into()));
                }
                let mut nodes = Vec::new();
                for n in g.get_ref() {
                    let node = NodeId::try_from(*n)
                        .map_err(|_| err(g.span().start, &key, format!("{n} is not a node id")))?;
                    if !seen.insert(node) {
                        return Err(err(
                            g.span().start,
                            &key,
                            format!("node {node} is in two failure groups"),
                        ));
                    }
                    nodes.push(node);
                }
                d.failure_groups.push(nodes);
            }
        }
        if let Some(l) = &raw.logging {
            d.logging = Logging {
                messages: l.messages.unwrap_or(false),
                dsm: l.dsm.unwrap_or(false),
            };
        }
        if let Some(inj) = &raw.inject {
            for f in &inj.failures {
                if f.get_ref().trim().is_empty() {
                    return Err(err(f.span().start, "inject.failures", "is empty".into()));
                }
                d.inject
                    .push((f.get_ref().clone(), line_of(text, f.span().start)));
            }
        }
        if let Some(p) = raw.params {
            d.params = p;
        }
        Ok(d)
    }

    /// The coordinated policy's configuration: this description over `defaults` (the job's
    /// interval, levels and commit level); refuses what that policy cannot do.
    pub fn coordinated_config(&self, defaults: &Config) -> Result<Config, PolicyError> {
        if self.restart == Placement::InPlace {
            return Err(PolicyError::Description {
                place: self.source.clone(),
                key: "restart".into(),
                reason: "the coordinated policy cannot restart ranks on their failed node \
                         (in_place); use spare or shrink"
                    .into(),
            });
        }
        if !self.stagger {
            return Err(PolicyError::Description {
                place: self.source.clone(),
                key: "stagger".into(),
                reason: "the coordinated policy checkpoints every rank together".into(),
            });
        }
        if self.logging != Logging::default() {
            return Err(PolicyError::Description {
                place: self.source.clone(),
                key: "logging".into(),
                reason: "the coordinated policy logs no events; logging needs an \
                         uncoordinated policy"
                    .into(),
            });
        }
        self.merged_config(defaults)
    }

    /// This description's settings over `defaults`, checked as a coordinated configuration
    /// (`restart = "in_place"` maps to ending the job when no spare is left).
    pub fn merged_config(&self, defaults: &Config) -> Result<Config, PolicyError> {
        let mut cfg = defaults.clone();
        if let Some(i) = &self.interval {
            cfg.interval = i.clone();
        }
        if let Some(l) = &self.levels {
            cfg.levels = l.clone();
        }
        if let Some(c) = self.commit_level {
            cfg.commit_level = c;
        }
        cfg.keep_commits = self.keep_commits;
        cfg.max_restart_attempts = self.max_restarts;
        cfg.no_spare = match self.restart {
            Placement::Spare | Placement::InPlace => NoSpare::Fail,
            Placement::Shrink => NoSpare::Survivors {
                max_ranks_per_node: self.max_ranks_per_node,
            },
        };
        cfg.validate().map_err(|e| PolicyError::Description {
            place: self.source.clone(),
            key: "(levels, interval)".into(),
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// The levels this description writes (the job's defaults when it names none).
    pub fn effective_levels(&self, defaults: &Config) -> Vec<LevelCadence> {
        self.levels
            .clone()
            .unwrap_or_else(|| defaults.levels.clone())
    }

    /// `krun policy show`'s text.
    pub fn render(&self, defaults: &Config) -> String {
        let interval = match self.interval.as_ref().unwrap_or(&defaults.interval) {
            IntervalChoice::Fixed { ms } if *ms >= u64::MAX / 8 => "on request only".to_string(),
            IntervalChoice::Fixed { ms } => format!("every {ms} ms"),
            IntervalChoice::Daly { mtbf_s, initial_ms } => {
                format!("daly (MTBF {mtbf_s} s; {initial_ms} ms until measured)")
            }
            IntervalChoice::Never => "on request only".into(),
        };
        let levels = self
            .effective_levels(defaults)
            .iter()
            .map(|c| {
                if c.every == 1 {
                    c.level.to_string()
                } else {
                    format!("{} every {}", c.level, c.every)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "policy {} (from {})\n  interval: {interval}\n  levels: {levels}; commit at {}; \
             keep {} commits\n  restart: {}{}; max {} attempts per rank{}",
            self.kind,
            self.source,
            self.commit_level.unwrap_or(defaults.commit_level),
            self.keep_commits,
            self.restart,
            self.max_ranks_per_node
                .map_or(String::new(), |m| format!(" (at most {m} ranks per node)")),
            self.max_restarts,
            self.spares
                .map_or(String::new(), |s| format!("; {s} spares")),
        );
        if !self.failure_groups.is_empty() {
            s += &format!("\n  failure groups: {:?}", self.failure_groups);
        }
        if self.logging != Logging::default() {
            s += &format!(
                "\n  logging: messages {}, dsm {}",
                self.logging.messages, self.logging.dsm
            );
        }
        if !self.inject.is_empty() {
            let f: Vec<&str> = self.inject.iter().map(|(t, _)| t.as_str()).collect();
            s += &format!("\n  injected failures: {}", f.join(", "));
        }
        if !self.params.is_empty() {
            s += &format!("\n  params: {:?}", self.params);
        }
        s
    }
}

/// Whether the job may go from `old` to `new` while it runs. `recovery_line_levels`: the
/// levels at which every image of the current recovery line is safe (empty: no commit yet).
/// `defaults`: the job's levels when a description names none.
pub fn check_change(
    old: &Description,
    new: &Description,
    recovery_line_levels: &[Level],
    defaults: &Config,
) -> Result<(), PolicyError> {
    let refuse = |reason: String| Err(PolicyError::UnsafeChange { reason });
    let new_levels = new.effective_levels(defaults);
    if !recovery_line_levels.is_empty()
        && !new_levels
            .iter()
            .any(|c| recovery_line_levels.contains(&c.level))
    {
        let held: Vec<String> = recovery_line_levels.iter().map(|l| l.to_string()).collect();
        let kept: Vec<String> = new_levels.iter().map(|c| c.level.to_string()).collect();
        return refuse(format!(
            "the recovery line is held only at {}, and {} keeps none of them (levels: {}): \
             a failure before its first commit would lose the job's work; keep {} in [levels]",
            held.join(", "),
            new.source,
            kept.join(", "),
            held.last().map(String::as_str).unwrap_or("it"),
        ));
    }
    if new.spares.is_some() && new.spares != old.spares {
        return refuse(format!(
            "spares: the job's spare nodes are set when it starts ({}); {} asks for {} (add \
             nodes with `krun node add`)",
            old.spares.map_or("as --spares".into(), |s| s.to_string()),
            new.source,
            new.spares.unwrap_or(0)
        ));
    }
    if !new.inject.is_empty() && new.inject != old.inject {
        return refuse(format!(
            "inject: failures are injected from the job's start (krun --policy or \
             --inject-failure), not by {}",
            new.source
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    policy: Option<Spanned<String>>,
    module: Option<Spanned<String>>,
    interval_ms: Option<Spanned<i64>>,
    daly: Option<Spanned<RawDaly>>,
    levels: Option<Spanned<BTreeMap<String, Spanned<i64>>>>,
    commit_level: Option<Spanned<String>>,
    keep_commits: Option<Spanned<i64>>,
    max_restarts: Option<Spanned<i64>>,
    spares: Option<Spanned<i64>>,
    restart: Option<Spanned<String>>,
    max_ranks_per_node: Option<Spanned<i64>>,
    failure_groups: Option<Spanned<Vec<Spanned<Vec<i64>>>>>,
    logging: Option<RawLogging>,
    stagger: Option<Spanned<bool>>,
    inject: Option<RawInject>,
    params: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaly {
    mtbf_s: Spanned<f64>,
    initial_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    messages: Option<bool>,
    dsm: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInject {
    failures: Vec<Spanned<String>>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The `[section]` the byte at `offset` is in.
fn section_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    before.lines().rev().find_map(|l| {
        let t = l.trim();
        (t.starts_with('[') && !t.starts_with("[["))
            .then(|| t.trim_matches(|c| c == '[' || c == ']').trim().to_string())
    })
}

/// The (section-qualified) key on the line of `offset`.
fn key_at(text: &str, offset: usize) -> String {
    let line = text[..offset.min(text.len())]
        .rsplit('\n')
        .next()
        .unwrap_or("")
        .to_string()
        + text[offset.min(text.len())..]
            .split('\n')
            .next()
            .unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| "(syntax)".into());
    match section_at(text, offset) {
        Some(s) if key != "(syntax)" => format!("{s}.{key}"),
        _ => key,
    }
}

#[cfg(test)]
mod tests;
