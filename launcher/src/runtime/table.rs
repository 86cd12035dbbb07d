//! The process table: a distributed service of the adaptation layer with one entry per rank
//! (rank -> node, pid, state, incarnation, newest checkpoint and the levels it is safe at).
//!
//! Entries live at the manager the locator gives them and move with the 4-step migration
//! like any service's entries. Every response carries the entry's whole state, and one
//! witness beyond the manager keeps that copy, so an entry survives the failure of its
//! manager: the failure scan hands the copies to the new manager, which keeps the newest.
//! Repeated requests (a client retrying after its manager failed) are answered from the
//! entry's client table, not executed twice.
use std::collections::BTreeMap;

use adaptation::service::{ClientTable, RequestId, Seen, Service};
use adaptation::{EntryId, NodeId};
use serde::{Deserialize, Serialize};

/// The service's index: krund registers the process table first.
pub const TABLE_SERVICE: adaptation::service::ServiceId = 0;

/// How the error of an answer about a row that was lost begins (its manager and every
/// witness of it failed together: see [`Service::lost`]).
pub const LOST_ROW: &str = "lost:";

/// Where a rank is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RankState {
    Starting,
    Running,
    Exited(i32),
    /// Its node failed while it ran.
    Lost,
    /// Being moved to another node.
    Migrating,
}

impl std::fmt::Display for RankState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RankState::Starting => f.write_str("starting"),
            RankState::Running => f.write_str("running"),
            RankState::Exited(code) => write!(f, "exited({code})"),
            RankState::Lost => f.write_str("lost"),
            RankState::Migrating => f.write_str("migrating"),
        }
    }
}

/// The newest checkpoint of a rank and the store levels (1-4) it is safe at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub version: u64,
    pub safe_levels: Vec<u8>,
}

/// One rank's row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    pub rank: u64,
    pub node: NodeId,
    pub pid: u32,
    pub state: RankState,
    /// 0 for the first start; every new registration (a restart, a move) adds one.
    pub incarnation: u32,
    pub checkpoint: Option<CheckpointInfo>,
    /// The policy's latest decision about this rank (a restart or a rollback), recorded
    /// before it was carried out.
    #[serde(default)]
    pub decision: Option<String>,
}

/// A request to the process table (the entry is the rank).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TableOp {
    /// The rank was started on `node` as `pid` (a new incarnation if it had a row).
    Register {
        node: NodeId,
        pid: u32,
    },
    SetState(RankState),
    /// A checkpoint `version` is safe at `levels` (merged with what is known of it).
    Checkpointed {
        version: u64,
        levels: Vec<u8>,
    },
    Get,
    /// `node` failed: the rank is lost if it was there and had not exited.
    MarkLost {
        node: NodeId,
    },
    /// The policy decided about the rank (recorded before it is carried out).
    Decided {
        decision: String,
    },
}

/// The answer to a [`TableOp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableAnswer {
    /// `None`: done; otherwise why not.
    pub error: Option<String>,
    pub record: Option<RankRecord>,
}

impl TableAnswer {
    /// The rank's row was lost with every copy of it: only a new registration (a restart)
    /// writes it again.
    pub fn is_lost(&self) -> bool {
        self.error
            .as_deref()
            .is_some_and(|e| e.starts_with(LOST_ROW))
    }
}

/// An entry's state: a version bumped by every write, the row and the client table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Entry {
    version: u64,
    record: Option<RankRecord>,
    clients: ClientTable,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut out =
            postcard::to_allocvec(&(self.version, &self.record)).expect("encoding to memory");
        self.clients.encode(&mut out);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        let ((version, record), rest) =
            postcard::take_from_bytes::<(u64, Option<RankRecord>)>(bytes).ok()?;
        let (clients, rest) = ClientTable::decode(rest)?;
        rest.is_empty().then_some(Entry {
            version,
            record,
            clients,
        })
    }
}

/// A response: the answer (none in a witness copy) and the entry's state.
#[derive(Serialize, Deserialize)]
struct Response {
    answer: Option<TableAnswer>,
    state: Vec<u8>,
}

/// Parses a response of the process table.
pub fn parse_answer(payload: &[u8]) -> Option<TableAnswer> {
    postcard::from_bytes::<Response>(payload).ok()?.answer
}

fn respond(answer: Option<TableAnswer>, entry: &Entry) -> Vec<u8> {
    postcard::to_allocvec(&Response {
        answer,
        state: entry.encode(),
    })
    .expect("encoding to memory")
}

/// Encodes a request.
pub fn encode_op(op: &TableOp) -> Vec<u8> {
    postcard::to_allocvec(op).expect("encoding to memory")
}

/// The process table's part on one node.
#[derive(Default)]
pub struct ProcessTable {
    entries: BTreeMap<EntryId, Entry>,
    /// Copies seen in responses, to rebuild entries whose manager failed.
    copies: BTreeMap<EntryId, Entry>,
}

impl ProcessTable {
    pub fn new() -> ProcessTable {
        ProcessTable::default()
    }

    fn merge(into: &mut BTreeMap<EntryId, Entry>, key: EntryId, e: Entry) {
        match into.get(&key) {
            Some(old) if old.version >= e.version => {}
            _ => {
                into.insert(key, e);
            }
        }
    }

    fn execute(entry: EntryId, state: &mut Entry, request: &[u8]) -> TableAnswer {
        let fail = |why: String, state: &Entry| TableAnswer {
            error: Some(why),
            record: state.record.clone(),
        };
        let Ok(op) = postcard::from_bytes::<TableOp>(request) else {
            return fail("malformed request".into(), state);
        };
        match op {
            TableOp::Get => {}
            TableOp::Register { node, pid } => {
                let incarnation = state
                    .record
                    .as_ref()
                    .map(|r| r.incarnation + 1)
                    .unwrap_or(0);
                let checkpoint = state.record.as_ref().and_then(|r| r.checkpoint.clone());
                let decision = state.record.as_ref().and_then(|r| r.decision.clone());
                state.record = Some(RankRecord {
                    rank: entry,
                    node,
                    pid,
                    state: RankState::Running,
                    incarnation,
                    checkpoint,
                    decision,
                });
                state.version += 1;
            }
            TableOp::SetState(s) => {
                let Some(r) = state.record.as_mut() else {
                    return fail(format!("rank {entry} is not registered"), state);
                };
                r.state = s;
                state.version += 1;
            }
            TableOp::Checkpointed { version, levels } => {
                let Some(r) = state.record.as_mut() else {
                    return fail(format!("rank {entry} is not registered"), state);
                };
                match r.checkpoint.as_mut() {
                    Some(c) if c.version > version => {}
                    Some(c) if c.version == version => {
                        for l in levels {
                            if !c.safe_levels.contains(&l) {
                                c.safe_levels.push(l);
                            }
                        }
                        c.safe_levels.sort_unstable();
                    }
                    _ => {
                        let mut safe_levels = levels;
                        safe_levels.sort_unstable();
                        safe_levels.dedup();
                        r.checkpoint = Some(CheckpointInfo {
                            version,
                            safe_levels,
                        });
                    }
                }
                state.version += 1;
            }
            TableOp::Decided { decision } => {
                let Some(r) = state.record.as_mut() else {
                    return fail(format!("rank {entry} is not registered"), state);
                };
                r.decision = Some(decision);
                state.version += 1;
            }
            TableOp::MarkLost { node } => {
                if let Some(r) = state.record.as_mut() {
                    if r.node == node && !matches!(r.state, RankState::Exited(_)) {
                        r.state = RankState::Lost;
                        state.version += 1;
                    }
                }
            }
        }
        TableAnswer {
            error: None,
            record: state.record.clone(),
        }
    }
}

impl Service for ProcessTable {
    fn name(&self) -> &str {
        "process-table"
    }

    fn witnesses(&self) -> usize {
        1
    }

    fn handle(&mut self, entry: EntryId, id: RequestId, request: &[u8]) -> Vec<u8> {
        let state = self.entries.entry(entry).or_default();
        let answer = match state.clients.check(id) {
            Seen::Answered(bytes) => postcard::from_bytes(&bytes).unwrap_or(TableAnswer {
                error: Some("undecodable recorded answer".into()),
                record: state.record.clone(),
            }),
            Seen::Stale => TableAnswer {
                error: Some("stale request".into()),
                record: state.record.clone(),
            },
            Seen::New => {
                let answer = Self::execute(entry, state, request);
                let bytes = postcard::to_allocvec(&answer).expect("encoding to memory");
                state.clients.record(id, &bytes);
                answer
            }
        };
        respond(Some(answer), state)
    }

    fn holds(&self, entry: EntryId) -> bool {
        self.entries.contains_key(&entry)
    }

    fn lost(&mut self, entry: EntryId, _id: RequestId, request: &[u8]) -> Option<Vec<u8>> {
        // A registration writes the whole row (the rank restarted): it recreates it.
        // Anything else needs the row that was lost; the answer carries no state, so that
        // no node keeps an empty copy of it.
        if let Ok(TableOp::Register { .. }) = postcard::from_bytes::<TableOp>(request) {
            return None;
        }
        let answer = TableAnswer {
            error: Some(format!(
                "{LOST_ROW} the row of rank {entry} was lost: its manager and every witness \
                 of it failed together (the rank's restart registers it anew)"
            )),
            record: None,
        };
        Some(
            postcard::to_allocvec(&Response {
                answer: Some(answer),
                state: Vec::new(),
            })
            .expect("encoding to memory"),
        )
    }

    fn forget_lost(&mut self, lost: &dyn Fn(EntryId) -> bool) {
        self.entries.retain(|k, _| !lost(*k));
        self.copies.retain(|k, _| !lost(*k));
    }

    fn observe_response(&mut self, entry: EntryId, response: &[u8]) {
        if let Some(e) = postcard::from_bytes::<Response>(response)
            .ok()
            .and_then(|r| Entry::decode(&r.state))
        {
            Self::merge(&mut self.copies, entry, e);
        }
    }

    fn witness_copy(&self, entry: EntryId) -> Option<Vec<u8>> {
        self.entries.get(&entry).map(|e| respond(None, e))
    }

    fn handover_copies(&mut self) -> Vec<(EntryId, Vec<u8>)> {
        std::mem::take(&mut self.copies)
            .into_iter()
            .map(|(k, e)| (k, respond(None, &e)))
            .collect()
    }

    fn managed(&self) -> Vec<EntryId> {
        self.entries.keys().copied().collect()
    }

    fn send_out(&mut self, entry: EntryId) -> Option<Vec<u8>> {
        self.entries.remove(&entry).map(|e| e.encode())
    }

    fn receive(&mut self, entry: EntryId, state: Vec<u8>) {
        if let Some(e) = Entry::decode(&state) {
            Self::merge(&mut self.entries, entry, e);
        }
    }

    fn scan(&mut self, orphan: &dyn Fn(EntryId) -> bool) -> Vec<(EntryId, Vec<u8>)> {
        self.copies
            .iter()
            .filter(|(k, _)| orphan(**k))
            .map(|(k, e)| (*k, e.encode()))
            .collect()
    }
}

#[cfg(test)]
mod lost;

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> RequestId {
        RequestId {
            origin: 1,
            client: 1,
            seq,
        }
    }

    fn ask(t: &mut ProcessTable, rank: u64, seq: u64, op: TableOp) -> TableAnswer {
        parse_answer(&t.handle(rank, id(seq), &encode_op(&op))).unwrap()
    }

    #[test]
    fn a_row_follows_a_rank_through_its_life() {
        let mut t = ProcessTable::new();
        let a = ask(&mut t, 3, 1, TableOp::Register { node: 2, pid: 77 });
        let r = a.record.unwrap();
        assert_eq!((r.node, r.pid, r.incarnation), (2, 77, 0));
        assert_eq!(r.state, RankState::Running);
        ask(
            &mut t,
            3,
            2,
            TableOp::Checkpointed {
                version: 4,
                levels: vec![2, 1],
            },
        );
        ask(
            &mut t,
            3,
            3,
            TableOp::Checkpointed {
                version: 4,
                levels: vec![4],
            },
        );
        // An older version does not replace the newest.
        ask(
            &mut t,
            3,
            4,
            TableOp::Checkpointed {
                version: 3,
                levels: vec![1],
            },
        );
        let r = ask(&mut t, 3, 5, TableOp::Get).record.unwrap();
        assert_eq!(
            r.checkpoint,
            Some(CheckpointInfo {
                version: 4,
                safe_levels: vec![1, 2, 4]
            })
        );
        // Losing another node does not touch the rank; losing its own does.
        ask(&mut t, 3, 6, TableOp::MarkLost { node: 1 });
        assert_eq!(
            t.entries[&3].record.as_ref().unwrap().state,
            RankState::Running
        );
        ask(&mut t, 3, 7, TableOp::MarkLost { node: 2 });
        assert_eq!(
            t.entries[&3].record.as_ref().unwrap().state,
            RankState::Lost
        );
        // The policy's decision is recorded before it is carried out; a new registration
        // is a new incarnation that keeps the checkpoint and the decision.
        let decided = "restart on node 5 from checkpoint 4".to_string();
        let r = ask(
            &mut t,
            3,
            8,
            TableOp::Decided {
                decision: decided.clone(),
            },
        )
        .record
        .unwrap();
        assert_eq!(r.decision.as_ref(), Some(&decided));
        let r = ask(&mut t, 3, 9, TableOp::Register { node: 5, pid: 9 })
            .record
            .unwrap();
        assert_eq!(
            (r.node, r.incarnation, r.checkpoint.unwrap().version),
            (5, 1, 4)
        );
        assert_eq!(r.decision, Some(decided));
        let e = ask(&mut t, 4, 10, TableOp::SetState(RankState::Exited(0)));
        assert!(e.error.unwrap().contains("not registered"));
    }

    #[test]
    fn a_repeated_request_is_answered_not_executed_again() {
        let mut t = ProcessTable::new();
        ask(&mut t, 0, 1, TableOp::Register { node: 0, pid: 1 });
        let first = ask(&mut t, 0, 2, TableOp::Register { node: 0, pid: 2 });
        let again = ask(&mut t, 0, 2, TableOp::Register { node: 0, pid: 2 });
        assert_eq!(first, again);
        assert_eq!(t.entries[&0].record.as_ref().unwrap().incarnation, 1);
    }

    #[test]
    fn a_witness_copy_rebuilds_the_row_at_a_new_manager() {
        let mut manager = ProcessTable::new();
        let mut witness = ProcessTable::new();
        let resp = manager.handle(
            5,
            id(1),
            &encode_op(&TableOp::Register { node: 1, pid: 42 }),
        );
        witness.observe_response(5, &resp);
        let copy = manager.witness_copy(5).unwrap();
        witness.observe_response(5, &copy);
        // The manager fails: the witness's scan is what the new manager receives.
        let orphans = witness.scan(&|e| e == 5);
        assert_eq!(orphans.len(), 1);
        let mut heir = ProcessTable::new();
        for (e, state) in orphans {
            heir.receive(e, state);
        }
        let r = heir.entries[&5].record.clone().unwrap();
        assert_eq!((r.node, r.pid), (1, 42));
        // Garbage never lands in the table.
        heir.receive(6, vec![0xff; 3]);
        assert!(!heir.managed().contains(&6));
    }
}
