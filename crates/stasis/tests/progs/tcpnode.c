/* tcpnode: one end of a TCP connection between two nodes of a job, each end a part
 * of its own (a multi-node checkpoint saves both and restarts them on other nodes).
 *   tcpnode server PORT        listens on PORT (all addresses), takes one connection
 *   tcpnode client HOST PORT   connects to HOST:PORT (retrying while refused)
 * Each end sends numbered 32-byte records (3 per tick, every ~20 ms, so some are
 * always on their way or unread) and reads what has arrived, checking that the
 * other's records come exactly once and in order. Prints `ready`, then `tick N`.
 * Once the file `go` exists it sends `E` + its count, reads up to the other's `E`,
 * and checks the count: `OK sent=S got=G` / `FAIL ...`.
 * The server also listens on PORT+1 and echoes what comes on a connection there; once
 * the file `again` exists the client opens such a connection to HOST:PORT+1 (the
 * address it was given at start, a new connection: after a restart onto other nodes,
 * to the server's old address, from a socket bound first to the client's own address
 * of start-up, as MPI libraries do), sends a line and checks the echo: `again 1 ok`; once
 * `again2` exists, another: `again 2 ok`; then `again3`: `again 3 ok`. Once the file
 * `parting` exists, the client opens one more such connection, sends `parting\n` and
 * closes it at once (`parted`); the server leaves a connection there that it accepted
 * while the file `hold` exists unread while `hold` exists (`holding` once the line and the end of file have
 * arrived), and once `hold` is gone reads it: `parting ok` if it is exactly that line
 * followed by end of file. The server also listens on PORT+2 and, unless the file
 * `deaf` exists, accepts what comes there and closes it at once (`let in`); once the
 * file `knock` exists the client connects there (`knocked`) and, when the server has
 * closed that connection, closes it too (`answered`). Both ends check the names the kernel gives
 * (after a restart onto other nodes, stasis reports the old addresses): the server
 * accepts such a connection (its listener blocking, polled first) from the client's
 * address of start-up, and the names of the first connection stay as they were; the
 * client's new connection is from its own address of start-up to the address it
 * connected to. */
#include "util.h"
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define REC 32

static int fd, l2 = -1, c2 = -1, l3 = -1, s4 = -1;
static struct sockaddr_in mine; /* the client's own address, as at start-up */
static struct sockaddr_in at0[2]; /* names of the first connection at start-up */
static const char *again_files[] = {"again", "again2", "again3"};

/* HOST:PORT as an IPv4 socket address. */
static struct sockaddr_in addr_of(const char *host, int port) {
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, host, &a.sin_addr);
    return a;
}

/* FAIL unless `a` has the address (and, with `port`, the port) of `want`. */
static void same(const char *what, const struct sockaddr_in *a, const struct sockaddr_in *want, int port) {
    if (a->sin_family != AF_INET || a->sin_addr.s_addr != want->sin_addr.s_addr ||
        (port && a->sin_port != want->sin_port)) {
        char x[32], y[32];
        inet_ntop(AF_INET, &a->sin_addr, x, sizeof x);
        inet_ntop(AF_INET, &want->sin_addr, y, sizeof y);
        out("FAIL %s: %s:%d, want %s:%d\n", what, x, ntohs(a->sin_port), y, ntohs(want->sin_port));
        exit(1);
    }
}

/* FAIL unless the names of socket `s` are `local` and `peer`. */
static void names_are(const char *what, int s, const struct sockaddr_in *local, int local_port,
                      const struct sockaddr_in *peer) {
    struct sockaddr_in a;
    socklen_t l = sizeof a;
    char w[64];
    if (getsockname(s, (struct sockaddr *)&a, &l)) die("getsockname");
    struct tcp_info ti;
    socklen_t tl = sizeof ti;
    int state = getsockopt(s, IPPROTO_TCP, TCP_INFO, &ti, &tl) ? -1 : ti.tcpi_state;
    snprintf(w, sizeof w, "%s (tcp state %d): getsockname", what, state);
    same(w, &a, local, local_port);
    l = sizeof a;
    if (getpeername(s, (struct sockaddr *)&a, &l)) die("getpeername");
    snprintf(w, sizeof w, "%s: getpeername", what);
    same(w, &a, peer, 1);
}
static unsigned long long sent, got;
static char buf[1 << 16];
static size_t have;

static void send_rec(char kind, unsigned long long n) {
    char r[REC];
    memset(r, ' ', REC);
    int k = snprintf(r, REC, "%c%020llu", kind, n);
    r[k] = ' ';
    r[REC - 1] = '\n';
    size_t off = 0;
    while (off < REC) {
        ssize_t w = send(fd, r + off, REC - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) die("send");
        off += (size_t)w;
    }
}

/* Reads what is there (blocking when `wait`); returns 1 once the other's end record
 * came (its count in *end). */
static int take(int wait, unsigned long long *end) {
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, wait ? 5000 : 0) <= 0) return 0;
    ssize_t n = recv(fd, buf + have, sizeof buf - have, 0);
    if (n < 0 && errno == EINTR) return 0;
    if (n <= 0) {
        out("FAIL the connection ended (%zd: %s) after %llu records\n", n, strerror(errno), got);
        exit(1);
    }
    have += (size_t)n;
    size_t off = 0;
    int done = 0;
    while (have - off >= REC) {
        char *r = buf + off;
        unsigned long long v = strtoull(r + 1, NULL, 10);
        if (r[0] == 'R') {
            if (v != got) {
                out("FAIL record %llu came where %llu was due\n", v, got);
                exit(1);
            }
            got++;
        } else if (r[0] == 'E') {
            *end = v;
            done = 1;
        } else {
            out("FAIL a damaged record after %llu\n", got);
            exit(1);
        }
        off += REC;
    }
    memmove(buf, buf + off, have - off);
    have -= off;
    return done;
}

int main(int argc, char **argv) {
    setup();
    if (argc >= 3 && strcmp(argv[1], "server") == 0) {
        int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_port = htons(atoi(argv[2]));
        if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) die("listen");
        l2 = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(l2, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        a.sin_port = htons(atoi(argv[2]) + 1);
        if (bind(l2, (struct sockaddr *)&a, sizeof a) || listen(l2, 4)) die("listen 2");
        l3 = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(l3, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        a.sin_port = htons(atoi(argv[2]) + 2);
        if (bind(l3, (struct sockaddr *)&a, sizeof a) || listen(l3, 4)) die("listen 3");
        fd = accept(l, NULL, NULL);
        if (fd < 0) die("accept");
    } else if (argc >= 4 && strcmp(argv[1], "client") == 0) {
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_port = htons(atoi(argv[3]));
        if (inet_pton(AF_INET, argv[2], &a.sin_addr) != 1) die("address");
        for (int i = 0;; i++) {
            fd = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) break;
            close(fd);
            if (i > 500) die("connect");
            sleep_ms(20);
        }
        socklen_t ml = sizeof mine;
        if (getsockname(fd, (struct sockaddr *)&mine, &ml)) die("getsockname");
        mine.sin_port = 0;
    } else {
        out("FAIL usage\n");
        return 2;
    }
    socklen_t nl = sizeof at0[0];
    if (getsockname(fd, (struct sockaddr *)&at0[0], &nl)) die("getsockname");
    nl = sizeof at0[1];
    if (getpeername(fd, (struct sockaddr *)&at0[1], &nl)) die("getpeername");
    out("ready\n");
    unsigned long long end = 0, tick = 0;
    int ended = 0, again = 0, parted = 0, held = 0, holding = 0, knocked = 0;
    while (!go_exists()) {
        for (int i = 0; i < 3; i++) send_rec('R', sent++);
        ended |= take(0, &end);
        if (l3 >= 0 && access("deaf", F_OK) != 0) { /* server: let in, close */
            struct pollfd lp = {l3, POLLIN, 0};
            if (poll(&lp, 1, 0) == 1) {
                int c3 = accept(l3, NULL, NULL);
                if (c3 < 0) die("accept 3");
                close(c3);
                out("let in\n");
            }
        }
        if (s4 >= 0) { /* client: closed once the server closed */
            struct pollfd kp = {s4, POLLIN, 0};
            char b[8];
            if (poll(&kp, 1, 0) == 1) {
                if (recv(s4, b, sizeof b, MSG_DONTWAIT) != 0) {
                    out("FAIL the knocking connection gave something else than end of file\n");
                    return 1;
                }
                close(s4);
                s4 = -1;
                out("answered\n");
            }
        }
        if (l2 >= 0) { /* server: echo on connections to PORT+1 */
            struct pollfd lp = {l2, POLLIN, 0};
            if (c2 < 0 && poll(&lp, 1, 0) == 1) {
                struct sockaddr_in from;
                socklen_t fl = sizeof from;
                c2 = accept4(l2, (struct sockaddr *)&from, &fl, SOCK_NONBLOCK);
                if (c2 < 0) die("accept4");
                if (fl != sizeof from) {
                    out("FAIL accept4 gave an address of %u bytes\n", (unsigned)fl);
                    return 1;
                }
                same("accept4: the new connection's peer", &from, &at0[1], 0);
                held = access("hold", F_OK) == 0;
                names_are("the first connection", fd, &at0[0], 1, &at0[1]);
            }
            if (c2 >= 0 && held && access("hold", F_OK) == 0) { /* left unread */
                struct pollfd hp = {c2, POLLRDHUP, 0};
                char pk[16];
                if (!holding && poll(&hp, 1, 0) == 1 && (hp.revents & POLLRDHUP) &&
                    recv(c2, pk, sizeof pk, MSG_PEEK) == 8) {
                    holding = 1;
                    out("holding\n");
                }
            } else if (c2 >= 0 && held) { /* the line the client sent, then end of file */
                char b[32];
                size_t n2 = 0;
                ssize_t n = -1;
                struct pollfd hp = {c2, POLLIN, 0};
                while (n2 < sizeof b && poll(&hp, 1, 10000) == 1 && (n = recv(c2, b + n2, sizeof b - n2, 0)) > 0)
                    n2 += (size_t)n;
                if (n != 0 || n2 != 8 || memcmp(b, "parting\n", 8)) {
                    out("FAIL the parting connection gave %zu bytes, then %zd (%s)\n", n2, n, strerror(errno));
                    return 1;
                }
                close(c2);
                c2 = -1;
                held = holding = 0;
                out("parting ok\n");
            } else if (c2 >= 0) {
                char b[64];
                ssize_t n = recv(c2, b, sizeof b, 0);
                if (n > 0 && send(c2, b, (size_t)n, MSG_NOSIGNAL) != n) die("echo");
                if (n == 0) { close(c2); c2 = -1; }
            }
        } else if (again < 3 && access(again_files[again], F_OK) == 0) { /* client: a new connection */
            struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]) + 1);
            int s2 = socket(AF_INET, SOCK_STREAM, 0);
            /* As MPI libraries do: bound to its own address first (the one it had at
             * start-up: after a restart onto another node, an old one). */
            if (bind(s2, (struct sockaddr *)&mine, sizeof mine)) {
                out("FAIL binding a new socket to its own address: %s\n", strerror(errno));
                return 1;
            }
            if (connect(s2, (struct sockaddr *)&a, sizeof a)) {
                out("FAIL a new connection to %s:%d: %s\n", argv[2], atoi(argv[3]) + 1, strerror(errno));
                return 1;
            }
            names_are("the new connection", s2, &mine, 0, &a);
            names_are("the first connection", fd, &at0[0], 1, &at0[1]);
            const char *msg = "again\n";
            char b[16] = {0};
            struct pollfd p = {s2, POLLIN, 0};
            if (send(s2, msg, 6, MSG_NOSIGNAL) != 6 || poll(&p, 1, 10000) != 1 || recv(s2, b, sizeof b, 0) != 6 ||
                memcmp(b, msg, 6)) {
                out("FAIL no echo on the new connection\n");
                return 1;
            }
            close(s2);
            again++;
            out("again %d ok\n", again);
        } else if (l2 < 0 && !knocked && access("knock", F_OK) == 0) { /* client: waits to be let in */
            struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]) + 2);
            s4 = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(s4, (struct sockaddr *)&a, sizeof a)) {
                out("FAIL knocking: %s\n", strerror(errno));
                return 1;
            }
            knocked = 1;
            out("knocked\n");
        } else if (l2 < 0 && !parted && access("parting", F_OK) == 0) { /* client: sent, closed */
            struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]) + 1);
            int s3 = socket(AF_INET, SOCK_STREAM, 0);
            if (bind(s3, (struct sockaddr *)&mine, sizeof mine) || connect(s3, (struct sockaddr *)&a, sizeof a) ||
                send(s3, "parting\n", 8, MSG_NOSIGNAL) != 8) {
                out("FAIL the parting connection: %s\n", strerror(errno));
                return 1;
            }
            close(s3);
            parted = 1;
            out("parted\n");
        }
        out("tick %llu\n", tick++);
        sleep_ms(20);
    }
    send_rec('E', sent);
    while (!ended) ended = take(1, &end);
    if (end != got) {
        out("FAIL the other end sent %llu records, %llu came\n", end, got);
        return 1;
    }
    out("OK sent=%llu got=%llu\n", sent, got);
    return 0;
}
