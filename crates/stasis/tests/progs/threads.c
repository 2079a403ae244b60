/* threads: a multi-threaded process.
 *  - 4 worker threads, each with a __thread value and its own tid, count
 *    under a shared mutex (shared total) and sleep 5 ms per step;
 *  - 1 thread blocked in pthread_cond_wait until main signals it after `go`;
 *  - 1 thread blocked in nanosleep(1 h), woken after `go` by SIGUSR1 sent
 *    with pthread_kill (must return -1/EINTR, handler run once).
 * The main thread prints `tick N` every ~20 ms. After `go` all threads are
 * stopped and joined; each checks that its TLS value and gettid() are
 * unchanged; the shared total must equal the sum of the per-thread counts.
 * Output: `ready tids=...`, ticks, `OK ...` / `FAIL ...`. */
#include "util.h"
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>

#define NW 4

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cv_flag, cv_seen = -1;
static volatile int stop;
static uint64_t total;
static __thread uint64_t tls_val;
static pid_t tids[NW + 2];
static uint64_t counts[NW];
static volatile int started;
static volatile sig_atomic_t usr1_hits;
static int sleeper_rc = -2, sleeper_errno;

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static void *worker(void *arg) {
    int i = (int)(intptr_t)arg;
    tls_val = 0xabcdef00ULL + (uint64_t)i;
    tids[i] = my_tid();
    __sync_fetch_and_add(&started, 1);
    uint64_t c = 0;
    while (!stop) {
        pthread_mutex_lock(&mu);
        total++;
        pthread_mutex_unlock(&mu);
        c++;
        sleep_ms(5);
    }
    counts[i] = c;
    if (tls_val != 0xabcdef00ULL + (uint64_t)i) return (void *)1;
    if (tids[i] != my_tid()) return (void *)2;
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    tls_val = 777;
    tids[NW] = my_tid();
    pthread_mutex_lock(&mu);
    __sync_fetch_and_add(&started, 1);
    while (!cv_flag) pthread_cond_wait(&cv, &mu);
    cv_seen = cv_flag;
    pthread_mutex_unlock(&mu);
    if (tls_val != 777) return (void *)1;
    if (tids[NW] != my_tid()) return (void *)2;
    return NULL;
}

static void on_usr1(int sig) { (void)sig; usr1_hits++; }

static void *sleeper(void *arg) {
    (void)arg;
    tids[NW + 1] = my_tid();
    __sync_fetch_and_add(&started, 1);
    struct timespec ts = {3600, 0};
    errno = 0;
    sleeper_rc = nanosleep(&ts, NULL);
    sleeper_errno = errno;
    if (tids[NW + 1] != my_tid()) return (void *)2;
    return NULL;
}

int main(void) {
    setup();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t th[NW + 2];
    for (int i = 0; i < NW; i++)
        if (pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i)) die("pthread_create");
    if (pthread_create(&th[NW], NULL, waiter, NULL)) die("pthread_create waiter");
    if (pthread_create(&th[NW + 1], NULL, sleeper, NULL)) die("pthread_create sleeper");
    while (started < NW + 2) sleep_ms(1);
    sleep_ms(20); /* let the waiter block in the condvar, the sleeper in nanosleep */
    pid_t main_tid = my_tid();
    tls_val = 4242;
    out("ready tids=%d,%d,%d,%d,%d,%d,%d\n", (int)main_tid, (int)tids[0], (int)tids[1], (int)tids[2],
        (int)tids[3], (int)tids[4], (int)tids[5]);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }
    stop = 1;
    pthread_mutex_lock(&mu);
    cv_flag = 5;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
    pthread_kill(th[NW + 1], SIGUSR1);
    uint64_t sum = 0;
    for (int i = 0; i < NW + 2; i++) {
        void *r = NULL;
        pthread_join(th[i], &r);
        CHECK(r == NULL, "thread %d: %s", i, r == (void *)1 ? "TLS value changed" : "tid changed");
        if (i < NW) {
            CHECK(counts[i] > 0, "worker %d never ran", i);
            sum += counts[i];
        }
    }
    CHECK(cv_seen == 5, "condvar waiter saw %d", cv_seen);
    CHECK(sleeper_rc == -1 && sleeper_errno == EINTR && usr1_hits == 1,
          "sleeper thread: nanosleep rc %d errno %d, %d SIGUSR1 (want -1/EINTR/1)", sleeper_rc, sleeper_errno,
          (int)usr1_hits);
    CHECK(sum == total, "shared total %llu != sum of counts %llu", (unsigned long long)total,
          (unsigned long long)sum);
    CHECK(tls_val == 4242 && my_tid() == main_tid, "main thread TLS/tid changed");
    finish("ticks=%u steps=%llu", n, (unsigned long long)total);
}
