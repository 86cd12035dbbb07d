/* An unmodified program holding memory, for CRIU: holder MIB. Fills MIB MiB with a pattern,
 * prints "ready CHECKSUM", then sleeps until killed. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    uint64_t bytes = strtoull(argv[1], 0, 10) << 20, n = bytes / 8;
    uint64_t *d = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (d == MAP_FAILED) return 3;
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < n; i++) { d[i] = i * 0x9E3779B97F4A7C15ull; h = (h ^ d[i]) * 1099511628211ull; }
    printf("ready %016llx\n", (unsigned long long)h);
    fflush(stdout);
    for (;;) sleep(1);
}
