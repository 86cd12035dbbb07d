//! Generates bindings to libfabric's headers and builds the C shim for its inline calls.
//!
//! libfabric is not linked: `fabric` loads the library with dlopen the first time an
//! endpoint is opened (see `src/lib.rs`), so programs that never touch the fabric do not pay
//! its load-time cost. The headers and the library come from the libfabric 2.1 that
//! `scripts/build-libfabric.sh` builds into /opt/libfabric-2.1 (override with
//! `KRUN_LIBFABRIC_PREFIX`); without it, from the system's libfabric-dev.
use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=src/shim.c");
    println!("cargo:rerun-if-changed=src/shim.h");
    println!("cargo:rerun-if-env-changed=KRUN_LIBFABRIC_PREFIX");
    let prefix = env::var("KRUN_LIBFABRIC_PREFIX").unwrap_or_else(|_| "/opt/libfabric-2.1".into());
    let built = Path::new(&prefix).join("include/rdma/fabric.h");
    println!("cargo:rerun-if-changed={}", built.display());
    let (include, library) = if built.exists() {
        (
            Some(Path::new(&prefix).join("include")),
            Path::new(&prefix)
                .join("lib/libfabric.so.1")
                .display()
                .to_string(),
        )
    } else {
        println!(
            "cargo:warning=libfabric-sys: {} not found; using the system libfabric (run scripts/build-libfabric.sh for 2.1)",
            built.display()
        );
        (None, "libfabric.so.1".to_string())
    };
    println!("cargo:rustc-env=KRUN_LIBFABRIC_LIBRARY={library}");

    let mut cc = cc::Build::new();
    cc.file("src/shim.c")
        .include("src")
        .opt_level(2)
        .warnings(true);
    if let Some(dir) = &include {
        cc.include(dir);
    }
    cc.compile("krun_fi_shim");

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("krun_fi_.*")
        .allowlist_type("fi_.*|fid.*")
        .allowlist_var("FI_.*|FI_E.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false);
    if let Some(dir) = &include {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!("bindgen failed on libfabric headers ({e}); install libfabric-dev and libclang-dev")
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
