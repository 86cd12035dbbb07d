//! Which versions a node's store keeps.
//!
//! By default each owner keeps its newest `keep` versions safe at each level
//! ([`StoreConfig::keep`](super::StoreConfig)): enough for the recovery line of a policy
//! that restores the newest commit (the coordinated one, the uncoordinated one with
//! logging). A policy whose line can lie further back (the uncoordinated policy without
//! logging: the domino effect) switches the store to **retention by line**
//! ([`Store::retain_by_line`]): a version older than the newest `keep` goes only once the
//! policy has said no future line needs it ([`Store::keep_from`], the owner's floor);
//! until an owner's first floor, all of its versions stay. Floors only rise. L3 parity sets
//! are not covered (their holder keeps its newest `keep` sets): a line further back is
//! served from L2 or L4.
use super::{Body, Inner, L1Copy, Level, Store};
use crate::error::{Result, StoreError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The owners' floors (see the module doc).
#[derive(Default)]
pub(super) struct Floors {
    by_line: AtomicBool,
    floors: Mutex<HashMap<String, u64>>,
}

impl Floors {
    /// `None`: versions go by count only; `Some(f)`: also only those older than `f`.
    pub(super) fn floor(&self, owner: &str) -> Option<u64> {
        if !self.by_line.load(Ordering::SeqCst) {
            return None;
        }
        Some(
            self.floors
                .lock()
                .expect("lock")
                .get(owner)
                .copied()
                .unwrap_or(0),
        )
    }
}

impl Store {
    /// Switches this node's store to retention by line (see the module doc).
    pub fn retain_by_line(&self) {
        self.inner.retention.by_line.store(true, Ordering::SeqCst);
    }

    /// No recovery line needs `owner`'s versions older than `version` any more: they may go
    /// (under retention by line; a lower floor than the owner's current one changes
    /// nothing). Versions already past the newest `keep` go at the owner's next safe
    /// version.
    pub fn keep_from(&self, owner: &str, version: u64) {
        let mut floors = self.inner.retention.floors.lock().expect("lock");
        let floor = floors.entry(owner.to_string()).or_insert(0);
        *floor = (*floor).max(version);
    }

    /// The owner's floor under retention by line (`None`: retention by count).
    pub fn floor(&self, owner: &str) -> Option<u64> {
        self.inner.retention.floor(owner)
    }

    /// Makes this node's L1 copy of a version its own: a mapped image file (see
    /// [`Store::put_file`]) is copied into store memory, so that the file may be recycled
    /// while the version stays at L1 (a line may need it after its L2 copy went with a
    /// failed buddy). The bytes must still match the crc32c taken at the put (a file already
    /// rewritten is refused, and the version is left as it was). Returns the bytes copied
    /// (0: not held at L1, or already the store's own).
    pub fn keep_local_copy(&self, owner: &str, version: u64) -> Result<u64> {
        let inner = &self.inner;
        let key = (owner.to_string(), version);
        let (mr, len, crc) = match inner.l1.lock().expect("lock").get(&key) {
            Some(c) if c.mapped => (c.mr.clone(), c.len, c.crc),
            _ => return Ok(0),
        };
        let own = inner.take_region(len)?;
        // SAFETY: `own` is ours alone until inserted below; the mapped copy is read while the
        // map holds it (a concurrent rewrite is caught by the crc check).
        unsafe {
            own.region().as_mut_slice()[..len].copy_from_slice(&mr.region().as_slice()[..len])
        };
        // SAFETY: as above.
        let copied = unsafe { &own.region().as_slice()[..len] };
        if crc32c::crc32c(copied) != crc {
            return Err(StoreError::Invalid(format!(
                "{owner} v{version}: its image file changed since it was stored; not kept"
            )));
        }
        let old = inner.l1.lock().expect("lock").insert(
            key,
            L1Copy {
                mr: Arc::new(own),
                len,
                crc,
                mapped: false,
            },
        );
        if let Some(old) = old {
            inner.recycle(old);
        }
        Ok(len as u64)
    }
}

impl Inner {
    /// Versions of `owner` safe at `level`, ascending.
    pub(super) fn safe_versions(&self, owner: &str, level: Level) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .safe
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, s)| k.0 == owner && s[level as usize])
            .map(|(k, _)| k.1)
            .collect();
        v.sort_unstable();
        v
    }

    /// Drops versions beyond the newest `keep` safe at `level` (so space goes only once a
    /// newer version is safe there); under retention by line, only those older than the
    /// owner's floor as well.
    pub(super) fn retain(&self, owner: &str, level: Level) {
        let keep = self.cfg.keep.max(1);
        let versions = self.safe_versions(owner, level);
        if versions.len() <= keep {
            return;
        }
        let floor = self.retention.floor(owner);
        for &v in versions[..versions.len() - keep]
            .iter()
            .filter(|&&v| floor.is_none_or(|f| v < f))
        {
            let key = (owner.to_string(), v);
            match level {
                Level::L1 => {
                    if let Some(c) = self.l1.lock().expect("lock").remove(&key) {
                        self.recycle(c);
                    }
                }
                Level::L2 => {
                    // Where the copy landed (the buddy may have changed since).
                    let buddy = self
                        .l2_holder(&key)
                        .unwrap_or_else(|| self.buddy_of(self.cfg.node));
                    // A holder the membership reports gone (failed, or drained and left)
                    // took the copy with it: asking it would wait out the fabric's timeout
                    // (10 s per version, which stalled the flush after every drain).
                    if self.is_down(buddy) {
                        if let Some(s) = self.safe.lock().expect("lock").get_mut(&key) {
                            s[level as usize] = false;
                        }
                        continue;
                    }
                    let body = Body::Drop {
                        owner: owner.to_string(),
                        version: v,
                    };
                    if let Err(e) = self.request(buddy, body) {
                        eprintln!("krun-store: dropping {owner} v{v} at node {buddy}: {e}");
                    }
                }
                Level::L3 => {} // the parity holder keeps its newest `keep` sets itself
                Level::L4 => {
                    if let Some(d) = &self.disk {
                        let _ = d.remove(owner, v);
                    }
                }
            }
            if let Some(s) = self.safe.lock().expect("lock").get_mut(&key) {
                s[level as usize] = false;
            }
        }
    }
}
