//! `bench ha --campaign N` and `--campaign-only` (also `bench faults`' `node` kind): trials of
//! `cluster_tests::campaign` on heat_ha, a random node SIGKILLed at a random time.
use std::path::{Path, PathBuf};
use std::time::Duration;

use cluster_tests::campaign::{judge, trials, Campaign};
use serde_json::json;

use super::{build_heat, exe_dir, serial_checksum, uptime, Cleanup, Setup, NODES, RANKS};

/// `--campaign N`: N trials of `cluster_tests::campaign` on heat_ha 96x64 (500 steps, 8 ms
/// each): a random node SIGKILLed at a random time; the count that finished correctly.
pub(crate) fn campaign_json(
    setup: &Setup,
    serial: &Path,
    n: usize,
    seed: u64,
) -> Result<serde_json::Value, String> {
    let cwant = serial_checksum(serial, 96, 64, 500)?;
    let mut c = Campaign::local(
        &setup.krun,
        &[setup.heat.to_str().unwrap_or_default(), "96", "64", "500"],
        NODES,
        RANKS,
    );
    c.env = vec![
        ("HEAT_STEP_DELAY_US".into(), "8000".into()),
        ("HEAT_HA_TRACE".into(), "0".into()),
        (
            "KRUN_GHOST_DIR".into(),
            setup.ghost.join("campaign").display().to_string(),
        ),
    ];
    let mut passed = 0;
    let mut failures = Vec::new();
    for t in trials(seed, n, NODES, 300..3500) {
        let verdict = c
            .run(&t)
            .map_err(|e| e.to_string())
            .and_then(|out| judge(&t, &out, &cwant));
        println!(
            "  campaign trial {}: node {} at {} ms: {} (load {})",
            t.index,
            t.node,
            t.at_ms,
            verdict
                .as_ref()
                .map_or_else(|e| format!("FAILED: {e}"), |_| "ok".into()),
            uptime()
        );
        match verdict {
            Ok(()) => passed += 1,
            Err(e) => {
                failures.push(json!({"trial": t.index, "node": t.node, "at_ms": t.at_ms, "why": e}))
            }
        }
    }
    Ok(json!({
        "trials": n, "passed": passed, "seed": seed,
        "job": "heat_ha 96x64, 500 steps, 8 ms per step; 6 ranks on 3 local nodes + 1 spare; checkpoint every 1 s",
        "kill_window_ms": [300, 3500],
        "failures": failures,
        "environment": crate::report::environment(),
    }))
}

/// The set-up of a campaign run alone (`--campaign-only`, `bench faults`): heat_ha built,
/// image files under /dev/shm (removed when the returned guard drops). Returns the set-up
/// and the serial program.
pub(crate) fn campaign_setup() -> Result<(Setup, PathBuf, Cleanup), String> {
    let dir = exe_dir()?;
    let (heat, serial) = build_heat(&dir)?;
    let tag = format!("krun-bench-ha-{}", std::process::id());
    let cleanup = Cleanup(vec![PathBuf::from("/dev/shm").join(&tag)]);
    let setup = Setup {
        krun: dir.join("krun"),
        heat,
        nx: 96,
        steps: 500,
        state_bytes: 0,
        ghost: PathBuf::from("/dev/shm").join(&tag),
        disk: PathBuf::from("/var/tmp").join(&tag),
        arena_mib: 64,
        limit: Duration::from_secs(240),
        failed: Default::default(),
    };
    Ok((setup, serial, cleanup))
}

/// `--campaign-only`: runs the campaign alone and replaces the `"campaign"` of the results
/// already at `out` (their rows and environment stay; the campaign carries its own).
pub(super) fn campaign_only(out: &Path, n: usize, seed: u64) -> Result<(), String> {
    let (setup, serial, _cleanup) = campaign_setup()?;
    let c = campaign_json(&setup, &serial, n, seed)?;
    // Read only now: the results may have been written while the campaign ran.
    let text = std::fs::read_to_string(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", out.display()))?;
    println!(
        "campaign: {} of {} trials finished with the serial checksum (seed {seed})",
        c["passed"], n
    );
    v["campaign"] = c;
    crate::report::write_json(out, &v)?;
    println!("updated the campaign in {}", out.display());
    Ok(())
}
