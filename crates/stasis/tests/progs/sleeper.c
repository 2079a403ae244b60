/* sleeper: blocking sleeps interrupted by checkpoint/restart must complete
 * normally (return 0, never EINTR, never early).
 * Phases, each announced with `enter <name>` before and `done <name> rc=R
 * elapsed=S` after:
 *   nanosleep0..nanosleep2  nanosleep(1.5 s, NULL)
 *   clock_abs               clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, now+1.5 s)
 *   clock_rel               clock_nanosleep(CLOCK_MONOTONIC, 0, 1.5 s)
 *   poll                    poll(NULL, 0, 1500)
 *   select                  select(0, NULL, NULL, NULL, 1.5 s)
 * `ready` is printed before the first sleep. Then waits for `go`. */
#include "util.h"
#include <poll.h>
#include <sys/select.h>

#define SLEEP_NS 1500000000L

static void report(const char *name, int rc, int err, double t0, double min) {
    double el = mono_now() - t0;
    out("done %s rc=%d elapsed=%.3f\n", name, rc, el);
    CHECK(rc == 0, "%s returned %d (errno %d: %s)", name, rc, err, strerror(err));
    CHECK(el >= min - 0.002, "%s returned early after %.3f s (want >= %.3f)", name, el, min);
}

int main(void) {
    setup();
    out("ready\n");
    const struct timespec d = {SLEEP_NS / 1000000000L, SLEEP_NS % 1000000000L};
    for (int i = 0; i < 3; i++) {
        char name[32];
        snprintf(name, sizeof name, "nanosleep%d", i);
        out("enter %s\n", name);
        double t0 = mono_now();
        errno = 0;
        int rc = nanosleep(&d, NULL);
        report(name, rc, errno, t0, 1.5);
    }
    {
        out("enter clock_abs\n");
        struct timespec target;
        clock_gettime(CLOCK_MONOTONIC, &target);
        double t0 = mono_now();
        target.tv_sec += 1;
        target.tv_nsec += 500000000L;
        if (target.tv_nsec >= 1000000000L) { target.tv_sec++; target.tv_nsec -= 1000000000L; }
        int rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &target, NULL);
        report("clock_abs", rc, rc, t0, 1.5);
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        CHECK(now.tv_sec > target.tv_sec || (now.tv_sec == target.tv_sec && now.tv_nsec >= target.tv_nsec),
              "clock_abs woke before its absolute target");
    }
    {
        out("enter clock_rel\n");
        double t0 = mono_now();
        int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &d, NULL);
        report("clock_rel", rc, rc, t0, 1.5);
    }
    {
        out("enter poll\n");
        double t0 = mono_now();
        errno = 0;
        int rc = poll(NULL, 0, 1500);
        report("poll", rc, errno, t0, 1.5);
    }
    {
        out("enter select\n");
        struct timeval tv = {1, 500000};
        double t0 = mono_now();
        errno = 0;
        int rc = select(0, NULL, NULL, NULL, &tv);
        report("select", rc, errno, t0, 1.5);
    }
    out("sleeps done\n");
    wait_go();
    finish("all sleeps completed");
}
