/* memory: anonymous memory of many kinds must survive checkpoint/restart.
 *  - 64 MiB of xorshift64 pseudo-random data (malloc'd), checked word by word
 *    against a regenerated stream after `go`;
 *  - 16 MiB malloc'd + memset to zero;
 *  - thousands of small live malloc chunks on the brk heap with patterns;
 *  - one mmap'd area split by mprotect into [RW 4 pages][PROT_NONE guard page]
 *    [PROT_READ 4 pages] (filled before mprotect): contents, permissions (from
 *    /proc/self/maps) and the guard page still faulting are checked;
 *  - a sparse 8 GiB MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE mapping with 10
 *    touched pages at scattered offsets (known values), untouched pages zero.
 * Also: generated code in an anonymous r-x page (x86-64), called after
 * restart; the main stack must still grow on demand (4 MiB recursion).
 * After `go` it also grows the heap (sbrk 200 MiB + 200000 small mallocs) and
 * maps 64 MiB more, writes and verifies them.
 * With argument `nofile0` it lowers its RLIMIT_NOFILE soft limit to 0 while
 * waiting for `go` (it can open nothing; a checkpoint's snapshot cannot either)
 * and raises it back before checking.
 * Output: `ready rand=<csum> ...`, then `OK ...` / `FAIL ...`. */
#include "util.h"
#include <sys/resource.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>

#define MiB (1024UL * 1024UL)
#define GiB (1024UL * MiB)
#define RAND_BYTES (64 * MiB)
#define ZERO_BYTES (16 * MiB)
#define SPARSE_BYTES (8 * GiB)
#define NSMALL 5000
#define NSPARSE 10

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t mix(uint64_t a, uint64_t b) { return (a ^ b) * 0x9E3779B97F4A7C15ULL + (a >> 29); }

static sigjmp_buf segv_jmp;
static volatile sig_atomic_t segv_hits;
static void on_segv(int sig) {
    (void)sig;
    segv_hits++;
    siglongjmp(segv_jmp, 1);
}

/* Does reading *p fault? */
static int read_faults(volatile uint8_t *p) {
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_segv;
    sa.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &sa, &old);
    int faulted = 0;
    if (sigsetjmp(segv_jmp, 1) == 0) {
        (void)*p;
    } else {
        faulted = 1;
    }
    sigaction(SIGSEGV, &old, NULL);
    return faulted;
}

/* Uses ~64 KiB of stack per level; returns a checksum of what it wrote. */
static __attribute__((noinline)) uint64_t deep(int depth) {
    volatile uint8_t buf[64 * 1024];
    for (size_t i = 0; i < sizeof buf; i += 512) buf[i] = (uint8_t)(depth + i);
    uint64_t r = depth > 0 ? deep(depth - 1) : 0;
    for (size_t i = 0; i < sizeof buf; i += 512) r += buf[i];
    return r;
}

static void check_perms(const char *what, const void *addr, const char *want) {
    char perms[5] = "????", path[512];
    if (maps_lookup(addr, perms, path, sizeof path, NULL, NULL) != 0) {
        fail("%s at %p not in /proc/self/maps", what, addr);
        return;
    }
    CHECK(strcmp(perms, want) == 0, "%s at %p has perms %s, want %s", what, addr, perms, want);
}

static uint64_t sparse_off(int i) {
    /* scattered, page aligned, covering the whole 8 GiB incl. first/last page */
    static const uint64_t offs[NSPARSE] = {0,           4096,        1 * GiB + 12288, 2 * GiB - 4096,
                                           3 * GiB + 777 * 4096UL, 4 * GiB,     5 * GiB + 123 * 4096UL,
                                           6 * GiB + 99999 * 4096UL, 7 * GiB + 4096, 8 * GiB - 4096};
    return offs[i];
}

int main(int argc, char **argv) {
    setup();
    int nofile0 = argc > 1 && strcmp(argv[1], "nofile0") == 0;
    long pg = sysconf(_SC_PAGESIZE);

    /* 64 MiB random */
    size_t nr = RAND_BYTES / 8;
    uint64_t *rnd = malloc(RAND_BYTES);
    if (!rnd) die("malloc rand");
    uint64_t s = 0x2545F4914F6CDD1DULL, csum = 0;
    for (size_t i = 0; i < nr; i++) {
        rnd[i] = xorshift(&s);
        csum = mix(csum, rnd[i]);
    }

    /* 16 MiB zeros */
    uint8_t *zero = malloc(ZERO_BYTES);
    if (!zero) die("malloc zero");
    memset(zero, 0, ZERO_BYTES);

    /* small heap chunks */
    static uint32_t *small[NSMALL];
    static size_t smallsz[NSMALL];
    for (int i = 0; i < NSMALL; i++) {
        smallsz[i] = 4 + (size_t)(i * 37 % 200);
        small[i] = malloc(smallsz[i] * 4);
        if (!small[i]) die("malloc small");
        for (size_t j = 0; j < smallsz[i]; j++) small[i][j] = (uint32_t)(i * 1000003u + j);
    }
    void *brk0 = sbrk(0);

    /* [RW 4][NONE 1][R 4] */
    uint8_t *prot = mmap(NULL, 9 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (prot == MAP_FAILED) die("mmap prot");
    for (long i = 0; i < 9 * pg; i++) prot[i] = (uint8_t)(i * 13 + 7);
    if (mprotect(prot + 4 * pg, pg, PROT_NONE)) die("mprotect none");
    if (mprotect(prot + 5 * pg, 4 * pg, PROT_READ)) die("mprotect ro");

    /* sparse 8 GiB */
    uint8_t *sparse = mmap(NULL, SPARSE_BYTES, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (sparse == MAP_FAILED) die("mmap sparse");
    for (int i = 0; i < NSPARSE; i++) {
        uint64_t *w = (uint64_t *)(sparse + sparse_off(i));
        for (long j = 0; j < pg / 8; j += 61) w[j] = mix(sparse_off(i), (uint64_t)j) | 1;
    }

    /* generated code in an anonymous r-x mapping (x86-64: mov eax, 42; ret) */
    int (*jit)(void) = NULL;
#ifdef __x86_64__
    uint8_t *code = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) die("mmap code");
    static const uint8_t insn[] = {0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3};
    memcpy(code, insn, sizeof insn);
    if (mprotect(code, pg, PROT_READ | PROT_EXEC)) die("mprotect code");
    jit = (int (*)(void))code;
    if (jit() != 42) die("jit before");
#endif
    uintptr_t stack_lo = 0, stack_hi = 0;
    {
        char perms[5], path[64];
        int here;
        maps_lookup(&here, perms, path, sizeof path, &stack_lo, &stack_hi);
    }

    out("ready rand=%016llx sparse=%p prot=%p brk=%p\n", (unsigned long long)csum, (void *)sparse,
        (void *)prot, brk0);
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) != 0) die("getrlimit");
    if (nofile0) {
        struct rlimit none = {0, nofile.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &none) != 0) die("setrlimit 0");
    }
    wait_go();
    if (nofile0 && setrlimit(RLIMIT_NOFILE, &nofile) != 0) die("setrlimit back");

    /* verify random data word by word */
    uint64_t s2 = 0x2545F4914F6CDD1DULL, csum2 = 0;
    size_t bad = 0, firstbad = 0;
    for (size_t i = 0; i < nr; i++) {
        uint64_t want = xorshift(&s2);
        if (rnd[i] != want && bad++ == 0) firstbad = i;
        csum2 = mix(csum2, rnd[i]);
    }
    CHECK(bad == 0, "random data: %zu bad words, first at byte %zu", bad, firstbad * 8);
    CHECK(csum2 == csum, "random checksum %016llx != %016llx", (unsigned long long)csum2,
          (unsigned long long)csum);

    bad = 0;
    for (size_t i = 0; i < ZERO_BYTES; i++) bad += zero[i] != 0;
    CHECK(bad == 0, "zero region: %zu non-zero bytes", bad);

    bad = 0;
    for (int i = 0; i < NSMALL; i++)
        for (size_t j = 0; j < smallsz[i]; j++) bad += small[i][j] != (uint32_t)(i * 1000003u + j);
    CHECK(bad == 0, "small heap chunks: %zu bad words", bad);
    CHECK(sbrk(0) == brk0, "program break moved from %p to %p", brk0, sbrk(0));

    bad = 0;
    for (long i = 0; i < 9 * pg; i++) {
        if (i >= 4 * pg && i < 5 * pg) continue;
        bad += prot[i] != (uint8_t)(i * 13 + 7);
    }
    CHECK(bad == 0, "protected region: %zu bad bytes", bad);
    check_perms("rw part", prot, "rw-p");
    check_perms("guard page", prot + 4 * pg, "---p");
    check_perms("read-only part", prot + 5 * pg, "r--p");
    CHECK(read_faults(prot + 4 * pg), "guard page is readable");
    CHECK(!read_faults(prot + 5 * pg), "read-only page faults on read");
    CHECK(!read_faults(prot), "rw page faults on read");

    bad = 0;
    for (int i = 0; i < NSPARSE; i++) {
        uint64_t *w = (uint64_t *)(sparse + sparse_off(i));
        for (long j = 0; j < pg / 8; j++) {
            uint64_t want = (j % 61 == 0) ? (mix(sparse_off(i), (uint64_t)j) | 1) : 0;
            bad += w[j] != want;
        }
    }
    CHECK(bad == 0, "sparse mapping: %zu bad words in touched pages", bad);
    /* some untouched pages must read as zero */
    bad = 0;
    for (uint64_t off = 8192 + 4096 * 17; off < SPARSE_BYTES; off += 97 * MiB + 4096 * 3)
        bad += *(volatile uint64_t *)(sparse + off) != 0;
    CHECK(bad == 0, "sparse mapping: %zu untouched pages not zero", bad);
    {
        char perms[5], path[512];
        uintptr_t st = 0, en = 0;
        if (maps_lookup(sparse + SPARSE_BYTES / 2, perms, path, sizeof path, &st, &en) != 0)
            fail("sparse mapping missing from /proc/self/maps");
        else {
            CHECK(strcmp(perms, "rw-p") == 0, "sparse mapping perms %s", perms);
            CHECK(st <= (uintptr_t)sparse && en >= (uintptr_t)sparse + SPARSE_BYTES,
                  "sparse mapping is %lx-%lx, want it to cover %p+8GiB", (unsigned long)st,
                  (unsigned long)en, (void *)sparse);
        }
    }

    if (jit) {
        check_perms("generated code", (void *)jit, "r-xp");
        CHECK(jit() == 42, "generated code returns %d", jit());
    }

    /* the main stack still grows on demand: ~4 MiB deeper than at checkpoint */
    {
        uint64_t want = 0;
        for (int d = 0; d <= 63; d++)
            for (size_t i = 0; i < 64 * 1024; i += 512) want += (uint8_t)(d + i);
        uint64_t got = deep(63);
        CHECK(got == want, "deep recursion checksum %llu, want %llu", (unsigned long long)got,
              (unsigned long long)want);
        char perms[5], path[64];
        uintptr_t lo = 0, hi = 0;
        int here;
        maps_lookup(&here, perms, path, sizeof path, &lo, &hi);
        CHECK(lo < stack_lo && hi == stack_hi, "stack did not grow down (was %lx-%lx, now %lx-%lx)",
              (unsigned long)stack_lo, (unsigned long)stack_hi, (unsigned long)lo, (unsigned long)hi);
    }

    /* heap growth after restart */
    size_t grow = 200 * MiB;
    uint8_t *b = sbrk((intptr_t)grow);
    if (b == (void *)-1) {
        fail("sbrk(200 MiB) failed: %s", strerror(errno));
    } else {
        for (size_t i = 0; i < grow; i += 64) *(uint64_t *)(b + i) = mix(i, 77);
        bad = 0;
        for (size_t i = 0; i < grow; i += 64) bad += *(uint64_t *)(b + i) != mix(i, 77);
        CHECK(bad == 0, "sbrk'd memory: %zu bad words", bad);
        CHECK(sbrk(-(intptr_t)grow) != (void *)-1, "sbrk shrink failed");
    }
    enum { NM = 200000 };
    static uint64_t *m[NM];
    size_t nfail = 0;
    for (int i = 0; i < NM; i++) {
        m[i] = malloc(16 + (size_t)(i % 50) * 8);
        if (!m[i]) { nfail++; continue; }
        m[i][0] = (uint64_t)i * 3 + 1;
        m[i][1 + (i % 50)] = ~(uint64_t)i;
    }
    CHECK(nfail == 0, "%zu small mallocs after restart failed", nfail);
    bad = 0;
    for (int i = 0; i < NM; i++) {
        if (!m[i]) continue;
        bad += m[i][0] != (uint64_t)i * 3 + 1 || m[i][1 + (i % 50)] != ~(uint64_t)i;
        free(m[i]);
    }
    CHECK(bad == 0, "small mallocs after restart: %zu corrupted", bad);
    uint8_t *more = mmap(NULL, 64 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (more == MAP_FAILED) fail("mmap 64 MiB after restart: %s", strerror(errno));
    else {
        memset(more, 0x5a, 64 * MiB);
        bad = 0;
        for (size_t i = 0; i < 64 * MiB; i += 4096) bad += more[i] != 0x5a;
        CHECK(bad == 0, "new mmap: %zu bad pages", bad);
    }
    /* old data still fine after all that */
    CHECK(rnd[nr - 1] != 0 && small[NSMALL - 1][0] == (uint32_t)((NSMALL - 1) * 1000003u),
          "old data clobbered by growth");
    finish("rand=%016llx", (unsigned long long)csum2);
}
