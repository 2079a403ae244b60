/* sockrefuse: holds a UNIX socket stasis must refuse to checkpoint, and ticks.
 *   sockrefuse outside PATH   connects (SOCK_STREAM) to the listener at PATH
 *                             (the test's, outside the checkpoint) and writes
 *                             `tick N\n` to it every tick
 *   sockrefuse pending        listens on <cwd>/plisten; the test connects from
 *                             outside and the connection stays pending
 *   sockrefuse scm            a socketpair with a netlink socket in flight
 *                             (sent with SCM_RIGHTS, not received yet): a kind
 *                             of descriptor stasis cannot save
 * Prints `ready kind=K fds=A,B` (the socket fds), then `tick N` every ~20 ms.
 * When a file `release` appears it checks the resource still works and drops
 * it, then prints `released`:
 *   outside: writes `bye\n` and closes the socket;
 *   pending: accepts the connection, reads `x`, answers `y`, closes both;
 *   scm:     receives the fd, checks it is the netlink socket (SO_DOMAIN),
 *            closes all.
 * At `go`: `OK ticks=N released=1`. */
#include "util.h"
#include <signal.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/netlink.h>

static void addr_of(struct sockaddr_un *a, socklen_t *l, const char *path) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    snprintf(a->sun_path, sizeof a->sun_path, "%s", path);
    *l = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(a->sun_path) + 1);
}

int main(int argc, char **argv) {
    setup();
    signal(SIGPIPE, SIG_IGN);
    const char *kind = argc > 1 ? argv[1] : "scm";
    int fds[2] = {-1, -1}, pipefd[2] = {-1, -1};
    struct sockaddr_un a;
    socklen_t al;
    if (strcmp(kind, "outside") == 0) {
        if (argc < 3) return 2;
        addr_of(&a, &al, argv[2]);
        fds[0] = fds[1] = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fds[0] < 0 || connect(fds[0], (struct sockaddr *)&a, al)) die("connect outside");
    } else if (strcmp(kind, "pending") == 0) {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) die("getcwd");
        char p[PATH_MAX + 16];
        snprintf(p, sizeof p, "%s/plisten", cwd);
        addr_of(&a, &al, p);
        fds[0] = fds[1] = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fds[0] < 0 || bind(fds[0], (struct sockaddr *)&a, al) || listen(fds[0], 4))
            die("listen");
    } else if (strcmp(kind, "scm") == 0) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds)) die("socketpair");
        pipefd[0] = socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE);
        if (pipefd[0] < 0) die("netlink socket");
        char c = 'F';
        struct iovec iov = {&c, 1};
        union {
            struct cmsghdr h;
            char b[CMSG_SPACE(sizeof(int))];
        } u;
        memset(&u, 0, sizeof u);
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = u.b;
        m.msg_controllen = sizeof u.b;
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        h->cmsg_level = SOL_SOCKET;
        h->cmsg_type = SCM_RIGHTS;
        h->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(h), &pipefd[0], sizeof(int));
        if (sendmsg(fds[0], &m, 0) != 1) die("sendmsg SCM_RIGHTS");
        close(pipefd[0]); /* only the copy in flight is left */
        pipefd[0] = -1;
    } else {
        out("FAIL unknown kind %s\n", kind);
        return 2;
    }
    out("ready kind=%s fds=%d,%d\n", kind, fds[0], fds[1]);
    int released = 0;
    unsigned n = 0;
    for (; !go_exists(); n++) {
        if (!released && access("release", F_OK) == 0) {
            if (strcmp(kind, "outside") == 0) {
                CHECK(send(fds[0], "bye\n", 4, MSG_NOSIGNAL) == 4, "send bye: %s", strerror(errno));
                close(fds[0]);
            } else if (strcmp(kind, "pending") == 0) {
                int x = accept(fds[0], NULL, NULL);
                char c = 0;
                if (x < 0) {
                    fail("accept: %s", strerror(errno));
                } else {
                    CHECK(read(x, &c, 1) == 1 && c == 'x', "no `x` from the pending connection");
                    CHECK(write(x, "y", 1) == 1, "write y: %s", strerror(errno));
                    close(x);
                }
                close(fds[0]);
            } else {
                char c = 0;
                struct iovec iov = {&c, 1};
                union {
                    struct cmsghdr h;
                    char b[CMSG_SPACE(sizeof(int))];
                } u;
                struct msghdr m = {0};
                m.msg_iov = &iov;
                m.msg_iovlen = 1;
                m.msg_control = u.b;
                m.msg_controllen = sizeof u.b;
                int got = -1;
                if (recvmsg(fds[1], &m, 0) == 1 && c == 'F') {
                    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
                    if (h && h->cmsg_type == SCM_RIGHTS) memcpy(&got, CMSG_DATA(h), sizeof(int));
                }
                if (got < 0) {
                    fail("the fd in flight was not received");
                } else {
                    int dom = -1;
                    socklen_t dl = sizeof dom;
                    CHECK(getsockopt(got, SOL_SOCKET, SO_DOMAIN, &dom, &dl) == 0 && dom == AF_NETLINK,
                          "the received fd is not the netlink socket (domain %d)", dom);
                    close(got);
                }
                close(fds[0]);
                close(fds[1]);
            }
            released = 1;
            out("released\n");
        }
        if (!released && strcmp(kind, "outside") == 0) {
            char b[64];
            int l = snprintf(b, sizeof b, "tick %u\n", n);
            ssize_t r = send(fds[0], b, (size_t)l, MSG_NOSIGNAL | MSG_DONTWAIT);
            CHECK(r == l || (r < 0 && errno == EAGAIN), "send to the outside listener: %s",
                  r < 0 ? strerror(errno) : "short");
        }
        out("tick %u\n", n);
        sleep_ms(20);
    }
    finish("ticks=%u released=%d", n, released);
}
