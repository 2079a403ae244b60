/* locks: one process holding file locks of every kind.
 *
 * `locks all` (the default): in its cwd, a.dat (8 KiB, also mapped MAP_SHARED:
 * each tick is written at offset 4096) with
 *   fd A (O_RDWR)   POSIX write lock on bytes 10-29, POSIX read lock 100-EOF;
 *   fd B (O_RDWR)   OFD write lock on bytes 50-59;
 *   fd C (O_RDONLY) OFD read lock on bytes 60-69;
 * b.dat: fd D flock(LOCK_EX), fd E a dup of D; c.dat: fd F flock(LOCK_SH).
 * Prints `ready pid=P a=A b=B c=C d=D e=E f=F`, then `tick N` every ~20 ms. A
 * file `check` makes it verify its locks (forked probes: F_OFD_GETLK from a new
 * description sees every range with its owner, POSIX with the pid, OFD -1;
 * flock LOCK_NB on b.dat and c.dat) and print `checked ok` / `checked FAIL ..`.
 * At `go`: the same checks, then the owners: unlocking 10-29 through A frees
 * only that range; closing D keeps b.dat locked (E shares the description),
 * closing E frees it; closing F frees c.dat; closing B frees 50-59 (B's
 * description owned it) and 100-EOF (a close drops the process's POSIX locks
 * on the file) but not 60-69, which closing C frees.
 * Output: `OK ticks=N` / `FAIL ...`.
 *
 * `locks lease`: fd 3 of lease.dat (O_RDONLY) holds a read lease (F_SETLEASE).
 * `locks mapped`: m.dat is flock(LOCK_EX)ed, mapped MAP_SHARED, and its fd
 * closed: the mapping alone keeps the locked description (restored). Both print
 * `ready mode=M pid=P`, then tick; a checkpoint must refuse the lease (the job
 * runs on).
 * At `go` they check the lease / lock is still held: `OK ticks=N` / `FAIL`. */
#include "lockprobe.h"
#include <sys/mman.h>

static pid_t me;
static int fa, fb, fc, fd_, fe, ff;
static volatile uint64_t *stamp;
static uint64_t ticks;

static void verify(const char *what) {
    expect_lock(what, "a.dat", 0, 10, F_UNLCK, 0, 0, 0);
    expect_lock(what, "a.dat", 10, 20, F_WRLCK, me, 10, 20);
    expect_lock(what, "a.dat", 29, 1, F_WRLCK, me, 10, 20);
    expect_lock(what, "a.dat", 30, 20, F_UNLCK, 0, 0, 0);
    expect_lock(what, "a.dat", 50, 10, F_WRLCK, -1, 50, 10);
    expect_lock(what, "a.dat", 60, 10, F_RDLCK, -1, 60, 10);
    expect_lock(what, "a.dat", 70, 30, F_UNLCK, 0, 0, 0);
    expect_lock(what, "a.dat", 100, 1, F_RDLCK, me, 100, 0);
    expect_lock(what, "a.dat", 1 << 20, 1, F_RDLCK, me, 100, 0);
    CHECK(probe_flock("b.dat", LOCK_SH) == EWOULDBLOCK, "%s: b.dat is not flock(LOCK_EX)ed", what);
    CHECK(probe_flock("c.dat", LOCK_SH) == 0, "%s: c.dat cannot be shared", what);
    CHECK(probe_flock("c.dat", LOCK_EX) == EWOULDBLOCK, "%s: c.dat is not flock(LOCK_SH)ed", what);
    CHECK(*stamp + 1 >= ticks && *stamp <= ticks, "%s: the mapping of a.dat holds %llu at tick %llu", what,
          (unsigned long long)*stamp, (unsigned long long)ticks);
}

static void loop(void (*check)(const char *)) {
    while (!go_exists()) {
        out("tick %llu\n", (unsigned long long)ticks);
        ticks++;
        if (stamp) *stamp = ticks;
        answer_ping();
        if (check) answer_check(check);
        sleep_ms(20);
    }
}

static void mode_all(void) {
    me = getpid();
    fa = open("a.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fa < 0 || ftruncate(fa, 8192)) die("a.dat");
    char *m = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fa, 0);
    if (m == MAP_FAILED) die("mmap a.dat");
    stamp = (volatile uint64_t *)(m + 4096);
    fb = open("a.dat", O_RDWR);
    fc = open("a.dat", O_RDONLY);
    fd_ = open("b.dat", O_RDWR | O_CREAT, 0644);
    ff = open("c.dat", O_RDONLY | O_CREAT, 0644);
    if (fb < 0 || fc < 0 || fd_ < 0 || ff < 0) die("open");
    fe = dup(fd_);
    take(fa, F_SETLK, F_WRLCK, 10, 20);
    take(fa, F_SETLK, F_RDLCK, 100, 0);
    take(fb, F_OFD_SETLK, F_WRLCK, 50, 10);
    take(fc, F_OFD_SETLK, F_RDLCK, 60, 10);
    if (flock(fd_, LOCK_EX | LOCK_NB) || flock(ff, LOCK_SH | LOCK_NB)) die("flock");
    verify("before");
    if (g_failures) finish("-");
    out("ready pid=%d a=%d b=%d c=%d d=%d e=%d f=%d\n", (int)me, fa, fb, fc, fd_, fe, ff);
    loop(verify);
    verify("at go");
    take(fa, F_SETLK, F_UNLCK, 10, 20);
    expect_lock("unlocked 10-29", "a.dat", 10, 20, F_UNLCK, 0, 0, 0);
    expect_lock("unlocked 10-29", "a.dat", 50, 10, F_WRLCK, -1, 50, 10);
    expect_lock("unlocked 10-29", "a.dat", 100, 1, F_RDLCK, me, 100, 0);
    close(fd_);
    CHECK(probe_flock("b.dat", LOCK_EX) == EWOULDBLOCK, "closed D: b.dat lost its lock (E still holds it)");
    close(fe);
    CHECK(probe_flock("b.dat", LOCK_EX) == 0, "closed D and E: b.dat still locked");
    close(ff);
    CHECK(probe_flock("c.dat", LOCK_EX) == 0, "closed F: c.dat still locked");
    expect_lock("closed b.dat and c.dat", "a.dat", 100, 1, F_RDLCK, me, 100, 0);
    /* Closing any fd of a.dat drops the process's POSIX locks on it, not the
     * OFD locks of the other descriptions. */
    close(fb);
    expect_lock("closed B", "a.dat", 50, 10, F_UNLCK, 0, 0, 0);
    expect_lock("closed B", "a.dat", 60, 10, F_RDLCK, -1, 60, 10);
    expect_lock("closed B", "a.dat", 100, 0, F_UNLCK, 0, 0, 0);
    close(fc);
    expect_lock("closed C", "a.dat", 0, 0, F_UNLCK, 0, 0, 0);
    finish("ticks=%llu", (unsigned long long)ticks);
}

static void mode_lease(void) {
    int fd = open("lease.dat", O_RDONLY | O_CREAT, 0644);
    if (fd < 0) die("lease.dat");
    if (fcntl(fd, F_SETLEASE, F_RDLCK)) die("F_SETLEASE");
    out("ready mode=lease pid=%d fd=%d\n", (int)getpid(), fd);
    loop(NULL);
    CHECK(fcntl(fd, F_GETLEASE) == F_RDLCK, "the read lease is gone (F_GETLEASE %d)", fcntl(fd, F_GETLEASE));
    finish("ticks=%llu", (unsigned long long)ticks);
}

static void mode_mapped(void) {
    int fd = open("m.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 4096)) die("m.dat");
    if (flock(fd, LOCK_EX | LOCK_NB)) die("flock m.dat");
    char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) die("mmap m.dat");
    close(fd);
    stamp = (volatile uint64_t *)m;
    out("ready mode=mapped pid=%d\n", (int)getpid());
    loop(NULL);
    CHECK(probe_flock("m.dat", LOCK_SH) == EWOULDBLOCK, "m.dat lost its flock");
    CHECK(*stamp == ticks, "the mapping of m.dat holds %llu at tick %llu", (unsigned long long)*stamp,
          (unsigned long long)ticks);
    finish("ticks=%llu", (unsigned long long)ticks);
}

int main(int argc, char **argv) {
    setup();
    const char *mode = argc > 1 ? argv[1] : "all";
    if (strcmp(mode, "lease") == 0) mode_lease();
    else if (strcmp(mode, "mapped") == 0) mode_mapped();
    else mode_all();
    return 0;
}
