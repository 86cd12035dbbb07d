//! Bootstrap channel: a small TCP all-gather service that lets the processes of a job swap
//! endpoint addresses (and other blobs) before the fabric is up, and meet at barriers.
//!
//! Wire format, every frame: `u32 length (LE) | payload`. Joining is a challenge-response:
//! the server sends `"KRB2" | nonce[16]`, the client answers `"KRB2" | rank u32 | size u32 |
//! HMAC-SHA256(secret, nonce | rank | size)`, the server replies `0` (welcome) or `1 | reason`.
//! Then each round the client sends one blob and receives `count u32 | (len u32 | bytes)*`
//! with every rank's blob in rank order.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{FabricError, Result};
use crate::secret::{ClusterSecret, MAC_LEN};

const MAGIC: &[u8; 4] = b"KRB2";
const NONCE_LEN: usize = 16;
/// Largest blob one rank may contribute to a round.
pub const MAX_BLOB: usize = 1 << 20;

fn err(msg: impl Into<String>) -> FabricError {
    FabricError::Bootstrap(msg.into())
}

fn write_frame(s: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&(payload.len() as u32).to_le_bytes())?;
    s.write_all(payload)
}

fn read_frame(s: &mut TcpStream, max: usize) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .map_err(|e| FabricError::io("bootstrap read", e))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(err(format!(
            "frame of {len} bytes exceeds the limit of {max}"
        )));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)
        .map_err(|e| FabricError::io("bootstrap read", e))?;
    Ok(buf)
}

/// The rendezvous service; runs rounds until every client has disconnected.
pub struct BootstrapServer {
    addr: SocketAddr,
    thread: Option<JoinHandle<Result<()>>>,
}

impl BootstrapServer {
    /// Listens on `addr` (port 0 picks one) for `size` ranks; each must connect within
    /// `timeout`, and each round must complete within `timeout`.
    /// The cluster secret comes from the environment ([`ClusterSecret::from_env`]); without
    /// one, any client may join.
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
        self.thread
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| err("bootstrap thread panicked"))?
    }
}

/// Runs the join handshake with one client; returns its rank or the reason it was refused.
fn admit(
    s: &mut TcpStream,
    size: usize,
    taken: &[bool],
    secret: Option<&ClusterSecret>,
) -> Result<usize, String> {
    let nonce: Vec<u8> = (0..2)
        .flat_map(|_| crate::random_token().to_le_bytes())
        .collect();
    let mut challenge = MAGIC.to_vec();
    challenge.extend_from_slice(&nonce);
    write_frame(s, &challenge).map_err(|e| format!("sending the challenge: {e}"))?;
    let hello = read_frame(s, 64).map_err(|e| format!("no answer to the challenge: {e}"))?;
    if hello.len() != 12 + MAC_LEN || &hello[..4] != MAGIC {
        return Err("malformed join message".into());
    }
    let rank = u32::from_le_bytes(hello[4..8].try_into().expect("4")) as usize;
    let claimed = u32::from_le_bytes(hello[8..12].try_into().expect("4")) as usize;
    let refuse = |s: &mut TcpStream, reason: String| {
        let mut msg = vec![1u8];
        msg.extend_from_slice(reason.as_bytes());
        let _ = write_frame(s, &msg);
        Err(reason)
    };
    if let Some(secret) = secret {
        let mut signed = nonce.clone();
        signed.extend_from_slice(&hello[4..12]);
        if !secret.verify(&signed, &hello[12..]) {
            return refuse(s, format!("rank {rank}: wrong cluster secret"));
        }
    }
    if claimed != size || rank >= size {
        return refuse(
            s,
            format!("rank {rank} of {claimed}: the job has {size} ranks"),
        );
    }
    if taken[rank] {
        return refuse(s, format!("rank {rank} joined twice"));
    }
    write_frame(s, &[0]).map_err(|e| format!("welcoming rank {rank}: {e}"))?;
    Ok(rank)
}

fn serve(
    listener: TcpListener,
    size: usize,
    timeout: Duration,
    secret: Option<ClusterSecret>,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| FabricError::io("bootstrap listen", e))?;
    let deadline = Instant::now() + timeout;
    let mut clients: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    let mut joined = 0;
    while joined < size {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)
                    .map_err(|e| FabricError::io("bootstrap accept", e))?;
                s.set_read_timeout(Some(timeout)).ok();
                s.set_nodelay(true).ok();
                let taken: Vec<bool> = clients.iter().map(Option::is_some).collect();
                let rank = match admit(&mut s, size, &taken, secret.as_ref()) {
                    Ok(rank) => rank,
                    Err(reason) => {
                        eprintln!("krun bootstrap: refusing {peer}: {reason}");
                        continue;
                    }
                };
                clients[rank] = Some(s);
                joined += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..size).filter(|&r| clients[r].is_none()).collect();
                    return Err(err(format!(
                        "ranks {missing:?} did not connect within {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(FabricError::io("bootstrap accept", e)),
        }
    }
    let mut clients: Vec<TcpStream> = clients
        .into_iter()
        .map(|c| c.expect("all joined"))
        .collect();
    loop {
        let mut blobs = Vec::with_capacity(size);
        for (rank, c) in clients.iter_mut().enumerate() {
            match read_frame(c, MAX_BLOB) {
                Ok(b) => blobs.push(b),
                Err(FabricError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    // Orderly end: the first client gone ends the service.
                    if rank == 0 {
                        return Ok(());
                    }
                    return Err(err(format!("rank {rank} left in the middle of a round")));
                }
                Err(e) => return Err(err(format!("rank {rank}: {e}"))),
            }
        }
        let mut reply = Vec::new();
        reply.extend_from_slice(&(size as u32).to_le_bytes());
        for b in &blobs {
            reply.extend_from_slice(&(b.len() as u32).to_le_bytes());
            reply.extend_from_slice(b);
        }
        for (rank, c) in clients.iter_mut().enumerate() {
            write_frame(c, &reply).map_err(|e| err(format!("rank {rank}: {e}")))?;
        }
    }
}

/// One rank's connection to the bootstrap service.
pub struct BootstrapClient {
    stream: TcpStream,
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

    /// As [`BootstrapClient::connect`] with an explicit secret.
    pub fn connect_with(
        addr: SocketAddr,
        rank: usize,
        size: usize,
        timeout: Duration,
        secret: Option<&ClusterSecret>,
    ) -> Result<BootstrapClient> {
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
        stream.set_read_timeout(Some(timeout)).ok();
        let challenge = read_frame(&mut stream, 64)?;
        if challenge.len() != 4 + NONCE_LEN || &challenge[..4] != MAGIC {
            return Err(err(format!(
                "{addr} is not a krun bootstrap service (bad challenge)"
            )));
        }
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(size as u32).to_le_bytes());
        let mut signed = challenge[4..].to_vec();
        signed.extend_from_slice(&hello[4..12]);
        hello.extend_from_slice(&secret.map_or([0; MAC_LEN], |s| s.sign(&signed)));
        write_frame(&mut stream, &hello).map_err(|e| FabricError::io("bootstrap hello", e))?;
        let verdict = read_frame(&mut stream, 4096)?;
        match verdict.split_first() {
            Some((0, _)) => Ok(BootstrapClient { stream, rank, size }),
            Some((_, reason)) => Err(err(format!(
                "{addr} refused to let us join: {}",
                String::from_utf8_lossy(reason)
            ))),
            None => Err(err(format!("{addr} sent an empty verdict"))),
        }
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
        write_frame(&mut self.stream, blob).map_err(|e| FabricError::io("bootstrap send", e))?;
        let reply = read_frame(&mut self.stream, MAX_BLOB * self.size + 4 * self.size + 4)?;
        parse_gather(&reply, self.size)
    }

    /// Returns when every rank has reached the barrier.
    pub fn barrier(&mut self) -> Result<()> {
        self.allgather(&[]).map(drop)
    }
}

fn parse_gather(reply: &[u8], size: usize) -> Result<Vec<Vec<u8>>> {
    let bad = || err("malformed all-gather reply");
    let count = u32::from_le_bytes(reply.get(..4).ok_or_else(bad)?.try_into().expect("4")) as usize;
    if count != size {
        return Err(err(format!(
            "all-gather reply has {count} blobs, expected {size}"
        )));
    }
    let mut pos = 4;
    let mut out = Vec::with_capacity(size);
    for _ in 0..count {
        let len = u32::from_le_bytes(
            reply
                .get(pos..pos + 4)
                .ok_or_else(bad)?
                .try_into()
                .expect("4"),
        ) as usize;
        pos += 4;
        out.push(reply.get(pos..pos + len).ok_or_else(bad)?.to_vec());
        pos += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn malformed_reply_is_an_error_not_a_panic() {
        assert!(parse_gather(&[1, 0], 1).is_err());
        assert!(parse_gather(&[1, 0, 0, 0, 9, 0, 0, 0, 1], 1).is_err());
        assert!(parse_gather(&[2, 0, 0, 0], 1).is_err());
    }
}
