/* unixdgram: UNIX datagram sockets with queued datagrams from several senders,
 * bound and unbound, connected and not, and sockets whose peer was closed with
 * data still queued for them.
 *
 * Set up before `ready` (N = the inode number of the cwd, for abstract names
 * unique to the test, also between jobs of the same PIDs):
 * - S: SOCK_DGRAM bound to the relative path "srv.sock", unconnected. Queued for
 *   it, in this order: "c1-0" from C1 (bound "@ux-c1-N", unconnected, sendto),
 *   "c2-0" from C2 (bound to the relative path "c2.sock", connect()ed to S),
 *   "c3-0" from C3 (unbound, sendto), "c4-0" from C4 (bound "@ux-c4-N", then
 *   closed), "c1-1" from C1, "c2-1" from C2.
 *   S has sent "s-0" to C1 (queued for C1).
 * - B: a SOCK_DGRAM socketpair {B0, B1}: B1 sent "b-0", "b-1", "b-2" and was
 *   closed.
 * - D: SOCK_DGRAM bound "@ux-d-N", connect()ed to E (bound "@ux-e-N",
 *   connect()ed to D); E sent "e-0" and "e-1" and was closed.
 * - T: a SOCK_DGRAM socketpair {T0, T1}, T0 then bound "@ux-t0-N", T1 bound to
 *   the path "t1.sock": T1 sent "t-0", "t-1" to T0.
 * - Q: a SOCK_STREAM socketpair {Q0, Q1}: Q1 wrote "hello stream" and was closed.
 * - R: a SOCK_SEQPACKET socketpair {R0, R1}: R1 sent "r-0", "r-11" and was
 *   closed.
 * - L: a SOCK_SEQPACKET listener bound "seq.sock"; a client connected, was
 *   accepted as A, sent "a-0", "a-1" and was closed.
 * Then `tick N` every ~20 ms (a datagram through a live socketpair U each tick).
 *
 * At `go` every socket checks its own state: S receives exactly its six
 * datagrams in order, each with its length and the sender recvfrom names
 * ("@ux-c1-N", "c2.sock", none, "@ux-c4-N", "@ux-c1-N", "c2.sock"), then
 * nothing; C1 gets "s-0" from "srv.sock"; C2 is still connected to "srv.sock"
 * (getpeername, send() reaches S) and C1 is not (send() fails, sendto works);
 * S, C1, T0 and T1 keep their names; B0 gets b-0..b-2 then nothing and its send
 * fails with ECONNREFUSED; D gets e-0, e-1 from "@ux-e-N" then its send fails
 * with ECONNREFUSED; T0 gets t-0, t-1 from "t1.sock" and T1 is still its peer
 * (a datagram goes back); Q0 reads "hello stream" then end-of-file, and a write
 * fails with EPIPE; R0 reads r-0 and r-11 as two records then end-of-file; A
 * reads a-0, a-1 then end-of-file and is named "seq.sock", and L still accepts.
 * Output: `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static socklen_t addr(struct sockaddr_un *a, const char *name) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    if (name[0] == '@') {
        size_t n = strlen(name + 1);
        memcpy(a->sun_path + 1, name + 1, n);
        return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    }
    snprintf(a->sun_path, sizeof a->sun_path, "%s", name);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(a->sun_path) + 1);
}

/* The name in an address as "path", "@abstract", or "" (unbound). */
static void name_of(const struct sockaddr_un *a, socklen_t len, char *out, size_t cap) {
    size_t base = offsetof(struct sockaddr_un, sun_path);
    if (len <= base) { out[0] = 0; return; }
    if (a->sun_path[0] == 0) {
        snprintf(out, cap, "@%.*s", (int)(len - base - 1), a->sun_path + 1);
        return;
    }
    snprintf(out, cap, "%s", a->sun_path);
}

static int sock(int type) {
    int s = socket(AF_UNIX, type, 0);
    if (s < 0) die("socket");
    return s;
}

static void bind_to(int s, const char *name) {
    struct sockaddr_un a;
    socklen_t al = addr(&a, name);
    if (name[0] != '@') unlink(name);
    if (bind(s, (struct sockaddr *)&a, al)) die(name);
}

static void connect_to(int s, const char *name) {
    struct sockaddr_un a;
    socklen_t al = addr(&a, name);
    if (connect(s, (struct sockaddr *)&a, al)) die(name);
}

static void send_to(int s, const char *msg, const char *name) {
    struct sockaddr_un a;
    socklen_t al = addr(&a, name);
    if (sendto(s, msg, strlen(msg), 0, (struct sockaddr *)&a, al) != (ssize_t)strlen(msg))
        die("sendto");
}

static void send_str(int s, const char *msg) {
    if (send(s, msg, strlen(msg), MSG_NOSIGNAL) != (ssize_t)strlen(msg)) die("send");
}

/* Receives one message from `s` (MSG_DONTWAIT): it must be `want` from `from`
 * (NULL: any sender). */
static void expect(int s, const char *what, const char *want, const char *from) {
    char buf[256], got_from[128];
    struct sockaddr_un a;
    socklen_t al = sizeof a;
    memset(&a, 0, sizeof a);
    ssize_t n = recvfrom(s, buf, sizeof buf - 1, MSG_DONTWAIT, (struct sockaddr *)&a, &al);
    if (n < 0) {
        fail("%s: no message '%s' (%s)", what, want, strerror(errno));
        return;
    }
    buf[n] = 0;
    CHECK((size_t)n == strlen(want) && memcmp(buf, want, (size_t)n) == 0,
          "%s: got '%s' (%zd bytes), want '%s'", what, buf, n, want);
    if (from) {
        name_of(&a, al, got_from, sizeof got_from);
        CHECK(strcmp(got_from, from) == 0, "%s: '%s' came from '%s', want '%s'", what, want,
              got_from, from[0] ? from : "(unbound)");
    }
}

static void expect_nothing(int s, const char *what) {
    char buf[256];
    ssize_t n = recv(s, buf, sizeof buf, MSG_DONTWAIT);
    CHECK(n < 0 && errno == EAGAIN, "%s: more queued than expected (recv %zd, %s)", what, n,
          n < 0 ? strerror(errno) : "data");
}

static void expect_eof(int s, const char *what) {
    char buf[64];
    ssize_t n = recv(s, buf, sizeof buf, MSG_DONTWAIT);
    CHECK(n == 0, "%s: want end-of-file, got %zd (%s)", what, n, n < 0 ? strerror(errno) : "data");
}

static void expect_name(int s, const char *what, const char *want, int peer) {
    struct sockaddr_un a;
    socklen_t al = sizeof a;
    char got[128];
    memset(&a, 0, sizeof a);
    int r = peer ? getpeername(s, (struct sockaddr *)&a, &al)
                 : getsockname(s, (struct sockaddr *)&a, &al);
    if (r) {
        fail("%s: get%sname: %s", what, peer ? "peer" : "sock", strerror(errno));
        return;
    }
    name_of(&a, al, got, sizeof got);
    CHECK(strcmp(got, want) == 0, "%s: %s name '%s', want '%s'", what, peer ? "peer" : "own",
          got, want);
}

static void expect_send_fails(int s, const char *what, int err) {
    ssize_t n = send(s, "x", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    CHECK(n < 0 && errno == err, "%s: send gave %zd (%s), want %s", what, n,
          n < 0 ? strerror(errno) : "success", strerror(err));
}

int main(void) {
    setup();
    struct stat cwd;
    if (stat(".", &cwd)) die("stat .");
    unsigned long me = (unsigned long)cwd.st_ino;
    char c1n[64], c4n[64], dn[64], en[64], t0n[64];
    snprintf(c1n, sizeof c1n, "@ux-c1-%lu", me);
    snprintf(c4n, sizeof c4n, "@ux-c4-%lu", me);
    snprintf(dn, sizeof dn, "@ux-d-%lu", me);
    snprintf(en, sizeof en, "@ux-e-%lu", me);
    snprintf(t0n, sizeof t0n, "@ux-t0-%lu", me);

    int S = sock(SOCK_DGRAM);
    bind_to(S, "srv.sock");
    int C1 = sock(SOCK_DGRAM);
    bind_to(C1, c1n);
    int C2 = sock(SOCK_DGRAM);
    bind_to(C2, "c2.sock");
    connect_to(C2, "srv.sock");
    int C3 = sock(SOCK_DGRAM);
    int C4 = sock(SOCK_DGRAM);
    bind_to(C4, c4n);
    send_to(C1, "c1-0", "srv.sock");
    send_str(C2, "c2-0");
    send_to(C3, "c3-0", "srv.sock");
    send_to(C4, "c4-0", "srv.sock");
    close(C4);
    send_to(C1, "c1-1", "srv.sock");
    send_str(C2, "c2-1");
    send_to(S, "s-0", c1n);

    int B[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, B)) die("socketpair B");
    send_str(B[1], "b-0");
    send_str(B[1], "b-1");
    send_str(B[1], "b-2");
    close(B[1]);

    int D = sock(SOCK_DGRAM), E = sock(SOCK_DGRAM);
    bind_to(D, dn);
    bind_to(E, en);
    connect_to(D, en);
    connect_to(E, dn);
    send_str(E, "e-0");
    send_str(E, "e-1");
    close(E);

    int T[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, T)) die("socketpair T");
    bind_to(T[0], t0n);
    bind_to(T[1], "t1.sock");
    send_str(T[1], "t-0");
    send_str(T[1], "t-1");

    int Q[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, Q)) die("socketpair Q");
    send_str(Q[1], "hello stream");
    close(Q[1]);

    int R[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, R)) die("socketpair R");
    send_str(R[1], "r-0");
    send_str(R[1], "r-11");
    close(R[1]);

    int L = sock(SOCK_SEQPACKET);
    bind_to(L, "seq.sock");
    if (listen(L, 4)) die("listen");
    int cl = sock(SOCK_SEQPACKET);
    connect_to(cl, "seq.sock");
    int A = accept(L, NULL, NULL);
    if (A < 0) die("accept");
    send_str(cl, "a-0");
    send_str(cl, "a-1");
    close(cl);

    int U[2];
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, U)) die("socketpair U");

    out("ready pid=%d tag=%lu S=%d C1=%d C2=%d C3=%d B0=%d D=%d T0=%d T1=%d Q0=%d R0=%d L=%d A=%d\n", getpid(), me,
        S, C1, C2, C3, B[0], D, T[0], T[1], Q[0], R[0], L, A);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        char b[16];
        int len = snprintf(b, sizeof b, "u%u", n);
        char r[16] = {0};
        CHECK(send(U[0], b, (size_t)len, 0) == len && recv(U[1], r, sizeof r, MSG_DONTWAIT) == len &&
                  memcmp(r, b, (size_t)len) == 0,
              "tick %u: no datagram through the live socketpair", n);
        out("tick %u\n", n);
        sleep_ms(20);
    }

    expect(S, "S", "c1-0", c1n);
    expect(S, "S", "c2-0", "c2.sock");
    expect(S, "S", "c3-0", "");
    expect(S, "S", "c4-0", c4n);
    expect(S, "S", "c1-1", c1n);
    expect(S, "S", "c2-1", "c2.sock");
    expect_nothing(S, "S");
    expect(C1, "C1", "s-0", "srv.sock");
    expect_nothing(C1, "C1");
    expect_name(S, "S", "srv.sock", 0);
    expect_name(C1, "C1", c1n, 0);
    expect_name(C2, "C2", "c2.sock", 0);
    expect_name(C2, "C2", "srv.sock", 1);
    send_str(C2, "c2-after");
    expect(S, "S after", "c2-after", "c2.sock");
    expect_send_fails(C1, "C1 (unconnected)", ENOTCONN);
    send_to(C1, "c1-after", "srv.sock");
    expect(S, "S after", "c1-after", c1n);
    send_to(C3, "c3-after", "srv.sock");
    expect(S, "S after", "c3-after", "");

    expect(B[0], "B0", "b-0", NULL);
    expect(B[0], "B0", "b-1", NULL);
    expect(B[0], "B0", "b-2", NULL);
    expect_nothing(B[0], "B0");
    expect_send_fails(B[0], "B0 (peer closed)", ECONNREFUSED);

    expect(D, "D", "e-0", en);
    expect(D, "D", "e-1", en);
    expect_nothing(D, "D");
    expect_name(D, "D", dn, 0);
    expect_send_fails(D, "D (peer closed)", ECONNREFUSED);

    expect(T[0], "T0", "t-0", "t1.sock");
    expect(T[0], "T0", "t-1", "t1.sock");
    expect_nothing(T[0], "T0");
    expect_name(T[0], "T0", t0n, 0);
    expect_name(T[1], "T1", "t1.sock", 0);
    send_str(T[0], "t-back");
    expect(T[1], "T1", "t-back", t0n);

    char buf[64] = {0};
    ssize_t got = recv(Q[0], buf, sizeof buf - 1, MSG_DONTWAIT);
    CHECK(got == 12 && memcmp(buf, "hello stream", 12) == 0, "Q0: read %zd bytes '%s'", got, buf);
    expect_eof(Q[0], "Q0");
    ssize_t w = send(Q[0], "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
    CHECK(w < 0 && errno == EPIPE, "Q0: write to a closed peer gave %zd (%s), want EPIPE", w,
          w < 0 ? strerror(errno) : "success");

    expect(R[0], "R0", "r-0", NULL);
    expect(R[0], "R0", "r-11", NULL);
    expect_eof(R[0], "R0");

    expect(A, "A", "a-0", NULL);
    expect(A, "A", "a-1", NULL);
    expect_eof(A, "A");
    expect_name(A, "A", "seq.sock", 0);
    int c = sock(SOCK_SEQPACKET);
    connect_to(c, "seq.sock");
    int a2 = accept(L, NULL, NULL);
    CHECK(a2 >= 0, "L: no new connection accepted (%s)", strerror(errno));
    finish("ticks=%u", n);
}
