//! A hinted read posts its join and a speculative read of the owner's published copy
//! together; the copy is kept only when its generation stamp names the generation the join
//! saw open (`dsm/src/fault/words.rs`). Real `dsm-node speculation-race` processes (3
//! ranks, tcp and shm): `KRUN_DSM_JOIN_HOLD` makes rank 1's speculative read land before
//! its join, and rank 0 writes and republishes the page in between. Rank 1 must read the
//! new value through the fallback (counted once), and later, with the copy unchanged, use
//! its speculative read (counted once, no fallback). Without the check rank 1 keeps the
//! older value (a stale copy the owner does not know it must invalidate).
//!
//! Needs root (userfaultfd). Waits are bounded (120 s); the test never judges time.
mod common;

use std::time::{Duration, Instant};

use common::{is_root, rank_args, spawn, Proc};
use fabric::bootstrap::BootstrapServer;

const LIMIT: Duration = Duration::from_secs(120);

fn race_on(provider: &str) {
    let dir = std::env::temp_dir().join(format!(
        "krun-dsm-speculation-{}-{provider}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hold = dir.join("hold");
    let hold_s = hold.to_str().unwrap();
    let server = BootstrapServer::start_with("127.0.0.1:0", 3, LIMIT, None).unwrap();
    let addr = server.addr().to_string();
    let extra = ["--go-file", hold_s];
    let mut procs: Vec<Proc> = (0..3)
        .map(|r| {
            let mut env = vec![("KRUN_DSM_PREFETCH", "0")];
            if r == 1 {
                env.push(("KRUN_DSM_JOIN_HOLD", hold_s));
            }
            spawn(
                &rank_args("speculation-race", provider, &addr, r, 3, &extra),
                &env,
            )
        })
        .collect();
    let deadline = Instant::now() + LIMIT;
    let mut results = Vec::new();
    for (r, p) in procs.iter_mut().enumerate() {
        let (status, err) = p.wait_exit(deadline, &format!("rank {r}"));
        assert!(
            status.success(),
            "rank {r} over {provider}: {status:?}\n{}",
            common::tail(&err, 30)
        );
        results.push(p.results(&format!("rank {r}")));
    }
    let r1 = &results[1];
    assert_eq!(r1["race_value"], "3", "over {provider}: {r1:?}");
    assert_eq!(
        r1["race_fallbacks"], "1",
        "over {provider}: the older copy read before the join was not rejected: {r1:?}"
    );
    assert_eq!(r1["race_speculative"], "0", "over {provider}: {r1:?}");
    assert_eq!(r1["later_value"], "4", "over {provider}: {r1:?}");
    assert_eq!(
        r1["later_speculative"], "1",
        "over {provider}: an unchanged copy was not used: {r1:?}"
    );
    assert_eq!(r1["later_fallbacks"], "0", "over {provider}: {r1:?}");
    assert!(dir.join("hold.held").exists(), "the hold never ran");
    drop(procs);
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_page_changed_between_the_speculative_read_and_the_join_is_read_again_over_tcp() {
    if !is_root() {
        eprintln!("skipped: needs root (userfaultfd)");
        return;
    }
    race_on("tcp");
}

#[test]
fn a_page_changed_between_the_speculative_read_and_the_join_is_read_again_over_shm() {
    if !is_root() {
        eprintln!("skipped: needs root (userfaultfd)");
        return;
    }
    race_on("shm");
}
