//! Modified Gram-Schmidt on the DSM: the Gobelins seed's evaluation application, shared by
//! `dsm-node mgs` (the multi-process tests) and `bench mgs`.
//!
//! The `rows` x `cols` matrix is column-major in one shared region; column `j` belongs to
//! rank `j % size`. Step `k`: column `k`'s rank normalizes it; after a barrier every rank
//! reads column `k` (its pages fault in) and projects it out of its own columns `j > k`.
use std::time::Instant;

use crate::error::{DsmError, Result};
use crate::region::{Dsm, SharedRegion};

/// The test matrix: deterministic pseudo-random entries in `[-0.5, 0.5)` (splitmix64),
/// column-major.
pub fn matrix(rows: usize, cols: usize) -> Vec<f64> {
    let mut x: u64 = 0x1234_5678;
    (0..rows * cols)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect()
}

/// Modified Gram-Schmidt in place on column-major `a`: its columns become Q.
pub fn serial(a: &mut [f64], rows: usize, cols: usize) {
    for k in 0..cols {
        let norm = (0..rows)
            .map(|i| a[k * rows + i].powi(2))
            .sum::<f64>()
            .sqrt();
        for i in 0..rows {
            a[k * rows + i] /= norm;
        }
        for j in k + 1..cols {
            let r: f64 = (0..rows).map(|i| a[k * rows + i] * a[j * rows + i]).sum();
            for i in 0..rows {
                a[j * rows + i] -= r * a[k * rows + i];
            }
        }
    }
}

/// What one rank measured of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// From the barrier after the initial fill to the barrier after the last step.
    pub seconds: f64,
    /// This rank's page faults in that time.
    pub page_faults: u64,
    /// This rank's one-sided page reads in that time.
    pub remote_fetches: u64,
}

/// An MGS of a `rows` x `cols` matrix on the DSM (collective: every rank calls it).
pub struct Mgs<'a> {
    dsm: &'a Dsm,
    region: SharedRegion,
    rows: usize,
    cols: usize,
}

impl<'a> Mgs<'a> {
    /// Allocates the matrix's region and fills this rank's columns with [`matrix`]'s.
    pub fn new(dsm: &'a Dsm, rows: usize, cols: usize) -> Result<Mgs<'a>> {
        if rows == 0 || cols == 0 {
            return Err(DsmError::Config {
                what: "MGS matrix".into(),
                reason: format!("{rows} x {cols}: both must be at least 1"),
            });
        }
        let region = dsm.alloc(rows * cols * 8)?;
        let m = Mgs {
            dsm,
            region,
            rows,
            cols,
        };
        let init = matrix(rows, cols);
        let (size, r) = (dsm.size(), dsm.rank() as usize);
        for j in (0..cols).filter(|j| j % size == r) {
            for i in 0..rows {
                m.put(j, i, init[j * rows + i]);
            }
        }
        dsm.barrier()?;
        Ok(m)
    }

    fn at(&self, j: usize, i: usize) -> *mut f64 {
        debug_assert!(j < self.cols && i < self.rows);
        // SAFETY: j < cols and i < rows: inside the region's rows * cols doubles.
        unsafe { (self.region.as_ptr() as *mut f64).add(j * self.rows + i) }
    }

    /// Element (row `i`, column `j`).
    pub fn get(&self, j: usize, i: usize) -> f64 {
        // SAFETY: inside the region (see `at`); a column is written only by its rank
        // between barriers, and read by others only after the barrier that follows.
        unsafe { self.at(j, i).read() }
    }

    fn put(&self, j: usize, i: usize, v: f64) {
        // SAFETY: as in `get`; only column j's rank writes it.
        unsafe { self.at(j, i).write(v) }
    }

    /// Runs the factorization; `before_step(k)` is called by every rank before step `k`
    /// (outside the timed work's barriers: a caller may change the job there).
    pub fn run(&self, mut before_step: impl FnMut(usize) -> Result<()>) -> Result<Measured> {
        let (rows, cols) = (self.rows, self.cols);
        let (size, r) = (self.dsm.size(), self.dsm.rank() as usize);
        let before = self.dsm.stats();
        let start = Instant::now();
        for k in 0..cols {
            before_step(k)?;
            if k % size == r {
                let norm = (0..rows)
                    .map(|i| self.get(k, i).powi(2))
                    .sum::<f64>()
                    .sqrt();
                for i in 0..rows {
                    self.put(k, i, self.get(k, i) / norm);
                }
            }
            self.dsm.barrier()?;
            let q: Vec<f64> = (0..rows).map(|i| self.get(k, i)).collect();
            for j in (k + 1..cols).filter(|j| j % size == r) {
                let rkj: f64 = (0..rows).map(|i| q[i] * self.get(j, i)).sum();
                for (i, qi) in q.iter().enumerate() {
                    self.put(j, i, self.get(j, i) - rkj * qi);
                }
            }
        }
        self.dsm.barrier()?;
        let seconds = start.elapsed().as_secs_f64();
        let after = self.dsm.stats();
        Ok(Measured {
            seconds,
            page_faults: after.0 - before.0,
            remote_fetches: after.1 - before.1,
        })
    }

    /// The largest difference from a serial MGS of the same matrix (reads all of Q here).
    pub fn max_diff_from_serial(&self) -> f64 {
        let mut serial_q = matrix(self.rows, self.cols);
        serial(&mut serial_q, self.rows, self.cols);
        let mut max_diff = 0f64;
        for j in 0..self.cols {
            for i in 0..self.rows {
                max_diff = max_diff.max((self.get(j, i) - serial_q[j * self.rows + i]).abs());
            }
        }
        max_diff
    }

    /// ||Q^T Q - I|| (Frobenius; reads all of Q here).
    pub fn orthogonality(&self) -> f64 {
        let mut ortho = 0f64;
        for p in 0..self.cols {
            for q in 0..self.cols {
                let dot: f64 = (0..self.rows)
                    .map(|i| self.get(p, i) * self.get(q, i))
                    .sum();
                let want = if p == q { 1.0 } else { 0.0 };
                ortho += (dot - want).powi(2);
            }
        }
        ortho.sqrt()
    }

    /// Frees the matrix (collective).
    pub fn free(self) -> Result<()> {
        self.dsm.barrier()?;
        self.dsm.free(self.region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_mgs_gives_orthonormal_columns() {
        let (rows, cols) = (64, 12);
        let mut q = matrix(rows, cols);
        serial(&mut q, rows, cols);
        for p in 0..cols {
            for r in 0..cols {
                let dot: f64 = (0..rows).map(|i| q[p * rows + i] * q[r * rows + i]).sum();
                let want = if p == r { 1.0 } else { 0.0 };
                assert!(
                    (dot - want).abs() < 1e-12,
                    "column {p} . column {r} = {dot}"
                );
            }
        }
        assert_eq!(matrix(3, 2), matrix(3, 2), "deterministic");
    }
}
