//! crc32c of a long run of equal-length pieces from the pieces' own crcs: the capture takes
//! each 64 KiB chunk's crc right after copying it (the bytes still in cache) and the image's
//! section checksum is combined from them, instead of reading the whole payload again.
//!
//! `crc32c(a ++ b) = shift_len(b)(crc32c(a)) ^ crc32c(b)`, where the shift is linear over
//! GF(2) and depends only on the length of `b`: [`Shift`] holds it as a 32x32 bit matrix,
//! built once per length, so each combination costs 32 bit tests instead of the
//! O(log len) matrix squarings of `crc32c::crc32c_combine`.

/// The operator that appends `len` bytes to a crc (see the module docs).
pub struct Shift {
    columns: [u32; 32],
    len: usize,
}

impl Shift {
    pub fn new(len: usize) -> Shift {
        let mut columns = [0u32; 32];
        for (i, c) in columns.iter_mut().enumerate() {
            *c = crc32c::crc32c_combine(1 << i, 0, len);
        }
        Shift { columns, len }
    }

    /// The length of the pieces this shift appends.
    pub fn piece_len(&self) -> usize {
        self.len
    }

    /// The crc32c of `a ++ b` from `crc(a)` and `crc(b)`, `b` being [`Shift::piece_len`] bytes.
    pub fn combine(&self, crc_a: u32, crc_b: u32) -> u32 {
        let mut out = 0;
        let mut v = crc_a;
        let mut i = 0;
        while v != 0 {
            if v & 1 == 1 {
                out ^= self.columns[i];
            }
            v >>= 1;
            i += 1;
        }
        out ^ crc_b
    }
}

/// The crc32c of pieces laid end to end, from their crcs and lengths (all but the last of
/// length `shift.piece_len()`; the last may be shorter).
pub fn combine_pieces(shift: &Shift, pieces: impl IntoIterator<Item = (u32, usize)>) -> u32 {
    let mut acc = 0u32;
    for (crc, len) in pieces {
        acc = if len == shift.piece_len() {
            shift.combine(acc, crc)
        } else {
            crc32c::crc32c_combine(acc, crc, len)
        };
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_piece_crcs_equal_the_crc_of_the_whole() {
        let data: Vec<u8> = (0..(5 * 4096 + 1000))
            .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        let shift = Shift::new(4096);
        let pieces = data.chunks(4096).map(|c| (crc32c::crc32c(c), c.len()));
        assert_eq!(combine_pieces(&shift, pieces), crc32c::crc32c(&data));
        // One piece: its own crc.
        assert_eq!(
            combine_pieces(&shift, [(crc32c::crc32c(&data[..4096]), 4096)]),
            crc32c::crc32c(&data[..4096])
        );
        // A changed byte changes the result.
        let mut bad = data.clone();
        bad[3 * 4096 + 17] ^= 1;
        let pieces = bad.chunks(4096).map(|c| (crc32c::crc32c(c), c.len()));
        assert_ne!(combine_pieces(&shift, pieces), crc32c::crc32c(&data));
    }
}
