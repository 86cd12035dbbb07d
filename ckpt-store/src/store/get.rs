//! Reads: the fastest valid copy of a version, from any level of any node (L1 here, L2 or L1
//! on another node, L3 rebuilt from parity, L4 disk); a copy failing its checksum is
//! reported and the next one tried.
use super::*;

impl Store {
    /// Reads the fastest valid copy of a version, from any level of any node.
    pub fn get(&self, owner: &str, version: u64) -> Result<(Vec<u8>, GetReport)> {
        let (bytes, report) = self.get_bytes(owner, version)?;
        Ok((bytes.to_vec(), report))
    }

    /// As [`Store::get`], leaving the image in store memory when it can (no copy of L1, no
    /// fresh buffer for a remote read).
    pub fn get_bytes(&self, owner: &str, version: u64) -> Result<(ImageBytes, GetReport)> {
        check_owner(owner)?;
        let inner = &self.inner;
        let mut rejected = Vec::new();
        let me = inner.cfg.node;
        // L1 here.
        if let Some((data, crc)) = inner.local_l1(owner, version) {
            if crc32c::crc32c(&data) == crc {
                return Ok((
                    data,
                    GetReport {
                        level: Level::L1,
                        node: me,
                        rejected,
                    },
                ));
            }
            rejected.push(format!("L1 on node {me}: checksum mismatch"));
            eprintln!("krun-store: {owner} v{version}: L1 copy on node {me} fails its checksum; trying L2");
        }
        // L2 held here for another node (this node is its buddy).
        if let Some(data) = inner.held_copy(owner, version) {
            let stored = inner
                .held
                .lock()
                .expect("lock")
                .get(&(owner.to_string(), version))
                .map(|h| h.crc);
            if stored == Some(crc32c::crc32c(&data)) {
                return Ok((
                    ImageBytes::Owned(data),
                    GetReport {
                        level: Level::L2,
                        node: me,
                        rejected,
                    },
                ));
            }
            rejected.push(format!("L2 held on node {me}: checksum mismatch"));
            eprintln!(
                "krun-store: {owner} v{version}: L2 copy held on node {me} fails its checksum"
            );
        }
        // L1 or L2 on other nodes (an L1 elsewhere is the owner's home node).
        let mut found_l2 = None;
        for node in (0..inner.cfg.nodes.len()).filter(|&n| n != me && !inner.is_down(n)) {
            match inner.fetch_remote(node, owner, version) {
                Ok(Some((data, level))) => {
                    found_l2 = Some((data, level, node));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    let text = format!("{} on node {node}: {e}", Level::L2);
                    eprintln!("krun-store: {owner} v{version}: {text}");
                    rejected.push(text);
                }
            }
        }
        if let Some((data, level, node)) = found_l2 {
            return Ok((
                data,
                GetReport {
                    level,
                    node,
                    rejected,
                },
            ));
        }
        // L3: rebuild from parity.
        if inner.cfg.parity_set > 1 {
            match inner.rebuild(owner, version) {
                Ok(Some((data, node))) => {
                    return Ok((
                        ImageBytes::Owned(data),
                        GetReport {
                            level: Level::L3,
                            node,
                            rejected,
                        },
                    ))
                }
                Ok(None) => {}
                Err(e) => {
                    eprintln!("krun-store: {owner} v{version}: L3 rebuild failed: {e}");
                    rejected.push(format!("L3: {e}"));
                }
            }
        }
        // L4.
        if let Some(disk) = &inner.disk {
            match disk.read(owner, version) {
                Ok(data) => {
                    return Ok((
                        ImageBytes::Owned(data),
                        GetReport {
                            level: Level::L4,
                            node: me,
                            rejected,
                        },
                    ))
                }
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => {
                    eprintln!("krun-store: {owner} v{version}: L4: {e}");
                    rejected.push(format!("L4: {e}"));
                }
            }
        }
        if rejected.is_empty() {
            Err(StoreError::NotFound {
                owner: owner.to_string(),
                version,
            })
        } else {
            Err(StoreError::Invalid(format!(
                "no valid copy of {owner} v{version}: {}",
                rejected.join("; ")
            )))
        }
    }
}
