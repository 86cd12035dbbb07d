//! `krun-adapt`'s command line (clap): one node of the adaptation layer with the toy
//! key-value service, started by hand with its peers, or as a krun job (`--under-krun`).
use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;

use crate::daemon::DaemonConfig;
use crate::error::{AdaptError, Result};
use crate::view::NodeId;

/// One node of the adaptation layer with the toy key-value service.
#[derive(Debug, Parser)]
#[command(
    name = "krun-adapt",
    version,
    after_long_help = "The initial members are the --peer nodes plus this one (unless --join: \
then this node announces itself to them). As a krun job (`krun --local 4 krun-adapt \
--under-krun`) rank r is node r and rank 0 reads the commands. The cluster secret comes from \
KRUN_SECRET_FILE (a 0600 file) or KRUN_SECRET (hex)."
)]
pub struct AdaptCli {
    /// Run as a krun job: the node id, peers and addresses come from the job.
    #[arg(long, conflicts_with_all = ["id", "listen", "peer", "join"])]
    pub under_krun: bool,
    /// This node's id.
    #[arg(long, value_name = "N", required_unless_present = "under_krun")]
    pub id: Option<NodeId>,
    /// The address this node listens on.
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "under_krun")]
    pub listen: Option<String>,
    /// An initial member (repeatable).
    #[arg(long, value_name = "ID=HOST:PORT", value_parser = peer)]
    pub peer: Vec<(NodeId, String)>,
    /// The supervisors (default: the three lowest initial members).
    #[arg(long, value_name = "A,B,C", value_delimiter = ',')]
    pub supervisors: Vec<NodeId>,
    /// Announce this node to the --peer nodes instead of being an initial member.
    #[arg(long)]
    pub join: bool,
    /// The protocol's tick.
    #[arg(long, value_name = "MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub tick_ms: u64,
    /// Seed of the node's randomness (default: its id).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// How long a member may stay silent before it is declared failed (default: about
    /// 0.6 s of suspicion, for an idle LAN; krund uses 3000).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub failure_timeout_ms: Option<u64>,
    /// Simultaneous failures the keys survive: each key has f + 1 copies (its manager and
    /// f witnesses). A key whose every copy failed answers "lost".
    #[arg(long, value_name = "F", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    pub tolerate: u64,
}

fn peer(v: &str) -> std::result::Result<(NodeId, String), String> {
    let (n, addr) = v
        .split_once('=')
        .ok_or_else(|| format!("{v:?} is not ID=HOST:PORT"))?;
    let n = n
        .parse()
        .map_err(|_| format!("peer id {n:?} is not a number"))?;
    Ok((n, addr.to_string()))
}

impl AdaptCli {
    /// The daemon's configuration (not for `--under-krun`, which reads the job's).
    pub fn daemon_config(&self) -> Result<DaemonConfig> {
        let usage = |why: String| AdaptError::Config {
            what: "arguments".into(),
            reason: why,
        };
        let id = self.id.ok_or_else(|| usage("--id is required".into()))?;
        let listen = self
            .listen
            .clone()
            .ok_or_else(|| usage("--listen is required".into()))?;
        let peers: BTreeMap<NodeId, String> = self.peer.iter().cloned().collect();
        if peers.contains_key(&id) {
            return Err(usage(format!("--peer lists this node's own id {id}")));
        }
        Ok(DaemonConfig {
            id,
            listen,
            peers,
            supervisors: self.supervisors.clone(),
            join: self.join,
            tick: Duration::from_millis(self.tick_ms),
            seed: self.seed.unwrap_or(u64::from(id)),
            failure_timeout: self.failure_timeout_ms.map(Duration::from_millis),
        })
    }
}

impl DaemonConfig {
    /// Reads a daemon's configuration from `krun-adapt`'s arguments (without the program
    /// name); an error carries clap's message and names the flag.
    pub fn from_args(args: &[String]) -> Result<DaemonConfig> {
        let cli = AdaptCli::try_parse_from(
            std::iter::once("krun-adapt").chain(args.iter().map(String::as_str)),
        )
        .map_err(|e| AdaptError::Config {
            what: "arguments".into(),
            reason: e.render().to_string(),
        })?;
        cli.daemon_config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn args(extra: &[&str]) -> Vec<String> {
        ["--id", "1", "--listen", "127.0.0.1:1"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn the_definition_is_consistent() {
        AdaptCli::command().debug_assert();
    }

    #[test]
    fn peers_supervisors_and_timing_are_read() {
        let cfg = DaemonConfig::from_args(&args(&[
            "--peer",
            "2=127.0.0.1:2",
            "--peer",
            "3=127.0.0.1:3",
            "--supervisors",
            "1,2,3",
            "--tick-ms",
            "5",
            "--failure-timeout-ms",
            "2500",
        ]))
        .unwrap();
        assert_eq!(cfg.peers.len(), 2);
        assert_eq!(cfg.supervisors, [1, 2, 3]);
        assert_eq!(cfg.tick, Duration::from_millis(5));
        assert_eq!(cfg.failure_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(cfg.seed, 1);
        assert_eq!(
            DaemonConfig::from_args(&args(&[])).unwrap().failure_timeout,
            None
        );
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        for (extra, says) in [
            (&["--failure-timeout-ms", "10"][..], "--failure-timeout-ms"),
            (&["--failure-timeout-ms", "x"][..], "invalid digit"),
            (&["--failure-timeout-ms"][..], "a value is required"),
            (&["--peer", "1=127.0.0.1:9"][..], "own id 1"),
            (&["--peer", "nowhere"][..], "is not ID=HOST:PORT"),
            (&["--tick-ms", "0"][..], "--tick-ms"),
            (&["--under-krun"][..], "cannot be used with"),
            (&["--supervisor", "1"][..], "--supervisors"),
            (&["--tolerate", "0"][..], "--tolerate"),
        ] {
            let err = DaemonConfig::from_args(&args(extra))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{extra:?}: {err}");
        }
        let err = DaemonConfig::from_args(&["--id".into(), "1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--listen"), "{err}");
    }
}
