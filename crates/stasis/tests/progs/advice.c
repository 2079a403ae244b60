/* advice: per-mapping advice and locks that /proc/self/smaps shows in VmFlags,
 * and file mappings whose protection differs from their file's open mode.
 * Anonymous areas of 4 pages of pseudo-random data, each between PROT_NONE pages
 * (a mapping of its own), given: MADV_HUGEPAGE (hg), MADV_NOHUGEPAGE (nh),
 * MADV_DONTDUMP (dd), MADV_DONTFORK (dc), MADV_WIPEONFORK (wf), MADV_MERGEABLE
 * (mg), MADV_SEQUENTIAL (sr), MADV_RANDOM (rr), mlock (lo), mlock2(MLOCK_ONFAULT)
 * (lo, and lf where the kernel shows it), nothing, and dontdump+random+mergeable
 * together. Advice the kernel refuses (THP or KSM not built in) is left out.
 * A file `ro` opened O_RDONLY is mapped MAP_SHARED PROT_READ and then mprotect'ed
 * to PROT_READ|PROT_EXEC, and MAP_PRIVATE PROT_READ|PROT_WRITE (written to: its
 * own copy). With argument `future`, mlockall(MCL_FUTURE) is in force too; with
 * `future-onfault`, mlockall(MCL_FUTURE|MCL_ONFAULT).
 * Prints `ready pid=P areas=N mlock=A onfault=B` (the two
 * locked areas), then `tick N` every ~20 ms until `go` exists
 * (answering `ping`), then checks each area's content and that its VmFlags (of
 * rd wr ex sh hg nh dd dc wf mg sr rr lo lf) are those it had before, the file
 * mappings' content and permissions, and with `future` that a new mapping is
 * locked (on fault: `lf` too, only with `future-onfault`). Output: `OK ...` / `FAIL ...`.
 * With argument `overlimit`, RLIMIT_MEMLOCK is lowered to one page once the areas
 * are locked (they stay locked): more is locked than the limit allows, which a
 * restore could not lock again. */
#include <sys/resource.h>
#include "util.h"
#include <sys/mman.h>
#include <sys/syscall.h>

#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif
#ifndef MCL_ONFAULT
#define MCL_ONFAULT 4
#endif

#define PAGES 4
enum { HG, NH, DD, DC, WF, MG, SR, RR, LO, LF, PLAIN, COMBO, NAREA };
static const char *names[NAREA] = {"hugepage", "nohugepage", "dontdump", "dontfork",
                                   "wipeonfork", "mergeable", "sequential", "random",
                                   "mlock", "mlock-onfault", "plain", "combo"};
static const char *watched[] = {"rd", "wr", "ex", "sh", "hg", "nh", "dd", "dc",
                                "wf", "mg", "sr", "rr", "lo", "lf"};
static long pg;

static void fill(uint64_t *p, uint64_t seed) {
    for (size_t i = 0; i < PAGES * (size_t)pg / 8; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        p[i] = seed;
    }
}

static size_t mismatches(const uint64_t *p, uint64_t seed) {
    size_t bad = 0;
    for (size_t i = 0; i < PAGES * (size_t)pg / 8; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        bad += p[i] != seed;
    }
    return bad;
}

/* The watched VmFlags of the smaps entry starting at `addr`, space separated
 * ("?" when there is no such entry). */
static void flags_of(void *addr, char *res, size_t cap) {
    snprintf(res, cap, "?");
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f) return;
    char line[1024], want[32];
    snprintf(want, sizeof want, "%lx-", (unsigned long)addr);
    int in = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "VmFlags:", 8) == 0) {
            if (!in) continue;
            res[0] = 0;
            size_t len = 0;
            for (size_t i = 0; i < sizeof watched / sizeof watched[0]; i++) {
                char pat[8];
                snprintf(pat, sizeof pat, " %s", watched[i]);
                char *s = strstr(line + 8, pat);
                if (s && (s[3] == ' ' || s[3] == '\n'))
                    len += (size_t)snprintf(res + len, cap - len, "%s ", watched[i]);
            }
            break;
        }
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2) in = strncmp(line, want, strlen(want)) == 0;
    }
    fclose(f);
}

int main(int argc, char **argv) {
    setup();
    int onfault = argc > 1 && strcmp(argv[1], "future-onfault") == 0;
    int future = onfault || (argc > 1 && strcmp(argv[1], "future") == 0);
    pg = sysconf(_SC_PAGESIZE);
    char *area[NAREA];
    char before[NAREA][128];
    int used[NAREA];
    for (int k = 0; k < NAREA; k++) {
        char *m = mmap(NULL, (PAGES + 2) * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) die("mmap");
        area[k] = m + pg;
        if (mprotect(area[k], PAGES * pg, PROT_READ | PROT_WRITE)) die("mprotect");
        fill((uint64_t *)area[k], 0x9e3779b97f4a7c15ULL * (k + 1));
        size_t len = PAGES * pg;
        int r = 0;
        switch (k) {
        case HG: r = madvise(area[k], len, MADV_HUGEPAGE); break;
        case NH: r = madvise(area[k], len, MADV_NOHUGEPAGE); break;
        case DD: r = madvise(area[k], len, MADV_DONTDUMP); break;
        case DC: r = madvise(area[k], len, MADV_DONTFORK); break;
        case WF: r = madvise(area[k], len, MADV_WIPEONFORK); break;
        case MG: r = madvise(area[k], len, MADV_MERGEABLE); break;
        case SR: r = madvise(area[k], len, MADV_SEQUENTIAL); break;
        case RR: r = madvise(area[k], len, MADV_RANDOM); break;
        case LO: r = mlock(area[k], len); break;
        case LF: r = (int)syscall(SYS_mlock2, area[k], len, MLOCK_ONFAULT); break;
        case PLAIN: break;
        case COMBO:
            r = madvise(area[k], len, MADV_DONTDUMP) | madvise(area[k], len, MADV_RANDOM);
            madvise(area[k], len, MADV_MERGEABLE); /* where KSM is built in */
            break;
        }
        used[k] = r == 0;
        if (!used[k] && (k == LO || k == LF)) die(names[k]);
        flags_of(area[k], before[k], sizeof before[k]);
    }
    /* File mappings whose protection differs from the file's open mode. */
    int w = open("ro", O_CREAT | O_TRUNC | O_WRONLY, 0644);
    char page[4096];
    for (int i = 0; i < (int)sizeof page; i++) page[i] = (char)(i * 7 + 1);
    if (w < 0 || write(w, page, sizeof page) != (ssize_t)sizeof page ||
        write(w, page, sizeof page) != (ssize_t)sizeof page)
        die("ro");
    close(w);
    int ro = open("ro", O_RDONLY);
    if (ro < 0) die("open ro");
    char *rx = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ro, 0);
    if (rx == MAP_FAILED) die("mmap ro shared");
    if (mprotect(rx, 4096, PROT_READ | PROT_EXEC)) die("mprotect ro PROT_EXEC");
    char *pw = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, ro, 0);
    if (pw == MAP_FAILED) die("mmap ro private writable");
    memcpy(pw + 4096, "private copy", 12);
    if (future && mlockall(MCL_FUTURE | (onfault ? MCL_ONFAULT : 0))) die("mlockall(MCL_FUTURE)");
    if (argc > 1 && strcmp(argv[1], "overlimit") == 0) {
        struct rlimit rl;
        if (getrlimit(RLIMIT_MEMLOCK, &rl)) die("getrlimit");
        rl.rlim_cur = (rlim_t)pg;
        if (setrlimit(RLIMIT_MEMLOCK, &rl)) die("setrlimit");
    }

    int n_used = 0;
    for (int k = 0; k < NAREA; k++) n_used += used[k];
    out("ready pid=%d areas=%d mlock=%lx onfault=%lx\n", (int)getpid(), n_used, (unsigned long)area[LO],
        (unsigned long)area[LF]);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }

    for (int k = 0; k < NAREA; k++) {
        size_t bad = mismatches((uint64_t *)area[k], 0x9e3779b97f4a7c15ULL * (k + 1));
        CHECK(bad == 0, "%s: %zu words differ", names[k], bad);
        char now[128];
        flags_of(area[k], now, sizeof now);
        CHECK(strcmp(now, before[k]) == 0, "%s: VmFlags [%s], were [%s]", names[k], now, before[k]);
    }
    char perms[5], path[256];
    CHECK(maps_lookup(rx, perms, path, sizeof path, NULL, NULL) == 0 && strcmp(perms, "r-xs") == 0,
          "ro shared mapping: permissions %s", perms);
    CHECK(memcmp(rx, page, 4096) == 0, "ro shared mapping: content differs");
    CHECK(maps_lookup(pw, perms, path, sizeof path, NULL, NULL) == 0 && strcmp(perms, "rw-p") == 0,
          "ro private writable mapping: permissions %s", perms);
    CHECK(memcmp(pw, page, 4096) == 0 && memcmp(pw + 4096, "private copy", 12) == 0 &&
              memcmp(pw + 4096 + 12, page + 12, 4096 - 12) == 0,
          "ro private writable mapping: content differs");
    char fb[16];
    CHECK(pread(ro, fb, 12, 4096) == 12 && memcmp(fb, page, 12) == 0,
          "ro: the private write reached the file");
    if (future) {
        char *m = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        char f[128];
        if (m == MAP_FAILED) die("mmap after");
        flags_of(m, f, sizeof f);
        CHECK(strstr(f, "lo ") != NULL, "mlockall(MCL_FUTURE) lost: a new mapping has [%s]", f);
        CHECK(!onfault == !strstr(f, "lf "), "MCL_ONFAULT %s: a new mapping has [%s]",
              onfault ? "lost" : "appeared", f);
    }
    finish("ticks=%u areas=%d", n, n_used);
}
