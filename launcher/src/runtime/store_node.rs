//! The checkpoint store node every krund that runs ranks hosts.
//!
//! krund opens the node's fabric endpoint, all-gathers the endpoints' addresses through the
//! job's bootstrap (so every node holds them in node order), waits for the adaptation
//! view's cells, and starts [`Store::start_placed`] with [`Placement::from_cells`]: a node's
//! L2 buddy sits in another cell where there is one. The store's [`Agent`] then plugs into
//! the node runtime ([`super::Runtime::set_agent`]). Settings ([`StoreSettings::from_env`])
//! come from the configuration surface: `[store] arena_mib`, `disk`, `level`, `parity`
//! (`KRUN_STORE_ARENA_MIB`, `KRUN_STORE_DISK`, `KRUN_STORE_LEVEL`, `KRUN_STORE_PARITY`).
//!
//! L3 parity ([`Parity`]): sets of K nodes among the nodes that run ranks (spares put no
//! image until they adopt a rank, and a set waits for every member's image), one parity
//! lane per rank of a node, so a lost node's every rank is rebuilt from its set's parity
//! and the other members' images. `auto` (the default) turns it on for jobs of at least
//! [`AUTO_PARITY_MIN_NODES`] rank nodes that run the same number of ranks each, with
//! K = half the rank nodes (2 to 8): a lost buddy pair (a node and the node holding its L2
//! copies) then still restores from L3.
//!
//! After a recovery ([`Reform`]) every node re-forms its store's buddies and parity sets
//! from what krun sends with the recovery (`LauncherToNode::Reform`: the agreed view's
//! members and where every rank runs now): the same cells and failure groups as at the
//! start without the gone nodes ([`Placement::among`]), and parity sets among the nodes
//! that run ranks now, sized by the same rule. Every node computes the same placement from
//! the same message, so a spare that took ranks over is in a set and has a buddy, and a
//! second buddy pair lost later is rebuilt from parity too.
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

/// Jobs with at least this many rank nodes get L3 parity by default.
pub const AUTO_PARITY_MIN_NODES: usize = 4;

/// `[store] parity` (`KRUN_STORE_PARITY`): L3 parity sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parity {
    /// On for jobs of [`AUTO_PARITY_MIN_NODES`] or more rank nodes with as many ranks each.
    Auto,
    Off,
    /// Sets of this many rank nodes (at least 2).
    Sets(usize),
}

impl Parity {
    /// `auto`, `off` (or `0`), or a set size >= 2.
    pub fn parse(v: &str) -> std::result::Result<Parity, String> {
        match v.trim() {
            "auto" => Ok(Parity::Auto),
            "off" | "0" => Ok(Parity::Off),
            n => match n.parse::<usize>() {
                Ok(k) if (2..=1024).contains(&k) => Ok(Parity::Sets(k)),
                _ => Err(format!(
                    "{v:?} is not a parity setting (auto, off, or a set size from 2 to 1024)"
                )),
            },
        }
    }

    /// The parity sets' size and lanes for a job whose nodes run `counts[node]` ranks
    /// (spares 0): (0, 1) for no parity. `Sets(k)` with nodes of different rank counts is
    /// refused (a lane set would wait for images that never come); a set of more members
    /// than there are rank nodes takes them all.
    pub fn sets_for(self, counts: &[usize]) -> std::result::Result<(usize, u32), String> {
        let ranked: Vec<usize> = counts.iter().copied().filter(|&c| c > 0).collect();
        let even = ranked.windows(2).all(|w| w[0] == w[1]);
        let lanes = ranked.first().copied().unwrap_or(1) as u32;
        match self {
            Parity::Off => Ok((0, 1)),
            Parity::Auto if ranked.len() >= AUTO_PARITY_MIN_NODES && even => {
                Ok(((ranked.len() / 2).clamp(2, 8), lanes))
            }
            Parity::Auto => Ok((0, 1)),
            Parity::Sets(_) if ranked.len() < 2 => Err(format!(
                "parity sets need at least 2 nodes that run ranks; this job has {}",
                ranked.len()
            )),
            Parity::Sets(_) if !even => Err(format!(
                "parity sets need the same number of ranks on every node that runs ranks \
                 (ranks per node: {ranked:?})"
            )),
            Parity::Sets(k) => Ok((k.min(ranked.len()), lanes)),
        }
    }
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
    /// L3 parity sets.
    pub parity: Parity,
    /// Versions go only once the policy says no recovery line needs them (`KeepFrom`):
    /// the uncoordinated policy without logging (`KRUN_UNCOORDINATED=1`,
    /// `KRUN_MESSAGE_LOGGING=0`), whose line can lie further back than `keep` versions.
    pub by_line: bool,
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
        let parity = match get("KRUN_STORE_PARITY") {
            None => Parity::Auto,
            Some(v) => Parity::parse(&v).map_err(|e| bad("KRUN_STORE_PARITY", e))?,
        };
        Ok(StoreSettings {
            arena_bytes: mib << 20,
            disk: get("KRUN_STORE_DISK").map(PathBuf::from),
            level,
            keep: full_every + 2,
            parity,
            by_line: get("KRUN_UNCOORDINATED").is_some_and(|v| v.trim() == "1")
                && get("KRUN_MESSAGE_LOGGING").is_some_and(|v| v.trim() == "0"),
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
/// `0..job_ranks`, of which node `i` runs `counts[i]` (spares 0; they decide the parity
/// sets: see [`Parity::sets_for`]). The agent waits for `settings.level`, or for the
/// slowest level this store writes when that is faster (a one-node job has no L2).
#[allow(clippy::too_many_arguments)]
pub fn start(
    ep: Box<dyn Endpoint>,
    node: usize,
    addresses: &[Vec<u8>],
    cells: &[Vec<u32>],
    settings: &StoreSettings,
    secret: &ClusterSecret,
    job_ranks: u32,
    counts: &[usize],
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
    let counts: Vec<usize> = (0..store_nodes)
        .map(|i| counts.get(i).copied().unwrap_or(0))
        .collect();
    let (parity_set, lanes) = settings
        .parity
        .sets_for(&counts)
        .map_err(|e| fail(format!("KRUN_STORE_PARITY ([store] parity): {e}")))?;
    let members: Vec<bool> = counts.iter().map(|&c| c > 0).collect();
    let cells = store_cells(cells, nodes.len());
    let placement = Placement::from_cells(&cells, &groups, parity_set)
        .map_err(|e| fail(format!("store placement: {e}")))?
        .parity_among(&members, parity_set, lanes);
    let reform = Reform {
        cells,
        groups,
        parity: if parity_set > 1 {
            settings.parity
        } else {
            Parity::Off
        },
    };
    let store = Store::start_placed(
        ep,
        StoreConfig {
            node,
            nodes,
            arena_bytes: settings.arena_bytes,
            disk: settings.disk.clone(),
            keep: settings.keep,
            parity_set,
            secret: secret.clone(),
            request_timeout: Duration::from_secs(5),
        },
        placement,
    )
    .map_err(|e| fail(format!("starting the checkpoint store: {e}")))?;
    if settings.by_line {
        store.retain_by_line();
    }
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
        StoreAgent::new(agent, job_ranks)
            .with_store_nodes(store_nodes)
            .with_reform(reform),
        events,
    ))
}

/// What a node's store needs to re-form its placement after a recovery: the cells and
/// failure groups it started with and the parity setting (`Off` when it started without
/// parity: a re-form adds none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reform {
    pub cells: Vec<Vec<usize>>,
    pub groups: Vec<u32>,
    pub parity: Parity,
}

impl Reform {
    /// The placement among the store nodes in `members` (the agreed view's), with parity
    /// sets among those that run ranks now (`ranks`: rank -> node, for every rank of the
    /// job), sized as at the start ([`Parity::sets_for`]; a setting the new shape refuses,
    /// such as uneven rank counts with an explicit set size, gives no parity).
    pub fn placement(&self, members: &[u32], ranks: &[(u32, u32)]) -> Result<Placement> {
        let n = self.groups.len();
        let up: Vec<bool> = (0..n).map(|i| members.contains(&(i as u32))).collect();
        let mut counts = vec![0usize; n];
        for &(_, node) in ranks {
            if let Some(c) = counts.get_mut(node as usize).filter(|_| up[node as usize]) {
                *c += 1;
            }
        }
        let (k, lanes) = self.parity.sets_for(&counts).unwrap_or_else(|e| {
            eprintln!("krund: parity sets after the recovery: {e}: no parity from now on");
            (0, 1)
        });
        let ranked: Vec<bool> = counts.iter().map(|&c| c > 0).collect();
        Ok(Placement::among(&self.cells, &self.groups, k, &up)
            .map_err(|e| LauncherError::Usage(format!("re-forming the store placement: {e}")))?
            .parity_among(&ranked, k, lanes))
    }
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
    fn parity_is_on_by_default_for_four_even_rank_nodes_and_explicit_sizes_are_checked() {
        let auto = StoreSettings::from_lookup(&|_| None).unwrap().parity;
        assert_eq!(auto, Parity::Auto);
        // 4 rank nodes of 2 ranks and a spare: sets of 2, 2 lanes.
        assert_eq!(auto.sets_for(&[2, 2, 2, 2, 0]), Ok((2, 2)));
        assert_eq!(auto.sets_for(&[1; 20]), Ok((8, 1)));
        // Too few rank nodes, or uneven: none.
        assert_eq!(auto.sets_for(&[2, 2, 2, 0]), Ok((0, 1)));
        assert_eq!(auto.sets_for(&[2, 2, 2, 1]), Ok((0, 1)));
        assert_eq!(Parity::Off.sets_for(&[1; 8]), Ok((0, 1)));
        assert_eq!(Parity::Sets(3).sets_for(&[1, 1, 1, 1, 0]), Ok((3, 1)));
        assert_eq!(Parity::Sets(9).sets_for(&[1, 1, 1, 0]), Ok((3, 1)));
        let e = Parity::Sets(2).sets_for(&[2, 1, 1]).unwrap_err();
        assert!(
            e.contains("same number of ranks") && e.contains("[2, 1, 1]"),
            "{e}"
        );
        assert!(Parity::Sets(2).sets_for(&[3, 0]).is_err());
        let parse = |v: &str| {
            StoreSettings::from_lookup(&|k| (k == "KRUN_STORE_PARITY").then(|| v.to_string()))
        };
        assert_eq!(parse("off").unwrap().parity, Parity::Off);
        assert_eq!(parse("4").unwrap().parity, Parity::Sets(4));
        let e = parse("1").unwrap_err().to_string();
        assert!(
            e.contains("KRUN_STORE_PARITY") && e.contains("\"1\""),
            "{e}"
        );
    }

    #[test]
    fn a_reform_places_buddies_and_parity_sets_among_the_nodes_left_that_run_ranks() {
        // Four rank nodes and two spares in one cell; nodes 0 and 1 lost, their ranks on
        // the spares 4 and 5.
        let reform = Reform {
            cells: vec![(0..6).collect()],
            groups: (0..6).collect(),
            parity: Parity::Auto,
        };
        let ranks = [(0, 4), (1, 5), (2, 2), (3, 3)];
        let p = reform.placement(&[2, 3, 4, 5], &ranks).unwrap();
        assert_eq!(p.sets(), &[vec![2, 3], vec![4, 5]]);
        assert_eq!((p.buddy(0), p.buddy(1)), (None, None));
        assert!((2..6).all(|n| p.buddy(n).is_some_and(|b| b >= 2 && b != n)));
        // The parity of the spares' set is kept by a node of the other set.
        assert!([2, 3].contains(&p.parity_holder(1, 7)));
        // Two ranks on node 2 and none on node 4 (no spare left): uneven, no parity.
        let uneven = [(0, 2), (1, 5), (2, 2), (3, 3)];
        let p = reform.placement(&[2, 3, 5], &uneven).unwrap();
        assert!(p.sets().iter().all(|s| s.len() < 2), "{:?}", p.sets());
        // A store started without parity gets none from a re-form either.
        let off = Reform {
            parity: Parity::Off,
            ..reform
        };
        let p = off.placement(&[2, 3, 4, 5], &ranks).unwrap();
        assert!(p.sets().iter().all(|s| s.len() < 2), "{:?}", p.sets());
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
