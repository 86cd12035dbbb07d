/* The heat stencil of ../c/heat.c written with MPI, checkpointed through the krun rank
 * library at an application-chosen consistent point (as SCR users do):
 *   heat_mpi NX NY STEPS
 * Rows are split across ranks; each step exchanges halo rows with MPI_Sendrecv, then
 * MPI_Barrier (no message in flight) and krun_safepoint(): krun's coordinated policy
 * (`--checkpoint-interval`) checkpoints the registered state there. The state (step and
 * rows) lives in memory from krun_alloc registered with krun_register, so a rank restarted
 * from a checkpoint (KRUN_GHOST_RESTORE, set by krun's recovery) resumes at its step; every
 * rank of an MPI job is restarted as a new process and MPI wires up afresh.
 * Prints, from rank 0, the same checksum line as heat.c and heat_serial.c:
 *   heat NXxNY steps STEPS checksum C
 * and from every rank "heat_mpi: rank R of N computing from step S" once wired.
 * HEAT_STEP_DELAY_US=U sleeps U microseconds each step. */
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>
#include "../c/heat_common.h"
#include "krun.h"

#define CHECK(call)                                                                 \
  do {                                                                              \
    long rc_ = (call);                                                              \
    if (rc_ < 0) {                                                                  \
      fprintf(stderr, "heat_mpi: rank %d: %s failed: %s\n", rank, #call,            \
              krun_last_error());                                                   \
      MPI_Abort(MPI_COMM_WORLD, 3);                                                 \
    }                                                                               \
  } while (0)

struct state {
  long step;
  long pad;
  double grid[];
};

int main(int argc, char **argv) {
  int rank = -1, size = 0;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  long nx = heat_arg(argc, argv, 1, 64), ny = heat_arg(argc, argv, 2, 64);
  long steps = heat_arg(argc, argv, 3, 100);
  if (nx < 3 || ny < 3 || steps < 0 || nx < size) {
    if (rank == 0) fprintf(stderr, "usage: heat_mpi NX NY STEPS (NX >= ranks, NX, NY >= 3)\n");
    MPI_Finalize();
    return 2;
  }
  const char *delay = getenv("HEAT_STEP_DELAY_US");
  long delay_us = delay ? atol(delay) : 0;
  CHECK(krun_init());
  if (krun_rank() != rank || krun_size() != size) {
    fprintf(stderr, "heat_mpi: MPI rank %d of %d is krun rank %d of %d\n", rank, size,
            krun_rank(), krun_size());
    MPI_Abort(MPI_COMM_WORLD, 4);
  }
  long rows = nx / size + (rank < nx % size ? 1 : 0);
  long lo = rank * (nx / size) + (rank < nx % size ? rank : nx % size);
  size_t bytes = sizeof(struct state) + sizeof(double) * (rows + 2) * ny;
  struct state *st = krun_alloc(bytes);
  if (!st) CHECK(-1);
  int restored = krun_register("heat_mpi", st, bytes);
  CHECK(restored);
  double *u = st->grid;
#define U(r, j) u[(r) * ny + (j)]
  if (restored) {
    printf("heat_mpi: rank %d restored version %ld at step %ld\n", rank,
           krun_restored_version(), st->step);
  } else {
    st->step = 0;
    for (long r = 0; r < rows; r++)
      for (long j = 0; j < ny; j++) U(r + 1, j) = heat_initial(lo + r, j, nx, ny);
  }
  printf("heat_mpi: rank %d of %d computing from step %ld\n", rank, size, st->step);
  fflush(stdout);
  double *next = malloc(sizeof(double) * rows * ny);
  if (!next) MPI_Abort(MPI_COMM_WORLD, 1);
  int up = rank > 0 ? rank - 1 : MPI_PROC_NULL;
  int down = rank < size - 1 ? rank + 1 : MPI_PROC_NULL;
  while (st->step < steps) {
    MPI_Sendrecv(&U(1, 0), (int)ny, MPI_DOUBLE, up, 1, &U(rows + 1, 0), (int)ny, MPI_DOUBLE,
                 down, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Sendrecv(&U(rows, 0), (int)ny, MPI_DOUBLE, down, 2, &U(0, 0), (int)ny, MPI_DOUBLE, up,
                 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
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
    /* The application's consistent point: no MPI message in flight. */
    MPI_Barrier(MPI_COMM_WORLD);
    int sp = krun_safepoint();
    CHECK(sp);
    if (sp == 1 && rank == 0) printf("heat_mpi: step %ld checkpointed\n", st->step);
  }
  uint64_t part = 0, sum = 0;
  for (long r = 0; r < rows; r++) part += heat_row_term(&U(r + 1, 0), ny, lo + r);
  MPI_Reduce(&part, &sum, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rank == 0)
    printf("heat %ldx%ld steps %ld checksum %016llx\n", nx, ny, steps, (unsigned long long)sum);
  free(next);
  CHECK(krun_finalize());
  MPI_Finalize();
  return 0;
}
