//! What the tests that SIGKILL a node while the others fault share (`failure.rs`,
//! `coordinator.rs`): four `dsm-node` processes of a scenario with a go and a stop file,
//! the kill, and the checks of the survivors' lines, the lost pages, and the access to a
//! lost page.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapServer;

use super::{pairs, rank_args, spawn, Proc};

pub const LIMIT: Duration = Duration::from_secs(150);

/// A run of 4 ranks of a `*-killed` scenario.
pub struct Killed {
    pub procs: Vec<Proc>,
    pub provider: String,
    pub deadline: Instant,
    dir: PathBuf,
    go: PathBuf,
    stop: PathBuf,
    /// `KRUN_DSM_FAIL_HOLD`'s file (with `hold`).
    pub hold: PathBuf,
    server: Option<BootstrapServer>,
}

impl Killed {
    /// Starts the 4 ranks of `scenario` (20 rounds after the go file, fault timeout 1 s,
    /// no prefetch; with `hold`, node 0's failure change waits for [`Killed::hold`]).
    pub fn start(scenario: &str, provider: &str, hold: bool) -> Killed {
        let dir = std::env::temp_dir().join(format!(
            "krun-dsm-{scenario}-{}-{provider}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (go, stop, hold_file) = (dir.join("go"), dir.join("stop"), dir.join("hold"));
        let server = BootstrapServer::start_with("127.0.0.1:0", 4, LIMIT, None).unwrap();
        let addr = server.addr().to_string();
        let mut env = vec![
            ("KRUN_DSM_FAULT_TIMEOUT_MS", "1000"),
            ("KRUN_DSM_PREFETCH", "0"),
        ];
        if hold {
            env.push(("KRUN_DSM_FAIL_HOLD", hold_file.to_str().unwrap()));
        }
        let extra = [
            "--rounds",
            "20",
            "--go-file",
            go.to_str().unwrap(),
            "--stop-file",
            stop.to_str().unwrap(),
        ];
        let procs = (0..4)
            .map(|r| spawn(&rank_args(scenario, provider, &addr, r, 4, &extra), &env))
            .collect();
        Killed {
            procs,
            provider: provider.into(),
            deadline: Instant::now() + LIMIT,
            dir,
            go,
            stop,
            hold: hold_file,
            server: Some(server),
        }
    }

    /// Once `victim` is ready and both `faulting` ranks fault, SIGKILLs it (by PID) and
    /// creates the go file.
    pub fn kill(&mut self, victim: usize, faulting: [usize; 2]) {
        let deadline = self.deadline;
        self.procs[victim].line_with("victim=ready", deadline, &format!("rank {victim}"));
        for r in faulting {
            self.procs[r].line_with("faulting=1", deadline, &format!("rank {r}"));
        }
        self.procs[victim].child.kill().unwrap();
        assert!(!self.procs[victim].child.wait().unwrap().success());
        std::fs::write(&self.go, b"go").unwrap();
    }

    /// The `survivor=ok` lines of `ranks`; checks each handled `victim`'s failure and that
    /// some read copy was promoted.
    pub fn survivors(&mut self, ranks: &[usize], victim: usize) -> Vec<HashMap<String, String>> {
        let provider = self.provider.clone();
        let mut out = Vec::new();
        for &r in ranks {
            let line = self.procs[r].line_with("survivor=ok", self.deadline, &format!("rank {r}"));
            eprintln!("rank {r} over {provider}: {line}");
            let s = pairs(&line);
            assert_eq!(
                s["failures"],
                victim.to_string(),
                "rank {r} over {provider}: rank {victim}'s failure was not handled"
            );
            out.push(s);
        }
        let promoted: u64 = out
            .iter()
            .map(|s| s["promoted"].parse::<u64>().unwrap())
            .sum();
        assert!(promoted > 0, "over {provider}: no read copy was promoted");
        out
    }

    /// `reporter`'s lost pages equal those whose every copy died (and are not none);
    /// returns them (`a,b,c`).
    pub fn lost(&mut self, reporter: usize) -> String {
        let provider = self.provider.clone();
        let line = self.procs[reporter].line_with(
            "expected_lost=",
            self.deadline,
            &format!("rank {reporter}"),
        );
        let lost = pairs(&line);
        eprintln!("over {provider}: {line}");
        assert_eq!(
            lost["lost"], lost["expected_lost"],
            "over {provider}: rank {reporter}'s lost pages differ from those whose every copy \
             died"
        );
        assert_ne!(lost["lost"], "-", "over {provider}: no page reported lost");
        lost["lost"].clone()
    }

    /// `reader` reads one of the `lost` pages: it ends with code 75 and an error naming the
    /// page as lost (never a zero page).
    pub fn lost_access(&mut self, reader: usize, lost: &str) {
        let provider = self.provider.clone();
        let who = format!("rank {reader}");
        let access = self.procs[reader].line_with("lost_access=", self.deadline, &who);
        let page = pairs(&access)["lost_access"].clone();
        assert!(
            lost.split(',').any(|p| p == page),
            "{who} reads page {page}, which is not among the lost {lost}"
        );
        let (status, err) = self.procs[reader].wait_exit(self.deadline, &who);
        assert_eq!(
            status.code(),
            Some(dsm::fault::EXIT_PAGE_UNREACHABLE),
            "{who} over {provider}: {status}\n{err}"
        );
        assert!(
            err.contains(&format!("page {page} (region at")) && err.contains("is lost"),
            "{who} over {provider}: the error must name page {page} as lost:\n{err}"
        );
        assert!(err.contains("not zero-filled"), "{err}");
    }

    /// Creates the stop file; `ranks` must end normally.
    pub fn finish(mut self, ranks: &[usize]) {
        std::fs::write(&self.stop, b"stop").unwrap();
        for &r in ranks {
            let (status, err) = self.procs[r].wait_exit(self.deadline, &format!("rank {r}"));
            assert!(
                status.success(),
                "rank {r} over {}: {status}\n{err}",
                self.provider
            );
        }
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.procs.clear();
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
