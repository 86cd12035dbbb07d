//! The verbs backend's side channel: how two endpoints exchange what they need to connect a
//! pair of RC queue pairs ([`QpInfo`]).
//!
//! It runs on the wire toolkit ([`crate::wire`]), protocol [`Protocol::Verbs`]: a TCP
//! connection, the mutual handshake over the cluster secret, then one sealed frame each way
//! (the connecting side's [`QpInfo`], the listener's [`SideReply`]), all within one deadline.
//! A peer without the secret is refused before anything it sends is decoded; frames are
//! bounded by [`MAX_SIDE_PAYLOAD`] before anything is allocated for them; at most
//! [`MAX_HANDSHAKES`] connections are served at once (more wait in the kernel's backlog),
//! each on its own thread, so a silent or hostile client holds up nobody.
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{FabricError, Result};
use crate::secret::ClusterSecret;
use crate::wire::{Deadline, HandshakeSlots, Protocol, Session, MAX_HANDSHAKES};

const P: Protocol = Protocol::Verbs;
/// Bound on one side-channel frame's payload (a [`QpInfo`] encodes in under 60 bytes; a
/// refusal's reason is cut to fit).
pub(crate) const MAX_SIDE_PAYLOAD: usize = 512;
const MAX_REASON: usize = 400;

/// What the other side needs to connect a QP to ours; sent both ways over the side channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct QpInfo {
    /// The sender's endpoint token.
    pub token: u64,
    /// The endpoint the sender means to reach (a stale address reaching a new endpoint on a
    /// reused port is refused).
    pub to_token: u64,
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    pub gid: [u8; 16],
    /// The sender port's active MTU (`ibv_mtu`, 1..=5); the path uses the smaller one.
    pub mtu: u8,
}

impl QpInfo {
    /// Checks the fields a verbs device would reject (or misread) before they reach it.
    pub(crate) fn check(&self) -> Result<()> {
        if self.qpn > 0xff_ffff || self.psn > 0xff_ffff {
            return Err(malformed(format!(
                "QPN {:#x} or PSN {:#x} exceeds 24 bits",
                self.qpn, self.psn
            )));
        }
        if !(1..=5).contains(&self.mtu) {
            return Err(malformed(format!(
                "invalid MTU code {} (1..=5 are defined)",
                self.mtu
            )));
        }
        Ok(())
    }
}

/// The listener's answer: its own QP info, or why it refused to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SideReply {
    Connected(QpInfo),
    Refused(String),
}

fn malformed(what: String) -> FabricError {
    FabricError::WireMalformed {
        protocol: P.name(),
        what,
    }
}

/// The connecting half: sends `info` to the side channel at `side`, returns the listener's
/// checked answer. Everything (connect, handshake, both frames) ends within `within`.
pub(crate) fn exchange(
    side: SocketAddr,
    secret: &ClusterSecret,
    info: &QpInfo,
    within: Duration,
) -> Result<QpInfo> {
    let io = |e| FabricError::io(format!("verbs side channel to {side}"), e);
    let stream = TcpStream::connect_timeout(&side, within).map_err(io)?;
    let mut dl = Deadline::new(&stream, within);
    let mut s = Session::client(&mut dl, secret, P)?;
    s.rx.set_max_payload(MAX_SIDE_PAYLOAD);
    s.tx.send(&mut dl, info)?;
    match s.rx.recv::<SideReply>(&mut dl)? {
        SideReply::Connected(remote) => {
            remote.check()?;
            Ok(remote)
        }
        SideReply::Refused(reason) => Err(FabricError::WireRefused {
            protocol: P.name(),
            reason,
        }),
    }
}

/// The listening half: serves `listener` (non-blocking) until `shutdown` is set. Each
/// authenticated request is answered with `answer`'s result; a refusal is sent back with its
/// reason and logged, as is every connection that fails the handshake or sends a bad frame.
pub(crate) fn serve<F>(
    listener: TcpListener,
    secret: ClusterSecret,
    within: Duration,
    shutdown: &AtomicBool,
    answer: F,
) where
    F: Fn(QpInfo) -> Result<QpInfo> + Send + Sync + 'static,
{
    let answer = Arc::new(answer);
    let slots = HandshakeSlots::new(MAX_HANDSHAKES);
    while !shutdown.load(Ordering::Relaxed) {
        // Take a slot before accepting: beyond the bound, connections wait in the backlog.
        let Some(slot) = slots.try_take() else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        match listener.accept() {
            Ok((stream, from)) => {
                let (answer, secret) = (answer.clone(), secret.clone());
                let spawned = std::thread::Builder::new()
                    .name("krun-verbs-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        if let Err(e) = serve_one(&stream, &secret, within, &*answer) {
                            eprintln!("krun fabric (verbs): refusing connection from {from}: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("krun fabric (verbs): cannot serve {from}: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: transient, do not kill the listener.
                eprintln!("krun fabric (verbs): side channel accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn serve_one(
    stream: &TcpStream,
    secret: &ClusterSecret,
    within: Duration,
    answer: &(dyn Fn(QpInfo) -> Result<QpInfo> + Send + Sync),
) -> Result<()> {
    stream
        .set_nonblocking(false)
        .map_err(|e| FabricError::io("verbs side channel setup", e))?;
    let mut dl = Deadline::new(stream, within);
    let mut s = Session::server(&mut dl, secret, P)?;
    s.rx.set_max_payload(MAX_SIDE_PAYLOAD);
    let remote: QpInfo = s.rx.recv(&mut dl)?;
    let result = remote.check().and_then(|()| answer(remote));
    let reply = match &result {
        Ok(local) => SideReply::Connected(*local),
        Err(e) => {
            let mut reason = e.to_string();
            if reason.len() > MAX_REASON {
                let mut cut = MAX_REASON;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            SideReply::Refused(reason)
        }
    };
    s.tx.send(&mut dl, &reply)?;
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HEADER_LEN, TAG_LEN};
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(format!("{s} and enough bytes").into_bytes()).unwrap()
    }

    fn info(token: u64, to_token: u64) -> QpInfo {
        QpInfo {
            token,
            to_token,
            qpn: 77,
            psn: 0xabcdef,
            lid: 3,
            gid: [9; 16],
            mtu: 3,
        }
    }

    /// A side channel whose "device" answers with a fixed QP info for endpoint 0x5678 and
    /// refuses requests meant for another endpoint, as the verbs endpoint does.
    struct Server {
        addr: SocketAddr,
        shutdown: Arc<AtomicBool>,
        served: Arc<AtomicUsize>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        fn start(sec: ClusterSecret, within: Duration) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = Arc::new(AtomicBool::new(false));
            let served = Arc::new(AtomicUsize::new(0));
            let (stop, count) = (shutdown.clone(), served.clone());
            let thread = std::thread::spawn(move || {
                serve(listener, sec, within, &stop, move |remote| {
                    if remote.to_token != 0x5678 {
                        return Err(FabricError::BadAddress(format!(
                            "connection meant for endpoint {:016x}",
                            remote.to_token
                        )));
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    Ok(info(0x5678, remote.token))
                })
            });
            Server {
                addr,
                shutdown,
                served,
                thread: Some(thread),
            }
        }

        fn works(&self) {
            let got = exchange(
                self.addr,
                &secret("one"),
                &info(0x1234, 0x5678),
                Duration::from_secs(5),
            )
            .expect("a good client is served");
            assert_eq!(got, info(0x5678, 0x1234));
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.shutdown.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    /// Logs in with the right secret over a raw stream, so a test can send any bytes after.
    fn logged_in(addr: SocketAddr) -> (TcpStream, Session) {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let session = Session::client(&mut &s, &secret("one"), P).unwrap();
        (s, session)
    }

    /// The server's answer to whatever the client sent: a refusal frame or the connection
    /// closing (either way, never a QP).
    fn no_qp(mut s: TcpStream, mut session: Session) {
        match session.rx.recv::<SideReply>(&mut s) {
            Ok(SideReply::Connected(q)) => panic!("a bad request got a QP: {q:?}"),
            Ok(SideReply::Refused(_)) | Err(_) => {}
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }

    #[test]
    fn qp_info_round_trips_through_the_channel() {
        let server = Server::start(secret("one"), Duration::from_secs(5));
        server.works();
        assert_eq!(server.served.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_wrong_secret_is_refused_and_the_endpoint_still_works() {
        let server = Server::start(secret("one"), Duration::from_secs(5));
        let e = exchange(
            server.addr,
            &secret("two"),
            &info(0x1234, 0x5678),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(e.to_string().contains("wrong cluster secret"), "{e}");
        assert!(e.to_string().contains("verbs"), "{e}");
        assert_eq!(server.served.load(Ordering::SeqCst), 0);
        server.works();
    }

    #[test]
    fn a_request_for_another_endpoint_is_refused_with_the_reason() {
        let server = Server::start(secret("one"), Duration::from_secs(5));
        let e = exchange(
            server.addr,
            &secret("one"),
            &info(0x1234, 0x9999),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(
            matches!(&e, FabricError::WireRefused { reason, .. } if reason.contains("0000000000009999")),
            "{e}"
        );
        server.works();
    }

    #[test]
    fn out_of_range_fields_are_refused_before_the_device_sees_them() {
        let server = Server::start(secret("one"), Duration::from_secs(5));
        for bad in [
            QpInfo {
                qpn: 1 << 24,
                ..info(1, 0x5678)
            },
            QpInfo {
                psn: u32::MAX,
                ..info(1, 0x5678)
            },
            QpInfo {
                mtu: 0,
                ..info(1, 0x5678)
            },
            QpInfo {
                mtu: 6,
                ..info(1, 0x5678)
            },
        ] {
            let e = exchange(server.addr, &secret("one"), &bad, Duration::from_secs(5))
                .unwrap_err()
                .to_string();
            assert!(e.contains("24 bits") || e.contains("MTU"), "{e}");
        }
        assert_eq!(server.served.load(Ordering::SeqCst), 0);
        server.works();
    }

    #[test]
    fn malformed_truncated_and_oversized_frames_are_refused_and_the_endpoint_still_works() {
        let server = Server::start(secret("one"), Duration::from_secs(5));
        let good = {
            let (_s, mut session) = logged_in(server.addr);
            session.tx.seal(&info(0x1234, 0x5678)).unwrap()
        };
        // A frame sealed for another session: wrong keys.
        let (mut s, session) = logged_in(server.addr);
        s.write_all(&good).unwrap();
        no_qp(s, session);
        // Truncated frames, then the connection closes.
        for cut in [1, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 3] {
            let (mut s, mut session) = logged_in(server.addr);
            let f = session.tx.seal(&info(0x1234, 0x5678)).unwrap();
            s.write_all(&f[..cut]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            no_qp(s, session);
        }
        // A header announcing a payload beyond the bound: refused before allocation.
        let (mut s, mut session) = logged_in(server.addr);
        let big = session.tx.seal(&vec![7u8; MAX_SIDE_PAYLOAD + 1]).unwrap();
        s.write_all(&big[..HEADER_LEN]).unwrap();
        no_qp(s, session);
        let (mut s, mut session) = logged_in(server.addr);
        let mut huge = session.tx.seal(&info(1, 0x5678)).unwrap();
        huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&huge).unwrap();
        no_qp(s, session);
        // Authentic frames that do not decode as a QP info.
        for junk in [vec![], vec![0xffu8; 40], vec![1u8; 3]] {
            let (mut s, mut session) = logged_in(server.addr);
            let f = session.tx.seal(&junk).unwrap();
            s.write_all(&f).unwrap();
            no_qp(s, session);
        }
        // A QP info with trailing bytes inside an authentic frame.
        let (mut s, mut session) = logged_in(server.addr);
        let f = session.tx.seal(&(info(1, 0x5678), 5u8)).unwrap();
        s.write_all(&f).unwrap();
        no_qp(s, session);
        // Garbage instead of a handshake.
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&[0x55u8; 200]);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.len() <= 39 + 39,
            "{} bytes answered to garbage",
            rest.len()
        );
        assert_eq!(server.served.load(Ordering::SeqCst), 0);
        server.works();
        assert_eq!(server.served.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_silent_client_is_cut_off_and_does_not_block_others() {
        let server = Server::start(secret("one"), Duration::from_millis(300));
        // Logged in, then silent: the deadline ends it; meanwhile others are served.
        let (mut s, _session) = logged_in(server.addr);
        let idle = TcpStream::connect(server.addr).unwrap();
        server.works();
        let mut rest = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = s.read_to_end(&mut rest);
        assert!(n.is_ok(), "the silent connection was not closed: {n:?}");
        assert!(rest.is_empty(), "a silent client got {} bytes", rest.len());
        drop(idle);
    }

    #[test]
    fn the_encoded_qp_info_fits_the_bound() {
        let max = QpInfo {
            token: u64::MAX,
            to_token: u64::MAX,
            qpn: u32::MAX,
            psn: u32::MAX,
            lid: u16::MAX,
            gid: [0xff; 16],
            mtu: u8::MAX,
        };
        let n = crate::wire::encode(P, &SideReply::Connected(max))
            .unwrap()
            .len();
        assert!(n + HEADER_LEN + TAG_LEN < MAX_SIDE_PAYLOAD, "{n}");
        let refusal = SideReply::Refused("x".repeat(MAX_REASON));
        assert!(crate::wire::encode(P, &refusal).unwrap().len() <= MAX_SIDE_PAYLOAD);
    }
}
