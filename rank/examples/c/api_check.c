/* Exercises the C API across ranks: any-source messages, put/get/atomics on a window, and
 * the errors of bad use. Prints "api_check: rank R ok" or fails naming the check. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "krun.h"

static int rank, size;

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      fprintf(stderr, "api_check: rank %d: ", rank);        \
      fprintf(stderr, __VA_ARGS__);                         \
      fprintf(stderr, " (last error: %s)\n", krun_last_error()); \
      exit(1);                                              \
    }                                                       \
  } while (0)

int main(void) {
  EXPECT(krun_rank() == KRUN_ERR_NOT_INITIALIZED, "krun_rank before init must fail");
  EXPECT(strstr(krun_last_error(), "not initialized"), "error names the cause");
  EXPECT(krun_init() == 0, "krun_init");
  rank = krun_rank();
  size = krun_size();

  /* Any source: every rank sends its number to rank 0, which must see each exactly once. */
  int mine = 1000 + rank;
  EXPECT(krun_send(0, 7, &mine, sizeof mine) == 0, "send to 0");
  if (rank == 0) {
    int seen[256] = {0};
    for (int i = 0; i < size; i++) {
      int v = 0;
      krun_status st;
      long n = krun_recv(KRUN_ANY_SOURCE, 7, &v, sizeof v, &st);
      EXPECT(n == sizeof v && st.len == sizeof v && st.tag == 7, "any-source recv %ld", n);
      EXPECT(v == 1000 + st.source, "payload %d matches source %d", v, st.source);
      seen[st.source]++;
    }
    for (int i = 0; i < size; i++) EXPECT(seen[i] == 1, "rank %d seen %d times", i, seen[i]);
  }

  /* Windows: put into the right neighbour, get from the left, count in on rank 0. */
  void *base;
  krun_win win;
  EXPECT(krun_win_allocate(4096, &base, &win) == 0, "win_allocate");
  uint64_t *words = base;
  int right = (rank + 1) % size, left = (rank + size - 1) % size;
  uint64_t token = 0xabc000 + rank;
  EXPECT(krun_put(win, right, 64, &token, sizeof token) == 0, "put");
  uint64_t old = 99;
  EXPECT(krun_fetch_add(win, 0, 0, 1, &old) == 0, "fetch_add");
  EXPECT(krun_barrier() == 0, "barrier");
  EXPECT(words[8] == 0xabc000 + (uint64_t)left, "put from the left arrived: %llx",
         (unsigned long long)words[8]);
  uint64_t got = 0;
  EXPECT(krun_get(win, left, 64, &got, sizeof got) == 0, "get");
  EXPECT(got == 0xabc000 + (uint64_t)((left + size - 1) % size), "get read %llx",
         (unsigned long long)got);
  if (rank == 0) EXPECT(words[0] == (uint64_t)size, "counter %llu", (unsigned long long)words[0]);
  /* Compare-swap: exactly one rank wins slot 2 of rank 0. */
  uint64_t prev = 7;
  EXPECT(krun_compare_swap(win, 0, 16, 0, 1 + rank, &prev) == 0, "compare_swap");
  int won = prev == 0;
  EXPECT(krun_barrier() == 0, "barrier");
  int wins = 0;
  EXPECT(krun_send(0, 8, &won, sizeof won) == 0, "send won");
  if (rank == 0) {
    for (int i = 0; i < size; i++) {
      int w;
      EXPECT(krun_recv(i, 8, &w, sizeof w, NULL) == sizeof w, "recv won");
      wins += w;
    }
    EXPECT(wins == 1, "%d ranks won the compare-swap", wins);
    EXPECT(words[2] >= 1 && words[2] <= (uint64_t)size, "slot holds a winner");
  }

  /* Bad use. */
  EXPECT(krun_send(size, 1, &mine, sizeof mine) == KRUN_ERR_NO_SUCH_RANK, "send to rank size");
  EXPECT(strstr(krun_last_error(), "does not exist"), "names the rank");
  EXPECT(krun_send(0, -5, &mine, sizeof mine) == KRUN_ERR_BAD_TAG, "negative tag");
  EXPECT(krun_put(win, right, 4090, &token, sizeof token) == KRUN_ERR_OUT_OF_BOUNDS, "put oob");
  EXPECT(strstr(krun_last_error(), "out of bounds"), "names the bounds");
  EXPECT(krun_get(win, size + 3, 0, &got, 8) == KRUN_ERR_NO_SUCH_RANK, "get from bad rank");
  EXPECT(krun_fetch_add(win, 0, 12, 1, NULL) == KRUN_ERR_MISALIGNED, "misaligned atomic");
  EXPECT(krun_put(win + 100, 0, 0, &token, 8) == KRUN_ERR_UNKNOWN_WINDOW, "unknown window");
  char big[64];
  memset(big, 'x', sizeof big);
  EXPECT(krun_send(rank, 9, big, sizeof big) == 0, "send to self");
  char small[8];
  EXPECT(krun_recv(rank, 9, small, sizeof small, NULL) == KRUN_ERR_TRUNCATED, "truncation");
  EXPECT(strstr(krun_last_error(), "64 bytes"), "names the length");
  EXPECT(krun_recv(rank, 9, big, sizeof big, NULL) == sizeof big, "message stayed queued");
  EXPECT(strcmp(krun_strerror(KRUN_ERR_TRUNCATED), "message larger than the receive buffer") == 0,
         "strerror");

  EXPECT(krun_barrier() == 0, "barrier");
  EXPECT(krun_win_free(win) == 0, "win_free");
  printf("api_check: rank %d ok\n", rank);
  EXPECT(krun_finalize() == 0, "finalize");
  return 0;
}
