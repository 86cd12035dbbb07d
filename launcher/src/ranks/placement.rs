//! Which ranks run on which node.
use crate::error::{LauncherError, Result};

/// Which ranks run on which node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `first[node]..first[node] + count[node]` are the node's ranks.
    pub first: Vec<usize>,
    pub count: Vec<usize>,
}

impl Placement {
    /// Block distribution as Slurm's default: ranks fill nodes in order, `per_node` each
    /// (`ceil(ranks / nodes)` when not given).
    pub fn block(ranks: usize, nodes: usize, per_node: Option<usize>) -> Result<Placement> {
        if ranks == 0 || nodes == 0 {
            return Err(LauncherError::Usage(
                "a job needs at least one rank and one node".into(),
            ));
        }
        let per = per_node.unwrap_or(ranks.div_ceil(nodes));
        if per == 0 || per.saturating_mul(nodes) < ranks {
            return Err(LauncherError::Usage(format!(
                "{ranks} ranks do not fit on {nodes} nodes with {per} per node"
            )));
        }
        let mut first = Vec::with_capacity(nodes);
        let mut count = Vec::with_capacity(nodes);
        for node in 0..nodes {
            let start = (node * per).min(ranks);
            first.push(start);
            count.push((start + per).min(ranks) - start);
        }
        Ok(Placement { first, count })
    }

    /// Slurm's layout: `counts[node]` ranks on each node, in node order.
    pub fn from_counts(counts: &[usize]) -> Placement {
        let mut first = Vec::with_capacity(counts.len());
        let mut next = 0;
        for &c in counts {
            first.push(next);
            next += c;
        }
        Placement {
            first,
            count: counts.to_vec(),
        }
    }

    /// Parses the `--counts 3,3,2` argument krun gives krund.
    pub fn parse_counts(arg: &str) -> Result<Placement> {
        let counts = arg
            .split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| {
                LauncherError::Usage(format!("--counts {arg:?} is not a list of numbers"))
            })?;
        Ok(Placement::from_counts(&counts))
    }

    pub fn counts_arg(&self) -> String {
        self.count
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn total(&self) -> usize {
        self.count.iter().sum()
    }

    /// Node hosting `rank`.
    pub fn node_of(&self, rank: usize) -> Option<usize> {
        (0..self.first.len())
            .find(|&n| rank >= self.first[n] && rank < self.first[n] + self.count[n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_placement_like_slurm() {
        let p = Placement::block(12, 4, None).unwrap();
        assert_eq!(p.first, [0, 3, 6, 9]);
        assert_eq!(p.count, [3, 3, 3, 3]);
        let p = Placement::block(5, 3, None).unwrap();
        assert_eq!(p.count, [2, 2, 1]);
        let p = Placement::block(2, 3, None).unwrap();
        assert_eq!(p.count, [1, 1, 0]);
        assert_eq!(p.node_of(1), Some(1));
        assert!(Placement::block(9, 2, Some(4)).is_err());
        assert_eq!(Placement::block(4, 2, Some(4)).unwrap().count, [4, 0]);
        assert!(Placement::block(0, 2, None).is_err());
        let p = Placement::from_counts(&[2, 2, 2, 1]);
        assert_eq!(p.first, [0, 2, 4, 6]);
        assert_eq!(p.total(), 7);
        assert_eq!(Placement::parse_counts(&p.counts_arg()).unwrap(), p);
        assert!(Placement::parse_counts("1,x").is_err());
    }
}
