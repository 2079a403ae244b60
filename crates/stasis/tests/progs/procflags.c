/* procflags: process settings made with prctl(2) and /proc/self files must survive
 * checkpoint/restart, and still work afterwards.
 *
 * Tree: R (this process) -> M -> G, G with a second thread.
 *   R: PR_SET_CHILD_SUBREAPER, PR_SET_THP_DISABLE 1, oom_score_adj 300.
 *   M: PR_SET_DUMPABLE 0 (unless argv[1] is "dumpable"), PR_SET_THP_DISABLE 1 with
 *      PR_THP_DISABLE_EXCEPT_ADVISED where the kernel has it (else 0), oom_score_adj
 *      500.
 *   G: PR_SET_THP_DISABLE 0, PR_SET_PDEATHSIG SIGUSR1 in its main thread and SIGUSR2
 *      in its second thread; oom_score_adj 500 inherited from M.
 * Prints `ready pid=R m=M g=G mthp=T mdumpable=D` (M's settings), then `tick N` every ~20 ms until `go` exists (it
 * answers `ping` with `pong`). Then every process checks its own settings; M exits,
 * which must send G both parent-death signals and reparent G to R (the subreaper),
 * which reaps both. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <pthread.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#ifndef PR_THP_DISABLE_EXCEPT_ADVISED
#define PR_THP_DISABLE_EXCEPT_ADVISED (1 << 1)
#endif

static volatile sig_atomic_t got_usr1, got_usr2;
static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void on_usr2(int s) { (void)s; got_usr2 = 1; }

static void set_oom(int v) {
    char b[16];
    int n = snprintf(b, sizeof b, "%d", v);
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, b, (size_t)n) != n) die("writing oom_score_adj");
    close(fd);
}

static int get_oom(void) {
    char b[16] = "";
    int fd = open("/proc/self/oom_score_adj", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -9999;
    ssize_t n = read(fd, b, sizeof b - 1);
    close(fd);
    return n > 0 ? atoi(b) : -9999;
}

/* Appends to `buf` the differences between this process's settings and the
 * wanted ones. */
static void check_common(char *buf, size_t cap, const char *who, int thp, int dumpable, int oom) {
    size_t len = strlen(buf);
    int v = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    if (v != thp) len += (size_t)snprintf(buf + len, cap - len, " %s THP_DISABLE %d, want %d;", who, v, thp);
    v = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
    if (v != dumpable) len += (size_t)snprintf(buf + len, cap - len, " %s DUMPABLE %d, want %d;", who, v, dumpable);
    v = get_oom();
    if (v != oom) snprintf(buf + len, cap - len, " %s oom_score_adj %d, want %d;", who, v, oom);
}

static int thread_pdeath = -1;

static void *g_thread(void *arg) {
    (void)arg;
    if (prctl(PR_SET_PDEATHSIG, SIGUSR2, 0, 0, 0)) die("PR_SET_PDEATHSIG thread");
    while (!go_exists()) sleep_ms(10);
    int s = 0;
    prctl(PR_GET_PDEATHSIG, &s, 0, 0, 0);
    __atomic_store_n(&thread_pdeath, s, __ATOMIC_SEQ_CST);
    for (;;) pause();
    return NULL;
}

/* G: reports its checks on `gm` (to M) before M exits, then the parent-death
 * signals and its new parent on `res` (to R). */
static void run_g(int gm, int res, pid_t r) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    if (prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)) die("G PR_SET_THP_DISABLE 0");
    if (prctl(PR_SET_PDEATHSIG, SIGUSR1, 0, 0, 0)) die("G PR_SET_PDEATHSIG");
    pthread_t t;
    if (pthread_create(&t, NULL, g_thread, NULL)) die("pthread_create");
    while (!go_exists()) sleep_ms(10);
    char buf[1024] = "";
    int s = 0;
    prctl(PR_GET_PDEATHSIG, &s, 0, 0, 0);
    if (s != SIGUSR1) snprintf(buf, sizeof buf, " G PDEATHSIG %d, want %d;", s, SIGUSR1);
    for (int i = 0; i < 500 && __atomic_load_n(&thread_pdeath, __ATOMIC_SEQ_CST) < 0; i++) sleep_ms(10);
    int ts = __atomic_load_n(&thread_pdeath, __ATOMIC_SEQ_CST);
    if (ts != SIGUSR2)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " G thread PDEATHSIG %d, want %d;", ts, SIGUSR2);
    check_common(buf, sizeof buf, "G", 0, 1, 500);
    if (got_usr1 || got_usr2) snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " G got a parent-death signal early;");
    char line[1100];
    int n = snprintf(line, sizeof line, "%s\n", buf[0] ? buf : " G ok");
    write_all(gm, line, (size_t)n);
    close(gm);
    /* M exits now: both signals must come, and R must become the parent. */
    for (int i = 0; i < 500 && !(got_usr1 && got_usr2); i++) sleep_ms(10);
    pid_t pp = 0;
    for (int i = 0; i < 500 && (pp = getppid()) != r; i++) sleep_ms(10);
    buf[0] = 0;
    if (!got_usr1) strcat(buf, " G no SIGUSR1 when M died;");
    if (!got_usr2) strcat(buf, " G no SIGUSR2 (thread) when M died;");
    if (pp != r) snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " G parent %d after M died, want R %d;", (int)pp, (int)r);
    n = snprintf(line, sizeof line, "%s\n", buf[0] ? buf : " G after ok");
    write_all(res, line, (size_t)n);
    _exit(0);
}

int main(int argc, char **argv) {
    setup();
    int m_dumpable = argc > 1 && strcmp(argv[1], "dumpable") == 0;
    pid_t r = getpid();
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) die("PR_SET_CHILD_SUBREAPER");
    if (prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)) die("R PR_SET_THP_DISABLE");
    set_oom(300);
    int res[2], mr[2];
    if (pipe(res) || pipe(mr)) die("pipe");
    pid_t m = fork();
    if (m < 0) die("fork");
    if (m == 0) {
        close(res[0]);
        close(mr[0]);
        int m_thp = 3;
        if (prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED, 0, 0)) {
            m_thp = 0;
            if (prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)) die("M PR_SET_THP_DISABLE");
        }
        set_oom(500);
        int gm[2];
        if (pipe(gm)) die("pipe gm");
        pid_t g = fork();
        if (g < 0) die("fork G");
        if (g == 0) {
            close(gm[0]);
            close(mr[1]);
            run_g(gm[1], res[1], r);
        }
        close(gm[1]);
        if (!m_dumpable && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) die("PR_SET_DUMPABLE 0");
        char ids[32];
        int n = snprintf(ids, sizeof ids, "%d %d\n", (int)g, m_thp);
        write_all(mr[1], ids, (size_t)n);
        close(mr[1]);
        while (!go_exists()) sleep_ms(10);
        char buf[2048] = "";
        check_common(buf, sizeof buf, "M", m_thp, m_dumpable, 500);
        char gl[1100] = "";
        ssize_t k = read(gm[0], gl, sizeof gl - 1);
        if (k <= 0) strcat(buf, " M: no report from G;");
        else strncat(buf, gl, sizeof buf - strlen(buf) - 1);
        size_t l = strlen(buf);
        if (l && buf[l - 1] == '\n') buf[l - 1] = 0;
        char line[2100];
        n = snprintf(line, sizeof line, "%s\n", buf);
        write_all(res[1], line, (size_t)n);
        _exit(0);
    }
    close(res[1]);
    close(mr[1]);
    char ids[32] = "";
    if (read(mr[0], ids, sizeof ids - 1) <= 0) die("reading G's pid");
    close(mr[0]);
    int m_thp = -1;
    pid_t g = 0;
    if (sscanf(ids, "%d %d", &g, &m_thp) != 2) die("parsing G's pid");
    out("ready pid=%d m=%d g=%d mthp=%d mdumpable=%d\n", (int)r, (int)m, (int)g, m_thp, m_dumpable);

    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }

    char buf[256] = "";
    int sub = 0;
    prctl(PR_GET_CHILD_SUBREAPER, &sub, 0, 0, 0);
    CHECK(sub == 1, "R CHILD_SUBREAPER %d, want 1", sub);
    check_common(buf, sizeof buf, "R", 1, 1, 300);
    CHECK(buf[0] == 0, "%s", buf);
    /* Reports of M (with G's checks) and of G after M's death. */
    char all[8192] = "";
    size_t len = 0;
    for (;;) {
        ssize_t k = read(res[0], all + len, sizeof all - 1 - len);
        if (k <= 0) break;
        len += (size_t)k;
    }
    all[len] = 0;
    CHECK(strstr(all, "G after") != NULL || strstr(all, "after M died"), "no report from G after M's death");
    for (char *line = strtok(all, "\n"); line; line = strtok(NULL, "\n"))
        if (strcmp(line, " G ok") != 0 && strcmp(line, " G after ok") != 0 && line[0]) fail("%s", line);
    int reaped_m = 0, reaped_g = 0;
    for (;;) {
        int st;
        pid_t w = waitpid(-1, &st, 0);
        if (w < 0) break;
        int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
        if (w == m) reaped_m = ok ? 1 : -1;
        else if (w == g) reaped_g = ok ? 1 : -1;
        else fail("reaped an unknown child %d", (int)w);
    }
    CHECK(reaped_m == 1, "M %s", reaped_m ? "failed" : "was not reaped");
    CHECK(reaped_g == 1, "G %s by R (the subreaper)", reaped_g ? "failed" : "was not reaped");
    finish("ticks=%u m_dumpable=%d", n, m_dumpable);
}
