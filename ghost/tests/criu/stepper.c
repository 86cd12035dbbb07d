/* An unmodified program for CRIU tests: stepper OUT MIB STEPS THREADS SLEEP_MS.
 * Each step, THREADS threads each rewrite a moving part of their slice of MIB MiB; then the
 * whole memory is checksummed and "step N checksum X" appended to OUT (opened once, kept open). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t *data, n, step;
static int threads;
static pthread_barrier_t start_b, end_b;

static void *worker(void *arg) {
    uint64_t t = (uint64_t)(uintptr_t)arg, slice = n / threads, lo = t * slice;
    for (;;) {
        pthread_barrier_wait(&start_b);
        uint64_t s = step, win = slice / 8, from = lo + (s % 8) * win;
        for (uint64_t i = from; i < from + win; i++) data[i] = data[i] * 6364136223846793005ull + s + t;
        pthread_barrier_wait(&end_b);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 6) return 2;
    FILE *out = fopen(argv[1], "a");
    if (!out) return 2;
    uint64_t bytes = strtoull(argv[2], 0, 10) << 20, steps = strtoull(argv[3], 0, 10);
    threads = atoi(argv[4]);
    long sleep_ms = atol(argv[5]);
    n = bytes / 8;
    data = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) return 3;
    for (uint64_t i = 0; i < n; i++) data[i] = i * 0x9E3779B97F4A7C15ull;
    pthread_barrier_init(&start_b, 0, threads + 1);
    pthread_barrier_init(&end_b, 0, threads + 1);
    for (int t = 0; t < threads; t++) {
        pthread_t th;
        pthread_create(&th, 0, worker, (void *)(uintptr_t)t);
    }
    for (step = 1; step <= steps; step++) {
        pthread_barrier_wait(&start_b);
        pthread_barrier_wait(&end_b);
        uint64_t h = 1469598103934665603ull;
        for (uint64_t i = 0; i < n; i++) h = (h ^ data[i]) * 1099511628211ull;
        fprintf(out, "step %llu checksum %016llx\n", (unsigned long long)step, (unsigned long long)h);
        fflush(out);
        if (sleep_ms) usleep(sleep_ms * 1000);
    }
    fprintf(out, "done\n");
    fflush(out);
    return 0;
}
