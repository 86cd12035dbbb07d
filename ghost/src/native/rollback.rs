//! Rollback in place: every registered region rewritten from an image while the process
//! lives on (the rollback primitive of the HA kit).
use super::{list_versions, load_chain, NativeRuntime, ROLLBACK_REQUEST};
use crate::error::{GhostError, Result};
use crate::image::{self, Image, DELTA_CHUNK};

impl NativeRuntime {
    /// Rewrites every registered region in place from `version` (the newest when `None`) and
    /// returns the version used. The caller must be at a point where no other thread of the
    /// program touches the regions.
    pub fn rollback(&self, version: Option<u64>) -> Result<u64> {
        self.wait()?;
        let version = match version {
            Some(v) => v,
            None => *list_versions(&self.config.dir, &self.config.owner)?
                .last()
                .ok_or_else(|| {
                    GhostError::Invalid(format!("rollback: no image of {}", self.config.owner))
                })?,
        };
        let chain = load_chain(&self.config.dir, &self.config.owner, version)?;
        let images = chain
            .iter()
            .map(|b| Image::parse_verified(b))
            .collect::<Result<Vec<_>>>()?;
        let regions = self.regions.read().expect("lock").clone();
        for r in &regions {
            if images[0].region(&r.name).is_none() {
                return Err(GhostError::Invalid(format!(
                    "rollback to v{version}: the image has no region '{}'",
                    r.name
                )));
            }
        }
        for r in &regions {
            // Materialize into scratch first so a corrupt chain leaves memory untouched
            // (zeroed memory from the allocator: the holes of a sparse region stay untouched).
            let mut scratch = vec![0u8; r.len];
            image::materialize_region(&images, &r.name, &mut scratch)?;
            // SAFETY: the region is registered memory, mapped and writable for the process's
            // life; writes to protected chunks fault and are released by the fault thread.
            let live = unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, r.len) };
            for (want, now) in scratch
                .chunks(DELTA_CHUNK)
                .zip(live.chunks_mut(DELTA_CHUNK))
            {
                // A chunk zero on both sides is left alone (not touched, not faulted).
                if !(image::is_zero(want) && image::is_zero(now)) {
                    now.copy_from_slice(want);
                }
            }
        }
        Ok(version)
    }

    /// The rollback target named by `krun ghost rollback` in `<dir>/<owner>/rollback-request`
    /// (removed once read), else the newest image.
    pub(super) fn requested_rollback_version(&self) -> Option<u64> {
        let path = self
            .config
            .dir
            .join(&self.config.owner)
            .join(ROLLBACK_REQUEST);
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        text.trim().parse().ok().filter(|&v| v > 0)
    }
}
