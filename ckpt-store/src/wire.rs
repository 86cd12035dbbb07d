//! Store-to-store control messages, carried by fabric tagged messages; the bulk data moves
//! with one-sided RMA.
//!
//! ```text
//! message := "KRS1" | kind u8 | request u64 | from_node u32 | body_len u32 | body | hmac (32)
//! ```
//! The HMAC-SHA256 (cluster secret) covers everything before it: a message from a node
//! without the secret, or altered on the way, is dropped with a log line naming its sender.
use crate::error::{Result, StoreError};
use fabric::secret::{ClusterSecret, MAC_LEN};

pub const MAGIC: &[u8; 4] = b"KRS1";
const FIXED: usize = 4 + 1 + 8 + 4 + 4;

/// Message kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Reserve = 1,
    Reserved = 2,
    Commit = 3,
    Ack = 4,
    Lookup = 5,
    Found = 6,
    NotFound = 7,
    Drop = 8,
    Parity = 9,
    ParityFound = 10,
    Error = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Reserve,
            2 => Reserved,
            3 => Commit,
            4 => Ack,
            5 => Lookup,
            6 => Found,
            7 => NotFound,
            8 => Drop,
            9 => Parity,
            10 => ParityFound,
            11 => Error,
            _ => return None,
        })
    }
}

/// A decoded, authenticated message.
#[derive(Debug)]
pub struct Envelope {
    pub kind: Kind,
    pub request: u64,
    pub from_node: u32,
    pub body: Vec<u8>,
}

pub fn encode(
    secret: &ClusterSecret,
    kind: Kind,
    request: u64,
    from_node: u32,
    body: &[u8],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(FIXED + body.len() + MAC_LEN);
    m.extend_from_slice(MAGIC);
    m.push(kind as u8);
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&from_node.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    let mac = secret.sign(&m);
    m.extend_from_slice(&mac);
    m
}

/// Decodes and authenticates; errors say what is wrong (for the log line).
pub fn decode(secret: &ClusterSecret, m: &[u8]) -> std::result::Result<Envelope, String> {
    if m.len() < FIXED + MAC_LEN {
        return Err(format!("{} bytes is shorter than any message", m.len()));
    }
    if &m[..4] != MAGIC {
        return Err(format!("bad magic {:?}", String::from_utf8_lossy(&m[..4])));
    }
    let (signed, mac) = m.split_at(m.len() - MAC_LEN);
    if !secret.verify(signed, mac) {
        return Err("authentication failed (wrong cluster secret or altered message)".into());
    }
    let kind = Kind::from_u8(m[4]).ok_or_else(|| format!("unknown message kind {}", m[4]))?;
    let request = u64::from_le_bytes(m[5..13].try_into().expect("8 bytes"));
    let from_node = u32::from_le_bytes(m[13..17].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(m[17..21].try_into().expect("4 bytes")) as usize;
    if FIXED + len != signed.len() {
        return Err(format!(
            "body length {len} does not match the message ({} bytes)",
            m.len()
        ));
    }
    Ok(Envelope {
        kind,
        request,
        from_node,
        body: signed[FIXED..].to_vec(),
    })
}

/// Builds a message body.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn str(mut self, s: &str) -> Self {
        let b = s.as_bytes();
        let n = b.len().min(u16::MAX as usize);
        self.0.extend_from_slice(&(n as u16).to_le_bytes());
        self.0.extend_from_slice(&b[..n]);
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads a message body; every read is bounds-checked.
pub struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            return Err(StoreError::Invalid(format!(
                "message body ends at {} while reading {n} bytes at {}",
                self.b.len(),
                self.at
            )));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    pub fn str(&mut self) -> Result<String> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| StoreError::Invalid("a string is not UTF-8".into()))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let s = ClusterSecret::random();
        let body = Writer::default().str("job/r1").u64(7).u32(3).0;
        let m = encode(&s, Kind::Reserve, 42, 2, &body);
        let e = decode(&s, &m).unwrap();
        assert_eq!((e.kind, e.request, e.from_node), (Kind::Reserve, 42, 2));
        let mut r = Reader::new(&e.body);
        assert_eq!(r.str().unwrap(), "job/r1");
        assert_eq!(r.u64().unwrap(), 7);
        assert_eq!(r.u32().unwrap(), 3);
        assert!(r.u8().is_err(), "reading past the end fails");

        let other = ClusterSecret::random();
        assert!(decode(&other, &m).unwrap_err().contains("authentication"));
        let mut altered = m.clone();
        altered[20] ^= 1;
        assert!(decode(&s, &altered).is_err());
        assert!(decode(&s, &m[..10]).is_err());
        assert!(decode(
            &s,
            b"garbage that is long enough to pass the size check but no magic.."
        )
        .is_err());
    }
}
