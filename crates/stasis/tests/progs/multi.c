/* multi: a process with a second thread (`multi thread`) or a child process
 * (`multi child`). The main thread prints `tick N`, the other thread/child
 * prints `wtick N` / `ctick N`, every ~20 ms, until `go` exists; then the
 * main thread joins the thread / reaps the child (which must exit 0 after
 * counting consecutive ticks) and prints `OK ...`. */
#include "util.h"
#include <pthread.h>
#include <sys/wait.h>

static volatile int stop;
static unsigned wcount;

static void *worker(void *arg) {
    (void)arg;
    for (; !stop; wcount++) {
        out("wtick %u\n", wcount);
        sleep_ms(20);
    }
    return NULL;
}

int main(int argc, char **argv) {
    setup();
    const char *kind = argc > 1 ? argv[1] : "thread";
    pthread_t th;
    pid_t child = -1;
    if (strcmp(kind, "thread") == 0) {
        if (pthread_create(&th, NULL, worker, NULL)) die("pthread_create");
    } else {
        child = fork();
        if (child < 0) die("fork");
        if (child == 0) {
            unsigned c = 0;
            for (; !go_exists(); c++) {
                out("ctick %u\n", c);
                sleep_ms(20);
            }
            _exit(c > 0 ? 0 : 1);
        }
    }
    out("ready kind=%s\n", kind);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        answer_ping();
        out("tick %u\n", n);
        sleep_ms(20);
    }
    if (child < 0) {
        stop = 1;
        pthread_join(th, NULL);
        CHECK(wcount > 0, "worker thread never ran");
    } else {
        int st = 0;
        CHECK(waitpid(child, &st, 0) == child, "waitpid: %s", strerror(errno));
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child status %#x", st);
    }
    finish("kind=%s ticks=%u", kind, n);
}
