/* tcpstate: TCP sockets in every state worth keeping, in one process.
 *
 *   L4  listener on 127.0.0.1:0 (SO_REUSEADDR, backlog 8) with two connections
 *       not accepted yet: P1 then P2 (at `go` they send 300 and 500 bytes);
 *   L6  listener on [::1]:0 (IPV6_V6ONLY=1) with P3 pending (200 bytes at go);
 *   LD  dual-stack listener on [::]:0 (IPV6_V6ONLY=0) with P4 pending,
 *       connected over IPv4 to 127.0.0.1 (100 bytes at go);
 *   LA  listener on 0.0.0.0:0, nothing pending;
 *   H/HA  a connection to L4 (H the client, HA accepted): H wrote 1000 bytes
 *       and did shutdown(SHUT_WR); HA wrote 700 bytes; nobody reads yet;
 *   O/OA  a connection to L4 whose ends carry non-default options:
 *       O: TCP_NODELAY, SO_SNDBUF, SO_RCVBUF, SO_KEEPALIVE with TCP_KEEPIDLE 77,
 *          TCP_KEEPINTVL 13, TCP_KEEPCNT 5, SO_LINGER on/7 s, SO_REUSEADDR,
 *          SO_REUSEPORT, O_NONBLOCK, F_SETOWN (own pid), F_SETSIG SIGUSR2;
 *       OA: TCP_CORK, SO_RCVBUF, SO_LINGER on/0 s, F_SETOWN (own pid), blocking.
 *       Every tick O sends a 16-byte record and OA reads the one before, so
 *       one record is always queued O -> OA.
 * Prints `ready l4=FD l6=FD ld=FD la=FD p1=FD p2=FD p3=FD p4=FD h=FD ha=FD o=FD
 * oa=FD port4=P port6=P portd=P porta=P`, then `tick N recs=R` every ~20 ms.
 * At `go` it checks: every option value (as getsockopt/fcntl returned it right
 * after setting it), the names (getsockname/getpeername of every socket as
 * at the start), IPV6_V6ONLY of L6/LD, SO_ACCEPTCONN of the listeners; the
 * record still queued O -> OA; the pending connections are accepted now, in
 * order (L4: P1 then P2, then nothing), each accepted socket's peer is the
 * pending client and its bytes are exactly there, and an answer reaches the
 * client; HA reads the 1000 bytes then EOF, H reads the 700 bytes, a send
 * on H fails with EPIPE while HA -> H still carries data; OA uncorks and
 * answers O; a new client can connect to every listener (LD over IPv4 and
 * IPv6) and is accepted. Output: `OK ticks=N recs=R` / `FAIL ...`. */
#include "inet.h"
#include <signal.h>

static void fill(uint8_t *b, size_t n, int seed) {
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)(i * 13 + (size_t)seed * 7 + (i >> 7));
}

static void send_fill(int fd, size_t n, int seed) {
    uint8_t b[2048];
    fill(b, n, seed);
    if (send_exact(fd, b, n)) die("send");
}

/* Exactly n bytes of pattern seed are readable now (waits up to 2 s for them). */
static int read_expect(int fd, size_t n, int seed, const char *what) {
    uint8_t buf[2048], want[2048];
    size_t got = 0;
    double t0 = mono_now();
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r < 0 && errno == EAGAIN && mono_now() - t0 < 2) {
            sleep_ms(1);
            continue;
        }
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

/* Nothing more is readable now (EAGAIN). */
static void expect_nothing(int fd, const char *what) {
    char b;
    ssize_t r = recv(fd, &b, 1, MSG_DONTWAIT);
    CHECK(r < 0 && errno == EAGAIN, "%s: more data than expected (recv returned %zd: %s)", what, r,
          r < 0 ? strerror(errno) : r == 0 ? "EOF" : "data");
}

struct opt {
    const char *name;
    int level, opt;
    int want; /* value read back right after setting it */
};

static struct opt o_opts[] = {
    {"TCP_NODELAY", IPPROTO_TCP, TCP_NODELAY, 0},  {"SO_SNDBUF", SOL_SOCKET, SO_SNDBUF, 0},
    {"SO_RCVBUF", SOL_SOCKET, SO_RCVBUF, 0},       {"SO_KEEPALIVE", SOL_SOCKET, SO_KEEPALIVE, 0},
    {"TCP_KEEPIDLE", IPPROTO_TCP, TCP_KEEPIDLE, 0}, {"TCP_KEEPINTVL", IPPROTO_TCP, TCP_KEEPINTVL, 0},
    {"TCP_KEEPCNT", IPPROTO_TCP, TCP_KEEPCNT, 0},   {"SO_REUSEADDR", SOL_SOCKET, SO_REUSEADDR, 0},
    {"SO_REUSEPORT", SOL_SOCKET, SO_REUSEPORT, 0},  {"TCP_CORK", IPPROTO_TCP, TCP_CORK, 0},
};
static struct opt oa_opts[] = {
    {"TCP_CORK", IPPROTO_TCP, TCP_CORK, 0},         {"SO_RCVBUF", SOL_SOCKET, SO_RCVBUF, 0},
    {"TCP_NODELAY", IPPROTO_TCP, TCP_NODELAY, 0},   {"SO_KEEPALIVE", SOL_SOCKET, SO_KEEPALIVE, 0},
    {"SO_REUSEADDR", SOL_SOCKET, SO_REUSEADDR, 0},
};
#define NOPTS(a) (sizeof a / sizeof a[0])

static void record_opts(int fd, struct opt *o, size_t n) {
    for (size_t i = 0; i < n; i++) o[i].want = getint(fd, o[i].level, o[i].opt);
}

static void check_opts(int fd, const struct opt *o, size_t n, const char *what) {
    for (size_t i = 0; i < n; i++) {
        int v = getint(fd, o[i].level, o[i].opt);
        CHECK(v == o[i].want, "%s (fd %d): %s is %d, want %d", what, fd, o[i].name, v, o[i].want);
    }
}

static void check_linger(int fd, int onoff, int secs, const char *what) {
    struct linger lg = {-1, -1};
    socklen_t l = sizeof lg;
    if (getsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, &l)) {
        fail("%s: SO_LINGER: %s", what, strerror(errno));
        return;
    }
    CHECK((lg.l_onoff != 0) == (onoff != 0) && lg.l_linger == secs, "%s (fd %d): SO_LINGER is {%d, %d}, want {%d, %d}",
          what, fd, lg.l_onoff, lg.l_linger, onoff, secs);
}

/* Accept the next pending connection of l (nonblocking): it must come from
 * client p, carry n bytes of pattern seed and nothing else; an answer must
 * reach p. */
static void accept_pending(int l, int p, size_t n, int seed, const char *what) {
    set_nonblock(l, 1);
    addr_t from;
    memset(&from, 0, sizeof from);
    from.len = sizeof from.ss;
    int x = accept4(l, (struct sockaddr *)&from.ss, &from.len, SOCK_NONBLOCK);
    if (x < 0) {
        fail("%s: no pending connection to accept (%s)", what, strerror(errno));
        return;
    }
    addr_t pn = sockname(p), want = pn;
    if (from.ss.ss_family == AF_INET6 && pn.ss.ss_family == AF_INET) {
        /* an IPv4 client of a dual-stack listener: ::ffff:a.b.c.d */
        struct sockaddr_in6 *m = (struct sockaddr_in6 *)&want.ss;
        struct sockaddr_in v4 = *(struct sockaddr_in *)&pn.ss;
        memset(&want, 0, sizeof want);
        m->sin6_family = AF_INET6;
        m->sin6_port = v4.sin_port;
        m->sin6_addr.s6_addr[10] = 0xff;
        m->sin6_addr.s6_addr[11] = 0xff;
        memcpy(&m->sin6_addr.s6_addr[12], &v4.sin_addr, 4);
        want.len = sizeof *m;
    }
    if (!sameaddr(&from, &want)) {
        char b1[80], b2[80];
        fail("%s: accepted a connection from %s, want the pending client %s", what,
             showaddr(&from, b1, sizeof b1), showaddr(&want, b2, sizeof b2));
    }
    if (read_expect(x, n, seed, what) == 0) expect_nothing(x, what);
    if (send_exact(x, "ack", 3)) fail("%s: send ack: %s", what, strerror(errno));
    char b[4] = {0};
    CHECK(read_exact(p, b, 3) == 0 && memcmp(b, "ack", 3) == 0, "%s: the client did not get the answer", what);
    close(x);
}

static void no_more_pending(int l, const char *what) {
    set_nonblock(l, 1);
    int y = accept4(l, NULL, NULL, SOCK_NONBLOCK);
    CHECK(y < 0 && errno == EAGAIN, "%s: another pending connection (accept4 returned %d)", what, y);
    if (y >= 0) close(y);
}

/* A new client connects to port of listener l over family fam and is accepted. */
static void fresh_connection(int l, int fam, const char *what) {
    addr_t ln = sockname(l);
    addr_t a = mkaddr(fam, 0, port_of(&ln));
    int c = socket(a.ss.ss_family, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a.ss, a.len)) {
        fail("%s: connect of a new client: %s", what, strerror(errno));
        close(c);
        return;
    }
    set_nonblock(l, 0);
    int x = accept(l, NULL, NULL);
    if (x < 0) {
        fail("%s: accept of a new client: %s", what, strerror(errno));
        close(c);
        return;
    }
    char b = 0;
    CHECK(send(c, "z", 1, MSG_NOSIGNAL) == 1 && read(x, &b, 1) == 1 && b == 'z', "%s: no data through a new connection",
          what);
    close(x);
    close(c);
}

static uint64_t recs_sent, recs_rcvd;

static void send_rec(int o) {
    uint64_t r[2] = {recs_sent, recs_sent * 0x9E3779B97F4A7C15ULL};
    for (;;) {
        ssize_t n = send(o, r, sizeof r, MSG_NOSIGNAL); /* O is nonblocking: 16 bytes always fit */
        if (n == (ssize_t)sizeof r) break;
        if (n < 0 && errno == EINTR) continue;
        out("FAIL send of record %llu on O: %zd (%s)\n", (unsigned long long)recs_sent, n,
            n < 0 ? strerror(errno) : "short");
        exit(1);
    }
    recs_sent++;
}

static void recv_rec(int oa) {
    uint64_t r[2];
    int e = read_exact(oa, r, sizeof r);
    if (e || r[0] != recs_rcvd || r[1] != recs_rcvd * 0x9E3779B97F4A7C15ULL) {
        out("FAIL record %llu on OA: %s {%llu, %llx}\n", (unsigned long long)recs_rcvd, e ? errname(e) : "wrong",
            (unsigned long long)r[0], (unsigned long long)r[1]);
        exit(1);
    }
    recs_rcvd++;
}

int main(void) {
    setup();
    int l4 = socket(AF_INET, SOCK_STREAM, 0);
    setint(l4, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
    addr_t a4 = mkaddr(4, 0, 0);
    if (bind(l4, (struct sockaddr *)&a4.ss, a4.len) || listen(l4, 8)) die("L4");
    int l6 = socket(AF_INET6, SOCK_STREAM, 0);
    setint(l6, IPPROTO_IPV6, IPV6_V6ONLY, 1, "IPV6_V6ONLY");
    addr_t a6 = mkaddr(6, 0, 0);
    if (bind(l6, (struct sockaddr *)&a6.ss, a6.len) || listen(l6, 8)) die("L6");
    int ld = socket(AF_INET6, SOCK_STREAM, 0);
    setint(ld, IPPROTO_IPV6, IPV6_V6ONLY, 0, "IPV6_V6ONLY");
    addr_t ad = mkaddr(6, 1, 0);
    if (bind(ld, (struct sockaddr *)&ad.ss, ad.len) || listen(ld, 8)) die("LD");
    int la = tcp_listener(4, 1, 8);
    addr_t n_l4 = sockname(l4), n_l6 = sockname(l6), n_ld = sockname(ld), n_la = sockname(la);

    /* the half-closed connection */
    int h = tcp_connect(&n_l4);
    int ha = accept(l4, NULL, NULL);
    if (ha < 0) die("accept H");
    send_fill(h, 1000, 1);
    if (shutdown(h, SHUT_WR)) die("shutdown");
    send_fill(ha, 700, 2);

    /* the connection with options */
    int o = tcp_connect(&n_l4);
    int oa = accept(l4, NULL, NULL);
    if (oa < 0) die("accept O");
    setint(o, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
    setint(o, SOL_SOCKET, SO_SNDBUF, 65536, "SO_SNDBUF");
    setint(o, SOL_SOCKET, SO_RCVBUF, 98304, "SO_RCVBUF");
    setint(o, SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE");
    setint(o, IPPROTO_TCP, TCP_KEEPIDLE, 77, "TCP_KEEPIDLE");
    setint(o, IPPROTO_TCP, TCP_KEEPINTVL, 13, "TCP_KEEPINTVL");
    setint(o, IPPROTO_TCP, TCP_KEEPCNT, 5, "TCP_KEEPCNT");
    setint(o, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
    setint(o, SOL_SOCKET, SO_REUSEPORT, 1, "SO_REUSEPORT");
    struct linger lg = {1, 7};
    if (setsockopt(o, SOL_SOCKET, SO_LINGER, &lg, sizeof lg)) die("SO_LINGER");
    set_nonblock(o, 1);
    if (fcntl(o, F_SETOWN, getpid()) || fcntl(o, F_SETSIG, SIGUSR2)) die("F_SETOWN/F_SETSIG");
    setint(oa, IPPROTO_TCP, TCP_CORK, 1, "TCP_CORK");
    setint(oa, SOL_SOCKET, SO_RCVBUF, 50000, "SO_RCVBUF");
    struct linger lg0 = {1, 0};
    if (setsockopt(oa, SOL_SOCKET, SO_LINGER, &lg0, sizeof lg0)) die("SO_LINGER");
    if (fcntl(oa, F_SETOWN, getpid())) die("F_SETOWN");
    record_opts(o, o_opts, NOPTS(o_opts));
    record_opts(oa, oa_opts, NOPTS(oa_opts));
    int o_fl = fcntl(o, F_GETFL), oa_fl = fcntl(oa, F_GETFL);

    /* the pending connections (after H and O: those were accepted) */
    int p1 = tcp_connect(&n_l4);
    int p2 = tcp_connect(&n_l4);
    int p3 = tcp_connect(&n_l6);
    addr_t d4 = mkaddr(4, 0, port_of(&n_ld));
    int p4 = tcp_connect(&d4);

    int socks[] = {h, ha, o, oa, p1, p2, p3, p4};
    const char *names[] = {"H", "HA", "O", "OA", "P1", "P2", "P3", "P4"};
    addr_t me[8], peer[8];
    for (int i = 0; i < 8; i++) {
        me[i] = sockname(socks[i]);
        peer[i] = peername(socks[i]);
    }
    send_rec(o);
    out("ready l4=%d l6=%d ld=%d la=%d p1=%d p2=%d p3=%d p4=%d h=%d ha=%d o=%d oa=%d port4=%u port6=%u portd=%u "
        "porta=%u\n",
        l4, l6, ld, la, p1, p2, p3, p4, h, ha, o, oa, port_of(&n_l4), port_of(&n_l6), port_of(&n_ld),
        port_of(&n_la));
    unsigned n = 0;
    for (; !go_exists(); n++) {
        send_rec(o);
        recv_rec(oa);
        out("tick %u recs=%llu\n", n, (unsigned long long)recs_rcvd);
        sleep_ms(20);
    }
    /* options and flags */
    check_opts(o, o_opts, NOPTS(o_opts), "O");
    check_opts(oa, oa_opts, NOPTS(oa_opts), "OA");
    check_linger(o, 1, 7, "O");
    check_linger(oa, 1, 0, "OA");
    int fl = fcntl(o, F_GETFL);
    CHECK(fl == o_fl, "O: file status flags %#x, want %#x (O_NONBLOCK)", fl, o_fl);
    fl = fcntl(oa, F_GETFL);
    CHECK(fl == oa_fl, "OA: file status flags %#x, want %#x", fl, oa_fl);
    CHECK(fcntl(o, F_GETOWN) == getpid(), "O: F_GETOWN is %d, want %d", fcntl(o, F_GETOWN), (int)getpid());
    CHECK(fcntl(o, F_GETSIG) == SIGUSR2, "O: F_GETSIG is %d, want %d", fcntl(o, F_GETSIG), SIGUSR2);
    CHECK(fcntl(oa, F_GETOWN) == getpid(), "OA: F_GETOWN is %d, want %d", fcntl(oa, F_GETOWN), (int)getpid());
    CHECK(fcntl(oa, F_GETSIG) == 0, "OA: F_GETSIG is %d, want 0", fcntl(oa, F_GETSIG));
    CHECK(getint(l4, SOL_SOCKET, SO_REUSEADDR) == 1, "L4: SO_REUSEADDR is off");
    CHECK(getint(l6, IPPROTO_IPV6, IPV6_V6ONLY) == 1, "L6: IPV6_V6ONLY is %d, want 1",
          getint(l6, IPPROTO_IPV6, IPV6_V6ONLY));
    CHECK(getint(ld, IPPROTO_IPV6, IPV6_V6ONLY) == 0, "LD: IPV6_V6ONLY is %d, want 0 (dual stack)",
          getint(ld, IPPROTO_IPV6, IPV6_V6ONLY));
    /* names */
    int ls[] = {l4, l6, ld, la};
    const char *lnames[] = {"L4", "L6", "LD", "LA"};
    addr_t lna[] = {n_l4, n_l6, n_ld, n_la};
    for (int i = 0; i < 4; i++) {
        check_name(ls[i], 0, &lna[i], lnames[i]);
        CHECK(getint(ls[i], SOL_SOCKET, SO_ACCEPTCONN) == 1, "%s is not listening", lnames[i]);
    }
    for (int i = 0; i < 8; i++) {
        check_name(socks[i], 0, &me[i], names[i]);
        check_name(socks[i], 1, &peer[i], names[i]);
    }
    /* the records O -> OA: exactly one still queued */
    recv_rec(oa);
    expect_nothing(oa, "OA (records)");
    CHECK(recs_rcvd == recs_sent, "records: %llu sent, %llu received", (unsigned long long)recs_sent,
          (unsigned long long)recs_rcvd);
    /* pending connections, in order; the clients send only now (bytes sent
     * into a connection not accepted yet cannot be read without accepting
     * it: stasis refuses such a checkpoint) */
    send_fill(p1, 300, 3);
    send_fill(p2, 500, 4);
    send_fill(p3, 200, 5);
    send_fill(p4, 100, 6);
    accept_pending(l4, p1, 300, 3, "P1 pending on L4");
    accept_pending(l4, p2, 500, 4, "P2 pending on L4");
    no_more_pending(l4, "L4");
    accept_pending(l6, p3, 200, 5, "P3 pending on L6");
    no_more_pending(l6, "L6");
    accept_pending(ld, p4, 100, 6, "P4 (IPv4) pending on LD");
    no_more_pending(ld, "LD");
    no_more_pending(la, "LA");
    /* the half-closed connection */
    if (read_expect(ha, 1000, 1, "HA (data before SHUT_WR)") == 0) {
        char b;
        ssize_t r = recv(ha, &b, 1, MSG_DONTWAIT);
        CHECK(r == 0, "HA: EOF expected after the data (H did SHUT_WR), recv returned %zd (%s)", r,
              r < 0 ? strerror(errno) : "data");
    }
    if (read_expect(h, 700, 2, "H (data from HA)") == 0) expect_nothing(h, "H");
    ssize_t r = send(h, "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    CHECK(r < 0 && errno == EPIPE, "send on H after SHUT_WR returned %zd (%s), want EPIPE", r,
          r < 0 ? strerror(errno) : "ok");
    send_fill(ha, 100, 7);
    read_expect(h, 100, 7, "H (data from HA after the restore)");
    /* OA -> O, once uncorked */
    setint(oa, IPPROTO_TCP, TCP_CORK, 0, "TCP_CORK off");
    send_fill(oa, 64, 8);
    read_expect(o, 64, 8, "O (answer from OA)");
    /* every listener takes new connections */
    fresh_connection(l4, 4, "L4");
    fresh_connection(l6, 6, "L6");
    fresh_connection(ld, 4, "LD over IPv4");
    fresh_connection(ld, 6, "LD over IPv6");
    fresh_connection(la, 4, "LA");
    finish("ticks=%u recs=%llu", n, (unsigned long long)recs_rcvd);
    return 0;
}
