//! Fuzz targets: one per decoder of what krun reads from the network, a disk or a user.
//!
//! Each target feeds arbitrary bytes to the project's real decode entry point and asserts
//! the decoder's contract: it never panics (an assertion failing is a crash too); an error
//! names what is wrong (the protocol, the file, the key); whatever decodes re-encodes to
//! bytes that decode the same; and no single allocation exceeds [`alloc_bound`] (checked
//! when the binary installs [`fabric::fuzz::MaxAlloc`] as its global allocator).
//!
//! The same targets run three ways:
//! - coverage-guided, under AFL++ (`scripts/fuzz.sh`, the `fuzz/afl` workspace);
//! - replaying the committed corpora (`fuzz/corpus/<target>/`) and crash regressions
//!   (`fuzz/regressions/<target>/`), plus seeded mutations of them, as an ordinary test
//!   (`cargo nextest run -p fuzz`), which needs no AFL;
//! - `fuzz-seeds` writes the corpora from the real encoders ([`Target::seeds`]).
use std::panic::{catch_unwind, AssertUnwindSafe};

pub mod addresses;
pub mod files;
pub mod messages;
pub mod wire;

/// One fuzz target.
pub struct Target {
    /// Its name: the corpus directory and the AFL output directory.
    pub name: &'static str,
    /// What it decodes.
    pub what: &'static str,
    /// Runs the decoder(s) on one input and asserts their contract (panics otherwise).
    pub run: fn(&[u8]),
    /// Valid encodings produced by the real encoders (the seed corpus).
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    wire::FRAME,
    wire::DATAGRAM,
    wire::HANDSHAKE,
    messages::CONTROL,
    messages::RUNTIME,
    messages::RANK,
    messages::STORE,
    messages::ADAPTATION,
    messages::BOOTSTRAP,
    addresses::ENDPOINT,
    addresses::SECRET,
    files::GHOST_IMAGE,
    files::L4_FILE,
    files::CONFIG,
    files::POLICY,
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The largest single allocation a decoder may make for an input of `len` bytes: what the
/// input itself could justify (a few copies of it, with `Vec` doubling) plus a fixed
/// allowance (the frame reader's first payload chunk is 1 MiB). A decoder trusting a
/// length field (a header announcing 64 MiB) exceeds it.
pub fn alloc_bound(len: usize) -> usize {
    (4 << 20) + 8 * len
}

/// Runs `target` on `data` and checks the allocation bound (meaningful when the binary's
/// global allocator is [`fabric::fuzz::MaxAlloc`]). Panics on any breach of the contract.
pub fn run(target: &Target, data: &[u8]) {
    fabric::fuzz::reset_max_alloc();
    (target.run)(data);
    let max = fabric::fuzz::max_alloc();
    let extra = EXTRA_ALLOWANCE.with(|c| c.replace(0));
    assert!(
        max <= alloc_bound(data.len()) + extra,
        "{}: one allocation of {max} bytes for an input of {} bytes (bound {})",
        target.name,
        data.len(),
        alloc_bound(data.len()) + extra
    );
}

/// Like [`run`], but returns the panic's message instead of unwinding (for a replay that
/// reports every failing input at once).
pub fn run_caught(target: &Target, data: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| run(target, data))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

thread_local! {
    /// Bytes a target legitimately allocates beyond [`alloc_bound`] for this input (a
    /// decompressed section whose header announced its size); reset by [`run`].
    static EXTRA_ALLOWANCE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Declares that this input may legitimately allocate `bytes` more (see [`run`]).
pub(crate) fn allow_extra(bytes: usize) {
    EXTRA_ALLOWANCE.with(|c| c.set(c.get().saturating_add(bytes)));
}

/// Splits off the first byte (a target's selector), `None` for an empty input.
pub(crate) fn split_selector(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(b, rest)| (*b, rest))
}

/// `text` as UTF-8, for decoders of text (files read with `read_to_string`, environment
/// variables): other inputs are skipped, as the real readers refuse them before decoding.
pub(crate) fn utf8(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}
