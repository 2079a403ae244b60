/* unixlisten: named UNIX sockets.
 *   unixlisten ABSTRACT_NAME [PENDING_BYTES]
 * Sets up, in one process:
 *   L1  a SOCK_STREAM listener bound to <cwd>/lsock, L2 one bound to the
 *       abstract name "\0ABSTRACT_NAME";
 *   C1/A1, C2/A2  a client connected to each listener and the accepted end;
 *       K = 5 chunks are kept queued in both directions of each (every tick
 *       reads the oldest chunk of each direction and writes a new one);
 *   S/SA  a client of L1 (accepted as SA) that wrote 500 bytes and then did
 *       shutdown(SHUT_WR); SA wrote 300 bytes to S; nobody reads them yet;
 *   P1, P2  a client of each listener that is NOT accepted yet and has sent
 *       PENDING_BYTES (default 1000; at most 2000) / 700 bytes (none if
 *       PENDING_BYTES is 0) into the pending connection;
 *   D/E  a SOCK_DGRAM socket D bound to <cwd>/dsock and a client E connected
 *       to it that keeps K datagrams queued at D (zero-length ones included).
 * Prints `ready l1=FD l2=FD a1=FD a2=FD c1=FD c2=FD s=FD sa=FD p1=FD p2=FD
 * d=FD e=FD`, then `tick N msgs=M` every ~20 ms. At `go` it checks: every
 * queue holds exactly the chunks/datagrams still expected (then EAGAIN); the
 * names (getsockname of L1, A1, D; getpeername of C1, E: the path;
 * getsockname of L2, A2, getpeername of C2: the abstract name); L1 and L2
 * accept the pending connection now (its name is the listener's, its bytes
 * are there, an answer reaches the client) and have no other;
 * SA reads the 500 bytes then EOF, S reads the 300 bytes, a send on S fails
 * with EPIPE while SA -> S still works; a new client can connect to each
 * listener and is accepted. Output: `OK ticks=N msgs=M` / `FAIL ...`. */
#include "util.h"
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

#define K 5

struct chan {
    const char *name;
    int type;
    int fd[2]; /* dir d: send on fd[d], receive on fd[1 - d] */
    int ndirs;
    uint64_t sent[2], rcvd[2];
    int broken[2];
};

static uint64_t total_msgs;

static size_t msg_len(const struct chan *c, uint64_t s) {
    if (c->type == SOCK_DGRAM) return s % 4 == 1 ? 0 : 1 + (s * 53) % 500;
    return 1 + (s * 37) % 300;
}

static uint8_t msg_byte(const struct chan *c, int dir, uint64_t s, size_t i) {
    return (uint8_t)(s * 131 + i * 7 + (uint64_t)c->type * 29 + (uint64_t)dir * 101 +
                     (uint64_t)c->name[0] + (i >> 8));
}

static void send_one(struct chan *c, int dir) {
    if (c->broken[dir]) return;
    uint8_t buf[1024];
    uint64_t s = c->sent[dir];
    size_t n = msg_len(c, s);
    for (size_t i = 0; i < n; i++) buf[i] = msg_byte(c, dir, s, i);
    ssize_t r = send(c->fd[dir], buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r != (ssize_t)n) {
        fail("%s dir %d: send of chunk %llu (%zu bytes) returned %zd (%s)", c->name, dir,
             (unsigned long long)s, n, r, r < 0 ? strerror(errno) : "short");
        c->broken[dir] = 1;
        return;
    }
    c->sent[dir]++;
}

static void recv_one(struct chan *c, int dir) {
    if (c->broken[dir]) return;
    uint8_t buf[2048];
    uint64_t s = c->rcvd[dir];
    size_t want = msg_len(c, s), got = 0;
    int fd = c->fd[1 - dir];
    if (c->type == SOCK_STREAM) {
        while (got < want) {
            ssize_t r = recv(fd, buf + got, want - got, MSG_DONTWAIT);
            if (r <= 0) {
                fail("%s dir %d: chunk %llu: only %zu of %zu bytes there (%s)", c->name, dir,
                     (unsigned long long)s, got, want, r < 0 ? strerror(errno) : "EOF");
                c->broken[dir] = 1;
                return;
            }
            got += (size_t)r;
        }
    } else {
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
        if (r < 0 || (size_t)r != want) {
            fail("%s: datagram %llu: recv returned %zd, want %zu bytes (%s)", c->name,
                 (unsigned long long)s, r, want, r < 0 ? strerror(errno) : "boundaries lost");
            c->broken[dir] = 1;
            return;
        }
    }
    for (size_t i = 0; i < want; i++)
        if (buf[i] != msg_byte(c, dir, s, i)) {
            fail("%s dir %d: chunk %llu differs at byte %zu", c->name, dir, (unsigned long long)s,
                 i);
            c->broken[dir] = 1;
            return;
        }
    c->rcvd[dir]++;
    total_msgs++;
}

static void drain(struct chan *c) {
    for (int d = 0; d < c->ndirs; d++) {
        while (!c->broken[d] && c->rcvd[d] < c->sent[d]) recv_one(c, d);
        if (c->broken[d]) continue;
        char b;
        ssize_t r = recv(c->fd[1 - d], &b, 1, MSG_DONTWAIT);
        CHECK(r < 0 && errno == EAGAIN, "%s dir %d: more data than sent (recv returned %zd)",
              c->name, d, r);
    }
}

static struct sockaddr_un path_addr, dpath_addr, abs_addr;
static socklen_t path_len, dpath_len, abs_len;

static void make_path(struct sockaddr_un *a, socklen_t *l, const char *dir, const char *name) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if ((size_t)snprintf(a->sun_path, sizeof a->sun_path, "%s/%s", dir, name) >=
        sizeof a->sun_path) {
        out("FAIL socket path too long: %s/%s\n", dir, name);
        exit(1);
    }
    *l = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(a->sun_path) + 1);
}

static int sock(int type) {
    int s = socket(AF_UNIX, type, 0);
    if (s < 0) die("socket");
    return s;
}

static int connect_to(int type, const struct sockaddr_un *a, socklen_t l) {
    int s = sock(type);
    if (connect(s, (const struct sockaddr *)a, l)) die("connect");
    return s;
}

static const char *show(const struct sockaddr_un *a, socklen_t l, char *buf, size_t cap) {
    size_t n = l > offsetof(struct sockaddr_un, sun_path) ? l - offsetof(struct sockaddr_un, sun_path) : 0;
    if (n == 0) return "(unnamed)";
    if (a->sun_path[0] == 0) snprintf(buf, cap, "@%.*s", (int)(n - 1), a->sun_path + 1);
    else snprintf(buf, cap, "%.*s", (int)n, a->sun_path);
    return buf;
}

/* Compare getsockname (peer = 0) / getpeername (peer = 1) of fd with want. */
static void check_name(int fd, int peer, const struct sockaddr_un *want, socklen_t wl,
                       const char *what) {
    struct sockaddr_un a;
    socklen_t l = sizeof a;
    memset(&a, 0, sizeof a);
    int r = peer ? getpeername(fd, (struct sockaddr *)&a, &l) : getsockname(fd, (struct sockaddr *)&a, &l);
    if (r) {
        fail("%s (fd %d): %s: %s", what, fd, peer ? "getpeername" : "getsockname", strerror(errno));
        return;
    }
    /* a path may come back with or without its terminating NUL counted */
    int same;
    if (want->sun_path[0] == 0)
        same = l == wl && memcmp(a.sun_path, want->sun_path, wl - offsetof(struct sockaddr_un, sun_path)) == 0;
    else
        same = a.sun_path[0] != 0 && strcmp(a.sun_path, want->sun_path) == 0;
    if (!same) {
        char b1[256], b2[256];
        fail("%s (fd %d): %s is '%s', want '%s'", what, fd, peer ? "peer name" : "name",
             show(&a, l, b1, sizeof b1), show(want, wl, b2, sizeof b2));
    }
}

static void fill(uint8_t *b, size_t n, int seed) {
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)(i * 13 + (size_t)seed * 7 + (i >> 7));
}

/* Read exactly n bytes (non-blocking: they must be there) and compare. */
static int read_expect(int fd, size_t n, int seed, const char *what) {
    uint8_t buf[2048], want[2048];
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r <= 0) {
            fail("%s: only %zu of %zu bytes there (%s)", what, got, n, r < 0 ? strerror(errno) : "EOF");
            return -1;
        }
        got += (size_t)r;
    }
    fill(want, n, seed);
    if (memcmp(buf, want, n)) {
        fail("%s: wrong content", what);
        return -1;
    }
    return 0;
}

static void send_fill(int fd, size_t n, int seed) {
    uint8_t b[2048];
    fill(b, n, seed);
    if (send(fd, b, n, MSG_NOSIGNAL) != (ssize_t)n) die("send");
}

/* Accept the pending connection of listener l (its client p sent n bytes). */
static void accept_pending(int l, int p, size_t n, int seed, const struct sockaddr_un *a,
                           socklen_t al, const char *what) {
    fcntl(l, F_SETFL, fcntl(l, F_GETFL) | O_NONBLOCK);
    int x = accept4(l, NULL, NULL, SOCK_NONBLOCK);
    if (x < 0) {
        fail("%s: no pending connection to accept (%s)", what, strerror(errno));
        return;
    }
    check_name(x, 0, a, al, what);
    if (read_expect(x, n, seed, what) == 0) {
        char b;
        ssize_t r = recv(x, &b, 1, MSG_DONTWAIT);
        CHECK(r < 0 && errno == EAGAIN, "%s: more than the %zu bytes sent (recv returned %zd)",
              what, n, r);
    }
    if (send(x, "ack", 3, MSG_NOSIGNAL) != 3) fail("%s: send ack: %s", what, strerror(errno));
    char b[4] = {0};
    ssize_t r = recv(p, b, sizeof b, MSG_DONTWAIT);
    CHECK(r == 3 && memcmp(b, "ack", 3) == 0, "%s: the client did not get the answer (%zd)", what, r);
    int y = accept4(l, NULL, NULL, SOCK_NONBLOCK);
    CHECK(y < 0 && errno == EAGAIN, "%s: a second pending connection (accept4 returned %d)", what, y);
    if (y >= 0) close(y);
    close(x);
}

/* A new client can connect to the listener and gets accepted. */
static void fresh_connection(int l, const struct sockaddr_un *a, socklen_t al, const char *what) {
    int c = sock(SOCK_STREAM);
    if (connect(c, (const struct sockaddr *)a, al)) {
        fail("%s: connect of a new client: %s", what, strerror(errno));
        close(c);
        return;
    }
    int x = accept4(l, NULL, NULL, SOCK_NONBLOCK);
    if (x < 0) {
        fail("%s: accept of a new client: %s", what, strerror(errno));
        close(c);
        return;
    }
    char b = 0;
    CHECK(send(c, "z", 1, MSG_NOSIGNAL) == 1 && recv(x, &b, 1, MSG_DONTWAIT) == 1 && b == 'z',
          "%s: no data through a new connection", what);
    close(x);
    close(c);
}

int main(int argc, char **argv) {
    setup();
    if (argc < 2) {
        out("FAIL usage: unixlisten ABSTRACT_NAME\n");
        return 2;
    }
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) die("getcwd");
    make_path(&path_addr, &path_len, cwd, "lsock");
    make_path(&dpath_addr, &dpath_len, cwd, "dsock");
    memset(&abs_addr, 0, sizeof abs_addr);
    abs_addr.sun_family = AF_UNIX;
    size_t an = strlen(argv[1]);
    if (an + 1 >= sizeof abs_addr.sun_path) return 2;
    memcpy(abs_addr.sun_path + 1, argv[1], an);
    abs_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + an);

    int l1 = sock(SOCK_STREAM), l2 = sock(SOCK_STREAM);
    if (bind(l1, (struct sockaddr *)&path_addr, path_len) || listen(l1, 8)) die("bind/listen lsock");
    if (bind(l2, (struct sockaddr *)&abs_addr, abs_len) || listen(l2, 8)) die("bind/listen abstract");
    int c1 = connect_to(SOCK_STREAM, &path_addr, path_len);
    int a1 = accept(l1, NULL, NULL);
    int c2 = connect_to(SOCK_STREAM, &abs_addr, abs_len);
    int a2 = accept(l2, NULL, NULL);
    if (a1 < 0 || a2 < 0) die("accept");
    int s = connect_to(SOCK_STREAM, &path_addr, path_len);
    int sa = accept(l1, NULL, NULL);
    if (sa < 0) die("accept S");
    send_fill(s, 500, 1);
    if (shutdown(s, SHUT_WR)) die("shutdown");
    send_fill(sa, 300, 2);
    size_t pend1 = argc > 2 ? strtoul(argv[2], NULL, 10) : 1000, pend2 = pend1 ? 700 : 0;
    if (pend1 > 2000) return 2;
    int p1 = connect_to(SOCK_STREAM, &path_addr, path_len);
    if (pend1) send_fill(p1, pend1, 3);
    int p2 = connect_to(SOCK_STREAM, &abs_addr, abs_len);
    if (pend2) send_fill(p2, pend2, 4);
    int d = sock(SOCK_DGRAM);
    if (bind(d, (struct sockaddr *)&dpath_addr, dpath_len)) die("bind dsock");
    int e = connect_to(SOCK_DGRAM, &dpath_addr, dpath_len);

    struct chan ch[3] = {
        {"path", SOCK_STREAM, {c1, a1}, 2, {0, 0}, {0, 0}, {0, 0}},
        {"abstract", SOCK_STREAM, {c2, a2}, 2, {0, 0}, {0, 0}, {0, 0}},
        {"dgram", SOCK_DGRAM, {e, d}, 1, {0, 0}, {0, 0}, {0, 0}},
    };
    for (int i = 0; i < 3; i++)
        for (int dir = 0; dir < ch[i].ndirs; dir++)
            for (int k = 0; k < K; k++) send_one(&ch[i], dir);
    out("ready l1=%d l2=%d a1=%d a2=%d c1=%d c2=%d s=%d sa=%d p1=%d p2=%d d=%d e=%d\n", l1, l2,
        a1, a2, c1, c2, s, sa, p1, p2, d, e);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        for (int i = 0; i < 3; i++)
            for (int dir = 0; dir < ch[i].ndirs; dir++) {
                recv_one(&ch[i], dir);
                send_one(&ch[i], dir);
            }
        out("tick %u msgs=%llu\n", n, (unsigned long long)total_msgs);
        sleep_ms(20);
    }
    for (int i = 0; i < 3; i++) drain(&ch[i]);
    check_name(l1, 0, &path_addr, path_len, "listener L1");
    check_name(a1, 0, &path_addr, path_len, "accepted A1");
    check_name(c1, 1, &path_addr, path_len, "client C1");
    check_name(sa, 0, &path_addr, path_len, "accepted SA");
    check_name(l2, 0, &abs_addr, abs_len, "listener L2");
    check_name(a2, 0, &abs_addr, abs_len, "accepted A2");
    check_name(c2, 1, &abs_addr, abs_len, "client C2");
    check_name(d, 0, &dpath_addr, dpath_len, "datagram D");
    check_name(e, 1, &dpath_addr, dpath_len, "datagram client E");
    accept_pending(l1, p1, pend1, 3, &path_addr, path_len, "pending on L1");
    accept_pending(l2, p2, pend2, 4, &abs_addr, abs_len, "pending on L2");
    /* the shut down connection */
    if (read_expect(sa, 500, 1, "SA (data before SHUT_WR)") == 0) {
        char b;
        ssize_t r = recv(sa, &b, 1, MSG_DONTWAIT);
        CHECK(r == 0, "SA: EOF expected after the data (S did SHUT_WR), recv returned %zd (%s)", r,
              r < 0 ? strerror(errno) : "data");
    }
    read_expect(s, 300, 2, "S (data from SA)");
    ssize_t r = send(s, "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    CHECK(r < 0 && errno == EPIPE, "send on S after SHUT_WR returned %zd (%s), want EPIPE", r,
          r < 0 ? strerror(errno) : "ok");
    send_fill(sa, 100, 5);
    read_expect(s, 100, 5, "S (data from SA after the restore)");
    fresh_connection(l1, &path_addr, path_len, "L1");
    fresh_connection(l2, &abs_addr, abs_len, "L2");
    struct stat st;
    CHECK(stat(path_addr.sun_path, &st) == 0 && S_ISSOCK(st.st_mode), "%s is not a socket",
          path_addr.sun_path);
    finish("ticks=%u msgs=%llu", n, (unsigned long long)total_msgs);
}
