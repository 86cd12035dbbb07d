//! Where a region goes: rank 0 proposes an address, every rank maps it there or refuses,
//! until one is free on every rank.
use super::*;

impl Dsm {
    /// Maps `bytes` at an address every rank can use: rank 0 proposes, the others map at
    /// the same place (`MAP_FIXED_NOREPLACE`), and a refusal anywhere makes rank 0 propose
    /// another ([`Proposals`]: the kernel's choice first, then random addresses).
    pub(super) fn agree_address(&self, bytes: usize) -> Result<u64> {
        let mut proposals = Proposals::new(bytes);
        for _ in 0..PROPOSALS {
            let proposal = if self.rank == 0 { proposals.next()? } else { 0 };
            let all = self.allgather("alloc address", &proposal.to_le_bytes())?;
            let addr = all
                .first()
                .and_then(|b| b.as_slice().try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| collective("alloc", "malformed address proposal"))?;
            let ok = self.rank == 0 || map(addr, bytes, true).is_ok();
            let oks = self.allgather("alloc address", &[ok as u8])?;
            if oks.iter().all(|b| b == &[1]) {
                if self.rank == 0 {
                    proposals.keep(addr);
                }
                return Ok(addr);
            }
            if ok && self.rank != 0 {
                // SAFETY: we mapped exactly this range just above.
                unsafe { libc::munmap(addr as *mut _, bytes) };
            }
        }
        Err(collective(
            "alloc",
            format!("no address free on every rank after {PROPOSALS} proposals"),
        ))
    }
}

/// Maps `bytes` of private anonymous memory, at `addr` exactly when `fixed`.
pub(super) fn map(addr: u64, bytes: usize, fixed: bool) -> Result<u64> {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | libc::MAP_NORESERVE
        | if fixed { libc::MAP_FIXED_NOREPLACE } else { 0 };
    // SAFETY: anonymous mapping; MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut _,
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED || (fixed && p as u64 != addr) {
        if p != libc::MAP_FAILED {
            // SAFETY: an old kernel placed it elsewhere; undo.
            unsafe { libc::munmap(p, bytes) };
        }
        return Err(DsmError::Os {
            what: format!("mapping {bytes} bytes at {addr:#x}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(p as u64)
}

/// How many addresses rank 0 proposes for a region before the allocation fails.
const PROPOSALS: usize = 16;
/// Random proposals lie in `[RANDOM_LOW, RANDOM_HIGH)`: far from where the kernel places
/// mappings (just below the stack, and the executable's heap), inside the 47-bit user
/// address space of x86-64 and of 48-bit arm64.
const RANDOM_LOW: u64 = 1 << 44;
const RANDOM_HIGH: u64 = 1 << 46;

/// Rank 0's address proposals for one region. The first is where the kernel maps it in
/// rank 0; the others are random. Each proposal stays mapped in rank 0 until the
/// allocation ends, so no proposal is made twice.
///
/// Random, not the kernel's next choice: the kernel places each new mapping just below
/// the previous one, so when another rank has a large mapping (thread stacks, allocator
/// arenas, fabric buffers) where rank 0's first proposal falls, every later proposal fell
/// inside it too and the allocation failed ("no address free on every rank", seen under
/// load in CI).
struct Proposals {
    bytes: usize,
    held: Vec<u64>,
}

impl Proposals {
    fn new(bytes: usize) -> Proposals {
        Proposals {
            bytes,
            held: Vec::new(),
        }
    }

    /// The next address, mapped here.
    fn next(&mut self) -> Result<u64> {
        let addr = if self.held.is_empty() {
            map(0, self.bytes, false)?
        } else {
            self.random().or_else(|_| map(0, self.bytes, false))?
        };
        self.held.push(addr);
        Ok(addr)
    }

    /// A random page-aligned address in the random window that is free here.
    fn random(&self) -> Result<u64> {
        let span = (RANDOM_HIGH - RANDOM_LOW).saturating_sub(self.bytes as u64) / PAGE as u64;
        let mut last = None;
        for _ in 0..32 {
            let r = fabric::random_u64()?;
            let addr = RANDOM_LOW + (r % span.max(1)) * PAGE as u64;
            match map(addr, self.bytes, true) {
                Ok(a) => return Ok(a),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| collective("alloc", "no random address")))
    }

    /// The agreed address: it stays mapped when the other proposals are unmapped.
    fn keep(&mut self, addr: u64) {
        self.held.retain(|&a| a != addr);
    }
}

impl Drop for Proposals {
    fn drop(&mut self) {
        for &a in &self.held {
            // SAFETY: proposals this rank mapped and nobody uses.
            unsafe { libc::munmap(a as *mut _, self.bytes) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another rank whose mappings cover 64 GiB on either side of rank 0's first proposal
    /// (the kernel's choice) refuses it and every address near it: rank 0's later proposals
    /// must leave that neighbourhood (before, each was the kernel's next choice, just
    /// below the last, and all eight were refused).
    #[test]
    fn a_rank_whose_mappings_cover_the_first_proposals_still_gets_an_address() {
        let bytes = 96 * PAGE;
        let mut proposals = Proposals::new(bytes);
        let first = proposals.next().unwrap();
        let taken = 64u64 << 30;
        let refused = |a: u64| a + bytes as u64 > first.saturating_sub(taken) && a < first + taken;
        assert!(refused(first));
        let mut tries = 1;
        let agreed = loop {
            let a = proposals.next().unwrap();
            tries += 1;
            assert!(tries <= PROPOSALS, "every proposal near the first one");
            assert_eq!(a % PAGE as u64, 0);
            if !refused(a) {
                break a;
            }
        };
        proposals.keep(agreed);
        drop(proposals);
        // The agreed proposal is still mapped here (the others were unmapped).
        // SAFETY: mapped read-write by the proposal; unmapped just below.
        unsafe {
            (agreed as *mut u8).write(1);
            libc::munmap(agreed as *mut _, bytes);
        }
    }
}
