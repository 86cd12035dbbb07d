//! Streamed puts (`Store::put_file_streamed`): a file sent to the buddy while it is written,
//! on stores in one process over the loopback provider.
use ckpt_store::{Level, NodeInfo, Ready, Store, StoreConfig, StoreError};
use fabric::secret::ClusterSecret;
use fabric::{open, FabricConfig, Provider};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
const HEAD: u64 = 4096;

struct Cluster {
    stores: Vec<Option<Store>>,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stores.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    fn s(&self, i: usize) -> &Store {
        self.stores[i].as_ref().unwrap()
    }
}

fn cluster(tag: &str, n: usize) -> Cluster {
    let secret = ClusterSecret::random().unwrap();
    let eps: Vec<_> = (0..n)
        .map(|_| open(&FabricConfig::with_provider(Provider::Loopback)).unwrap())
        .collect();
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .map(|e| NodeInfo {
            address: e.address(),
            group: 0,
        })
        .collect();
    let dir = PathBuf::from(format!(
        "/var/tmp/krun-streamed-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let stores = eps
        .into_iter()
        .enumerate()
        .map(|(i, ep)| {
            let cfg = StoreConfig {
                node: i,
                nodes: nodes.clone(),
                arena_bytes: 32 << 20,
                disk: Some(dir.join(format!("disk{i}"))),
                keep: 1,
                parity_set: 0,
                secret: secret.clone(),
                request_timeout: Duration::from_secs(3),
            };
            Some(Store::start(ep, cfg).unwrap())
        })
        .collect();
    Cluster { stores, dir }
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
        .collect()
}

/// A writer thread filling `file` (already at its final length) the way a capture does:
/// the body in 256 KiB steps from `HEAD` on, publishing how far it is final, then the head
/// last (like an image header with the checksums), then "complete". `stall` pauses it after
/// that many steps until the returned flag is set.
struct Writer {
    watermark: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn write_slowly(file: PathBuf, data: Arc<Vec<u8>>, fail_after: Option<usize>) -> Writer {
    let watermark = Arc::new(AtomicU64::new(HEAD));
    let done = Arc::new(AtomicU64::new(0));
    let (w, d) = (watermark.clone(), done.clone());
    let thread = std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        let step = 256 << 10;
        let mut at = HEAD as usize;
        let mut steps = 0;
        while at < data.len() {
            if fail_after == Some(steps) {
                d.store(2, Ordering::Release);
                return;
            }
            let end = (at + step).min(data.len());
            f.write_all_at(&data[at..end], at as u64).unwrap();
            w.store(end as u64, Ordering::Release);
            at = end;
            steps += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        f.write_all_at(&data[..HEAD as usize], 0).unwrap();
        d.store(1, Ordering::Release);
    });
    Writer {
        watermark,
        done,
        thread: Some(thread),
    }
}

impl Writer {
    /// The `next` of a streamed put: the body up to the watermark, then complete.
    fn next(&self, cursor: &mut u64, ranges: &mut usize) -> ckpt_store::Result<Ready> {
        match self.done.load(Ordering::Acquire) {
            1 => return Ok(Ready::Complete),
            2 => return Err(StoreError::Invalid("the writer failed".into())),
            _ => {}
        }
        let w = self.watermark.load(Ordering::Acquire);
        if w > *cursor {
            let r = Ready::Range((*cursor).max(HEAD), w);
            *cursor = w;
            *ranges += 1;
            return Ok(r);
        }
        Ok(Ready::Pending)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn zero_file(c: &Cluster, name: &str, len: usize) -> PathBuf {
    let file = c.dir.join(name);
    std::fs::File::create(&file)
        .unwrap()
        .set_len(len as u64)
        .unwrap();
    file
}

#[test]
fn a_file_sent_while_it_is_written_is_safe_at_l1_and_l2_only_whole() {
    let mut c = cluster("whole", 3);
    let data = Arc::new(image(3 << 20, 9));
    let file = zero_file(&c, "rank0.kgi", data.len());
    let writer = write_slowly(file.clone(), data.clone(), None);
    let (mut cursor, mut ranges) = (0, 0);
    let mut next = || writer.next(&mut cursor, &mut ranges);
    // SAFETY: the writer writes each range once, before reporting it, and keeps the length.
    let report = unsafe { c.s(0).put_file_streamed("rank-0", 1, &file, &mut next, T) }.unwrap();
    drop(writer);
    assert!(
        ranges >= 2,
        "parts went out while the file was written ({ranges})"
    );
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!(report.copied, 0);
    assert_eq!(
        report.crc,
        crc32c::crc32c(&data),
        "crc of the whole final file"
    );
    // Safe at L1 and L2 on return; L4 follows on the flush thread.
    assert!(c.s(0).is_safe("rank-0", 1, Level::L1));
    assert!(c.s(0).is_safe("rank-0", 1, Level::L2));
    c.s(0).wait_safe("rank-0", 1, Level::L4, T).unwrap();
    // The buddy holds the final bytes, the head written last included.
    let buddy = c.s(0).buddy();
    let other = 3 - buddy;
    c.stores[0] = None;
    let (got, r) = c.s(other).get("rank-0", 1).unwrap();
    assert_eq!((r.level, r.node), (Level::L2, buddy));
    assert!(got == *data, "the buddy's copy differs from the final file");
}

#[test]
fn a_failed_writer_leaves_the_version_unsafe_and_a_later_put_replaces_it() {
    let c = cluster("failed", 2);
    let data = Arc::new(image(2 << 20, 3));
    let file = zero_file(&c, "rank0.kgi", data.len());
    let writer = write_slowly(file.clone(), data.clone(), Some(3));
    let (mut cursor, mut ranges) = (0, 0);
    let mut next = || writer.next(&mut cursor, &mut ranges);
    // SAFETY: as above.
    let e = unsafe { c.s(0).put_file_streamed("rank-0", 1, &file, &mut next, T) }.unwrap_err();
    drop(writer);
    assert!(e.to_string().contains("the writer failed"), "{e}");
    for level in [Level::L1, Level::L2] {
        assert!(
            !c.s(0).is_safe("rank-0", 1, level),
            "{level} after a failed put"
        );
    }
    // The file completed another way: a plain put of it reuses the buddy's reservation.
    std::fs::write(&file, &*data).unwrap();
    // SAFETY: the file is not written again.
    unsafe { c.s(0).put_file("rank-0", 1, &file) }.unwrap();
    c.s(0).wait_safe("rank-0", 1, Level::L2, T).unwrap();
}

#[test]
fn a_file_not_complete_in_time_is_refused() {
    let c = cluster("timeout", 2);
    let file = zero_file(&c, "rank0.kgi", 1 << 20);
    let mut next = || Ok(Ready::Pending);
    // SAFETY: nobody writes the file.
    let e = unsafe {
        c.s(0)
            .put_file_streamed("rank-0", 1, &file, &mut next, Duration::from_millis(200))
    }
    .unwrap_err();
    assert!(e.to_string().contains("not complete within"), "{e}");
    assert!(!c.s(0).is_safe("rank-0", 1, Level::L2));
}

/// The recovery line while versions stream in (keep = 1): the previous version stays safe
/// at L1 and L2 until the next one is verified at the buddy, a failed stream drops nothing,
/// and only a complete one replaces it at both levels.
#[test]
fn the_previous_version_stays_safe_until_the_next_is_verified_at_the_buddy() {
    let c = cluster("line", 2);
    let stream = |version: u64, prev: u64, seed: u8, fail_after: Option<usize>| {
        let data = Arc::new(image(2 << 20, seed));
        let file = zero_file(&c, &format!("v{version}.kgi"), data.len());
        let writer = write_slowly(file.clone(), data.clone(), fail_after);
        let (mut cursor, mut ranges) = (0, 0);
        let mut during = Vec::new();
        let mut next = || {
            // What is safe while this version is on its way.
            if prev > 0 {
                during.push((
                    c.s(0).is_safe("rank-0", prev, Level::L1),
                    c.s(0).is_safe("rank-0", prev, Level::L2),
                ));
            }
            writer.next(&mut cursor, &mut ranges)
        };
        // SAFETY: the writer writes each range once, before reporting it.
        let r = unsafe {
            c.s(0)
                .put_file_streamed("rank-0", version, &file, &mut next, T)
        };
        drop(writer);
        (r, during)
    };
    let (r, _) = stream(1, 0, 1, None);
    r.unwrap();
    let (r, during) = stream(2, 1, 2, Some(3));
    assert!(r.is_err(), "the writer of v2 failed");
    assert!(!during.is_empty() && during.iter().all(|&d| d == (true, true)));
    assert!(c.s(0).is_safe("rank-0", 1, Level::L1) && c.s(0).is_safe("rank-0", 1, Level::L2));
    assert!(!c.s(0).is_safe("rank-0", 2, Level::L1) && !c.s(0).is_safe("rank-0", 2, Level::L2));
    let (r, during) = stream(3, 1, 3, None);
    r.unwrap();
    assert!(!during.is_empty() && during.iter().all(|&d| d == (true, true)));
    // v3 is verified at the buddy: v1 goes from L1 and L2 (keep = 1), v3 holds both.
    assert!(c.s(0).is_safe("rank-0", 3, Level::L1) && c.s(0).is_safe("rank-0", 3, Level::L2));
    assert!(!c.s(0).is_safe("rank-0", 1, Level::L1) && !c.s(0).is_safe("rank-0", 1, Level::L2));
    let (got, r) = c.s(1).get("rank-0", 3).unwrap();
    assert_eq!(r.level, Level::L2);
    assert!(got == image(2 << 20, 3));
}

/// A fault in one RMA write while the writes after it are in flight (a window of them, over
/// several of the writer's ranges): the whole put fails naming the write, every write posted
/// has ended, nothing is safe at L1 or L2, the buddy's reservation is handed back, and the
/// same version put again afterwards is whole at the buddy.
#[test]
fn a_fault_in_one_write_among_several_in_flight_fails_the_whole_put_and_marks_nothing_safe() {
    let c = cluster("fault", 2);
    // 24 MiB: 12 writes of 2 MiB, all in the window at once.
    let data = Arc::new(image(24 << 20, 5));
    let file = zero_file(&c, "rank0.kgi", data.len());
    std::fs::write(&file, &data[..]).unwrap();
    let buddy = c.s(0).buddy();
    let free_before = c.s(buddy).usage().arena_free;
    // The 3rd write fails when its turn comes; writes 4.. are posted behind it.
    c.s(0).fail_rma_write_for_test(3);
    let mut reported = false;
    let mut next = || {
        Ok(if reported {
            Ready::Complete
        } else {
            reported = true;
            Ready::Range(HEAD, data.len() as u64)
        })
    };
    // SAFETY: the file is complete and not written again.
    let e = unsafe { c.s(0).put_file_streamed("rank-0", 1, &file, &mut next, T) }.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("RMA write of bytes") && text.contains("injected fault"),
        "{text}"
    );
    for level in [Level::L1, Level::L2] {
        assert!(
            !c.s(0).is_safe("rank-0", 1, level),
            "{level} after a failed put"
        );
    }
    assert!(
        c.s(buddy).get("rank-0", 1).is_err(),
        "the buddy holds no copy"
    );
    assert_eq!(
        c.s(buddy).usage().arena_free,
        free_before,
        "the reservation is handed back"
    );
    // Without the fault the same version goes through whole.
    let mut reported = false;
    let mut next = || {
        Ok(if reported {
            Ready::Complete
        } else {
            reported = true;
            Ready::Range(HEAD, data.len() as u64)
        })
    };
    // SAFETY: as above.
    let report = unsafe { c.s(0).put_file_streamed("rank-0", 1, &file, &mut next, T) }.unwrap();
    assert_eq!(report.crc, crc32c::crc32c(&data));
    assert!(c.s(0).is_safe("rank-0", 1, Level::L2));
}
