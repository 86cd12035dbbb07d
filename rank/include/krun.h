/* krun rank library: what the ranks of a krun job link (-lkrun, target/<profile>/libkrun.so).
 *
 *   krun_init / krun_finalize        start and end the rank (collective)
 *   krun_rank / krun_size            who am I, how many are we
 *   krun_barrier                     through the fabric
 *   krun_send / krun_recv            tagged two-sided messages; receive from one rank or
 *                                    KRUN_ANY_SOURCE, with a tag or KRUN_ANY_TAG
 *   krun_win_*, krun_put, krun_get,  one-sided access to collectively allocated windows
 *   krun_fetch_add, krun_compare_swap
 *   krun_alloc, krun_register,       checkpoints (ghost native backend): register the memory
 *   krun_checkpoint, krun_safepoint  holding your state; checkpoint and safepoint are
 *                                    collective. Start with KRUN_GHOST_RESTORE=latest to resume
 *                                    from the newest version every rank holds.
 *   krun_dsm_*                       distributed shared memory: regions at the same address on
 *                                    every rank, a DSM lock and barrier (see below)
 *
 * Errors: functions return a negative KRUN_ERR_* code (pointers: NULL); krun_last_error()
 * says what went wrong in this thread, krun_strerror(code) describes a code.
 * Settings (environment): KRUN_RANK, KRUN_SIZE, KRUN_BOOTSTRAP (set by krun; without
 * KRUN_RANK the program is the single rank of a job of one), KRUN_FABRIC_* (provider, message
 * size, ...), KRUN_RECV_TIMEOUT_MS (default 300000, 0 = wait forever), KRUN_GHOST_DIR,
 * KRUN_GHOST_OWNER, KRUN_GHOST_FULL_EVERY, KRUN_GHOST_RESTORE, KRUN_NODE_SOCKET,
 * KRUN_DSM_FAULT_THREADS, KRUN_DSM_PREFETCH, KRUN_DSM_LOCATOR, KRUN_DSM_ONE_SIDED.
 * The libghost functions of krun_ghost.h (krun_ghost_*) are exported by libkrun.so too. */
#ifndef KRUN_H
#define KRUN_H
#include <stddef.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#define KRUN_ANY_SOURCE (-1)
#define KRUN_ANY_TAG (-1)
/* Largest user tag. */
#define KRUN_MAX_TAG ((1 << 26) - 1)

#define KRUN_ERR_NOT_INITIALIZED (-1)
#define KRUN_ERR_INVALID (-2)
#define KRUN_ERR_NO_SUCH_RANK (-3)
#define KRUN_ERR_BAD_TAG (-4)
#define KRUN_ERR_TRUNCATED (-5)
#define KRUN_ERR_TOO_LARGE (-6)
#define KRUN_ERR_OUT_OF_BOUNDS (-7)
#define KRUN_ERR_MISALIGNED (-8)
#define KRUN_ERR_UNKNOWN_WINDOW (-9)
#define KRUN_ERR_TIMEOUT (-10)
#define KRUN_ERR_FABRIC (-11)
#define KRUN_ERR_CHECKPOINT (-12)
#define KRUN_ERR_ENV (-13)
#define KRUN_ERR_NODE_LINK (-14)
#define KRUN_ERR_PROTOCOL (-15)
#define KRUN_ERR_PANIC (-16)
#define KRUN_ERR_ALREADY_INITIALIZED (-17)
/* The distributed shared memory's driver failed (a lost page, a peer's malformed message,
 * a collective the ranks disagree on); krun_last_error() says which. */
#define KRUN_ERR_DSM (-18)

typedef int64_t krun_win;
typedef struct {
  int source;
  int tag;
  size_t len;
} krun_status;

int krun_init(void);
int krun_finalize(void);
int krun_rank(void);
int krun_size(void);
int krun_barrier(void);

/* Returns 0 once buf may be reused (the data was handed to the fabric). */
int krun_send(int dest, int tag, const void *buf, size_t len);
/* Returns the message length. A message longer than cap fails with KRUN_ERR_TRUNCATED and
 * stays queued. status may be NULL. */
long krun_recv(int src, int tag, void *buf, size_t cap, krun_status *status);

/* Collective. *base: this rank's part (len bytes). An access has completed at the target
 * when the call returns; order accesses between ranks with krun_barrier. */
int krun_win_allocate(size_t len, void **base, krun_win *win);
int krun_win_free(krun_win win);
int krun_put(krun_win win, int target, size_t offset, const void *buf, size_t len);
int krun_get(krun_win win, int target, size_t offset, void *buf, size_t len);
/* 64-bit atomics on 8-byte aligned offsets; the previous value goes to *old (may be NULL). */
int krun_fetch_add(krun_win win, int target, size_t offset, uint64_t add, uint64_t *old);
int krun_compare_swap(krun_win win, int target, size_t offset, uint64_t compare, uint64_t swap,
                      uint64_t *old);

/* Page-aligned memory for krun_register; NULL on failure. Never freed. */
void *krun_alloc(size_t len);
/* 1: filled from the image being restored; 0: not. len is rounded up to whole pages
 * (krun_alloc maps whole pages). */
int krun_register(const char *name, void *addr, size_t len);
/* Collective. Returns the version, complete on every rank. Call where no message is in flight. */
long krun_checkpoint(void);
/* Collective. 0: nothing; 1: checkpointed (some rank got SIGUSR1); 2: rolled back to the
 * newest image (some rank got SIGUSR2): reload loop state from registered memory.
 * Every rank calls it the same number of times; the ranks agree on requests every 2^e-th
 * call only (e agreed among them: the agreement costs at most 1% of the time between calls
 * and a request waits at most ~200 ms); KRUN_SAFEPOINT_EVERY=1 agrees at every call. */
int krun_safepoint(void);
/* The version restored at start, 0 for a fresh start. */
long krun_restored_version(void);

/* Distributed shared memory (DSM).
 *
 * A region is len bytes (rounded up to 4 KiB pages) mapped at the same virtual address on
 * every rank; its pages read as zero until written. Ranks use it with ordinary loads and
 * stores: a page a rank has no copy of is fetched on first access (a userfaultfd fault
 * served by the DSM's threads), so pointers into a region mean the same on every rank.
 *
 * Coherence: sequential consistency, single writer / multiple readers (IVY). A page is
 * either writable on one rank or readable on several; before a write is allowed every other
 * copy is invalidated and acknowledged. Every rank sees all writes in one order consistent
 * with each rank's program order: krun_dsm_lock/unlock and krun_dsm_barrier only order ranks,
 * no flush is needed. Keep programs data-race free; a page written by several ranks in turn
 * moves at every turn (false sharing is correct but slow).
 *
 * What a fault costs: a read of a page whose owner this rank knows is a one-sided join and a
 * one-sided 4 KiB RMA read of the owner's copy (two fabric round trips, the owner's CPU not
 * involved); otherwise a message to the page's manager, forwarded to the owner, which sends
 * the page. A write fault goes through the manager to the owner, which invalidates every copy
 * (one round trip per sharer, in parallel) and hands the page over; the page's read owner
 * writing invalidates the other copies itself, without the manager. A sequential read miss
 * prefetches KRUN_DSM_PREFETCH (8) further pages. `bench -- dsm` measures these.
 *
 * Checkpoints: krun_checkpoint (and a checkpoint at a safepoint) captures the pages each rank
 * owns; a job started with KRUN_GHOST_RESTORE refills its regions when it allocates them again
 * (same order, same lengths); locks are all free after a restore (see rank/src/dsm.rs).
 *
 * Limits: KRUN_DSM_LOCKS locks; a page whose only copy
 * was on a dead rank is reported (KRUN_ERR_DSM), never zero-filled; needs userfaultfd with
 * write-protect (Linux >= 5.7, root or vm.unprivileged_userfaultfd=1). krun_finalize ends the
 * DSM collectively (a barrier, then its regions are unmapped). */
#define KRUN_DSM_LOCKS 64
/* Collective (every rank, same order, same len): *base gets the region's address. The first
 * call starts the DSM. */
int krun_dsm_alloc(size_t len, void **base);
/* Collective: unmaps the region that starts at base on every rank. */
int krun_dsm_free(void *base);
/* DSM lock id (0 <= id < KRUN_DSM_LOCKS), granted FIFO. KRUN_ERR_INVALID before the first
 * krun_dsm_alloc. */
int krun_dsm_lock(int id);
int krun_dsm_unlock(int id);
/* Collective: returns when every rank has reached it (reports a DSM driver error, if any). */
int krun_dsm_barrier(void);
/* This rank's counters: faults served, pages read one-sided, pages prefetched (NULL skips). */
int krun_dsm_stats(uint64_t *faults, uint64_t *remote_fetches, uint64_t *prefetched);

const char *krun_strerror(int code);
const char *krun_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
