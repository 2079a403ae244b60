/* Benchmark workload: MiB of memory of a given kind, then idles until "go" exists.
 * kind: random | text | zero (mostly zero: 1 page in 64 written). With a third
 * argument P, when a file "change" appears it rewrites P percent of its pages
 * (spread over the whole area, for an incremental checkpoint) and prints "changed".
 * A fourth argument "huge" asks for transparent huge pages (MADV_HUGEPAGE). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <stdint.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
    size_t mib = strtoull(argv[1], 0, 10), n = mib << 20;
    const char *kind = argv[2];
    setvbuf(stdout, 0, _IONBF, 0);
    uint8_t *m = mmap(0, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 1;
    if (argc > 4 && !strcmp(argv[4], "huge")) madvise(m, n, MADV_HUGEPAGE);
    uint64_t x = 88172645463325252ull;
    static const char *words[] = {"the ", "checkpoint ", "of ", "a ", "process ", "restart ", "memory ", "node ", "job ", "\n"};
    if (!strcmp(kind, "random")) {
        for (size_t i = 0; i < n / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; ((uint64_t *)m)[i] = x; }
    } else if (!strcmp(kind, "text")) {
        size_t i = 0;
        while (i < n) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; const char *w = words[x % 10]; size_t l = strlen(w); if (i + l > n) l = n - i; memcpy(m + i, w, l); i += l; }
    } else {
        for (size_t i = 0; i < n; i += 64 * 4096) m[i] = 1;
    }
    printf("ready\n");
    int pct = argc > 3 ? atoi(argv[3]) : 0, changed = 0;
    while (access("go", 0)) {
        if (pct > 0 && !changed && access("change", 0) == 0) {
            size_t pages = n / 4096, every = 100 / pct;
            for (size_t p = 0; p < pages; p += every) m[p * 4096 + 17] ^= 0x5a;
            changed = 1;
            printf("changed\n");
        }
        usleep(10000);
    }
    return 0;
}
