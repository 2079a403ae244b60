/* ring: a parent forks N children (argv[1], default 16) connected in a ring by
 * pipes (child i reads pipe i and writes pipe i+1 mod N). A token {value, stop}
 * goes around the ring without pause; every child increments the value on each
 * hop and counts its hops, and checks that each token it receives carries its
 * previous value + N (exactly one token: never lost, never doubled). Child 0
 * sends the value to the parent (non-blocking progress pipe) every 16 laps.
 *
 * The parent prints `ready n=N parent=P pids=C0,C1,...`, then `tick K token=V`
 * every ~20 ms. At `go` it asks child 0 (control pipe) to stop the ring: the
 * token goes one more lap with the stop flag, each child reports
 * {index, hops, value, errors} on a shared result pipe and exits with status
 * 10 + index. The parent checks every child's report (equal hop counts, no
 * sequence error, same parent as before), that the final token value equals
 * the total number of hops, and reaps every child with waitpid (exit status
 * 10 + index). Output: `OK hops=H value=V ticks=K` / `FAIL ...`. */
#include "util.h"
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#define MAXN 64

struct token {
    uint64_t value;
    uint64_t stop;
};

struct result {
    int64_t idx;
    uint64_t hops;
    uint64_t value; /* child 0: final token value */
    uint64_t errors;
};

/* Read exactly n bytes; returns 0, or -1 on EOF/error. */
static int read_full(int fd, void *buf, size_t n) {
    char *b = buf;
    while (n > 0) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

static void child(int idx, int n, int rd, int wr, int ctl, int prog, int res, pid_t ppid0) {
    uint64_t hops = 0, errors = 0, last = 0, final = 0;
    struct token t = {0, 0};
    int have = idx == 0; /* child 0 starts with the token (value 0) */
    if (idx == 0) {
        int fl = fcntl(prog, F_GETFL);
        fcntl(prog, F_SETFL, fl | O_NONBLOCK);
        fl = fcntl(ctl, F_GETFL);
        fcntl(ctl, F_SETFL, fl | O_NONBLOCK);
    }
    int first = 1;
    for (;;) {
        if (!have) {
            if (read_full(rd, &t, sizeof t) != 0) {
                errors += 1000000; /* ring broken */
                break;
            }
            if (!first && t.value != last + (uint64_t)n) errors++;
        }
        have = 0;
        first = 0;
        last = t.value;
        if (idx == 0 && t.stop) { /* back after the last lap */
            final = t.value;
            break;
        }
        if (idx == 0) {
            char c;
            if (read(ctl, &c, 1) == 1) t.stop = 1;
        }
        t.value++;
        hops++;
        write_all(wr, (const char *)&t, sizeof t);
        if (idx == 0 && hops % 16 == 0) {
            uint64_t v = t.value;
            if (write(prog, &v, sizeof v) < 0) { /* full: skip */ }
        }
        if (idx != 0 && t.stop) break;
    }
    if (getppid() != ppid0) errors += 1000;
    struct result r = {idx, hops, final, errors};
    write_all(res, (const char *)&r, sizeof r);
    _exit(errors ? 1 : 10 + idx);
}

int main(int argc, char **argv) {
    setup();
    int n = argc > 1 ? atoi(argv[1]) : 16;
    if (n < 2 || n > MAXN) die("bad N");
    int ring[MAXN][2], ctl[2], prog[2], res[2];
    for (int i = 0; i < n; i++)
        if (pipe(ring[i])) die("pipe");
    if (pipe(ctl) || pipe(prog) || pipe(res)) die("pipe");
    pid_t me = getpid(), pids[MAXN];
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) die("fork");
        if (p == 0) {
            int rd = ring[i][0], wr = ring[(i + 1) % n][1];
            for (int j = 0; j < n; j++) {
                if (ring[j][0] != rd) close(ring[j][0]);
                if (ring[j][1] != wr) close(ring[j][1]);
            }
            close(ctl[1]);
            close(prog[0]);
            close(res[0]);
            if (i != 0) {
                close(ctl[0]);
                close(prog[1]);
            }
            child(i, n, rd, wr, ctl[0], prog[1], res[1], me);
        }
        pids[i] = p;
    }
    for (int j = 0; j < n; j++) {
        close(ring[j][0]);
        close(ring[j][1]);
    }
    close(ctl[0]);
    close(prog[1]);
    close(res[1]);
    fcntl(prog[0], F_SETFL, fcntl(prog[0], F_GETFL) | O_NONBLOCK);

    char list[MAXN * 12] = "";
    size_t len = 0;
    for (int i = 0; i < n; i++) len += (size_t)snprintf(list + len, sizeof list - len, i ? ",%d" : "%d", (int)pids[i]);
    out("ready n=%d parent=%d pids=%s\n", n, (int)me, list);

    uint64_t tick = 0, value = 0;
    while (!go_exists()) {
        uint64_t v;
        while (read(prog[0], &v, sizeof v) == (ssize_t)sizeof v) value = v;
        out("tick %llu token=%llu\n", (unsigned long long)tick, (unsigned long long)value);
        tick++;
        sleep_ms(20);
    }
    if (write(ctl[1], "s", 1) != 1) die("write ctl");

    struct result r[MAXN];
    int got = 0, seen[MAXN] = {0};
    while (got < n) {
        struct pollfd pf = {res[0], POLLIN, 0};
        int pr = poll(&pf, 1, 5000);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) {
            fail("ring stalled: %d of %d results after 5 s (token lost?)", got, n);
            for (int i = 0; i < n; i++) kill(pids[i], SIGKILL); /* let waitpid below return */
            break;
        }
        struct result x;
        if (read_full(res[0], &x, sizeof x) != 0) {
            fail("result pipe: EOF after %d of %d results", got, n);
            break;
        }
        if (x.idx < 0 || x.idx >= n || seen[x.idx]) {
            fail("bad or duplicate result for child %lld", (long long)x.idx);
            continue;
        }
        seen[x.idx] = 1;
        r[x.idx] = x;
        got++;
    }
    uint64_t total = 0;
    if (got == n) {
        for (int i = 0; i < n; i++) {
            total += r[i].hops;
            CHECK(r[i].errors == 0, "child %d reported %llu errors (sequence %llu, parent %llu, broken %llu)", i,
                  (unsigned long long)r[i].errors, (unsigned long long)(r[i].errors % 1000),
                  (unsigned long long)(r[i].errors / 1000 % 1000), (unsigned long long)(r[i].errors / 1000000));
            CHECK(r[i].hops == r[0].hops, "child %d made %llu hops, child 0 made %llu", i,
                  (unsigned long long)r[i].hops, (unsigned long long)r[0].hops);
        }
        CHECK(r[0].value == total, "final token value %llu != total hops %llu", (unsigned long long)r[0].value,
              (unsigned long long)total);
        CHECK(r[0].value >= value, "final token value %llu below the last progress value %llu",
              (unsigned long long)r[0].value, (unsigned long long)value);
    }
    for (int i = 0; i < n; i++) {
        int st = 0;
        pid_t w = waitpid(pids[i], &st, 0);
        if (w != pids[i]) {
            fail("waitpid(%d) returned %d: %s", (int)pids[i], (int)w, strerror(errno));
            continue;
        }
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 10 + i, "child %d (pid %d) ended with status 0x%x, want exit %d", i,
              (int)pids[i], st, 10 + i);
    }
    int st;
    pid_t w = waitpid(-1, &st, WNOHANG);
    CHECK(w == -1 && errno == ECHILD, "waitpid(-1) after reaping all returned %d (unexpected children)", (int)w);
    CHECK(getpid() == me, "getpid() changed from %d to %d", (int)me, (int)getpid());
    finish("hops=%llu value=%llu ticks=%llu", (unsigned long long)(got ? r[0].hops : 0),
           (unsigned long long)total, (unsigned long long)tick);
}
