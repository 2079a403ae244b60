/* sockpair: UNIX socketpairs with data queued in both directions, and a
 * parent/child pair talking over a socketpair.
 *
 * Three socketpairs {A, B} in the main process: SOCK_STREAM, SOCK_DGRAM and
 * SOCK_SEQPACKET. In each direction (dir 0: A -> B, dir 1: B -> A) K = 5
 * messages are kept queued: every tick receives the oldest message of each
 * direction (MSG_DONTWAIT: a lost message is an error, not a hang) and sends a
 * new one, so at any moment 4 or 5 messages wait in every queue. Message s of
 * a channel has length msg_len(type, s) (datagrams: 0 for s % 4 == 1, so every
 * queue holds a zero-length datagram) and content msg_byte(type, dir, s, i);
 * the receiver checks length (boundaries) and content of each. The stream
 * pair sends chunks of msg_len bytes, read back exactly.
 *
 * A child (fork) serves requests on a SOCK_STREAM socketpair: the parent keeps
 * 3 requests {seq, 0} outstanding, the child answers each with
 * {seq, f(seq)} (blocking reads and writes on both sides), checking that the
 * requests come in order; a request with seq QUIT makes it answer
 * {QUIT, count} and exit 0.
 *
 * Prints `ready stream=A,B dgram=A,B seqpacket=A,B pc=P child=PID` (fd numbers
 * and the child's pid), then `tick N msgs=M pc=R` every ~20 ms (M: messages
 * received over the three pairs, R: answers received from the child). At `go`
 * it checks each fd's socket type, drains every queue (exactly the K messages
 * still expected, then EAGAIN: nothing lost, nothing repeated), collects the
 * outstanding answers, stops the child and reaps it (exit 0, answered every
 * request). Output: `OK ticks=N msgs=M pc=R` / `FAIL ...`. */
#include "util.h"
#include <sys/socket.h>
#include <sys/wait.h>

#define K 5
#define NT 3
#define OUTSTANDING 3
#define QUIT 0xffffffffffffffffULL

static const int types[NT] = {SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET};
static const char *names[NT] = {"stream", "dgram", "seqpacket"};

static size_t msg_len(int t, uint64_t s) {
    switch (t) {
    case 0: return 1 + (s * 37) % 300;
    case 1: return s % 4 == 1 ? 0 : 1 + (s * 53) % 500;
    default: return 1 + (s * 71) % 700;
    }
}

static uint8_t msg_byte(int t, int dir, uint64_t s, size_t i) {
    return (uint8_t)(s * 131 + i * 7 + (uint64_t)t * 29 + (uint64_t)dir * 101 + (i >> 8));
}

static uint64_t answer(uint64_t s) { return s * 2654435761ULL + 977; }

static int sp[NT][2];
static uint64_t sent[NT][2], rcvd[NT][2];
static int broken[NT][2];
static uint64_t total_msgs;

static void send_one(int t, int dir) {
    if (broken[t][dir]) return;
    uint8_t buf[1024];
    uint64_t s = sent[t][dir];
    size_t n = msg_len(t, s);
    for (size_t i = 0; i < n; i++) buf[i] = msg_byte(t, dir, s, i);
    ssize_t r = send(sp[t][dir], buf, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r != (ssize_t)n) {
        fail("%s dir %d: send of message %llu (%zu bytes) returned %zd (%s)", names[t], dir,
             (unsigned long long)s, n, r, r < 0 ? strerror(errno) : "short");
        broken[t][dir] = 1;
        return;
    }
    sent[t][dir]++;
}

/* Receive the next expected message of (t, dir) and check it. */
static void recv_one(int t, int dir) {
    if (broken[t][dir]) return;
    uint8_t buf[2048];
    uint64_t s = rcvd[t][dir];
    size_t want = msg_len(t, s);
    int fd = sp[t][1 - dir];
    size_t got = 0;
    if (types[t] == SOCK_STREAM) {
        while (got < want) {
            ssize_t r = recv(fd, buf + got, want - got, MSG_DONTWAIT);
            if (r < 0 && errno == EINTR) {
                fail("%s dir %d: recv returned EINTR", names[t], dir);
                continue;
            }
            if (r <= 0) {
                fail("%s dir %d: message %llu: only %zu of %zu bytes there (%s)", names[t], dir,
                     (unsigned long long)s, got, want, r < 0 ? strerror(errno) : "EOF");
                broken[t][dir] = 1;
                return;
            }
            got += (size_t)r;
        }
    } else {
        ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT | MSG_TRUNC);
        if (r < 0) {
            fail("%s dir %d: message %llu missing (%s)", names[t], dir, (unsigned long long)s,
                 strerror(errno));
            broken[t][dir] = 1;
            return;
        }
        if ((size_t)r != want) {
            fail("%s dir %d: message %llu has %zd bytes, want %zu (boundaries lost)", names[t],
                 dir, (unsigned long long)s, r, want);
            broken[t][dir] = 1;
            return;
        }
        got = (size_t)r;
    }
    for (size_t i = 0; i < want; i++)
        if (buf[i] != msg_byte(t, dir, s, i)) {
            fail("%s dir %d: message %llu differs at byte %zu", names[t], dir,
                 (unsigned long long)s, i);
            broken[t][dir] = 1;
            return;
        }
    rcvd[t][dir]++;
    total_msgs++;
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

static void child_main(int fd) {
    uint64_t req[2], count = 0;
    for (;;) {
        int r = read_full(fd, req, sizeof req);
        if (r) {
            out("FAIL child: read of request %llu: %s\n", (unsigned long long)count,
                r == -2 ? "EINTR" : "EOF/error");
            _exit(1);
        }
        if (req[0] == QUIT) {
            uint64_t a[2] = {QUIT, count};
            write_all(fd, (const char *)a, sizeof a);
            _exit(0);
        }
        if (req[0] != count || req[1] != 0) {
            out("FAIL child: request %llu arrived as {%llu, %llu}\n", (unsigned long long)count,
                (unsigned long long)req[0], (unsigned long long)req[1]);
            _exit(1);
        }
        uint64_t a[2] = {req[0], answer(req[0])};
        write_all(fd, (const char *)a, sizeof a);
        count++;
    }
}

static uint64_t req_sent, ans_rcvd;

static void send_req(int fd) {
    uint64_t q[2] = {req_sent++, 0};
    write_all(fd, (const char *)q, sizeof q);
}

static void recv_ans(int fd) {
    uint64_t a[2];
    int r = read_full(fd, a, sizeof a);
    if (r) {
        out("FAIL parent: read of answer %llu: %s\n", (unsigned long long)ans_rcvd,
            r == -2 ? "EINTR" : "EOF/error");
        exit(1);
    }
    if (a[0] != ans_rcvd || a[1] != answer(ans_rcvd)) {
        out("FAIL parent: answer %llu arrived as {%llu, %llu}\n", (unsigned long long)ans_rcvd,
            (unsigned long long)a[0], (unsigned long long)a[1]);
        exit(1);
    }
    ans_rcvd++;
}

int main(void) {
    setup();
    for (int t = 0; t < NT; t++)
        if (socketpair(AF_UNIX, types[t], 0, sp[t])) die("socketpair");
    int pc[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, pc)) die("socketpair pc");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        for (int t = 0; t < NT; t++) {
            close(sp[t][0]);
            close(sp[t][1]);
        }
        close(pc[0]);
        child_main(pc[1]);
    }
    close(pc[1]);
    int pfd = pc[0];
    for (int t = 0; t < NT; t++)
        for (int d = 0; d < 2; d++)
            for (int k = 0; k < K; k++) send_one(t, d);
    for (int k = 0; k < OUTSTANDING; k++) send_req(pfd);
    out("ready stream=%d,%d dgram=%d,%d seqpacket=%d,%d pc=%d child=%d\n", sp[0][0], sp[0][1],
        sp[1][0], sp[1][1], sp[2][0], sp[2][1], pfd, (int)child);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        for (int t = 0; t < NT; t++)
            for (int d = 0; d < 2; d++) {
                recv_one(t, d);
                send_one(t, d);
            }
        recv_ans(pfd);
        send_req(pfd);
        out("tick %u msgs=%llu pc=%llu\n", n, (unsigned long long)total_msgs,
            (unsigned long long)ans_rcvd);
        sleep_ms(20);
    }
    /* the fds are still sockets of the right type */
    for (int t = 0; t < NT; t++)
        for (int e = 0; e < 2; e++) {
            int ty = -1;
            socklen_t l = sizeof ty;
            CHECK(getsockopt(sp[t][e], SOL_SOCKET, SO_TYPE, &ty, &l) == 0 && ty == types[t],
                  "fd %d: SO_TYPE %d, want %d (%s)", sp[t][e], ty, types[t], names[t]);
        }
    /* exactly the messages still expected are queued */
    for (int t = 0; t < NT; t++)
        for (int d = 0; d < 2; d++) {
            while (!broken[t][d] && rcvd[t][d] < sent[t][d]) recv_one(t, d);
            if (broken[t][d]) continue;
            char c;
            ssize_t r = recv(sp[t][1 - d], &c, 1, MSG_DONTWAIT);
            CHECK(r < 0 && errno == EAGAIN,
                  "%s dir %d: more data than sent (recv after the last message returned %zd)",
                  names[t], d, r);
        }
    while (ans_rcvd < req_sent) recv_ans(pfd);
    uint64_t q[2] = {QUIT, 0};
    write_all(pfd, (const char *)q, sizeof q);
    uint64_t a[2] = {0, 0};
    CHECK(read_full(pfd, a, sizeof a) == 0 && a[0] == QUIT && a[1] == req_sent,
          "child's final answer {%llx, %llu}, want {QUIT, %llu}", (unsigned long long)a[0],
          (unsigned long long)a[1], (unsigned long long)req_sent);
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child, "waitpid(%d): %s", (int)child, strerror(errno));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child ended with status %#x", st);
    finish("ticks=%u msgs=%llu pc=%llu", n, (unsigned long long)total_msgs,
           (unsigned long long)ans_rcvd);
}
