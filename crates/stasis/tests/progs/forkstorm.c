/* forkstorm: a parent forking short-lived children as fast as it can, the way
 * make or a shell script does. Child n exits at once with status n % 128;
 * every fourth child first forks a grandchild that outlives it by ~2 ms (an
 * orphan, reparented to the namespace init while a checkpoint may be freezing
 * the tree). The parent reaps each child and checks its pid and status.
 * Output: `ready pid=P`, then `tick N forks=F` after every 50 forks (N
 * consecutive from 0), until `go` exists: `OK ticks=N forks=F` / `FAIL ...`
 * (a wrong status or a lost child fails at once). */
#include "util.h"
#include <sys/wait.h>

int main(void) {
    setup();
    out("ready pid=%d\n", (int)getpid());
    unsigned long forks = 0, tick = 0;
    while (!go_exists()) {
        pid_t c = fork();
        if (c < 0) die("fork");
        if (c == 0) {
            if (forks % 4 == 0) {
                pid_t g = fork();
                if (g == 0) {
                    sleep_ms(2);
                    _exit(0);
                }
            }
            _exit((int)(forks % 128));
        }
        int st = 0;
        pid_t r;
        do r = waitpid(c, &st, 0);
        while (r < 0 && errno == EINTR);
        if (r != c) {
            out("FAIL waitpid(%d) returned %d: %s\n", (int)c, (int)r, strerror(errno));
            return 1;
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != (int)(forks % 128)) {
            out("FAIL child %lu (pid %d): wait status %#x, wanted exit %lu\n", forks, (int)c, st, forks % 128);
            return 1;
        }
        forks++;
        if (forks % 50 == 0) out("tick %lu forks=%lu\n", tick++, forks);
    }
    finish("ticks=%lu forks=%lu", tick, forks);
    return 0;
}
