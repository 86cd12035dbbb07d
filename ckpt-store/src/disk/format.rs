//! The on-disk format of an L4 image.
//!
//! # On-disk format (version 2, all integers little endian)
//!
//! ```text
//! file   := header block (4096) | payload, zero-padded to 4096 | crc table, zero-padded to 4096
//!
//! header block (4096 bytes; bytes 0..16 keep their meaning in every format version):
//!   0   8  magic "KRCKDSK\0"
//!   8   2  format version (2)
//!  10   2  flags (0; a reader rejects flags it does not know)
//!  12   4  header crc32c: over all 4096 bytes of the block with these 4 bytes zero
//!  16   8  checkpoint version
//!  24   8  payload length in bytes
//!  32   4  crc32c of the whole payload
//!  36   4  block size (4096): the alignment and the checksum granularity
//!  40   8  table offset   = 4096 + round_up(payload length, 4096)
//!  48   8  table length   = 4 * ceil(payload length / 4096)
//!  56   4  crc32c of the table (its table-length bytes)
//!  60   4  owner length n (1..=255)
//!  64   8  file length    = table offset + round_up(table length, 4096)
//!  72   n  owner (UTF-8)
//!  72+n    zero up to 4096
//!
//! crc table := one u32 crc32c per 4096-byte block of the payload (the last block may be short)
//! ```
//!
//! A reader checks, in this order, and fails with a distinct error naming the file and where:
//! length >= 4096 ([`StoreError::Truncated`]), magic ([`StoreError::BadMagic`]), header crc
//! ([`StoreError::HeaderChecksum`]), format version ([`StoreError::Version`]), flags, owner,
//! version and layout fields ([`StoreError::Corrupt`] with the field's offset), file length
//! ([`StoreError::Truncated`]), table crc ([`StoreError::Corrupt`] at the table offset), the
//! whole-payload crc against the table, then every block ([`StoreError::PayloadChecksum`] with
//! the offset of the first bad 4 KiB block).
use super::*;

/// The first 8 bytes of every image.
pub const MAGIC: [u8; 8] = *b"KRCKDSK\0";
/// The format version this build writes and reads.
pub const FORMAT: u16 = 2;
/// Alignment of every I/O and granularity of the checksum table.
pub const BLOCK: usize = 4096;
/// Size of the header block.
pub const HEADER_LEN: usize = BLOCK;
/// Longest owner name.
pub const MAX_OWNER: usize = 255;

/// Header field offsets (see the module documentation).
pub mod field {
    pub const FORMAT: usize = 8;
    pub const FLAGS: usize = 10;
    pub const HEADER_CRC: usize = 12;
    pub const VERSION: usize = 16;
    pub const PAYLOAD_LEN: usize = 24;
    pub const PAYLOAD_CRC: usize = 32;
    pub const BLOCK_SIZE: usize = 36;
    pub const TABLE_OFFSET: usize = 40;
    pub const TABLE_LEN: usize = 48;
    pub const TABLE_CRC: usize = 56;
    pub const OWNER_LEN: usize = 60;
    pub const FILE_LEN: usize = 64;
    pub const OWNER: usize = 72;
}

/// The decoded header of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub owner: String,
    pub version: u64,
    pub payload_len: u64,
    pub payload_crc: u32,
    pub table_offset: u64,
    pub table_len: u64,
    pub table_crc: u32,
    pub file_len: u64,
}

pub(super) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// The crc32c of a 4096-byte header block, computed with its crc field as zero.
pub fn header_crc(block: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&block[..field::HEADER_CRC]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &block[field::HEADER_CRC + 4..])
}

/// Encodes `h` into a 4096-byte header block (the owner was checked to fit).
pub(super) fn encode_header(h: &ImageHeader, block: &mut [u8]) {
    block.fill(0);
    block[..8].copy_from_slice(&MAGIC);
    block[field::FORMAT..field::FORMAT + 2].copy_from_slice(&FORMAT.to_le_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put64(block, field::VERSION, h.version);
    put64(block, field::PAYLOAD_LEN, h.payload_len);
    put32(block, field::PAYLOAD_CRC, h.payload_crc);
    put32(block, field::BLOCK_SIZE, BLOCK as u32);
    put64(block, field::TABLE_OFFSET, h.table_offset);
    put64(block, field::TABLE_LEN, h.table_len);
    put32(block, field::TABLE_CRC, h.table_crc);
    put32(block, field::OWNER_LEN, h.owner.len() as u32);
    put64(block, field::FILE_LEN, h.file_len);
    block[field::OWNER..field::OWNER + h.owner.len()].copy_from_slice(h.owner.as_bytes());
    let crc = header_crc(block);
    put32(block, field::HEADER_CRC, crc);
}

/// Decodes and checks a header block read from `path`, whose length is `size`.
pub(super) fn decode_header(
    path: &Path,
    b: &[u8],
    size: u64,
    owner: &str,
    version: u64,
) -> Result<ImageHeader> {
    let corrupt = |what: String, offset: usize| StoreError::Corrupt {
        path: path.to_path_buf(),
        what,
        offset: offset as u64,
    };
    if b.len() < HEADER_LEN {
        return Err(StoreError::Truncated {
            path: path.to_path_buf(),
            expected: HEADER_LEN as u64,
            actual: size,
        });
    }
    let b = &b[..HEADER_LEN];
    if b[..8] != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[..8]);
        return Err(StoreError::BadMagic {
            path: path.to_path_buf(),
            found,
        });
    }
    let stored = u32_at(b, field::HEADER_CRC);
    let computed = header_crc(b);
    if stored != computed {
        return Err(StoreError::HeaderChecksum {
            path: path.to_path_buf(),
            len: HEADER_LEN as u64,
            stored,
            computed,
        });
    }
    let format = u16_at(b, field::FORMAT);
    if format != FORMAT {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: format,
            supported: FORMAT,
        });
    }
    let flags = u16_at(b, field::FLAGS);
    if flags != 0 {
        return Err(corrupt(format!("unknown flags {flags:#06x}"), field::FLAGS));
    }
    let owner_len = u32_at(b, field::OWNER_LEN) as usize;
    if owner_len == 0 || owner_len > MAX_OWNER {
        return Err(corrupt(
            format!("owner length {owner_len} (1..={MAX_OWNER})"),
            field::OWNER_LEN,
        ));
    }
    let file_owner = String::from_utf8_lossy(&b[field::OWNER..field::OWNER + owner_len]);
    let file_version = u64_at(b, field::VERSION);
    if file_owner != owner || file_version != version {
        return Err(corrupt(
            format!("holds {file_owner} v{file_version}, expected {owner} v{version}"),
            field::VERSION,
        ));
    }
    let h = ImageHeader {
        owner: file_owner.into_owned(),
        version: file_version,
        payload_len: u64_at(b, field::PAYLOAD_LEN),
        payload_crc: u32_at(b, field::PAYLOAD_CRC),
        table_offset: u64_at(b, field::TABLE_OFFSET),
        table_len: u64_at(b, field::TABLE_LEN),
        table_crc: u32_at(b, field::TABLE_CRC),
        file_len: u64_at(b, field::FILE_LEN),
    };
    let block_size = u32_at(b, field::BLOCK_SIZE);
    if block_size as usize != BLOCK {
        return Err(corrupt(
            format!("block size {block_size} (this build uses {BLOCK})"),
            field::BLOCK_SIZE,
        ));
    }
    // The layout follows from the payload length; checked arithmetic, since this is input.
    let bl = BLOCK as u64;
    let layout = (|| {
        let blocks = h.payload_len.checked_add(bl - 1)? / bl;
        let table_offset = (HEADER_LEN as u64).checked_add(blocks.checked_mul(bl)?)?;
        let table_len = blocks.checked_mul(4)?;
        let file_len = table_offset.checked_add(table_len.checked_add(bl - 1)? / bl * bl)?;
        Some((table_offset, table_len, file_len))
    })();
    let Some((table_offset, table_len, file_len)) = layout else {
        return Err(corrupt(
            format!("payload length {} is impossible", h.payload_len),
            field::PAYLOAD_LEN,
        ));
    };
    for (name, got, want, at) in [
        (
            "table offset",
            h.table_offset,
            table_offset,
            field::TABLE_OFFSET,
        ),
        ("table length", h.table_len, table_len, field::TABLE_LEN),
        ("file length", h.file_len, file_len, field::FILE_LEN),
    ] {
        if got != want {
            return Err(corrupt(
                format!(
                    "{name} {got} does not match payload length {} (expected {want})",
                    h.payload_len
                ),
                at,
            ));
        }
    }
    if size < h.file_len {
        return Err(truncated(path, &h, size));
    }
    if size > h.file_len {
        return Err(corrupt(
            format!(
                "{} unexpected bytes after the checksum table (file is {size} bytes, header says {})",
                size - h.file_len,
                h.file_len
            ),
            h.file_len as usize,
        ));
    }
    Ok(h)
}

/// Checks the checksum table against its crc and the whole-payload crc in the header.
pub(super) fn check_table(path: &Path, h: &ImageHeader, table: &[u8]) -> Result<()> {
    let computed = crc32c::crc32c(table);
    if computed != h.table_crc {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: format!(
                "checksum table fails its crc32c (stored {:#010x}, computed {computed:#010x})",
                h.table_crc
            ),
            offset: h.table_offset,
        });
    }
    let whole = payload_crc_from_blocks(table.chunks_exact(4).map(|c| u32_at(c, 0)), h.payload_len);
    if whole != h.payload_crc {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            what: format!(
                "checksum table does not add up to the payload crc32c in the header (header {:#010x}, table {whole:#010x})",
                h.payload_crc
            ),
            offset: field::PAYLOAD_CRC as u64,
        });
    }
    Ok(())
}
