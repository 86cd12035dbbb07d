//! Property tests: every fabric decoder that reads from the network (frames of a stream
//! session, datagram frames, the bootstrap's messages, endpoint addresses and remote region
//! descriptors) returns an error on random and mutated input: it never panics, never
//! accepts a forged or replayed frame, and never allocates beyond a bound whatever a length
//! field announces.
use std::os::unix::net::UnixStream;

use fabric::bootstrap::{Reply, Request};
use fabric::fuzz::{case_count, cases, check, max_alloc, seed, MaxAlloc};
use fabric::secret::ClusterSecret;
use fabric::wire::{self, Header, Opener, Protocol, Sealer, Session, HEADER_LEN};
use fabric::{EndpointAddress, Provider, RemoteRegion};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[global_allocator]
static ALLOC: MaxAlloc = MaxAlloc;

/// Cases per decoder: enough to reach every variant and length path of these small
/// formats; bounded so the suite stays quick in debug builds.
const CASES: usize = 20_000;
/// No single allocation of a decoder may exceed this, whatever the input announces (the
/// cases themselves are at most a few KiB; the wire toolkit's readers grow a payload buffer
/// only as bytes arrive, from at most 1 MiB).
const ALLOC_BOUND: usize = 2 << 20;

fn secret() -> ClusterSecret {
    ClusterSecret::new(b"the property tests' cluster secret".to_vec()).unwrap()
}

fn session_pair(p: Protocol) -> (Session, Session) {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let s = secret();
    let t = std::thread::spawn(move || Session::server(&mut b, &s, p).unwrap());
    let c = Session::client(&mut a, &secret(), p).unwrap();
    (c, t.join().unwrap())
}

/// Every decodable mutant re-encodes to a message that decodes to the same encoding
/// (decoding is a function of the bytes, not of leftovers).
fn fuzz_message<M: Serialize + DeserializeOwned>(
    name: &str,
    p: Protocol,
    samples: &[M],
    base: u64,
) {
    let encoded: Vec<Vec<u8>> = samples
        .iter()
        .map(|m| wire::encode(p, m).unwrap())
        .collect();
    for e in &encoded {
        assert!(
            wire::decode::<M>(p, e).is_ok(),
            "{name}: a sample does not decode"
        );
    }
    let accepted = check(
        name,
        cases(seed(base), &encoded, case_count(CASES)),
        |bytes| match wire::decode::<M>(p, bytes) {
            Ok(m) => {
                let again = wire::encode(p, &m).unwrap();
                let back: M = wire::decode(p, &again).unwrap();
                assert_eq!(wire::encode(p, &back).unwrap(), again, "{name}");
                true
            }
            Err(e) => {
                assert!(e.to_string().contains(p.name()), "{name}: {e}");
                false
            }
        },
    );
    assert!(accepted < case_count(CASES), "{name}: every case decoded");
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "{name}: allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn stream_frames_accept_nothing_forged_and_never_panic() {
    let (mut c, mut s) = session_pair(Protocol::Control);
    let msgs: Vec<(String, Vec<u32>)> = vec![
        ("run".into(), vec![1, 2, 3]),
        (String::new(), vec![]),
        ("x".repeat(200), vec![u32::MAX; 20]),
    ];
    let frames: Vec<Vec<u8>> = msgs.iter().map(|m| c.tx.seal(m).unwrap()).collect();
    let accepted = check(
        "FrameReader",
        cases(seed(1), &frames, case_count(CASES)),
        |frame| s.rx.recv::<(String, Vec<u32>)>(&mut &frame[..]).is_ok(),
    );
    // Only the genuine frames, each once and in order, may pass; a mutant that only
    // appends bytes after a genuine frame reads as that frame (a stream's next frame
    // starts there).
    assert!(accepted <= frames.len(), "{accepted} frames accepted");
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn a_header_announcing_the_maximum_allocates_only_what_arrives() {
    let (mut c, mut s) = session_pair(Protocol::Store);
    let mut frame = c.tx.seal(&vec![7u8; 100]).unwrap();
    frame[24..28].copy_from_slice(&(wire::DEFAULT_MAX_PAYLOAD as u32).to_le_bytes());
    let e = s.rx.recv::<Vec<u8>>(&mut &frame[..]).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "a 16 MiB announcement allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn datagram_frames_accept_nothing_forged_and_never_panic() {
    let sec = secret();
    let mut tx = Sealer::new(&sec, Protocol::Dsm).unwrap();
    let mut rx = Opener::new(&sec, Protocol::Dsm, 1 << 16);
    let frames: Vec<Vec<u8>> = (0..5u64)
        .map(|i| tx.seal(&(i, vec![i as u8; i as usize * 30])).unwrap())
        .collect();
    let accepted = check(
        "Opener",
        cases(seed(2), &frames, case_count(CASES)),
        |frame| rx.open::<(u64, Vec<u8>)>(frame).is_ok(),
    );
    assert!(accepted <= frames.len(), "{accepted} datagrams accepted");
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}

#[test]
fn frame_headers_never_panic() {
    let mut samples = Vec::new();
    let (mut c, _s) = session_pair(Protocol::Rank);
    samples.push(c.tx.seal(&1u8).unwrap()[..HEADER_LEN].to_vec());
    let accepted = check(
        "Header::decode",
        cases(seed(3), &samples, case_count(CASES)),
        |h| {
            Protocol::ALL
                .iter()
                .any(|&p| Header::decode(h, p, 1 << 20).is_ok())
        },
    );
    assert!(accepted < case_count(CASES));
}

#[test]
fn bootstrap_messages_never_panic() {
    fuzz_message(
        "bootstrap Request",
        Protocol::Bootstrap,
        &[
            Request::Join { rank: 3, size: 8 },
            Request::Blob(vec![1, 2, 3, 4]),
            Request::Blob(vec![]),
        ],
        4,
    );
    fuzz_message(
        "bootstrap Reply",
        Protocol::Bootstrap,
        &[
            Reply::Welcome,
            Reply::Refused("wrong cluster secret".into()),
            Reply::Gather(vec![vec![1; 40], vec![], vec![9, 9]]),
        ],
        5,
    );
}

#[test]
fn endpoint_addresses_and_region_descriptors_never_panic() {
    let addr = |provider, raw: Vec<u8>| EndpointAddress {
        provider,
        token: 0x1234_5678,
        raw,
    };
    let samples: Vec<Vec<u8>> = [
        addr(Provider::Tcp, vec![2, 0, 0x1f, 0x90, 127, 0, 0, 1]),
        addr(Provider::Shm, b"fi_shm://1234".to_vec()),
        addr(Provider::Loopback, vec![]),
        addr(
            Provider::Verbs,
            vec![
                b'V', 1, 4, 10, 0, 0, 1, 1, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                14, 15, 16,
            ],
        ),
    ]
    .iter()
    .map(|a| a.to_bytes())
    .collect();
    let accepted = check(
        "EndpointAddress::from_bytes",
        cases(seed(6), &samples, case_count(CASES)),
        |b| EndpointAddress::from_bytes(b).is_ok(),
    );
    assert!(accepted < case_count(CASES));
    // The hex form, as it comes from environment variables and the bootstrap: any string,
    // multi-byte characters included.
    let texts: Vec<Vec<u8>> = samples
        .iter()
        .map(|b| {
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
                .into_bytes()
        })
        .chain([
            " é1 ".as_bytes().to_vec(),
            "ab\u{1F600}cd".as_bytes().to_vec(),
        ])
        .collect();
    check(
        "EndpointAddress::from_hex",
        cases(seed(7), &texts, case_count(CASES)),
        |b| {
            let s = String::from_utf8_lossy(b);
            EndpointAddress::from_hex(&s).is_ok()
        },
    );
    let region = RemoteRegion {
        addr: 0x7f00_0000_1000,
        key: 42,
        len: 4096,
    }
    .to_bytes()
    .to_vec();
    check(
        "RemoteRegion::from_bytes",
        cases(seed(8), &[region], case_count(CASES)),
        |b| RemoteRegion::from_bytes(b).is_ok(),
    );
    assert!(
        max_alloc() <= ALLOC_BOUND,
        "allocated {} bytes",
        max_alloc()
    );
}
