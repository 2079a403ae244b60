/* sharedfiles: processes sharing one file descriptor table (clone CLONE_FILES)
 * still share it after restart.
 *
 * P opens before.txt and creates child C with clone(CLONE_FILES) (no CLONE_VM) and
 * child D with plain fork (a copy of the table). C and D block reading their
 * command pipes. Prints `ready pid=P c=C d=D`, then `tick N` every 20 ms. At `go`:
 * P opens after.txt (fd N) and tells C and D the number: C must see after.txt at N
 * (same inode), D must not; C opens fromc.txt (fd M) and tells P: P must see it at M;
 * P closes M and C must find M closed; C moves before.txt's offset and P sees it.
 * Output `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>

static int to_c[2], to_p[2], to_d[2], from_d[2], before;

static int read_int(int fd) {
    int v = -1;
    if (read(fd, &v, sizeof v) != sizeof v) return -1;
    return v;
}
static void write_int(int fd, int v) { write_all(fd, (const char *)&v, sizeof v); }

static int same_file(int fd, const char *path) {
    struct stat a, b;
    return fstat(fd, &a) == 0 && stat(path, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev;
}

static int c_main(void *arg) {
    (void)arg;
    int n = read_int(to_c[0]);
    write_int(to_p[1], same_file(n, "after.txt"));
    int m = open("fromc.txt", O_RDWR | O_CREAT, 0600);
    write_int(to_p[1], m);
    (void)read_int(to_c[0]); /* P closed it */
    errno = 0;
    write_int(to_p[1], fcntl(m, F_GETFD) < 0 && errno == EBADF);
    lseek(before, 3, SEEK_SET);
    write_int(to_p[1], 1);
    _exit(0);
}

int main(void) {
    setup();
    if (pipe(to_c) || pipe(to_p) || pipe(to_d) || pipe(from_d)) die("pipe");
    before = open("before.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (before < 0) die("open before.txt");
    write_all(before, "hello", 5);
    unlink("after.txt");
    unlink("fromc.txt");
    static char stack[256 * 1024];
    pid_t c = clone(c_main, stack + sizeof stack, CLONE_FILES | SIGCHLD, NULL);
    if (c < 0) die("clone(CLONE_FILES)");
    pid_t d = fork();
    if (d < 0) die("fork");
    if (d == 0) {
        int n = read_int(to_d[0]);
        errno = 0;
        write_int(from_d[1], !same_file(n, "after.txt"));
        _exit(0);
    }
    out("ready pid=%d c=%d d=%d\n", (int)getpid(), (int)c, (int)d);
    unsigned t = 0;
    for (; !go_exists(); t++) {
        answer_ping();
        out("tick %u\n", t);
        sleep_ms(20);
    }
    int n = open("after.txt", O_RDWR | O_CREAT, 0600);
    if (n < 0) die("open after.txt");
    write_int(to_c[1], n);
    write_int(to_d[1], n);
    CHECK(read_int(to_p[0]) == 1, "C does not see fd %d that P opened after the restart", n);
    CHECK(read_int(from_d[0]) == 1, "D (a plain fork) sees fd %d that P opened after the restart", n);
    int m = read_int(to_p[0]);
    CHECK(m >= 0 && same_file(m, "fromc.txt"), "P does not see fd %d that C opened", m);
    close(m);
    write_int(to_c[1], 1);
    CHECK(read_int(to_p[0]) == 1, "C still sees fd %d that P closed", m);
    CHECK(read_int(to_p[0]) == 1, "C did not move the offset");
    CHECK(lseek(before, 0, SEEK_CUR) == 3, "before.txt's offset is %ld, not 3", (long)lseek(before, 0, SEEK_CUR));
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "C did not end well");
    CHECK(waitpid(d, &st, 0) == d && WIFEXITED(st) && WEXITSTATUS(st) == 0, "D did not end well");
    finish("ticks=%u", t);
}
