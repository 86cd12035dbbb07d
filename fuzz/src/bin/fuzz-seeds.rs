//! Writes each target's seed corpus, `<dir>/<target>/seed-<i>` (default dir `fuzz/corpus`),
//! from the real encoders. `fuzz-seeds [DIR] [TARGET...]`.
use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "fuzz/corpus".into()));
    let only: Vec<String> = args.collect();
    for t in fuzz::TARGETS {
        if !only.is_empty() && !only.iter().any(|n| n == t.name) {
            continue;
        }
        let d = dir.join(t.name);
        if let Err(e) = std::fs::create_dir_all(&d) {
            eprintln!("fuzz-seeds: cannot create {}: {e}", d.display());
            std::process::exit(1);
        }
        let seeds = (t.seeds)();
        for (i, s) in seeds.iter().enumerate() {
            let f = d.join(format!("seed-{i}"));
            if let Err(e) = std::fs::write(&f, s) {
                eprintln!("fuzz-seeds: cannot write {}: {e}", f.display());
                std::process::exit(1);
            }
        }
        println!("{}: {} seeds", t.name, seeds.len());
    }
}
