//! Capture: the freeze, the copy-on-write fault thread, the background copy into the L1
//! image file, and pruning the L1 directory to the newest complete chain.
use super::progress::ProgressRecord;
use super::{
    hex, image_path, list_versions, read_header, spare_files, spare_limit, CaptureReport, Filling,
    Inflight, L1File, NativeRuntime, TrackedRegion, CLEAN, COPYING, DIRTY, PENDING,
};
use crate::error::{GhostError, Result};
use crate::image::{crc, ImageBuilder, SectionKind, DELTA_CHUNK, HEADER_LEN, SECTION_HEADER_LEN};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Name of the padding sections (meta sections of newlines, which readers skip).
const PAD: &str = "pad";
const PAGE: usize = 4096;
/// Chunks between two publications of the copy's progress (2 MiB of 64 KiB chunks: one
/// RMA write of a streamed put).
const PUBLISH_EVERY: usize = 32;

/// Bytes of padding payload that put the payload of a region section named with `name_len`
/// bytes at a page boundary, when the padding section starts at `at`.
fn pad_before(at: usize, name_len: usize) -> usize {
    let payload = at + 2 * SECTION_HEADER_LEN + PAD.len() + name_len;
    (PAGE - payload % PAGE) % PAGE
}

impl NativeRuntime {
    /// Waits until no capture is copying (its report stays for [`NativeRuntime::wait`]).
    pub(super) fn wait_idle(&self) {
        let mut slot = self.inflight.lock().expect("lock");
        while slot.as_ref().is_some_and(|i| !i.done) {
            slot = self.inflight_done.wait(slot).expect("lock");
        }
    }

    pub(super) fn serve_faults(self: Arc<Self>) {
        loop {
            let fault = match self.uffd.next_fault() {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("krun-ghost: write-fault thread stops: {e}");
                    return;
                }
            };
            let addr = fault.address as usize;
            let region = self
                .regions
                .read()
                .expect("lock")
                .iter()
                .find(|r| addr >= r.addr && addr < r.addr + r.len)
                .cloned();
            let Some(region) = region else { continue };
            let c = (addr - region.addr) / DELTA_CHUNK;
            let guard = self.freeze.lock().expect("lock");
            loop {
                match region.states[c].load(Ordering::Acquire) {
                    PENDING => {
                        if region.states[c]
                            .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            self.copy_chunk(&region, c);
                            self.cow_chunks.fetch_add(1, Ordering::Relaxed);
                            region.zero[c].store(false, Ordering::Release);
                            region.states[c].store(DIRTY, Ordering::Release);
                            break;
                        }
                    }
                    COPYING => std::thread::yield_now(),
                    _ => {
                        region.zero[c].store(false, Ordering::Release);
                        region.states[c].store(DIRTY, Ordering::Release);
                        break;
                    }
                }
            }
            drop(guard);
            let (start, len) = region.chunk_range(c);
            if let Err(e) = self.uffd.set_protection(start as u64, len as u64, false) {
                eprintln!(
                    "krun-ghost: cannot unprotect chunk {c} of region '{}': {e}",
                    region.name
                );
            }
        }
    }

    /// Copies chunk `c` of `region` to its place in the image being filled.
    fn copy_chunk(&self, region: &TrackedRegion, c: usize) {
        let base = self.filling.lock().expect("lock").as_ref().map(|f| f.base);
        let Some(base) = base else { return };
        let dest = region.dest.lock().expect("lock")[c];
        let (start, len) = region.chunk_range(c);
        // SAFETY: the chunk lies inside a registered region (mapped for the process's life);
        // `dest` is this chunk's reserved, disjoint range of the image buffer, which stays
        // allocated until every PENDING/COPYING chunk is copied.
        unsafe { std::ptr::copy_nonoverlapping(start as *const u8, (base + dest) as *mut u8, len) };
        // The chunk's crc while its bytes are in cache: the image's checksum is combined from
        // these instead of reading the payload again (see `image::crc`).
        // SAFETY: the range just written, reserved for this chunk alone.
        let crc =
            crc32c::crc32c(unsafe { std::slice::from_raw_parts((base + dest) as *const u8, len) });
        region.crcs[c].store(crc, Ordering::Relaxed);
    }

    /// Waits for the capture in flight, if any, and returns its report.
    pub fn wait(&self) -> Result<Option<CaptureReport>> {
        let mut slot = self.inflight.lock().expect("lock");
        while slot.as_ref().is_some_and(|i| !i.done) {
            slot = self.inflight_done.wait(slot).expect("lock");
        }
        match slot.take() {
            None => Ok(None),
            Some(i) => match i.result {
                Some(Ok(r)) => Ok(Some(r)),
                Some(Err(e)) => Err(GhostError::Invalid(format!(
                    "capture of v{} failed: {e}",
                    i.version
                ))),
                None => Ok(None),
            },
        }
    }

    /// Freezes the registered memory and captures it in the background; returns the version
    /// being written. The program is stopped only for the freeze. A capture still in flight
    /// is waited for first.
    pub fn checkpoint(self: &Arc<Self>) -> Result<u64> {
        self.wait()?;
        let freeze_start = Instant::now();
        let regions = self.regions.read().expect("lock").clone();
        if regions.is_empty() {
            return Err(GhostError::Invalid(
                "checkpoint with no registered region".into(),
            ));
        }
        let (version, parent) = {
            let mut v = self.next_version.lock().expect("lock");
            let version = v.0;
            let full = v.1 == 0 || v.2 == u32::MAX || v.2 + 1 >= self.config.full_every;
            let parent = if full { 0 } else { v.1 };
            v.0 += 1;
            v.1 = version;
            v.2 = if full { 0 } else { v.2 + 1 };
            (version, parent)
        };
        let meta = format!(
            "backend=native\nowner={}\nversion={version}\nparent={parent}\npid={}\nprogram={}\ncmdline={}\ncwd={}\nregions={}\ncreated_unix={}\n",
            self.config.owner,
            std::process::id(),
            std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
            hex(&std::fs::read("/proc/self/cmdline").unwrap_or_default()),
            std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
            regions.iter().map(|r| format!("{}:{}", r.name, r.len)).collect::<Vec<_>>().join(","),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        );
        let guard = self.freeze.lock().expect("lock");
        // Decide each region's chunks, size the image and lay out its sections in L1.
        let mut choices = Vec::with_capacity(regions.len());
        let mut sizes = vec![(4, meta.len())];
        // Where the next section starts: a whole region's payload is put at a page boundary
        // of the file (behind a padding meta section), so that a restore can map its pages.
        let mut at = HEADER_LEN + SECTION_HEADER_LEN + 4 + meta.len();
        for r in &regions {
            let dirty: Vec<bool> = r
                .states
                .iter()
                .map(|s| s.load(Ordering::Acquire) == DIRTY)
                .collect();
            // A full image leaves the known-zero chunks out (holes).
            let take: Vec<bool> = if parent == 0 {
                r.zero.iter().map(|z| !z.load(Ordering::Acquire)).collect()
            } else {
                dirty.clone()
            };
            let sparse = parent == 0 && take.iter().any(|&t| !t);
            let stored = if parent == 0 && !sparse {
                r.len
            } else {
                ImageBuilder::delta_len(r.len, &take)
            };
            let pad = (parent == 0 && !sparse).then(|| pad_before(at, r.name.len()));
            if let Some(k) = pad {
                sizes.push((PAD.len(), k));
                at += SECTION_HEADER_LEN + PAD.len() + k;
            }
            sizes.push((r.name.len(), stored));
            at += SECTION_HEADER_LEN + r.name.len() + stored;
            choices.push((dirty, take, pad));
        }
        let total = ImageBuilder::planned_len(&sizes);
        let prepared = self.next_l1.lock().expect("lock").take();
        let created = match prepared {
            Some(mut f) if f.len() == total => {
                f.retarget(image_path(&self.config.dir, &self.config.owner, version));
                Ok(f)
            }
            other => {
                drop(other);
                L1File::create(&self.config.dir, &self.config.owner, version, total)
            }
        };
        let l1 = match created {
            Ok(f) => f,
            Err(e) => {
                self.next_version.lock().expect("lock").2 = u32::MAX;
                return Err(e);
            }
        };
        // SAFETY: the mapping is `total` bytes, writable, ours alone, and lives in `l1`,
        // which travels with the builder to the copy thread.
        let mut builder = unsafe { ImageBuilder::in_place(version, parent, l1.base(), total)? };
        builder.add(SectionKind::Meta, "meta", meta.as_bytes(), false)?;
        let mut plans = Vec::with_capacity(regions.len());
        for (r, (dirty, take, pad)) in regions.iter().zip(choices) {
            let whole = parent == 0 && take.iter().all(|&t| t);
            if let Some(k) = pad {
                builder.add(SectionKind::Meta, PAD, &vec![b'\n'; k], false)?;
            }
            let first = if whole {
                let first = builder.reserve_offset(SectionKind::Region, &r.name, r.len)?;
                debug_assert!(first.is_multiple_of(PAGE), "region payload at {first}");
                first
            } else if parent == 0 {
                builder.reserve_sparse(&r.name, r.len, &take)?
            } else {
                builder.reserve_delta(&r.name, r.len, &take)?
            };
            plans.push((dirty, take, first, whole));
        }
        let base = builder.base_ptr() as usize;
        *self.filling.lock().expect("lock") = Some(Filling { base });
        // Where each whole region's payload lies in the file (published for the readers
        // that send the image on while it is copied: `progress.rs`).
        let wholes: Vec<Option<usize>> = plans
            .iter()
            .map(|(_, _, first, whole)| whole.then_some(*first))
            .collect();
        let mut memory_bytes = 0u64;
        for (r, (dirty, take, first, whole)) in regions.iter().zip(&plans) {
            // Protect runs of dirty chunks (clean ones are still protected).
            let mut c = 0;
            while c < dirty.len() {
                if dirty[c] {
                    let run_start = c;
                    while c < dirty.len() && dirty[c] {
                        c += 1;
                    }
                    let (start, _) = r.chunk_range(run_start);
                    let end = (r.addr + c * DELTA_CHUNK).min(r.addr + r.len);
                    self.uffd
                        .set_protection(start as u64, (end - start) as u64, true)?;
                } else {
                    c += 1;
                }
            }
            let mut dest = r.dest.lock().expect("lock");
            let mut k = 0;
            for c in 0..take.len() {
                if take[c] {
                    dest[c] = if *whole {
                        first + c * DELTA_CHUNK
                    } else {
                        first + k * DELTA_CHUNK
                    };
                    k += 1;
                    memory_bytes += r.chunk_range(c).1 as u64;
                    r.states[c].store(PENDING, Ordering::Release);
                } else {
                    r.states[c].store(CLEAN, Ordering::Release);
                }
            }
        }
        drop(guard);
        let freeze = freeze_start.elapsed();

        *self.inflight.lock().expect("lock") = Some(Inflight {
            version,
            done: false,
            result: None,
        });
        let rt = self.clone();
        std::thread::Builder::new()
            .name("krun-ghost-copy".into())
            .spawn(move || {
                let result = rt
                    .complete_capture(
                        regions,
                        builder,
                        l1,
                        wholes,
                        version,
                        parent,
                        memory_bytes,
                        freeze,
                        freeze_start,
                    )
                    .map_err(|e| e.to_string());
                let mut slot = rt.inflight.lock().expect("lock");
                if let Some(i) = slot.as_mut() {
                    i.done = true;
                    i.result = Some(result);
                }
                rt.inflight_done.notify_all();
            })
            .map_err(|e| GhostError::Io {
                path: PathBuf::from("thread"),
                what: "spawning the copy thread".into(),
                source: e,
            })?;
        Ok(version)
    }

    #[allow(clippy::too_many_arguments)]
    fn complete_capture(
        &self,
        regions: Vec<Arc<TrackedRegion>>,
        mut builder: ImageBuilder,
        mut l1: L1File,
        wholes: Vec<Option<usize>>,
        version: u64,
        parent: u64,
        memory_bytes: u64,
        freeze: Duration,
        freeze_start: Instant,
    ) -> Result<CaptureReport> {
        let cow_before = self.cow_chunks.load(Ordering::Relaxed);
        // A file made in the freeze (no readied one): map its pages in one go, now that the
        // program runs again, rather than fault on each while copying.
        l1.populate();
        let ranges: Vec<(u64, u64)> = regions
            .iter()
            .zip(&wholes)
            .filter_map(|(r, w)| w.map(|f| (f as u64, (f + r.len) as u64)))
            .collect();
        // Best effort: without the record, readers wait for the committed file.
        let progress = ProgressRecord::begin(
            &self.config.dir,
            &self.config.owner,
            version,
            l1.len() as u64,
            &ranges,
            l1.tmp_path(),
        )
        .ok();
        // A chunk is final once it is neither pending nor being copied (by the fault thread).
        let busy = |s: &std::sync::atomic::AtomicU8| {
            matches!(s.load(Ordering::Acquire), PENDING | COPYING)
        };
        for (r, whole) in regions.iter().zip(&wholes) {
            let mut low = 0;
            for c in 0..r.states.len() {
                if r.states[c]
                    .compare_exchange(PENDING, COPYING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.copy_chunk(r, c);
                    r.states[c].store(CLEAN, Ordering::Release);
                }
                // Every PUBLISH_EVERY chunks, publish how far the region's payload is final.
                if let (Some(first), Some(p)) = (whole, &progress) {
                    if c % PUBLISH_EVERY == PUBLISH_EVERY - 1 {
                        while low <= c && !busy(&r.states[low]) {
                            low += 1;
                        }
                        p.advance((first + low * DELTA_CHUNK) as u64);
                    }
                }
            }
            if let (Some(first), Some(p)) = (whole, &progress) {
                for s in &r.states {
                    while busy(s) {
                        std::thread::yield_now();
                    }
                }
                p.advance((first + r.len) as u64);
            }
        }
        // The fault thread may still be copying a chunk it claimed.
        for r in &regions {
            for s in &r.states {
                while matches!(s.load(Ordering::Acquire), PENDING | COPYING) {
                    std::thread::yield_now();
                }
            }
        }
        *self.filling.lock().expect("lock") = None;
        // Whole regions: their payload's crc from the chunks' (each chunk was copied once).
        let shift = crc::Shift::new(DELTA_CHUNK);
        for (r, whole) in regions.iter().zip(&wholes) {
            if let Some(first) = whole {
                let pieces = (0..r.states.len())
                    .map(|c| (r.crcs[c].load(Ordering::Relaxed), r.chunk_range(c).1));
                builder.set_payload_crc(*first, crc::combine_pieces(&shift, pieces))?;
            }
        }
        let image_bytes = builder.seal() as u64;
        drop(builder);
        let path = match l1.commit() {
            Ok(p) => p,
            Err(e) => {
                // No file for this version: the next image must not build on it.
                self.next_version.lock().expect("lock").2 = u32::MAX;
                if let Some(p) = &progress {
                    p.finish(false);
                }
                return Err(e);
            }
        };
        if let Some(p) = &progress {
            p.finish(true);
        }
        let total = freeze_start.elapsed();
        self.prune()?;
        let report = CaptureReport {
            version,
            parent,
            path,
            image_bytes,
            memory_bytes,
            cow_chunks: self.cow_chunks.load(Ordering::Relaxed) - cow_before,
            freeze,
            total,
        };
        self.write_captured(&report);
        // Ready the next image's file now, off the program's path (same size: the usual
        // case of a steady program; a different size is created in the freeze as before).
        if spare_limit()? > 0 {
            match L1File::prepare(
                &self.config.dir,
                &self.config.owner,
                report.image_bytes as usize,
            ) {
                Ok(f) => *self.next_l1.lock().expect("lock") = Some(f),
                Err(e) => eprintln!("krun-ghost: readying the next image file: {e}"),
            }
        }
        Ok(report)
    }

    /// Writes the [`super::CAPTURED`] report (best effort: a full directory only loses the
    /// report, never the image).
    fn write_captured(&self, r: &CaptureReport) {
        let dir = self.config.dir.join(&self.config.owner);
        let tmp = dir.join(format!(".{}-{}", super::CAPTURED, std::process::id()));
        let text = format!(
            "{} {} {} {} {} {} {}\n",
            r.version,
            r.freeze.as_nanos(),
            r.total.as_nanos(),
            r.cow_chunks,
            r.image_bytes,
            r.memory_bytes,
            std::process::id()
        );
        if std::fs::write(&tmp, text).is_err()
            || std::fs::rename(&tmp, dir.join(super::CAPTURED)).is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Keeps the images from the newest full image on (the newest complete chain; older
    /// versions live on in the checkpoint store's levels). Replaced files become spares whose
    /// memory the next images reuse.
    fn prune(&self) -> Result<()> {
        let versions = list_versions(&self.config.dir, &self.config.owner)?;
        let mut fulls = Vec::new();
        for &v in &versions {
            let path = image_path(&self.config.dir, &self.config.owner, v);
            let Ok(bytes) = read_header(&path) else {
                continue;
            };
            if bytes.1 == 0 {
                fulls.push(v);
            }
        }
        if fulls.len() > 1 {
            let keep_from = fulls[fulls.len() - 1];
            let owner_dir = self.config.dir.join(&self.config.owner);
            let mut spares = spare_files(&owner_dir).len();
            let limit = spare_limit()?;
            let pinned = self.pinned.lock().expect("lock").clone();
            for v in versions.into_iter().filter(|&v| v < keep_from) {
                let path = image_path(&self.config.dir, &self.config.owner, v);
                // Keep old files as spares: their memory is reused by the next images. A
                // file that backs region memory is only unlinked (its pages stay mapped).
                if spares < limit
                    && !pinned.contains(&v)
                    && std::fs::rename(&path, owner_dir.join(format!(".spare-{v}"))).is_ok()
                {
                    spares += 1;
                } else {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        Ok(())
    }
}
