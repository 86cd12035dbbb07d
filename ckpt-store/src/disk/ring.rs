//! The io_uring pipeline of the writer and the reader.
use super::*;
use io_uring::{opcode, types, IoUring};

pub(super) fn new_ring(entries: u32) -> Result<IoUring> {
    IoUring::new(entries).map_err(|source| StoreError::IoUring {
        what: format!("io_uring_setup({entries})"),
        source,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    Free,
    InFlight,
}

pub(super) struct Slot {
    pub(super) buf: AlignedBuf,
    pub(super) state: SlotState,
    /// File offset and length of the I/O in flight (or last completed).
    pub(super) offset: u64,
    pub(super) len: usize,
}

/// The user_data of the fsync, which has no buffer.
pub(super) const FSYNC_TAG: u64 = u64::MAX;

/// A ring with `depth` pooled buffers, each either free or lent to one I/O in flight.
///
/// The buffer-lifetime contract of every push: a buffer handed to the kernel stays owned by
/// its slot, untouched, until its completion has been reaped; `Drop` reaps every I/O still in
/// flight before the buffers go back to the pool, and leaks them if it cannot. The file is
/// borrowed for the pipeline's lifetime, so its descriptor outlives every I/O.
pub(super) struct Pipeline<'a> {
    pub(super) ring: IoUring,
    pub(super) file: &'a File,
    pub(super) pool: &'a Pool,
    pub(super) slots: Vec<Slot>,
    pub(super) in_flight: usize,
}

pub(super) struct Completion {
    pub(super) tag: u64,
    pub(super) result: i32,
}

impl<'a> Pipeline<'a> {
    pub(super) fn new(file: &'a File, pool: &'a Pool, depth: usize) -> Result<Pipeline<'a>> {
        let ring = new_ring((depth as u32 + 1).next_power_of_two())?;
        let mut slots = Vec::with_capacity(depth);
        for _ in 0..depth {
            slots.push(Slot {
                buf: pool.take()?,
                state: SlotState::Free,
                offset: 0,
                len: 0,
            });
        }
        Ok(Pipeline {
            ring,
            file,
            pool,
            slots,
            in_flight: 0,
        })
    }

    pub(super) fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| s.state == SlotState::Free)
    }

    /// The buffer of a free slot, to fill before a write or to read after a completion.
    pub(super) fn buf(&mut self, slot: usize) -> &mut [u8] {
        debug_assert!(self.slots[slot].state == SlotState::Free);
        self.slots[slot].buf.as_mut_slice()
    }

    pub(super) fn chunk(&self) -> usize {
        self.pool.chunk
    }

    /// Records that `slot` has an I/O of `len` bytes at `offset` in flight.
    pub(super) fn mark_in_flight(&mut self, slot: usize, offset: u64, len: usize) {
        let s = &mut self.slots[slot];
        s.state = SlotState::InFlight;
        s.offset = offset;
        s.len = len;
    }

    /// Submits a write of the first `len` bytes of a free slot's buffer at `offset`.
    pub(super) fn write(&mut self, slot: usize, len: usize, offset: u64) -> std::io::Result<()> {
        let s = &mut self.slots[slot];
        debug_assert!(s.state == SlotState::Free && len <= s.buf.len && len.is_multiple_of(BLOCK));
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), s.buf.ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: the buffer is `len` valid bytes owned by the slot, which is marked in flight
        // below and neither touched nor freed until the completion is reaped (see the type's
        // contract); the descriptor is borrowed for the pipeline's lifetime.
        unsafe { self.push(&entry)? };
        self.mark_in_flight(slot, offset, len);
        Ok(())
    }

    /// Submits a write of `len` bytes at `ptr`, memory of the caller's, using a free slot for
    /// the bookkeeping (its buffer stays unused).
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads of `len` bytes until this I/O's completion has been
    /// reaped: by [`Pipeline::complete`] or, at the latest, by the drain when the pipeline is
    /// dropped. A borrow of the memory that outlives the pipeline guarantees it. (The kernel
    /// only reads this memory, so even a pipeline that cannot drain does not corrupt it.)
    pub(super) unsafe fn write_from(
        &mut self,
        slot: usize,
        ptr: *const u8,
        len: usize,
        offset: u64,
    ) -> std::io::Result<()> {
        debug_assert!(self.slots[slot].state == SlotState::Free);
        debug_assert!((ptr as usize).is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK));
        let entry = opcode::Write::new(types::Fd(self.file.as_raw_fd()), ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: our caller keeps `ptr` valid until the completion is reaped; the
        // descriptor is borrowed for the pipeline's lifetime.
        unsafe { self.push(&entry)? };
        self.mark_in_flight(slot, offset, len);
        Ok(())
    }

    /// Submits a read of `len` bytes at `offset` into a free slot's buffer.
    pub(super) fn read(&mut self, slot: usize, len: usize, offset: u64) -> std::io::Result<()> {
        let s = &mut self.slots[slot];
        debug_assert!(s.state == SlotState::Free && len <= s.buf.len && len.is_multiple_of(BLOCK));
        let entry = opcode::Read::new(types::Fd(self.file.as_raw_fd()), s.buf.ptr, len as u32)
            .offset(offset)
            .build()
            .user_data(slot as u64);
        // SAFETY: as for `write`: the kernel writes into `len` bytes owned by the slot, which
        // nobody reads or frees until the completion is reaped.
        unsafe { self.push(&entry)? };
        self.mark_in_flight(slot, offset, len);
        Ok(())
    }

    /// Submits an fsync of the whole file.
    pub(super) fn fsync(&mut self) -> std::io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .build()
            .user_data(FSYNC_TAG);
        // SAFETY: no buffer; the descriptor is borrowed for the pipeline's lifetime.
        unsafe { self.push(&entry) }
    }

    /// Queues `entry` and submits it.
    ///
    /// # Safety
    ///
    /// Every buffer `entry` points to must stay valid, and must not be accessed except by the
    /// kernel, until the entry's completion has been reaped by [`Pipeline::complete`] (or by
    /// the drain in `Drop`); any descriptor it names must stay open that long.
    unsafe fn push(&mut self, entry: &io_uring::squeue::Entry) -> std::io::Result<()> {
        // SAFETY: forwarded to our caller. The queue has room: it has more entries than
        // slots + the fsync, and each of those has at most one entry in flight.
        if unsafe { self.ring.submission().push(entry) }.is_err() {
            return Err(std::io::Error::other("io_uring submission queue full"));
        }
        self.in_flight += 1;
        // Submit now so the device starts while we fill the next buffer.
        self.submit(0)
    }

    pub(super) fn submit(&mut self, want: usize) -> std::io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for one completion; its slot is free again on return.
    pub(super) fn complete(&mut self) -> std::io::Result<Completion> {
        debug_assert!(self.in_flight > 0);
        loop {
            if let Some(cqe) = self.ring.completion().next() {
                self.in_flight -= 1;
                let tag = cqe.user_data();
                if let Some(s) = self.slots.get_mut(tag as usize) {
                    s.state = SlotState::Free;
                }
                return Ok(Completion {
                    tag,
                    result: cqe.result(),
                });
            }
            self.submit(1)?;
        }
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        // Reap whatever is still in flight (after an error) before the buffers can be reused.
        while self.in_flight > 0 {
            if self.complete().is_err() {
                // The kernel may still write into or read from these buffers: leak them.
                for s in self.slots.drain(..) {
                    std::mem::forget(s.buf);
                }
                return;
            }
        }
        for s in self.slots.drain(..) {
            self.pool.give(s.buf);
        }
    }
}
