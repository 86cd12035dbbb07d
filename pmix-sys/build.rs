//! Generates bindings to OpenPMIx's server API and links the system's libpmix.
//!
//! The headers and library come from Debian's `libpmix-dev` (PMIx 4.2, installed under
//! /usr/lib/x86_64-linux-gnu/pmix2 by scripts/install-deps.sh); `pkg-config pmix` finds
//! them, `KRUN_PMIX_PREFIX` overrides.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn pkg_config_var(var: &str) -> Option<String> {
    let o = Command::new("pkg-config")
        .args([&format!("--variable={var}"), "pmix"])
        .output()
        .ok()?;
    let s = String::from_utf8(o.stdout).ok()?.trim().to_string();
    (o.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=KRUN_PMIX_PREFIX");
    let (include, lib) = match env::var("KRUN_PMIX_PREFIX") {
        Ok(p) => (Path::new(&p).join("include"), Path::new(&p).join("lib")),
        Err(_) => match (pkg_config_var("includedir"), pkg_config_var("libdir")) {
            (Some(i), Some(l)) => (PathBuf::from(i), PathBuf::from(l)),
            _ => {
                let p = Path::new("/usr/lib/x86_64-linux-gnu/pmix2");
                (p.join("include"), p.join("lib"))
            }
        },
    };
    let header = include.join("pmix_server.h");
    if !header.exists() {
        panic!(
            "pmix-sys: {} not found: install libpmix-dev (scripts/install-deps.sh) or set \
             KRUN_PMIX_PREFIX to an OpenPMIx installation",
            header.display()
        );
    }
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=pmix");
    // The ranks' launcher finds libpmix at run time where it was linked.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_arg(format!("-I{}", include.display()))
        .clang_arg(format!("-I{}", include.join("pmix").display()))
        .allowlist_function(
            "PMIx_server_(init|finalize|register_nspace|deregister_nspace|register_client|deregister_client|setup_fork|dmodex_request)",
        )
        .allowlist_function(
            "PMIx_(Info_load|Value_load|Value_destruct|Error_string|generate_regex|generate_ppn|Store_internal|Get)",
        )
        .allowlist_type("pmix_server_module_t")
        .allowlist_var("PMIX_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .generate()
        .unwrap_or_else(|e| panic!("bindgen failed on pmix_server.h ({e}); install libclang-dev"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
