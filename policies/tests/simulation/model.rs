//! The simulated application (a deterministic stencil-like computation with a known
//! failure-free result) and the model of the multilevel store's copies.
use policies::primitives::{ImageCopy, Level, Millis, NodeId, Rank, Reads, Version};
use std::collections::{BTreeMap, BTreeSet};

pub const STEP_MS: Millis = 10;
pub const STEPS: u64 = 150;
pub const PARITY_SET: u32 = 3;

/// A rank's application state: the step it reached and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppState {
    pub step: u64,
    pub x: u64,
}

pub fn initial(rank: Rank) -> AppState {
    AppState {
        step: 0,
        x: 0x9e37_79b9_7f4a_7c15 ^ u64::from(rank),
    }
}

pub fn mix(me: u64, left: u64, right: u64, step: u64) -> u64 {
    let mut z = me
        .wrapping_mul(31)
        .wrapping_add(left.rotate_left(7))
        .wrapping_add(right.rotate_left(13))
        .wrapping_add(step);
    z ^= z >> 29;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 32)
}

pub fn advance(xs: &mut [u64], step: u64) {
    let n = xs.len();
    let old = xs.to_vec();
    for r in 0..n {
        xs[r] = mix(old[r], old[(r + n - 1) % n], old[(r + 1) % n], step);
    }
}

pub fn reference(n: usize) -> Vec<u64> {
    let mut xs: Vec<u64> = (0..n as Rank).map(|r| initial(r).x).collect();
    for s in 0..STEPS {
        advance(&mut xs, s);
    }
    xs
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcStatus {
    Running,
    Held,
    Exited,
}

#[derive(Clone, Copy, Debug)]
pub struct Proc {
    pub node: NodeId,
    pub incarnation: u32,
    pub status: ProcStatus,
    pub state: AppState,
}

#[derive(Clone, Debug)]
pub struct Img {
    pub data: AppState,
    pub node: NodeId,
    pub buddy: Option<NodeId>,
    pub parity_set: Vec<NodeId>,
    pub holder: Option<NodeId>,
    pub safe: [bool; 4],
    pub bytes: u64,
}

/// The store's index seen through the agreed view (what krund's `Reads` answers).
pub struct StoreIndex<'a> {
    pub store: &'a BTreeMap<(Rank, Version), Img>,
    pub agreed_dead: &'a BTreeSet<NodeId>,
}

pub fn copies_of(img: &Img, alive: &dyn Fn(NodeId) -> bool) -> Vec<ImageCopy> {
    let mut out = Vec::new();
    let c = |level, node| ImageCopy {
        level,
        node,
        bytes: img.bytes,
    };
    if img.safe[0] && alive(img.node) {
        out.push(c(Level::L1, Some(img.node)));
    }
    if let Some(b) = img.buddy.filter(|b| img.safe[1] && alive(*b)) {
        out.push(c(Level::L2, Some(b)));
    }
    if let Some(h) = img.holder.filter(|h| img.safe[2] && alive(*h)) {
        if img.parity_set.iter().filter(|n| !alive(**n)).count() <= 1 {
            out.push(c(Level::L3, Some(h)));
        }
    }
    if img.safe[3] {
        out.push(c(Level::L4, None));
    }
    out
}

impl Reads for StoreIndex<'_> {
    fn copies(&self, rank: Rank, version: Version) -> Vec<ImageCopy> {
        match self.store.get(&(rank, version)) {
            Some(img) => copies_of(img, &|n| !self.agreed_dead.contains(&n)),
            None => Vec::new(),
        }
    }
}
