//! Unit tests of the lock table (grants, deaths, rebuilds) and of the grants a node accepts.
use super::*;

#[test]
fn a_dead_holders_lock_goes_to_the_next_live_waiter_naming_it() {
    let t = LockTable::default();
    assert!(t.acquire(0, 1, 0).unwrap());
    assert!(!t.acquire(0, 3, 0).unwrap());
    assert!(!t.acquire(0, 2, 0).unwrap());
    assert!(t.acquire(1, 1, 0).unwrap());
    // Node 3 dies waiting, node 1 dies holding both locks.
    assert!(t.node_failed(3).unwrap().is_empty());
    let grants = t.node_failed(1).unwrap();
    assert_eq!(
        grants,
        vec![(0, 2)],
        "lock 0 goes to node 2, lock 1 is freed"
    );
    assert_eq!(t.holder(0), Some(2));
    assert_eq!(t.inherited(0), 1);
    assert_eq!(t.holder(1), None);
    // The next holder of the freed lock is told too; a dead node never gets one.
    assert!(!t.acquire(1, 3, 0).unwrap());
    assert!(t.acquire(1, 0, 0).unwrap());
    assert_eq!(t.inherited(1), 1);
    // A normal hand-over names nobody.
    assert!(!t.acquire(0, 0, 0).unwrap());
    assert_eq!(t.release(0, 2).unwrap(), Some(0));
    assert_eq!(t.inherited(0), NO_NODE);
}

#[test]
fn only_holders_past_the_limit_with_waiters_are_probed() {
    let t = LockTable::default();
    assert!(t.acquire(0, 1, 0).unwrap());
    assert!(t.acquire(1, 2, 0).unwrap());
    assert!(t.overdue(Duration::ZERO).is_empty(), "nobody waits");
    assert!(!t.acquire(0, 0, 0).unwrap());
    assert_eq!(t.overdue(Duration::ZERO), vec![1]);
    assert!(t.overdue(Duration::from_secs(3600)).is_empty());
}

#[test]
fn a_new_coordinator_rebuilds_the_table_and_grants_the_dead_servers_locks() {
    let t = LockTable::default();
    // Node 0 (the server) died. Node 1 holds lock 0 with node 3 waiting; node 2 and
    // node 3 wait for lock 1, which only node 0 can have held; lock 2 was free.
    let mut reports = BTreeMap::new();
    reports.insert(
        1,
        LockReport {
            held: vec![(0, 5)],
            waiting: vec![],
            server_held: vec![],
        },
    );
    reports.insert(
        2,
        LockReport {
            held: vec![],
            waiting: vec![(1, 9)],
            server_held: vec![],
        },
    );
    reports.insert(
        3,
        LockReport {
            held: vec![],
            waiting: vec![(0, 4), (1, 4)],
            server_held: vec![],
        },
    );
    let dead: BTreeSet<NodeId> = [0].into_iter().collect();
    let grants = t.rebuild(&reports, 0, &dead).unwrap();
    assert_eq!(grants, vec![(1, 2)], "only lock 1 changes hands");
    assert_eq!(
        t.holder(0),
        Some(1),
        "a lock granted to a survivor stays its"
    );
    assert_eq!(t.inherited(0), NO_NODE);
    assert_eq!(t.holder(1), Some(2));
    assert_eq!(t.inherited(1), 0, "the grant names the dead server");
    let seq = |id: u32, n: NodeId| t.entries.lock().unwrap()[&id].seqs[&n];
    assert_eq!(seq(1, 2), 9, "the grant answers node 2's request");
    assert_eq!(seq(0, 3), 4);
    // The queues go on: node 1's release hands lock 0 to node 3.
    assert_eq!(t.release(0, 1).unwrap(), Some(3));
    assert_eq!(t.release(1, 2).unwrap(), Some(3));
    // The dead server is never granted a lock again; a free lock is taken at once.
    assert!(!t.acquire(2, 0, 1).unwrap());
    assert!(t.acquire(2, 1, 6).unwrap());
    // Two survivors claiming one lock is an error, not a silent choice.
    reports.get_mut(&2).unwrap().held.push((0, 1));
    assert!(t.rebuild(&reports, 0, &dead).is_err());
}

#[test]
fn a_grant_for_an_earlier_request_or_from_a_dead_node_is_ignored() {
    let ep: Arc<dyn Endpoint> = Arc::from(
        fabric::open(&fabric::FabricConfig::with_provider(
            fabric::Provider::Loopback,
        ))
        .unwrap(),
    );
    let locks = Locks::new(1, ep, Arc::new(|_| None), 4).with_members(LockMembers {
        coordinator: Arc::new(|| 2),
        dead_peer: Arc::new(|p| p == PeerId(0)),
        deputy: Arc::new(|| None),
    });
    let grant = |peer: u32, dead: NodeId, seq: u64| {
        let mut data = 1u64.to_le_bytes().to_vec();
        data.extend_from_slice(&dead.to_le_bytes());
        data.extend_from_slice(&seq.to_le_bytes());
        fabric::Message {
            tag: TAG_LOCK_GRANT,
            peer: Some(PeerId(peer)),
            data,
        }
    };
    assert_eq!(
        locks.accept_grant(0, 5, &grant(2, NO_NODE, 5)).unwrap(),
        Some(NO_NODE)
    );
    assert_eq!(locks.accept_grant(0, 5, &grant(2, 0, 5)).unwrap(), Some(0));
    assert_eq!(
        locks.accept_grant(0, 5, &grant(2, NO_NODE, 4)).unwrap(),
        None,
        "a grant answering request 4 does not answer request 5"
    );
    assert_eq!(
        locks.accept_grant(0, 5, &grant(0, NO_NODE, 5)).unwrap(),
        None,
        "a grant the dead server sent is dropped"
    );
    let short = fabric::Message {
        tag: TAG_LOCK_GRANT,
        peer: Some(PeerId(2)),
        data: vec![0; 12],
    };
    assert!(
        locks.accept_grant(0, 5, &short).is_err(),
        "a short grant is an error"
    );
}

#[test]
fn a_lock_the_dead_server_noted_it_held_with_nobody_waiting_names_it_to_its_next_holder() {
    let t = LockTable::default();
    // Node 0 (the server) died holding locks 2 and 4 (its deputy, node 1, was told);
    // nobody waits for them. Node 1 holds lock 4 now (node 0 released it and the release
    // note was lost): it stays node 1's, unnamed. Lock 5 was noted by another node.
    let mut reports = BTreeMap::new();
    reports.insert(
        1,
        LockReport {
            held: vec![(4, 3)],
            waiting: vec![],
            server_held: vec![(2, 0), (4, 0), (5, 7)],
        },
    );
    reports.insert(2, LockReport::default());
    let dead: BTreeSet<NodeId> = [0].into_iter().collect();
    let grants = t.rebuild(&reports, 0, &dead).unwrap();
    assert!(grants.is_empty(), "nobody waits: no grant at the rebuild");
    assert_eq!(t.holder(2), None, "lock 2 is free after its holder died");
    assert!(t.acquire(2, 2, 1).unwrap());
    assert_eq!(
        t.inherited(2),
        0,
        "lock 2's next holder is told node 0 died holding it"
    );
    assert_eq!(t.holder(4), Some(1));
    assert!(t.acquire(5, 2, 2).unwrap());
    assert_eq!(
        t.inherited(5),
        NO_NODE,
        "a note of another server is not node 0's"
    );
    // Without the note, the lock is simply free.
    let t = LockTable::default();
    let mut reports = BTreeMap::new();
    reports.insert(1, LockReport::default());
    t.rebuild(&reports, 0, &dead).unwrap();
    assert!(t.acquire(2, 2, 1).unwrap());
    assert_eq!(t.inherited(2), NO_NODE);
}
