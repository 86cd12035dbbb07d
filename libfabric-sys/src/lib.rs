//! Raw bindings to the system libfabric (Debian bookworm ships 1.17; the published crates
//! need >= 1.20). Generated at build time by bindgen from the installed headers; libfabric's
//! `static inline` calls are reached through the `krun_fi_*` C shims in `shim.c`.
//! Everything here is unsafe FFI; the safe layer lives in the `fabric` crate.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// Libfabric API version this crate is written against (1.17).
pub const KRUN_FI_VERSION: u32 = (1 << 16) | 17;

/// `FI_ADDR_UNSPEC` is a cast macro bindgen cannot evaluate.
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;
