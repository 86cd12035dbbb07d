//! The fuzz lane's brief CI mode, without AFL: every target replays its committed corpus
//! (`fuzz/corpus/<target>/`), its crash regressions (`fuzz/regressions/<target>/`: inputs
//! that once broke a decoder) and seeded mutations of both (`KRUN_FUZZ_CASES` per target,
//! default below) through the plain decoders, under the allocation-recording allocator.
use std::path::{Path, PathBuf};

use fabric::fuzz::{case_count, cases, seed, MaxAlloc};

#[global_allocator]
static ALLOC: MaxAlloc = MaxAlloc;

/// Mutated cases per target on top of the corpus (a debug build; quick).
const CASES: usize = 3_000;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

fn replay(name: &str) {
    let t = fuzz::target(name).unwrap_or_else(|| panic!("no target {name}"));
    // The committed corpus (written by `cargo run -p fuzz --bin fuzz-seeds`, grown by AFL++
    // runs) and today's encoders' seeds, which stand in for it where none is committed.
    let corpus = files(&root().join("corpus").join(name));
    let regressions = files(&root().join("regressions").join(name));
    let mut failures = Vec::new();
    for (path, bytes) in corpus.iter().chain(&regressions) {
        if let Err(e) = fuzz::run_caught(t, bytes) {
            failures.push(format!("{}: {e}", path.display()));
        }
    }
    // Today's encoders' output too (the committed corpus may predate a format change).
    let seeds = (t.seeds)();
    assert!(!seeds.is_empty(), "{name}: no seeds");
    for (i, s) in seeds.iter().enumerate() {
        if let Err(e) = fuzz::run_caught(t, s) {
            failures.push(format!("seed {i} of today's encoders: {e}"));
        }
    }
    let samples: Vec<Vec<u8>> = corpus
        .into_iter()
        .chain(regressions)
        .map(|(_, b)| b)
        .chain(seeds)
        .collect();
    let base = name
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    for (i, case) in cases(seed(base), &samples, case_count(CASES)).enumerate() {
        if let Err(e) = fuzz::run_caught(t, &case) {
            let hex: String = case.iter().map(|b| format!("{b:02x}")).collect();
            failures.push(format!(
                "mutated case {i} ({} bytes: {hex}): {e}",
                case.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

macro_rules! targets {
    ($($test:ident => $name:literal,)*) => {
        $(
            #[test]
            fn $test() {
                replay($name);
            }
        )*

        #[test]
        fn every_target_has_a_test() {
            let tested = [$($name),*];
            for t in fuzz::TARGETS {
                assert!(tested.contains(&t.name), "target {} has no replay test", t.name);
            }
            let Ok(dirs) = std::fs::read_dir(root().join("corpus")) else {
                return;
            };
            for entry in dirs {
                let name = entry.expect("an entry").file_name().to_string_lossy().to_string();
                assert!(fuzz::target(&name).is_some(), "fuzz/corpus/{name} belongs to no target");
            }
        }
    };
}

targets! {
    frame_corpus_replays => "frame",
    datagram_corpus_replays => "datagram",
    handshake_corpus_replays => "handshake",
    control_corpus_replays => "control",
    runtime_corpus_replays => "runtime",
    rank_corpus_replays => "rank",
    store_corpus_replays => "store",
    adaptation_corpus_replays => "adaptation",
    bootstrap_corpus_replays => "bootstrap",
    endpoint_corpus_replays => "endpoint",
    secret_corpus_replays => "secret",
    ghost_image_corpus_replays => "ghost-image",
    l4_file_corpus_replays => "l4-file",
    config_corpus_replays => "config",
    policy_corpus_replays => "policy",
}
