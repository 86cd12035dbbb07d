//! One-sided windows: memory every rank registers with its fabric endpoint, allocated
//! collectively (like `MPI_Win_allocate`), that other ranks put to, get from and update
//! with 64-bit atomics. An operation has completed at the target when the call returns;
//! order accesses between ranks with [`Rank::barrier`].
use std::sync::{Arc, Mutex};

use fabric::{MemoryRegion, Region, RemoteRegion};

use crate::error::{RankError, Result};
use crate::world::Rank;

/// A rank's registered window memory and its copy buffer.
#[derive(Default)]
pub(crate) struct WindowTable {
    inner: Mutex<Tables>,
    /// Bounce buffer for puts and gets from memory the fabric does not know.
    staging: Mutex<Option<MemoryRegion>>,
}

#[derive(Default)]
struct Tables {
    next_id: u64,
    locals: Vec<(u64, MemoryRegion)>,
}

impl WindowTable {
    /// The registered region holding `ptr..ptr+len`, and the offset of `ptr` in it.
    fn containing(&self, ptr: *const u8, len: usize) -> Option<(MemoryRegion, usize)> {
        let tables = self.inner.lock().expect("window table");
        tables.locals.iter().find_map(|(_, mr)| {
            let base = mr.as_ptr() as usize;
            let p = ptr as usize;
            (p >= base && p.checked_add(len)? <= base + mr.len()).then(|| (mr.clone(), p - base))
        })
    }
}

/// A window: this rank's part (local memory) and every rank's descriptor.
pub struct Window {
    id: u64,
    rank: Arc<Rank>,
    local: MemoryRegion,
    len: usize,
    remotes: Vec<(RemoteRegion, u64)>,
}

impl Rank {
    /// Collective: every rank allocates and registers `len` bytes (lengths may differ per
    /// rank) and learns every other rank's window.
    pub fn window(self: &Arc<Self>, len: usize) -> Result<Window> {
        let local = self.register(len)?;
        let mut card = local.remote().to_bytes().to_vec();
        card.extend_from_slice(&(len as u64).to_le_bytes());
        let cards = self.allgather(&card)?;
        let mut remotes = Vec::with_capacity(cards.len());
        for (r, c) in cards.iter().enumerate() {
            if c.len() != RemoteRegion::ENCODED_LEN + 8 {
                return Err(RankError::Protocol {
                    rank: r,
                    reason: format!("window descriptor of {} bytes", c.len()),
                });
            }
            let remote = RemoteRegion::from_bytes(&c[..RemoteRegion::ENCODED_LEN])?;
            let n = u64::from_le_bytes(c[RemoteRegion::ENCODED_LEN..].try_into().expect("8"));
            remotes.push((remote, n));
        }
        let id = {
            let mut t = self.windows.inner.lock().expect("window table");
            let id = t.next_id;
            t.next_id += 1;
            t.locals.push((id, local.clone()));
            id
        };
        Ok(Window {
            id,
            rank: self.clone(),
            local,
            len,
            remotes,
        })
    }
}

impl Window {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This rank's part, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// This rank's part of the window (remote ranks may write it at any time).
    pub fn local(&self) -> &MemoryRegion {
        &self.local
    }

    fn check(
        &self,
        target: usize,
        offset: u64,
        len: usize,
    ) -> Result<(fabric::PeerId, RemoteRegion)> {
        self.rank.msgs.check_rank(target as i64)?;
        let (remote, window_len) = self.remotes[target];
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > window_len)
        {
            return Err(RankError::WindowOutOfBounds {
                window: self.id,
                target,
                offset,
                len: len as u64,
                window_len,
            });
        }
        Ok((self.rank.msgs.peer(target), remote))
    }

    fn staging(&self, len: usize) -> Result<std::sync::MutexGuard<'_, Option<MemoryRegion>>> {
        let mut s = self.rank.windows.staging.lock().expect("staging");
        if s.as_ref().is_none_or(|m| m.len() < len) {
            let size = len.next_power_of_two().max(64 << 10);
            *s = Some(self.rank.ep.register(Region::new(size)?)?);
        }
        Ok(s)
    }

    /// Writes `src[src_offset..+len]` (memory registered with this rank) to `target`'s part
    /// at `offset`, without a copy.
    pub fn put_from(
        &self,
        target: usize,
        offset: u64,
        src: &MemoryRegion,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        let (peer, remote) = self.check(target, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the caller does not write `src` during this blocking call; the window's
        // remote range is ordered by the caller's synchronisation (barriers).
        unsafe {
            self.rank
                .ep
                .write(peer, src, src_offset, len, &remote, offset)?
        };
        Ok(())
    }

    /// Reads `len` bytes at `offset` of `target`'s part into `dst[dst_offset..]` (memory
    /// registered with this rank), without a copy.
    pub fn get_into(
        &self,
        target: usize,
        offset: u64,
        dst: &MemoryRegion,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        let (peer, remote) = self.check(target, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `dst` is written only by this blocking read; the caller orders remote
        // writers of the source range with barriers.
        unsafe {
            self.rank
                .ep
                .read(peer, dst, dst_offset, len, &remote, offset)?
        };
        Ok(())
    }

    /// Writes `data` to `target`'s part at `offset`. Data inside a window of this rank goes
    /// without a copy; other memory through a registered bounce buffer.
    pub fn put(&self, target: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.check(target, offset, data.len())?;
        if let Some((mr, at)) = self.rank.windows.containing(data.as_ptr(), data.len()) {
            return self.put_from(target, offset, &mr, at, data.len());
        }
        let guard = self.staging(data.len())?;
        let stage = guard.as_ref().expect("staging allocated");
        stage.write_bytes(0, data)?;
        self.put_from(target, offset, stage, 0, data.len())
    }

    /// Reads `out.len()` bytes at `offset` of `target`'s part into `out`.
    pub fn get(&self, target: usize, offset: u64, out: &mut [u8]) -> Result<()> {
        self.check(target, offset, out.len())?;
        if let Some((mr, at)) = self.rank.windows.containing(out.as_ptr(), out.len()) {
            return self.get_into(target, offset, &mr, at, out.len());
        }
        let guard = self.staging(out.len())?;
        let stage = guard.as_ref().expect("staging allocated");
        self.get_into(target, offset, stage, 0, out.len())?;
        stage.read_bytes(0, out)?;
        Ok(())
    }

    fn check_atomic(&self, target: usize, offset: u64) -> Result<(fabric::PeerId, RemoteRegion)> {
        let r = self.check(target, offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(RankError::Misaligned {
                window: self.id,
                offset,
            });
        }
        Ok(r)
    }

    /// Atomically adds `add` to the 64-bit word at `offset` of `target`'s part; returns the
    /// previous value.
    pub fn fetch_add(&self, target: usize, offset: u64, add: u64) -> Result<u64> {
        let (peer, remote) = self.check_atomic(target, offset)?;
        Ok(self.rank.ep.fetch_add(peer, &remote, offset, add)?)
    }

    /// Atomically replaces the word at `offset` of `target`'s part with `swap` if it equals
    /// `compare`; returns the previous value (the swap happened iff it equals `compare`).
    pub fn compare_swap(&self, target: usize, offset: u64, compare: u64, swap: u64) -> Result<u64> {
        let (peer, remote) = self.check_atomic(target, offset)?;
        Ok(self
            .rank
            .ep
            .compare_swap(peer, &remote, offset, compare, swap)?)
    }

    /// Collective: waits until every rank is done with the window, then releases it.
    pub fn free(self) -> Result<()> {
        self.rank.barrier()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        let mut t = self.rank.windows.inner.lock().expect("window table");
        t.locals.retain(|(id, _)| *id != self.id);
    }
}
