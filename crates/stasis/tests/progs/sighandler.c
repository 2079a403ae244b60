/* sighandler: signal dispositions, mask, pending and queued signals, the
 * alternate signal stack and an interval timer must survive
 * checkpoint/restart.
 * Before `ready`:
 *   SIGUSR1: SA_SIGINFO|SA_RESTART handler (counts, records si_value),
 *            sa_mask = {SIGINT}
 *   SIGUSR2: SA_SIGINFO handler, blocked; sigqueue(self, SIGUSR2, 42) pending
 *   SIGRTMIN+1: SA_SIGINFO handler, blocked; queued twice with values 7, 8
 *   SIGHUP blocked (no handler, default disposition)
 *   (the disposition of every signal is compared, not just these)
 *   SIGPIPE: SIG_IGN;  SIGTERM: SA_ONSTACK handler; sigaltstack installed
 *   SIGCHLD: default action with SA_NOCLDSTOP (which acts even so)
 *   ITIMER_REAL: 3600 s value / 3600 s interval (never fires during the test)
 * After `go` everything is compared; then SIGUSR1 is raised (handler must run
 * once), the blocked signals are unblocked and must be delivered with their
 * values in order (RT: 7 then 8). */
#include "util.h"
#include <signal.h>
#include <sys/time.h>

static volatile sig_atomic_t usr1_count, usr1_val = -1;
static volatile sig_atomic_t usr2_count, usr2_val = -1, usr2_code;
static volatile sig_atomic_t rt_count, rt_vals[4];

static void h_usr1(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    usr1_count++;
    usr1_val = si->si_value.sival_int;
}
static void h_usr2(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    usr2_count++;
    usr2_val = si->si_value.sival_int;
    usr2_code = si->si_code;
}
static void h_rt(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    if (rt_count < 4) rt_vals[rt_count] = si->si_value.sival_int;
    rt_count++;
}
static void h_term(int sig) { (void)sig; }

static char altstack[64 * 1024];

static int same_set(const sigset_t *a, const sigset_t *b) {
    for (int s = 1; s < NSIG; s++)
        if (sigismember(a, s) != sigismember(b, s)) return 0;
    return 1;
}
static void set_str(const sigset_t *a, char *buf, size_t cap) {
    size_t l = 0;
    buf[0] = 0;
    for (int s = 1; s < NSIG && l + 8 < cap; s++)
        if (sigismember(a, s) == 1) l += (size_t)snprintf(buf + l, cap - l, "%d,", s);
}

int main(void) {
    setup();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h_usr1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT);
    if (sigaction(SIGUSR1, &sa, NULL)) die("sigaction usr1");
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = h_usr2;
    sa.sa_flags = SA_SIGINFO;
    if (sigaction(SIGUSR2, &sa, NULL)) die("sigaction usr2");
    sa.sa_sigaction = h_rt;
    if (sigaction(SIGRTMIN + 1, &sa, NULL)) die("sigaction rt");
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    if (sigaction(SIGPIPE, &sa, NULL)) die("sigaction pipe");
    sa.sa_handler = h_term;
    sa.sa_flags = SA_ONSTACK;
    if (sigaction(SIGTERM, &sa, NULL)) die("sigaction term");
    sa.sa_handler = SIG_DFL;
    sa.sa_flags = SA_NOCLDSTOP;
    if (sigaction(SIGCHLD, &sa, NULL)) die("sigaction chld");
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    if (sigaltstack(&ss, NULL)) die("sigaltstack");

    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    sigaddset(&block, SIGRTMIN + 1);
    sigaddset(&block, SIGHUP);
    if (sigprocmask(SIG_BLOCK, &block, NULL)) die("sigprocmask");
    union sigval v;
    v.sival_int = 42;
    if (sigqueue(getpid(), SIGUSR2, v)) die("sigqueue usr2");
    v.sival_int = 7;
    if (sigqueue(getpid(), SIGRTMIN + 1, v)) die("sigqueue rt 7");
    v.sival_int = 8;
    if (sigqueue(getpid(), SIGRTMIN + 1, v)) die("sigqueue rt 8");

    struct itimerval it = {{3600, 0}, {3600, 0}};
    if (setitimer(ITIMER_REAL, &it, NULL)) die("setitimer");

    static struct sigaction disp0[NSIG];
    for (int s = 1; s < NSIG; s++) sigaction(s, NULL, &disp0[s]);
    sigset_t mask0, pend0;
    sigprocmask(SIG_SETMASK, NULL, &mask0);
    sigpending(&pend0);
    char ms[512], ps[512];
    set_str(&mask0, ms, sizeof ms);
    set_str(&pend0, ps, sizeof ps);
    out("ready mask=%s pending=%s\n", ms, ps);
    wait_go();

    /* dispositions */
    struct sigaction q;
    sigaction(SIGPIPE, NULL, &q);
    CHECK(q.sa_handler == SIG_IGN, "SIGPIPE no longer ignored");
    sigaction(SIGUSR1, NULL, &q);
    CHECK(q.sa_sigaction == h_usr1, "SIGUSR1 handler changed");
    CHECK((q.sa_flags & (SA_SIGINFO | SA_RESTART)) == (SA_SIGINFO | SA_RESTART),
          "SIGUSR1 flags %#x lost SA_SIGINFO|SA_RESTART", q.sa_flags);
    CHECK(sigismember(&q.sa_mask, SIGINT) == 1, "SIGUSR1 sa_mask lost SIGINT");
    sigaction(SIGUSR2, NULL, &q);
    CHECK(q.sa_sigaction == h_usr2 && (q.sa_flags & SA_SIGINFO), "SIGUSR2 handler changed");
    sigaction(SIGCHLD, NULL, &q);
    CHECK(q.sa_handler == SIG_DFL && (q.sa_flags & SA_NOCLDSTOP), "SIGCHLD lost SA_NOCLDSTOP (flags %#x)",
          q.sa_flags);
    sigaction(SIGTERM, NULL, &q);
    CHECK(q.sa_handler == h_term && (q.sa_flags & SA_ONSTACK), "SIGTERM handler/SA_ONSTACK changed");
    for (int s = 1; s < NSIG; s++) {
        if (sigaction(s, NULL, &q)) continue;
        CHECK(q.sa_handler == disp0[s].sa_handler && q.sa_flags == disp0[s].sa_flags &&
                  same_set(&q.sa_mask, &disp0[s].sa_mask),
              "signal %d disposition changed (handler %p->%p flags %#x->%#x)", s,
              (void *)disp0[s].sa_handler, (void *)q.sa_handler, disp0[s].sa_flags, q.sa_flags);
    }
    stack_t ss2;
    sigaltstack(NULL, &ss2);
    CHECK(ss2.ss_sp == altstack && ss2.ss_size == sizeof altstack && !(ss2.ss_flags & SS_DISABLE),
          "sigaltstack changed: sp=%p size=%zu flags=%d", ss2.ss_sp, ss2.ss_size, ss2.ss_flags);

    /* mask & pending */
    sigset_t mask1, pend1;
    sigprocmask(SIG_SETMASK, NULL, &mask1);
    sigpending(&pend1);
    char ms1[512], ps1[512];
    set_str(&mask1, ms1, sizeof ms1);
    set_str(&pend1, ps1, sizeof ps1);
    CHECK(same_set(&mask0, &mask1), "signal mask changed from {%s} to {%s}", ms, ms1);
    CHECK(same_set(&pend0, &pend1), "pending set changed from {%s} to {%s}", ps, ps1);

    /* itimer */
    struct itimerval it2;
    getitimer(ITIMER_REAL, &it2);
    CHECK(it2.it_interval.tv_sec == 3600 && it2.it_interval.tv_usec == 0,
          "itimer interval %ld.%06ld, want 3600", (long)it2.it_interval.tv_sec, (long)it2.it_interval.tv_usec);
    CHECK(it2.it_value.tv_sec > 3300 && it2.it_value.tv_sec <= 3600,
          "itimer remaining %ld s, want (3300, 3600]", (long)it2.it_value.tv_sec);

    /* delivery */
    CHECK(usr1_count == 0 && usr2_count == 0 && rt_count == 0, "handlers ran early (%d %d %d)",
          (int)usr1_count, (int)usr2_count, (int)rt_count);
    v.sival_int = 99;
    sigqueue(getpid(), SIGUSR1, v);
    CHECK(usr1_count == 1 && usr1_val == 99, "SIGUSR1 handler: count %d value %d", (int)usr1_count,
          (int)usr1_val);
    raise(SIGUSR1);
    CHECK(usr1_count == 2, "SIGUSR1 via raise: count %d", (int)usr1_count);
    sigset_t un;
    sigemptyset(&un);
    sigaddset(&un, SIGUSR2);
    sigprocmask(SIG_UNBLOCK, &un, NULL);
    CHECK(usr2_count == 1 && usr2_val == 42 && usr2_code == SI_QUEUE,
          "pending SIGUSR2: count %d value %d code %d (want 1, 42, SI_QUEUE)", (int)usr2_count,
          (int)usr2_val, (int)usr2_code);
    sigemptyset(&un);
    sigaddset(&un, SIGRTMIN + 1);
    sigprocmask(SIG_UNBLOCK, &un, NULL);
    CHECK(rt_count == 2 && rt_vals[0] == 7 && rt_vals[1] == 8, "queued RT signals: count %d values %d %d",
          (int)rt_count, (int)rt_vals[0], (int)rt_vals[1]);
    sigpending(&pend1);
    CHECK(sigismember(&pend1, SIGUSR2) == 0 && sigismember(&pend1, SIGRTMIN + 1) == 0,
          "signals still pending after delivery");
    finish("usr1=%d usr2=%d rt=%d", (int)usr1_count, (int)usr2_val, (int)rt_count);
}
