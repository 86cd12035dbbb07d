//! L4 (io_uring, O_DIRECT) images: round trips, every corruption named, a full disk.
use ckpt_store::disk::DiskLevel;
use ckpt_store::StoreError;
use std::path::{Path, PathBuf};

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = PathBuf::from(format!("/var/tmp/krun-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn sizes_round_trip_byte_for_byte() {
    let dir = TempDir::new("sizes");
    let disk = DiskLevel::open(&dir.0).unwrap();
    for (i, len) in [0, 1, 4095, 4096, 4097, (64 << 20) + 123]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, i as u64);
        let mut seen = 0;
        disk.write_with_progress("job/r0", i as u64 + 1, &data, &mut |b| seen = b)
            .unwrap();
        assert_eq!(seen, len as u64);
        assert_eq!(
            disk.read("job/r0", i as u64 + 1).unwrap(),
            data,
            "size {len}"
        );
    }
    assert_eq!(disk.versions("job/r0").unwrap(), vec![1, 2, 3, 4, 5, 6]);
}

fn corrupt(path: &Path, at: usize, f: impl FnOnce(&mut [u8])) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b[at..]);
    std::fs::write(path, b).unwrap();
}

#[test]
fn each_corruption_gets_its_own_error_naming_file_and_place() {
    let dir = TempDir::new("corrupt");
    let disk = DiskLevel::open(&dir.0).unwrap();
    let data = pattern(3 << 20, 7);
    let fresh = |v: u64| {
        disk.write("o", v, &data).unwrap();
        disk.path("o", v)
    };
    // A flipped bit in the payload: located to its 1 MiB chunk.
    let p = fresh(1);
    corrupt(&p, 4096 + (2 << 20) + 5, |b| b[0] ^= 1);
    let e = disk.read("o", 1).unwrap_err();
    assert!(matches!(e, StoreError::Checksum { .. }), "{e}");
    assert!(
        e.to_string().contains("payload bytes 2097152..3145728"),
        "{e}"
    );
    // A flipped bit in the header.
    let p = fresh(2);
    corrupt(&p, 20, |b| b[0] ^= 0x80);
    let e = disk.read("o", 2).unwrap_err();
    assert!(e.to_string().contains("header"), "{e}");
    // Truncated.
    let p = fresh(3);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len - 5000)
        .unwrap();
    let e = disk.read("o", 3).unwrap_err();
    assert!(matches!(e, StoreError::Truncated { .. }), "{e}");
    // A wrong format version with a valid header checksum: only the version check catches it.
    let p = fresh(4);
    corrupt(&p, 0, |b| {
        b[8] = 9;
        let owner_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..44]), &b[48..48 + owner_len]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
    });
    let e = disk.read("o", 4).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::Version {
                found: 9,
                supported: 1,
                ..
            }
        ),
        "{e}"
    );
    // Bad magic.
    let p = fresh(5);
    corrupt(&p, 0, |b| b[0] = b'X');
    let e = disk.read("o", 5).unwrap_err();
    assert!(
        e.to_string().contains("bad magic") && e.to_string().contains(&p.display().to_string()),
        "{e}"
    );
}

/// A small tmpfs mounted for the test, unmounted on drop.
struct SmallMount(PathBuf);
impl SmallMount {
    fn new(size_mib: u32) -> SmallMount {
        let p = PathBuf::from(format!("/var/tmp/krun-enospc-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&p)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs needs root");
        SmallMount(p)
    }
}
impl Drop for SmallMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_is_reported_and_the_previous_version_survives() {
    let mount = SmallMount::new(16);
    let disk = DiskLevel::open(&mount.0).unwrap();
    let small = pattern(6 << 20, 1);
    disk.write("job/r0", 1, &small).unwrap();
    let big = pattern(12 << 20, 2);
    let e = disk.write("job/r0", 2, &big).unwrap_err();
    assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
    assert!(
        e.to_string().contains("previous checkpoint is intact"),
        "{e}"
    );
    assert_eq!(disk.read("job/r0", 1).unwrap(), small);
    assert_eq!(disk.versions("job/r0").unwrap(), vec![1]);
    let leftovers: Vec<_> = std::fs::read_dir(mount.0.join("job/r0"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn retention_and_stale_temporary_files() {
    let dir = TempDir::new("retain");
    let disk = DiskLevel::open(&dir.0).unwrap();
    for v in 1..=5 {
        disk.write("r", v, &pattern(10_000, v)).unwrap();
    }
    disk.retain("r", 2).unwrap();
    assert_eq!(disk.versions("r").unwrap(), vec![4, 5]);
    let stale = dir.0.join("r/.tmp-999-6");
    std::fs::write(&stale, b"partial").unwrap();
    let _reopened = DiskLevel::open(&dir.0).unwrap();
    assert!(!stale.exists());
    assert!(disk.read("../x", 1).is_err());
}
