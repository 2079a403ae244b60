/* fifo: a named pipe between a writer child and a reader parent.
 * The parent creates ./fifo (mkfifo) and forks; the child opens it O_WRONLY,
 * the parent O_RDONLY. The child writes 16-byte records {seq, h(seq)} every
 * ~2 ms; at `go` it writes {END, count} and exits 0. The parent, every
 * ~20 ms, reads all complete records but 3 (so the FIFO always holds >= 3
 * records: data in flight at any moment), checking sequence and content.
 * Prints `ready child=PID rfd=F`, then `tick N recs=R`. At `go` it reads up
 * to END (sequence intact, END's count right), then EOF; reaps the child
 * (exit 0); then checks that ./fifo is a FIFO and the very one its fd reads
 * (same inode; a record written through a new O_WRONLY|O_NONBLOCK open of the
 * path arrives on the old fd). Output: `OK ticks=N recs=R` / `FAIL ...`. */
#include "util.h"
#include <sys/ioctl.h>
#include <sys/wait.h>

#define END 0xffffffffffffffffULL
#define KEEP 3

static uint64_t h(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static int read_full(int fd, void *buf, size_t n) {
    char *b = buf;
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR) return -2;
        if (r <= 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

int main(void) {
    setup();
    unlink("fifo");
    if (mkfifo("fifo", 0600)) die("mkfifo");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        int w = open("fifo", O_WRONLY);
        if (w < 0) {
            out("FAIL child: open fifo: %s\n", strerror(errno));
            _exit(1);
        }
        uint64_t seq = 0;
        for (;;) {
            if (go_exists()) {
                uint64_t r[2] = {END, seq};
                write_all(w, (const char *)r, sizeof r);
                _exit(0);
            }
            uint64_t r[2] = {seq, h(seq)};
            write_all(w, (const char *)r, sizeof r);
            seq++;
            sleep_ms(2);
        }
    }
    int rfd = open("fifo", O_RDONLY);
    if (rfd < 0) die("open fifo");
    uint64_t recs = 0;
    int end = 0;
    unsigned n = 0;
    int ready = 0;
    while (!end) {
        int go = go_exists();
        int avail = 0;
        if (ioctl(rfd, FIONREAD, &avail)) fail("FIONREAD: %s", strerror(errno));
        size_t nrec = (size_t)avail / 16;
        /* after go: everything, up to END (blocking) */
        size_t take = go ? (size_t)-1 : nrec > KEEP ? nrec - KEEP : 0;
        for (size_t i = 0; i < take; i++) {
            uint64_t r[2];
            int e = read_full(rfd, r, sizeof r);
            if (e) {
                fail("record %llu: %s", (unsigned long long)recs, e == -2 ? "EINTR" : "EOF/error");
                end = 1;
                break;
            }
            if (r[0] == END) {
                CHECK(r[1] == recs, "END says %llu records, %llu read", (unsigned long long)r[1],
                      (unsigned long long)recs);
                end = 1;
                break;
            }
            if (r[0] != recs || r[1] != h(recs)) {
                fail("record %llu arrived as {%llu, %llx}", (unsigned long long)recs,
                     (unsigned long long)r[0], (unsigned long long)r[1]);
                end = 1;
                break;
            }
            recs++;
        }
        if (go) break;
        if (!ready && recs >= 5) {
            out("ready child=%d rfd=%d\n", (int)child, rfd);
            ready = 1;
        }
        if (ready) out("tick %u recs=%llu\n", n++, (unsigned long long)recs);
        sleep_ms(20);
    }
    char c;
    CHECK(read(rfd, &c, 1) == 0, "no EOF after END");
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child && WIFEXITED(st) && WEXITSTATUS(st) == 0,
          "child ended with status %#x", st);
    struct stat a, b;
    CHECK(stat("fifo", &a) == 0 && S_ISFIFO(a.st_mode), "./fifo is not a FIFO (%s)", strerror(errno));
    CHECK(fstat(rfd, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev,
          "./fifo (inode %lu) is not the FIFO the fd reads (inode %lu)", (unsigned long)a.st_ino,
          (unsigned long)b.st_ino);
    int w2 = open("fifo", O_WRONLY | O_NONBLOCK);
    if (w2 < 0) {
        fail("open ./fifo for writing: %s (no reader on it?)", strerror(errno));
    } else {
        uint64_t mark[2] = {42, h(42)}, got[2] = {0, 0};
        CHECK(write(w2, mark, sizeof mark) == sizeof mark, "write to ./fifo: %s", strerror(errno));
        CHECK(read_full(rfd, got, sizeof got) == 0 && got[0] == 42 && got[1] == h(42),
              "a record written to ./fifo did not arrive on the old fd");
        close(w2);
    }
    finish("ticks=%u recs=%llu", n, (unsigned long long)recs);
}
