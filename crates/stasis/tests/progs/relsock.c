/* relsock: a UNIX listener bound to a RELATIVE path ("rel.sock", in the cwd),
 * as many programs do, with a connected and accepted client.
 * Prints `ready l=FD c=FD a=FD`, then `tick N` every ~20 ms (each tick sends a
 * byte C -> A and reads it). At `go`: getsockname of the listener is still
 * "rel.sock"; a new client connecting to <cwd>/rel.sock (absolute) and one
 * connecting to "rel.sock" (relative) both reach this listener (accepted,
 * a byte goes through). Output: `OK ticks=N` / `FAIL ...`. */
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

static void try_connect(int l, const char *path) {
    struct sockaddr_un a;
    socklen_t al = addr(&a, path);
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, al)) {
        fail("connect to %s: %s", path, strerror(errno));
        close(c);
        return;
    }
    int x = accept(l, NULL, NULL);
    char b = 0;
    CHECK(x >= 0 && send(c, "r", 1, 0) == 1 && recv(x, &b, 1, MSG_DONTWAIT) == 1 && b == 'r',
          "the listener did not get the connection to %s", path);
    if (x >= 0) close(x);
    close(c);
}

int main(void) {
    setup();
    struct sockaddr_un a;
    socklen_t al = addr(&a, "rel.sock");
    unlink("rel.sock");
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, al) || listen(l, 4)) die("bind rel.sock");
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&a, al)) die("connect");
    int s = accept(l, NULL, NULL);
    if (s < 0) die("accept");
    out("ready l=%d c=%d a=%d\n", l, c, s);
    unsigned n = 0;
    for (; !go_exists(); n++) {
        char b = 0;
        CHECK(send(c, "t", 1, 0) == 1 && recv(s, &b, 1, 0) == 1 && b == 't',
              "tick %u: no byte through the accepted connection", n);
        out("tick %u\n", n);
        sleep_ms(20);
    }
    struct sockaddr_un g;
    socklen_t gl = sizeof g;
    memset(&g, 0, sizeof g);
    CHECK(getsockname(l, (struct sockaddr *)&g, &gl) == 0 && strcmp(g.sun_path, "rel.sock") == 0,
          "the listener's name is '%s', want 'rel.sock'", g.sun_path);
    char cwd[PATH_MAX], abs[PATH_MAX + 16];
    if (!getcwd(cwd, sizeof cwd)) die("getcwd");
    snprintf(abs, sizeof abs, "%s/rel.sock", cwd);
    try_connect(l, abs);
    try_connect(l, "rel.sock");
    finish("ticks=%u", n);
}
