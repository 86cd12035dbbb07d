//! Share words and published copies in registered memory, and the generation check that
//! lets a reader post its join and its read of a published copy together (one round trip).
//!
//! Layout, per page of a region, at the owner:
//! - the **share word** (8 bytes in the `words` region): bit 63 open, bits 32..63 the
//!   **generation** of the open period, bits 0..32 the readers that joined it;
//! - the **published copy** (in the `export` region: the pages one after the other, then
//!   one [`STAMP`] per page): the page's bytes, and its **stamp**: the generation it was
//!   published under and a 64-bit hash of the bytes and that generation. (Stamps are apart
//!   from the pages so that each read stays at most 4 KiB: the shm provider serves a read
//!   of 4 KiB + 16 B through a slower path, ~70 us against ~1.5 us, measured.)
//!
//! Protocol (the owner's side):
//! 1. Publishing a page (read owner, no invalidation in progress): the word is closed; the
//!    owner takes the page's next generation `g` (never 0), writes the bytes and the stamp
//!    `(g, hash(bytes, g))` into the export slot, then opens the word with `g`
//!    (`SHARE_OPEN | g << 32`, a compare-and-swap through its own endpoint).
//! 2. Before invalidating, the owner closes the word (a fetch-and-add through its own
//!    endpoint, one atomicity domain with the readers' joins) and invalidates every reader
//!    whose bit it finds; the slot is written again only by a later publication, i.e. after
//!    every one of those readers acknowledged.
//!
//! The reader's side (`super::remote`): a reader with a hint posts the fetch-and-add that
//! joins (adds its bit) and RMA reads of the page and of its stamp at once. The three may
//! execute at the owner in any order (the hash ties the bytes to the stamp's generation
//! whenever each was read). When all completed:
//! - word closed: the read is discarded (the state machine asks by message);
//! - word open with generation `g`, and the slot's stamp is `g` with a matching hash: the
//!   bytes are exactly what the owner published under `g`, and the reader joined during
//!   `g`. A copy read after the join would be the same bytes (the slot does not change
//!   while `g` is open), so the copy is used as if read after the join: one round trip;
//! - word open with `g`, stamp or hash not matching: the read ran before `g` was published
//!   (an older copy) or while the slot was being written (torn). The reader joined `g`
//!   anyway, so it reads the slot again, after the join (the old two-round-trip path, the
//!   **fallback**, counted in `DriverStats::speculation_fallbacks`).
//!
//! Invariants:
//! - A reader never keeps a copy an owner changed after the reader's join: a copy is kept
//!   only if its stamp names the generation open at the join (then the bytes are that
//!   generation's, which the owner cannot change before closing the word, and closing it
//!   invalidates the reader), or if it was read after the join (as before).
//! - A write upgrade still invalidates every reader: the joins are fetch-and-adds on the
//!   same word as before, and the close returns every bit added while the word was open,
//!   whatever the reads did.
//!
//! Limits: generations are per (owner, page) and wrap after 2^31 - 1 publications of one
//! page by one owner (a copy read that many publications before its join would pass); a
//! torn slot passes the hash with probability about 2^-64 (a torn read needs the read to
//! reach the owner during a republication of the page, before the join).
use std::collections::{BTreeMap, BTreeSet};

use fabric::{Endpoint, PeerId, RemoteRegion};

use super::{no_region, region_of, Regions};
use crate::coherence::{joined_readers, NodeId, PageId, ShareWords, SHARE_OPEN, SHARE_WORD_NODES};
use crate::error::Result;
use crate::uffd::PAGE;

/// Bytes of a stamp: the generation (u64 LE) and the hash (u64 LE).
pub const STAMP: usize = 16;
/// Bytes of a landing slot of a speculative read: the page, then its stamp.
pub const EXPORT_STRIDE: usize = PAGE + STAMP;
/// Where the generation lives in a share word, and its mask (31 bits).
const GEN_SHIFT: u32 = 32;
const GEN_MASK: u64 = (1 << 31) - 1;

/// Bytes of an export region of `pages` pages (the pages, then their stamps).
pub fn export_len(pages: usize) -> usize {
    pages * (PAGE + STAMP)
}

/// Offset of page `index`'s bytes in an export region.
pub fn page_offset(index: usize) -> usize {
    index * PAGE
}

/// Offset of page `index`'s stamp in an export region of `pages` pages.
pub fn stamp_offset(pages: usize, index: usize) -> usize {
    pages * PAGE + index * STAMP
}

/// The generation of a share word's open period (0 when the word says nothing).
pub fn word_generation(word: u64) -> u64 {
    (word >> GEN_SHIFT) & GEN_MASK
}

/// A 64-bit hash of a page's bytes and the generation they are published under (four
/// multiply-rotate lanes, as xxHash's; not cryptographic: it only has to tell a torn or
/// older copy from the published one).
pub fn page_hash(bytes: &[u8], generation: u64) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const P3: u64 = 0x1656_67B1_9E37_79F9;
    let mut lanes = [
        generation.wrapping_add(P1).wrapping_add(P2),
        generation.wrapping_add(P2),
        generation,
        generation.wrapping_sub(P1),
    ];
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            *lane = lane
                .wrapping_add(w.wrapping_mul(P2))
                .rotate_left(31)
                .wrapping_mul(P1);
        }
    }
    let mut h = lanes[0]
        .rotate_left(1)
        .wrapping_add(lanes[1].rotate_left(7))
        .wrapping_add(lanes[2].rotate_left(12))
        .wrapping_add(lanes[3].rotate_left(18));
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b).wrapping_mul(P3))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    h ^= bytes.len() as u64;
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// The stamp of `bytes` published under `generation`.
pub fn stamp(bytes: &[u8], generation: u64) -> [u8; STAMP] {
    let mut s = [0u8; STAMP];
    s[..8].copy_from_slice(&generation.to_le_bytes());
    s[8..].copy_from_slice(&page_hash(bytes, generation).to_le_bytes());
    s
}

/// Whether `slot` (a page and its stamp, as read, one after the other) is the copy published under the open
/// period of the share word value `word` (see the module doc): open, a generation, the
/// stamp naming it, and the hash matching the bytes.
pub fn slot_is_current(slot: &[u8], word: u64) -> bool {
    if slot.len() != EXPORT_STRIDE || word & SHARE_OPEN == 0 {
        return false;
    }
    let generation = word_generation(word);
    let (bytes, s) = slot.split_at(PAGE);
    let stamped = u64::from_le_bytes(s[..8].try_into().expect("8 bytes"));
    let hash = u64::from_le_bytes(s[8..].try_into().expect("8 bytes"));
    generation != 0 && stamped == generation && hash == page_hash(bytes, generation)
}

/// The generation after `last` (1 after 0 and after the largest: 0 is never used).
fn generation_after(last: u64) -> u64 {
    last % GEN_MASK + 1
}

/// Share words in the registered words regions. The owner opens and closes its words
/// through the fabric (a connection to itself), never with CPU atomics: a provider's remote
/// fetch-and-add (tcp and shm emulate it in software, a NIC has its own atomic unit) is
/// atomic only with other operations of the same provider.
pub struct RegisteredWords {
    pub(super) regions: Regions,
    pub(super) ep: std::sync::Arc<dyn Endpoint>,
    pub(super) me: NodeId,
    pub(super) this: PeerId,
    pub(super) open: BTreeSet<PageId>,
    /// The last generation each page was published under by this node.
    pub(super) generations: BTreeMap<PageId, u64>,
    pub(super) error: Option<String>,
}

impl RegisteredWords {
    fn target(&self, page: PageId) -> Option<(RemoteRegion, u64)> {
        let r = region_of(&self.regions, page)?;
        Some((r.remote_words[self.me as usize], r.index(page) as u64 * 8))
    }

    /// The generation the next publication of `page` uses (1..=2^31-1, then 1 again).
    pub(super) fn next_generation(&mut self, page: PageId) -> u64 {
        let g = self.generations.entry(page).or_insert(0);
        *g = generation_after(*g);
        *g
    }

    /// Opens the word of `page` under `generation`: no joined reader, open flag set (the
    /// slot must hold the copy stamped with `generation` already).
    pub(super) fn publish(&mut self, page: PageId, generation: u64) -> Result<()> {
        let (remote, offset) = self.target(page).ok_or_else(|| no_region(page))?;
        let open = SHARE_OPEN | (generation & GEN_MASK) << GEN_SHIFT;
        let mut old = self.ep.fetch_add(self.this, &remote, offset, 0)?;
        loop {
            let seen = self
                .ep
                .compare_swap(self.this, &remote, offset, old, open)?;
            if seen == old {
                break;
            }
            old = seen;
        }
        self.open.insert(page);
        Ok(())
    }

    /// The first error met while closing a word (closing cannot fail in the state machine).
    pub(super) fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }
}

impl ShareWords for RegisteredWords {
    fn close(&mut self, page: PageId) -> BTreeSet<NodeId> {
        if !self.open.remove(&page) {
            return Default::default();
        }
        let Some((remote, offset)) = self.target(page) else {
            return Default::default();
        };
        match self
            .ep
            .fetch_add(self.this, &remote, offset, SHARE_OPEN.wrapping_neg())
        {
            Ok(old) => joined_readers(old),
            Err(e) => {
                // Without the joined set, copies could be missed: every reader is
                // suspected (invalidating a node without a copy is harmless).
                self.error
                    .get_or_insert(format!("closing the share word of page {page}: {e}"));
                (0..SHARE_WORD_NODES).filter(|&n| n != self.me).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(bytes: &[u8], generation: u64) -> Vec<u8> {
        let mut s = bytes.to_vec();
        s.extend_from_slice(&stamp(bytes, generation));
        s
    }

    fn open(generation: u64) -> u64 {
        SHARE_OPEN | generation << GEN_SHIFT | 0b101
    }

    #[test]
    fn a_copy_stamped_with_the_open_generation_is_current() {
        let page: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        assert!(slot_is_current(&slot(&page, 5), open(5)));
        assert_eq!(word_generation(open(5)), 5);
        assert_eq!(joined_readers(open(5)), BTreeSet::from([0, 2]));
    }

    #[test]
    fn a_copy_of_an_older_generation_is_not_current_even_with_the_same_bytes() {
        let page = vec![3u8; PAGE];
        assert!(!slot_is_current(&slot(&page, 4), open(5)));
        assert!(!slot_is_current(&slot(&page, 6), open(5)));
    }

    #[test]
    fn a_closed_word_or_generation_zero_validates_nothing() {
        let page = vec![1u8; PAGE];
        assert!(!slot_is_current(&slot(&page, 5), open(5) & !SHARE_OPEN));
        // A slot never published: zeros, stamp (0, 0).
        assert!(!slot_is_current(&vec![0u8; EXPORT_STRIDE], SHARE_OPEN));
        assert!(!slot_is_current(&slot(&page, 0), SHARE_OPEN));
    }

    #[test]
    fn a_torn_copy_is_not_current() {
        // The read saw the new stamp but some of the old bytes (any mix of two versions).
        let old: Vec<u8> = (0..PAGE).map(|i| i as u8).collect();
        let new: Vec<u8> = (0..PAGE).map(|i| (i as u8).wrapping_add(1)).collect();
        for cut in [1, 8, 31, 32, 100, PAGE / 2, PAGE - 8, PAGE - 1] {
            let mut torn = new.clone();
            torn[..cut].copy_from_slice(&old[..cut]);
            assert!(
                !slot_is_current(&slot_with(&torn, &new, 9), open(9)),
                "cut {cut}"
            );
            let mut torn = old.clone();
            torn[..cut].copy_from_slice(&new[..cut]);
            assert!(
                !slot_is_current(&slot_with(&torn, &new, 9), open(9)),
                "cut {cut}"
            );
        }
        // One flipped bit anywhere.
        for bit in [0, 9, 4095 * 8, 2048 * 8 + 3] {
            let mut one = new.clone();
            one[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !slot_is_current(&slot_with(&one, &new, 9), open(9)),
                "bit {bit}"
            );
        }
    }

    /// `bytes` with the stamp of `stamped_bytes`.
    fn slot_with(bytes: &[u8], stamped_bytes: &[u8], generation: u64) -> Vec<u8> {
        let mut s = bytes.to_vec();
        s.extend_from_slice(&stamp(stamped_bytes, generation));
        s
    }

    #[test]
    fn generations_start_at_one_and_skip_zero_when_they_wrap() {
        assert_eq!(generation_after(0), 1);
        assert_eq!(generation_after(1), 2);
        assert_eq!(generation_after(GEN_MASK - 1), GEN_MASK);
        assert_eq!(generation_after(GEN_MASK), 1);
        // The largest generation fits the word's field and reads back.
        assert_eq!(word_generation(open(GEN_MASK)), GEN_MASK);
    }
}
