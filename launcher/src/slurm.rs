//! Slurm integration: reading an allocation from the environment, Slurm's task-count
//! syntax, and the `srun` command line that starts one krund per node.
use crate::error::{LauncherError, Result};
use crate::hostlist;

/// What krun needs to know about the allocation it runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub job_id: String,
    /// Nodes of the step if inside one, else of the job.
    pub nodes: Vec<String>,
    /// Tasks Slurm placed on each node, in node order.
    pub tasks_per_node: Vec<usize>,
}

/// Expands Slurm's `2(x3),1` task counts into `[2, 2, 2, 1]`.
pub fn expand_tasks_per_node(spec: &str) -> Result<Vec<usize>> {
    let bad = |part: &str| {
        LauncherError::Usage(format!(
            "malformed SLURM_TASKS_PER_NODE {spec:?} at {part:?}"
        ))
    };
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let (count, repeat) = match part.split_once("(x") {
            Some((c, rest)) => {
                let r = rest.strip_suffix(')').ok_or_else(|| bad(part))?;
                (c, r.parse::<usize>().map_err(|_| bad(part))?)
            }
            None => (part, 1),
        };
        let count: usize = count.parse().map_err(|_| bad(part))?;
        if repeat == 0 || out.len() + repeat > hostlist::MAX_HOSTS {
            return Err(bad(part));
        }
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
}

impl Allocation {
    /// Reads the allocation through `get` (the environment in production). `None` when not
    /// inside a Slurm job.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Allocation>> {
        let Some(job_id) = get("SLURM_JOB_ID") else {
            return Ok(None);
        };
        let (list_var, list) = match get("SLURM_STEP_NODELIST") {
            Some(l) => ("SLURM_STEP_NODELIST", l),
            None => (
                "SLURM_JOB_NODELIST",
                get("SLURM_JOB_NODELIST")
                    .or_else(|| get("SLURM_NODELIST"))
                    .ok_or_else(|| {
                        LauncherError::Usage(
                            "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not".into(),
                        )
                    })?,
            ),
        };
        let nodes = hostlist::expand(&list)
            .map_err(|e| LauncherError::Usage(format!("{list_var}: {e}")))?;
        let tasks_var = if list_var == "SLURM_STEP_NODELIST" {
            "SLURM_STEP_TASKS_PER_NODE"
        } else {
            "SLURM_TASKS_PER_NODE"
        };
        let tasks_per_node = match get(tasks_var).or_else(|| get("SLURM_TASKS_PER_NODE")) {
            Some(spec) => expand_tasks_per_node(&spec)?,
            None => vec![1; nodes.len()],
        };
        if tasks_per_node.len() != nodes.len() {
            return Err(LauncherError::Usage(format!(
                "{tasks_var} names {} nodes but {list_var} has {}",
                tasks_per_node.len(),
                nodes.len()
            )));
        }
        Ok(Some(Allocation {
            job_id,
            nodes,
            tasks_per_node,
        }))
    }

    pub fn from_env() -> Result<Option<Allocation>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

/// The `srun` that starts one krund per node of the allocation (`KRUN_SRUN` names another
/// srun). `recovers`: the job's policy restarts lost ranks (`--spares`, checkpoints), so a
/// node whose krund dies must not take the step down: `--kill-on-bad-exit=0` (Slurm would
/// otherwise kill every other task of the step, and with it the ranks that survived).
/// Otherwise `--kill-on-bad-exit=1`: a dead node ends the job at once.
pub fn srun_command(nodes: &[String], recovers: bool) -> std::process::Command {
    let k = nodes.len();
    let mut srun =
        std::process::Command::new(std::env::var("KRUN_SRUN").unwrap_or_else(|_| "srun".into()));
    srun.arg(format!("--nodes={k}"))
        .arg(format!("--ntasks={k}"))
        .arg("--ntasks-per-node=1")
        .arg(format!("--nodelist={}", hostlist::compress(nodes)))
        .arg(format!("--kill-on-bad-exit={}", u8::from(!recovers)))
        .arg("--overlap");
    srun
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn a_recovering_job_keeps_its_step_when_one_node_dies() {
        let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        let args = |recovers| {
            srun_command(&nodes, recovers)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        let plain = args(false);
        assert!(
            plain.contains(&"--kill-on-bad-exit=1".to_string()),
            "{plain:?}"
        );
        assert!(
            plain.contains(&"--nodelist=n[1-3]".to_string()),
            "{plain:?}"
        );
        assert!(plain.contains(&"--ntasks=3".to_string()), "{plain:?}");
        let ha = args(true);
        assert!(ha.contains(&"--kill-on-bad-exit=0".to_string()), "{ha:?}");
    }

    #[test]
    fn task_counts_expand() {
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert_eq!(expand_tasks_per_node("4").unwrap(), [4]);
        assert_eq!(expand_tasks_per_node("1,2(x2)").unwrap(), [1, 2, 2]);
        for bad in ["", "x", "2(x", "2(x0)", "2(y3)", "-1"] {
            assert!(expand_tasks_per_node(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn step_nodelist_is_preferred() {
        let a = Allocation::from_vars(vars(&[
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_NODELIST", "n[1-4]"),
            ("SLURM_TASKS_PER_NODE", "1(x4)"),
            ("SLURM_STEP_NODELIST", "n[2-3]"),
            ("SLURM_STEP_TASKS_PER_NODE", "2,1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.nodes, ["n2", "n3"]);
        assert_eq!(a.tasks_per_node, [2, 1]);
        let a = Allocation::from_vars(vars(&[
            ("SLURM_JOB_ID", "42"),
            ("SLURM_JOB_NODELIST", "n[1-3]"),
            ("SLURM_TASKS_PER_NODE", "2(x3)"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(a.nodes, ["n1", "n2", "n3"]);
        assert_eq!(a.tasks_per_node, [2, 2, 2]);
    }

    #[test]
    fn outside_slurm_and_inconsistent_allocations() {
        assert_eq!(Allocation::from_vars(vars(&[])).unwrap(), None);
        let e = Allocation::from_vars(vars(&[
            ("SLURM_JOB_ID", "1"),
            ("SLURM_JOB_NODELIST", "n[1-3]"),
            ("SLURM_TASKS_PER_NODE", "2"),
        ]))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("names 1 nodes but SLURM_JOB_NODELIST has 3"),
            "{e}"
        );
        assert!(Allocation::from_vars(vars(&[("SLURM_JOB_ID", "1")])).is_err());
    }
}
