/* procfiles: /proc files a process opened, and a pipe opened again through
 * /proc/self/fd, come back.
 *
 * P opens /proc/self/status (fd S, 5 bytes read: "Name:"), the directory
 * /proc/self (fd D), and, of its child K (which waits for `go`), /proc/K/stat
 * (fd KS) and the directory /proc/K (fd KD). It makes a pipe (r, w), opens it again
 * through /proc/self/fd: a second read end R2 (O_NONBLOCK), a second write end W2
 * and a read-write one RW, and writes "abc" into it.
 * Prints `ready pid=P child=K s=S d=D ks=N kd=N r2=N w2=N rw=N`, then `tick N`
 * every 20 ms. At `go` checks: reading S goes on after "Name:" with the program's
 * name, and S holds P's Pid line; D opens "status" of P; KS (from offset 0) shows
 * K's pid; KD opens K's "comm"; the pipe: r, R2, W2, RW are one pipe (same inode),
 * R2 alone is O_NONBLOCK (its own description), "def" written through W2 and "x"
 * through RW are read, after "abc", through R2 and r. Output `OK ticks=N`.
 * With the argument `parent`, P also holds /proc/PPID/status of its parent (outside
 * the job: the checkpoint must be refused). */
#include "util.h"
#include <signal.h>
#include <sys/wait.h>

static int read_file_at(int dirfd, const char *name, char *buf, size_t cap) {
    int f = openat(dirfd, name, O_RDONLY);
    if (f < 0) return -1;
    ssize_t n = read(f, buf, cap - 1);
    close(f);
    if (n < 0) return -1;
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    setup();
    pid_t k = fork();
    if (k < 0) die("fork");
    if (k == 0) {
        while (!go_exists()) sleep_ms(10);
        sleep_ms(500);
        _exit(0);
    }
    int s = open("/proc/self/status", O_RDONLY);
    if (s < 0) die("open /proc/self/status");
    char buf[8192];
    if (read(s, buf, 5) != 5 || memcmp(buf, "Name:", 5) != 0) die("reading /proc/self/status");
    int d = open("/proc/self", O_RDONLY | O_DIRECTORY);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)k);
    int ks = open(path, O_RDONLY);
    snprintf(path, sizeof path, "/proc/%d", (int)k);
    int kd = open(path, O_RDONLY | O_DIRECTORY);
    if (d < 0 || ks < 0 || kd < 0) die("open /proc files");
    int p[2];
    if (pipe(p)) die("pipe");
    snprintf(path, sizeof path, "/proc/self/fd/%d", p[0]);
    int r2 = open(path, O_RDONLY | O_NONBLOCK);
    int rw = open(path, O_RDWR);
    snprintf(path, sizeof path, "/proc/self/fd/%d", p[1]);
    int w2 = open(path, O_WRONLY);
    if (r2 < 0 || rw < 0 || w2 < 0) die("reopening the pipe through /proc");
    write_all(p[1], "abc", 3);
    if (argc > 1 && strcmp(argv[1], "parent") == 0) {
        snprintf(path, sizeof path, "/proc/%d/status", (int)getppid());
        if (open(path, O_RDONLY) < 0) die("open the parent's status");
    }
    out("ready pid=%d child=%d s=%d d=%d ks=%d kd=%d r2=%d w2=%d rw=%d\n", (int)getpid(), (int)k, s, d, ks, kd, r2,
        w2, rw);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }
    const char *me = strrchr(argv[0], '/');
    me = me ? me + 1 : argv[0];
    ssize_t got = read(s, buf, sizeof buf - 1);
    if (got < 0) got = 0;
    buf[got] = 0;
    char want[128];
    snprintf(want, sizeof want, "\t%.15s\n", me);
    CHECK(strncmp(buf, want, strlen(want)) == 0, "status after \"Name:\" reads '%.20s', not '%s'", buf, want);
    snprintf(want, sizeof want, "\nPid:\t%d\n", (int)getpid());
    CHECK(strstr(buf, want) != NULL, "status of fd %d does not show Pid %d", s, (int)getpid());
    CHECK(read_file_at(d, "status", buf, sizeof buf) > 0 && strstr(buf, want), "/proc/self dir: status of another process");
    CHECK(lseek(ks, 0, SEEK_SET) == 0, "lseek of the child's stat: %s", strerror(errno));
    got = read(ks, buf, sizeof buf - 1);
    CHECK(got > 0 && atoi(buf) == k, "the child's stat reads pid %d, not %d", got > 0 ? atoi(buf) : -1, (int)k);
    snprintf(want, sizeof want, "/proc/%d/comm", (int)k);
    char comm[64] = "";
    CHECK(read_file_at(kd, "comm", comm, sizeof comm) > 0, "comm through the child's /proc dir: %s", strerror(errno));
    char comm2[64] = "";
    int cf = open(want, O_RDONLY);
    if (cf >= 0) {
        ssize_t cn = read(cf, comm2, sizeof comm2 - 1);
        if (cn > 0) comm2[cn] = 0;
        close(cf);
    }
    CHECK(strcmp(comm, comm2) == 0, "the child's /proc dir shows comm '%s', not '%s'", comm, comm2);
    struct stat a, b;
    int fds[] = {r2, w2, rw};
    fstat(p[0], &a);
    for (int i = 0; i < 3; i++) {
        CHECK(fstat(fds[i], &b) == 0 && b.st_ino == a.st_ino, "fd %d is not the pipe of fd %d", fds[i], p[0]);
    }
    CHECK(fcntl(r2, F_GETFL) & O_NONBLOCK, "R2 lost O_NONBLOCK");
    CHECK(!(fcntl(p[0], F_GETFL) & O_NONBLOCK), "r became O_NONBLOCK (shares R2's description)");
    CHECK((fcntl(rw, F_GETFL) & O_ACCMODE) == O_RDWR, "RW is not read-write");
    CHECK((fcntl(w2, F_GETFL) & O_ACCMODE) == O_WRONLY, "W2 is not write-only");
    write_all(w2, "def", 3);
    write_all(rw, "x", 1);
    char got3[8] = "";
    CHECK(read(r2, got3, 3) == 3 && memcmp(got3, "abc", 3) == 0, "R2 read '%.3s', not abc", got3);
    CHECK(read(p[0], got3, 4) == 4 && memcmp(got3, "defx", 4) == 0, "r read '%.4s', not defx", got3);
    errno = 0;
    CHECK(read(r2, got3, 1) < 0 && errno == EAGAIN, "the pipe is not empty");
    int st;
    CHECK(waitpid(k, &st, 0) == k && WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child did not end well");
    finish("ticks=%u", n);
}
