//! Generates bindings to the system libfabric and builds the C shim for its inline calls.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=src/shim.c");
    println!("cargo:rerun-if-changed=src/shim.h");
    println!("cargo:rustc-link-lib=fabric");

    cc::Build::new()
        .file("src/shim.c")
        .include("src")
        .opt_level(2)
        .warnings(true)
        .compile("krun_fi_shim");

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("fi_.*|krun_fi_.*")
        .allowlist_type("fi_.*|fid.*")
        .allowlist_var("FI_.*|FI_E.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "bindgen failed on libfabric headers ({e}); install libfabric-dev and libclang-dev"
            )
        });
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
