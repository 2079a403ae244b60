/* inotify: watches a directory it creates (IN_CREATE) and its cwd (IN_DELETE),
 * ticks until `go`, then creates a file in the watched directory and checks that
 * the event arrives with the same watch number and name. `OK wd=N` / `FAIL`. */
#include "util.h"
#include <sys/inotify.h>
#include <sys/stat.h>

int main(void) {
    setup();
    mkdir("watched", 0700);
    int fd = inotify_init1(IN_NONBLOCK);
    if (fd < 0) die("inotify_init1");
    int w1 = inotify_add_watch(fd, "watched", IN_CREATE);
    int w2 = inotify_add_watch(fd, ".", IN_DELETE);
    if (w1 < 0 || w2 < 0) die("inotify_add_watch");
    out("ready w1=%d w2=%d\n", w1, w2);
    unsigned long long n = 0;
    char buf[4096] __attribute__((aligned(8)));
    while (!go_exists()) {
        out("tick %llu\n", n++);
        sleep_ms(20);
        while (read(fd, buf, sizeof buf) > 0) {
        }
    }
    int c = open("watched/newfile", O_CREAT | O_WRONLY, 0600);
    if (c < 0) die("create");
    close(c);
    for (int i = 0; i < 100; i++) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r > 0) {
            struct inotify_event *e = (struct inotify_event *)buf;
            if (e->wd != w1 || !(e->mask & IN_CREATE) || strcmp(e->name, "newfile") != 0) {
                out("FAIL event wd=%d (want %d) mask=%x name=%s\n", e->wd, w1, e->mask, e->name);
                return 1;
            }
            out("OK wd=%d ticks=%llu\n", e->wd, n);
            return 0;
        }
        sleep_ms(10);
    }
    out("FAIL no inotify event after restart\n");
    return 1;
}
