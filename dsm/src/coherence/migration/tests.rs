//! Unit tests of membership changes and failures in the state machine.
use super::super::tests::Net;
use super::super::{Access, LocalShareWords, PageState};
use super::*;
use crate::directory::LocatorKind;

fn change(epoch: u64, ids: &[NodeId], old: &[NodeId], new: &[NodeId]) -> Change {
    Change {
        epoch,
        locator: LocatorKind::Modulo.build(ids),
        old_members: old.iter().copied().collect(),
        new_members: new.iter().copied().collect(),
        failed: None,
    }
}

/// Node 3 joins 3 nodes (`page % 3` -> `page % 4`). Node 3 switches first and asks for
/// page 7 (managed by node 1 before, by itself after): held until node 1's entries
/// arrived. Node 0 switches next; node 1, not switched yet, asks node 0 for page 6 (now
/// node 2's): forwarded.
#[test]
fn a_join_migrates_entries_and_requests_in_transit_are_forwarded_or_held() {
    let mut net = Net::new(3, false);
    for page in 0..12 {
        net.access((page % 3) as NodeId, page, Access::Write);
    }
    net.nodes.push(Node::new(
        3,
        LocatorKind::Modulo.build(&[0, 1, 2]),
        LocalShareWords::default(),
        false,
    ));
    for n in 0..4 {
        net.nodes[n].prepare_change(change(1, &[0, 1, 2, 3], &[0, 1, 2], &[0, 1, 2, 3]));
    }
    let a = net.nodes[3].start_change(1);
    net.apply(3, a);
    let a = net.nodes[3].fault(7, Access::Read);
    net.apply(3, a);
    // Node 3's request to itself: held (node 1 still manages page 7). (Its markers to
    // the others, queued before, wait.)
    let at = net
        .queue
        .iter()
        .position(|(_, _, m)| matches!(m, Msg::ManagerRead { .. }))
        .expect("a request");
    let (from, to, msg) = net.queue.remove(at).expect("listed");
    let a = net.nodes[to as usize].on_message(from, msg);
    net.apply(to, a);
    assert_eq!(net.nodes[3].stats.requests_delayed, 1);
    assert_eq!(net.nodes[3].state(7), PageState::Invalid);
    let a = net.nodes[0].start_change(1);
    net.apply(0, a);
    net.access(1, 6, Access::Read);
    net.access(3, 7, Access::Read);
    assert!(net.nodes[0].stats.requests_forwarded >= 1);
    for (n, node) in net.nodes.iter_mut().enumerate() {
        assert_eq!(node.epoch(), 1, "node {n}");
        assert!(!node.migrating(), "node {n}");
        assert_eq!(node.stats.requests_delayed, node.stats.requests_released);
        assert_eq!(node.take_finished(), vec![1], "node {n}");
        for (page, owner) in node.directory.pages() {
            assert_eq!(page % 4, n as u64, "node {n} manages page {page}");
            assert_eq!(owner as u64, page % 3, "page {page}");
        }
    }
    assert_eq!(net.nodes[3].stats.entries_received, 3, "pages 3, 7, 11");
    // Every page is served under the new view; a write moves ownership through the
    // new manager.
    for page in 0..12 {
        net.access(3, page, Access::Read);
        net.access(2, page, Access::Write);
        assert_eq!(
            net.nodes[(page % 4) as usize].directory.owner(page),
            Some(2)
        );
    }
}

/// Delivers queued messages in order; those to `dead` are lost.
fn drain_without(net: &mut Net, dead: NodeId) {
    while let Some((from, to, msg)) = net.queue.pop_front() {
        if to == dead {
            continue;
        }
        let a = net.nodes[to as usize].on_message(from, msg);
        net.apply(to, a);
    }
}

/// Node 3 of 4 (`page % 4`) manages pages 3, 7 and 11 and dies. It owned pages 3 and 5
/// (read copies at nodes 1 and 2), 6 (no other copy) and 7 (it granted the page to
/// itself: only node 0, the witness, heard of it). Node 1 owns page 11; node 2's read of
/// it went to node 3 and is lost. After the failure's change (`page % 3`): pages 3 and
/// 5 are promoted at node 1, pages 6 and 7 are lost (answered `Lost`, never a zero
/// page), page 11's entry is rebuilt from node 1's claim and node 2's read, asked again
/// at the commit, is served.
#[test]
fn a_failure_rebuilds_the_dead_managers_entries_promotes_copies_and_reports_lost_pages() {
    let mut net = Net::new(4, false);
    for page in [3, 5, 6, 7] {
        net.access(3, page, Access::Write);
    }
    for reader in [1, 2] {
        net.access(reader, 3, Access::Read);
        net.access(reader, 5, Access::Read);
    }
    net.access(1, 11, Access::Write);
    // Node 3 dies: node 2's request for page 11 goes to it and is lost.
    let a = net.nodes[2].fault(11, Access::Read);
    net.apply(2, a);
    drain_without(&mut net, 3);
    assert_eq!(net.nodes[2].state(11), PageState::Invalid);
    for n in 0..3u32 {
        let a = net.nodes[n as usize].node_failed(3);
        net.apply(n, a);
    }
    drain_without(&mut net, 3);
    for n in 0..3 {
        let mut c = change(1, &[0, 1, 2], &[0, 1, 2], &[0, 1, 2]);
        c.failed = Some(3);
        net.nodes[n].prepare_change(c);
    }
    for n in 0..3u32 {
        let a = net.nodes[n as usize].start_change(1);
        net.apply(n, a);
    }
    drain_without(&mut net, 3);
    for n in 0..3u32 {
        assert!(!net.nodes[n as usize].migrating(), "node {n}");
        let a = net.nodes[n as usize].resend_outstanding();
        net.apply(n, a);
    }
    drain_without(&mut net, 3);
    assert_eq!(net.nodes[2].stats.requests_resent, 1);
    assert_eq!(net.nodes[2].state(11), PageState::ReadCopy);
    assert_eq!(net.nodes[2].directory.owner(11), Some(1));
    for page in [3, 5] {
        assert_eq!(
            net.nodes[1].state(page),
            PageState::ReadOwner,
            "page {page}"
        );
        assert_eq!(
            net.nodes[(page % 3) as usize].directory.owner(page),
            Some(1),
            "page {page}"
        );
    }
    assert_eq!(net.nodes[1].stats.pages_promoted, 2);
    assert!(net.nodes[0].directory.is_lost(6));
    assert!(net.nodes[1].directory.is_lost(7));
    assert_eq!(
        net.nodes[0].stats.pages_lost + net.nodes[1].stats.pages_lost,
        2
    );
    // A lost page is answered so, never granted as a zero page.
    for page in [6, 7] {
        net.log.clear();
        let a = net.nodes[2].fault(page, Access::Read);
        net.apply(2, a);
        drain_without(&mut net, 3);
        assert!(
            net.log
                .iter()
                .any(|(n, a)| *n == 2 && *a == Action::Lost { page }),
            "page {page}: {:?}",
            net.log
        );
        assert_eq!(net.nodes[2].state(page), PageState::Invalid);
    }
    // The promoted pages are written again through their new managers.
    net.access(2, 3, Access::Write);
    net.access(0, 5, Access::Write);
    assert_eq!(net.nodes[1].state(3), PageState::Invalid);
    assert_eq!(net.nodes[0].directory.owner(3), Some(2));
    assert_eq!(net.nodes[2].directory.owner(5), Some(0));
}

/// Node 2 leaves 3 nodes: its entries go to nodes 0 and 1, requests sent to it by a
/// node that did not switch yet are forwarded.
#[test]
fn a_leave_hands_the_leavers_entries_over() {
    let mut net = Net::new(3, false);
    for page in 0..12 {
        net.access((page % 2) as NodeId, page, Access::Write);
    }
    for n in 0..3 {
        net.nodes[n].prepare_change(change(1, &[0, 1], &[0, 1, 2], &[0, 1]));
    }
    let a = net.nodes[2].start_change(1);
    net.apply(2, a);
    // Node 0 has not switched: its request for page 5 goes to node 2, which forwards.
    net.access(0, 5, Access::Write);
    assert!(net.nodes[2].stats.requests_forwarded >= 1);
    assert!(net.nodes[2].directory.pages().next().is_none());
    for page in 0..12 {
        net.access(1, page, Access::Write);
        assert_eq!(
            net.nodes[(page % 2) as usize].directory.owner(page),
            Some(1)
        );
    }
    for node in &net.nodes {
        assert_eq!(node.epoch(), 1);
        assert!(!node.migrating());
    }
}
