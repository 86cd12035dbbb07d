/* What heat.c and heat_serial.c share: the initial grid, the update of one cell and the
 * checksum, so that both compute bitwise the same numbers. */
#ifndef HEAT_COMMON_H
#define HEAT_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HEAT_ALPHA 0.1

/* Initial temperature of global cell (i, j) of an nx x ny grid; the border stays fixed. */
static inline double heat_initial(long i, long j, long nx, long ny) {
  if (i == 0) return 100.0;
  if (i == nx - 1) return 0.0;
  if (j == 0) return 25.0;
  if (j == ny - 1) return 75.0;
  return (double)((i * 7 + j * 3) % 11);
}

/* One explicit step of the 5-point stencil for one interior cell. */
static inline double heat_update(double c, double n, double s, double w, double e) {
  return c + HEAT_ALPHA * ((((n + s) + w) + e) - 4.0 * c);
}

/* FNV-1a of one row's bytes, weighted by its global index: a checksum of the grid that
 * does not depend on how rows are split (sum of row terms, wrapping). */
static inline uint64_t heat_row_term(const double *row, long ny, long global_row) {
  const unsigned char *p = (const unsigned char *)row;
  uint64_t h = 1469598103934665603ULL;
  for (size_t k = 0; k < (size_t)ny * sizeof(double); k++) {
    h ^= p[k];
    h *= 1099511628211ULL;
  }
  return h * (uint64_t)(global_row + 1);
}

static inline long heat_arg(int argc, char **argv, int i, long dflt) {
  if (argc <= i) return dflt;
  char *end;
  long v = strtol(argv[i], &end, 10);
  return (*end || v < 0) ? -1 : v;
}
#endif
