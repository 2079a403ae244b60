/* forkadvice: memory a fork does not copy. Three 2 MiB anonymous areas of
 * pseudo-random data: one plain, one MADV_DONTFORK (absent from a child), one
 * MADV_WIPEONFORK (zero in a child). A checkpoint's copy-on-write snapshot is
 * such a child, so stasis must copy the last two while the process is frozen.
 * After `go` it checks every byte of the three areas and that the advice is
 * still in force (VmFlags `dc` and `wf` in /proc/self/smaps), answering pings
 * while it waits.
 * With argument `late` the areas start without advice (each between two
 * PROT_NONE pages, so that it is a mapping of its own) and the advice is given
 * to the whole mappings only once a file `advise` exists (prints `advised`):
 * the mappings keep their bounds, only their flags change.
 * Output: `ready plain=P dontfork=D wipeonfork=W`, then `OK` / `FAIL ...`. */
#include "util.h"
#include <sys/mman.h>

#define AREA (2UL << 20)

static void fill(uint64_t *p, uint64_t seed) {
    for (size_t i = 0; i < AREA / 8; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        p[i] = seed;
    }
}

static size_t mismatches(const uint64_t *p, uint64_t seed) {
    size_t bad = 0;
    for (size_t i = 0; i < AREA / 8; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        bad += p[i] != seed;
    }
    return bad;
}

/* Does the smaps entry starting at `addr` list VmFlags `flag`? */
static int has_flag(void *addr, const char *flag) {
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f) return 0;
    char line[512], want[32];
    snprintf(want, sizeof want, "%lx-", (unsigned long)addr);
    int in = 0, found = 0;
    while (fgets(line, sizeof line, f)) {
        if (strchr(line, '-') && strchr(line, ' ') && strchr(line, '-') < strchr(line, ' ') &&
            strncmp(line, "VmFlags", 7) != 0 && line[0] != ' ')
            in = strncmp(line, want, strlen(want)) == 0;
        if (in && strncmp(line, "VmFlags:", 8) == 0) {
            char pat[8];
            snprintf(pat, sizeof pat, " %s", flag);
            found = strstr(line, pat) != NULL;
            break;
        }
    }
    fclose(f);
    return found;
}

int main(int argc, char **argv) {
    setup();
    int late = argc > 1 && strcmp(argv[1], "late") == 0;
    const char *names[3] = {"plain", "dontfork", "wipeonfork"};
    const int advice[3] = {0, MADV_DONTFORK, MADV_WIPEONFORK};
    const uint64_t seeds[3] = {0x1234567, 0x89abcdef, 0x2468ace};
    uint64_t *area[3];
    long pg = sysconf(_SC_PAGESIZE);
    for (int k = 0; k < 3; k++) {
        char *m = mmap(NULL, AREA + 2 * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) die("mmap");
        area[k] = (uint64_t *)(m + pg);
        if (mprotect(area[k], AREA, PROT_READ | PROT_WRITE) != 0) die("mprotect");
        if (!late && advice[k] && madvise(area[k], AREA, advice[k]) != 0) die("madvise");
        fill(area[k], seeds[k]);
    }
    out("ready plain=%p dontfork=%p wipeonfork=%p\n", (void *)area[0], (void *)area[1], (void *)area[2]);
    if (late) {
        while (access("advise", F_OK) != 0) {
            answer_ping();
            sleep_ms(10);
        }
        for (int k = 1; k < 3; k++)
            if (madvise(area[k], AREA, advice[k]) != 0) die("madvise");
        out("advised\n");
    }
    wait_go();
    for (int k = 0; k < 3; k++) {
        size_t bad = mismatches(area[k], seeds[k]);
        CHECK(bad == 0, "%s area: %zu words differ", names[k], bad);
    }
    CHECK(has_flag(area[1], "dc"), "the dontfork area lost MADV_DONTFORK");
    CHECK(has_flag(area[2], "wf"), "the wipeonfork area lost MADV_WIPEONFORK");
    finish("areas=3");
    return 0;
}
