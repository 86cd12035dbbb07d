//! `bench locator`: how the cell-tree locator places directory entries against Kerrighed's
//! static `entry % n` and rendezvous (highest random weight) hashing, when one node joins or
//! the middle node leaves.
//!
//! Writes `bench/results/locator.json`:
//! `{"entries":..,"rendezvous_lookup_sample":..,"rows":[{"scheme","nodes","event",
//!   "moved_fraction","nodes_touched","max_over_mean","lookup_ns"}...]}`.
//! Entries are the dense ids 0..entries (page numbers). `moved_fraction` counts entries whose
//! manager changed, `nodes_touched` nodes that sent or received one, `max_over_mean` the most
//! loaded node's entries over the mean after the change, and `lookup_ns` the best of three
//! passes of lookups after the change.
use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use adaptation::locator::{CellTreeLocator, LocatorConfig, Modulo, Placement, Rendezvous};
use adaptation::NodeId;
use serde_json::json;

use crate::plot::{Bar, Figure, Group, Panel};
use crate::report::{self, json_num, Table};

/// Directory-entry placement on 8, 64, 1024 nodes: the cell-tree locator
/// against entry % n and rendezvous hashing, on one join and one leave; writes
/// bench/results/locator.json.
#[derive(Debug, clap::Args)]
pub struct LocatorArgs {
    /// Directory entries placed.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: u64,
    /// Where to write the JSON (default bench/results/locator.json).
    #[arg(long, value_name = "PATH")]
    pub out: Option<std::path::PathBuf>,
}
/// Cluster sizes measured.
const SIZES: [u32; 3] = [8, 64, 1024];
/// Rendezvous lookups cost O(n): at 1024 nodes their time is taken on this many entries.
const RENDEZVOUS_LOOKUP_SAMPLE: u64 = 10_000;
const TIMING_PASSES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Add,
    Remove,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Event::Add => "add",
            Event::Remove => "remove",
        }
    }
}

struct Row {
    scheme: &'static str,
    nodes: u32,
    event: Event,
    moved_fraction: f64,
    nodes_touched: usize,
    max_over_mean: f64,
    lookup_ns: f64,
    /// Entries the lookup time was measured on.
    lookup_entries: u64,
    /// Cell-tree only: members of the cell the change touched (+1 for a join), the bound on
    /// `nodes_touched`.
    touched_bound: Option<usize>,
}

fn managers<P: Placement>(p: &P, entries: u64) -> Vec<NodeId> {
    (0..entries).map(|e| p.manager(e)).collect()
}

/// Mean ns per lookup over entries 0..count, best of [`TIMING_PASSES`].
fn lookup_ns<P: Placement>(p: &P, count: u64) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..TIMING_PASSES {
        let start = Instant::now();
        let mut acc = 0u64;
        for e in 0..count {
            acc = acc.wrapping_add(p.manager(black_box(e)) as u64);
        }
        black_box(acc);
        best = best.min(start.elapsed().as_secs_f64() * 1e9 / count as f64);
    }
    best
}

/// Applies `event` to `p` (built over nodes 0..n) and measures it.
fn measure<P: Placement>(mut p: P, n: u32, event: Event, entries: u64, lookup_entries: u64) -> Row {
    let before = managers(&p, entries);
    let nodes_after = match event {
        Event::Add => {
            p.add_node(n);
            n as usize + 1
        }
        Event::Remove => {
            p.remove_node(n / 2);
            n as usize - 1
        }
    };
    let after = managers(&p, entries);
    let mut touched = BTreeSet::new();
    let mut moved = 0u64;
    for (&a, &b) in before.iter().zip(&after) {
        if a != b {
            moved += 1;
            touched.insert(a);
            touched.insert(b);
        }
    }
    let mut per_node = vec![0u64; n as usize + 1];
    for &m in &after {
        per_node[m as usize] += 1;
    }
    let max = *per_node.iter().max().unwrap_or(&0) as f64;
    Row {
        scheme: p.name(),
        nodes: n,
        event,
        moved_fraction: moved as f64 / entries as f64,
        nodes_touched: touched.len(),
        max_over_mean: max / (entries as f64 / nodes_after as f64),
        lookup_ns: lookup_ns(&p, lookup_entries),
        lookup_entries,
        touched_bound: None,
    }
}

/// Members of the cell a change touches on the cell-tree locator (+1 for the newcomer).
fn cell_bound(n: u32, event: Event) -> usize {
    let nodes: Vec<NodeId> = (0..n).collect();
    let before = CellTreeLocator::new(LocatorConfig::default(), &nodes);
    let mut after = before.clone();
    let cells = before.cells();
    match event {
        Event::Add => {
            let s = after.add_node(n);
            let start = after.cells()[s.cell].first_bucket;
            let home = cells
                .iter()
                .find(|c| c.first_bucket <= start && start < c.first_bucket + c.buckets)
                .expect("cells tile the buckets");
            home.members.len() + 1
        }
        Event::Remove => cells
            .iter()
            .find(|c| c.members.contains(&(n / 2)))
            .map_or(0, |c| c.members.len()),
    }
}

pub fn run(args: LocatorArgs) -> Result<(), String> {
    let entries: u64 = args.entries;
    if entries == 0 {
        return Err("--entries must be positive".into());
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| report::results_path("locator"));
    let mut rows = Vec::new();
    for &n in &SIZES {
        let nodes: Vec<NodeId> = (0..n).collect();
        for event in [Event::Add, Event::Remove] {
            let mut row = measure(
                CellTreeLocator::new(LocatorConfig::default(), &nodes),
                n,
                event,
                entries,
                entries,
            );
            row.touched_bound = Some(cell_bound(n, event));
            rows.push(row);
            rows.push(measure(Modulo::new(&nodes), n, event, entries, entries));
            let sample = if n >= 1024 {
                RENDEZVOUS_LOOKUP_SAMPLE.min(entries)
            } else {
                entries
            };
            rows.push(measure(Rendezvous::new(&nodes), n, event, entries, sample));
            eprintln!("  {n} nodes, {}: done", event.name());
        }
    }

    let mut table = Table::new(&[
        "scheme",
        "nodes",
        "event",
        "moved",
        "ideal",
        "touched",
        "max/mean",
        "lookup ns",
    ]);
    for r in &rows {
        table.row(vec![
            r.scheme.to_string(),
            r.nodes.to_string(),
            r.event.name().to_string(),
            format!("{:.5}", r.moved_fraction),
            format!("{:.5}", ideal(r.nodes, r.event)),
            r.nodes_touched.to_string(),
            format!("{:.4}", r.max_over_mean),
            if r.lookup_entries == entries {
                format!("{:.2}", r.lookup_ns)
            } else {
                format!("{:.2}*", r.lookup_ns)
            },
        ]);
    }
    println!("\n{}", table.render());
    println!(
        "{entries} entries (ids 0..{entries}); moved fractions on all of them; \
         ideal = 1/(n+1) for add, 1/n for remove.\n\
         * rendezvous lookup time at 1024 nodes measured on {} entries (O(n) per lookup).\n",
        RENDEZVOUS_LOOKUP_SAMPLE.min(entries)
    );

    println!("cell-tree targets:");
    for r in rows.iter().filter(|r| r.scheme == "cell-tree") {
        let modulo = rows
            .iter()
            .find(|m| m.scheme == "modulo" && m.nodes == r.nodes && m.event == r.event)
            .map_or(f64::NAN, |m| m.lookup_ns);
        let bound = r.touched_bound.unwrap_or(0);
        let checks = [
            (
                format!(
                    "moved {:.5} <= 1.1 x ideal {:.5}",
                    r.moved_fraction,
                    ideal(r.nodes, r.event)
                ),
                r.moved_fraction <= 1.1 * ideal(r.nodes, r.event),
            ),
            (
                format!(
                    "touched {} <= cell members{} {bound}",
                    r.nodes_touched,
                    if r.event == Event::Add { " + 1" } else { "" }
                ),
                r.nodes_touched <= bound,
            ),
            (
                format!("max/mean {:.4} <= 1.1", r.max_over_mean),
                r.max_over_mean <= 1.1,
            ),
            (
                format!(
                    "lookup {:.2} ns <= 1.5 x modulo {modulo:.2} ns",
                    r.lookup_ns
                ),
                r.lookup_ns <= 1.5 * modulo,
            ),
        ];
        for (what, ok) in checks {
            println!(
                "  {:>4} nodes {:<6} {}  {what}",
                r.nodes,
                r.event.name(),
                if ok { "PASS" } else { "FAIL" }
            );
        }
    }

    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({
                "scheme": r.scheme,
                "nodes": r.nodes,
                "event": r.event.name(),
                "moved_fraction": json_num(Some(r.moved_fraction)),
                "nodes_touched": r.nodes_touched,
                "max_over_mean": json_num(Some(r.max_over_mean)),
                "lookup_ns": json_num(Some(r.lookup_ns)),
            })
        })
        .collect();
    report::write_results(
        &out,
        json!({
            "entries": entries,
            "rendezvous_lookup_sample": RENDEZVOUS_LOOKUP_SAMPLE.min(entries),
            "rows": json_rows,
        }),
        &figure(&rows, entries),
    )?;
    println!("\nwrote {}", out.display());
    Ok(())
}

/// The plot: entries moved per change (with the ideal) and lookup time, the cell-tree
/// locator beside modulo and rendezvous hashing computed in the same run.
fn figure(rows: &[Row], entries: u64) -> Figure {
    let mut moved = Vec::new();
    let mut lookup = Vec::new();
    for &n in &SIZES {
        for event in [Event::Add, Event::Remove] {
            let of = |scheme: &str| {
                rows.iter()
                    .find(|r| r.scheme == scheme && r.nodes == n && r.event == event)
            };
            let label = format!("{n} nodes\n{}", event.name());
            // Modulo moves nearly everything (n x the ideal): off this scale, in the JSON.
            moved.push(Group::new(
                label.clone(),
                ["cell-tree", "rendezvous"]
                    .into_iter()
                    .map(|s| Bar::single(s, of(s).map(|r| r.moved_fraction / ideal(n, event)))),
            ));
            // Rendezvous lookups are O(n) (up to ~2 us): off this scale, in the JSON.
            lookup.push(Group::new(
                label,
                ["cell-tree", "modulo"]
                    .into_iter()
                    .map(|s| Bar::single(s, of(s).map(|r| r.lookup_ns))),
            ));
        }
    }
    Figure {
        title: format!("bench locator: placement of {entries} directory entries"),
        note: "one pass (placement is deterministic)".into(),
        panels: vec![
            Panel::new(
                "entries moved by one change / the ideal 1/(n+1) or 1/n (target <= 1.1; \
                 modulo moves ~n x, not drawn)",
                "x ideal",
                moved,
            ),
            Panel::new(
                "lookup time, against entry % n (target <= 1.5x; rendezvous is O(n), not drawn)",
                "ns",
                lookup,
            ),
        ],
    }
}

/// The fraction of entries a change must move at least.
fn ideal(n: u32, event: Event) -> f64 {
    match event {
        Event::Add => 1.0 / (n as f64 + 1.0),
        Event::Remove => 1.0 / n as f64,
    }
}
