/* opath: O_PATH descriptors. In its cwd it makes a file `f` (with content), a
 * directory `d` holding a file `inner`, a FIFO `p`, a symbolic link `l` -> `f`, a
 * file `gone` and a directory `gd`, and opens with O_PATH: f, d, p, /dev/null, l
 * itself (O_PATH|O_NOFOLLOW), gone (also opened O_RDWR), gd, a memfd (through
 * /proc/self/fd) and /proc/self/status; then removes gone and gd. Prints `ready pid=P refused=FD`, then `tick N` every ~20 ms until `go` exists
 * (answering `ping`), and checks, for each O_PATH fd, against what it saw before:
 * F_GETFL has O_PATH, fstat gives the same file type (and device and inode for the
 * files still there), read(2) fails with EBADF, no offset; the directory works for
 * openat(fd, "inner") and fchdir; the link fd is the link (fstatat AT_EMPTY_PATH
 * says S_IFLNK, readlinkat(fd, "") gives "f"); the deleted file's O_PATH fd is the
 * same inode as its O_RDWR fd (bytes written through one are read by reopening the
 * other through /proc/self/fd), and so is the memfd's with the memfd; the status
 * file reopened reads the process's status; the removed directory is a directory with no links
 * in which nothing can be created. Output: `OK ...` / `FAIL ...`.
 * With argument `refuse` it also holds an O_PATH fd of a FIFO `q` removed since,
 * which stasis cannot restore (its number is `refused=` of the ready line). */
#include "util.h"
#include <sys/stat.h>

enum { F, D, P, NUL, L, GONE, GD, MFD, PROC, N };
static const char *names[N] = {"f", "d", "p", "/dev/null", "l", "gone", "gd", "memfd",
                               "/proc/self/status"};
static int fds[N];
static struct stat before[N];

static void check_fd(int k) {
    int fd = fds[k];
    int fl = fcntl(fd, F_GETFL);
    CHECK(fl >= 0 && (fl & O_PATH), "%s: F_GETFL %#x lacks O_PATH", names[k], fl);
    struct stat st;
    if (fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0) {
        fail("%s: fstatat: %s", names[k], strerror(errno));
        return;
    }
    CHECK((st.st_mode & S_IFMT) == (before[k].st_mode & S_IFMT), "%s: file type %o, was %o",
          names[k], st.st_mode & S_IFMT, before[k].st_mode & S_IFMT);
    if (k != GONE && k != GD && k != MFD && k != PROC)
        CHECK(st.st_dev == before[k].st_dev && st.st_ino == before[k].st_ino,
              "%s: another inode (%lu, was %lu)", names[k], (unsigned long)st.st_ino,
              (unsigned long)before[k].st_ino);
    char c;
    errno = 0;
    CHECK(read(fd, &c, 1) < 0 && errno == EBADF, "%s: read(2) did not fail with EBADF", names[k]);
    errno = 0;
    CHECK(lseek(fd, 0, SEEK_CUR) < 0 && errno == EBADF, "%s: lseek did not fail with EBADF",
          names[k]);
}

int main(int argc, char **argv) {
    setup();
    int refuse = argc > 1 && strcmp(argv[1], "refuse") == 0;
    int w = open("f", O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (w < 0 || write(w, "hello", 5) != 5) die("f");
    close(w);
    if (mkdir("d", 0755) && errno != EEXIST) die("mkdir d");
    w = open("d/inner", O_CREAT | O_WRONLY, 0644);
    if (w < 0) die("d/inner");
    close(w);
    unlink("p");
    if (mkfifo("p", 0600)) die("mkfifo");
    unlink("l");
    if (symlink("f", "l")) die("symlink");
    w = open("gone", O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (w < 0 || write(w, "before", 6) != 6) die("gone");
    close(w);
    if (mkdir("gd", 0750) && errno != EEXIST) die("mkdir gd");

    fds[F] = open("f", O_PATH);
    fds[D] = open("d", O_PATH | O_DIRECTORY);
    fds[P] = open("p", O_PATH);
    fds[NUL] = open("/dev/null", O_PATH);
    fds[L] = open("l", O_PATH | O_NOFOLLOW);
    fds[GONE] = open("gone", O_PATH);
    fds[GD] = open("gd", O_PATH);
    int mfd = memfd_create("opath-memfd", 0);
    if (mfd < 0 || write(mfd, "memfd!", 6) != 6) die("memfd");
    char mpath[64];
    snprintf(mpath, sizeof mpath, "/proc/self/fd/%d", mfd);
    fds[MFD] = open(mpath, O_PATH);
    fds[PROC] = open("/proc/self/status", O_PATH);
    for (int k = 0; k < N; k++)
        if (fds[k] < 0) die(names[k]);
    int rw = open("gone", O_RDWR);
    if (rw < 0) die("gone O_RDWR");
    if (unlink("gone")) die("unlink gone");
    if (rmdir("gd")) die("rmdir gd");
    for (int k = 0; k < N; k++)
        if (fstatat(fds[k], "", &before[k], AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)) die("fstatat");
    int here = open(".", O_PATH | O_DIRECTORY);
    if (here < 0) die("open .");

    int q = -1;
    if (refuse) {
        unlink("q");
        if (mkfifo("q", 0600)) die("mkfifo q");
        q = open("q", O_PATH);
        if (q < 0 || unlink("q")) die("q");
    }
    out("ready pid=%d refused=%d\n", (int)getpid(), q);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }

    for (int k = 0; k < N; k++) check_fd(k);
    /* The directory. */
    int in = openat(fds[D], "inner", O_RDONLY);
    CHECK(in >= 0, "openat(d, inner): %s", strerror(errno));
    if (in >= 0) close(in);
    if (fchdir(fds[D]) == 0) {
        CHECK(access("inner", F_OK) == 0, "fchdir(d) did not enter d");
        if (fchdir(here)) die("fchdir back");
    } else {
        fail("fchdir(d): %s", strerror(errno));
    }
    /* The link itself. */
    char target[64] = "";
    ssize_t t = readlinkat(fds[L], "", target, sizeof target - 1);
    CHECK(t == 1 && target[0] == 'f', "readlinkat(l, \"\") gave %zd %.*s", t, (int)(t > 0 ? t : 0),
          target);
    /* The file through f: reopened for reading through /proc. */
    char path[64], buf[16] = "";
    snprintf(path, sizeof path, "/proc/self/fd/%d", fds[F]);
    int r = open(path, O_RDONLY);
    CHECK(r >= 0 && read(r, buf, sizeof buf) == 5 && memcmp(buf, "hello", 5) == 0,
          "f reopened through /proc does not read hello");
    if (r >= 0) close(r);
    /* The deleted file: one inode with the O_RDWR fd. */
    struct stat a, b;
    CHECK(fstat(rw, &a) == 0 && fstatat(fds[GONE], "", &b, AT_EMPTY_PATH) == 0 &&
              a.st_dev == b.st_dev && a.st_ino == b.st_ino && b.st_nlink == 0,
          "gone: the O_PATH fd and the O_RDWR fd are not one deleted inode");
    CHECK(pwrite(rw, "after!", 6, 0) == 6, "gone: pwrite");
    snprintf(path, sizeof path, "/proc/self/fd/%d", fds[GONE]);
    r = open(path, O_RDONLY);
    memset(buf, 0, sizeof buf);
    CHECK(r >= 0 && pread(r, buf, sizeof buf, 0) == 6 && memcmp(buf, "after!", 6) == 0,
          "gone: the O_PATH fd reopened does not read what the O_RDWR fd wrote (%s)", buf);
    if (r >= 0) close(r);
    /* The memfd: one inode with the memfd itself. */
    CHECK(fstat(mfd, &a) == 0 && fstatat(fds[MFD], "", &b, AT_EMPTY_PATH) == 0 &&
              a.st_dev == b.st_dev && a.st_ino == b.st_ino,
          "memfd: the O_PATH fd and the memfd are not one inode");
    CHECK(pwrite(mfd, "again!", 6, 0) == 6, "memfd: pwrite");
    snprintf(path, sizeof path, "/proc/self/fd/%d", fds[MFD]);
    r = open(path, O_RDONLY);
    memset(buf, 0, sizeof buf);
    CHECK(r >= 0 && pread(r, buf, sizeof buf, 0) == 6 && memcmp(buf, "again!", 6) == 0,
          "memfd: the O_PATH fd reopened does not read what the memfd wrote (%s)", buf);
    if (r >= 0) close(r);
    /* The process's own /proc/PID/status. */
    snprintf(path, sizeof path, "/proc/self/fd/%d", fds[PROC]);
    r = open(path, O_RDONLY);
    memset(buf, 0, sizeof buf);
    CHECK(r >= 0 && read(r, buf, 5) == 5 && memcmp(buf, "Name:", 5) == 0,
          "/proc/self/status: the O_PATH fd reopened does not read Name: (%s)", buf);
    if (r >= 0) close(r);
    /* The removed directory. */
    CHECK(fstatat(fds[GD], "", &b, AT_EMPTY_PATH) == 0 && S_ISDIR(b.st_mode) && b.st_nlink == 0,
          "gd: not a removed directory");
    errno = 0;
    CHECK(openat(fds[GD], "x", O_CREAT | O_WRONLY, 0600) < 0 && errno == ENOENT,
          "gd: a file could be created in the removed directory (%s)", strerror(errno));
    finish("ticks=%u", n);
}
