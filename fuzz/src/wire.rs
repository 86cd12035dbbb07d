//! The wire toolkit's readers (fabric/src/wire.rs): stream frames, datagram frames and the
//! session handshake. Their payloads go on to the protocol's message decoders
//! ([`crate::messages::payload`]), so a genuine seed frame is decoded end to end.
//!
//! Inputs start with a selector byte: the protocol is `Protocol::ALL[sel % 9]`; a selector
//! of 128 or more also lowers the reader's payload bound (the too-large path).
use std::io::{Read, Write};
use std::sync::OnceLock;

use fabric::secret::ClusterSecret;
use fabric::wire::{FrameReader, FrameWriter, Header, Opener, Protocol, Sealer, Session};

use crate::{messages, split_selector, Target};

/// The key of the frame target's reader: fixed, so that frames sealed by the seed
/// generator authenticate in every run (a session's keys come from its handshake).
pub const FRAME_KEY: [u8; 32] = *b"krun-fuzz-frame-key-0123456789ab";

/// The cluster secret of the datagram and handshake targets.
pub fn secret() -> &'static ClusterSecret {
    static S: OnceLock<ClusterSecret> = OnceLock::new();
    S.get_or_init(|| {
        ClusterSecret::new(b"the fuzz targets' cluster secret".to_vec()).expect("a 32-byte secret")
    })
}

fn protocol(sel: u8) -> Protocol {
    Protocol::ALL[sel as usize % Protocol::ALL.len()]
}

fn selector(p: Protocol) -> u8 {
    Protocol::ALL
        .iter()
        .position(|&q| q == p)
        .expect("a protocol of ALL") as u8
}

/// The payload bound a selector asks for.
fn max_payload(sel: u8, default: usize) -> usize {
    if sel >= 128 {
        64
    } else {
        default
    }
}

fn names(e: &impl std::fmt::Display, p: Protocol, what: &str) {
    let text = e.to_string();
    assert!(
        text.contains(p.name()),
        "{what}: the error does not name the {} protocol: {text}",
        p.name()
    );
}

pub const FRAME: Target = Target {
    name: "frame",
    what: "stream frames (FrameReader: header, length bound, tag, sequence) and their payloads",
    run: frame,
    seeds: frame_seeds,
};

fn frame(data: &[u8]) {
    let Some((sel, stream)) = split_selector(data) else {
        return;
    };
    let p = protocol(sel);
    let mut reader = FrameReader::with_key(p, FRAME_KEY);
    reader.set_max_payload(max_payload(sel, fabric::wire::DEFAULT_MAX_PAYLOAD));
    let mut r = stream;
    // Each accepted frame consumes at least its header and tag: bounded by the input.
    loop {
        let before = r.len();
        match reader.recv_payload(&mut r) {
            Ok(payload) => {
                assert!(r.len() < before, "a frame was accepted from no bytes");
                messages::payload(p, &payload);
            }
            Err(e) => {
                names(&e, p, "FrameReader");
                break;
            }
        }
    }
    for q in Protocol::ALL {
        if let Err(e) = Header::decode(stream, q, 1 << 20) {
            names(&e, q, "Header::decode");
        }
    }
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (p, payloads) in messages::sample_payloads() {
        // A few frames of one stream each, sealed in order.
        for chunk in payloads.chunks(3).take(2) {
            let mut w = FrameWriter::with_key(p, FRAME_KEY);
            let mut seed = vec![selector(p)];
            for payload in chunk {
                seed.extend(seal_encoded(&mut w, payload));
            }
            out.push(seed);
        }
    }
    out
}

/// Seals an already encoded payload: `FrameWriter::seal` encodes a message, and a postcard
/// tuple of bytes is the bytes themselves, so sealing the payload as a fixed-size sequence
/// of `u8`s produces exactly the frame of the original message.
fn seal_encoded(w: &mut FrameWriter, payload: &[u8]) -> Vec<u8> {
    w.seal(&Raw(payload)).expect("a sealed frame")
}

/// Serializes as its bytes without a length prefix (a tuple of `u8`s in postcard).
struct Raw<'a>(&'a [u8]);

impl serde::Serialize for Raw<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(self.0.len())?;
        for b in self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

pub const DATAGRAM: Target = Target {
    name: "datagram",
    what: "datagram frames (Opener: header, length, tag, replay window) and their payloads",
    run: datagram,
    seeds: datagram_seeds,
};

fn datagram(data: &[u8]) {
    let Some((sel, frame)) = split_selector(data) else {
        return;
    };
    let p = protocol(sel);
    let mut opener = Opener::new(secret(), p, max_payload(sel, 1 << 20));
    match opener.open_payload(frame) {
        Ok((_, payload)) => {
            messages::payload(p, payload);
            let again = opener.open_payload(frame);
            assert!(again.is_err(), "a replayed datagram was accepted");
        }
        Err(e) => names(&e, p, "Opener"),
    }
}

fn datagram_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (p, payloads) in messages::sample_payloads() {
        let mut s = Sealer::new(secret(), p).expect("a sealer");
        for payload in payloads.iter().take(3) {
            let mut seed = vec![selector(p)];
            seed.extend(s.seal(&Raw(payload)).expect("a sealed datagram"));
            out.push(seed);
        }
    }
    out
}

pub const HANDSHAKE: Target = Target {
    name: "handshake",
    what: "the session handshake's messages, as the server and as the client reads them",
    run: handshake,
    seeds: handshake_seeds,
};

/// A stream whose reads come from the input and whose writes go nowhere.
struct Scripted<'a>(&'a [u8]);

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn handshake(data: &[u8]) {
    let Some((sel, bytes)) = split_selector(data) else {
        return;
    };
    let p = protocol(sel);
    // The server reads the client's proof; its nonce is fresh, so no input can prove the
    // secret: every input must be refused.
    match Session::server(&mut Scripted(bytes), secret(), p) {
        Ok(_) => panic!("a handshake without the secret was accepted by the server"),
        Err(e) => names(&e, p, "Session::server"),
    }
    // The client reads the server's hello and answer (or refusal); its own nonce is fresh.
    match Session::client(&mut Scripted(bytes), secret(), p) {
        Ok(_) => panic!("a handshake without the secret was accepted by the client"),
        Err(e) => names(&e, p, "Session::client"),
    }
}

fn handshake_seeds() -> Vec<Vec<u8>> {
    // What each side sends, recorded from a real handshake over a socket pair.
    use std::os::unix::net::UnixStream;
    let mut out = Vec::new();
    for p in [Protocol::Control, Protocol::Store, Protocol::Verbs] {
        let (a, b) = UnixStream::pair().expect("a socket pair");
        let mut a_rec = Recorder(a, Vec::new());
        let mut b_rec = Recorder(b, Vec::new());
        let server = std::thread::spawn(move || {
            Session::server(&mut b_rec, secret(), p).expect("the server side");
            b_rec.1
        });
        Session::client(&mut a_rec, secret(), p).expect("the client side");
        let from_server = server.join().expect("the server thread");
        out.push([vec![selector(p)], a_rec.1].concat());
        out.push([vec![selector(p)], from_server].concat());
    }
    out
}

/// Records what is written to a stream.
struct Recorder<S>(S, Vec<u8>);

impl<S: Read> Read for Recorder<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for Recorder<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.1.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
