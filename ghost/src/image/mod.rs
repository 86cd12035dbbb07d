//! The ghost image format: what a capture produces, whichever checkpointer made it.
//!
//! ```text
//! image   := header section*
//! header  := magic "KRGHOST\0" (8) | version u16 | flags u16 | section_count u32
//!            | image_id u64 | parent_id u64 | header_crc u32          (36 bytes, little endian)
//! section := kind u16 | flags u16 | name_len u16 | reserved u16 | raw_len u64 | stored_len u64
//!            | payload_crc u32 | header_crc u32 | name (name_len bytes) | payload (stored_len)
//!            (header_crc covers the 28 bytes before it and the name)
//! ```
//! `header_crc` covers the bytes before it; `payload_crc` covers the stored payload (after
//! compression). A section flagged `ZSTD` holds a zstd frame of `raw_len` bytes. A `Region`
//! payload is the memory itself; an incremental image (`parent_id != 0`) holds `RegionDelta`
//! sections instead: a chunk bitmap followed by the changed chunks only, the rest being the
//! parent image's.
//!
//! A full image may hold a region as `RegionSparse` instead of `Region`: the region whole,
//! with its all-zero chunks left out as holes (the native checkpointer leaves out the chunks
//! never written since they were last known to be zero, e.g. the unused part of a large
//! region). Its payload has the delta's layout:
//!
//! ```text
//! sparse := bitmap (ceil(chunks / 8) bytes; bit c set: chunk c is stored)
//!           | the stored chunks, in order (each DELTA_CHUNK bytes, the last one shorter)
//! ```
//! `raw_len` is the region's length; a chunk whose bit is clear is all zero. Like `Region`,
//! it ends a chain: restoring it writes its stored chunks and zeroes the others (a chunk
//! that already reads as zero is not written, so fresh memory stays untouched). The payload
//! must be exactly the bitmap and the chunks it names: shorter or longer is corrupt.
use crate::error::{GhostError, Result};

pub const MAGIC: [u8; 8] = *b"KRGHOST\0";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 36;
pub(crate) const SECTION_HEADER_LEN: usize = 32;
/// Granularity of incremental images: a chunk is copied whole when any byte of it changed.
pub const DELTA_CHUNK: usize = 64 * 1024;

/// Section flag: the payload is a zstd frame.
pub const FLAG_ZSTD: u16 = 1;

/// What a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum SectionKind {
    /// `key=value` lines: backend, program, pid, step, creation time.
    Meta = 1,
    /// A registered memory region (native backend), whole.
    Region = 2,
    /// A registered memory region as a delta against the parent image.
    RegionDelta = 3,
    /// One file of a CRIU image directory, named by its file name.
    CriuFile = 4,
    /// A registered memory region, whole, with its all-zero chunks left out (see the module
    /// doc).
    RegionSparse = 5,
}

impl SectionKind {
    pub(crate) fn from_u16(v: u16) -> Option<SectionKind> {
        Some(match v {
            1 => SectionKind::Meta,
            2 => SectionKind::Region,
            3 => SectionKind::RegionDelta,
            4 => SectionKind::CriuFile,
            5 => SectionKind::RegionSparse,
            _ => return None,
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            SectionKind::Meta => "meta",
            SectionKind::Region => "region",
            SectionKind::RegionDelta => "region-delta",
            SectionKind::CriuFile => "criu-file",
            SectionKind::RegionSparse => "region-sparse",
        }
    }
}

pub(crate) fn corrupt(what: impl Into<String>, offset: usize) -> GhostError {
    GhostError::ImageCorrupt {
        what: what.into(),
        offset: offset as u64,
    }
}

/// Builds an image in one buffer. Large sections are reserved and filled in place so a
/// capture copies memory once, straight into the image.
pub struct ImageBuilder {
    buf: Storage,
    sections: Vec<PendingSection>,
    image_id: u64,
    parent_id: u64,
}

struct PendingSection {
    header_at: usize,
    payload_at: usize,
    payload_len: usize,
    /// The payload's crc32c, when its writer took it while filling it (see
    /// [`ImageBuilder::set_payload_crc`]); else [`ImageBuilder::seal`] reads the payload.
    crc: Option<u32>,
}

impl ImageBuilder {
    /// Starts an image. `parent_id` is the id of the image an incremental one builds on (0 for
    /// a full image). `buf` is reused (cleared) so callers can pool image buffers.
    pub fn new(image_id: u64, parent_id: u64, mut buf: Vec<u8>) -> ImageBuilder {
        buf.clear();
        buf.resize(HEADER_LEN, 0);
        ImageBuilder {
            buf: Storage::Owned(buf),
            sections: Vec::new(),
            image_id,
            parent_id,
        }
    }

    /// Builds the image in place in `capacity` bytes at `base` (e.g. a mapped L1 file), so
    /// that memory is copied once, straight to its final place. Seal it with [`Self::seal`].
    ///
    /// # Safety
    /// `base..base+capacity` must be writable, not accessed by anything else, and stay valid
    /// for the life of the builder.
    pub unsafe fn in_place(
        image_id: u64,
        parent_id: u64,
        base: *mut u8,
        capacity: usize,
    ) -> Result<ImageBuilder> {
        if capacity < HEADER_LEN {
            return Err(GhostError::Invalid(format!(
                "{capacity} bytes cannot hold an image header"
            )));
        }
        Ok(ImageBuilder {
            buf: Storage::Mapped {
                ptr: base,
                cap: capacity,
                len: HEADER_LEN,
            },
            sections: Vec::new(),
            image_id,
            parent_id,
        })
    }

    /// The encoded length of an image with sections of these (name length, stored length).
    pub fn planned_len(sections: &[(usize, usize)]) -> usize {
        HEADER_LEN
            + sections
                .iter()
                .map(|(name, stored)| SECTION_HEADER_LEN + name + stored)
                .sum::<usize>()
    }

    /// The stored length of a delta section for a region of `raw_len` bytes.
    pub fn delta_len(raw_len: usize, changed: &[bool]) -> usize {
        let chunks = raw_len.div_ceil(DELTA_CHUNK);
        chunks.div_ceil(8)
            + (0..chunks.min(changed.len()))
                .filter(|&c| changed[c])
                .map(|c| chunk_len(raw_len, c))
                .sum::<usize>()
    }

    /// Adds a section, compressing it with zstd (level 1) when `compress` is set.
    pub fn add(
        &mut self,
        kind: SectionKind,
        name: &str,
        data: &[u8],
        compress: bool,
    ) -> Result<()> {
        if compress {
            let packed = zstd::bulk::compress(data, 1).map_err(|e| GhostError::Io {
                path: name.into(),
                what: "zstd compression".into(),
                source: e,
            })?;
            let slot = self.push_header(kind, name, FLAG_ZSTD, data.len(), packed.len())?;
            self.buf[slot..slot + packed.len()].copy_from_slice(&packed);
        } else {
            let slot = self.push_header(kind, name, 0, data.len(), data.len())?;
            self.buf[slot..slot + data.len()].copy_from_slice(data);
        }
        Ok(())
    }

    /// Reserves an uncompressed section of `len` bytes and returns it for the caller to fill.
    pub fn reserve(&mut self, kind: SectionKind, name: &str, len: usize) -> Result<&mut [u8]> {
        let slot = self.push_header(kind, name, 0, len, len)?;
        Ok(&mut self.buf[slot..slot + len])
    }

    /// Reserves a region section as a delta against the parent image and returns the payload
    /// offset of its first changed chunk; changed chunk `k` (in order) goes at
    /// `offset + k * DELTA_CHUNK`. Pair with [`ImageBuilder::base_ptr`] to fill it.
    pub fn reserve_delta(&mut self, name: &str, raw_len: usize, changed: &[bool]) -> Result<usize> {
        self.reserve_chunks(SectionKind::RegionDelta, name, raw_len, changed)
    }

    /// Reserves a region section of a full image with the chunks not flagged in `stored` left
    /// out as holes (they are all zero: see the module doc) and returns the payload offset of
    /// its first stored chunk; stored chunk `k` (in order) goes at `offset + k * DELTA_CHUNK`.
    pub fn reserve_sparse(&mut self, name: &str, raw_len: usize, stored: &[bool]) -> Result<usize> {
        self.reserve_chunks(SectionKind::RegionSparse, name, raw_len, stored)
    }

    /// Adds a region whole, its all-zero chunks left out as holes.
    pub fn add_sparse(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let stored: Vec<bool> = data.chunks(DELTA_CHUNK).map(|c| !is_zero(c)).collect();
        let mut at = self.reserve_sparse(name, data.len(), &stored)?;
        for (c, chunk) in data.chunks(DELTA_CHUNK).enumerate() {
            if stored[c] {
                self.buf[at..at + chunk.len()].copy_from_slice(chunk);
                at += chunk.len();
            }
        }
        Ok(())
    }

    fn reserve_chunks(
        &mut self,
        kind: SectionKind,
        name: &str,
        raw_len: usize,
        changed: &[bool],
    ) -> Result<usize> {
        let chunks = raw_len.div_ceil(DELTA_CHUNK);
        if changed.len() != chunks {
            return Err(GhostError::Invalid(format!(
                "region {name}: {} chunk flags for {chunks} chunks",
                changed.len()
            )));
        }
        let bitmap_len = chunks.div_ceil(8);
        let payload: usize = bitmap_len
            + (0..chunks)
                .filter(|&c| changed[c])
                .map(|c| chunk_len(raw_len, c))
                .sum::<usize>();
        let slot = self.push_header(kind, name, 0, raw_len, payload)?;
        let bitmap = &mut self.buf[slot..slot + bitmap_len];
        bitmap.fill(0);
        for c in (0..chunks).filter(|&c| changed[c]) {
            bitmap[c / 8] |= 1 << (c % 8);
        }
        Ok(slot + bitmap_len)
    }

    /// Reserves an uncompressed section of `len` bytes and returns its payload offset.
    pub fn reserve_offset(&mut self, kind: SectionKind, name: &str, len: usize) -> Result<usize> {
        self.push_header(kind, name, 0, len, len)
    }

    /// The start of the image buffer; valid until the next call that adds a section. Lets
    /// several threads fill disjoint reserved ranges in place.
    pub fn base_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr()
    }

    /// Adds a region as a delta against the parent image: only chunks whose `changed` flag is
    /// set are copied.
    pub fn add_delta(&mut self, name: &str, data: &[u8], changed: &[bool]) -> Result<()> {
        let mut at = self.reserve_delta(name, data.len(), changed)?;
        for (c, _) in changed.iter().enumerate().filter(|(_, &ch)| ch) {
            let start = c * DELTA_CHUNK;
            let len = chunk_len(data.len(), c);
            self.buf[at..at + len].copy_from_slice(&data[start..start + len]);
            at += len;
        }
        Ok(())
    }

    fn push_header(
        &mut self,
        kind: SectionKind,
        name: &str,
        flags: u16,
        raw_len: usize,
        stored_len: usize,
    ) -> Result<usize> {
        let name_len = u16::try_from(name.len())
            .map_err(|_| GhostError::Invalid(format!("section name of {} bytes", name.len())))?;
        let header_at = self.buf.len();
        let mut h = Vec::with_capacity(SECTION_HEADER_LEN);
        h.extend_from_slice(&(kind as u16).to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&name_len.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&(raw_len as u64).to_le_bytes());
        h.extend_from_slice(&(stored_len as u64).to_le_bytes());
        h.extend_from_slice(&[0u8; 8]); // crcs, filled by finish()
        let at = self.buf.extend(h.len() + name.len())?;
        self.buf[at..at + h.len()].copy_from_slice(&h);
        self.buf[at + h.len()..at + h.len() + name.len()].copy_from_slice(name.as_bytes());
        let payload_at = self.buf.extend(stored_len)?;
        self.sections.push(PendingSection {
            header_at,
            payload_at,
            payload_len: stored_len,
            crc: None,
        });
        Ok(payload_at)
    }

    /// Gives the crc32c of the payload of the section whose payload starts at `payload_at`
    /// (as returned by [`ImageBuilder::reserve_offset`]), taken by whoever filled it, so that
    /// [`ImageBuilder::seal`] does not read the payload again. A wrong crc makes the image
    /// fail its checks when it is read, like any corruption.
    pub fn set_payload_crc(&mut self, payload_at: usize, crc: u32) -> Result<()> {
        let s = self
            .sections
            .iter_mut()
            .find(|s| s.payload_at == payload_at)
            .ok_or_else(|| {
                GhostError::Invalid(format!("no section's payload starts at {payload_at}"))
            })?;
        s.crc = Some(crc);
        Ok(())
    }

    /// Computes every checksum and returns the encoded image (empty when built in place:
    /// use [`Self::seal`] there).
    pub fn finish(mut self) -> Vec<u8> {
        self.seal();
        match std::mem::replace(&mut self.buf, Storage::Owned(Vec::new())) {
            Storage::Owned(v) => v,
            Storage::Mapped { .. } => Vec::new(),
        }
    }

    /// Computes every checksum and returns the image's length.
    pub fn seal(&mut self) -> usize {
        for s in &self.sections {
            let crc = s.crc.unwrap_or_else(|| {
                crc32c::crc32c(&self.buf[s.payload_at..s.payload_at + s.payload_len])
            });
            self.buf[s.header_at + 24..s.header_at + 28].copy_from_slice(&crc.to_le_bytes());
            let hcrc = crc32c::crc32c_append(
                crc32c::crc32c(&self.buf[s.header_at..s.header_at + 28]),
                &self.buf[s.header_at + SECTION_HEADER_LEN..s.payload_at],
            );
            self.buf[s.header_at + 28..s.header_at + 32].copy_from_slice(&hcrc.to_le_bytes());
        }
        let mut h = Vec::with_capacity(HEADER_LEN);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let flags: u16 = if self.parent_id != 0 { 1 } else { 0 };
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        h.extend_from_slice(&self.image_id.to_le_bytes());
        h.extend_from_slice(&self.parent_id.to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        self.buf[..HEADER_LEN].copy_from_slice(&h);
        self.buf.len()
    }
}

/// An image buffer: owned, or borrowed memory (a mapped file) filled in place.
enum Storage {
    Owned(Vec<u8>),
    Mapped {
        ptr: *mut u8,
        cap: usize,
        len: usize,
    },
}

// SAFETY: the mapped memory is exclusively the builder's (contract of `in_place`).
unsafe impl Send for Storage {}

impl Storage {
    /// Grows by `n` bytes and returns the old length.
    fn extend(&mut self, n: usize) -> Result<usize> {
        match self {
            Storage::Owned(v) => {
                let at = v.len();
                v.resize(at + n, 0);
                Ok(at)
            }
            Storage::Mapped { cap, len, .. } => {
                let at = *len;
                if at + n > *cap {
                    return Err(GhostError::Invalid(format!(
                        "image outgrows its buffer: {} of {cap} bytes",
                        at + n
                    )));
                }
                *len += n;
                Ok(at)
            }
        }
    }
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Owned(v) => v,
            // SAFETY: `ptr..ptr+len` is within the memory `in_place` was given.
            Storage::Mapped { ptr, len, .. } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
        }
    }
}

impl std::ops::DerefMut for Storage {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::Owned(v) => v,
            // SAFETY: as for Deref; the builder holds the memory exclusively.
            Storage::Mapped { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(*ptr, *len)
            },
        }
    }
}

/// Whether every byte is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bytes are valid u64s; align_to only splits at aligned boundaries.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

pub(crate) fn chunk_len(total: usize, chunk: usize) -> usize {
    DELTA_CHUNK.min(total - chunk * DELTA_CHUNK)
}

pub mod crc;
mod read;
pub use read::{materialize_region, Header, Image, Section};

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = ImageBuilder::new(7, 0, Vec::new());
        b.add(
            SectionKind::Meta,
            "meta",
            b"backend=native\nstep=3\n",
            false,
        )
        .unwrap();
        let region: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        b.reserve(SectionKind::Region, "data", region.len())
            .unwrap()
            .copy_from_slice(&region);
        b.add(SectionKind::CriuFile, "pages-1.img", &region[..5000], true)
            .unwrap();
        b.finish()
    }

    /// The header alone gives the chain's ids from the first bytes, and each of its checks
    /// fails on its own input: magic, truncation, checksum, version.
    #[test]
    fn the_header_alone_names_the_ids_and_each_check_fails_on_its_own() {
        let mut b = ImageBuilder::new(9, 4, Vec::new());
        b.add(SectionKind::Meta, "meta", b"backend=native\n", false)
            .unwrap();
        let img = b.finish();
        let h = Header::parse(&img[..HEADER_LEN]).unwrap();
        assert_eq!((h.image_id, h.parent_id, h.sections), (9, 4, 1));
        assert_eq!(Header::parse(&img).unwrap(), h);
        let e = Header::parse(&img[..HEADER_LEN - 1]).unwrap_err();
        assert!(matches!(e, GhostError::ImageTruncated { .. }), "{e}");
        let mut bad = img.clone();
        bad[0] = b'X';
        let e = Header::parse(&bad).unwrap_err();
        assert!(matches!(e, GhostError::ImageBadMagic { .. }), "{e}");
        let mut bad = img.clone();
        bad[20] ^= 1; // inside the image id: the header checksum no longer matches
        let e = Header::parse(&bad).unwrap_err();
        assert!(matches!(e, GhostError::ImageChecksum { .. }), "{e}");
        let mut bad = img.clone();
        bad[8] = bad[8].wrapping_add(1);
        let crc = crc32c::crc32c(&bad[..32]);
        bad[32..36].copy_from_slice(&crc.to_le_bytes());
        let e = Header::parse(&bad).unwrap_err();
        assert!(matches!(e, GhostError::ImageVersion { .. }), "{e}");
    }

    #[test]
    fn a_crafted_length_does_not_make_decompression_allocate_it() {
        let packed = zstd::bulk::compress(&[7u8; 1000], 1).unwrap();
        for raw_len in [1u64 << 50, u64::MAX, 999, 1001] {
            let s = Section {
                index: 0,
                kind: SectionKind::CriuFile,
                name: "x",
                compressed: true,
                raw_len,
                offset: 0,
                stored: &packed,
            };
            let e = s.data().unwrap_err().to_string();
            assert!(
                e.contains("decompresses to") || e.contains("decompress"),
                "{e}"
            );
        }
        let s = Section {
            index: 0,
            kind: SectionKind::CriuFile,
            name: "x",
            compressed: true,
            raw_len: 1000,
            offset: 0,
            stored: &packed,
        };
        assert_eq!(s.data().unwrap().len(), 1000);
    }

    #[test]
    fn round_trip_with_compression() {
        let bytes = sample();
        let img = Image::parse(&bytes).unwrap();
        assert_eq!(img.image_id, 7);
        assert_eq!(img.sections.len(), 3);
        assert_eq!(img.meta_value("step").as_deref(), Some("3"));
        let pages = img.sections[2].data().unwrap();
        assert!(img.sections[2].compressed);
        assert_eq!(pages.len(), 5000);
        assert_eq!(pages[251], 0);
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = sample();
        // Flip one bit at a spread of offsets covering headers, names and payloads.
        for at in (0..bytes.len()).step_by(997).chain([0, 9, 20, 40, 70]) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(Image::parse(&bad).is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn errors_say_which_check_failed() {
        let bytes = sample();
        let mut bad = bytes.clone();
        bad[HEADER_LEN + SECTION_HEADER_LEN + 4 + 10] ^= 1; // inside the meta payload
        let e = Image::parse(&bad).unwrap_err().to_string();
        assert!(e.contains("payload of section 0"), "{e}");

        let e = Image::parse(&bytes[..bytes.len() - 10]).unwrap_err();
        assert!(matches!(e, GhostError::ImageTruncated { .. }), "{e}");

        let mut v2 = bytes.clone();
        v2[8] = 2;
        let crc = crc32c::crc32c(&v2[..32]);
        v2[32..36].copy_from_slice(&crc.to_le_bytes());
        let e = Image::parse(&v2).unwrap_err();
        assert!(
            matches!(
                e,
                GhostError::ImageVersion {
                    found: 2,
                    supported: 1
                }
            ),
            "{e}"
        );

        let e = Image::parse(b"ELF\x7fxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx").unwrap_err();
        assert!(matches!(e, GhostError::ImageBadMagic { .. }), "{e}");
    }

    #[test]
    fn incremental_chain_rebuilds_the_region() {
        let len = DELTA_CHUNK * 5 + 123;
        let v1: Vec<u8> = (0..len).map(|i| (i % 13) as u8).collect();
        let mut b = ImageBuilder::new(1, 0, Vec::new());
        b.reserve(SectionKind::Region, "r", len)
            .unwrap()
            .copy_from_slice(&v1);
        let full = b.finish();

        let mut v2 = v1.clone();
        v2[DELTA_CHUNK * 2 + 5] = 99;
        v2[len - 1] = 77;
        let changed: Vec<bool> = (0..6).map(|c| c == 2 || c == 5).collect();
        let mut b = ImageBuilder::new(2, 1, Vec::new());
        b.add_delta("r", &v2, &changed).unwrap();
        let delta = b.finish();
        assert!(
            delta.len() < full.len() / 2,
            "delta {} vs full {}",
            delta.len(),
            full.len()
        );

        let chain = [Image::parse(&delta).unwrap(), Image::parse(&full).unwrap()];
        let mut out = vec![0u8; len];
        materialize_region(&chain, "r", &mut out).unwrap();
        assert_eq!(out, v2);

        // A chain that lacks its full image is refused.
        let e = materialize_region(&chain[..1], "r", &mut out).unwrap_err();
        assert!(e.to_string().contains("without a full image"), "{e}");
    }

    #[test]
    fn a_sparse_region_stores_its_non_zero_chunks_only_and_restores_the_zeros() {
        // Chunks 0 and 3 hold data, 1, 2 and 4 (the short last one) are zero.
        let len = DELTA_CHUNK * 4 + 4096;
        let mut v1 = vec![0u8; len];
        v1[17] = 1;
        v1[DELTA_CHUNK * 3 + 9] = 2;
        let mut b = ImageBuilder::new(1, 0, Vec::new());
        b.add_sparse("r", &v1).unwrap();
        let full = b.finish();
        let stored = 1 + 2 * DELTA_CHUNK; // the bitmap and two chunks
        assert_eq!(
            full.len(),
            ImageBuilder::planned_len(&[(1, stored)]),
            "holes take no room"
        );
        let img = Image::parse(&full).unwrap();
        let s = img.region("r").unwrap();
        assert_eq!((s.kind, s.raw_len), (SectionKind::RegionSparse, len as u64));
        assert_eq!(s.stored()[0], 0b1001, "the bitmap names chunks 0 and 3");

        // Restoring writes the zeros too: memory that held something else reads as v1.
        let mut out = vec![0xAAu8; len];
        materialize_region(std::slice::from_ref(&img), "r", &mut out).unwrap();
        assert_eq!(out, v1);

        // As the base of an incremental chain: the delta's chunks win, holes stay zero.
        let mut v2 = v1.clone();
        v2[DELTA_CHUNK + 1] = 3;
        let changed: Vec<bool> = (0..5).map(|c| c == 1).collect();
        let mut b = ImageBuilder::new(2, 1, Vec::new());
        b.add_delta("r", &v2, &changed).unwrap();
        let delta = b.finish();
        let chain = [Image::parse(&delta).unwrap(), img];
        let mut out = vec![0x55u8; len];
        materialize_region(&chain, "r", &mut out).unwrap();
        assert_eq!(out, v2);

        // A region without a zero chunk stores every chunk.
        let mut b = ImageBuilder::new(3, 0, Vec::new());
        b.add_sparse("r", &vec![7u8; len]).unwrap();
        assert_eq!(b.finish().len(), ImageBuilder::planned_len(&[(1, 1 + len)]));
    }

    #[test]
    fn a_sparse_region_whose_payload_disagrees_with_its_bitmap_is_refused() {
        let len = DELTA_CHUNK * 2;
        // A sparse section built by hand: `bitmap` then `chunks` stored bytes.
        let image = |bitmap: u8, stored: usize| {
            let mut b = ImageBuilder::new(1, 0, Vec::new());
            let mut payload = vec![bitmap];
            payload.resize(1 + stored, 9);
            let slot = b
                .push_header(SectionKind::RegionSparse, "r", 0, len, payload.len())
                .unwrap();
            b.buf[slot..slot + payload.len()].copy_from_slice(&payload);
            b.finish()
        };
        let mut out = vec![0u8; len];
        // The bitmap names two chunks, the payload holds one and a half.
        let bytes = image(0b11, DELTA_CHUNK + DELTA_CHUNK / 2);
        let img = Image::parse(&bytes).unwrap();
        let e = materialize_region(std::slice::from_ref(&img), "r", &mut out).unwrap_err();
        assert!(e.to_string().contains("ends inside chunk 1"), "{e}");
        // The bitmap names one chunk, the payload holds more.
        let bytes = image(0b01, DELTA_CHUNK + 5);
        let img = Image::parse(&bytes).unwrap();
        let e = materialize_region(std::slice::from_ref(&img), "r", &mut out).unwrap_err();
        assert!(e.to_string().contains("5 bytes after the chunks"), "{e}");
        // No room even for the bitmap.
        let mut b = ImageBuilder::new(1, 0, Vec::new());
        b.push_header(SectionKind::RegionSparse, "r", 0, len, 0)
            .unwrap();
        let bytes = b.finish();
        let img = Image::parse(&bytes).unwrap();
        let e = materialize_region(std::slice::from_ref(&img), "r", &mut out).unwrap_err();
        assert!(e.to_string().contains("shorter than its bitmap"), "{e}");
        // A reader of an older format sees an unknown kind, not a region: the kind's number
        // is the format's.
        assert_eq!(SectionKind::from_u16(5), Some(SectionKind::RegionSparse));
        assert_eq!(SectionKind::from_u16(6), None);
    }
}
