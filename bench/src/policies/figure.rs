//! The PNG beside `policies.json`, drawn from the JSON alone (so `--simulate` redraws it with
//! the measured panels kept): overhead against interval, makespan against MTBF per policy,
//! a recovery timeline, measured against model and simulator, and (after `--simulate`) the
//! extrapolation to 1,000-100,000 nodes.
use std::path::Path;

use policies::model::PolicyModel;
use policies::simulator::{self, Distribution, Job as SimJob, SimPolicy};
use serde_json::Value;

use crate::plot::{Bar, Figure, Group, Lane, Panel, Series};
use crate::report::write_results;

fn num(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn spread_point(x: f64, v: &Value) -> Option<(f64, f64, f64, f64)> {
    let m = num(&v["median"])?;
    Some((
        x,
        m,
        num(&v["min"]).unwrap_or(m),
        num(&v["max"]).unwrap_or(m),
    ))
}

/// Writes `doc` and its figure.
pub fn write(out: &Path, doc: Value) -> Result<(), String> {
    let figure = figure(&doc);
    write_results(out, doc, &figure).map(|_| ())
}

/// The costs a row measured, as the model's inputs.
pub struct Costs {
    pub solve_s: f64,
    pub freeze_s: f64,
    pub commit_s: f64,
    pub restart_s: f64,
    pub overhead: f64,
}

pub fn costs(row: &Value) -> Option<Costs> {
    let i = &row["model"]["inputs"];
    Some(Costs {
        solve_s: num(&i["solve_seconds"])?,
        freeze_s: num(&i["checkpoint_cost_seconds"])
            .or_else(|| num(&i["freeze_seconds"]))
            .unwrap_or(0.0),
        commit_s: num(&i["commit_after_release_seconds"]).unwrap_or(0.0),
        restart_s: num(&i["restart_seconds"])?,
        overhead: num(&row["measured"]["failure_free_overhead_pct"]).unwrap_or(0.0) / 100.0,
    })
}

/// The model and the simulator policy of a row at `interval` (Daly's when `None`).
pub fn policy_at(row: &Value, c: &Costs, mtbf_s: f64) -> Option<(PolicyModel, SimPolicy)> {
    let name = row["policy"].as_str()?;
    let spec = super::POLICIES.iter().find(|s| s.name == name)?;
    let interval = if spec.interval {
        policies::interval::daly(c.freeze_s.max(1e-3), mtbf_s).ok()?
    } else {
        f64::INFINITY
    };
    Some((
        super::analysis::model_of(spec, interval, c.freeze_s.max(1e-6), c.commit_s, c.overhead),
        super::analysis::sim_of(spec, interval, c.freeze_s, c.commit_s, c.overhead),
    ))
}

fn figure(doc: &Value) -> Figure {
    let rows: Vec<Value> = doc["policies"].as_array().cloned().unwrap_or_default();
    let mut panels = Vec::new();

    // 1. Overhead against interval (coordinated), measured and δ/τ.
    if let Some(c) = rows.iter().find(|r| r["policy"] == "coordinated") {
        let pts = c["overhead_by_interval"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let measured = pts
            .iter()
            .filter_map(|p| spread_point(num(&p["interval_s"])?, &p["overhead_pct"]))
            .collect();
        let model = pts
            .iter()
            .filter_map(|p| {
                Some((
                    num(&p["interval_s"])?,
                    num(&p["model_overhead_pct"])?,
                    f64::NAN,
                    f64::NAN,
                ))
            })
            .collect();
        let hold: Vec<(f64, f64, f64, f64)> = pts
            .iter()
            .filter_map(|p| {
                Some((
                    num(&p["interval_s"])?,
                    num(&p["hold_only_overhead_pct"])?,
                    f64::NAN,
                    f64::NAN,
                ))
            })
            .collect();
        panels.push(Panel::lines(
            "coordinated: failure-free overhead against the checkpoint interval",
            "interval (s)",
            "overhead (%)",
            false,
            vec![
                Series {
                    name: "measured (median, min-max)".into(),
                    points: measured,
                    model: false,
                },
                Series {
                    name: "model: cost per checkpoint (measured at the main interval) / interval"
                        .into(),
                    points: model,
                    model: true,
                },
                Series {
                    name: "hold alone / interval".into(),
                    points: hold,
                    model: true,
                },
            ],
        ));
    }

    // 2. Makespan against MTBF per policy: the model's expectation (lines) and the
    // simulator's mean over seeded exponential traces (points), for the measured job and
    // costs, each checkpointing policy at Daly's interval for the MTBF.
    let mut series = Vec::new();
    for r in &rows {
        let (Some(c), Some(name)) = (costs(r), r["policy"].as_str()) else {
            continue;
        };
        let mut model_pts = Vec::new();
        let mut sim_pts = Vec::new();
        for k in 0..13 {
            let mtbf = c.solve_s * 10f64.powf(-0.75 + 0.25 * k as f64);
            let Some((pm, sp)) = policy_at(r, &c, mtbf) else {
                continue;
            };
            if let Ok(t) = pm.expected_makespan(c.solve_s, c.restart_s, mtbf) {
                if t.is_finite() && t / c.solve_s < 8.0 {
                    model_pts.push((mtbf, t / c.solve_s, f64::NAN, f64::NAN));
                }
            }
            if k % 2 == 0 {
                let job = SimJob {
                    nodes: 3,
                    solve_s: c.solve_s,
                    restart_s: c.restart_s,
                };
                if let Ok(s) = simulator::monte_carlo(
                    &job,
                    &sp,
                    Distribution::Exponential,
                    mtbf,
                    1,
                    200,
                    20.0 * c.solve_s,
                ) {
                    if s.incomplete == 0 && s.mean / c.solve_s < 8.0 {
                        sim_pts.push((
                            mtbf,
                            s.mean / c.solve_s,
                            s.min / c.solve_s,
                            s.max / c.solve_s,
                        ));
                    }
                }
            }
        }
        series.push(Series {
            name: format!("{name}: model"),
            points: model_pts,
            model: true,
        });
        series.push(Series {
            name: format!("{name}: simulator"),
            points: sim_pts,
            model: false,
        });
    }
    if !series.is_empty() {
        panels.push(Panel::lines(
            "makespan / failure-free compute against the job's MTBF (measured costs; Daly's interval)",
            "MTBF (s, log)",
            "makespan / compute",
            true,
            series,
        ));
    }

    // 3. Recovery timeline: the failure run with the median makespan of each policy.
    let mut lanes = Vec::new();
    for r in &rows {
        let runs = r["runs"].as_array().cloned().unwrap_or_default();
        let mut by: Vec<&Value> = runs.iter().collect();
        by.sort_by(|a, b| {
            num(&a["makespan_s"])
                .unwrap_or(0.0)
                .total_cmp(&num(&b["makespan_s"]).unwrap_or(0.0))
        });
        let Some(run) = by.get(by.len() / 2) else {
            continue;
        };
        let end = num(&run["makespan_s"]).unwrap_or(0.0);
        let mut spans = Vec::new();
        let mut marks = Vec::new();
        let mut t = 0.0;
        for f in run["failures"].as_array().into_iter().flatten() {
            let (Some(at), Some(rs)) = (num(&f["at_s"]), num(&f["restart_s"])) else {
                continue;
            };
            spans.push((t, at, "computing".to_string()));
            let det = num(&f["detect_s"]).unwrap_or(0.0).min(rs);
            spans.push((at, at + det, "failure detection".to_string()));
            spans.push((at + det, at + rs, "restart / rollback".to_string()));
            let lost = num(&f["lost_s"]).unwrap_or(0.0);
            spans.push((at + rs, at + rs + lost, "redoing lost work".to_string()));
            marks.push((at, "SIGKILL".to_string()));
            t = at + rs + lost;
        }
        spans.push((t, end, "computing".to_string()));
        for c in run["commits_at_s"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(num)
        {
            marks.push((c, "checkpoint committed".to_string()));
        }
        lanes.push(Lane {
            label: r["policy"].as_str().unwrap_or_default().to_string(),
            spans,
            marks,
        });
    }
    if !lanes.is_empty() {
        panels.push(Panel::timeline(
            "recovery timeline: the run with the median makespan (seconds since the compute started)",
            "seconds",
            lanes,
        ));
    }

    // 4. Makespan: measured, model, simulator.
    let groups = rows
        .iter()
        .map(|r| {
            let s = |v: &Value, name: &str| {
                Bar::spread(name, num(&v["median"]), num(&v["min"]), num(&v["max"]))
            };
            Group::new(
                r["policy"]
                    .as_str()
                    .unwrap_or_default()
                    .replace(" with", "\nwith")
                    .replace(" without", "\nwithout"),
                [
                    s(&r["measured"]["makespan_seconds"], "measured"),
                    s(&r["model"]["makespan_seconds"], "model"),
                    s(
                        &r["simulator"]["makespan_seconds"],
                        "simulator (same failures)",
                    ),
                ],
            )
        })
        .collect();
    panels.push(Panel::new(
        "makespan with the trace's failures (lower is better)",
        "seconds",
        groups,
    ));

    // 5. Extrapolation (after --simulate): efficiency against node count.
    if let Some(sim) = doc["simulation"]["rows"].as_array() {
        let mut series: Vec<Series> = Vec::new();
        for r in sim {
            let (Some(n), Some(name), Some(dist)) = (
                num(&r["nodes"]),
                r["policy"].as_str(),
                r["distribution"].as_str(),
            ) else {
                continue;
            };
            if dist != "exponential" {
                continue;
            }
            for (key, model, label) in [
                ("simulated_efficiency", false, "simulator"),
                ("model_efficiency", true, "model"),
            ] {
                let sname = format!("{name}: {label}");
                let p = (
                    n,
                    num(&r[key]).unwrap_or(f64::NAN),
                    num(&r["simulated_efficiency_min"]).unwrap_or(f64::NAN),
                    num(&r["simulated_efficiency_max"]).unwrap_or(f64::NAN),
                );
                let p = if model {
                    (p.0, p.1, f64::NAN, f64::NAN)
                } else {
                    p
                };
                match series.iter_mut().find(|s| s.name == sname) {
                    Some(s) => s.points.push(p),
                    None => series.push(Series {
                        name: sname,
                        points: vec![p],
                        model,
                    }),
                }
            }
        }
        panels.push(Panel::lines(
            format!(
                "extrapolation: efficiency (compute / makespan) against nodes, node MTBF {} h, {} h job",
                doc["simulation"]["node_mtbf_h"], doc["simulation"]["solve_h"]
            ),
            "nodes (log)",
            "efficiency",
            true,
            series,
        ));
    }

    let na: Vec<String> = doc["not_available"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["policy"].as_str().map(String::from))
        .collect();
    Figure {
        title: "bench policies: HA policies on the heat stencil (6 ranks, 3 local nodes), measured, modelled, simulated".into(),
        note: format!(
            "median of {} runs, whiskers min/max; not available in this build: {}",
            doc["runs_per_point"],
            if na.is_empty() { "-".into() } else { na.join(", ") }
        ),
        panels,
    }
}
