//! `bench policies --simulate`: every measured policy extrapolated to 1,000-100,000 nodes by
//! the simulator, from the costs in `policies.json` (a `bench policies` run), beside the
//! analytic model. Weak scaling: the work and the checkpoint per node stay as measured, so
//! the hold, the commit latency, the restart and the overhead do not change with the node
//! count; the job's MTBF is the node MTBF divided by the node count; checkpointing policies
//! use Daly's interval for that MTBF. Exponential and Weibull (shape 0.7) traces.
use std::path::Path;

use policies::simulator::{self, Distribution, Job as SimJob};
use serde_json::{json, Value};

use super::figure::{costs, policy_at, write};
use super::PoliciesArgs;
use crate::report::{json_num, Table};

pub fn run(args: &PoliciesArgs, out: &Path) -> Result<(), String> {
    let nodes: Vec<u32> = args
        .nodes
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("--nodes: {n:?} is not a node count"))
        })
        .collect::<Result<_, _>>()?;
    let node_mtbf_h: f64 = args.node_mtbf_h;
    let solve_h: f64 = args.solve_h;
    let runs: u32 = args.sim_runs;
    let seed: u64 = args.seed;
    if !(node_mtbf_h > 0.0 && solve_h > 0.0) || runs == 0 {
        return Err("--node-mtbf-h, --solve-h and --sim-runs must be positive".into());
    }
    let text = std::fs::read_to_string(out).map_err(|e| {
        format!(
            "{}: {e} (run `bench policies` first: the simulator starts from its measured costs)",
            out.display()
        )
    })?;
    let mut doc: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", out.display()))?;
    let measured: Vec<Value> = doc["policies"].as_array().cloned().unwrap_or_default();
    let solve_s = solve_h * 3600.0;
    let mut rows = Vec::new();
    let mut table = Table::new(&[
        "policy",
        "law",
        "nodes",
        "MTBF h",
        "interval s",
        "efficiency: sim (mean)",
        "(min-max)",
        "model",
        "failures",
    ]);
    for r in &measured {
        let Some(c) = costs(r) else {
            continue;
        };
        let name = r["policy"].as_str().unwrap_or_default();
        for &n in &nodes {
            let mtbf = node_mtbf_h * 3600.0 / f64::from(n);
            let Some((pm, sp)) = policy_at(r, &c, mtbf) else {
                continue;
            };
            let interval = match sp {
                simulator::SimPolicy::Coordinated { interval_s, .. }
                | simulator::SimPolicy::Uncoordinated { interval_s, .. } => Some(interval_s),
                simulator::SimPolicy::None => None,
            };
            let model = pm
                .expected_makespan(solve_s, c.restart_s, mtbf)
                .ok()
                .filter(|t| t.is_finite());
            for dist in [
                Distribution::Exponential,
                Distribution::Weibull { shape: 0.7 },
            ] {
                let job = SimJob {
                    nodes: n,
                    solve_s,
                    restart_s: c.restart_s,
                };
                let limit = 50.0 * solve_s;
                let s = simulator::monte_carlo(&job, &sp, dist, mtbf, seed, runs, limit)
                    .map_err(|e| e.to_string())?;
                let eff = |t: f64| solve_s / t;
                let law = match dist {
                    Distribution::Exponential => "exponential",
                    Distribution::Weibull { .. } => "weibull-0.7",
                };
                table.row(vec![
                    name.to_string(),
                    law.into(),
                    n.to_string(),
                    format!("{:.2}", mtbf / 3600.0),
                    interval.map_or("-".into(), |i| format!("{i:.0}")),
                    format!("{:.3}", eff(s.mean)),
                    format!("{:.3}-{:.3}", eff(s.max), eff(s.min)),
                    model.map_or("0 (never ends)".into(), |t| format!("{:.3}", eff(t))),
                    format!("{:.1}", s.mean_failures),
                ]);
                rows.push(json!({
                    "policy": name, "distribution": law, "nodes": n,
                    "job_mtbf_s": json_num(Some(mtbf)),
                    "interval_s": json_num(interval),
                    "simulated_makespan_s": {"median": json_num(Some(s.median)), "mean": json_num(Some(s.mean)), "min": json_num(Some(s.min)), "max": json_num(Some(s.max))},
                    "simulated_efficiency": json_num(Some(eff(s.mean))),
                    "simulated_efficiency_of_the_median": json_num(Some(eff(s.median))),
                    "simulated_efficiency_min": json_num(Some(eff(s.max))),
                    "simulated_efficiency_max": json_num(Some(eff(s.min))),
                    "runs_hitting_the_limit": s.incomplete,
                    "mean_failures": json_num(Some(s.mean_failures)),
                    "mean_lost_s": json_num(Some(s.mean_lost_s)),
                    "model_makespan_s": json_num(model),
                    "model_efficiency": json_num(Some(model.map_or(0.0, eff))),
                    "model_vs_simulated_mean_pct": json_num(model.map(|m| (m - s.mean) / s.mean * 100.0)),
                }));
            }
        }
    }
    if rows.is_empty() {
        return Err(format!(
            "{} holds no policy with measured costs (solve and restart time)",
            out.display()
        ));
    }
    print!("{}", table.render());
    doc["simulation"] = json!({
        "node_mtbf_h": node_mtbf_h,
        "solve_h": solve_h,
        "runs_per_point": runs,
        "seed": seed,
        "limit": "a run stops at 50x the solve time (counted in runs_hitting_the_limit)",
        "efficiency": "solve time / mean makespan (the model's expectation is a mean too); min and max: of single runs",
        "assumptions": "weak scaling: hold, commit latency, restart time and failure-free overhead as measured on 3 nodes; job MTBF = node MTBF / nodes; Daly's interval for that MTBF; one node per failure, a spare for each; buddy pairs (2k, 2k+1) lose their L2 copies together",
        "costs_from": doc["environment"].clone(),
        "rows": rows,
    });
    write(out, doc)?;
    println!(
        "wrote the simulation into {} and redrew its .png",
        out.display()
    );
    Ok(())
}
