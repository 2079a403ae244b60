/* textmem: 32 MiB of text-like memory (words drawn by a seeded xorshift; it
 * compresses well) that keeps changing: at tick t it rewrites page
 * (t * 7919) % NPAGES as version t + 1 and prints `tick t`. After `go` it replays
 * the ticks it counted to know the version of every page, regenerates each page
 * and compares it byte for byte.
 * Output: `ready pages=N`, `tick T`..., `OK ticks=T pages=N` / `FAIL ...`. */
#include "util.h"

#define NPAGES 8192
#define PAGE 4096

static const char *words[] = {"checkpoint", "restart", "memory", "page", "process", "thread",
                              "signal", "pipe", "socket", "kernel", "the", "a", "of", "and",
                              "to", "in", "is", "for", "simulation", "timestep", "residual",
                              "converged", "iteration", "mesh", "solver", "flux"};

static void gen(char *page, uint64_t index, uint64_t version) {
    uint64_t s = (index + 1) * 0x9E3779B97F4A7C15ULL ^ (version + 1) * 0xC2B2AE3D27D4EB4FULL;
    size_t n = 0;
    while (n < PAGE) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        const char *w = words[s % (sizeof words / sizeof *words)];
        size_t l = strlen(w);
        for (size_t i = 0; i < l && n < PAGE; i++) page[n++] = w[i];
        if (n < PAGE) page[n++] = (s >> 32) % 13 == 0 ? '\n' : ' ';
    }
}

int main(void) {
    setup();
    char *mem = malloc((size_t)NPAGES * PAGE);
    uint32_t *version = calloc(NPAGES, sizeof *version);
    if (!mem || !version) die("malloc");
    for (uint64_t p = 0; p < NPAGES; p++) gen(mem + p * PAGE, p, 0);
    out("ready pages=%d\n", NPAGES);
    uint64_t t = 0;
    while (!go_exists()) {
        uint64_t p = (t * 7919) % NPAGES;
        gen(mem + p * PAGE, p, t + 1);
        version[p] = (uint32_t)(t + 1);
        out("tick %llu\n", (unsigned long long)t);
        t++;
        sleep_ms(5);
    }
    uint32_t *replay = calloc(NPAGES, sizeof *replay);
    char *want = malloc(PAGE);
    if (!replay || !want) die("malloc");
    for (uint64_t k = 0; k < t; k++) replay[(k * 7919) % NPAGES] = (uint32_t)(k + 1);
    size_t bad = 0;
    for (uint64_t p = 0; p < NPAGES; p++) {
        CHECK(version[p] == replay[p], "page %llu: version %u, replay says %u", (unsigned long long)p,
              version[p], replay[p]);
        gen(want, p, replay[p]);
        if (memcmp(want, mem + p * PAGE, PAGE) != 0 && bad++ < 5)
            fail("page %llu (version %u) differs", (unsigned long long)p, replay[p]);
    }
    CHECK(bad == 0, "%zu pages differ", bad);
    finish("ticks=%llu pages=%d", (unsigned long long)t, NPAGES);
    return 0;
}
