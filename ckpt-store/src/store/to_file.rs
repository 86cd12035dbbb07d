//! Fetching a version straight into a file (a restore's image file): for a copy on another
//! node, the file is sized, mapped shared and registered, and the RMA reads land in its own
//! pages (tmpfs or page cache): no receive buffer, no copy out of one, and on tmpfs no fresh
//! memory when the file is rewritten in place. The crc32c is checked on the file's bytes; a
//! copy failing it, or a peer failing mid-transfer, is reported and the next copy is tried.
//! Copies held on this node and the L3/L4 fallbacks go through [`Store::get_bytes`].
use super::*;
use crate::disk::check_owner;
use std::path::Path;

impl Store {
    /// Writes the fastest valid copy of a version into the file at `path` (created or
    /// rewritten in place, sized to the image). On error no partial image is left at `path`.
    ///
    /// The file must not be mapped or read by anyone else while it is written.
    pub fn get_to_file(&self, owner: &str, version: u64, path: &Path) -> Result<GetReport> {
        check_owner(owner)?;
        let result = self.get_to_file_inner(owner, version, path);
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn get_to_file_inner(&self, owner: &str, version: u64, path: &Path) -> Result<GetReport> {
        let inner = &self.inner;
        let me = inner.cfg.node;
        let key = (owner.to_string(), version);
        let here = inner.l1.lock().expect("lock").contains_key(&key)
            || inner.held.lock().expect("lock").contains_key(&key);
        let mut rejected = Vec::new();
        if !here {
            for node in (0..inner.cfg.nodes.len()).filter(|&n| n != me && !inner.is_down(n)) {
                match inner.fetch_remote_to_file(node, owner, version, path) {
                    Ok(Some(level)) => {
                        return Ok(GetReport {
                            level,
                            node,
                            rejected,
                        })
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let text = format!("{} on node {node}: {e}", Level::L2);
                        eprintln!("krun-store: {owner} v{version}: {text}");
                        rejected.push(text);
                    }
                }
            }
        }
        // Held here, or only at L3/L4 (or every remote copy failed): the general path.
        let (data, mut report) = self.get_bytes(owner, version)?;
        write_file(path, &data)?;
        rejected.append(&mut report.rejected);
        report.rejected = rejected;
        Ok(report)
    }
}

/// Writes `data` as the whole content of `path` (rewritten in place, then cut to size).
fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let io = |what: &str, e: std::io::Error| StoreError::Io {
        path: path.to_path_buf(),
        what: what.to_string(),
        source: e,
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io("opening the image file", e))?;
    f.write_all_at(data, 0)
        .map_err(|e| io("writing the image file", e))?;
    f.set_len(data.len() as u64)
        .map_err(|e| io("sizing the image file", e))
}

impl Inner {
    /// Asks `node` for a copy and reads it into the file at `path`: its level there, or
    /// `None` when `node` holds no copy.
    pub(super) fn fetch_remote_to_file(
        &self,
        node: usize,
        owner: &str,
        version: u64,
        path: &Path,
    ) -> Result<Option<Level>> {
        let reply = self.request(
            node,
            Body::Lookup {
                owner: owner.to_string(),
                version,
            },
        )?;
        let (level, offset, len, crc, remote) = match reply {
            Body::NotFound => return Ok(None),
            Body::Found {
                level,
                offset,
                len,
                crc,
                remote,
            } => (level, offset, len, crc, remote),
            other => return Err(unexpected(node, "Lookup", &other)),
        };
        let level = if level == 1 { Level::L1 } else { Level::L2 };
        let remote = RemoteRegion::from_bytes(&remote)?;
        if len == 0 || len > remote.len.saturating_sub(offset) {
            return Err(StoreError::Peer {
                node,
                what: format!(
                    "a copy of {len} bytes at {offset} of a {}-byte region",
                    remote.len
                ),
            });
        }
        let len = usize::try_from(len).map_err(|_| StoreError::Peer {
            node,
            what: format!("a copy of {len} bytes does not fit this machine"),
        })?;
        let io = |what: &str, e: std::io::Error| StoreError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source: e,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io("opening the image file", e))?;
        file.set_len(len as u64)
            .map_err(|e| io("sizing the image file", e))?;
        // SAFETY: the file is ours (the caller's contract: nobody else maps or reads it
        // meanwhile) and keeps `len` bytes while the mapping, dropped below, lives.
        let region = unsafe { Region::map_file_shared(&file, len) }?;
        let mr = self.ep.register(region)?;
        // The checksum runs over each chunk as its read lands, beside the reads still in
        // flight, instead of over the whole file after the last one.
        let mut got = 0u32;
        let base = mr.region().as_ptr();
        self.rma_read_into(node, &remote, offset, len, &mr, |range| {
            // SAFETY: inside the mapping (the reads cover 0..len of it); this range's read
            // completed and nothing writes it any more: the reads still in flight write
            // other ranges, and no slice over them is made.
            let chunk = unsafe { std::slice::from_raw_parts(base.add(range.start), range.len()) };
            got = crc32c::crc32c_append(got, chunk);
        })?;
        if got != crc {
            return Err(StoreError::Checksum {
                level: format!("{level} on node {node}"),
                owner: owner.to_string(),
                version,
                stored: crc,
                computed: got,
            });
        }
        Ok(Some(level))
    }
}
