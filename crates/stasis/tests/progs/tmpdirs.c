/* tmpdirs: what a job keeps in /tmp and /dev/shm must come back after a restart, with
 * its metadata, and a job's /tmp is its own (stasis run --tmp private).
 *
 * Sets up, under /tmp/job: a directory a/b (mode 0750), and a/ as working directory of a child;
 * a/data (1 MiB pattern, mtime 2001-09-09); hard, a hard link to it; sym -> a/data;
 * a FIFO (0640); ro (mode 0400); sparse (64 MiB with 4 KiB of data at 0 and at 32
 * MiB, the rest holes); log, kept open with O_APPEND, one line per tick. In /dev/shm:
 * seg (1 MiB) mapped MAP_SHARED, whose first word counts the ticks. With argument
 * `mark=X`, first checks /tmp/mark does not exist (someone else's) and creates it
 * holding X.
 * Prints `ready pid=P`, then `tick N` every ~20 ms until `go` exists (answers `ping`
 * with `pong`). Then checks all of it (`OK ...` / `FAIL ...`). */
#include "util.h"
#include <signal.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <sys/wait.h>

#define MB (1 << 20)

static char pattern(size_t i) { return (char)((i * 7 + 3) % 251); }

static void write_file(const char *path, size_t len, mode_t mode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) die(path);
    char *b = malloc(len);
    for (size_t i = 0; i < len; i++) b[i] = pattern(i);
    write_all(fd, b, len);
    free(b);
    if (fchmod(fd, mode)) die("fchmod");
    close(fd);
}

static void check_pattern(const char *path, size_t off, size_t len, size_t base) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { fail("open %s: %s", path, strerror(errno)); return; }
    char *b = malloc(len);
    ssize_t n = pread(fd, b, len, (off_t)off);
    close(fd);
    if (n != (ssize_t)len) { fail("%s: read %zd of %zu", path, n, len); free(b); return; }
    for (size_t i = 0; i < len; i++)
        if (b[i] != pattern(base + i)) { fail("%s: byte %zu differs", path, off + i); break; }
    free(b);
}

int main(int argc, char **argv) {
    setup();
    const char *mark = argc > 1 && strncmp(argv[1], "mark=", 5) == 0 ? argv[1] + 5 : NULL;
    if (mark) {
        if (access("/tmp/mark", F_OK) == 0) die("/tmp/mark exists: this /tmp is not the job's own");
        int fd = open("/tmp/mark", O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) die("/tmp/mark");
        write_all(fd, mark, strlen(mark));
        close(fd);
    }
    if (mkdir("/tmp/job", 0755) || mkdir("/tmp/job/a", 0755) || mkdir("/tmp/job/a/b", 0750)) die("mkdir");
    if (chmod("/tmp/job/a/b", 0750)) die("chmod");
    write_file("/tmp/job/a/data", MB, 0644);
    struct timeval tv[2] = {{1000000000, 0}, {1000000000, 0}};
    if (utimes("/tmp/job/a/data", tv)) die("utimes");
    if (link("/tmp/job/a/data", "/tmp/job/hard")) die("link");
    if (symlink("a/data", "/tmp/job/sym")) die("symlink");
    if (mkfifo("/tmp/job/fifo", 0640) || chmod("/tmp/job/fifo", 0640)) die("mkfifo");
    write_file("/tmp/job/ro", 100, 0400);
    int sp = open("/tmp/job/sparse", O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (sp < 0 || ftruncate(sp, 64 * MB)) die("sparse");
    char pg[4096];
    for (size_t i = 0; i < sizeof pg; i++) pg[i] = pattern(i);
    if (pwrite(sp, pg, sizeof pg, 0) != sizeof pg || pwrite(sp, pg, sizeof pg, 32 * MB) != sizeof pg) die("pwrite");
    close(sp);
    /* C: a process whose working directory is in /tmp (the main one's is the test's,
     * where `go` appears). */
    pid_t c = fork();
    if (c < 0) die("fork");
    if (c == 0) {
        if (chdir("/tmp/job/a")) _exit(1);
        for (;;) pause();
    }
    int log = open("/tmp/job/log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log < 0) die("log");
    int shm = open("/dev/shm/seg", O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (shm < 0 || ftruncate(shm, MB)) die("/dev/shm/seg");
    volatile unsigned long *seg = mmap(NULL, MB, PROT_READ | PROT_WRITE, MAP_SHARED, shm, 0);
    if (seg == MAP_FAILED) die("mmap");
    close(shm);
    out("ready pid=%d\n", (int)getpid());
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        char line[32];
        int k = snprintf(line, sizeof line, "tick %u\n", n);
        write_all(log, line, (size_t)k);
        seg[0] = n + 1;
        out("tick %u\n", n);
        sleep_ms(20);
    }
    char cwd[256] = "", cp[64];
    snprintf(cp, sizeof cp, "/proc/%d/cwd", (int)c);
    CHECK(readlink(cp, cwd, sizeof cwd - 1) > 0 && strcmp(cwd, "/tmp/job/a") == 0, "C's cwd %s", cwd);
    kill(c, SIGKILL);
    waitpid(c, NULL, 0);
    check_pattern("/tmp/job/a/data", 0, MB, 0);
    struct stat d, h, s;
    CHECK(stat("/tmp/job/a/data", &d) == 0 && d.st_mtime == 1000000000 && d.st_nlink == 2, "data: mtime %ld nlink %ld",
          (long)d.st_mtime, (long)d.st_nlink);
    CHECK(stat("/tmp/job/hard", &h) == 0 && h.st_ino == d.st_ino, "hard is not a link of data");
    char t[64] = "";
    CHECK(readlink("/tmp/job/sym", t, sizeof t - 1) > 0 && strcmp(t, "a/data") == 0, "sym -> %s", t);
    CHECK(lstat("/tmp/job/fifo", &s) == 0 && S_ISFIFO(s.st_mode) && (s.st_mode & 07777) == 0640, "fifo mode %o",
          s.st_mode);
    CHECK(stat("/tmp/job/ro", &s) == 0 && (s.st_mode & 07777) == 0400, "ro mode %o", s.st_mode & 07777);
    CHECK(stat("/tmp/job/a/b", &s) == 0 && (s.st_mode & 07777) == 0750, "a/b mode %o", s.st_mode & 07777);
    CHECK(stat("/tmp/job/sparse", &s) == 0 && s.st_size == 64 * MB, "sparse size %ld", (long)s.st_size);
    CHECK(s.st_blocks * 512 < 4 * MB, "sparse: %ld bytes allocated, its holes were filled",
          (long)s.st_blocks * 512);
    check_pattern("/tmp/job/sparse", 0, 4096, 0);
    check_pattern("/tmp/job/sparse", 32 * MB, 4096, 0);
    CHECK(seg[0] == n, "/dev/shm/seg counts %lu, want %u", seg[0], n);
    /* The log holds every tick once. */
    int fd = open("/tmp/job/log", O_RDONLY);
    char *buf = malloc(4 * MB);
    ssize_t len = fd < 0 ? -1 : read(fd, buf, 4 * MB - 1);
    unsigned lines = 0, bad = 0;
    if (len > 0) {
        buf[len] = 0;
        for (char *l = strtok(buf, "\n"); l; l = strtok(NULL, "\n")) {
            unsigned v;
            if (sscanf(l, "tick %u", &v) != 1 || v != lines) bad++;
            lines++;
        }
    }
    CHECK(lines == n && bad == 0, "log holds %u lines (%u out of order), want %u", lines, bad, n);
    if (mark) {
        char m[64] = "";
        int mf = open("/tmp/mark", O_RDONLY);
        ssize_t k = mf < 0 ? -1 : read(mf, m, sizeof m - 1);
        CHECK(k > 0 && strcmp(m, mark) == 0, "/tmp/mark holds %s, want %s", m, mark);
    }
    finish("ticks=%u", n);
}
