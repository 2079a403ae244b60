/* memfdx: memfds must come back with their name, mode, seals, content and mappings,
 * and a memfd holding a program must still run it (fexecve).
 *
 * R makes
 *  - memfd "stasis-sealed" (MFD_ALLOW_SEALING): 3 pages of content, mode 0640, seals
 *    F_SEAL_SHRINK|F_SEAL_GROW, mapped MAP_SHARED (`ms`) and MAP_PRIVATE (`mp`,
 *    page 0 written: copied on write);
 *  - memfd "stasis-plain" (no sealing: F_GET_SEALS says F_SEAL_SEAL), 5000 bytes;
 *  - memfd "stasis-exe": a copy of this program, mode 0755.
 * Prints `ready pid=R`, then `tick N` every ~20 ms until `go` exists. Then it checks
 * names (/proc/self/fd links), modes, seals (growing is still refused), sizes,
 * content, that a write through the fd is seen in `ms` and in `mp`'s pages not
 * copied, and runs the program from "stasis-exe" with fexecve in a child, which
 * must exit 42. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <sys/mman.h>
#include <sys/wait.h>

#define PG 4096

static int fd_name_is(int fd, const char *want) {
    char l[64], t[256];
    snprintf(l, sizeof l, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(l, t, sizeof t - 1);
    if (n < 0) return 0;
    t[n] = 0;
    return strcmp(t, want) == 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "exec-child") == 0) return 42;
    setup();
    int sf = memfd_create("stasis-sealed", MFD_ALLOW_SEALING);
    int pf = memfd_create("stasis-plain", 0);
    int xf = memfd_create("stasis-exe", 0);
    if (sf < 0 || pf < 0 || xf < 0) die("memfd_create");
    char page[PG];
    for (int p = 0; p < 3; p++) {
        memset(page, 'a' + p, PG);
        if (write(sf, page, PG) != PG) die("write sealed");
    }
    if (fchmod(sf, 0640)) die("fchmod");
    if (fcntl(sf, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW)) die("F_ADD_SEALS");
    char *ms = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, sf, 0);
    char *mp = mmap(NULL, 3 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, sf, 0);
    if (ms == MAP_FAILED || mp == MAP_FAILED) die("mmap");
    memcpy(mp, "PRIVATE", 7);
    memcpy(ms + PG, "SHARED", 6);
    char big[5000];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (char)(i % 251);
    if (write(pf, big, sizeof big) != (ssize_t)sizeof big) die("write plain");
    int self = open("/proc/self/exe", O_RDONLY);
    if (self < 0) die("open /proc/self/exe");
    ssize_t r;
    char buf[65536];
    while ((r = read(self, buf, sizeof buf)) > 0)
        if (write(xf, buf, (size_t)r) != r) die("write exe");
    close(self);
    if (fchmod(xf, 0755)) die("fchmod exe");
    int seals0 = fcntl(sf, F_GET_SEALS), pseals0 = fcntl(pf, F_GET_SEALS);

    out("ready pid=%d seals=%d pseals=%d\n", (int)getpid(), seals0, pseals0);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }

    CHECK(fd_name_is(sf, "/memfd:stasis-sealed (deleted)"), "sealed memfd's name");
    CHECK(fd_name_is(pf, "/memfd:stasis-plain (deleted)"), "plain memfd's name");
    CHECK(fd_name_is(xf, "/memfd:stasis-exe (deleted)"), "exe memfd's name");
    struct stat s1, s2, s3;
    if (fstat(sf, &s1) || fstat(pf, &s2) || fstat(xf, &s3)) die("fstat");
    CHECK((s1.st_mode & 07777) == 0640, "sealed mode %o", s1.st_mode & 07777);
    CHECK((s3.st_mode & 07777) == 0755, "exe mode %o", s3.st_mode & 07777);
    CHECK(s1.st_size == 3 * PG && s2.st_size == 5000, "sizes %lld %lld", (long long)s1.st_size,
          (long long)s2.st_size);
    CHECK(fcntl(sf, F_GET_SEALS) == seals0, "sealed seals %#x, were %#x", fcntl(sf, F_GET_SEALS), seals0);
    CHECK(fcntl(pf, F_GET_SEALS) == pseals0, "plain seals %#x, were %#x", fcntl(pf, F_GET_SEALS), pseals0);
    CHECK(ftruncate(sf, 4 * PG) == -1 && errno == EPERM, "growing the sealed memfd was not refused");
    char got[5000];
    CHECK(pread(pf, got, sizeof got, 0) == (ssize_t)sizeof got && memcmp(got, big, sizeof big) == 0,
          "plain content differs");
    CHECK(memcmp(ms, "a", 1) == 0 && memcmp(ms + PG, "SHARED", 6) == 0 && ms[2 * PG] == 'c', "ms differs");
    CHECK(memcmp(mp, "PRIVATE", 7) == 0 && mp[7] == 'a' && memcmp(mp + PG, "SHARED", 6) == 0, "mp differs");
    if (pwrite(sf, "AFTER", 5, 0) != 5 || pwrite(sf, "AFTER", 5, 2 * PG) != 5) die("pwrite after");
    CHECK(memcmp(ms, "AFTER", 5) == 0, "ms does not see the fd's write");
    CHECK(memcmp(mp, "PRIVATE", 7) == 0, "mp's copied page changed");
    CHECK(memcmp(mp + 2 * PG, "AFTER", 5) == 0, "mp's shared page does not see the fd's write");
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        char *args[] = {argv[0], "exec-child", NULL};
        char *env[] = {NULL};
        fexecve(xf, args, env);
        _exit(100 + errno); /* 100 + errno: fexecve failed */
    }
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 42, "fexecve of the memfd: status %#x",
          st);
    finish("ticks=%u", n);
}
