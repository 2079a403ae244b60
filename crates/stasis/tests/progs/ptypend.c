/* ptypend: bytes waiting in pseudo-terminals, both ways, at checkpoint time.
 * Pair A is canonical without echo (ICRNL, ERASE, LNEXT and ONLCR at work): the
 * master wrote "one\rtw^V\x7fo\nab\x7fc" (so the slave has the lines "one\n" and
 * "tw\x7fo\n" and the partial line "ac" to read), the slave wrote "out1\nout2"
 * (the master has "out1\r\nout2" to read). Pair B is raw (cfmakeraw) with window
 * 33x77: each side wrote bytes that mean something to a terminal. Nobody reads
 * until `go`; then each reader must get exactly those bytes, once, in order (the
 * partial line completed by "d\n" written after `go`), nothing more, and the
 * settings must be unchanged.
 * Output: `ready`, `tick N`, `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <poll.h>
#include <sys/ioctl.h>
#include <termios.h>

static const char A_IN[] = "one\rtw\x16\x7fo\nab\x7f" "c";
static const char A_SLAVE_LINES[] = "one\ntw\x7fo\nacd\n";
static const char A_OUT[] = "out1\nout2";
static const char A_MASTER[] = "out1\r\nout2";
static const char B_IN[] = "\x00\x03\x7f\r\n\x11\x13z\x04";
static const char B_OUT[] = "\n\r\x00\xff\x1b[0m";

static void openpair(int *m, int *s) {
    *m = posix_openpt(O_RDWR | O_NOCTTY);
    if (*m < 0 || grantpt(*m) || unlockpt(*m)) die("posix_openpt");
    char name[64];
    if (ptsname_r(*m, name, sizeof name)) die("ptsname");
    *s = open(name, O_RDWR | O_NOCTTY);
    if (*s < 0) die("open slave");
}

/* Reads from fd until `want` bytes came (or 5 s), then what more comes in 200 ms. */
static size_t collect(int fd, char *buf, size_t cap, size_t want) {
    size_t len = 0;
    double t0 = mono_now();
    for (;;) {
        int wait = len >= want ? 200 : 100;
        struct pollfd p = {fd, POLLIN, 0};
        int r = poll(&p, 1, wait);
        if (r > 0 && (p.revents & POLLIN)) {
            ssize_t n = read(fd, buf + len, cap - len);
            if (n > 0) {
                len += (size_t)n;
                continue;
            }
        }
        if (len >= want || mono_now() - t0 > 5) break;
    }
    return len;
}

static void expect(const char *what, int fd, const char *want, size_t wlen) {
    char buf[8192];
    size_t n = collect(fd, buf, sizeof buf, wlen);
    if (n != wlen || memcmp(buf, want, wlen) != 0) {
        char hex[1024];
        size_t h = 0;
        for (size_t i = 0; i < n && h + 4 < sizeof hex; i++) h += (size_t)snprintf(hex + h, sizeof hex - h, "%02x", (unsigned char)buf[i]);
        hex[h] = 0;
        fail("%s: got %zu bytes (%s), want %zu", what, n, hex, wlen);
    }
}

int main(void) {
    setup();
    int am, as, bm, bs;
    openpair(&am, &as);
    openpair(&bm, &bs);
    struct termios ta, tb;
    if (tcgetattr(as, &ta)) die("tcgetattr");
    ta.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL | ECHOCTL);
    ta.c_lflag |= ICANON | IEXTEN;
    ta.c_iflag |= ICRNL;
    ta.c_oflag |= OPOST | ONLCR;
    if (tcsetattr(as, TCSANOW, &ta)) die("tcsetattr A");
    if (tcgetattr(bs, &tb)) die("tcgetattr");
    cfmakeraw(&tb);
    tb.c_cc[VMIN] = 1;
    tb.c_cc[VTIME] = 0;
    if (tcsetattr(bs, TCSANOW, &tb)) die("tcsetattr B");
    struct winsize wb = {33, 77, 0, 0};
    if (ioctl(bs, TIOCSWINSZ, &wb)) die("TIOCSWINSZ");
    struct termios ta0, tb0;
    tcgetattr(as, &ta0);
    tcgetattr(bs, &tb0);
    write_all(am, A_IN, sizeof A_IN - 1);
    write_all(as, A_OUT, sizeof A_OUT - 1);
    write_all(bm, B_IN, sizeof B_IN - 1);
    write_all(bs, B_OUT, sizeof B_OUT - 1);
    int fl[4] = {am, as, bm, bs};
    for (int i = 0; i < 4; i++) fcntl(fl[i], F_SETFL, O_NONBLOCK);
    out("ready\n");
    unsigned long long tick = 0;
    while (!go_exists()) {
        out("tick %llu\n", tick++);
        sleep_ms(20);
    }
    struct termios ta1, tb1;
    struct winsize wb1;
    tcgetattr(as, &ta1);
    tcgetattr(bs, &tb1);
    ioctl(bs, TIOCGWINSZ, &wb1);
    CHECK(ta1.c_iflag == ta0.c_iflag && ta1.c_oflag == ta0.c_oflag && ta1.c_lflag == ta0.c_lflag &&
              memcmp(ta1.c_cc, ta0.c_cc, sizeof ta0.c_cc) == 0,
          "the settings of A changed (lflag %x -> %x)", ta0.c_lflag, ta1.c_lflag);
    CHECK(tb1.c_iflag == tb0.c_iflag && tb1.c_oflag == tb0.c_oflag && tb1.c_lflag == tb0.c_lflag &&
              memcmp(tb1.c_cc, tb0.c_cc, sizeof tb0.c_cc) == 0,
          "the settings of B changed (lflag %x -> %x)", tb0.c_lflag, tb1.c_lflag);
    CHECK(wb1.ws_row == 33 && wb1.ws_col == 77, "window of B %dx%d", wb1.ws_row, wb1.ws_col);
    write_all(am, "d\n", 2);
    expect("A slave", as, A_SLAVE_LINES, sizeof A_SLAVE_LINES - 1);
    expect("A master", am, A_MASTER, sizeof A_MASTER - 1);
    expect("B slave", bs, B_IN, sizeof B_IN - 1);
    expect("B master", bm, B_OUT, sizeof B_OUT - 1);
    finish("ticks=%llu", tick);
}
