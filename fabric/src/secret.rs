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

    /// A fresh random secret (for a local job that has none configured).
    pub fn random() -> ClusterSecret {
        let bytes: Vec<u8> = (0..4)
            .flat_map(|_| crate::random_token().to_le_bytes())
            .collect();
        ClusterSecret(bytes)
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
        let hex = hex.trim();
        if !hex.len().is_multiple_of(2) {
            return Err(bad("odd number of hex digits"));
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<std::result::Result<Vec<u8>, _>>()
            .map_err(|_| bad("not hex"))?;
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
        let s = ClusterSecret::random();
        assert_eq!(ClusterSecret::from_hex(&s.to_hex()).unwrap(), s);
        assert!(ClusterSecret::new(b"short".to_vec()).is_err());
        assert!(ClusterSecret::from_hex("zz").is_err());
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
