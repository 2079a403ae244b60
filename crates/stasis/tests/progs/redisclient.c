/* redisclient: a redis server and a client of it, in one job.
 *   redisclient PORT REDIS-SERVER [ARGS...]
 * Starts REDIS-SERVER ARGS... as its child (fork + exec; it must listen on
 * 127.0.0.1:PORT), connects to it (retrying for up to 10 s) and, every
 * ~20 ms, writes 10 keys: `SET key:I VALUE(I)` then `INCR counter` (the reply
 * must be I + 1); once both are acknowledged it appends `I` to the file
 * `acked` in its cwd. Every tick it also reads back one earlier key (GET).
 * Prints `ready port=P redis=PID fd=FD`, then `tick N acked=A`. At `go` it
 * reads every key written (each must have its value), the counter (= A) and
 * DBSIZE (= A + 1), stops the server (SHUTDOWN NOSAVE), reaps it and prints
 * `OK ticks=N acked=A` / `FAIL ...`. */
#include "inet.h"
#include <sys/wait.h>

static int fd = -1;
static char rbuf[1 << 16];
static size_t rpos, rlen;

__attribute__((noreturn)) static void broken(const char *what) {
    out("FAIL %s: %s\n", what, errno ? strerror(errno) : "EOF");
    exit(1);
}

static int getbyte(void) {
    if (rpos == rlen) {
        ssize_t r;
        do r = read(fd, rbuf, sizeof rbuf);
        while (r < 0 && errno == EINTR);
        if (r <= 0) {
            if (r == 0) errno = 0;
            return -1;
        }
        rpos = 0;
        rlen = (size_t)r;
    }
    return (unsigned char)rbuf[rpos++];
}

/* One reply line without \r\n. */
static void read_line(char *line, size_t cap) {
    size_t n = 0;
    for (;;) {
        int c = getbyte();
        if (c < 0) broken("reading a reply");
        if (c == '\n' && n > 0 && line[n - 1] == '\r') {
            line[n - 1] = 0;
            return;
        }
        if (n + 1 >= cap) {
            out("FAIL reply line too long\n");
            exit(1);
        }
        line[n++] = (char)c;
    }
}

static void command(int argc, const char **argv) {
    static char buf[8192];
    size_t n = (size_t)snprintf(buf, sizeof buf, "*%d\r\n", argc);
    for (int i = 0; i < argc; i++) n += (size_t)snprintf(buf + n, sizeof buf - n, "$%zu\r\n%s\r\n", strlen(argv[i]), argv[i]);
    if (n >= sizeof buf) {
        out("FAIL command too long\n");
        exit(1);
    }
    if (send_exact(fd, buf, n)) broken("sending a command");
}

/* The reply to a command: "+OK", ":5", "$value" (bulk), "$" + "(nil)", "-ERR ...". */
static void reply(char *r, size_t cap) {
    char line[8192];
    read_line(line, sizeof line);
    if (line[0] != '$') {
        snprintf(r, cap, "%s", line);
        return;
    }
    long len = atol(line + 1);
    if (len < 0) {
        snprintf(r, cap, "$(nil)");
        return;
    }
    if ((size_t)len + 2 > cap) {
        out("FAIL bulk reply of %ld bytes\n", len);
        exit(1);
    }
    r[0] = '$';
    for (long i = 0; i < len + 2; i++) {
        int c = getbyte();
        if (c < 0) broken("reading a bulk reply");
        r[1 + i] = (char)c;
    }
    r[1 + len] = 0;
}

static void value(uint64_t i, char *v, size_t cap) {
    size_t len = 1 + (size_t)((i * 37) % 200);
    int n = snprintf(v, cap, "v%llu-", (unsigned long long)i);
    for (size_t k = (size_t)n; k < len + (size_t)n && k + 1 < cap; k++) v[k] = (char)('a' + (i + k) % 26);
    v[len + (size_t)n] = 0;
}

static void expect(const char *what, const char *got, const char *want) {
    if (strcmp(got, want)) {
        out("FAIL %s: reply '%.100s', want '%.100s'\n", what, got, want);
        exit(1);
    }
}

static void get_check(uint64_t i) {
    char key[32], v[300], want[302], r[1024];
    snprintf(key, sizeof key, "key:%llu", (unsigned long long)i);
    value(i, v, sizeof v);
    snprintf(want, sizeof want, "$%s", v);
    command(2, (const char *[]){"GET", key});
    reply(r, sizeof r);
    expect(key, r, want);
}

int main(int argc, char **argv) {
    setup();
    if (argc < 3) {
        out("FAIL usage: redisclient PORT REDIS-SERVER [ARGS...]\n");
        return 2;
    }
    pid_t redis = fork();
    if (redis < 0) die("fork");
    if (redis == 0) {
        execvp(argv[2], argv + 2);
        out("FAIL exec %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    addr_t srv = mkaddr(4, 0, (unsigned)atoi(argv[1]));
    double t0 = mono_now();
    for (;;) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(fd, (struct sockaddr *)&srv.ss, srv.len) == 0) break;
        close(fd);
        int st;
        if (waitpid(redis, &st, WNOHANG) == redis) {
            out("FAIL the redis server ended with status %#x before accepting a connection\n", st);
            return 1;
        }
        if (mono_now() - t0 > 10) die("connect to the redis server (10 s)");
        sleep_ms(20);
    }
    int acked_fd = open("acked", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (acked_fd < 0) die("open acked");
    out("ready port=%u redis=%d fd=%d\n", port_of(&srv), (int)redis, fd);
    uint64_t acked = 0, rng = 88172645463325252ULL;
    unsigned n = 0;
    char r[1024], want[64];
    for (; !go_exists(); n++) {
        for (int k = 0; k < 10; k++) {
            char key[32], v[300];
            snprintf(key, sizeof key, "key:%llu", (unsigned long long)acked);
            value(acked, v, sizeof v);
            command(3, (const char *[]){"SET", key, v});
            reply(r, sizeof r);
            expect(key, r, "+OK");
            command(2, (const char *[]){"INCR", "counter"});
            reply(r, sizeof r);
            snprintf(want, sizeof want, ":%llu", (unsigned long long)acked + 1);
            expect("INCR counter", r, want);
            char line[32];
            int l = snprintf(line, sizeof line, "%llu\n", (unsigned long long)acked);
            write_all(acked_fd, line, (size_t)l);
            acked++;
        }
        get_check(xorshift(&rng) % acked);
        out("tick %u acked=%llu\n", n, (unsigned long long)acked);
        sleep_ms(20);
    }
    for (uint64_t i = 0; i < acked; i++) get_check(i);
    command(2, (const char *[]){"GET", "counter"});
    reply(r, sizeof r);
    snprintf(want, sizeof want, "$%llu", (unsigned long long)acked);
    expect("GET counter", r, want);
    command(1, (const char *[]){"DBSIZE"});
    reply(r, sizeof r);
    snprintf(want, sizeof want, ":%llu", (unsigned long long)acked + 1);
    expect("DBSIZE", r, want);
    command(2, (const char *[]){"SHUTDOWN", "NOSAVE"});
    int c = getbyte();
    CHECK(c < 0, "SHUTDOWN NOSAVE answered (%c...) instead of closing the connection", c);
    int st = 0;
    CHECK(waitpid(redis, &st, 0) == redis, "waitpid(redis %d): %s", (int)redis, strerror(errno));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the redis server ended with status %#x", st);
    finish("ticks=%u acked=%llu", n, (unsigned long long)acked);
    return 0;
}
