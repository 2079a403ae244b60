/* ptimers: POSIX interval timers (timer_create) must come back with their IDs,
 * clocks, notification, signal values and times, and keep firing.
 *
 * Timers (raw syscalls, so that the IDs are the kernel's): A, CLOCK_MONOTONIC,
 * SIGUSR1 to the process every 20 ms with value 0xA11CE; a deleted one (so the IDs
 * have a gap); B, CLOCK_REALTIME, SIGUSR2 to thread T every 30 ms with value 0xB0B
 * (the handler records the thread it ran in); N, SIGEV_NONE, one shot in 1000 s; D,
 * created and never armed.
 * Prints `ready pid=P a=A b=B n=N d=D`, then `tick N` every ~20 ms until `go`
 * exists (answers `ping` with `pong`). Then: every ID still names its timer with its
 * clock's notification (timer_gettime works, N has less than 1000 s left and more than
 * 900, D is disarmed), A and B kept firing (their counts grew in the last 300 ms),
 * every signal carried its timer's value, B's ran only in T. `OK ...` / `FAIL ...`. */
#include "util.h"
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

static volatile long count_a, count_b, bad_value, b_elsewhere;
static volatile pid_t t_tid;

static void on_usr1(int s, siginfo_t *si, void *u) {
    (void)s; (void)u;
    if (si->si_value.sival_ptr != (void *)0xA11CE) bad_value++;
    count_a++;
}
static void on_usr2(int s, siginfo_t *si, void *u) {
    (void)s; (void)u;
    if (si->si_value.sival_ptr != (void *)0xB0B) bad_value++;
    if (syscall(SYS_gettid) != t_tid) b_elsewhere++;
    count_b++;
}

static void *thread_t(void *arg) {
    (void)arg;
    t_tid = (pid_t)syscall(SYS_gettid);
    for (;;) pause();
    return NULL;
}

static int mk(clockid_t clock, int notify, int sig, void *value, pid_t tid) {
    struct sigevent se;
    memset(&se, 0, sizeof se);
    se.sigev_notify = notify;
    se.sigev_signo = sig;
    se.sigev_value.sival_ptr = value;
    se.sigev_notify_thread_id = tid;
    int id = -1;
    if (syscall(SYS_timer_create, clock, &se, &id)) die("timer_create");
    return id;
}

static void arm(int id, long first_ms, long every_ms) {
    struct itimerspec its = {{every_ms / 1000, (every_ms % 1000) * 1000000}, {first_ms / 1000, (first_ms % 1000) * 1000000}};
    if (syscall(SYS_timer_settime, id, 0, &its, NULL)) die("timer_settime");
}

int main(void) {
    setup();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sa.sa_sigaction = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_sigaction = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    /* Only T takes SIGUSR2 if it was sent to the process: here it is sent to T. */
    pthread_t th;
    if (pthread_create(&th, NULL, thread_t, NULL)) die("pthread_create");
    while (!t_tid) sleep_ms(1);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    int a = mk(CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR1, (void *)0xA11CE, 0);
    int gone = mk(CLOCK_MONOTONIC, SIGEV_NONE, 0, NULL, 0);
    int b = mk(CLOCK_REALTIME, SIGEV_SIGNAL | SIGEV_THREAD_ID, SIGUSR2, (void *)0xB0B, t_tid);
    int n = mk(CLOCK_BOOTTIME, SIGEV_NONE, 0, NULL, 0);
    int d = mk(CLOCK_MONOTONIC, SIGEV_NONE, 0, NULL, 0);
    if (syscall(SYS_timer_delete, gone)) die("timer_delete");
    arm(a, 20, 20);
    arm(b, 30, 30);
    arm(n, 1000000, 0);
    out("ready pid=%d a=%d b=%d n=%d d=%d\n", (int)getpid(), a, b, n, d);
    unsigned k = 0;
    for (; !go_exists(); k++) {
        answer_ping();
        out("tick %u a=%ld b=%ld\n", k, count_a, count_b);
        sleep_ms(20);
    }
    long a0 = count_a, b0 = count_b;
    sleep_ms(300);
    CHECK(count_a > a0 + 3, "timer A stopped firing (%ld then %ld)", a0, count_a);
    CHECK(count_b > b0 + 3, "timer B stopped firing (%ld then %ld)", b0, count_b);
    CHECK(bad_value == 0, "%ld signals carried the wrong value", bad_value);
    CHECK(b_elsewhere == 0, "%ld of B's signals ran outside thread T", b_elsewhere);
    struct itimerspec its;
    CHECK(syscall(SYS_timer_gettime, a, &its) == 0 && its.it_interval.tv_nsec == 20000000, "timer A: %s",
          strerror(errno));
    CHECK(syscall(SYS_timer_gettime, b, &its) == 0 && its.it_interval.tv_nsec == 30000000, "timer B: %s",
          strerror(errno));
    CHECK(syscall(SYS_timer_gettime, n, &its) == 0 && its.it_value.tv_sec < 1000 && its.it_value.tv_sec > 900,
          "timer N: %ld s left", (long)its.it_value.tv_sec);
    CHECK(syscall(SYS_timer_gettime, d, &its) == 0 && its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0,
          "timer D is armed or gone");
    CHECK(syscall(SYS_timer_gettime, gone, &its) != 0, "the deleted timer %d exists", gone);
    finish("ticks=%u a=%ld b=%ld", k, count_a, count_b);
}
