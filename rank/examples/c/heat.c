/* 2-D heat stencil on krun: heat NX NY STEPS [CHECKPOINT_EVERY]
 * Rows are split across ranks; each step exchanges halo rows with krun_send/krun_recv;
 * every CHECKPOINT_EVERY steps the grid is checkpointed through the library. Started with
 * KRUN_GHOST_RESTORE=latest it resumes from the newest checkpoint. Rank 0 prints a checksum
 * of the final grid, equal to heat_serial's for the same NX NY STEPS.
 * HEAT_CRASH_AT=S makes every rank SIGKILL itself after step S (for restart tests);
 * HEAT_STEP_DELAY_US=U sleeps U microseconds each step (a longer run for failure tests). */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include "heat_common.h"
#include "krun.h"

#define TAG_UP 1   /* a row sent to the rank above */
#define TAG_DOWN 2 /* a row sent to the rank below */
#define TAG_SUM 3

#define CHECK(call)                                                                 \
  do {                                                                              \
    long rc_ = (call);                                                              \
    if (rc_ < 0) {                                                                  \
      fprintf(stderr, "heat: rank %d: %s failed: %s\n", krun_rank(), #call,         \
              krun_last_error());                                                   \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

struct state {
  long step;
  long pad;
  double grid[]; /* (rows + 2) x ny, with one halo row above and below */
};

int main(int argc, char **argv) {
  long nx = heat_arg(argc, argv, 1, 64), ny = heat_arg(argc, argv, 2, 64);
  long steps = heat_arg(argc, argv, 3, 100), every = heat_arg(argc, argv, 4, 0);
  if (nx < 3 || ny < 3 || steps < 0 || every < 0) {
    fprintf(stderr, "usage: heat NX NY STEPS [CHECKPOINT_EVERY] (NX, NY >= 3)\n");
    return 2;
  }
  const char *crash = getenv("HEAT_CRASH_AT");
  long crash_at = crash ? atol(crash) : -1;
  const char *delay = getenv("HEAT_STEP_DELAY_US");
  long delay_us = delay ? atol(delay) : 0;
  if (krun_init() < 0) {
    fprintf(stderr, "heat: krun_init failed: %s\n", krun_last_error());
    return 1;
  }
  int rank = krun_rank(), size = krun_size();
  if (nx < size) {
    fprintf(stderr, "heat: %ld rows cannot be split across %d ranks\n", nx, size);
    return 2;
  }
  long rows = nx / size + (rank < nx % size ? 1 : 0);
  long lo = rank * (nx / size) + (rank < nx % size ? rank : nx % size);
  size_t bytes = sizeof(struct state) + sizeof(double) * (rows + 2) * ny;
  struct state *st = krun_alloc(bytes);
  if (!st) {
    fprintf(stderr, "heat: krun_alloc failed: %s\n", krun_last_error());
    return 1;
  }
  int restored = krun_register("heat", st, bytes);
  CHECK(restored);
  double *u = st->grid;
#define U(r, j) u[(r) * ny + (j)]
  if (restored) {
    printf("heat: rank %d restored version %ld at step %ld\n", rank, krun_restored_version(),
           st->step);
  } else {
    st->step = 0;
    for (long r = 0; r < rows; r++)
      for (long j = 0; j < ny; j++) U(r + 1, j) = heat_initial(lo + r, j, nx, ny);
  }
  double *next = malloc(sizeof(double) * rows * ny);
  if (!next) return 1;
  size_t row_bytes = sizeof(double) * ny;
  while (st->step < steps) {
    if (rank > 0) CHECK(krun_send(rank - 1, TAG_UP, &U(1, 0), row_bytes));
    if (rank < size - 1) CHECK(krun_send(rank + 1, TAG_DOWN, &U(rows, 0), row_bytes));
    if (rank > 0) CHECK(krun_recv(rank - 1, TAG_DOWN, &U(0, 0), row_bytes, NULL));
    if (rank < size - 1) CHECK(krun_recv(rank + 1, TAG_UP, &U(rows + 1, 0), row_bytes, NULL));
    for (long r = 1; r <= rows; r++) {
      long g = lo + r - 1;
      for (long j = 0; j < ny; j++) {
        double c = U(r, j);
        if (g == 0 || g == nx - 1 || j == 0 || j == ny - 1)
          next[(r - 1) * ny + j] = c;
        else
          next[(r - 1) * ny + j] =
              heat_update(c, U(r - 1, j), U(r + 1, j), U(r, j - 1), U(r, j + 1));
      }
    }
    memcpy(&U(1, 0), next, sizeof(double) * rows * ny);
    st->step++;
    if (delay_us > 0) usleep((useconds_t)delay_us);
    /* A safepoint every step: krund's policy (or a SIGUSR1) may checkpoint here. */
    int sp = krun_safepoint();
    CHECK(sp);
    if (sp == 1 && rank == 0) printf("heat: step %ld checkpointed at a safepoint\n", st->step);
    if (every > 0 && st->step % every == 0 && st->step < steps) {
      long v = krun_checkpoint();
      CHECK(v);
      if (rank == 0) printf("heat: step %ld checkpointed as version %ld\n", st->step, v);
    }
    if (st->step == crash_at) {
      fflush(stdout);
      kill(getpid(), SIGKILL);
    }
  }
  uint64_t sum = 0;
  for (long r = 0; r < rows; r++) sum += heat_row_term(&U(r + 1, 0), ny, lo + r);
  if (rank == 0) {
    for (int src = 1; src < size; src++) {
      uint64_t part;
      CHECK(krun_recv(src, TAG_SUM, &part, sizeof part, NULL));
      sum += part;
    }
    printf("heat %ldx%ld steps %ld checksum %016llx\n", nx, ny, steps, (unsigned long long)sum);
  } else {
    CHECK(krun_send(0, TAG_SUM, &sum, sizeof sum));
  }
  CHECK(krun_finalize());
  return 0;
}
