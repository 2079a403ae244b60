/* epollx: epoll sets holding files whose fd numbers were closed or reused, and
 * nested epoll sets.
 *
 * The outer epoll set `ep` watches:
 *   pipe A's read end, registered as fd NA (data DA), then dup'ed to KA and fd NA
 *   closed and reused for an eventfd (not registered);
 *   pipe B's read end, registered as fd NB (data DB), dup'ed to KB, NB closed and
 *   left closed;
 *   pipe C's read end, registered as fd NC (data DC), then closed: only the child
 *   K (forked before the close) still holds it;
 *   the inner epoll set `in` (data DN, EPOLLIN), which watches an eventfd `ev`
 *   (data DI, EPOLLIN|EPOLLET).
 * Prints `ready pid=P child=K ep=N in=N na=N nb=N nc=N`, then `tick N` every 20 ms
 * (each tick checks that nothing is reported: every watched file is quiet). At
 * `go`, for A, B, C and the inner set in turn: one byte written (the eventfd
 * incremented), epoll_wait on `ep` reports exactly that item's data and events
 * (the inner set's event reports DI through `in`); the byte is read back through
 * KA, KB, and for C by the child, told to only once the parent saw the event. Then: epoll_ctl DEL of NA fails with ENOENT
 * (NA holds the unregistered eventfd), of NB with EBADF; MOD of `in` works (it is
 * registered under its own number). Output `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/wait.h>

#define DA 0x1111000000000001ULL
#define DB 0x2222000000000002ULL
#define DC 0x3333000000000003ULL
#define DN 0x4444000000000004ULL
#define DI 0x5555000000000005ULL

static int ep;

static void add(int e, int fd, uint32_t events, uint64_t data) {
    struct epoll_event ev = {events, {.u64 = data}};
    if (epoll_ctl(e, EPOLL_CTL_ADD, fd, &ev)) die("epoll_ctl ADD");
}

/* One event on `ep` within 2 s, with data `want`. */
static void expect(uint64_t want, const char *what) {
    struct epoll_event evs[8];
    int n = epoll_wait(ep, evs, 8, 2000);
    if (n != 1) {
        fail("%s: epoll_wait gave %d events (first data %llx)", what, n, n > 0 ? (unsigned long long)evs[0].data.u64 : 0ULL);
        return;
    }
    CHECK(evs[0].data.u64 == want, "%s: data %llx, not %llx", what, (unsigned long long)evs[0].data.u64,
          (unsigned long long)want);
    CHECK(evs[0].events & EPOLLIN, "%s: events %x", what, evs[0].events);
}

int main(void) {
    setup();
    int a[2], b[2], c[2], rep[2], tell[2];
    if (pipe(a) || pipe(b) || pipe(c) || pipe(rep) || pipe(tell)) die("pipe");
    ep = epoll_create1(EPOLL_CLOEXEC);
    int in = epoll_create1(0);
    int ev = eventfd(0, EFD_NONBLOCK);
    if (ep < 0 || in < 0 || ev < 0) die("epoll_create/eventfd");
    add(ep, a[0], EPOLLIN, DA);
    add(ep, b[0], EPOLLIN, DB);
    add(ep, c[0], EPOLLIN, DC);
    add(in, ev, EPOLLIN | EPOLLET, DI);
    add(ep, in, EPOLLIN, DN);
    int na = a[0], nb = b[0], nc = c[0];
    pid_t k = fork();
    if (k < 0) die("fork");
    if (k == 0) {
        /* Keeps C's read end; once told (after the parent saw C's event) reads the
         * byte and reports it. */
        close(rep[0]);
        close(c[1]);
        close(tell[1]);
        char t;
        if (read(tell[0], &t, 1) != 1) _exit(1);
        char x = 0;
        ssize_t r = read(nc, &x, 1);
        char msg = r == 1 ? x : '?';
        write_all(rep[1], &msg, 1);
        _exit(0);
    }
    close(rep[1]);
    close(tell[0]);
    int ka = dup(a[0]), kb = dup(b[0]);
    if (ka < 0 || kb < 0) die("dup");
    close(a[0]);
    close(b[0]);
    close(c[0]);
    /* NA is reused for an eventfd that is not registered. */
    int other = eventfd(0, 0);
    if (other < 0) die("eventfd");
    if (other != na) {
        if (dup2(other, na) < 0) die("dup2");
        close(other);
    }
    out("ready pid=%d child=%d ep=%d in=%d na=%d nb=%d nc=%d\n", (int)getpid(), (int)k, ep, in, na, nb, nc);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        struct epoll_event evs[4];
        int m = epoll_wait(ep, evs, 4, 0);
        CHECK(m == 0, "tick %u: epoll_wait reported %d events (data %llx)", n, m,
              m > 0 ? (unsigned long long)evs[0].data.u64 : 0ULL);
        out("tick %u\n", n);
        sleep_ms(20);
    }
    char x;
    write_all(a[1], "a", 1);
    expect(DA, "pipe A (fd number reused)");
    CHECK(read(ka, &x, 1) == 1 && x == 'a', "pipe A: byte not read back through its dup");
    write_all(b[1], "b", 1);
    expect(DB, "pipe B (fd number closed)");
    CHECK(read(kb, &x, 1) == 1 && x == 'b', "pipe B: byte not read back through its dup");
    write_all(c[1], "c", 1);
    expect(DC, "pipe C (held by the child only)");
    write_all(tell[1], "t", 1);
    CHECK(read(rep[0], &x, 1) == 1 && x == 'c', "pipe C: the child did not read the byte");
    uint64_t one = 1;
    CHECK(write(ev, &one, 8) == 8, "eventfd write");
    expect(DN, "the inner epoll set");
    struct epoll_event evs[4];
    int m = epoll_wait(in, evs, 4, 0);
    CHECK(m == 1 && evs[0].data.u64 == DI && (evs[0].events & EPOLLIN), "inner set: %d events, data %llx", m,
          m > 0 ? (unsigned long long)evs[0].data.u64 : 0ULL);
    /* Edge-triggered: no second report without a new write. */
    CHECK(epoll_wait(in, evs, 4, 0) == 0, "inner set: the edge-triggered eventfd reported twice");
    errno = 0;
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, na, NULL) < 0 && errno == ENOENT, "DEL of reused NA: errno %d, not ENOENT",
          errno);
    errno = 0;
    CHECK(epoll_ctl(ep, EPOLL_CTL_DEL, nb, NULL) < 0 && errno == EBADF, "DEL of closed NB: errno %d, not EBADF",
          errno);
    struct epoll_event mod = {EPOLLIN, {.u64 = DN}};
    CHECK(epoll_ctl(ep, EPOLL_CTL_MOD, in, &mod) == 0, "MOD of the inner set: %s", strerror(errno));
    int st;
    CHECK(waitpid(k, &st, 0) == k && WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child did not end well");
    finish("ticks=%u", n);
}
