//! The checkpoint store's agent ([`super::agent::Agent`]) plugged into the runtime as its
//! [`CheckpointAgent`]: a rank's `Checkpointed` puts the image into the node's store (L1
//! when the call returns), the agent's later [`super::agent::AgentEvent`]s (L2 and slower) reach the
//! process table through [`super::Runtime::follow_agent`], and `krun status` gets the
//! store's use per level and the newest version safe per level.
use std::path::Path;

use ckpt_store::Level;

use super::agent::Agent;
use super::control::FetchInfo;
use super::status::{LevelUse, SafeCheckpoint};
use super::CheckpointAgent;
use crate::error::Result;

/// The level's number as `krun status` shows it (1-4).
pub fn level_number(level: Level) -> u8 {
    level as u8 + 1
}

/// A node's store agent, for the ranks `0..job_ranks`.
pub struct StoreAgent {
    agent: Agent,
    job_ranks: u32,
    /// Nodes of the store (a node added later has no store and is not reported down).
    store_nodes: usize,
    /// How to re-form the placement after a recovery (`None`: the store keeps its own).
    reform: Option<super::store_node::Reform>,
}

impl StoreAgent {
    pub fn new(agent: Agent, job_ranks: u32) -> StoreAgent {
        StoreAgent {
            agent,
            job_ranks,
            store_nodes: usize::MAX,
            reform: None,
        }
    }

    /// Re-forms buddies and parity sets after recoveries from `reform`.
    pub fn with_reform(mut self, reform: super::store_node::Reform) -> StoreAgent {
        self.reform = Some(reform);
        self
    }

    /// The store has `n` nodes (`0..n`): failures of other nodes are not the store's.
    pub fn with_store_nodes(mut self, n: usize) -> StoreAgent {
        self.store_nodes = n;
        self
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }
}

impl CheckpointAgent for StoreAgent {
    fn node_down(&self, node: adaptation::NodeId) -> Result<()> {
        if (node as usize) < self.store_nodes {
            self.agent.node_down(node as usize, true)?;
        }
        Ok(())
    }

    fn keep_from(&self, rank: u32, version: u64) -> Option<u64> {
        self.agent.keep_from(rank, version)
    }

    fn reform(
        &self,
        members: &[adaptation::NodeId],
        ranks: &[(u32, adaptation::NodeId)],
    ) -> Result<()> {
        let Some(reform) = &self.reform else {
            return Ok(());
        };
        let placement = reform.placement(members, ranks)?;
        let me = self.agent.store().node();
        self.agent
            .store()
            .reform(placement)
            .map_err(|e| crate::error::LauncherError::Node {
                node: me,
                message: format!("re-forming the store placement: {e}"),
            })
    }

    fn fetch(&self, rank: u32, version: u64) -> Result<FetchInfo> {
        let f = self.agent.fetch(rank, version)?;
        Ok(FetchInfo {
            rank,
            version,
            level: level_number(f.report.level),
            node: f.report.node as u64,
            bytes: f.image.len() as u64,
        })
    }

    fn read_image(&self, rank: u32, version: u64) -> Result<Vec<u8>> {
        Ok(self.agent.fetch(rank, version)?.image.to_vec())
    }

    fn write_chain(&self, rank: u32, version: u64, dir: &Path, owner: &str) -> Result<u64> {
        let files = self.agent.write_chain(rank, version, dir, owner)?;
        Ok(files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum())
    }

    fn checkpointed(&self, rank: u32, version: u64, image: &Path, bytes: u64) -> Result<Vec<u8>> {
        self.checkpointed_in(rank, version, image, bytes, 0)
    }

    fn checkpointed_in(
        &self,
        rank: u32,
        version: u64,
        image: &Path,
        bytes: u64,
        wiring: u64,
    ) -> Result<Vec<u8>> {
        self.agent
            .on_checkpointed_in(rank, version, image, bytes, wiring)?;
        Ok(vec![level_number(Level::L1)])
    }

    /// Bytes per level on this node, and per level the newest version safe for every rank
    /// whose images this node's store knows (the oldest of their newest).
    fn store_use(&self) -> (Vec<LevelUse>, Vec<SafeCheckpoint>) {
        let u = self.agent.usage();
        let used = [u.l1, u.l2_held, u.l3_parity, u.l4_disk];
        let levels = Level::ALL
            .iter()
            .zip(used)
            .map(|(&l, bytes)| LevelUse {
                level: level_number(l),
                bytes,
            })
            .collect();
        let newest: Vec<_> = (0..self.job_ranks)
            .map(|r| self.agent.newest_safe(r))
            .collect();
        let safe = Level::ALL
            .iter()
            .filter_map(|&l| {
                newest
                    .iter()
                    .filter_map(|n| n.at(l))
                    .min()
                    .map(|version| SafeCheckpoint {
                        level: level_number(l),
                        version,
                    })
            })
            .collect();
        (levels, safe)
    }
}
