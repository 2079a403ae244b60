/* pipecap: pipe capacity and unread pipe content across checkpoint/restart.
 * Pipe P is resized with F_SETPIPE_SZ to SIZE (argv[1], bytes) and gets FILL
 * (argv[2]) bytes of a pseudo-random stream; pipe Q keeps the default
 * capacity and is filled completely (non-blocking writes until EAGAIN). A
 * child holds the read ends and reads nothing until told to.
 * Output: `ready size=S fill=F qfill=Q`, `tick N` every ~20 ms. At `go` the
 * parent checks F_GETPIPE_SZ and FIONREAD of both pipes, appends
 * SIZE - FILL - 4096 more bytes of the stream to P without blocking (only
 * possible with the large capacity), closes the write ends and tells the
 * child, which checks F_GETPIPE_SZ on its end and reads both pipes to EOF
 * comparing every byte with the expected streams. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/wait.h>

struct stream {
    uint64_t s;
    unsigned char buf[8];
    int have;
};

static unsigned char next_byte(struct stream *st) {
    if (st->have == 0) {
        uint64_t x = st->s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        st->s = x;
        memcpy(st->buf, &x, 8);
        st->have = 8;
    }
    return st->buf[8 - st->have--];
}

static void gen(struct stream *st, unsigned char *b, size_t n) {
    for (size_t i = 0; i < n; i++) b[i] = next_byte(st);
}

/* Child: read fd to EOF comparing with the stream; returns bytes read or -1-offset of the first mismatch. */
static long long verify(int fd, uint64_t seed, long long *first_bad) {
    struct stream st = {seed, {0}, 0};
    unsigned char b[65536], e[65536];
    long long total = 0;
    *first_bad = -1;
    for (;;) {
        ssize_t r = read(fd, b, sizeof b);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        gen(&st, e, (size_t)r);
        if (*first_bad < 0 && memcmp(b, e, (size_t)r) != 0)
            for (ssize_t i = 0; i < r; i++)
                if (b[i] != e[i]) {
                    *first_bad = total + i;
                    break;
                }
        total += r;
    }
    return total;
}

int main(int argc, char **argv) {
    setup();
    if (argc < 3) die("usage: pipecap SIZE FILL");
    int size = atoi(argv[1]);
    long fill = atol(argv[2]);
    int p[2], q[2], ctl[2];
    if (pipe(p) || pipe(q) || pipe(ctl)) die("pipe");
    if (fcntl(p[1], F_SETPIPE_SZ, size) < 0) die("F_SETPIPE_SZ");
    int got = fcntl(p[1], F_GETPIPE_SZ);
    if (got != size) {
        out("FAIL F_GETPIPE_SZ %d after F_SETPIPE_SZ %d\n", got, size);
        exit(1);
    }
    int qcap = fcntl(q[1], F_GETPIPE_SZ);
    struct stream sp = {0x1234567887654321ULL, {0}, 0}, sq = {0x0badc0ffee15600dULL, {0}, 0};
    unsigned char *buf = malloc((size_t)size);
    gen(&sp, buf, (size_t)fill);
    write_all(p[1], (const char *)buf, (size_t)fill);
    fcntl(q[1], F_SETFL, O_NONBLOCK);
    long qfill = 0;
    for (;;) {
        unsigned char b[4096];
        struct stream save = sq;
        gen(&sq, b, sizeof b);
        ssize_t r = write(q[1], b, sizeof b);
        if (r < 0) {
            sq = save;
            break;
        }
        if (r != (ssize_t)sizeof b) { /* partial: resync the stream */
            sq = save;
            gen(&sq, b, (size_t)r);
        }
        qfill += r;
    }
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(p[1]);
        close(q[1]);
        close(ctl[1]);
        char c;
        while (read(ctl[0], &c, 1) < 0 && errno == EINTR) {}
        int code = 0;
        int cap = fcntl(p[0], F_GETPIPE_SZ);
        if (cap != size) {
            out("child: F_GETPIPE_SZ of the read end is %d, want %d\n", cap, size);
            code |= 1;
        }
        long long bad;
        long long n = verify(p[0], 0x1234567887654321ULL, &bad);
        long want = size - 4096;
        if (n != want || bad >= 0) {
            out("child: big pipe: read %lld bytes (want %ld), first wrong byte at %lld\n", n, want, bad);
            code |= 2;
        }
        n = verify(q[0], 0x0badc0ffee15600dULL, &bad);
        if (n != qfill || bad >= 0) {
            out("child: full pipe: read %lld bytes (want %ld), first wrong byte at %lld\n", n, qfill, bad);
            code |= 4;
        }
        _exit(code);
    }
    close(p[0]);
    close(q[0]);
    close(ctl[0]);
    out("ready size=%d fill=%ld qfill=%ld qcap=%d\n", size, fill, qfill, qcap);
    unsigned long long tick = 0;
    while (!go_exists()) {
        out("tick %llu\n", tick++);
        sleep_ms(20);
    }
    int cap = fcntl(p[1], F_GETPIPE_SZ), cq = fcntl(q[1], F_GETPIPE_SZ);
    CHECK(cap == size, "F_GETPIPE_SZ of the big pipe is %d, want %d", cap, size);
    CHECK(cq == qcap, "F_GETPIPE_SZ of the full pipe is %d, want %d", cq, qcap);
    int inp = -1, inq = -1;
    ioctl(p[1], FIONREAD, &inp);
    ioctl(q[1], FIONREAD, &inq);
    CHECK(inp == fill, "big pipe holds %d bytes, want %ld", inp, fill);
    CHECK(inq == qfill, "full pipe holds %d bytes, want %ld", inq, qfill);
    /* More data: fits only if the capacity really is `size`. */
    long more = size - fill - 4096;
    gen(&sp, buf, (size_t)more);
    fcntl(p[1], F_SETFL, O_NONBLOCK);
    ssize_t w = write(p[1], buf, (size_t)more);
    CHECK(w == more, "non-blocking write of %ld more bytes wrote %zd (%s)", more, w, w < 0 ? strerror(errno) : "short");
    if (w >= 0 && w < more) {
        fcntl(p[1], F_SETFL, 0);
        write_all(p[1], (const char *)buf + w, (size_t)(more - w));
    }
    close(p[1]);
    close(q[1]);
    write_all(ctl[1], "g", 1);
    int st = 0;
    pid_t wp = waitpid(child, &st, 0);
    CHECK(wp == child && WIFEXITED(st) && WEXITSTATUS(st) == 0, "reader child: waitpid %d status 0x%x", (int)wp, st);
    finish("size=%d fill=%ld qfill=%ld ticks=%llu", size, fill, qfill, tick);
}
