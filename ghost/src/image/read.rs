//! Reading images: parsing and verifying one, and rebuilding a region from a chain of them
//! (the format is in the parent module's doc).
use super::{
    chunk_len, corrupt, is_zero, SectionKind, DELTA_CHUNK, FLAG_ZSTD, FORMAT_VERSION, HEADER_LEN,
    MAGIC, SECTION_HEADER_LEN,
};
use crate::error::{GhostError, Result};

/// One verified section of a parsed image.
#[derive(Clone, Debug)]
pub struct Section<'a> {
    pub index: usize,
    pub kind: SectionKind,
    pub name: &'a str,
    pub compressed: bool,
    pub raw_len: u64,
    /// Offset of the payload in the image file.
    pub offset: u64,
    pub(crate) stored: &'a [u8],
}

impl<'a> Section<'a> {
    /// The payload as stored (compressed if `compressed`).
    pub fn stored(&self) -> &'a [u8] {
        self.stored
    }

    /// The raw payload, decompressing if needed.
    pub fn data(&self) -> Result<std::borrow::Cow<'a, [u8]>> {
        if !self.compressed {
            return Ok(std::borrow::Cow::Borrowed(self.stored));
        }
        // Grow the output only as the frame really produces bytes, and never past the
        // header's length plus one: a crafted `raw_len` (or frame content size) cannot make
        // the reader allocate more than the data it actually decompresses.
        let undecodable = |e: std::io::Error| {
            corrupt(
                format!(
                    "section {} '{}' does not decompress: {e}",
                    self.index, self.name
                ),
                self.offset as usize,
            )
        };
        let mut raw = Vec::new();
        {
            use std::io::Read;
            zstd::stream::read::Decoder::with_buffer(self.stored)
                .map_err(undecodable)?
                .take(self.raw_len.saturating_add(1))
                .read_to_end(&mut raw)
                .map_err(undecodable)?;
        }
        if raw.len() as u64 != self.raw_len {
            return Err(corrupt(
                format!(
                    "section {} '{}' decompresses to {} bytes, header says {}",
                    self.index,
                    self.name,
                    raw.len(),
                    self.raw_len
                ),
                self.offset as usize,
            ));
        }
        Ok(std::borrow::Cow::Owned(raw))
    }
}

/// A parsed image whose header and every section checksum have been verified.
#[derive(Clone, Debug)]
pub struct Image<'a> {
    pub version: u16,
    pub image_id: u64,
    pub parent_id: u64,
    pub sections: Vec<Section<'a>>,
    pub total_len: u64,
}

fn read_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// An image's header alone (magic, format version, header checksum): what a reader needs to
/// follow a chain of images (`image_id`, `parent_id`) without reading their sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub sections: usize,
    pub image_id: u64,
    pub parent_id: u64,
}

impl Header {
    /// Parses and verifies the first [`HEADER_LEN`] bytes of an image (more may follow).
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        let total = bytes.len();
        if total < 8 || bytes[..8] != MAGIC {
            let found = &bytes[..total.min(8)];
            return Err(GhostError::ImageBadMagic {
                found: String::from_utf8_lossy(found).escape_default().to_string(),
            });
        }
        if total < HEADER_LEN {
            return Err(GhostError::ImageTruncated {
                what: "image header".into(),
                offset: 0,
                needed: HEADER_LEN as u64,
                available: total as u64,
            });
        }
        let version = read_u16(bytes, 8);
        let header_crc = read_u32(bytes, 32);
        let computed = crc32c::crc32c(&bytes[..32]);
        if header_crc != computed {
            return Err(GhostError::ImageChecksum {
                what: "image header".into(),
                offset: 0,
                stored: header_crc,
                computed,
            });
        }
        if version != FORMAT_VERSION {
            return Err(GhostError::ImageVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(Header {
            version,
            sections: read_u32(bytes, 12) as usize,
            image_id: read_u64(bytes, 16),
            parent_id: read_u64(bytes, 24),
        })
    }
}

impl<'a> Image<'a> {
    /// Parses and verifies an image: magic, version, header checksum, then each section's
    /// header and payload checksums. Errors say which check failed and at which offset.
    pub fn parse(bytes: &'a [u8]) -> Result<Image<'a>> {
        Image::parse_checking(bytes, true)
    }

    /// As [`Image::parse`], every check but the payload checksums: for bytes this process
    /// verified with [`Image::parse`] already (a restore's chain, verified when it was
    /// loaded), so that a 1 GiB payload is not read through a second time.
    pub fn parse_verified(bytes: &'a [u8]) -> Result<Image<'a>> {
        Image::parse_checking(bytes, false)
    }

    fn parse_checking(bytes: &'a [u8], payloads: bool) -> Result<Image<'a>> {
        let total = bytes.len();
        let head = Header::parse(bytes)?;
        let (version, count, image_id, parent_id) =
            (head.version, head.sections, head.image_id, head.parent_id);
        let mut sections = Vec::with_capacity(count.min(4096));
        let mut at = HEADER_LEN;
        for index in 0..count {
            if total - at < SECTION_HEADER_LEN {
                return Err(GhostError::ImageTruncated {
                    what: format!("header of section {index}"),
                    offset: at as u64,
                    needed: SECTION_HEADER_LEN as u64,
                    available: (total - at) as u64,
                });
            }
            let h = &bytes[at..at + SECTION_HEADER_LEN];
            let name_len = read_u16(h, 4) as usize;
            let name_at = at + SECTION_HEADER_LEN;
            let payload_at = name_at + name_len;
            if payload_at > total {
                return Err(GhostError::ImageTruncated {
                    what: format!("name of section {index}"),
                    offset: name_at as u64,
                    needed: name_len as u64,
                    available: (total - name_at) as u64,
                });
            }
            let stored_hcrc = read_u32(h, 28);
            let hcrc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), &bytes[name_at..payload_at]);
            if stored_hcrc != hcrc {
                return Err(GhostError::ImageChecksum {
                    what: format!("header of section {index}"),
                    offset: at as u64,
                    stored: stored_hcrc,
                    computed: hcrc,
                });
            }
            let kind_raw = read_u16(h, 0);
            let kind = SectionKind::from_u16(kind_raw).ok_or_else(|| {
                corrupt(format!("section {index} has unknown kind {kind_raw}"), at)
            })?;
            let flags = read_u16(h, 2);
            let raw_len = read_u64(h, 8);
            let stored_len = read_u64(h, 16);
            let payload_crc = read_u32(h, 24);
            let end = (payload_at as u64).checked_add(stored_len);
            match end {
                Some(end) if end <= total as u64 => {}
                _ => {
                    return Err(GhostError::ImageTruncated {
                        what: format!("payload of section {index}"),
                        offset: payload_at.min(total) as u64,
                        needed: stored_len + name_len as u64,
                        available: total.saturating_sub(name_at) as u64,
                    })
                }
            }
            let name = std::str::from_utf8(&bytes[name_at..payload_at])
                .map_err(|_| corrupt(format!("section {index} name is not UTF-8"), name_at))?;
            let stored = &bytes[payload_at..payload_at + stored_len as usize];
            let crc = if payloads {
                crc32c::crc32c(stored)
            } else {
                payload_crc
            };
            if crc != payload_crc {
                return Err(GhostError::ImageChecksum {
                    what: format!("payload of section {index} ({} '{name}')", kind.label()),
                    offset: payload_at as u64,
                    stored: payload_crc,
                    computed: crc,
                });
            }
            let compressed = flags & FLAG_ZSTD != 0;
            let chunked = matches!(kind, SectionKind::RegionDelta | SectionKind::RegionSparse);
            if !compressed && !chunked && raw_len != stored_len {
                return Err(corrupt(
                    format!("section {index} '{name}' is uncompressed but raw {raw_len} != stored {stored_len}"),
                    at,
                ));
            }
            sections.push(Section {
                index,
                kind,
                name,
                compressed,
                raw_len,
                offset: payload_at as u64,
                stored,
            });
            at = payload_at + stored_len as usize;
        }
        if at != total {
            return Err(corrupt(
                format!("{} trailing bytes after the last section", total - at),
                at,
            ));
        }
        Ok(Image {
            version,
            image_id,
            parent_id,
            sections,
            total_len: total as u64,
        })
    }

    /// The `key=value` pairs of the meta section(s).
    pub fn meta(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for s in self.sections.iter().filter(|s| s.kind == SectionKind::Meta) {
            if let Ok(data) = s.data() {
                for line in String::from_utf8_lossy(&data).lines() {
                    if let Some((k, v)) = line.split_once('=') {
                        out.push((k.to_string(), v.to_string()));
                    }
                }
            }
        }
        out
    }

    /// One meta value.
    pub fn meta_value(&self, key: &str) -> Option<String> {
        self.meta()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    pub fn is_incremental(&self) -> bool {
        self.parent_id != 0
    }

    /// The section named `name` of kind Region or RegionDelta.
    pub fn region(&self, name: &str) -> Option<&Section<'a>> {
        self.sections.iter().find(|s| {
            s.name == name
                && matches!(
                    s.kind,
                    SectionKind::Region | SectionKind::RegionDelta | SectionKind::RegionSparse
                )
        })
    }
}

/// Writes a region's content as of `images` (newest first: an incremental image followed by
/// its ancestors down to a full one) into `out`.
pub fn materialize_region(images: &[Image<'_>], name: &str, out: &mut [u8]) -> Result<()> {
    let mut filled = vec![false; out.len().div_ceil(DELTA_CHUNK)];
    let mut remaining = filled.len();
    for (depth, image) in images.iter().enumerate() {
        if depth > 0 && images[depth - 1].parent_id != image.image_id {
            return Err(GhostError::Invalid(format!(
                "image {:#x} is not the parent {:#x} of the image before it",
                image.image_id,
                images[depth - 1].parent_id
            )));
        }
        let Some(section) = image.region(name) else {
            return Err(GhostError::Invalid(format!(
                "image {:#x} has no region '{name}'",
                image.image_id
            )));
        };
        if section.raw_len as usize != out.len() {
            return Err(GhostError::Invalid(format!(
                "region '{name}' is {} bytes in image {:#x}, {} expected",
                section.raw_len,
                image.image_id,
                out.len()
            )));
        }
        let data = section.data()?;
        match section.kind {
            SectionKind::Region => {
                for (c, done) in filled.iter().enumerate() {
                    if !done {
                        let start = c * DELTA_CHUNK;
                        let len = chunk_len(out.len(), c);
                        out[start..start + len].copy_from_slice(&data[start..start + len]);
                    }
                }
                return Ok(());
            }
            SectionKind::RegionSparse => {
                return fill_sparse(&data, name, section.offset as usize, &filled, out);
            }
            SectionKind::RegionDelta => {
                let bitmap_len = filled.len().div_ceil(8);
                if data.len() < bitmap_len {
                    return Err(corrupt(
                        format!("delta of region '{name}' shorter than its bitmap"),
                        section.offset as usize,
                    ));
                }
                let mut at = bitmap_len;
                for c in 0..filled.len() {
                    if data[c / 8] & (1 << (c % 8)) != 0 {
                        let len = chunk_len(out.len(), c);
                        if at + len > data.len() {
                            return Err(corrupt(
                                format!("delta of region '{name}' ends inside chunk {c}"),
                                section.offset as usize + at,
                            ));
                        }
                        if !filled[c] {
                            let start = c * DELTA_CHUNK;
                            out[start..start + len].copy_from_slice(&data[at..at + len]);
                            filled[c] = true;
                            remaining -= 1;
                        }
                        at += len;
                    }
                }
                if remaining == 0 {
                    return Ok(());
                }
            }
            _ => unreachable!("region() returns region sections only"),
        }
    }
    Err(GhostError::Invalid(format!(
        "region '{name}': the chain of {} image(s) ends without a full image",
        images.len()
    )))
}

/// Writes the chunks of `out` not yet `filled` from a sparse region's payload `data`: its
/// stored chunks, zeros for its holes (not written where `out` reads as zero already).
fn fill_sparse(
    data: &[u8],
    name: &str,
    offset: usize,
    filled: &[bool],
    out: &mut [u8],
) -> Result<()> {
    let bitmap_len = filled.len().div_ceil(8);
    if data.len() < bitmap_len {
        return Err(corrupt(
            format!("sparse region '{name}' shorter than its bitmap"),
            offset,
        ));
    }
    let mut at = bitmap_len;
    for (c, &done) in filled.iter().enumerate() {
        let start = c * DELTA_CHUNK;
        let len = chunk_len(out.len(), c);
        let dest = &mut out[start..start + len];
        if data[c / 8] & (1 << (c % 8)) != 0 {
            if at + len > data.len() {
                return Err(corrupt(
                    format!("sparse region '{name}' ends inside chunk {c}"),
                    offset + at,
                ));
            }
            if !done {
                dest.copy_from_slice(&data[at..at + len]);
            }
            at += len;
        } else if !done && !is_zero(dest) {
            dest.fill(0);
        }
    }
    if at != data.len() {
        return Err(corrupt(
            format!(
                "sparse region '{name}' has {} bytes after the chunks its bitmap names",
                data.len() - at
            ),
            offset + at,
        ));
    }
    Ok(())
}
