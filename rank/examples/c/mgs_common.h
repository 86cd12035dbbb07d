/* What mgs_dsm.c and mgs_serial.c share: the test matrix, the two steps of Modified
 * Gram-Schmidt on one column, and the summaries both print, so that both compute the same
 * numbers in the same order (the same as dsm/src/bin/dsm-node.rs's `mgs`).
 * Matrices are column-major: column j is a[j * rows .. j * rows + rows). */
#ifndef MGS_COMMON_H
#define MGS_COMMON_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Deterministic pseudo-random entries in [-0.5, 0.5) (splitmix64), column-major. */
static inline void mgs_matrix(double *a, long rows, long cols) {
  uint64_t x = 0x12345678ULL;
  for (long k = 0; k < rows * cols; k++) {
    x += 0x9E3779B97F4A7C15ULL;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    a[k] = (double)(z >> 11) / (double)(1ULL << 53) - 0.5;
  }
}

/* q /= ||q||. */
static inline void mgs_normalize(double *q, long rows) {
  double s = 0.0;
  for (long i = 0; i < rows; i++) s += q[i] * q[i];
  double norm = sqrt(s);
  for (long i = 0; i < rows; i++) q[i] /= norm;
}

/* a -= (q . a) q. */
static inline void mgs_project_out(const double *q, double *a, long rows) {
  double r = 0.0;
  for (long i = 0; i < rows; i++) r += q[i] * a[i];
  for (long i = 0; i < rows; i++) a[i] -= r * q[i];
}

/* A weighted sum of Q's entries (sensitive to each column's place and sign) and
 * ||Q^T Q - I||_F. */
static inline void mgs_summary(const double *q, long rows, long cols, double *weighted,
                               double *orthogonality) {
  double w = 0.0, o = 0.0;
  for (long j = 0; j < cols; j++)
    for (long i = 0; i < rows; i++)
      w += q[j * rows + i] * (double)(1 + (i * 31 + j * 17) % 101) / 101.0;
  for (long p = 0; p < cols; p++)
    for (long r = 0; r < cols; r++) {
      double d = 0.0;
      for (long i = 0; i < rows; i++) d += q[p * rows + i] * q[r * rows + i];
      d -= p == r ? 1.0 : 0.0;
      o += d * d;
    }
  *weighted = w;
  *orthogonality = sqrt(o);
}

static inline int mgs_args(int argc, char **argv, const char *prog, long *rows, long *cols) {
  *rows = argc > 1 ? atol(argv[1]) : 1024;
  *cols = argc > 2 ? atol(argv[2]) : 64;
  if (*rows < 1 || *cols < 1 || *cols > *rows) {
    fprintf(stderr, "usage: %s [ROWS [COLS]] (1 <= COLS <= ROWS)\n", prog);
    return -1;
  }
  return 0;
}
#endif
