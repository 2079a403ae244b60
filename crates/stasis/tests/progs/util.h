/* Shared helpers for the stasis end-to-end test programs.
 *
 * Protocol: the program prints `ready ...` once it is in the state to be
 * checkpointed, then waits for a file named `go` in its cwd, verifies its own
 * state and prints `OK ...` (exit 0) or `FAIL <reasons>` (exit 1).
 * All output goes through write(2) in one call per line (no stdio buffering). */
#ifndef STASIS_TEST_UTIL_H
#define STASIS_TEST_UTIL_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static int g_failures;
static char g_failbuf[8192];

static __attribute__((unused)) void write_all(int fd, const char *b, size_t n) {
    while (n > 0) {
        ssize_t r = write(fd, b, n);
        if (r < 0) {
            if (errno == EINTR) continue;
            _exit(3);
        }
        b += r;
        n -= (size_t)r;
    }
}

__attribute__((format(printf, 1, 2), unused)) static void out(const char *fmt, ...) {
    char b[8192 + 256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof b) n = sizeof b - 1;
    write_all(1, b, (size_t)n);
}

/* Record a failed check; all failures are reported at the end. */
__attribute__((format(printf, 1, 2), unused)) static void fail(const char *fmt, ...) {
    size_t len = strlen(g_failbuf);
    if (len + 8 >= sizeof g_failbuf) { g_failures++; return; }
    if (len) { strcpy(g_failbuf + len, "; "); len += 2; }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_failbuf + len, sizeof g_failbuf - len, fmt, ap);
    va_end(ap);
    g_failures++;
}

#define CHECK(cond, ...) do { if (!(cond)) fail(__VA_ARGS__); } while (0)

/* Print OK <details> and exit 0, or FAIL <reasons> and exit 1. */
__attribute__((format(printf, 1, 2), unused)) static void finish(const char *fmt, ...) {
    if (g_failures) {
        out("FAIL %s\n", g_failbuf);
        exit(1);
    }
    char b[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    out("OK %s\n", b);
    exit(0);
}

static __attribute__((unused)) void die(const char *what) {
    out("FAIL %s: %s\n", what, strerror(errno));
    exit(1);
}

static __attribute__((unused)) void setup(void) { setvbuf(stdout, NULL, _IONBF, 0); }

static __attribute__((unused)) void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {}
}

static __attribute__((unused)) int go_exists(void) { return access("go", F_OK) == 0; }

/* Liveness probe: if a file `ping` exists, remove it and print `pong`. Lets
 * the test see that a restored process is executing. */
static __attribute__((unused)) void answer_ping(void) {
    if (access("ping", F_OK) == 0 && unlink("ping") == 0) write_all(1, "pong\n", 5);
}

/* Wait for `go`, answering pings. */
static __attribute__((unused)) void wait_go(void) {
    while (!go_exists()) {
        answer_ping();
        sleep_ms(10);
    }
}

static __attribute__((unused)) double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Sorted, comma separated list of this process's open fds (excluding the
 * directory fd used to list them). */
static __attribute__((unused)) void fd_list(char *buf, size_t cap) {
    int fds[1024], n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d) { snprintf(buf, cap, "?"); return; }
    int self = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) && n < 1024) {
        if (e->d_name[0] == '.') continue;
        int fd = atoi(e->d_name);
        if (fd != self) fds[n++] = fd;
    }
    closedir(d);
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && fds[j - 1] > fds[j]; j--) {
            int t = fds[j]; fds[j] = fds[j - 1]; fds[j - 1] = t;
        }
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < n && len + 16 < cap; i++)
        len += (size_t)snprintf(buf + len, cap - len, i ? ",%d" : "%d", fds[i]);
}

/* Permissions string ("rw-p") of the mapping that contains addr, from
 * /proc/self/maps; also copies the path column (may be empty). Returns 0 if
 * found. */
static __attribute__((unused)) int maps_lookup(const void *addr, char perms[5], char *path, size_t pathcap,
                       uintptr_t *start_out, uintptr_t *end_out) {
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return -1;
    char line[4096];
    uintptr_t a = (uintptr_t)addr;
    int found = -1;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        char p[5];
        int off = 0;
        if (sscanf(line, "%lx-%lx %4s %*s %*s %*s %n", &s, &e, p, &off) < 3) continue;
        if (a >= s && a < e) {
            memcpy(perms, p, 5);
            if (path) {
                char *pp = off ? line + off : line + strlen(line);
                size_t l = strcspn(pp, "\n");
                if (l >= pathcap) l = pathcap - 1;
                memcpy(path, pp, l);
                path[l] = 0;
            }
            if (start_out) *start_out = s;
            if (end_out) *end_out = e;
            found = 0;
            break;
        }
    }
    fclose(f);
    return found;
}

/* /proc/self/maps reduced to "start-end perms offset path" lines (device and
 * inode dropped). Returns a malloc'd string. */
static __attribute__((unused)) char *maps_snapshot(void) {
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) return strdup("?");
    size_t cap = 1 << 16, len = 0;
    char *res = malloc(cap), line[4096];
    res[0] = 0;
    while (fgets(line, sizeof line, f)) {
        char range[64], perms[8], off[32], dev[16], path[4096] = "";
        unsigned long ino;
        if (sscanf(line, "%63s %7s %31s %15s %lu %4095[^\n]", range, perms, off, dev, &ino, path) < 5) continue;
        char *p = path;
        while (*p == ' ') p++;
        char buf[4300];
        int n = snprintf(buf, sizeof buf, "%s %s %s %s\n", range, perms, off, p);
        if (len + (size_t)n + 1 > cap) { cap *= 2; res = realloc(res, cap); }
        memcpy(res + len, buf, (size_t)n + 1);
        len += (size_t)n;
    }
    fclose(f);
    return res;
}

/* Report (as a failure) the first differing line of two maps snapshots. */
static __attribute__((unused)) void compare_maps(const char *a, const char *b) {
    if (strcmp(a, b) == 0) return;
    while (*a && *b) {
        size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
        if (la != lb || strncmp(a, b, la) != 0) {
            fail("memory map changed: '%.*s' became '%.*s'", (int)la, a, (int)lb, b);
            return;
        }
        a += la + (a[la] ? 1 : 0);
        b += lb + (b[lb] ? 1 : 0);
    }
    size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
    fail("memory map changed: extra '%.*s%.*s'", (int)la, a, (int)lb, b);
}

#endif
