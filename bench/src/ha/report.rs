//! `bench ha`'s table, verdicts, JSON and plot.
use std::path::PathBuf;

use serde_json::json;

use super::parse::FailureTimes;
use super::{uptime, Failure, Setup, Steady, NODES, NY, RANKS};
use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{cell, json_num, median, spread, write_results, Table};

pub(super) struct Report<'a> {
    pub(super) setup: &'a Setup,
    pub(super) runs: usize,
    pub(super) rma: f64,
    pub(super) mtbf_s: f64,
    pub(super) interval_a: f64,
    pub(super) daly_s: f64,
    pub(super) none: &'a Steady,
    pub(super) short: &'a Steady,
    pub(super) daly: &'a Steady,
    pub(super) spare: &'a [Failure],
    pub(super) relaunch: &'a [Failure],
    pub(super) campaign: serde_json::Value,
    pub(super) load_before: String,
    pub(super) out: PathBuf,
}

pub(super) fn report(r: &Report) -> Result<(), String> {
    let gib = r.setup.state_bytes as f64 / (1u64 << 30) as f64;
    // The median over the pairs of (loop with the policy / loop of the run just before
    // without it) - 1.
    let overhead = |s: &Steady| median(&s.ratios).map(|q| (q - 1.0) * 100.0);
    let pick = |f: &[Failure], g: fn(&FailureTimes) -> f64| -> Vec<f64> {
        f.iter().map(|x| g(&x.times)).collect()
    };
    let spare_restart = pick(r.spare, |t| t.restart_s);
    let relaunch_restart = pick(r.relaunch, |t| t.restart_s);
    // Per run: detection + 0.5 s + fetched bytes at 0.8x the RMA read bandwidth.
    let bounds: Vec<f64> = r
        .spare
        .iter()
        .map(|f| f.times.detect_s + 0.5 + f.times.fetch_bytes as f64 / (0.8 * r.rma * 1e9))
        .collect();
    let steady_row = |policy: &str, interval: Option<f64>, s: &Steady| {
        json!({
            "policy": policy,
            "ranks": RANKS, "nodes": NODES,
            "state_gib_per_rank": json_num(Some(gib)),
            "interval_s": json_num(interval),
            "ckpt_seconds": json_num(median(&s.ckpt)),
            "freeze_seconds": json_num(median(&s.freeze)),
            "failure_free_overhead_pct": json_num(if interval.is_none() { Some(0.0) } else { overhead(s) }),
            "restart_seconds": null,
            "lost_work_seconds": null,
            "loop_seconds": spread(&s.loops),
            "loop_ratio_to_paired_no_policy_run": spread(&s.ratios),
            "checkpoints_per_run": spread(&s.commits),
            "ckpt_seconds_spread": spread(&s.ckpt),
            "freeze_seconds_spread": spread(&s.freeze),
        })
    };
    let failure_row = |policy: &str, f: &[Failure]| {
        let restart = pick(f, |t| t.restart_s);
        let lost = pick(f, |t| t.lost_work_s);
        json!({
            "policy": policy,
            "ranks": RANKS, "nodes": NODES,
            "state_gib_per_rank": json_num(Some(gib)),
            "interval_s": json_num(Some(r.interval_a)),
            "ckpt_seconds": null, "freeze_seconds": null, "failure_free_overhead_pct": null,
            "restart_seconds": json_num(median(&restart)),
            "lost_work_seconds": json_num(median(&lost)),
            "restart_seconds_spread": spread(&restart),
            "lost_work_seconds_spread": spread(&lost),
            "detect_seconds": spread(&pick(f, |t| t.detect_s)),
            "fetch_bytes": spread(&f.iter().map(|x| x.times.fetch_bytes as f64).collect::<Vec<_>>()),
            "fetch_seconds": spread(&pick(f, |t| t.fetch_s)),
            "relaunch_started_after_kill_seconds": spread(&f.iter().filter_map(|x| x.relaunch.map(|r| r.0)).collect::<Vec<_>>()),
            "l4_read_seconds": spread(&f.iter().filter_map(|x| x.relaunch.map(|r| r.1)).collect::<Vec<_>>()),
            "l4_read_bytes": spread(&f.iter().filter_map(|x| x.relaunch.map(|r| r.2 as f64)).collect::<Vec<_>>()),
        })
    };
    let rows = vec![
        steady_row("none", None, r.none),
        steady_row("coordinated", Some(r.interval_a), r.short),
        steady_row("coordinated (Young/Daly interval)", Some(r.daly_s), r.daly),
        failure_row("coordinated + 1 spare, node 1 SIGKILLed", r.spare),
        failure_row("relaunch from L4, node 1 SIGKILLed", r.relaunch),
    ];
    let mut table = Table::new(&[
        "policy",
        "interval s",
        "ckpt s",
        "held s",
        "overhead %",
        "restart s",
        "lost s",
    ]);
    for row in &rows {
        let f = |k: &str| row[k].as_f64();
        table.row(vec![
            row["policy"].as_str().unwrap_or_default().to_string(),
            cell(f("interval_s"), 2),
            cell(f("ckpt_seconds"), 3),
            cell(f("freeze_seconds"), 3),
            cell(f("failure_free_overhead_pct"), 1),
            cell(f("restart_seconds"), 2),
            cell(f("lost_work_seconds"), 2),
        ]);
    }
    print!("{}", table.render());
    let load_after = uptime();
    println!(
        "median of {} runs (min/max in the JSON; overhead: median over pairs of a run with the \
         policy and the run without it just before); load (1/5/15 min) {} before, {load_after} after",
        r.runs, r.load_before
    );
    let daly_over = overhead(r.daly);
    let bound = median(&bounds);
    let spare_m = median(&spare_restart);
    let relaunch_m = median(&relaunch_restart);
    let speedup = spare_m.zip(relaunch_m).map(|(s, l)| l / s);
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "NOT MET",
        None => "not measured",
    };
    let t1 = daly_over.map(|o| o <= 5.0);
    let t2 = spare_m.zip(bound).map(|(s, b)| s <= b);
    let t3 = speedup.map(|x| x >= 3.0);
    println!("targets:");
    println!(
        "  failure-free overhead at the Young/Daly interval ({:.2} s): {}% (target <= 5%): {}",
        r.daly_s,
        cell(daly_over, 1),
        verdict(t1)
    );
    println!(
        "  SIGKILL to computing: {} s against detection + 0.5 s + fetch at 0.8x RMA read = {} s: {}",
        cell(spare_m, 2),
        cell(bound, 2),
        verdict(t2)
    );
    println!(
        "  restart onto a spare vs relaunch from L4: {} s vs {} s = {}x (target >= 3x): {}",
        cell(spare_m, 2),
        cell(relaunch_m, 2),
        cell(speedup, 2),
        verdict(t3)
    );
    if let Some(c) = r.campaign.as_object() {
        println!(
            "  campaign: {} of {} trials finished with the serial checksum (seed {})",
            c["passed"], c["trials"], c["seed"]
        );
    }
    let bars = |label: &str, name: &str, v: &[f64]| Group::new(label, [Bar::from_values(name, v)]);
    let figure = Figure {
        title: "bench ha: coordinated checkpoints and a node loss, heat stencil on 3 local nodes"
            .into(),
        note: format!(
            "median of {} runs, whiskers min/max; load {} -> {load_after} on {} CPUs shared",
            r.runs,
            r.load_before,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        panels: vec![
            Panel::new(
                "compute loop without failures (lower is better)",
                "seconds",
                vec![
                    bars("no policy", "loop", &r.none.loops),
                    bars(
                        &format!("every {:.1} s", r.interval_a),
                        "loop",
                        &r.short.loops,
                    ),
                    bars(
                        &format!("Young/Daly {:.1} s", r.daly_s),
                        "loop",
                        &r.daly.loops,
                    ),
                ],
            ),
            Panel::new(
                "from the SIGKILL until every rank computes again (lower is better)",
                "seconds",
                vec![
                    Group::new(
                        "spare",
                        [
                            Bar::from_values("measured", &spare_restart),
                            Bar::from_values("bound: detect + 0.5 s + fetch at 0.8x RMA", &bounds),
                        ],
                    ),
                    Group::new(
                        "relaunch from L4",
                        [Bar::from_values("measured", &relaunch_restart)],
                    ),
                ],
            ),
        ],
    };
    write_results(
        &r.out,
        json!({
            "runs_per_point": r.runs,
            "load_before": r.load_before,
            "load_after": load_after,
            "job": {
                "program": "rank/examples/c/heat_ha.c", "nx": r.setup.nx, "ny": NY,
                "steps": r.setup.steps, "provider": "tcp", "store_level": "L2",
                "state_bytes_per_rank": r.setup.state_bytes,
                "failure_runs": format!("--checkpoint-interval {}, KRUN_STORE_DISK (L4) on; node 1's krund and ranks SIGKILLed by the bench half an interval after the 2nd commit", r.interval_a),
            },
            "mtbf_s": r.mtbf_s,
            "daly_interval_s": json_num(Some(r.daly_s)),
            "rma_read_gbs": json_num(Some(r.rma)),
            "rows": rows,
            "targets": {
                "overhead_at_daly_pct": json_num(daly_over), "overhead_met": t1,
                "restart_s": json_num(spare_m), "restart_bound_s": json_num(bound), "restart_met": t2,
                "relaunch_over_spare": json_num(speedup), "speedup_met": t3,
            },
            "campaign": r.campaign,
            "failed_runs_retried": r.setup.failed.borrow().clone(),
        }),
        &figure,
    )?;
    println!("wrote {} and its .png", r.out.display());
    Ok(())
}
