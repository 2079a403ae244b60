/* ptyjob DIR: meant to run under `script`: its stdio is a pseudo-terminal that is
 * its controlling terminal. Records the window size and its foreground status,
 * counts in DIR/ticks until DIR/go exists, then checks that stdin/stdout are still
 * a terminal, the window size is unchanged, it is still in the foreground group and
 * /dev/tty opens. Writes `OK ...` or `FAIL ...` to DIR/result. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

/* Replaces DIR/name atomically (a reader never sees it empty). */
static void put(const char *dir, const char *name, const char *text) {
    char p[4096], tmp[4200];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    snprintf(tmp, sizeof tmp, "%s.tmp", p);
    FILE *f = fopen(tmp, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
        rename(tmp, p);
    }
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : ".";
    struct winsize w0, w1;
    if (!isatty(0) || ioctl(0, TIOCGWINSZ, &w0) != 0) {
        put(dir, "result", "FAIL not started on a terminal\n");
        return 1;
    }
    char go[4096], line[128];
    snprintf(go, sizeof go, "%s/go", dir);
    put(dir, "ready", "ready\n");
    unsigned long n = 0;
    while (access(go, F_OK) != 0) {
        snprintf(line, sizeof line, "%lu\n", n++);
        put(dir, "ticks", line);
        usleep(20000);
    }
    char res[512];
    int tty = open("/dev/tty", O_RDWR);
    if (!isatty(0) || !isatty(1) || ioctl(0, TIOCGWINSZ, &w1) != 0)
        snprintf(res, sizeof res, "FAIL stdio is no longer a terminal\n");
    else if (w1.ws_row != w0.ws_row || w1.ws_col != w0.ws_col)
        snprintf(res, sizeof res, "FAIL window %dx%d became %dx%d\n", w0.ws_row, w0.ws_col, w1.ws_row, w1.ws_col);
    else if (tcgetpgrp(0) != getpgrp())
        snprintf(res, sizeof res, "FAIL not in the foreground group (%d vs %d)\n", (int)tcgetpgrp(0), (int)getpgrp());
    else if (tty < 0)
        snprintf(res, sizeof res, "FAIL /dev/tty does not open: no controlling terminal\n");
    else
        snprintf(res, sizeof res, "OK ticks=%lu window=%dx%d\n", n, w1.ws_row, w1.ws_col);
    put(dir, "result", res);
    return res[0] == 'O' ? 0 : 1;
}
