//! Endpoint addresses (binary and hex, as they come from the bootstrap and environment
//! variables), verbs raw addresses, remote region descriptors, and the cluster secret's hex
//! form (`KRUN_SECRET`).
use fabric::secret::ClusterSecret;
use fabric::{EndpointAddress, Provider, RemoteRegion};

use crate::{utf8, Target};

pub const ENDPOINT: Target = Target {
    name: "endpoint",
    what: "endpoint addresses (bytes and hex), verbs raw addresses, remote region descriptors",
    run: endpoint,
    seeds: endpoint_seeds,
};

fn endpoint(data: &[u8]) {
    match EndpointAddress::from_bytes(data) {
        Ok(a) => {
            assert_eq!(
                a.to_bytes(),
                data,
                "an address decodes only from its encoding"
            );
            assert_eq!(
                EndpointAddress::from_hex(&a.to_hex()).expect("its own hex form decodes"),
                a
            );
            if a.provider == Provider::Verbs {
                verbs(&a.raw);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    verbs(data);
    if let Some(text) = utf8(data) {
        if let Ok(a) = EndpointAddress::from_hex(text) {
            assert_eq!(
                a.to_hex(),
                text.trim().to_ascii_lowercase(),
                "hex round trip"
            );
        }
    }
    if let Ok(r) = RemoteRegion::from_bytes(data) {
        assert_eq!(
            RemoteRegion::from_bytes(&r.to_bytes()).expect("its own encoding decodes"),
            r
        );
    }
}

fn verbs(raw: &[u8]) {
    match fabric::verbs::decode_address(raw) {
        Ok((side, _, _)) => {
            assert_ne!(side.port(), 0, "a verbs address with port 0 was accepted");
            assert!(!side.ip().is_unspecified(), "an unspecified side channel");
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("verbs address"), "{text}");
        }
    }
}

fn endpoint_seeds() -> Vec<Vec<u8>> {
    let addr = |provider, raw: Vec<u8>| EndpointAddress {
        provider,
        token: 0x1234_5678,
        raw,
    };
    let verbs_raw = vec![
        b'V', 1, 4, 10, 0, 0, 1, 0x90, 0x1f, 1, 0, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6,
        7, 8,
    ];
    let mut out: Vec<Vec<u8>> = [
        addr(Provider::Tcp, vec![2, 0, 0x1f, 0x90, 127, 0, 0, 1]),
        addr(Provider::Shm, b"fi_shm://1234".to_vec()),
        addr(Provider::Loopback, vec![]),
        addr(Provider::Verbs, verbs_raw.clone()),
    ]
    .iter()
    .map(EndpointAddress::to_bytes)
    .collect();
    out.push(
        addr(Provider::Tcp, vec![127, 0, 0, 1])
            .to_hex()
            .into_bytes(),
    );
    out.push(verbs_raw);
    out.push(
        RemoteRegion {
            addr: 0x7f00_0000_1000,
            key: 42,
            len: 4096,
        }
        .to_bytes()
        .to_vec(),
    );
    out
}

pub const SECRET: Target = Target {
    name: "secret",
    what: "the cluster secret's hex form (KRUN_SECRET)",
    run: secret,
    seeds: secret_seeds,
};

fn secret(data: &[u8]) {
    let Some(text) = utf8(data) else {
        return;
    };
    match ClusterSecret::from_hex(text) {
        Ok(s) => assert_eq!(
            s.to_hex(),
            text.trim().to_ascii_lowercase(),
            "hex round trip"
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("KRUN_SECRET"), "{msg}");
            // The error never quotes the value (it is the secret): it says "(hidden)".
            assert!(msg.contains("(hidden)"), "{msg}");
        }
    }
}

fn secret_seeds() -> Vec<Vec<u8>> {
    vec![
        ClusterSecret::new(b"the fuzz targets' cluster secret".to_vec())
            .expect("a secret")
            .to_hex()
            .into_bytes(),
        b"00112233445566778899aabbccddeeff".to_vec(),
        "0011223344556677889900aabbccddé".as_bytes().to_vec(),
    ]
}
