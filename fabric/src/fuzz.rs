//! Seeded random and mutated inputs for the decoders' property tests, and an allocator that
//! records the largest single allocation (so a test can show a decoder never allocates
//! beyond a bound, whatever a length field announces).
//!
//! Every decoder that reads from the network has a test feeding it [`cases`]: random byte
//! strings, and valid encodings with bits flipped, bytes set to boundary values, length-like
//! fields overwritten, pieces cut, duplicated, inserted or spliced from another sample. The
//! generator is seeded (a failing case is reproducible from the printed seed and index) and
//! the number of cases is bounded. [`check`] runs a decoder on each case and turns a panic
//! into a test failure naming the input.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// SplitMix64: small, fast, seeded; good enough to drive mutations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Values that sit on the edges decoders get wrong (lengths, varint continuations, signs).
const BOUNDARY_BYTES: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, 0x40, 0x3f];
const BOUNDARY_WORDS: [u64; 7] = [
    0,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    i64::MAX as u64,
    u64::MAX,
    1 << 31,
    0x7fff_ffff_ffff_fff0,
];

/// One mutation of `input` (`other`: a second sample for splicing).
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = v.len();
        match rng.below(10) {
            0 if len > 0 => {
                let bit = rng.below(len * 8);
                v[bit / 8] ^= 1 << (bit % 8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                v[at] = BOUNDARY_BYTES[rng.below(BOUNDARY_BYTES.len())];
            }
            2 if len > 0 => {
                // A length-like field: a little-endian word of boundary value, or a long
                // varint (postcard lengths and enum indices are varints).
                let at = rng.below(len);
                let word = BOUNDARY_WORDS[rng.below(BOUNDARY_WORDS.len())].to_le_bytes();
                let n = [1usize, 2, 4, 8][rng.below(4)].min(len - at);
                if rng.below(2) == 0 {
                    v[at..at + n].copy_from_slice(&word[..n]);
                } else {
                    let run = rng.below(10) + 1;
                    let end = (at + run).min(len);
                    v[at..end].fill(0xff);
                }
            }
            3 => v.truncate(rng.below(len + 1)),
            4 => {
                let extra = rng.below(64);
                v.extend(rng.bytes(extra));
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = rng.below(len - at) + 1;
                v.drain(at..at + n);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = (rng.below(len - at) + 1).min(256);
                let piece = v[at..at + n].to_vec();
                let to = rng.below(v.len() + 1);
                v.splice(to..to, piece);
            }
            7 => {
                let at = rng.below(len + 1);
                let n = rng.below(16) + 1;
                let piece = rng.bytes(n);
                v.splice(at..at, piece);
            }
            8 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                let at = rng.below(len);
                v[at] = v[at].wrapping_add(1 + rng.below(3) as u8);
            }
            _ => v.push(rng.next_u64() as u8),
        }
    }
    v
}

/// The number of cases a property test runs: `default`, or `KRUN_FUZZ_CASES` when set (a
/// longer run, e.g. `KRUN_FUZZ_CASES=1000000 cargo test --release decoders`).
pub fn case_count(default: usize) -> usize {
    std::env::var("KRUN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The seed of a property test: `base`, moved by `KRUN_FUZZ_SEED` when set (another run
/// explores other cases; a failure prints the decoder and the case's bytes).
pub fn seed(base: u64) -> u64 {
    let shift = std::env::var("KRUN_FUZZ_SEED")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    base ^ shift.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// `n` inputs from `seed`: a quarter random byte strings (lengths up to 300), the rest
/// mutations of the `samples` (all random when there are none). Bounded: exactly `n`.
pub fn cases(seed: u64, samples: &[Vec<u8>], n: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut rng = Rng::new(seed);
    (0..n).map(move |_| {
        if samples.is_empty() || rng.below(4) == 0 {
            let len = rng.below(301);
            rng.bytes(len)
        } else {
            let a = &samples[rng.below(samples.len())];
            let b = &samples[rng.below(samples.len())];
            mutate(&mut rng, a, b)
        }
    })
}

/// Runs `decode` on every case; a panic fails with the decoder's name, the case's index and
/// its bytes (hex). Returns how many cases `decode` accepted (returned `true` for).
pub fn check(
    name: &str,
    cases: impl IntoIterator<Item = Vec<u8>>,
    mut decode: impl FnMut(&[u8]) -> bool,
) -> usize {
    let mut accepted = 0;
    for (i, case) in cases.into_iter().enumerate() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(&case)));
        match r {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(_) => panic!(
                "{name} panicked on case {i} ({} bytes): {}",
                case.len(),
                case.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ),
        }
    }
    accepted
}

/// The largest single allocation request seen by [`MaxAlloc`] since [`reset_max_alloc`].
static MAX_ALLOC: AtomicUsize = AtomicUsize::new(0);

/// A global allocator (the system's) that records the largest single request; install it
/// in a test binary with `#[global_allocator]` and read [`max_alloc`] after decoding.
pub struct MaxAlloc;

// SAFETY: every call is forwarded unchanged to the system allocator; the recording is an
// atomic update that allocates nothing.
unsafe impl GlobalAlloc for MaxAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        MAX_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        MAX_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        MAX_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

pub fn reset_max_alloc() {
    MAX_ALLOC.store(0, Ordering::Relaxed);
}

/// The largest single allocation since [`reset_max_alloc`] (0 unless [`MaxAlloc`] is the
/// global allocator).
pub fn max_alloc() -> usize {
    MAX_ALLOC.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_reproducible_and_varied() {
        let samples = vec![b"hello world".to_vec(), vec![1, 2, 3, 4, 5, 6, 7, 8]];
        let a: Vec<Vec<u8>> = cases(7, &samples, 500).collect();
        assert_eq!(a, cases(7, &samples, 500).collect::<Vec<_>>());
        assert_ne!(a, cases(8, &samples, 500).collect::<Vec<_>>());
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(distinct.len() > 400, "{}", distinct.len());
        assert!(a.iter().any(|c| c.is_empty()));
        assert!(a.iter().any(|c| c.len() > 100));
        // Some mutants stay close to a sample (same length, few bytes changed).
        assert!(a
            .iter()
            .any(|c| c.len() == 11
                && c.iter().zip(b"hello world").filter(|(x, y)| x != y).count() == 1));
    }

    #[test]
    fn check_names_the_input_that_panics() {
        let cases = vec![vec![1u8], vec![0xab, 0xcd]];
        let r = std::panic::catch_unwind(|| {
            check("demo", cases.clone(), |c| {
                assert!(c.len() < 2, "too long");
                true
            })
        });
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().unwrap();
        assert!(
            msg.contains("demo panicked on case 1") && msg.contains("abcd"),
            "{msg}"
        );
        assert_eq!(check("demo", cases[..1].to_vec(), |_| true), 1);
    }
}
