//! crc32c of a concatenation from the crcs of its 4 KiB blocks.
use super::*;

/// The linear map "append 4096 zero bytes" on a crc32c, as byte tables:
/// crc32c(a ++ b) = shift(crc32c(a)) ^ crc32c(b) when b is 4096 bytes long.
pub(super) struct Shift([[u32; 256]; 4]);

pub(super) fn shift_block() -> &'static Shift {
    static SHIFT: OnceLock<Shift> = OnceLock::new();
    SHIFT.get_or_init(|| {
        // Column i of the map is its image of bit i (crc32c_combine is linear in its first
        // argument when the second is zero).
        let cols: Vec<u32> = (0..32)
            .map(|i| crc32c::crc32c_combine(1 << i, 0, BLOCK))
            .collect();
        let mut t = [[0u32; 256]; 4];
        for (k, table) in t.iter_mut().enumerate() {
            for (b, out) in table.iter_mut().enumerate() {
                *out = (0..8)
                    .filter(|j| b & (1 << j) != 0)
                    .fold(0, |acc, j| acc ^ cols[8 * k + j]);
            }
        }
        Shift(t)
    })
}

impl Shift {
    pub(super) fn apply(&self, crc: u32) -> u32 {
        let t = &self.0;
        t[0][(crc & 0xff) as usize]
            ^ t[1][((crc >> 8) & 0xff) as usize]
            ^ t[2][((crc >> 16) & 0xff) as usize]
            ^ t[3][(crc >> 24) as usize]
    }
}

/// Extends the crc32c of a prefix with the crc32c of the next `len`-byte block.
pub(super) fn fold_crc(acc: u32, block_crc: u32, len: usize) -> u32 {
    if len == BLOCK {
        shift_block().apply(acc) ^ block_crc
    } else {
        crc32c::crc32c_combine(acc, block_crc, len)
    }
}

/// The crc32c of a payload of `payload_len` bytes from its block crcs.
pub(super) fn payload_crc_from_blocks(blocks: impl Iterator<Item = u32>, payload_len: u64) -> u32 {
    let mut acc = 0;
    let mut left = payload_len;
    for c in blocks {
        let len = left.min(BLOCK as u64);
        acc = fold_crc(acc, c, len as usize);
        left -= len;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_crcs_fold_to_the_crc_of_the_whole() {
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 13) as u8).collect();
            let blocks = data.chunks(BLOCK).map(crc32c::crc32c);
            assert_eq!(
                payload_crc_from_blocks(blocks, len as u64),
                crc32c::crc32c(&data),
                "len {len}"
            );
        }
    }
}
