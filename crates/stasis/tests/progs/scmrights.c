/* scmrights: file descriptors in flight (SCM_RIGHTS) in UNIX sockets, of several
 * kinds and two levels deep.
 *
 * Set up before `ready`, every in-flight descriptor closed in the process (the
 * copy in flight is the only one left):
 * - P, a SOCK_STREAM socketpair {P0, P1}: P1 wrote "de" carrying three
 *   descriptors: the read end of a pipe holding "pipe-data", the file `scm.dat`
 *   opened read-write at offset 3, an eventfd with counter 7; then "fgh", then
 *   "ij" carrying the read end of a pipe holding "pipe4". (Where a stream's
 *   message with descriptors starts after other unread bytes cannot be seen: the
 *   descriptors come back with the first of those bytes, here with "f".)
 * - D, a SOCK_DGRAM socketpair {D0, D1}: D1 sent "m0"; "m1" carrying X0, one end
 *   of a SOCK_STREAM socketpair {X0, X1} whose queue holds "inner" (sent by X1)
 *   carrying the read end of a second pipe holding "pipe2-data"; "m2" carrying
 *   the write end of a third pipe (its read end K kept by the process); "m3"
 *   carrying a memfd holding "memfd-data" (closed) and an eventfd G the process
 *   also keeps open (the same open file description, in flight and held).
 * Then `tick N` every ~20 ms.
 *
 * At `go`: P0 reads exactly "de" with three descriptors (the pipe's read end
 * gives "pipe-data", the file is scm.dat at offset 3, the eventfd reads 7), then
 * "fghij" with one (its pipe gives "pipe4"), then nothing; D0 gets "m0" with none,
 * "m1" with X0 (X0 reads "inner" with the second pipe's read end, which gives
 * "pipe2-data", and X0 and X1 are still connected both ways), "m2" with the
 * write end (what it writes arrives at K), "m3" with the memfd (its content is
 * there) and G's description (what is written to G is read through it), then
 * nothing.
 * Output: `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>

static void send_fds(int s, const char *data, const int *fds, int n) {
    struct iovec iov = {(void *)data, strlen(data)};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof(int) * 8)];
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    if (n > 0) {
        m.msg_control = u.b;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
        memcpy(CMSG_DATA(h), fds, sizeof(int) * (size_t)n);
    }
    if (sendmsg(s, &m, 0) != (ssize_t)strlen(data)) die("sendmsg");
}

/* Receives `len` bytes (MSG_DONTWAIT) that must be `want`, with exactly
 * `nfds` descriptors (stored in `fds`). */
static void recv_fds(int s, const char *what, const char *want, int nfds, int *fds) {
    char buf[64] = {0};
    size_t len = strlen(want);
    struct iovec iov = {buf, len};
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof(int) * 8)];
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.b;
    m.msg_controllen = sizeof u.b;
    ssize_t n = recvmsg(s, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
        fail("%s: no '%s' (%s)", what, want, strerror(errno));
        return;
    }
    CHECK((size_t)n == len && memcmp(buf, want, len) == 0, "%s: got '%s', want '%s'", what, buf,
          want);
    int got = 0;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS) continue;
        int k = (int)((h->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(h) + i * sizeof(int), sizeof fd);
            if (got < nfds) fds[got] = fd;
            else close(fd);
            got++;
        }
    }
    CHECK(got == nfds, "%s: '%s' came with %d descriptors, want %d", what, want, got, nfds);
    for (int i = got; i < nfds; i++) fds[i] = -1;
}

static void expect_read(int fd, const char *what, const char *want) {
    char buf[64] = {0};
    ssize_t n = read(fd, buf, sizeof buf - 1);
    CHECK(n == (ssize_t)strlen(want) && memcmp(buf, want, strlen(want)) == 0,
          "%s: read %zd '%s', want '%s'", what, n, buf, want);
}

static void expect_nothing(int s, const char *what) {
    char b[16];
    ssize_t n = recv(s, b, sizeof b, MSG_DONTWAIT);
    CHECK(n < 0 && errno == EAGAIN, "%s: more queued than expected (%zd)", what, n);
}

int main(void) {
    setup();
    int P[2], D[2], X[2], p1[2], p2[2], p3[2], p4[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, P) || socketpair(AF_UNIX, SOCK_DGRAM, 0, D) ||
        socketpair(AF_UNIX, SOCK_STREAM, 0, X) || pipe(p1) || pipe(p2) || pipe(p3) || pipe(p4))
        die("socketpair/pipe");
    if (write(p1[1], "pipe-data", 9) != 9 || write(p2[1], "pipe2-data", 10) != 10 ||
        write(p4[1], "pipe4", 5) != 5)
        die("write");
    close(p1[1]);
    close(p2[1]);
    close(p4[1]);
    int f = open("scm.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (f < 0 || write(f, "0123456789", 10) != 10 || lseek(f, 3, SEEK_SET) != 3) die("scm.dat");
    struct stat fst;
    if (fstat(f, &fst)) die("fstat");
    int e = eventfd(7, 0);
    if (e < 0) die("eventfd");

    int three[3] = {p1[0], f, e};
    send_fds(P[1], "de", three, 3);
    send_fds(P[1], "fgh", NULL, 0);
    send_fds(P[1], "ij", &p4[0], 1);
    close(p1[0]);
    close(p4[0]);
    close(f);
    close(e);

    send_fds(X[1], "inner", &p2[0], 1);
    close(p2[0]);
    send_fds(D[1], "m0", NULL, 0);
    send_fds(D[1], "m1", &X[0], 1);
    close(X[0]);
    send_fds(D[1], "m2", &p3[1], 1);
    close(p3[1]);
    int mfd = memfd_create("scm-memfd", 0);
    if (mfd < 0 || write(mfd, "memfd-data", 10) != 10) die("memfd");
    int G = eventfd(0, EFD_NONBLOCK);
    if (G < 0) die("eventfd G");
    int two[2] = {mfd, G};
    send_fds(D[1], "m3", two, 2);
    close(mfd);

    out("ready P0=%d D0=%d X1=%d K=%d G=%d\n", P[0], D[0], X[1], p3[0], G);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        out("tick %u\n", n);
        sleep_ms(20);
    }

    int got[3];
    recv_fds(P[0], "P0", "de", 3, got);
    if (got[0] >= 0) expect_read(got[0], "the pipe in flight", "pipe-data");
    if (got[1] >= 0) {
        struct stat st;
        CHECK(fstat(got[1], &st) == 0 && st.st_ino == fst.st_ino && st.st_dev == fst.st_dev,
              "the file in flight is not scm.dat");
        CHECK(lseek(got[1], 0, SEEK_CUR) == 3, "the file in flight is not at offset 3");
        CHECK((fcntl(got[1], F_GETFL) & O_ACCMODE) == O_RDWR, "the file in flight is not O_RDWR");
    }
    if (got[2] >= 0) {
        uint64_t v = 0;
        CHECK(read(got[2], &v, 8) == 8 && v == 7, "the eventfd in flight reads %llu, want 7",
              (unsigned long long)v);
    }
    recv_fds(P[0], "P0", "fghij", 1, got);
    if (got[0] >= 0) expect_read(got[0], "the second pipe in flight in P0", "pipe4");
    expect_nothing(P[0], "P0");

    recv_fds(D[0], "D0", "m0", 0, got);
    recv_fds(D[0], "D0", "m1", 1, got);
    int x0 = got[0];
    if (x0 >= 0) {
        recv_fds(x0, "X0", "inner", 1, got);
        if (got[0] >= 0) expect_read(got[0], "the pipe in flight in X0", "pipe2-data");
        expect_nothing(x0, "X0");
        CHECK(write(X[1], "to-x0", 5) == 5, "X1: write: %s", strerror(errno));
        expect_read(x0, "X0 from X1", "to-x0");
        CHECK(write(x0, "to-x1", 5) == 5, "X0: write: %s", strerror(errno));
        expect_read(X[1], "X1 from X0", "to-x1");
    }
    recv_fds(D[0], "D0", "m2", 1, got);
    if (got[0] >= 0) {
        CHECK(write(got[0], "w", 1) == 1, "the pipe's write end in flight: %s", strerror(errno));
        expect_read(p3[0], "K", "w");
    }
    recv_fds(D[0], "D0", "m3", 2, got);
    if (got[0] >= 0) {
        char b[16] = {0};
        CHECK(pread(got[0], b, 10, 0) == 10 && memcmp(b, "memfd-data", 10) == 0,
              "the memfd in flight holds '%s'", b);
    }
    if (got[1] >= 0) {
        uint64_t one = 5, v = 0;
        CHECK(write(G, &one, 8) == 8, "G: write: %s", strerror(errno));
        CHECK(read(got[1], &v, 8) == 8 && v == 5,
              "the eventfd in flight is not G's description (read %llu)", (unsigned long long)v);
    }
    expect_nothing(D[0], "D0");
    finish("ticks=%u", n);
}
