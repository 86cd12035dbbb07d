//! Full native images leave a region's all-zero chunks out as holes (`RegionSparse`): a large,
//! mostly unused region costs its used part only. In this process (one runtime per process,
//! so one test): chunks never written are holes, a discarded range becomes holes again, and
//! restoring (here: rolling back in place) writes the zeros back.
use ghost::image::{self, Image, SectionKind, DELTA_CHUNK};
use ghost::native::{alloc_region, NativeConfig, NativeRuntime};

/// The chunks a region section stores, by its bitmap.
fn stored_chunks(image: &Image<'_>, name: &str, chunks: usize) -> Vec<usize> {
    let s = image.region(name).unwrap();
    assert_eq!(s.kind, SectionKind::RegionSparse, "{name} is not sparse");
    let bitmap = s.stored();
    (0..chunks)
        .filter(|&c| bitmap[c / 8] & (1 << (c % 8)) != 0)
        .collect()
}

#[test]
fn full_images_keep_zero_chunks_as_holes_and_restores_write_the_zeros_back() {
    let dir = std::env::temp_dir().join(format!("krun-ghost-sparse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = NativeRuntime::init(NativeConfig {
        owner: "sparse".into(),
        dir: dir.clone(),
        full_every: 2,
        restore: None,
    })
    .unwrap();
    let chunks = 64;
    let len = chunks * DELTA_CHUNK;
    let addr = alloc_region(len).unwrap();
    // SAFETY: `alloc_region` gives `len` bytes mapped for good; this thread alone uses them.
    let mem = unsafe { std::slice::from_raw_parts_mut(addr, len) };
    // Chunk 3 written before the region is registered, chunk 40 after (a write fault).
    mem[3 * DELTA_CHUNK + 7] = 1;
    // SAFETY: as above.
    unsafe { rt.register("big", addr, len) }.unwrap();
    mem[40 * DELTA_CHUNK + 100] = 2;

    // v1, full: two chunks stored of 64.
    let v1 = rt.checkpoint().unwrap();
    let r1 = rt.wait().unwrap().unwrap();
    assert_eq!((r1.version, r1.parent), (v1, 0));
    assert!(
        r1.image_bytes < 3 * DELTA_CHUNK as u64,
        "a full image of 2 used chunks of 64 took {} bytes",
        r1.image_bytes
    );
    let bytes = std::fs::read(&r1.path).unwrap();
    let img = Image::parse(&bytes).unwrap();
    assert_eq!(stored_chunks(&img, "big", chunks), vec![3, 40]);
    let mut out = vec![0xAAu8; len];
    image::materialize_region(std::slice::from_ref(&img), "big", &mut out).unwrap();
    assert!(out == *mem, "the sparse image does not restore the region");

    // Chunks 10-19 written (v2, incremental), then given back; chunk 12 written again.
    for c in 10..20 {
        mem[c * DELTA_CHUNK + 1] = c as u8;
    }
    let v2 = rt.checkpoint().unwrap();
    assert_eq!(rt.wait().unwrap().unwrap().parent, v1);
    // SAFETY: chunks 10-19 of the region; this thread alone uses them.
    unsafe { rt.discard(addr.add(10 * DELTA_CHUNK), 10 * DELTA_CHUNK) }.unwrap();
    // SAFETY: as above (the memory seen afresh after the runtime changed it).
    let mem = unsafe { std::slice::from_raw_parts_mut(addr, len) };
    assert!(image::is_zero(&mem[10 * DELTA_CHUNK..20 * DELTA_CHUNK]));
    mem[12 * DELTA_CHUNK + 5] = 12;

    // v3, full: the discarded chunks are holes again, except the one written since.
    let v3 = rt.checkpoint().unwrap();
    let r3 = rt.wait().unwrap().unwrap();
    assert_eq!((r3.version, r3.parent), (v3, 0));
    assert!(v3 > v2);
    let bytes = std::fs::read(&r3.path).unwrap();
    let img = Image::parse(&bytes).unwrap();
    assert_eq!(stored_chunks(&img, "big", chunks), vec![3, 12, 40]);
    let at_v3 = mem.to_vec();

    // Scribbled over, zero chunks included; the rollback to v3 writes the zeros back.
    mem[5 * DELTA_CHUNK..6 * DELTA_CHUNK].fill(0xFF);
    mem[30 * DELTA_CHUNK + 9] = 0xFF;
    mem[12 * DELTA_CHUNK + 5] = 0;
    assert_eq!(rt.rollback(Some(v3)).unwrap(), v3);
    // SAFETY: as above.
    let mem = unsafe { std::slice::from_raw_parts(addr, len) };
    assert!(*mem == at_v3, "the rollback did not restore the zeros");

    // A discard must cover whole chunks of one registered region.
    // SAFETY: the calls are refused before touching memory.
    let e = unsafe { rt.discard(addr.add(4096), DELTA_CHUNK) }.unwrap_err();
    assert!(e.to_string().contains("whole chunks"), "{e}");
    // SAFETY: as above.
    let e = unsafe { rt.discard(addr.add(len - DELTA_CHUNK), 2 * DELTA_CHUNK) }.unwrap_err();
    assert!(
        e.to_string().contains("not inside one registered region"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
