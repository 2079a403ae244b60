/* sessions: process groups and sessions across checkpoint/restart.
 * Tree (the root R is a session leader under stasis run):
 *   R ── A  setsid(): new session A
 *   │    ├── B  setpgid(0,0): group B in session A
 *   │    │   └── B2  (group B)
 *   │    ├── C  setpgid(0,B): joins group B
 *   │    └── D  (group A)
 *   ├── E  setpgid(0,0): group E in session R
 *   ├── F  (group R)
 *   └── G  forks H and exits (reaped by R); H is an orphan (reparented to the
 *          stasis init) and calls setsid(): new session H
 * Every process but R records {pid, ppid, pgid, sid} and sends it to R over a
 * shared pipe; R prints `ready R=pid:ppid:pgid:sid A=... B=... ...` and then
 * `tick N` every ~20 ms. At `go` every process reads its ids again and sends
 * them; each waits for its children (exit 0 expected) and exits. R compares
 * before/after for everyone (and itself), reaps A, E, F.
 * Output: `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <poll.h>
#include <sys/wait.h>

struct rec {
    char name[4];
    int32_t after;
    int32_t pid, ppid, pgid, sid;
};

static int rep_w = -1;

static struct rec ids(const char *name, int after) {
    struct rec r;
    memset(&r, 0, sizeof r);
    strncpy(r.name, name, sizeof r.name - 1);
    r.after = after;
    r.pid = getpid();
    r.ppid = getppid();
    r.pgid = getpgid(0);
    r.sid = getsid(0);
    return r;
}

static void send_ids(const char *name, int after) {
    struct rec r = ids(name, after);
    write_all(rep_w, (const char *)&r, sizeof r);
}

/* Body of a non-root process: report, wait for go, report again, reap the
 * given children, exit 0 if they all exited 0. */
static void __attribute__((noreturn)) member(const char *name, pid_t *kids, int nkids) {
    send_ids(name, 0);
    while (!go_exists()) sleep_ms(10);
    send_ids(name, 1);
    int bad = 0;
    for (int i = 0; i < nkids; i++) {
        int st;
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFEXITED(st) || WEXITSTATUS(st) != 0) bad = 1;
    }
    _exit(bad);
}

static pid_t spawn(void) {
    pid_t p = fork();
    if (p < 0) die("fork");
    return p;
}

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

#define NREC 8

/* Collect one record of each of the NREC members with the given `after`. */
static int collect(int fd, struct rec *v, int after) {
    int got = 0;
    while (got < NREC) {
        struct pollfd pf = {fd, POLLIN, 0};
        int pr = poll(&pf, 1, 10000);
        if (pr < 0 && errno == EINTR) continue;
        if (pr <= 0) break;
        struct rec r;
        if (read_full(fd, &r, sizeof r) != 0) break;
        if (r.after != after) {
            fail("record of %s with after=%d while collecting after=%d", r.name, r.after, after);
            continue;
        }
        v[got++] = r;
    }
    return got;
}

static const struct rec *find(const struct rec *v, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(v[i].name, name) == 0) return &v[i];
    return NULL;
}

int main(void) {
    setup();
    int rep[2];
    if (pipe(rep)) die("pipe");
    rep_w = rep[1];
    struct rec root0 = ids("R", 0);

    pid_t a = spawn();
    if (a == 0) {
        close(rep[0]);
        if (setsid() < 0) die("setsid A");
        pid_t k[3];
        k[0] = spawn();
        if (k[0] == 0) {
            setpgid(0, 0);
            pid_t b2 = spawn();
            if (b2 == 0) member("B2", NULL, 0);
            member("B", &b2, 1);
        }
        setpgid(k[0], k[0]); /* like a shell: both sides set it */
        pid_t bgrp = k[0];
        k[1] = spawn();
        if (k[1] == 0) {
            if (setpgid(0, bgrp) != 0) die("setpgid C -> B");
            member("C", NULL, 0);
        }
        setpgid(k[1], bgrp);
        k[2] = spawn();
        if (k[2] == 0) member("D", NULL, 0);
        member("A", k, 3);
    }
    pid_t e = spawn();
    if (e == 0) {
        close(rep[0]);
        setpgid(0, 0);
        member("E", NULL, 0);
    }
    setpgid(e, e);
    pid_t f = spawn();
    if (f == 0) {
        close(rep[0]);
        member("F", NULL, 0);
    }
    pid_t g = spawn();
    if (g == 0) {
        close(rep[0]);
        pid_t gp = getpid();
        pid_t h = spawn();
        if (h == 0) {
            while (getppid() == gp) sleep_ms(1);
            if (setsid() < 0) die("setsid H");
            member("H", NULL, 0);
        }
        _exit(0);
    }
    int st;
    if (waitpid(g, &st, 0) != g || !WIFEXITED(st) || WEXITSTATUS(st) != 0) die("waitpid G");

    struct rec before[NREC], after[NREC];
    int nb = collect(rep[0], before, 0);
    if (nb != NREC) {
        out("FAIL only %d of %d processes reported\n", nb, NREC);
        exit(1);
    }
    char line[2048];
    size_t len = (size_t)snprintf(line, sizeof line, "ready R=%d:%d:%d:%d", root0.pid, root0.ppid, root0.pgid,
                                  root0.sid);
    const char *order[NREC] = {"A", "B", "B2", "C", "D", "E", "F", "H"};
    for (int i = 0; i < NREC; i++) {
        const struct rec *r = find(before, nb, order[i]);
        if (!r) {
            out("FAIL no record of %s\n", order[i]);
            exit(1);
        }
        len += (size_t)snprintf(line + len, sizeof line - len, " %s=%d:%d:%d:%d", r->name, r->pid, r->ppid, r->pgid,
                                r->sid);
    }
    out("%s\n", line);
    /* sanity of the setup itself */
    const struct rec *A = find(before, nb, "A"), *B = find(before, nb, "B"), *C = find(before, nb, "C"),
                     *H = find(before, nb, "H");
    if (A->sid != A->pid || B->pgid != B->pid || C->pgid != B->pid || B->sid != A->pid || H->sid != H->pid) {
        out("FAIL the tree was not set up as intended\n");
        exit(1);
    }

    unsigned long long tick = 0;
    while (!go_exists()) {
        out("tick %llu\n", tick++);
        sleep_ms(20);
    }
    int na = collect(rep[0], after, 1);
    CHECK(na == NREC, "only %d of %d processes reported after go", na, NREC);
    for (int i = 0; i < na; i++) {
        const struct rec *b = find(before, nb, after[i].name), *x = &after[i];
        if (!b) continue;
        CHECK(b->pid == x->pid && b->ppid == x->ppid && b->pgid == x->pgid && b->sid == x->sid,
              "%s: pid:ppid:pgid:sid was %d:%d:%d:%d, now %d:%d:%d:%d", x->name, b->pid, b->ppid, b->pgid, b->sid,
              x->pid, x->ppid, x->pgid, x->sid);
    }
    struct rec root1 = ids("R", 1);
    CHECK(root0.pid == root1.pid && root0.ppid == root1.ppid && root0.pgid == root1.pgid && root0.sid == root1.sid,
          "R: pid:ppid:pgid:sid was %d:%d:%d:%d, now %d:%d:%d:%d", root0.pid, root0.ppid, root0.pgid, root0.sid,
          root1.pid, root1.ppid, root1.pgid, root1.sid);
    pid_t kids[3] = {a, e, f};
    for (int i = 0; i < 3; i++) {
        pid_t w = waitpid(kids[i], &st, 0);
        CHECK(w == kids[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child %d: waitpid %d status 0x%x", (int)kids[i],
              (int)w, st);
    }
    finish("ticks=%llu", tick);
}
