//! The DSM directory: page -> owner, kept by each page's manager. The copyset lives at the
//! owner (IVY's improved centralized manager): the manager serializes ownership changes and
//! tells a requester's request where the owner is; the owner invalidates copies.
//!
//! [`DirectoryService`] registers the directory with the adaptation layer
//! ([`adaptation::service::Service`]): entries migrate to their new managers on joins and
//! leaves, and after a failure every node's scan reports the copies it holds, from which the
//! new manager rebuilds each entry: the surviving owner if it claims the page, else a surviving
//! read copy promoted to owner (with the other copies as its copyset). A page that was written
//! but whose every copy died is reported as **lost** (for the HA policy to restore from a
//! checkpoint), never handed out as a zero page.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use adaptation::locator::{CellTreeLocator, LocatorConfig, Modulo, Placement};
use adaptation::service::{RequestId, Service};
use adaptation::view::{EntryId, Epoch};
use serde::{Deserialize, Serialize};

use crate::coherence::{Access, Holding, NodeId, PageId};

/// How a page's manager is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocatorKind {
    /// Kerrighed's static scheme: `nodes[page % N]`.
    Modulo,
    /// The adaptation layer's cell-tree locator.
    CellTree,
}

impl LocatorKind {
    pub fn build(self, nodes: &[NodeId]) -> Box<dyn Placement + Send> {
        match self {
            LocatorKind::Modulo => Box::new(Modulo::new(nodes)),
            LocatorKind::CellTree => Box::new(CellTreeLocator::new(
                LocatorConfig {
                    buckets: 1 << 12,
                    max_cell: 16,
                },
                nodes,
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LocatorKind::Modulo => "static",
            LocatorKind::CellTree => "dynamic",
        }
    }
}

/// What the manager does with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManagerDecision {
    /// The page was never owned: the requester becomes its owner with a zero page.
    GrantZero,
    /// Forward the request to this owner.
    Forward(NodeId),
}

/// The entries one manager holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    owners: BTreeMap<PageId, NodeId>,
    /// For entries writes moved: the owners the writes were forwarded to, oldest first (at
    /// most [`CHAIN`]). Until they passed the page on, the recorded owner does not hold
    /// it; if one of them died first, the entry must be rebuilt ([`Directory::broken`]).
    forwarded: BTreeMap<PageId, Vec<NodeId>>,
    /// Pages that were written and lost every copy: requests for them are refused.
    lost: BTreeSet<PageId>,
}

impl Directory {
    /// A request from `who`; a write names `who` the owner from now on.
    pub fn request(&mut self, page: PageId, who: NodeId, access: Access) -> ManagerDecision {
        match self.owners.get(&page).copied() {
            None => {
                self.owners.insert(page, who);
                ManagerDecision::GrantZero
            }
            Some(owner) => {
                if access == Access::Write && owner != who {
                    self.owners.insert(page, who);
                    let chain = self.forwarded.entry(page).or_default();
                    chain.push(owner);
                    if chain.len() > CHAIN {
                        chain.remove(0);
                    }
                }
                ManagerDecision::Forward(owner)
            }
        }
    }

    /// `node` died: forgets the entries that name it as the owner; returns their pages, to
    /// be rebuilt from the survivors' copies.
    pub fn forget_failed(&mut self, node: NodeId) -> Vec<PageId> {
        let pages: Vec<PageId> = self
            .owners
            .iter()
            .filter(|(_, &o)| o == node)
            .map(|(&p, _)| p)
            .collect();
        for p in &pages {
            self.owners.remove(p);
            self.forwarded.remove(p);
        }
        pages
    }

    /// The write forwards of `page` not known done, oldest first.
    pub fn chain(&self, page: PageId) -> Vec<NodeId> {
        self.forwarded.get(&page).cloned().unwrap_or_default()
    }

    /// Records `owner` with the forwards that lead to it (a migrated entry).
    pub fn set_entry(&mut self, page: PageId, owner: NodeId, chain: Vec<NodeId>) {
        self.owners.insert(page, owner);
        if chain.is_empty() {
            self.forwarded.remove(&page);
        } else {
            self.forwarded.insert(page, chain);
        }
    }

    /// After a failure's scan: whether the entry of `page` names an owner that will never
    /// hold it. `claims`: the live nodes that hold the page as owner (or are being handed
    /// it). The recorded owner holds it, or a write forwarded to it waits at an earlier
    /// owner in the chain: walking back from the latest forward, a claimant keeps the
    /// record (the transfers go on from it), a dead node breaks it (they never will).
    pub fn broken(&self, page: PageId, claims: &BTreeSet<NodeId>, dead: &BTreeSet<NodeId>) -> bool {
        let Some(owner) = self.owner(page) else {
            return false;
        };
        if claims.contains(&owner) {
            return false;
        }
        for n in self.chain(page).iter().rev() {
            if dead.contains(n) {
                return true;
            }
            if claims.contains(n) {
                return false;
            }
        }
        false
    }

    /// Records `page` as lost (every copy died): requests for it are refused from now on.
    pub fn mark_lost(&mut self, page: PageId) {
        self.owners.remove(&page);
        self.forwarded.remove(&page);
        self.lost.insert(page);
    }

    /// The pages this manager knows lost.
    pub fn lost_pages(&self) -> Vec<PageId> {
        self.lost.iter().copied().collect()
    }

    /// Records `owner` as the page's owner (a region restored from a checkpoint: the
    /// owners are the ranks whose snapshot holds the page).
    pub fn set_owner(&mut self, page: PageId, owner: NodeId) {
        self.forwarded.remove(&page);
        self.owners.insert(page, owner);
    }

    /// Forgets the entry of `page` (it leaves this manager); returns its owner.
    pub fn remove(&mut self, page: PageId) -> Option<NodeId> {
        self.forwarded.remove(&page);
        self.owners.remove(&page)
    }

    pub fn owner(&self, page: PageId) -> Option<NodeId> {
        self.owners.get(&page).copied()
    }

    pub fn pages(&self) -> impl Iterator<Item = (PageId, NodeId)> + '_ {
        self.owners.iter().map(|(&p, &o)| (p, o))
    }

    pub fn is_lost(&self, page: PageId) -> bool {
        self.lost.contains(&page)
    }
}

/// An entry's state in migration and in the failure scan (postcard-encoded).
/// Write forwards kept per entry ([`Directory::chain`]).
pub const CHAIN: usize = 8;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct EntryState {
    version: u8,
    /// The owner a live manager had on record (migration).
    owner: Option<NodeId>,
    /// Its write forwards not known done ([`Directory::chain`]).
    chain: Vec<NodeId>,
    /// Nodes that hold the page as its owner (the failure scan), for entries without a
    /// live record (records naming a dead node, or the dead node's own entries).
    claims: BTreeSet<NodeId>,
    /// Surviving nodes holding a valid copy.
    holders: BTreeSet<NodeId>,
    /// Someone knows the page was owned once (so it is not a zero page).
    touched: bool,
}

const STATE_VERSION: u8 = 2;

impl EntryState {
    fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    fn encode_touched(mut self) -> Vec<u8> {
        self.touched = true;
        self.encode()
    }

    fn decode(bytes: &[u8]) -> Option<EntryState> {
        let s: EntryState = postcard::from_bytes(bytes).ok()?;
        (s.version == STATE_VERSION).then_some(s)
    }

    fn merge(&mut self, other: EntryState) {
        if self.owner.is_none() {
            self.owner = other.owner;
            self.chain = other.chain;
        }
        self.claims.extend(other.claims);
        self.holders.extend(other.holders);
        self.touched |= other.touched;
    }
}

/// The state a failure scan of node `me` reports for a page: `claim` names the page's owner
/// (`me`, or the node `me` is handing the page over to), `copy` that `me` holds a valid
/// copy; with neither, `me` only knows the page was written once.
pub fn scan_state(me: NodeId, claim: Option<NodeId>, copy: bool) -> Vec<u8> {
    EntryState {
        version: STATE_VERSION,
        owner: None,
        chain: Vec::new(),
        claims: claim.into_iter().collect(),
        holders: if copy {
            [me].into_iter().collect()
        } else {
            BTreeSet::new()
        },
        touched: true,
    }
    .encode()
}

/// What a rebuilt entry asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    /// The node holding a read copy that becomes the owner.
    pub owner: NodeId,
    pub page: PageId,
    /// The other surviving copies.
    pub copyset: Vec<NodeId>,
}

/// The local node's page holdings, read by the failure scan.
pub type Holdings = Arc<Mutex<Vec<(Holding, NodeId)>>>;

/// The directory as a service of the adaptation layer.
pub struct DirectoryService {
    me: NodeId,
    pub directory: Directory,
    /// This node's holdings with each page's probable owner (the driver refreshes them).
    holdings: Holdings,
    /// Nodes known to have failed.
    dead: BTreeSet<NodeId>,
    /// States received during a change, resolved at its end.
    incoming: BTreeMap<PageId, EntryState>,
    promotions: Vec<Promotion>,
    lost: Vec<PageId>,
    /// What the last resolve saw of each page: live claims and live copies.
    seen: BTreeMap<PageId, (BTreeSet<NodeId>, BTreeSet<NodeId>)>,
}

impl DirectoryService {
    /// The live claims and live copies the last resolve saw of `page`.
    pub fn seen(&self, page: PageId) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        self.seen.get(&page).cloned().unwrap_or_default()
    }

    /// Nodes known dead (their claims and copies are not used by the rebuild).
    pub fn set_dead(&mut self, dead: impl IntoIterator<Item = NodeId>) {
        self.dead.extend(dead);
    }

    pub fn new(me: NodeId, holdings: Holdings) -> Self {
        DirectoryService {
            me,
            directory: Directory::default(),
            holdings,
            dead: BTreeSet::new(),
            incoming: BTreeMap::new(),
            promotions: Vec::new(),
            lost: Vec::new(),
            seen: BTreeMap::new(),
        }
    }

    /// A node failed: entries it owned are rebuilt from the next scan.
    pub fn node_failed(&mut self, node: NodeId) {
        self.dead.insert(node);
        for page in self.directory.forget_failed(node) {
            self.incoming.entry(page).or_default().touched = true;
        }
    }

    /// Owners to promote after a rebuild (the driver sends them `Msg::Promote`).
    pub fn take_promotions(&mut self) -> Vec<Promotion> {
        std::mem::take(&mut self.promotions)
    }

    /// Pages found lost since the last call (for the HA policy).
    pub fn take_lost(&mut self) -> Vec<PageId> {
        std::mem::take(&mut self.lost)
    }

    fn resolve(&mut self) {
        for (page, state) in std::mem::take(&mut self.incoming) {
            let live = |s: &BTreeSet<NodeId>| -> BTreeSet<NodeId> {
                s.iter()
                    .copied()
                    .filter(|n| !self.dead.contains(n))
                    .collect()
            };
            self.seen
                .insert(page, (live(&state.claims), live(&state.holders)));
            if self.directory.owners.contains_key(&page) {
                continue;
            }
            // A live manager's record first (the transfer it names settles towards it),
            // then a node that holds the page as owner, then a copy to promote.
            let live_owner = state.owner.filter(|o| !self.dead.contains(o)).or(state
                .claims
                .iter()
                .copied()
                .find(|o| !self.dead.contains(o)));
            let holders: BTreeSet<NodeId> = state
                .holders
                .iter()
                .copied()
                .filter(|h| !self.dead.contains(h))
                .collect();
            if let Some(owner) = live_owner {
                let chain = if state.owner == Some(owner) {
                    state.chain.clone()
                } else {
                    Vec::new()
                };
                self.directory.set_entry(page, owner, chain);
            } else if let Some(&owner) = holders.iter().next() {
                self.directory.owners.insert(page, owner);
                self.promotions.push(Promotion {
                    owner,
                    page,
                    copyset: holders.iter().copied().filter(|&h| h != owner).collect(),
                });
            } else if state.touched {
                self.directory.mark_lost(page);
                self.lost.push(page);
            }
        }
    }
}

/// A request to the directory service: `(access, from)`.
pub fn encode_request(access: Access, from: NodeId) -> Vec<u8> {
    postcard::to_allocvec(&(access == Access::Write, from)).unwrap_or_default()
}

/// The service's answer: `Some(owner)` to forward to, `None` for a zero page; an error text
/// for a malformed request or a lost page.
pub fn decode_answer(bytes: &[u8]) -> Result<Option<NodeId>, String> {
    postcard::from_bytes::<Result<Option<NodeId>, String>>(bytes)
        .map_err(|e| format!("undecodable directory answer: {e}"))?
}

impl Service for DirectoryService {
    fn name(&self) -> &str {
        "dsm-directory"
    }

    fn witnesses(&self) -> usize {
        0
    }

    fn handle(&mut self, entry: EntryId, _id: RequestId, request: &[u8]) -> Vec<u8> {
        // Directory requests are idempotent for reads; a repeated write names the same owner.
        let answer: Result<Option<NodeId>, String> =
            match postcard::from_bytes::<(bool, NodeId)>(request) {
                Err(e) => Err(format!("malformed directory request: {e}")),
                Ok(_) if self.directory.is_lost(entry) => {
                    Err(format!("page {entry} is lost (its only copy died)"))
                }
                Ok((write, from)) => {
                    let access = if write { Access::Write } else { Access::Read };
                    Ok(match self.directory.request(entry, from, access) {
                        ManagerDecision::GrantZero => None,
                        ManagerDecision::Forward(o) => Some(o),
                    })
                }
            };
        postcard::to_allocvec(&answer).unwrap_or_default()
    }

    fn managed(&self) -> Vec<EntryId> {
        self.directory.owners.keys().copied().collect()
    }

    fn send_out(&mut self, entry: EntryId) -> Option<Vec<u8>> {
        let chain = self.directory.chain(entry);
        let owner = self.directory.remove(entry)?;
        Some(
            EntryState {
                version: STATE_VERSION,
                owner: Some(owner),
                chain,
                ..EntryState::default()
            }
            .encode_touched(),
        )
    }

    fn receive(&mut self, entry: EntryId, state: Vec<u8>) {
        if let Some(s) = EntryState::decode(&state) {
            self.incoming.entry(entry).or_default().merge(s);
        }
    }

    fn after_migration(&mut self, _epoch: Epoch) {
        self.resolve();
    }

    fn scan(&mut self, orphan: &dyn Fn(EntryId) -> bool) -> Vec<(EntryId, Vec<u8>)> {
        let holdings = self.holdings.lock().map(|h| h.clone()).unwrap_or_default();
        holdings
            .into_iter()
            .filter(|(h, hint)| orphan(h.page) || self.dead.contains(hint))
            .map(|(h, _)| {
                (
                    h.page,
                    scan_state(self.me, h.owner.then_some(self.me), h.copy || h.owner),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(page: PageId, copy: bool, owner: bool) -> Holding {
        Holding { page, copy, owner }
    }

    fn rid() -> RequestId {
        RequestId {
            origin: 0,
            client: 0,
            seq: 0,
        }
    }

    #[test]
    fn the_first_request_gets_a_zero_page_and_writes_move_ownership() {
        let mut d = Directory::default();
        assert_eq!(d.request(5, 1, Access::Read), ManagerDecision::GrantZero);
        assert_eq!(d.request(5, 2, Access::Read), ManagerDecision::Forward(1));
        assert_eq!(d.request(5, 3, Access::Write), ManagerDecision::Forward(1));
        assert_eq!(d.owner(5), Some(3));
        assert_eq!(d.request(5, 2, Access::Write), ManagerDecision::Forward(3));
    }

    #[test]
    fn entries_migrate_through_send_out_and_receive() {
        let mut a = DirectoryService::new(0, Holdings::default());
        let mut b = DirectoryService::new(1, Holdings::default());
        a.handle(7, rid(), &encode_request(Access::Write, 2));
        assert_eq!(a.managed(), vec![7]);
        let state = a.send_out(7).unwrap();
        assert!(a.managed().is_empty());
        b.receive(7, state);
        b.after_migration(1);
        assert_eq!(b.directory.owner(7), Some(2));
        let answer = b.handle(7, rid(), &encode_request(Access::Read, 3));
        assert_eq!(decode_answer(&answer), Ok(Some(2)));
    }

    /// Node 0 managed pages 1..=3 and died; node 1 owned page 1; nodes 1 and 2 held read
    /// copies of page 2 whose owner was 0; page 3's only copy was at node 0.
    #[test]
    fn a_failure_scan_rebuilds_owners_promotes_copies_and_reports_lost_pages() {
        let h1: Holdings = Arc::new(Mutex::new(vec![
            (holding(1, true, true), 1),
            (holding(2, true, false), 0),
            (holding(3, false, false), 0),
        ]));
        let h2: Holdings = Arc::new(Mutex::new(vec![(holding(2, true, false), 0)]));
        let mut s1 = DirectoryService::new(1, h1);
        let mut s2 = DirectoryService::new(2, h2);
        s1.node_failed(0);
        s2.node_failed(0);
        let orphan = |e: EntryId| (1..=3).contains(&e);
        let mut scanned = s1.scan(&orphan);
        scanned.extend(s2.scan(&orphan));
        // Every entry goes to node 1, the new manager.
        for (e, st) in scanned {
            s1.receive(e, st);
        }
        s1.after_migration(2);
        assert_eq!(s1.directory.owner(1), Some(1));
        assert_eq!(s1.directory.owner(2), Some(1));
        assert_eq!(
            s1.take_promotions(),
            vec![Promotion {
                owner: 1,
                page: 2,
                copyset: vec![2]
            }]
        );
        assert_eq!(s1.take_lost(), vec![3]);
        let answer = s1.handle(3, rid(), &encode_request(Access::Read, 2));
        assert!(decode_answer(&answer).unwrap_err().contains("lost"));
        // A page nobody ever touched stays a zero page.
        let answer = s1.handle(9, rid(), &encode_request(Access::Read, 2));
        assert_eq!(decode_answer(&answer), Ok(None));
    }

    #[test]
    fn an_owner_that_dies_under_a_live_manager_is_replaced_by_a_copy() {
        let h: Holdings = Arc::new(Mutex::new(vec![(holding(4, true, false), 3)]));
        let mut s = DirectoryService::new(1, h);
        s.handle(4, rid(), &encode_request(Access::Write, 3));
        s.node_failed(3);
        for (e, st) in s.scan(&|_| false) {
            s.receive(e, st);
        }
        s.after_migration(3);
        assert_eq!(s.directory.owner(4), Some(1));
        assert_eq!(s.take_promotions().len(), 1);
        assert!(s.take_lost().is_empty());
    }

    #[test]
    fn garbage_requests_and_states_are_refused() {
        let mut s = DirectoryService::new(0, Holdings::default());
        let answer = s.handle(1, rid(), &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(decode_answer(&answer).unwrap_err().contains("malformed"));
        s.receive(1, vec![9, 9, 9]);
        s.after_migration(1);
        assert!(s.managed().is_empty());
        assert!(decode_answer(&[0xff]).is_err());
    }
}
