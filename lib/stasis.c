/* stasis application interface, client side (protocol version 1; see
 * include/stasis.h for the functions and docs/API.md for the protocol).
 *
 * One connection per process to the socket named by STASIS_API, made at the first
 * call. A thread (every signal blocked) reads it: answers wake the requesting thread,
 * `event pre-checkpoint N` runs the pre-checkpoint hook and answers `ack N`,
 * `event restarted PATH` (the first line of the connection stasis re-made at restart)
 * runs the post-restart hook. A request written and not answered when the job was
 * checkpointed went to the previous stasis: after `restarted` a `sync` tells such a
 * request (its answer will never come: a checkpoint request returns STASIS_RESTARTED,
 * others are sent again) from one written to the new stasis just now. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "stasis.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_LINE 65536

/* One request of each kind may wait for its answer at a time (stasis answers each
 * kind in order; a checkpoint is answered long after a getenv sent later). */
enum kind { K_HELLO, K_CHECKPOINT, K_GETENV, K_COUNT };

/* Lock order: g_connect, then g_out, then g_state. */
static pthread_mutex_t g_connect = PTHREAD_MUTEX_INITIALIZER; /* making the connection */
static pthread_mutex_t g_out = PTHREAD_MUTEX_INITIALIZER;     /* writing a line */
static pthread_mutex_t g_state = PTHREAD_MUTEX_INITIALIZER;   /* the variables below */
static pthread_cond_t g_cond = PTHREAD_COND_INITIALIZER;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static int g_fd = -1;    /* the connection */
static pid_t g_owner;    /* the process that made it */
static int g_broken;     /* it ended */
static uint64_t g_syncs; /* the last sync number */
static stasis_hook g_pre, g_post;
static void *g_arg;

static struct slot {
    int busy;
    char *line;    /* to send it again */
    int sent;      /* written */
    uint64_t sync; /* after a restart: the sync telling whether it was lost */
    int answered;
    int ok;
    int resumed;   /* of a checkpoint */
    char *text;    /* the value (getenv) or the error message, malloc'd */
    size_t len;
} g_req[K_COUNT];

/* Bytes read, not yet handled: the interface's thread's alone (also while it runs a
 * hook that asks something). */
static char *g_buf;
static size_t g_len;

static __thread int t_in_hook;
static __thread char t_error[512] = "no error";

__attribute__((format(printf, 2, 3))) static int fail(int err, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_error, sizeof t_error, fmt, ap);
    va_end(ap);
    errno = err;
    return -1;
}

const char *stasis_last_error(void) { return t_error; }

/* Writes a whole line on the connection; g_out must be held. */
static int write_line(int fd, const char *line) {
    size_t n = strlen(line);
    while (n > 0) {
        ssize_t r = send(fd, line, n, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        line += r;
        n -= (size_t)r;
    }
    return 0;
}

static int send_line(int fd, const char *line) {
    pthread_mutex_lock(&g_out);
    int r = write_line(fd, line);
    pthread_mutex_unlock(&g_out);
    return r;
}

/* Hands the answer to the waiting request of `kind`, if one waits; `text` (may be
 * NULL) is copied. */
static void answer(enum kind kind, int ok, int resumed, const char *text, size_t len) {
    struct slot *s = &g_req[kind];
    pthread_mutex_lock(&g_state);
    if (s->busy && !s->answered) {
        s->answered = 1;
        s->ok = ok;
        s->resumed = resumed;
        free(s->text);
        s->text = NULL;
        s->len = 0;
        if (text && (s->text = malloc(len + 1))) {
            memcpy(s->text, text, len);
            s->text[len] = 0;
            s->len = len;
        }
        pthread_cond_broadcast(&g_cond);
    }
    pthread_mutex_unlock(&g_state);
}

static void run_hook(stasis_hook h, void *arg) {
    if (!h) return;
    int was = t_in_hook;
    t_in_hook = 1;
    h(arg);
    t_in_hook = was;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes %XX in place; returns the length. */
static size_t decode(char *s) {
    size_t o = 0;
    for (size_t i = 0; s[i]; i++) {
        int hi, lo;
        if (s[i] == '%' && (hi = hexval(s[i + 1])) >= 0 && (lo = hexval(s[i + 2])) >= 0) {
            s[o++] = (char)(hi * 16 + lo);
            i += 2;
        } else {
            s[o++] = s[i];
        }
    }
    s[o] = 0;
    return o;
}

static int kind_of(const char *verb) {
    if (strcmp(verb, "hello") == 0) return K_HELLO;
    if (strcmp(verb, "checkpoint") == 0) return K_CHECKPOINT;
    if (strcmp(verb, "getenv") == 0) return K_GETENV;
    return -1;
}

/* The interface's thread's alone: it runs the post-restart hook; a checkpoint request
 * found lost meanwhile is answered once the hook returned. */
static int g_in_restart, g_lost_checkpoint;

static void on_restarted(int fd) {
    /* g_out before g_state: a request being written either went before our sync or
     * is not marked sent yet (it then goes to the new stasis, after the sync). */
    pthread_mutex_lock(&g_out);
    pthread_mutex_lock(&g_state);
    uint64_t n = ++g_syncs;
    int sync = 0;
    for (int k = 0; k < K_COUNT; k++) {
        struct slot *s = &g_req[k];
        if (s->busy && s->sent && !s->answered) {
            s->sync = n;
            sync = 1;
        }
    }
    stasis_hook post = g_post;
    void *arg = g_arg;
    pthread_mutex_unlock(&g_state);
    if (sync) {
        char line[64];
        snprintf(line, sizeof line, "sync %llu\n", (unsigned long long)n);
        write_line(fd, line);
    }
    pthread_mutex_unlock(&g_out);
    /* A waiting stasis_checkpoint() returns STASIS_RESTARTED after the hook. */
    g_in_restart = 1;
    run_hook(post, arg);
    g_in_restart = 0;
    if (g_lost_checkpoint) {
        g_lost_checkpoint = 0;
        answer(K_CHECKPOINT, 1, STASIS_RESTARTED, NULL, 0);
    }
}

static void on_synced(int fd, uint64_t n) {
    char *again[K_COUNT] = {0};
    int lost_checkpoint = 0;
    pthread_mutex_lock(&g_state);
    for (int k = 0; k < K_COUNT; k++) {
        struct slot *s = &g_req[k];
        if (!s->busy || s->answered || s->sync != n) continue;
        s->sync = 0;
        if (k == K_CHECKPOINT) lost_checkpoint = 1;
        else if (s->line) again[k] = strdup(s->line); /* asked again, of the new stasis */
    }
    pthread_mutex_unlock(&g_state);
    for (int k = 0; k < K_COUNT; k++) {
        if (again[k]) send_line(fd, again[k]);
        free(again[k]);
    }
    /* Lost with the previous stasis: it was taken, and this is the restart. */
    if (lost_checkpoint && g_in_restart) g_lost_checkpoint = 1;
    else if (lost_checkpoint) answer(K_CHECKPOINT, 1, STASIS_RESTARTED, NULL, 0);
}

static void handle(int fd, char *line) {
    /* line: the first word, rest: the second, arg: what follows */
    char *sp = strchr(line, ' ');
    char *rest = sp ? sp + 1 : line + strlen(line);
    if (sp) *sp = 0;
    char *sp2 = strchr(rest, ' ');
    char *arg = sp2 ? sp2 + 1 : rest + strlen(rest);
    if (sp2) *sp2 = 0;
    if (strcmp(line, "ok") == 0) {
        if (strcmp(rest, "hello") == 0) answer(K_HELLO, 1, 0, NULL, 0);
        else if (strcmp(rest, "checkpoint") == 0) answer(K_CHECKPOINT, 1, STASIS_CONTINUED, NULL, 0);
        else if (strcmp(rest, "getenv") == 0) {
            size_t len = decode(arg);
            answer(K_GETENV, 1, 0, arg, len);
        } else if (strcmp(rest, "sync") == 0) on_synced(fd, strtoull(arg, NULL, 10));
    } else if (strcmp(line, "error") == 0) {
        int k = kind_of(rest);
        if (k >= 0) answer((enum kind)k, 0, 0, arg, strlen(arg));
    } else if (strcmp(line, "event") == 0) {
        if (strcmp(rest, "pre-checkpoint") == 0) {
            pthread_mutex_lock(&g_state);
            stasis_hook pre = g_pre;
            void *a = g_arg;
            pthread_mutex_unlock(&g_state);
            run_hook(pre, a);
            char ack[64];
            snprintf(ack, sizeof ack, "ack %llu\n", strtoull(arg, NULL, 10));
            send_line(fd, ack);
        } else if (strcmp(rest, "restarted") == 0) {
            on_restarted(fd);
        }
    }
    /* Anything else: a later version's, ignored. */
}

/* Handles the next line read, or reads more: 0, or -1 once the connection ended.
 * Only the interface's thread calls it. */
static int step(int fd) {
    char *nl = g_len ? memchr(g_buf, '\n', g_len) : NULL;
    if (nl) {
        size_t n = (size_t)(nl - g_buf);
        char *l = malloc(n + 1);
        if (l) {
            memcpy(l, g_buf, n);
            l[n] = 0;
        }
        g_len -= n + 1;
        memmove(g_buf, nl + 1, g_len);
        if (l && *l) handle(fd, l); /* empty lines are ignored */
        free(l);
        return 0;
    }
    if (!g_buf && !(g_buf = malloc(MAX_LINE))) return -1;
    if (g_len == MAX_LINE) g_len = 0; /* a line without end: dropped */
    for (;;) {
        ssize_t r = read(fd, g_buf + g_len, MAX_LINE - g_len);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        g_len += (size_t)r;
        return 0;
    }
}

/* The interface's thread. */
static void *reader(void *p) {
    int fd = (int)(intptr_t)p;
    while (step(fd) == 0) {
    }
    pthread_mutex_lock(&g_state);
    g_broken = 1;
    pthread_cond_broadcast(&g_cond);
    pthread_mutex_unlock(&g_state);
    return NULL;
}

/* Waits for `done` with g_state held: on the interface's thread (a hook asking
 * something) by reading and handling lines itself, elsewhere by waiting for it. */
static void wait_for(int fd, int (*done)(enum kind), enum kind k) {
    while (!done(k) && !g_broken) {
        if (!t_in_hook) {
            pthread_cond_wait(&g_cond, &g_state);
            continue;
        }
        pthread_mutex_unlock(&g_state);
        int r = step(fd);
        pthread_mutex_lock(&g_state);
        if (r != 0) {
            g_broken = 1;
            pthread_cond_broadcast(&g_cond);
        }
    }
}

/* The slot is free, or answered (its owner frees it without needing us). */
static int slot_free(enum kind k) { return !g_req[k].busy || g_req[k].answered; }
static int slot_answered(enum kind k) { return g_req[k].answered; }

/* Sends `line` and waits for its answer. Returns 0 with the answer in *ok, *resumed
 * and *text (malloc'd, may be NULL; the caller frees it), or -1. */
static int request(enum kind kind, const char *line, int *ok, int *resumed, char **text,
                   size_t *len) {
    if (t_in_hook && kind != K_GETENV)
        return fail(EDEADLK, "called from a stasis hook (only stasis_getenv() may be)");
    struct slot *s = &g_req[kind];
    pthread_mutex_lock(&g_state);
    int fd = g_fd;
    for (;;) {
        wait_for(fd, slot_free, kind);
        if (g_broken || !s->busy) break;
        pthread_cond_wait(&g_cond, &g_state); /* its owner takes the answer */
    }
    if (g_broken) {
        pthread_mutex_unlock(&g_state);
        return fail(EPIPE, "the connection to stasis ended");
    }
    memset(s, 0, sizeof *s);
    s->busy = 1;
    s->line = strdup(line);
    pthread_mutex_unlock(&g_state);

    pthread_mutex_lock(&g_out);
    int w = write_line(fd, line);
    int werr = errno;
    pthread_mutex_lock(&g_state);
    s->sent = 1;
    pthread_mutex_unlock(&g_state);
    pthread_mutex_unlock(&g_out);

    pthread_mutex_lock(&g_state);
    if (w == 0) wait_for(fd, slot_answered, kind);
    int r = 0;
    if (w != 0) {
        r = fail(werr, "writing to stasis: %s", strerror(werr));
    } else if (!s->answered) {
        r = fail(EPIPE, "the connection to stasis ended");
    } else {
        *ok = s->ok;
        *resumed = s->resumed;
        *text = s->text;
        *len = s->len;
        s->text = NULL;
    }
    free(s->text);
    free(s->line);
    memset(s, 0, sizeof *s);
    pthread_cond_broadcast(&g_cond);
    pthread_mutex_unlock(&g_state);
    return r;
}

/* A forked child has one thread and no connection of its own. */
static void after_fork_child(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    g_connect = m;
    g_out = m;
    g_state = m;
    g_cond = c;
    if (g_fd >= 0) close(g_fd);
    g_fd = -1;
    g_broken = 0;
    g_pre = g_post = NULL;
    g_arg = NULL;
    g_len = 0;
    memset(g_req, 0, sizeof g_req); /* a parent's pending lines are not ours to free */
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

/* Connects (once per process); 0 or -1. */
static int connected(void) {
    pthread_once(&g_once, register_atfork);
    pthread_mutex_lock(&g_connect);
    pthread_mutex_lock(&g_state);
    int ready = g_fd >= 0 && !g_broken && g_owner == getpid();
    if (g_fd >= 0 && g_broken) {
        close(g_fd); /* its thread is gone */
        g_fd = -1;
    }
    pthread_mutex_unlock(&g_state);
    if (ready) {
        pthread_mutex_unlock(&g_connect);
        return 0;
    }
    int r = -1;
    const char *addr = getenv("STASIS_API");
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t n = addr ? strlen(addr) : 0;
    if (!addr || !*addr) {
        fail(ENOENT, "not running under stasis (STASIS_API is not set)");
        goto out;
    }
    if (n >= sizeof sa.sun_path) {
        fail(ENAMETOOLONG, "STASIS_API is too long: %s", addr);
        goto out;
    }
    memcpy(sa.sun_path, addr, n);
    if (addr[0] == '@') sa.sun_path[0] = 0; /* the abstract namespace */
    socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail(errno, "socket: %s", strerror(errno));
        goto out;
    }
    if (connect(fd, (struct sockaddr *)&sa, salen) != 0) {
        int e = errno;
        close(fd);
        fail(e, "connecting to the stasis interface %s: %s", addr, strerror(e));
        goto out;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    g_len = 0; /* a thread of an earlier connection has ended */
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    int e = pthread_create(&t, &at, reader, (void *)(intptr_t)fd);
    pthread_attr_destroy(&at);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e != 0) {
        close(fd);
        fail(e, "starting the stasis interface's thread: %s", strerror(e));
        goto out;
    }
    pthread_mutex_lock(&g_state);
    g_fd = fd;
    g_owner = getpid();
    g_broken = 0;
    pthread_mutex_unlock(&g_state);
    int ok = 0, resumed = 0;
    char *text = NULL;
    size_t len = 0;
    char hello[64];
    snprintf(hello, sizeof hello, "hello %d\n", STASIS_API_VERSION);
    if (request(K_HELLO, hello, &ok, &resumed, &text, &len) == 0) {
        if (ok) r = 0;
        else fail(EPROTO, "stasis refused the hello: %s", text ? text : "");
    }
    free(text);
    if (r != 0) shutdown(fd, SHUT_RDWR); /* its thread sees the end and exits */
out:
    pthread_mutex_unlock(&g_connect);
    return r;
}

int stasis_available(void) { return connected() == 0; }

int stasis_checkpoint(void) {
    if (connected() != 0) return -1;
    int ok = 0, resumed = 0;
    char *text = NULL;
    size_t len = 0;
    if (request(K_CHECKPOINT, "checkpoint\n", &ok, &resumed, &text, &len) != 0) return -1;
    if (!ok) {
        fail(EIO, "%s", text ? text : "the checkpoint failed");
        free(text);
        return -1;
    }
    free(text);
    return resumed;
}

int stasis_set_hooks(stasis_hook pre_checkpoint, stasis_hook post_restart, void *arg) {
    if (connected() != 0) return -1;
    pthread_mutex_lock(&g_state);
    g_pre = pre_checkpoint;
    g_post = post_restart;
    g_arg = arg;
    pthread_mutex_unlock(&g_state);
    char hello[64];
    snprintf(hello, sizeof hello, "hello %d%s\n", STASIS_API_VERSION,
             pre_checkpoint ? " pre-checkpoint" : "");
    int ok = 0, resumed = 0;
    char *text = NULL;
    size_t len = 0;
    if (request(K_HELLO, hello, &ok, &resumed, &text, &len) != 0) return -1;
    int r = ok ? 0 : fail(EPROTO, "stasis refused the hooks: %s", text ? text : "");
    free(text);
    return r;
}

char *stasis_getenv(const char *name) {
    if (connected() != 0) return NULL;
    size_t n = strlen(name);
    if (n == 0 || n * 3 + 16 > MAX_LINE) {
        fail(EINVAL, "not a variable name");
        return NULL;
    }
    char *line = malloc(n * 3 + 16);
    if (!line) {
        fail(ENOMEM, "out of memory");
        return NULL;
    }
    size_t o = (size_t)sprintf(line, "getenv ");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c > 0x20 && c < 0x7f && c != '%') line[o++] = (char)c;
        else o += (size_t)sprintf(line + o, "%%%02X", c);
    }
    line[o++] = '\n';
    line[o] = 0;
    int ok = 0, resumed = 0;
    char *text = NULL;
    size_t len = 0;
    int r = request(K_GETENV, line, &ok, &resumed, &text, &len);
    free(line);
    if (r != 0) return NULL;
    if (!ok) {
        fail(ENOENT, "%s", text ? text : "not set");
        free(text);
        return NULL;
    }
    if (!text) fail(ENOMEM, "out of memory");
    return text;
}
