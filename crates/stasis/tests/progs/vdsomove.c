/* vdsomove: a process that moved or unmapped its vdso/vvar (as some runtimes and
 * checkpointers do) and must find them as it left them after a restart.
 *   vdsomove move    mremap's the [vdso] (and, separately, [vvar]) elsewhere
 *   vdsomove unmap   munmap's [vdso] and every [vvar*]
 * Calls nothing that goes through the vdso afterwards (glibc keeps its own pointers
 * into it): time comes from syscall(SYS_clock_gettime).
 * Prints `ready vdso=ADDR` (0 when unmapped), then `tick N` every ~20 ms until `go`,
 * then checks that /proc/self/maps shows the special mappings where it put them (or
 * none) and that the raw clock still advances: `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <sys/mman.h>
#include <sys/syscall.h>

struct area {
    char name[32];
    unsigned long start, end;
};

static int specials(struct area *out, int cap) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) die("maps");
    char line[512];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        char name[256] = "";
        if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %255s", &s, &e, name) < 2) continue;
        if (strncmp(name, "[vdso]", 6) && strncmp(name, "[vvar", 5)) continue;
        if (n < cap) {
            snprintf(out[n].name, sizeof out[n].name, "%s", name);
            out[n].start = s;
            out[n].end = e;
        }
        n++;
    }
    fclose(f);
    return n;
}

static long raw_ms(void) {
    struct timespec ts;
    syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void raw_sleep(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    syscall(SYS_nanosleep, &ts, NULL);
}

int main(int argc, char **argv) {
    setup();
    const char *mode = argc > 1 ? argv[1] : "move";
    struct area a[8];
    int n = specials(a, 8);
    if (n < 1 || n > 8) die("no vdso");
    if (strcmp(mode, "move") == 0) {
        /* Each special mapping to a fresh spot of its own size, vvar pages and vdso
         * apart (mremap of the exact vma, as the kernel requires). */
        for (int i = 0; i < n; i++) {
            size_t len = a[i].end - a[i].start;
            void *spot = mmap(NULL, len + 0x200000, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (spot == MAP_FAILED) die("mmap spot");
            unsigned long to = ((unsigned long)spot + 0x100000) & ~0xfffUL;
            munmap(spot, len + 0x200000);
            void *r = (void *)syscall(SYS_mremap, a[i].start, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
            if (r != (void *)to) die("mremap of a special mapping");
        }
    } else if (strcmp(mode, "unmap") == 0) {
        for (int i = 0; i < n; i++)
            if (syscall(SYS_munmap, a[i].start, a[i].end - a[i].start)) die("munmap of a special mapping");
    } else {
        out("FAIL unknown mode %s\n", mode);
        return 2;
    }
    struct area before[8];
    int nb = specials(before, 8);
    unsigned long vdso = 0;
    for (int i = 0; i < nb; i++)
        if (strcmp(before[i].name, "[vdso]") == 0) vdso = before[i].start;
    out("ready vdso=%lx areas=%d\n", vdso, nb);
    unsigned long ticks = 0;
    long t0 = raw_ms();
    while (access("go", F_OK) != 0) {
        out("tick %lu\n", ticks++);
        raw_sleep(20);
    }
    struct area after[8];
    int na = specials(after, 8);
    CHECK(na == nb, "%d special mappings after the restart, %d before", na, nb);
    for (int i = 0; i < nb && i < na; i++)
        CHECK(strcmp(before[i].name, after[i].name) == 0 && before[i].start == after[i].start &&
                  before[i].end == after[i].end,
              "%s at %lx-%lx before, %s at %lx-%lx after", before[i].name, before[i].start, before[i].end,
              after[i].name, after[i].start, after[i].end);
    CHECK(raw_ms() >= t0, "the raw monotonic clock went backwards");
    if (g_failures) {
        out("FAIL %s\n", g_failbuf);
        return 1;
    }
    out("OK ticks=%lu\n", ticks);
    return 0;
}
