/* A program holding MIB MiB in memory registered with krun's native checkpointer; it
 * touches a little of it every 10 ms and serves checkpoint requests (SIGUSR1) at each
 * safepoint. Prints "ready" or "resumed VERSION", flushed. usage: native_holder MIB */
#include "krun_ghost.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    uint64_t bytes = strtoull(argv[1], 0, 10) << 20, n = bytes / 8;
    long restored = krun_ghost_init(NULL);
    if (restored < 0) { fprintf(stderr, "%s\n", krun_ghost_last_error()); return 2; }
    uint64_t *d = krun_ghost_alloc(bytes);
    if (!d || krun_ghost_register("data", d, bytes) < 0) { fprintf(stderr, "%s\n", krun_ghost_last_error()); return 2; }
    if (restored > 0) {
        printf("resumed %ld\n", restored);
    } else {
        for (uint64_t i = 0; i < n; i++) d[i] = i * 0x9E3779B97F4A7C15ull;
        printf("ready\n");
    }
    fflush(stdout);
    for (uint64_t t = 0;; t++) {
        d[(t * 4096 / 8) % n] += t;
        if (krun_ghost_safepoint() < 0) { fprintf(stderr, "%s\n", krun_ghost_last_error()); return 3; }
        usleep(10000);
    }
}
