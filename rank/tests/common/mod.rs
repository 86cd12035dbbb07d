//! What the tests that run the C examples under `krun` share: the target directory, krun,
//! a temporary directory, the examples' build, an output's text.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/<profile>`: tests run from `target/<profile>/deps`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

pub fn krun() -> PathBuf {
    let k = target_dir().join("krun");
    assert!(
        k.exists(),
        "{} is missing: cargo build -p launcher (or --workspace) first",
        k.display()
    );
    k
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "krun-{tag}-{}-{:x}",
            std::process::id(),
            fabric::random_u64().unwrap()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds the examples with their Makefile into `out`.
pub fn build_examples(out: &Path) {
    let lib = target_dir();
    assert!(
        lib.join("libkrun.so").exists(),
        "libkrun.so not found in {} (cargo build -p rank)",
        lib.display()
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/c");
    let o = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("LIBDIR={}", lib.display()))
        .arg(format!("OUT={}", out.display()))
        .output()
        .expect("make is required (scripts/install-deps.sh installs build-essential)");
    assert!(
        o.status.success(),
        "building the examples failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
