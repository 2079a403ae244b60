/* Benchmark workload for TCP connections: tcpconns [N [MiB [BYTES]]]
 *
 * Opens a listener on 127.0.0.1:0 and makes N loopback connections to it (connect,
 * then accept: 2N sockets, N client ends and N accepted server ends; N=1000 by
 * default, N=0 for the baseline). Each end writes BYTES (4096 by default) of a pattern
 * of its own, so that every connection has bytes queued in both directions, unread.
 * Allocates and touches MiB (64 by default) of memory, the same whatever N is, so that
 * only the sockets differ. Prints "ready", then "tick COUNT UNIX_TIME_NS" every 10 ms.
 *
 * When a file "go" appears in the working directory (after a restart), it checks that
 * every connection still holds exactly its bytes in both directions (read and
 * compared, nothing more queued), that each pair is still connected to each other
 * (addresses) and that a message still goes through each way; then prints "OK" and
 * exits 0, or "FAIL ..." lines and exits 1. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int *cli, *srv;
static size_t nbytes;

/* The byte at offset k of what end `dir` (0 client, 1 server) of connection i sent. */
static uint8_t pattern(int i, int dir, size_t k) {
    uint64_t x = (uint64_t)i * 2654435761u + (uint64_t)dir * 40503u + k;
    x ^= x >> 13; x *= 0x9e3779b97f4a7c15ull; x ^= x >> 29;
    return (uint8_t)x;
}

static void die(const char *what) { printf("FAIL %s: %s\n", what, strerror(errno)); exit(1); }

static int write_all(int fd, const uint8_t *b, size_t n) {
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0) { if (errno == EINTR) continue; return -1; }
        b += w; n -= (size_t)w;
    }
    return 0;
}

/* Reads exactly n bytes (waiting at most 2 s for them). */
static int read_exact(int fd, uint8_t *b, size_t n) {
    while (n) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 2000) <= 0) return -1;
        ssize_t r = recv(fd, b, n, MSG_DONTWAIT);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
        if (r <= 0) return -1;
        b += r; n -= (size_t)r;
    }
    return 0;
}

static int port_of(int fd, int peer) {
    struct sockaddr_in a; socklen_t l = sizeof a;
    if ((peer ? getpeername(fd, (void *)&a, &l) : getsockname(fd, (void *)&a, &l)) != 0) return -1;
    return ntohs(a.sin_port);
}

static int check(int n, int lfd) {
    int bad = 0, lport = port_of(lfd, 0);
    uint8_t *buf = malloc(nbytes + 1), msg[16];
    for (int i = 0; i < n; i++) {
        for (int dir = 0; dir < 2; dir++) {
            /* The client end holds what the server end sent, and the other way round. */
            int rfd = dir ? cli[i] : srv[i], q = -1;
            ioctl(rfd, FIONREAD, &q);
            if (q != (int)nbytes) {
                if (bad++ < 10) printf("FAIL connection %d: %s end holds %d bytes, not %zu\n", i, dir ? "client" : "server", q, nbytes);
                continue;
            }
            if (read_exact(rfd, buf, nbytes) != 0) {
                if (bad++ < 10) printf("FAIL connection %d: reading %zu bytes: %s\n", i, nbytes, strerror(errno));
                continue;
            }
            for (size_t k = 0; k < nbytes; k++)
                if (buf[k] != pattern(i, dir, k)) {
                    if (bad++ < 10) printf("FAIL connection %d: byte %zu of the %s end differs\n", i, k, dir ? "client" : "server");
                    break;
                }
            if (recv(rfd, buf, 1, MSG_DONTWAIT) != -1 || errno != EAGAIN) {
                if (bad++ < 10) printf("FAIL connection %d: more than %zu bytes queued (or end of file)\n", i, nbytes);
            }
        }
        /* Still the same pair, through the same listener port. */
        if (port_of(cli[i], 1) != lport || port_of(cli[i], 0) != port_of(srv[i], 1)) {
            if (bad++ < 10) printf("FAIL connection %d: ends no longer paired (client %d->%d, server peer %d, listener %d)\n",
                                   i, port_of(cli[i], 0), port_of(cli[i], 1), port_of(srv[i], 1), lport);
            continue;
        }
        /* A message each way. */
        snprintf((char *)msg, sizeof msg, "c%09d", i);
        if (write_all(cli[i], msg, 10) || read_exact(srv[i], buf, 10) || memcmp(buf, msg, 10)) {
            if (bad++ < 10) printf("FAIL connection %d: client to server message\n", i);
            continue;
        }
        msg[0] = 's';
        if (write_all(srv[i], msg, 10) || read_exact(cli[i], buf, 10) || memcmp(buf, msg, 10)) {
            if (bad++ < 10) printf("FAIL connection %d: server to client message\n", i);
        }
    }
    free(buf);
    if (bad) printf("FAIL %d problems in %d connections\n", bad, n);
    else printf("OK %d connections, %zu bytes each way checked\n", n, nbytes);
    return bad ? 1 : 0;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    size_t mib = argc > 2 ? strtoull(argv[2], 0, 10) : 64;
    nbytes = argc > 3 ? strtoull(argv[3], 0, 10) : 4096;
    setvbuf(stdout, 0, _IOLBF, 0);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) die("setrlimit");
    }
    if ((rlim_t)2 * n + 16 > rl.rlim_cur) {
        printf("FAIL %d connections need %d descriptors, the limit is %llu\n", n, 2 * n + 16, (unsigned long long)rl.rlim_cur);
        return 1;
    }

    /* The same memory in every variant: only the sockets differ. */
    size_t sz = mib << 20;
    uint8_t *m = mmap(0, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) die("mmap");
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < sz / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; ((uint64_t *)m)[i] = x; }

    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (lfd < 0 || bind(lfd, (void *)&a, sizeof a) || listen(lfd, 128) || getsockname(lfd, (void *)&a, &al)) die("listener");
    cli = calloc(n + 1, sizeof *cli);
    srv = calloc(n + 1, sizeof *srv);
    uint8_t *buf = malloc(nbytes + 1);
    for (int i = 0; i < n; i++) {
        cli[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (cli[i] < 0 || connect(cli[i], (void *)&a, sizeof a)) die("connect");
        srv[i] = accept(lfd, 0, 0);
        if (srv[i] < 0) die("accept");
    }
    for (int i = 0; i < n; i++)
        for (int dir = 0; dir < 2; dir++) {
            for (size_t k = 0; k < nbytes; k++) buf[k] = pattern(i, dir, k);
            if (write_all(dir ? srv[i] : cli[i], buf, nbytes)) die("write");
        }
    free(buf);
    printf("ready %d connections, %zu bytes queued each way, %zu MiB\n", n, nbytes, mib);

    for (long t = 0;; t++) {
        if (access("go", F_OK) == 0) return check(n, lfd);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        printf("tick %ld %lld\n", t, (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec);
        usleep(10000);
    }
}
