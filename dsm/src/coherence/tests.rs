//! Unit tests of the protocol on a few nodes exchanging messages in FIFO order (`Net` is
//! shared with the migration tests).
use super::*;
use crate::directory::LocatorKind;
use std::collections::VecDeque;

/// Nodes exchanging messages in FIFO order, one-sided operations done at once.
pub(in crate::coherence) struct Net {
    pub(in crate::coherence) nodes: Vec<Node<LocalShareWords>>,
    pub(in crate::coherence) queue: VecDeque<(NodeId, NodeId, Msg)>,
    pub(in crate::coherence) log: Vec<(NodeId, Action)>,
}

impl Net {
    pub(in crate::coherence) fn new(n: u32, one_sided: bool) -> Net {
        let ids: Vec<NodeId> = (0..n).collect();
        Net {
            nodes: ids
                .iter()
                .map(|&i| {
                    Node::new(
                        i,
                        LocatorKind::Modulo.build(&ids),
                        LocalShareWords::default(),
                        one_sided,
                    )
                })
                .collect(),
            queue: VecDeque::new(),
            log: Vec::new(),
        }
    }

    pub(in crate::coherence) fn apply(&mut self, at: NodeId, actions: Vec<Action>) {
        for a in actions {
            self.log.push((at, a.clone()));
            match a {
                Action::Send { to, msg } => self.queue.push_back((at, to, msg)),
                Action::Publish { page } => self.nodes[at as usize].words.open(page),
                Action::Join { owner, page } => {
                    let open = self.nodes[owner as usize].words.remote_join(page, at);
                    let next = self.nodes[at as usize].on_join(page, open);
                    self.apply(at, next);
                }
                Action::RmaRead { page, .. } => {
                    let next = self.nodes[at as usize].on_rma_read(page);
                    self.apply(at, next);
                }
                _ => {}
            }
        }
    }

    pub(in crate::coherence) fn access(&mut self, at: NodeId, page: PageId, access: Access) {
        let a = self.nodes[at as usize].fault(page, access);
        self.apply(at, a);
        while let Some((from, to, msg)) = self.queue.pop_front() {
            let a = self.nodes[to as usize].on_message(from, msg);
            self.apply(to, a);
        }
        assert!(self.nodes[at as usize].state(page).allows(access));
    }
}

#[test]
fn a_write_is_granted_only_after_every_copy_is_invalidated() {
    let mut net = Net::new(4, false);
    net.access(0, 5, Access::Write);
    for r in 1..4 {
        net.access(r, 5, Access::Read);
    }
    assert_eq!(net.nodes[0].state(5), PageState::ReadOwner);
    net.log.clear();
    net.access(2, 5, Access::Write);
    for r in [0, 1, 3] {
        assert_eq!(net.nodes[r as usize].state(5), PageState::Invalid);
    }
    assert_eq!(net.nodes[2].state(5), PageState::WriteOwner);
    let grant = net
        .log
        .iter()
        .position(|(_, a)| {
            matches!(
                a,
                Action::Send {
                    to: 2,
                    msg: Msg::Grant {
                        access: Access::Write,
                        ..
                    }
                }
            )
        })
        .expect("a write grant");
    let acks: Vec<usize> = net
        .log
        .iter()
        .enumerate()
        .filter(|(_, (_, a))| {
            matches!(
                a,
                Action::Send {
                    msg: Msg::InvalidateAck { .. },
                    ..
                }
            )
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(acks.len(), 2, "nodes 1 and 3 held copies");
    assert!(acks.iter().all(|&i| i < grant));
}

/// Node 3 held read copies (one joined through the share word when `one_sided`) of
/// page 6 (managed by node 2) and died: messages to it are lost. Node 2's write waits for its acknowledgement until
/// the live nodes learn of the death; then it is granted, every other copy invalid.
#[test]
fn a_write_is_granted_once_a_dead_readers_copy_is_dropped() {
    for one_sided in [false, true] {
        let mut net = Net::new(4, one_sided);
        net.access(0, 6, Access::Write);
        net.access(1, 6, Access::Read);
        net.access(3, 6, Access::Read);
        net.access(0, 6, Access::Write); // 1 and 3 now hint node 0
        net.access(2, 6, Access::Read); // node 0 is a read owner and publishes
        net.access(3, 6, Access::Read); // one-sided when allowed
        net.access(1, 6, Access::Read);
        assert_eq!(net.nodes[3].state(6), PageState::ReadCopy);
        // Node 3 dies: whatever is sent to it is lost.
        let a = net.nodes[2].fault(6, Access::Write);
        net.apply(2, a);
        let drain = |net: &mut Net| {
            while let Some((from, to, msg)) = net.queue.pop_front() {
                if to == 3 {
                    continue;
                }
                let a = net.nodes[to as usize].on_message(from, msg);
                net.apply(to, a);
            }
        };
        drain(&mut net);
        assert_ne!(
            net.nodes[2].state(6),
            PageState::WriteOwner,
            "granted without node 3's acknowledgement (one_sided {one_sided})"
        );
        for n in 0..3u32 {
            let a = net.nodes[n as usize].node_failed(3);
            net.apply(n, a);
        }
        drain(&mut net);
        assert_eq!(net.nodes[2].state(6), PageState::WriteOwner, "{one_sided}");
        assert_eq!(net.nodes[0].state(6), PageState::Invalid);
        assert_eq!(net.nodes[1].state(6), PageState::Invalid);
        assert_eq!(net.nodes[0].stats.dead_copies_dropped, 1);
        // Nothing more goes to the dead node: node 1 reads, node 0 writes.
        net.log.clear();
        net.access(1, 6, Access::Read);
        net.access(0, 6, Access::Write);
        assert!(
            !net.log
                .iter()
                .any(|(_, a)| matches!(a, Action::Send { to: 3, .. })),
            "{:?}",
            net.log
        );
    }
}

#[test]
fn a_hinted_reader_joins_an_open_word_without_messaging_the_owner() {
    let mut net = Net::new(3, true);
    net.access(0, 1, Access::Write);
    net.access(1, 1, Access::Read); // by messages; node 0 becomes a read owner
    net.access(0, 1, Access::Write); // invalidates node 1, which now hints node 0
    net.access(2, 1, Access::Read); // node 0 publishes again
    net.log.clear();
    net.access(1, 1, Access::Read);
    assert!(net
        .log
        .iter()
        .all(|(_, a)| !matches!(a, Action::Send { .. })));
    assert!(net
        .log
        .iter()
        .any(|(_, a)| matches!(a, Action::RmaRead { owner: 0, page: 1 })));
    // The owner learns of the reader when it closes the word, and invalidates it.
    net.log.clear();
    net.access(0, 1, Access::Write);
    assert_eq!(net.nodes[1].state(1), PageState::Invalid);
    assert_eq!(net.nodes[2].state(1), PageState::Invalid);
}

#[test]
fn a_closed_word_sends_the_reader_to_the_owner_by_message() {
    let mut net = Net::new(2, true);
    net.access(0, 0, Access::Write);
    net.access(1, 0, Access::Read);
    net.access(0, 0, Access::Write); // node 0 writes: its word is closed
    net.log.clear();
    net.access(1, 0, Access::Read);
    assert!(net.log.iter().any(|(_, a)| matches!(
        a,
        Action::Send {
            to: 0,
            msg: Msg::Read {
                from: 1,
                via_manager: false,
                ..
            }
        }
    )));
    assert_eq!(net.nodes[0].state(0), PageState::ReadOwner);
}

/// A reader's join of the owner's share word is in flight when a grant by message answers
/// its read; its copy is invalidated, and it reads again before the join's result came
/// back: it must ask by message, not join again (a second fetch-and-add in the same open
/// period would count its bit twice, read as the next node's, and the owner would not
/// invalidate it).
#[test]
fn a_reader_never_posts_a_second_join_while_one_is_in_flight() {
    let mut net = Net::new(3, true);
    net.access(0, 1, Access::Write);
    net.access(1, 1, Access::Read);
    net.access(0, 1, Access::Write); // node 1 hints node 0
    net.access(2, 1, Access::Read); // node 0 publishes
    let a = net.nodes[1].fault(1, Access::Read);
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Join { owner: 0, page: 1 })),
        "{a:?}"
    );
    // Not applied: the join is in flight. A grant by message answers the read.
    let grant = Msg::Grant {
        page: 1,
        access: Access::Read,
        owner: false,
        zero: false,
    };
    net.nodes[1].on_message(0, grant);
    assert_eq!(net.nodes[1].state(1), PageState::ReadCopy);
    net.nodes[1].on_message(0, Msg::Invalidate { page: 1 });
    assert_eq!(net.nodes[1].state(1), PageState::Invalid);
    let again = net.nodes[1].fault(1, Access::Read);
    assert!(
        !again.iter().any(|a| matches!(a, Action::Join { .. })),
        "a second join while the first is in flight: {again:?}"
    );
    assert!(
        again.iter().any(|a| matches!(
            a,
            Action::Send {
                to: 0,
                msg: Msg::Read {
                    page: 1,
                    from: 1,
                    ..
                }
            }
        )),
        "{again:?}"
    );
}
