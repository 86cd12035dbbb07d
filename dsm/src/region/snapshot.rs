//! A rank's snapshot of a region for a coordinated checkpoint (the pages it owns and
//! their bytes), and the restore of a region from the ranks' snapshots.
use super::*;

impl Dsm {
    /// Restores a region just allocated from the ranks' snapshots (collective).
    pub(super) fn restore(
        &self,
        base: u64,
        first_page: PageId,
        pages: usize,
        snapshot: Option<&[u8]>,
    ) -> Result<()> {
        let mine = snapshot.map(|s| Snapshot::parse(s, pages, self.rank, self.size));
        // A snapshot this rank cannot use still takes part (with a blob of the wrong
        // length), so every rank fails instead of waiting.
        let refused = vec![0u8; pages.div_ceil(8) + 1];
        let blob = match &mine {
            None => &[][..],
            Some(Ok(m)) => m.bitmap,
            Some(Err(_)) => &refused[..],
        };
        let all = self.allgather("alloc restore", blob)?;
        let mine = mine.transpose()?;
        let mut owners: Vec<Option<NodeId>> = vec![None; pages];
        for (r, bitmap) in all.iter().enumerate() {
            if bitmap.is_empty() {
                continue;
            }
            if bitmap.len() != pages.div_ceil(8) {
                return Err(collective(
                    "alloc restore",
                    format!(
                        "rank {r}'s snapshot is of another region ({} bitmap bytes)",
                        bitmap.len()
                    ),
                ));
            }
            for (i, owner) in owners.iter_mut().enumerate() {
                if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                    if let Some(o) = owner {
                        return Err(collective(
                            "alloc restore",
                            format!("page {i} of the region is held by the snapshots of ranks {o} and {r}"),
                        ));
                    }
                    *owner = Some(r as NodeId);
                }
            }
        }
        let mut node = self
            .engine
            .node
            .lock()
            .map_err(|_| collective("alloc restore", "poisoned"))?;
        for (i, &owner) in owners.iter().enumerate() {
            node.restore(first_page + i as u64, owner);
            if owner == Some(self.rank) {
                let data = mine
                    .as_ref()
                    .map(|m| m.page(i))
                    .ok_or_else(|| collective("alloc restore", "no snapshot here"))?;
                // SAFETY: `data` is one page of the snapshot; the destination page of the
                // region was never mapped (the region is new).
                unsafe {
                    self.engine
                        .uffd
                        .copy(base + (i * PAGE) as u64, data.as_ptr(), true)?
                };
            }
        }
        Ok(())
    }

    /// Bytes of a [`Dsm::snapshot`] of a region of `len` bytes (as asked of
    /// [`Dsm::alloc`]: rounded up to pages).
    pub fn snapshot_len(len: usize) -> usize {
        Snapshot::len(len.div_ceil(PAGE))
    }

    /// Writes what this rank holds of `region` into `out` ([`Dsm::snapshot_len`] bytes):
    /// which pages it owns and their bytes; returns how many pages it owns. Meant for a
    /// coordinated checkpoint, where no rank accesses the DSM: ownership does not move
    /// while the snapshots are taken, so every written page is in exactly one snapshot.
    /// Pages whose bytes did not change since the last snapshot into `out` are not
    /// written (an incremental capture of `out` leaves them out).
    pub fn snapshot(&self, region: &SharedRegion, out: &mut [u8]) -> Result<usize> {
        let pages = region.len / PAGE;
        if out.len() != Snapshot::len(pages) {
            return Err(DsmError::Config {
                what: "snapshot buffer".into(),
                reason: format!("{} bytes, {} expected", out.len(), Snapshot::len(pages)),
            });
        }
        let node = self
            .engine
            .node
            .lock()
            .map_err(|_| collective("snapshot", "poisoned"))?;
        let live = self
            .engine
            .regions
            .read()
            .map_err(|_| collective("snapshot", "poisoned"))?
            .get(&region.first_page)
            .is_some_and(|r| r.base == region.base);
        if !live {
            return Err(DsmError::Config {
                what: "snapshot".into(),
                reason: format!("the region at {:#x} was freed", region.base),
            });
        }
        let header = Snapshot::header(pages, self.rank, self.size);
        if out[..header.len()] != header {
            out[..header.len()].copy_from_slice(&header);
        }
        let data_at = Snapshot::data_offset(pages);
        let mut owned = 0;
        for i in 0..pages {
            let mine = node.state(region.first_page + i as u64).is_owner();
            let (byte, bit) = (SNAPSHOT_HEADER + i / 8, 1u8 << (i % 8));
            let want = if mine {
                out[byte] | bit
            } else {
                out[byte] & !bit
            };
            if out[byte] != want {
                out[byte] = want;
            }
            if mine {
                owned += 1;
                // SAFETY: this rank owns the page, so it is mapped here (read-only or
                // writable): reading it does not fault. The region is in the table, and a
                // free takes the state lock we hold.
                let page = unsafe {
                    std::slice::from_raw_parts((region.base + (i * PAGE) as u64) as *const u8, PAGE)
                };
                let dst = &mut out[data_at + i * PAGE..data_at + (i + 1) * PAGE];
                if dst != page {
                    dst.copy_from_slice(page);
                }
            }
        }
        Ok(owned)
    }
}

/// Bytes before a snapshot's bitmap.
const SNAPSHOT_HEADER: usize = 32;
const SNAPSHOT_MAGIC: &[u8; 8] = b"KDSMSNP1";

/// A snapshot of what one rank holds of a region ([`Dsm::snapshot`]): a 32-byte header
/// (magic, rank, job size, pages), a bitmap of the pages it owns, then, from the next page
/// boundary, every page's slot (meaningful where the bitmap is set).
struct Snapshot<'a> {
    bitmap: &'a [u8],
    data: &'a [u8],
}

impl<'a> Snapshot<'a> {
    fn data_offset(pages: usize) -> usize {
        (SNAPSHOT_HEADER + pages.div_ceil(8)).next_multiple_of(PAGE)
    }

    fn len(pages: usize) -> usize {
        Self::data_offset(pages) + pages * PAGE
    }

    fn header(pages: usize, rank: NodeId, size: usize) -> [u8; SNAPSHOT_HEADER] {
        let mut h = [0u8; SNAPSHOT_HEADER];
        h[..8].copy_from_slice(SNAPSHOT_MAGIC);
        h[8..12].copy_from_slice(&rank.to_le_bytes());
        h[12..16].copy_from_slice(&(size as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(pages as u64).to_le_bytes());
        h
    }

    fn parse(bytes: &'a [u8], pages: usize, rank: NodeId, size: usize) -> Result<Snapshot<'a>> {
        let bad = |reason: String| DsmError::Config {
            what: "DSM snapshot".into(),
            reason,
        };
        if bytes.len() != Self::len(pages) {
            return Err(bad(format!(
                "{} bytes for a region of {pages} pages ({} expected)",
                bytes.len(),
                Self::len(pages)
            )));
        }
        if &bytes[..8] != SNAPSHOT_MAGIC {
            return Err(bad("not a DSM snapshot (bad magic)".into()));
        }
        let want = Self::header(pages, rank, size);
        if bytes[..SNAPSHOT_HEADER] != want {
            let num = |r: std::ops::Range<usize>| {
                bytes[r]
                    .iter()
                    .rev()
                    .fold(0u64, |acc, &b| (acc << 8) | b as u64)
            };
            return Err(bad(format!(
                "taken by rank {} of {} for {} pages; this is rank {rank} of {size}, {pages} pages",
                num(8..12),
                num(12..16),
                num(16..24)
            )));
        }
        let data_at = Self::data_offset(pages);
        Ok(Snapshot {
            bitmap: &bytes[SNAPSHOT_HEADER..SNAPSHOT_HEADER + pages.div_ceil(8)],
            data: &bytes[data_at..],
        })
    }

    fn page(&self, i: usize) -> &'a [u8] {
        &self.data[i * PAGE..(i + 1) * PAGE]
    }
}
