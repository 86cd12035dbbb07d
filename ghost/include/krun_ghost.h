/* krun native checkpointer: register the memory that holds your program's state, call
 * krun_ghost_checkpoint() at consistent points (or krun_ghost_safepoint() to act on
 * SIGUSR1/SIGUSR2 requests), and start the program with KRUN_GHOST_RESTORE=latest to resume.
 * Link with -lghost (target/<profile>/libghost.so or .a). Errors: negative return values;
 * krun_ghost_last_error() says why. Settings: KRUN_GHOST_DIR (default /dev/shm/krun-ghost),
 * KRUN_GHOST_OWNER, KRUN_GHOST_FULL_EVERY (default 4), KRUN_GHOST_RESTORE (latest|VERSION). */
#ifndef KRUN_GHOST_H
#define KRUN_GHOST_H
#include <stddef.h>
#ifdef __cplusplus
extern "C" {
#endif

/* Returns the version restored from (0 on a fresh start) or -1. owner may be NULL. */
long krun_ghost_init(const char *owner);
/* Page-aligned private memory for krun_ghost_register; NULL on failure. Never freed. */
void *krun_ghost_alloc(size_t len);
/* 1: filled from the image being restored; 0: not; -1: error. */
int krun_ghost_register(const char *name, void *addr, size_t len);
/* Freezes registered memory (copy-on-write) and captures in the background; returns the version. */
long krun_ghost_checkpoint(void);
/* Waits for the capture in flight: its version, 0 if none, -1 if it failed. */
long krun_ghost_wait(void);
/* Rewrites the regions from an image (0: the newest); returns the version used. */
long krun_ghost_rollback(long version);
/* 0: nothing; 1: checkpoint started (SIGUSR1); 2: rolled back (SIGUSR2); -1: error. */
int krun_ghost_safepoint(void);
const char *krun_ghost_last_error(void);

#ifdef __cplusplus
}
#endif
#endif
