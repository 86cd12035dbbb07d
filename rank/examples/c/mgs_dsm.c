/* Modified Gram-Schmidt on a matrix in distributed shared memory (the Gobelins evaluation's
 * application; dsm/src/bin/dsm-node.rs's `mgs` in Rust).
 *   krun -n N mgs_dsm [ROWS [COLS]]
 * The ROWS x COLS matrix (column-major) lives in one DSM region; column j belongs to rank
 * j % N. Step k: column k's rank normalizes it; after a barrier every rank reads column k
 * (page faults fetch it) and projects it out of its own columns j > k. Each rank counts the
 * columns it normalized into a shared counter under a DSM lock. Rank 0 then reads the whole
 * of Q and prints "mgs weighted W orthogonality O columns C" (compare W with
 * mgs_serial's).
 * Checkpoints: MGS_CHECKPOINT_AT=k takes a coordinated checkpoint (krun_checkpoint) after
 * step k, and MGS_STOP_AT=k makes every rank exit with code 3 after step k (a simulated
 * failure). Started again with KRUN_GHOST_RESTORE=latest, the ranks find their loop state
 * in registered memory and the matrix in the DSM as it was at the checkpoint, and go on
 * from there. */
#include <string.h>
#include <unistd.h>

#include "krun.h"
#include "mgs_common.h"

#define CHECK(call)                                                                      \
  do {                                                                                   \
    int rc_ = (call);                                                                    \
    if (rc_ < 0) {                                                                       \
      fprintf(stderr, "mgs_dsm: rank %d: %s failed: %s (%s)\n", krun_rank(), #call,      \
              krun_strerror(rc_), krun_last_error());                                    \
      exit(1);                                                                           \
    }                                                                                    \
  } while (0)

int main(int argc, char **argv) {
  long rows, cols;
  if (mgs_args(argc, argv, "mgs_dsm", &rows, &cols) < 0) return 2;
  if (krun_init() < 0) {
    fprintf(stderr, "mgs_dsm: krun_init failed: %s\n", krun_last_error());
    return 1;
  }
  int rank = krun_rank(), size = krun_size();
  const char *ckpt = getenv("MGS_CHECKPOINT_AT"), *stop = getenv("MGS_STOP_AT");
  long checkpoint_at = ckpt ? atol(ckpt) : -1, stop_at = stop ? atol(stop) : -1;
  /* The loop state (the next step) is registered for checkpoints when they are used. */
  long *next_step = NULL;
  int restored = 0;
  if (ckpt || getenv("KRUN_GHOST_RESTORE")) {
    next_step = krun_alloc(4096);
    if (!next_step) {
      fprintf(stderr, "mgs_dsm: krun_alloc failed: %s\n", krun_last_error());
      return 1;
    }
    restored = krun_register("mgs", next_step, 4096);
    CHECK(restored);
  }
  double *a = NULL;
  uint64_t *counter = NULL;
  CHECK(krun_dsm_alloc(sizeof(double) * rows * cols, (void **)&a));
  CHECK(krun_dsm_alloc(sizeof(uint64_t), (void **)&counter));
  /* Bad use is reported, not fatal. */
  if (krun_dsm_lock(KRUN_DSM_LOCKS) != KRUN_ERR_INVALID ||
      krun_dsm_free((char *)counter + 8) != KRUN_ERR_INVALID) {
    fprintf(stderr, "mgs_dsm: rank %d: bad DSM calls were not refused\n", rank);
    return 1;
  }
  printf("mgs_dsm: rank %d refused bad calls: %s\n", rank, krun_last_error());

  double *q = malloc(sizeof(double) * rows);
  if (!q) {
    fprintf(stderr, "mgs_dsm: out of memory\n");
    return 1;
  }
  long first = 0;
  if (restored) {
    first = *next_step;
    printf("mgs_dsm: rank %d restored version %ld at step %ld\n", rank, krun_restored_version(),
           first);
  } else {
    /* Each rank fills its own columns (the first touch makes it their owner). */
    double *init = malloc(sizeof(double) * rows * cols);
    if (!init) {
      fprintf(stderr, "mgs_dsm: out of memory\n");
      return 1;
    }
    mgs_matrix(init, rows, cols);
    for (long j = rank; j < cols; j += size)
      memcpy(&a[j * rows], &init[j * rows], sizeof(double) * rows);
    free(init);
  }
  CHECK(krun_dsm_barrier());

  for (long k = first; k < cols; k++) {
    if (k % size == rank) {
      mgs_normalize(&a[k * rows], rows);
      CHECK(krun_dsm_lock(0));
      *counter += 1;
      CHECK(krun_dsm_unlock(0));
    }
    CHECK(krun_dsm_barrier());
    /* One read of column k per step (a local copy, as a cache-friendly code would do). */
    memcpy(q, &a[k * rows], sizeof(double) * rows);
    for (long j = k + 1; j < cols; j++)
      if (j % size == rank) mgs_project_out(q, &a[j * rows], rows);
    if (next_step) *next_step = k + 1;
    if (k == checkpoint_at) {
      long v = krun_checkpoint();
      CHECK(v);
      if (rank == 0) printf("mgs_dsm: step %ld checkpointed as version %ld\n", k, v);
      fflush(stdout);
    }
    if (k == stop_at) {
      /* Every rank stops here (a rank still waiting for a page of a rank gone would wait
       * for good). */
      CHECK(krun_dsm_barrier());
      fflush(stdout);
      _exit(3);
    }
  }
  CHECK(krun_dsm_barrier());

  uint64_t faults = 0, fetches = 0;
  CHECK(krun_dsm_stats(&faults, &fetches, NULL));
  printf("mgs_dsm: rank %d faults %llu one_sided %llu\n", rank, (unsigned long long)faults,
         (unsigned long long)fetches);
  if (rank == 0) {
    double w, o;
    mgs_summary(a, rows, cols, &w, &o);
    printf("mgs weighted %.17g orthogonality %.3g columns %llu\n", w, o,
           (unsigned long long)*counter);
  }
  CHECK(krun_dsm_barrier());
  CHECK(krun_dsm_free(counter));
  CHECK(krun_dsm_free(a));
  free(q);
  CHECK(krun_finalize());
  return 0;
}
