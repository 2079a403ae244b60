/* unsupported: holds a resource stasis cannot checkpoint and ticks.
 *   unsupported pipe    pipe() (not stdio)             -> prints fds R,W
 *   unsupported socket  socketpair(AF_UNIX, SOCK_STREAM) -> prints fds A,B (supported now)
 *   unsupported inet    a UDP socket on 127.0.0.1 connected to itself -> prints fds S,S
 *   unsupported shmem   MAP_SHARED|MAP_ANONYMOUS 1 MiB mapping
 *   unsupported seccomp a seccomp BPF filter that allows everything (cannot be
 *                       released: `release` only prints `released`)
 * Prints `ready kind=K fds=A,B`, then `tick N` every ~20 ms. When a file named
 * `release` appears it drops the resource (close / munmap) after checking it
 * still works and prints `released`. When `go` appears: `OK ticks=N`. */
#include "util.h"
#include <linux/netlink.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>

int main(int argc, char **argv) {
    setup();
    const char *kind = argc > 1 ? argv[1] : "pipe";
    int fds[2] = {-1, -1};
    uint8_t *shm = NULL;
    if (strcmp(kind, "pipe") == 0) {
        if (pipe(fds)) die("pipe");
    } else if (strcmp(kind, "socket") == 0) {
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds)) die("socketpair");
    } else if (strcmp(kind, "inet") == 0) {
        int s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0) die("socket");
        struct sockaddr_in a = {0};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t l = sizeof a;
        if (bind(s, (struct sockaddr *)&a, sizeof a) || getsockname(s, (struct sockaddr *)&a, &l) ||
            connect(s, (struct sockaddr *)&a, sizeof a))
            die("udp loopback");
        fds[0] = fds[1] = s;
    } else if (strcmp(kind, "netlink") == 0) {
        int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
        if (s < 0) die("netlink socket");
        fds[0] = fds[1] = s;
    } else if (strcmp(kind, "shmem") == 0) {
        shm = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (shm == MAP_FAILED) die("mmap shared");
        memset(shm, 0x3c, 1 << 20);
    } else if (strcmp(kind, "seccomp") == 0) {
        struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        struct sock_fprog prog = {1, allow};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
            die("seccomp filter");
    } else {
        out("FAIL unknown kind %s\n", kind);
        return 2;
    }
    out("ready kind=%s fds=%d,%d\n", kind, fds[0], fds[1]);
    int released = 0;
    unsigned n = 0;
    for (; !go_exists(); n++) {
        if (!released && access("release", F_OK) == 0) {
            if (strcmp(kind, "seccomp") == 0) {
                /* a filter cannot be removed */
            } else if (strcmp(kind, "netlink") == 0) {
                close(fds[0]); /* refused: the job only has to survive it */
            } else if (shm) {
                size_t bad = 0;
                for (size_t i = 0; i < (1 << 20); i++) bad += shm[i] != 0x3c;
                CHECK(bad == 0, "shared mapping corrupted (%zu bytes)", bad);
                munmap(shm, 1 << 20);
            } else {
                /* the resource must still work after the refused checkpoint */
                char b[8] = {0};
                CHECK(write(fds[1], "ping", 4) == 4, "write to %s: %s", kind, strerror(errno));
                CHECK(read(fds[0], b, sizeof b) == 4 && memcmp(b, "ping", 4) == 0,
                      "read back from %s failed", kind);
                close(fds[0]);
                close(fds[1]);
            }
            released = 1;
            out("released\n");
        }
        out("tick %u\n", n);
        sleep_ms(20);
    }
    finish("ticks=%u released=%d", n, released);
}
