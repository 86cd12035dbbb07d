//! The rank library with several ranks in one process (threads, loopback fabric, a
//! bootstrap service started by the test): messages and their observer, windows, errors.
use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use fabric::bootstrap::BootstrapServer;
use fabric::{FabricConfig, Provider};
use krun::{Config, Observer, Rank, RankError, Source, Span, TagMatch, MAX_TAG};

/// Runs `f` on every rank of a job of `n` ranks, each on its own thread.
fn job<T: Send + 'static>(
    n: usize,
    max_message: usize,
    f: impl Fn(Arc<Rank>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let server =
        BootstrapServer::start_with(("127.0.0.1", 0), n, Duration::from_secs(30), None).unwrap();
    let addr = server.addr();
    let f = Arc::new(f);
    let threads: Vec<_> = (0..n)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut fabric = FabricConfig::with_provider(Provider::Loopback);
                fabric.max_message = max_message;
                let r = Rank::init_with(Config {
                    rank,
                    size: n,
                    bootstrap: Some(addr),
                    fabric,
                    bind_explicit: true,
                    recv_timeout: Some(Duration::from_secs(30)),
                    checkpoints: None,
                    node_socket: None,
                })
                .unwrap();
                let out = f(r.clone());
                r.finalize().unwrap();
                out
            })
        })
        .collect();
    let out = threads.into_iter().map(|t| t.join().unwrap()).collect();
    server.join().unwrap();
    out
}

#[derive(Default)]
struct Recorder {
    sends: Mutex<Vec<(usize, u32, u64, usize)>>,
    delivers: Mutex<Vec<(usize, u32, u64, usize)>>,
}

impl Observer for Recorder {
    fn on_send(&self, dest: usize, tag: u32, seq: u64, len: usize) {
        self.sends.lock().unwrap().push((dest, tag, seq, len));
    }
    fn on_deliver(&self, src: usize, tag: u32, seq: u64, len: usize) {
        self.delivers.lock().unwrap().push((src, tag, seq, len));
    }
}

#[test]
fn observer_sees_every_send_and_delivery_with_per_pair_sequence_numbers() {
    const N: usize = 3;
    let installed = Arc::new(Barrier::new(N));
    let logs = job(N, 64 << 10, move |r| {
        let rec = Arc::new(Recorder::default());
        r.set_observer(Some(rec.clone()));
        installed.wait();
        let me = r.rank();
        // To every other rank: 6 messages on 2 tags, one of them fragmented (150 KiB).
        for dest in (0..N).filter(|&d| d != me) {
            for i in 0..6usize {
                let len = if i == 3 { 150 << 10 } else { 10 + i };
                let data = vec![(me * 16 + i) as u8; len];
                r.send(dest, 40 + (i % 2) as u32, &data).unwrap();
            }
        }
        // Receive tag 41 first (any source), then tag 40: delivery order differs from
        // arrival order, sequence numbers must not.
        for tag in [41, 40] {
            for _ in 0..3 * (N - 1) {
                let m = r.recv(Source::Any, TagMatch::Tag(tag)).unwrap();
                let i = (m.data[0] as usize) % 16;
                assert_eq!(m.data[0] as usize / 16, m.src);
                assert_eq!(m.data.len(), if i == 3 { 150 << 10 } else { 10 + i });
                assert!(m.data.iter().all(|&b| b == m.data[0]));
            }
        }
        r.barrier().unwrap();
        r.set_observer(None);
        let sends = rec.sends.lock().unwrap().clone();
        let delivers = rec.delivers.lock().unwrap().clone();
        (me, sends, delivers)
    });
    let mut sent = HashMap::new();
    for (me, sends, _) in &logs {
        // Per destination, sequence numbers are consecutive.
        let mut last: HashMap<usize, u64> = HashMap::new();
        for &(dest, tag, seq, len) in sends {
            if let Some(prev) = last.insert(dest, seq) {
                assert_eq!(seq, prev + 1, "rank {me} -> {dest}");
            }
            assert!(sent.insert((*me, dest, seq), (tag, len)).is_none());
        }
    }
    let mut delivered = 0;
    for (me, _, delivers) in &logs {
        let mut last_per_tag: HashMap<(usize, u32), u64> = HashMap::new();
        for &(src, tag, seq, len) in delivers {
            assert_eq!(
                sent.get(&(src, *me, seq)),
                Some(&(tag, len)),
                "rank {me} delivered ({src}, {tag}, {seq}, {len}) nobody sent"
            );
            if let Some(prev) = last_per_tag.insert((src, tag), seq) {
                assert!(seq > prev, "same-tag messages overtook each other");
            }
            delivered += 1;
        }
        let user = delivers
            .iter()
            .filter(|d| d.1 < krun::INTERNAL_TAG_BASE)
            .count();
        assert_eq!(user, 6 * (N - 1));
    }
    assert_eq!(
        delivered,
        sent.len(),
        "every observed send is delivered exactly once"
    );
}

#[test]
fn any_source_receive_names_the_sender_and_large_messages_round_trip() {
    let out = job(4, 4 << 10, |r| {
        let me = r.rank();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + me as u32) as u8).collect();
        r.send(0, 3, &payload[..1000 + me]).unwrap();
        if me == 1 {
            r.send(2, 9, &payload).unwrap();
        }
        let mut seen = Vec::new();
        if me == 0 {
            for _ in 0..4 {
                let mut buf = vec![0u8; 2000];
                let (src, tag, len) = r.recv_into(Source::Any, TagMatch::Any, &mut buf).unwrap();
                assert_eq!((tag, len), (3, 1000 + src));
                let expect: Vec<u8> = (0..len as u32)
                    .map(|i| (i * 7 + src as u32) as u8)
                    .collect();
                assert_eq!(&buf[..len], &expect[..]);
                seen.push(src);
            }
        }
        if me == 2 {
            let m = r.recv(Source::Rank(1), TagMatch::Tag(9)).unwrap();
            let expect: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 1) as u8).collect();
            assert!(m.data == expect, "fragmented message corrupted");
        }
        r.barrier().unwrap();
        seen.sort();
        seen
    });
    assert_eq!(out[0], vec![0, 1, 2, 3]);
}

#[test]
fn windows_put_get_and_atomics_across_ranks() {
    let out = job(3, 64 << 10, |r| {
        let me = r.rank();
        let n = r.size();
        let w = r.window(8192).unwrap();
        let right = (me + 1) % n;
        w.put(right, 1024, format!("from rank {me}").as_bytes())
            .unwrap();
        w.fetch_add(0, 0, 10 + me as u64).unwrap();
        let won = w.compare_swap(0, 8, 0, 100 + me as u64).unwrap() == 0;
        r.barrier().unwrap();
        let left = (me + n - 1) % n;
        let mut got = vec![0u8; 11];
        w.get(left, 1024, &mut got).unwrap();
        assert_eq!(
            got,
            format!("from rank {}", (left + n - 1) % n).into_bytes()
        );
        let mut local = vec![0u8; 11];
        w.local().read_bytes(1024, &mut local).unwrap();
        assert_eq!(local, format!("from rank {left}").into_bytes());
        // A put from inside the window's own memory (no bounce buffer).
        w.local().write_bytes(4096, &[me as u8 + 1; 64]).unwrap();
        // SAFETY: nobody writes this range of our window during the put.
        let from_window = unsafe { &w.local().as_slice()[4096..4160] };
        w.put(right, 6000, from_window).unwrap();
        r.barrier().unwrap();
        let mut mine = [0u8; 64];
        w.local().read_bytes(6000, &mut mine).unwrap();
        assert_eq!(mine, [left as u8 + 1; 64]);
        let counter = w
            .local()
            .atomic_u64(0)
            .unwrap()
            .load(std::sync::atomic::Ordering::SeqCst);
        let slot = w
            .local()
            .atomic_u64(8)
            .unwrap()
            .load(std::sync::atomic::Ordering::SeqCst);
        r.barrier().unwrap();
        w.free().unwrap();
        (won, counter, slot)
    });
    assert_eq!(
        out.iter().filter(|o| o.0).count(),
        1,
        "one compare-swap wins"
    );
    assert_eq!(out[0].1, 10 + 11 + 12);
    assert!((100..103).contains(&out[0].2));
}

#[test]
fn batches_keep_many_puts_and_gets_in_flight_and_a_bad_span_posts_nothing() {
    const SPANS: usize = 64;
    const PIECE: usize = 64;
    let out = job(3, 64 << 10, |r| {
        let me = r.rank();
        let n = r.size();
        let (right, left) = ((me + 1) % n, (me + n - 1) % n);
        let w = r.window(32 << 10).unwrap();
        let pattern: Vec<u8> = (0..SPANS * PIECE)
            .map(|i| (i / PIECE) as u8 ^ (me as u8) << 6)
            .collect();
        w.local().write_bytes(0, &pattern).unwrap();
        // 64 puts in flight at once, each piece to its own place at the right neighbour.
        let puts: Vec<Span> = (0..SPANS)
            .map(|i| Span {
                offset: 8192 + (i * PIECE) as u64,
                local_offset: i * PIECE,
                len: PIECE,
            })
            .collect();
        w.put_batch_from(right, w.local(), &puts).unwrap();
        r.barrier().unwrap();
        let mut got = vec![0u8; SPANS * PIECE];
        w.local().read_bytes(8192, &mut got).unwrap();
        let left_pattern: Vec<u8> = (0..SPANS * PIECE)
            .map(|i| (i / PIECE) as u8 ^ (left as u8) << 6)
            .collect();
        assert_eq!(got, left_pattern, "the left neighbour's 64 puts landed");
        // 64 gets in flight, landing in reverse order in disjoint local ranges.
        let gets: Vec<Span> = (0..SPANS)
            .map(|i| Span {
                offset: (i * PIECE) as u64,
                local_offset: 16384 + (SPANS - 1 - i) * PIECE,
                len: PIECE,
            })
            .collect();
        w.get_batch_into(left, w.local(), &gets).unwrap();
        // Everyone has read before anyone changes its pieces below.
        r.barrier().unwrap();
        let mut back = vec![0u8; SPANS * PIECE];
        w.local().read_bytes(16384, &mut back).unwrap();
        for i in 0..SPANS {
            let landed = &back[(SPANS - 1 - i) * PIECE..][..PIECE];
            assert_eq!(landed, &left_pattern[i * PIECE..][..PIECE], "piece {i}");
        }
        // A batch whose last span is out of bounds is refused before its first is posted.
        w.local().write_bytes(0, &[0xEE; PIECE]).unwrap();
        let bad = [
            Span {
                offset: 24576,
                local_offset: 0,
                len: PIECE,
            },
            Span {
                offset: (32 << 10) - 8,
                local_offset: 0,
                len: 16,
            },
        ];
        let e = w.put_batch_from(right, w.local(), &bad).unwrap_err();
        assert!(
            matches!(e, RankError::WindowOutOfBounds { len: 16, .. }),
            "{e}"
        );
        // Overlapping local ranges of a get batch, and a local range past the region.
        let overlap = [
            Span {
                offset: 0,
                local_offset: 100,
                len: 64,
            },
            Span {
                offset: 64,
                local_offset: 150,
                len: 64,
            },
        ];
        let e = w.get_batch_into(left, w.local(), &overlap).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        let past = [Span {
            offset: 0,
            local_offset: (32 << 10) - 4,
            len: 8,
        }];
        let e = w.put_batch_from(right, w.local(), &past).unwrap_err();
        assert!(
            e.to_string().contains("outside the 32768-byte region"),
            "{e}"
        );
        r.barrier().unwrap();
        let mut untouched = [0u8; PIECE];
        w.local().read_bytes(24576, &mut untouched).unwrap();
        r.barrier().unwrap();
        w.free().unwrap();
        untouched
    });
    for (rank, untouched) in out.iter().enumerate() {
        assert_eq!(
            untouched, &[0u8; PIECE],
            "rank {rank}: the refused batch's first span was posted"
        );
    }
}

#[test]
fn bad_use_gives_errors_that_name_the_problem() {
    let out = job(2, 1024, |r| {
        let mut errors = Vec::new();
        let e = r.send(5, 1, b"x").unwrap_err();
        assert!(
            matches!(e, RankError::NoSuchRank { rank: 5, size: 2 }),
            "{e}"
        );
        errors.push(e.to_string());
        let e = r.send(0, MAX_TAG + 1, b"x").unwrap_err();
        assert!(matches!(e, RankError::BadTag { .. }), "{e}");
        let e = r.send(0, 1, &vec![0u8; 3 << 20]).unwrap_err();
        assert!(
            matches!(e, RankError::MessageTooLarge { max, .. } if max == 1024 * 2048),
            "{e}"
        );
        let me = r.rank();
        r.send(me, 2, &[7u8; 100]).unwrap();
        let mut small = [0u8; 10];
        let e = r
            .recv_into(Source::Rank(me), TagMatch::Tag(2), &mut small)
            .unwrap_err();
        assert!(
            matches!(
                e,
                RankError::Truncated {
                    len: 100,
                    capacity: 10,
                    ..
                }
            ),
            "{e}"
        );
        errors.push(e.to_string());
        let mut big = [0u8; 100];
        assert_eq!(
            r.recv_into(Source::Rank(me), TagMatch::Tag(2), &mut big)
                .unwrap(),
            (me, 2, 100),
            "a truncated message stays queued"
        );
        let e = r
            .recv_timeout(
                Source::Rank(1 - me),
                TagMatch::Tag(77),
                Duration::from_millis(50),
            )
            .unwrap_err();
        assert!(matches!(e, RankError::RecvTimeout { .. }), "{e}");
        errors.push(e.to_string());
        let w = r.window(4096).unwrap();
        let e = w.put(1 - me, 4090, &[0u8; 8]).unwrap_err();
        assert!(
            matches!(
                e,
                RankError::WindowOutOfBounds {
                    offset: 4090,
                    len: 8,
                    window_len: 4096,
                    ..
                }
            ),
            "{e}"
        );
        errors.push(e.to_string());
        let e = w.fetch_add(0, 4, 1).unwrap_err();
        assert!(matches!(e, RankError::Misaligned { offset: 4, .. }), "{e}");
        let e = w.get(9, 0, &mut [0u8; 8]).unwrap_err();
        assert!(matches!(e, RankError::NoSuchRank { rank: 9, .. }), "{e}");
        r.barrier().unwrap();
        errors
    });
    let text = out[0].join("\n");
    for needle in [
        "rank 5 does not exist: the job has 2 rank(s)",
        "100 bytes, more than the 10-byte receive buffer",
        "no message from rank 1 with tag 77",
        "8 bytes at offset 4090 on rank 1 are out of bounds (its window has 4096 bytes)",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
}
