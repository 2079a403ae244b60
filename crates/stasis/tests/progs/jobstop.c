/* jobstop: processes stopped by job control must stay stopped across checkpoint/
 * restart, continue on SIGCONT, and their parent's wait must report what it would
 * have.
 *
 * R (this process) forks C1 and C2, which count in a shared page. R stops C1 with
 * SIGSTOP and collects the stop with waitpid(WUNTRACED); C2, in a process group of its
 * own (so that SIGTSTP is not discarded as sent to an orphaned group), is stopped with
 * SIGTSTP and the stop is left uncollected. R counts its SIGCHLDs (one per stop).
 * Prints `ready pid=R c1=C1 c2=C2`, then `tick N` every ~20 ms, checking that neither
 * child counts and that no new wait report appears, until `go` exists (it answers
 * `ping` with `pong`). Then: both children are in state T; C1 has nothing to report,
 * C2 exactly its SIGTSTP stop; SIGCHLD came twice; after SIGCONT each reports
 * WIFCONTINUED, counts on, and exits 0 on SIGUSR1. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>

static volatile sig_atomic_t sigchld;
static void on_chld(int s) { (void)s; sigchld++; }
static volatile sig_atomic_t quit;
static void on_usr1(int s) { (void)s; quit = 1; }

static volatile unsigned long *counts; /* [0]: C1, [1]: C2 */

static void child(int k) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    if (k == 1 && setpgid(0, 0)) die("setpgid");
    while (!quit) {
        __atomic_add_fetch(&counts[k], 1, __ATOMIC_SEQ_CST);
        sleep_ms(1);
    }
    _exit(0);
}

static char state_of(pid_t p) {
    char path[64], buf[512] = "";
    snprintf(path, sizeof path, "/proc/%d/stat", (int)p);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return '?';
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return '?';
    char *e = strrchr(buf, ')');
    return e && e[1] == ' ' ? e[2] : '?';
}

static unsigned long count(int k) { return __atomic_load_n(&counts[k], __ATOMIC_SEQ_CST); }

/* Waits until `c` has counted past `from` (at most 5 s). */
static int counts_on(int k, unsigned long from) {
    for (int i = 0; i < 500; i++) {
        if (count(k) > from + 3) return 1;
        sleep_ms(10);
    }
    return 0;
}

int main(void) {
    setup();
    counts = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (counts == MAP_FAILED) die("mmap");
    struct sigaction sa = {0};
    sa.sa_handler = on_chld;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGCHLD, &sa, NULL);
    pid_t c[2];
    for (int k = 0; k < 2; k++) {
        c[k] = fork();
        if (c[k] < 0) die("fork");
        if (c[k] == 0) child(k);
        if (k == 1) setpgid(c[1], c[1]); /* also here: no race with the child's own */
        if (!counts_on(k, 0)) die("child does not count");
    }
    /* C1: stopped and waited for. */
    kill(c[0], SIGSTOP);
    int st;
    if (waitpid(c[0], &st, WUNTRACED) != c[0] || !WIFSTOPPED(st) || WSTOPSIG(st) != SIGSTOP) die("waiting for C1's stop");
    /* C2: stopped by SIGTSTP, not waited for (the stop is seen in /proc). */
    kill(c[1], SIGTSTP);
    for (int i = 0; i < 500 && state_of(c[1]) != 'T'; i++) sleep_ms(10);
    if (state_of(c[1]) != 'T') die("C2 did not stop");
    for (int i = 0; i < 500 && sigchld < 2; i++) sleep_ms(10);
    int chld0 = sigchld;
    unsigned long n1 = count(0), n2 = count(1);
    out("ready pid=%d c1=%d c2=%d sigchld=%d\n", (int)getpid(), (int)c[0], (int)c[1], chld0);

    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        unsigned long a = count(0), b = count(1);
        if (a != n1 || b != n2) fail("tick %u: a stopped child counted (%lu -> %lu, %lu -> %lu)", n, n1, a, n2, b);
        n1 = a;
        n2 = b;
        out("tick %u sigchld=%d\n", n, (int)sigchld);
        sleep_ms(20);
    }

    CHECK(chld0 == 2, "SIGCHLD %d times for two stops", chld0);
    CHECK(sigchld == chld0, "SIGCHLD %d times by go, %d when ready", (int)sigchld, chld0);
    CHECK(state_of(c[0]) == 'T', "C1 in state %c, want T", state_of(c[0]));
    CHECK(state_of(c[1]) == 'T', "C2 in state %c, want T", state_of(c[1]));
    CHECK(count(0) == n1 && count(1) == n2, "a stopped child counted");
    /* What waitpid(WUNTRACED) reports now: nothing for C1, the SIGTSTP stop for C2. */
    pid_t w = waitpid(c[0], &st, WUNTRACED | WNOHANG);
    CHECK(w == 0, "waitpid(C1, WUNTRACED) returned %d (status %#x), want 0: its stop was collected before", (int)w, st);
    w = waitpid(c[1], &st, WUNTRACED | WNOHANG);
    CHECK(w == c[1] && WIFSTOPPED(st) && WSTOPSIG(st) == SIGTSTP,
          "waitpid(C2, WUNTRACED) returned %d (status %#x), want its SIGTSTP stop", (int)w, st);
    w = waitpid(c[1], &st, WUNTRACED | WNOHANG);
    CHECK(w == 0, "waitpid(C2, WUNTRACED) again returned %d, want 0", (int)w);
    for (int k = 0; k < 2; k++) {
        unsigned long from = count(k);
        kill(c[k], SIGCONT);
        w = waitpid(c[k], &st, WCONTINUED);
        CHECK(w == c[k] && WIFCONTINUED(st), "C%d: waitpid(WCONTINUED) returned %d (status %#x)", k + 1, (int)w, st);
        CHECK(counts_on(k, from), "C%d does not count after SIGCONT (state %c)", k + 1, state_of(c[k]));
    }
    for (int i = 0; i < 500 && sigchld < chld0 + 2; i++) sleep_ms(10);
    CHECK(sigchld == chld0 + 2, "SIGCHLD %d times after the two SIGCONTs, want %d", (int)sigchld, chld0 + 2);
    for (int k = 0; k < 2; k++) {
        kill(c[k], SIGUSR1);
        w = waitpid(c[k], &st, 0);
        CHECK(w == c[k] && WIFEXITED(st) && WEXITSTATUS(st) == 0, "C%d ended with %#x", k + 1, st);
    }
    finish("ticks=%u counts=%lu,%lu", n, count(0), count(1));
}
