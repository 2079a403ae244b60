/* churn: short-lived threads created and destroyed continuously.
 *  - a churner thread loops: create K = 4 joinable threads, each computes a
 *    hash of its (batch, index) argument, sleeps 0-2 ms and returns the
 *    hash; join them all and check every result;
 *  - a second churner creates 2 detached threads per batch, which compute a
 *    hash, add it to a total, sleep 1 ms and post a semaphore; it waits for
 *    both.
 * The main thread prints `tick N batches=B detached=D` every ~20 ms until
 * `go` exists; then it checks that both churners still make progress, stops
 * and joins them, and checks: every joined result right, the number of
 * thread runs equals 4 x batches, the detached total equals the sum of the
 * expected hashes, and only the main thread is left.
 * Output: `ready`, ticks, `OK ...` / `FAIL ...`. */
#include "util.h"
#include <pthread.h>
#include <semaphore.h>
#include <sys/syscall.h>

#define K 4

static int stop_flag;
static uint64_t batches, runs, bad_results, det_batches, det_total, det_expected;
static int create_errors;
static sem_t det_sem;

static uint64_t work(uint64_t x) {
    uint64_t h = 0xcbf29ce484222325ULL ^ x;
    for (int i = 0; i < 20000; i++) h = (h ^ (uint64_t)i) * 0x100000001b3ULL;
    return h;
}

static void *short_lived(void *arg) {
    uint64_t x = (uint64_t)(uintptr_t)arg;
    __atomic_add_fetch(&runs, 1, __ATOMIC_SEQ_CST);
    uint64_t h = work(x);
    sleep_ms((long)(x % 3)); /* live a little, so that checkpoints catch some */
    return (void *)(uintptr_t)h;
}

static void *joiner(void *arg) {
    (void)arg;
    uint64_t b = 0;
    while (!__atomic_load_n(&stop_flag, __ATOMIC_SEQ_CST)) {
        pthread_t th[K];
        for (int j = 0; j < K; j++) {
            int e = pthread_create(&th[j], NULL, short_lived, (void *)(uintptr_t)(b * K + (uint64_t)j));
            if (e) {
                __atomic_add_fetch(&create_errors, 1, __ATOMIC_SEQ_CST);
                return (void *)1;
            }
        }
        for (int j = 0; j < K; j++) {
            void *r = NULL;
            if (pthread_join(th[j], &r) != 0) return (void *)2;
            if ((uint64_t)(uintptr_t)r != work(b * K + (uint64_t)j))
                __atomic_add_fetch(&bad_results, 1, __ATOMIC_SEQ_CST);
        }
        b++;
        __atomic_store_n(&batches, b, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void *detached(void *arg) {
    uint64_t x = (uint64_t)(uintptr_t)arg;
    __atomic_add_fetch(&det_total, work(x), __ATOMIC_SEQ_CST);
    sleep_ms(1);
    sem_post(&det_sem);
    return NULL;
}

static void *detacher(void *arg) {
    (void)arg;
    uint64_t b = 0;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    while (!__atomic_load_n(&stop_flag, __ATOMIC_SEQ_CST)) {
        for (int j = 0; j < 2; j++) {
            uint64_t x = 1000000000ULL + b * 2 + (uint64_t)j;
            det_expected += work(x);
            if (pthread_create(&(pthread_t){0}, &at, detached, (void *)(uintptr_t)x)) {
                __atomic_add_fetch(&create_errors, 1, __ATOMIC_SEQ_CST);
                return (void *)1;
            }
        }
        for (int j = 0; j < 2; j++)
            while (sem_wait(&det_sem) != 0) {}
        b++;
        __atomic_store_n(&det_batches, b, __ATOMIC_SEQ_CST);
    }
    return NULL;
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

int main(void) {
    setup();
    sem_init(&det_sem, 0, 0);
    pthread_t jt, dt;
    if (pthread_create(&jt, NULL, joiner, NULL)) die("pthread_create joiner");
    if (pthread_create(&dt, NULL, detacher, NULL)) die("pthread_create detacher");
    while (__atomic_load_n(&batches, __ATOMIC_SEQ_CST) < 3 || __atomic_load_n(&det_batches, __ATOMIC_SEQ_CST) < 3)
        sleep_ms(1);
    pid_t pid0 = getpid();
    out("ready pid=%d\n", (int)pid0);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u batches=%llu detached=%llu\n", n,
            (unsigned long long)__atomic_load_n(&batches, __ATOMIC_SEQ_CST),
            (unsigned long long)__atomic_load_n(&det_batches, __ATOMIC_SEQ_CST));
        sleep_ms(20);
    }
    uint64_t b0 = __atomic_load_n(&batches, __ATOMIC_SEQ_CST), d0 = __atomic_load_n(&det_batches, __ATOMIC_SEQ_CST);
    for (int tries = 0; tries < 250; tries++) {
        sleep_ms(20);
        if (__atomic_load_n(&batches, __ATOMIC_SEQ_CST) > b0 + 5 &&
            __atomic_load_n(&det_batches, __ATOMIC_SEQ_CST) > d0 + 5)
            break;
    }
    CHECK(__atomic_load_n(&batches, __ATOMIC_SEQ_CST) > b0 + 5, "joinable churn stalled at batch %llu",
          (unsigned long long)b0);
    CHECK(__atomic_load_n(&det_batches, __ATOMIC_SEQ_CST) > d0 + 5, "detached churn stalled at batch %llu",
          (unsigned long long)d0);
    __atomic_store_n(&stop_flag, 1, __ATOMIC_SEQ_CST);
    void *r1 = NULL, *r2 = NULL;
    int e1 = pthread_join(jt, &r1), e2 = pthread_join(dt, &r2);
    CHECK(e1 == 0 && r1 == NULL, "joiner thread: join %d, result %p", e1, r1);
    CHECK(e2 == 0 && r2 == NULL, "detacher thread: join %d, result %p", e2, r2);
    CHECK(create_errors == 0, "%d pthread_create failures", create_errors);
    CHECK(bad_results == 0, "%llu wrong results from joined threads", (unsigned long long)bad_results);
    CHECK(runs == batches * K, "%llu thread runs for %llu batches of %d", (unsigned long long)runs,
          (unsigned long long)batches, K);
    CHECK(det_total == det_expected, "detached threads' total %016llx, expected %016llx",
          (unsigned long long)det_total, (unsigned long long)det_expected);
    CHECK(getpid() == pid0, "pid changed");
    int left = -1;
    for (int tries = 0; tries < 200 && (left = task_count()) != 1; tries++) sleep_ms(10);
    CHECK(left == 1, "%d threads left after the churn stopped", left);
    finish("ticks=%u batches=%llu threads=%llu detached=%llu", n, (unsigned long long)batches,
           (unsigned long long)runs, (unsigned long long)det_batches * 2);
}
