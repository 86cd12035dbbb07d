//! The built-in workload of the main job: every node writes a block into every other
//! node's memory with one-sided RMA writes, counts itself in with a remote fetch-add, elects
//! a leader with compare-swap, reads its block back from a neighbour, and verifies every
//! byte it received.
use std::time::{Duration, Instant};

use fabric::bootstrap::BootstrapClient;
use fabric::{Endpoint, EndpointAddress, FabricError, PeerId, Region, RemoteRegion};

use crate::error::{LauncherError, Result};

/// Bytes each node writes into each other node.
pub const BLOCK: usize = 8 << 20;
/// The header page holds the job counter (offset 0) and the leader word (offset 8).
const HEADER: usize = 4096;
const COUNTER: u64 = 0;
const LEADER: u64 = 8;

/// The byte at `offset` of the block written by `node`: cheap, and different per node.
fn pattern(node: usize, offset: usize) -> u8 {
    let x = ((offset as u64) ^ ((node as u64 + 1) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

fn fill_block(node: usize) -> Vec<u8> {
    (0..BLOCK).map(|o| pattern(node, o)).collect()
}

/// FNV-1a: a checksum printed so runs can be compared by eye.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn gbs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

/// What one node learned; printed by the node and checked by tests.
#[derive(Debug)]
pub struct ExchangeReport {
    pub verified_blocks: usize,
    pub counter_after_barrier: Option<u64>,
    pub leader: u64,
}

pub fn run(ep: &dyn Endpoint, boot: &mut BootstrapClient) -> Result<ExchangeReport> {
    let me = boot.rank();
    let n = boot.size();
    let say = |msg: String| println!("node {me}/{n}: {msg}");
    let memory = ep.register(Region::new(HEADER + n * BLOCK)?)?;
    let source = ep.register(Region::new(BLOCK)?)?;
    let block = fill_block(me);
    source.write_bytes(0, &block)?;

    // Swap endpoint addresses and region descriptors.
    let mut card = ep.address().to_bytes();
    card.extend_from_slice(&memory.remote().to_bytes());
    let cards = boot.allgather(&card)?;
    let mut peers: Vec<(PeerId, RemoteRegion)> = Vec::with_capacity(n);
    for (rank, c) in cards.iter().enumerate() {
        if c.len() < RemoteRegion::ENCODED_LEN {
            return Err(LauncherError::Node {
                node: rank,
                message: "sent a malformed address card".into(),
            });
        }
        let (addr, region) = c.split_at(c.len() - RemoteRegion::ENCODED_LEN);
        let peer = ep.connect(&EndpointAddress::from_bytes(addr)?)?;
        peers.push((peer, RemoteRegion::from_bytes(region)?));
    }
    say(format!(
        "endpoint on {} up, {} peers connected",
        ep.provider(),
        n - 1
    ));

    // 1. One-sided writes of my block into slot `me` of every other node, in rounds: in
    // round k node i writes to node i+k. First contact between two endpoints then goes one
    // way at a time (libfabric 1.17's rxm can fail a connection both sides open at once);
    // the round where i+k and i-k meet (k = n/2, n even) is split in two.
    let start = Instant::now();
    for k in 1..n {
        let halves: &[bool] = if 2 * k == n { &[true, false] } else { &[true] };
        for &first_half in halves {
            let mine = 2 * k != n || (me < n / 2) == first_half;
            if mine {
                let (peer, remote) = peers[(me + k) % n];
                // SAFETY: `source` is not modified while the write is in flight, and each
                // node owns its own slot in every target.
                unsafe {
                    ep.write(
                        peer,
                        &source,
                        0,
                        BLOCK,
                        &remote,
                        (HEADER + me * BLOCK) as u64,
                    )?
                };
            }
            boot.barrier()?;
        }
    }
    let took = start.elapsed();
    say(format!(
        "wrote {} MiB into each of {} nodes with RMA writes in {:.1} ms ({:.2} GB/s)",
        BLOCK >> 20,
        n - 1,
        took.as_secs_f64() * 1e3,
        gbs(BLOCK * (n - 1), took)
    ));

    // 2. Count myself in on node 0 and try to become leader.
    let (root, root_region) = peers[0];
    let before = ep.fetch_add(root, &root_region, COUNTER, 1)?;
    let previous = ep.compare_swap(root, &root_region, LEADER, 0, me as u64 + 1)?;
    let leader = if previous == 0 {
        me as u64 + 1
    } else {
        previous
    };
    say(format!(
        "fetch-add on node 0's counter returned {before}; leader election by compare-swap: {}",
        if previous == 0 {
            "won".to_string()
        } else {
            format!("node {} won", previous - 1)
        }
    ));
    boot.barrier()?;

    // 3. Verify every block written into my memory.
    let mut verified = 0;
    let mut slot = vec![0u8; BLOCK];
    for rank in (0..n).filter(|&r| r != me) {
        memory.read_bytes(HEADER + rank * BLOCK, &mut slot)?;
        if slot != fill_block(rank) {
            let first = slot
                .iter()
                .enumerate()
                .position(|(o, &b)| b != pattern(rank, o))
                .unwrap_or(0);
            return Err(LauncherError::Node {
                node: me,
                message: format!("block from node {rank} is wrong at byte {first}"),
            });
        }
        verified += 1;
        say(format!(
            "block from node {rank} verified (fnv1a {:016x})",
            fnv1a(&slot)
        ));
    }

    // 4. Read my block back from my right neighbour with an RMA read.
    let right = (me + 1) % n;
    if right != me {
        let (peer, remote) = peers[right];
        let back = ep.register(Region::new(BLOCK)?)?;
        let start = Instant::now();
        // SAFETY: `back` is private to this call; the remote slot is not written any more.
        unsafe { ep.read(peer, &back, 0, BLOCK, &remote, (HEADER + me * BLOCK) as u64)? };
        let took = start.elapsed();
        back.read_bytes(0, &mut slot)?;
        if slot != block {
            return Err(LauncherError::Node {
                node: me,
                message: format!("block read back from node {right} differs"),
            });
        }
        say(format!(
            "read my block back from node {right} with an RMA read in {:.1} ms ({:.2} GB/s): identical",
            took.as_secs_f64() * 1e3,
            gbs(BLOCK, took)
        ));
    }
    boot.barrier()?;
    let counter = if me == 0 {
        let c = memory
            .atomic_u64(COUNTER as usize)?
            .load(std::sync::atomic::Ordering::SeqCst);
        say(format!("job counter after the barrier: {c} (expected {n})"));
        if c != n as u64 {
            return Err(LauncherError::Fabric(FabricError::Remote {
                op: "fetch-add",
                peer: PeerId(0),
                message: format!("counter is {c}, expected {n}"),
            }));
        }
        Some(c)
    } else {
        None
    };
    boot.barrier()?;
    Ok(ExchangeReport {
        verified_blocks: verified,
        counter_after_barrier: counter,
        leader,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_between_nodes() {
        assert_ne!(fill_block(0)[..64], fill_block(1)[..64]);
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
    }
}
