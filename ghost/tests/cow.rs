//! Copy-on-write during a capture: the program writes to chunks while the copy thread is
//! still copying them, and the image still holds the memory exactly as it was at the freeze
//! (the write-fault thread copies a pending chunk before letting the write through). Also
//! checks the `captured` report file the runtime writes after each capture (version, freeze,
//! copy-on-write chunks). In this process alone (one runtime per process, so one test).
use ghost::image::{self, Image, DELTA_CHUNK};
use ghost::native::{alloc_region, last_capture, NativeConfig, NativeRuntime};

/// The value of word `i` in round `round`.
fn word(i: usize, round: u64) -> u64 {
    (i as u64 ^ 0x5bd1_e995).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round
}

#[test]
fn writes_during_the_copy_are_copied_on_write_and_the_image_is_the_memory_at_the_freeze() {
    let dir = std::env::temp_dir().join(format!("krun-ghost-cow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = NativeRuntime::init(NativeConfig {
        owner: "cow".into(),
        dir: dir.clone(),
        full_every: 1,
        restore: None,
    })
    .unwrap();
    // 256 MiB: the copy thread needs tens of milliseconds, the writer below reaches its
    // first chunk within microseconds.
    let chunks = 4096;
    let len = chunks * DELTA_CHUNK;
    let words = len / 8;
    let addr = alloc_region(len).unwrap();
    // SAFETY: `alloc_region` gives `len` bytes mapped for good, 8-byte aligned; only this
    // thread touches them.
    let mem = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u64>(), words) };
    for (i, w) in mem.iter_mut().enumerate() {
        *w = word(i, 0);
    }
    // SAFETY: as above.
    unsafe { rt.register("data", addr, len) }.unwrap();

    let per_chunk = DELTA_CHUNK / 8;
    let mut cow_seen = 0;
    let mut rounds = 0;
    // Under heavy load the writer may lose the race in a round (the copy thread copies every
    // chunk first); a few rounds are tried, every round's image is checked.
    for round in 1..=5u64 {
        rounds = round;
        let before: Vec<u64> = mem.to_vec();
        let version = rt.checkpoint().unwrap();
        // From the last chunk backwards, against the copy thread going forwards.
        for c in (0..chunks).rev() {
            for k in [0, per_chunk / 2, per_chunk - 1] {
                mem[c * per_chunk + k] = word(c * per_chunk + k, round);
            }
        }
        let report = rt.wait().unwrap().unwrap();
        assert_eq!(report.version, version);
        assert!(
            report.freeze <= report.total,
            "freeze {:?} longer than the capture {:?}",
            report.freeze,
            report.total
        );
        let bytes = std::fs::read(&report.path).unwrap();
        let img = Image::parse(&bytes).unwrap();
        let mut out = vec![0u8; len];
        image::materialize_region(std::slice::from_ref(&img), "data", &mut out).unwrap();
        let got: Vec<u64> = out
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if let Some(i) = (0..words).find(|&i| got[i] != before[i]) {
            panic!(
                "round {round}: the image differs from the memory at the freeze at word {i} \
                 (chunk {}): {:#x}, expected {:#x} (after the freeze it became {:#x}); \
                 {} chunks were copied on write",
                i / per_chunk,
                got[i],
                before[i],
                mem[i],
                report.cow_chunks
            );
        }
        // The live memory kept every write.
        for c in 0..chunks {
            assert_eq!(mem[c * per_chunk], word(c * per_chunk, round));
        }
        // The report file names this capture, with the same figures.
        let file = last_capture(&dir, "cow", std::process::id() as i32)
            .expect("the runtime writes a captured report after each capture");
        assert_eq!(file.version, version);
        assert_eq!(file.freeze, report.freeze);
        assert_eq!(file.cow_chunks, report.cow_chunks);
        assert_eq!(file.image_bytes, report.image_bytes);
        cow_seen += report.cow_chunks;
        if cow_seen > 0 {
            break;
        }
    }
    assert!(
        cow_seen > 0,
        "in {rounds} rounds no write reached a chunk before the copy thread did: the \
         copy-on-write path was never exercised"
    );
    // A report of another process is not taken for ours.
    assert!(last_capture(&dir, "cow", std::process::id() as i32 + 1).is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
