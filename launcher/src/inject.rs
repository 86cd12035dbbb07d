//! Failure injection for tests, benches and demos: `krun --inject-failure node=N@T`
//! SIGKILLs node N's krund and its ranks (by PID: only processes krun started, and theirs)
//! at time T after the nodes started, or once the checkpoint policy committed K checkpoints.
use std::time::Duration;

use crate::error::{LauncherError, Result};

/// `--inject-failure node=N@T`: krun SIGKILLs node N's krund and its ranks (by PID, only
/// processes it started) at that moment (for tests, benches and demos).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Injection {
    pub node: usize,
    pub at: InjectAt,
}

/// When an [`Injection`] fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InjectAt {
    /// This long after the nodes started.
    After(Duration),
    /// Once the checkpoint policy committed this many checkpoints.
    Commits(u64),
}

impl std::str::FromStr for Injection {
    type Err = LauncherError;

    /// `node=N@5s`, `node=N@1.5s`, `node=N@500ms` or `node=N@3ckpt`.
    fn from_str(v: &str) -> Result<Injection> {
        let bad = |why: &str| {
            LauncherError::Usage(format!(
                "--inject-failure {v:?}: {why} (expected node=N@SECONDSs, node=N@MSms or node=N@Kckpt)"
            ))
        };
        let rest = v.strip_prefix("node=").ok_or_else(|| bad("no node="))?;
        let (node, when) = rest.split_once('@').ok_or_else(|| bad("no @"))?;
        let node = node.parse().map_err(|_| bad("the node is not a number"))?;
        let at = if let Some(k) = when.strip_suffix("ckpt") {
            InjectAt::Commits(
                k.parse()
                    .ok()
                    .filter(|&k| k > 0)
                    .ok_or_else(|| bad("the checkpoint count is not a positive number"))?,
            )
        } else if let Some(ms) = when.strip_suffix("ms") {
            InjectAt::After(Duration::from_millis(
                ms.parse()
                    .map_err(|_| bad("not a number of milliseconds"))?,
            ))
        } else if let Some(s) = when.strip_suffix('s') {
            let secs: f64 = s
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| bad("not a number of seconds"))?;
            InjectAt::After(Duration::from_secs_f64(secs))
        } else {
            return Err(bad("no unit"));
        };
        Ok(Injection { node, at })
    }
}

/// The children of process `pid` (`/proc/PID/task/*/children`).
pub(crate) fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injections_parse_times_and_checkpoint_counts_and_name_what_is_wrong() {
        let at = |v: &str| v.parse::<Injection>().map(|i| (i.node, i.at));
        assert_eq!(
            at("node=2@5s").unwrap(),
            (2, InjectAt::After(Duration::from_secs(5)))
        );
        assert_eq!(
            at("node=0@1.5s").unwrap(),
            (0, InjectAt::After(Duration::from_millis(1500)))
        );
        assert_eq!(
            at("node=1@500ms").unwrap(),
            (1, InjectAt::After(Duration::from_millis(500)))
        );
        assert_eq!(at("node=3@2ckpt").unwrap(), (3, InjectAt::Commits(2)));
        for (bad, why) in [
            ("2@5s", "no node="),
            ("node=2", "no @"),
            ("node=x@5s", "not a number"),
            ("node=2@5", "no unit"),
            ("node=2@0ckpt", "positive"),
            ("node=2@-1s", "seconds"),
        ] {
            let e = at(bad).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}
