//! Raw bindings to OpenPMIx's server library (PMIx 4.2, Debian bookworm's `libpmix-dev`),
//! generated at build time by bindgen from `pmix_server.h`: only the server calls krund
//! uses (init, namespaces, clients, fork setup, direct modex), the info/value loaders and
//! the `PMIX_*` constants. Everything here is unsafe FFI; the safe layer is
//! `launcher::runtime::pmix`.
#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

/// `PMIX_RANK_WILDCARD` (`UINT32_MAX-1`, a macro bindgen cannot evaluate): every rank of a
/// namespace.
pub const RANK_WILDCARD: pmix_rank_t = u32::MAX - 1;
/// `PMIX_RANK_UNDEF` (`UINT32_MAX`).
pub const RANK_UNDEF: pmix_rank_t = u32::MAX;
