//! The cluster secret: only processes holding it may join a job's bootstrap service.
//! Joins are authenticated by HMAC-SHA256 over a fresh server nonce (challenge-response),
//! so the secret never crosses the wire.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{FabricError, Result};

/// Fills `buf` from the kernel's random source (getrandom(2)); fails rather than fall back
/// to anything guessable.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most `buf.len() - done` bytes at `buf[done..]`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FabricError::Random(e));
        }
        done += n as usize;
    }
    Ok(())
}

/// Why a string is not hex; says where, never what (the string may be a secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HexError {
    OddLength,
    NotHex { at: usize },
}

impl HexError {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            HexError::OddLength => "odd number of hex digits",
            HexError::NotHex { .. } => "not hex (only 0-9, a-f, A-F are allowed)",
        }
    }
}

/// Decodes hex digits (surrounding whitespace ignored). Works on bytes, so a multi-byte
/// character is an error, never a slice across a character boundary.
pub(crate) fn decode_hex(s: &str) -> std::result::Result<Vec<u8>, HexError> {
    let digits = s.trim().as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err(HexError::OddLength);
    }
    let nibble = |at: usize| -> std::result::Result<u8, HexError> {
        match digits[at] {
            c @ b'0'..=b'9' => Ok(c - b'0'),
            c @ b'a'..=b'f' => Ok(c - b'a' + 10),
            c @ b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(HexError::NotHex { at }),
        }
    };
    (0..digits.len())
        .step_by(2)
        .map(|i| Ok(nibble(i)? << 4 | nibble(i + 1)?))
        .collect()
}

/// Length of the authentication tag.
pub const MAC_LEN: usize = 32;

#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret({} bytes)", self.0.len())
    }
}

impl ClusterSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<ClusterSecret> {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            return Err(FabricError::BadConfig {
                key: "cluster secret".into(),
                value: format!("{} bytes", bytes.len()),
                reason: "must hold at least 16 bytes".into(),
            });
        }
        Ok(ClusterSecret(bytes))
    }

    /// A fresh random secret of 32 bytes from the kernel's random source (for a local job
    /// that has none configured); fails if the random source does.
    pub fn random() -> Result<ClusterSecret> {
        let mut bytes = vec![0u8; 32];
        fill_random(&mut bytes)?;
        Ok(ClusterSecret(bytes))
    }

    /// The publicly known key of insecure mode (`krund --listen --insecure` on loopback, a
    /// bootstrap without a secret): frames are still checked and replay-protected, but
    /// anyone can compute this key, so it proves nothing about the peer.
    pub fn insecure() -> ClusterSecret {
        ClusterSecret(b"krun insecure mode: this key is public".to_vec())
    }

    /// Reads a secret file, which must not be readable by group or others (mode 0600).
    pub fn from_file(path: &Path) -> Result<ClusterSecret> {
        let meta = std::fs::metadata(path)
            .map_err(|e| FabricError::io(format!("reading secret file {}", path.display()), e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(FabricError::BadConfig {
                key: "KRUN_SECRET_FILE".into(),
                value: path.display().to_string(),
                reason: format!("mode {mode:04o} lets others read the secret; chmod 600 it"),
            });
        }
        let bytes = std::fs::read(path)
            .map_err(|e| FabricError::io(format!("reading secret file {}", path.display()), e))?;
        let trimmed = bytes.trim_ascii().to_vec();
        ClusterSecret::new(trimmed).map_err(|_| FabricError::BadConfig {
            key: "KRUN_SECRET_FILE".into(),
            value: path.display().to_string(),
            reason: "the secret must hold at least 16 bytes".into(),
        })
    }

    /// `KRUN_SECRET_FILE` (a 0600 file), else `KRUN_SECRET` (hex, set by krun for the
    /// processes it starts), else none.
    pub fn from_env() -> Result<Option<ClusterSecret>> {
        if let Some(path) = std::env::var("KRUN_SECRET_FILE")
            .ok()
            .filter(|p| !p.is_empty())
        {
            return ClusterSecret::from_file(Path::new(&path)).map(Some);
        }
        match std::env::var("KRUN_SECRET").ok().filter(|h| !h.is_empty()) {
            Some(hex) => ClusterSecret::from_hex(&hex).map(Some),
            None => Ok(None),
        }
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(hex: &str) -> Result<ClusterSecret> {
        let bad = |reason: &str| FabricError::BadConfig {
            key: "KRUN_SECRET".into(),
            value: "(hidden)".into(),
            reason: reason.into(),
        };
        // The reason never quotes the value: it is the secret.
        let bytes = decode_hex(hex).map_err(|e| bad(e.reason()))?;
        ClusterSecret::new(bytes).map_err(|_| bad("must hold at least 16 bytes"))
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// The tag proving knowledge of the secret for `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.mac();
        m.update(message);
        m.finalize().into_bytes().into()
    }

    /// Checks a tag in constant time.
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        let mut m = self.mac();
        m.update(message);
        m.verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let s = ClusterSecret::new(b"0123456789abcdef".to_vec()).unwrap();
        let t = s.sign(b"nonce");
        assert!(s.verify(b"nonce", &t));
        assert!(!s.verify(b"nonce2", &t));
        let other = ClusterSecret::new(b"0123456789abcdeX".to_vec()).unwrap();
        assert!(!other.verify(b"nonce", &t));
        assert!(!s.verify(b"nonce", &t[..31]));
    }

    #[test]
    fn hex_round_trip_and_short_secrets_refused() {
        let s = ClusterSecret::random().unwrap();
        assert_eq!(ClusterSecret::from_hex(&s.to_hex()).unwrap(), s);
        assert_ne!(ClusterSecret::random().unwrap(), s);
        assert!(ClusterSecret::new(b"short".to_vec()).is_err());
        assert!(ClusterSecret::from_hex("zz").is_err());
    }

    #[test]
    fn a_non_ascii_secret_is_an_error_that_does_not_print_it() {
        for bad in [
            "a\u{e9}1",
            "\u{e9}\u{e9}",
            "0123456789abcdef0123456789abcde\u{e9}",
            "0g",
        ] {
            let e = ClusterSecret::from_hex(bad).unwrap_err().to_string();
            assert!(e.contains("KRUN_SECRET"), "{e}");
            assert!(!e.contains(bad), "the error prints the secret: {e}");
        }
        let e = ClusterSecret::from_hex("a\u{e9}1").unwrap_err().to_string();
        assert!(e.contains("not hex"), "{e}");
        assert_eq!(decode_hex(" 0aFf \n"), Ok(vec![0x0a, 0xff]));
        assert_eq!(decode_hex("\u{e9}"), Err(HexError::NotHex { at: 0 }));
        assert_eq!(decode_hex("\u{e9}0"), Err(HexError::OddLength));
        assert_eq!(decode_hex("0\u{e9}0"), Err(HexError::NotHex { at: 1 }));
    }

    #[test]
    fn secret_files_must_be_private() {
        let dir = std::env::temp_dir().join(format!("krun-secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret");
        std::fs::write(&path, "a secret of enough length\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterSecret::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = ClusterSecret::from_file(&path).unwrap();
        assert_eq!(
            s,
            ClusterSecret::new(b"a secret of enough length".to_vec()).unwrap()
        );
        let e = ClusterSecret::from_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
