/* exiter: `exiter code N` exits with status N after `go`;
 * `exiter signal S` kills itself with signal S after `go`. Prints ticks
 * meanwhile so checkpoints can be observed. */
#include "util.h"
#include <signal.h>

int main(int argc, char **argv) {
    setup();
    if (argc != 3) { out("FAIL usage: exiter code|signal N\n"); return 2; }
    int v = atoi(argv[2]);
    out("ready\n");
    for (unsigned n = 0; !go_exists(); n++) {
        out("tick %u\n", n);
        sleep_ms(20);
    }
    if (strcmp(argv[1], "signal") == 0) {
        out("dying by signal %d\n", v);
        signal(v, SIG_DFL);
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, v);
        sigprocmask(SIG_UNBLOCK, &s, NULL);
        raise(v);
        out("FAIL still alive after raise(%d)\n", v);
        return 1;
    }
    out("exiting with %d\n", v);
    return v;
}
