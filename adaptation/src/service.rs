//! The plug-in interface of a distributed service (a DSM directory, the checkpoint store's
//! catalogue, a process table): the callbacks the migration protocol and failure repair need.
//!
//! A service never knows where an entry's manager is: clients address a request to
//! `(service, entry)` and the protocol delivers it to the entry's current manager, delaying
//! it during a change and forwarding it afterwards.
use crate::view::{EntryId, Epoch, NodeId};

/// Index of a service in registration order (every node registers the same services in the
/// same order).
pub type ServiceId = u16;

/// Who issued a request: the node it entered through, a client of that node, and the
/// client's sequence number. A retried request keeps its id.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RequestId {
    pub origin: NodeId,
    pub client: u32,
    pub seq: u64,
}

/// A distributed service managed through the adaptation layer.
///
/// Requests may be delivered more than once (a client retries after its manager failed, or a
/// delayed copy arrives after the retry): `handle` must answer a repeated `RequestId` from the
/// entry's state without executing it again (see [`ClientTable`]).
pub trait Service: Send {
    fn name(&self) -> &str;
    /// Expected number of entries; the locator places the service on a sub-tree of cells
    /// big enough for it. `None`: the whole tree.
    fn size_hint(&self) -> Option<u64> {
        None
    }
    /// Nodes beyond the manager that observe every response before the client gets it, so
    /// that an entry survives the failure of its manager (rebuilt by [`Service::scan`]).
    fn witnesses(&self) -> usize {
        0
    }
    /// Executes a request at the entry's manager.
    fn handle(&mut self, entry: EntryId, id: RequestId, request: &[u8]) -> Vec<u8>;
    /// A response seen at the node the request entered through, or at a witness: keep what
    /// is needed to rebuild the entry if its manager fails (as a DSM keeps page copies).
    fn observe_response(&mut self, entry: EntryId, response: &[u8]) {
        let _ = (entry, response);
    }
    /// Entries this node manages now.
    fn managed(&self) -> Vec<EntryId>;
    /// Step 1: a change to `epoch` starts; `leaving` are the entries this node hands over.
    fn before_migration(&mut self, epoch: Epoch, leaving: &[EntryId]) {
        let _ = (epoch, leaving);
    }
    /// Step 2: the state of an entry that leaves this node (it is forgotten here).
    fn send_out(&mut self, entry: EntryId) -> Option<Vec<u8>>;
    /// Step 3: the state of an entry that arrives. After a failure several nodes may send
    /// what they know of the same entry: merge (keep the newest).
    fn receive(&mut self, entry: EntryId, state: Vec<u8>);
    /// Step 4: the change to `epoch` is over on this node.
    fn after_migration(&mut self, epoch: Epoch) {
        let _ = epoch;
    }
    /// What a witness of `entry` keeps, in the form [`Service::observe_response`] takes:
    /// after a change the manager sends it to the entry's witnesses when the entry arrived
    /// or its witnesses changed, so the entry again survives the failure of its manager.
    fn witness_copy(&self, entry: EntryId) -> Option<Vec<u8>> {
        let _ = entry;
        None
    }
    /// A leaving node's copies of entries it does not manage (what [`Service::scan`] would
    /// use), in the form [`Service::observe_response`] takes: handed to a node that stays,
    /// so that a failure while this node leaves does not take the last copy with it.
    fn handover_copies(&mut self) -> Vec<(EntryId, Vec<u8>)> {
        Vec::new()
    }
    /// Whether this node manages `entry` now (default: through [`Service::managed`]; the
    /// layer asks only for entries in a range marked lost).
    fn holds(&self, entry: EntryId) -> bool {
        self.managed().contains(&entry)
    }
    /// A request for an entry this node manages but does not hold, in a range whose copies
    /// were lost (the entries' manager and every one of its witnesses failed together; see
    /// the failure repair in [`crate::protocol`]): `Some(answer)` answers it without
    /// executing it (a read must be told the entry was lost, never be served an empty
    /// one); `None` executes it with [`Service::handle`] (a request that sets the whole
    /// entry, which recreates it). The default is `None`: a service that does not
    /// implement it serves a lost entry as a new one.
    fn lost(&mut self, entry: EntryId, id: RequestId, request: &[u8]) -> Option<Vec<u8>> {
        let _ = (entry, id, request);
        None
    }
    /// Entries matching `lost` lost their newest copy (what is left may be stale): forget
    /// what this node holds of them, managed entries and copies alike, so that an old copy
    /// is never served nor used to rebuild one later. Default: keep everything.
    fn forget_lost(&mut self, lost: &dyn Fn(EntryId) -> bool) {
        let _ = lost;
    }
    /// Failure repair: what this node knows locally of orphan entries (`orphan(entry)` is
    /// true for entries whose manager failed), as states to merge at their new manager.
    fn scan(&mut self, orphan: &dyn Fn(EntryId) -> bool) -> Vec<(EntryId, Vec<u8>)>;
}

/// Per entry, the last request each client had executed and its answer: what makes a
/// repeated request harmless. Services keep one in each entry's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTable {
    last: std::collections::BTreeMap<(NodeId, u32), (u64, Vec<u8>)>,
}

/// What to do with a request, according to the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Never executed: execute it.
    New,
    /// Executed already: answer this again.
    Answered(Vec<u8>),
    /// Older than the client's last request: the client has moved on; answer nothing new.
    Stale,
}

impl ClientTable {
    pub fn check(&self, id: RequestId) -> Seen {
        match self.last.get(&(id.origin, id.client)) {
            Some((seq, answer)) if *seq == id.seq => Seen::Answered(answer.clone()),
            Some((seq, _)) if *seq > id.seq => Seen::Stale,
            _ => Seen::New,
        }
    }

    pub fn record(&mut self, id: RequestId, answer: &[u8]) {
        self.last
            .insert((id.origin, id.client), (id.seq, answer.to_vec()));
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.last.len() as u32).to_le_bytes());
        for ((origin, client), (seq, answer)) in &self.last {
            out.extend_from_slice(&origin.to_le_bytes());
            out.extend_from_slice(&client.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
            out.extend_from_slice(&(answer.len() as u32).to_le_bytes());
            out.extend_from_slice(answer);
        }
    }

    /// Parses [`ClientTable::encode`]'s output at the start of `bytes`; returns the table
    /// and the rest, or `None` when the bytes are not a table.
    pub fn decode(bytes: &[u8]) -> Option<(ClientTable, &[u8])> {
        let mut r = crate::wire::Reader::new(bytes);
        let n = r.u32().ok()?;
        let mut table = ClientTable::default();
        for _ in 0..n {
            let origin = r.u32().ok()?;
            let client = r.u32().ok()?;
            let seq = r.u64().ok()?;
            let answer = r.bytes().ok()?;
            table.last.insert((origin, client), (seq, answer));
        }
        Some((table, r.rest()))
    }
}
