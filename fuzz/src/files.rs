//! Decoders of files: ghost images (ghost/src/image/), L4 checkpoint files
//! (ckpt-store/src/disk.rs), the TOML configuration (launcher/src/config.rs) and policy
//! descriptions (policies/src/description.rs).
//!
//! Images and L4 files are guarded by crc32c checksums, which random mutation almost never
//! gets right: each input is decoded as it is (the checks themselves), then once more with
//! its checksums recomputed by the harness (what lies behind them: lengths, layout, section
//! kinds, decompression), so the fuzzer reaches both.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use ckpt_store::disk::{self, field, DiskLevel, DiskOptions};
use ghost::image::{self, Image, ImageBuilder, SectionKind};
use policies::coordinated::Config;
use policies::description::Description;

use crate::{allow_extra, utf8, Target};

/// Sections announcing more than this are not decompressed by the harness: a zstd frame
/// legitimately expands ~30,000-fold, so a bomb within the input limit could ask for
/// gigabytes that the format allows (the restore path sizes its buffers from the header).
const MAX_RAW: u64 = 16 << 20;

pub const GHOST_IMAGE: Target = Target {
    name: "ghost-image",
    what: "ghost images: header, sections, checksums, zstd payloads, region deltas",
    run: ghost_image,
    seeds: ghost_seeds,
};

fn ghost_image(data: &[u8]) {
    ghost_parse(data);
    let mut fixed = data.to_vec();
    fix_ghost_crcs(&mut fixed);
    if fixed != data {
        ghost_parse(&fixed);
    }
}

fn ghost_parse(data: &[u8]) {
    let img = match Image::parse(data) {
        Ok(img) => img,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an empty error");
            return;
        }
    };
    assert_eq!(img.total_len, data.len() as u64);
    for s in img.sections.iter().filter(|s| s.raw_len <= MAX_RAW) {
        allow_extra(2 * s.raw_len as usize + (1 << 20));
        match s.data() {
            // A delta section stores a chunk bitmap and the changed chunks, not the region's
            // `raw_len` bytes: its length is checked where the delta is applied.
            // So does a sparse one (the chunks that are not all zero).
            Ok(_)
                if matches!(s.kind, SectionKind::RegionDelta | SectionKind::RegionSparse)
                    && !s.compressed => {}
            Ok(d) => assert_eq!(d.len() as u64, s.raw_len, "section {}", s.index),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(&format!("section {}", s.index)), "{text}");
            }
        }
    }
    if img
        .sections
        .iter()
        .filter(|s| s.kind == SectionKind::Meta)
        .all(|s| s.raw_len <= MAX_RAW)
    {
        let _ = img.meta();
    }
    let regions: Vec<(&str, u64)> = img
        .sections
        .iter()
        .filter(|s| {
            matches!(
                s.kind,
                SectionKind::Region | SectionKind::RegionDelta | SectionKind::RegionSparse
            )
        })
        .filter(|s| s.raw_len <= MAX_RAW)
        .map(|s| (s.name, s.raw_len))
        .collect();
    for (name, len) in regions {
        allow_extra(len as usize);
        let mut out = vec![0u8; len as usize];
        let _ = image::materialize_region(std::slice::from_ref(&img), name, &mut out);
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes an image's header checksum and each section's, as far as its structure holds.
fn fix_ghost_crcs(b: &mut [u8]) {
    if b.len() < image::HEADER_LEN {
        return;
    }
    let crc = crc32c::crc32c(&b[..32]);
    put_u32(b, 32, crc);
    let count = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
    let mut at = image::HEADER_LEN;
    for _ in 0..count.min(4096) {
        if b.len() - at < 32 {
            return;
        }
        let name_len = u16_at(b, at + 4) as usize;
        let stored_len = u64_at(b, at + 16);
        let name_at = at + 32;
        let payload_at = name_at + name_len;
        let Some(end) = usize::try_from(stored_len)
            .ok()
            .and_then(|l| payload_at.checked_add(l))
            .filter(|&end| end <= b.len())
        else {
            return;
        };
        let payload_crc = crc32c::crc32c(&b[payload_at..end]);
        put_u32(b, at + 24, payload_crc);
        let header_crc =
            crc32c::crc32c_append(crc32c::crc32c(&b[at..at + 28]), &b[name_at..payload_at]);
        put_u32(b, at + 28, header_crc);
        at = end;
    }
}

fn ghost_seeds() -> Vec<Vec<u8>> {
    let mut full = ImageBuilder::new(7, 0, Vec::new());
    full.add(
        SectionKind::Meta,
        "meta",
        b"backend=native\npid=42\nstep=3\n",
        false,
    )
    .expect("meta");
    full.add(SectionKind::Region, "heap", &[0xab; 300], true)
        .expect("region");
    full.add(SectionKind::CriuFile, "core-1.img", b"criu file", false)
        .expect("criu file");
    let mut delta = ImageBuilder::new(8, 7, Vec::new());
    let raw: Vec<u8> = (0..image::DELTA_CHUNK + 100).map(|i| i as u8).collect();
    delta
        .add_delta("heap", &raw, &[false, true])
        .expect("delta");
    let mut region = ImageBuilder::new(9, 0, Vec::new());
    region
        .add(SectionKind::Region, "stack", &[1, 2, 3, 4], false)
        .expect("region");
    let mut sparse = ImageBuilder::new(10, 0, Vec::new());
    let mut raw = vec![0u8; 2 * image::DELTA_CHUNK + 100];
    raw[image::DELTA_CHUNK + 1] = 5;
    sparse.add_sparse("heap", &raw).expect("sparse");
    vec![
        full.finish(),
        delta.finish(),
        region.finish(),
        sparse.finish(),
    ]
}

pub const L4_FILE: Target = Target {
    name: "l4-file",
    what: "L4 checkpoint files (header, checksum table, payload blocks) through DiskLevel::read",
    run: l4_file,
    seeds: l4_seeds,
};

/// The owner and version the harness reads; the seeds are written under them.
const L4_OWNER: &str = "fuzz";
const L4_VERSION: u64 = 1;

struct L4 {
    /// This process's directory (removed after every input).
    dir: PathBuf,
    plain: DiskLevel,
    direct: DiskLevel,
}

thread_local! {
    static L4_LEVEL: RefCell<Option<L4>> = const { RefCell::new(None) };
}

/// Where L4 files are written: `KRUN_FUZZ_DIR` (a filesystem with O_DIRECT and io_uring,
/// as the store needs) or the temporary directory; one subdirectory per process.
fn l4_base() -> PathBuf {
    std::env::var_os("KRUN_FUZZ_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("krun-fuzz-l4")
}

fn l4_file(data: &[u8]) {
    l4_read(data);
    if data.len() >= disk::HEADER_LEN {
        let mut fixed = data.to_vec();
        fix_l4_crcs(&mut fixed);
        if fixed != data {
            l4_read(&fixed);
        }
    }
}

fn l4_read(data: &[u8]) {
    L4_LEVEL.with(|cell| {
        let mut cell = cell.borrow_mut();
        let pid = std::process::id();
        if cell
            .as_ref()
            .is_none_or(|l| !l.dir.ends_with(pid.to_string()))
        {
            let dir = l4_base().join(pid.to_string());
            let open = |direct_reads| {
                DiskLevel::open_with(
                    &dir,
                    DiskOptions {
                        direct_reads,
                        chunk_size: 1 << 16,
                        ..DiskOptions::default()
                    },
                )
                .unwrap_or_else(|e| panic!("the harness cannot open {}: {e}", dir.display()))
            };
            *cell = Some(L4 {
                plain: open(false),
                direct: open(true),
                dir,
            });
        }
        let l4 = cell.as_ref().expect("opened above");
        let path = l4.plain.path(L4_OWNER, L4_VERSION);
        write_file(&path, data);
        let plain = l4.plain.read(L4_OWNER, L4_VERSION);
        let inspected = l4.plain.inspect(L4_OWNER, L4_VERSION);
        match &plain {
            Ok(payload) => {
                let h = inspected.expect("a file that reads has a good header");
                assert_eq!(h.payload_len, payload.len() as u64);
                assert!(
                    payload.len() <= data.len(),
                    "a payload longer than its file"
                );
                // The io_uring + O_DIRECT reader agrees (only on good files: it writes back
                // the page cache first, which is slow).
                let direct = l4.direct.read(L4_OWNER, L4_VERSION).expect("direct read");
                assert_eq!(&direct, payload, "the two readers disagree");
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(L4_OWNER), "the error names no file: {text}");
            }
        }
        let _ = std::fs::remove_dir_all(&l4.dir);
    })
}

fn write_file(path: &Path, data: &[u8]) {
    let dir = path.parent().expect("a file in a directory");
    std::fs::create_dir_all(dir)
        .unwrap_or_else(|e| panic!("the harness cannot create {}: {e}", dir.display()));
    std::fs::write(path, data)
        .unwrap_or_else(|e| panic!("the harness cannot write {}: {e}", path.display()));
}

/// Recomputes an L4 file's checksums (block table, table crc, payload crc, header crc)
/// from the header's own lengths, as far as they fit in the file.
fn fix_l4_crcs(f: &mut [u8]) {
    let h = disk::HEADER_LEN;
    let avail = f.len() - h;
    let plen = usize::try_from(u64_at(f, field::PAYLOAD_LEN))
        .unwrap_or(usize::MAX)
        .min(avail);
    let payload = &f[h..h + plen];
    let crcs: Vec<u32> = payload.chunks(disk::BLOCK).map(crc32c::crc32c).collect();
    let whole = crc32c::crc32c(payload);
    put_u32(f, field::PAYLOAD_CRC, whole);
    let table_at = usize::try_from(u64_at(f, field::TABLE_OFFSET)).unwrap_or(usize::MAX);
    let table_len = usize::try_from(u64_at(f, field::TABLE_LEN)).unwrap_or(usize::MAX);
    if let Some(end) = table_at.checked_add(table_len).filter(|&e| e <= f.len()) {
        if table_len == crcs.len() * 4 {
            for (i, c) in crcs.iter().enumerate() {
                put_u32(f, table_at + 4 * i, *c);
            }
        }
        let table_crc = crc32c::crc32c(&f[table_at..end]);
        put_u32(f, field::TABLE_CRC, table_crc);
    }
    let crc = disk::header_crc(&f[..h]);
    put_u32(f, field::HEADER_CRC, crc);
}

fn l4_seeds() -> Vec<Vec<u8>> {
    let dir = l4_base().join(format!("seeds-{}", std::process::id()));
    let level = DiskLevel::open_with(
        &dir,
        DiskOptions {
            direct_reads: false,
            ..DiskOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("cannot open {}: {e}", dir.display()));
    let mut out = Vec::new();
    for payload in [Vec::new(), b"a small checkpoint".to_vec(), vec![0x5a; 5000]] {
        level
            .write(L4_OWNER, L4_VERSION, &payload)
            .expect("an L4 write");
        let path = level.path(L4_OWNER, L4_VERSION);
        out.push(std::fs::read(&path).expect("the written file"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

pub const CONFIG: Target = Target {
    name: "config",
    what: "the TOML configuration file (krun.toml)",
    run: config,
    seeds: config_seeds,
};

fn config(data: &[u8]) {
    let Some(text) = utf8(data) else {
        return;
    };
    let path = Path::new("/etc/krun/fuzz.toml");
    match launcher::config::parse_file(path, text) {
        Ok(settings) => {
            for (setting, value, line) in settings {
                assert!(line >= 1, "{}: line 0", setting.key);
                assert!(
                    launcher::config::SETTINGS.contains(setting),
                    "an unknown setting {}",
                    setting.key
                );
                let _ = value;
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("fuzz.toml"),
                "the error names no file: {text}"
            );
        }
    }
}

fn config_seeds() -> Vec<Vec<u8>> {
    use launcher::config::{Kind, SETTINGS};
    let mut text = String::new();
    let mut section = "";
    for s in SETTINGS {
        let Some(default) = s.default else { continue };
        if s.section != section {
            section = s.section;
            text.push_str(&format!("\n[{section}]\n"));
        }
        match s.kind {
            Kind::Count | Kind::Positive => text.push_str(&format!("{} = {default}\n", s.key)),
            _ => text.push_str(&format!("{} = \"{default}\"\n", s.key)),
        }
    }
    let first = SETTINGS[0];
    vec![
        text.into_bytes(),
        format!("[{}]\n{} = \"x\"\n", first.section, first.key).into_bytes(),
        b"# nothing set\n".to_vec(),
    ]
}

pub const POLICY: Target = Target {
    name: "policy",
    what: "HA policy descriptions (TOML)",
    run: policy,
    seeds: policy_seeds,
};

fn policy(data: &[u8]) {
    let Some(text) = utf8(data) else {
        return;
    };
    let source = "/etc/krun/fuzz-policy.toml";
    match Description::parse(source, text) {
        Ok(d) => {
            let defaults = Config::default();
            let _ = d.render(&defaults);
            let _ = d.effective_levels(&defaults);
            if let Err(e) = d.coordinated_config(&defaults) {
                assert!(e.to_string().contains(source), "{e}");
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains(source), "the error names no file: {text}");
        }
    }
}

fn policy_seeds() -> Vec<Vec<u8>> {
    vec![
        br#"policy = "coordinated"
interval_ms = 500
commit_level = "L2"
keep_commits = 2
max_restarts = 3
spares = 1
restart = "spare"
failure_groups = [[0, 1], [2, 3]]

[levels]
L1 = 1
L2 = 1
L4 = 10

[inject]
failures = ["node=1@3ckpt"]
"#
        .to_vec(),
        br#"policy = "uncoordinated"
daly = { mtbf_s = 86400, initial_ms = 60000 }
restart = "shrink"
max_ranks_per_node = 4

[logging]
messages = true
dsm = false

[params]
key = "value"
"#
        .to_vec(),
        b"policy = \"coordinated\"\n".to_vec(),
    ]
}
