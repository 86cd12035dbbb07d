//! The checkpoint store node every krund that runs ranks hosts.
//!
//! krund opens the node's fabric endpoint, all-gathers the endpoints' addresses through the
//! job's bootstrap (so every node holds them in node order), waits for the adaptation
//! view's cells, and starts [`Store::start_placed`] with [`Placement::from_cells`]: a node's
//! L2 buddy sits in another cell where there is one. The store's [`Agent`] then plugs into
//! the node runtime ([`super::Runtime::set_agent`]). Settings ([`StoreSettings::from_env`])
//! come from the configuration surface: `[store] arena_mib`, `disk`, `level`
//! (`KRUN_STORE_ARENA_MIB`, `KRUN_STORE_DISK`, `KRUN_STORE_LEVEL`).
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use ckpt_store::buddy::Placement;
use ckpt_store::{Level, NodeInfo, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::{Endpoint, EndpointAddress};

use super::agent::{Agent, AgentConfig, AgentEvent};
use super::store_link::StoreAgent;
use crate::error::{LauncherError, Result};

/// `L1`..`L4` or `1`..`4`.
pub fn parse_level(v: &str) -> std::result::Result<Level, String> {
    let v = v.trim();
    let named = if v.len() == 1 {
        format!("L{v}")
    } else {
        v.to_string()
    };
    Level::parse(&named).map_err(|_| format!("{v:?} is not a store level (L1, L2, L3 or L4)"))
}

/// How a node's store runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSettings {
    /// Memory lent to other nodes' L2 copies and parity.
    pub arena_bytes: usize,
    /// L4 directory.
    pub disk: Option<PathBuf>,
    /// The level a checkpoint must reach before it counts.
    pub level: Level,
    /// Versions kept per rank and level: enough for the incremental chain of the two
    /// newest commits (a restart needs every ancestor down to a full image) and one version
    /// in flight: the ghost checkpointer's `KRUN_GHOST_FULL_EVERY` (default 4) + 2.
    pub keep: usize,
}

impl StoreSettings {
    /// From `KRUN_STORE_ARENA_MIB` (default 64), `KRUN_STORE_DISK` (default: no L4) and
    /// `KRUN_STORE_LEVEL` (default L2).
    pub fn from_env() -> Result<StoreSettings> {
        Self::from_lookup(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<StoreSettings> {
        let bad = |key: &str, reason: String| LauncherError::Config {
            place: "environment".into(),
            key: key.into(),
            reason,
        };
        let mib: usize = match get("KRUN_STORE_ARENA_MIB") {
            None => 64,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if n > 0 && n <= (1 << 20) => n,
                _ => {
                    return Err(bad(
                        "KRUN_STORE_ARENA_MIB",
                        format!("{v:?} is not a size in MiB between 1 and 1048576"),
                    ))
                }
            },
        };
        let level = match get("KRUN_STORE_LEVEL") {
            None => Level::L2,
            Some(v) => parse_level(&v).map_err(|e| bad("KRUN_STORE_LEVEL", e))?,
        };
        let full_every = match get("KRUN_GHOST_FULL_EVERY") {
            None => 4,
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) if (1..=1 << 16).contains(&n) => n,
                _ => {
                    return Err(bad(
                        "KRUN_GHOST_FULL_EVERY",
                        format!("{v:?} is not a number between 1 and 65536"),
                    ))
                }
            },
        };
        Ok(StoreSettings {
            arena_bytes: mib << 20,
            disk: get("KRUN_STORE_DISK").map(PathBuf::from),
            level,
            keep: full_every + 2,
        })
    }
}

/// Store node indices per cell, from the view's cells (nodes `>= nodes` joined later and
/// hold no store; a store node the cells miss gets a cell of its own).
pub fn store_cells(cells: &[Vec<u32>], nodes: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; nodes];
    let mut out: Vec<Vec<usize>> = cells
        .iter()
        .map(|c| {
            c.iter()
                .map(|&n| n as usize)
                .filter(|&n| n < nodes && !std::mem::replace(&mut seen[n], true))
                .collect::<Vec<usize>>()
        })
        .filter(|c| !c.is_empty())
        .collect();
    out.extend((0..nodes).filter(|&n| !seen[n]).map(|n| vec![n]));
    out
}

/// Starts node `node`'s store over `ep` with every node's address (`addresses[i]` is node
/// `i`'s [`EndpointAddress::to_bytes`]) and the view's `cells`, and its agent for the ranks
/// `0..job_ranks`. The agent waits for `settings.level`, or for the slowest level this store
/// writes when that is faster (a one-node job has no L2).
pub fn start(
    ep: Box<dyn Endpoint>,
    node: usize,
    addresses: &[Vec<u8>],
    cells: &[Vec<u32>],
    settings: &StoreSettings,
    secret: &ClusterSecret,
    job_ranks: u32,
) -> Result<(StoreAgent, mpsc::Receiver<AgentEvent>)> {
    let fail = |message: String| LauncherError::Node { node, message };
    let store_nodes = addresses.len();
    let nodes: Vec<NodeInfo> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| {
            EndpointAddress::from_bytes(a)
                .map(|address| NodeInfo {
                    address,
                    // Each node its own failure group: nodes fail one by one.
                    group: i as u32,
                })
                .map_err(|e| fail(format!("store address of node {i}: {e}")))
        })
        .collect::<Result<_>>()?;
    let groups: Vec<u32> = nodes.iter().map(|n| n.group).collect();
    let placement = Placement::from_cells(&store_cells(cells, nodes.len()), &groups, 0)
        .map_err(|e| fail(format!("store placement: {e}")))?;
    let store = Store::start_placed(
        ep,
        StoreConfig {
            node,
            nodes,
            arena_bytes: settings.arena_bytes,
            disk: settings.disk.clone(),
            keep: settings.keep,
            parity_set: 0,
            secret: secret.clone(),
            request_timeout: Duration::from_secs(5),
        },
        placement,
    )
    .map_err(|e| fail(format!("starting the checkpoint store: {e}")))?;
    let level = store
        .levels()
        .into_iter()
        .filter(|&l| l <= settings.level)
        .max()
        .unwrap_or(Level::L1);
    let (agent, events) = Agent::new(
        store,
        AgentConfig {
            level,
            ..AgentConfig::default()
        },
    )?;
    Ok((
        StoreAgent::new(agent, job_ranks).with_store_nodes(store_nodes),
        events,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_variables_and_bad_values_are_named() {
        let s = StoreSettings::from_lookup(&|_| None).unwrap();
        assert_eq!(
            (s.arena_bytes, s.disk, s.level),
            (64 << 20, None, Level::L2)
        );
        let s = StoreSettings::from_lookup(&|k| match k {
            "KRUN_STORE_ARENA_MIB" => Some("8".into()),
            "KRUN_STORE_DISK" => Some("/var/tmp/x".into()),
            "KRUN_STORE_LEVEL" => Some("4".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.arena_bytes, 8 << 20);
        assert_eq!(s.disk, Some(PathBuf::from("/var/tmp/x")));
        assert_eq!(s.level, Level::L4);
        let e = StoreSettings::from_lookup(&|k| (k == "KRUN_STORE_LEVEL").then(|| "L7".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KRUN_STORE_LEVEL") && e.contains("L7"), "{e}");
        let e = StoreSettings::from_lookup(&|k| (k == "KRUN_STORE_ARENA_MIB").then(|| "0".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KRUN_STORE_ARENA_MIB"), "{e}");
    }

    #[test]
    fn the_store_keeps_the_incremental_chains_of_two_commits_and_one_in_flight() {
        assert_eq!(StoreSettings::from_lookup(&|_| None).unwrap().keep, 6);
        let s = StoreSettings::from_lookup(&|k| (k == "KRUN_GHOST_FULL_EVERY").then(|| "1".into()))
            .unwrap();
        assert_eq!(s.keep, 3);
        let e = StoreSettings::from_lookup(&|k| (k == "KRUN_GHOST_FULL_EVERY").then(|| "0".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KRUN_GHOST_FULL_EVERY"), "{e}");
    }

    #[test]
    fn store_cells_keep_the_view_order_and_cover_every_store_node() {
        // Node 5 joined later (no store); node 3 is in no cell; node 1 twice.
        let cells = vec![vec![2, 0], vec![1, 5], vec![1, 4]];
        assert_eq!(
            store_cells(&cells, 5),
            vec![vec![2, 0], vec![1], vec![4], vec![3]]
        );
    }
}
