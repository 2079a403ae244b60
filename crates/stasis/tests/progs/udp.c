/* udp: UDP sockets of every kind across checkpoint/restart.
 *
 *   A4/B4, A6/B6  ping-pong between the parent (A4 on 127.0.0.1, A6 on ::1)
 *       and a forked child (B4, B6, bound likewise before the fork): the
 *       parent keeps 3 requests {seq, tag} outstanding per family (sendto),
 *       the child answers each to the sender's address (recvfrom) with
 *       {seq, f(seq)}, checking order and source; every tick the parent
 *       receives the oldest answer of each family (source checked) and sends
 *       a new request. A request with seq QUIT makes the child answer
 *       {QUIT, count}; after both it exits 0.
 *   Q4 (127.0.0.1), Q6 (::1)  bound sockets that always hold 4-5 datagrams
 *       from two senders each (S1, S2 on 127.0.0.1; S3, S4 on ::1): datagram s
 *       has length dlen(s) (0 when s % 4 == 1) and comes from the second
 *       sender when s % 3 == 0; every tick receives the oldest one (length,
 *       content and source address:port checked) and sends a new one.
 *   C/D  C (127.0.0.1) connect()ed to D (127.0.0.1, bound only): every tick C
 *       sends a datagram to D (send, no address) and D one to C (sendto), and
 *       each receives the one before, so one is always queued each way.
 *       C has SO_BROADCAST set.
 *   U4, U6  unbound sockets (socket(2) only); U4 has SO_BROADCAST set.
 * Prints `ready child=PID a4=FD@ADDR a6=.. b4=.. b6=.. q4=.. q6=.. s1=.. s2=..
 * s3=.. s4=.. c=.. d=.. u4=FD@ u6=FD@` (ADDR: the local address as
 * 127.0.0.1:P / [::1]:P, empty for the unbound ones; b4/b6 are the child's
 * fds), then `tick N pp=P msgs=M` every ~20 ms (answers received, datagrams
 * received on Q4, Q6, C and D). At `go` it checks: every queue holds exactly
 * the datagrams still expected (then EAGAIN), with their boundaries and
 * sources; the names (getsockname of all, getpeername of C is D, Q4 has no
 * peer); SO_BROADCAST on C and U4 (not on Q4); a datagram from S1 to C is
 * dropped (C only hears D); U4 and U6 are still unbound (port 0) and bind
 * themselves on the first sendto (Q4/Q6 see that port as the source); the
 * outstanding answers arrive, the child answers QUIT with its count and
 * exits 0. Output: `OK ticks=N pp=P msgs=M` / `FAIL ...`. */
#include "inet.h"
#include <sys/wait.h>

#define K 5
#define OUTSTANDING 3
#define QUIT 0xffffffffffffffffULL

static int udp_sock(int fam, int bound) {
    int s = socket(fam == 4 ? AF_INET : AF_INET6, SOCK_DGRAM, 0);
    if (s < 0) die("socket");
    if (bound) {
        addr_t a = mkaddr(fam, 0, 0);
        if (bind(s, (struct sockaddr *)&a.ss, a.len)) die("bind");
    }
    return s;
}

static uint64_t answer(uint64_t s) { return s * 2654435761ULL + 977; }

/* Wait up to 2 s for fd to be readable. */
static int wait_readable(int fd) {
    struct pollfd p = {fd, POLLIN, 0};
    for (;;) {
        int r = poll(&p, 1, 2000);
        if (r < 0 && errno == EINTR) continue;
        return r > 0;
    }
}

/* Receive one datagram: returns its length (MSG_TRUNC), -1 if none within
 * wait ms. */
static ssize_t recv_dgram(int fd, void *buf, size_t cap, addr_t *from, int wait) {
    if (wait && !wait_readable(fd)) return -1;
    memset(from, 0, sizeof *from);
    from->len = sizeof from->ss;
    return recvfrom(fd, buf, cap, MSG_DONTWAIT | MSG_TRUNC, (struct sockaddr *)&from->ss, &from->len);
}

/* ------------------------------------------------------------- ping-pong */

static void child_main(int b4, int b6, const addr_t *a4, const addr_t *a6) {
    int fds[2] = {b4, b6};
    const addr_t *want[2] = {a4, a6};
    uint64_t count[2] = {0, 0};
    int quit[2] = {0, 0};
    while (!quit[0] || !quit[1]) {
        struct pollfd p[2] = {{b4, POLLIN, 0}, {b6, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) {
                out("FAIL child: poll returned EINTR\n");
                _exit(1);
            }
            die("child poll");
        }
        for (int f = 0; f < 2; f++) {
            if (!(p[f].revents & POLLIN)) continue;
            uint64_t q[2];
            addr_t from;
            ssize_t r = recv_dgram(fds[f], q, sizeof q, &from, 0);
            if (r < 0 && errno == EAGAIN) continue;
            char b1[80], b2[80];
            if (r != (ssize_t)sizeof q || !sameaddr(&from, want[f])) {
                out("FAIL child: request %llu (family %d): %zd bytes from %s, want 16 from %s\n",
                    (unsigned long long)count[f], f ? 6 : 4, r, showaddr(&from, b1, sizeof b1),
                    showaddr(want[f], b2, sizeof b2));
                _exit(1);
            }
            uint64_t a[2];
            if (q[0] == QUIT) {
                a[0] = QUIT;
                a[1] = count[f];
                quit[f] = 1;
            } else if (q[0] != count[f] || q[1] != (uint64_t)(f + 4)) {
                out("FAIL child: request %llu (family %d) arrived as {%llu, %llu}\n", (unsigned long long)count[f],
                    f ? 6 : 4, (unsigned long long)q[0], (unsigned long long)q[1]);
                _exit(1);
            } else {
                a[0] = q[0];
                a[1] = answer(q[0]);
                count[f]++;
            }
            if (sendto(fds[f], a, sizeof a, 0, (struct sockaddr *)&from.ss, from.len) != (ssize_t)sizeof a) {
                out("FAIL child: sendto: %s\n", strerror(errno));
                _exit(1);
            }
        }
    }
    _exit(0);
}

static int a_fd[2];
static addr_t b_addr[2];
static uint64_t req_sent[2], ans_rcvd[2], pp_total;

static void send_req(int f, uint64_t seq) {
    uint64_t q[2] = {seq, (uint64_t)(f + 4)};
    if (sendto(a_fd[f], q, sizeof q, 0, (struct sockaddr *)&b_addr[f].ss, b_addr[f].len) != (ssize_t)sizeof q) {
        out("FAIL sendto (family %d): %s\n", f ? 6 : 4, strerror(errno));
        exit(1);
    }
    if (seq != QUIT) req_sent[f]++;
}

static void recv_ans(int f, uint64_t want0, uint64_t want1) {
    uint64_t a[2] = {0, 0};
    addr_t from;
    ssize_t r = recv_dgram(a_fd[f], a, sizeof a, &from, 1);
    char b1[80], b2[80];
    if (r != (ssize_t)sizeof a || !sameaddr(&from, &b_addr[f]) || a[0] != want0 || a[1] != want1) {
        out("FAIL answer %llu (family %d): %zd bytes {%llu, %llu} from %s, want {%llu, %llu} from %s%s\n",
            (unsigned long long)ans_rcvd[f], f ? 6 : 4, r, (unsigned long long)a[0], (unsigned long long)a[1],
            showaddr(&from, b1, sizeof b1), (unsigned long long)want0, (unsigned long long)want1,
            showaddr(&b_addr[f], b2, sizeof b2), r < 0 ? " (none within 2 s)" : "");
        exit(1);
    }
    if (want0 != QUIT) {
        ans_rcvd[f]++;
        pp_total++;
    }
}

/* ---------------------------------------------------------------- queues */

struct queue {
    const char *name;
    int q, s[2];
    addr_t qa, sa[2];
    uint64_t sent, rcvd;
    int broken;
};

static size_t dlen(uint64_t s) { return s % 4 == 1 ? 0 : 1 + (size_t)((s * 53) % 1400); }
static uint8_t dbyte(const struct queue *q, uint64_t s, size_t i) {
    return (uint8_t)(s * 131 + i * 7 + (uint64_t)q->name[1] * 29 + (i >> 8));
}
static int sender_of(uint64_t s) { return s % 3 == 0; }

static uint64_t total_msgs;

static void q_send(struct queue *q) {
    if (q->broken) return;
    uint8_t buf[1500];
    uint64_t s = q->sent;
    size_t n = dlen(s);
    for (size_t i = 0; i < n; i++) buf[i] = dbyte(q, s, i);
    int from = q->s[sender_of(s)];
    ssize_t r = sendto(from, buf, n, 0, (struct sockaddr *)&q->qa.ss, q->qa.len);
    if (r != (ssize_t)n) {
        fail("%s: sendto of datagram %llu: %zd (%s)", q->name, (unsigned long long)s, r,
             r < 0 ? strerror(errno) : "short");
        q->broken = 1;
        return;
    }
    q->sent++;
}

static void q_recv(struct queue *q) {
    if (q->broken) return;
    uint8_t buf[2048];
    uint64_t s = q->rcvd;
    size_t want = dlen(s);
    addr_t from;
    ssize_t r = recv_dgram(q->q, buf, sizeof buf, &from, 0);
    if (r < 0 || (size_t)r != want) {
        fail("%s: datagram %llu: recvfrom returned %zd, want %zu bytes (%s)", q->name, (unsigned long long)s, r,
             want, r < 0 ? strerror(errno) : "boundaries lost");
        q->broken = 1;
        return;
    }
    const addr_t *src = &q->sa[sender_of(s)];
    if (!sameaddr(&from, src)) {
        char b1[80], b2[80];
        fail("%s: datagram %llu came from %s, want %s (sender %d)", q->name, (unsigned long long)s,
             showaddr(&from, b1, sizeof b1), showaddr(src, b2, sizeof b2), sender_of(s) + 1);
        q->broken = 1;
        return;
    }
    for (size_t i = 0; i < want; i++)
        if (buf[i] != dbyte(q, s, i)) {
            fail("%s: datagram %llu differs at byte %zu", q->name, (unsigned long long)s, i);
            q->broken = 1;
            return;
        }
    q->rcvd++;
    total_msgs++;
}

static void q_drain(struct queue *q) {
    while (!q->broken && q->rcvd < q->sent) q_recv(q);
    if (q->broken) return;
    char b;
    addr_t from;
    ssize_t r = recv_dgram(q->q, &b, 1, &from, 0);
    CHECK(r < 0 && errno == EAGAIN, "%s: a datagram more than sent (recvfrom returned %zd)", q->name, r);
}

/* C <-> D: record s of direction dir (0: C -> D, 1: D -> C) is 24 bytes. */
static int c_fd, d_fd;
static addr_t c_addr, d_addr;
static uint64_t cd_sent[2], cd_rcvd[2];

static void cd_send(int dir) {
    uint64_t m[3] = {cd_sent[dir], (uint64_t)dir, cd_sent[dir] * 7919};
    ssize_t r = dir == 0 ? send(c_fd, m, sizeof m, 0)
                         : sendto(d_fd, m, sizeof m, 0, (struct sockaddr *)&c_addr.ss, c_addr.len);
    if (r != (ssize_t)sizeof m) {
        out("FAIL %s: send of record %llu: %s\n", dir ? "D -> C" : "C -> D", (unsigned long long)cd_sent[dir],
            r < 0 ? strerror(errno) : "short");
        exit(1);
    }
    cd_sent[dir]++;
}

static void cd_recv(int dir) {
    uint64_t m[3] = {0, 0, 0};
    addr_t from;
    ssize_t r = recv_dgram(dir == 0 ? d_fd : c_fd, m, sizeof m, &from, 1);
    const addr_t *src = dir == 0 ? &c_addr : &d_addr;
    uint64_t s = cd_rcvd[dir];
    if (r != (ssize_t)sizeof m || m[0] != s || m[1] != (uint64_t)dir || m[2] != s * 7919 || !sameaddr(&from, src)) {
        char b1[80], b2[80];
        out("FAIL %s: record %llu: %zd bytes {%llu, %llu, %llu} from %s, want from %s\n", dir ? "D -> C" : "C -> D",
            (unsigned long long)s, r, (unsigned long long)m[0], (unsigned long long)m[1], (unsigned long long)m[2],
            showaddr(&from, b1, sizeof b1), showaddr(src, b2, sizeof b2));
        exit(1);
    }
    cd_rcvd[dir]++;
    total_msgs++;
}

static const char *fdaddr(int fd, int bound, char *buf, size_t cap) {
    char a[80] = "";
    if (bound) {
        addr_t n = sockname(fd);
        showaddr(&n, a, sizeof a);
    }
    snprintf(buf, cap, "%d@%s", fd, a);
    return buf;
}

int main(void) {
    setup();
    int a4 = udp_sock(4, 1), a6 = udp_sock(6, 1), b4 = udp_sock(4, 1), b6 = udp_sock(6, 1);
    a_fd[0] = a4;
    a_fd[1] = a6;
    b_addr[0] = sockname(b4);
    b_addr[1] = sockname(b6);
    addr_t a4n = sockname(a4), a6n = sockname(a6);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(a4);
        close(a6);
        child_main(b4, b6, &a4n, &a6n);
    }
    struct queue qs[2] = {{.name = "Q4"}, {.name = "Q6"}};
    for (int i = 0; i < 2; i++) {
        int fam = i ? 6 : 4;
        qs[i].q = udp_sock(fam, 1);
        qs[i].qa = sockname(qs[i].q);
        for (int k = 0; k < 2; k++) {
            qs[i].s[k] = udp_sock(fam, 1);
            qs[i].sa[k] = sockname(qs[i].s[k]);
        }
    }
    c_fd = udp_sock(4, 1);
    d_fd = udp_sock(4, 1);
    c_addr = sockname(c_fd);
    d_addr = sockname(d_fd);
    if (connect(c_fd, (struct sockaddr *)&d_addr.ss, d_addr.len)) die("connect C");
    setint(c_fd, SOL_SOCKET, SO_BROADCAST, 1, "SO_BROADCAST");
    int u4 = udp_sock(4, 0), u6 = udp_sock(6, 0);
    setint(u4, SOL_SOCKET, SO_BROADCAST, 1, "SO_BROADCAST");

    for (int i = 0; i < 2; i++)
        for (int k = 0; k < K; k++) q_send(&qs[i]);
    for (int f = 0; f < 2; f++)
        for (int k = 0; k < OUTSTANDING; k++) send_req(f, req_sent[f]);
    cd_send(0);
    cd_send(1);
    char x[16][100];
    out("ready child=%d a4=%s a6=%s b4=%s b6=%s q4=%s q6=%s s1=%s s2=%s s3=%s s4=%s c=%s d=%s u4=%s u6=%s\n",
        (int)child, fdaddr(a4, 1, x[0], 100), fdaddr(a6, 1, x[1], 100), fdaddr(b4, 1, x[2], 100),
        fdaddr(b6, 1, x[3], 100), fdaddr(qs[0].q, 1, x[4], 100), fdaddr(qs[1].q, 1, x[5], 100),
        fdaddr(qs[0].s[0], 1, x[6], 100), fdaddr(qs[0].s[1], 1, x[7], 100), fdaddr(qs[1].s[0], 1, x[8], 100),
        fdaddr(qs[1].s[1], 1, x[9], 100), fdaddr(c_fd, 1, x[10], 100), fdaddr(d_fd, 1, x[11], 100),
        fdaddr(u4, 0, x[12], 100), fdaddr(u6, 0, x[13], 100));
    close(b4);
    close(b6);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        for (int f = 0; f < 2; f++) {
            recv_ans(f, ans_rcvd[f], answer(ans_rcvd[f]));
            send_req(f, req_sent[f]);
        }
        for (int i = 0; i < 2; i++) {
            q_recv(&qs[i]);
            q_send(&qs[i]);
        }
        for (int dir = 0; dir < 2; dir++) {
            cd_send(dir);
            cd_recv(dir);
        }
        out("tick %u pp=%llu msgs=%llu\n", n, (unsigned long long)pp_total, (unsigned long long)total_msgs);
        sleep_ms(20);
    }
    /* queues: exactly what is still expected */
    for (int i = 0; i < 2; i++) q_drain(&qs[i]);
    for (int dir = 0; dir < 2; dir++) {
        while (cd_rcvd[dir] < cd_sent[dir]) cd_recv(dir);
        char b;
        addr_t from;
        ssize_t r = recv_dgram(dir ? c_fd : d_fd, &b, 1, &from, 0);
        CHECK(r < 0 && errno == EAGAIN, "%s: a datagram more than sent (%zd)", dir ? "D -> C" : "C -> D", r);
    }
    /* names and options */
    int named[] = {a4, a6, qs[0].q, qs[1].q, qs[0].s[0], qs[0].s[1], qs[1].s[0], qs[1].s[1], c_fd, d_fd};
    addr_t want[] = {a4n, a6n, qs[0].qa, qs[1].qa, qs[0].sa[0], qs[0].sa[1], qs[1].sa[0], qs[1].sa[1], c_addr, d_addr};
    const char *nn[] = {"A4", "A6", "Q4", "Q6", "S1", "S2", "S3", "S4", "C", "D"};
    for (int i = 0; i < 10; i++) check_name(named[i], 0, &want[i], nn[i]);
    check_name(c_fd, 1, &d_addr, "C (connected to D)");
    addr_t qp = peername(qs[0].q);
    CHECK(qp.ss.ss_family == AF_UNSPEC && errno == ENOTCONN, "Q4 has a peer");
    CHECK(getint(c_fd, SOL_SOCKET, SO_BROADCAST) == 1, "C: SO_BROADCAST is off");
    CHECK(getint(u4, SOL_SOCKET, SO_BROADCAST) == 1, "U4: SO_BROADCAST is off");
    CHECK(getint(qs[0].q, SOL_SOCKET, SO_BROADCAST) == 0, "Q4: SO_BROADCAST is on");
    CHECK(getint(c_fd, SOL_SOCKET, SO_TYPE) == SOCK_DGRAM, "C is not a datagram socket");
    /* C hears only D */
    const char intruder[] = "intruder", marker[] = "marker";
    sendto(qs[0].s[0], intruder, sizeof intruder, 0, (struct sockaddr *)&c_addr.ss, c_addr.len);
    sendto(d_fd, marker, sizeof marker, 0, (struct sockaddr *)&c_addr.ss, c_addr.len);
    {
        char b[64] = {0};
        addr_t from;
        ssize_t r = recv_dgram(c_fd, b, sizeof b, &from, 1);
        CHECK(r == (ssize_t)sizeof marker && strcmp(b, marker) == 0,
              "C (connected to D) received '%.20s' (%zd bytes) instead of D's marker", b, r);
        r = recv_dgram(c_fd, b, sizeof b, &from, 0);
        CHECK(r < 0 && errno == EAGAIN, "C received a datagram not from D (%zd bytes)", r);
    }
    /* the unbound sockets */
    int us[2] = {u4, u6};
    for (int i = 0; i < 2; i++) {
        addr_t un = sockname(us[i]);
        int fam = un.ss.ss_family;
        CHECK(fam == (i ? AF_INET6 : AF_INET), "U%d: family %d", i ? 6 : 4, fam);
        CHECK(port_of(&un) == 0, "U%d is bound to port %u, want unbound", i ? 6 : 4, port_of(&un));
        const char m[] = "unbound";
        if (sendto(us[i], m, sizeof m, 0, (struct sockaddr *)&qs[i].qa.ss, qs[i].qa.len) != (ssize_t)sizeof m) {
            fail("U%d: sendto: %s", i ? 6 : 4, strerror(errno));
            continue;
        }
        addr_t now = sockname(us[i]), from;
        char b[64] = {0};
        ssize_t r = recv_dgram(qs[i].q, b, sizeof b, &from, 1);
        char b1[80], b2[80];
        CHECK(port_of(&now) != 0 && r == (ssize_t)sizeof m && port_of(&from) == port_of(&now),
              "U%d: the datagram sent after the restore arrived as %zd bytes from %s, the socket is now %s",
              i ? 6 : 4, r, showaddr(&from, b1, sizeof b1), showaddr(&now, b2, sizeof b2));
    }
    /* the ping-pong */
    for (int f = 0; f < 2; f++) {
        while (ans_rcvd[f] < req_sent[f]) recv_ans(f, ans_rcvd[f], answer(ans_rcvd[f]));
        send_req(f, QUIT);
        recv_ans(f, QUIT, req_sent[f]);
    }
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child, "waitpid(%d): %s", (int)child, strerror(errno));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child ended with status %#x", st);
    finish("ticks=%u pp=%llu msgs=%llu", n, (unsigned long long)pp_total, (unsigned long long)total_msgs);
    return 0;
}
