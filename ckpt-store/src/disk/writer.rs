//! Writing a version (see the module documentation of [`super`]).
use super::*;

/// A step of [`DiskLevel::write`], for fault injection in tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteStep {
    Create,
    Preallocate,
    /// The completion of the second payload chunk (or the only one).
    Payload,
    Table,
    Header,
    Fsync,
    Rename,
    SyncDir,
}

/// An injected failure: `step` fails with `errno`.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub step: WriteStep,
    pub errno: i32,
}

/// What a write did.
#[derive(Clone, Debug)]
pub struct WriteReport {
    /// The final file.
    pub path: PathBuf,
    /// Payload bytes.
    pub bytes: u64,
    /// Bytes of the file (header, padding and checksum table included).
    pub file_bytes: u64,
    /// Payload bytes copied through the aligned buffers (the rest went to the device straight
    /// from the caller's page-aligned memory).
    pub copied: u64,
    /// Wall time from the call to the directory fsync.
    pub seconds: f64,
}

impl DiskLevel {
    /// Writes a version; see [`DiskLevel::write_with_progress`].
    pub fn write(&self, owner: &str, version: u64, data: &[u8]) -> Result<WriteReport> {
        self.write_with_progress(owner, version, data, &mut |_| {})
    }

    /// Writes a version (replacing an existing one atomically). `progress` is called with the
    /// payload bytes written so far, last with `data.len()` once the version is durably in
    /// place. On an error nothing is left under a temporary name and earlier versions are
    /// untouched; the exception is a failed fsync of the directory after the rename, where
    /// the new version is complete but its name may not survive a crash.
    pub fn write_with_progress(
        &self,
        owner: &str,
        version: u64,
        data: &[u8],
        progress: &mut dyn FnMut(u64),
    ) -> Result<WriteReport> {
        check_owner(owner)?;
        let start = Instant::now();
        let final_path = self.path(owner, version);
        let dir = final_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.dir.clone());
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| io(&dir, "creating the owner directory", e))?;
            // Make the new directories durable: sync each parent up to the level's root.
            let mut d = dir.as_path();
            while let Some(parent) = d.parent() {
                sync_dir(parent).map_err(|e| io(parent, "syncing the directory", e))?;
                if parent == self.dir {
                    break;
                }
                d = parent;
            }
        }
        let tmp = dir.join(format!(
            "{TMP_PREFIX}{}-{}-{version}{SUFFIX}",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let fault = |step: WriteStep| match self.opts.fault {
            Some(f) if f.step == step => Err(std::io::Error::from_raw_os_error(f.errno)),
            _ => Ok(()),
        };
        let result = self
            .write_file(&tmp, owner, version, data, progress)
            .and_then(|written| {
                fault(WriteStep::Rename)
                    .and_then(|_| std::fs::rename(&tmp, &final_path))
                    .map_err(|e| {
                        io(
                            &final_path,
                            format!("renaming {} into place", tmp.display()),
                            e,
                        )
                    })?;
                Ok(written)
            });
        let (file_bytes, copied) = match result {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fault(WriteStep::SyncDir)
            .and_then(|_| sync_dir(&dir))
            .map_err(|e| {
                io(
                    &dir,
                    format!(
                        "syncing the directory after renaming {} into place",
                        final_path.display()
                    ),
                    e,
                )
            })?;
        progress(data.len() as u64);
        Ok(WriteReport {
            path: final_path,
            bytes: data.len() as u64,
            file_bytes,
            copied,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Writes and fsyncs the whole temporary file; returns its length and the bytes copied.
    fn write_file(
        &self,
        tmp: &Path,
        owner: &str,
        version: u64,
        data: &[u8],
        progress: &mut dyn FnMut(u64),
    ) -> Result<(u64, u64)> {
        let fault = |step: WriteStep| match self.opts.fault {
            Some(f) if f.step == step => Some(-f.errno),
            _ => None,
        };
        let payload_len = data.len();
        let blocks = payload_len.div_ceil(BLOCK);
        let table_offset = HEADER_LEN + round_up(payload_len);
        let table_len = blocks * 4;
        let file_len = table_offset + round_up(table_len);

        let file = match fault(WriteStep::Create) {
            Some(e) => Err(std::io::Error::from_raw_os_error(-e)),
            None => std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_DIRECT)
                .open(tmp),
        }
        .map_err(|e| io(tmp, "creating the image file (O_DIRECT)", e))?;
        preallocate(&file, tmp, file_len as u64, fault(WriteStep::Preallocate))?;

        let mut pipe = Pipeline::new(&file, &self.pool, self.opts.queue_depth)?;
        let chunk = pipe.chunk();
        let mut crcs: Vec<u32> = Vec::with_capacity(blocks);
        let mut payload_crc = 0u32;
        let mut done = 0u64;
        let mut payload_completions = 0usize;
        let payload_chunks = payload_len.div_ceil(chunk);

        // Reaps one completion, checking it; counts payload progress.
        let mut reap = |pipe: &mut Pipeline, done: &mut u64| -> Result<()> {
            let c = pipe.complete().map_err(|e| io(tmp, "io_uring_enter", e))?;
            let Some(slot) = pipe.slots.get(c.tag as usize) else {
                return Err(StoreError::Io {
                    path: tmp.to_path_buf(),
                    what: format!("unexpected io_uring completion {:#x}", c.tag),
                    source: std::io::Error::other("unexpected completion"),
                });
            };
            let (offset, len) = (slot.offset, slot.len);
            let end = offset + len as u64;
            let (step, what) = if offset == 0 {
                (WriteStep::Header, "writing the header".to_string())
            } else if offset >= table_offset as u64 {
                (
                    WriteStep::Table,
                    format!("writing the checksum table at bytes {offset}..{end}"),
                )
            } else {
                (
                    WriteStep::Payload,
                    format!("writing the payload at file bytes {offset}..{end}"),
                )
            };
            let mut result = c.result;
            if step == WriteStep::Payload {
                payload_completions += 1;
                if payload_completions == 2.min(payload_chunks) {
                    result = fault(WriteStep::Payload).unwrap_or(result);
                }
            } else if let Some(e) = fault(step) {
                result = e;
            }
            let n = io_result(result).map_err(|e| io(tmp, what.clone(), e))?;
            if n != len {
                return Err(StoreError::Io {
                    path: tmp.to_path_buf(),
                    what,
                    source: std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        format!("short write: {n} of {len} bytes"),
                    ),
                });
            }
            if step == WriteStep::Payload {
                *done += end.min((HEADER_LEN + payload_len) as u64) - offset;
                progress((*done).min(payload_len as u64));
            }
            Ok(())
        };

        // The payload, `queue_depth` writes in flight. Page-aligned data (a mapped file, a
        // registered region) goes to the device straight from `data`, checksummed while the
        // write runs; otherwise each chunk is copied into a pooled aligned buffer, checksummed
        // 4 KiB block by block while in cache. A last chunk ending in a short block is copied.
        let aligned = (data.as_ptr() as usize).is_multiple_of(BLOCK);
        let mut copied = 0u64;
        let mut at = 0usize;
        while at < payload_len {
            let Some(slot) = pipe.free_slot() else {
                reap(&mut pipe, &mut done)?;
                continue;
            };
            let n = chunk.min(payload_len - at);
            let src = &data[at..at + n];
            let file_offset = (HEADER_LEN + at) as u64;
            if aligned && n.is_multiple_of(BLOCK) {
                // SAFETY: `src` is borrowed from `data`, which outlives `pipe` (dropped, and
                // so drained, before this function returns); it is 4096-aligned (`data` is,
                // and `at` is a multiple of the chunk size) and `n` is a multiple of 4096.
                unsafe { pipe.write_from(slot, src.as_ptr(), n, file_offset) }
                    .map_err(|e| io(tmp, "io_uring submit (payload)", e))?;
                checksum(src, &mut crcs, &mut payload_crc);
            } else {
                let padded = round_up(n);
                let buf = pipe.buf(slot);
                fill_and_checksum(src, &mut buf[..padded], &mut crcs, &mut payload_crc);
                copied += n as u64;
                pipe.write(slot, padded, file_offset)
                    .map_err(|e| io(tmp, "io_uring submit (payload)", e))?;
            }
            at += n;
        }

        // The checksum table.
        let mut table = Vec::with_capacity(table_len);
        for c in &crcs {
            table.extend_from_slice(&c.to_le_bytes());
        }
        let table_crc = crc32c::crc32c(&table);
        let mut at = 0usize;
        while at < table_len {
            let Some(slot) = pipe.free_slot() else {
                reap(&mut pipe, &mut done)?;
                continue;
            };
            let n = chunk.min(table_len - at);
            let padded = round_up(n);
            let buf = pipe.buf(slot);
            buf[..n].copy_from_slice(&table[at..at + n]);
            buf[n..padded].fill(0);
            pipe.write(slot, padded, (table_offset + at) as u64)
                .map_err(|e| io(tmp, "io_uring submit (checksum table)", e))?;
            at += n;
        }

        // The header, last: it is the only block that needs every checksum.
        let header = ImageHeader {
            owner: owner.to_string(),
            version,
            payload_len: payload_len as u64,
            payload_crc,
            table_offset: table_offset as u64,
            table_len: table_len as u64,
            table_crc,
            file_len: file_len as u64,
        };
        let slot = loop {
            match pipe.free_slot() {
                Some(s) => break s,
                None => reap(&mut pipe, &mut done)?,
            }
        };
        encode_header(&header, &mut pipe.buf(slot)[..HEADER_LEN]);
        pipe.write(slot, HEADER_LEN, 0)
            .map_err(|e| io(tmp, "io_uring submit (header)", e))?;
        while pipe.in_flight > 0 {
            reap(&mut pipe, &mut done)?;
        }

        // Everything is written: make it durable.
        pipe.fsync()
            .map_err(|e| io(tmp, "io_uring submit (fsync)", e))?;
        let c = pipe
            .complete()
            .map_err(|e| io(tmp, "io_uring_enter (fsync)", e))?;
        io_result(fault(WriteStep::Fsync).unwrap_or(c.result))
            .map_err(|e| io(tmp, "fsync of the image", e))?;
        Ok((file_len as u64, copied))
    }
}

pub(super) fn preallocate(file: &File, path: &Path, len: u64, fault: Option<i32>) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let err = match fault {
        Some(e) => Some(std::io::Error::from_raw_os_error(-e)),
        None => {
            // SAFETY: fallocate on a descriptor we own; no memory is involved.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
            (rc != 0).then(std::io::Error::last_os_error)
        }
    };
    match err {
        None => Ok(()),
        // A filesystem without fallocate: write into a sparse file instead (slower, and a
        // full disk then shows up as a failed write, which is handled the same way).
        Some(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => file
            .set_len(len)
            .map_err(|e| io(path, format!("setting the length to {len}"), e)),
        Some(e) => Err(io(path, format!("preallocating {len} bytes"), e)),
    }
}

/// Appends the crc32c of every 4 KiB block of `src` to `crcs` and extends `payload_crc`.
pub(super) fn checksum(src: &[u8], crcs: &mut Vec<u32>, payload_crc: &mut u32) {
    for b in src.chunks(BLOCK) {
        let c = crc32c::crc32c(b);
        crcs.push(c);
        *payload_crc = fold_crc(*payload_crc, c, b.len());
    }
}

/// Copies `src` into `dst` (zero-padding the tail) and checksums it like [`checksum`].
pub(super) fn fill_and_checksum(
    src: &[u8],
    dst: &mut [u8],
    crcs: &mut Vec<u32>,
    payload_crc: &mut u32,
) {
    // Work in pieces that stay in cache between the copy and the checksum.
    const PIECE: usize = 64 << 10;
    for (s, d) in src.chunks(PIECE).zip(dst.chunks_mut(PIECE)) {
        d[..s.len()].copy_from_slice(s);
        checksum(s, crcs, payload_crc);
    }
    dst[src.len()..].fill(0);
}
