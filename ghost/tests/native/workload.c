/* A program whose whole state lives in memory registered with krun's native checkpointer.
 * usage: workload OUT MIB STEPS CKPT_EVERY [STEP_SLEEP_MS]
 * Each step rewrites a moving eighth of the data, checksums all of it and appends
 * "step N checksum X" to OUT. Every CKPT_EVERY steps it checkpoints (copy-on-write, in the
 * background). SIGUSR1/SIGUSR2 requests are served at each step's safepoint. */
#include "krun_ghost.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct state {
    uint64_t step;
    uint64_t words;
};

static uint64_t checksum(const uint64_t *d, uint64_t n) {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < n; i++) h = (h ^ d[i]) * 1099511628211ull;
    return h;
}

static void die(const char *what) {
    fprintf(stderr, "workload: %s: %s\n", what, krun_ghost_last_error());
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: workload OUT MIB STEPS CKPT_EVERY [SLEEP_MS]\n"); return 2; }
    FILE *out = fopen(argv[1], "a");
    if (!out) { perror(argv[1]); return 2; }
    uint64_t bytes = strtoull(argv[2], 0, 10) << 20;
    uint64_t steps = strtoull(argv[3], 0, 10);
    uint64_t every = strtoull(argv[4], 0, 10);
    long sleep_ms = argc > 5 ? atol(argv[5]) : 0;

    long restored = krun_ghost_init(NULL);
    if (restored < 0) die("init");
    struct state *st = krun_ghost_alloc(4096);
    uint64_t *data = krun_ghost_alloc(bytes);
    if (!st || !data) die("alloc");
    int r1 = krun_ghost_register("state", st, 4096);
    int r2 = krun_ghost_register("data", data, bytes);
    if (r1 < 0 || r2 < 0) die("register");
    uint64_t n = bytes / 8;
    if (restored > 0) {
        if (!r1 || !r2 || st->words != n) { fprintf(stderr, "workload: restore mismatch\n"); return 3; }
        fprintf(out, "resumed version %ld step %llu\n", restored, (unsigned long long)st->step);
    } else {
        for (uint64_t i = 0; i < n; i++) data[i] = i * 0x9E3779B97F4A7C15ull;
        st->step = 0;
        st->words = n;
    }
    fflush(out);
    while (st->step < steps) {
        uint64_t s = st->step + 1;
        uint64_t win = n / 8, from = (s % 8) * win;
        for (uint64_t i = from; i < from + win; i++) data[i] = data[i] * 6364136223846793005ull + s;
        uint64_t c = checksum(data, n);
        st->step = s;
        fprintf(out, "step %llu checksum %016llx\n", (unsigned long long)s, (unsigned long long)c);
        fflush(out);
        if (every && s % every == 0) {
            long prev = krun_ghost_wait();
            if (prev < 0) die("wait");
            if (prev > 0) { fprintf(out, "saved version %ld\n", prev); fflush(out); }
            if (krun_ghost_checkpoint() < 0) die("checkpoint");
        }
        int sp = krun_ghost_safepoint();
        if (sp < 0) die("safepoint");
        if (sp == 2) {
            fprintf(out, "rolled back to step %llu\n", (unsigned long long)st->step);
            fflush(out);
        }
        if (sleep_ms) usleep(sleep_ms * 1000);
    }
    long last = krun_ghost_wait();
    if (last < 0) die("final wait");
    if (last > 0) fprintf(out, "saved version %ld\n", last);
    fprintf(out, "done\n");
    fclose(out);
    return 0;
}
