/* shmem: a parent and a child sharing memory of four kinds.
 *   shmem SHM_NAME
 *   R   4 KiB MAP_SHARED|MAP_ANONYMOUS: a POSIX unnamed semaphore (sem_init
 *       pshared=1) used as a mutex, a counter and each process's count;
 *   M   a memfd ("stasis-memfd", size 2 pages + 1000 bytes) mapped (2 pages)
 *       by both; the fd is also used by the parent: the child mirrors its
 *       count into M[0], which the parent reads with pread; the parent
 *       pwrite()s each tick number at offset 4096 and reads it back through
 *       the mapping; and it appends one 8-byte record (the tick number) per
 *       tick with write() from offset 8192 on (fd offset and size grow);
 *   S   a POSIX shm object (shm_open SHM_NAME, 2 pages, mapped, then
 *       shm_unlink'ed): a second counter kept equal to R's;
 *   Z   64 MiB MAP_SHARED|MAP_ANONYMOUS with 4 pages touched (a pattern
 *       written by the parent; the child stores its count in them).
 * Both processes loop: sem_wait; counter++; own count++; S counter++; child:
 * M[0] = count, Z page (count % 4) word 1 = count; parent: checks counter ==
 * parent + child counts, S counter == counter, M[0] == pread(memfd, 0) ==
 * child count; sem_post. The child loops every ~1 ms; the parent does 5
 * rounds per tick (~20 ms).
 * Prints `ready memfd=F child=PID`, then `tick N counter=C parent=P child=Q`.
 * At `go` the parent stops the child (flag under the semaphore), reaps it
 * (exit 0) and checks: the invariants; sem_getvalue == 1 and sem_trywait
 * works; memfd: offset == 8192 + 8 * records, size == max(9192, offset),
 * every record right; Z: the pattern of the touched pages, the child's values
 * in them, zeros elsewhere. Output: `OK ticks=N counter=C records=R` /
 * `FAIL ...`. */
#include "util.h"
#include <semaphore.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define PAGE 4096
#define ZSIZE (64UL << 20)
#define MEMFD_SIZE0 (2 * PAGE + 1000)

struct region {
    sem_t sem;
    uint64_t counter, pcount, ccount;
    int stop;
    char child_fail[512];
};

static struct region *R;
static volatile uint64_t *M, *S;
static uint8_t *Z;
static const size_t zpages[4] = {0, 7 * 256 + 3, 33 * 256, ZSIZE / PAGE - 1};

static uint64_t zmagic(int k) { return 0x5a5a000000000000ULL + (uint64_t)k * 0x1111; }

/* sem_wait; EINTR (no signal handler here) is a failure: -2. */
static int lock(void) {
    if (sem_wait(&R->sem)) return errno == EINTR ? -2 : -1;
    return 0;
}

static void child_main(void) {
    for (;;) {
        int r = lock();
        if (r) {
            snprintf(R->child_fail, sizeof R->child_fail, "child: sem_wait: %s",
                     r == -2 ? "EINTR" : strerror(errno));
            _exit(1);
        }
        if (R->stop) {
            sem_post(&R->sem);
            _exit(0);
        }
        R->counter++;
        R->ccount++;
        S[0]++;
        M[0] = R->ccount;
        uint64_t *zp = (uint64_t *)(Z + zpages[R->ccount % 4] * PAGE);
        zp[1] = R->ccount;
        sem_post(&R->sem);
        struct timespec ts = {0, 700000};
        nanosleep(&ts, NULL);
    }
}

int main(int argc, char **argv) {
    setup();
    if (argc < 2) return 2;
    R = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (R == MAP_FAILED) die("mmap R");
    if (sem_init(&R->sem, 1, 1)) die("sem_init");
    int mfd = memfd_create("stasis-memfd", 0);
    if (mfd < 0 || ftruncate(mfd, MEMFD_SIZE0)) die("memfd");
    M = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (M == MAP_FAILED) die("mmap memfd");
    if (lseek(mfd, 2 * PAGE, SEEK_SET) != 2 * PAGE) die("lseek");
    int sfd = shm_open(argv[1], O_CREAT | O_EXCL | O_RDWR, 0600);
    if (sfd < 0 || ftruncate(sfd, 2 * PAGE)) die("shm_open");
    S = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (S == MAP_FAILED) die("mmap shm");
    close(sfd);
    if (shm_unlink(argv[1])) die("shm_unlink");
    Z = mmap(NULL, ZSIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (Z == MAP_FAILED) die("mmap Z");
    for (int k = 0; k < 4; k++) {
        uint64_t *zp = (uint64_t *)(Z + zpages[k] * PAGE);
        zp[0] = zmagic(k);
        for (size_t i = 2; i < PAGE / 8; i++) zp[i] = zmagic(k) ^ i;
    }
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) child_main();
    out("ready memfd=%d child=%d\n", mfd, (int)child);
    unsigned n = 0;
    uint64_t records = 0;
    for (; !go_exists(); n++) {
        for (int round = 0; round < 5; round++) {
            int r = lock();
            if (r) {
                out("FAIL parent: sem_wait: %s\n", r == -2 ? "EINTR" : strerror(errno));
                exit(1);
            }
            R->counter++;
            R->pcount++;
            S[0]++;
            uint64_t viafd = ~0ULL;
            if (pread(mfd, &viafd, 8, 0) != 8) fail("pread memfd: %s", strerror(errno));
            if (R->counter != R->pcount + R->ccount || S[0] != R->counter || M[0] != R->ccount ||
                viafd != R->ccount) {
                fail("tick %u: counter %llu, parent %llu + child %llu; shm counter %llu; memfd "
                     "(mapping) %llu, (pread) %llu",
                     n, (unsigned long long)R->counter, (unsigned long long)R->pcount,
                     (unsigned long long)R->ccount, (unsigned long long)S[0],
                     (unsigned long long)M[0], (unsigned long long)viafd);
                out("FAIL %s\n", g_failbuf);
                exit(1);
            }
            sem_post(&R->sem);
            sleep_ms(4);
        }
        uint64_t t = n;
        if (pwrite(mfd, &t, 8, PAGE) != 8) fail("pwrite memfd: %s", strerror(errno));
        CHECK(M[PAGE / 8] == t, "memfd: pwrite of %llu at 4096 not seen in the mapping (%llu)",
              (unsigned long long)t, (unsigned long long)M[PAGE / 8]);
        if (write(mfd, &t, 8) != 8) fail("write memfd: %s", strerror(errno));
        records++;
        if (g_failures) {
            out("FAIL %s\n", g_failbuf);
            exit(1);
        }
        out("tick %u counter=%llu parent=%llu child=%llu\n", n, (unsigned long long)R->counter,
            (unsigned long long)R->pcount, (unsigned long long)R->ccount);
    }
    if (lock()) die("sem_wait");
    R->stop = 1;
    sem_post(&R->sem);
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "child ended with status %#x (%s)", st, R->child_fail);
    CHECK(R->counter == R->pcount + R->ccount && S[0] == R->counter && M[0] == R->ccount,
          "final counter %llu, parent %llu + child %llu, shm %llu, memfd %llu",
          (unsigned long long)R->counter, (unsigned long long)R->pcount,
          (unsigned long long)R->ccount, (unsigned long long)S[0], (unsigned long long)M[0]);
    int sv = -1;
    CHECK(sem_getvalue(&R->sem, &sv) == 0 && sv == 1, "semaphore value %d, want 1", sv);
    CHECK(sem_trywait(&R->sem) == 0 && sem_post(&R->sem) == 0, "semaphore unusable");
    off_t pos = lseek(mfd, 0, SEEK_CUR);
    struct stat fst;
    off_t want = (off_t)(2 * PAGE + 8 * records);
    CHECK(pos == want, "memfd offset %lld, want %lld", (long long)pos, (long long)want);
    CHECK(fstat(mfd, &fst) == 0 && fst.st_size == (want > MEMFD_SIZE0 ? want : MEMFD_SIZE0),
          "memfd size %lld, want %lld", (long long)fst.st_size,
          (long long)(want > MEMFD_SIZE0 ? want : MEMFD_SIZE0));
    for (uint64_t i = 0; i < records; i++) {
        uint64_t v = ~0ULL;
        if (pread(mfd, &v, 8, (off_t)(2 * PAGE + 8 * i)) != 8 || v != i) {
            fail("memfd record %llu reads %llu", (unsigned long long)i, (unsigned long long)v);
            break;
        }
    }
    for (int k = 0; k < 4; k++) {
        uint64_t *zp = (uint64_t *)(Z + zpages[k] * PAGE);
        CHECK(zp[0] == zmagic(k), "sparse page %d: magic %llx", k, (unsigned long long)zp[0]);
        CHECK(zp[1] <= R->ccount && (R->ccount < 4 || zp[1] % 4 == (uint64_t)k),
              "sparse page %d: child value %llu (child count %llu)", k, (unsigned long long)zp[1],
              (unsigned long long)R->ccount);
        for (size_t i = 2; i < PAGE / 8; i++)
            if (zp[i] != (zmagic(k) ^ i)) {
                fail("sparse page %d: word %zu is %llx", k, i, (unsigned long long)zp[i]);
                break;
            }
    }
    for (size_t pg = 1; pg < ZSIZE / PAGE; pg += 997) {
        int touched = 0;
        for (int k = 0; k < 4; k++) touched |= pg == zpages[k];
        if (touched) continue;
        const uint64_t *zp = (const uint64_t *)(Z + pg * PAGE);
        for (size_t i = 0; i < PAGE / 8; i++)
            if (zp[i]) {
                fail("sparse region: page %zu is not zero", pg);
                break;
            }
    }
    finish("ticks=%u counter=%llu records=%llu", n, (unsigned long long)R->counter,
           (unsigned long long)records);
}
