/* Probes of file locks for the lock test programs (locks.c, lockwait.c).
 *
 * A process cannot see its own POSIX locks with F_GETLK, and opening and closing
 * the locked file itself would drop them (a close drops every POSIX lock of the
 * process on that file): every probe runs in a forked child, which opens the
 * file afresh and reports through a pipe. */
#ifndef STASIS_TEST_LOCKPROBE_H
#define STASIS_TEST_LOCKPROBE_H
#include "util.h"
#include <sys/file.h>
#include <sys/wait.h>

struct probe {
    int err;           /* errno of the query, 0 if it worked */
    struct flock l;    /* F_OFD_GETLK answer */
};

/* The first lock conflicting with a write lock on [start, start+len) of path
 * (len 0: to EOF), as F_OFD_GETLK from a new open file description of another
 * process reports it: POSIX locks with their owner's pid, OFD locks with -1. */
static __attribute__((unused)) struct probe probe_lock(const char *path, off_t start, off_t len) {
    struct probe r;
    memset(&r, 0, sizeof r);
    int p[2];
    if (pipe(p)) { r.err = errno; return r; }
    pid_t c = fork();
    if (c < 0) { r.err = errno; close(p[0]); close(p[1]); return r; }
    if (c == 0) {
        close(p[0]);
        struct probe q;
        memset(&q, 0, sizeof q);
        int fd = open(path, O_RDWR);
        q.l.l_type = F_WRLCK;
        q.l.l_whence = SEEK_SET;
        q.l.l_start = start;
        q.l.l_len = len;
        if (fd < 0 || fcntl(fd, F_OFD_GETLK, &q.l)) q.err = errno ? errno : EIO;
        write_all(p[1], (const char *)&q, sizeof q);
        _exit(0);
    }
    close(p[1]);
    ssize_t n;
    while ((n = read(p[0], &r, sizeof r)) < 0 && errno == EINTR) {}
    if (n != (ssize_t)sizeof r) r.err = EPIPE;
    close(p[0]);
    while (waitpid(c, NULL, 0) < 0 && errno == EINTR) {}
    return r;
}

/* Check that [start, start+len) of path meets the lock (type, pid, lstart, llen)
 * first (type F_UNLCK: meets none). */
static __attribute__((unused)) void expect_lock(const char *what, const char *path, off_t start, off_t len,
                                                short type, pid_t pid, off_t lstart, off_t llen) {
    struct probe r = probe_lock(path, start, len);
    if (r.err) {
        fail("%s: probing %s: %s", what, path, strerror(r.err));
        return;
    }
    if (type == F_UNLCK) {
        CHECK(r.l.l_type == F_UNLCK, "%s: %s [%lld,+%lld) should be free, found a %s lock of pid %d at %lld+%lld",
              what, path, (long long)start, (long long)len, r.l.l_type == F_WRLCK ? "write" : "read",
              (int)r.l.l_pid, (long long)r.l.l_start, (long long)r.l.l_len);
        return;
    }
    CHECK(r.l.l_type == type && r.l.l_pid == pid && r.l.l_start == lstart && r.l.l_len == llen,
          "%s: %s [%lld,+%lld): expected a %s lock of pid %d at %lld+%lld, found type %d pid %d at %lld+%lld",
          what, path, (long long)start, (long long)len, type == F_WRLCK ? "write" : "read", (int)pid,
          (long long)lstart, (long long)llen, r.l.l_type, (int)r.l.l_pid, (long long)r.l.l_start,
          (long long)r.l.l_len);
}

/* flock(op | LOCK_NB) on a new open of path in a forked child: 0 or its errno. */
static __attribute__((unused)) int probe_flock(const char *path, int op) {
    pid_t c = fork();
    if (c < 0) return errno;
    if (c == 0) {
        int fd = open(path, O_RDONLY);
        if (fd < 0) _exit(100);
        if (flock(fd, op | LOCK_NB) == 0) _exit(0);
        _exit(errno == EWOULDBLOCK ? 1 : 101);
    }
    int st = 0;
    while (waitpid(c, &st, 0) < 0 && errno == EINTR) {}
    if (!WIFEXITED(st) || WEXITSTATUS(st) > 1) return EIO;
    return WEXITSTATUS(st) ? EWOULDBLOCK : 0;
}

/* Take a record lock (cmd F_SETLK, F_SETLKW or F_OFD_SETLK) or die. */
static __attribute__((unused)) void take(int fd, int cmd, short type, off_t start, off_t len) {
    struct flock l;
    memset(&l, 0, sizeof l);
    l.l_type = type;
    l.l_whence = SEEK_SET;
    l.l_start = start;
    l.l_len = len;
    if (fcntl(fd, cmd, &l)) die("fcntl lock");
}

/* Whether /proc/locks shows pid waiting (a `->` line) for a POSIX lock. */
static __attribute__((unused)) int waiting_in_proc_locks(pid_t pid) {
    FILE *f = fopen("/proc/locks", "re");
    if (!f) return 0;
    char line[512], want[32];
    snprintf(want, sizeof want, " %d ", (int)pid);
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "-> POSIX") && strstr(line, want)) found = 1;
    fclose(f);
    return found;
}

/* If a file `check` exists: remove it, run verify() (checks only, changes
 * nothing) and print `checked ok` or `checked FAIL ...`. */
static __attribute__((unused)) void answer_check(void (*verify)(const char *)) {
    if (access("check", F_OK) != 0 || unlink("check") != 0) return;
    int before = g_failures;
    verify("check");
    if (g_failures == before) out("checked ok\n");
    else out("checked FAIL %s\n", g_failbuf);
}
#endif
