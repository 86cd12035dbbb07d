//! L4 (io_uring, O_DIRECT) images: round trips, every corruption named, a full disk, injected
//! failures at every step of a write, retention, stale temporary files, a missing io_uring.
//!
//! `cargo test -p ckpt-store --release --test disk -- --ignored --nocapture bench` measures a
//! 1 GiB write against `dd oflag=direct` in /var/tmp (not an assertion).
use ckpt_store::disk::{field, header_crc, DiskLevel, DiskOptions, Fault, WriteStep, FORMAT};
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
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A 4096-aligned allocation holding a copy of some data at offset 0 (page-aligned, as a
/// mapped file or a registered region: written without a copy) or at offset 1 (misaligned:
/// written through the pooled buffers).
struct Placed {
    ptr: *mut u8,
    layout: std::alloc::Layout,
    at: usize,
    len: usize,
}
impl Placed {
    fn new(data: &[u8], at: usize) -> Placed {
        let layout = std::alloc::Layout::from_size_align(data.len() + at + 1, 4096).unwrap();
        // SAFETY: a non-zero size; checked for null.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: the allocation holds at + len bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.add(at), data.len()) };
        Placed {
            ptr,
            layout,
            at,
            len: data.len(),
        }
    }
    fn slice(&self) -> &[u8] {
        // SAFETY: initialized above, alive until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.add(self.at), self.len) }
    }
}
impl Drop for Placed {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp-") {
                found.push(e.path().display().to_string());
            } else if e.path().is_dir() {
                found.extend(temp_files(&e.path()));
            }
        }
    }
    found
}

fn plain_reads(dir: &Path) -> DiskLevel {
    DiskLevel::open_with(
        dir,
        DiskOptions {
            direct_reads: false,
            ..DiskOptions::default()
        },
    )
    .unwrap()
}

/// 1 MiB I/Os, 4 in flight: a few-MiB image is read with several completions.
fn small_chunks(dir: &Path) -> DiskLevel {
    DiskLevel::open_with(
        dir,
        DiskOptions {
            chunk_size: 1 << 20,
            ..DiskOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn sizes_round_trip_byte_for_byte() {
    let dir = TempDir::new("sizes");
    let disk = DiskLevel::open(&dir.0).unwrap();
    let plain = plain_reads(&dir.0);
    let sizes = [0, 1, 4095, 4096, 4097, (64 << 20) + 123, 32 << 20];
    let mut v = 0;
    for (len, at) in sizes.into_iter().flat_map(|l| [(l, 0), (l, 1)]) {
        v += 1;
        let data = pattern(len, v);
        let placed = Placed::new(&data, at);
        assert_eq!(
            (placed.slice().as_ptr() as usize).is_multiple_of(4096),
            at == 0
        );
        let mut seen = Vec::new();
        let report = disk
            .write_with_progress("job/r0", v, placed.slice(), &mut |b| seen.push(b))
            .unwrap();
        assert_eq!(report.bytes, len as u64);
        // Aligned data goes out without a copy, except a last chunk ending in a short block.
        let copied = match (at, len % 4096) {
            (0, 0) => 0,
            (0, _) => len % (8 << 20),
            _ => len,
        };
        assert_eq!(report.copied, copied as u64, "size {len} at {at}");
        assert_eq!(seen.last().copied(), Some(len as u64), "size {len}");
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        let file_len = std::fs::metadata(disk.path("job/r0", v)).unwrap().len();
        assert_eq!(file_len, report.file_bytes);
        assert_eq!(file_len % 4096, 0);
        let back = disk.read("job/r0", v).unwrap();
        assert!(back == data, "size {len}: direct read differs");
        let back = plain.read("job/r0", v).unwrap();
        assert!(back == data, "size {len}: plain read differs");
        let h = disk.inspect("job/r0", v).unwrap();
        assert_eq!(
            (h.owner.as_str(), h.version, h.payload_len),
            ("job/r0", v, len as u64)
        );
        assert_eq!(h.payload_crc, crc32c::crc32c(&data), "size {len}");
        assert_eq!(h.file_len, file_len);
    }
    assert_eq!(
        disk.versions("job/r0").unwrap(),
        (1..=v).collect::<Vec<u64>>()
    );
    assert!(temp_files(&dir.0).is_empty());
    assert!(matches!(
        disk.read("job/r0", 99),
        Err(StoreError::NotFound { version: 99, .. })
    ));
    assert!(matches!(disk.read("../x", 1), Err(StoreError::Invalid(_))));
}

#[test]
fn many_small_chunks_and_an_existing_version_replaced() {
    // 12 KiB chunks: ~1700 I/Os with 3 in flight (completions out of order), a checksum
    // table spanning two chunks.
    let dir = TempDir::new("chunks");
    let disk = DiskLevel::open_with(
        &dir.0,
        DiskOptions {
            chunk_size: 12 << 10,
            queue_depth: 3,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    let data = pattern((20 << 20) + 777, 3);
    disk.write("o", 1, &data).unwrap();
    assert!(disk.read("o", 1).unwrap() == data);
    let other = pattern(5000, 4);
    disk.write("o", 1, &other).unwrap();
    assert_eq!(disk.read("o", 1).unwrap(), other);
    assert_eq!(disk.versions("o").unwrap(), vec![1]);
}

#[test]
fn concurrent_writers_share_one_level() {
    let dir = TempDir::new("threads");
    let disk = DiskLevel::open_with(
        &dir.0,
        DiskOptions {
            chunk_size: 1 << 20,
            ..DiskOptions::default()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let disk = &disk;
            s.spawn(move || {
                for v in 1..=3 {
                    let data = pattern((3 << 20) + t as usize * 1000 + v as usize, t * 10 + v);
                    disk.write(&format!("rank{t}"), v, &data).unwrap();
                    assert!(disk.read(&format!("rank{t}"), v).unwrap() == data);
                }
            });
        }
    });
}

fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

fn check_both(dir: &Path, owner: &str, v: u64, check: impl Fn(StoreError)) {
    check(small_chunks(dir).read(owner, v).unwrap_err());
    check(plain_reads(dir).read(owner, v).unwrap_err());
}

#[test]
fn each_corruption_gets_its_own_error_naming_file_and_place() {
    let dir = TempDir::new("corrupt");
    let disk = small_chunks(&dir.0);
    let data = pattern((3 << 20) + 100, 7);
    let fresh = |v: u64| {
        disk.write("o", v, &data).unwrap();
        disk.path("o", v)
    };
    let shown = |p: &Path| p.display().to_string();

    // Two flipped payload bits: the first bad 4 KiB block is named, in payload and file terms.
    let p = fresh(1);
    rewrite(&p, |b| {
        b[4096 + (3 << 20) + 50] ^= 1;
        b[4096 + (1 << 20) + 3 * 4096 + 5] ^= 0x10;
    });
    check_both(&dir.0, "o", 1, |e| match &e {
        StoreError::PayloadChecksum {
            path,
            offset,
            file_offset,
            ..
        } => {
            assert_eq!(path, &p);
            assert_eq!(*offset, (1 << 20) + 3 * 4096);
            assert_eq!(*file_offset, 4096 + (1 << 20) + 3 * 4096);
            let msg = e.to_string();
            assert!(
                msg.contains(&shown(&p)) && msg.contains("payload offset 1060864"),
                "{msg}"
            );
        }
        e => panic!("payload flip: {e}"),
    });

    // A flipped bit in a header field, and one in the header block's padding.
    for at in [field::VERSION + 2, 3000] {
        let p = fresh(2);
        rewrite(&p, |b| b[at] ^= 0x80);
        check_both(&dir.0, "o", 2, |e| {
            assert!(
                matches!(&e, StoreError::HeaderChecksum { path, .. } if path == &p),
                "header flip at {at}: {e}"
            );
            assert!(e.to_string().contains("header checksum mismatch"), "{e}");
        });
    }

    // Truncated by 5000 bytes, and down to less than a header.
    let p = fresh(3);
    let len = std::fs::metadata(&p).unwrap().len();
    for cut in [len - 5000, 100] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let want = if cut == 100 { 4096 } else { len };
        check_both(&dir.0, "o", 3, |e| {
            assert!(
                matches!(&e, StoreError::Truncated { path, expected, actual }
                    if path == &p && *expected == want && *actual == cut),
                "truncated to {cut}: {e}"
            );
        });
    }

    // A format version from the future with a valid header crc: only the version check can
    // catch it. (Without fixing the crc, the header check catches it first.)
    let p = fresh(4);
    rewrite(&p, |b| {
        b[field::FORMAT..field::FORMAT + 2].copy_from_slice(&9u16.to_le_bytes());
    });
    check_both(&dir.0, "o", 4, |e| {
        assert!(matches!(e, StoreError::HeaderChecksum { .. }), "{e}")
    });
    rewrite(&p, |b| {
        let crc = header_crc(&b[..4096]);
        b[field::HEADER_CRC..field::HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    });
    check_both(&dir.0, "o", 4, |e| {
        assert!(
            matches!(&e, StoreError::Version { path, found: 9, supported } if path == &p && *supported == FORMAT),
            "{e}"
        );
        assert!(
            e.to_string().contains("format version 9 is not supported"),
            "{e}"
        );
    });

    // Bad magic.
    let p = fresh(5);
    rewrite(&p, |b| b[..8].copy_from_slice(b"NOTKRUN!"));
    check_both(&dir.0, "o", 5, |e| {
        assert!(
            matches!(&e, StoreError::BadMagic { path, found } if path == &p && found == b"NOTKRUN!"),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&shown(&p)) && msg.contains("bad magic") && msg.contains("offset 0"));
    });

    // A flipped bit in the checksum table: named with the table's offset.
    let p = fresh(6);
    let table_offset = disk.inspect("o", 6).unwrap().table_offset;
    rewrite(&p, |b| b[table_offset as usize + 9] ^= 4);
    check_both(&dir.0, "o", 6, |e| {
        assert!(
            matches!(&e, StoreError::Corrupt { path, offset, what }
                if path == &p && *offset == table_offset && what.contains("checksum table")),
            "{e}"
        );
    });

    // Another version's file under this name: the header names what it holds.
    let p = fresh(7);
    std::fs::copy(&p, disk.path("o", 8)).unwrap();
    check_both(&dir.0, "o", 8, |e| {
        assert!(
            matches!(&e, StoreError::Corrupt { what, offset, .. }
                if what.contains("holds o v7, expected o v8") && *offset == field::VERSION as u64),
            "{e}"
        );
    });

    // Untouched images still read.
    assert!(disk.read("o", 7).unwrap() == data);
}

/// A small tmpfs (it supports O_DIRECT on this kernel) mounted for a test, unmounted on drop.
struct SmallMount(PathBuf);
impl SmallMount {
    fn new(size_mib: u32) -> SmallMount {
        let p = PathBuf::from(format!("/var/tmp/krun-enospc-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        let m = SmallMount(p);
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&m.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {} needs root", m.0.display());
        m
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
    match &e {
        StoreError::NoSpace { path, what } => {
            assert!(path.starts_with(mount.0.join("job/r0")), "{e}");
            assert!(what.contains("preallocating"), "{e}");
        }
        e => panic!("expected NoSpace, got {e}"),
    }
    assert!(
        e.to_string()
            .contains("while writing the image (preallocating")
            && e.to_string().contains("previous checkpoint is intact"),
        "{e}"
    );
    println!("{e}");
    assert!(disk.read("job/r0", 1).unwrap() == small);
    assert_eq!(disk.versions("job/r0").unwrap(), vec![1]);
    assert!(
        temp_files(&mount.0).is_empty(),
        "{:?}",
        temp_files(&mount.0)
    );
    // The space is usable again: a version that fits still goes in.
    disk.write("job/r0", 3, &pattern(4 << 20, 3)).unwrap();
    assert_eq!(disk.versions("job/r0").unwrap(), vec![1, 3]);
}

#[test]
fn a_failure_at_any_step_leaves_the_previous_version_and_no_temporary_file() {
    let dir = TempDir::new("faults");
    let old = pattern((2 << 20) + 5, 1);
    DiskLevel::open(&dir.0)
        .unwrap()
        .write("r", 1, &old)
        .unwrap();
    let new = pattern((6 << 20) + 5, 2);
    let sources = [Placed::new(&new, 0), Placed::new(&new, 1)];
    let steps = [
        WriteStep::Create,
        WriteStep::Preallocate,
        WriteStep::Payload,
        WriteStep::Table,
        WriteStep::Header,
        WriteStep::Fsync,
        WriteStep::Rename,
        WriteStep::SyncDir,
    ];
    for step in steps {
        for (errno, src) in [libc::EIO, libc::ENOSPC]
            .into_iter()
            .flat_map(|e| sources.iter().map(move |s| (e, s)))
        {
            // 1 MiB chunks, 4 in flight: a payload failure happens with writes still in flight.
            let disk = DiskLevel::open_with(
                &dir.0,
                DiskOptions {
                    chunk_size: 1 << 20,
                    fault: Some(Fault { step, errno }),
                    ..DiskOptions::default()
                },
            )
            .unwrap();
            let e = disk.write("r", 2, src.slice()).unwrap_err();
            let path = match &e {
                StoreError::NoSpace { path, .. } if errno == libc::ENOSPC => path.clone(),
                StoreError::Io { path, source, .. }
                    if errno == libc::EIO && source.raw_os_error() == Some(libc::EIO) =>
                {
                    path.clone()
                }
                e => panic!("{step:?} errno {errno}: {e}"),
            };
            assert!(path.starts_with(dir.0.join("r")), "{step:?}: {e}");
            assert!(
                temp_files(&dir.0).is_empty(),
                "{step:?}: {:?}",
                temp_files(&dir.0)
            );
            assert!(disk.read("r", 1).unwrap() == old, "{step:?}");
            if step == WriteStep::SyncDir {
                // Renamed before the directory sync failed: complete, though maybe not durable.
                assert!(disk.read("r", 2).unwrap() == new);
                disk.remove("r", 2).unwrap();
            }
            assert_eq!(disk.versions("r").unwrap(), vec![1], "{step:?}");
        }
    }
}

#[test]
fn retention_keeps_the_newest_complete_versions() {
    let dir = TempDir::new("retain");
    let disk = DiskLevel::open(&dir.0).unwrap();
    for v in 1..=5 {
        disk.write("r", v, &pattern(10_000, v)).unwrap();
    }
    assert_eq!(disk.retain("r", 2).unwrap(), vec![1, 2, 3]);
    assert_eq!(disk.versions("r").unwrap(), vec![4, 5]);

    // An incomplete newest version does not count as one of the kept copies.
    for v in 6..=8 {
        disk.write("r", v, &pattern(10_000, v)).unwrap();
    }
    let p8 = disk.path("r", 8);
    let len = std::fs::metadata(&p8).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p8)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    assert_eq!(disk.retain("r", 2).unwrap(), vec![4, 5]);
    assert_eq!(disk.versions("r").unwrap(), vec![6, 7, 8]);
    // keep_last = 0 still keeps one complete copy.
    assert_eq!(disk.retain("r", 0).unwrap(), vec![6]);
    assert_eq!(disk.versions("r").unwrap(), vec![7, 8]);
    assert_eq!(disk.read("r", 7).unwrap(), pattern(10_000, 7));
    // With no complete copy at all, nothing is removed.
    rewrite(&disk.path("r", 7), |b| b[0] = b'X');
    assert_eq!(disk.retain("r", 1).unwrap(), Vec::<u64>::new());
    assert_eq!(disk.versions("r").unwrap(), vec![7, 8]);
    assert_eq!(disk.retain("nobody", 1).unwrap(), Vec::<u64>::new());
}

#[test]
fn open_removes_stale_temporary_files_only() {
    let dir = TempDir::new("stale");
    let disk = DiskLevel::open(&dir.0).unwrap();
    disk.write("job/r0", 5, &pattern(10_000, 5)).unwrap();
    let owner_dir = dir.0.join("job/r0");
    // pid 999999999 is above any pid_max: its writer is gone.
    let dead = owner_dir.join(".tmp-999999999-0-6.kck");
    let garbage = dir.0.join(".tmp-garbage");
    // Our own pid: a write in progress in this process, which must not be removed.
    let live = owner_dir.join(format!(".tmp-{}-12345-7.kck", std::process::id()));
    for p in [&dead, &garbage, &live] {
        std::fs::write(p, b"partial").unwrap();
    }
    let reopened = DiskLevel::open(&dir.0).unwrap();
    assert!(!dead.exists());
    assert!(!garbage.exists());
    assert!(live.exists());
    assert_eq!(reopened.versions("job/r0").unwrap(), vec![5]);
    assert_eq!(reopened.read("job/r0", 5).unwrap(), pattern(10_000, 5));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_missing_io_uring_is_named() {
    // A seccomp filter on one thread (filters are per thread) makes io_uring_setup fail with
    // ENOSYS, as an old kernel or a container's default profile does.
    let dir = TempDir::new("nouring");
    let d = dir.0.clone();
    let result = std::thread::spawn(move || {
        const LD_W_ABS: u16 = 0x20;
        const JEQ_K: u16 = 0x15;
        const RET_K: u16 = 0x06;
        let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
        let prog = [
            f(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
            f(JEQ_K, 0, 1, libc::SYS_io_uring_setup as u32),
            f(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
            f(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut _,
        };
        // SAFETY: prctl with a valid filter program that outlives the call; it only affects
        // this thread.
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog
                ),
                0
            );
        }
        DiskLevel::open(&d).map(|_| ())
    })
    .join()
    .unwrap();
    match result {
        Err(e @ StoreError::IoUring { .. }) => {
            assert!(e.to_string().contains("io_uring_setup"), "{e}");
        }
        other => panic!("expected an io_uring error, got {other:?}"),
    }
}
