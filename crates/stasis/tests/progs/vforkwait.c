/* vforkwait: a parent that stays inside vfork() (an uninterruptible wait: it
 * cannot be stopped, by ptrace either) until its child exits.
 * The parent prints `ready pid=P` and vforks; the child prints `vchild N`
 * every ~20 ms until a file `release` exists, then _exits with 7. The parent,
 * back from vfork, checks the child's status, prints `released`, then ticks
 * (`tick N`) every ~20 ms until `go` exists and prints `OK ...`. */
#include "util.h"
#include <sys/wait.h>

int main(void) {
    setup();
    pid_t me = getpid();
    out("ready pid=%d\n", (int)me);
    pid_t child = vfork();
    if (child < 0) die("vfork");
    if (child == 0) {
        /* Only syscalls until _exit: the parent's memory is shared. */
        for (unsigned c = 0; access("release", F_OK) != 0; c++) {
            char b[32];
            int n = snprintf(b, sizeof b, "vchild %u\n", c);
            if (write(1, b, (size_t)n) < 0) _exit(3);
            struct timespec ts = {0, 20 * 1000000L};
            nanosleep(&ts, NULL);
        }
        _exit(7);
    }
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child, "waitpid: %s", strerror(errno));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 7, "vfork child status %#x", st);
    out("released\n");
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }
    CHECK(getpid() == me, "pid changed from %d to %d", (int)me, (int)getpid());
    finish("ticks=%u", n);
}
