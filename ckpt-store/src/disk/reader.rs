//! Reading and verifying a version.
use super::*;

impl DiskLevel {
    /// Reads and verifies a version.
    pub fn read(&self, owner: &str, version: u64) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_into(owner, version, &mut out, &mut |_| {})?;
        Ok(out)
    }

    /// Reads and verifies a version into `out` (replacing its contents; reusing a buffer avoids
    /// the first-touch cost of fresh memory). `progress` is called with the payload bytes read
    /// so far. Returns the header.
    pub fn read_into(
        &self,
        owner: &str,
        version: u64,
        out: &mut Vec<u8>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ImageHeader> {
        check_owner(owner)?;
        let path = self.path(owner, version);
        let file = open_image(&path, owner, version, self.opts.direct_reads)?;
        if self.opts.direct_reads {
            self.read_direct(&file, &path, owner, version, out, progress)
        } else {
            read_plain(&file, &path, owner, version, out, progress)
        }
    }

    /// Checks the header and the file length of a version without reading its payload.
    pub fn inspect(&self, owner: &str, version: u64) -> Result<ImageHeader> {
        check_owner(owner)?;
        let path = self.path(owner, version);
        let file = open_image(&path, owner, version, false)?;
        let size = file_size(&file, &path)?;
        let mut block = vec![0u8; HEADER_LEN];
        let n = pread_full(&file, &path, &mut block, 0)?;
        decode_header(&path, &block[..n], size, owner, version)
    }

    fn read_direct(
        &self,
        file: &File,
        path: &Path,
        owner: &str,
        version: u64,
        out: &mut Vec<u8>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ImageHeader> {
        let size = file_size(file, path)?;
        let mut pipe = Pipeline::new(file, &self.pool, self.opts.queue_depth)?;
        let chunk = pipe.chunk();
        let rd = |what: &str, e| io(path, format!("reading {what}"), e);

        // Header.
        pipe.read(0, HEADER_LEN, 0)
            .map_err(|e| rd("the header", e))?;
        let c = pipe.complete().map_err(|e| rd("the header", e))?;
        let n = io_result(c.result).map_err(|e| rd("the header", e))?;
        let h = decode_header(
            path,
            &pipe.buf(0)[..n.min(HEADER_LEN)],
            size,
            owner,
            version,
        )?;

        // Checksum table (completions may arrive in any order).
        let table_len = h.table_len as usize;
        let table_span = round_up(table_len);
        let mut table = vec![0u8; table_span];
        let mut at = 0usize;
        while at < table_span || pipe.in_flight > 0 {
            if at < table_span {
                if let Some(slot) = pipe.free_slot() {
                    let n = chunk.min(table_span - at);
                    pipe.read(slot, n, h.table_offset + at as u64)
                        .map_err(|e| rd("the checksum table", e))?;
                    at += n;
                    continue;
                }
            }
            let c = pipe.complete().map_err(|e| rd("the checksum table", e))?;
            let slot = c.tag as usize;
            let (off, len) = (pipe.slots[slot].offset, pipe.slots[slot].len);
            let got = io_result(c.result).map_err(|e| rd("the checksum table", e))?;
            if got != len {
                return Err(truncated(path, &h, size));
            }
            let rel = (off - h.table_offset) as usize;
            table[rel..rel + len].copy_from_slice(&pipe.buf(slot)[..len]);
        }
        table.truncate(table_len);
        check_table(path, &h, &table)?;

        // Payload: verify each block against the table and copy it out.
        let payload_len = h.payload_len as usize;
        out.clear();
        out.reserve(payload_len);
        let dst = out.as_mut_ptr();
        let mut first_bad: Option<(usize, u32, u32)> = None;
        let mut done = 0u64;
        let mut at = 0usize;
        while at < payload_len || pipe.in_flight > 0 {
            if at < payload_len {
                if let Some(slot) = pipe.free_slot() {
                    let n = chunk.min(payload_len - at);
                    pipe.read(slot, round_up(n), (HEADER_LEN + at) as u64)
                        .map_err(|e| rd("the payload", e))?;
                    at += n;
                    continue;
                }
            }
            let c = pipe.complete().map_err(|e| rd("the payload", e))?;
            let slot = c.tag as usize;
            let (off, len) = (pipe.slots[slot].offset, pipe.slots[slot].len);
            let got = io_result(c.result).map_err(|e| rd("the payload", e))?;
            if got != len {
                return Err(truncated(path, &h, size));
            }
            let rel = off as usize - HEADER_LEN;
            let n = len.min(payload_len - rel);
            let src = &pipe.buf(slot)[..n];
            if let Some(bad) = verify_blocks(src, rel, &table) {
                if first_bad.is_none_or(|f| bad.0 < f.0) {
                    first_bad = Some(bad);
                }
            }
            // SAFETY: `out` has capacity for `payload_len` bytes and rel + n <= payload_len;
            // `src` is a pipeline buffer, which cannot overlap `out`.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(rel), n) };
            done += n as u64;
            progress(done);
        }
        if let Some((offset, stored, computed)) = first_bad {
            return Err(payload_error(path, offset, stored, computed));
        }
        // SAFETY: every byte in 0..payload_len was copied above (the chunks tile the payload
        // and each completed in full, or we returned).
        unsafe { out.set_len(payload_len) };
        Ok(h)
    }
}

pub(super) fn open_image(path: &Path, owner: &str, version: u64, direct: bool) -> Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::NotFound {
                owner: owner.to_string(),
                version,
            }
        } else {
            io(path, "opening the image", e)
        }
    })
}

/// The first block of `chunk` (at payload offset `rel`) whose crc differs from the table:
/// (payload offset, stored, computed).
pub(super) fn verify_blocks(chunk: &[u8], rel: usize, table: &[u8]) -> Option<(usize, u32, u32)> {
    for (i, b) in chunk.chunks(BLOCK).enumerate() {
        let idx = rel / BLOCK + i;
        let stored = u32_at(table, idx * 4);
        let computed = crc32c::crc32c(b);
        if stored != computed {
            return Some((rel + i * BLOCK, stored, computed));
        }
    }
    None
}

pub(super) fn payload_error(path: &Path, offset: usize, stored: u32, computed: u32) -> StoreError {
    StoreError::PayloadChecksum {
        path: path.to_path_buf(),
        offset: offset as u64,
        file_offset: (HEADER_LEN + offset) as u64,
        stored,
        computed,
    }
}

pub(super) fn truncated(path: &Path, h: &ImageHeader, size: u64) -> StoreError {
    StoreError::Truncated {
        path: path.to_path_buf(),
        expected: h.file_len,
        actual: size,
    }
}

pub(super) fn file_size(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| io(path, "reading the image's length", e))
}

/// Reads up to `buf.len()` bytes at `offset`, stopping early only at the end of the file.
pub(super) fn pread_full(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io(
                    path,
                    format!("reading at offset {}", offset + n as u64),
                    e,
                ))
            }
        }
    }
    Ok(n)
}

/// Buffered reads (the alternative to O_DIRECT, kept for comparison and for filesystems where
/// buffered reads are faster).
pub(super) fn read_plain(
    file: &File,
    path: &Path,
    owner: &str,
    version: u64,
    out: &mut Vec<u8>,
    progress: &mut dyn FnMut(u64),
) -> Result<ImageHeader> {
    let size = file_size(file, path)?;
    let mut block = vec![0u8; HEADER_LEN];
    let n = pread_full(file, path, &mut block, 0)?;
    let h = decode_header(path, &block[..n], size, owner, version)?;
    let mut table = vec![0u8; h.table_len as usize];
    if pread_full(file, path, &mut table, h.table_offset)? != table.len() {
        return Err(truncated(path, &h, size));
    }
    check_table(path, &h, &table)?;
    let payload_len = h.payload_len as usize;
    out.clear();
    out.resize(payload_len, 0);
    const PIECE: usize = 8 << 20;
    let mut first_bad: Option<(usize, u32, u32)> = None;
    for (i, piece) in out.chunks_mut(PIECE).enumerate() {
        let rel = i * PIECE;
        if pread_full(file, path, piece, (HEADER_LEN + rel) as u64)? != piece.len() {
            return Err(truncated(path, &h, size));
        }
        if first_bad.is_none() {
            first_bad = verify_blocks(piece, rel, &table);
        }
        progress((rel + piece.len()) as u64);
    }
    if let Some((offset, stored, computed)) = first_bad {
        return Err(payload_error(path, offset, stored, computed));
    }
    Ok(h)
}
