/* forkthread: a process tree whose child is multi-threaded, like an MPI rank
 * under its launcher.
 *  - the root forks a child, which creates T threads (argv[1], default 1) and
 *    then waits in pause() with its main thread (`for (;;) pause();` until
 *    SIGUSR1);
 *  - each thread of the child records its tid and counts in memory shared
 *    with the root (MAP_SHARED anonymous), one step every ~2 ms;
 *  - the root prints `tick N count=C` every ~20 ms (C: the sum of the
 *    threads' counts) until `go` exists.
 * Then the root sends SIGUSR1 to the child, whose main thread checks its pid,
 * that every thread still exists with its tid and still counts, stops and
 * joins them (each returns its own count) and exits 0 (or prints FAIL and
 * exits 1); the root checks the child's exit status and prints `OK ...`.
 * Output: `ready pid=P child=C tids=T1,...`, ticks, `OK ...` / `FAIL ...`. */
#include "util.h"
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define MAXT 64

struct shared {
    uint64_t count[MAXT];
    int tid[MAXT];
    int stop;
    int child_pid;
};

static struct shared *sh;
static int nthreads = 1;
static volatile sig_atomic_t woken;

static void on_usr1(int sig) {
    (void)sig;
    woken = 1;
}

static void *counter(void *arg) {
    int i = (int)(intptr_t)arg;
    __atomic_store_n(&sh->tid[i], (int)syscall(SYS_gettid), __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&sh->stop, __ATOMIC_SEQ_CST)) {
        __atomic_add_fetch(&sh->count[i], 1, __ATOMIC_SEQ_CST);
        sleep_ms(2);
    }
    return (void *)(uintptr_t)__atomic_load_n(&sh->count[i], __ATOMIC_SEQ_CST);
}

static int has_task(int tid) {
    char p[64];
    snprintf(p, sizeof p, "/proc/self/task/%d", tid);
    return access(p, F_OK) == 0;
}

static int task_count(void) {
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    if (d) closedir(d);
    return n;
}

static void child_main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL)) die("child: sigaction");
    pthread_t th[MAXT];
    for (int i = 0; i < nthreads; i++)
        if (pthread_create(&th[i], NULL, counter, (void *)(intptr_t)i)) die("child: pthread_create");
    __atomic_store_n(&sh->child_pid, (int)getpid(), __ATOMIC_SEQ_CST);
    while (!woken) pause();

    CHECK(getpid() == sh->child_pid, "child: pid %d, was %d", (int)getpid(), sh->child_pid);
    uint64_t before[MAXT];
    for (int i = 0; i < nthreads; i++) {
        CHECK(has_task(sh->tid[i]), "child: thread %d (tid %d) is gone", i, sh->tid[i]);
        before[i] = __atomic_load_n(&sh->count[i], __ATOMIC_SEQ_CST);
    }
    for (int tries = 0; tries < 500; tries++) {
        int all = 1;
        for (int i = 0; i < nthreads; i++)
            if (__atomic_load_n(&sh->count[i], __ATOMIC_SEQ_CST) < before[i] + 5) all = 0;
        if (all) break;
        sleep_ms(10);
    }
    for (int i = 0; i < nthreads; i++)
        CHECK(__atomic_load_n(&sh->count[i], __ATOMIC_SEQ_CST) >= before[i] + 5,
              "child: thread %d stalled at %llu", i, (unsigned long long)before[i]);
    __atomic_store_n(&sh->stop, 1, __ATOMIC_SEQ_CST);
    for (int i = 0; i < nthreads; i++) {
        void *r = NULL;
        int e = pthread_join(th[i], &r);
        CHECK(e == 0, "child: join of thread %d: %s", i, strerror(e));
        CHECK((uint64_t)(uintptr_t)r == sh->count[i], "child: thread %d returned %llu, counted %llu", i,
              (unsigned long long)(uintptr_t)r, (unsigned long long)sh->count[i]);
    }
    /* A joined thread can still be listed for a moment: pthread_join returns once
     * the kernel clears its tid, before the thread is gone from /proc/self/task. */
    int left = task_count();
    for (int i = 0; i < 200 && left != 1; i++) {
        sleep_ms(10);
        left = task_count();
    }
    CHECK(left == 1, "child: %d threads left after the joins", left);
    if (g_failures) {
        out("FAIL %s\n", g_failbuf);
        _exit(1);
    }
    _exit(0);
}

static uint64_t total(void) {
    uint64_t s = 0;
    for (int i = 0; i < nthreads; i++) s += __atomic_load_n(&sh->count[i], __ATOMIC_SEQ_CST);
    return s;
}

int main(int argc, char **argv) {
    setup();
    if (argc > 1) nthreads = atoi(argv[1]);
    if (nthreads < 1 || nthreads > MAXT) {
        out("FAIL bad thread count %s\n", argv[1]);
        return 1;
    }
    sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) die("mmap");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) child_main();
    /* Ready once the child's threads all run. */
    for (int tries = 0; tries < 2000; tries++) {
        int all = __atomic_load_n(&sh->child_pid, __ATOMIC_SEQ_CST) == child;
        for (int i = 0; i < nthreads; i++)
            if (__atomic_load_n(&sh->count[i], __ATOMIC_SEQ_CST) < 2) all = 0;
        if (all) break;
        sleep_ms(5);
    }
    char tids[MAXT * 12] = "";
    size_t len = 0;
    for (int i = 0; i < nthreads; i++)
        len += (size_t)snprintf(tids + len, sizeof tids - len, i ? ",%d" : "%d", sh->tid[i]);
    pid_t me = getpid();
    out("ready pid=%d child=%d threads=%d tids=%s\n", (int)me, (int)child, nthreads, tids);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u count=%llu\n", n, (unsigned long long)total());
        sleep_ms(20);
    }
    CHECK(getpid() == me, "pid changed from %d to %d", (int)me, (int)getpid());
    CHECK(kill(child, SIGUSR1) == 0, "kill(child %d, SIGUSR1): %s", (int)child, strerror(errno));
    int st = 0;
    pid_t w = waitpid(child, &st, 0);
    CHECK(w == child, "waitpid(%d): %d (%s)", (int)child, (int)w, strerror(errno));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    finish("ticks=%u threads=%d count=%llu", n, nthreads, (unsigned long long)total());
}
