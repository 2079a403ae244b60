/* zombie: unreaped children and SIGCHLD across checkpoint/restart.
 * The parent installs a SIGCHLD handler (SA_SIGINFO, records pid/status/code
 * of every delivery), forks child Z which exits with status 42 at once and is
 * left a zombie (checked with waitid(WNOWAIT), which does not reap), then forks
 * child L which exits with status 7 once a file `release` exists.
 * Output: `ready parent=P zombie=Z long=L`, `tick N sigchld=K` every ~20 ms
 * (each tick also checks that Z is still an unreaped zombie with status 42),
 * `sigchld pid=L status=7 code=1` once the handler saw L exit. At `go`:
 * waitpid(Z) must return Z with exit status 42, waitpid(L) L with 7, the
 * handler must have seen L's exit, and no other child may be left.
 * `OK ticks=N sigchld=K spurious=S` (S: deliveries for neither Z nor L
 * or for Z more than once) / `FAIL ...`. */
#include "util.h"
#include <signal.h>
#include <sys/wait.h>

#define MAXREC 256
static volatile sig_atomic_t nrec;
static volatile pid_t rec_pid[MAXREC];
static volatile int rec_status[MAXREC], rec_code[MAXREC];

static void on_chld(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    int i = nrec;
    if (i < MAXREC) {
        rec_pid[i] = si->si_pid;
        rec_status[i] = si->si_status;
        rec_code[i] = si->si_code;
    }
    nrec = i + 1;
}

/* Is z an unreaped zombie with exit status 42? (does not reap it) */
static int check_zombie(pid_t z, char *why, size_t cap) {
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (waitid(P_PID, (id_t)z, &si, WEXITED | WNOHANG | WNOWAIT) != 0) {
        snprintf(why, cap, "waitid(WNOWAIT) on the zombie %d: %s", (int)z, strerror(errno));
        return 0;
    }
    if (si.si_pid != z || si.si_code != CLD_EXITED || si.si_status != 42) {
        snprintf(why, cap, "waitid(WNOWAIT) on the zombie %d: pid %d code %d status %d", (int)z, (int)si.si_pid,
                 si.si_code, si.si_status);
        return 0;
    }
    return 1;
}

int main(void) {
    setup();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_chld;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGCHLD, &sa, NULL)) die("sigaction");
    pid_t me = getpid();

    pid_t z = fork();
    if (z < 0) die("fork");
    if (z == 0) _exit(42);
    char why[256];
    for (int i = 0;; i++) {
        if (check_zombie(z, why, sizeof why)) break;
        if (i > 2000) {
            out("FAIL child %d never became a waitable zombie: %s\n", (int)z, why);
            exit(1);
        }
        sleep_ms(5);
    }

    pid_t l = fork();
    if (l < 0) die("fork");
    if (l == 0) {
        for (;;) {
            if (access("release", F_OK) == 0) _exit(7);
            if (go_exists()) _exit(8); /* go without release: the test forgot it */
            if (getppid() != me) _exit(9);
            sleep_ms(10);
        }
    }
    out("ready parent=%d zombie=%d long=%d\n", (int)me, (int)z, (int)l);

    unsigned long long tick = 0;
    int reported = 0, zombie_bad = 0;
    while (!go_exists()) {
        int n = nrec;
        for (int i = 0; i < n && i < MAXREC && !reported; i++) {
            if (rec_pid[i] == l) {
                out("sigchld pid=%d status=%d code=%d\n", (int)rec_pid[i], rec_status[i], rec_code[i]);
                reported = 1;
            }
        }
        if (!zombie_bad && !check_zombie(z, why, sizeof why)) {
            fail("tick %llu: %s", tick, why);
            zombie_bad = 1;
        }
        out("tick %llu sigchld=%d\n", tick++, n);
        sleep_ms(20);
    }

    int st = 0;
    pid_t w = waitpid(z, &st, WNOHANG);
    CHECK(w == z, "waitpid(zombie %d, WNOHANG) returned %d (%s)", (int)z, (int)w, w < 0 ? strerror(errno) : "");
    if (w == z) CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 42, "zombie's wait status 0x%x, want exit 42", st);
    w = waitpid(l, &st, 0);
    CHECK(w == l, "waitpid(%d) returned %d (%s)", (int)l, (int)w, w < 0 ? strerror(errno) : "");
    if (w == l) CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 7, "long child's wait status 0x%x, want exit 7", st);
    w = waitpid(-1, &st, WNOHANG);
    CHECK(w == -1 && errno == ECHILD, "waitpid(-1) after reaping all returned %d", (int)w);

    int n = nrec, seen_l = 0, seen_z = 0, spurious = 0;
    for (int i = 0; i < n && i < MAXREC; i++) {
        if (rec_pid[i] == l && !seen_l) {
            seen_l = 1;
            CHECK(rec_status[i] == 7 && rec_code[i] == CLD_EXITED, "SIGCHLD for the long child: status %d code %d",
                  rec_status[i], rec_code[i]);
        } else if (rec_pid[i] == z && !seen_z) {
            seen_z = 1;
        } else {
            spurious++;
        }
    }
    CHECK(seen_l, "no SIGCHLD for the long child %d (%d deliveries)", (int)l, n);
    CHECK(reported, "the long child's SIGCHLD was not seen before go");
    CHECK(getpid() == me, "getpid() changed from %d to %d", (int)me, (int)getpid());
    char list[2048] = "";
    size_t len = 0;
    for (int i = 0; i < n && i < MAXREC && len + 64 < sizeof list; i++)
        len += (size_t)snprintf(list + len, sizeof list - len, i ? ",%d:%d:%d" : "%d:%d:%d", (int)rec_pid[i],
                                rec_status[i], rec_code[i]);
    finish("ticks=%llu sigchld=%d spurious=%d deliveries=%s", tick, n, spurious, list);
}
