/* sharedfile: a parent and a child append records to one file through one
 * shared open file description (opened once by the parent before fork,
 * O_WRONLY without O_APPEND, so only the shared offset keeps them apart). Each
 * process also has a dup of the descriptor and alternates between the two fds.
 * Turn-taking over two pipes: the parent writes `P <k>`, passes the turn to
 * the child which writes `C <k>` and passes it back; records are 16 bytes.
 * The parent prints `ready parent=P child=C`, then `tick N records=R` every
 * ~20 ms (a turn every ~0.5 ms). At `go` it stops the child, which reports
 * the offset of its fds; the parent reaps it and checks: both offsets and its
 * own equal the file size = 16 * records, O_APPEND is not set, and the file
 * holds exactly P0 C0 P1 C1 ... (no record lost, repeated or overwritten).
 * Output: `OK records=R ticks=N` / `FAIL ...`. */
#include "util.h"
#include <sys/wait.h>

#define REC 16

static void record(char *b, char who, unsigned long long k) {
    char t[32];
    snprintf(t, sizeof t, "%c %013llu\n", who, k % 10000000000000ULL);
    memcpy(b, t, REC);
}

static int read_full(int fd, void *buf, size_t n) {
    char *b = buf;
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

static void put(int fd, char who, unsigned long long k) {
    char b[REC];
    record(b, who, k);
    if (write(fd, b, REC) != REC) {
        out("FAIL %c: write of record %llu: %s\n", who, k, strerror(errno));
        _exit(1);
    }
}

int main(void) {
    setup();
    int fd = open("records.dat", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die("open records.dat");
    int fd2 = dup(fd);
    if (fd2 < 0) die("dup");
    int p2c[2], c2p[2];
    if (pipe(p2c) || pipe(c2p)) die("pipe");
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(p2c[1]);
        close(c2p[0]);
        unsigned long long k = 0;
        for (;;) {
            char c;
            if (read_full(p2c[0], &c, 1) != 0) _exit(2);
            if (c == 'S') break;
            put(k % 2 ? fd2 : fd, 'C', k);
            k++;
            write_all(c2p[1], "T", 1);
        }
        int64_t rep[4] = {(int64_t)lseek(fd, 0, SEEK_CUR), (int64_t)lseek(fd2, 0, SEEK_CUR), (int64_t)k,
                          (int64_t)((fcntl(fd, F_GETFL) & O_APPEND) != 0)};
        write_all(c2p[1], (const char *)rep, sizeof rep);
        _exit(getppid() == parent ? 0 : 3);
    }
    close(p2c[0]);
    close(c2p[1]);
    out("ready parent=%d child=%d\n", (int)parent, (int)child);
    unsigned long long k = 0, tick = 0;
    double next = 0;
    while (!go_exists()) {
        put(k % 2 ? fd : fd2, 'P', k);
        write_all(p2c[1], "T", 1);
        char c;
        if (read_full(c2p[0], &c, 1) != 0 || c != 'T') {
            out("FAIL child did not pass the turn back after record %llu\n", k);
            exit(1);
        }
        k++;
        double now = mono_now();
        if (now >= next) {
            out("tick %llu records=%llu\n", tick++, 2 * k);
            next = now + 0.02;
        }
        struct timespec ts = {0, 500000};
        nanosleep(&ts, NULL);
    }
    write_all(p2c[1], "S", 1);
    int64_t rep[4];
    if (read_full(c2p[0], rep, sizeof rep) != 0) die("reading the child's report");
    int st = 0;
    pid_t w = waitpid(child, &st, 0);
    CHECK(w == child, "waitpid(%d) returned %d: %s", (int)child, (int)w, strerror(errno));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child ended with status 0x%x", st);

    off_t mine = lseek(fd, 0, SEEK_CUR), mine2 = lseek(fd2, 0, SEEK_CUR);
    struct stat sb;
    if (fstat(fd, &sb)) die("fstat");
    int64_t want = (int64_t)(2 * k * REC);
    CHECK((int64_t)sb.st_size == want, "file size %lld, want %lld (%llu records)", (long long)sb.st_size,
          (long long)want, 2 * k);
    CHECK((int64_t)rep[2] == (int64_t)k, "child wrote %lld records, parent %llu", (long long)rep[2], k);
    CHECK(rep[0] == want && rep[1] == want, "child's offsets %lld/%lld, want %lld (offset not shared)",
          (long long)rep[0], (long long)rep[1], (long long)want);
    CHECK(rep[3] == 0, "O_APPEND set on the child's fd");
    CHECK((fcntl(fd, F_GETFL) & O_APPEND) == 0, "O_APPEND set on the parent's fd");
    CHECK(mine == want && mine2 == want, "parent's offsets %lld/%lld, want %lld", (long long)mine, (long long)mine2,
          (long long)want);

    int rfd = open("records.dat", O_RDONLY);
    if (rfd < 0) die("open records.dat for reading");
    char *buf = malloc((size_t)sb.st_size + 1);
    if (sb.st_size && read_full(rfd, buf, (size_t)sb.st_size) != 0) die("reading records.dat");
    close(rfd);
    unsigned long long bad = 0;
    for (unsigned long long i = 0; i < 2 * k && (off_t)((i + 1) * REC) <= sb.st_size; i++) {
        char e[REC];
        record(e, i % 2 ? 'C' : 'P', i / 2);
        if (memcmp(e, buf + i * REC, REC) != 0) {
            if (bad++ == 0)
                fail("record %llu at offset %llu is '%.15s', want '%.15s'", i, i * REC, buf + i * REC, e);
        }
    }
    CHECK(bad == 0, "%llu of %llu records wrong", bad, 2 * k);
    finish("records=%llu ticks=%llu", 2 * k, tick);
}
