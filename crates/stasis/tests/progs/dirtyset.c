/* dirtyset [MiB]: memory that changes a little between checkpoints, in every way a
 * page can change. A 32 MiB (or MiB) anonymous area of pseudo-random pages, each page's
 * content derived from its index and a generation kept in a table (generation
 * 0 means the page must read as zeros), and a separate 2 MiB area (its own
 * mapping, between two PROT_NONE pages).
 * Each time a file `step-N` appears (N = 1, 2, ...) it changes step N's pages:
 *   - rewrites every 97th page (shifted by N) with a new generation,
 *   - discards every 89th page (shifted by N) with MADV_DONTNEED (zeros now),
 *   - writes a page that was discarded by the previous step (populated again),
 * and prints `stepped N`. When a file `advise` appears it gives MADV_DONTFORK
 * to the whole 2 MiB mapping (its bounds stay the same) and prints `advised`.
 * After `go` it checks every byte of both areas against the table, and that
 * the advice is in force if it was given; it answers pings while it waits.
 * Output: `ready`, then `OK pages=P steps=S advised=A` / `FAIL ...`. */
#include "util.h"
#include <sys/mman.h>

static size_t AREA = 32UL << 20;
#define SMALL (2UL << 20)
#define PAGE 4096UL
static size_t NPAGES;
static uint32_t *gen;

static void fill_page(uint64_t *p, size_t idx, uint32_t g) {
    uint64_t x = 0x9e3779b97f4a7c15ULL * (idx + 1) ^ ((uint64_t)g << 32 | 0x5bd1e995);
    for (size_t i = 0; i < PAGE / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = x;
    }
}

static int page_ok(const uint64_t *p, size_t idx, uint32_t g) {
    if (g == 0) {
        for (size_t i = 0; i < PAGE / 8; i++)
            if (p[i]) return 0;
        return 1;
    }
    uint64_t want[PAGE / 8];
    fill_page(want, idx, g);
    return memcmp(p, want, PAGE) == 0;
}

/* Does the smaps entry starting at `addr` list VmFlags `flag`? */
static int has_flag(void *addr, const char *flag) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[512], want[32], pat[8];
    snprintf(want, sizeof want, "%lx-", (unsigned long)addr);
    snprintf(pat, sizeof pat, " %s", flag);
    int in = 0, found = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "VmFlags:", 8) == 0) {
            if (in) { found = strstr(line, pat) != NULL; break; }
            continue;
        }
        if (line[0] != ' ' && strchr(line, '-')) in = strncmp(line, want, strlen(want)) == 0;
    }
    fclose(f);
    return found;
}

int main(int argc, char **argv) {
    setup();
    if (argc > 1) AREA = (size_t)atol(argv[1]) << 20;
    NPAGES = AREA / PAGE;
    gen = calloc(NPAGES, sizeof *gen);
    if (!gen) die("calloc");
    char *area = mmap(NULL, AREA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *guarded = mmap(NULL, SMALL + 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED || guarded == MAP_FAILED) die("mmap");
    char *small = guarded + PAGE;
    if (mprotect(small, SMALL, PROT_READ | PROT_WRITE) != 0) die("mprotect");
    for (size_t i = 0; i < NPAGES; i++) {
        gen[i] = 1;
        fill_page((uint64_t *)(area + i * PAGE), i, 1);
    }
    for (size_t i = 0; i < SMALL / PAGE; i++) fill_page((uint64_t *)(small + i * PAGE), i, 7);
    out("ready\n");
    int steps = 0, advised = 0;
    size_t last_discarded = 0;
    while (access("go", F_OK) != 0) {
        char name[32];
        snprintf(name, sizeof name, "step-%d", steps + 1);
        if (access(name, F_OK) == 0) {
            steps++;
            for (size_t i = (size_t)steps; i < NPAGES; i += 97) {
                gen[i]++;
                if (gen[i] == 1) gen[i] = 2; /* a discarded page comes back */
                fill_page((uint64_t *)(area + i * PAGE), i, gen[i]);
            }
            if (last_discarded) {
                gen[last_discarded] = 100 + (uint32_t)steps;
                fill_page((uint64_t *)(area + last_discarded * PAGE), last_discarded, gen[last_discarded]);
            }
            for (size_t i = 3 + (size_t)steps; i < NPAGES; i += 89) {
                if (madvise(area + i * PAGE, PAGE, MADV_DONTNEED) != 0) die("madvise");
                gen[i] = 0;
                last_discarded = i;
            }
            out("stepped %d\n", steps);
        }
        if (!advised && access("advise", F_OK) == 0) {
            if (madvise(small, SMALL, MADV_DONTFORK) != 0) die("madvise");
            advised = 1;
            out("advised\n");
        }
        answer_ping();
        sleep_ms(5);
    }
    size_t bad = 0;
    for (size_t i = 0; i < NPAGES; i++) bad += !page_ok((uint64_t *)(area + i * PAGE), i, gen[i]);
    CHECK(bad == 0, "%zu of %zu pages differ", bad, NPAGES);
    size_t bad_small = 0;
    for (size_t i = 0; i < SMALL / PAGE; i++) bad_small += !page_ok((uint64_t *)(small + i * PAGE), i, 7);
    CHECK(bad_small == 0, "%zu pages of the small area differ", bad_small);
    CHECK(!advised || has_flag(small, "dc"), "the small area lost MADV_DONTFORK");
    finish("pages=%zu steps=%d advised=%d", NPAGES, steps, advised);
    return 0;
}
