/* Collective safepoints: rank 0 gets SIGUSR1 (checkpoint request) at iteration 3 and the
 * last rank SIGUSR2 (rollback request) at iteration 6; every rank calls krun_safepoint()
 * each iteration and must act at the same iteration as the others. Prints one line per rank:
 * "safepoint_check: rank R checkpointed at 3 rolled back at 6 to counter 3 final 9"
 * (with KRUN_SAFEPOINT_EVERY=1: every call is a round; else requests wait for the next
 * round and the iterations are those of the rounds).
 * SAFEPOINT_CHECK_ITERS (default 9), SAFEPOINT_CHECK_ROLLBACK_AT (default 6) and
 * SAFEPOINT_CHECK_SLEEP_US (default 0, the "compute" of each iteration) change the run. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include "krun.h"

int main(void) {
  if (krun_init() < 0) {
    fprintf(stderr, "safepoint_check: init: %s\n", krun_last_error());
    return 1;
  }
  int rank = krun_rank(), size = krun_size();
  long *counter = krun_alloc(4096);
  if (!counter || krun_register("counter", counter, 4096) < 0) {
    fprintf(stderr, "safepoint_check: rank %d: %s\n", rank, krun_last_error());
    return 1;
  }
  const char *e;
  int iters = (e = getenv("SAFEPOINT_CHECK_ITERS")) ? atoi(e) : 9;
  int rollback_at = (e = getenv("SAFEPOINT_CHECK_ROLLBACK_AT")) ? atoi(e) : 6;
  int sleep_us = (e = getenv("SAFEPOINT_CHECK_SLEEP_US")) ? atoi(e) : 0;
  int checkpointed_at = -1, rolled_back_at = -1;
  long restored_counter = -1;
  for (int it = 1; it <= iters; it++) {
    *counter = it;
    if (sleep_us > 0) usleep((useconds_t)sleep_us);
    if (it == 3 && rank == 0) raise(SIGUSR1);
    if (it == rollback_at && rank == size - 1) raise(SIGUSR2);
    int rc = krun_safepoint();
    if (rc < 0) {
      fprintf(stderr, "safepoint_check: rank %d: safepoint: %s\n", rank, krun_last_error());
      return 1;
    }
    if (rc == 1) checkpointed_at = it;
    if (rc == 2) {
      rolled_back_at = it;
      restored_counter = *counter;
      *counter = it; /* carry on from here */
    }
  }
  printf("safepoint_check: rank %d checkpointed at %d rolled back at %d to counter %ld final %ld\n",
         rank, checkpointed_at, rolled_back_at, restored_counter, *counter);
  return krun_finalize() < 0;
}
