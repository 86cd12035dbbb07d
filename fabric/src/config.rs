//! Fabric configuration: provider choice and limits, from code or `KRUN_FABRIC_*`.
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{FabricError, Result};

/// A concrete transport. All of them give identical semantics behind [`crate::Endpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// libfabric `tcp;ofi_rxm`: any two hosts with IP connectivity.
    Tcp,
    /// libfabric `shm`: processes on one host.
    Shm,
    /// libfabric `verbs;ofi_rxm`: InfiniBand / RoCE hardware.
    VerbsOfi,
    /// InfiniBand verbs directly: RC queue pairs.
    Verbs,
    /// In-process loopback, for unit tests.
    Loopback,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Tcp => "tcp",
            Provider::Shm => "shm",
            Provider::VerbsOfi => "verbs-ofi",
            Provider::Verbs => "verbs",
            Provider::Loopback => "loopback",
        }
    }

    pub fn all() -> [Provider; 5] {
        [
            Provider::Tcp,
            Provider::Shm,
            Provider::VerbsOfi,
            Provider::Verbs,
            Provider::Loopback,
        ]
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked for: a provider, or `auto` (verbs if a device exists, else tcp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderChoice {
    Auto,
    Exactly(Provider),
}

impl FromStr for ProviderChoice {
    type Err = FabricError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(ProviderChoice::Auto),
            other => Provider::all()
                .into_iter()
                .find(|p| p.name() == other)
                .map(ProviderChoice::Exactly)
                .ok_or_else(|| FabricError::UnknownProvider(s.to_string())),
        }
    }
}

/// A receive poll window suited to a node with a core per rank (`KRUN_FABRIC_RECV_POLL_US=100`):
/// a reply within it costs the provider's latency (shm 8 B one-way 1.2 us instead of
/// 30-38 us on an idle 2-core machine). Not the default: when ranks share cores with other
/// work, the polling receivers take turns on the cores and whole runs land at 60-190 us.
pub const BUSY_RECV_POLL: Duration = Duration::from_micros(100);

/// Settings of one endpoint. Defaults suit a job on a 2-core development node.

#[derive(Debug, Clone)]
pub struct FabricConfig {
    pub provider: ProviderChoice,
    /// Operations in flight per endpoint before posting blocks (back-pressure).
    pub max_in_flight: usize,
    /// Every operation completes or fails within this time.
    pub op_timeout: Duration,
    /// Largest two-sided message payload.
    pub max_message: usize,
    /// Verbs device name (first device when `None`).
    pub verbs_device: Option<String>,
    /// Verbs GID index for RoCE (the IPv4-mapped GID when `None`).
    pub verbs_gid_index: Option<u32>,
    /// IP address the tcp provider and the verbs connection manager bind to.
    pub bind_address: String,
    /// The cluster secret keying the verbs side channel; `None`: from the environment
    /// (`KRUN_SECRET_FILE`, `KRUN_SECRET`), else insecure mode's public key.
    pub secret: Option<crate::secret::ClusterSecret>,
    /// How long a receive polls for its message itself (driving the provider's progress,
    /// with the progress thread stepped aside) before it sleeps until the progress thread
    /// delivers it; 0 (the default) sleeps at once. With a window set, a receive with a
    /// timeout of 50 us or less (a caller polling in its own loop) polls and never sleeps.
    /// Busy-polling is for nodes with a core per rank ([`BUSY_RECV_POLL`]); on shared cores
    /// it makes latency bimodal, and on tcp;ofi_rxm a poll is a few system calls (MGS on the
    /// DSM over tcp, 4 ranks on 2 cores, took 20-40% longer with a 20 or 100 us window).
    /// `KRUN_FABRIC_RECV_POLL_US`.
    pub recv_poll: Option<Duration>,
}

impl Default for FabricConfig {
    fn default() -> Self {
        FabricConfig {
            provider: ProviderChoice::Auto,
            max_in_flight: 256,
            op_timeout: Duration::from_secs(10),
            max_message: 64 * 1024,
            verbs_device: None,
            verbs_gid_index: None,
            bind_address: "127.0.0.1".to_string(),
            secret: None,
            recv_poll: None,
        }
    }
}

impl FabricConfig {
    /// The receive poll window in effect (see [`FabricConfig::recv_poll`]).
    pub fn recv_poll_window(&self) -> Duration {
        self.recv_poll.unwrap_or(Duration::ZERO)
    }

    pub fn with_provider(provider: Provider) -> Self {
        FabricConfig {
            provider: ProviderChoice::Exactly(provider),
            ..Default::default()
        }
    }

    /// Applies `KRUN_FABRIC_PROVIDER`, `KRUN_FABRIC_MAX_IN_FLIGHT`, `KRUN_FABRIC_TIMEOUT_MS`,
    /// `KRUN_FABRIC_MAX_MESSAGE`, `KRUN_FABRIC_VERBS_DEVICE`, `KRUN_FABRIC_VERBS_GID_INDEX`,
    /// `KRUN_FABRIC_RECV_POLL_US` and `KRUN_FABRIC_BIND` on top of `self`.
    pub fn with_env(mut self) -> Result<Self> {
        self.apply_vars(|k| std::env::var(k).ok())?;
        Ok(self)
    }

    fn apply_vars(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn number<T: FromStr>(key: &str, value: &str) -> Result<T> {
            value.trim().parse().map_err(|_| FabricError::BadConfig {
                key: key.into(),
                value: value.into(),
                reason: "not a non-negative integer".into(),
            })
        }
        if let Some(v) = get("KRUN_FABRIC_PROVIDER") {
            self.provider = v.parse()?;
        }
        if let Some(v) = get("KRUN_FABRIC_MAX_IN_FLIGHT") {
            self.max_in_flight = number("KRUN_FABRIC_MAX_IN_FLIGHT", &v)?;
            if self.max_in_flight == 0 {
                return Err(FabricError::BadConfig {
                    key: "KRUN_FABRIC_MAX_IN_FLIGHT".into(),
                    value: v,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if let Some(v) = get("KRUN_FABRIC_TIMEOUT_MS") {
            self.op_timeout = Duration::from_millis(number("KRUN_FABRIC_TIMEOUT_MS", &v)?);
        }
        if let Some(v) = get("KRUN_FABRIC_MAX_MESSAGE") {
            self.max_message = number("KRUN_FABRIC_MAX_MESSAGE", &v)?;
        }
        if let Some(v) = get("KRUN_FABRIC_VERBS_DEVICE") {
            self.verbs_device = Some(v);
        }
        if let Some(v) = get("KRUN_FABRIC_VERBS_GID_INDEX") {
            self.verbs_gid_index = Some(number("KRUN_FABRIC_VERBS_GID_INDEX", &v)?);
        }
        if let Some(v) = get("KRUN_FABRIC_RECV_POLL_US") {
            self.recv_poll = Some(Duration::from_micros(number(
                "KRUN_FABRIC_RECV_POLL_US",
                &v,
            )?));
        }
        if let Some(v) = get("KRUN_FABRIC_BIND") {
            self.bind_address = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_names_round_trip() {
        for p in Provider::all() {
            assert_eq!(
                p.name().parse::<ProviderChoice>().unwrap(),
                ProviderChoice::Exactly(p)
            );
        }
        assert_eq!(
            "AUTO".parse::<ProviderChoice>().unwrap(),
            ProviderChoice::Auto
        );
    }

    #[test]
    fn unknown_provider_is_named_in_the_error() {
        let err = "infiniband-magic".parse::<ProviderChoice>().unwrap_err();
        assert!(err.to_string().contains("infiniband-magic"), "{err}");
    }

    #[test]
    fn env_overrides_apply_and_bad_numbers_are_rejected() {
        let mut c = FabricConfig::default();
        c.apply_vars(|k| match k {
            "KRUN_FABRIC_PROVIDER" => Some("shm".into()),
            "KRUN_FABRIC_TIMEOUT_MS" => Some("250".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.provider, ProviderChoice::Exactly(Provider::Shm));
        assert_eq!(c.op_timeout, Duration::from_millis(250));
        let err = c
            .apply_vars(|k| (k == "KRUN_FABRIC_MAX_IN_FLIGHT").then(|| "many".to_string()))
            .unwrap_err();
        assert!(
            err.to_string().contains("KRUN_FABRIC_MAX_IN_FLIGHT"),
            "{err}"
        );
        let err = c
            .apply_vars(|k| (k == "KRUN_FABRIC_MAX_IN_FLIGHT").then(|| "0".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    #[test]
    fn the_receive_poll_window_comes_from_the_environment_in_microseconds() {
        let mut c = FabricConfig::default();
        assert_eq!(c.recv_poll, None);
        c.apply_vars(|k| (k == "KRUN_FABRIC_RECV_POLL_US").then(|| "0".to_string()))
            .unwrap();
        assert_eq!(c.recv_poll, Some(Duration::ZERO));
        c.apply_vars(|k| (k == "KRUN_FABRIC_RECV_POLL_US").then(|| "250".to_string()))
            .unwrap();
        assert_eq!(c.recv_poll, Some(Duration::from_micros(250)));
        let err = c
            .apply_vars(|k| (k == "KRUN_FABRIC_RECV_POLL_US").then(|| "-1".to_string()))
            .unwrap_err();
        assert!(
            err.to_string().contains("KRUN_FABRIC_RECV_POLL_US"),
            "{err}"
        );
    }
}
