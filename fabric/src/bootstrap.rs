//! Bootstrap channel: a small TCP all-gather service that lets the processes of a job swap
//! endpoint addresses (and other blobs) before the fabric is up, and meet at barriers.
//!
//! The channel speaks the wire toolkit's [`Protocol::Bootstrap`] ([`crate::wire`]): a
//! mutual handshake over the cluster secret, then authenticated, sequenced frames. A rank
//! sends `Join { rank, size }` and gets `Welcome` or `Refused(reason)`; then each round it
//! sends one `Blob` and gets `Gather` with every rank's blob in rank order.
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{FabricError, Result};
use crate::secret::ClusterSecret;
use crate::wire::{FrameReader, FrameWriter, HandshakeSlots, Protocol, Session, HANDSHAKE_TIMEOUT};

/// Largest blob one rank may contribute to a round.
pub const MAX_BLOB: usize = 1 << 20;
const P: Protocol = Protocol::Bootstrap;

/// What a rank says to the service.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// The first message after the handshake.
    Join { rank: u32, size: u32 },
    /// This rank's contribution to the next round.
    Blob(Vec<u8>),
}

/// What the service answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Welcome,
    Refused(String),
    /// Every rank's blob of a round, in rank order.
    Gather(Vec<Vec<u8>>),
}

fn err(msg: impl Into<String>) -> FabricError {
    FabricError::Bootstrap(msg.into())
}

/// The rendezvous service; runs rounds until every client has disconnected.
pub struct BootstrapServer {
    addr: SocketAddr,
    thread: Option<JoinHandle<Result<()>>>,
}

impl BootstrapServer {
    /// Listens on `addr` (port 0 picks one) for `size` ranks; each must connect within
    /// `timeout`. Rounds have no time limit: a job's later rounds (its final barrier) wait
    /// for its slowest member, hours later maybe; a member that dies closes its connection,
    /// which ends the round with an error naming it. (A read timeout here made every job
    /// longer than `timeout` fail at its final barrier.)
    /// The cluster secret comes from the environment ([`ClusterSecret::from_env`]); without
    /// one, the service runs in insecure mode ([`ClusterSecret::insecure`]): any client
    /// may join.
    pub fn start(
        addr: impl ToSocketAddrs,
        size: usize,
        timeout: Duration,
    ) -> Result<BootstrapServer> {
        Self::start_with(addr, size, timeout, ClusterSecret::from_env()?)
    }

    /// As [`BootstrapServer::start`] with an explicit secret.
    pub fn start_with(
        addr: impl ToSocketAddrs,
        size: usize,
        timeout: Duration,
        secret: Option<ClusterSecret>,
    ) -> Result<BootstrapServer> {
        let listener = TcpListener::bind(addr).map_err(|e| FabricError::io("bootstrap bind", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| FabricError::io("bootstrap bind", e))?;
        let secret = secret.unwrap_or_else(ClusterSecret::insecure);
        let thread = std::thread::Builder::new()
            .name("krun-bootstrap".into())
            .spawn(move || serve(listener, size, timeout, secret))
            .map_err(|e| FabricError::io("spawning bootstrap thread", e))?;
        Ok(BootstrapServer {
            addr,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the service to end (all clients gone) and reports how it ended.
    pub fn join(mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| err("bootstrap thread panicked"))?,
            None => Ok(()),
        }
    }
}

/// A client that passed the handshake and said which rank it is.
struct Joiner {
    stream: TcpStream,
    session: Session,
    rank: usize,
    claimed: usize,
    peer: SocketAddr,
}

/// Handshakes one connection (bounded in time) and reads its join message.
fn handshake(stream: TcpStream, peer: SocketAddr, secret: &ClusterSecret) -> Result<Joiner> {
    stream.set_nodelay(true).ok();
    let mut session = Session::server_within(&stream, secret, P, HANDSHAKE_TIMEOUT)?;
    session.rx.set_max_payload(64);
    let join = session
        .rx
        .recv::<Request>(&mut crate::wire::Deadline::new(&stream, HANDSHAKE_TIMEOUT));
    stream.set_read_timeout(None).ok();
    match join? {
        Request::Join { rank, size } => Ok(Joiner {
            stream,
            session,
            rank: rank as usize,
            claimed: size as usize,
            peer,
        }),
        other => Err(err(format!("expected a join message, got {other:?}"))),
    }
}

/// Admits ranks until all `size` joined: each connection is handshaken on its own thread
/// (at most [`crate::wire::MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]), so
/// an idle or slow client delays nobody.
fn admit_all(
    listener: &TcpListener,
    size: usize,
    timeout: Duration,
    secret: &ClusterSecret,
) -> Result<Vec<(TcpStream, Session)>> {
    listener
        .set_nonblocking(true)
        .map_err(|e| FabricError::io("bootstrap listen", e))?;
    let deadline = Instant::now() + timeout;
    let slots = HandshakeSlots::default();
    let (tx, rx) = mpsc::channel::<Joiner>();
    let mut clients: Vec<Option<(TcpStream, Session)>> = (0..size).map(|_| None).collect();
    let mut joined = 0;
    while joined < size {
        let mut idle = true;
        // Accept only with a free handshake slot: more connections wait in the backlog.
        let accepted = match slots.try_take() {
            Some(slot) => listener.accept().map(|a| Some((a, slot))),
            None => Ok(None),
        };
        match accepted {
            Ok(None) => {}
            Ok(Some(((s, peer), slot))) => {
                idle = false;
                if s.set_nonblocking(false).is_err() {
                    continue;
                }
                let (tx, secret) = (tx.clone(), secret.clone());
                let spawned = std::thread::Builder::new()
                    .name("krun-bootstrap-hs".into())
                    .spawn(move || {
                        let _slot = slot;
                        match handshake(s, peer, &secret) {
                            Ok(j) => {
                                let _ = tx.send(j);
                            }
                            Err(e) => eprintln!("krun bootstrap: refusing {peer}: {e}"),
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("krun bootstrap: refusing {peer}: cannot start a thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(FabricError::io("bootstrap accept", e)),
        }
        while let Ok(mut j) = rx.try_recv() {
            idle = false;
            let refusal = if j.claimed != size || j.rank >= size {
                Some(format!(
                    "rank {} of {}: the job has {size} ranks",
                    j.rank, j.claimed
                ))
            } else if clients[j.rank].is_some() {
                Some(format!("rank {} joined twice", j.rank))
            } else {
                None
            };
            let answer = match &refusal {
                Some(r) => Reply::Refused(r.clone()),
                None => Reply::Welcome,
            };
            let sent = j.session.tx.send(&mut j.stream, &answer);
            match (refusal, sent) {
                (Some(r), _) => eprintln!("krun bootstrap: refusing {}: {r}", j.peer),
                (None, Err(e)) => eprintln!("krun bootstrap: welcoming rank {}: {e}", j.rank),
                (None, Ok(())) => {
                    // Admitted: rounds wait as long as the job runs (see `start`).
                    j.stream.set_read_timeout(None).ok();
                    clients[j.rank] = Some((j.stream, j.session));
                    joined += 1;
                }
            }
        }
        if joined < size && idle {
            if Instant::now() >= deadline {
                let missing: Vec<usize> = (0..size).filter(|&r| clients[r].is_none()).collect();
                return Err(err(format!(
                    "ranks {missing:?} did not connect within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(clients.into_iter().flatten().collect())
}

fn serve(
    listener: TcpListener,
    size: usize,
    timeout: Duration,
    secret: ClusterSecret,
) -> Result<()> {
    let mut clients = admit_all(&listener, size, timeout, &secret)?;
    // Late connections are not served: close the listener.
    drop(listener);
    for (_, session) in clients.iter_mut() {
        session.rx.set_max_payload(MAX_BLOB + 16);
    }
    loop {
        let mut blobs = Vec::with_capacity(size);
        for (rank, (stream, session)) in clients.iter_mut().enumerate() {
            match session.rx.recv::<Request>(stream) {
                Ok(Request::Blob(b)) => blobs.push(b),
                Ok(other) => return Err(err(format!("rank {rank}: unexpected message {other:?}"))),
                Err(FabricError::WireClosed { .. }) => {
                    // Orderly end: the first client gone ends the service.
                    if rank == 0 {
                        return Ok(());
                    }
                    return Err(err(format!("rank {rank} left in the middle of a round")));
                }
                Err(e) => return Err(err(format!("rank {rank}: {e}"))),
            }
        }
        let reply = Reply::Gather(blobs);
        for (rank, (stream, session)) in clients.iter_mut().enumerate() {
            session
                .tx
                .send(stream, &reply)
                .map_err(|e| err(format!("rank {rank}: {e}")))?;
        }
    }
}

/// One rank's connection to the bootstrap service.
pub struct BootstrapClient {
    stream: TcpStream,
    tx: FrameWriter,
    rx: FrameReader,
    rank: usize,
    size: usize,
}

impl BootstrapClient {
    /// Connects as `rank` of `size`, retrying until `timeout` (the server may start later).
    /// The cluster secret comes from the environment ([`ClusterSecret::from_env`]).
    pub fn connect(
        addr: SocketAddr,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<BootstrapClient> {
        Self::connect_with(
            addr,
            rank,
            size,
            timeout,
            ClusterSecret::from_env()?.as_ref(),
        )
    }

    /// As [`BootstrapClient::connect`] with an explicit secret (`None`: insecure mode).
    pub fn connect_with(
        addr: SocketAddr,
        rank: usize,
        size: usize,
        timeout: Duration,
        secret: Option<&ClusterSecret>,
    ) -> Result<BootstrapClient> {
        let (rank32, size32) = match (u32::try_from(rank), u32::try_from(size)) {
            (Ok(r), Ok(s)) => (r, s),
            _ => {
                return Err(err(format!(
                    "rank {rank} of {size} does not fit the protocol"
                )))
            }
        };
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(FabricError::io(
                        format!("connecting to bootstrap {addr}"),
                        e,
                    ))
                }
            }
        };
        stream.set_nodelay(true).ok();
        let insecure = ClusterSecret::insecure();
        let secret = secret.unwrap_or(&insecure);
        let within = timeout.max(Duration::from_millis(1));
        let Session { mut tx, mut rx } = Session::client_within(&stream, secret, P, within)
            .map_err(|e| match e {
                FabricError::WireRefused { reason, .. } => {
                    err(format!("{addr} refused to let us join: {reason}"))
                }
                FabricError::WireMalformed { .. } => {
                    err(format!("{addr} is not a krun bootstrap service ({e})"))
                }
                other => other,
            })?;
        stream.set_read_timeout(Some(timeout)).ok();
        tx.send(
            &mut stream,
            &Request::Join {
                rank: rank32,
                size: size32,
            },
        )?;
        rx.set_max_payload(4096);
        match rx.recv::<Reply>(&mut stream)? {
            Reply::Welcome => {}
            Reply::Refused(reason) => {
                return Err(err(format!("{addr} refused to let us join: {reason}")))
            }
            Reply::Gather(_) => return Err(err(format!("{addr} answered the join with a gather"))),
        }
        // Joined: a round waits for every member, as long as the job runs (see
        // `BootstrapServer::start`); a service that dies closes the connection.
        stream.set_read_timeout(None).ok();
        rx.set_max_payload((MAX_BLOB + 8) * size + 16);
        Ok(BootstrapClient {
            stream,
            tx,
            rx,
            rank,
            size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Our end of the connection: the address this host reaches the service from, which is
    /// the one to bind the fabric to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.stream
            .local_addr()
            .map_err(|e| FabricError::io("bootstrap local address", e))
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Contributes `blob` and returns every rank's blob, in rank order.
    pub fn allgather(&mut self, blob: &[u8]) -> Result<Vec<Vec<u8>>> {
        if blob.len() > MAX_BLOB {
            return Err(err(format!(
                "blob of {} bytes exceeds {MAX_BLOB}",
                blob.len()
            )));
        }
        self.tx
            .send(&mut self.stream, &Request::Blob(blob.to_vec()))?;
        match self.rx.recv::<Reply>(&mut self.stream)? {
            Reply::Gather(all) if all.len() == self.size => Ok(all),
            Reply::Gather(all) => Err(err(format!(
                "all-gather reply has {} blobs, expected {}",
                all.len(),
                self.size
            ))),
            other => Err(err(format!("unexpected reply {other:?} to an all-gather"))),
        }
    }

    /// Returns when every rank has reached the barrier.
    pub fn barrier(&mut self) -> Result<()> {
        self.allgather(&[]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_may_come_later_than_the_join_timeout() {
        // A job's final barrier comes long after the start: rounds have no time limit, only
        // the join does (here 300 ms; the second round starts 1 s later, the last member
        // reaches the third 1 s after the others).
        let t = Duration::from_millis(300);
        let server = BootstrapServer::start_with("127.0.0.1:0", 2, t, None).unwrap();
        let addr = server.addr();
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut c = BootstrapClient::connect_with(addr, rank, 2, t, None).unwrap();
                    c.barrier().unwrap();
                    std::thread::sleep(Duration::from_secs(1));
                    c.barrier().unwrap();
                    if rank == 1 {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    c.allgather(b"end").unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), vec![b"end".to_vec(), b"end".to_vec()]);
        }
    }

    #[test]
    fn allgather_and_barrier_across_threads() {
        let server = BootstrapServer::start("127.0.0.1:0", 3, Duration::from_secs(10)).unwrap();
        let addr = server.addr();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut c =
                        BootstrapClient::connect(addr, rank, 3, Duration::from_secs(10)).unwrap();
                    let all = c.allgather(format!("rank{rank}").as_bytes()).unwrap();
                    c.barrier().unwrap();
                    all
                })
            })
            .collect();
        for h in handles {
            let all = h.join().unwrap();
            assert_eq!(
                all,
                vec![b"rank0".to_vec(), b"rank1".to_vec(), b"rank2".to_vec()]
            );
        }
        server.join().unwrap();
    }

    #[test]
    fn missing_rank_times_out_naming_it() {
        let server = BootstrapServer::start("127.0.0.1:0", 2, Duration::from_millis(300)).unwrap();
        let _c = BootstrapClient::connect(server.addr(), 0, 2, Duration::from_secs(5)).unwrap();
        let e = server.join().unwrap_err();
        assert!(e.to_string().contains("[1]"), "{e}");
    }

    #[test]
    fn a_wrong_secret_is_refused_and_told_why() {
        let good = ClusterSecret::new(b"the right secret!".to_vec()).unwrap();
        let bad = ClusterSecret::new(b"the wrong secret!".to_vec()).unwrap();
        let server = BootstrapServer::start_with(
            "127.0.0.1:0",
            1,
            Duration::from_secs(2),
            Some(good.clone()),
        )
        .unwrap();
        let e =
            BootstrapClient::connect_with(server.addr(), 0, 1, Duration::from_secs(5), Some(&bad))
                .err()
                .expect("wrong secret refused");
        assert!(e.to_string().contains("wrong cluster secret"), "{e}");
        let e = BootstrapClient::connect_with(server.addr(), 0, 1, Duration::from_secs(5), None)
            .err()
            .expect("no secret refused");
        assert!(e.to_string().contains("wrong cluster secret"), "{e}");
        let mut c =
            BootstrapClient::connect_with(server.addr(), 0, 1, Duration::from_secs(5), Some(&good))
                .unwrap();
        assert_eq!(c.allgather(b"x").unwrap(), vec![b"x".to_vec()]);
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_rank_outside_the_job_is_refused() {
        let server =
            BootstrapServer::start_with("127.0.0.1:0", 2, Duration::from_secs(2), None).unwrap();
        let e = BootstrapClient::connect_with(server.addr(), 5, 2, Duration::from_secs(5), None)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("rank 5"), "{e}");
        let _a = BootstrapClient::connect_with(server.addr(), 0, 2, Duration::from_secs(5), None)
            .unwrap();
        let e = BootstrapClient::connect_with(server.addr(), 0, 2, Duration::from_secs(5), None)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn bad_frames_are_refused_and_the_ranks_still_join() {
        use std::io::{Read, Write};
        let secret = ClusterSecret::new(b"the bootstrap secret".to_vec()).unwrap();
        let server = BootstrapServer::start_with(
            "127.0.0.1:0",
            2,
            Duration::from_secs(30),
            Some(secret.clone()),
        )
        .unwrap();
        let addr = server.addr();
        let connect = || {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        };
        let session = || {
            let mut s = connect();
            let session = Session::client(&mut s, &secret, P).unwrap();
            (s, session)
        };
        let closed_without_answer = |mut s: TcpStream, what: &str| {
            let mut rest = Vec::new();
            let r = s.read_to_end(&mut rest);
            assert!(
                r.is_ok() && rest.is_empty(),
                "{what}: answered {} bytes ({r:?})",
                rest.len()
            );
        };
        // Idle connections stay open meanwhile.
        let idle: Vec<TcpStream> = (0..8).map(|_| connect()).collect();
        // Garbage instead of the handshake proof.
        let mut s = connect();
        let mut hello = [0u8; 39];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&[0x55; 71]).unwrap();
        closed_without_answer(s, "garbage");
        // A huge length.
        let (mut s, mut sess) = session();
        let mut f = sess.tx.seal(&Request::Join { rank: 0, size: 2 }).unwrap();
        f[24..28].copy_from_slice(&(64u32 << 20).to_le_bytes());
        s.write_all(&f[..28]).unwrap();
        closed_without_answer(s, "huge length");
        // A bad tag.
        let (mut s, mut sess) = session();
        let mut f = sess.tx.seal(&Request::Join { rank: 0, size: 2 }).unwrap();
        let last = f.len() - 1;
        f[last] ^= 1;
        s.write_all(&f).unwrap();
        closed_without_answer(s, "bad tag");
        // A frame replayed from another connection, and one out of order.
        let (mut s, mut sess) = session();
        let recorded = sess.tx.seal(&Request::Join { rank: 9, size: 2 }).unwrap();
        s.write_all(&recorded).unwrap();
        assert!(matches!(
            sess.rx.recv::<Reply>(&mut s).unwrap(),
            Reply::Refused(_)
        ));
        let (mut s, _sess) = session();
        s.write_all(&recorded).unwrap();
        closed_without_answer(s, "replayed frame");
        let (mut s, mut sess) = session();
        let _skipped = sess.tx.seal(&Request::Join { rank: 0, size: 2 }).unwrap();
        let f = sess.tx.seal(&Request::Join { rank: 0, size: 2 }).unwrap();
        s.write_all(&f).unwrap();
        closed_without_answer(s, "frame out of order");
        // A truncated frame.
        let (mut s, mut sess) = session();
        let f = sess.tx.seal(&Request::Join { rank: 0, size: 2 }).unwrap();
        s.write_all(&f[..f.len() / 2]).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        closed_without_answer(s, "truncated frame");
        // The ranks join and gather.
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let secret = secret.clone();
                std::thread::spawn(move || {
                    let mut c = BootstrapClient::connect_with(
                        addr,
                        rank,
                        2,
                        Duration::from_secs(30),
                        Some(&secret),
                    )
                    .unwrap();
                    c.allgather(&[rank as u8]).unwrap()
                })
            })
            .collect();
        for r in ranks {
            assert_eq!(r.join().unwrap(), vec![vec![0u8], vec![1u8]]);
        }
        drop(idle);
        server.join().unwrap();
    }

    #[test]
    fn more_idle_connections_than_handshake_slots_delay_the_ranks_but_do_not_fail_them() {
        let server =
            BootstrapServer::start_with("127.0.0.1:0", 2, Duration::from_secs(60), None).unwrap();
        let addr = server.addr();
        // Every slot taken by a silent client, and more waiting in the backlog.
        let idle: Vec<TcpStream> = (0..crate::wire::MAX_HANDSHAKES + 6)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut c = BootstrapClient::connect_with(
                        addr,
                        rank,
                        2,
                        Duration::from_secs(60),
                        None,
                    )?;
                    c.allgather(&[rank as u8])
                })
            })
            .collect();
        for r in ranks {
            assert_eq!(r.join().unwrap().unwrap(), vec![vec![0u8], vec![1u8]]);
        }
        drop(idle);
        server.join().unwrap();
    }

    #[test]
    fn an_idle_connection_does_not_block_the_ranks() {
        let server =
            BootstrapServer::start_with("127.0.0.1:0", 2, Duration::from_secs(30), None).unwrap();
        // Connects and says nothing (it would hold the old one-at-a-time admission).
        let idle = TcpStream::connect(server.addr()).unwrap();
        let addr = server.addr();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut c =
                        BootstrapClient::connect_with(addr, rank, 2, Duration::from_secs(30), None)
                            .unwrap();
                    c.allgather(&[rank as u8]).unwrap()
                })
            })
            .collect();
        for r in ranks {
            assert_eq!(r.join().unwrap(), vec![vec![0u8], vec![1u8]]);
        }
        drop(idle);
        server.join().unwrap();
    }
}
