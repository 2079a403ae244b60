/* timerfd: timers that are read late.
 *   T1  a periodic timerfd (CLOCK_MONOTONIC, every 10 ms) read (non-blocking)
 *       only every ~25 ms, so that at almost any moment it has expired and
 *       its expirations wait to be read;
 *   T2  a one-shot timerfd due in one hour (never fires during the test).
 * Prints `ready t1=F t2=F`, then `tick N exp=E` every ~25 ms (E: T1's
 * expirations read so far). If T1 yields no expiration for 300 ms it prints
 * `FAIL ...` (with timerfd_gettime's view) and exits 1. At `go`: T1 still has
 * a 10 ms interval and is armed (it_value non-zero), T2 is armed with 3000 to
 * 3600 s left, no interval and no expiration. Output: `OK ticks=N exp=E` /
 * `FAIL ...`. */
#include "util.h"
#include <sys/timerfd.h>

int main(void) {
    setup();
    int t1 = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    int t2 = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (t1 < 0 || t2 < 0) die("timerfd_create");
    struct itimerspec p = {{0, 10000000}, {0, 10000000}}, h = {{0, 0}, {3600, 0}};
    if (timerfd_settime(t1, 0, &p, NULL) || timerfd_settime(t2, 0, &h, NULL)) die("timerfd_settime");
    out("ready t1=%d t2=%d\n", t1, t2);
    uint64_t exp = 0;
    double last = mono_now();
    unsigned n = 0;
    for (; !go_exists(); n++) {
        uint64_t x = 0;
        ssize_t r = read(t1, &x, 8);
        if (r == 8) {
            exp += x;
            last = mono_now();
        } else if (r < 0 && errno != EAGAIN) {
            die("read T1");
        }
        if (mono_now() - last > 0.3) {
            struct itimerspec cur;
            timerfd_gettime(t1, &cur);
            out("FAIL the periodic timer stopped after %llu expirations: no expiration for "
                "300 ms; timerfd_gettime: it_value %ld.%09ld s, it_interval %ld.%09ld s\n",
                (unsigned long long)exp, (long)cur.it_value.tv_sec, cur.it_value.tv_nsec,
                (long)cur.it_interval.tv_sec, cur.it_interval.tv_nsec);
            exit(1);
        }
        out("tick %u exp=%llu\n", n, (unsigned long long)exp);
        sleep_ms(25);
    }
    struct itimerspec a, b;
    CHECK(timerfd_gettime(t1, &a) == 0 && a.it_interval.tv_sec == 0 &&
              a.it_interval.tv_nsec == 10000000 && (a.it_value.tv_sec || a.it_value.tv_nsec),
          "T1: it_value %ld.%09ld s, it_interval %ld.%09ld s; want armed, every 10 ms",
          (long)a.it_value.tv_sec, a.it_value.tv_nsec, (long)a.it_interval.tv_sec,
          a.it_interval.tv_nsec);
    CHECK(timerfd_gettime(t2, &b) == 0 && b.it_interval.tv_sec == 0 && b.it_interval.tv_nsec == 0 &&
              b.it_value.tv_sec >= 3000 && b.it_value.tv_sec < 3600,
          "T2: it_value %ld.%09ld s, it_interval %ld.%09ld s; want 3000-3600 s, no interval",
          (long)b.it_value.tv_sec, b.it_value.tv_nsec, (long)b.it_interval.tv_sec,
          b.it_interval.tv_nsec);
    uint64_t x;
    CHECK(read(t2, &x, 8) < 0 && errno == EAGAIN, "T2 fired");
    finish("ticks=%u exp=%llu", n, (unsigned long long)exp);
}
