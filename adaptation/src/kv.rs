//! A toy key-value service registered through the plug-in interface: each key is a
//! directory entry. Its responses carry the entry's whole state, and the nodes that see a
//! response (the client's node and a witness) keep that copy, so a key survives the failure
//! of its manager: the failure scan sends the copies to the key's new manager, which keeps
//! the newest.
use std::collections::BTreeMap;

use crate::service::{ClientTable, RequestId, Seen, Service};
use crate::view::{EntryId, Epoch};
use crate::wire::{Reader, Writer};

/// A request to the key-value service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    Put(Vec<u8>),
    Get,
    /// Adds to the value read as a little-endian i64 (missing = 0).
    Add(i64),
}

impl KvOp {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            KvOp::Put(v) => w.u8(1).bytes(v),
            KvOp::Get => w.u8(2),
            KvOp::Add(d) => w.u8(3).u64(*d as u64),
        };
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Option<KvOp> {
        let mut r = Reader::new(bytes);
        let op = match r.u8().ok()? {
            1 => KvOp::Put(r.bytes().ok()?),
            2 => KvOp::Get,
            3 => KvOp::Add(r.u64().ok()? as i64),
            _ => return None,
        };
        r.rest().is_empty().then_some(op)
    }
}

/// A key's state: a version bumped by every write, the value and the client table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct KeyState {
    version: u64,
    value: Vec<u8>,
    clients: ClientTable,
}

impl KeyState {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.version).bytes(&self.value);
        self.clients.encode(&mut w.0);
        w.0
    }

    fn decode(bytes: &[u8]) -> Option<KeyState> {
        let mut r = Reader::new(bytes);
        let version = r.u64().ok()?;
        let value = r.bytes().ok()?;
        let (clients, rest) = ClientTable::decode(r.rest())?;
        rest.is_empty().then_some(KeyState {
            version,
            value,
            clients,
        })
    }
}

/// The answer to a request: ok or an error text, the key's version and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvAnswer {
    pub ok: bool,
    pub version: u64,
    pub value: Vec<u8>,
}

impl KvAnswer {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.ok as u8).u64(self.version).bytes(&self.value);
        w.0
    }

    /// The error answered for a key whose every copy was lost.
    pub fn is_lost(&self) -> bool {
        !self.ok && self.value.starts_with(LOST.as_bytes())
    }

    /// The value as an i64 (for `Add`).
    pub fn number(&self) -> i64 {
        number(&self.value)
    }
}

fn number(value: &[u8]) -> i64 {
    value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_le_bytes)
        .unwrap_or(0)
}

/// Splits a response into the answer and the key's state it carries (`None` for the
/// answer about a lost key, which carries no state: nothing to keep a copy of).
fn split_response(payload: &[u8]) -> Option<(KvAnswer, Option<KeyState>)> {
    let mut r = Reader::new(payload);
    let answer = r.bytes().ok()?;
    let state = r.bytes().ok()?;
    if !answer.is_empty() && state.is_empty() {
        return Some((decode_answer(&answer)?, None));
    }
    if answer.is_empty() {
        // A witness copy: the state without an answer.
        let state = KeyState::decode(&state)?;
        return Some((
            KvAnswer {
                ok: false,
                version: state.version,
                value: Vec::new(),
            },
            Some(state),
        ));
    }
    Some((decode_answer(&answer)?, Some(KeyState::decode(&state)?)))
}

fn decode_answer(answer: &[u8]) -> Option<KvAnswer> {
    let mut a = Reader::new(answer);
    let ok = a.u8().ok()? == 1;
    let version = a.u64().ok()?;
    let value = a.bytes().ok()?;
    a.rest()
        .is_empty()
        .then_some(KvAnswer { ok, version, value })
}

/// The start of the error text answered for a key whose every copy was lost.
pub const LOST: &str = "lost:";

/// Parses a response of the key-value service.
pub fn parse_answer(payload: &[u8]) -> Option<KvAnswer> {
    split_response(payload).map(|(a, _)| a)
}

/// The key-value service of one node.
pub struct KvService {
    /// Keys this node manages.
    keys: BTreeMap<EntryId, KeyState>,
    /// Copies seen in responses (for rebuilding keys whose manager failed).
    copies: BTreeMap<EntryId, KeyState>,
    /// How many requests this node executed (not answered from a client table).
    pub executed: u64,
    size_hint: Option<u64>,
    /// Failures the keys survive at once: each key has a copy at its manager and at this
    /// many witnesses (f + 1 copies). Default 1.
    tolerate: usize,
}

impl Default for KvService {
    fn default() -> Self {
        KvService {
            keys: BTreeMap::new(),
            copies: BTreeMap::new(),
            executed: 0,
            size_hint: None,
            tolerate: 1,
        }
    }
}

impl KvService {
    pub fn new() -> KvService {
        KvService::default()
    }

    /// A store expecting about `entries` keys: the locator places it on a sub-tree of cells.
    pub fn with_size_hint(entries: u64) -> KvService {
        KvService {
            size_hint: Some(entries),
            ..KvService::default()
        }
    }

    /// Keys that survive `f` simultaneous failures: f + 1 copies (the manager and `f`
    /// witnesses, the members following it in the view).
    pub fn tolerating(mut self, f: usize) -> KvService {
        self.tolerate = f;
        self
    }

    /// The value of a key this node manages.
    pub fn value(&self, key: EntryId) -> Option<&[u8]> {
        self.keys.get(&key).map(|s| s.value.as_slice())
    }

    fn merge(into: &mut BTreeMap<EntryId, KeyState>, key: EntryId, state: KeyState) {
        match into.get(&key) {
            Some(old) if old.version >= state.version => {}
            _ => {
                into.insert(key, state);
            }
        }
    }
}

impl Service for KvService {
    fn name(&self) -> &str {
        "kv"
    }

    fn size_hint(&self) -> Option<u64> {
        self.size_hint
    }

    fn witnesses(&self) -> usize {
        self.tolerate
    }

    fn holds(&self, entry: EntryId) -> bool {
        self.keys.contains_key(&entry)
    }

    fn lost(&mut self, entry: EntryId, _id: RequestId, request: &[u8]) -> Option<Vec<u8>> {
        // A put sets the whole value: it recreates the key. Anything else needs the value
        // that was lost.
        if let Some(KvOp::Put(_)) = KvOp::decode(request) {
            return None;
        }
        let answer = KvAnswer {
            ok: false,
            version: 0,
            value: format!(
                "{LOST} key {entry} was lost: its manager and every witness of it failed \
                 together (a put writes it anew)"
            )
            .into_bytes(),
        }
        .encode();
        let mut w = Writer::default();
        w.bytes(&answer).bytes(&[]);
        Some(w.0)
    }

    fn forget_lost(&mut self, lost: &dyn Fn(EntryId) -> bool) {
        self.keys.retain(|k, _| !lost(*k));
        self.copies.retain(|k, _| !lost(*k));
    }

    fn handle(&mut self, entry: EntryId, id: RequestId, request: &[u8]) -> Vec<u8> {
        let state = self.keys.entry(entry).or_default();
        let answer = match state.clients.check(id) {
            Seen::Answered(answer) => answer,
            Seen::Stale => KvAnswer {
                ok: false,
                version: state.version,
                value: b"stale request".to_vec(),
            }
            .encode(),
            Seen::New => {
                self.executed += 1;
                let answer = match KvOp::decode(request) {
                    None => KvAnswer {
                        ok: false,
                        version: state.version,
                        value: b"malformed request".to_vec(),
                    },
                    Some(KvOp::Get) => KvAnswer {
                        ok: true,
                        version: state.version,
                        value: state.value.clone(),
                    },
                    Some(KvOp::Put(v)) => {
                        state.version += 1;
                        state.value = v;
                        KvAnswer {
                            ok: true,
                            version: state.version,
                            value: state.value.clone(),
                        }
                    }
                    Some(KvOp::Add(d)) => {
                        state.version += 1;
                        state.value = number(&state.value).wrapping_add(d).to_le_bytes().to_vec();
                        KvAnswer {
                            ok: true,
                            version: state.version,
                            value: state.value.clone(),
                        }
                    }
                }
                .encode();
                state.clients.record(id, &answer);
                answer
            }
        };
        let mut w = Writer::default();
        w.bytes(&answer).bytes(&state.encode());
        w.0
    }

    fn observe_response(&mut self, entry: EntryId, response: &[u8]) {
        if let Some((_, Some(state))) = split_response(response) {
            Self::merge(&mut self.copies, entry, state);
        }
    }

    fn witness_copy(&self, entry: EntryId) -> Option<Vec<u8>> {
        let state = self.keys.get(&entry)?;
        let mut w = Writer::default();
        w.bytes(&[]).bytes(&state.encode());
        Some(w.0)
    }

    fn handover_copies(&mut self) -> Vec<(EntryId, Vec<u8>)> {
        std::mem::take(&mut self.copies)
            .into_iter()
            .map(|(k, state)| {
                let mut w = Writer::default();
                w.bytes(&[]).bytes(&state.encode());
                (k, w.0)
            })
            .collect()
    }

    fn managed(&self) -> Vec<EntryId> {
        self.keys.keys().copied().collect()
    }

    fn before_migration(&mut self, _epoch: Epoch, _leaving: &[EntryId]) {}

    fn send_out(&mut self, entry: EntryId) -> Option<Vec<u8>> {
        self.keys.remove(&entry).map(|s| s.encode())
    }

    fn receive(&mut self, entry: EntryId, state: Vec<u8>) {
        if let Some(s) = KeyState::decode(&state) {
            Self::merge(&mut self.keys, entry, s);
        }
    }

    fn scan(&mut self, orphan: &dyn Fn(EntryId) -> bool) -> Vec<(EntryId, Vec<u8>)> {
        self.copies
            .iter()
            .filter(|(k, _)| orphan(**k))
            .map(|(k, s)| (*k, s.encode()))
            .collect()
    }
}

/// The state of a key holding `value` at version 1 (bulk loading through
/// [`Service::receive`]).
pub fn state_with_value(value: &[u8]) -> Vec<u8> {
    KeyState {
        version: 1,
        value: value.to_vec(),
        clients: ClientTable::default(),
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> RequestId {
        RequestId {
            origin: 1,
            client: 2,
            seq,
        }
    }

    #[test]
    fn a_lost_key_is_answered_lost_until_a_put_writes_it_anew() {
        let mut kv = KvService::new().tolerating(2);
        assert_eq!(kv.witnesses(), 2);
        let answer = kv.lost(7, id(1), &KvOp::Get.encode()).expect("a lost read");
        let a = parse_answer(&answer).unwrap();
        assert!(a.is_lost() && !a.ok, "{a:?}");
        assert!(String::from_utf8_lossy(&a.value).contains("key 7"));
        // Nothing to keep a copy of: an observer of this answer keeps nothing.
        kv.observe_response(7, &answer);
        assert!(kv.scan(&|_| true).is_empty());
        assert!(kv.lost(7, id(2), &KvOp::Add(1).encode()).is_some());
        // A put recreates it: the layer executes it.
        assert!(kv
            .lost(7, id(3), &KvOp::Put(b"x".to_vec()).encode())
            .is_none());
        let put = kv.handle(7, id(3), &KvOp::Put(b"x".to_vec()).encode());
        assert!(parse_answer(&put).unwrap().ok);
        assert!(kv.holds(7));
    }

    #[test]
    fn forgetting_lost_entries_drops_the_managed_ones_and_the_copies() {
        let mut kv = KvService::new();
        for k in 0..4 {
            kv.receive(k, state_with_value(b"v"));
        }
        let copy = kv.witness_copy(1).unwrap();
        kv.observe_response(9, &copy);
        kv.observe_response(10, &copy);
        kv.forget_lost(&|e| e % 2 == 1 || e == 9);
        assert_eq!(kv.managed(), vec![0, 2]);
        let left: Vec<EntryId> = kv.scan(&|_| true).into_iter().map(|(e, _)| e).collect();
        assert_eq!(left, vec![10]);
    }
}
