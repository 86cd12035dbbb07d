//! Bootstrap channel: a small TCP all-gather service that lets the processes of a job swap
//! endpoint addresses (and other blobs) before the fabric is up, and meet at barriers.
//!
//! Wire format, every frame: `u32 length (LE) | payload`. A client's first frame is
//! `"KRB1" | rank u32 | size u32`. Then each round the client sends one blob and receives
//! `count u32 | (len u32 | bytes)*` with every rank's blob in rank order.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{FabricError, Result};

const MAGIC: &[u8; 4] = b"KRB1";
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
    s.read_exact(&mut len).map_err(|e| FabricError::io("bootstrap read", e))?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(err(format!("frame of {len} bytes exceeds the limit of {max}")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).map_err(|e| FabricError::io("bootstrap read", e))?;
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
    pub fn start(addr: impl ToSocketAddrs, size: usize, timeout: Duration) -> Result<BootstrapServer> {
        let listener = TcpListener::bind(addr).map_err(|e| FabricError::io("bootstrap bind", e))?;
        let addr = listener.local_addr().map_err(|e| FabricError::io("bootstrap bind", e))?;
        let thread = std::thread::Builder::new()
            .name("krun-bootstrap".into())
            .spawn(move || serve(listener, size, timeout))
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

fn serve(listener: TcpListener, size: usize, timeout: Duration) -> Result<()> {
    listener.set_nonblocking(true).map_err(|e| FabricError::io("bootstrap listen", e))?;
    let deadline = Instant::now() + timeout;
    let mut clients: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    let mut joined = 0;
    while joined < size {
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false).map_err(|e| FabricError::io("bootstrap accept", e))?;
                s.set_read_timeout(Some(timeout)).ok();
                s.set_nodelay(true).ok();
                let hello = match read_frame(&mut s, 64) {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("krun bootstrap: dropping connection from {peer}: {e}");
                        continue;
                    }
                };
                if hello.len() != 12 || &hello[..4] != MAGIC {
                    eprintln!("krun bootstrap: dropping connection from {peer}: bad hello");
                    continue;
                }
                let rank = u32::from_le_bytes(hello[4..8].try_into().expect("4")) as usize;
                let claimed = u32::from_le_bytes(hello[8..12].try_into().expect("4")) as usize;
                if claimed != size || rank >= size || clients[rank].is_some() {
                    eprintln!("krun bootstrap: refusing {peer}: rank {rank} of {claimed} (job has {size} ranks)");
                    continue;
                }
                clients[rank] = Some(s);
                joined += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..size).filter(|&r| clients[r].is_none()).collect();
                    return Err(err(format!("ranks {missing:?} did not connect within {timeout:?}")));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(FabricError::io("bootstrap accept", e)),
        }
    }
    let mut clients: Vec<TcpStream> = clients.into_iter().map(|c| c.expect("all joined")).collect();
    loop {
        let mut blobs = Vec::with_capacity(size);
        for (rank, c) in clients.iter_mut().enumerate() {
            match read_frame(c, MAX_BLOB) {
                Ok(b) => blobs.push(b),
                Err(FabricError::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => {
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
    pub fn connect(addr: SocketAddr, rank: usize, size: usize, timeout: Duration) -> Result<BootstrapClient> {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(FabricError::io(format!("connecting to bootstrap {addr}"), e)),
            }
        };
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(timeout)).ok();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(size as u32).to_le_bytes());
        write_frame(&mut stream, &hello).map_err(|e| FabricError::io("bootstrap hello", e))?;
        Ok(BootstrapClient { stream, rank, size })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Contributes `blob` and returns every rank's blob, in rank order.
    pub fn allgather(&mut self, blob: &[u8]) -> Result<Vec<Vec<u8>>> {
        if blob.len() > MAX_BLOB {
            return Err(err(format!("blob of {} bytes exceeds {MAX_BLOB}", blob.len())));
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
        return Err(err(format!("all-gather reply has {count} blobs, expected {size}")));
    }
    let mut pos = 4;
    let mut out = Vec::with_capacity(size);
    for _ in 0..count {
        let len = u32::from_le_bytes(reply.get(pos..pos + 4).ok_or_else(bad)?.try_into().expect("4")) as usize;
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
                    let mut c = BootstrapClient::connect(addr, rank, 3, Duration::from_secs(10)).unwrap();
                    let all = c.allgather(format!("rank{rank}").as_bytes()).unwrap();
                    c.barrier().unwrap();
                    all
                })
            })
            .collect();
        for h in handles {
            let all = h.join().unwrap();
            assert_eq!(all, vec![b"rank0".to_vec(), b"rank1".to_vec(), b"rank2".to_vec()]);
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
    fn malformed_reply_is_an_error_not_a_panic() {
        assert!(parse_gather(&[1, 0], 1).is_err());
        assert!(parse_gather(&[1, 0, 0, 0, 9, 0, 0, 0, 1], 1).is_err());
        assert!(parse_gather(&[2, 0, 0, 0], 1).is_err());
    }
}
