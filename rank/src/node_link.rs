//! The link from a rank to its local krund.
//!
//! Contract:
//! - When `KRUN_NODE_SOCKET` names a Unix socket, the rank connects to it at init and keeps
//!   the connection for its life; when unset, the library works without a node link.
//! - The rank sends [`RankToNode::Hello`] at init, [`RankToNode::Checkpointed`] after every
//!   checkpoint that is complete on every rank (the image file is complete), and
//!   [`RankToNode::Exiting`] at finalize.
//! - krund answers every message with exactly one [`NodeToRank`]: `Ack`, or `Refused(why)`,
//!   which the rank's call reports as an error naming `why`.
//! - The messages travel in a `fabric::wire` [`Session`] (protocol `Rank`) keyed by the
//!   job's cluster secret (`KRUN_SECRET` / `KRUN_SECRET_FILE`): the rank is the client,
//!   krund the server; every frame is authenticated and replay-protected.
//! - Both sides give up on a peer that does not answer within [`IO_TIMEOUT`], except for the
//!   answer to `AtSafepoint`, which may take up to [`SAFEPOINT_TIMEOUT`].
//!
//! Safepoints driven by the node ([`NodeLink::at_safepoint`]):
//! - A rank sends [`RankToNode::AtSafepoint`] only at a safepoint where every rank of the job
//!   agreed to ask (one of them saw a request, e.g. SIGUSR1 from krund), so every rank of the
//!   job sends it at the same safepoint, with no user message in flight.
//! - krund holds the answer until its policy has every rank of the job at the safepoint (the
//!   barrier) and decided, then answers every held rank the same order:
//!   [`NodeToRank::Checkpoint`]`{version}` (take that version now, collectively; the rank
//!   reports `Checkpointed` as for any checkpoint), [`NodeToRank::Continue`] (go on), or
//!   [`NodeToRank::Rollback`]`{version}` (roll back to that committed version,
//!   collectively). A node that drives no policy answers `Ack` at once: the ranks act on
//!   the request themselves, as without a node link.
//! - Every rank of the job must get the same order; the library checks it collectively and
//!   fails the safepoint on every rank when one rank got another order or none. One mix is
//!   resolved instead: `Continue` on some ranks (they asked their node just outside the
//!   barrier) and one `Checkpoint{version}` or `Rollback{version}` on the others: every
//!   rank carries out the versioned order, which every node was told too
//!   (`checkpoint::agree`).
//! - `Refused(why)` (the barrier was aborted, e.g. a node failed during it) is an error of
//!   the safepoint naming `why`; the rank may ask again at a later safepoint.
//!
//! Orders at any time ([`NodeLink::watch`], the rank's rollback watcher: [`crate::rollback`]):
//! - A rank opens a second connection at init and sends [`RankToNode::Watch`]`{rank, pid}`
//!   on it, again and again. krund holds each `Watch` up to [`WATCH_HOLD`] and answers
//!   [`NodeToRank::Continue`] (nothing to do: ask again) or, when a recovery rolls this
//!   rank back, [`NodeToRank::RollbackInPlace`]`{wiring, bootstrap, version}`: the process
//!   replaces its own image at once, whatever its threads are doing (see
//!   [`crate::rollback`]). A rank blocked in a receive from a lost peer never reaches a
//!   safepoint; this order reaches it anyway.
//! - krund wakes a rank for its policy (a barrier's "ask your node", an uncoordinated
//!   capture order) with [`wake_signal`], not SIGUSR1: a program may own SIGUSR1 (MPICH's
//!   MPI_Init installs a handler of its own) and then never heard the policy. The signal is
//!   sent only to a rank that said hello (its library caught the signal by then).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fabric::secret::ClusterSecret;
use fabric::wire::{Protocol, Session};
use serde::{Deserialize, Serialize};

use crate::error::{RankError, Result};

/// Longest a write or an answer may take.
/// The signal krund wakes a rank with for its policy: `SIGRTMIN + 6` (glibc keeps the first
/// real-time signals for itself; `SIGRTMIN()` accounts for them). The launcher's mirror is
/// `runtime::control::wake_signal`.
pub fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest krund may hold a rank at a safepoint before answering.
pub const SAFEPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest krund holds a [`RankToNode::Watch`] before answering `Continue`.
pub const WATCH_HOLD: Duration = Duration::from_secs(20);

/// What a rank tells its krund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RankToNode {
    Hello {
        rank: u32,
        pid: u32,
    },
    Checkpointed {
        rank: u32,
        version: u64,
        image: PathBuf,
        bytes: u64,
    },
    Exiting {
        rank: u32,
        code: i32,
    },
    /// At a safepoint where all ranks ask their nodes; answered by an order.
    AtSafepoint {
        rank: u32,
    },
    /// On the watcher's own connection: answered `Continue` after at most [`WATCH_HOLD`],
    /// or by an order for this process ([`NodeToRank::RollbackInPlace`]).
    Watch {
        rank: u32,
        pid: u32,
    },
    /// Uncoordinated policy with message logging (`crate::uncoordinated`): this rank's
    /// fabric address and the determinant ring it holds for its ward, for a later rejoin of
    /// any rank. Answered `Ack`.
    LogCard {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// (On the watcher's connection, after [`NodeToRank::PeerMoved`]) this rank now sends
    /// to `moved`'s new process. Answered `Ack`.
    PeerReplaced {
        rank: u32,
        moved: u32,
    },
    /// A restarted rank rejoining a running job under message logging: its new address and
    /// ring; answered [`NodeToRank::Peers`] once every survivor replaced its address.
    Rejoin {
        rank: u32,
        pid: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// Uncoordinated policy without logging, just before `Checkpointed`: at this own
    /// checkpoint, the messages the rank sent to (`sent[j]`) and delivered from
    /// (`delivered[j]`) each rank since its process started. Answered `Ack`.
    ChannelCounts {
        rank: u32,
        version: u64,
        sent: Vec<u64>,
        delivered: Vec<u64>,
    },
    /// (On the watcher's connection, after [`NodeToRank::ReportSafepoint`]) this rank's
    /// safepoint index in the uncoordinated mode and the version its checkpointer takes
    /// next. Answered `Ack`.
    SafepointIndex {
        rank: u32,
        index: u64,
        next: u64,
    },
}

/// krund's answer to every [`RankToNode`] (the variants' order is the wire encoding, shared
/// with krund's mirror in launcher/src/runtime/control.rs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeToRank {
    Ack,
    Refused(String),
    Checkpoint {
        version: u64,
    },
    Continue,
    Rollback {
        version: u64,
    },
    /// (To `Watch`) roll back now, inside this process: re-execute the program in place,
    /// restoring checkpoint `version` (`None`: from its start) from this rank's own images,
    /// and swap addresses through `bootstrap` in wiring epoch `wiring`.
    RollbackInPlace {
        wiring: u64,
        bootstrap: String,
        version: Option<u64>,
    },
    /// (To `Watch`) this rank's own checkpoint `version` is safe: its senders may drop what
    /// it delivered before it ([`crate::Rank::log_checkpoint_safe`]).
    LogSafe {
        version: u64,
    },
    /// (To `Watch`) rank `rank` restarted as a new process at `address` holding `ring`:
    /// send to it from now on ([`crate::Rank::replace_peer`]), then say `PeerReplaced`.
    PeerMoved {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    /// (To `Rejoin`) every rank's (address, ring), indexed by rank.
    Peers {
        cards: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// (To `AtSafepoint`) take checkpoint `version` now, collectively, and run the
    /// uncoordinated mode with message logging from it (`crate::uncoordinated`).
    CheckpointSwitch {
        version: u64,
    },
    /// (To `Watch`) a switch back to the coordinated mode: tell your safepoint index.
    ReportSafepoint,
    /// (To `Watch`) leave the uncoordinated mode at safepoint `index` (0: the switch is
    /// off).
    CoordinateAt {
        index: u64,
    },
}

/// What a watcher is told to do ([`NodeLink::watch_order`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchOrder {
    InPlace(InPlaceOrder),
    LogSafe(u64),
    PeerMoved {
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
    },
    ReportSafepoint,
    CoordinateAt(u64),
}

/// A recovery's order to roll this process back in place ([`NodeToRank::RollbackInPlace`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InPlaceOrder {
    pub wiring: u64,
    pub bootstrap: String,
    pub version: Option<u64>,
}

/// What krund orders a rank held at a safepoint to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SafepointOrder {
    Checkpoint(u64),
    Continue,
    Rollback(u64),
    /// Checkpoint, then the uncoordinated mode with logging (`crate::uncoordinated`).
    Switch(u64),
}

/// A rank's connection to its krund.
pub struct NodeLink {
    stream: UnixStream,
    session: Session,
    socket: PathBuf,
}

impl NodeLink {
    /// Connects to krund's socket and runs the wire handshake with the job's secret.
    pub fn connect(socket: &Path, secret: &ClusterSecret) -> Result<NodeLink> {
        let fail = |reason: String| RankError::NodeLink {
            socket: socket.to_path_buf(),
            reason,
        };
        let mut stream = UnixStream::connect(socket).map_err(|e| fail(format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| fail(format!("setting timeouts: {e}")))?;
        let session = Session::client(&mut stream, secret, Protocol::Rank)
            .map_err(|e| fail(format!("handshake: {e}")))?;
        Ok(NodeLink {
            stream,
            session,
            socket: socket.to_path_buf(),
        })
    }

    /// Connects as [`NodeLink::connect`] with the secret from the environment.
    pub fn connect_env(socket: &Path) -> Result<NodeLink> {
        let secret = ClusterSecret::from_env()?.ok_or_else(|| RankError::NodeLink {
            socket: socket.to_path_buf(),
            reason: "KRUN_NODE_SOCKET is set but the job has no cluster secret \
                     (KRUN_SECRET or KRUN_SECRET_FILE)"
                .into(),
        })?;
        Self::connect(socket, &secret)
    }

    /// Tells krund this rank is at an agreed safepoint and waits (up to
    /// [`SAFEPOINT_TIMEOUT`]) for its order; `None`: the node drives no policy (the rank acts
    /// on the request itself).
    pub fn at_safepoint(&mut self, rank: u32) -> Result<Option<SafepointOrder>> {
        let set = |s: &UnixStream, t: Duration| s.set_read_timeout(Some(t));
        let _ = set(&self.stream, SAFEPOINT_TIMEOUT);
        let answer = self.exchange(&RankToNode::AtSafepoint { rank });
        let _ = set(&self.stream, IO_TIMEOUT);
        let answer = answer?;
        let fail = |reason: String| RankError::NodeLink {
            socket: self.socket.clone(),
            reason,
        };
        match answer {
            NodeToRank::Checkpoint { version } => Ok(Some(SafepointOrder::Checkpoint(version))),
            NodeToRank::Continue => Ok(Some(SafepointOrder::Continue)),
            NodeToRank::Rollback { version } => Ok(Some(SafepointOrder::Rollback(version))),
            NodeToRank::CheckpointSwitch { version } => Ok(Some(SafepointOrder::Switch(version))),
            NodeToRank::Refused(why) => Err(fail(format!("krund ended the safepoint: {why}"))),
            NodeToRank::Ack => Ok(None),
            other => Err(fail(format!(
                "krund answered a safepoint with {other:?} (an order for the watcher)"
            ))),
        }
    }

    /// The rollback watcher's request: waits (up to [`WATCH_HOLD`] and a margin) for an
    /// order for this process; `None`: nothing to do yet, ask again.
    pub fn watch(&mut self, rank: u32) -> Result<Option<InPlaceOrder>> {
        let _ = self.stream.set_read_timeout(Some(WATCH_HOLD + IO_TIMEOUT));
        let answer = self.exchange(&RankToNode::Watch {
            rank,
            pid: std::process::id(),
        });
        let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
        let fail = |reason: String| RankError::NodeLink {
            socket: self.socket.clone(),
            reason,
        };
        match answer? {
            NodeToRank::Continue => Ok(None),
            NodeToRank::RollbackInPlace {
                wiring,
                bootstrap,
                version,
            } => Ok(Some(InPlaceOrder {
                wiring,
                bootstrap,
                version,
            })),
            NodeToRank::Refused(why) => Err(fail(format!("krund refused the watch: {why}"))),
            other => Err(fail(format!("krund answered a watch with {other:?}"))),
        }
    }

    /// As [`NodeLink::watch`], with the uncoordinated policy's orders too.
    pub fn watch_order(&mut self, rank: u32) -> Result<Option<WatchOrder>> {
        let _ = self.stream.set_read_timeout(Some(WATCH_HOLD + IO_TIMEOUT));
        let answer = self.exchange(&RankToNode::Watch {
            rank,
            pid: std::process::id(),
        });
        let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
        let fail = |reason: String| RankError::NodeLink {
            socket: self.socket.clone(),
            reason,
        };
        match answer? {
            NodeToRank::Continue => Ok(None),
            NodeToRank::RollbackInPlace {
                wiring,
                bootstrap,
                version,
            } => Ok(Some(WatchOrder::InPlace(InPlaceOrder {
                wiring,
                bootstrap,
                version,
            }))),
            NodeToRank::LogSafe { version } => Ok(Some(WatchOrder::LogSafe(version))),
            NodeToRank::PeerMoved {
                rank,
                address,
                ring,
            } => Ok(Some(WatchOrder::PeerMoved {
                rank,
                address,
                ring,
            })),
            NodeToRank::ReportSafepoint => Ok(Some(WatchOrder::ReportSafepoint)),
            NodeToRank::CoordinateAt { index } => Ok(Some(WatchOrder::CoordinateAt(index))),
            NodeToRank::Refused(why) => Err(fail(format!("krund refused the watch: {why}"))),
            other => Err(fail(format!("krund answered a watch with {other:?}"))),
        }
    }

    /// A restarted rank's `Rejoin`: waits (up to `limit`) for every rank's card.
    pub fn rejoin(
        &mut self,
        rank: u32,
        address: Vec<u8>,
        ring: Vec<u8>,
        limit: Duration,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let _ = self.stream.set_read_timeout(Some(limit));
        let answer = self.exchange(&RankToNode::Rejoin {
            rank,
            pid: std::process::id(),
            address,
            ring,
        });
        let _ = self.stream.set_read_timeout(Some(IO_TIMEOUT));
        match answer? {
            NodeToRank::Peers { cards } => Ok(cards),
            NodeToRank::Refused(why) => Err(RankError::NodeLink {
                socket: self.socket.clone(),
                reason: format!("krund refused the rejoin of rank {rank}: {why}"),
            }),
            other => Err(RankError::NodeLink {
                socket: self.socket.clone(),
                reason: format!("krund answered a rejoin with {other:?}"),
            }),
        }
    }

    fn exchange(&mut self, msg: &RankToNode) -> Result<NodeToRank> {
        let fail = |reason: String| RankError::NodeLink {
            socket: self.socket.clone(),
            reason,
        };
        self.session
            .tx
            .send(&mut self.stream, msg)
            .map_err(|e| fail(format!("sending {msg:?}: {e}")))?;
        self.session
            .rx
            .recv::<NodeToRank>(&mut self.stream)
            .map_err(|e| fail(format!("no answer to {msg:?}: {e}")))
    }

    /// Sends `msg` and waits for krund's answer; `Refused` is an error naming the reason.
    pub fn report(&mut self, msg: &RankToNode) -> Result<()> {
        let answer = self.exchange(msg)?;
        let fail = |reason: String| RankError::NodeLink {
            socket: self.socket.clone(),
            reason,
        };
        match answer {
            NodeToRank::Ack => Ok(()),
            NodeToRank::Refused(why) => Err(fail(format!("krund refused {msg:?}: {why}"))),
            other => Err(fail(format!("krund answered {msg:?} with {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn socket_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "krun-node-link-{tag}-{}-{:x}",
            std::process::id(),
            fabric::random_u64().unwrap()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn secret(text: &str) -> ClusterSecret {
        ClusterSecret::new(text.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn rank_reports_reach_a_node_socket_and_refusals_are_errors() {
        let dir = socket_dir("ok");
        let path = dir.join("node.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut session = Session::server(
                &mut s,
                &secret("the job secret, long enough"),
                Protocol::Rank,
            )
            .unwrap();
            let mut seen = Vec::new();
            for answer in [
                NodeToRank::Ack,
                NodeToRank::Ack,
                NodeToRank::Refused("rank 3 is not on this node".into()),
            ] {
                seen.push(session.rx.recv::<RankToNode>(&mut s).unwrap());
                session.tx.send(&mut s, &answer).unwrap();
            }
            seen
        });
        let mut link = NodeLink::connect(&path, &secret("the job secret, long enough")).unwrap();
        let msgs = [
            RankToNode::Hello { rank: 3, pid: 42 },
            RankToNode::Checkpointed {
                rank: 3,
                version: 7,
                image: PathBuf::from("/dev/shm/krun-ghost/job/rank3/0000000007.kgi"),
                bytes: 65536,
            },
            RankToNode::Exiting { rank: 3, code: 0 },
        ];
        link.report(&msgs[0]).unwrap();
        link.report(&msgs[1]).unwrap();
        let err = link.report(&msgs[2]).unwrap_err();
        assert!(err.to_string().contains("not on this node"), "{err}");
        assert_eq!(server.join().unwrap(), msgs.to_vec());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rank_at_a_safepoint_gets_the_order_its_node_holds_for_it() {
        let dir = socket_dir("safepoint");
        let path = dir.join("node.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut session = Session::server(
                &mut s,
                &secret("the job secret, long enough"),
                Protocol::Rank,
            )
            .unwrap();
            let mut seen = Vec::new();
            for answer in [
                NodeToRank::Ack,
                NodeToRank::Checkpoint { version: 4 },
                NodeToRank::Continue,
                NodeToRank::Rollback { version: 4 },
                NodeToRank::Refused("node 2 failed during the barrier".into()),
            ] {
                seen.push(session.rx.recv::<RankToNode>(&mut s).unwrap());
                // The node holds the rank longer than an ordinary answer may take... a bit.
                std::thread::sleep(Duration::from_millis(50));
                session.tx.send(&mut s, &answer).unwrap();
            }
            seen
        });
        let mut link = NodeLink::connect(&path, &secret("the job secret, long enough")).unwrap();
        assert_eq!(
            link.at_safepoint(5).unwrap(),
            None,
            "no policy: act locally"
        );
        assert_eq!(
            link.at_safepoint(5).unwrap(),
            Some(SafepointOrder::Checkpoint(4))
        );
        assert_eq!(
            link.at_safepoint(5).unwrap(),
            Some(SafepointOrder::Continue)
        );
        assert_eq!(
            link.at_safepoint(5).unwrap(),
            Some(SafepointOrder::Rollback(4))
        );
        let err = link.at_safepoint(5).unwrap_err().to_string();
        assert!(err.contains("node 2 failed during the barrier"), "{err}");
        assert_eq!(
            server.join().unwrap(),
            vec![RankToNode::AtSafepoint { rank: 5 }; 5]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_watcher_gets_the_uncoordinated_policys_orders_and_a_rejoin_gets_every_card() {
        let dir = socket_dir("uncoord");
        let path = dir.join("node.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let cards = vec![(vec![1u8, 2], vec![3u8]), (vec![4], vec![5, 6])];
        let answers = vec![
            NodeToRank::LogSafe { version: 3 },
            NodeToRank::PeerMoved {
                rank: 1,
                address: vec![9],
                ring: vec![8],
            },
            NodeToRank::Continue,
            NodeToRank::Peers {
                cards: cards.clone(),
            },
            NodeToRank::Refused("no restart of rank 0 is under way".into()),
        ];
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut session = Session::server(
                &mut s,
                &secret("the job secret, long enough"),
                Protocol::Rank,
            )
            .unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                seen.push(session.rx.recv::<RankToNode>(&mut s).unwrap());
                session.tx.send(&mut s, &answer).unwrap();
            }
            seen
        });
        let mut link = NodeLink::connect(&path, &secret("the job secret, long enough")).unwrap();
        assert_eq!(link.watch_order(0).unwrap(), Some(WatchOrder::LogSafe(3)));
        assert_eq!(
            link.watch_order(0).unwrap(),
            Some(WatchOrder::PeerMoved {
                rank: 1,
                address: vec![9],
                ring: vec![8]
            })
        );
        assert_eq!(link.watch_order(0).unwrap(), None);
        let limit = Duration::from_secs(30);
        assert_eq!(link.rejoin(0, vec![7], vec![7], limit).unwrap(), cards);
        let err = link
            .rejoin(0, vec![7], vec![7], limit)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no restart of rank 0"), "{err}");
        let seen = server.join().unwrap();
        assert!(matches!(seen[0], RankToNode::Watch { rank: 0, .. }));
        assert!(matches!(
            &seen[3],
            RankToNode::Rejoin { rank: 0, address, .. } if address == &vec![7u8]
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_node_with_another_secret_is_refused_at_connect() {
        let dir = socket_dir("badsecret");
        let path = dir.join("node.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            Session::server(
                &mut s,
                &secret("krund's own secret, long enough"),
                Protocol::Rank,
            )
            .is_err()
        });
        let err = NodeLink::connect(&path, &secret("the job secret, long enough"))
            .err()
            .expect("handshake with a wrong secret must fail");
        assert!(matches!(err, RankError::NodeLink { .. }), "{err}");
        assert!(err.to_string().contains("handshake"), "{err}");
        assert!(server.join().unwrap(), "the server side refuses too");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
