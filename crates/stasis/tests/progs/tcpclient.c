/* tcpclient: a client of an echo server outside the job.
 *   tcpclient PORT
 * Connects to 127.0.0.1:PORT (blocking) and, every ~20 ms, sends a message
 * [u32 len][u32 conn][u64 seq][len bytes] of pseudo-random length (1..3000)
 * and reads its echo back (length, sequence and every byte checked). When a
 * send or a read on the connection fails it prints
 * `reconnect conn=C err=NAME at=SEQ` (NAME: ECONNRESET, EPIPE, EOF, ...), then
 * `connected conn=C+1 local=127.0.0.1:L` (the new connection's address),
 * connects again (retrying for up to 10 s) and sends the same message again.
 * Prints `ready port=P fd=FD local=127.0.0.1:L`, then `tick N msgs=M conns=C`.
 * At `go`: `OK ticks=N msgs=M conns=C resets=R` (R: reconnections) or
 * `FAIL ...`. */
#include "inet.h"

#define MAXMSG 3000

static size_t msg_len(uint64_t s) {
    uint64_t x = s * 0x9E3779B97F4A7C15ULL + 777;
    xorshift(&x);
    return 1 + (size_t)(x % MAXMSG);
}

static uint8_t msg_byte(uint64_t s, size_t i) { return (uint8_t)(s * 97 + i * 13 + (i >> 8)); }

struct hdr {
    uint32_t len, conn;
    uint64_t seq;
};

static int connect_retry(const addr_t *a) {
    double t0 = mono_now();
    for (;;) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0) die("socket");
        if (connect(c, (const struct sockaddr *)&a->ss, a->len) == 0) return c;
        int e = errno;
        close(c);
        if (mono_now() - t0 > 10) {
            errno = e;
            die("connect (10 s of retries)");
        }
        sleep_ms(50);
    }
}

/* One round trip of message seq; 0 or the error (errno, -1 for EOF). */
static int round_trip(int c, uint32_t conn, uint64_t seq) {
    static uint8_t out_buf[sizeof(struct hdr) + MAXMSG], buf[MAXMSG];
    struct hdr h = {(uint32_t)msg_len(seq), conn, seq};
    memcpy(out_buf, &h, sizeof h); /* one send: no Nagle delay between header and payload */
    for (size_t i = 0; i < h.len; i++) out_buf[sizeof h + i] = msg_byte(seq, i);
    int r = send_exact(c, out_buf, sizeof h + h.len);
    if (r) return r;
    struct hdr e;
    r = read_exact(c, &e, sizeof e);
    if (r) return r;
    if (e.len != h.len || e.conn != conn || e.seq != seq) {
        out("FAIL echo of message %llu: len %u conn %u seq %llu, want len %u conn %u\n", (unsigned long long)seq,
            e.len, e.conn, (unsigned long long)e.seq, h.len, conn);
        exit(1);
    }
    memset(buf, 0, h.len);
    r = read_exact(c, buf, h.len);
    if (r) return r;
    for (size_t i = 0; i < h.len; i++)
        if (buf[i] != msg_byte(seq, i)) {
            out("FAIL echo of message %llu differs at byte %zu\n", (unsigned long long)seq, i);
            exit(1);
        }
    return 0;
}

int main(int argc, char **argv) {
    setup();
    if (argc < 2) {
        out("FAIL usage: tcpclient PORT\n");
        return 2;
    }
    addr_t srv = mkaddr(4, 0, (unsigned)atoi(argv[1]));
    int c = connect_retry(&srv);
    uint32_t conns = 1;
    addr_t me = sockname(c);
    char b[80];
    out("ready port=%u fd=%d local=%s\n", port_of(&srv), c, showaddr(&me, b, sizeof b));
    uint64_t msgs = 0;
    unsigned n = 0, resets = 0;
    for (; !go_exists(); n++) {
        for (;;) {
            int r = round_trip(c, conns, msgs);
            if (r == 0) break;
            out("reconnect conn=%u err=%s at=%llu\n", conns, errname(r), (unsigned long long)msgs);
            int fd = c;
            close(c);
            c = connect_retry(&srv);
            if (c != fd && dup2(c, fd) == fd) { /* keep the fd number */
                close(c);
                c = fd;
            }
            conns++;
            resets++;
            me = sockname(c);
            out("connected conn=%u local=%s\n", conns, showaddr(&me, b, sizeof b));
        }
        msgs++;
        out("tick %u msgs=%llu conns=%u\n", n, (unsigned long long)msgs, conns);
        sleep_ms(20);
    }
    finish("ticks=%u msgs=%llu conns=%u resets=%u", n, (unsigned long long)msgs, conns, resets);
    return 0;
}
