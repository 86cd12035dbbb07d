//! L3 of the store: XOR parity over a parity set of K nodes (see the module docs of
//! `store.rs`). A member's image for version v goes to the set's parity holder for v
//! ([`Inner::parity_target`]); the holder accumulates the members' contributions
//! ([`Inner::add_contribution`]), keeps the parity with each member's owner, length and crc,
//! and answers `Parity` lookups ([`Inner::handle_parity`]); a lost member's image is rebuilt
//! from the parity and the other members' images ([`Inner::rebuild`]).
use super::*;

pub(super) struct Contribution {
    pub(super) node: u32,
    pub(super) owner: String,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) crc: u32,
}

#[derive(Default)]
pub(super) struct ParitySet {
    pub(super) contributions: BTreeMap<u32, Contribution>,
    /// (offset, len, crc) of the parity once complete.
    pub(super) parity: Option<(u64, u64, u32)>,
    /// A registration of the parity's range alone, for the peers that rebuild from it.
    pub(super) parity_mr: Option<MemoryRegion>,
    pub(super) members: Vec<(u32, u32, String, u64, u32)>, // member, node, owner, len, crc
}

pub(super) struct ParityInfo {
    pub(super) holder: usize,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) crc: u32,
    pub(super) remote: RemoteRegion,
    pub(super) members: Vec<(u32, u32, String, u64, u32)>,
}

pub(super) fn xor_into(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    let (d, s) = (&mut dst[..n], &src[..n]);
    let mut dc = d.chunks_exact_mut(8);
    let mut sc = s.chunks_exact(8);
    for (a, b) in (&mut dc).zip(&mut sc) {
        let x = u64::from_ne_bytes(a[..].try_into().expect("8"))
            ^ u64::from_ne_bytes(b.try_into().expect("8"));
        a.copy_from_slice(&x.to_ne_bytes());
    }
    for (a, b) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
        *a ^= b;
    }
}

impl Inner {
    /// Where `key`'s image goes for L3: (lane set, member index, holder), or `None` when
    /// this store writes no parity, this node is in no parity set, runs more owners than
    /// the sets have lanes, or the set cannot complete (a member or the holder is gone: the
    /// set would wait for an image that never comes).
    pub(super) fn parity_target(&self, key: &Key) -> Option<(u32, u32, usize)> {
        if self.cfg.parity_set < 2 || self.cfg.nodes.len() < 2 {
            return None;
        }
        let placement = self.placement();
        let (set, member) = placement.parity_member(self.cfg.node)?;
        if placement.set_members(set).len() < 2 {
            // A set of one (no parity among the nodes left) would only copy the image.
            return None;
        }
        let lane = {
            let mut lanes = self.lanes.lock().expect("lock");
            let next = lanes.len() as u32;
            *lanes.entry(key.0.clone()).or_insert(next)
        };
        if lane >= placement.lanes() {
            return None;
        }
        let vset = placement.lane_set(set, lane);
        let holder = placement.parity_holder(vset, key.1);
        if self.is_down(holder) || placement.set_members(set).iter().any(|&m| self.is_down(m)) {
            return None;
        }
        Some((vset, member, holder))
    }

    pub(super) fn set_size(&self, set: u32) -> usize {
        self.placement().set_size(set)
    }

    /// The parity holder is this node: contribute without RMA.
    pub(super) fn contribute_locally(&self, key: &Key, set: u32, member: u32) -> Result<bool> {
        let (data, crc) = self
            .local_l1(&key.0, key.1)
            .ok_or_else(|| StoreError::NotFound {
                owner: key.0.clone(),
                version: key.1,
            })?;
        let offset = self
            .arena
            .lock()
            .expect("lock")
            .alloc(data.len() as u64)
            .ok_or_else(|| StoreError::Peer {
                node: self.cfg.node,
                what: "arena full".into(),
            })?;
        // SAFETY: freshly allocated arena range, ours alone.
        unsafe {
            self.arena_mr.region().as_mut_slice()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(&data)
        };
        Ok(self.add_contribution(
            set,
            key.1,
            member,
            self.cfg.node as u32,
            &key.0,
            offset,
            data.len() as u64,
            crc,
        ))
    }

    pub(super) fn parity_lookup(
        &self,
        holder: usize,
        set: u32,
        version: u64,
    ) -> Result<Option<ParityInfo>> {
        let reply = if holder == self.cfg.node {
            self.handle_parity(set, version)
        } else {
            self.request(holder, Body::Parity { set, version })?
        };
        let (offset, len, crc, remote, members) = match reply {
            Body::NotFound => return Ok(None),
            Body::ParityFound {
                offset,
                len,
                crc,
                remote,
                members,
            } => (offset, len, crc, remote, members),
            other => return Err(unexpected(holder, "Parity", &other)),
        };
        let remote = RemoteRegion::from_bytes(&remote)?;
        Ok(Some(ParityInfo {
            holder,
            offset,
            len,
            crc,
            remote,
            members,
        }))
    }

    /// Rebuilds a lost owner's version from its parity set: (data, holder node).
    pub(super) fn rebuild(&self, owner: &str, version: u64) -> Result<Option<(Vec<u8>, usize)>> {
        // The placement in force first, then the earlier ones (the version may have been
        // flushed before the last re-form); each (set, holder) asked once.
        let placements: Vec<Arc<Placement>> = std::iter::once(self.placement())
            .chain(self.earlier.lock().expect("lock").iter().rev().cloned())
            .collect();
        let mut asked = std::collections::BTreeSet::new();
        let candidates = placements
            .iter()
            .flat_map(|p| (0..p.lane_sets()).map(move |set| (set, p.parity_holder(set, version))));
        for (set, holder) in candidates {
            if !asked.insert((set, holder)) || self.is_down(holder) {
                continue;
            }
            let info = match self.parity_lookup(holder, set, version) {
                Ok(Some(i)) => i,
                Ok(None) | Err(_) => continue,
            };
            let Some(lost) = info.members.iter().find(|m| m.2 == owner).cloned() else {
                continue;
            };
            let mut acc = if holder == self.cfg.node {
                // Our own parity: read where it lies in the arena (`info` describes the
                // range as lent to peers, from the start of its own registration).
                let sets = self.parity.lock().expect("lock");
                let Some((offset, len, _)) = sets.get(&(set, version)).and_then(|p| p.parity)
                else {
                    continue;
                };
                // SAFETY: the parity range is immutable once complete.
                unsafe {
                    self.arena_mr.region().as_slice()[offset as usize..(offset + len) as usize]
                        .to_vec()
                }
            } else {
                self.rma_read(holder, &info.remote, info.offset, info.len as usize)?
                    .to_vec()
            };
            if crc32c::crc32c(&acc) != info.crc {
                return Err(StoreError::Invalid(format!(
                    "parity of set {set} v{version} at node {holder} fails its checksum"
                )));
            }
            for m in info.members.iter().filter(|m| m.2 != owner) {
                let data = self.fetch_any(&m.2, version, m.1 as usize)?;
                if crc32c::crc32c(&data) != m.4 {
                    return Err(StoreError::Invalid(format!(
                        "member {} image for the rebuild fails its checksum",
                        m.2
                    )));
                }
                xor_into(&mut acc, &data);
            }
            acc.truncate(lost.3 as usize);
            let got = crc32c::crc32c(&acc);
            if got != lost.4 {
                return Err(StoreError::Checksum {
                    level: format!("L3 rebuild from set {set}"),
                    owner: owner.to_string(),
                    version,
                    stored: lost.4,
                    computed: got,
                });
            }
            return Ok(Some((acc, info.holder)));
        }
        Ok(None)
    }

    pub(super) fn handle_parity(&self, set: u32, version: u64) -> Body {
        let sets = self.parity.lock().expect("lock");
        let Some(p) = sets.get(&(set, version)) else {
            return Body::NotFound;
        };
        let (Some((_, len, crc)), Some(mr)) = (p.parity, p.parity_mr.as_ref()) else {
            return Body::NotFound;
        };
        // The parity's own registration: the rebuilding peer reaches this range alone.
        Body::ParityFound {
            offset: 0,
            len,
            crc,
            remote: mr.remote().to_bytes().to_vec(),
            members: p
                .members
                .iter()
                .map(|(m, n, o, l, c)| (*m, *n, o.clone(), *l, *c))
                .collect(),
        }
    }

    /// Records a member's image for a parity set; computes the parity once all are in.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_contribution(
        &self,
        set: u32,
        version: u64,
        member: u32,
        node: u32,
        owner: &str,
        offset: u64,
        len: u64,
        crc: u32,
    ) -> bool {
        let expected = self.set_size(set);
        let mut sets = self.parity.lock().expect("lock");
        let p = sets.entry((set, version)).or_default();
        if let Some((o, l, _)) = p.parity {
            // A complete set gets a new image: the version was taken again after a
            // recovery rolled the job back (the old images are gone); start afresh.
            p.parity = None;
            p.parity_mr = None;
            p.members.clear();
            self.arena.lock().expect("lock").release(o, l);
        }
        // Images from nodes that are no longer the members at their index (left from
        // before a re-form of the sets) are not this set's.
        let placement = self.placement();
        let members = placement.set_members(set);
        let stale: Vec<u32> = p
            .contributions
            .iter()
            .filter(|(m, c)| members.get(**m as usize) != Some(&(c.node as usize)))
            .map(|(m, _)| *m)
            .collect();
        for m in stale {
            if let Some(c) = p.contributions.remove(&m) {
                self.arena.lock().expect("lock").release(c.offset, c.len);
            }
        }
        if let Some(old) = p.contributions.insert(
            member,
            Contribution {
                node,
                owner: owner.to_string(),
                offset,
                len,
                crc,
            },
        ) {
            self.arena
                .lock()
                .expect("lock")
                .release(old.offset, old.len);
        }
        if p.contributions.len() < expected {
            return false;
        }
        let plen = p.contributions.values().map(|c| c.len).max().unwrap_or(0);
        let Some(poff) = self.arena.lock().expect("lock").alloc(plen) else {
            eprintln!(
                "krun-store: node {}: arena full, parity of set {set} v{version} not computed",
                self.cfg.node
            );
            return false;
        };
        // SAFETY: the parity range is freshly allocated; contributions are committed and
        // immutable; both are disjoint ranges of the lent arena.
        let arena = unsafe { self.arena_mr.region().as_mut_slice() };
        arena[poff as usize..(poff + plen) as usize].fill(0);
        for c in p.contributions.values() {
            let (src, dst) = if c.offset < poff {
                let (a, b) = arena.split_at_mut(poff as usize);
                (
                    &a[c.offset as usize..(c.offset + c.len) as usize],
                    &mut b[..plen as usize],
                )
            } else {
                let (a, b) = arena.split_at_mut(c.offset as usize);
                (
                    &b[..c.len as usize],
                    &mut a[poff as usize..(poff + plen) as usize],
                )
            };
            xor_into(dst, src);
        }
        let pcrc = crc32c::crc32c(&arena[poff as usize..(poff + plen) as usize]);
        p.members = p
            .contributions
            .iter()
            .map(|(m, c)| (*m, c.node, c.owner.clone(), c.len, c.crc))
            .collect();
        let mut arena_alloc = self.arena.lock().expect("lock");
        for c in std::mem::take(&mut p.contributions).into_values() {
            arena_alloc.release(c.offset, c.len);
        }
        p.parity = Some((poff, plen, pcrc));
        p.parity_mr = match self.register_range(poff, plen) {
            Ok(mr) => Some(mr),
            Err(e) => {
                eprintln!(
                    "krun-store: node {}: parity of set {set} v{version} cannot be lent ({e}): \
                     not served",
                    self.cfg.node
                );
                None
            }
        };
        // Keep the newest `keep` complete parity sets of this set.
        let complete: Vec<u64> = sets
            .iter()
            .filter(|((s, _), p)| *s == set && p.parity.is_some())
            .map(|((_, v), _)| *v)
            .collect();
        let keep = self.cfg.keep.max(1);
        if complete.len() > keep {
            for v in &complete[..complete.len() - keep] {
                if let Some(old) = sets.remove(&(set, *v)) {
                    if let Some((o, l, _)) = old.parity {
                        arena_alloc.release(o, l);
                    }
                }
            }
        }
        true
    }
}
