/* Helpers for the IP socket test programs (tcppair, tcpstate, udp, tcpclient,
 * redisclient): loopback addresses of either family, printing and comparing
 * socket names. Only loopback addresses (127.0.0.1, ::1) and the wildcard
 * addresses of listeners are ever bound; ports are always chosen by the
 * kernel (port 0). */
#ifndef STASIS_TEST_INET_H
#define STASIS_TEST_INET_H
#include "util.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <linux/sockios.h>

typedef struct {
    struct sockaddr_storage ss;
    socklen_t len;
} addr_t;

/* Loopback (any = 0) or wildcard (any = 1) address of family 4 or 6, port. */
static __attribute__((unused)) addr_t mkaddr(int fam, int any, unsigned port) {
    addr_t a;
    memset(&a, 0, sizeof a);
    if (fam == 4) {
        struct sockaddr_in *s = (struct sockaddr_in *)&a.ss;
        s->sin_family = AF_INET;
        s->sin_addr.s_addr = htonl(any ? INADDR_ANY : INADDR_LOOPBACK);
        s->sin_port = htons((uint16_t)port);
        a.len = sizeof *s;
    } else {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&a.ss;
        s->sin6_family = AF_INET6;
        s->sin6_addr = any ? in6addr_any : in6addr_loopback;
        s->sin6_port = htons((uint16_t)port);
        a.len = sizeof *s;
    }
    return a;
}

static __attribute__((unused)) unsigned port_of(const addr_t *a) {
    if (a->ss.ss_family == AF_INET) return ntohs(((const struct sockaddr_in *)&a->ss)->sin_port);
    if (a->ss.ss_family == AF_INET6) return ntohs(((const struct sockaddr_in6 *)&a->ss)->sin6_port);
    return 0;
}

/* "127.0.0.1:5000", "[::1]:5000" (the form stasis inspect uses). */
static __attribute__((unused)) const char *showaddr(const addr_t *a, char *buf, size_t cap) {
    char h[INET6_ADDRSTRLEN] = "?";
    if (a->ss.ss_family == AF_INET) {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->ss)->sin_addr, h, sizeof h);
        snprintf(buf, cap, "%s:%u", h, port_of(a));
    } else if (a->ss.ss_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->ss)->sin6_addr, h, sizeof h);
        snprintf(buf, cap, "[%s]:%u", h, port_of(a));
    } else {
        snprintf(buf, cap, "(family %d, len %u)", a->ss.ss_family, (unsigned)a->len);
    }
    return buf;
}

/* Same family, address and port (flowinfo and scope ignored). */
static __attribute__((unused)) int sameaddr(const addr_t *x, const addr_t *y) {
    if (x->ss.ss_family != y->ss.ss_family) return 0;
    if (x->ss.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const void *)&x->ss, *b = (const void *)&y->ss;
        return a->sin_port == b->sin_port && a->sin_addr.s_addr == b->sin_addr.s_addr;
    }
    if (x->ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const void *)&x->ss, *b = (const void *)&y->ss;
        return a->sin6_port == b->sin6_port && memcmp(&a->sin6_addr, &b->sin6_addr, 16) == 0;
    }
    return 0;
}

static __attribute__((unused)) addr_t sockname(int fd) {
    addr_t a;
    memset(&a, 0, sizeof a);
    a.len = sizeof a.ss;
    if (getsockname(fd, (struct sockaddr *)&a.ss, &a.len)) a.ss.ss_family = AF_UNSPEC;
    return a;
}

static __attribute__((unused)) addr_t peername(int fd) {
    addr_t a;
    memset(&a, 0, sizeof a);
    a.len = sizeof a.ss;
    if (getpeername(fd, (struct sockaddr *)&a.ss, &a.len)) a.ss.ss_family = AF_UNSPEC;
    return a;
}

/* getsockname (peer = 0) / getpeername (peer = 1) of fd must equal want. */
static __attribute__((unused)) void check_name(int fd, int peer, const addr_t *want, const char *what) {
    addr_t got = peer ? peername(fd) : sockname(fd);
    if (!sameaddr(&got, want)) {
        char b1[80], b2[80];
        fail("%s (fd %d): %s is %s, want %s", what, fd, peer ? "peer name" : "name",
             got.ss.ss_family == AF_UNSPEC ? strerror(errno) : showaddr(&got, b1, sizeof b1),
             showaddr(want, b2, sizeof b2));
    }
}

static __attribute__((unused)) int getint(int fd, int level, int opt) {
    int v = -12345;
    socklen_t l = sizeof v;
    if (getsockopt(fd, level, opt, &v, &l)) return -12345;
    return v;
}

static __attribute__((unused)) void setint(int fd, int level, int opt, int v, const char *what) {
    if (setsockopt(fd, level, opt, &v, sizeof v)) die(what);
}

/* A TCP listener of family fam bound to loopback (or the wildcard). */
static __attribute__((unused)) int tcp_listener(int fam, int any, int backlog) {
    int l = socket(fam == 4 ? AF_INET : AF_INET6, SOCK_STREAM, 0);
    if (l < 0) die("socket (listener)");
    addr_t a = mkaddr(fam, any, 0);
    if (bind(l, (struct sockaddr *)&a.ss, a.len)) die("bind (listener)");
    if (listen(l, backlog)) die("listen");
    return l;
}

/* A blocking TCP connection to a (returns the fd). */
static __attribute__((unused)) int tcp_connect(const addr_t *a) {
    int c = socket(a->ss.ss_family, SOCK_STREAM, 0);
    if (c < 0) die("socket (client)");
    if (connect(c, (const struct sockaddr *)&a->ss, a->len)) die("connect");
    return c;
}

static __attribute__((unused)) int inq(int fd) {
    int v = -1;
    if (ioctl(fd, SIOCINQ, &v)) return -1;
    return v;
}

static __attribute__((unused)) int outq(int fd) {
    int v = -1;
    if (ioctl(fd, SIOCOUTQ, &v)) return -1;
    return v;
}

static __attribute__((unused)) void set_nonblock(int fd, int on) {
    int f = fcntl(fd, F_GETFL);
    if (f < 0 || fcntl(fd, F_SETFL, on ? f | O_NONBLOCK : f & ~O_NONBLOCK)) die("fcntl O_NONBLOCK");
}

static __attribute__((unused)) uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Read exactly n bytes (blocking fd); 0 on success, -1 on EOF, errno on error. */
static __attribute__((unused)) int read_exact(int fd, void *buf, size_t n) {
    char *b = buf;
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return errno;
        if (r == 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Write all n bytes (blocking fd, no SIGPIPE); 0 or errno. */
static __attribute__((unused)) int send_exact(int fd, const void *buf, size_t n) {
    const char *b = buf;
    while (n > 0) {
        ssize_t r = send(fd, b, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return errno;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

static __attribute__((unused)) const char *errname(int e) {
    switch (e) {
    case -1: return "EOF";
    case ECONNRESET: return "ECONNRESET";
    case EPIPE: return "EPIPE";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ENOTCONN: return "ENOTCONN";
    case EBADF: return "EBADF";
    default: return strerror(e);
    }
}

#endif
