/* lockwait: POSIX record locks held by a parent and a child on one file, and a
 * second child blocked in F_SETLKW on the parent's range.
 *
 * w.dat (4 KiB) in the cwd. The parent P holds write lock 0-99 and read lock
 * 200-299. Child C1, through the description it inherited (one description,
 * two owners), holds write lock 100-199 and read lock 200-299 too. Child C2
 * opens the file itself and waits in F_SETLKW for a write lock on 0-99. The
 * parent prints `ready parent=P c1=C1 c2=C2` once /proc/locks shows C2
 * waiting, then `tick N` every ~20 ms; a file `check` makes it verify every
 * range with a forked F_OFD_GETLK probe (owner pids, types, ranges), that C2
 * still waits (/proc/locks) and has not reported, and print `checked ok` /
 * `checked FAIL ...`.
 * At `go`: P checks the same; C1 checks its own locks and reports; P unlocks
 * 0-99; C2 gets it (after `go`, else FAIL: the lock was lost), checks it owns
 * it and reports; P checks 0-99 is C2's, releases and reaps both children
 * (exit 0). Output: `OK ticks=N` / `FAIL ...`. */
#include "lockprobe.h"
#include <poll.h>

static pid_t parent, c1, c2;
static uint64_t ticks;
static int r2; /* C2's report pipe (read end) */

static void check_all(const char *what) {
    expect_lock(what, "w.dat", 0, 100, F_WRLCK, parent, 0, 100);
    expect_lock(what, "w.dat", 99, 2, F_WRLCK, parent, 0, 100);
    expect_lock(what, "w.dat", 100, 100, F_WRLCK, c1, 100, 100);
    expect_lock(what, "w.dat", 300, 0, F_UNLCK, 0, 0, 0);
    struct probe r = probe_lock("w.dat", 200, 100);
    CHECK(!r.err && r.l.l_type == F_RDLCK && r.l.l_start == 200 && r.l.l_len == 100 &&
              (r.l.l_pid == parent || r.l.l_pid == c1),
          "%s: 200-299 should be read-locked by %d and %d: err %d type %d pid %d at %lld+%lld", what, (int)parent,
          (int)c1, r.err, r.l.l_type, (int)r.l.l_pid, (long long)r.l.l_start, (long long)r.l.l_len);
}

static void verify(const char *what) {
    check_all(what);
    int waiting = 0;
    for (int i = 0; i < 200 && !(waiting = waiting_in_proc_locks(c2)); i++) sleep_ms(10);
    CHECK(waiting, "%s: /proc/locks does not show child %d waiting for 0-99", what, (int)c2);
    struct pollfd p = {r2, POLLIN, 0};
    CHECK(poll(&p, 1, 0) == 0, "%s: child %d got 0-99 while the parent holds it", what, (int)c2);
}

/* One report line from a child (up to 10 s). */
static void report(int fd, const char *who) {
    char b[4096];
    struct pollfd p = {fd, POLLIN, 0};
    int n = poll(&p, 1, 10000);
    ssize_t len = n > 0 ? read(fd, b, sizeof b - 1) : -1;
    if (len <= 0) {
        fail("no report from %s", who);
        return;
    }
    b[len] = 0;
    b[strcspn(b, "\n")] = 0;
    CHECK(strcmp(b, "ok") == 0, "%s: %s", who, b);
}

/* A child's end: its report (failures so far or ok), then wait for the parent. */
static void child_report(int rep, int gate) {
    char b[8300];
    int n = g_failures ? snprintf(b, sizeof b, "FAIL %s\n", g_failbuf) : snprintf(b, sizeof b, "ok\n");
    write_all(rep, b, (size_t)n);
    char c;
    while (read(gate, &c, 1) < 0 && errno == EINTR) {}
    _exit(0);
}

int main(void) {
    setup();
    parent = getpid();
    int fd = open("w.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 4096)) die("w.dat");
    take(fd, F_SETLK, F_WRLCK, 0, 100);
    take(fd, F_SETLK, F_RDLCK, 200, 100);
    int p1[2], g1[2], p2[2], g2[2];
    if (pipe(p1) || pipe(g1) || pipe(p2) || pipe(g2)) die("pipe");
    c1 = fork();
    if (c1 < 0) die("fork");
    if (c1 == 0) {
        c1 = getpid();
        close(p1[0]);
        close(g1[1]);
        take(fd, F_SETLK, F_WRLCK, 100, 100);
        take(fd, F_SETLK, F_RDLCK, 200, 100);
        write_all(p1[1], "L", 1);
        while (!go_exists()) sleep_ms(10);
        expect_lock("child 1", "w.dat", 100, 100, F_WRLCK, c1, 100, 100);
        expect_lock("child 1", "w.dat", 150, 1, F_WRLCK, c1, 100, 100);
        struct probe r = probe_lock("w.dat", 200, 100);
        CHECK(!r.err && r.l.l_type == F_RDLCK && r.l.l_start == 200 && r.l.l_len == 100,
              "child 1: 200-299 not read-locked: err %d type %d at %lld+%lld", r.err, r.l.l_type,
              (long long)r.l.l_start, (long long)r.l.l_len);
        child_report(p1[1], g1[0]);
    }
    char c;
    if (read(p1[0], &c, 1) != 1) die("child 1 did not lock");
    c2 = fork();
    if (c2 < 0) die("fork");
    if (c2 == 0) {
        c2 = getpid();
        close(p2[0]);
        close(g2[1]);
        int own = open("w.dat", O_RDWR);
        if (own < 0) die("child 2: open");
        take(own, F_SETLKW, F_WRLCK, 0, 100);
        CHECK(go_exists(), "child 2 got 0-99 before go: the parent's lock was lost");
        expect_lock("child 2", "w.dat", 0, 100, F_WRLCK, c2, 0, 100);
        child_report(p2[1], g2[0]);
    }
    r2 = p2[0];
    close(p1[1]);
    close(p2[1]);
    close(g1[0]);
    close(g2[0]);
    for (int i = 0; i < 500 && !waiting_in_proc_locks(c2); i++) sleep_ms(10);
    verify("before");
    if (g_failures) finish("-");
    out("ready parent=%d c1=%d c2=%d\n", (int)parent, (int)c1, (int)c2);
    while (!go_exists()) {
        out("tick %llu\n", (unsigned long long)ticks++);
        answer_ping();
        answer_check(verify);
        sleep_ms(20);
    }
    verify("at go");
    report(p1[0], "child 1");
    take(fd, F_SETLK, F_UNLCK, 0, 100);
    report(p2[0], "child 2");
    expect_lock("after the release", "w.dat", 0, 100, F_WRLCK, c2, 0, 100);
    expect_lock("after the release", "w.dat", 100, 100, F_WRLCK, c1, 100, 100);
    write_all(g1[1], "x", 1);
    write_all(g2[1], "x", 1);
    int st1 = -1, st2 = -1;
    while (waitpid(c1, &st1, 0) < 0 && errno == EINTR) {}
    while (waitpid(c2, &st2, 0) < 0 && errno == EINTR) {}
    CHECK(WIFEXITED(st1) && WEXITSTATUS(st1) == 0, "child 1 ended with status %#x", st1);
    CHECK(WIFEXITED(st2) && WEXITSTATUS(st2) == 0, "child 2 ended with status %#x", st2);
    finish("ticks=%llu", (unsigned long long)ticks);
}
