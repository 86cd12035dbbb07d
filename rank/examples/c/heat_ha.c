/* The heat stencil of heat.c with timing hooks, for `bench ha` and the HA tests:
 *   heat_ha NX NY STEPS
 * Same grid, update and checksum line as heat.c (so heat_serial is its reference); the state
 * per rank is its rows: (NX / ranks + 2) x NY doubles, so NX and NY set the checkpoint size.
 * It never checkpoints by itself: krund's policy (or SIGUSR1) does, at the safepoint after
 * every step. Lines it prints (times are CLOCK_REALTIME seconds, comparable across the
 * processes of one machine):
 *   heat_ha: rank R computing from step S at T     every rank, once it is wired and its state
 *                                                  is loaded: at start, after a restore as a
 *                                                  new process, after a rollback in place
 *   heat_ha: step S at T                           rank 0, after each step (HEAT_HA_TRACE=0
 *                                                  turns this off)
 *   heat_ha: loop S0..S1 in X s                    rank 0, the compute loop of this process
 *   heat NXxNY steps STEPS checksum C              rank 0, as heat.c
 * HEAT_STEP_DELAY_US=U sleeps U microseconds each step. */
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include "heat_common.h"
#include "krun.h"

#define TAG_UP 1
#define TAG_DOWN 2
#define TAG_SUM 3

#define CHECK(call)                                                                 \
  do {                                                                              \
    long rc_ = (call);                                                              \
    if (rc_ < 0) {                                                                  \
      fprintf(stderr, "heat_ha: rank %d: %s failed: %s\n", krun_rank(), #call,      \
              krun_last_error());                                                   \
      exit(1);                                                                      \
    }                                                                               \
  } while (0)

struct state {
  long step;
  long pad;
  double grid[];
};

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  long nx = heat_arg(argc, argv, 1, 64), ny = heat_arg(argc, argv, 2, 64);
  long steps = heat_arg(argc, argv, 3, 100);
  if (nx < 3 || ny < 3 || steps < 0) {
    fprintf(stderr, "usage: heat_ha NX NY STEPS (NX, NY >= 3)\n");
    return 2;
  }
  const char *delay = getenv("HEAT_STEP_DELAY_US");
  long delay_us = delay ? atol(delay) : 0;
  const char *trace_env = getenv("HEAT_HA_TRACE");
  int trace = !(trace_env && trace_env[0] == '0');
  if (krun_init() < 0) {
    fprintf(stderr, "heat_ha: krun_init failed: %s\n", krun_last_error());
    return 1;
  }
  int rank = krun_rank(), size = krun_size();
  if (nx < size) {
    fprintf(stderr, "heat_ha: %ld rows cannot be split across %d ranks\n", nx, size);
    return 2;
  }
  long rows = nx / size + (rank < nx % size ? 1 : 0);
  long lo = rank * (nx / size) + (rank < nx % size ? rank : nx % size);
  size_t bytes = sizeof(struct state) + sizeof(double) * (rows + 2) * ny;
  struct state *st = krun_alloc(bytes);
  if (!st) {
    fprintf(stderr, "heat_ha: krun_alloc failed: %s\n", krun_last_error());
    return 1;
  }
  int restored = krun_register("heat", st, bytes);
  CHECK(restored);
  double *u = st->grid;
#define U(r, j) u[(r) * ny + (j)]
  if (!restored) {
    st->step = 0;
    for (long r = 0; r < rows; r++)
      for (long j = 0; j < ny; j++) U(r + 1, j) = heat_initial(lo + r, j, nx, ny);
  }
  printf("heat_ha: rank %d computing from step %ld at %.6f\n", rank, st->step, now());
  fflush(stdout);
  double *next = malloc(sizeof(double) * rows * ny);
  if (!next) return 1;
  size_t row_bytes = sizeof(double) * ny;
  long first = st->step;
  double t0 = now();
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
    if (rank == 0 && trace) {
      printf("heat_ha: step %ld at %.6f\n", st->step, now());
      fflush(stdout);
    }
    int sp = krun_safepoint();
    CHECK(sp);
    if (sp == 2) {
      printf("heat_ha: rank %d computing from step %ld at %.6f\n", rank, st->step, now());
      fflush(stdout);
    }
  }
  if (rank == 0) printf("heat_ha: loop %ld..%ld in %.6f s\n", first, steps, now() - t0);
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
