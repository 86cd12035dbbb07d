//! Which policy a job runs and with what settings: `[policy]` in krun.toml, `KRUN_POLICY_*`,
//! `krun --policy FILE`; the built-in coordinated policy's defaults.

use super::*;

/// Which HA policy drives a job's checkpoints (`[policy] kind`, `KRUN_POLICY_KIND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Global checkpoints: a barrier, every rank captured, committed when all are safe.
    Coordinated,
    /// Each rank on its own schedule; with logging only lost ranks restart, else the
    /// recovery line names who rolls back.
    Uncoordinated,
}

impl PolicyKind {
    pub fn parse(v: &str) -> Result<PolicyKind, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "coordinated" => Ok(PolicyKind::Coordinated),
            "uncoordinated" => Ok(PolicyKind::Uncoordinated),
            _ => Err(format!(
                "{v:?} is not a policy (coordinated or uncoordinated)"
            )),
        }
    }
}

/// The `[policy]` settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicySettings {
    pub kind: PolicyKind,
    /// Uncoordinated: sender-based pessimistic message logging.
    pub logging: bool,
}

impl Default for PolicySettings {
    fn default() -> PolicySettings {
        PolicySettings {
            kind: PolicyKind::Coordinated,
            logging: true,
        }
    }
}

impl PolicySettings {
    /// The description these settings name (`None`: the built-in default, coordinated).
    pub fn description(&self) -> Option<policies::description::Description> {
        use policies::description::{Description, Kind};
        match self.kind {
            PolicyKind::Coordinated => None,
            PolicyKind::Uncoordinated => {
                let mut d = Description::builtin(Kind::Uncoordinated);
                d.logging.messages = self.logging;
                d.source = "[policy] kind = \"uncoordinated\"".into();
                Some(d)
            }
        }
    }

    /// From `KRUN_POLICY_KIND` and `KRUN_POLICY_LOGGING` (what `[policy]` exports); a bad
    /// value names the variable.
    pub fn from_env() -> Result<PolicySettings, PolicyError> {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }

    pub fn from_lookup(
        get: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PolicySettings, PolicyError> {
        let mut s = PolicySettings::default();
        if let Some(v) = get("KRUN_POLICY_KIND") {
            s.kind = PolicyKind::parse(&v)
                .map_err(|e| PolicyError::Config(format!("KRUN_POLICY_KIND: {e}")))?;
        }
        if let Some(v) = get("KRUN_POLICY_LOGGING") {
            s.logging = crate::config::parse_bool(&v)
                .map_err(|e| PolicyError::Config(format!("KRUN_POLICY_LOGGING: {e}")))?;
        }
        Ok(s)
    }
}

/// What any policy of a job is built from.
#[derive(Clone, Debug)]
pub struct PolicyBasis {
    pub layout: Layout,
    pub view: AgreedView,
    /// Checkpoint interval (`None`: on request only).
    pub interval: Option<Duration>,
    /// The level a checkpoint must be safe at.
    pub level: Level,
    /// The node running the policy.
    pub leader: NodeId,
    pub now: Millis,
}

/// The coordinated policy's defaults for a job (what a description leaves out).
pub fn coordinated_defaults(basis: &PolicyBasis) -> Config {
    Config {
        interval: IntervalChoice::Fixed {
            // "On request only": an interval longer than any job.
            ms: basis
                .interval
                .map_or(u64::MAX / 4, |d| (d.as_millis() as u64).max(1)),
        },
        commit_level: basis.level,
        levels: Config::default()
            .levels
            .into_iter()
            .filter(|c| c.level <= basis.level)
            .collect(),
        no_spare: policies::coordinated::NoSpare::Fail,
        ..Config::default()
    }
}

/// Builds the policy `settings` name for a job, from its defaults (the policy itself is
/// built by `policies::plug::make_policy`, the one place policies are made).
pub fn make_policy(
    settings: &PolicySettings,
    basis: &PolicyBasis,
) -> Result<BoxedPolicy, PolicyError> {
    let desc = settings.description().unwrap_or_else(|| {
        policies::description::Description::builtin(policies::description::Kind::Coordinated)
    });
    policies::plug::make_policy(
        &desc,
        &policies::plug::Context {
            leader: basis.leader,
            layout: &basis.layout,
            view: &basis.view,
            now: basis.now,
            snapshot: None,
            defaults: &coordinated_defaults(basis),
        },
    )
}
