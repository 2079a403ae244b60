/* unixext: UNIX sockets connected to servers outside the job: a stream socket
 * connected to the listening path argv[1] and a datagram socket connect()ed to
 * the datagram server bound at argv[2] (both run by the test).
 *
 * Prints `ready stream=FD dgram=FD`, then every ~20 ms writes `tick N\n` to the
 * stream and sends `dN` to the datagram server, then prints `tick N`. A write
 * that fails (the old connection of a job killed and restored) is an error.
 * At `go`: both sockets are still connected to their paths (getpeername), the
 * stream socket writes `bye\n` and reads the server's `ok\n` (5 s timeout),
 * the datagram socket sends `dbye`. Output: `OK ticks=N` / `FAIL ...`. */
#include "util.h"
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>

static socklen_t addr(struct sockaddr_un *a, const char *path) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    snprintf(a->sun_path, sizeof a->sun_path, "%s", path);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(a->sun_path) + 1);
}

static int connect_to(int type, const char *path) {
    struct sockaddr_un a;
    socklen_t al = addr(&a, path);
    int s = socket(AF_UNIX, type, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, al)) die(path);
    return s;
}

static void check_peer(int s, const char *what, const char *path) {
    struct sockaddr_un a;
    socklen_t al = sizeof a;
    memset(&a, 0, sizeof a);
    if (getpeername(s, (struct sockaddr *)&a, &al)) {
        fail("%s: getpeername: %s", what, strerror(errno));
        return;
    }
    CHECK(strcmp(a.sun_path, path) == 0, "%s: connected to '%s', want '%s'", what, a.sun_path,
          path);
}

int main(int argc, char **argv) {
    setup();
    if (argc < 3) die("usage: unixext STREAM_PATH DGRAM_PATH");
    int st = connect_to(SOCK_STREAM, argv[1]);
    int dg = connect_to(SOCK_DGRAM, argv[2]);
    out("ready stream=%d dgram=%d\n", st, dg);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        char b[32];
        int len = snprintf(b, sizeof b, "tick %u\n", n);
        CHECK(send(st, b, (size_t)len, MSG_NOSIGNAL) == len, "tick %u: stream write: %s", n,
              strerror(errno));
        len = snprintf(b, sizeof b, "d%u", n);
        CHECK(send(dg, b, (size_t)len, MSG_NOSIGNAL) == len, "tick %u: datagram send: %s", n,
              strerror(errno));
        if (g_failures) break;
        out("tick %u\n", n);
        sleep_ms(20);
    }
    check_peer(st, "stream", argv[1]);
    check_peer(dg, "datagram", argv[2]);
    struct timeval tv = {5, 0};
    setsockopt(st, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    CHECK(send(st, "bye\n", 4, MSG_NOSIGNAL) == 4, "stream: bye: %s", strerror(errno));
    char r[8] = {0};
    ssize_t got = recv(st, r, 3, MSG_WAITALL);
    CHECK(got == 3 && memcmp(r, "ok\n", 3) == 0, "stream: the server's answer: %zd '%s' (%s)", got,
          r, got < 0 ? strerror(errno) : "");
    CHECK(send(dg, "dbye", 4, MSG_NOSIGNAL) == 4, "datagram: dbye: %s", strerror(errno));
    finish("ticks=%u", n);
}
