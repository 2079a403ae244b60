/* deleted: files deleted while open must come back as the same inodes.
 *
 * In a directory `del` of its cwd, R makes
 *  - A: a sparse file (data at 0 and at 1 MiB, a hole between, size 1 MiB + 6000),
 *    mode 0640, fixed times, opened twice separately (fd a1 O_RDWR at offset 100,
 *    fd a2 O_RDONLY at offset 200), then unlinked;
 *  - B: a file with two hard links b1 and b2, opened through each (fds b1 O_RDWR,
 *    b2 O_RDWR|O_APPEND), both links removed;
 * and forks C, which inherits a1 (the same open file description). Prints
 * `ready pid=R child=C`, then `tick N` every ~20 ms until `go` exists.
 * Then R checks that a1 and a2 are one inode (fstat), the other's offsets, flags,
 * sizes, mode, times, the hole (SEEK_HOLE/SEEK_DATA), that what is written through
 * a1 is read through a2, through b1 through b2, and what C writes through its a1
 * reads through R's a2. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <sys/wait.h>

#define MIB (1024 * 1024)
#define ASIZE (MIB + 6000)

static const struct timespec ATIME = {1100000000, 500000000}, MTIME = {1000000000, 123456789};

int main(void) {
    setup();
    if (mkdir("del", 0755) && errno != EEXIST) die("mkdir del");
    int a1 = open("del/a", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (a1 < 0) die("open del/a");
    int a2 = open("del/a", O_RDONLY);
    if (a2 < 0) die("open del/a again");
    char head[4096], tail[6000];
    for (size_t i = 0; i < sizeof head; i++) head[i] = (char)('a' + i % 26);
    for (size_t i = 0; i < sizeof tail; i++) tail[i] = (char)('A' + i % 26);
    if (pwrite(a1, head, sizeof head, 0) != (ssize_t)sizeof head) die("pwrite head");
    if (pwrite(a1, tail, sizeof tail, MIB) != (ssize_t)sizeof tail) die("pwrite tail");
    if (fchmod(a1, 0640)) die("fchmod");
    struct timespec ts[2] = {ATIME, MTIME};
    if (futimens(a1, ts)) die("futimens");
    if (lseek(a1, 100, SEEK_SET) != 100 || lseek(a2, 200, SEEK_SET) != 200) die("lseek");
    if (unlink("del/a")) die("unlink del/a");
    struct stat sa;
    if (fstat(a1, &sa)) die("fstat a1");
    off_t hole0 = lseek(a1, 0, SEEK_HOLE);
    lseek(a1, 100, SEEK_SET);

    int b1 = open("del/b1", O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (b1 < 0) die("open del/b1");
    if (write(b1, "0123456789", 10) != 10) die("write b1");
    if (link("del/b1", "del/b2")) die("link");
    int b2 = open("del/b2", O_RDWR | O_APPEND);
    if (b2 < 0) die("open del/b2");
    if (unlink("del/b1") || unlink("del/b2")) die("unlink b1/b2");

    int rep[2], cmd[2];
    if (pipe(rep) || pipe(cmd)) die("pipe");
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        close(rep[0]);
        close(cmd[1]);
        close(a2);
        char x;
        if (read(cmd[0], &x, 1) != 1) _exit(2);
        /* Through the inherited description: R sees it through a2. */
        if (pwrite(a1, "CHILD", 5, 8192) != 5) _exit(3);
        if (write(rep[1], "k", 1) != 1) _exit(4);
        _exit(0);
    }
    close(rep[1]);
    close(cmd[0]);
    out("ready pid=%d child=%d ino=%lu hole=%lld\n", (int)getpid(), (int)c, (unsigned long)sa.st_ino,
        (long long)hole0);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }

    struct stat s1, s2, t1, t2;
    if (fstat(a1, &s1) || fstat(a2, &s2) || fstat(b1, &t1) || fstat(b2, &t2)) die("fstat");
    CHECK(s1.st_ino == s2.st_ino && s1.st_dev == s2.st_dev, "a1 and a2 are different inodes");
    CHECK(t1.st_ino == t2.st_ino && t1.st_dev == t2.st_dev, "b1 and b2 are different inodes");
    CHECK(s1.st_ino != t1.st_ino || s1.st_dev != t1.st_dev, "a and b are one inode");
    CHECK(s1.st_nlink == 0 && t1.st_nlink == 0, "nlink %lu %lu", (unsigned long)s1.st_nlink,
          (unsigned long)t1.st_nlink);
    CHECK(s1.st_size == ASIZE, "a size %lld", (long long)s1.st_size);
    CHECK((s1.st_mode & 07777) == 0640, "a mode %o", s1.st_mode & 07777);
    CHECK(s1.st_uid == getuid(), "a owner %u", (unsigned)s1.st_uid);
    CHECK(s1.st_mtim.tv_sec == MTIME.tv_sec && s1.st_mtim.tv_nsec == MTIME.tv_nsec, "a mtime %lld.%09ld",
          (long long)s1.st_mtim.tv_sec, s1.st_mtim.tv_nsec);
    CHECK(s1.st_atim.tv_sec == ATIME.tv_sec, "a atime %lld", (long long)s1.st_atim.tv_sec);
    CHECK(lseek(a1, 0, SEEK_CUR) == 100 && lseek(a2, 0, SEEK_CUR) == 200, "offsets %lld %lld",
          (long long)lseek(a1, 0, SEEK_CUR), (long long)lseek(a2, 0, SEEK_CUR));
    CHECK((fcntl(a1, F_GETFL) & O_ACCMODE) == O_RDWR && (fcntl(a2, F_GETFL) & O_ACCMODE) == O_RDONLY,
          "a access modes");
    CHECK(fcntl(b2, F_GETFL) & O_APPEND, "b2 lost O_APPEND");
    /* The hole is still there (where the filesystem had one), and the data. */
    off_t hole = lseek(a1, 0, SEEK_HOLE), data = lseek(a1, 4096, SEEK_DATA);
    CHECK(hole == hole0, "first hole at %lld, was %lld", (long long)hole, (long long)hole0);
    if (hole0 == 4096) CHECK(data == MIB, "data after the hole at %lld", (long long)data);
    CHECK(s1.st_blocks * 512 < 256 * 1024, "a takes %lld blocks: not sparse", (long long)s1.st_blocks);
    char buf[6000];
    CHECK(pread(a2, buf, 4096, 0) == 4096 && memcmp(buf, head, 4096) == 0, "a head differs");
    CHECK(pread(a2, buf, sizeof tail, MIB) == (ssize_t)sizeof tail && memcmp(buf, tail, sizeof tail) == 0,
          "a tail differs");
    CHECK(pread(a2, buf, 100, 4096 * 4) == 100 && buf[0] == 0 && buf[99] == 0, "a hole is not zeros");
    /* One inode: writes through one fd are read through the other. */
    if (pwrite(a1, "through-a1", 10, 5000) != 10) die("pwrite a1");
    CHECK(pread(a2, buf, 10, 5000) == 10 && memcmp(buf, "through-a1", 10) == 0, "a2 does not see a1's write");
    lseek(a1, 100, SEEK_SET);
    if (pwrite(b1, "XY", 2, 0) != 2) die("pwrite b1");
    CHECK(pread(b2, buf, 10, 0) == 10 && memcmp(buf, "XY23456789", 10) == 0, "b2 does not see b1's write");
    if (write(b2, "END", 3) != 3) die("write b2");
    CHECK(pread(b1, buf, 13, 0) == 13 && memcmp(buf + 10, "END", 3) == 0, "b1 does not see b2's append");
    /* The child's inherited a1. */
    if (write(cmd[1], "x", 1) != 1) die("write cmd");
    char k;
    CHECK(read(rep[0], &k, 1) == 1, "no word from C");
    CHECK(pread(a2, buf, 5, 8192) == 5 && memcmp(buf, "CHILD", 5) == 0, "a2 does not see C's write");
    CHECK(lseek(a1, 0, SEEK_CUR) == 100, "a1 offset moved");
    int st;
    CHECK(waitpid(c, &st, 0) == c && WIFEXITED(st) && WEXITSTATUS(st) == 0, "C did not end well");
    finish("ticks=%u", n);
}
