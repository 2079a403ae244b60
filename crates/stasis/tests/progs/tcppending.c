/* tcppending: a TCP connection not accepted yet that already carries data.
 *   tcppending [BYTES]
 * A listener L on 127.0.0.1:0 and a client P connected to it, not accepted;
 * P has sent BYTES bytes (default 1000, at most 4000) into the connection.
 * Prints `ready l=FD p=FD port=P bytes=N`, then `tick N` every ~20 ms. When a
 * file `release` appears it accepts the connection (P's, with exactly its
 * bytes) and prints `released`. At `go` (unless released) it accepts it:
 * the accepted socket's peer is P, exactly the BYTES bytes are there, an
 * answer reaches P, nothing else is pending. Output: `OK ticks=N
 * released=R` / `FAIL ...`. */
#include "inet.h"

static void fill(uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)(i * 29 + 3 + (i >> 6));
}

/* Accept the pending connection of P and check it. */
static void take(int l, int p, size_t n) {
    set_nonblock(l, 1);
    addr_t from;
    memset(&from, 0, sizeof from);
    from.len = sizeof from.ss;
    int x = accept(l, (struct sockaddr *)&from.ss, &from.len);
    if (x < 0) {
        fail("no pending connection to accept (%s)", strerror(errno));
        return;
    }
    addr_t pn = sockname(p);
    char b1[80], b2[80];
    CHECK(sameaddr(&from, &pn), "accepted a connection from %s, want the pending client %s",
          showaddr(&from, b1, sizeof b1), showaddr(&pn, b2, sizeof b2));
    uint8_t got[4096], want[4096];
    fill(want, n);
    int r = read_exact(x, got, n);
    CHECK(r == 0 && memcmp(got, want, n) == 0, "the %zu bytes of the pending connection: %s", n,
          r ? errname(r) : "wrong content");
    char c;
    ssize_t e = recv(x, &c, 1, MSG_DONTWAIT);
    CHECK(e < 0 && errno == EAGAIN, "more than the %zu bytes sent (recv returned %zd)", n, e);
    CHECK(send_exact(x, "ack", 3) == 0, "send ack: %s", strerror(errno));
    char a[4] = {0};
    CHECK(read_exact(p, a, 3) == 0 && memcmp(a, "ack", 3) == 0, "the client did not get the answer");
    int y = accept(l, NULL, NULL);
    CHECK(y < 0 && errno == EAGAIN, "a second pending connection (accept returned %d)", y);
    close(x);
}

int main(int argc, char **argv) {
    setup();
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 1000;
    if (n > 4000) return 2;
    int l = tcp_listener(4, 0, 4);
    addr_t la = sockname(l);
    int p = tcp_connect(&la);
    uint8_t b[4096];
    fill(b, n);
    if (n && send_exact(p, b, n)) die("send");
    out("ready l=%d p=%d port=%u bytes=%zu\n", l, p, port_of(&la), n);
    int released = 0;
    unsigned t = 0;
    for (; !go_exists(); t++) {
        if (!released && access("release", F_OK) == 0) {
            take(l, p, n);
            released = 1;
            out("released\n");
        }
        out("tick %u\n", t);
        sleep_ms(20);
    }
    if (!released) take(l, p, n);
    finish("ticks=%u released=%d", t, released);
    return 0;
}
