/* pthreads: many threads synchronising in the three classic ways.
 *  - NW worker threads (argv[1], default 256) each loop: lock a shared mutex,
 *    increment the shared counter and their own per-thread counter (and a
 *    local copy on their stack), unlock, sleep 10 ms. Invariant: the sum of
 *    the per-thread counters equals the shared counter (checked by the main
 *    thread under the mutex at every tick), and every thread's local copy
 *    equals its per-thread counter.
 *  - 2 ping-pong threads alternate strictly through a condition variable:
 *    thread k only moves when `turn == k`, at which point the move count must
 *    have parity k. Invariant: moves[0] + moves[1] == count, moves[0] -
 *    moves[1] in {0, 1}, no parity violation.
 *  - NB = 4 threads loop on a pthread_barrier; the serial thread of each
 *    round increments the round number, and every thread checks (after a
 *    second barrier) that the round number equals its own count of rounds.
 * The main thread prints `tick N shared=S pp=P rounds=R` every ~20 ms until
 * `go` exists. Then it checks that every worker, the ping-pong pair and the
 * barrier group still make progress, stops everyone, joins ALL threads
 * (pthread_join returns only once the kernel cleared the thread's tid at
 * exit: the clear_child_tid address must have survived), and checks the
 * invariants, every thread's tid (gettid unchanged) and its stack state.
 * Output: `ready threads=T tids=MAIN,...`, ticks, `OK ...` / `FAIL ...`. */
#include "util.h"
#include <pthread.h>
#include <sys/syscall.h>

#define NB 4
#define MAXW 4096

static pid_t my_tid(void) { return (pid_t)syscall(SYS_gettid); }

static int stop_flag; /* accessed with __atomic */
static int started;
static int NW = 256;

/* workers */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t shared;
static uint64_t per[MAXW];
static pid_t wtid[MAXW];

static void *worker(void *arg) {
    int i = (int)(intptr_t)arg;
    pid_t tid = my_tid();
    wtid[i] = tid;
    uint64_t mine = 0;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    while (!__atomic_load_n(&stop_flag, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&mu);
        shared++;
        per[i]++;
        mine++;
        int bad = per[i] != mine;
        pthread_mutex_unlock(&mu);
        if (bad) return (void *)1;
        sleep_ms(10);
    }
    if (tid != my_tid()) return (void *)2;
    return NULL;
}

/* ping-pong */
static pthread_mutex_t pmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pcv = PTHREAD_COND_INITIALIZER;
static int turn, pp_stop;
static uint64_t pp_count, pp_moves[2], pp_parity_bad;
static pid_t ptid[2];

static void *pinger(void *arg) {
    int k = (int)(intptr_t)arg;
    pid_t tid = my_tid();
    ptid[k] = tid;
    uint64_t moves = 0;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&pmu);
    for (;;) {
        while (turn != k && !pp_stop) pthread_cond_wait(&pcv, &pmu);
        if (pp_stop) break;
        if (pp_count % 2 != (uint64_t)k) pp_parity_bad++;
        pp_count++;
        moves++;
        pp_moves[k] = moves;
        turn = 1 - k;
        pthread_cond_broadcast(&pcv);
        pthread_mutex_unlock(&pmu);
        sleep_ms(1);
        pthread_mutex_lock(&pmu);
    }
    int bad = pp_moves[k] != moves;
    pthread_mutex_unlock(&pmu);
    if (bad) return (void *)1;
    if (tid != my_tid()) return (void *)2;
    return NULL;
}

/* barrier group */
static pthread_barrier_t bar;
static uint64_t rounds; /* written by the serial thread, read with __atomic */
static int bar_decision;
static uint64_t bar_mine[NB], bar_bad;
static pid_t btid[NB];

static void *barrier_thread(void *arg) {
    int k = (int)(intptr_t)arg;
    pid_t tid = my_tid();
    btid[k] = tid;
    uint64_t mine = 0;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        int r = pthread_barrier_wait(&bar);
        if (r == PTHREAD_BARRIER_SERIAL_THREAD) {
            __atomic_add_fetch(&rounds, 1, __ATOMIC_SEQ_CST);
            bar_decision = __atomic_load_n(&stop_flag, __ATOMIC_SEQ_CST);
        } else if (r != 0) {
            return (void *)3;
        }
        r = pthread_barrier_wait(&bar);
        if (r != 0 && r != PTHREAD_BARRIER_SERIAL_THREAD) return (void *)3;
        mine++;
        if (__atomic_load_n(&rounds, __ATOMIC_SEQ_CST) != mine) __atomic_add_fetch(&bar_bad, 1, __ATOMIC_SEQ_CST);
        bar_mine[k] = mine;
        if (bar_decision) break;
        sleep_ms(2);
    }
    if (tid != my_tid()) return (void *)2;
    return NULL;
}

static const char *why(void *r) {
    if (r == (void *)1) return "its stack copy of the counter diverged";
    if (r == (void *)2) return "its tid changed";
    if (r == (void *)3) return "pthread_barrier_wait failed";
    return "unknown";
}

static void snapshot(uint64_t *w, uint64_t *pp, uint64_t *rd) {
    pthread_mutex_lock(&mu);
    memcpy(w, per, sizeof(uint64_t) * (size_t)NW);
    pthread_mutex_unlock(&mu);
    pthread_mutex_lock(&pmu);
    *pp = pp_count;
    pthread_mutex_unlock(&pmu);
    *rd = __atomic_load_n(&rounds, __ATOMIC_SEQ_CST);
}

int main(int argc, char **argv) {
    setup();
    if (argc > 1) NW = atoi(argv[1]);
    if (NW < 1 || NW > MAXW) die("bad thread count");
    if (pthread_barrier_init(&bar, NULL, NB)) die("pthread_barrier_init");
    pthread_t *wth = calloc((size_t)NW, sizeof(pthread_t));
    pthread_t pth[2], bth[NB];
    for (int i = 0; i < NW; i++)
        if (pthread_create(&wth[i], NULL, worker, (void *)(intptr_t)i)) die("pthread_create worker");
    for (int k = 0; k < 2; k++)
        if (pthread_create(&pth[k], NULL, pinger, (void *)(intptr_t)k)) die("pthread_create pinger");
    for (int k = 0; k < NB; k++)
        if (pthread_create(&bth[k], NULL, barrier_thread, (void *)(intptr_t)k)) die("pthread_create barrier");
    int total = NW + 2 + NB;
    while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < total) sleep_ms(1);
    sleep_ms(20);
    pid_t main_tid = my_tid();

    static char tids[MAXW * 12];
    size_t len = (size_t)snprintf(tids, sizeof tids, "%d", (int)main_tid);
    for (int i = 0; i < NW; i++) len += (size_t)snprintf(tids + len, sizeof tids - len, ",%d", (int)wtid[i]);
    for (int k = 0; k < 2; k++) len += (size_t)snprintf(tids + len, sizeof tids - len, ",%d", (int)ptid[k]);
    for (int k = 0; k < NB; k++) len += (size_t)snprintf(tids + len, sizeof tids - len, ",%d", (int)btid[k]);
    /* one write(2) per line; `out` truncates at 8 KiB */
    char *rl = malloc(len + 64);
    int rn = snprintf(rl, len + 64, "ready threads=%d tids=%s\n", total + 1, tids);
    write_all(1, rl, (size_t)rn);
    free(rl);

    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        pthread_mutex_lock(&mu);
        uint64_t sum = 0;
        for (int i = 0; i < NW; i++) sum += per[i];
        uint64_t s = shared;
        pthread_mutex_unlock(&mu);
        CHECK(sum == s, "tick %u: shared counter %llu != sum of per-thread counters %llu", n,
              (unsigned long long)s, (unsigned long long)sum);
        pthread_mutex_lock(&pmu);
        uint64_t pp = pp_count;
        pthread_mutex_unlock(&pmu);
        out("tick %u shared=%llu pp=%llu rounds=%llu\n", n, (unsigned long long)s, (unsigned long long)pp,
            (unsigned long long)__atomic_load_n(&rounds, __ATOMIC_SEQ_CST));
        sleep_ms(20);
    }

    /* every thread still makes progress (after the last restart) */
    uint64_t *w0 = calloc((size_t)NW, sizeof(uint64_t)), *w1 = calloc((size_t)NW, sizeof(uint64_t));
    uint64_t pp0, pp1, r0, r1;
    snapshot(w0, &pp0, &r0);
    int stuck = 0;
    for (int tries = 0; tries < 250; tries++) { /* up to 5 s */
        sleep_ms(20);
        snapshot(w1, &pp1, &r1);
        stuck = (pp1 <= pp0) + (r1 <= r0);
        for (int i = 0; i < NW; i++) stuck += w1[i] <= w0[i];
        if (!stuck) break;
    }
    if (stuck) {
        for (int i = 0; i < NW; i++) CHECK(w1[i] > w0[i], "worker %d (tid %d) makes no progress", i, (int)wtid[i]);
        CHECK(pp1 > pp0, "ping-pong makes no progress (count %llu)", (unsigned long long)pp1);
        CHECK(r1 > r0, "barrier group makes no progress (round %llu)", (unsigned long long)r1);
    }

    /* stop and join everyone */
    __atomic_store_n(&stop_flag, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&pmu);
    pp_stop = 1;
    pthread_cond_broadcast(&pcv);
    pthread_mutex_unlock(&pmu);
    int joined = 0;
    for (int i = 0; i < NW; i++) {
        void *r = NULL;
        int e = pthread_join(wth[i], &r);
        CHECK(e == 0, "pthread_join(worker %d): %s", i, strerror(e));
        CHECK(r == NULL, "worker %d: %s", i, why(r));
        joined += e == 0;
    }
    for (int k = 0; k < 2; k++) {
        void *r = NULL;
        int e = pthread_join(pth[k], &r);
        CHECK(e == 0, "pthread_join(pinger %d): %s", k, strerror(e));
        CHECK(r == NULL, "pinger %d: %s", k, why(r));
        joined += e == 0;
    }
    for (int k = 0; k < NB; k++) {
        void *r = NULL;
        int e = pthread_join(bth[k], &r);
        CHECK(e == 0, "pthread_join(barrier thread %d): %s", k, strerror(e));
        CHECK(r == NULL, "barrier thread %d: %s", k, why(r));
        joined += e == 0;
    }

    uint64_t sum = 0;
    for (int i = 0; i < NW; i++) sum += per[i];
    CHECK(sum == shared, "shared counter %llu != sum of per-thread counters %llu", (unsigned long long)shared,
          (unsigned long long)sum);
    CHECK(pp_parity_bad == 0, "ping-pong: %llu moves out of turn", (unsigned long long)pp_parity_bad);
    CHECK(pp_moves[0] + pp_moves[1] == pp_count, "ping-pong: moves %llu + %llu != count %llu",
          (unsigned long long)pp_moves[0], (unsigned long long)pp_moves[1], (unsigned long long)pp_count);
    CHECK(pp_moves[0] - pp_moves[1] <= 1, "ping-pong: no strict alternation (moves %llu vs %llu)",
          (unsigned long long)pp_moves[0], (unsigned long long)pp_moves[1]);
    CHECK(bar_bad == 0, "barrier: %llu round number mismatches", (unsigned long long)bar_bad);
    for (int k = 0; k < NB; k++)
        CHECK(bar_mine[k] == rounds, "barrier thread %d counted %llu rounds, the group %llu", k,
              (unsigned long long)bar_mine[k], (unsigned long long)rounds);
    CHECK(my_tid() == main_tid, "main thread tid changed");
    /* only the main thread is left */
    int left = -1;
    for (int tries = 0; tries < 100; tries++) {
        left = 0;
        DIR *d = opendir("/proc/self/task");
        struct dirent *e;
        while (d && (e = readdir(d)))
            if (e->d_name[0] != '.') left++;
        if (d) closedir(d);
        if (left == 1) break;
        sleep_ms(10);
    }
    CHECK(left == 1, "%d threads left after joining all", left);
    finish("ticks=%u threads=%d joined=%d shared=%llu pp=%llu rounds=%llu", n, total + 1, joined,
           (unsigned long long)shared, (unsigned long long)pp_count, (unsigned long long)rounds);
}
