//! A policy module built against a future ABI version: krun must refuse to load it, naming
//! both versions.

/// The ABI version this (pretend) module was built against.
#[no_mangle]
pub extern "C" fn krun_policy_abi_version() -> u32 {
    policies::module::abi::ABI_VERSION + 41
}
